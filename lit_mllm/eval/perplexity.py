"""Per-sample perplexity of the supervised text under a model, its sidecar file, and the keep rule of a filter
(POINTS, arXiv 2409.04828, section 3.2: score pre-training data with an already trained VLM, sort ascending, keep
the first 20%).

A sample's perplexity is ``exp(mean token loss)`` over the tokens it learns (the assistant replies and their end
tokens, or every text token of a document: exactly the tokens the training loss reads), computed in fp32 from the
model's teacher-forced logits.

The sidecar is a CSV file (:data:`FIELDS`), one row per record of a source, appended a batch at a time and flushed,
so a killed run loses nothing it wrote and a second run skips what is there (:func:`read_scores` drops a last line
cut short by the kill). A record that cannot be processed gets a row too, with its reason in ``skipped`` (it is
never kept).

The keep rule (:func:`select`): of a source's scored rows (``skipped`` empty), ``--keep f`` keeps the
``floor(f * n)`` of lowest perplexity (``descending``: highest), ties broken by ``id`` then by record index;
``--threshold x`` keeps those with perplexity ``<= x`` (``descending``: ``>= x``).
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor

FIELDS = ("source", "index", "id", "tokens", "mean_loss", "perplexity", "skipped")
"""Columns of the sidecar: source name, record index in the source, sample id, supervised tokens, mean token loss
(nats), perplexity, and the reason a record could not be scored (empty when it was)."""

Order = Literal["ascending", "descending"]


@dataclass(frozen=True)
class Score:
    """One row of the sidecar (see :data:`FIELDS`)."""

    source: str
    index: int
    id: str
    tokens: int
    mean_loss: float
    perplexity: float
    skipped: str = ""

    @property
    def scored(self) -> bool:
        return not self.skipped

    def row(self) -> list[str]:
        return [
            self.source,
            str(self.index),
            self.id,
            str(self.tokens),
            repr(self.mean_loss),
            repr(self.perplexity),
            self.skipped,
        ]


@torch.no_grad()
def sample_losses(model, batch) -> tuple[Tensor, Tensor]:
    """``(sum of token losses [B], supervised tokens [B])`` of each sample of a padded ``batch`` under a family
    module (the fp32 cross-entropy of :func:`~lit_mllm.lit.base.token_losses` at the positions
    :meth:`~lit_mllm.lit.base.VLMModule.supervised_logits` picks)."""
    from lit_mllm.lit.base import token_losses

    logits, target, which = model.supervised_logits(batch)  # [S, V], [S], [S]
    losses = token_losses(logits, target, batch.ids)  # [S]
    sums = torch.zeros(len(batch), device=losses.device, dtype=torch.float64)
    sums.index_add_(0, which, losses.double())
    return sums, torch.bincount(which, minlength=len(batch))


def batch_scores(model, batch, source: str, indices: list[int]) -> list[Score]:
    """One :class:`Score` per sample of ``batch`` (``indices``: their record indices in ``source``)."""
    sums, counts = sample_losses(model, batch)
    out = []
    for k, (total, n) in enumerate(zip(sums.tolist(), counts.tolist())):
        mean = total / n
        out.append(Score(source, indices[k], batch.ids[k], int(n), mean, math.exp(mean)))
    return out


# -- the sidecar -----------------------------------------------------------------------------------------------
def read_scores(path: Path) -> list[Score]:
    """The rows of a sidecar; a last line without its newline (a write cut short) is removed from the file first.
    A missing file has no rows."""
    path = Path(path)
    if not path.exists():
        return []
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        with open(path, "r+b") as f:
            f.truncate(data.rfind(b"\n") + 1)
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None:
            return []
        if tuple(header) != FIELDS:
            raise ValueError(
                f"{path} is not a score sidecar: its header is {header}, expected {list(FIELDS)}"
            )
        return [
            Score(s, int(i), id_, int(t), float(loss), float(ppl), skipped)
            for s, i, id_, t, loss, ppl, skipped in reader
        ]


class ScoreWriter:
    """Appends rows to a sidecar (writing its header when new), flushing after each :meth:`write`."""

    def __init__(self, path: Path) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        new = not path.exists() or path.stat().st_size == 0
        self.file = open(path, "a", newline="", encoding="utf-8")
        self.writer = csv.writer(self.file)
        if new:
            self.writer.writerow(FIELDS)
            self.file.flush()

    def write(self, rows: list[Score]) -> None:
        self.writer.writerows(row.row() for row in rows)
        self.file.flush()

    def close(self) -> None:
        self.file.close()

    def __enter__(self) -> ScoreWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# -- the keep rule ---------------------------------------------------------------------------------------------
def ranked(scores: list[Score], order: Order = "ascending") -> list[Score]:
    """The scored rows (``skipped`` empty) from first kept to last: by perplexity (``ascending``: lowest first),
    ties broken by ``id`` then record index, in both orders."""
    if order not in ("ascending", "descending"):
        raise ValueError(f"order must be 'ascending' or 'descending', got {order!r}")
    sign = 1.0 if order == "ascending" else -1.0
    return sorted((s for s in scores if s.scored), key=lambda s: (sign * s.perplexity, s.id, s.index))


def select(
    scores: list[Score], keep: float | None = None, threshold: float | None = None, order: Order = "ascending"
) -> list[Score]:
    """The rows a filter keeps (see the module docstring), first kept first: ``keep`` (a fraction in [0, 1])
    keeps ``floor(keep * n)`` of the ``n`` scored rows; ``threshold`` keeps those at or below it (``descending``:
    at or above). Exactly one of the two."""
    if (keep is None) == (threshold is None):
        raise ValueError("give exactly one of keep (a fraction) and threshold (a perplexity)")
    order_ = ranked(scores, order)
    if keep is not None:
        if not 0.0 <= keep <= 1.0:
            raise ValueError(f"keep is a fraction in [0, 1], got {keep}")
        return order_[: math.floor(keep * len(order_))]
    if order == "ascending":
        return [s for s in order_ if s.perplexity <= threshold]
    return [s for s in order_ if s.perplexity >= threshold]


KEEP_RULE = (
    "of a source's scored records (those that could be processed), --keep f keeps floor(f * n) of lowest "
    "perplexity (order descending: highest), ties broken by id then record index; --threshold x keeps perplexity "
    "<= x (descending: >= x); records that could not be processed are never kept"
)
"""The keep rule, as the report states it."""
