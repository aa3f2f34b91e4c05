"""Running a study's arms: each arm is a ``python -m lit_mllm fit --config STUDY/<arm>/arm.yaml`` subprocess
(a crash stays in its arm), locally one after another or several at once (one per GPU), or as a SLURM job
array through submitit, from the same grid file.

Resume. The runner adds to every arm's config a ``ModelCheckpoint`` saving ``checkpoints/last.ckpt`` every
``checkpoint_every`` steps, :class:`~lit_mllm.training.callbacks.CheckpointOnSigterm` (SIGTERM: save at the
step, exit), :class:`~lit_mllm.ablate.study.FinishArm` (at the end of training: the final weights and
``metrics.json``, the evaluation report of a validation at the final step), atomic checkpoint writes, and its
TensorBoard logger in the arm's folder. An arm whose training completed without that validation is evaluated by
``lit-mllm evaluate`` on its last checkpoint before it counts as done (:func:`evaluate_arm`). Running a study again
skips arms whose ``done.json`` exists (written last, atomically, by the runner), marks done an arm whose training
completed but whose runner died before writing the marker, and starts every other arm with ``--ckpt_path`` at its
newest checkpoint (``sigterm.ckpt`` or ``last.ckpt``) when it has one. A failed arm does not stop the study: it
is reported with its log and tried again at the next run. An arm whose resolved config changed since it started
is refused (delete its folder to start it afresh).

Signals. Arms run in sessions of their own, so a Ctrl-C or SIGTERM to the local runner reaches the runner only;
it sends SIGTERM to the running arms, which save a checkpoint at their current step and exit, and marks them
interrupted. On SLURM, submitit's requeue on timeout or preemption calls :meth:`ArmJob.checkpoint`, which does
the same before the job is requeued.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from copy import deepcopy
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from lit_mllm.ablate.grid import Grid, GridError
from lit_mllm.ablate.resolve import Plan
from lit_mllm.ablate.study import (
    ARM_CONFIG,
    CHECKPOINTS,
    DONE,
    LAST,
    LOG,
    MANIFEST,
    METRICS,
    SIGTERM,
    TO_EVALUATE,
    arm_state,
    checkpoint_to_resume,
    completed,
    mark,
    mark_done,
    read_json,
    write_json,
    write_text,
)

Echo = Callable[[str], None]
STOP_WAIT_S = 600
"""How long a stopping runner waits for its arms to save their checkpoints and exit."""


# -- preparing the study folder --------------------------------------------------------------------------------
def arm_config(plan: Plan, folder: Path, checkpoint_every: int) -> dict:
    """The config an arm runs: its resolved config plus the runner's settings (its folder as the trainer's root
    and TensorBoard's run, the resume checkpoints, :class:`~lit_mllm.ablate.study.FinishArm`). A logger the
    grid's config names is replaced by TensorBoard in the arm's folder."""
    arm = folder / plan.name
    config = deepcopy(plan.config)
    trainer = config.setdefault("trainer", {})
    trainer["default_root_dir"] = str(arm)
    trainer["enable_checkpointing"] = True
    trainer["logger"] = {
        "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
        "init_args": {"save_dir": str(folder), "name": plan.name, "version": ""},
    }
    callbacks = trainer.get("callbacks") or []
    callbacks = [callbacks] if isinstance(callbacks, dict) else list(callbacks)
    checkpoints = str(arm / CHECKPOINTS)
    callbacks += [
        {
            "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
            "init_args": {
                "dirpath": checkpoints,
                "filename": "step{step}",
                "save_top_k": 0,
                "save_last": True,
                "every_n_train_steps": checkpoint_every,
            },
        },
        {
            "class_path": "lit_mllm.training.callbacks.CheckpointOnSigterm",
            "init_args": {"dirpath": checkpoints},
        },
        {"class_path": "lit_mllm.ablate.study.FinishArm", "init_args": {"folder": str(arm)}},
    ]
    trainer["callbacks"] = callbacks
    if not trainer.get("plugins"):
        trainer["plugins"] = [{"class_path": "lit_mllm.training.checkpoints.AtomicCheckpointIO"}]
    return config


def prepare(grid: Grid, plans: Sequence[Plan], folder: Path) -> list[str]:
    """Write the study's manifest and every unfinished arm's ``arm.yaml``; the names of the arms, in run order.

    Raises:
        GridError: An arm that started (or finished) with another config than the grid now gives it.
    """
    folder = folder.resolve()
    folder.mkdir(parents=True, exist_ok=True)
    write_json(folder / MANIFEST, manifest(grid, plans))
    for plan in plans:
        arm = folder / plan.name
        text = yaml.safe_dump(arm_config(plan, folder, grid.checkpoint_every), sort_keys=False)
        path = arm / ARM_CONFIG
        if path.is_file() and path.read_text() != text:
            started = [p.name for p in (arm / DONE, arm / METRICS, arm / CHECKPOINTS) if p.exists()]
            if started:
                raise GridError(
                    f"arm {plan.name} ran with another config than the grid now gives it ({path}; it has "
                    f"{', '.join(started)}): restore the grid, or delete {arm} to run the arm afresh"
                )
        if not path.is_file() or path.read_text() != text:
            write_text(path, text)
    return [p.name for p in plans]


def manifest(grid: Grid, plans: Sequence[Plan]) -> dict:
    """``study.json``: what the report needs to know about the grid and its arms."""
    return {
        "study": grid.study,
        "grid": grid.source,
        "axes": [
            {"name": a.name, "labels": [lv.label for lv in a.levels], "varying": a.varying}
            for a in grid.all_axes
        ],
        "seeds": list(grid.seeds),
        "report": {k: v for k, v in vars(grid.report).items()},
        "arms": [
            {
                "name": p.name,
                "condition": p.arm.condition,
                "seed": p.arm.seed,
                "labels": dict(p.arm.labels),
                "values": {
                    k: v if isinstance(v, (int, float, str, bool)) else str(v)
                    for k, v in p.arm.values.items()
                },
                "steps": p.steps,
                "flops_per_sample": p.flops_per_sample,
            }
            for p in plans
        ],
    }


# -- one arm ---------------------------------------------------------------------------------------------------
def arm_command(arm: Path) -> list[str]:
    """The arm's ``lit-mllm fit`` command, resuming from its newest checkpoint when it has one."""
    command = [sys.executable, "-m", "lit_mllm", "fit", "--config", str(arm / ARM_CONFIG)]
    ckpt = checkpoint_to_resume(arm)
    return command + (["--ckpt_path", str(ckpt)] if ckpt is not None else [])


def start_arm(arm: Path, env: dict[str, str] | None = None, **record: Any) -> subprocess.Popen:
    """Start the arm's subprocess (in a session of its own), its output appended to its log; ``record``: more
    fields for its ``state.json`` (a SLURM job id)."""
    command = arm_command(arm)
    attempt = int((read_json(arm / "state.json") or {}).get("attempt", 0)) + 1
    with open(arm / LOG, "a") as log:  # the child keeps its own descriptor
        log.write(f"\n=== attempt {attempt}, {time.strftime('%Y-%m-%d %H:%M:%S')}: {' '.join(command)}\n")
        log.flush()
        process = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True, cwd=os.getcwd()
        )
    resumed = command[-1] if "--ckpt_path" in command else None
    mark(arm, "running", pid=process.pid, attempt=attempt, resumed_from=resumed, **record)
    return process


def finish_arm(arm: Path, returncode: int) -> str:
    """Record how the arm's process ended; its state: ``done`` (training completed: the done marker is written
    last), ``interrupted`` (stopped by SIGTERM with a checkpoint) or ``failed``."""
    attempt = (read_json(arm / "state.json") or {}).get("attempt")
    if returncode == 0 and not completed(arm) and (arm / TO_EVALUATE).is_file():
        evaluate_arm(arm)
    if completed(arm):
        mark_done(arm, returncode=returncode, attempt=attempt)
        return "done"
    if returncode == 0 and (arm / CHECKPOINTS / SIGTERM).is_file():
        mark(
            arm,
            "interrupted",
            detail="stopped by SIGTERM: resumes from checkpoints/sigterm.ckpt",
            attempt=attempt,
        )
        return "interrupted"
    detail = "exited before its training completed" if returncode == 0 else ""
    mark(arm, "failed", returncode=returncode, attempt=attempt, log=str(arm / LOG), detail=detail)
    return "failed"


def evaluate_arm(arm: Path) -> int:
    """``lit-mllm evaluate`` on the arm's final checkpoint, writing its ``metrics.json`` (for an arm whose training
    completed without a validation at its end: :data:`~lit_mllm.ablate.study.TO_EVALUATE`); its output appended
    to the arm's log; the exit status."""
    command = [sys.executable, "-m", "lit_mllm", "evaluate", "--config", str(arm / ARM_CONFIG)]
    command += ["--ckpt_path", str(arm / CHECKPOINTS / LAST), "--report", str(arm / METRICS)]
    with open(arm / LOG, "a") as log:
        log.write(f"\n=== evaluation, {time.strftime('%Y-%m-%d %H:%M:%S')}: {' '.join(command)}\n")
        log.flush()
        returncode = subprocess.call(command, stdout=log, stderr=subprocess.STDOUT, cwd=os.getcwd())
    if returncode == 0:
        (arm / TO_EVALUATE).unlink(missing_ok=True)
    return returncode


def run_arm(
    arm: Path, env: dict[str, str] | None = None, on_start: Callable | None = None, **record: Any
) -> str:
    """Run one arm to its end (resuming it when it has a checkpoint); its final state. A done arm is not run."""
    if (arm / DONE).is_file():
        return "done"
    if completed(arm):  # trained; the runner died before the marker
        return finish_arm(arm, 0)
    process = start_arm(arm, env, **record)
    if on_start is not None:
        on_start(process)
    return finish_arm(arm, process.wait())


def tail(path: Path, lines: int = 6) -> str:
    """The last lines of a log."""
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


# -- local -----------------------------------------------------------------------------------------------------
def gpu_pool(gpus: Sequence[str] | None = None) -> list[str]:
    """The GPUs arms are spread over: ``gpus``, else ``CUDA_VISIBLE_DEVICES``, else every visible CUDA device;
    empty without GPUs."""
    if gpus:
        return [str(g) for g in gpus]
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return [g for g in visible.split(",") if g.strip() and g.strip() != "-1"]
    import torch

    return [str(i) for i in range(torch.cuda.device_count())]


@dataclass
class _Running:
    name: str
    process: subprocess.Popen
    slot: int
    started: float


class LocalRunner:
    """Runs arms on this machine: ``parallel`` at once; with GPUs, one GPU per arm (``CUDA_VISIBLE_DEVICES``),
    at most one arm per GPU; on CPUs, the cores shared out (``OMP_NUM_THREADS``) unless set."""

    def __init__(
        self, folder: Path, parallel: int = 1, gpus: Sequence[str] | None = None, echo: Echo = print
    ) -> None:
        if parallel < 1:
            raise ValueError(f"parallel must be at least 1, got {parallel}")
        self.folder, self.echo = folder.resolve(), echo
        self.pool = gpu_pool(gpus)
        if self.pool and parallel > len(self.pool):
            echo(
                f"sweep: {parallel} arms at once asked, {len(self.pool)} GPUs: running {len(self.pool)} at once"
            )
            parallel = len(self.pool)
        self.parallel = parallel
        self._stop = threading.Event()

    def env(self, slot: int) -> dict[str, str]:
        env = dict(os.environ)
        if self.pool:
            env["CUDA_VISIBLE_DEVICES"] = self.pool[slot]
        elif self.parallel > 1 and "OMP_NUM_THREADS" not in env:
            env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // self.parallel))
        return env

    def stop(self, *_: Any) -> None:
        """Stop the study: running arms are sent SIGTERM (they checkpoint and exit), no new arm starts."""
        self._stop.set()

    def run(self, names: Sequence[str]) -> dict[str, str]:
        """Run every unfinished arm of ``names``; each arm's final state (``done``, ``failed``, ``interrupted``,
        or ``running`` for an arm another runner's live process is running)."""
        results: dict[str, str] = {}
        todo = []
        for name in names:
            state = arm_state(self.folder / name)
            if state.state == "done":
                results[name] = "done"
            elif state.state == "running":
                results[name] = "running"
                self.echo(f"sweep: {name} is running elsewhere ({state.detail}); left to it")
            elif completed(self.folder / name):
                results[name] = finish_arm(self.folder / name, 0)
            else:
                todo.append(name)
        skipped = sum(v == "done" for v in results.values())
        if skipped:
            self.echo(f"sweep: {skipped} of {len(names)} arms already done, skipped")
        handlers = self._install_handlers()
        running: list[_Running] = []
        total = len(todo)
        try:
            while todo or running:
                free = [s for s in range(self.parallel) if s not in {r.slot for r in running}]
                while todo and free and not self._stop.is_set():
                    name, slot = todo.pop(0), free.pop(0)
                    process = start_arm(self.folder / name, self.env(slot))
                    running.append(_Running(name, process, slot, time.time()))
                    where = f" on GPU {self.pool[slot]}" if self.pool else ""
                    self.echo(f"sweep: started {name}{where} (log {self.folder / name / LOG})")
                if self._stop.is_set() and running:
                    self.echo(
                        f"sweep: stopping: SIGTERM to {len(running)} running arm(s); they save a checkpoint"
                    )
                    for r in running:
                        _signal(r.process, signal.SIGTERM)
                    for r in running:
                        try:
                            r.process.wait(timeout=STOP_WAIT_S)
                        except subprocess.TimeoutExpired:
                            r.process.kill()
                            r.process.wait()
                if self._stop.is_set():
                    todo = []
                for r in [r for r in running if r.process.poll() is not None]:
                    running.remove(r)
                    state = finish_arm(self.folder / r.name, r.process.returncode)
                    results[r.name] = state
                    self.echo(self._line(r, state, results, total, len(todo), len(running)))
                if running:
                    time.sleep(0.2)
        finally:
            self._restore_handlers(handlers)
        return results

    def _line(self, r: _Running, state: str, results: dict, total: int, left: int, running: int) -> str:
        arm = self.folder / r.name
        took = f"{time.time() - r.started:.0f} s"
        if state == "done":
            metrics = (read_json(arm / METRICS) or {}).get("metrics", {})
            shown = ", ".join(f"{k} {v:.4g}" for k, v in metrics.items() if k.startswith("val/"))[:120]
            detail = f"done in {took}" + (f" ({shown})" if shown else "")
        elif state == "failed":
            detail = f"FAILED after {took}; log {arm / LOG}:\n{tail(arm / LOG)}"
        else:
            detail = f"{state} after {took}"
        finished = sum(v in ("done", "failed") for v in results.values())
        return f"sweep: [{finished} finished, {running} running, {left} waiting] {r.name}: {detail}"

    def _install_handlers(self) -> dict:
        if threading.current_thread() is not threading.main_thread():
            return {}
        old = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
        for s in old:
            signal.signal(s, self.stop)
        return old

    def _restore_handlers(self, old: dict) -> None:
        for s, handler in old.items():
            signal.signal(s, handler)


def _signal(process: subprocess.Popen, sig: int) -> None:
    try:
        process.send_signal(sig)
    except ProcessLookupError:
        pass


# -- SLURM through submitit ------------------------------------------------------------------------------------
class ArmJob:
    """A SLURM array task: runs one arm (resuming it) in a subprocess. On timeout or preemption submitit calls
    :meth:`checkpoint`, which has the arm save a checkpoint (SIGTERM) and asks for the task to be requeued."""

    def __init__(self) -> None:
        self._process: subprocess.Popen | None = None

    def __call__(self, arm: str) -> str:
        import submitit

        try:
            job = submitit.JobEnvironment().job_id
        except RuntimeError:  # not inside a submitit job (called directly)
            job = None
        return run_arm(Path(arm), on_start=self._started, job=job)

    def _started(self, process: subprocess.Popen) -> None:
        self._process = process

    def checkpoint(self, arm: str) -> Any:
        import submitit

        if self._process is not None and self._process.poll() is None:
            _signal(self._process, signal.SIGTERM)
            try:
                self._process.wait(timeout=STOP_WAIT_S)
            except subprocess.TimeoutExpired:
                self._process.kill()
        return submitit.helpers.DelayedSubmission(ArmJob(), arm)

    def __getstate__(self) -> dict:
        return {"_process": None}  # a process handle is not pickled with the requeued job


def submit_slurm(
    folder: Path,
    names: Sequence[str],
    parameters: dict[str, Any],
    cluster: str = "slurm",
    name: str = "sweep",
) -> list[Any]:
    """Submit the unfinished arms of ``names`` as one job array (submitit); the jobs.

    Args:
        folder: The study's folder (submitit's files go to ``.submitit/`` in it).
        names: Arms, in order.
        parameters: submitit's ``update_parameters`` (the grid's ``slurm:``), e.g. ``timeout_min``,
            ``gpus_per_node``, ``slurm_partition``, ``slurm_array_parallelism``.
        cluster: ``slurm``; ``local`` runs the array on this machine through submitit's local executor (tests).
        name: The jobs' name.
    """
    import submitit

    folder = folder.resolve()
    todo = [n for n in names if arm_state(folder / n).state not in ("done", "running", "queued")]
    if not todo:
        return []
    executor = submitit.AutoExecutor(folder=folder / ".submitit" / "%j", cluster=cluster)
    executor.update_parameters(name=name, **parameters)
    jobs = executor.map_array(ArmJob(), [str(folder / n) for n in todo])
    for arm, job in zip(todo, jobs):
        mark(folder / arm, "queued", job=job.job_id)
    return jobs
