"""Vision towers: ``[B, 3, H, W] -> [B, N, D]`` patch features from open_clip or Hugging Face models, alone or
fused (Prismatic's DINOv2 + SigLIP concat, POINTS' average)."""

from lit_mllm.nn.vision.base import VisionTower
from lit_mllm.nn.vision.fused import FusedTowers
from lit_mllm.nn.vision.hf import HFVisionTower, TinyCLIPVision
from lit_mllm.nn.vision.open_clip import OpenCLIPTower

__all__ = ["VisionTower", "HFVisionTower", "TinyCLIPVision", "OpenCLIPTower", "FusedTowers"]
