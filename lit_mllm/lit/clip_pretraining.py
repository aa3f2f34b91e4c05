"""CLIP pretraining of a vision tower on image-caption pairs, offline: the image-encoder study pretrains its own
towers (at chosen sizes, resolutions and data amounts, on ShapesWorld captions) and its VLM arms load them, so the
study downloads nothing. Not a VLM: a vision tower, a text tower and a contrastive head, trained with open_clip's
loss (``open_clip.loss.ClipLoss``: symmetric InfoNCE over the batch at the learned logit scale).

    pixel_values [B, 3, S, S] --vision_tower--> [B, N, D_v] --head--> [B, E] image embeddings
    caption ids  [B, L]       --text_tower---> [B, D_t]     --head--> [B, E] text embeddings
    loss = (CE(s * I @ T.T, arange B) + CE(s * T @ I.T, arange B)) / 2,   s = exp(logit_scale) <= 100

Data: the project's DataModule with an image-caption source (``Captions``: img2dataset shards, JSONL/CSV
manifests; ShapesWorld writes ``captions_{split}.jsonl``). :meth:`CLIPPretraining.processor` renders each pair in
the ``Plain`` format, ``<s><image>caption</s>``, so the supervised tokens of a sample are its caption and end
token, which is what the text tower reads (:func:`caption_tokens`). One image per caption; padded batches.

Logged: ``train/loss``, ``train/logit_scale``, ``{split}/loss`` and the in-batch retrieval accuracies
``{split}/image_to_text`` / ``{split}/text_to_image`` (:func:`retrieval_accuracy`; chance is 1 / batch size, so
compare runs at the same batch size) for ``train``, ``val`` and ``test``.

What trains is a :class:`~lit_mllm.training.stages.Stage` (or a schedule of them) over the parts ``vision_tower``,
``text_tower`` and ``head`` (default: all three; LiT's locked image tower is ``trainable: [text_tower, head]``); the
machinery (freezing, optimizer groups, per-step seeding) is :class:`~lit_mllm.lit.staged.StagedModule`'s.
Checkpoints are Lightning's, with every weight (``full_checkpoints``): a VLM's tower loads its part of one with
``TinyCLIPVision(weights=<ckpt>)`` (:meth:`~lit_mllm.nn.vision.base.VisionTower.load_pretrained`).

Under DDP the loss gathers every rank's embeddings (``local_loss``, gradients through the gather), so the negatives
are the global batch; every rank's batch must then hold the same number of pairs (checked at each step), which a
``skip`` bad-sample policy may break. The retrieval accuracies are each rank's own.
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from open_clip.loss import ClipLoss
from torch import Tensor, nn
from torchmetrics import MeanMetric

from lit_mllm.data.batch import Batch
from lit_mllm.data.images import ImageTransform, normalize
from lit_mllm.data.processor import Processor
from lit_mllm.lit.staged import StagedModule
from lit_mllm.nn.clip import ContrastiveHead, TextTower, TinyCLIPText
from lit_mllm.nn.language.chat import IGNORE_INDEX, Plain
from lit_mllm.nn.language.tokenizer import IMAGE_TOKEN
from lit_mllm.nn.vision.base import VisionTower
from lit_mllm.training.stages import Stage, StageSchedule, part_trains

EVAL_METRICS = ("loss", "image_to_text", "text_to_image")
"""What validation and test log per split, each a mean over the split's pairs."""


def caption_tokens(batch: Batch, pad_token_id: int) -> tuple[Tensor, Tensor]:
    """The captions of a padded batch as the text tower reads them: each sample's supervised tokens (its caption and
    end token, in the ``Plain`` format) moved to the start of its row. ``-> (input_ids [B, L], attention_mask
    [B, L])``, ``L`` the longest caption."""
    if batch.position_ids is not None:
        raise ValueError(
            "CLIP pretraining takes padded batches (one caption per row); unset data.pack_length"
        )
    keep = batch.labels != IGNORE_INDEX  # [B, L_in]
    lengths = keep.sum(dim=1)  # [B]
    empty = [batch.ids[i] for i in torch.nonzero(lengths == 0).flatten().tolist()]
    if empty:
        raise ValueError(f"samples {empty} have no caption token; CLIP pretraining reads image-caption pairs")
    width = int(lengths.max())
    mask = torch.arange(width, device=lengths.device)[None] < lengths[:, None]  # [B, L]
    ids = torch.full(mask.shape, pad_token_id, dtype=batch.input_ids.dtype, device=batch.input_ids.device)
    ids[mask] = batch.input_ids[keep]  # both row-major: row i's caption lands in row i, in order
    return ids, mask.long()


def retrieval_accuracy(logits_per_image: Tensor) -> tuple[Tensor, Tensor]:
    """In-batch top-1 retrieval accuracies of a ``[B, B]`` similarity matrix whose row ``i`` compares image ``i``
    with every caption and whose diagonal holds the true pairs: ``(image -> text, text -> image)``. A tie goes to
    the lower index, so of two identical captions only the first counts as retrieved."""
    target = torch.arange(logits_per_image.shape[0], device=logits_per_image.device)
    image_to_text = (logits_per_image.argmax(dim=1) == target).float().mean()
    text_to_image = (logits_per_image.argmax(dim=0) == target).float().mean()
    return image_to_text, text_to_image


class CLIPPretraining(StagedModule):
    """A vision tower and a text tower trained together with CLIP's contrastive loss (see the module docstring)."""

    full_checkpoints: ClassVar[bool] = True
    """Checkpoints keep every weight, frozen ones too: a VLM's tower loads from one whatever the stage trained."""

    def __init__(
        self,
        vision_tower: VisionTower,
        text_tower: TextTower | None = None,
        embed_dim: int = 64,
        init_logit_scale: float = math.log(1 / 0.07),
        max_logit_scale: float = 100.0,
        stage: Stage | StageSchedule | None = None,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        scheduler: LRSchedulerCallable | None = None,
    ) -> None:
        """
        Args:
            vision_tower: The tower to pretrain; its output tokens are mean-pooled. Pretrain it at
                ``feature_layer: -1`` so every block learns; a VLM may then read an earlier one.
            text_tower: Caption encoder; None = :class:`~lit_mllm.nn.clip.TinyCLIPText` with its defaults. Its
                tokenizer tokenizes the captions.
            embed_dim: Width of the joint embedding space.
            init_logit_scale: Initial log of the logit scale (CLIP: log(1 / 0.07)).
            max_logit_scale: Ceiling of the logit scale (CLIP: 100).
            stage: What trains, over the parts ``vision_tower``, ``text_tower`` and ``head``; None (or a stage
                without ``trainable``) trains all three. Or a StageSchedule of stages switched at step milestones.
            optimizer: Optimizer over the trainable parameters (no weight decay on norms, biases, embeddings and
                the logit scale).
            scheduler: Learning-rate schedule, stepped every optimizer step; a ``total_steps`` of None spans the stage
                (for one stage: the run).
        """
        super().__init__(stage, optimizer, scheduler)
        self.vision_tower = vision_tower
        self.text_tower = text_tower if text_tower is not None else TinyCLIPText()
        self.head = ContrastiveHead(
            vision_tower.hidden_size,
            self.text_tower.hidden_size,
            embed_dim,
            init_logit_scale,
            max_logit_scale,
        )
        self.loss = ClipLoss()  # one process; setup() gives DDP runs one that gathers across ranks
        self.eval_metrics = nn.ModuleDict(
            {split: nn.ModuleDict({m: MeanMetric() for m in EVAL_METRICS}) for split in ("val", "test")}
        )
        self.freeze_and_load()

    @classmethod
    def default_stage(cls) -> Stage:
        """Everything trains."""
        return Stage(name="clip", trainable=["vision_tower", "text_tower", "head"])

    def parts(self) -> dict[str, nn.Module]:
        """The named parts a stage can train."""
        return {"vision_tower": self.vision_tower, "text_tower": self.text_tower, "head": self.head}

    def processor(self) -> Processor:
        """The processor the DataModule uses: ``<s><image>caption</s>`` (``Plain``), the caption supervised, the
        image resized to the tower's side; a caption longer than the text tower's ``max_length`` is ``too_long``."""
        tok = self.text_tower.tokenizer
        image_token_id = tok.convert_tokens_to_ids(IMAGE_TOKEN)
        if image_token_id is None or image_token_id == tok.unk_token_id:
            raise ValueError(
                f"the text tower's tokenizer has no {IMAGE_TOKEN!r} token, which marks the image in the Plain "
                "format; add it as a special token, or use the shipped tiny tokenizer"
            )
        before_caption = 1 + (tok.bos_token is not None)  # <s><image>
        return Processor(
            tokenizer=tok,
            chat_format=Plain(IMAGE_TOKEN),
            image_transform=ImageTransform(self.vision_tower.image_size),
            image_token=IMAGE_TOKEN,
            image_token_id=image_token_id,
            tokens_per_image=1,
            max_length=self.text_tower.max_length + before_caption,
        )

    # -- the model ----------------------------------------------------------------------------------------------
    def forward(self, batch: Batch) -> tuple[Tensor, Tensor, Tensor]:
        """``(image embeddings [B, E], text embeddings [B, E], logit scale [])`` of a batch of pairs; a frozen
        tower runs without autograd."""
        if batch.pixel_values is None or any(n != 1 for n in batch.images_per_row):
            raise ValueError(
                f"CLIP pretraining pairs one image with one caption; the batch of {batch.ids} has "
                f"{batch.images_per_row} images per sample"
            )
        tower, parts, grad = self.vision_tower, self.parts(), torch.is_grad_enabled()
        pixels = batch.pixel_values
        if pixels.dtype == torch.uint8:
            pixels = normalize(pixels, tower.mean, tower.std)
        with torch.set_grad_enabled(grad and part_trains(parts, "vision_tower")):
            features = tower(pixels)  # [B, N, D_v]
        ids, mask = caption_tokens(batch, self.text_tower.tokenizer.pad_token_id)
        with torch.set_grad_enabled(grad and part_trains(parts, "text_tower")):
            pooled = self.text_tower(ids, mask)  # [B, D_t]
        return self.head.embed_images(features), self.head.embed_texts(pooled), self.head.scale()

    def setup(self, stage: str) -> None:
        """Under DDP, a loss whose negatives are every rank's pairs."""
        world_size = self.trainer.world_size
        if world_size > 1:
            self.loss = ClipLoss(
                local_loss=True, gather_with_grad=True, rank=self.global_rank, world_size=world_size
            )

    def describe(self) -> dict[str, int | str]:
        """The base's figures (stage, parameters per part) and the tower's input and output sizes."""
        facts = super().describe()
        facts["image_size"] = self.vision_tower.image_size
        facts["image_features"] = self.vision_tower.num_features
        facts["embed_dim"] = self.head.image_projection.out_features
        return facts

    # -- steps --------------------------------------------------------------------------------------------------
    def _check_equal_batches(self, size: int) -> None:
        """ClipLoss gathers embeddings of equal shape from every rank; a smaller batch on one rank would hang it."""
        if self._trainer is not None and self.trainer.world_size > 1:
            sizes = self.all_gather(torch.tensor(size, device=self.device)).flatten().tolist()
            if len(set(sizes)) > 1:
                raise RuntimeError(
                    f"step {self.global_step}: the ranks' batches hold {sizes} pairs; the contrastive loss gathers "
                    "equal batches from every rank: use on_bad_sample: fail, and a samples_per_epoch that is a "
                    "multiple of batch_size x ranks"
                )

    def training_step(self, batch: Batch, batch_idx: int) -> Tensor | None:
        if not len(batch):  # every sample of the batch was bad and skipped (counted by the DataModule)
            return None
        self._check_equal_batches(len(batch))
        images, texts, scale = self(batch)
        loss = self.loss(images, texts, scale)
        if not torch.isfinite(loss):
            raise FloatingPointError(
                f"training loss is {loss.item()} at step {self.global_step} on samples {batch.ids}; lower the "
                "learning rate or check these samples"
            )
        image_to_text, text_to_image = retrieval_accuracy(images.detach() @ texts.detach().T)
        size = len(batch)
        self.log("train/loss", loss, prog_bar=True, batch_size=size)
        self.log("train/image_to_text", image_to_text, batch_size=size)
        self.log("train/text_to_image", text_to_image, batch_size=size)
        self.log("train/logit_scale", scale.detach(), batch_size=size)
        return loss

    def _eval_step(self, batch: Batch, split: str) -> None:
        if not len(batch):
            return
        self._check_equal_batches(len(batch))
        images, texts, scale = self(batch)
        values = dict(
            zip(EVAL_METRICS, (self.loss(images, texts, scale), *retrieval_accuracy(images @ texts.T)))
        )
        for name, metric in self.eval_metrics[split].items():
            metric.update(values[name], weight=len(batch))
            self.log(f"{split}/{name}", metric, prog_bar=name == "loss", batch_size=len(batch))

    def validation_step(self, batch: Batch, batch_idx: int) -> None:
        self._eval_step(batch, "val")

    def test_step(self, batch: Batch, batch_idx: int) -> None:
        self._eval_step(batch, "test")
