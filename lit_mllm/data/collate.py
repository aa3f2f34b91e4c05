"""Batches: padding, or packing several samples per sequence.

Packing puts whole samples (lengths counted after image expansion, so an image span is never split) into rows.
Positions restart at 0 for every sample, and the batch carries no attention mask, so the language model
builds a block-diagonal causal mask from the positions (variable-length attention with flash attention):
attention never crosses samples. The first token of every sample is unlabelled, so no sample learns to
predict from its neighbour.

Rows are balanced: for ``R`` rows the row length is the smallest one that best-fit decreasing can fill,
and ``R`` is chosen to minimise processed positions ``R * row length``; the packing efficiency (real tokens
over processed positions) is measured by ``benchmarks/packing_efficiency.py``.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import get_worker_info

from lit_mllm.data.batch import Batch
from lit_mllm.nn.language.chat import IGNORE_INDEX


def _best_fit(lengths: list[int], order: list[int], rows: int, capacity: int) -> list[list[int]] | None:
    """Best-fit decreasing of items into ``rows`` rows of ``capacity``; None when an item does not fit."""
    bins: list[list[int]] = [[] for _ in range(rows)]
    room = [capacity] * rows
    for i in order:
        fits = [r for r in range(rows) if room[r] >= lengths[i]]
        if not fits:
            return None
        r = min(fits, key=lambda r: room[r])
        bins[r].append(i)
        room[r] -= lengths[i]
    return [b for b in bins if b]


def pack(lengths: list[int], max_length: int, extra_rows: int = 2) -> list[list[int]]:
    """Group item indices into rows of at most ``max_length`` tokens, minimising ``rows * longest row`` over the
    fewest row counts best-fit can fill and ``extra_rows`` more.

    Items keep their relative order inside a row. Raises ``ValueError`` if an item is longer than ``max_length``.
    """
    if not lengths:
        return []
    if max(lengths) > max_length:
        raise ValueError(f"an item of {max(lengths)} tokens cannot be packed into rows of {max_length}")
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    total, longest = sum(lengths), max(lengths)
    best: tuple[int, list[list[int]]] | None = None
    first, feasible = math.ceil(total / max_length), None
    for rows in range(
        first, len(lengths) + 1
    ):  # best-fit may need more rows than the bound; len(lengths) fits
        lo, hi = max(longest, math.ceil(total / rows)), max_length
        if best is not None and rows * lo >= best[0] or feasible is not None and rows > feasible + extra_rows:
            break
        found = _best_fit(lengths, order, rows, hi)
        if found is None:
            continue
        feasible = rows if feasible is None else feasible
        while lo < hi:  # smallest capacity at which best-fit still succeeds
            mid = (lo + hi) // 2
            attempt = _best_fit(lengths, order, rows, mid)
            if attempt is None:
                lo = mid + 1
            else:
                hi, found = mid, attempt
        cost = len(found) * max(sum(lengths[i] for i in row) for row in found)
        if best is None or cost < best[0]:
            best = (cost, found)
    assert best is not None  # rows = len(lengths) always fits
    return [sorted(row) for row in best[1]]


def _empty(shape: tuple[int, ...], dtype: torch.dtype, shared: bool) -> Tensor:
    """An uninitialised tensor, allocated in shared memory when ``shared``.

    A loader worker's batch crosses to the main process through shared memory: a tensor built in private memory
    is copied into a new shared block when it is sent (as torch's ``default_collate`` avoids by collating into
    shared memory inside workers)."""
    numel = math.prod(shape)
    if not shared or numel == 0:
        return torch.empty(shape, dtype=dtype)
    storage = torch.UntypedStorage._new_shared(numel * dtype.itemsize)
    return torch.empty(0, dtype=dtype).set_(storage).view(shape)


def collate(
    items: list[dict],
    pad_token_id: int,
    padding_side: str = "right",
    pack_length: int | None = None,
    shared: bool | None = None,
) -> Batch:
    """Pad (or pack) processed samples into a :class:`~lit_mllm.data.batch.Batch`.

    Without packing a row is a sample (``R = B``); with ``pack_length`` rows hold whole samples (positions restart
    per sample, no attention mask). Generation items (``padding_side="left"``) also give ``prompts`` and
    ``references``; items that carry a processed prompt (``"generation"``) give the batch's ``generation`` batch.
    No item gives an empty batch (every sample of it was bad and skipped).

    ``shared`` (default: inside a loader worker) builds the batch in shared memory, as two blocks: the ``[R, L]``
    token tensors are views of one ``[4, R, L]`` block and the images one ``[I, 3, S, S]`` block, so the batch
    reaches the main process without another copy and as two shared blocks instead of one per tensor.
    """
    if pack_length is not None and padding_side != "right":
        raise ValueError("packing is for training batches (right padding)")
    shared = get_worker_info() is not None if shared is None else shared
    lengths = [len(it["input_ids"]) for it in items]
    rows = pack(lengths, pack_length) if pack_length else [[i] for i in range(len(items))]
    width = max((sum(lengths[i] for i in row) for row in rows), default=0)
    packed = pack_length is not None
    # input_ids, labels, sample_index and position_ids (packed) or attention_mask (padded): [4, R, L]
    block = _empty((4, len(rows), width), torch.long, shared)
    fill = block.numpy()  # numpy: cheaper than torch per small slice assignment
    fill[0], fill[1], fill[2], fill[3] = pad_token_id, IGNORE_INDEX, -1, 0
    input_ids, labels, sample_index, positions = fill
    pixels, keys = [], []
    for r, row in enumerate(rows):
        start = width - sum(lengths[i] for i in row) if padding_side == "left" else 0
        for i in row:
            end = start + lengths[i]
            input_ids[r, start:end] = np.asarray(items[i]["input_ids"])
            labels[r, start:end] = np.asarray(items[i]["labels"])
            labels[r, start] = IGNORE_INDEX  # a sample's first token is never predicted from its neighbour
            sample_index[r, start:end] = i
            if packed:
                positions[r, start:end] = np.arange(lengths[i])
            else:
                positions[r, start:end] = 1
            start = end
            if items[i]["pixel_values"] is not None:
                pixels.append(items[i]["pixel_values"])
                keys.append(items[i].get("image_keys"))
        if packed:  # padding continues the positions so it never joins a sample's attention block
            positions[r, start:] = np.arange(width - start) + positions[r, start - 1] + 1
    pixel_values = None
    if pixels:
        pixel_values = _empty((sum(len(p) for p in pixels), *pixels[0].shape[1:]), pixels[0].dtype, shared)
        torch.cat(pixels, out=pixel_values)
    generating = bool(items) and "references" in items[0]
    with_prompts = bool(items) and "generation" in items[0]
    return Batch(
        ids=[it["id"] for it in items],
        sources=[it.get("source", "") for it in items],
        meta=[it.get("meta", {}) for it in items],
        row_names=["+".join(items[i]["id"] for i in row) for row in rows],
        input_ids=block[0],
        labels=block[1],
        sample_index=block[2],
        attention_mask=None if packed else block[3],
        position_ids=block[3] if packed else None,
        pixel_values=pixel_values,
        images_per_row=[sum(items[i]["num_images"] for i in row) for row in rows],
        image_keys=[k for ks in keys for k in ks] if keys and None not in keys else None,
        prompts=[it["prompt"] for it in items] if generating else None,
        references=[it["references"] for it in items] if generating else None,
        generation=(
            collate([it["generation"] for it in items], pad_token_id, padding_side="left", shared=shared)
            if with_prompts
            else None
        ),
    )
