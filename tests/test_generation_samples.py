"""A few generations with their images reach TensorBoard after each validation: the first samples of each
validation source, the reply ``generate`` gives them, their accepted answers, and their images."""

from __future__ import annotations

import lightning as L
import pytest
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lit_mllm.data import collate, read_llava
from lit_mllm.eval import GenerationSamples
from tests.conftest import shapes_data, tiny_model


def test_replies_and_images_of_the_first_validation_samples_reach_tensorboard(shapes_root, tmp_path):
    model = tiny_model()
    data = shapes_data(shapes_root, batch_size=4)
    data.connect(model.processor())
    trainer = L.Trainer(
        accelerator="cpu", max_steps=2, val_check_interval=2, limit_val_batches=1, enable_progress_bar=False,
        enable_model_summary=False, enable_checkpointing=False,
        logger=TensorBoardLogger(tmp_path, name="run"), callbacks=[GenerationSamples(num_samples=3)],
    )  # fmt: skip
    trainer.fit(model, data)
    events = EventAccumulator(trainer.log_dir, size_guidance={"tensors": 0, "images": 0})
    events.Reload()
    text = events.Tensors("samples/text_summary")[-1].tensor_proto.string_val[0].decode()
    samples = read_llava(shapes_root / "val.json")[:3]
    proc = model.processor()
    model.eval()
    batch = collate([proc(s, for_generation=True) for s in samples], proc.tokenizer.pad_token_id, "left")
    replies = model.generate(batch)
    for sample, reply in zip(samples, replies, strict=True):
        row = next(line for line in text.splitlines() if f"| {sample.id} |" in line)
        cells = [c.strip() for c in row.strip("|").split(" | ")]
        assert cells[3] == reply and cells[4] == sample.turns[-1].text
    assert set(events.Tags()["images"]) == {f"samples/shapesworld/{s.id}" for s in samples}


def test_num_samples_must_be_positive():
    with pytest.raises(ValueError, match="at least 1"):
        GenerationSamples(num_samples=0)


def test_a_module_that_generates_no_text_is_passed_over(tmp_path, monkeypatch):
    """BLIP-2 stage 1 stacked on the quickstart (whose callbacks include GenerationSamples) validates without
    generating: the callback says once that there is nothing to show, and never asks the processor to prompt."""
    from types import SimpleNamespace

    class NoGenerate:  # QFormerPretraining's shape: a processor, no generate
        def processor(self):
            raise AssertionError("the processor must not be asked for generation prompts")

    trainer = SimpleNamespace(
        loggers=[TensorBoardLogger(str(tmp_path))],
        sanity_checking=False,
        is_global_zero=True,
        datamodule=SimpleNamespace(sources=lambda split: {}),
    )
    said: list[str] = []  # the message itself (logging may be configured not to propagate in a full run)
    monkeypatch.setattr("lit_mllm.eval.samples.rank_zero_info", said.append)
    callback = GenerationSamples()
    callback.on_validation_epoch_end(trainer, NoGenerate())
    callback.on_validation_epoch_end(trainer, NoGenerate())
    assert len(said) == 1 and "NoGenerate generates no text" in said[0]
