"""What every vision tower provides: ``[B, 3, H, W] -> [B, N, D]`` patch features plus the facts the rest of
the model needs before running (width ``hidden_size``, patch grid, ``num_features`` N, preprocessing).

``feature_layer`` follows the Hugging Face ``hidden_states`` convention used by LLaVA: index ``i`` is the
output of block ``i`` (1-based; 0 would be the embeddings, which no recipe reads and is refused); ``-1``
is the last block, ``-2`` the penultimate (LLaVA's choice). Blocks after the chosen layer are removed at build time, so a frozen tower
never computes layers whose output nobody reads. The blocks that remain are :attr:`VisionTower.blocks`, so a stage
can train only the last few (POINTS).

``gradient_checkpointing`` (an init argument of every tower) recomputes blocks in the backward pass instead of
keeping their activations, through the tower library's own switch. It only matters where the tower runs with
autograd, i.e. when a stage trains it or its last blocks; a frozen tower runs without autograd and keeps nothing.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

from torch import Tensor, nn

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def layers_to_keep(feature_layer: int, num_layers: int) -> int:
    """Number of blocks needed to produce ``hidden_states[feature_layer]`` of a ``num_layers``-block tower."""
    index = feature_layer if feature_layer >= 0 else num_layers + 1 + feature_layer
    if not 1 <= index <= num_layers:
        raise ValueError(
            f"feature_layer={feature_layer} is out of range for a tower with {num_layers} blocks: "
            f"use 1..{num_layers} or -{num_layers}..-1 (-2 is LLaVA's penultimate layer)"
        )
    return index


class VisionTower(nn.Module, ABC):
    """Base class of vision towers; subclasses set the attributes below and implement ``forward``."""

    hidden_size: int
    """Width D of the output features."""
    image_size: int
    """Side of the square input image in pixels."""
    patch_size: int
    """Side of one patch in pixels."""
    num_prefix_tokens: int
    """Non-patch tokens the tower emits before the patches (CLS, registers)."""
    keep_cls: bool
    """Whether prefix tokens are kept in the output (LLaVA's ``full`` strategy) or dropped (``default``)."""
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    @property
    def grid(self) -> tuple[int, int]:
        """Patch grid ``(rows, cols)``."""
        side = self.image_size // self.patch_size
        return side, side

    @property
    def num_features(self) -> int:
        """N: features per image in the output of ``forward``."""
        rows, cols = self.grid
        return rows * cols + (self.num_prefix_tokens if self.keep_cls else 0)

    @property
    def blocks(self) -> nn.ModuleList:
        """The transformer blocks left after truncation at ``feature_layer``, input side first.

        They are the tower's own modules, so ``requires_grad_`` on them takes effect; see :meth:`last_blocks`.
        """
        raise NotImplementedError(f"{type(self).__name__} does not expose its transformer blocks")

    def last_blocks(self, n: int) -> list[nn.Module]:
        """The ``n`` blocks nearest the output, for partial unfreezing (POINTS trains the last few)."""
        blocks = list(self.blocks)
        if not 0 <= n <= len(blocks):
            raise ValueError(
                f"asked for the last {n} blocks of {type(self).__name__}, which has {len(blocks)} left"
            )
        return blocks[len(blocks) - n :]

    def enable_gradient_checkpointing(self) -> None:
        """Recompute the tower's blocks in the backward pass instead of keeping their activations."""
        raise NotImplementedError(f"{type(self).__name__} does not support gradient checkpointing")

    def check_input(self, pixel_values: Tensor) -> None:
        """Refuse images that are not ``image_size`` square, naming the fix."""
        if tuple(pixel_values.shape[-2:]) != (self.image_size, self.image_size):
            raise ValueError(
                f"{type(self).__name__} takes {self.image_size}x{self.image_size} images but got "
                f"{tuple(pixel_values.shape[-2:])}: resize them to image_size (the processor does), or build the "
                "tower with image_size=<side> to interpolate its position embeddings to another resolution"
            )

    def select(self, hidden: Tensor) -> Tensor:
        """Drop prefix tokens unless ``keep_cls``: ``[B, P + R*C, D] -> [B, N, D]``."""
        return hidden if self.keep_cls else hidden[:, self.num_prefix_tokens :]

    @abstractmethod
    def forward(self, pixel_values: Tensor) -> Tensor:
        """``[B, 3, H, W] -> [B, N, D]``."""
