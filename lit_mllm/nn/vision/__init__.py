"""Vision towers: ``[B, 3, H, W] -> [B, N, D]`` patch features from open_clip or Hugging Face models."""

from lit_mllm.nn.vision.base import VisionTower
from lit_mllm.nn.vision.hf import HFVisionTower, TinyCLIPVision
from lit_mllm.nn.vision.open_clip import OpenCLIPTower

__all__ = ["VisionTower", "HFVisionTower", "TinyCLIPVision", "OpenCLIPTower"]
