"""Fusion mechanisms: how connector outputs reach the LLM."""

from lit_mllm.nn.fusion.gated_xattn import (
    GatedCrossAttentionBlock,
    GatedCrossAttentionLayer,
    MediaInputs,
    media_mask,
)
from lit_mllm.nn.fusion.hyper_attention import HyperAttention, HyperAttentionInputs, HyperAttentionLayer
from lit_mllm.nn.fusion.prefix import ImageTokenMismatch, splice_image_features
from lit_mllm.nn.fusion.qformer_pretraining import (
    PretrainingHeads,
    QFormer,
    QFormerFactory,
    itc_similarity,
    objective_mask,
    sample_hard_negatives,
)
from lit_mllm.nn.fusion.visual_expert import ExpertInputs, TokenRouted, VisualExpertLayer

__all__ = [
    "ImageTokenMismatch",
    "splice_image_features",
    "ExpertInputs",
    "TokenRouted",
    "VisualExpertLayer",
    "GatedCrossAttentionBlock",
    "GatedCrossAttentionLayer",
    "MediaInputs",
    "media_mask",
    "HyperAttention",
    "HyperAttentionInputs",
    "HyperAttentionLayer",
    "QFormer",
    "QFormerFactory",
    "PretrainingHeads",
    "objective_mask",
    "itc_similarity",
    "sample_hard_negatives",
]
