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


def _qa_pairs(samples: list[Sample], image_token: str) -> list[tuple[str, str]]:
    pairs = []
    for s in samples:
        turns = [t for t in s.turns if t.role != "system"]
        for q, a in zip(turns[::2], turns[1::2]):
            pairs.append((q.text.replace(image_token, "").strip(), a.text.strip()))
    return pairs


def answer_baselines(
    train: list[Sample], val: list[Sample], image_token: str = "<image>"
) -> dict[str, float]:
    """Accuracy of the ``majority`` and ``blind`` baselines on ``val`` replies, learned from ``train``."""
    train_pairs, val_pairs = _qa_pairs(train, image_token), _qa_pairs(val, image_token)
    if not train_pairs or not val_pairs:
        return {}
    overall = Counter(a for _, a in train_pairs).most_common(1)[0][0]
    per_question: dict[str, Counter] = defaultdict(Counter)
    for q, a in train_pairs:
        per_question[q][a] += 1
    blind = {q: c.most_common(1)[0][0] for q, c in per_question.items()}
    n = len(val_pairs)
    return {
        "majority": sum(a == overall for _, a in val_pairs) / n,
        "blind": sum(a == blind.get(q, overall) for q, a in val_pairs) / n,
    }


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
                + ", ".join(f"{k} {v:.3f}" for k, v in self.scores.items())
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
