"""Q-Former pretraining family: BLIP-2 stage 1 (Li et al. 2023, "BLIP-2: Bootstrapping Language-Image
Pre-training with Frozen Image Encoders and Large Language Models"), representation learning before any LLM.

    pixel_values [B, 3, S, S] --vision_tower (frozen)--> [B, N, D_v] --.
    caption ids [B, L] ([CLS] caption [SEP]) ---------------------------+--> QFormer over [queries; text]
      ITC mask -> query / [CLS] embeddings -> in-batch contrastive loss, similarities -> hard negatives
      ITM mask -> (image, text) pairs: positives, mined negatives      -> match / no-match loss
      ITG mask -> [DEC] caption                                        -> next-token loss (LM head)

The mechanism (Q-Former with its text branch, the three masks, the heads) is
:mod:`lit_mllm.nn.fusion.qformer_pretraining`. There is no decoder LLM, so this is not a
:class:`~lit_mllm.lit.base.VLMModule`: it is a sibling on the same :class:`~lit_mllm.lit.staged.StagedModule`
(named parts, the stage's freezing asserted and printed, stage schedules, optimizer groups per part with their
``lr_scale``, per-step seeding, trainable-only checkpoints). Parts: ``vision_tower``, ``qformer`` and ``heads``;
the default stage trains the Q-Former and the heads (BLIP-2 freezes the image encoder).

Metrics: ``train/loss`` (the sum of the three), ``train/loss/itc``, ``train/loss/itm``, ``train/loss/itg``, the
same under ``val/``, and ``val/itc_r1``: image -> text recall@1 within the batch (a caption identical to the
image's own counts as a hit). Its checkpoint starts BLIP-2's stage 2, the prefix family's Q-Former connector:
``QFormerConnector(init_from=<this run's .ckpt>)`` (configs/model/blip2.yaml).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn
from torchmetrics import MeanMetric

from lit_mllm.data.batch import Batch
from lit_mllm.data.images import ImageTransform, normalize
from lit_mllm.data.layouts import ImageLayout, Resize
from lit_mllm.data.processor import Processor
from lit_mllm.data.sample import Sample
from lit_mllm.lit.staged import StagedModule
from lit_mllm.nn.fusion.qformer_pretraining import (
    PretrainingHeads,
    QFormer,
    QFormerFactory,
    itc_similarity,
    objective_mask,
    sample_hard_negatives,
)
from lit_mllm.nn.language.chat import IGNORE_INDEX
from lit_mllm.nn.language.tokenizer import TINY_BERT_TOKENIZER_DIR
from lit_mllm.nn.vision.base import VisionTower
from lit_mllm.training.stages import Stage, StageSchedule, part_trains

DECODER_START_TOKEN = "[DEC]"
"""BLIP-2's decoder start token, added to a tokenizer that has no ``bos_token``."""


@dataclass
class CaptionProcessor(Processor):
    """A sample -> ``[CLS] caption [SEP]`` ids (the caption is the last reply, or a document's text) and its one
    image; no image tokens in the text. Captions longer than ``max_caption_tokens`` (or a smaller ``max_length``
    set by the DataModule) are cut, keeping ``[SEP]``, as BLIP-2 cuts them at 32 tokens."""

    max_caption_tokens: int = 32
    """Caption tokens kept, ``[CLS]`` and ``[SEP]`` included."""

    def encode_text(
        self, sample: Sample, crops: list[int] | None = None, for_generation: bool = False
    ) -> tuple[Tensor, Tensor]:
        """``[CLS] caption [SEP]`` token ids and labels, long ``[L]`` each (the processor's contract)."""
        if for_generation:
            raise sample.fail("Q-Former pretraining generates nothing; it has no predict step")
        if len(sample.images) != 1 or (crops is not None and crops != [1]):
            raise sample.fail(
                f"Q-Former pretraining pairs one image with one caption; this sample has {len(sample.images)} "
                f"image(s) ({sum(crops or [])} tower inputs; use a one-crop image layout)",
                "image_mismatch",
            )
        caption = sample.text if sample.text is not None else sample.turns[-1].text
        text = caption.replace(self.image_token, "").strip()
        if not text:
            raise sample.fail("empty caption", "no_supervision")
        ids = self.tokenizer(text, add_special_tokens=True)["input_ids"]
        keep = min(self.max_caption_tokens, self.max_length or self.max_caption_tokens)
        if len(ids) > keep:
            ids = ids[: keep - 1] + ids[-1:]
        labels = [IGNORE_INDEX] + ids[1:]  # [CLS] is replaced by [DEC] and never predicted
        return torch.tensor(ids, dtype=torch.long), torch.tensor(labels, dtype=torch.long)


class QFormerPretraining(StagedModule):
    """A frozen vision tower and BLIP-2's Q-Former trained with ITC, ITM and ITG (see the module docstring)."""

    def __init__(
        self,
        vision_tower: VisionTower,
        qformer: QFormerFactory = QFormer,
        tokenizer: str | None = None,
        max_text_length: int = 32,
        embed_dim: int = 256,
        label_smoothing: float = 0.1,
        image_layout: ImageLayout | None = None,
        stage: Stage | StageSchedule | None = None,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        scheduler: LRSchedulerCallable | None = None,
        init_from: str | None = None,
    ) -> None:
        """
        Args:
            vision_tower: Image encoder giving ``[B, N, D_v]`` features (frozen in BLIP-2).
            qformer: QFormer class and its options; called with ``(D_v, vocabulary size)``. Use the options of the
                stage-2 QFormerConnector that will start from this run.
            tokenizer: Hugging Face name or folder of a BERT-like tokenizer (BLIP-2: bert-base-uncased); ``[DEC]``
                is added as its bos_token if it has none. None: the shipped tiny WordPiece tokenizer.
            max_text_length: Caption tokens kept, ``[CLS]`` and ``[SEP]`` included (BLIP-2: 32).
            embed_dim: Width of the contrastive embeddings (BLIP-2: 256).
            label_smoothing: Label smoothing of the ITC and ITG cross-entropies (BLIP-2: 0.1).
            image_layout: How an image becomes tower input (default ``Resize``; one crop per image).
            stage: What trains (default: qformer + heads, the tower frozen), or a StageSchedule of stages
                switched at step milestones.
            optimizer: Optimizer class and options (parameters are filled in).
            scheduler: Learning-rate scheduler class and options, stepped every optimizer step.
            init_from: Weights to start from after the parts are built (a ``.ckpt`` of this module or an exported
                ``model.safetensors``).
        """
        super().__init__(stage, optimizer, scheduler)
        self.save_hyperparameters(
            ignore=["vision_tower", "qformer", "image_layout", "optimizer", "scheduler"]
        )
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(TINY_BERT_TOKENIZER_DIR) if tokenizer is None else tokenizer)
        if tok.bos_token is None:
            tok.add_special_tokens({"bos_token": DECODER_START_TOKEN})
        if tok.cls_token_id is None or tok.pad_token_id is None:
            raise ValueError(
                f"tokenizer {tokenizer!r} has no [CLS] or no pad token; give a BERT-like tokenizer"
            )
        self.tokenizer = tok
        self.vision_tower = vision_tower
        self.qformer = qformer(vision_tower.hidden_size, len(tok))
        if not 2 <= max_text_length <= self.qformer.max_positions:
            raise ValueError(
                f"max_text_length must be in [2, {self.qformer.max_positions}] (the Q-Former's max_positions), "
                f"got {max_text_length}"
            )
        self.heads = PretrainingHeads(self.qformer.hidden_size, len(tok), embed_dim)
        self.max_text_length, self.label_smoothing = max_text_length, label_smoothing
        self.image_layout = image_layout or Resize()
        self.split_losses = nn.ModuleDict(
            {
                f"{split}_{name}": MeanMetric()
                for split in ("val", "test")
                for name in ("all", "itc", "itm", "itg")
            }
        )
        self.split_r1 = nn.ModuleDict({split: MeanMetric() for split in ("val", "test")})
        self.freeze_and_load(init_from)

    # -- parts and stage --------------------------------------------------------------------------------------
    @classmethod
    def default_stage(cls) -> Stage:
        """BLIP-2's stage 1: the Q-Former and its heads train; the image encoder is frozen."""
        return Stage(name="pretrain", trainable=["qformer", "heads"])

    def parts(self) -> dict[str, nn.Module]:
        """``vision_tower``, ``qformer`` (both branches; its query branch goes on to stage 2) and ``heads``."""
        return {"vision_tower": self.vision_tower, "qformer": self.qformer, "heads": self.heads}

    @property
    def tokens_per_image(self) -> int:
        """Query outputs per image (what the stage-2 connector hands the LLM)."""
        return self.qformer.num_queries

    def processor(self) -> Processor:
        """Captions as ``[CLS] caption [SEP]`` and their images, for the DataModule."""
        tower = self.vision_tower
        return CaptionProcessor(
            tokenizer=self.tokenizer,
            chat_format=None,
            image_transform=ImageTransform(tower.image_size, self.image_layout),
            image_token="<image>",
            image_token_id=-1,  # no image tokens in the text
            tokens_per_image=0,
            max_caption_tokens=self.max_text_length,
        )

    def describe(self) -> dict[str, int | str]:
        """The base's figures (stage, parameters per part) and the query outputs per image."""
        facts = super().describe()
        facts["image_tokens"] = self.tokens_per_image
        return facts

    # -- the three objectives ---------------------------------------------------------------------------------
    def encode_images(self, pixel_values: Tensor) -> Tensor:
        """``[B, 3, S, S] -> [B, N, D_v]``; uint8 input is normalised with the tower's mean/std; a frozen tower runs
        without autograd."""
        tower = self.vision_tower
        if pixel_values.dtype == torch.uint8:
            pixel_values = normalize(pixel_values, tower.mean, tower.std)
        with torch.set_grad_enabled(torch.is_grad_enabled() and part_trains(self.parts(), "vision_tower")):
            return tower(pixel_values)

    def itc(self, features: Tensor, input_ids: Tensor, text_mask: Tensor) -> Tensor:
        """``[I, T]`` ITC similarities (before the temperature) of ``features [I, N, D_v]`` and captions
        ``input_ids [T, L]`` (``I == T``: one pass over ``[queries; text]`` under the unimodal mask)."""
        q = self.qformer.num_queries
        hidden = self.qformer(features, input_ids, objective_mask("itc", q, text_mask))  # [B, Q + L, H]
        image_embeds = F.normalize(self.heads.vision_proj(hidden[:, :q]), dim=-1)  # [B, Q, E]
        text_embeds = F.normalize(self.heads.text_proj(hidden[:, q]), dim=-1)  # [B, E], the [CLS] position
        return itc_similarity(image_embeds, text_embeds)

    def itm_logits(self, features: Tensor, input_ids: Tensor, text_mask: Tensor) -> Tensor:
        """``[P, 2]`` match logits (no match, match) of ``P`` pairs (``features[p]``, ``input_ids[p]``): the ITM
        head on every query output under the bidirectional mask, averaged over queries."""
        q = self.qformer.num_queries
        hidden = self.qformer(features, input_ids, objective_mask("itm", q, text_mask))  # [P, Q + L, H]
        return self.heads.itm_head(hidden[:, :q]).mean(dim=1)

    def itg_logits(self, features: Tensor, input_ids: Tensor, text_mask: Tensor) -> Tensor:
        """``[B, L, V]`` next-token logits of the captions with ``[DEC]`` in place of ``[CLS]``, under the
        multimodal causal mask."""
        q = self.qformer.num_queries
        decoder_ids = input_ids.clone()
        decoder_ids[:, 0] = self.tokenizer.bos_token_id
        hidden = self.qformer(features, decoder_ids, objective_mask("itg", q, text_mask))  # [B, Q + L, H]
        return self.heads.lm_logits(hidden[:, q:], self.qformer.word_embeddings)

    def losses(
        self, batch: Batch, generator: torch.Generator | None = None
    ) -> tuple[dict[str, Tensor], Tensor]:
        """The three losses of a batch (keys ``itc``, ``itm``, ``itg``) and its image -> text hits ``[B]`` (bool).
        ``generator`` draws the hard negatives."""
        if batch.attention_mask is None or batch.pixel_values is None:
            raise ValueError(
                f"Q-Former pretraining needs padded (not packed) batches of image-caption pairs; samples {batch.ids}"
            )
        input_ids, text_mask = batch.input_ids, batch.attention_mask.bool()
        if (
            batch.images_per_row != [1] * len(input_ids)
            or not (input_ids[:, 0] == self.tokenizer.cls_token_id).all()
        ):
            raise ValueError(f"expected one image and one '[CLS] caption' per row; samples {batch.ids}")
        features = self.encode_images(batch.pixel_values)  # [B, N, D_v]
        size = len(input_ids)
        targets = torch.arange(size, device=input_ids.device)
        same = (input_ids[:, None] == input_ids[None]).all(-1)  # [B, B] identical captions (same padding too)

        similarity = self.itc(features, input_ids, text_mask)  # [B, B]
        logits = similarity / self.heads.temperature()
        smooth = self.label_smoothing
        losses = {
            "itc": (
                F.cross_entropy(logits, targets, label_smoothing=smooth)
                + F.cross_entropy(logits.t(), targets, label_smoothing=smooth)
            )
            / 2
        }
        hits = same[targets, similarity.argmax(dim=1)]  # [B]

        if size > 1:  # a negative needs another pair in the batch
            negative_text = sample_hard_negatives(logits, same, generator)  # [B] for each image
            negative_image = sample_hard_negatives(logits.t(), same, generator)  # [B] for each text
            pair_features = torch.cat([features, features[negative_image], features])  # [3B, N, D_v]
            pair_ids = torch.cat([input_ids, input_ids, input_ids[negative_text]])  # [3B, L]
            pair_mask = torch.cat([text_mask, text_mask, text_mask[negative_text]])
            match = torch.cat(
                [targets.new_ones(size), targets.new_zeros(2 * size)]
            )  # positives, then negatives
            losses["itm"] = F.cross_entropy(self.itm_logits(pair_features, pair_ids, pair_mask), match)

        lm_logits = self.itg_logits(features, input_ids, text_mask)  # [B, L, V]
        labels = batch.labels[:, 1:]  # position t predicts token t + 1
        losses["itg"] = F.cross_entropy(
            lm_logits[:, :-1].flatten(0, 1).float(),
            labels.flatten(),
            ignore_index=IGNORE_INDEX,
            label_smoothing=smooth,
        )
        return losses, hits

    # -- steps ------------------------------------------------------------------------------------------------
    def training_step(self, batch: Batch, batch_idx: int) -> Tensor | None:
        if not len(batch):  # every sample of the batch was bad and skipped (counted by the DataModule)
            return None
        losses, hits = self.losses(batch)
        loss = sum(losses.values())
        if not torch.isfinite(loss):
            raise FloatingPointError(
                f"training loss is {loss.item()} at step {self.global_step} on samples {batch.ids}; lower the "
                "learning rate or check these samples"
            )
        size = len(batch)
        self.log("train/loss", loss, prog_bar=True, batch_size=size)
        for name, value in losses.items():
            self.log(f"train/loss/{name}", value, batch_size=size)
        self.log("train/itc_r1", hits.float().mean(), batch_size=size)
        return loss

    def _eval_step(self, batch: Batch, batch_idx: int, split: str) -> None:
        if not len(batch):
            return
        generator = torch.Generator(batch.input_ids.device).manual_seed(
            batch_idx
        )  # the same negatives each time
        losses, hits = self.losses(batch, generator)
        size = len(batch)
        for name, value in [("all", sum(losses.values())), *losses.items()]:
            metric = self.split_losses[f"{split}_{name}"]
            metric.update(value, weight=size)
            self.log(f"{split}/loss" if name == "all" else f"{split}/loss/{name}", metric, batch_size=size)
        self.split_r1[split].update(hits.float().mean(), weight=size)
        self.log(f"{split}/itc_r1", self.split_r1[split], prog_bar=True, batch_size=size)

    def validation_step(self, batch: Batch, batch_idx: int) -> None:
        self._eval_step(batch, batch_idx, "val")

    def test_step(self, batch: Batch, batch_idx: int) -> None:
        self._eval_step(batch, batch_idx, "test")
