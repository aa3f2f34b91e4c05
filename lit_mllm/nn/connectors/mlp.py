"""MLP connector (LLaVA-1.5, Liu et al. 2023b): ``Linear -> GELU -> Linear``, hidden width = LLM width.

Parameter names match ``transformers``' ``LlavaMultiModalProjector`` (``linear_1``, ``linear_2``) so
weights move between the two without renaming.
"""

from __future__ import annotations

from torch import Tensor, nn

from lit_mllm.nn.connectors.base import Connector


class MLPConnector(Connector):
    """``[B, N, D_vision] -> [B, N, D_llm]`` through ``depth`` linear layers with GELU between them (T = N)."""

    def __init__(self, in_dim: int, out_dim: int, depth: int = 2, hidden_dim: int | None = None) -> None:
        """
        Args:
            depth: Number of linear layers (LLaVA-1.5 uses 2; 1 is the LLaVA linear projection).
            hidden_dim: Width of the hidden layers; defaults to the LLM width as in LLaVA-1.5.
        """
        super().__init__(in_dim, out_dim)
        if depth < 1:
            raise ValueError(f"MLPConnector needs depth >= 1, got {depth}")
        hidden_dim = hidden_dim or out_dim
        dims = [in_dim] + [hidden_dim] * (depth - 1) + [out_dim]
        self.depth = depth
        for i in range(depth):
            self.add_module(f"linear_{i + 1}", nn.Linear(dims[i], dims[i + 1]))
        self.act = nn.GELU()

    def num_tokens(self, num_features: int) -> int:
        return num_features

    def forward(self, features: Tensor) -> Tensor:
        x = features  # [B, N, D_vision]
        for i in range(self.depth):
            if i:
                x = self.act(x)
            x = getattr(self, f"linear_{i + 1}")(x)
        return x  # [B, N, D_llm]
