"""Data: the sample type, sources (formats), the mixture plan, task templates, image layouts, processor
(tokenize + expand image tokens), collation and packing, the DataModule, streaming shards, ShapesWorld, readers
for benchmark files (VQAv2, TextVQA, GQA, COCO captions, RefCOCO, MME, MMBench, POPE), and the frozen-tower feature
cache."""

from lit_mllm.data.batch import Batch, LoaderReport
from lit_mllm.data.benchmarks import GQA, MME, POPE, COCOCaptions, MMBench, RefCOCO, TextVQA, VQAv2
from lit_mllm.data.collate import collate, pack
from lit_mllm.data.datamodule import DatasetGenerator, MixtureData
from lit_mllm.data.feature_cache import FeatureCache
from lit_mllm.data.layouts import AnyRes, Catty, ImageLayout, Letterbox, MM1SubImages, Resize, ResizeCrop
from lit_mllm.data.mixture import Mixture
from lit_mllm.data.processor import Processor
from lit_mllm.data.sample import DataError, Sample
from lit_mllm.data.shapesworld import ShapesWorld
from lit_mllm.data.shards import StreamingShards
from lit_mllm.data.sources import (
    Captions,
    Conversations,
    Grounding,
    Interleaved,
    Source,
    TextOnly,
    read_llava,
)
from lit_mllm.data.tasks import MiniGPTv2Tasks, PinkTasks, PlainTasks, QwenVLTasks, TaskTemplate

__all__ = [
    "AnyRes",
    "Captions",
    "COCOCaptions",
    "Catty",
    "Conversations",
    "DataError",
    "DatasetGenerator",
    "FeatureCache",
    "GQA",
    "Grounding",
    "ImageLayout",
    "Interleaved",
    "Letterbox",
    "MiniGPTv2Tasks",
    "MM1SubImages",
    "MMBench",
    "MME",
    "Mixture",
    "MixtureData",
    "PinkTasks",
    "PlainTasks",
    "POPE",
    "Processor",
    "QwenVLTasks",
    "RefCOCO",
    "Resize",
    "ResizeCrop",
    "Sample",
    "ShapesWorld",
    "Source",
    "StreamingShards",
    "TaskTemplate",
    "TextOnly",
    "TextVQA",
    "VQAv2",
    "Batch",
    "LoaderReport",
    "collate",
    "pack",
    "read_llava",
]
