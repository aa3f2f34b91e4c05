"""The one signature every connector shares.

A connector maps vision features ``[B, N, D_vision]`` to LLM embeddings ``[B, T, D_llm]``. It is built
from the two widths (inferred from the tower and the LLM, never written in YAML) plus its own options,
and it states ``T`` for a given ``N`` before running, so the data pipeline can expand image
placeholders to the right number of tokens without touching the model.

In configs a connector is given as a ``Callable[[int, int], Connector]``: a ``class_path`` with only the
connector's own options as ``init_args``; the family module calls it with ``(in_dim, out_dim)``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable

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


ConnectorFactory = Callable[[int, int], Connector]
"""What configs provide: called with ``(in_dim, out_dim)`` by the family module."""
