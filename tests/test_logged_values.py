"""Logged numbers are right, not only present: ``train/loss/<source>`` is the token mean of that source's supervised
tokens in a two-source batch, and ``val/loss`` the mean over every supervised token of the split whatever the
batches' sizes. Each figure is compared with a reference computed here token by token from the model's logits."""

from __future__ import annotations

import copy

import lightning as L
import pytest
import torch
import torch.nn.functional as F

from lit_mllm.data import Batch, Conversations, MixtureData, TextOnly
from tests.conftest import tiny_fit, tiny_model


def token_losses(model, batch: Batch) -> list[tuple[int, float]]:
    """``(sample, cross-entropy)`` of every supervised token of ``batch``, one position at a time: token ``t`` of
    row ``r`` is learned when ``labels[r, t] != -100`` and is predicted by the logits at ``t - 1``; it belongs to
    sample ``sample_index[r, t]``."""
    with torch.no_grad():
        logits = model(batch).double()  # [R, L, V]
    out = []
    rows, length = batch.labels.shape
    for r in range(rows):
        for t in range(1, length):
            target = int(batch.labels[r, t])
            if target != -100:
                loss = F.cross_entropy(logits[r, t - 1][None], torch.tensor([target]))
                out.append((int(batch.sample_index[r, t]), float(loss)))
    return out


def varied_model():
    """The tiny model with its weights scaled up: a fresh one predicts nearly uniformly, so every token would
    cost about log(V) and a wrong reduction could hide; scaled, token losses range widely."""
    model = tiny_model()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(3.0)
    return model


def mean(values) -> float:
    values = list(values)
    return sum(values) / len(values)


class FirstBatch(L.Callback):
    """The batch of the first training step, as the model received it."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if batch_idx == 0:
            self.batch = batch


def two_sources(root, **kwargs) -> MixtureData:
    """LLaVA conversations (short replies learned) and text documents (every token learned), half and half."""
    train = {"instruct": Conversations("train.json"), "text": TextOnly("text_train.jsonl")}
    val = {"instruct": Conversations("val.json"), "text": TextOnly("text_val.jsonl")}
    return MixtureData(str(root), train=train, val=val, num_workers=0, stratified=True, **kwargs)


@pytest.mark.parametrize("pack_length", [None, 512], ids=["padded", "packed"])
def test_train_loss_per_source_is_the_token_mean_of_its_supervised_tokens(shapes_root, pack_length):
    model = varied_model()
    reference = copy.deepcopy(model).train()  # the weights the first step's figures are computed with
    first = FirstBatch()
    data = two_sources(shapes_root, batch_size=6, pack_length=pack_length)
    data.connect(model.processor())
    trainer = tiny_fit(model, data, 1, callbacks=[first])
    batch = first.batch
    assert sorted(set(batch.sources)) == ["instruct", "text"]
    if pack_length:
        assert batch.num_rows < len(batch)  # several samples share a row
    tokens = token_losses(reference, batch)
    logged = {k: float(v) for k, v in trainer.callback_metrics.items()}

    assert logged["train/loss"] == pytest.approx(mean(loss for _, loss in tokens), rel=1e-5)
    for source in ("instruct", "text"):
        mine = [(s, loss) for s, loss in tokens if batch.sources[s] == source]
        expected = mean(loss for _, loss in mine)
        assert logged[f"train/loss/{source}"] == pytest.approx(expected, rel=1e-5), source
        # what a wrong reduction would log instead is far enough off to be told apart
        per_sample = mean(mean(loss for s, loss in mine if s == k) for k in {s for s, _ in mine})
        assert abs(per_sample - expected) > 1e-4 * expected, source
        assert abs(logged["train/loss"] - expected) > 1e-4 * expected, source


def test_val_loss_is_token_weighted_across_batches(shapes_root):
    """Batches of 3, 3, 3, 3, 3, 1 samples with different numbers of supervised tokens: ``val/loss`` is the mean
    over every supervised token of the split, not a mean of the batches' means (by batch or by sample count)."""
    model = varied_model().eval()
    data = two_sources(shapes_root, batch_size=3)
    data.connect(model.processor())
    trainer = L.Trainer(
        accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False
    )
    (result,) = trainer.validate(model, data, verbose=False)

    batches = [batch for batch, _ in data.val_dataloader()]
    per_batch = [token_losses(model, batch) for batch in batches]
    counts = [len(tokens) for tokens in per_batch]
    assert len(batches) > 2 and len(set(counts)) > 2
    expected = mean(loss for tokens in per_batch for _, loss in tokens)
    assert result["val/loss"] == pytest.approx(expected, rel=1e-5)

    batch_means = [mean(loss for _, loss in tokens) for tokens in per_batch]
    by_batch = mean(batch_means)
    by_samples = sum(m * len(b) for m, b in zip(batch_means, batches)) / sum(len(b) for b in batches)
    assert abs(by_batch - expected) > 1e-4 * expected and abs(by_samples - expected) > 1e-4 * expected
