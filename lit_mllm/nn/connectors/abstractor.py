"""C-Abstractor (Honeybee, Cha et al. 2024, "Honeybee: Locality-enhanced Projector for Multimodal LLM"; also
MM1's best-performing "C-Abstractor" connector): convolutions keep local context while adaptive average
pooling sets the number of image tokens.

Structure, as in Honeybee's ``CAbstractor``: features -> grid ``[B, D, S, S]`` -> ``depth`` residual blocks
-> adaptive average pool to ``sqrt(out_tokens) x sqrt(out_tokens)`` -> ``depth`` residual blocks -> tokens
-> MLP readout to the LLM width.

Each residual block follows the RegNet bottleneck Honeybee builds with timm's ``RegStage`` (bottleneck ratio
1, group size 1, SiLU, channel LayerNorm), written out here without a timm dependency:
``1x1 conv -> LN -> SiLU -> 3x3 depthwise conv -> LN -> SiLU -> [squeeze-excitation] -> 1x1 conv -> LN``,
added to the shortcut (identity, or ``1x1 conv -> LN`` where the width changes), then SiLU (after the add).
Every LN has epsilon 1e-5, as timm builds them in Honeybee's blocks; with the same weights the blocks and pooling
compute what Honeybee's ``RegStage -> AdaptiveAvgPool2d -> RegStage`` does (tested against timm).
Squeeze-excitation (on by default, as in Honeybee) squeezes to a quarter of the block's input width.

Differences from Honeybee, on purpose: no learned positional embedding before the convolutions (it needs
``N`` at build time, and the tower's features already carry position), no extra "eos" tokens, and the
readout is the house :class:`~lit_mllm.nn.connectors.mlp.MLPConnector` (GELU between layers, where Honeybee
uses SiLU). The deformable-attention D-Abstractor is left out: it is a Deformable-DETR decoder with its own
reference-point machinery, not a small module on this signature.
"""

from __future__ import annotations

import math

import torch.nn.functional as F
from torch import Tensor, nn

from lit_mllm.nn.connectors.base import Connector, from_grid, pooled_tokens, square_side, to_grid
from lit_mllm.nn.connectors.mlp import MLPConnector


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of a channels-first map: ``[B, C, H, W] -> [B, C, H, W]``.

    Epsilon 1e-5 as in Honeybee's blocks: timm's ``ConvNormAct`` turns the ``LayerNorm2d`` it is given into a
    ``LayerNormAct2d``, whose epsilon is 1e-5 (not ``LayerNorm2d``'s 1e-6)."""

    def __init__(self, channels: int, eps: float = 1e-5) -> None:
        super().__init__(channels, eps=eps)

    def forward(self, x: Tensor) -> Tensor:
        x = x.permute(0, 2, 3, 1)  # [B, H, W, C]
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)  # [B, C, H, W]


def conv_norm(in_ch: int, out_ch: int, kernel_size: int = 1, groups: int = 1) -> nn.Sequential:
    """Bias-free convolution (same padding) followed by a channel LayerNorm."""
    conv = nn.Conv2d(in_ch, out_ch, kernel_size, padding=kernel_size // 2, groups=groups, bias=False)
    return nn.Sequential(conv, LayerNorm2d(out_ch))


class SqueezeExcite(nn.Module):
    """Channel gating: global average -> 1x1 conv -> SiLU -> 1x1 conv -> sigmoid, times the input."""

    def __init__(self, channels: int, reduced: int) -> None:
        super().__init__()
        self.fc1 = nn.Conv2d(channels, reduced, 1)
        self.act = nn.SiLU()
        self.fc2 = nn.Conv2d(reduced, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        scale = x.mean((2, 3), keepdim=True)  # [B, C, 1, 1]
        scale = self.fc2(self.act(self.fc1(scale))).sigmoid()  # [B, C, 1, 1]
        return x * scale  # [B, C, H, W]


class ResBlock(nn.Module):
    """RegNet-style bottleneck (ratio 1, depthwise 3x3, optional squeeze-excitation): ``[B, C_in, H, W] -> [B, C_out, H, W]``."""

    def __init__(self, in_ch: int, out_ch: int, squeeze_excite: bool = True) -> None:
        super().__init__()
        self.conv1 = conv_norm(in_ch, out_ch)
        self.conv2 = conv_norm(out_ch, out_ch, kernel_size=3, groups=out_ch)
        self.se = SqueezeExcite(out_ch, max(1, round(in_ch * 0.25))) if squeeze_excite else nn.Identity()
        self.conv3 = conv_norm(out_ch, out_ch)
        self.shortcut = nn.Identity() if in_ch == out_ch else conv_norm(in_ch, out_ch)
        self.act = nn.SiLU()

    def forward(self, x: Tensor) -> Tensor:
        y = self.act(self.conv1(x))  # [B, C_out, H, W]
        y = self.act(self.conv2(y))
        y = self.conv3(self.se(y))
        return self.act(y + self.shortcut(x))  # [B, C_out, H, W]


class CAbstractor(Connector):
    """``[B, S*S, D_vision] -> [B, out_tokens, D_llm]``: residual conv blocks around adaptive average pooling, then an MLP."""

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        out_tokens: int = 144,
        depth: int = 3,
        hidden_dim: int | None = None,
        squeeze_excite: bool = True,
        proj_depth: int = 2,
    ) -> None:
        """
        Args:
            out_tokens: Image tokens per image after pooling; a square number (Honeybee uses 144 or 256).
            depth: Residual blocks before and again after the pooling (Honeybee uses 3; 0 is plain pooling).
            hidden_dim: Channel width of the residual blocks; defaults to the vision width.
            squeeze_excite: Put squeeze-excitation in every residual block, as Honeybee's RegNet blocks do.
            proj_depth: Linear layers of the MLP readout to the LLM width (Honeybee uses 2).
        """
        super().__init__(in_dim, out_dim)
        name = type(self).__name__
        if depth < 0:
            raise ValueError(f"{name} needs depth >= 0, got {depth}")
        self.out_tokens = out_tokens
        self.out_side = square_side(out_tokens, name, "out_tokens")
        width = (hidden_dim or in_dim) if depth else in_dim
        self.before = nn.Sequential(
            *(ResBlock(in_dim if i == 0 else width, width, squeeze_excite) for i in range(depth))
        )
        self.after = nn.Sequential(*(ResBlock(width, width, squeeze_excite) for _ in range(depth)))
        self.readout = MLPConnector(width, out_dim, depth=proj_depth)

    def num_tokens(self, num_features: int) -> int:
        return pooled_tokens(num_features, self.out_tokens, type(self).__name__)

    def forward(self, features: Tensor) -> Tensor:
        self.num_tokens(features.shape[1])  # validates N
        x = to_grid(features, math.isqrt(features.shape[1]))  # [B, D_vision, S, S]
        x = self.before(x)  # [B, D_hidden, S, S]
        x = F.adaptive_avg_pool2d(x, self.out_side)  # [B, D_hidden, s, s]
        x = self.after(x)  # [B, D_hidden, s, s]
        return self.readout(from_grid(x))  # [B, T, D_llm]
