"""Data: sample type, LLaVA-format reader, processor (tokenize + expand image tokens), DataModule, ShapesWorld."""

from lit_mllm.data.datamodule import ConversationData, DatasetGenerator
from lit_mllm.data.llava import read_llava
from lit_mllm.data.processor import Processor, collate
from lit_mllm.data.sample import DataError, Sample
from lit_mllm.data.shapesworld import ShapesWorld

__all__ = [
    "ConversationData",
    "DatasetGenerator",
    "read_llava",
    "Processor",
    "collate",
    "DataError",
    "Sample",
    "ShapesWorld",
]
