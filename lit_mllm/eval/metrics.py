"""Evaluation metrics a family module updates during validation and test, injected from the config::

    model:
      init_args:
        metrics:
          accuracy: {class_path: lit_mllm.eval.ReplyExactMatch}        # teacher-forced, one forward pass
          generated: {class_path: lit_mllm.eval.GeneratedExactMatch}   # greedy replies vs. the references

Each is a torchmetrics ``Metric`` (states synchronised across ranks) subclassing :class:`EvalMetric`: it reads what
it needs from :class:`EvalOutputs` (the batch, its teacher-forced logits, and the generated replies when any metric
``needs_generation``). It is logged as ``<split>/<name>``.

:class:`ReplyExactMatch`: a reply counts as correct when every one of its supervised tokens (the answer and its end
marker) is the argmax prediction. That is exactly the condition under which greedy decoding reproduces the reply
token for token, so it equals greedy-generation exact match at the cost of one forward pass (a test checks the
equivalence against ``generate``). Replies are the maximal runs of supervised tokens in a sequence.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor
from torchmetrics import Metric

from lit_mllm.data.batch import Batch
from lit_mllm.nn.language.chat import IGNORE_INDEX


@dataclass
class EvalOutputs:
    """What an evaluation step has for its metrics."""

    batch: Batch
    """The batch (teacher-forced form; ``batch.generation`` holds its prompt-only form when generating)."""
    logits: Tensor
    """``[R, L, V]`` teacher-forced logits of ``batch``."""
    generations: list[str] | None = None
    """The decoded reply of each sample (the model's generation settings), when a metric needs them."""


class EvalMetric(Metric):
    """A metric updated from :class:`EvalOutputs`; ``needs_generation`` makes the module generate replies."""

    needs_generation: bool = False

    def update_from(self, outputs: EvalOutputs) -> None:
        """Update from one evaluation step's outputs."""
        raise NotImplementedError


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


class ReplyExactMatch(EvalMetric):
    """Fraction of assistant replies reproduced exactly, from teacher-forced logits (see module docstring)."""

    full_state_update = False

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.add_state("correct", default=torch.tensor(0), dist_reduce_fx="sum")
        self.add_state("total", default=torch.tensor(0), dist_reduce_fx="sum")

    def update(self, logits: Tensor, labels: Tensor) -> None:
        correct, total = reply_exact_match(logits, labels)
        self.correct += correct
        self.total += total

    def update_from(self, outputs: EvalOutputs) -> None:
        self.update(outputs.logits, outputs.batch.labels)

    def compute(self) -> Tensor:
        return self.correct.float() / self.total.clamp(min=1)


class GeneratedExactMatch(EvalMetric):
    """Fraction of samples whose generated reply equals one of their references (whitespace-stripped; optionally
    case-insensitive). Samples without a reference are not counted."""

    full_state_update = False
    needs_generation = True

    def __init__(self, ignore_case: bool = False, **kwargs) -> None:
        """
        Args:
            ignore_case: Compare lower-cased text.
        """
        super().__init__(**kwargs)
        self.ignore_case = ignore_case
        self.add_state("correct", default=torch.tensor(0), dist_reduce_fx="sum")
        self.add_state("total", default=torch.tensor(0), dist_reduce_fx="sum")

    def _norm(self, text: str) -> str:
        text = text.strip()
        return text.lower() if self.ignore_case else text

    def update(self, generations: list[str], references: list[list[str]]) -> None:
        for answer, refs in zip(generations, references, strict=True):
            if refs:
                self.total += 1
                self.correct += int(self._norm(answer) in {self._norm(r) for r in refs})

    def update_from(self, outputs: EvalOutputs) -> None:
        prompts = outputs.batch.generation
        if outputs.generations is None or prompts is None or prompts.references is None:
            raise ValueError(
                f"{type(self).__name__} scores generated replies, but the batch carries no prompts; the model's "
                "processor must set eval_prompts (VLMModule does when a metric needs_generation)"
            )
        self.update(outputs.generations, prompts.references)

    def compute(self) -> Tensor:
        return self.correct.float() / self.total.clamp(min=1)
