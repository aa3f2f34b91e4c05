"""The batch a family module receives: one typed object instead of a dict of loose keys.

A row is one sample (padded batches) or several whole samples (packed batches: ``position_ids`` restart at 0
per sample and there is no attention mask, so attention never crosses samples). Images of the whole batch are
one tensor in reading order; ``images_per_row`` says how many tower inputs (images, or tiles of them) each row
holds.

The loader's own bookkeeping (skipped samples, the plan position) travels beside the batch as a
:class:`LoaderReport` and is taken off by the DataModule before the batch reaches the model.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field, fields, replace

import torch
from torch import Tensor


@dataclass
class Batch:
    """A collated batch of processed samples (see the module docstring)."""

    ids: list[str]
    """Sample ids, in the order ``sample_index`` refers to."""
    sources: list[str]
    """Mixture source of each sample (``""`` when not drawn from a named source)."""
    row_names: list[str]
    """Name of each row (its samples' ids joined by ``+``), for error messages."""
    input_ids: Tensor
    """``[R, L]`` token ids; image placeholders expanded to the model's image tokens."""
    labels: Tensor
    """``[R, L]`` next-token targets, ``-100`` where nothing is learned (unshifted: position ``t`` labels token ``t``)."""
    sample_index: Tensor
    """``[R, L]`` which sample of ``ids`` each position belongs to (``-1`` on padding)."""
    attention_mask: Tensor | None
    """``[R, L]`` 1 on real tokens; None for packed rows (``position_ids`` say where samples start)."""
    position_ids: Tensor | None
    """``[R, L]`` positions restarting at 0 per sample (packed rows only)."""
    pixel_values: Tensor | None
    """``[I, 3, S, S]`` every tower input of the batch in reading order (uint8 from the loader); None: no image."""
    images_per_row: list[int]
    """Tower inputs in each row (``sum == I``)."""
    image_keys: list[str] | None = None
    """Content key of each tower input (``I`` of them, ``<image hash>/<crop>``) when the model uses a feature cache
    (:class:`~lit_mllm.data.feature_cache.FeatureCache`); None otherwise."""
    prompts: list[str] | None = None
    """Generation batches: the text of the turn being answered, per sample."""
    references: list[list[str]] | None = None
    """Generation batches: the accepted answers of each sample (VQA has ten; empty when there is none)."""
    meta: list[dict] = field(default_factory=list)
    """Each sample's :attr:`~lit_mllm.data.sample.Sample.meta` (in ``ids`` order; what metrics group by)."""
    generation: Batch | None = None
    """For evaluation with generation metrics: the same samples as a left-padded prompt-only batch."""

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def num_rows(self) -> int:
        return self.input_ids.shape[0]

    def select(self, rows: list[int]) -> Batch:
        """The batch of the samples ``rows`` (padded batches, where a row is a sample), in that order, with their
        images and their prompt-only batch; for metrics computed per task or per group."""
        if self.position_ids is not None:
            raise ValueError("select needs a padded batch (a row per sample); this one is packed")
        index = torch.tensor(rows, dtype=torch.long)
        counts = torch.tensor(self.images_per_row, dtype=torch.long)
        starts = torch.cumsum(counts, 0) - counts
        images = [i for r in rows for i in range(int(starts[r]), int(starts[r] + counts[r]))]
        sample_index = self.sample_index[index]
        pick = lambda values: None if values is None else [values[r] for r in rows]  # noqa: E731
        return Batch(
            ids=pick(self.ids),
            sources=pick(self.sources),
            row_names=pick(self.row_names),
            input_ids=self.input_ids[index],
            labels=self.labels[index],
            sample_index=torch.where(
                sample_index >= 0, torch.arange(len(rows), device=sample_index.device)[:, None], sample_index
            ),
            attention_mask=None if self.attention_mask is None else self.attention_mask[index],
            position_ids=None,
            pixel_values=None if self.pixel_values is None or not images else self.pixel_values[images],
            images_per_row=pick(self.images_per_row),
            prompts=pick(self.prompts),
            references=pick(self.references),
            meta=pick(self.meta) if self.meta else [],
            generation=None if self.generation is None else self.generation.select(rows),
        )

    def to(self, device, **kwargs) -> Batch:
        """The batch with every tensor moved to ``device`` (Lightning calls this on batch transfer)."""
        moved = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, Tensor | Batch):
                moved[f.name] = value.to(device, **kwargs)
        return replace(self, **moved)


@dataclass
class LoaderReport:
    """What a loader worker noticed while building one batch; the DataModule counts it and drops it."""

    seen: int
    """Samples drawn for the batch, bad ones included."""
    skipped: Counter = field(default_factory=Counter)
    """Samples dropped under ``on_bad_sample: skip``, per reason."""
    messages: list[str] = field(default_factory=list)
    """One message per skipped sample, naming it; grouped by reason, in the order of ``skipped``."""
    position: tuple[int, int] | None = None
    """``(epoch, batch index)`` of a training batch in the mixture plan."""
