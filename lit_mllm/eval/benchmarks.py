"""The scores of three benchmarks, computed as their own evaluation code computes them.

- :class:`MMEScore` (MME, Fu et al. 2023; ``eval_tool/calculation.py``): per subtask, accuracy over the questions
  and accuracy+ over the images (an image counts when both of its questions, one answered yes and one no, are
  right); the subtask's score is ``(acc + acc+) * 100``; perception (10 subtasks, at most 2000) and cognition
  (4, at most 800) are the sums of their subtasks' scores. Replies are read by :func:`~lit_mllm.eval.answers.yes_no`;
  anything else is wrong.
- :class:`CircularAccuracy` (MMBench's CircularEval, Liu et al. 2023): a question is asked once per rotation of
  its options (the readers give each rotation as its own sample, sharing meta ``group``) and is right only when
  every rotation is answered right. Replies are read by :func:`~lit_mllm.eval.answers.option_letter`.
- :class:`POPEScore` (POPE, Li et al. 2023; ``evaluate.py``): yes/no accuracy, precision, recall and F1 with "yes"
  as the positive class, and the yes-ratio, per split (``random``, ``popular``, ``adversarial``). Replies are read
  by :func:`~lit_mllm.eval.answers.pope_yes_no`.

Questions are grouped across ranks: each sample is kept as a row of numbers (group names hashed by
:func:`~lit_mllm.eval.metrics.stable_hash`) and grouped in ``compute``.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchmetrics.utilities import dim_zero_cat

from lit_mllm.eval.answers import option_letter, pope_yes_no, yes_no
from lit_mllm.eval.metrics import EvalMetric, EvalOutputs, generated, group_index, stable_hash

# MME's official subtasks (eval_tool/calculation.py, eval_type_dict)
MME_PERCEPTION = [
    "existence", "count", "position", "color", "posters", "celebrity", "scene", "landmark", "artwork", "OCR",
]  # fmt: skip
MME_COGNITION = ["commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning"]
POPE_SPLITS = ["random", "popular", "adversarial"]


def _rows(metric: EvalMetric, *names: str) -> list[Tensor]:
    """The named ``cat`` states as 1-D tensors (empty when nothing was added)."""
    return [
        dim_zero_cat(getattr(metric, n)).long()
        if len(getattr(metric, n))
        else torch.zeros(0, dtype=torch.long)
        for n in names
    ]


def _all_right_per_group(groups: Tensor, right: Tensor) -> Tensor:
    """``[G]`` whether every sample of each distinct group value is right (groups in sorted order)."""
    _, inverse = torch.unique(groups, return_inverse=True)
    wrong = torch.zeros(int(inverse.max()) + 1 if len(inverse) else 0, dtype=torch.long)
    wrong.index_add_(0, inverse, (right == 0).long())
    return wrong == 0


def _require(meta: list[dict] | None, n: int, keys: tuple[str, ...], who: str) -> list[dict]:
    """Every sample's meta, checked to hold ``keys``; an error names the sample and what it lacks."""
    meta = meta or [{}] * n
    if len(meta) != n:
        raise ValueError(f"{who}: {len(meta)} meta entries for {n} samples")
    for i, m in enumerate(meta):
        missing = [k for k in keys if k not in m]
        if missing:
            raise ValueError(
                f"{who}: sample {i} of the batch has no meta {missing} (its meta: {sorted(m)}); the benchmark "
                "reader writes them"
            )
    return meta


class MMEScore(EvalMetric):
    """MME's scores (module docstring). Samples need meta ``subtask`` and ``image`` (the image both questions
    ask about) and the reference ``"Yes"``/``"No"``.

    ``compute`` returns, for every subtask with samples, ``<subtask>/acc``, ``<subtask>/acc_plus`` (fractions)
    and ``<subtask>/score`` (``(acc + acc+) * 100``), and ``perception`` and ``cognition`` (sums of the scores of
    their subtasks with samples) and ``unparsed`` (fraction of replies neither yes nor no).
    """

    full_state_update = False
    needs_generation = True

    def __init__(
        self, perception: list[str] | None = None, cognition: list[str] | None = None, **kwargs
    ) -> None:
        """
        Args:
            perception: Perception subtasks (default MME's ten); a sample of another subtask is an error.
            cognition: Cognition subtasks (default MME's four).
        """
        super().__init__(**kwargs)
        self.perception = list(MME_PERCEPTION if perception is None else perception)
        self.cognition = list(MME_COGNITION if cognition is None else cognition)
        self.subtasks = self.perception + self.cognition
        for name in ("subtask", "image", "right"):
            self.add_state(name, default=[], dist_reduce_fx="cat")
        self.add_state("unparsed", default=torch.tensor(0), dist_reduce_fx="sum")

    def update(
        self, predictions: list[str], references: list[list[str]], meta: list[dict] | None = None
    ) -> None:
        who = type(self).__name__
        meta = _require(meta, len(predictions), ("subtask", "image"), who)
        subtasks = group_index(meta, "subtask", self.subtasks, who, len(predictions))
        images, right = [], []
        for reply, refs, m in zip(predictions, references, meta, strict=True):
            truth = {r.strip().lower() for r in refs}
            if len(truth) != 1 or not truth <= {"yes", "no"}:
                raise ValueError(f"{who}: an MME reference is 'Yes' or 'No', got {refs!r} (meta {m})")
            answer = yes_no(reply)
            self.unparsed += int(answer == "other")
            right.append(int(answer in truth))
            images.append(stable_hash(f"{m['subtask']}\x1f{m['image']}"))
        for name, values in (("subtask", subtasks), ("image", images), ("right", right)):
            getattr(self, name).append(torch.tensor(values, dtype=torch.long, device=self.device))

    def update_from(self, outputs: EvalOutputs) -> None:
        self.update(*generated(outputs, type(self).__name__))

    def compute(self) -> dict[str, Tensor]:
        subtask, image, right = (t.cpu() for t in _rows(self, "subtask", "image", "right"))
        out: dict[str, Tensor] = {}
        totals = {"perception": 0.0, "cognition": 0.0}
        for k, name in enumerate(self.subtasks):
            mine = subtask == k
            if not mine.any():
                continue
            acc = right[mine].float().mean()
            acc_plus = _all_right_per_group(image[mine], right[mine]).float().mean()
            score = (acc + acc_plus) * 100
            out |= {f"{name}/acc": acc, f"{name}/acc_plus": acc_plus, f"{name}/score": score}
            totals["perception" if k < len(self.perception) else "cognition"] += float(score)
        out |= {key: torch.tensor(value) for key, value in totals.items()}
        out["unparsed"] = self.unparsed.float() / max(len(right), 1)
        return out


class CircularAccuracy(EvalMetric):
    """MMBench's CircularEval (module docstring). Samples need meta ``group`` (shared by the rotations of one
    question) and ``options`` (``{"A": text, ...}`` as shown in this rotation); the reference is the letter.

    ``compute`` returns ``accuracy`` (questions right under every rotation / questions), ``single_pass`` (every
    rotation scored as its own question) and ``unparsed`` (fraction of replies naming no option).
    """

    full_state_update = False
    needs_generation = True

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        for name in ("group", "right"):
            self.add_state(name, default=[], dist_reduce_fx="cat")
        self.add_state("unparsed", default=torch.tensor(0), dist_reduce_fx="sum")

    def update(
        self, predictions: list[str], references: list[list[str]], meta: list[dict] | None = None
    ) -> None:
        who = type(self).__name__
        meta = _require(meta, len(predictions), ("group", "options"), who)
        groups, right = [], []
        for reply, refs, m in zip(predictions, references, meta, strict=True):
            if not refs:
                raise ValueError(f"{who}: an MMBench sample needs its answer letter as reference (meta {m})")
            letter = option_letter(reply, m["options"])
            self.unparsed += int(letter is None)
            right.append(int(letter is not None and letter in {r.strip() for r in refs}))
            groups.append(stable_hash(str(m["group"])))
        for name, values in (("group", groups), ("right", right)):
            getattr(self, name).append(torch.tensor(values, dtype=torch.long, device=self.device))

    def update_from(self, outputs: EvalOutputs) -> None:
        self.update(*generated(outputs, type(self).__name__))

    def compute(self) -> dict[str, Tensor]:
        group, right = (t.cpu() for t in _rows(self, "group", "right"))
        n = max(len(right), 1)
        questions = _all_right_per_group(group, right)
        return {
            "accuracy": questions.float().mean() if len(questions) else torch.tensor(0.0),
            "single_pass": right.sum().float() / n,
            "unparsed": self.unparsed.float() / n,
        }


class POPEScore(EvalMetric):
    """POPE's scores (module docstring), per split (meta ``split``) and over all samples. The reference is
    ``"yes"`` or ``"no"``.

    ``compute`` returns ``accuracy``, ``precision``, ``recall``, ``f1`` and ``yes_ratio`` over all samples, and the
    same as ``<split>/<name>`` for every split with samples.
    """

    full_state_update = False
    needs_generation = True

    def __init__(self, splits: list[str] | None = None, **kwargs) -> None:
        """
        Args:
            splits: The values of meta ``split`` (default POPE's three); a sample of another split is an error.
        """
        super().__init__(**kwargs)
        self.splits = list(POPE_SPLITS if splits is None else splits)
        # confusion counts [split + 1 (all), 4]: true yes, false yes, true no, false no
        self.add_state(
            "confusion", default=torch.zeros(len(self.splits) + 1, 4, dtype=torch.long), dist_reduce_fx="sum"
        )

    def update(
        self, predictions: list[str], references: list[list[str]], meta: list[dict] | None = None
    ) -> None:
        who = type(self).__name__
        splits = group_index(meta, "split", self.splits, who, len(predictions))
        for reply, refs, s in zip(predictions, references, splits, strict=True):
            truth = {r.strip().lower() for r in refs}
            if len(truth) != 1 or not truth <= {"yes", "no"}:
                raise ValueError(f"{who}: a POPE reference is 'yes' or 'no', got {refs!r}")
            said_yes, is_yes = pope_yes_no(reply) == "yes", truth == {"yes"}
            cell = (0 if is_yes else 1) if said_yes else (2 if not is_yes else 3)
            self.confusion[-1, cell] += 1
            if s >= 0:
                self.confusion[s, cell] += 1

    def update_from(self, outputs: EvalOutputs) -> None:
        self.update(*generated(outputs, type(self).__name__))

    @staticmethod
    def _scores(counts: Tensor) -> dict[str, Tensor]:
        tp, fp, tn, fn = counts.double()
        total = (tp + fp + tn + fn).clamp(min=1)
        precision = tp / (tp + fp).clamp(min=1)
        recall = tp / (tp + fn).clamp(min=1)
        f1 = 2 * precision * recall / (precision + recall).clamp(min=1e-12)
        scores = {
            "accuracy": (tp + tn) / total,
            "precision": precision,
            "recall": recall,
            "f1": f1,
            "yes_ratio": (tp + fp) / total,
        }
        return {k: v.float() for k, v in scores.items()}

    def compute(self) -> dict[str, Tensor]:
        out = self._scores(self.confusion[-1])
        for k, name in enumerate(self.splits):
            if self.confusion[k].sum() > 0:
                out |= {f"{name}/{key}": v for key, v in self._scores(self.confusion[k]).items()}
        return out
