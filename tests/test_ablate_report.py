"""lit-mllm report on a study written by hand (no training): means and t intervals per condition against values
computed here, the differences' verdicts, the CSV files, plots, TensorBoard HParams and training curves read from
event files; notebooks/study.ipynb run on the same study."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import matplotlib
import pytest
from torch.utils.tensorboard import SummaryWriter

from lit_mllm.ablate.grid import expand, grid_from_dict
from lit_mllm.ablate.report import curves, load_study
from lit_mllm.ablate.resolve import Plan
from lit_mllm.ablate.runner import manifest
from lit_mllm.ablate.study import DONE, METRICS, mark, write_json
from lit_mllm.cli import run

matplotlib.use("Agg")
ROOT = Path(__file__).resolve().parents[1]
ACCURACY = {  # (connector, tokens) -> accuracy per seed: tokens matter (+0.2), the connector does not
    ("avgpool", 16): [0.40, 0.42, 0.44],
    ("avgpool", 36): [0.60, 0.63, 0.61],
    ("cabstractor", 16): [0.41, 0.45, 0.40],
    ("cabstractor", 36): [0.62, 0.60, 0.64],
}


def write_study(folder: Path) -> Path:
    """A study folder as `lit-mllm sweep` leaves it: manifest, metrics and done markers, TensorBoard events; one
    arm failed."""
    grid = grid_from_dict(
        {
            "axes": {"connector": {"avgpool": {}, "cabstractor": {}}, "tokens": [16, 36]},
            "seeds": [0, 1, 2],
            "report": {"metric": "val/accuracy", "x": "tokens", "group": "connector"},
        },
        default_study="mm1_connector-toy",
    )
    arms = expand(grid)
    plans = [Plan(a, {}, steps=5) for a in arms]
    study = folder / grid.study
    write_json(study / "study.json", manifest(grid, plans))
    for arm in arms:
        values = ACCURACY[(arm.values["connector"], arm.values["tokens"])]
        at = study / arm.name
        if arm.values["connector"] == "cabstractor" and arm.values["tokens"] == 16 and arm.seed == 2:
            mark(at, "failed", returncode=1)  # its metric must not count
            continue
        write_json(at / METRICS, {"metrics": {"val/accuracy": values[arm.seed], "val/loss": 1.0}})
        write_json(at / DONE, {})
        with SummaryWriter(str(at)) as writer:
            for step in range(5):
                writer.add_scalar("train/loss", 2.0 - step * 0.1 * (1 + arm.seed), step)
    return study


def test_report_tables_differences_and_files(tmp_path):
    study = write_study(tmp_path)
    path = run(["report", str(study)])
    text = path.read_text()
    assert "12 arms: 11 done, 1 failed." in text and "cabstractor_tokens=16_seed=2" in text

    rows = list(csv.DictReader(open(path.parent / "summary.csv")))
    by = {(r["connector"], r["tokens"], r["metric"]): r for r in rows}
    row = by[("avgpool", "36", "val/accuracy")]
    values = ACCURACY[("avgpool", 36)]
    mean = sum(values) / 3
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / 2)
    assert float(row["mean"]) == pytest.approx(mean)
    assert float(row["ci_high"]) - mean == pytest.approx(4.303 * sd / math.sqrt(3), rel=1e-3)
    assert by[("cabstractor", "16", "val/accuracy")]["n"] == "2"  # the failed seed left out

    diffs = list(csv.DictReader(open(path.parent / "differences.csv")))
    verdict = {(d["axis"], d["level"], d["held"]): d["exceeds_noise"] for d in diffs}
    assert verdict[("tokens", "36", "connector=avgpool")] == "True"
    assert verdict[("tokens", "36", "connector=cabstractor")] == "True"
    assert verdict[("connector", "cabstractor", "tokens=16")] == "False"
    assert verdict[("connector", "cabstractor", "tokens=36")] == "False"
    assert "2 of 4 differences exceed their noise." in text

    # main effects: each axis's levels pooled over the other axis and the seeds (the failed arm left out)
    effects = list(csv.DictReader(open(path.parent / "effects.csv")))
    level = {(e["axis"], e["level"]): e for e in effects}
    at36 = ACCURACY[("avgpool", 36)] + ACCURACY[("cabstractor", 36)]
    at16 = ACCURACY[("avgpool", 16)] + ACCURACY[("cabstractor", 16)][:2]
    assert level[("tokens", "36")]["n"] == "6" and level[("tokens", "16")]["n"] == "5"
    assert float(level[("tokens", "36")]["mean"]) == pytest.approx(sum(at36) / 6)
    assert float(level[("tokens", "16")]["range"]) == pytest.approx(sum(at36) / 6 - sum(at16) / 5)
    assert level[("tokens", "16")]["exceeds_noise"] == "True"  # tokens move the metric
    assert level[("connector", "avgpool")]["exceeds_noise"] == "False"  # the connector does not
    assert "## Main effects on val/accuracy" in text
    # a metric equal in every arm is listed once, not tabulated per condition
    assert "Equal in every arm (not tabulated per condition): `val/loss` 1." in text
    assert "## val/loss" not in text

    assert len(list(csv.DictReader(open(path.parent / "arms.csv")))) == 12
    for name in ("val-accuracy_by_tokens.png", "curves_train-loss.png"):
        assert (path.parent / name).stat().st_size > 1000 and f"]({name})" in text
    hparams = sorted((path.parent / "hparams").iterdir())
    assert len(hparams) == 11 and all(any(h.rglob("events.out.tfevents.*")) for h in hparams)


def test_curves_are_means_over_seeds(tmp_path):
    study = load_study(write_study(tmp_path))
    steps, values = curves(study, "train/loss")["connector=avgpool_tokens=16"]
    assert steps == [0, 1, 2, 3, 4]
    assert values[2] == pytest.approx(sum(2.0 - 2 * 0.1 * (1 + s) for s in range(3)) / 3)


def test_the_study_notebook_runs_on_a_study(tmp_path, monkeypatch, capsys):
    write_study(tmp_path / "runs" / "ablations")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("matplotlib.pyplot.show", lambda *a, **k: None)
    notebook = json.loads((ROOT / "notebooks" / "study.ipynb").read_text())
    assert notebook["nbformat"] == 4 and all("id" in c and "metadata" in c for c in notebook["cells"])
    scope: dict = {}
    for cell in notebook["cells"]:
        if cell["cell_type"] == "code":
            assert cell["outputs"] == [] and cell["execution_count"] is None
            exec(compile("".join(cell["source"]), "study.ipynb", "exec"), scope)
    out = capsys.readouterr().out
    assert "mm1_connector-toy | varying axes: ['connector', 'tokens']" in out
    assert "tokens=36 vs 16 (connector=avgpool)" in out and "EXCEEDS NOISE" in out
