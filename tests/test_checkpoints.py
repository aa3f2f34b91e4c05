"""Checkpoints: atomic writes (an interrupted write leaves the previous file and no partial one), reads with
``weights_only=True`` (the stage dataclasses allowed, anything else refused by name), resume through the plugin;
SIGTERM to a running ``lit-mllm fit``: one checkpoint, exit 0, and a resume that continues at the next batch
with the samples and losses of an uninterrupted run; SIGTERM to one DDP rank stops every rank at the same step."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml

from lit_mllm.cli import run
from lit_mllm.training import Stage
from lit_mllm.training.callbacks import CheckpointOnSigterm
from lit_mllm.training.checkpoints import (
    AtomicCheckpointIO,
    UnsafeCheckpoint,
    atomic_save,
    read_checkpoint,
    safe_globals,
)
from lit_mllm.training.peft import LoRA
from tests.conftest import Record, shapes_data, tiny_fit, tiny_model

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"


# -- atomic writes ------------------------------------------------------------------------------------------------
class Unpicklable:
    """Stops ``torch.save`` part-way: the tensors before it are already written when it is reached."""

    def __init__(self, error: type[BaseException]) -> None:
        self.error = error

    def __reduce__(self):
        raise self.error("interrupted mid-write")


@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
def test_interrupted_write_leaves_the_previous_checkpoint_and_no_partial_file(tmp_path, error):
    path = tmp_path / "last.ckpt"
    atomic_save({"step": 1, "w": torch.arange(10.0)}, path)
    before = path.read_bytes()
    with pytest.raises(error, match="interrupted mid-write"):
        atomic_save({"step": 2, "w": torch.zeros(100_000), "then": Unpicklable(error)}, path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]
    assert torch.load(path, weights_only=True)["step"] == 1


def test_plugin_writes_then_replaces(tmp_path):
    io = AtomicCheckpointIO()
    path = tmp_path / "sub" / "a.ckpt"
    io.save_checkpoint({"step": 1}, path)
    io.save_checkpoint({"step": 2}, path)
    assert io.load_checkpoint(path)["step"] == 2
    assert [p.name for p in path.parent.iterdir()] == ["a.ckpt"]
    with pytest.raises(TypeError, match="storage_options"):
        io.save_checkpoint({"step": 3}, path, storage_options={"x": 1})


# -- weights_only reads -------------------------------------------------------------------------------------------
def fit(root, out, max_steps, ckpt_path=None, plugins=(), save_every=None, stage=None, **trainer):
    """A plain Trainer (no CLI): the module's hyperparameters hold the Stage object itself."""
    model, record = (
        tiny_model(stage or Stage(name="finetune", trainable=["connector", "language_model"])),
        Record(),
    )
    dm = shapes_data(root, batch_size=4, seed=5)
    dm.connect(model.processor())
    tiny_fit(
        model, dm, max_steps, out, ckpt_path, save_every, callbacks=[record], plugins=list(plugins), **trainer
    )
    return record


@pytest.fixture(scope="module")
def trainer_checkpoint(shapes_root, tmp_path_factory):
    """A checkpoint written at step 3 by a plain Trainer with the plugin, and the ids/losses of 6 steps."""
    out = tmp_path_factory.mktemp("ckpt")
    full = fit(shapes_root, out / "full", max_steps=6)
    fit(shapes_root, out, max_steps=3, plugins=[AtomicCheckpointIO()], save_every=3)
    return next(out.glob("*step=3*.ckpt")), full


def test_stage_dataclasses_load_with_weights_only(trainer_checkpoint):
    path, _ = trainer_checkpoint
    with pytest.raises(Exception, match="Stage"):  # torch's default allow-list refuses our dataclass
        torch.load(path, weights_only=True)
    checkpoint = read_checkpoint(path)
    assert checkpoint["hyper_parameters"]["stage"] == Stage(
        name="finetune", trainable=["connector", "language_model"]
    )


def test_anything_else_is_refused_by_name(tmp_path):
    path = tmp_path / "odd.ckpt"
    atomic_save({"state_dict": {}, "extra": Record()}, path)
    with pytest.raises(UnsafeCheckpoint, match="Record.*weights_only=False"):
        read_checkpoint(path)
    assert isinstance(read_checkpoint(path, weights_only=False)["extra"], Record)


@dataclasses.dataclass
class ProbeInner:
    """Reached only through :class:`Probe`'s field hint."""

    word: str = "x"


@dataclasses.dataclass
class Probe:
    """Declared here and named only by :class:`ProbeModule`'s ``__init__`` hint: no lit_mllm module knows it."""

    depth: int = 2
    inner: ProbeInner | None = None


@dataclasses.dataclass
class Unnamed:
    """A dataclass no LightningModule names."""

    depth: int = 2


class ProbeModule(L.LightningModule):
    def __init__(self, probe: Probe | None = None) -> None:
        super().__init__()
        self.probe = probe


def test_a_dataclass_named_by_any_lightning_module_loads_with_weights_only(tmp_path):
    path = tmp_path / "probe.ckpt"
    probe = Probe(depth=3, inner=ProbeInner("y"))
    atomic_save({"state_dict": {}, "hyper_parameters": {"probe": probe}}, path)
    with pytest.raises(Exception, match="Probe"):  # torch's default allow-list refuses it
        torch.load(path, weights_only=True)
    assert read_checkpoint(path)["hyper_parameters"]["probe"] == probe
    assert {Probe, ProbeInner, Stage} <= set(safe_globals()) and Unnamed not in safe_globals()
    atomic_save({"state_dict": {}, "hyper_parameters": {"other": Unnamed()}}, path)
    with pytest.raises(UnsafeCheckpoint, match="Unnamed"):
        read_checkpoint(path)


def test_resume_through_the_plugin_continues_the_run(trainer_checkpoint, shapes_root, tmp_path):
    path, full = trainer_checkpoint
    resumed = fit(shapes_root, tmp_path, max_steps=6, ckpt_path=str(path), plugins=[AtomicCheckpointIO()])
    assert resumed.ids == full.ids[3:]
    assert resumed.losses == pytest.approx(full.losses[3:], rel=1e-5, abs=1e-6)


DROPOUT = Stage(
    name="lora",
    trainable=["connector"],
    lora={"language_model": LoRA(r=4, alpha=4.0, dropout=0.5, target_modules=["q_proj", "v_proj"])},
)


def test_a_resume_draws_the_dropout_masks_of_an_uninterrupted_run(shapes_root, tmp_path):
    """LoRA dropout draws from torch's generator; so do validations and loader iterators between steps, and
    Lightning saves no generator state. Each training step seeds its own draws (``VLMModule.seed_step``), so the
    resumed run's losses are those of the uninterrupted one, bit for bit (same computation on the same CPU)."""
    validating = {"limit_val_batches": 1, "val_check_interval": 2, "num_sanity_val_steps": 0}
    full = fit(shapes_root, tmp_path / "full", 6, stage=DROPOUT, save_every=3, **validating)
    ckpt = next((tmp_path / "full").glob("*step=3*.ckpt"))
    assert isinstance(read_checkpoint(ckpt)["lit_mllm"]["run_seed"], int)
    resumed = fit(shapes_root, tmp_path, 6, str(ckpt), [AtomicCheckpointIO()], stage=DROPOUT, **validating)
    assert resumed.ids == full.ids[3:]
    assert resumed.losses == full.losses[3:]


def test_without_the_plugin_lightning_refuses_that_checkpoint(trainer_checkpoint, shapes_root, tmp_path):
    """The control: Lightning 2.6 reads with torch's default weights_only=True, which refuses the Stage."""
    path, _ = trainer_checkpoint
    with pytest.raises(Exception, match="Unsupported global.*Stage"):
        fit(shapes_root, tmp_path, max_steps=6, ckpt_path=str(path))


# -- SIGTERM ------------------------------------------------------------------------------------------------------
class PauseAt(L.Callback):
    """Test helper in the fit subprocess: records ids and losses (``<marker><rank>.json``); after step ``step``
    writes ``<marker><rank>`` holding its pid and waits (at most ``limit_s``, so a broken test cannot hang) until
    the test has created ``<marker>.go`` and, on the ``signalled`` rank, until that rank's SIGTERM has arrived."""

    def __init__(self, step: int, marker: str, signalled: int = 0, limit_s: float = 120.0) -> None:
        self.step, self.marker, self.signalled, self.limit_s = step, marker, signalled, limit_s
        self.rows: list[dict] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        rank = trainer.global_rank
        self.rows.append({"ids": batch.ids, "loss": float(outputs["loss"])})
        Path(f"{self.marker}{rank}.json").write_text(json.dumps(self.rows))
        if trainer.global_step != self.step:
            return
        sigterm = next(c for c in trainer.callbacks if isinstance(c, CheckpointOnSigterm))
        Path(f"{self.marker}{rank}").write_text(str(os.getpid()))
        go, waited = Path(f"{self.marker}.go"), 0.0
        while not (go.exists() and (sigterm.received or rank != self.signalled)) and waited < self.limit_s:
            time.sleep(0.05)
            waited += 0.05


def run_config(root: Path, out: Path, max_steps: int, callbacks: list[dict]) -> Path:
    """The quickstart model and data on the small ShapesWorld, checkpoints through the plugin, in ``out``."""
    config = yaml.safe_load((CONFIGS / "quickstart.yaml").read_text())
    config["trainer"].update(
        max_steps=max_steps,
        max_epochs=None,
        limit_val_batches=0,
        logger=False,
        default_root_dir=str(out),
        enable_progress_bar=False,
        plugins=[{"class_path": "lit_mllm.training.checkpoints.AtomicCheckpointIO"}],
        callbacks=callbacks,
    )
    data = config["data"]["init_args"]
    data.update(root=str(root), batch_size=4, num_workers=1, seed=5)
    del data["generate_if_missing"]
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"run{max_steps}-{len(callbacks)}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def sigterm_callback(out: Path) -> dict:
    return {
        "class_path": "lit_mllm.training.callbacks.CheckpointOnSigterm",
        "init_args": {"dirpath": str(out / "ckpt")},
    }


def fit_until_sigterm(config: Path, marker: Path, ranks: int, signalled: int, *args: str) -> str:
    """``lit-mllm fit`` in a subprocess; once every rank paused after its step, SIGTERM to the ``signalled``
    rank's process only. Returns the log; the subprocess must have exited 0. Whatever is left of the run (its own
    process group) is killed at the end, so a broken test cannot leave processes behind or hang."""
    child = subprocess.Popen(
        [sys.executable, "-m", "lit_mllm", "fit", "--config", str(config), *args],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"},
        start_new_session=True,
    )
    try:
        paused = [Path(f"{marker}{r}") for r in range(ranks)]
        deadline = time.monotonic() + 300  # a hang guard, not a timing assertion
        while not all(p.exists() for p in paused) and child.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert all(p.exists() for p in paused), "the run never paused"
        os.kill(int(paused[signalled].read_text()), signal.SIGTERM)
        Path(f"{marker}.go").touch()
        log, _ = child.communicate(timeout=300)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(child.pid, signal.SIGKILL)
        if child.returncode is None:
            print(child.communicate()[0])
    assert child.returncode == 0, log
    return log


def pause_at(step: int, marker: Path, signalled: int = 0) -> dict:
    return {
        "class_path": "tests.test_checkpoints.PauseAt",
        "init_args": {"step": step, "marker": str(marker), "signalled": signalled},
    }


def test_sigterm_saves_exits_0_and_the_resume_continues_at_the_next_batch(shapes_root, tmp_path):
    marker = tmp_path / "paused"
    config = run_config(shapes_root, tmp_path, 5, [pause_at(2, marker), sigterm_callback(tmp_path)])
    log = fit_until_sigterm(config, marker, ranks=1, signalled=0)
    ckpt = tmp_path / "ckpt" / "sigterm.ckpt"
    assert f"SIGTERM: stopped after step 2 (epoch 0, batch 1) and saved {ckpt}" in log
    interrupted = json.loads(Path(f"{marker}0.json").read_text())
    assert len(interrupted) == 2  # mid-epoch: 6 batches per epoch
    # LightningCLI keeps the config's plain data as hyperparameters: torch's own allow-list reads it
    state = torch.load(ckpt, weights_only=True)["MixtureData"]  # the DataModule's plan position and counts
    assert (state["epoch"], state["next_batch"]) == (0, 2)

    # the resumed run and an uninterrupted one, in this process, through the same CLI and config
    resumed = run(
        [
            "fit",
            "--config",
            str(run_config(shapes_root, tmp_path, 5, [sigterm_callback(tmp_path)])),
            "--ckpt_path",
            str(ckpt),
            "--trainer.callbacks+=tests.test_checkpoints.Record",
        ]
    )
    full = run(
        [
            "fit",
            "--config",
            str(run_config(shapes_root, tmp_path / "full", 5, [])),
            "--trainer.callbacks+=tests.test_checkpoints.Record",
        ]
    )
    # (loaded by the CLI as tests.test_checkpoints.Record: another module object than pytest's import of this file)
    resumed_record = next(c for c in resumed.trainer.callbacks if type(c).__name__ == "Record")
    full_record = next(c for c in full.trainer.callbacks if type(c).__name__ == "Record")
    assert [r["ids"] for r in interrupted] == full_record.ids[:2]
    assert resumed_record.ids == full_record.ids[2:]
    assert resumed_record.losses == pytest.approx(full_record.losses[2:], rel=1e-5, abs=1e-6)
    assert not ckpt.exists()  # the completed run removed the interrupted run's checkpoint


def test_sigterm_to_one_ddp_rank_stops_every_rank_at_the_same_step(shapes_root, tmp_path):
    """Two DDP processes (Lightning's own launcher), SIGTERM to rank 1 only (one node of several preempted):
    both ranks stop after the same step and one checkpoint is saved; Lightning's own handling hangs here."""
    marker = tmp_path / "paused"
    config = run_config(
        shapes_root, tmp_path, 5, [pause_at(2, marker, signalled=1), sigterm_callback(tmp_path)]
    )
    ddp = ["--trainer.accelerator", "cpu", "--trainer.devices", "2", "--trainer.strategy", "ddp"]
    log = fit_until_sigterm(config, marker, 2, 1, *ddp)
    ckpt = tmp_path / "ckpt" / "sigterm.ckpt"
    assert f"SIGTERM: stopped after step 2 (epoch 0, batch 1) and saved {ckpt}" in log
    rows = [json.loads(Path(f"{marker}{r}.json").read_text()) for r in range(2)]
    assert [len(r) for r in rows] == [2, 2]
    ids = [i for r in rows for step in r for i in step["ids"]]
    assert len(ids) == len(set(ids))  # the ranks' shares of the plan are disjoint
    checkpoint = read_checkpoint(ckpt)
    assert checkpoint["global_step"] == 2
    state = checkpoint["MixtureData"]
    assert (state["epoch"], state["next_batch"]) == (0, 2)
