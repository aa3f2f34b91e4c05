"""Pooling connectors (MM1, McKinzie et al. 2024, "MM1: Methods, Analysis & Insights from Multimodal LLM
Pre-training", section 3.2 "VL connector"): reduce the patch features to a fixed number of tokens, then
project to the LLM width.

* :class:`AvgPoolConnector` -- average pooling of the patch grid to ``out_tokens`` (a square), then a
  linear projection (MM1's "Average Pooling"); ``proj_depth=2`` makes it a LLaVA-1.5 style MLP.
* :class:`AttentionPoolConnector` -- ``num_queries`` learned queries attend once (multi-head) over the
  features, then a projection (MM1's "Attention Pooling").

Features arrive in raster (row-major) order of a square patch grid, prefix tokens (CLS, registers) already
dropped; the grid helpers live in :mod:`lit_mllm.nn.connectors.base`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lit_mllm.nn.connectors.base import Connector, from_grid, pooled_tokens, square_side, to_grid
from lit_mllm.nn.connectors.mlp import MLPConnector


class AvgPoolConnector(Connector):
    """``[B, S*S, D_vision] -> [B, out_tokens, D_llm]``: adaptive average pooling of the grid, then a projection.

    Pooling uses ``adaptive_avg_pool2d``, so any grid side ``S >= sqrt(out_tokens)`` works; when ``S`` is a
    multiple of the output side it is a plain ``k x k`` average pool (MM1's ``n x n`` pooling).
    """

    def __init__(self, in_dim: int, out_dim: int, out_tokens: int = 144, proj_depth: int = 1) -> None:
        """
        Args:
            out_tokens: Image tokens per image after pooling; a square number (MM1 compares 64, 144 and 256).
            proj_depth: Linear layers of the projection after pooling (MM1 uses 1; 2 is a LLaVA-1.5 MLP).
        """
        super().__init__(in_dim, out_dim)
        self.out_tokens = out_tokens
        self.out_side = square_side(out_tokens, type(self).__name__, "out_tokens")
        self.proj = MLPConnector(in_dim, out_dim, depth=proj_depth)

    def num_tokens(self, num_features: int) -> int:
        return pooled_tokens(num_features, self.out_tokens, type(self).__name__)

    def forward(self, features: Tensor) -> Tensor:
        self.num_tokens(features.shape[1])  # validates N
        grid = to_grid(features, math.isqrt(features.shape[1]))  # [B, D_vision, S, S]
        pooled = F.adaptive_avg_pool2d(grid, self.out_side)  # [B, D_vision, s, s]
        return self.proj(from_grid(pooled))  # [B, T, D_llm]


class AttentionPoolConnector(Connector):
    """``[B, N, D_vision] -> [B, num_queries, D_llm]``: learned queries, one multi-head cross-attention, projection.

    The features are layer-normalised before serving as keys and values; the attention runs at the vision
    width. There is no positional embedding: the tower's features already carry position, and ``N`` is free
    (any number of features, square or not, gives ``T = num_queries``).
    """

    def __init__(
        self, in_dim: int, out_dim: int, num_queries: int = 144, num_heads: int = 8, proj_depth: int = 1
    ) -> None:
        """
        Args:
            num_queries: Learned queries, i.e. image tokens per image (MM1 compares 64, 144 and 256).
            num_heads: Attention heads of the pooling attention; must divide the vision width.
            proj_depth: Linear layers of the projection after pooling (1 is linear; 2 is a LLaVA-1.5 MLP).
        """
        super().__init__(in_dim, out_dim)
        name = type(self).__name__
        if num_queries < 1:
            raise ValueError(f"{name} needs num_queries >= 1, got {num_queries}")
        if num_heads < 1 or in_dim % num_heads:
            raise ValueError(f"{name} needs num_heads to divide the vision width {in_dim}, got {num_heads}")
        self.num_queries = num_queries
        self.queries = nn.Parameter(torch.empty(num_queries, in_dim))
        nn.init.trunc_normal_(self.queries, std=0.02)
        self.norm = nn.LayerNorm(in_dim)
        self.attn = nn.MultiheadAttention(in_dim, num_heads, batch_first=True)
        self.proj = MLPConnector(in_dim, out_dim, depth=proj_depth)

    def num_tokens(self, num_features: int) -> int:
        if num_features < 1:
            raise ValueError(f"{type(self).__name__} needs at least one feature, got {num_features}")
        return self.num_queries

    def forward(self, features: Tensor) -> Tensor:
        self.num_tokens(features.shape[1])
        kv = self.norm(features)  # [B, N, D_vision]
        q = self.queries.expand(kv.shape[0], -1, -1)  # [B, T, D_vision]
        pooled, _ = self.attn(q, kv, kv, need_weights=False)  # [B, T, D_vision]
        return self.proj(pooled)  # [B, T, D_llm]
