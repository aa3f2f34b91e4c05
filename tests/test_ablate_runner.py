"""The sweep runner (lit_mllm/ablate/runner.py, study.py): what an arm's config gets, how an arm's end is read
(done / interrupted / failed), refusing a changed config, the progress view; end to end (slow: arms are
subprocesses), a study killed mid-arm that resumes and completes without rerunning finished arms and loses no
result, with a failing arm that does not stop it, and the SLURM path through submitit's local executor."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import yaml

from lit_mllm.ablate.grid import GridError, grid_from_dict
from lit_mllm.ablate.report import load_study, read_scalars, write_report
from lit_mllm.ablate.resolve import resolve_arms
from lit_mllm.ablate.runner import arm_command, arm_config, finish_arm, prepare, submit_slurm
from lit_mllm.ablate.study import (
    ARM_CONFIG,
    CHECKPOINTS,
    DONE,
    METRICS,
    SIGTERM,
    arm_state,
    mark,
    progress,
    read_json,
    write_json,
)
from tests.ablate_grids import tiny_grid, write_grid

REPO = Path(__file__).resolve().parents[1]


class KillStudy(L.Callback):
    """Kills the sweep runner (this arm's parent) and this arm with SIGKILL after training step ``step``, once:
    a machine that dies mid-arm. ``flag`` exists until it has happened."""

    def __init__(self, step: int, flag: str) -> None:
        self.step, self.flag = step, Path(flag)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step and self.flag.exists():
            self.flag.unlink()
            os.kill(os.getppid(), signal.SIGKILL)
            os.kill(os.getpid(), signal.SIGKILL)


class Explode(L.Callback):
    """Raises in the first training step: an arm that fails."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        raise RuntimeError("this arm is broken on purpose")


def _plans(shapes_root, tmp_path, **fields):
    grid = grid_from_dict(tiny_grid(shapes_root, tmp_path, **fields))
    return grid, resolve_arms(grid)


def test_an_arm_s_config_gets_its_folder_logger_and_resume_callbacks(shapes_root, tmp_path):
    grid, plans = _plans(shapes_root, tmp_path)
    config = arm_config(plans[0], tmp_path / "study", checkpoint_every=7)
    trainer = config["trainer"]
    assert trainer["default_root_dir"] == str(tmp_path / "study" / "default")
    assert trainer["logger"]["init_args"] == {
        "save_dir": str(tmp_path / "study"),
        "name": "default",
        "version": "",
    }
    names = [c["class_path"].rsplit(".", 1)[-1] for c in trainer["callbacks"]]
    assert names == ["ModelCheckpoint", "CheckpointOnSigterm", "FinishArm"]
    assert trainer["callbacks"][0]["init_args"]["every_n_train_steps"] == 7
    assert trainer["plugins"] == [{"class_path": "lit_mllm.training.checkpoints.AtomicCheckpointIO"}]
    assert plans[0].config["trainer"]["callbacks"] == []  # the plan itself is untouched


def test_how_an_arm_ended_is_read_from_its_folder(tmp_path):
    arm = tmp_path / "a"
    (arm / CHECKPOINTS).mkdir(parents=True)
    mark(arm, "running", pid=2**22 + 12345, attempt=1)  # no such process
    assert arm_state(arm).state == "interrupted"
    assert finish_arm(arm, 1) == "failed"
    assert arm_state(arm).state == "failed" and arm_state(arm).log == arm / "log.txt"
    (arm / CHECKPOINTS / SIGTERM).write_bytes(b"x")
    assert finish_arm(arm, 0) == "interrupted"
    assert arm_command(arm)[-2:] == ["--ckpt_path", str(arm / CHECKPOINTS / SIGTERM)]
    (arm / CHECKPOINTS / SIGTERM).unlink()
    write_json(arm / METRICS, {"metrics": {"val/accuracy": 0.5}, "global_step": 3})
    assert finish_arm(arm, 0) == "done"
    assert read_json(arm / DONE)["returncode"] == 0
    view = progress(tmp_path, ["a", "b"])
    assert "a  " in view and "done" in view and "1 done, 1 pending (of 2)" in view


def test_a_started_arm_whose_config_changed_is_refused(shapes_root, tmp_path):
    grid, plans = _plans(shapes_root, tmp_path)
    folder = tmp_path / "study"
    assert prepare(grid, plans, folder) == ["default"]
    assert (folder / "default" / ARM_CONFIG).is_file()
    assert json.loads((folder / "study.json").read_text())["arms"][0]["steps"] == 3
    changed = resolve_arms(grid_from_dict(tiny_grid(shapes_root, tmp_path, match={"steps": 4})))
    prepare(grid, changed, folder)  # not started yet: rewritten
    (folder / "default" / CHECKPOINTS).mkdir()
    with pytest.raises(GridError, match="ran with another config"):
        prepare(grid, plans, folder)


def _sweep(grid_file: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "lit_mllm", "sweep", str(grid_file), *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=900,
        start_new_session=True,
    )


@pytest.mark.slow
def test_a_study_killed_mid_arm_resumes_and_completes_without_rerunning_finished_arms(shapes_root, tmp_path):
    flag = tmp_path / "kill-once"
    flag.touch()
    killer = [
        {"class_path": "tests.test_ablate_runner.KillStudy", "init_args": {"step": 2, "flag": str(flag)}}
    ]
    axes = {
        "arm": {
            "ok": {"model.init_args.connector.init_args.depth": 1},
            "killed": {"model.init_args.connector.init_args.depth": 2, "trainer.callbacks": killer},
            "broken": {"trainer.callbacks": [{"class_path": "tests.test_ablate_runner.Explode"}]},
        }
    }
    grid_file = write_grid(
        tmp_path / "grid.yaml", tiny_grid(shapes_root, tmp_path, axes=axes, match={"steps": 4})
    )
    study = tmp_path / "tiny"

    first = _sweep(grid_file)
    assert first.returncode == -signal.SIGKILL, first.stdout + first.stderr
    ok, killed, broken = (study / f"arm={n}" for n in ("ok", "killed", "broken"))
    assert arm_state(ok).state == "done"
    assert arm_state(killed).state == "interrupted"  # its process is gone, its last checkpoint is at step 2
    assert arm_state(broken).state == "pending"
    done_before = (ok / DONE).read_bytes(), (ok / METRICS).read_bytes()

    second = _sweep(grid_file)
    assert second.returncode == 1, second.stdout + second.stderr  # one arm failed
    out = second.stdout
    assert "1 of 3 arms already done, skipped" in out
    assert "arm=broken: FAILED" in out and str(broken / "log.txt") in out
    assert "this arm is broken on purpose" in (broken / "log.txt").read_text()
    assert ((ok / DONE).read_bytes(), (ok / METRICS).read_bytes()) == done_before  # not rerun
    assert (ok / "log.txt").read_text().count("=== attempt") == 1
    log = (killed / "log.txt").read_text()
    assert log.count("=== attempt") == 2 and f"--ckpt_path {killed / CHECKPOINTS / 'last.ckpt'}" in log
    assert arm_state(killed).state == "done" and arm_state(broken).state == "failed"
    metrics = read_json(killed / METRICS)
    assert metrics["global_step"] == 4 and "val/loss" in metrics["metrics"]
    # no result lost: every training step of the killed arm is in its TensorBoard events, before or after the kill
    assert sorted(read_scalars(killed, "train/loss")) == [0, 1, 2, 3]
    assert "2 done, 1 failed (of 3)" in out

    report = write_report(study)
    text = report.read_text()
    assert "3 arms: 2 done, 1 failed." in text and str(broken / "log.txt") in text
    assert {a.name: a.state for a in load_study(study).arms}["arm=killed"] == "done"


@pytest.mark.slow
def test_the_slurm_path_runs_a_job_array_through_submitit_s_local_executor(shapes_root, tmp_path):
    pytest.importorskip("submitit")
    axes = {"depth": {"key": "model.init_args.connector.init_args.depth", "values": [1, 2]}}
    grid = grid_from_dict(tiny_grid(shapes_root, tmp_path, axes=axes, slurm={"timeout_min": 10}))
    plans = resolve_arms(grid)
    folder = tmp_path / "tiny"
    names = prepare(grid, plans, folder)
    cwd = os.getcwd()
    os.chdir(REPO)  # the jobs' working directory: where `python -m lit_mllm` finds this checkout
    try:
        jobs = submit_slurm(folder, names, dict(grid.slurm), cluster="local")
        assert {arm_state(folder / n).state for n in names} <= {"queued", "running", "done"}
        assert [job.result() for job in jobs] == ["done", "done"]
    finally:
        os.chdir(cwd)
    for name in names:
        assert read_json(folder / name / METRICS)["global_step"] == 3
        assert yaml.safe_load((folder / name / ARM_CONFIG).read_text())["trainer"]["max_steps"] == 3
    assert submit_slurm(folder, names, {}, cluster="local") == []  # nothing left to submit
