"""Token-merging connectors: fold several neighbouring features into one token's channels, then project.

* :class:`ConcatNeighbours` (MiniGPT-v2, Chen et al. 2023, "MiniGPT-v2: large language model as a unified
  interface for vision-language multi-task learning"): every ``group`` consecutive tokens, in sequence
  order, are concatenated along the channels and linearly projected (MiniGPT-v2: 4 tokens).
* :class:`PixelShuffle` (InternVL 1.5, Chen et al. 2024; Idefics3, Laurençon et al. 2024): space-to-depth
  on the patch grid; with ``scale_factor=0.5`` each 2x2 block of tokens becomes one token with 4x the
  channels, then an MLP projects.

Channel order of the space-to-depth: a block's tokens are concatenated in raster order, i.e. the merged
token of block ``(i, j)`` is ``cat(x[r*i + dy, r*j + dx] for dy in range(r) for dx in range(r))`` and blocks
come out in raster order. This is exactly what ``transformers``' ``Idefics3Connector.pixel_shuffle`` and
``InternVLModel.pixel_shuffle`` produce, so their pretrained projections see the channels they expect.
It differs from ``torch.nn.functional.pixel_unshuffle``, whose channel order puts the feature index
outermost (``c, dy, dx``).
"""

from __future__ import annotations

import math

from torch import Tensor

from lit_mllm.nn.connectors.base import Connector, grid_side
from lit_mllm.nn.connectors.mlp import MLPConnector


def space_to_depth(features: Tensor, ratio: int) -> Tensor:
    """Merge every ``ratio x ratio`` block of a raster-order square grid: ``[B, S*S, D] -> [B, (S/r)^2, r*r*D]``."""
    b, n, d = features.shape
    side = math.isqrt(n)
    x = features.reshape(b, side // ratio, ratio, side // ratio, ratio, d)  # [B, S/r, dy, S/r, dx, D]
    x = x.permute(0, 1, 3, 2, 4, 5)  # [B, S/r, S/r, dy, dx, D]
    return x.reshape(b, n // ratio**2, ratio * ratio * d)  # [B, T, r*r*D]


class ConcatNeighbours(Connector):
    """``[B, N, D_vision] -> [B, N / group, D_llm]``: concatenate ``group`` consecutive tokens, then project."""

    def __init__(self, in_dim: int, out_dim: int, group: int = 4, proj_depth: int = 1) -> None:
        """
        Args:
            group: Consecutive tokens (in sequence order) merged into one; must divide the number of features.
            proj_depth: Linear layers of the projection from group * vision width (MiniGPT-v2 uses 1).
        """
        super().__init__(in_dim, out_dim)
        if group < 1:
            raise ValueError(f"{type(self).__name__} needs group >= 1, got {group}")
        self.group = group
        self.proj = MLPConnector(in_dim * group, out_dim, depth=proj_depth)

    def num_tokens(self, num_features: int) -> int:
        if num_features < 1 or num_features % self.group:
            raise ValueError(
                f"{type(self).__name__} needs a number of features divisible by group={self.group}, "
                f"got {num_features}"
            )
        return num_features // self.group

    def forward(self, features: Tensor) -> Tensor:
        b, n, d = features.shape  # [B, N, D_vision]
        merged = features.reshape(b, self.num_tokens(n), self.group * d)  # [B, N/g, g*D_vision]
        return self.proj(merged)  # [B, T, D_llm]


class PixelShuffle(Connector):
    """``[B, S*S, D_vision] -> [B, (S*f)^2, D_llm]``: space-to-depth by ``1/f`` on the grid, then an MLP."""

    def __init__(self, in_dim: int, out_dim: int, scale_factor: float = 0.5, proj_depth: int = 2) -> None:
        """
        Args:
            scale_factor: Factor on the grid side, 1/r for an integer r: 0.5 merges 2x2 blocks (InternVL's convention; Idefics3's scale_factor=2).
            proj_depth: Linear layers of the projection from r*r times the vision width (InternVL uses 2, Idefics3 1).
        """
        super().__init__(in_dim, out_dim)
        ratio = round(1 / scale_factor) if scale_factor > 0 else 0
        if ratio < 1 or not math.isclose(ratio * scale_factor, 1.0, rel_tol=1e-6):
            raise ValueError(
                f"{type(self).__name__} needs scale_factor = 1/r for an integer r >= 1 (e.g. 0.5), got {scale_factor}"
            )
        self.scale_factor = scale_factor
        self.ratio = ratio
        self.proj = MLPConnector(in_dim * ratio * ratio, out_dim, depth=proj_depth)

    def num_tokens(self, num_features: int) -> int:
        side = grid_side(num_features, type(self).__name__)
        if side % self.ratio:
            raise ValueError(
                f"{type(self).__name__} with scale_factor={self.scale_factor} needs a grid side divisible by "
                f"{self.ratio}, got a {side}x{side} grid ({num_features} features)"
            )
        return num_features // self.ratio**2

    def forward(self, features: Tensor) -> Tensor:
        self.num_tokens(features.shape[1])  # validates N
        merged = space_to_depth(features, self.ratio)  # [B, T, r*r*D_vision]
        return self.proj(merged)  # [B, T, D_llm]
