"""Several vision towers read the same image and their patch features are fused token by token.

* ``concat``: features joined along channels, as Prismatic VLMs join DINOv2 and SigLIP
  (Karamcheti et al., 2024, "Prismatic VLMs: Investigating the Design Space of Visually-Conditioned Language
  Models"); ``hidden_size`` is the sum of the widths.
* ``average``: features averaged, as POINTS averages an OCR-tuned and a general ViT of the same width
  (Liu et al., 2024, "POINTS: Improving Your Vision-language Model with Affordable Strategies").

Preprocessing. Each tower was trained with its own mean/std, and the data pipeline builds one transform from a
tower's ``image_size`` / ``mean`` / ``std``. So the fused tower declares ``mean = (0, 0, 0)`` and
``std = (1, 1, 1)``: the pipeline resizes to the shared ``image_size`` and only scales pixels to [0, 1], and
``forward`` normalises that image once per tower with the tower's own mean/std (in float32). The towers must
therefore share ``image_size`` (one resize serves all) and give the same patch grid and feature count, so token
``i`` of every tower covers the same image patch; ``image_size=`` on :class:`HFVisionTower` /
:class:`OpenCLIPTower` resamples position embeddings to make them agree (e.g. DINOv2 and SigLIP, both patch 14,
at 224 or 384).
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn

from lit_mllm.nn.vision.base import VisionTower


def _describe(i: int, tower: VisionTower) -> str:
    rows, cols = tower.grid
    return (
        f"tower {i} ({type(tower).__name__}: image_size {tower.image_size}, patch {tower.patch_size}, "
        f"grid {rows}x{cols}, {tower.num_features} features, width {tower.hidden_size})"
    )


class FusedTowers(VisionTower):
    """Vision towers fused token by token: ``[B, 3, S, S]`` in [0, 1] -> ``[B, N, D]``."""

    def __init__(
        self,
        towers: list[VisionTower],
        mode: Literal["concat", "average"] = "concat",
        gradient_checkpointing: bool = False,
    ) -> None:
        """
        Args:
            towers: Two or more towers with the same image_size, patch grid and feature count (set each one's
                ``image_size`` to make them agree); each keeps its own mean/std, applied inside ``forward``.
            mode: ``concat`` joins features along channels (Prismatic; width = sum of widths); ``average``
                takes their mean (POINTS; all widths must be equal).
            gradient_checkpointing: Recompute every tower's blocks in the backward pass (each tower's own switch).
        """
        super().__init__()
        if len(towers) < 2:
            raise ValueError(f"FusedTowers needs at least two towers, got {len(towers)}")
        if mode not in ("concat", "average"):
            raise ValueError(f"mode must be 'concat' or 'average', got {mode!r}")
        first = towers[0]
        for i, tower in enumerate(towers[1:], start=1):
            if tower.grid != first.grid or tower.image_size != first.image_size:
                raise ValueError(
                    f"FusedTowers fuses features patch by patch from one resized image, so the towers must share "
                    f"image_size and patch grid: {_describe(0, first)} vs {_describe(i, tower)}. Build them with "
                    "image_size=<side> (HFVisionTower / OpenCLIPTower) so that the sides match and side / patch "
                    "gives the same grid (e.g. 224 or 384 for two patch-14 towers)."
                )
            if tower.num_features != first.num_features:
                raise ValueError(
                    f"the towers give different numbers of features for the same grid, because of kept prefix "
                    f"tokens (CLS, registers): {_describe(0, first)} vs {_describe(i, tower)}. Set keep_cls=False "
                    "on every tower (Prismatic drops them)."
                )
            if mode == "average" and tower.hidden_size != first.hidden_size:
                raise ValueError(
                    f"mode='average' needs towers of one width: {_describe(0, first)} vs {_describe(i, tower)}; "
                    "use mode='concat' to join towers of different widths"
                )
        self.towers = nn.ModuleList(towers)
        self.mode = mode
        self.hidden_size = sum(t.hidden_size for t in towers) if mode == "concat" else first.hidden_size
        self.image_size = first.image_size
        self.patch_size = first.patch_size
        rows, cols = first.grid
        self.num_prefix_tokens = first.num_features - rows * cols
        self.keep_cls = self.num_prefix_tokens > 0
        self.mean, self.std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)  # the pipeline gives [0, 1]; see forward
        if gradient_checkpointing:
            self.enable_gradient_checkpointing()

    def enable_gradient_checkpointing(self) -> None:
        for tower in self.towers:
            tower.enable_gradient_checkpointing()

    @property
    def grid(self) -> tuple[int, int]:
        return self.towers[0].grid

    @property
    def num_features(self) -> int:
        return self.towers[0].num_features

    @property
    def blocks(self) -> nn.ModuleList:
        """Every tower's remaining blocks, tower by tower; :meth:`last_blocks` takes the last few of each."""
        return nn.ModuleList([block for tower in self.towers for block in tower.blocks])

    def last_blocks(self, n: int) -> list[nn.Module]:
        """The last ``n`` blocks of every tower."""
        return [block for tower in self.towers for block in tower.last_blocks(n)]

    def forward(self, pixel_values: Tensor) -> Tensor:
        """``[B, 3, S, S]`` pixels in [0, 1] (not normalised) -> ``[B, N, D]``."""
        self.check_input(pixel_values)
        x = pixel_values.float()
        features = []
        for tower in self.towers:
            mean = torch.tensor(tower.mean, device=x.device).view(1, 3, 1, 1)
            std = torch.tensor(tower.std, device=x.device).view(1, 3, 1, 1)
            features.append(tower(((x - mean) / std).to(pixel_values.dtype)))  # [B, N, D_i]
        if self.mode == "concat":
            return torch.cat(features, dim=-1)  # [B, N, sum D_i]
        return torch.stack(features).mean(dim=0)  # [B, N, D]
