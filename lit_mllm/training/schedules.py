"""Learning-rate schedules that know the run's length: linear warmup, then cosine decay to a floor
(MM1 decays to 10% of the peak). ``total_steps`` left as None is filled in by the family module from the
trainer's ``estimated_stepping_batches``, so configs never repeat the number of steps."""

from __future__ import annotations

import math

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR


class WarmupCosine(LambdaLR):
    """Linear warmup over ``warmup_steps``, cosine decay to ``min_lr_ratio`` x peak at ``total_steps``."""

    def __init__(
        self,
        optimizer: Optimizer,
        warmup_steps: int = 0,
        total_steps: int | None = None,
        min_lr_ratio: float = 0.1,
    ) -> None:
        """
        Args:
            warmup_steps: Optimizer steps of linear warmup from 0 to the peak learning rate.
            total_steps: Length of the schedule; None = the whole run (filled in at fit start).
            min_lr_ratio: Final learning rate as a fraction of the peak.
        """
        self.warmup_steps = warmup_steps
        self.total_steps = total_steps
        self.min_lr_ratio = min_lr_ratio
        super().__init__(optimizer, self.factor)

    def factor(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        total = self.total_steps if self.total_steps is not None else step + 1
        progress = min(1.0, (step - self.warmup_steps) / max(1, total - self.warmup_steps))
        return self.min_lr_ratio + (1 - self.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
