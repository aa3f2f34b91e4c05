"""Flamingo family (Alayrac et al. 2022; OpenFlamingo, Awadalla et al. 2023; Idefics v1): the LLM's text attends to
the visual features through gated cross-attention blocks inserted every ``cross_attn_every`` decoder layers.

    pixel_values [I, 3, S, S] --vision_tower--> [I, N, D_v] --connector (Perceiver Resampler)--> [I, T, D_llm]
        --per row--> features [B, M, T, D_llm]           (M: most images in a row)
    input_ids [B, L] (one <image> marker per image) --embed--> [B, L, D_llm] (unchanged)
        --language_model, a GatedCrossAttentionLayer before every cross_attn_every-th layer--> logits [B, L, V]

Each image stays ONE marker token in the text (the processor's tokens per image is 1 for this family); the
markers define where images are, and ``media_mask [B, L, M]`` which image each position attends to (the latest
one before it, or all of them; none before the first). The mechanism is
:mod:`lit_mllm.nn.fusion.gated_xattn`; everything else is the shared base
(:class:`~lit_mllm.lit.base.VLMModule`). Interleaved documents (OBELICS / MMC4, the ``Interleaved`` source) and
conversations with several images work as they come. In ``generate`` the visual features are computed once and
reach every step with the KV cache (see the mechanism's docstring).

The LLM is frozen by default (Flamingo): the connector and the blocks (the ``xattn`` part, nested inside
``language_model``) train.
"""

from __future__ import annotations

from typing import Literal

import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn

from lit_mllm.data.batch import Batch
from lit_mllm.data.feature_cache import FeatureCache
from lit_mllm.data.layouts import ImageLayout, Letterbox, Resize, ResizeCrop
from lit_mllm.eval.generation import GenerationConfig
from lit_mllm.eval.metrics import EvalMetric
from lit_mllm.lit.base import LanguageInputs, VLMModule
from lit_mllm.nn.connectors import ConnectorFactory, PerceiverResampler
from lit_mllm.nn.fusion.gated_xattn import (
    GatedCrossAttentionBlock,
    GatedCrossAttentionLayer,
    GatedXAttnFactory,
    MediaInputs,
    media_features,
    media_mask,
    xattn_layer_indices,
)
from lit_mllm.nn.fusion.prefix import ImageTokenMismatch
from lit_mllm.nn.language.layers import family_wrappers
from lit_mllm.nn.language.model import LanguageModel
from lit_mllm.nn.vision.base import VisionTower
from lit_mllm.training.stages import Stage, StageSchedule


class FlamingoVLM(VLMModule):
    """A vision tower, a connector and a decoder LLM joined by gated cross-attention blocks (see the module
    docstring)."""

    parts_args = (*VLMModule.parts_args, "xattn")

    def __init__(
        self,
        vision_tower: VisionTower,
        language_model: LanguageModel,
        connector: ConnectorFactory = PerceiverResampler,
        xattn: GatedXAttnFactory = GatedCrossAttentionBlock,
        cross_attn_every: int = 4,
        media_attention: Literal["latest", "all"] = "latest",
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
            language_model: Decoder LLM with its tokenizer and chat format; its layers are wrapped, not changed.
            connector: Connector class and its options; called with ``(D_v, D_llm)`` (Flamingo: the Perceiver
                Resampler, 64 latents per image).
            xattn: Gated cross-attention block class and its options (heads, head width, feed-forward, norms,
                gates); called with ``(D_llm, D_llm)`` (the connector's output width) for each wrapped layer.
            cross_attn_every: A block before decoder layers ``0, n, 2n, ...`` (OpenFlamingo-9B and Idefics: 4;
                OpenFlamingo-3B: 1).
            media_attention: ``latest``: a text token attends only to the latest image before it (Flamingo);
                ``all``: to every image before it. Text before the first image attends to none.
            image_layout: How an image becomes a tower input: ``Resize`` (default), ``Letterbox`` or ``ResizeCrop``
                (one tower input per image: a marker is one image).
            stage: What trains (default: connector + xattn, the LLM frozen, as Flamingo), or a StageSchedule.
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
                "FlamingoVLM takes one tower input per image (each <image> marker is one image), so it cannot "
                f"use {type(image_layout).__name__}, which cuts an image into several; use Resize, Letterbox or "
                "ResizeCrop"
            )
        if media_attention not in ("latest", "all"):
            raise ValueError(f"media_attention must be 'latest' or 'all', got {media_attention!r}")
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
        # The LLM's sequence holds one marker per image; the T visual tokens reach it through the blocks.
        self.media_tokens = self.tokens_per_image
        self.tokens_per_image = 1
        self.only_latest = media_attention == "latest"
        lm = self.language_model
        dim, media_dim = lm.hidden_size, self.connector.out_dim
        indices = xattn_layer_indices(len(lm.decoder_layers), cross_attn_every)
        lm.wrap_decoder_layers(
            lambda i, layer: GatedCrossAttentionLayer(layer, xattn(dim, media_dim)), indices
        )
        self.freeze_and_load(init_from)

    def xattn_layers(self) -> list[GatedCrossAttentionLayer]:
        """The wrapped decoder layers, input side first."""
        return family_wrappers(self.language_model.decoder_layers, GatedCrossAttentionLayer)

    def parts(self) -> dict[str, nn.Module | list[nn.Module]]:
        """The base's parts plus ``xattn``: the gated blocks, inside ``language_model``."""
        return {**super().parts(), "xattn": [w.xattn for w in self.xattn_layers()]}

    @classmethod
    def default_stage(cls) -> Stage:
        """Flamingo's: the connector and the gated blocks train, the tower and the LLM stay frozen."""
        return Stage(name="finetune", trainable=["connector", "xattn"])

    def language_inputs(self, batch: Batch, images: Tensor | None) -> LanguageInputs:
        """The token embeddings unchanged, and :class:`MediaInputs` for the blocks: each row's image features
        ``[B, M, T, D]`` and which image each position attends to ``[B, L, M]``.

        A batch without images still runs the blocks (one all-zero image nobody sees): the feed-forward branch
        applies to text-only rows as to every row, and under DDP every block takes part in the backward pass."""
        ids = batch.input_ids
        embeds = self.language_model.embed(ids)  # [B, L, D]
        markers = (ids == self.language_model.image_token_id).sum(-1).tolist()
        num_images = 0 if images is None else images.shape[0]
        if sum(batch.images_per_row) != num_images:
            raise ImageTokenMismatch(
                f"the batch lists {sum(batch.images_per_row)} images but {num_images} image feature sets were "
                "given"
            )
        for row, (found, expected) in enumerate(zip(markers, batch.images_per_row)):
            if found != expected:
                raise ImageTokenMismatch(
                    f"sample {batch.row_names[row]!r} has {found} <image> markers in its text but {expected} "
                    "image(s); FlamingoVLM keeps one marker per image (its processor's tokens_per_image is 1)"
                )
        if images is None:  # [B, 1, 1, D] zeros, seen by no position
            features = embeds.new_zeros(len(markers), 1, 1, self.connector.out_dim)
        else:
            features = media_features(images, batch.images_per_row)  # [B, M, T, D]
        mask = media_mask(
            ids,
            self.language_model.image_token_id,
            batch.sample_index,
            self.only_latest,
            num_media=features.shape[1],
        )  # [B, L, M]
        return LanguageInputs(embeds, MediaInputs(features, mask))

    def describe(self) -> dict[str, int | str]:
        """The base's figures; ``image_tokens`` is the marker (1 per image) and ``media_tokens`` the visual tokens
        per image the blocks attend to."""
        facts = super().describe()
        facts["media_tokens"] = self.media_tokens
        facts["xattn_layers"] = len(self.xattn_layers())
        return facts
