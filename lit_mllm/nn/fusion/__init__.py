"""Fusion mechanisms: how connector outputs reach the LLM."""

from lit_mllm.nn.fusion.gated_xattn import (
    GatedCrossAttentionBlock,
    GatedCrossAttentionLayer,
    MediaInputs,
    media_mask,
)
from lit_mllm.nn.fusion.prefix import ImageTokenMismatch, splice_image_features

__all__ = [
    "ImageTokenMismatch",
    "splice_image_features",
    "GatedCrossAttentionBlock",
    "GatedCrossAttentionLayer",
    "MediaInputs",
    "media_mask",
]
