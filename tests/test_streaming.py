"""Streaming shards (lit_mllm.data.shards, `lit-mllm data optimize`): every record reads back as its source gave
it, from a folder, a file:// path and a local folder standing in for object storage (``local:``, through a cache
folder); the mixture plan's determinism, disjoint ranks over loader workers and mid-epoch resume hold on shards;
a ShapesWorld config optimised by the command trains a fast_dev_run on the same samples and losses as its files;
bad records are counted and kept (or dropped, or stop the writing); a partial output is never taken."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

pytest.importorskip("litdata", reason="streaming shards need litdata: pip install -e '.[stream]'")

from lit_mllm.cli import run  # noqa: E402
from lit_mllm.commands.lightning import build_cli  # noqa: E402
from lit_mllm.data import (  # noqa: E402
    Captions,
    Conversations,
    DataError,
    Grounding,
    Interleaved,
    MixtureData,
    QwenVLTasks,
    ShapesWorld,
    StreamingShards,
    TextOnly,
)
from lit_mllm.data.datamodule import MixtureStream, _as_is  # noqa: E402
from lit_mllm.data.shards import MANIFEST, optimize_splits, write_shards  # noqa: E402
from tests.conftest import Record, cli_args, tiny_fit, tiny_model  # noqa: E402

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
QUICKSTART = str(CONFIGS / "quickstart.yaml")
MIXTURE = str(CONFIGS / "data" / "shapesworld_mixture.yaml")
KINDS = ("instruct", "captions", "interleaved", "text", "grounding")


def file_sources() -> dict:
    """The five ShapesWorld source kinds, as configs/data/shapesworld_mixture.yaml reads them."""
    return {
        "instruct": Conversations("train.json", weight=40),
        "captions": Captions("captions_train", weight=20),
        "interleaved": Interleaved("interleaved_train.jsonl", weight=20, style="mmicl"),
        "text": TextOnly("text_train.jsonl", weight=10),
        "grounding": Grounding(
            "grounding_train.jsonl", QwenVLTasks(), weight=10, tasks=["refer", "identify"]
        ),
    }


def shard_sources(prefix: str = "train", cache_dir=None) -> dict:
    """The same names and weights, read from ``{prefix}/<name>`` (``prefix`` may be a ``local:`` URL)."""
    return {
        name: StreamingShards(f"{prefix}/{name}", weight=s.weight, cache_dir=cache_dir and str(cache_dir))
        for name, s in file_sources().items()
    }


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("stream") / "sw"
    ShapesWorld(image_size=32, num_train=24, num_val=8, num_test=8, min_object_px=4, shard_size=8).write(root)
    return root


@pytest.fixture(scope="module")
def shards(world):
    """The five training sources and the validation instructions, optimised into small chunks (several per
    source, so random access crosses chunks)."""
    sources = {name: s.open(world) for name, s in file_sources().items()}
    val = {"instruct": Conversations("val.json").open(world)}
    out = world.parent / "shards"
    optimize_splits({"train": sources, "val": val}, out, "<image>", chunk_bytes="4KB", progress=False)
    return out


def image_bytes(sample) -> list[bytes]:
    return [im if isinstance(im, bytes) else Path(im).read_bytes() for im in sample.images]


def same_sample(a, b) -> bool:
    fields = ("id", "turns", "text", "references", "meta")
    return [getattr(a, f) for f in fields] == [getattr(b, f) for f in fields] and image_bytes(a) == b.images


@pytest.mark.parametrize("form", ["folder", "file_url", "object_storage"])
def test_every_record_reads_back_as_its_source_gave_it(world, shards, tmp_path, form):
    prefix = {
        "folder": "train",
        "file_url": f"file://{shards}/train",
        "object_storage": f"local:{shards}/train",
    }[form]
    cache = tmp_path / "cache" if form == "object_storage" else None
    for name, source in file_sources().items():
        source.open(world)
        streamed = shard_sources(prefix, cache)[name].open(shards)
        assert len(streamed) == len(source) > 0
        order = list(range(len(source)))[::-1]  # backwards: every read jumps back across chunks
        for i in order:
            assert same_sample(source.sample(i, "<image>"), streamed.sample(i, "<image>")), (name, i)
    if form == "object_storage":  # read through the cache folder, as from a bucket
        assert any(p.name == "index.json" for p in cache.rglob("*"))
    manifest = json.loads((shards / "train" / "captions" / MANIFEST).read_text())
    assert manifest["records"] == len(file_sources()["captions"].open(world)) and manifest["bad"] == {}


def test_a_model_with_another_image_placeholder_is_refused(shards):
    streamed = StreamingShards("train/instruct").open(shards)
    with pytest.raises(ValueError, match="placeholder '<image>', this model uses '<img>'"):
        streamed.sample(0, "<img>")


def test_plan_on_shards_is_the_files_plan_across_ranks_workers_and_epochs(world, shards, tmp_path):
    """Each rank of two reads its batches through two loader workers from a local folder standing in for object
    storage: every batch holds the samples the plan names in the original files, and the ranks are disjoint."""
    model = tiny_model()
    processor = model.processor()
    kwargs = {"batch_size": 4, "samples_per_epoch": 40, "seed": 3}
    files = MixtureData(str(world), train=file_sources(), **kwargs)
    streamed = MixtureData(
        str(shards), train=shard_sources(f"local:{shards}/train", tmp_path / "c"), **kwargs
    )
    for dm in (files, streamed):
        dm.connect(processor)
    plan, sources = files.mixture(), files.sources("fit")
    assert plan.passes(0) == streamed.mixture().passes(0) and max(plan.passes(0).values()) < 1  # none repeats
    collate = {"pad_token_id": processor.tokenizer.pad_token_id, "pack_length": None}
    for epoch in (0, 1):
        per_rank = []
        for rank in (0, 1):
            stream = MixtureStream(streamed._loader_for("fit"), streamed.mixture(), rank, 2, collate)
            stream.set_pass(epoch)
            loader = DataLoader(stream, batch_size=None, collate_fn=_as_is, num_workers=2)
            got = [(report.position, batch.ids) for batch, report in loader]
            expected = [
                [sources[n].sample(i, "<image>").id for n, i in b] for b in plan.batches(epoch, rank, 2)
            ]
            assert [ids for _, ids in got] == expected
            assert [pos for pos, _ in got] == [(epoch, k) for k in range(len(expected))]
            per_rank.append({draw for b in plan.batches(epoch, rank, 2) for draw in b})
        assert not per_rank[0] & per_rank[1]


def fit(root, sources, tmp_path, max_steps, ckpt_path=None, num_workers=0, save_every=None):
    model, record = tiny_model(), Record()
    dm = MixtureData(str(root), train=sources, batch_size=4, num_workers=num_workers, seed=7)
    dm.connect(model.processor())
    tiny_fit(model, dm, max_steps, tmp_path, ckpt_path, save_every, callbacks=[record])
    return record


def test_mid_epoch_resume_from_object_storage_sees_the_files_samples_and_losses(world, shards, tmp_path):
    def streamed():
        return {"instruct": StreamingShards(f"local:{shards}/train/instruct", cache_dir=str(tmp_path / "c"))}

    full = fit(shards, streamed(), tmp_path / "full", max_steps=6)  # the epoch's 6 batches
    source = Conversations("train.json").open(world)
    plan = MixtureData(str(world), {"instruct": source}, batch_size=4, seed=7).mixture().batches(0)
    assert full.ids == [[source.sample(i, "<image>").id for _, i in b] for b in plan]
    fit(shards, streamed(), tmp_path / "a", max_steps=2, save_every=2)
    ckpt = next((tmp_path / "a").glob("*step=2*.ckpt"))
    state = torch.load(ckpt, weights_only=False)["MixtureData"]
    assert (state["epoch"], state["next_batch"]) == (0, 2)
    resumed = fit(shards, streamed(), tmp_path / "b", max_steps=6, ckpt_path=str(ckpt), num_workers=2)
    assert resumed.ids == full.ids[2:]
    assert resumed.losses == pytest.approx(full.losses[2:], rel=1e-5, abs=1e-6)
    assert resumed.stats == full.stats[2:]


def small(root) -> list[str]:
    return [
        "--config", QUICKSTART, "--data", MIXTURE, *cli_args(root, batch_size=8),
        "--model.init_args.vision_tower.init_args.image_size", "32",
    ]  # fmt: skip


def test_optimized_shapesworld_config_trains_a_fast_dev_run_on_the_same_samples(world, tmp_path, capsys):
    out = tmp_path / "shards"
    reports = run(["data", "optimize", *small(world), "--out", str(out), "--chunk_bytes", "8KB"])
    printed = capsys.readouterr().out
    assert {r.name for r in reports} == {*(f"train/{k}" for k in KINDS), "val/instruct", "test/instruct"}
    assert (
        f"--config {out / 'data.yaml'}" in printed and "train/captions: 24 of 24 records written" in printed
    )

    cli = build_cli(
        [*small(world), "--config", str(out / "data.yaml"), "--trainer.fast_dev_run", "3"], run=False
    )
    record = Record()
    cli.trainer.callbacks.append(record)
    cli.trainer.fit(cli.model, cli.datamodule)
    dm = cli.datamodule
    assert {type(s).__name__ for s in dm.splits["fit"].values()} == {"StreamingShards"}
    assert {n: s.weight for n, s in dm.splits["fit"].items()} == {
        n: s.weight for n, s in file_sources().items()
    }
    # the samples the files give at the places of the plan (same sizes, weights and seed: the same plan)
    files = {name: s.open(world) for name, s in file_sources().items()}
    expected = [[files[n].sample(i, "<image>").id for n, i in b] for b in dm.mixture().batches(0)[:3]]
    assert record.ids == expected and len({i for b in expected for i in b}) == 24
    assert all(torch.isfinite(torch.tensor(record.losses)))


@pytest.fixture
def flawed(tmp_path, world):
    """A conversations file with a good record, a missing image, a record that is not JSON, and an unanswered
    question; a caption manifest with an empty caption."""
    root = tmp_path / "flawed"
    root.mkdir()
    good = json.loads((world / "train.json").read_text())[0]
    good["image"] = str(world / good["image"])
    missing = {**good, "id": "gone", "image": "nowhere.png"}
    unanswered = {**good, "id": "unanswered", "conversations": good["conversations"][:1]}
    lines = [json.dumps(good), json.dumps(missing), "{not json", json.dumps(unanswered)]
    (root / "chat.jsonl").write_text("\n".join(lines) + "\n")
    rows = [{"image": good["image"], "caption": "a caption"}, {"image": good["image"], "caption": " "}]
    (root / "captions.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return root


def flawed_sources() -> dict:
    return {"chat": Conversations("chat.jsonl"), "captions": Captions("captions.jsonl")}


def test_bad_records_are_counted_and_kept_as_the_run_would_meet_them(flawed, tmp_path):
    out = tmp_path / "shards"
    opened = {n: s.open(flawed) for n, s in flawed_sources().items()}
    reports = optimize_splits({"train": opened}, out, "<image>", progress=False)
    chat, captions = reports
    assert (chat.records, chat.written, dict(chat.bad)) == (
        4,
        4,
        {"missing_file": 1, "malformed_record": 1, "no_supervision": 1},
    )
    assert dict(captions.bad) == {"missing_caption": 1}
    assert "nowhere.png" in chat.examples["missing_file"] and "kept as bad records" in chat.lines()[0]
    assert json.loads((out / "train" / "chat" / MANIFEST).read_text())["bad"] == dict(chat.bad)

    # the run meets each bad record where the files had it, with the same reason and message
    model = tiny_model()
    files = MixtureData(str(flawed), train=flawed_sources(), on_bad_sample="skip")
    streamed = MixtureData(
        str(out), train={n: StreamingShards(f"train/{n}") for n in opened}, on_bad_sample="skip"
    )
    for dm in (files, streamed):
        dm.connect(model.processor())
    a, b = files._loader_for("fit"), streamed._loader_for("fit")
    for name, source in opened.items():
        for i in range(len(source)):
            x, y = a.item(name, i), b.item(name, i)
            if "skipped" in x:
                assert (y["skipped"], y["message"]) == (x["skipped"], x["message"])
            else:
                assert x["id"] == y["id"] and torch.equal(x["input_ids"], y["input_ids"])
                assert torch.equal(x["labels"], y["labels"]) and torch.equal(
                    x["pixel_values"], y["pixel_values"]
                )
    skipped = [a.item("chat", i).get("skipped") for i in range(4)]
    assert skipped == [None, "missing_file", "malformed_record", "no_supervision"]


def test_bad_records_dropped_or_stopping_the_writing(flawed, tmp_path):
    chat = Conversations("chat.jsonl").open(flawed)
    dropped = write_shards(
        chat, tmp_path / "dropped", "<image>", "chat", on_bad_record="drop", progress=False
    )
    assert (dropped.records, dropped.written, sum(dropped.bad.values())) == (4, 1, 3)
    assert len(StreamingShards(str(tmp_path / "dropped")).open(Path("."))) == 1
    with pytest.raises(DataError, match=r"(?s)\[chat\] .*nowhere.png.*on_bad_record is 'fail'"):
        write_shards(chat, tmp_path / "failed", "<image>", "chat", on_bad_record="fail", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dropped", "flawed"]  # nothing partial left


class Breaks(Conversations):
    """A source whose fourth record hits a bug (not a bad record: the writing must stop)."""

    def sample(self, i, image_token):
        if i == 3:
            raise RuntimeError("bug")
        return super().sample(i, image_token)


def test_a_failed_write_leaves_no_output_and_keeps_the_old_one(world, tmp_path):
    out = tmp_path / "out"
    good = {"train": {"instruct": Conversations("train.json").open(world)}}
    optimize_splits(good, out, "<image>", progress=False)
    before = sorted(p.relative_to(out) for p in out.rglob("*"))
    with pytest.raises(FileExistsError, match="exists"):
        optimize_splits(good, out, "<image>", progress=False)
    broken = {"train": {"instruct": Breaks("train.json").open(world)}}
    with pytest.raises(RuntimeError, match="bug"):
        optimize_splits(broken, out, "<image>", overwrite=True, progress=False)
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == before
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    with pytest.raises(RuntimeError, match="bug"):
        optimize_splits(broken, tmp_path / "new", "<image>", progress=False)
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_a_partial_or_mismatched_folder_is_refused(world, shards, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(shards / "train" / "instruct", copy)
    manifest = json.loads((copy / MANIFEST).read_text())
    (copy / MANIFEST).write_text(json.dumps({**manifest, "records": manifest["records"] + 1}))
    with pytest.raises(DataError, match="index holds 24 records but lit_mllm.json says 25: a partial copy"):
        StreamingShards("copy").open(tmp_path)
    (copy / MANIFEST).unlink()
    with pytest.raises(DataError, match="no lit_mllm.json, so not a finished"):
        StreamingShards("copy").open(tmp_path)
    with pytest.raises(DataError, match="no such shard folder") as missing:
        StreamingShards("absent").open(tmp_path)
    assert missing.value.reason == "missing_file"
    with pytest.raises(DataError, match="no lit_mllm.json could be read"):
        StreamingShards(f"local:{tmp_path}/absent", cache_dir=str(tmp_path / "c")).open(tmp_path)


def test_optimize_command_explains_itself_and_refuses_clearly(world, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        run(["data", "--help"])
    assert (
        exit_.value.code == 0 and "lit-mllm data optimize --config FILE --out DIR" in capsys.readouterr().out
    )
    with pytest.raises(SystemExit) as exit_:
        run(["data", "optimize", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert exit_.value.code == 0 and "--on_bad_record {keep,drop,fail}" in out and "--remote" in out
    with pytest.raises(SystemExit) as exit_:
        run(["data", "optimize", "--out", str(tmp_path / "x")])
    assert exit_.value.code == 2 and "give the run's config: --config FILE" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:
        run(["data", "optimize", "--config", QUICKSTART, "--out", str(world)])
    assert exit_.value.code == 2 and "exists; give a new folder, or --overwrite" in capsys.readouterr().err
