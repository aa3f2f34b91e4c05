"""Training policy: stages (what trains), and later callbacks and checkpoint policy."""

from lit_mllm.training.schedules import WarmupCosine
from lit_mllm.training.stages import Stage, apply_stage, trainable_table

__all__ = ["WarmupCosine", "Stage", "apply_stage", "trainable_table"]
