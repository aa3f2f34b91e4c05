"""The evaluation wiring of the shared base: metrics injected from the config, generation on the val/test splits
with the model's one GenerationConfig, several references per sample, and the typed batch that carries them."""

from __future__ import annotations

import json

import lightning as L
import pytest
from torchmetrics import MeanMetric

from lit_mllm.data import Conversations, collate, read_llava
from lit_mllm.eval import EvalMetric, GeneratedExactMatch, GenerationConfig, ReplyExactMatch
from lit_mllm.lit import PrefixFusionVLM
from tests.conftest import shapes_data, tiny_model


def model_with(metrics=None, generation=None) -> PrefixFusionVLM:
    return tiny_model(module={"metrics": metrics, "generation": generation})


def test_generated_exact_match_counts_any_reference_and_skips_samples_without_one():
    metric = GeneratedExactMatch(ignore_case=True)
    metric.update(["Red ", "blue", "two", "x"], [["red", "crimson"], ["green"], ["2", "two"], []])
    assert metric.total == 3 and metric.correct == 2
    assert float(metric.compute()) == pytest.approx(2 / 3)


def test_generation_config_validates_and_passes_sampling_knobs_only_when_sampling():
    assert GenerationConfig().kwargs() == {"max_new_tokens": 32, "do_sample": False, "num_beams": 1}
    sampled = GenerationConfig(do_sample=True, temperature=0.7, top_p=0.9).kwargs()
    assert sampled["temperature"] == 0.7 and sampled["top_p"] == 0.9
    with pytest.raises(ValueError, match="max_new_tokens"):
        GenerationConfig(max_new_tokens=0)
    with pytest.raises(ValueError, match="top_p"):
        GenerationConfig(top_p=0.0)


def test_a_metric_that_is_not_an_eval_metric_is_refused_by_name():
    with pytest.raises(TypeError, match="'plain'.*EvalMetric"):
        model_with(metrics={"plain": MeanMetric()})


def test_answers_field_gives_several_references(tmp_path, shapes_root):
    records = json.loads((shapes_root / "val.json").read_text())[:2]
    (tmp_path / "images").symlink_to(shapes_root / "images")
    records[0]["answers"] = ["red", "crimson", "scarlet"]
    (tmp_path / "val.json").write_text(json.dumps(records))
    source = Conversations("val.json")
    source.open(tmp_path)
    model = model_with()
    proc = model.processor()
    items = [proc(source.sample(i, proc.image_token), for_generation=True) for i in range(2)]
    batch = collate(items, proc.tokenizer.pad_token_id, padding_side="left")
    assert batch.references == [["red", "crimson", "scarlet"], [records[1]["conversations"][-1]["value"]]]
    records[1]["answers"] = "red"
    (tmp_path / "val.json").write_text(json.dumps(records))
    source = Conversations("val.json")
    source.open(tmp_path)
    with pytest.raises(ValueError, match="'answers' must be a list of strings"):
        source.sample(1, proc.image_token)


def test_validation_generates_with_the_models_settings_and_scores_against_references(shapes_root, tmp_path):
    """``val/generated`` scores the replies ``generate`` gives with the model's settings against each sample's
    references: with the first half of the samples given their own greedy reply as an accepted answer (beside a
    wrong one) and the rest a wrong answer only, it is exactly 0.5."""
    metrics = {"accuracy": ReplyExactMatch(), "generated": GeneratedExactMatch()}
    model = model_with(metrics, GenerationConfig(max_new_tokens=3)).eval()
    proc = model.processor()
    assert proc.eval_prompts  # a metric needs generation: eval batches carry the prompts
    samples = read_llava(shapes_root / "val.json")
    answers = []
    for start in range(0, len(samples), 4):  # the validation loader's batches
        items = [proc(s, for_generation=True) for s in samples[start : start + 4]]
        answers += model.generate(collate(items, proc.tokenizer.pad_token_id, "left"))
    records = json.loads((shapes_root / "val.json").read_text())
    half = len(records) // 2
    for k, record in enumerate(records):
        record["answers"] = ["not this", answers[k]] if k < half else ["not this"]
    (tmp_path / "val.json").write_text(json.dumps(records))
    (tmp_path / "images").symlink_to(shapes_root / "images")
    dm = shapes_data(tmp_path, batch_size=4)
    dm.connect(model.processor())
    trainer = L.Trainer(
        accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False
    )
    (result,) = trainer.validate(model, dm, verbose=False)
    assert {"val/loss", "val/accuracy", "val/generated"} <= set(result)
    assert result["val/generated"] == pytest.approx(half / len(records))


def test_metrics_are_separate_per_split():
    model = model_with({"accuracy": ReplyExactMatch()})
    val, test = model.split_metrics["val"]["accuracy"], model.split_metrics["test"]["accuracy"]
    assert val is not test and isinstance(val, EvalMetric)


def test_batch_to_moves_every_tensor_and_the_prompt_batch(batch):
    moved = batch.to("meta")
    assert moved.input_ids.device.type == "meta" and moved.pixel_values.device.type == "meta"
    assert moved.ids == batch.ids and batch.input_ids.device.type == "cpu"


def test_data_figures_reach_the_logger_at_the_logging_interval(shapes_root, tmp_path):
    """The DataModule writes data/ratio/<source> and data/skipped/<reason> to the run's loggers itself."""
    from lightning.pytorch.loggers import CSVLogger

    model = model_with()
    dm = shapes_data(shapes_root, batch_size=4)
    dm.connect(model.processor())
    logger = CSVLogger(tmp_path)
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=5,
        logger=logger,
        log_every_n_steps=2,
        limit_val_batches=0,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    trainer.fit(model, dm)
    rows = (tmp_path / "lightning_logs" / "version_0" / "metrics.csv").read_text().splitlines()
    header = rows[0].split(",")
    steps = [
        int(r.split(",")[header.index("step")])
        for r in rows[1:]
        if r.split(",")[header.index("data/ratio/shapesworld")]
    ]
    loss_steps = [
        int(r.split(",")[header.index("step")]) for r in rows[1:] if r.split(",")[header.index("train/loss")]
    ]
    assert steps == loss_steps == [1, 3]  # beside train/loss, at Lightning's logging steps
