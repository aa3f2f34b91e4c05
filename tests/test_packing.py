"""Packing: every token kept, image spans never split, positions restart per sample, attention never crosses
samples (packed logits equal each sample's own logits), and the loss equals the padded batch's."""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lit_mllm.data import collate, pack, read_llava
from lit_mllm.nn.language.chat import IGNORE_INDEX

IMG = 99


@settings(max_examples=60, deadline=None)
@given(lengths=st.lists(st.integers(1, 50), min_size=1, max_size=40), extra=st.integers(0, 30))
def test_pack_places_every_item_once_within_the_limit(lengths, extra):
    limit = max(lengths) + extra
    rows = pack(lengths, limit)
    assert sorted(i for row in rows for i in row) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in row) <= limit for row in rows)
    assert all(row == sorted(row) for row in rows)


def fake_item(k: int, n_text: int, n_images: int, tokens_per_image: int = 4) -> dict:
    ids = [1] + [IMG] * (n_images * tokens_per_image) + [10 + k] * n_text
    labels = [IGNORE_INDEX] * (1 + n_images * tokens_per_image) + [10 + k] * n_text
    return {
        "id": f"s{k}",
        "source": "src",
        "input_ids": torch.tensor(ids),
        "labels": torch.tensor(labels),
        "pixel_values": torch.full((n_images, 3, 2, 2), float(k)) if n_images else None,
        "num_images": n_images,
    }


@settings(max_examples=40, deadline=None)
@given(specs=st.lists(st.tuples(st.integers(1, 12), st.integers(0, 2)), min_size=1, max_size=12))
def test_packed_batch_keeps_every_token_and_image_span(specs):
    items = [fake_item(k, t, i) for k, (t, i) in enumerate(specs)]
    limit = max(len(it["input_ids"]) for it in items) + 5
    batch = collate(items, pad_token_id=0, pack_length=limit)
    assert batch.attention_mask is None and batch.input_ids.shape[1] <= limit
    pixels_in_order = []
    for k, it in enumerate(items):
        where = (batch.sample_index == k).nonzero()
        rows = where[:, 0].unique()
        assert len(rows) == 1  # a sample (and its image span) lives in one row
        cols = where[:, 1]
        assert (cols == torch.arange(cols[0], cols[0] + len(it["input_ids"]))).all()  # contiguous
        r = int(rows[0])
        assert torch.equal(batch.input_ids[r, cols], it["input_ids"])
        assert torch.equal(batch.position_ids[r, cols], torch.arange(len(cols)))
        assert batch.labels[r, cols[0]] == IGNORE_INDEX
        assert torch.equal(batch.labels[r, cols[1:]], it["labels"][1:])
    for r in range(batch.input_ids.shape[0]):  # tower inputs in reading order, row by row
        for k in batch.sample_index[r].unique_consecutive().tolist():
            if k >= 0 and items[k]["pixel_values"] is not None:
                pixels_in_order.append(items[k]["pixel_values"])
    if pixels_in_order:
        assert torch.equal(batch.pixel_values, torch.cat(pixels_in_order))
    assert sum(batch.images_per_row) == sum(i for _, i in specs)
    real = sum(len(it["input_ids"]) for it in items)
    assert int((batch.sample_index >= 0).sum()) == real


def test_packed_logits_equal_each_samples_own(model, shapes_root):
    """Block-diagonal attention from restarting positions: no sample sees another."""
    model.eval()
    proc = model.processor()
    samples = read_llava(shapes_root / "train.json")[:5]
    items = [proc(s) for s in samples]
    longest = max(len(it["input_ids"]) for it in items)
    packed = collate(items, proc.tokenizer.pad_token_id, pack_length=3 * longest)
    assert packed.input_ids.shape[0] < len(items)  # several samples share a row
    with torch.no_grad():
        logits = model(packed)
        for k, it in enumerate(items):
            alone = model(collate([it], proc.tokenizer.pad_token_id))[0]
            r, c = (packed.sample_index == k).nonzero(as_tuple=True)
            torch.testing.assert_close(logits[r, c], alone, rtol=1e-4, atol=1e-4)


def test_packed_training_loss_equals_padded(model, shapes_root):
    proc = model.processor()
    items = [proc(s) for s in read_llava(shapes_root / "train.json")[:6]]
    for it in items:  # collate unlabels a sample's first token; make the padded batch agree
        it["labels"][0] = IGNORE_INDEX
    padded = collate(items, proc.tokenizer.pad_token_id)
    packed = collate(items, proc.tokenizer.pad_token_id, pack_length=2048)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(
            model.training_step(packed, 0), model.training_step(padded, 0), rtol=1e-5, atol=1e-5
        )


def test_pack_takes_more_rows_when_best_fit_needs_them():
    """72 tokens fit 4 rows of 18 by volume, but no 6 rows of 18 hold 13 + six items of 9-10: pack keeps adding rows
    (it stopped at the bound + 2 and failed, a case hypothesis found)."""
    rows = pack([9, 13, 10, 10, 10, 10, 10], 18)
    assert sorted(i for row in rows for i in row) == list(range(7)) and len(rows) == 7
