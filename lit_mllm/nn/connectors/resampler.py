"""Qwen-VL resampler connector (Bai et al. 2023): one cross-attention layer with learned queries.

``num_queries`` learned queries (a square grid, Qwen-VL: 256 = 16x16) attend once to the vision features; a
fixed 2D sin-cos position embedding is added to the queries and to the features' keys (not their values), so
the compression keeps the layout of the image. Following Qwen-VL's ``Resampler`` and its use in the visual
encoder::

    x = ln_kv(kv_proj(features))                                # [B, N, H]
    q = ln_q(query) + pos(query grid)                           # [Q, H]
    z = attn(q, key=x + pos(feature grid), value=x)             # [B, Q, H]
    out = proj(ln_post(z))                                      # [B, Q, out_dim]

``pos(query grid)`` is the sin-cos table of the ``sqrt(Q) x sqrt(Q)`` query grid; ``pos(feature grid)`` is
that same table resized bicubically to the ``sqrt(N) x sqrt(N)`` feature grid (Qwen-VL's ``get_abs_pos``), so
the features must form a square grid. The resampler width defaults to the LLM width and the head count to
width // 128, both as in Qwen-VL; LayerNorm epsilon 1e-6. Qwen-VL's output projection is a bias-free matrix
applied as ``x @ proj``; here it is ``nn.Linear(bias=False)`` (weight = that matrix transposed). The sin-cos
table is a non-persistent buffer, rebuilt from the options rather than stored in checkpoints.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lit_mllm.nn.connectors.base import Connector, grid_side, square_side


def _sincos_1d(dim: int, pos: Tensor) -> Tensor:
    """``[M] -> [M, dim]``: ``[sin(pos * w_k), cos(pos * w_k)]`` with ``w_k = 10000 ** (-k / (dim / 2))``."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2))  # [dim / 2]
    angles = pos[:, None] * omega[None, :]  # [M, dim / 2]
    return torch.cat([angles.sin(), angles.cos()], dim=1)  # [M, dim]


def sincos_2d_pos_embed(dim: int, side: int) -> Tensor:
    """Fixed 2D sin-cos table ``[side * side, dim]`` (MAE / Qwen-VL layout), row-major over the grid.

    Position ``p = row * side + col`` gets the 1D embedding of ``col`` in its first ``dim / 2`` channels and of
    ``row`` in the last ``dim / 2``; each half is ``[sin, sin, …, cos, cos, …]``. Computed in fp64, returned fp32.
    """
    if dim % 4:
        raise ValueError(f"the 2D sin-cos position embedding needs a width divisible by 4, got {dim}")
    coords = torch.arange(side, dtype=torch.float64)
    row, col = torch.meshgrid(coords, coords, indexing="ij")  # [side, side] each
    emb = torch.cat([_sincos_1d(dim // 2, col.reshape(-1)), _sincos_1d(dim // 2, row.reshape(-1))], dim=1)
    return emb.float()  # [side * side, dim]


def resize_pos_embed(table: Tensor, side: int) -> Tensor:
    """Bicubically resize a square ``[S * S, dim]`` table to ``[side * side, dim]`` (in fp32, as Qwen-VL)."""
    src = math.isqrt(table.shape[0])
    if src == side:
        return table
    grid = table.float().reshape(1, src, src, -1).permute(0, 3, 1, 2)  # [1, dim, S, S]
    grid = F.interpolate(grid, size=(side, side), mode="bicubic", align_corners=False)  # [1, dim, side, side]
    return grid.permute(0, 2, 3, 1).reshape(side * side, -1).to(table.dtype)  # [side * side, dim]


class QwenVLResampler(Connector):
    """``[B, N, D_vision] -> [B, num_queries, D_llm]`` with one position-aware cross-attention (N a square)."""

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        num_queries: int = 256,
        hidden_size: int | None = None,
        num_heads: int | None = None,
        norm_eps: float = 1e-6,
    ) -> None:
        """
        Args:
            num_queries: Number of learned queries, i.e. output tokens per image; must be a square (Qwen-VL: 256).
            hidden_size: Resampler width, divisible by 4 and by num_heads; defaults to the LLM width as in Qwen-VL.
            num_heads: Attention heads; defaults to hidden_size // 128 (at least 1) as in Qwen-VL.
            norm_eps: Epsilon of the LayerNorms ln_q, ln_kv and ln_post.
        """
        super().__init__(in_dim, out_dim)
        side = square_side(num_queries, "QwenVLResampler", "num_queries")
        hidden_size = hidden_size or out_dim
        num_heads = num_heads or max(1, hidden_size // 128)
        if hidden_size % num_heads:
            raise ValueError(
                f"QwenVLResampler needs hidden_size divisible by num_heads, got {hidden_size} and {num_heads}"
            )
        self.num_queries = num_queries
        self.register_buffer("pos_embed", sincos_2d_pos_embed(hidden_size, side), persistent=False)  # [Q, H]
        self.query = nn.Parameter(torch.empty(num_queries, hidden_size))  # [Q, H]
        nn.init.trunc_normal_(self.query, std=0.02)
        self.kv_proj = nn.Linear(in_dim, hidden_size, bias=False) if in_dim != hidden_size else nn.Identity()
        self.attn = nn.MultiheadAttention(hidden_size, num_heads, batch_first=True)
        self.ln_q = nn.LayerNorm(hidden_size, eps=norm_eps)
        self.ln_kv = nn.LayerNorm(hidden_size, eps=norm_eps)
        self.ln_post = nn.LayerNorm(hidden_size, eps=norm_eps)
        self.proj = nn.Linear(hidden_size, out_dim, bias=False)

    def num_tokens(self, num_features: int) -> int:
        grid_side(num_features, "QwenVLResampler")
        return self.num_queries

    def forward(self, features: Tensor) -> Tensor:
        b, n, _ = features.shape  # [B, N, D_vision]
        self.num_tokens(n)
        key_pos = resize_pos_embed(self.pos_embed, math.isqrt(n)).to(features.dtype)  # [N, H]
        x = self.ln_kv(self.kv_proj(features))  # [B, N, H]
        q = self.ln_q(self.query) + self.pos_embed.to(features.dtype)  # [Q, H]
        z, _ = self.attn(q.expand(b, -1, -1), x + key_pos, x, need_weights=False)  # [B, Q, H]
        return self.proj(self.ln_post(z))  # [B, Q, D_llm]
