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

Pretrained weights of a tower trained in this project (:mod:`lit_mllm.lit.clip_pretraining`) come in through
:func:`tower_state` (its tensors in a checkpoint, by key prefix) and :meth:`VisionTower.load_pretrained`, which the
tiny tower's ``weights`` argument calls: a VLM config then reads ``vision_tower: {class_path: TinyCLIPVision,
init_args: {<the pretraining run's sizes>, weights: runs/clip/tiny/checkpoints/last.ckpt}}``.
"""

from __future__ import annotations

import pickle
from abc import ABC, abstractmethod
from collections.abc import Mapping
from pathlib import Path

import torch
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


def tower_state(path: str | Path, prefix: str = "vision_tower.") -> dict[str, Tensor]:
    """The tensors whose names start with ``prefix`` (removed) in a Lightning checkpoint's ``state_dict`` (read with
    ``weights_only=True``) or a ``.safetensors`` file; ``prefix=""`` takes them all (a file of the tower alone)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"no tower weights at {path}: give the pretraining run's checkpoint (e.g. runs/clip/tiny/checkpoints/"
            "last.ckpt) or a .safetensors file"
        )
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path), device="cpu")
    else:
        try:
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            raise ValueError(
                f"{path} holds objects that weights_only=True loading refuses ({str(e).splitlines()[0]}); save the "
                "tower's tensors as .safetensors and give that file"
            ) from e
        state = checkpoint.get("state_dict") if isinstance(checkpoint, dict) else None
        if not isinstance(state, dict):
            raise ValueError(
                f"{path} is not a Lightning checkpoint (no state_dict); give a .ckpt or .safetensors"
            )
    found = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    if not found:
        heads = sorted({k.split(".", 1)[0] + "." for k in state})
        raise ValueError(
            f"no tensor of {path} starts with {prefix!r}; its names start with {heads[:8]}: give the prefix of the "
            "tower's tensors (CLIPPretraining's is 'vision_tower.')"
        )
    return found


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

    def load_pretrained(self, state: Mapping[str, Tensor], source: str = "the weights") -> None:
        """Set every weight of this tower from ``state``, a state dict of a tower of the same class and sizes
        (:func:`tower_state`). All of the tower's tensors must be there with their shapes; the blocks this tower
        dropped at its ``feature_layer`` may be there too and are skipped (a tower pretrained at ``-1`` read at
        ``-2``); any other tensor is refused, naming it. ``source`` names the file in messages."""
        own = self.state_dict()
        missing = [k for k in own if k not in state]
        if missing:
            raise ValueError(
                f"{source} lack {len(missing)} of {type(self).__name__}'s {len(own)} tensors (e.g. {missing[:3]}): "
                "was the tower pretrained with fewer blocks or at an earlier feature_layer? build it with the "
                "pretraining run's sizes and a feature_layer at or before the one it was pretrained at"
            )
        shapes = [(k, tuple(v.shape), tuple(own[k].shape)) for k, v in state.items() if k in own]
        shapes = [(k, a, b) for k, a, b in shapes if a != b]
        if shapes:
            listed = ", ".join(f"{k}: pretrained {a} vs tower {b}" for k, a, b in shapes[:3])
            raise ValueError(
                f"{len(shapes)} tensors of {source} have another shape than in {type(self).__name__} ({listed}); "
                "build the tower with the pretraining run's image_size, patch_size and widths"
            )
        extra = [k for k in state if k not in own and not self._dropped_block(k)]
        if extra:
            raise ValueError(
                f"{len(extra)} tensors of {source} match nothing in {type(self).__name__} (e.g. {extra[:3]}); the "
                "weights were written for another tower: build it with the pretraining run's class and sizes"
            )
        self.load_state_dict({k: state[k] for k in own})

    def _dropped_block(self, name: str) -> bool:
        """Whether state-dict name ``name`` lies in a transformer block past the ones this tower keeps."""
        try:
            blocks = self.blocks
        except NotImplementedError:
            return False
        if not len(blocks):
            return False
        first = next(
            n for n, m in self.named_modules() if m is blocks[0]
        )  # e.g. model.vision_model.encoder.layers.0
        prefix = first.rsplit(".", 1)[0] + "."
        index = name[len(prefix) :].split(".", 1)[0] if name.startswith(prefix) else ""
        return index.isdigit() and int(index) >= len(blocks)

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
