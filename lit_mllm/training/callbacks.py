"""Run-time policy for long and distributed runs: a checkpoint on SIGTERM that every rank agrees on, and the FSDP
wrap policy read off the model's parts.

SIGTERM (preemption, ``scancel``, a time limit, Kubernetes eviction) may reach one rank, several or all, at
different moments. :class:`CheckpointOnSigterm` only notes it in the signal handler; after each optimizer step
the ranks agree (one all-reduce of a flag) whether any rank was signalled, and if so all of them save one
checkpoint together at that same step, finish the step as Lightning would (its logged metrics, the validation
due at that step, the epoch's end when the step ended it) and stop with Lightning's ``SIGTERMException`` before
the next step or epoch starts (the process exits 0). The checkpoint holds the DataModule's plan position, so
``--ckpt_path`` resumes at the next batch of the plan, and the interrupted and the resumed run together log what
an uninterrupted run logs (Lightning does not repeat, on resume, the validation of the step the checkpoint was
saved at: the interrupted run ran it).

Lightning's own SIGTERM handling is replaced while the callback is active: its handler runs a collective
broadcast inside the signal handler and stops each rank on its own flag, which hangs a DDP run when SIGTERM
reaches a rank other than 0 only (one node of several preempted). Lightning restores its handlers at teardown.

:class:`PartBlocks` is an FSDP auto-wrap (and activation-checkpointing) policy: every transformer block of the
parts (the tower's :attr:`~lit_mllm.nn.vision.base.VisionTower.blocks`, the LLM's decoder layers), the vision
tower and the connector become FSDP units of their own; the LLM's embeddings, final norm and head stay in the
root. A stage freezes whole parts or whole blocks, so every unit's parameters are all trainable or all frozen.

The console's progress display (:func:`console_progress_bar`, which the CLI adds unless the config names a
progress bar): on a terminal, Lightning's tqdm bar without ``v_num`` (:class:`TerminalProgressBar`; Lightning's
default Rich bar wraps its metrics column at every space on an 80-column console); elsewhere (a log file, a SLURM
job's output) :class:`ProgressLines`, one plain line every N steps with the step, the training metrics, samples/s
and the time left, and one line per validation.
"""

from __future__ import annotations

import math
import signal
import sys
import threading
import time
from collections.abc import Mapping
from datetime import timedelta
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint, ProgressBar, TQDMProgressBar
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.exceptions import SIGTERMException
from torch import nn
from torch.distributed.fsdp.wrap import ModuleWrapPolicy


class CheckpointOnSigterm(L.Callback):
    """On SIGTERM (to any rank): every rank stops after the current optimizer step, one checkpoint is saved, and
    the run exits 0 with a message naming the checkpoint and how to resume."""

    def __init__(self, dirpath: str | None = None, filename: str = "sigterm.ckpt") -> None:
        """
        Args:
            dirpath: Folder of the checkpoint; default the ModelCheckpoint's folder, else
                ``<default_root_dir>/checkpoints``. Set a fixed folder for requeued jobs, so the next job finds it.
            filename: File name of the checkpoint; a later SIGTERM overwrites it, a run that completes removes it.
        """
        self.dirpath, self.filename = dirpath, filename
        self.received = False
        self._handler_set = False
        self._saved = False  # this run's checkpoint is saved: stop before the next step or epoch

    def path(self, trainer: L.Trainer) -> Path:
        """Where the checkpoint goes."""
        if self.dirpath is not None:
            return Path(self.dirpath) / self.filename
        callback = trainer.checkpoint_callback
        if isinstance(callback, ModelCheckpoint) and callback.dirpath is not None:
            return Path(callback.dirpath) / self.filename
        return Path(trainer.default_root_dir) / "checkpoints" / self.filename

    def _on_sigterm(self, signum: int, frame: Any) -> None:
        self.received = True  # acted on after the step, by every rank together

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Lightning registered its handlers just before; it restores the previous ones at teardown.
        self.received, self._saved = False, False
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, self._on_sigterm)
            self._handler_set = True

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if not self._handler_set or (batch_idx + 1) % trainer.accumulate_grad_batches:
            return  # between the micro-batches of one optimizer step
        if self._saved or not trainer.strategy.reduce_boolean_decision(self.received, all=False):
            return
        # Saved here, where Lightning's own step checkpoints are saved (it resumes them at the next batch); the
        # stop waits until Lightning has logged this step's metrics and run the validation due at this step.
        path = self.path(trainer)
        trainer.save_checkpoint(path)
        self._saved = True
        rank_zero_info(
            f"SIGTERM: stopped after step {trainer.global_step} (epoch {trainer.current_epoch}, batch {batch_idx}) "
            f"and saved {path}. Resume with the same command and `--ckpt_path {path}`."
        )

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self._saved:
            raise SIGTERMException()  # the next step's batch is drawn but not trained: the resume trains it

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._saved:
            raise SIGTERMException()  # the saved step ended the previous epoch, whose end has run

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        path = self.path(trainer)
        if trainer.is_global_zero and path.is_file():
            path.unlink()
            rank_zero_info(f"the run completed: removed the interrupted run's checkpoint {path}")


def part_blocks(part: nn.Module) -> list[nn.Module]:
    """The transformer blocks of a part: a vision tower's ``blocks`` (none if it exposes none), a language model's
    decoder layers (a family's layer wrapper with its HF layer inside, the checkpoint / compile wrappers left out:
    those go around the FSDP unit); none for other parts."""
    from lit_mllm.nn.language.layers import without_efficiency
    from lit_mllm.nn.language.model import LanguageModel
    from lit_mllm.nn.vision.base import VisionTower

    if isinstance(part, VisionTower):
        try:
            return list(part.blocks)
        except NotImplementedError:
            return []
    if isinstance(part, LanguageModel):
        return [without_efficiency(layer) for layer in part.decoder_layers]
    return []


class PartBlocks(ModuleWrapPolicy):
    """FSDP policy: every block class found in the family's parts is wrapped, and so are the parts the family
    calls as modules (the vision tower, the connector).

    The block classes are read from the model when FSDP wraps it (for example ``LlamaDecoderLayer`` and
    ``CLIPEncoderLayer``), so one strategy config serves every preset. The language model is not wrapped as a
    whole: the family calls its ``embed``/``head`` methods, which an FSDP unit does not see, so its embeddings,
    final norm and head stay in the root unit (for any stage all trainable or all frozen, like every other unit).
    As ``activation_checkpointing_policy`` use ``wrap_parts: false`` (checkpoint blocks, not whole parts)."""

    def __init__(self, wrap_parts: bool = True) -> None:
        """
        Args:
            wrap_parts: Also wrap the vision tower and the connector as units of their own (then no unit mixes
                trainable and frozen parameters); False wraps the blocks only.
        """
        super().__init__(set())
        self.wrap_parts = wrap_parts
        self._parts: list[nn.Module] = []

    def resolve(self, root: nn.Module) -> None:
        """Read the block classes (and the parts to wrap) off the family module inside ``root``, which may be
        wrapped in FSDP already (activation checkpointing is applied after FSDP)."""
        from torch.distributed.fsdp import FullyShardedDataParallel

        from lit_mllm.nn.language.model import LanguageModel
        from lit_mllm.nn.vision.base import VisionTower

        family = next((m for m in root.modules() if callable(getattr(m, "parts", None))), None)
        if family is None:
            raise TypeError(
                f"PartBlocks wraps the parts of a lit_mllm family module; {type(root).__name__} holds none"
            )
        parts = family.parts()
        carriers = [m for m in root.modules() if isinstance(m, VisionTower | LanguageModel)]
        self._module_classes = {
            type(b.module if isinstance(b, FullyShardedDataParallel) else b)
            for m in carriers
            for b in part_blocks(m)
        }
        self._module_classes_str = str(self._module_classes)
        self._parts = [
            p
            for p in parts.values()
            if self.wrap_parts and not isinstance(p, LanguageModel) and any(True for _ in p.parameters())
        ]

    def _run_policy(
        self, root_module: nn.Module, ignored_modules: set[nn.Module], root_kwargs: dict[str, Any]
    ) -> dict[nn.Module, dict[str, Any]]:
        """FSDP's entry point: the modules to wrap, each with the root's FSDP arguments."""
        self.resolve(root_module)
        targets = super()._run_policy(root_module, ignored_modules, root_kwargs)
        for part in self._parts:
            if part not in ignored_modules:
                targets.setdefault(part, dict(root_kwargs))
        return targets

    def __call__(self, module: nn.Module, recurse: bool, *args: Any, **kwargs: Any) -> bool:
        """The recursive entry point (activation checkpointing calls it, the root first)."""
        if not self._module_classes:
            self.resolve(module)
        if recurse:
            return True
        return isinstance(module, tuple(self._module_classes)) or any(module is p for p in self._parts)


# -- the console's progress display ------------------------------------------------------------------------------
def console_progress_bar(every_n_steps: int | None = None) -> ProgressBar:
    """The progress display for this process's standard output: :class:`TerminalProgressBar` on a terminal,
    :class:`ProgressLines` (every ``every_n_steps`` steps) when it is a file or a pipe."""
    return TerminalProgressBar() if sys.stdout.isatty() else ProgressLines(every_n_steps)


class TerminalProgressBar(TQDMProgressBar):
    """Lightning's tqdm bar without the logger's version number (``v_num``) among its metrics; tqdm keeps the
    metrics on the bar's line (shortening the bar to fit the terminal)."""

    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        items = super().get_metrics(trainer, pl_module)
        items.pop("v_num", None)
        return items


class ProgressLines(ProgressBar):
    """Plain progress lines on standard output, for output that is not a terminal (there a progress bar is a
    stream of carriage returns, or nothing):

        step 40/500 (epoch 0) | train/loss 0.912 | 85.3 samples/s | ETA 0:03:10
        validation at step 62 | val/loss 0.416 | val/accuracy 0.490
        training ended at step 500 after 0:05:12

    A step line every ``every_n_steps`` optimizer steps with the progress bar's training metrics (those not named
    ``val/...`` or ``test/...``), the samples per second since the previous line (this rank's count times the
    number of ranks) and the time left at the run's average step time; a line after each validation with its
    metrics; one when training ends. Only global rank 0 prints."""

    def __init__(self, every_n_steps: int | None = None) -> None:
        """
        Args:
            every_n_steps: Optimizer steps between two lines; default the trainer's ``log_every_n_steps``.
        """
        super().__init__()
        if every_n_steps is not None and every_n_steps < 1:
            raise ValueError(f"every_n_steps must be at least 1, got {every_n_steps}")
        self.every_n_steps = every_n_steps
        self._enabled = True
        self._start = self._since = 0.0
        self._start_step = self._last_step = 0
        self._samples = 0

    @property
    def is_enabled(self) -> bool:
        return self._enabled

    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start = self._since = time.monotonic()
        # a resumed run starts at its checkpoint's step
        self._start_step = self._last_step = trainer.global_step
        self._samples = 0

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._samples += _batch_size(batch)
        step = trainer.global_step
        every = self.every_n_steps or trainer.log_every_n_steps or 50
        if not self._enabled or step == self._last_step or step % every:
            return
        now = time.monotonic()
        total = trainer.estimated_stepping_batches
        head = f"step {step}/{int(total)}" if math.isfinite(total) else f"step {step}"
        fields = [f"{head} (epoch {trainer.current_epoch})"]
        fields += [
            _show(k, v) for k, v in self._metrics(trainer, pl_module) if not k.startswith(("val/", "test/"))
        ]
        if self._samples and now > self._since:
            fields.append(f"{self._samples * trainer.world_size / (now - self._since):.1f} samples/s")
        if math.isfinite(total) and step > self._start_step:
            left = (total - step) * (now - self._start) / (step - self._start_step)
            fields.append(f"ETA {timedelta(seconds=round(max(left, 0.0)))}")
        self.print(" | ".join(fields), flush=True)
        self._last_step, self._since, self._samples = step, now, 0

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self._enabled or trainer.sanity_checking or trainer.state.fn != "fit":
            return  # validate/test runs end with Lightning's own table of metrics
        shown = [_show(k, v) for k, v in self._metrics(trainer, pl_module) if k.startswith("val/")]
        self.print(" | ".join([f"validation at step {trainer.global_step}", *shown]), flush=True)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._enabled:
            took = timedelta(seconds=round(time.monotonic() - self._start))
            self.print(f"training ended at step {trainer.global_step} after {took}", flush=True)

    def _metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> list[tuple[str, Any]]:
        return [(k, v) for k, v in self.get_metrics(trainer, pl_module).items() if k != "v_num"]


def _batch_size(batch: Any) -> int:
    """Samples in a batch: ``len`` of a batch object (our :class:`~lit_mllm.data.Batch`), the first dimension of a
    tensor; 0 (not counted) for anything else."""
    if hasattr(batch, "shape") and len(batch.shape):
        return int(batch.shape[0])
    if hasattr(batch, "__len__") and not isinstance(batch, (Mapping, list, tuple, str)):
        return len(batch)
    return 0


def _show(name: str, value: Any) -> str:
    """``name value``: three decimals (``0.000`` too), or three significant digits below 0.001 and from 10,000."""
    if hasattr(value, "item"):
        value = value.item()
    if not isinstance(value, float):
        return f"{name} {value}"
    return f"{name} {value:.3f}" if value == 0 or 1e-3 <= abs(value) < 1e4 else f"{name} {value:.3g}"
