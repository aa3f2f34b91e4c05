"""Evaluation metrics a family module updates during validation and test, injected from the config::

    model:
      init_args:
        metrics:
          accuracy: {class_path: lit_mllm.eval.ReplyExactMatch}        # teacher-forced, one forward pass
          generated: {class_path: lit_mllm.eval.GeneratedExactMatch}   # greedy replies vs. the references

Each is a torchmetrics ``Metric`` (states synchronised across ranks) subclassing :class:`EvalMetric`: it reads what
it needs from :class:`EvalOutputs` (the batch, its teacher-forced logits, and the generated replies when any metric
``needs_generation``). It is logged as ``<split>/<name>`` (``<split>/<name>/<key>`` for a metric whose ``compute``
returns a dict). Each also has a plain ``update(predictions, references, meta)`` on Python lists, usable without
Lightning; ``update_from`` calls it.

Only numbers travel between ranks: a metric that groups samples (an image's two questions, a question's rotations)
keeps per-sample rows of numbers (group names hashed by :func:`stable_hash`, the same on every rank) as ``cat``
states, and named groups it reports (subtasks, answer types, kinds) are declared up front so their counts are
fixed-size ``sum`` states.

:class:`GeneratedExactMatch`: a generated reply equals one of the sample's references (``normalize="vqa"``: both
under the official VQA answer processing, for single-answer benchmarks such as GQA), overall and per declared
group (``groups`` of the meta key ``group_key``, e.g. ShapesWorld's question ``kind``).

:class:`ReplyExactMatch`: a reply counts as correct when every one of its supervised tokens (the answer and its end
marker) is the argmax prediction. That is exactly the condition under which greedy decoding reproduces the reply
token for token, so it equals greedy-generation exact match at the cost of one forward pass (a test checks the
equivalence against ``generate``). Replies are the maximal runs of supervised tokens in a sequence.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor
from torchmetrics import Metric

from lit_mllm.data.batch import Batch
from lit_mllm.eval.answers import vqa_normalize
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


def stable_hash(text: str) -> int:
    """A signed 64-bit hash of ``text``, the same in every process (Python's ``hash`` of a str is salted per
    process, so ranks would disagree)."""
    return int.from_bytes(
        hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "little", signed=True
    )


def generated(outputs: EvalOutputs, who: str) -> tuple[list[str], list[list[str]], list[dict]]:
    """``(replies, references, meta)`` of an evaluation step, per sample, for a metric that scores generations;
    ``who`` (the metric's name) is named when the batch carries none."""
    prompts = outputs.batch.generation
    if outputs.generations is None or prompts is None or prompts.references is None:
        raise ValueError(
            f"{who} scores generated replies, but the batch carries no prompts; the model's processor must set "
            "eval_prompts (VLMModule does when a metric needs_generation)"
        )
    meta = prompts.meta or outputs.batch.meta or [{} for _ in prompts.references]
    return outputs.generations, prompts.references, meta


def group_index(meta: list[dict] | None, key: str, groups: list[str], who: str, n: int) -> list[int]:
    """Index in ``groups`` of each of ``n`` samples' ``meta[key]`` (-1 where the key is absent); a value that is
    not in ``groups`` is an error naming the valid ones."""
    if not groups:
        return [-1] * n
    meta = meta or [{}] * n
    if len(meta) != n:
        raise ValueError(f"{who}: {len(meta)} meta entries for {n} samples")
    out = []
    for m in meta:
        value = m.get(key)
        if value is None:
            out.append(-1)
        elif str(value) in groups:
            out.append(groups.index(str(value)))
        else:
            raise ValueError(
                f"{who}: sample meta {key!r} = {value!r} is not one of the declared groups {groups}; add it to the "
                "metric's groups"
            )
    return out


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
    """Fraction of samples whose generated reply equals one of their references; samples without a reference are
    not counted. With ``groups``, ``compute`` returns ``{"accuracy": ..., "<group>": ...}`` (a group with no
    sample yet reads 0), else the accuracy alone."""

    full_state_update = False
    needs_generation = True

    def __init__(
        self,
        ignore_case: bool = False,
        normalize: Literal["strip", "vqa"] = "strip",
        group_key: str = "kind",
        groups: list[str] | None = None,
        **kwargs,
    ) -> None:
        """
        Args:
            ignore_case: Compare lower-cased text.
            normalize: ``strip``: surrounding whitespace only; ``vqa``: the official VQA answer processing
                (punctuation, number words, articles, contractions; lower-cases) on reply and references.
            group_key: Meta key whose value groups the samples (ShapesWorld's ``kind``, a benchmark's category).
            groups: The values of ``group_key`` to report, each as its own accuracy; a sample with another value
                is an error. Empty: overall accuracy only.
        """
        super().__init__(**kwargs)
        if normalize not in ("strip", "vqa"):
            raise ValueError(f"GeneratedExactMatch normalize must be 'strip' or 'vqa', got {normalize!r}")
        self.ignore_case, self.normalize = ignore_case, normalize
        self.group_key, self.groups = group_key, list(groups or [])
        self.add_state("correct", default=torch.tensor(0), dist_reduce_fx="sum")
        self.add_state("total", default=torch.tensor(0), dist_reduce_fx="sum")
        self.add_state(
            "group_correct", default=torch.zeros(len(self.groups), dtype=torch.long), dist_reduce_fx="sum"
        )
        self.add_state(
            "group_total", default=torch.zeros(len(self.groups), dtype=torch.long), dist_reduce_fx="sum"
        )

    def _norm(self, text: str) -> str:
        text = vqa_normalize(text) if self.normalize == "vqa" else text.strip()
        return text.lower() if self.ignore_case else text

    def update(
        self, generations: list[str], references: list[list[str]], meta: list[dict] | None = None
    ) -> None:
        index = group_index(meta, self.group_key, self.groups, type(self).__name__, len(generations))
        for answer, refs, g in zip(generations, references, index, strict=True):
            if refs:
                right = int(self._norm(answer) in {self._norm(r) for r in refs})
                self.total += 1
                self.correct += right
                if g >= 0:
                    self.group_total[g] += 1
                    self.group_correct[g] += right

    def update_from(self, outputs: EvalOutputs) -> None:
        self.update(*generated(outputs, type(self).__name__))

    def compute(self) -> Tensor | dict[str, Tensor]:
        accuracy = self.correct.float() / self.total.clamp(min=1)
        if not self.groups:
            return accuracy
        per_group = self.group_correct.float() / self.group_total.clamp(min=1)
        return {"accuracy": accuracy, **{g: per_group[k] for k, g in enumerate(self.groups)}}
