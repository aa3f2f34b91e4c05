"""The quickstart, stopped by SIGTERM mid-epoch through the CLI and resumed with the same command and
``--ckpt_path``, logs what an uninterrupted run logs: every scalar in its TensorBoard events, the mixture counts,
``data/ratio/*`` and the skipped-sample budget.

The quickstart config is shortened (a small ShapesWorld, two epochs of 4 batches of 6) and kept where resume
used to differ: ``val_check_interval: 0.5`` (a validation mid-epoch), two loader workers, the full stage (the
tower trains), the warmup-cosine schedule spanning the run, the three callbacks. Two sources (the second the
first under another name and weight) make the realised ratio vary, and three training images are deleted so
``on_bad_sample: skip`` has skips to count. Scalars are compared for exact equality: both runs do the same
computation in the same process on the same CPU, which gives the same bits.
"""

from __future__ import annotations

import signal
from pathlib import Path

import lightning as L
import pytest
import yaml

from lit_mllm.cli import run
from lit_mllm.data import ShapesWorld
from lit_mllm.training.callbacks import CheckpointOnSigterm

QUICKSTART = Path(__file__).resolve().parents[1] / "configs" / "quickstart.yaml"


class SigtermAt(L.Callback):
    """Sends this process a real SIGTERM at the end of the training step that makes ``global_step == step``,
    before :class:`CheckpointOnSigterm` looks for it (this callback comes first in the list)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step != self.step:
            return
        sigterm = next(c for c in trainer.callbacks if isinstance(c, CheckpointOnSigterm))
        if signal.getsignal(signal.SIGTERM) != sigterm._on_sigterm:
            raise AssertionError(
                "CheckpointOnSigterm's handler is not installed: SIGTERM would end the tests"
            )
        signal.raise_signal(signal.SIGTERM)  # its Python handler runs right after, in this (the main) thread
        assert sigterm.received


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    """The quickstart's dataset, small, with three training images missing."""
    root = tmp_path_factory.mktemp("resume") / "shapesworld"
    ShapesWorld(num_train=24, num_val=8, num_test=4).write(root)
    for i in (5, 11, 20):
        (root / "images" / f"train_{i:06d}.png").unlink()
    return root


def overlay(root: Path, out: Path) -> Path:
    """The shortening, as a config stacked on the quickstart's."""
    sources = {
        "shapesworld": {"class_path": "lit_mllm.data.Conversations", "init_args": {"path": "train.json"}},
        "twin": {
            "class_path": "lit_mllm.data.Conversations",
            "init_args": {"path": "train.json", "weight": 0.5},
        },
    }
    config = {
        "trainer": {"max_epochs": 2, "log_every_n_steps": 1, "enable_progress_bar": False},
        "data": {
            "init_args": {
                "root": str(root),
                "train": sources,
                "batch_size": 6,
                "samples_per_epoch": 24,
                "on_bad_sample": "skip",
                "max_bad_fraction": 0.5,
            }
        },
    }
    path = out / "shorter.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def fit(root: Path, out: Path, *args: str):
    """``lit-mllm fit`` of the shortened quickstart writing TensorBoard events under ``out``, with
    :class:`CheckpointOnSigterm` (its checkpoint in ``out/ckpt``); returns the CLI, or None when SIGTERM stopped
    the run (which must exit 0)."""
    out.mkdir(parents=True, exist_ok=True)
    command = ["fit", "--config", str(QUICKSTART), "--config", str(overlay(root, out))]
    command += ["--trainer.logger.init_args.save_dir", str(out), *args]
    command += ["--trainer.callbacks+=lit_mllm.training.callbacks.CheckpointOnSigterm"]
    command += ["--trainer.callbacks.dirpath", str(out / "ckpt")]
    try:
        return run(command)
    except SystemExit as stop:
        assert stop.code in (0, None), f"the interrupted run exited {stop.code}"
        return None


def scalars(out: Path) -> dict[tuple[str, int], list[float]]:
    """Every scalar of every run under ``out``: (tag, step) -> the values logged there, in file order."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    found: dict[tuple[str, int], list[float]] = {}
    for events in sorted(out.rglob("events.out.tfevents.*")):
        accumulator = EventAccumulator(str(events), size_guidance={"scalars": 0})
        accumulator.Reload()
        for tag in accumulator.Tags()["scalars"]:
            for event in accumulator.Scalars(tag):
                found.setdefault((tag, event.step), []).append(event.value)
    return found


@pytest.fixture(scope="module")
def uninterrupted(data_root, tmp_path_factory):
    """The uninterrupted run: its CLI and its scalars, each logged once (or repeated with the same value)."""
    out = tmp_path_factory.mktemp("full")
    cli = fit(data_root, out)
    logged = scalars(out)
    for key, values in logged.items():
        assert len(set(values)) == 1, f"{key}: the uninterrupted run logged {values}"
    assert {tag for tag, _ in logged} >= {"train/loss", "val/loss", "val/accuracy", "data/ratio/twin"}
    return cli, logged


@pytest.mark.parametrize(
    "stop",
    [
        5,  # epoch 1, batch 0: the resumed run's first step is followed by the mid-epoch validation
        pytest.param(6, marks=pytest.mark.slow),  # epoch 1, batch 1: a step the mid-epoch validation follows
        pytest.param(4, marks=pytest.mark.slow),  # epoch 0, batch 3: the epoch's last step
    ],
)
def test_a_sigterm_resumed_quickstart_logs_what_an_uninterrupted_run_logs(
    uninterrupted, data_root, tmp_path, stop
):
    """SIGTERM during step ``stop`` of 8 (4 batches per epoch, a validation after batches 1 and 3)."""
    full, expected = uninterrupted
    stopper = [
        "--trainer.callbacks+=tests.test_resume_quickstart.SigtermAt",
        "--trainer.callbacks.step",
        str(stop),
    ]
    assert fit(data_root, tmp_path, *stopper) is None
    ckpt = tmp_path / "ckpt" / "sigterm.ckpt"
    assert ckpt.is_file()
    resumed = fit(data_root, tmp_path, "--ckpt_path", str(ckpt))  # the same command, resumed
    assert not ckpt.exists()  # the completed run removed it

    got = scalars(tmp_path)  # the interrupted run's events and the resumed run's
    after = {key for key in got if key[1] >= stop}
    assert ("train/loss", stop) in after and ("val/loss", 7) in after  # the resumed run logged
    assert got.keys() == expected.keys()
    for key, values in expected.items():  # a step logged by both (the next step's lr) must agree too
        assert set(got[key]) == set(values), (
            f"{key}: uninterrupted {values[0]}, interrupted + resumed {got[key]}"
        )

    # the DataModule's own figures: counts per source and the skips (the bad-sample budget), continued
    assert resumed.datamodule.counts == full.datamodule.counts
    assert resumed.datamodule.stats() == full.datamodule.stats()
    assert full.datamodule.counts["skipped/missing_file"] > 0
    assert 0 < full.datamodule.stats()["data/ratio/twin"] < 1
