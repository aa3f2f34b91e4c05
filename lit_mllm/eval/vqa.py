"""VQA accuracy (VQAv2, TextVQA, VizWiz, OK-VQA: ten human answers per question), as the official VQA evaluation
computes it: for each of the ten answers left out in turn, ``min(#remaining answers equal to the reply / 3, 1)``,
averaged, with the official answer processing (:func:`lit_mllm.eval.answers.vqa_accuracy` holds the rules).

Questions with a single accepted answer (GQA) are scored by exact match instead:
``GeneratedExactMatch(normalize="vqa")``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lit_mllm.eval.answers import vqa_accuracy
from lit_mllm.eval.metrics import EvalMetric, EvalOutputs, generated, group_index

ANSWER_TYPES = ["yes/no", "number", "other"]


class VQAAccuracy(EvalMetric):
    """Mean VQA accuracy over the questions, overall and per answer type (meta ``answer_type``).

    ``compute`` returns ``{"accuracy": ..., "yes_no": ..., "number": ..., "other": ...}`` (fractions; the official
    report prints them x100). A question without references is not counted; one with a single reference is an
    error (leave-one-out needs two).
    """

    full_state_update = False
    needs_generation = True

    def __init__(self, normalize_reply: bool = True, answer_types: list[str] | None = None, **kwargs) -> None:
        """
        Args:
            normalize_reply: Apply the official answer processing to every reply first (as LLaVA and lmms-eval
                prepare the answer files they submit); False: exactly ``vqaEval.py`` on the raw reply, which
                processes it only when the ten answers differ (see :func:`~lit_mllm.eval.answers.vqa_accuracy`).
            answer_types: The values of meta ``answer_type`` reported on their own (default VQAv2's ``yes/no``,
                ``number``, ``other``); each is logged under its name with ``/`` written ``_``.
        """
        super().__init__(**kwargs)
        self.normalize_reply = normalize_reply
        self.answer_types = list(ANSWER_TYPES if answer_types is None else answer_types)
        self.add_state("score", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("total", default=torch.tensor(0), dist_reduce_fx="sum")
        n = len(self.answer_types)
        self.add_state("type_score", default=torch.zeros(n, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("type_total", default=torch.zeros(n, dtype=torch.long), dist_reduce_fx="sum")

    def update(
        self, predictions: list[str], references: list[list[str]], meta: list[dict] | None = None
    ) -> None:
        types = group_index(meta, "answer_type", self.answer_types, type(self).__name__, len(predictions))
        for reply, answers, t in zip(predictions, references, types, strict=True):
            if not answers:
                continue
            acc = vqa_accuracy(reply, answers, self.normalize_reply)
            self.score += acc
            self.total += 1
            if t >= 0:
                self.type_score[t] += acc
                self.type_total[t] += 1

    def update_from(self, outputs: EvalOutputs) -> None:
        self.update(*generated(outputs, type(self).__name__))

    def compute(self) -> dict[str, Tensor]:
        per_type = (self.type_score / self.type_total.clamp(min=1)).float()
        return {
            "accuracy": (self.score / self.total.clamp(min=1)).float(),
            **{t.replace("/", "_"): per_type[k] for k, t in enumerate(self.answer_types)},
        }
