"""Prefix fusion family (LLaVA / LLaVA-1.5 / MM1 / BLIP-2 stage 2 / Qwen-VL / POINTS): the vision tower's
features go through a connector and replace the image-token embeddings of the LLM input.

    pixel_values [I, 3, S, S] --vision_tower--> [I, N, D_v] --connector--> [I, T, D_llm]
    input_ids [B, L] --embed--> [B, L, D_llm] --splice at image tokens--> --language_model--> logits [B, L, V]

Widths come from the parts: the connector is built here from ``vision_tower.hidden_size`` and
``language_model.hidden_size``; ``T`` comes from the connector and is handed to the data pipeline.
"""

from __future__ import annotations

import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn

from lit_mllm.data.images import ImageTransform, normalize
from lit_mllm.data.layouts import ImageLayout, Resize
from lit_mllm.data.processor import Processor
from lit_mllm.lit.base import VLMModule, supervised
from lit_mllm.nn.connectors import ConnectorFactory, MLPConnector, connector_flops
from lit_mllm.nn.fusion.prefix import splice_image_features
from lit_mllm.nn.language.model import LanguageModel
from lit_mllm.nn.vision.base import VisionTower
from lit_mllm.training.stages import Stage, StageSchedule


class PrefixFusionVLM(VLMModule):
    """A vision tower, a connector and a decoder LLM joined by splicing image features into the input."""

    def __init__(
        self,
        vision_tower: VisionTower,
        language_model: LanguageModel,
        connector: ConnectorFactory = MLPConnector,
        image_layout: ImageLayout | None = None,
        stage: Stage | StageSchedule | None = None,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        scheduler: LRSchedulerCallable | None = None,
        max_new_tokens: int = 32,
        init_from: str | None = None,
    ) -> None:
        """
        Args:
            vision_tower: Image encoder giving ``[B, N, D_v]`` features.
            language_model: Decoder LLM with its tokenizer and chat format.
            connector: Connector class and its options; called with ``(D_v, D_llm)``.
            image_layout: How an image becomes tower inputs: ``Resize`` (default), ``Letterbox``, ``ResizeCrop``, or
                tiles (``AnyRes``, ``Catty``, ``MM1SubImages``: each tile gives ``T`` tokens).
            stage: What trains (default: connector + language model, LLaVA's finetune stage), or a StageSchedule
                of stages switched at step milestones.
            optimizer: Optimizer class and options (parameters are filled in).
            scheduler: Learning-rate scheduler class and options, stepped every optimizer step.
            max_new_tokens: Longest generated reply in ``predict``.
            init_from: Weights to start from, after the parts are built from their sources: a checkpoint of an
                earlier stage (``.ckpt``) or an exported ``model.safetensors``; every tensor in it must match.
        """
        super().__init__(stage, optimizer, scheduler, max_new_tokens)
        self.save_hyperparameters(
            ignore=["vision_tower", "language_model", "connector", "image_layout", "optimizer", "scheduler"]
        )
        self.vision_tower = vision_tower
        self.language_model = language_model
        self.connector = connector(vision_tower.hidden_size, language_model.hidden_size)
        self.tokens_per_image = self.connector.num_tokens(vision_tower.num_features)
        self.image_layout = image_layout or Resize()
        self.apply_stage()
        if init_from is not None:
            from lit_mllm.training.checkpoints import load_weights

            load_weights(self, init_from)

    def describe(self) -> dict[str, int | str]:
        return {
            **super().describe(),
            "image_tokens": self.tokens_per_image,
            "connector_flops_per_image": connector_flops(self.connector, self.vision_tower.num_features),
        }

    def parts(self) -> dict[str, nn.Module]:
        return {
            "vision_tower": self.vision_tower,
            "connector": self.connector,
            "language_model": self.language_model,
        }

    def processor(self) -> Processor:
        tower, lm = self.vision_tower, self.language_model
        return Processor(
            tokenizer=lm.tokenizer,
            chat_format=lm.chat_format,
            image_transform=ImageTransform(tower.image_size, self.image_layout),
            image_token=lm.image_token,
            image_token_id=lm.image_token_id,
            tokens_per_image=self.tokens_per_image,
            max_length=lm.max_length,
        )

    def encode_images(self, pixel_values: Tensor) -> Tensor:
        """``[I, 3, S, S] -> [I, T, D_llm]``; a frozen tower runs without autograd. uint8 images (what the
        processor gives) are normalised here with the tower's mean/std; float input is taken as normalised."""
        if pixel_values.dtype == torch.uint8:
            pixel_values = normalize(pixel_values, self.vision_tower.mean, self.vision_tower.std)
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.stage.trains("vision_tower")):
            features = self.vision_tower(pixel_values)  # [I, N, D_v]
        return self.connector(features)  # [I, T, D_llm]

    def embed(self, batch: dict) -> Tensor:
        """Input embeddings ``[R, L, D_llm]`` with image features spliced in."""
        text = self.language_model.embed(batch["input_ids"])
        if batch["pixel_values"] is not None:
            images = self.encode_images(batch["pixel_values"])
        elif self.training and torch.distributed.is_initialized() and self._image_path_trains():
            # A text-only batch under DDP: run a blank image so the connector (and tower) take part in the
            # backward pass like on every other rank; its contribution is exactly zero.
            tower = self.vision_tower
            blank = text.new_zeros(1, 3, tower.image_size, tower.image_size)
            return text + 0.0 * self.encode_images(blank).sum()
        else:
            images = None
        return splice_image_features(
            text,
            batch["input_ids"],
            self.language_model.image_token_id,
            images,
            batch["images_per_row"],
            batch.get("row_names", batch["ids"]),
        )

    def _image_path_trains(self) -> bool:
        return any(p.requires_grad for p in [*self.connector.parameters(), *self.vision_tower.parameters()])

    def forward(self, batch: dict) -> Tensor:
        """Logits ``[R, L, V]`` for a collated batch (padded: attention mask; packed: position ids)."""
        return self.language_model(self.embed(batch), batch["attention_mask"], batch.get("position_ids"))

    def supervised_logits(self, batch: dict) -> tuple[Tensor, Tensor, Tensor]:
        """Logits only where the next token is learned: the vocabulary projection skips every other position."""
        hidden = self.language_model.hidden_states(
            self.embed(batch), batch["attention_mask"], batch.get("position_ids")
        )  # [R, L, D]
        mask = supervised(batch["labels"])  # [R, L-1]
        logits = self.language_model.head(hidden[:, :-1][mask])  # [S, V]
        return logits, batch["labels"][:, 1:][mask], batch["sample_index"][:, 1:][mask]

    @torch.no_grad()
    def generate(self, batch: dict, **kwargs) -> list[str]:
        kwargs.setdefault("do_sample", False)
        new = self.language_model.generate(self.embed(batch), batch["attention_mask"], **kwargs)
        return [a.strip() for a in self.language_model.tokenizer.batch_decode(new, skip_special_tokens=True)]
