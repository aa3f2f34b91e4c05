"""Connectors: one file per kind, all on the signature of :class:`~lit_mllm.nn.connectors.base.Connector`.

| connector | paper | tokens T for N features |
|---|---|---|
| LinearConnector | LLaVA | N |
| MLPConnector | LLaVA-1.5 | N |
| AvgPoolConnector | MM1 (average pooling) | out_tokens |
| AttentionPoolConnector | MM1 (attention pooling) | num_queries |
| CAbstractor | Honeybee / MM1 (C-Abstractor) | out_tokens |
| ConcatNeighbours | MiniGPT-v2 (4 adjacent tokens) | N / group |
| PixelShuffle | Idefics3 / InternVL / POINTS (space-to-depth) | N * scale_factor^2 |
| QFormerConnector | BLIP-2 / MiniGPT-4 (Q-Former) | num_queries |
| PerceiverResampler | Flamingo / Idefics2 | num_latents |
| QwenVLResampler | Qwen-VL (cross-attention, 2D sin-cos) | num_queries |
"""

from lit_mllm.nn.connectors.abstractor import CAbstractor
from lit_mllm.nn.connectors.base import Connector, ConnectorFactory, connector_flops
from lit_mllm.nn.connectors.linear import LinearConnector
from lit_mllm.nn.connectors.mlp import MLPConnector
from lit_mllm.nn.connectors.perceiver import PerceiverResampler
from lit_mllm.nn.connectors.pooling import AttentionPoolConnector, AvgPoolConnector
from lit_mllm.nn.connectors.qformer import QFormerConnector
from lit_mllm.nn.connectors.resampler import QwenVLResampler
from lit_mllm.nn.connectors.token_merge import ConcatNeighbours, PixelShuffle

__all__ = [
    "Connector",
    "ConnectorFactory",
    "connector_flops",
    "LinearConnector",
    "MLPConnector",
    "AvgPoolConnector",
    "AttentionPoolConnector",
    "CAbstractor",
    "ConcatNeighbours",
    "PixelShuffle",
    "QFormerConnector",
    "PerceiverResampler",
    "QwenVLResampler",
]
