"""An arm's result is the evaluation of its final weights: FinishArm validates at the final step (whatever
``val_check_interval`` says) and writes that validation as an evaluation report, whose numbers are those `lit-mllm
evaluate` gives on the arm's last checkpoint; an arm whose training ended without that validation is evaluated by
the runner through `lit-mllm evaluate` before it counts as done."""

from __future__ import annotations

import subprocess

import pytest

from lit_mllm.ablate.grid import grid_from_dict
from lit_mllm.ablate.resolve import resolve_arms
from lit_mllm.ablate.runner import finish_arm, prepare
from lit_mllm.ablate.study import ARM_CONFIG, CHECKPOINTS, LAST, METRICS, TO_EVALUATE, arm_state, read_json
from lit_mllm.cli import run
from lit_mllm.eval.report import read_metrics
from tests.ablate_grids import tiny_grid

pytestmark = pytest.mark.usefixtures("one_thread")


def _arm(shapes_root, tmp_path, steps: int, **set_) -> tuple:
    node = tiny_grid(shapes_root, tmp_path, match={"steps": steps})
    node["set"].update(set_)
    grid = grid_from_dict(node)
    plans = resolve_arms(grid)
    folder = tmp_path / "tiny"
    prepare(grid, plans, folder)
    return folder / plans[0].name


def _evaluate(arm, report) -> dict[str, float]:
    run(
        ["evaluate", "--config", str(arm / ARM_CONFIG), "--ckpt_path", str(arm / CHECKPOINTS / LAST)]
        + ["--report", str(report)]
    )
    return read_metrics(report)


def test_an_arm_s_metrics_are_the_evaluation_of_its_final_weights(shapes_root, tmp_path):
    # 2 steps an epoch, validated at each epoch's end: the last scheduled validation is at step 2, training ends at 3
    arm = _arm(shapes_root, tmp_path, steps=3)
    run(["fit", "--config", str(arm / ARM_CONFIG)])
    written = read_json(arm / METRICS)
    assert written["global_step"] == 3 and written["completed"] and written["split"] == "val"
    for field in (
        "checkpoint",
        "generation",
        "prompting",
        "data",
        "versions",
    ):  # the evaluation report's fields
        assert field in written
    assert written["checkpoint"]["path"] == str(arm / CHECKPOINTS / LAST)
    assert written["data"]["sources"]["shapesworld"]["sha256"]
    evaluated = _evaluate(arm, tmp_path / "eval.json")
    assert set(written["metrics"]) == set(evaluated) and "val/accuracy" in evaluated
    assert written["metrics"] == pytest.approx(evaluated, rel=1e-5, abs=1e-6)
    assert not (arm / TO_EVALUATE).exists()


def test_an_arm_that_ended_without_validating_is_evaluated_before_it_is_done(
    shapes_root, tmp_path, monkeypatch
):
    # validation every second epoch: none in a 2-step (one-epoch) run
    arm = _arm(shapes_root, tmp_path, steps=2, **{"trainer.check_val_every_n_epoch": 2})
    run(["fit", "--config", str(arm / ARM_CONFIG)])
    assert not (arm / METRICS).exists() and read_json(arm / TO_EVALUATE)["global_step"] == 2
    commands = []

    def in_process(command, **kwargs):  # `python -m lit_mllm evaluate ...`, run here
        commands.append(command)
        run(command[3:])
        return 0

    monkeypatch.setattr(subprocess, "call", in_process)
    assert finish_arm(arm, 0) == "done" and arm_state(arm).state == "done"
    assert commands and commands[0][3] == "evaluate"
    assert not (arm / TO_EVALUATE).exists()
    assert read_metrics(arm / METRICS) == pytest.approx(_evaluate(arm, tmp_path / "again.json"), rel=1e-5)
