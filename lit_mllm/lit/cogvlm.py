"""Deep fusion family (CogVLM: Wang et al. 2023, "CogVLM: Visual Expert for Pretrained Language Models"): image
features are spliced into the LLM's input at the image tokens, as in prefix fusion, and inside every decoder layer
the image positions take their own query/key/value, output-projection and MLP weights (the visual expert,
initialised from the LLM's); attention is shared. The mechanism: :mod:`lit_mllm.nn.fusion.visual_expert`.

    pixel_values [I, 3, S, S] --vision_tower--> [I, N, D_v] --connector--> [I, T, D_llm]
    input_ids [B, L] --embed, splice at image tokens--> [B, L, D_llm]
      --decoder layers, image positions through the experts (mask: input_ids == image_token_id)--> logits [B, L, V]

Parts: the base's three and ``visual_expert`` (the expert modules, inside ``language_model``). CogVLM's
pretraining trains the connector and the experts with the LLM (and tower) frozen, the default stage here; its
later stage trains the LLM too at a tenth of the learning rate::

    stage: {name: finetune, trainable: [connector, visual_expert, language_model], lr_scale: {language_model: 0.1}}

(``visual_expert`` lies inside ``language_model`` and keeps its own scale of 1: the innermost named part wins).
"""

from __future__ import annotations

import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn

from lit_mllm.data.batch import Batch
from lit_mllm.data.feature_cache import FeatureCache
from lit_mllm.data.layouts import ImageLayout
from lit_mllm.eval.generation import GenerationConfig
from lit_mllm.eval.metrics import EvalMetric
from lit_mllm.lit.base import LanguageInputs, VLMModule
from lit_mllm.nn.connectors import ConnectorFactory, MLPConnector
from lit_mllm.nn.fusion.prefix import splice_image_features
from lit_mllm.nn.fusion.visual_expert import ROUTED, ExpertInputs, VisualExpertLayer, visual_expert_layers
from lit_mllm.nn.language.model import LanguageModel
from lit_mllm.nn.vision.base import VisionTower
from lit_mllm.training.stages import Stage, StageSchedule


class CogVLM(VLMModule):
    """A vision tower, a connector and a decoder LLM whose layers have a visual expert for the image positions."""

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
        expert_layers: list[int] | None = None,
        routed: list[str] | None = None,
        feature_cache: FeatureCache | None = None,
        init_from: str | None = None,
    ) -> None:
        """
        Args:
            vision_tower: Image encoder giving ``[B, N, D_v]`` features.
            language_model: Decoder LLM with its tokenizer and chat format.
            connector: Connector class and its options; called with ``(D_v, D_llm)`` (CogVLM: a 2-layer MLP).
            image_layout: How an image becomes tower inputs (default ``Resize``).
            stage: What trains (default: connector + visual experts, the LLM and tower frozen, CogVLM's
                pretraining), or a StageSchedule of stages switched at step milestones.
            optimizer: Optimizer class and options (parameters are filled in).
            scheduler: Learning-rate scheduler class and options, stepped every optimizer step.
            generation: How replies are decoded in ``predict`` and for generation metrics.
            metrics: Evaluation metrics by name, logged as ``val/<name>`` and ``test/<name>``.
            expert_layers: Decoder layers (input side first, from 0) that get a visual expert; None: every layer,
                as in CogVLM.
            routed: Modules of each decoder layer (paths inside the Hugging Face layer) that get an expert copy;
                None: query, key, value and output projections and the MLP (``self_attn.q_proj``, ``k_proj``,
                ``v_proj``, ``o_proj``, ``mlp``: Llama / Qwen2 names), as in CogVLM.
            feature_cache: A frozen tower's features read from disk instead of recomputed (off by default;
                refused when a stage trains the tower): see ``lit_mllm.data.FeatureCache``.
            init_from: Weights to start from after the parts are built (a ``.ckpt`` of an earlier stage or an
                exported ``model.safetensors``).
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
        paths = list(ROUTED if routed is None else routed)
        if not paths:
            raise ValueError("routed is empty: name the modules of a decoder layer that get a visual expert")
        self.language_model.wrap_decoder_layers(
            lambda index, layer: VisualExpertLayer(layer, index, paths), indices=expert_layers
        )
        self.freeze_and_load(init_from)

    @classmethod
    def default_stage(cls) -> Stage:
        """CogVLM's pretraining: the connector and the visual experts train; the tower and the LLM are frozen."""
        return Stage(name="pretrain", trainable=["connector", "visual_expert"])

    def expert_layers(self) -> list[VisualExpertLayer]:
        """The decoder layers that have a visual expert, input side first."""
        return visual_expert_layers(self.language_model.decoder_layers)

    def parts(self) -> dict[str, nn.Module | list[nn.Module]]:
        """The base's parts and ``visual_expert``: every expert module (the image halves of the routed pairs),
        inside ``language_model``."""
        experts = [m for layer in self.expert_layers() for m in layer.experts()]
        return {**super().parts(), "visual_expert": experts}

    def language_inputs(self, batch: Batch, images: Tensor | None) -> LanguageInputs:
        """Input embeddings ``[R, L, D_llm]`` with the image features spliced in at the image tokens, and the image
        mask ``[R, L]`` (those same positions) for the expert layers."""
        lm = self.language_model
        embeds = splice_image_features(
            lm.embed(batch.input_ids),
            batch.input_ids,
            lm.image_token_id,
            images,
            batch.images_per_row,
            batch.row_names,
        )
        return LanguageInputs(embeds, ExpertInputs(image_mask=batch.input_ids == lm.image_token_id))
