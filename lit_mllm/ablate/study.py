"""A study's folder: one sub-folder per arm, the files that say where each arm stands, and the callback that
writes an arm's result when its training completes.

    STUDY/study.json            the grid expanded: axes, seeds, arms (name, condition, labels, values, steps)
    STUDY/<arm>/arm.yaml        the resolved config the arm runs (`lit-mllm fit --config arm.yaml`)
    STUDY/<arm>/config.yaml     the same, saved by LightningCLI next to the TensorBoard events
    STUDY/<arm>/events.out.tfevents.*   TensorBoard (`tensorboard --logdir STUDY` compares the arms)
    STUDY/<arm>/checkpoints/    last.ckpt (every `checkpoint_every` steps and at the end), sigterm.ckpt
    STUDY/<arm>/log.txt         the arm's console output, every attempt appended
    STUDY/<arm>/state.json      running / failed / interrupted, with the process or job, attempt and exit status
    STUDY/<arm>/metrics.json    the result: {"metrics": {"val/accuracy": 0.5, ...}, ...}
    STUDY/<arm>/to_evaluate.json     training completed without a validation at its end: the runner evaluates
    STUDY/<arm>/done.json       written last, atomically: the arm is finished and is never run again

``metrics.json`` is an evaluation report (:mod:`lit_mllm.eval.report`: the ``metrics`` mapping of ``val/...`` name
to number, the checkpoint, generation settings, prompts, data files and versions behind them) plus the step it
was taken at. When training completes, :class:`FinishArm` writes it from the validation it has run at the final
step (the numbers ``lit-mllm evaluate`` gives on ``checkpoints/last.ckpt``), unless an evaluation report is
already there; otherwise the runner runs ``lit-mllm evaluate``, which writes it. A later evaluation may
overwrite it.
"""

from __future__ import annotations

import json
import os
import socket
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch

ARM_CONFIG = "arm.yaml"
STATE = "state.json"
METRICS = "metrics.json"
DONE = "done.json"
LOG = "log.txt"
MANIFEST = "study.json"
CHECKPOINTS = "checkpoints"
LAST = "last.ckpt"
SIGTERM = "sigterm.ckpt"
TO_EVALUATE = "to_evaluate.json"
FINISH_SOURCE = "final validation"
"""``metrics.json``'s ``source`` when :class:`FinishArm` wrote it (an evaluation report has none)."""
STATES = ("done", "running", "queued", "failed", "interrupted", "pending")
"""What :func:`arm_state` says of an arm."""


def write_json(path: Path, content: Any) -> None:
    """Write ``content`` as JSON atomically: a temporary file in the same folder, synced, renamed over ``path``
    (a reader sees the old file or the new one, never a part)."""
    write_text(path, json.dumps(content, indent=2, default=str) + "\n")


def write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically (see :func:`write_json`)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            os.fchmod(f.fileno(), 0o644)  # mkstemp's file is private to its owner
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    if os.name == "posix":  # the rename itself made durable
        folder = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(folder)
        finally:
            os.close(folder)


def read_json(path: Path) -> dict | None:
    """The JSON object in ``path``; None when the file is missing or not a JSON object."""
    try:
        content = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return content if isinstance(content, dict) else None


class FinishArm(L.Callback):
    """When training completes: saves ``checkpoints/last.ckpt`` (the final weights) and writes ``metrics.json``, the
    evaluation report (:func:`lit_mllm.eval.report.build_report`) of the validation run at the final step, unless an
    evaluation report is there. A run stopped before its end (SIGTERM, an error) writes neither, so the runner
    resumes it.

    Cheap and exact: at the final training step it sets ``trainer.should_stop``, Lightning's early-stopping path,
    which runs the validation due at that step whatever ``val_check_interval`` says; that validation scores the
    final weights with the config's metrics on the config's val split, as ``lit-mllm evaluate --ckpt_path
    checkpoints/last.ckpt`` does, so its numbers are the evaluation's. Where no validation ran at the final step
    (validation switched off or skipped that epoch, or a run resumed from a checkpoint saved at its last step),
    it writes :data:`TO_EVALUATE` instead and the runner runs ``lit-mllm evaluate`` on the arm."""

    def __init__(self, folder: str) -> None:
        """
        Args:
            folder: The arm's folder.
        """
        self.folder = Path(folder)
        self._validated: tuple[int, dict[str, float]] | None = (
            None  # (step, val/* metrics) of the last validation
        )
        self._written = False

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        if 0 < trainer.max_steps <= trainer.global_step:
            trainer.should_stop = True  # the final step: validate now, then stop (see the class docstring)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking:
            self._validated = (trainer.global_step, scalars(trainer.callback_metrics, "val/"))

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._finish(trainer, pl_module)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # resumed from a checkpoint of the final step: Lightning trains nothing and skips on_train_end
        if not self._written and 0 < trainer.max_steps <= trainer.global_step:
            self._finish(trainer, pl_module)

    def _finish(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._written = True
        last = self.folder / CHECKPOINTS / LAST
        trainer.save_checkpoint(last)
        if not trainer.is_global_zero:
            return
        path = self.folder / METRICS
        existing = read_json(path)
        if existing is not None and existing.get("source") != FINISH_SOURCE:
            return  # an evaluation report
        fields = {"global_step": trainer.global_step, "epoch": trainer.current_epoch, "completed": True}
        if self._validated is None or self._validated[0] != trainer.global_step:
            write_json(self.folder / TO_EVALUATE, {**fields, "reason": "no validation ran at the final step"})
            return
        from lit_mllm.commands.evaluate import first_prompts
        from lit_mllm.eval.report import build_report

        report = build_report(
            metrics=self._validated[1],
            split="val",
            data_split="validate",
            model=pl_module,
            datamodule=trainer.datamodule,
            checkpoint=str(last),
            prompts=first_prompts(pl_module, trainer.datamodule, "validate", 3),
        )
        write_json(path, {**report, "source": FINISH_SOURCE, **fields})
        (self.folder / TO_EVALUATE).unlink(missing_ok=True)


def scalars(metrics: dict[str, Any], prefix: str) -> dict[str, float]:
    """The one-number entries of ``metrics`` whose name starts with ``prefix``, as floats, sorted by name."""
    out = {}
    for name, value in metrics.items():
        if not name.startswith(prefix):
            continue
        if isinstance(value, torch.Tensor) and value.numel() == 1:
            out[name] = float(value)
        elif isinstance(value, (int, float)):
            out[name] = float(value)
    return dict(sorted(out.items()))


@dataclass(frozen=True)
class ArmState:
    """Where an arm stands (the progress view's row)."""

    name: str
    state: str
    """One of :data:`STATES`."""
    detail: str = ""
    """The exit status, the process or job running it, the step reached."""
    log: Path | None = None


def checkpoint_to_resume(folder: Path) -> Path | None:
    """The newest of the arm's ``sigterm.ckpt`` and ``last.ckpt``; None when it has neither."""
    found = [p for p in (folder / CHECKPOINTS / SIGTERM, folder / CHECKPOINTS / LAST) if p.is_file()]
    return max(found, key=lambda p: p.stat().st_mtime_ns) if found else None


def completed(folder: Path) -> bool:
    """Whether the arm's training completed (its ``metrics.json`` was written at the end of training, or by an
    evaluation) and no SIGTERM checkpoint says it was stopped since."""
    metrics = read_json(folder / METRICS)
    return (
        metrics is not None
        and isinstance(metrics.get("metrics"), dict)
        and not (folder / CHECKPOINTS / SIGTERM).is_file()
    )


def alive(pid: int, command_has: str | None = None) -> bool:
    """Whether process ``pid`` runs on this machine (a zombie does not: a killed arm whose runner died too is
    never reaped where no init reaps orphans); with ``command_has``, only if its command line holds that text (a
    reused pid is another process)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    proc = Path("/proc") / str(pid)
    try:
        stat = (proc / "stat").read_text()
        if stat[stat.rindex(")") + 2 :].startswith("Z"):
            return False
        if command_has is not None:
            return command_has in (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(
                errors="replace"
            )
    except (OSError, ValueError):
        pass  # no /proc (not Linux): trust kill(pid, 0)
    return True


def arm_state(folder: Path) -> ArmState:
    """Where the arm in ``folder`` stands: done, running (a live process here, or a SLURM job), queued (a
    submitted SLURM job), failed, interrupted (stopped with a checkpoint to resume from, or its process is gone)
    or pending."""
    name, log = folder.name, folder / LOG
    if (folder / DONE).is_file():
        metrics = read_json(folder / METRICS) or {}
        return ArmState(name, "done", f"step {metrics.get('global_step', '?')}", log)
    state = read_json(folder / STATE)
    if state is None:
        return ArmState(name, "pending")
    kind = state.get("state")
    if kind == "queued":
        return ArmState(name, "queued", f"job {state.get('job')}", log)
    if kind == "running":
        if state.get("job"):
            return ArmState(name, "running", f"job {state['job']}", log)
        pid = int(state.get("pid") or 0)
        if state.get("host") == socket.gethostname() and not alive(pid, str(folder.resolve() / ARM_CONFIG)):
            return ArmState(name, "interrupted", "its process is gone", log)
        return ArmState(name, "running", f"pid {state.get('pid')} on {state.get('host')}", log)
    if kind == "failed":
        return ArmState(name, "failed", f"exit status {state.get('returncode')}", log)
    if kind == "interrupted":
        return ArmState(name, "interrupted", state.get("detail", ""), log)
    return ArmState(name, "pending")


def mark(folder: Path, state: str, **fields: Any) -> None:
    """Record the arm's state (``running``, ``failed``, ``interrupted``) with the time and this host."""
    write_json(folder / STATE, {"state": state, "time": time.time(), "host": socket.gethostname(), **fields})


def mark_done(folder: Path, **fields: Any) -> None:
    """Write the done marker, last and atomically; the arm is never run again."""
    write_json(folder / DONE, {"finished": time.time(), "host": socket.gethostname(), **fields})


def progress(folder: Path, names: list[str]) -> str:
    """The progress view: one line per arm (state, detail, log of a failed arm) and the counts."""
    states = [arm_state(folder / name) for name in names]
    width = max([len(s.name) for s in states] + [3])
    lines = [f"{'arm':<{width}}  {'state':<11}  detail"]
    for s in states:
        detail = s.detail
        if s.state == "failed" and s.log is not None:
            detail = f"{detail}; log {s.log}"
        lines.append(f"{s.name:<{width}}  {s.state:<11}  {detail}".rstrip())
    counts = {k: sum(s.state == k for s in states) for k in STATES}
    lines.append(", ".join(f"{counts[k]} {k}" for k in STATES if counts[k]) + f" (of {len(states)})")
    return "\n".join(lines)
