"""Prefix fusion family (LLaVA / LLaVA-1.5 / MM1 / BLIP-2 stage 2 / Qwen-VL / POINTS): the vision tower's
features go through a connector and replace the image-token embeddings of the LLM input.

    pixel_values [I, 3, S, S] --vision_tower--> [I, N, D_v] --connector--> [I, T, D_llm]
    input_ids [B, L] --embed--> [B, L, D_llm] --splice at image tokens--> --language_model--> logits [B, L, V]

Everything but the splice is the shared base (:class:`~lit_mllm.lit.base.VLMModule`): the vision path, the
processor, stages, loss, metrics and generation. Widths come from the parts; ``T`` comes from the connector and is
handed to the data pipeline.
"""

from __future__ import annotations

import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor

from lit_mllm.data.batch import Batch
from lit_mllm.data.feature_cache import FeatureCache
from lit_mllm.data.layouts import ImageLayout
from lit_mllm.eval.generation import GenerationConfig
from lit_mllm.eval.metrics import EvalMetric
from lit_mllm.lit.base import LanguageInputs, VLMModule
from lit_mllm.nn.connectors import ConnectorFactory, MLPConnector
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
        generation: GenerationConfig | None = None,
        metrics: dict[str, EvalMetric] | None = None,
        feature_cache: FeatureCache | None = None,
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
            generation: How replies are decoded in ``predict`` and for generation metrics (default: greedy, at most
                32 new tokens).
            metrics: Evaluation metrics by name, logged as ``val/<name>`` and ``test/<name>`` (default
                :func:`~lit_mllm.lit.base.default_metrics`: teacher-forced reply exact match, overall and per
                question kind).
            feature_cache: A frozen tower's features read from disk instead of recomputed (off by default;
                refused when a stage trains the tower): see ``lit_mllm.data.FeatureCache``.
            init_from: Weights to start from, after the parts are built from their sources: a checkpoint of an
                earlier stage (``.ckpt``) or an exported ``model.safetensors``; every tensor in it must match.
        """
        super().__init__(
            vision_tower,
            language_model,
            connector,
            image_layout,
            stage,
            optimizer,
            scheduler,
            generation,
            metrics,
            feature_cache=feature_cache,
        )
        self.freeze_and_load(init_from)

    def language_inputs(self, batch: Batch, images: Tensor | None) -> LanguageInputs:
        """Input embeddings ``[R, L, D_llm]`` with the image features spliced in at the image tokens."""
        text = self.language_model.embed(batch.input_ids)
        embeds = splice_image_features(
            text,
            batch.input_ids,
            self.language_model.image_token_id,
            images,
            batch.images_per_row,
            batch.row_names,
        )
        return LanguageInputs(embeds)
