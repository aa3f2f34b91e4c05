"""mPLUG-Owl3 family (Ye et al. 2024, "mPLUG-Owl3: Towards Long Image-Sequence Understanding in Multi-Modal Large
Language Models"): the LLM's text attends to the visual features through hyper-attention at chosen decoder layers.

    pixel_values [I, 3, S, S] --vision_tower--> [I, N, D_v] --connector (linear)--> [I, N, D_llm]
        --per row--> features [B, M, N, D_llm]           (M: most images in a row)
    input_ids [B, L] (one <image> marker per image) --embed--> [B, L, D_llm] (unchanged)
        --language_model, a HyperAttentionLayer at each of hyper_layers--> logits [B, L, V]

Each image stays ONE marker token in the text (the processor's tokens per image is 1 for this family), so long
image sequences cost no LLM context. The markers say where images are: ``media_mask [B, L, M]`` lets a position
see every image whose marker is at or before it (none before the first), and ``media_positions [B, M]`` gives each
image the rotary position of its marker (MI-RoPE). The mechanism, and what it approximates, is
:mod:`lit_mllm.nn.fusion.hyper_attention`; everything else is the shared base (:class:`~lit_mllm.lit.base.VLMModule`).

The tower and the LLM are frozen by default: the connector and the hyper-attention weights (the
``hyper_attention`` part, nested inside ``language_model``) train.
"""

from __future__ import annotations

import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn

from lit_mllm.data.batch import Batch
from lit_mllm.data.feature_cache import FeatureCache
from lit_mllm.data.layouts import ImageLayout, Letterbox, Resize, ResizeCrop
from lit_mllm.eval.generation import GenerationConfig
from lit_mllm.eval.metrics import EvalMetric
from lit_mllm.lit.base import LanguageInputs, VLMModule
from lit_mllm.nn.connectors import ConnectorFactory, LinearConnector
from lit_mllm.nn.fusion.gated_xattn import media_features, media_mask
from lit_mllm.nn.fusion.hyper_attention import (
    HyperAttention,
    HyperAttentionInputs,
    HyperAttentionLayer,
    rope_theta_of,
)
from lit_mllm.nn.fusion.prefix import ImageTokenMismatch
from lit_mllm.nn.language.layers import family_wrappers
from lit_mllm.nn.language.model import LanguageModel
from lit_mllm.nn.vision.base import VisionTower
from lit_mllm.training.stages import Stage, StageSchedule


class MPLUGOwl3VLM(VLMModule):
    """A vision tower, a connector and a decoder LLM joined by hyper-attention (see the module docstring)."""

    def __init__(
        self,
        vision_tower: VisionTower,
        language_model: LanguageModel,
        connector: ConnectorFactory = LinearConnector,
        hyper_layers: list[int] = (1, 9, 17, 25),
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
            language_model: Decoder LLM (Llama / Qwen2 layer layout) with its tokenizer and chat format; its
                layers are wrapped, not changed.
            connector: Connector class and its options; called with ``(D_v, D_llm)`` (mPLUG-Owl3: a linear
                projection).
            hyper_layers: Indices of the decoder layers that get hyper-attention (mPLUG-Owl3-7B: 1, 9, 17, 25
                of Qwen2-7B's 28).
            image_layout: How an image becomes a tower input: ``Resize`` (default), ``Letterbox`` or ``ResizeCrop``
                (one tower input per image: a marker is one image).
            stage: What trains (default: connector + hyper_attention, tower and LLM frozen), or a StageSchedule.
            optimizer: Optimizer class and options (parameters are filled in).
            scheduler: Learning-rate scheduler class and options, stepped every optimizer step.
            generation: How replies are decoded in ``predict`` and for generation metrics.
            metrics: Evaluation metrics by name, logged as ``val/<name>`` and ``test/<name>``.
            feature_cache: A frozen tower's features read from disk instead of recomputed (off by default;
                refused when a stage trains the tower): see ``lit_mllm.data.FeatureCache``.
            init_from: Weights to start from after the parts are built: a ``.ckpt`` of an earlier stage or an
                exported ``model.safetensors``.
        """
        if image_layout is not None and not isinstance(image_layout, Resize | Letterbox | ResizeCrop):
            raise ValueError(
                "MPLUGOwl3VLM takes one tower input per image (each <image> marker is one image), so it cannot "
                f"use {type(image_layout).__name__}, which cuts an image into several; use Resize, Letterbox or "
                "ResizeCrop"
            )
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
        lm = self.language_model
        if self.connector.out_dim != lm.hidden_size:
            raise ValueError(
                f"hyper-attention reads the visual features through the LLM's input norm, so the connector must "
                f"output the LLM's width {lm.hidden_size}, not {self.connector.out_dim}"
            )
        # The LLM's sequence holds one marker per image; the visual tokens reach it through hyper-attention.
        self.media_tokens = self.tokens_per_image
        self.tokens_per_image = 1
        theta = rope_theta_of(lm.model.config)
        lm.wrap_decoder_layers(lambda i, layer: HyperAttentionLayer(layer, theta), list(hyper_layers))
        self.freeze_and_load(init_from)

    def hyper_layers(self) -> list[HyperAttentionLayer]:
        """The wrapped decoder layers, input side first."""
        return family_wrappers(self.language_model.decoder_layers, HyperAttentionLayer)

    def parts(self) -> dict[str, nn.Module | list[nn.Module]]:
        """The base's parts plus ``hyper_attention``: the new key/value and gate weights, inside
        ``language_model`` (the shared norm and query projection stay the LLM's)."""
        hyper: list[HyperAttention] = [w.hyper_attention for w in self.hyper_layers()]
        return {**super().parts(), "hyper_attention": hyper}

    @classmethod
    def default_stage(cls) -> Stage:
        """The connector and the hyper-attention weights train, the tower and the LLM stay frozen."""
        return Stage(name="finetune", trainable=["connector", "hyper_attention"])

    def language_inputs(self, batch: Batch, images: Tensor | None) -> LanguageInputs:
        """The token embeddings unchanged, and :class:`HyperAttentionInputs`: each row's image features
        ``[B, M, N, D]``, which images each position sees ``[B, L, M]`` (all at or before it) and each image's
        marker position ``[B, M]``.

        A batch without images still runs the branch (one all-zero image nobody sees, whose result is discarded):
        under DDP every hyper-attention weight takes part in the backward pass."""
        ids = batch.input_ids
        lm = self.language_model
        embeds = lm.embed(ids)  # [B, L, D]
        markers = ids == lm.image_token_id  # [B, L]
        num_images = 0 if images is None else images.shape[0]
        if sum(batch.images_per_row) != num_images:
            raise ImageTokenMismatch(
                f"the batch lists {sum(batch.images_per_row)} images but {num_images} image feature sets were "
                "given"
            )
        for row, (found, expected) in enumerate(zip(markers.sum(-1).tolist(), batch.images_per_row)):
            if found != expected:
                raise ImageTokenMismatch(
                    f"sample {batch.row_names[row]!r} has {found} <image> markers in its text but {expected} "
                    "image(s); MPLUGOwl3VLM keeps one marker per image (its processor's tokens_per_image is 1)"
                )
        if images is None:  # [B, 1, 1, D] zeros, seen by no position
            features = embeds.new_zeros(len(batch.images_per_row), 1, 1, self.connector.out_dim)
        else:
            features = media_features(images, batch.images_per_row)  # [B, M, N, D]
        m = features.shape[1]
        mask = media_mask(ids, lm.image_token_id, batch.sample_index, False, num_media=m)  # [B, L, M]
        # rotary positions as the LLM counts them: packed rows restart per sample, padded rows count real tokens
        if batch.position_ids is not None:
            positions = batch.position_ids
        elif batch.attention_mask is not None:
            positions = (batch.attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        else:
            positions = torch.arange(ids.shape[1], device=ids.device).expand_as(ids)
        media_positions = ids.new_zeros(ids.shape[0], m)
        for row in range(ids.shape[0]):
            where = positions[row][markers[row]]
            media_positions[row, : len(where)] = where
        return LanguageInputs(embeds, HyperAttentionInputs(features, mask, media_positions))

    def describe(self) -> dict[str, int | str]:
        """The base's figures; ``image_tokens`` is the marker (1 per image) and ``media_tokens`` the visual tokens
        per image hyper-attention reads."""
        facts = super().describe()
        facts["media_tokens"] = self.media_tokens
        facts["hyper_layers"] = len(self.hyper_layers())
        return facts
