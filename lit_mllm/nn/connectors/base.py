"""The one signature every connector shares.

A connector maps vision features ``[B, N, D_vision]`` to LLM embeddings ``[B, T, D_llm]``. It is built
from the two widths (inferred from the tower and the LLM, never written in YAML) plus its own options,
and it states ``T`` for a given ``N`` before running, so the data pipeline can expand image
placeholders to the right number of tokens without touching the model.

In configs a connector is given as a ``Callable[[int, int], Connector]``: a ``class_path`` with only the
connector's own options as ``init_args``; the family module calls it with ``(in_dim, out_dim)``.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable

import torch
from torch import Tensor, nn


class Connector(nn.Module, ABC):
    """Base class: subclasses build their layers in ``__init__`` and implement ``forward`` and ``num_tokens``."""

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.in_dim = in_dim
        self.out_dim = out_dim

    @abstractmethod
    def num_tokens(self, num_features: int) -> int:
        """Number of output tokens ``T`` for ``num_features`` input features ``N``.

        Raises ``ValueError`` naming the constraint when ``N`` is impossible for this connector.
        """

    @abstractmethod
    def forward(self, features: Tensor) -> Tensor:
        """``[B, N, in_dim] -> [B, T, out_dim]``."""


def connector_flops(connector: Connector, num_features: int) -> int:
    """Forward FLOPs of ``connector`` for one image (``[1, N, D_v]``, N = ``num_features``), counted by
    ``torch.utils.flop_counter`` (a multiply-add is 2 FLOPs).

    Runs with autograd on (the graph is dropped): under ``no_grad`` an ``expand`` view of a parameter trips the
    counter's module hooks."""
    from torch.utils.flop_counter import FlopCounterMode

    param = next(connector.parameters())
    x = torch.zeros(1, num_features, connector.in_dim, dtype=param.dtype, device=param.device)
    with FlopCounterMode(display=False) as counter:
        connector(x)
    return counter.get_total_flops()


# -- square patch grids: features in raster (row-major) order, prefix tokens (CLS, registers) dropped ------------
def grid_side(num_features: int, who: str) -> int:
    """Side ``S`` of the square patch grid holding ``num_features = S * S`` features, or ``ValueError``."""
    side = math.isqrt(max(num_features, 0))
    if num_features < 1 or side * side != num_features:
        hint = ""
        if num_features > 1 and math.isqrt(num_features - 1) ** 2 == num_features - 1:
            hint = " (drop the CLS token: keep_cls=False)"
        raise ValueError(f"{who} needs a square number of features, got {num_features}{hint}")
    return side


def square_side(tokens: int, who: str, option: str) -> int:
    """Side of the square output grid for the option ``option=tokens``, or ``ValueError``."""
    side = math.isqrt(max(tokens, 0))
    if tokens < 1 or side * side != tokens:
        raise ValueError(f"{who} needs {option} to be a square number (e.g. 64, 144, 256), got {tokens}")
    return side


def pooled_tokens(num_features: int, out_tokens: int, who: str) -> int:
    """``out_tokens`` if a square grid of ``num_features`` can be pooled down to it, else ``ValueError``."""
    if grid_side(num_features, who) < math.isqrt(out_tokens):
        raise ValueError(
            f"{who} pools to out_tokens={out_tokens}, which needs at least as many features, got {num_features}"
        )
    return out_tokens


def to_grid(features: Tensor, side: int) -> Tensor:
    """Raster-order features to a channels-first grid: ``[B, S*S, D] -> [B, D, S, S]``."""
    b, n, d = features.shape
    return features.transpose(1, 2).reshape(b, d, side, side)


def from_grid(grid: Tensor) -> Tensor:
    """Channels-first grid back to raster-order tokens: ``[B, D, H, W] -> [B, H*W, D]``."""
    return grid.flatten(2).transpose(1, 2)


ConnectorFactory = Callable[[int, int], Connector]
"""What configs provide: called with ``(in_dim, out_dim)`` by the family module."""
