"""Collate in two blocks: the token tensors of a batch are views of one block and the images another, in shared
memory inside a loader worker; the values are the items' (checked against a reference built with plain lists), a
worker's batch arrives equal to the one built in-process, and the single-crop fast path of the layouts never
hands back the caller's own tensor."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader, IterableDataset

from lit_mllm.data import collate
from lit_mllm.data.layouts import Resize
from lit_mllm.nn.language.chat import IGNORE_INDEX

PAD = 7


def item(k: int, n: int, images: int) -> dict:
    ids = [100 + k * 10 + t for t in range(n)]
    return {
        "id": f"s{k}",
        "source": "src",
        "input_ids": torch.tensor(ids),
        "labels": torch.tensor([IGNORE_INDEX if t % 3 == 0 else i for t, i in enumerate(ids)]),
        "pixel_values": torch.full((images, 3, 4, 4), k, dtype=torch.uint8) if images else None,
        "num_images": images,
    }


ITEMS = [item(0, 5, 1), item(1, 3, 0), item(2, 6, 2), item(3, 2, 1)]


def reference(items: list[dict], side: str) -> dict[str, list[list[int]]]:
    """The padded batch written out with lists: what collate must give."""
    width = max(len(it["input_ids"]) for it in items)
    out = {"input_ids": [], "labels": [], "sample_index": [], "attention_mask": []}
    for i, it in enumerate(items):
        n, pad = len(it["input_ids"]), width - len(it["input_ids"])
        labels = [IGNORE_INDEX] + it["labels"].tolist()[1:]
        before, after = (pad, 0) if side == "left" else (0, pad)
        out["input_ids"].append([PAD] * before + it["input_ids"].tolist() + [PAD] * after)
        out["labels"].append([IGNORE_INDEX] * before + labels + [IGNORE_INDEX] * after)
        out["sample_index"].append([-1] * before + [i] * n + [-1] * after)
        out["attention_mask"].append([0] * before + [1] * n + [0] * after)
    return out


@pytest.mark.parametrize("shared", [False, True])
@pytest.mark.parametrize("side", ["right", "left"])
def test_collate_writes_the_items_values(side, shared):
    batch = collate(ITEMS, PAD, padding_side=side, shared=shared)
    for name, rows in reference(ITEMS, side).items():
        assert getattr(batch, name).dtype == torch.long
        assert getattr(batch, name).tolist() == rows, name
    assert batch.position_ids is None
    assert batch.images_per_row == [1, 0, 2, 1]
    expected = torch.cat([it["pixel_values"] for it in ITEMS if it["pixel_values"] is not None])
    assert torch.equal(batch.pixel_values, expected) and batch.pixel_values.dtype == torch.uint8


@pytest.mark.parametrize("shared", [False, True])
def test_packed_collate_is_the_same_shared_or_not(shared):
    private = collate(ITEMS, PAD, pack_length=9, shared=False)
    batch = collate(ITEMS, PAD, pack_length=9, shared=shared)
    assert batch.attention_mask is None
    for name in ("input_ids", "labels", "sample_index", "position_ids", "pixel_values"):
        assert torch.equal(getattr(batch, name), getattr(private, name)), name
    for r, row in enumerate(private.sample_index.tolist()):  # positions restart at 0 at every sample
        starts = [c for c in range(len(row)) if row[c] >= 0 and (c == 0 or row[c - 1] != row[c])]
        assert starts and all(private.position_ids[r, c] == 0 for c in starts)


def test_a_shared_batch_is_two_shared_blocks():
    batch = collate(ITEMS, PAD, shared=True)
    tokens = [batch.input_ids, batch.labels, batch.sample_index, batch.attention_mask]
    assert all(t.is_shared() for t in [*tokens, batch.pixel_values])
    assert len({t.untyped_storage().data_ptr() for t in tokens}) == 1  # one block, one hand-over
    private = collate(ITEMS, PAD, shared=False)
    assert not private.input_ids.is_shared() and not private.pixel_values.is_shared()


class _Batches(IterableDataset):
    def __iter__(self):
        yield collate(ITEMS, PAD)  # in a worker: shared by default
        yield collate(ITEMS, PAD, pack_length=9)


def test_a_workers_batch_arrives_equal_to_the_in_process_one():
    loader = DataLoader(_Batches(), batch_size=None, collate_fn=lambda b: b, num_workers=1)
    received = list(loader)
    for got, expected in zip(
        received, [collate(ITEMS, PAD), collate(ITEMS, PAD, pack_length=9)], strict=True
    ):
        assert not expected.input_ids.is_shared()  # in this process: private memory
        for name in ("input_ids", "labels", "sample_index", "attention_mask", "position_ids", "pixel_values"):
            a, b = getattr(got, name), getattr(expected, name)
            assert (a is None and b is None) or torch.equal(a, b), name
        assert got.ids == expected.ids and got.images_per_row == expected.images_per_row


def test_one_crop_is_returned_without_a_copy_but_never_as_the_callers_tensor():
    layout = Resize()
    image = torch.randint(0, 256, (3, 20, 30), dtype=torch.uint8)
    pixels = layout.pixels(image, 8)
    expected = torch.nn.functional.interpolate(image[None], size=(8, 8), mode="bicubic", antialias=True)
    assert pixels.is_contiguous() and torch.equal(pixels, expected)
    already = torch.randint(0, 256, (3, 8, 8), dtype=torch.uint8)  # the right size: resize returns it as is
    kept = layout.pixels(already, 8)
    assert torch.equal(kept[0], already)
    already.zero_()  # the caller changing its tensor afterwards does not change the crop
    assert kept.any()
