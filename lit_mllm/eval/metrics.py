"""Evaluation metrics a family module updates during validation and test, injected from the config::

    model:
      init_args:
        metrics:
          accuracy: {class_path: lit_mllm.eval.ReplyExactMatch}        # teacher-forced, one forward pass
          generated: {class_path: lit_mllm.eval.GeneratedExactMatch}   # greedy replies vs. the references

Each is a torchmetrics ``Metric`` (states synchronised across ranks) subclassing :class:`EvalMetric`: it reads what
it needs from :class:`EvalOutputs` (the batch, its teacher-forced logits, and the generated replies when any metric
``needs_generation``). It is logged at the end of each evaluation epoch as ``<split>/<name>`` (a metric whose
``compute`` returns a dict: ``<split>/<name>/<key>`` each), and, when the split has several sources (tasks), per
task as ``<split>/<task>/<name>``. :class:`PerGroup` breaks any metric down by a key of the samples' ``meta``
(ShapesWorld's question ``kind``; a benchmark's subtask). Each also has a plain ``update(predictions, references,
meta)`` on Python lists, usable without Lightning; ``update_from`` calls it.

Only numbers travel between ranks: a metric that groups samples (an image's two questions, a question's rotations)
keeps per-sample rows of numbers (group names hashed by :func:`stable_hash`, the same on every rank) as ``cat``
states, and named groups it reports (subtasks, answer types, kinds) are declared up front so their counts are
fixed-size ``sum`` states.

:class:`GeneratedExactMatch`: a generated reply equals one of the sample's references (``normalize="vqa"``: both
under the official VQA answer processing, for single-answer benchmarks such as GQA).

:class:`ReplyExactMatch`: a reply counts as correct when every one of its supervised tokens (the answer and its end
marker) is the argmax prediction. That is exactly the condition under which greedy decoding reproduces the reply
token for token, so it equals greedy-generation exact match at the cost of one forward pass (a test checks the
equivalence against ``generate``). Replies are the maximal runs of supervised tokens in a sequence.
"""

from __future__ import annotations

import hashlib
import warnings
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics import Metric

from lit_mllm.data.batch import Batch
from lit_mllm.eval.answers import vqa_normalize
from lit_mllm.nn.language.chat import IGNORE_INDEX

OTHER = "other"
"""The group of samples whose ``meta`` value :class:`PerGroup` does not list."""


@dataclass
class EvalOutputs:
    """What an evaluation step has for its metrics."""

    batch: Batch
    """The batch (teacher-forced form; ``batch.generation`` holds its prompt-only form when generating)."""
    logits: Tensor
    """``[R, L, V]`` teacher-forced logits of ``batch``."""
    generations: list[str | None] | None = None
    """The decoded reply of each sample (the model's generation settings), when a metric needs them; None for a
    sample of a source no generation metric scores (see :attr:`EvalMetric.tasks`)."""

    def select(self, rows: list[int]) -> EvalOutputs:
        """The outputs of the samples ``rows`` only (padded evaluation batches: a row is a sample)."""
        return EvalOutputs(
            self.batch.select(rows),
            self.logits[torch.tensor(rows, dtype=torch.long, device=self.logits.device)],
            None if self.generations is None else [self.generations[r] for r in rows],
        )


class EvalMetric(Metric):
    """A metric updated from :class:`EvalOutputs`; ``needs_generation`` makes the module generate replies.

    ``tasks`` restricts a metric to some sources (tasks) of a split, by name: the module updates it with those
    sources' samples only, logs its per-task copies for those tasks only, and generates replies only for the
    samples some generation metric scores. A split that mixes kinds of samples needs it wherever a metric would
    misread another kind's samples (:class:`ReplyExactMatch` on few-shot samples, whose support answers are
    supervised replies too, or on text multiple choice, whose wrong options are replies)::

        metrics:
          accuracy: {class_path: lit_mllm.eval.ReplyExactMatch, init_args: {tasks: [zero_shot]}}
          few_shot: {class_path: lit_mllm.eval.GeneratedExactMatch, init_args: {tasks: [four_shot]}}
          text: {class_path: lit_mllm.eval.ChoiceAccuracy, init_args: {tasks: [text_choice]}}
    """

    needs_generation: bool = False

    def __init__(self, tasks: list[str] | None = None, **kwargs) -> None:
        """
        Args:
            tasks: The sources of the split (by their names under ``data.init_args.val`` / ``test``) whose samples
                this metric scores; None: every sample. A name the split lacks is an error when evaluation starts.
        """
        super().__init__(**kwargs)
        if tasks is not None and (
            not tasks or not all(isinstance(t, str) and t for t in tasks) or len(set(tasks)) != len(tasks)
        ):
            raise ValueError(
                f"{type(self).__name__} tasks={tasks!r}: give distinct source names of the split, or leave it "
                "unset to score every sample"
            )
        self.tasks = None if tasks is None else list(tasks)

    def scores(self, task: str) -> bool:
        """Whether this metric scores the samples of source ``task``."""
        return self.tasks is None or task in self.tasks

    def update_from(self, outputs: EvalOutputs) -> None:
        """Update from one evaluation step's outputs."""
        raise NotImplementedError


def _ratio(part: Tensor, whole: Tensor) -> Tensor:
    """``part / whole``, NaN when nothing was counted (an empty split is not a score of 0)."""
    return part.float() / whole if whole > 0 else torch.tensor(float("nan"), device=whole.device)


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
    if any(g is None for g in outputs.generations):
        raise ValueError(
            f"{who} was handed samples without a generated reply: the module generates only for the sources its "
            "generation metrics score (their tasks); this metric's tasks must name these samples' source"
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
        return _ratio(self.correct, self.total)


class GeneratedExactMatch(EvalMetric):
    """Fraction of samples whose generated reply equals one of their references; samples without a reference are
    not counted. Per group of samples: wrap it in :class:`PerGroup`."""

    full_state_update = False
    needs_generation = True

    def __init__(
        self,
        ignore_case: bool = False,
        normalize: Literal["strip", "vqa"] = "strip",
        **kwargs,
    ) -> None:
        """
        Args:
            ignore_case: Compare lower-cased text.
            normalize: ``strip``: surrounding whitespace only; ``vqa``: the official VQA answer processing
                (punctuation, number words, articles, contractions; lower-cases) on reply and references.
        """
        super().__init__(**kwargs)
        if normalize not in ("strip", "vqa"):
            raise ValueError(f"GeneratedExactMatch normalize must be 'strip' or 'vqa', got {normalize!r}")
        self.ignore_case, self.normalize = ignore_case, normalize
        self.add_state("correct", default=torch.tensor(0), dist_reduce_fx="sum")
        self.add_state("total", default=torch.tensor(0), dist_reduce_fx="sum")

    def _norm(self, text: str) -> str:
        text = vqa_normalize(text) if self.normalize == "vqa" else text.strip()
        return text.lower() if self.ignore_case else text

    def update(
        self, generations: list[str], references: list[list[str]], meta: list[dict] | None = None
    ) -> None:
        for answer, refs in zip(generations, references, strict=True):
            if refs:
                self.total += 1
                self.correct += int(self._norm(answer) in {self._norm(r) for r in refs})

    def update_from(self, outputs: EvalOutputs) -> None:
        self.update(*generated(outputs, type(self).__name__))

    def compute(self) -> Tensor:
        return _ratio(self.correct, self.total)


class PerGroup(EvalMetric):
    """A metric computed separately for each group of samples sharing ``meta[key]`` (ShapesWorld's question kinds,
    a benchmark's subtasks)::

        by_kind:
          class_path: lit_mllm.eval.PerGroup
          init_args:
            metric: {class_path: lit_mllm.eval.ReplyExactMatch}
            key: kind
            groups: [colour, shape, count, position, existence]

    ``compute`` gives ``{group: value}`` (logged ``<split>/by_kind/colour``, ...) for the groups that met a sample on
    some rank (nothing when no sample named a listed group); a metric returning a dict gives ``{group/key: value}``. Samples whose value is not listed are
    counted under ``other`` (listed groups are fixed so that every rank holds the same states)."""

    full_state_update = False

    def __init__(self, metric: EvalMetric, key: str, groups: list[str], **kwargs) -> None:
        """
        Args:
            metric: The metric computed per group (copied for each).
            key: The ``meta`` key grouping the samples.
            groups: The group values reported (others are counted under ``other``).
        """
        super().__init__(**kwargs)
        if not groups or len(set(groups)) != len(groups) or OTHER in groups:
            raise ValueError(f"PerGroup needs distinct group names other than {OTHER!r}, got {groups!r}")
        bad = [g for g in groups if not g or "." in g]
        if bad:
            raise ValueError(f"PerGroup group names cannot be empty or contain '.': {bad}")
        if metric.tasks is not None:
            raise ValueError(
                f"PerGroup's metric has tasks={metric.tasks}: restrict the PerGroup itself (its tasks option), "
                "which hands its members their samples"
            )
        self.key = key
        self.needs_generation = metric.needs_generation
        self.members = nn.ModuleDict({g: metric.clone() for g in [*groups, OTHER]})
        self.add_state("seen", default=torch.zeros(len(self.members), dtype=torch.long), dist_reduce_fx="sum")

    def update(self, outputs: EvalOutputs) -> None:
        rows: dict[str, list[int]] = {}
        for i, meta in enumerate(outputs.batch.meta or [{} for _ in outputs.batch.ids]):
            value = str(meta.get(self.key, OTHER))
            rows.setdefault(value if value in self.members else OTHER, []).append(i)
        for k, group in enumerate(self.members):
            if group in rows:
                self.members[group].update_from(outputs.select(rows[group]))
                self.seen[k] += len(rows[group])

    def update_from(self, outputs: EvalOutputs) -> None:
        self.update(outputs)

    def compute(self) -> dict[str, Tensor]:
        out = {}
        for k, (group, member) in enumerate(self.members.items()):
            with warnings.catch_warnings():  # a group no sample met is computed from its empty state
                warnings.filterwarnings(
                    "ignore", message=".*compute.*before the.*update", category=UserWarning
                )
                value = member.compute()  # every rank computes every member: their states synchronise
            if self.seen[k] > 0 and (group != OTHER or self.seen[:-1].sum() > 0):  # no kinds at all: nothing
                values = value if isinstance(value, dict) else {"": value}
                out.update({f"{group}/{key}" if key else group: v for key, v in values.items()})
        return out

    def reset(self) -> None:
        super().reset()
        for member in self.members.values():
            member.reset()
