"""Skipped data cannot go unnoticed: under ``on_bad_sample: skip`` the bad fraction is checked at every epoch end
whatever the count (a one-epoch fit over 27 samples, 12 of them bad, stops), skips are printed per reason at
each epoch end and at the end of the run, ``data/skipped/*`` reaches the logger at each epoch end whatever the
logging interval, and ``validate-data`` says a run would stop exactly where the run stops. ``validate-data``
reports a source it cannot open and scans the others; an empty data root says why nothing was generated."""

import json

import pytest
from lightning.pytorch.loggers import CSVLogger
from PIL import Image

from lit_mllm.data import Conversations, DataError, MixtureData
from lit_mllm.data.validate import scan, would_stop
from tests.conftest import tiny_fit, tiny_model

TOKEN = "<image>"


def conv(question: str, reply: bool = True) -> list[dict]:
    turns = [{"from": "human", "value": question}]
    return turns + ([{"from": "gpt", "value": "red"}] if reply else [])


def folder(root, good: int, missing: int = 0, twice: int = 0, unanswered: int = 0):
    """``good`` usable records and bad ones of three reasons (missing image, two placeholders for one image,
    no assistant reply), interleaved so that bad samples spread over the epoch."""
    root.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (16, 12), (255, 0, 0)).save(root / "ok.png")
    q = f"{TOKEN}\nColour?"
    records = [{"id": f"ok{i}", "image": "ok.png", "conversations": conv(q)} for i in range(good)]
    records += [{"id": f"missing{i}", "image": "gone.png", "conversations": conv(q)} for i in range(missing)]
    records += [
        {"id": f"twice{i}", "image": "ok.png", "conversations": conv(f"{TOKEN} {TOKEN}")}
        for i in range(twice)
    ]
    records += [
        {"id": f"unanswered{i}", "image": "ok.png", "conversations": conv(q, reply=False)}
        for i in range(unanswered)
    ]
    (root / "train.json").write_text(json.dumps(records))
    return root


def data(root, **kw) -> MixtureData:
    kw = {"batch_size": 3, "num_workers": 0, "on_bad_sample": "skip", "max_bad_fraction": 0.1, **kw}
    return MixtureData(str(root), train={"mine": Conversations("train.json")}, **kw)


def fit(dm, **trainer):
    model = tiny_model()
    dm.connect(model.processor())
    return tiny_fit(model, dm, max_steps=trainer.pop("max_steps", -1), **trainer)


def validate(dm) -> str | None:
    dm.connect(tiny_model().processor())
    return would_stop(dm, scan(dm, ("fit",)))


def test_a_small_bad_fraction_trains_and_prints_the_skips_per_reason(tmp_path, capsys):
    root = folder(tmp_path / "d", good=25, missing=1, unanswered=1)  # 2 of 27 bad: 7.4% < 10%
    assert validate(data(root)) is None
    capsys.readouterr()
    trainer = fit(data(root), max_epochs=1)
    assert trainer.global_step == 9  # the whole epoch trained
    out = capsys.readouterr().out
    block = out.split("Skipped 2 of 27 training samples (7.4%) by the end of epoch 0; ")[1].splitlines()
    assert block[0] == "data.max_bad_fraction=0.1:"
    rows = {line.split()[0]: line.split(None, 2)[1:] for line in block[1:3]}
    assert rows["missing_file"][0] == "1" and "id 'missing0'" in rows["missing_file"][1]
    assert rows["no_supervision"][0] == "1" and "id 'unanswered0'" in rows["no_supervision"][1]
    assert len(block) == 3 or not block[3].startswith("  ")  # one block: a headline, a row per reason
    assert out.count("Skipped 2 of 27") == 1  # the run ended with the epoch: said once


def test_a_run_ending_mid_epoch_prints_the_skips_at_its_end(tmp_path, capsys):
    root = folder(tmp_path / "d", good=25, unanswered=2)
    dm = data(root, seed=2)
    fit(dm, max_steps=4)  # 4 of 9 batches: no epoch end
    drawn = [i for batch in dm.mixture().batches(0)[:4] for _, i in batch]
    assert sum(i >= 25 for i in drawn) == 2  # the two unanswered records (the last two) come in these batches
    out = capsys.readouterr().out
    assert (
        "Skipped 2 of 12 training samples (16.7%) by the end of the run; data.max_bad_fraction=0.1 (over it):"
        in out
    )
    assert (
        "epoch 0" not in out
    )  # no epoch ended, and 12 samples are too few for the check before an epoch end
    assert dm.counts["seen"] == 12 and dm.skipped() == {"no_supervision": 2}


def test_a_large_bad_fraction_stops_at_the_epoch_end_with_the_counts_per_reason(tmp_path):
    root = folder(tmp_path / "d", good=15, missing=4, twice=4, unanswered=4)  # 12 of 27 bad, as in the issue
    predicted = validate(data(root))
    assert (
        predicted.startswith("12 of 27 training samples are bad (") and "at the end of epoch 0" in predicted
    )
    dm = data(root)
    with pytest.raises(DataError) as e:
        fit(dm, max_epochs=1)
    message = str(e.value)
    assert message.startswith("12 of 27 training samples were bad (")
    assert "over data.max_bad_fraction=0.1 (at the end of epoch 0)" in message
    rows = {line.split()[0]: line.split()[1] for line in message.splitlines()[1:4]}
    assert rows == {"missing_file": "4", "image_mismatch": "4", "no_supervision": "4"}
    assert dm.counts["seen"] == 27  # the last batch was counted, then the run stopped before training it


def test_the_early_check_and_validate_data_stop_at_the_same_sample(tmp_path):
    """Over 100 samples the fraction is checked after every batch; validate-data plays the same plan."""
    root = folder(tmp_path / "d", good=7, missing=1)  # 1 in 8 bad: 12.5% > 10%
    kw = {"samples_per_epoch": 240, "batch_size": 8, "seed": 5}
    predicted = validate(data(root, **kw))
    dm = data(root, **kw)
    with pytest.raises(DataError, match=r"after 10[0-9] samples") as e:
        fit(dm, max_epochs=1)
    seen = dm.counts["seen"]
    bad = dm.counts["skipped/missing_file"]
    assert 100 <= seen < 240 and str(e.value).startswith(f"{bad} of {seen} training samples were bad")
    assert (
        predicted.startswith(f"{bad} of {seen} training samples are bad")
        and f"after {seen} samples" in predicted
    )


def test_skipped_counts_reach_the_logger_at_the_epoch_end_whatever_the_interval(tmp_path):
    root = folder(tmp_path / "d", good=25, missing=1, unanswered=1)
    logger = CSVLogger(tmp_path / "logs")
    fit(data(root), max_epochs=1, logger=logger, log_every_n_steps=50)
    rows = (tmp_path / "logs" / "lightning_logs" / "version_0" / "metrics.csv").read_text().splitlines()
    header = rows[0].split(",")
    logged = [
        dict(zip(header, r.split(",")))
        for r in rows[1:]
        if r.split(",")[header.index("data/skipped/no_supervision")]
    ]
    assert [
        (int(r["step"]), float(r["data/skipped/missing_file"]), float(r["data/skipped/no_supervision"]))
        for r in logged
    ] == [(8, 1.0, 1.0)]  # the epoch's last step (9 batches), though 50 steps never pass


def test_validate_data_reports_a_source_it_cannot_open_and_scans_the_others(tmp_path, capsys):
    from lit_mllm.cli import run

    root = folder(tmp_path / "d", good=6, missing=1)
    config = tmp_path / "data.yaml"
    config.write_text(
        f"""
model:
  class_path: lit_mllm.lit.PrefixFusionVLM
  init_args:
    vision_tower: {{class_path: lit_mllm.nn.vision.TinyCLIPVision, init_args: {{image_size: 32, patch_size: 8, hidden_size: 32, num_layers: 2}}}}
    language_model: {{class_path: lit_mllm.nn.language.TinyLlama, init_args: {{hidden_size: 32, num_layers: 1}}}}
data:
  class_path: lit_mllm.data.MixtureData
  init_args:
    root: {root}
    train:
      mine: {{class_path: lit_mllm.data.Conversations, init_args: {{path: train.json}}}}
      lost: {{class_path: lit_mllm.data.Conversations, init_args: {{path: lost.json}}}}
    val:
      shards: {{class_path: lit_mllm.data.Captions, init_args: {{path: no_such_shards}}}}
    on_bad_sample: skip
    max_bad_fraction: 0.5
"""
    )
    with pytest.raises(SystemExit) as exit_:
        run(["validate-data", "--config", str(config)])
    assert exit_.value.code == 1
    out = capsys.readouterr().out
    table = {line.split()[1]: line.split() for line in out.splitlines()[1:4]}
    assert table["mine"][:5] == ["fit", "mine", "7", "6", "1"]  # scanned, its missing image counted
    assert table["lost"][0] == "fit" and "cannot be opened (missing_file)" in " ".join(table["lost"])
    assert table["shards"][0] == "validate" and "cannot be opened (missing_file)" in " ".join(table["shards"])
    assert (
        "fit/lost: data.train.lost (Conversations) cannot be opened: " in out
        and "lost.json: no such file" in out
    )
    assert (
        "validate/shards: data.val.shards (Captions) cannot be opened: " in out
        and "no such shard folder" in out
    )
    assert "A run would stop: 2 source(s) cannot be opened (data.train.lost, data.val.shards)" in out
    assert "Traceback" not in out


class Generator:
    """Records the folders it is asked to write."""

    def __init__(self) -> None:
        self.written = []

    def write(self, root) -> None:
        self.written.append(root)
        root.mkdir()
        (root / "train.json").write_text("[]")


def test_an_empty_root_with_a_generator_says_why_nothing_was_generated(tmp_path, capsys):
    generator = Generator()
    (tmp_path / "empty").mkdir()
    dm = data(tmp_path / "empty", generate_if_missing=generator)
    dm.prepare_data()
    assert generator.written == []
    said = capsys.readouterr().out
    assert (
        f"data.root {tmp_path / 'empty'} exists but is empty, so data.generate_if_missing (Generator) wrote nothing"
        in said
    )
    assert "remove the empty folder" in said
    with pytest.raises(
        DataError, match=r"data.train.mine \(Conversations\) cannot be opened: .*exists but is empty"
    ):
        dm.sources("fit")

    fresh = data(tmp_path / "new", generate_if_missing=generator)
    fresh.prepare_data()
    assert generator.written == [tmp_path / "new"] and capsys.readouterr().out == ""
    assert len(fresh.sources("fit")["mine"]) == 0
