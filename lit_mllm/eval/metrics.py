"""Reply-level exact match, computed from teacher-forced logits.

A reply counts as correct when every one of its supervised tokens (the answer and its end marker) is the
argmax prediction. That is exactly the condition under which greedy decoding reproduces the reply token
for token, so this equals greedy-generation exact match at the cost of one forward pass (a test checks
the equivalence against ``generate``). Replies are the maximal runs of supervised tokens in a sequence.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torchmetrics import Metric

from lit_mllm.nn.language.chat import IGNORE_INDEX


def reply_exact_match(logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """``(correct replies, replies)`` for ``logits [B, L, V]`` and ``labels [B, L]`` (unshifted, -100 = ignore)."""
    target = labels[:, 1:]
    supervised = target != IGNORE_INDEX  # [B, L-1]
    wrong = (logits[:, :-1].argmax(-1) != target) & supervised
    starts = supervised & ~F.pad(supervised[:, :-1], (1, 0), value=False)
    run = torch.cumsum(starts.flatten(), 0) - 1  # reply index of every position
    replies = int(starts.sum())
    errors = torch.zeros(replies, device=labels.device).index_add_(
        0, run[supervised.flatten()], wrong.flatten()[supervised.flatten()].float()
    )
    return (errors == 0).sum(), torch.tensor(replies, device=labels.device)


class ReplyExactMatch(Metric):
    """Fraction of assistant replies reproduced exactly (see module docstring)."""

    full_state_update = False

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.add_state("correct", default=torch.tensor(0), dist_reduce_fx="sum")
        self.add_state("total", default=torch.tensor(0), dist_reduce_fx="sum")

    def update(self, logits: Tensor, labels: Tensor) -> None:
        correct, total = reply_exact_match(logits, labels)
        self.correct += correct
        self.total += total

    def compute(self) -> Tensor:
        return self.correct.float() / self.total.clamp(min=1)
