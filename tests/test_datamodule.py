"""The training DataModule under Lightning: batches follow the mixture plan epoch by epoch, a run resumed
mid-epoch sees exactly the samples (and losses) of an uninterrupted run, whatever the number of workers."""

import pytest
import torch

from tests.conftest import Record, shapes_data, tiny_fit, tiny_model


def fit(root, tmp_path, max_steps, ckpt_path=None, num_workers=0, save_every=None):
    model, record = tiny_model(), Record()
    dm = shapes_data(root, batch_size=4, num_workers=num_workers, seed=7)
    dm.connect(model.processor())
    tiny_fit(model, dm, max_steps, tmp_path, ckpt_path, save_every, callbacks=[record])
    return record, dm


def test_batches_follow_the_plan_across_epochs(shapes_root, tmp_path):
    record, dm = fit(shapes_root, tmp_path, max_steps=9)  # 6 batches per epoch: crosses into epoch 1
    plan = [b for e in (0, 1) for b in dm.mixture().batches(e)]
    source = dm.sources("fit")["shapesworld"]
    assert record.ids == [[source.sample(i, "<image>").id for _, i in b] for b in plan[:9]]
    assert record.stats[-1]["data/ratio/shapesworld"] == 1.0


def test_mid_epoch_resume_sees_the_same_samples_and_losses(shapes_root, tmp_path):
    full, _ = fit(shapes_root, tmp_path / "full", max_steps=9)
    fit(shapes_root, tmp_path / "a", max_steps=3, save_every=3)
    ckpt = next((tmp_path / "a").glob("*step=3*.ckpt"))
    state = torch.load(ckpt, weights_only=False)["loops"]["fit_loop"]["state_dict"]["combined_loader"][0]
    assert (state["epoch"], state["next_batch"]) == (0, 3)
    resumed, _ = fit(shapes_root, tmp_path / "b", max_steps=9, ckpt_path=str(ckpt), num_workers=2)
    assert resumed.ids == full.ids[3:]
    assert resumed.losses == pytest.approx(full.losses[3:], rel=1e-5, abs=1e-6)


def test_resume_refuses_another_seed(shapes_root):
    dm = shapes_data(shapes_root, seed=1)
    with pytest.raises(ValueError, match="seed 7"):
        dm.load_plan_state({"epoch": 0, "next_batch": 3, "counts": {}, "seed": 7})
