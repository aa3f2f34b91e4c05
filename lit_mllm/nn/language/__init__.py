"""Language models (Hugging Face causal LMs + tokenizer + chat format) and chat formats."""

from lit_mllm.nn.language.chat import (
    ChatFormat,
    Llama2Inst,
    Plain,
    TokenizerTemplate,
    Turn,
    VicunaV1,
    encode_conversation,
)
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
]
