"""Linear projection connector (LLaVA, Liu et al. 2023): one ``nn.Linear`` from tower width to LLM width."""

from __future__ import annotations

from torch import Tensor, nn

from lit_mllm.nn.connectors.base import Connector


class LinearConnector(Connector):
    """``[B, N, D_vision] -> [B, N, D_llm]`` with a single linear layer; keeps every feature (T = N)."""

    def __init__(self, in_dim: int, out_dim: int, bias: bool = True) -> None:
        """
        Args:
            bias: Whether the projection has a bias term.
        """
        super().__init__(in_dim, out_dim)
        self.proj = nn.Linear(in_dim, out_dim, bias=bias)

    def num_tokens(self, num_features: int) -> int:
        return num_features

    def forward(self, features: Tensor) -> Tensor:
        return self.proj(features)  # [B, N, D_llm]
