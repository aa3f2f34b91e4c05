"""Every shipped grid (ablations/*.yaml) parses, all its arms through lit-mllm fit's parser (toy grids with
``check: build`` also build each condition's model; a select study's arms are its first round's), and the first
arm of every toy grid trains one step (fast_dev_run) from the config the runner writes for it, on the suite's small
ShapesWorld, leaving its metrics.json; the image-encoder toy's pretrained arms load a tower the CLIP toy's arm
wrote."""

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
    "clip_towers-toy": 8,
    "mm1_image_encoder-toy": 24,
    "mm1_image_encoder": 8,
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


def smoke_run(path: Path, shapes_root: Path, folder: Path, arm: str | None = None, **overrides) -> dict:
    """Run one arm of a shipped grid (default its first) for one step on the suite's data; its metrics.json."""
    grid = load_grid(path.relative_to(path.parents[1]))
    arm = arm or _arms(grid)[0].name
    overrides = {
        "trainer.fast_dev_run": True,
        "data.init_args.root": str(shapes_root),
        "data.init_args.num_workers": 0,
        "data.init_args.batch_size": 2,
        **overrides,
    }
    plans = resolve_arms(grid, overrides, names=[arm], arms=_arms(grid, overrides))
    prepare(grid, plans, folder)
    run(["fit", "--config", str(folder / arm / ARM_CONFIG)])
    assert (folder / arm / "checkpoints" / "last.ckpt").is_file()
    return read_json(folder / arm / METRICS)


@pytest.mark.parametrize("path", TOYS, ids=[g.stem for g in TOYS])
def test_the_first_arm_of_a_toy_grid_smoke_runs(path, shapes_root, tmp_path, monkeypatch):
    monkeypatch.chdir(path.parents[1])
    metrics = smoke_run(path, shapes_root, tmp_path / path.stem)
    assert metrics["completed"] and metrics["global_step"] == 1 and metrics["split"] == "val"
    assert "val/loss" in metrics["metrics"]
    if path.stem == "mm1_data_mixture-toy":  # zero-shot, few-shot and text-only, each scored on its own
        scores = metrics["metrics"]
        for key in (
            "val/zero_shot/accuracy",
            "val/zero_shot/answer",
            "val/few_shot/answer",
            "val/text_choice/choice",
        ):
            assert key in scores, sorted(scores)
        assert not {"val/few_shot/accuracy", "val/text_choice/accuracy", "val/text_choice/answer"} & set(
            scores
        )
        assert any(k.startswith("val/zero_shot/by_kind/") for k in scores)


def test_the_image_encoder_toy_loads_a_tower_the_clip_toy_pretrained(shapes_root, tmp_path, monkeypatch):
    """The chain of the two grids: a CLIP toy arm's last.ckpt is the tower of the matching encoder-toy arm."""
    root = path_of("clip_towers-toy").parents[1]
    monkeypatch.chdir(root)
    clip = tmp_path / "clip_towers-toy"
    smoke_run(path_of("clip_towers-toy"), shapes_root, clip, "size=tiny_resolution=32px_data=1k")
    tower = clip / "size=tiny_resolution=32px_data=1k" / "checkpoints" / "last.ckpt"
    arm = "size=tiny_resolution=32px_pretraining=clip-1k_seed=0"
    grid = load_grid(path_of("mm1_image_encoder-toy").relative_to(root))
    (plan,) = resolve_arms(grid, names=[arm])  # the shipped path, relative to the repository
    weights = plan.config["model"]["init_args"]["vision_tower"]["init_args"]["weights"]
    assert weights == "runs/ablations/clip_towers-toy/size=tiny_resolution=32px_data=1k/checkpoints/last.ckpt"
    key = "model.init_args.vision_tower.init_args.weights"
    metrics = smoke_run(
        path_of("mm1_image_encoder-toy"), shapes_root, tmp_path / "enc", arm, **{key: str(tower)}
    )
    assert metrics["completed"] and "val/accuracy" in metrics["metrics"]


def path_of(study: str) -> Path:
    return GRIDS[[g.stem for g in GRIDS].index(study)]
