"""Connectors: one file per kind, all on the signature of :class:`~lit_mllm.nn.connectors.base.Connector`."""

from lit_mllm.nn.connectors.base import Connector, ConnectorFactory
from lit_mllm.nn.connectors.linear import LinearConnector
from lit_mllm.nn.connectors.mlp import MLPConnector

__all__ = ["Connector", "ConnectorFactory", "LinearConnector", "MLPConnector"]
