"""The training DataModule under Lightning: batches follow the mixture plan epoch by epoch, a run resumed
mid-epoch sees exactly the samples (and losses) and continues the counts of an uninterrupted run, whatever the
number of workers, also when a schedule spanning the run makes Lightning build the loader before it restores
the checkpoint."""

import lightning as L
import pytest
import torch

from lit_mllm.training import WarmupCosine
from tests.conftest import Record, shapes_data, tiny_fit, tiny_model


def fit(
    root,
    tmp_path,
    max_steps,
    ckpt_path=None,
    num_workers=0,
    save_every=None,
    module=None,
    callbacks=(),
    **trainer,
):
    model, record = tiny_model(module=module), Record()
    dm = shapes_data(root, batch_size=4, num_workers=num_workers, seed=7)
    dm.connect(model.processor())
    tiny_fit(model, dm, max_steps, tmp_path, ckpt_path, save_every, callbacks=[record, *callbacks], **trainer)
    return record, dm


class WorkerPids(L.Callback):
    """The process ids of the training loader's workers at the end of each epoch."""

    def __init__(self) -> None:
        self.pids = []

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        iterator = trainer.train_dataloader._iterator  # torch's multi-process iterator; None without workers
        self.pids.append([w.pid for w in iterator._workers] if iterator is not None else [])


@pytest.mark.parametrize("workers", [0, 2])
def test_batches_follow_the_plan_across_epochs(shapes_root, tmp_path, workers):
    """Epoch 1 follows its own plan also in loader workers started in epoch 0 (they persist: the same
    processes serve both epochs, reading the epoch the main process sets)."""
    pids = WorkerPids()
    record, dm = fit(shapes_root, tmp_path, max_steps=18, num_workers=workers, callbacks=[pids])
    plan = [b for e in (0, 1, 2) for b in dm.mixture().batches(e)]  # 6 batches per epoch: 3 epochs
    source = dm.sources("fit")["shapesworld"]
    assert record.ids == [[source.sample(i, "<image>").id for _, i in b] for b in plan]
    assert record.stats[-1]["data/ratio/shapesworld"] == 1.0
    if workers:
        assert len(pids.pids) == 3 and len(pids.pids[0]) == workers
        assert pids.pids[0] == pids.pids[1] == pids.pids[2]


def test_mid_epoch_resume_sees_the_same_samples_and_losses(shapes_root, tmp_path):
    full, _ = fit(shapes_root, tmp_path / "full", max_steps=9)
    fit(shapes_root, tmp_path / "a", max_steps=3, save_every=3)
    ckpt = next((tmp_path / "a").glob("*step=3*.ckpt"))
    state = torch.load(ckpt, weights_only=False)["MixtureData"]  # the DataModule's checkpoint state
    assert (state["epoch"], state["next_batch"]) == (0, 3)
    assert state["counts"] == {"seen": 12, "source/shapesworld": 12}
    resumed, _ = fit(shapes_root, tmp_path / "b", max_steps=9, ckpt_path=str(ckpt), num_workers=2)
    assert resumed.ids == full.ids[3:]
    assert resumed.losses == pytest.approx(full.losses[3:], rel=1e-5, abs=1e-6)
    assert resumed.stats == full.stats[3:]


def test_resume_in_a_later_epoch_under_a_schedule_that_spans_the_run(shapes_root, tmp_path):
    """A schedule without ``total_steps`` asks for ``trainer.estimated_stepping_batches``, which makes Lightning
    build the training loader (and call ``iter``) before it restores the checkpoint's loops: the loader's own state
    is then never loaded and ``current_epoch`` still reads 0. The resume must still continue epoch 1 at batch 2."""
    module = {"scheduler": lambda optimizer: WarmupCosine(optimizer, warmup_steps=2)}
    epochs = {"max_epochs": 2}  # 6 batches per epoch; a checkpoint after step 8
    full, _ = fit(shapes_root, tmp_path / "full", -1, module=module, save_every=8, **epochs)
    ckpt = next((tmp_path / "full").glob("*step=8*.ckpt"))
    state = torch.load(ckpt, weights_only=False)["MixtureData"]
    assert (state["epoch"], state["next_batch"], state["counts"]["seen"]) == (1, 2, 32)
    for workers in (0, 2):
        resumed, dm = fit(
            shapes_root, tmp_path / f"r{workers}", -1, str(ckpt), workers, module=module, **epochs
        )
        assert resumed.ids == full.ids[8:]
        assert resumed.losses == full.losses[8:]  # the same computation on the same CPU: bit-identical
        assert resumed.stats == full.stats[8:]
        assert dm.counts == {"seen": 48, "source/shapesworld": 48}


def test_resume_refuses_another_seed(shapes_root):
    dm = shapes_data(shapes_root, seed=1)
    with pytest.raises(ValueError, match="seed 7"):
        dm.load_plan_state({"epoch": 0, "next_batch": 3, "counts": {}, "seed": 7})
