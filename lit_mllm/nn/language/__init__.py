"""Language models (Hugging Face causal LMs + tokenizer + chat format), chat formats, and the way into the decoder
layers (a family's layer wrapper and its per-layer inputs)."""

from lit_mllm.nn.language.chat import (
    ChatFormat,
    Llama2Inst,
    Plain,
    TokenizerTemplate,
    Turn,
    VicunaV1,
    encode_conversation,
)
from lit_mllm.nn.language.layers import DecoderLayerWrapper, LayerInputs, bare_layer
from lit_mllm.nn.language.model import LanguageModel, TinyLlama, TinyQwen2

__all__ = [
    "ChatFormat",
    "Llama2Inst",
    "Plain",
    "TokenizerTemplate",
    "Turn",
    "VicunaV1",
    "encode_conversation",
    "LanguageModel",
    "TinyLlama",
    "TinyQwen2",
    "DecoderLayerWrapper",
    "LayerInputs",
    "bare_layer",
]
