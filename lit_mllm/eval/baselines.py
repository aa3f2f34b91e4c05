"""Answer baselines that need no image: the bar a model must clear to show it uses its eyes.

- ``majority``: always answer the most common training answer.
- ``blind``: answer the most common training answer *for the same question text* (a text-only model
  at its best); falls back to ``majority`` for questions never seen in training.
"""

from __future__ import annotations

from collections import Counter, defaultdict

from lightning import Callback
from lightning.pytorch.utilities import rank_zero_info

from lit_mllm.data.sample import Sample


def _qa_pairs(samples: list[Sample], image_token: str) -> list[tuple[str, str, str | None]]:
    """``(question, answer, kind)`` of every reply; ``kind`` is the sample's ``meta["kind"]`` where it asks one
    question (ShapesWorld's validation and test records), else None."""
    pairs = []
    for s in samples:
        turns = [t for t in s.turns if t.role != "system"]
        kind = s.meta.get("kind") if len(turns) == 2 else None
        for q, a in zip(turns[::2], turns[1::2]):
            pairs.append((q.text.replace(image_token, "").strip(), a.text.strip(), kind))
    return pairs


def answer_baselines(
    train: list[Sample], val: list[Sample], image_token: str = "<image>"
) -> dict[str, float]:
    """Accuracy of the ``majority`` and ``blind`` baselines on ``val`` replies, learned from ``train``; where
    validation samples name their question ``kind`` (``meta``), also per kind (``blind/colour``, ...)."""
    train_pairs, val_pairs = _qa_pairs(train, image_token), _qa_pairs(val, image_token)
    if not train_pairs or not val_pairs:
        return {}
    overall = Counter(a for _, a, _ in train_pairs).most_common(1)[0][0]
    per_question: dict[str, Counter] = defaultdict(Counter)
    for q, a, _ in train_pairs:
        per_question[q][a] += 1
    blind = {q: c.most_common(1)[0][0] for q, c in per_question.items()}
    scores = {}
    groups = {"": val_pairs}
    for kind in sorted({k for _, _, k in val_pairs if k is not None}):
        groups[f"/{kind}"] = [p for p in val_pairs if p[2] == kind]
    for suffix, pairs in groups.items():
        n = len(pairs)
        scores[f"majority{suffix}"] = sum(a == overall for _, a, _ in pairs) / n
        scores[f"blind{suffix}"] = sum(a == blind.get(q, overall) for q, a, _ in pairs) / n
    return scores


class AnswerBaselines(Callback):
    """Logs ``val/baseline/majority`` and ``val/baseline/blind`` beside ``val/accuracy`` and prints the comparison
    at the end of fitting."""

    def __init__(self) -> None:
        self.scores: dict[str, float] = {}

    def on_fit_start(self, trainer, pl_module) -> None:
        dm = trainer.datamodule
        if dm is None or not hasattr(dm, "samples"):
            return
        self.scores = answer_baselines(dm.samples("fit"), dm.samples("validate"), dm.processor.image_token)
        if self.scores:
            rank_zero_info(
                "answer baselines on the validation set (no image needed): "
                + ", ".join(f"{k} {v:.3f}" for k, v in self.scores.items() if "/" not in k)
            )

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking:
            for k, v in self.scores.items():
                pl_module.log(f"val/baseline/{k}", v)

    def on_fit_end(self, trainer, pl_module) -> None:
        acc = trainer.callback_metrics.get("val/accuracy")
        if acc is not None and self.scores:
            rank_zero_info(
                f"final val/accuracy {float(acc):.3f} | majority-answer baseline {self.scores['majority']:.3f} | "
                f"blind (question-only) baseline {self.scores['blind']:.3f}"
            )
        table = kind_table(trainer.callback_metrics, self.scores)
        if table:
            rank_zero_info(table)


def kind_table(metrics: dict, scores: dict[str, float]) -> str:
    """Per question kind: every logged ``val/<metric>/<kind>`` beside the kind's blind and majority baselines
    (empty when the validation samples name no kinds)."""
    kinds = [k.split("/", 1)[1] for k in scores if k.startswith("blind/")]
    columns = sorted(
        {m.rsplit("/", 1)[0] for m in metrics if m.startswith("val/") and m.rsplit("/", 1)[-1] in kinds}
        - {"val/baseline/blind", "val/baseline/majority"}
    )
    if not kinds or not columns:
        return ""
    head = ["kind", *(c.removeprefix("val/") for c in columns), "blind", "majority"]
    rows = [
        [
            kind,
            *(f"{float(metrics[f'{c}/{kind}']):.3f}" if f"{c}/{kind}" in metrics else "-" for c in columns),
        ]
        + [f"{scores[f'blind/{kind}']:.3f}", f"{scores[f'majority/{kind}']:.3f}"]
        for kind in kinds
    ]
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)) for r in [head, *rows]]
    return "validation accuracy per question kind:\n" + "\n".join("  " + line for line in lines)
