"""The frozen-tower feature cache (lit_mllm/data/feature_cache.py): a cached run trains exactly as an uncached one,
every change of the key misses, a corrupt or incomplete cache is refused and rebuilt, concurrent writers do not
corrupt it, and a tower that trains refuses it."""

from __future__ import annotations

import logging
import multiprocessing
import os
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

from lit_mllm.data import FeatureCache, Letterbox, MM1SubImages, ShapesWorld, collate, read_llava
from lit_mllm.data.feature_cache import CacheKeyMismatch, image_key, read_header
from lit_mllm.nn.vision import TinyCLIPVision
from lit_mllm.training import Stage
from lit_mllm.training.stages import Milestone, StageSchedule
from tests.conftest import Record, shapes_data, tiny_fit, tiny_model

ALIGN = Stage(name="align", trainable=["connector"])


def cached_model(root, dtype="float32", stage=ALIGN, **module):
    return tiny_model(stage, module={"feature_cache": FeatureCache(str(root), dtype=dtype), **module})


def fit_losses(model, shapes_root, epochs=2) -> list[float]:
    record = Record()
    data = shapes_data(shapes_root, batch_size=4, seed=0)
    data.connect(model.processor())
    tiny_fit(model, data, max_steps=-1, max_epochs=epochs, callbacks=[record])
    return record.losses


def keyed_batch(model, shapes_root, n=4):
    proc = model.processor()
    items = [proc(s) for s in read_llava(shapes_root / "train.json")[:n]]
    return collate(items, pad_token_id=proc.tokenizer.pad_token_id)


def lookup(model, batch) -> tuple[int, int]:
    """(hits, misses) of one encode of ``batch``'s images through the model's cache."""
    cache = model.feature_cache
    cache.take_epoch()
    with torch.no_grad():
        model.encode_images(batch.pixel_values, batch.image_keys)
    counts = cache.take_epoch()
    return counts.hits, counts.misses


# -- the training run ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def small_root(tmp_path_factory):
    """Eight training samples: two steps per epoch."""
    root = tmp_path_factory.mktemp("sw_small") / "shapesworld"
    ShapesWorld(image_size=32, num_train=8, num_val=2, num_test=2, min_object_px=4).write(root)
    return root


def test_cached_run_trains_exactly_as_an_uncached_run(small_root, tmp_path, caplog):
    """float32 storage: the same losses step for step as without the cache, cold (epoch 1 fills it, epoch 2 reads
    it) and warm (another run of the same arm reads everything); the log says whether the cache served."""
    reference = fit_losses(tiny_model(ALIGN), small_root)
    with caplog.at_level(logging.INFO):
        cold = cached_model(tmp_path)
        cold_losses = fit_losses(cold, small_root)
    assert "epoch 1: feature cache served 8 of 8 tower inputs from the cache (0 computed)" in caplog.text
    assert (
        "feature cache partly served the run: 8 of 16 tower inputs from the cache (8 computed)" in caplog.text
    )
    warm = cached_model(tmp_path)
    warm_losses = fit_losses(warm, small_root)
    assert (warm.feature_cache.run.hits, warm.feature_cache.run.misses) == (16, 0)
    assert len(reference) == 4
    assert cold_losses == reference
    assert warm_losses == cold_losses  # bit for bit: the same stored features


def test_half_precision_storage_serves_the_same_features_cold_and_warm(shapes_root, tmp_path):
    """bfloat16 storage: misses are rounded as hits are, so a cold and a warm run see identical features, the
    uncached ones rounded to bfloat16."""
    uncached = tiny_model(ALIGN)
    cold = cached_model(tmp_path, "bfloat16")
    batch = keyed_batch(cold, shapes_root)
    with torch.no_grad():
        reference = uncached._tower_features(batch.pixel_values, False)
        cold_features = cold.feature_cache.features(
            cold.feature_identity(torch.device("cpu")),
            batch.pixel_values,
            batch.image_keys,
            lambda pixels: uncached._tower_features(pixels, False),
        )
        cold.feature_cache.flush()
        warm = cached_model(tmp_path, "bfloat16")
        assert torch.equal(
            warm.encode_images(batch.pixel_values, batch.image_keys), cold.connector(cold_features)
        )
    assert warm.feature_cache.run.misses == 0
    assert cold_features.dtype == torch.float32
    assert torch.equal(cold_features, reference.bfloat16().float())
    assert not torch.equal(cold_features, reference)


def test_off_by_default_batches_carry_no_keys(shapes_root):
    model = tiny_model(ALIGN)
    assert model.feature_cache is None and not model.processor().image_keys
    assert keyed_batch(model, shapes_root).image_keys is None


# -- the key ---------------------------------------------------------------------------------------------------
def test_any_change_of_the_key_misses(shapes_root, tmp_path):
    base = cached_model(tmp_path)
    batch = keyed_batch(base, shapes_root)
    assert lookup(base, batch) == (0, 4)
    assert lookup(base, batch) == (4, 0)
    base.feature_cache.flush()
    assert lookup(cached_model(tmp_path), batch) == (4, 0)  # the same arm rebuilt reads it from disk

    weights = cached_model(tmp_path)
    with torch.no_grad():
        next(weights.vision_tower.parameters()).view(-1)[0] += 1e-3
    assert lookup(weights, batch) == (0, 4)

    def with_tower(**options):
        model = cached_model(tmp_path)
        torch.manual_seed(0)  # tiny_model's tower weights, other settings
        config = dict(image_size=32, patch_size=8, hidden_size=32, num_layers=2, num_heads=2)
        model.vision_tower = TinyCLIPVision(**{**config, **options}).requires_grad_(False).eval()
        return model

    assert lookup(with_tower(), batch) == (4, 0)  # the control: the same tower built again
    assert lookup(with_tower(keep_cls=True), batch) == (0, 4)  # same weights, other features kept
    assert lookup(with_tower(feature_layer=-1), batch) == (0, 4)  # another layer (here: more blocks)

    size = cached_model(tmp_path)
    size.vision_tower = with_tower(image_size=48).vision_tower
    assert lookup(size, keyed_batch(size, shapes_root)) == (0, 4)

    layout = cached_model(tmp_path, image_layout=Letterbox())
    assert lookup(layout, keyed_batch(layout, shapes_root)) == (0, 4)

    norm = cached_model(tmp_path)
    norm.vision_tower.mean = (0.5, 0.5, 0.5)
    assert lookup(norm, batch) == (0, 4)

    assert lookup(cached_model(tmp_path, dtype="bfloat16"), batch) == (0, 4)  # storage dtype

    mixed = cached_model(tmp_path)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert lookup(mixed, batch) == (0, 4)
    assert lookup(mixed, batch) == (4, 0)  # its own key again outside autocast


def test_images_are_keyed_by_content_and_crop(shapes_root, tmp_path):
    sample = read_llava(shapes_root / "train.json")[0]
    path = sample.images[0]
    data = Path(path).read_bytes()
    assert image_key(path) == image_key(data) != image_key(data + b"\0")
    proc = cached_model(tmp_path, image_layout=MM1SubImages(grid=2)).processor()
    item = proc(sample)
    assert item["image_keys"] == [f"{image_key(data)}/{c}" for c in range(5)]
    sample.images = [data]  # a shard member's bytes: the same key as its file
    assert proc(sample)["image_keys"] == item["image_keys"]


# -- a broken cache --------------------------------------------------------------------------------------------
def filled(tmp_path, shapes_root):
    model = cached_model(tmp_path)
    batch = keyed_batch(model, shapes_root)
    with torch.no_grad():
        expected = model.encode_images(batch.pixel_values, batch.image_keys)
    model.feature_cache.flush()
    (store,) = model.feature_cache._stores.values()
    (shard,) = store.folder.glob("*.shard")
    return batch, expected, shard


@pytest.mark.parametrize("damage", ["truncate", "flip", "header", "other_key"])
def test_a_damaged_shard_is_refused_and_rebuilt(shapes_root, tmp_path, damage):
    batch, expected, shard = filled(tmp_path, shapes_root)
    raw = bytearray(shard.read_bytes())
    if damage == "truncate":  # what a writer without the atomic rename would leave
        raw = raw[: len(raw) - 100]
    elif damage == "flip":  # silent corruption of one entry's features: its CRC fails on read
        raw[-7] ^= 0xFF
    elif damage == "header":
        raw[20:40] = b"x" * 20
    else:
        raw = raw.replace(shard.parent.name.encode(), b"0" * len(shard.parent.name))
    shard.write_bytes(bytes(raw))

    model = cached_model(tmp_path)
    with pytest.warns(UserWarning, match="feature cache: refused"), torch.no_grad():
        got = model.encode_images(batch.pixel_values, batch.image_keys)
    assert torch.equal(got, expected)  # recomputed, never the damaged bytes
    counts = model.feature_cache.run
    assert counts.misses == 4 if damage != "flip" else counts.misses >= 1
    assert shard.with_suffix(".refused").exists() and not shard.exists()
    lookup(
        model, batch
    )  # entries the refused shard served before its fault are computed again when next asked
    model.feature_cache.flush()  # rebuilt: a new shard that a fresh run reads whole
    assert lookup(cached_model(tmp_path), batch) == (4, 0)


def test_leftovers_of_a_crashed_writer_are_ignored(shapes_root, tmp_path):
    batch, expected, shard = filled(tmp_path, shapes_root)
    (shard.parent / ".tmp-crashed").write_bytes(shard.read_bytes()[:200])
    model = cached_model(tmp_path)
    assert lookup(model, batch) == (4, 0)
    assert model.feature_cache.describe().count("refused") == 0


def test_a_folder_holding_another_key_is_refused(shapes_root, tmp_path):
    _, _, shard = filled(tmp_path, shapes_root)
    key = shard.parent / "key.json"
    key.write_text(key.read_text().replace('"float32"', '"float16"', 1))
    model = cached_model(tmp_path)
    batch = keyed_batch(model, shapes_root)
    with pytest.raises(CacheKeyMismatch, match="another key"), torch.no_grad():
        model.encode_images(batch.pixel_values, batch.image_keys)


# -- concurrent writers ----------------------------------------------------------------------------------------
IDENTITY = {"test": "concurrent writers"}


def features_of(index: torch.Tensor) -> torch.Tensor:
    """Deterministic features ``[I, 6, 8]`` of entries numbered ``index [I]``."""
    return index.float().view(-1, 1, 1) + torch.arange(48.0).view(1, 6, 8) / 64


def write_entries(root: str, first: int, barrier) -> None:
    cache = FeatureCache(root, dtype="float16")
    barrier.wait()
    for start in range(first, first + 60, 3):  # many small shards, each flushed at once
        index = torch.arange(start, start + 3)
        cache.features(IDENTITY, index, [f"e{i}" for i in index.tolist()], features_of)
        cache.flush()
    os._exit(0)  # skip the forked interpreter's teardown


def read_while_writing(root: str, barrier, refused) -> None:
    cache = FeatureCache(root, dtype="float16")
    barrier.wait()
    for _ in range(200):
        cache.store(IDENTITY).refresh()
    refused.value = len(cache.store(IDENTITY).refused)
    os._exit(0)


def test_concurrent_writers_do_not_corrupt_the_cache(tmp_path):
    """Two processes write overlapping entries (30 in common) at the same time while a third reads the folder: no
    shard is ever refused, and every entry reads back whole and right."""
    context = multiprocessing.get_context("fork")
    barrier, refused = context.Barrier(3), context.Value("i", -1)
    procs = [context.Process(target=write_entries, args=(str(tmp_path), first, barrier)) for first in (0, 30)]
    procs.append(context.Process(target=read_while_writing, args=(str(tmp_path), barrier, refused)))
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    assert refused.value == 0
    cache = FeatureCache(str(tmp_path), dtype="float16")
    index = torch.arange(90)
    computed = []
    got = cache.features(IDENTITY, index, [f"e{i}" for i in range(90)], lambda x: computed.append(x) or x)
    assert not computed and cache.run.hits == 90
    assert torch.equal(got, features_of(index).half().float())
    store = cache.store(IDENTITY)
    assert not store.refused and not list(store.folder.glob(".tmp-*"))
    shards = list(store.folder.glob("*.shard"))
    assert 20 <= len(shards) <= 40  # a writer skips entries it found in the other's shards
    for shard in shards:  # every shard whole, read apart from the cache's own checks
        header, offset = read_header(shard)
        rows = np.fromfile(shard, dtype=np.float16, offset=offset).reshape(header["count"], 6, 8)
        assert [zlib.crc32(r.view(np.uint8)) for r in rows] == header["crc32"]
        index = torch.tensor([int(e[1:]) for e in header["entries"]])
        assert torch.equal(torch.from_numpy(rows), features_of(index).half())


# -- a tower that trains ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "stage",
    [
        Stage(name="all", trainable=["vision_tower", "connector"]),
        Stage(name="last", trainable=["connector"], train_last_blocks={"vision_tower": 1}),
        StageSchedule([Milestone(0, ALIGN), Milestone(5, Stage(name="all", trainable=["vision_tower"]))]),
    ],
    ids=["tower", "last_block", "later_stage"],
)
def test_a_tower_that_trains_refuses_the_cache(tmp_path, stage):
    with pytest.raises(ValueError, match="trains the vision tower"):
        cached_model(tmp_path, stage=stage)


def test_a_tower_unfrozen_behind_the_stage_stops_the_run(shapes_root, tmp_path):
    model = cached_model(tmp_path)
    batch = keyed_batch(model, shapes_root)
    model.vision_tower.requires_grad_(True)
    with pytest.raises(RuntimeError, match="unfroze the tower"):
        model.encode_images(batch.pixel_values, batch.image_keys)


# -- the benchmark ---------------------------------------------------------------------------------------------
def test_benchmark_smallest(capsys):
    """benchmarks/feature_cache.py end to end at tiny sizes: the cached run fills the cache in epoch 1 and reads
    all of it in epoch 2, the next arm reads all of it in its first epoch, and the cached run trains as the uncached
    one does (within bfloat16's rounding of the features). Times are not asserted."""
    from tests.test_benchmarks_smoke import headline, load

    bench = load("feature_cache")
    argv = ["--device", "cpu", "--samples", "8", "--batch", "4", "--epochs", "2", "--image-size", "32"]
    argv += ["--vision-dim", "32", "--vision-layers", "2", "--vision-heads", "2", "--llm-dim", "64"]
    argv += ["--out-tokens", "4", "--threads", str(torch.get_num_threads())]
    args = bench.parse(argv)
    result = bench.run(args)
    returned = bench.report(result, args)
    assert headline(capsys.readouterr().out, "feature_cache_speedup") == pytest.approx(returned, abs=0.005)
    plain, cached, second = result["fits"]
    assert cached.served == [(0, 8), (8, 0)] and second.served == [(8, 0)]
    assert plain.served == [] and len(plain.epoch_seconds) == len(cached.epoch_seconds) == 2
    assert cached.last_epoch_loss == pytest.approx(plain.last_epoch_loss, rel=1e-2)
    assert (
        0 < result["cache_bytes"] - 8 * 16 * 32 * 2 < 4096
    )  # 8 entries [16, 32] in bf16, and a shard header
