"""lit_mllm: a PyTorch Lightning template for multimodal LLMs (vision tower + connector + decoder LLM)."""

__version__ = "0.1.0"
