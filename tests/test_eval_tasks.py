"""Scores per task and per question kind: a batch cut to some of its samples, metrics broken down by a ``meta``
key (:class:`PerGroup`), ``val/<task>/<metric>`` for a split with several sources, the question kinds ShapesWorld
records name, and the blind / majority baselines per kind."""

from __future__ import annotations

import json
import math

import lightning as L
import pytest
import torch

from lit_mllm.data import Conversations, MixtureData, ShapesWorld, collate, read_llava
from lit_mllm.data.shapesworld import ALL_KINDS, QUESTION_KINDS
from lit_mllm.eval import EvalOutputs, PerGroup, ReplyExactMatch
from lit_mllm.eval.baselines import answer_baselines, kind_table
from lit_mllm.eval.metrics import reply_exact_match
from lit_mllm.lit.base import supervised
from tests.conftest import tiny_model

QUESTION_STARTS = {
    "colour": "What color is the",
    "shape": "What shape is the",
    "count": "How many shapes are there?",
    "position": "Where is the",
    "existence": "Is there",
    "text": "What word is written",
    "both": "Do both images contain",
    "most": "Which image has the most shapes?",
    "which": "Which image shows",
    "total": "How many shapes are there in all the images",
}


@pytest.fixture(scope="module")
def world_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("kinds") / "sw"
    ShapesWorld(
        image_size=64, num_train=40, num_val=40, num_test=4, min_object_px=4, text_px=6, extras=[],
        num_multi_train=8, num_multi_val=16, num_multi_test=0,
    ).write(root)  # fmt: skip
    return root


def test_every_validation_record_names_the_kind_of_its_question(world_root):
    seen = set()
    for name in ("val.json", "multi_val.json"):
        for record in json.loads((world_root / name).read_text()):
            kind = record["meta"]["kind"]
            question = record["conversations"][0]["value"].split("\n")[-1]
            assert question.startswith(QUESTION_STARTS[kind]), (kind, question)
            seen.add(kind)
    assert seen == set(QUESTION_STARTS) and seen <= set(ALL_KINDS)
    # training records ask several questions (and a caption turn): no single kind
    assert all("meta" not in r for r in json.loads((world_root / "train.json").read_text()))


def outputs_of(model, samples) -> EvalOutputs:
    proc = model.processor()
    batch = collate([proc(s) for s in samples], proc.tokenizer.pad_token_id)
    with torch.no_grad():
        return EvalOutputs(batch, model.eval()(batch))


def test_a_selected_batch_is_the_batch_of_those_samples_alone(world_root):
    """Rows, images and labels of ``select`` equal collating the chosen samples on their own (multi-image
    samples: each keeps all its images)."""
    model = tiny_model()
    proc = model.processor()
    samples = read_llava(world_root / "multi_val.json")[:3] + read_llava(world_root / "val.json")[:3]
    items = [proc(s, with_prompt=True) for s in samples]
    whole = collate(items, proc.tokenizer.pad_token_id)
    rows = [4, 0, 2]
    alone = collate([items[r] for r in rows], proc.tokenizer.pad_token_id)
    cut = whole.select(rows)
    assert cut.ids == alone.ids and cut.images_per_row == alone.images_per_row
    assert torch.equal(cut.pixel_values, alone.pixel_values)
    width = alone.input_ids.shape[1]  # the whole batch pads to its longest row; compare the real tokens
    for r in range(3):
        n = int(alone.attention_mask[r].sum())
        assert torch.equal(cut.input_ids[r, :n], alone.input_ids[r, :n])
        assert torch.equal(cut.labels[r, :n], alone.labels[r, :n])
        assert torch.equal(cut.sample_index[r, :n], alone.sample_index[r, :n])
        assert (cut.sample_index[r, n:] == -1).all()
    assert width <= cut.input_ids.shape[1]
    assert cut.generation.ids == alone.generation.ids
    assert torch.equal(cut.generation.pixel_values, alone.generation.pixel_values)
    assert [m["kind"] for m in cut.meta] == [samples[r].meta["kind"] for r in rows]


def test_per_group_scores_each_kind_on_its_own_samples(world_root):
    model = tiny_model()
    samples = read_llava(world_root / "val.json")[:16]
    outputs = outputs_of(model, samples)
    metric = PerGroup(ReplyExactMatch(), key="kind", groups=list(QUESTION_KINDS))
    metric.update_from(outputs.select(list(range(8))))  # two updates: states accumulate per group
    metric.update_from(outputs.select(list(range(8, 16))))
    got = metric.compute()
    kinds = [s.meta["kind"] for s in samples]
    hits = [
        bool(reply_exact_match(outputs.logits[i : i + 1], outputs.batch.labels[i : i + 1])[0])
        for i in range(16)
    ]
    want = {}
    for kind in sorted(set(kinds) & set(QUESTION_KINDS)):
        mine = [h for h, k in zip(hits, kinds, strict=True) if k == kind]
        want[kind] = sum(mine) / len(mine)
    if "text" in kinds:  # not listed: counted under "other"
        mine = [h for h, k in zip(hits, kinds, strict=True) if k == "text"]
        want["other"] = sum(mine) / len(mine)
    assert {k: float(v) for k, v in got.items()} == pytest.approx(want)
    metric.reset()
    assert all(int(m.total) == 0 for m in metric.members.values()) and int(metric.seen.sum()) == 0


def test_per_group_reports_nothing_for_samples_without_the_key(shapes_root):
    model = tiny_model()
    samples = read_llava(shapes_root / "train.json")[:4]  # training records name no kind
    metric = PerGroup(ReplyExactMatch(), key="kind", groups=["colour"])
    metric.update_from(outputs_of(model, samples))
    assert metric.compute() == {}


def test_an_empty_split_scores_nan_not_zero():
    assert math.isnan(float(ReplyExactMatch().compute()))


@pytest.mark.parametrize("groups", [[], ["a", "a"], ["other"], ["a.b"]])
def test_bad_group_lists_are_refused(groups):
    with pytest.raises(ValueError, match="group"):
        PerGroup(ReplyExactMatch(), key="kind", groups=groups)


def test_validation_logs_each_task_and_kind_and_the_overall_score_is_their_mix(world_root):
    """Two validation sources (single- and multi-image questions): ``val/<task>/accuracy`` per source, the overall
    ``val/accuracy`` is their sample-weighted mean, ``val/<task>/loss`` per source with ``val/loss`` their
    token-weighted mean, and ``val/by_kind/<kind>`` appears for every kind asked."""
    model = tiny_model()
    dm = MixtureData(
        str(world_root),
        train={"single": Conversations("train.json")},
        val={"single": Conversations("val.json"), "multi": Conversations("multi_val.json")},
        batch_size=8,
        num_workers=0,
    )
    dm.connect(model.processor())
    trainer = L.Trainer(
        accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False
    )
    (result,) = trainer.validate(model, dm, verbose=False)
    n_single, n_multi = 40, 16
    assert result["val/accuracy"] == pytest.approx(
        (result["val/single/accuracy"] * n_single + result["val/multi/accuracy"] * n_multi)
        / (n_single + n_multi),
        abs=1e-6,
    )
    # the loss: per task over its supervised tokens, overall their token-weighted mean
    tokens = {"single": 0, "multi": 0}
    for batch, _ in dm.val_dataloader():
        for i, source in enumerate(batch.sources):
            tokens[source] += int(supervised(batch.labels[i : i + 1]).sum())
    assert result["val/loss"] == pytest.approx(
        (result["val/single/loss"] * tokens["single"] + result["val/multi/loss"] * tokens["multi"])
        / (tokens["single"] + tokens["multi"]),
        rel=1e-5,
    )
    assert abs(result["val/single/loss"] - result["val/multi/loss"]) > 1e-3  # two different means
    asked = {s.meta["kind"] for name in ("val.json", "multi_val.json") for s in read_llava(world_root / name)}
    assert {k.split("/")[-1] for k in result if k.startswith("val/by_kind/")} == asked
    assert "val/single/by_kind/colour" in result and "val/multi/by_kind/both" in result
    assert not any(k.startswith("val/single/by_kind/") and k.endswith("/both") for k in result)


def test_baselines_per_kind_and_the_table_beside_the_scores(world_root):
    train = read_llava(world_root / "train.json")
    val = read_llava(world_root / "val.json")
    scores = answer_baselines(train, val)
    kinds = {s.meta["kind"] for s in val}
    assert {k.split("/", 1)[1] for k in scores if "/" in k} == kinds
    counts = {k: sum(s.meta["kind"] == k for s in val) for k in kinds}
    # the overall baseline is the kinds' sample-weighted mean
    assert scores["blind"] == pytest.approx(
        sum(scores[f"blind/{k}"] * n for k, n in counts.items()) / len(val)
    )
    # an existence question is answered yes/no: the majority answer overall ("yes"/"no" or a number) scores
    # the same on every existence question, so its per-kind majority is 0, 1 or the share of that answer
    table = kind_table({"val/by_kind/colour": torch.tensor(0.5)}, scores)
    assert "colour" in table and "0.500" in table and "blind" in table
    assert kind_table({}, scores) == ""


def test_per_task_losses_follow_the_split_of_each_run(world_root):
    """One model validated on sources a + b, then on a + c: the second run logs ``val/c/loss`` (its own tasks)."""
    records = json.loads((world_root / "val.json").read_text())
    for name, part in (("a", records[:3]), ("b", records[3:5]), ("c", records[5:8])):
        (world_root / f"part_{name}.json").write_text(json.dumps(part))
    model = tiny_model()
    logged = []
    for val in (("a", "b"), ("a", "c")):
        dm = MixtureData(
            str(world_root),
            train={"a": Conversations("part_a.json")},
            val={name: Conversations(f"part_{name}.json") for name in val},
            batch_size=4,
            num_workers=0,
        )
        dm.connect(model.processor())
        trainer = L.Trainer(
            accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False
        )
        (result,) = trainer.validate(model, dm, verbose=False)
        logged.append(sorted(k for k in result if k.endswith("/loss")))
    assert logged == [["val/a/loss", "val/b/loss", "val/loss"], ["val/a/loss", "val/c/loss", "val/loss"]]
