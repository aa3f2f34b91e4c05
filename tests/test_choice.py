"""Text-only multiple choice by log-likelihood ranking (lit_mllm.eval.choice): an option's score equals the sum of
its reply tokens' log-probabilities computed by hand from the model's logits (every family); ChoiceAccuracy through
the evaluation path (TextChoices samples in a val split, teacher-forced logits) agrees with ranking the options one
question at a time; its grouping on hand-made numbers (sum vs mean, duplicates, incomplete questions); the
ShapesWorld text-choice set (reproducible, the right answers are the facts)."""

from __future__ import annotations

import math

import pytest
import torch

from lit_mllm.data import MixtureData, collate
from lit_mllm.data.sample import DataError
from lit_mllm.data.shapesworld_formats import (
    CORNERS,
    TEXT_CHOICE_KINDS,
    text_choice_records,
    write_text_choices,
)
from lit_mllm.eval.choice import ChoiceAccuracy, TextChoices, choice_samples
from lit_mllm.eval.metrics import EvalOutputs
from lit_mllm.nn.language.chat import IGNORE_INDEX
from tests.test_generation_families import FAMILIES

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread is fastest


def by_hand(model, context: str, option: str) -> tuple[float, int]:
    """The option's reply tokens' log-probabilities, summed in float64 from the logits of the sample alone."""
    proc = model.processor()
    item = proc(choice_samples("q", context, [option, option + " x"], 0)[0])
    batch = collate([item], proc.tokenizer.pad_token_id)
    with torch.no_grad():
        logits = model(batch)[0].double()  # [L, V]
    labels = item["labels"].tolist()
    total, count = 0.0, 0
    for t, label in enumerate(labels):
        if label != IGNORE_INDEX:
            total += float(torch.log_softmax(logits[t - 1], -1)[label])
            count += 1
    return total, count


@pytest.mark.parametrize("family", FAMILIES)
def test_option_loglikelihoods_equal_the_sum_by_hand(family):
    model = FAMILIES[family]().eval()
    context = "How many corners does a triangle have?"
    options = ["three", "four corners", "no"]  # different lengths: right padding in the batch
    sums = model.option_loglikelihoods(context, options)
    means = model.option_loglikelihoods(context, options, per_token=True)
    for k, option in enumerate(options):
        total, count = by_hand(model, context, option)
        assert count >= 2  # the option and the end-of-reply marker
        assert math.isclose(float(sums[k]), total, abs_tol=1e-4), option
        assert math.isclose(float(means[k]), total / count, abs_tol=1e-4), option


@pytest.mark.parametrize("family", ["prefix", "flamingo"])
def test_accuracy_through_the_evaluation_path_equals_ranking_one_question_at_a_time(family, tmp_path):
    model = FAMILIES[family]().eval()
    records = text_choice_records(8, seed=3)
    write_text_choices(tmp_path / "text_choice_val.jsonl", count=8, seed=3)
    data = MixtureData(
        str(tmp_path),
        val={"text_choice": TextChoices("text_choice_val.jsonl")},
        batch_size=5,  # a question's options span batches
        num_workers=0,
    )
    data.connect(model.processor())
    data.setup("validate")
    metrics = {"sum": ChoiceAccuracy(), "mean": ChoiceAccuracy(score="mean")}
    with torch.no_grad():
        for batch in data.val_dataloader():
            batch = batch[0] if isinstance(batch, tuple | list) else batch
            outputs = EvalOutputs(batch, model(batch))
            for metric in metrics.values():
                metric.update_from(outputs)
    expected = {"sum": 0, "mean": 0}
    for record in records:
        for score, per_token in (("sum", False), ("mean", True)):
            ranked = model.option_loglikelihoods(record["context"], record["options"], per_token=per_token)
            expected[score] += int(ranked.argmax()) == record["answer"]
    for score, metric in metrics.items():
        assert math.isclose(float(metric.compute()), expected[score] / len(records)), score


def test_grouping_on_hand_made_scores():
    metric, mean = ChoiceAccuracy(), ChoiceAccuracy(score="mean")

    def meta(q, k, n, a):
        return {"question_id": q, "options": ["x"] * n, "option": k, "answer": a}

    # q1: option 0 (right) has the higher sum, option 1 the higher mean; q2 complete and right under both;
    # q3 misses an option (not counted); a plain sample is ignored; q2's option 0 is seen twice
    rows = [
        (-2.0, 2, meta("q1", 0, 2, 0)),
        (-3.0, 6, meta("q1", 1, 2, 0)),
        (-1.0, 1, meta("q2", 0, 3, 2)),
        (-5.0, 1, meta("q2", 1, 3, 2)),
        (-0.5, 1, meta("q2", 2, 3, 2)),
        (-0.1, 1, meta("q3", 0, 2, 0)),
        (-9.0, 1, {}),
    ]
    for m in (metric, mean):
        m.update(torch.tensor([r[0] for r in rows]), torch.tensor([r[1] for r in rows]), [r[2] for r in rows])
        m.update(torch.tensor([-1.0]), torch.tensor([1]), [meta("q2", 0, 3, 2)])
    assert float(metric.compute()) == 1.0  # q1 right by sum, q2 right
    assert float(mean.compute()) == 0.5  # q1 wrong by mean (-0.5 per token beats -1.0)
    with pytest.warns(UserWarning, match="before the ``update``"):
        assert float(ChoiceAccuracy().compute()) == 0.0  # nothing scored yet
    with pytest.raises(ValueError, match="sum' or 'mean"):
        ChoiceAccuracy(score="max")


MIXES = {
    frozenset(("red", "yellow")): "orange",
    frozenset(("red", "blue")): "purple",
    frozenset(("blue", "yellow")): "green",
}


def test_shapesworld_text_choices_are_reproducible_and_right(tmp_path):
    records = text_choice_records(40, seed=1)
    assert records == text_choice_records(40, seed=1) and records != text_choice_records(40, seed=2)
    assert {r["meta"]["kind"] for r in records} == set(TEXT_CHOICE_KINDS)
    for r in records:
        right = r["options"][r["answer"]]
        assert len(set(r["options"])) == len(r["options"]) == 4
        if r["meta"]["kind"] == "corners":
            shape = r["context"].split()[-2]
            assert right == CORNERS[shape]
        if r["meta"]["kind"] == "colour_mix":
            mixed = frozenset(r["context"].rstrip("?").split()[-3::2])
            assert right == MIXES[mixed]
    source = TextChoices(str(write_text_choices(tmp_path / "tc.jsonl", count=5, seed=1))).open(tmp_path)
    assert len(source) == 20
    samples = [source.sample(i, "<image>") for i in range(4)]
    first = records[0] if records[0]["id"] == samples[0].meta["question_id"] else None
    assert first is not None
    assert [s.turns[-1].text for s in samples] == first["options"]
    assert all(s.references == [first["options"][first["answer"]]] and not s.images for s in samples)
    assert [s.meta["option"] for s in samples] == [0, 1, 2, 3]


def test_malformed_records_are_refused(tmp_path):
    (tmp_path / "bad.jsonl").write_text('{"id": "a", "context": "q?", "options": ["one"], "answer": 0}\n')
    with pytest.raises(Exception, match="two or more"):
        TextChoices("bad.jsonl").open(tmp_path)
    (tmp_path / "bad2.jsonl").write_text('{"id": "a", "context": "q?", "options": ["a", "b"], "answer": 2}\n')
    with pytest.raises(Exception, match="not an index"):
        TextChoices("bad2.jsonl").open(tmp_path)
    (tmp_path / "bad3.jsonl").write_text(
        '{"id": "a", "context": "q?", "options": ["a", "b"], "answer": 0}\n\n[1, 2]\n'
    )
    with pytest.raises(DataError, match=r"bad3.jsonl line 3: a record must be a JSON object, got list"):
        TextChoices("bad3.jsonl").open(tmp_path)
    (tmp_path / "bad4.json").write_text('[{"id": "a", "context": "q?", "options": ["a", "b"]}]')
    with pytest.raises(DataError, match=r"bad4.json record 0: a multiple-choice record needs .*'answer'"):
        TextChoices("bad4.json").open(tmp_path)
    (tmp_path / "bad5.json").write_text('[["q?", ["a", "b"], 0]]')
    with pytest.raises(DataError, match=r"bad5.json record 0: a record must be a JSON object, got list"):
        TextChoices("bad5.json").open(tmp_path)
