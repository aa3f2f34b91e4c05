"""Metrics restricted to some tasks of a split (``EvalMetric(tasks=[...])``): a split mixing zero-shot questions,
2-shot prompts and text multiple choice scores each with its own metric, every score equal to the same metric
on that source alone (nothing of the other sources leaks in), per-task copies only where a metric applies,
replies generated only for the samples a generation metric scores, and bad task lists refused."""

from __future__ import annotations

import lightning as L
import pytest

from lit_mllm.data import Conversations, MixtureData
from lit_mllm.eval import ChoiceAccuracy, GeneratedExactMatch, PerGroup, ReplyExactMatch
from lit_mllm.eval.choice import TextChoices
from lit_mllm.eval.fewshot import FewShot
from lit_mllm.eval.generation import GenerationConfig
from lit_mllm.lit import PrefixFusionVLM
from tests.conftest import tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")


def zero_shot():
    return Conversations("val.json")


def few_shot():
    return FewShot(Conversations("val.json"), Conversations("train.json"), shots=2)


def text_choice():
    return TextChoices("text_choice_val.jsonl")


def validate(root, val: dict, metrics: dict) -> dict[str, float]:
    model = tiny_model(module={"metrics": metrics, "generation": GenerationConfig(max_new_tokens=4)})
    dm = MixtureData(
        str(root), train={"t": Conversations("train.json")}, val=val, batch_size=8, num_workers=0
    )
    dm.connect(model.processor())
    trainer = L.Trainer(
        accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False
    )
    (result,) = trainer.validate(model, dm, verbose=False)
    return result


def test_each_task_is_scored_by_its_own_metric_alone(shapes_root, monkeypatch):
    generated_rows = []
    generate = PrefixFusionVLM.generate

    def counting(self, batch, **overrides):
        generated_rows.extend(batch.ids)
        return generate(self, batch, **overrides)

    monkeypatch.setattr(PrefixFusionVLM, "generate", counting)
    mixed = validate(
        shapes_root,
        {"zero_shot": zero_shot(), "few_shot": few_shot(), "text_choice": text_choice()},
        {
            "replies": _Replies(tasks=["zero_shot"]),
            "accuracy": ReplyExactMatch(tasks=["zero_shot"]),
            "by_kind": PerGroup(
                ReplyExactMatch(), key="kind", groups=["colour", "shape"], tasks=["zero_shot"]
            ),
            "scored": _Scored(tasks=["zero_shot", "few_shot"]),
            "choice": ChoiceAccuracy(tasks=["text_choice"]),
        },
    )
    questions = len(_records(shapes_root / "val.json"))
    # replies were generated for the zero- and few-shot questions only, never for the text options
    assert sorted(generated_rows) == sorted(2 * [r["id"] for r in _records(shapes_root / "val.json")])
    # each metric read its tasks' samples only: one reply per zero-shot question (the few-shot samples' support
    # answers and the text options are replies too), one generated reply per zero- and few-shot question (the
    # text options carry references too)
    assert mixed["val/replies"] == mixed["val/zero_shot/replies"] == questions
    assert mixed["val/scored"] == 2 * questions
    assert mixed["val/zero_shot/scored"] == mixed["val/few_shot/scored"] == questions
    # per-task copies exist only where a metric applies; every task has its loss
    assert {k for k in mixed if k.startswith("val/few_shot/")} == {"val/few_shot/scored", "val/few_shot/loss"}
    assert {k for k in mixed if k.startswith("val/text_choice/")} == {
        "val/text_choice/choice",
        "val/text_choice/loss",
    }
    assert {k for k in mixed if k.startswith("val/zero_shot/") and "by_kind" not in k} == {
        "val/zero_shot/replies",
        "val/zero_shot/accuracy",
        "val/zero_shot/scored",
        "val/zero_shot/loss",
    }
    assert any(k.startswith("val/zero_shot/by_kind/") for k in mixed)

    # each equals the unrestricted metric on its source alone
    alone = validate(shapes_root, {"q": zero_shot()}, {"accuracy": ReplyExactMatch(), "scored": _Scored()})
    assert mixed["val/accuracy"] == mixed["val/zero_shot/accuracy"] == pytest.approx(alone["val/accuracy"])
    assert mixed["val/zero_shot/loss"] == pytest.approx(alone["val/loss"], rel=1e-5)
    assert alone["val/scored"] == questions
    choices = validate(shapes_root, {"q": text_choice()}, {"choice": ChoiceAccuracy()})
    assert mixed["val/choice"] == mixed["val/text_choice/choice"] == pytest.approx(choices["val/choice"])
    unrestricted = validate(shapes_root, {"a": zero_shot(), "b": text_choice()}, {"scored": _Scored()})
    assert unrestricted["val/scored"] > questions  # what the restriction kept out


def test_an_unrestricted_teacher_forced_metric_reads_the_support_answers_of_few_shot_samples(shapes_root):
    """Why the restriction matters: on 2-shot samples ReplyExactMatch counts every support answer too."""
    result = validate(shapes_root, {"q": few_shot()}, {"accuracy": ReplyExactMatch(), "n": _Replies()})
    source = few_shot().open(shapes_root)
    replies = sum(
        sum(t.role == "assistant" for t in source.sample(i, "<image>").turns) for i in range(len(source))
    )
    assert replies > 2 * len(source)  # every support answer is a reply
    assert result["val/n"] == replies


def test_a_task_the_split_lacks_is_named_with_the_sources(shapes_root):
    with pytest.raises(ValueError, match=r"tasks \['few_shot'\].*sources are \['zero_shot', 'text_choice'\]"):
        validate(
            shapes_root,
            {"zero_shot": zero_shot(), "text_choice": text_choice()},
            {"generated": GeneratedExactMatch(tasks=["few_shot"])},
        )


@pytest.mark.parametrize("tasks", [[], ["a", "a"], [""]])
def test_bad_task_lists_are_refused(tasks):
    with pytest.raises(ValueError, match="tasks"):
        ReplyExactMatch(tasks=tasks)


def test_per_group_takes_the_tasks_itself():
    with pytest.raises(ValueError, match="restrict the PerGroup itself"):
        PerGroup(ReplyExactMatch(tasks=["a"]), key="kind", groups=["colour"])
    assert PerGroup(ReplyExactMatch(), key="kind", groups=["colour"], tasks=["a"]).scores("a")


def _records(path):
    import json

    return json.loads(path.read_text())


class _Replies(ReplyExactMatch):
    """The number of replies ReplyExactMatch counted."""

    def compute(self):
        return self.total.float()


class _Scored(GeneratedExactMatch):
    """The number of generated replies GeneratedExactMatch scored."""

    def compute(self):
        return self.total.float()
