"""``lit-mllm evaluate``: the scores a run logged for its last validation, reproduced from its checkpoint, and the
report that records what produced them."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from lit_mllm.cli import run
from lit_mllm.eval.report import file_digest, read_metrics
from tests.conftest import cli_args

QUICKSTART = str(Path(__file__).resolve().parents[1] / "configs" / "quickstart.yaml")


def test_evaluate_reproduces_the_last_in_training_validation_from_the_checkpoint(tmp_path, shapes_root):
    args = ["--config", QUICKSTART, *cli_args(shapes_root, tmp_path)]
    fit = run(["fit", *args, "--trainer.max_steps", "4", "--trainer.val_check_interval", "4"])
    logged = {k: float(v) for k, v in fit.trainer.callback_metrics.items() if k.startswith("val/")}
    assert {"val/accuracy", "val/loss"} <= set(logged) and any(k.startswith("val/by_kind/") for k in logged)
    ckpt = next(Path(fit.trainer.log_dir).glob("checkpoints/*.ckpt"))

    report = run(["evaluate", *args, "--ckpt_path", str(ckpt), "--report", str(tmp_path / "r.json")])
    scored = {k: v for k, v in report["metrics"].items() if not k.startswith("val/baseline")}
    assert set(scored) == {k for k in logged if not k.startswith("val/baseline")}
    assert scored == pytest.approx({k: logged[k] for k in scored}, abs=1e-6)
    assert read_metrics(tmp_path / "r.json") == report["metrics"]

    assert report["checkpoint"]["sha256"] == hashlib.sha256(ckpt.read_bytes()).hexdigest()
    source = report["data"]["sources"]["shapesworld"]
    assert source["sha256"] == hashlib.sha256((shapes_root / "val.json").read_bytes()).hexdigest()
    assert report["generation"]["max_new_tokens"] >= 1 and report["versions"]["torch"]
    assert len(report["prompting"]["first_prompts"]) == 3
    assert (
        "<image>x" in report["prompting"]["first_prompts"][0]
    )  # the image's tokens, shown once with a count


def test_evaluate_on_the_test_split_writes_beside_the_checkpoint(tmp_path, shapes_root):
    args = ["--config", QUICKSTART, *cli_args(shapes_root, tmp_path)]
    fit = run(["fit", *args, "--trainer.max_steps", "2", "--trainer.limit_val_batches", "0"])
    ckpt = next(Path(fit.trainer.log_dir).glob("checkpoints/*.ckpt"))
    report = run(["evaluate", *args, "--ckpt_path", str(ckpt), "--split", "test"])
    assert "test/accuracy" in report["metrics"]
    assert json.loads((ckpt.parent / "eval_test.json").read_text())["split"] == "test"


def test_a_folder_digest_follows_names_and_sizes(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "x.txt").write_text("12")
    before = file_digest(tmp_path / "a")
    (tmp_path / "a" / "x.txt").write_text("34")  # same size: a folder's digest does not read bytes
    assert file_digest(tmp_path / "a") == before
    (tmp_path / "a" / "x.txt").write_text("345")
    assert file_digest(tmp_path / "a") != before
