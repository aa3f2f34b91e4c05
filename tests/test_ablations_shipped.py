"""Every shipped grid (ablations/*.yaml) parses, all its arms through lit-mllm fit's parser (toy grids also
build each condition's model; a select study's arms are its first round's), and the first arm of every toy grid
trains one step (fast_dev_run) from the config the runner writes for it, on the suite's small ShapesWorld,
leaving its metrics.json."""

from __future__ import annotations

from pathlib import Path

import pytest

from lit_mllm.ablate.grid import expand, load_grid
from lit_mllm.ablate.resolve import resolve_arms
from lit_mllm.ablate.runner import prepare
from lit_mllm.ablate.select import first_round
from lit_mllm.ablate.study import ARM_CONFIG, METRICS, read_json
from lit_mllm.cli import run

GRIDS = sorted((Path(__file__).resolve().parents[1] / "ablations").glob("*.yaml"))
TOYS = [g for g in GRIDS if g.stem.endswith("-toy")]
EXPECTED = {  # arms per shipped grid
    "mm1_connector-toy": 36,
    "mm1_connector": 12,
    "mm1_data_mixture-toy": 12,
    "mm1_data_mixture": 4,
    "resolution-toy": 12,
    "fusion_families-toy": 8,
    "individual_select-toy": 12,  # round 1: r0 and five candidates, 2 seeds
}


def _arms(grid, overrides=None):
    """The grid's arms; a select study's first round."""
    return first_round(grid, overrides) if grid.kind == "select" else expand(grid, overrides)


def test_the_shipped_grids_are_the_expected_ones():
    assert {g.stem for g in GRIDS} == set(EXPECTED)
    for toy in TOYS:  # each toy grid's full variant, where the issue asks for one
        if toy.stem.startswith("mm1_"):
            assert toy.with_name(toy.stem.removesuffix("-toy") + ".yaml") in GRIDS


@pytest.mark.parametrize("path", GRIDS, ids=[g.stem for g in GRIDS])
def test_every_arm_of_a_shipped_grid_parses(path, monkeypatch):
    monkeypatch.chdir(path.parents[1])  # grid paths are relative to the repository root
    grid = load_grid(path.relative_to(path.parents[1]))
    assert grid.study == path.stem
    plans = resolve_arms(grid, arms=_arms(grid))
    assert len(plans) == EXPECTED[path.stem]
    assert len({p.name for p in plans}) == len(plans)
    if grid.match is not None and grid.match.steps is not None:
        assert {p.config["trainer"]["max_steps"] for p in plans} == {grid.match.steps}


@pytest.mark.parametrize("path", TOYS, ids=[g.stem for g in TOYS])
def test_the_first_arm_of_a_toy_grid_smoke_runs(path, shapes_root, tmp_path, monkeypatch):
    monkeypatch.chdir(path.parents[1])
    grid = load_grid(path.relative_to(path.parents[1]))
    first = _arms(grid)[0].name
    overrides = {
        "trainer.fast_dev_run": True,
        "data.init_args.root": str(shapes_root),
        "data.init_args.num_workers": 0,
        "data.init_args.batch_size": 2,
    }
    plans = resolve_arms(grid, overrides, names=[first], arms=_arms(grid, overrides))
    folder = tmp_path / grid.study
    prepare(grid, plans, folder)
    run(["fit", "--config", str(folder / first / ARM_CONFIG)])
    metrics = read_json(folder / first / METRICS)
    assert metrics["completed"] and metrics["global_step"] == 1
    assert "val/loss" in metrics["metrics"]
    assert (folder / first / "checkpoints" / "last.ckpt").is_file()
