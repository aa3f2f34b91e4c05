"""MME (accuracy, accuracy+, scores and totals), MMBench CircularEval and POPE on hand-checked cases, with the
reply readings of each benchmark's own evaluation code."""

import pytest
import torch

from lit_mllm.data import collate
from lit_mllm.eval import (
    CircularAccuracy,
    EvalOutputs,
    MMEScore,
    POPEScore,
    option_letter,
    pope_yes_no,
    yes_no,
)


@pytest.mark.parametrize(
    ("reply", "expected"),
    [
        ("Yes", "yes"),
        ("  YES.", "yes"),
        ("yes, there is a dog", "yes"),
        ("No", "no"),
        ("Not sure", "no"),  # "no" within the first four characters
        ("nope", "no"),
        ("I think yes", "other"),  # only the first four characters are looked at
        ("The answer is no", "other"),
        ("", "other"),
    ],
)
def test_mme_yes_no_reading(reply, expected):
    assert yes_no(reply) == expected


def _mme(metric, rows):
    """rows: (subtask, image, reference, reply)."""
    metric.update(
        [r[3] for r in rows], [[r[2]] for r in rows], [{"subtask": r[0], "image": r[1]} for r in rows]
    )


MME_ROWS = [
    ("existence", "1.jpg", "Yes", "Yes"),
    ("existence", "1.jpg", "No", "No"),  # image 1: both right
    ("existence", "2.jpg", "Yes", "yes, there is"),
    ("existence", "2.jpg", "No", "Yes"),  # image 2: one right
    ("count", "1.jpg", "Yes", "Yes"),  # same file name in another subtask: another image
    ("count", "1.jpg", "No", "no"),
    ("code_reasoning", "9.png", "Yes", "I think so"),  # neither yes nor no: wrong
    ("code_reasoning", "9.png", "No", "Not"),
]


def test_mme_acc_plus_and_scores():
    metric = MMEScore()
    _mme(metric, MME_ROWS)
    out = metric.compute()
    # existence: 3 of 4 questions, 1 of 2 images -> (0.75 + 0.5) * 100
    assert out["existence/acc"].item() == 0.75
    assert out["existence/acc_plus"].item() == 0.5
    assert out["existence/score"].item() == pytest.approx(125.0)
    assert out["count/score"].item() == pytest.approx(200.0)
    assert out["code_reasoning/acc"].item() == 0.5 and out["code_reasoning/acc_plus"].item() == 0.0
    assert out["perception"].item() == pytest.approx(325.0)
    assert out["cognition"].item() == pytest.approx(50.0)
    assert out["unparsed"].item() == pytest.approx(1 / 8)
    assert "OCR/score" not in out  # subtasks without samples are not reported


def test_mme_refuses_unknown_subtasks_and_references():
    with pytest.raises(ValueError, match="declared groups"):
        _mme(MMEScore(), [("maths", "1.jpg", "Yes", "Yes")])
    with pytest.raises(ValueError, match="'Yes' or 'No'"):
        _mme(MMEScore(), [("count", "1.jpg", "Maybe", "Yes")])
    with pytest.raises(ValueError, match=r"no meta \['image'\]"):
        MMEScore().update(["Yes"], [["Yes"]], [{"subtask": "count"}])


OPTIONS = {"A": "dog", "B": "cat", "C": "bird", "D": "fish"}


@pytest.mark.parametrize(
    ("reply", "expected"),
    [
        ("B", "B"),
        ("(C) bird", "C"),
        ("The answer is D.", "D"),
        ("B. cat", "B"),
        ("A cat is sitting on the mat by the door", "B"),  # a sentence-opening article 'A' is not option A
        ("A and B", None),  # two letters and no option text
        ("It is a dog", "A"),  # no letter: the one option text in the reply
        ("a dog chasing a cat", None),  # two option texts
        ("E", None),
    ],
)
def test_option_letter(reply, expected):
    assert option_letter(reply, OPTIONS) == expected


def test_circular_eval():
    metric = CircularAccuracy()

    def rotated(shift: int):
        """Options of rotation ``shift`` and the letter of the right answer ("dog")."""
        texts = list(OPTIONS.values())
        options = {letter: texts[(k + shift) % 4] for k, letter in enumerate("ABCD")}
        return options, next(k for k, v in options.items() if v == "dog")

    replies, refs, meta = [], [], []
    for shift in range(4):  # question 1: right under every rotation (by letter or by text)
        options, letter = rotated(shift)
        replies.append(letter if shift % 2 else "dog")
        refs.append([letter])
        meta.append({"group": 1, "options": options})
    for shift in range(4):  # question 2: wrong under the last rotation
        options, letter = rotated(shift)
        replies.append(letter if shift < 3 else "cat")
        refs.append([letter])
        meta.append({"group": "q2", "options": options})
    metric.update(replies, refs, meta)
    out = metric.compute()
    assert out["accuracy"].item() == 0.5
    assert out["single_pass"].item() == pytest.approx(7 / 8)
    assert out["unparsed"].item() == 0.0


@pytest.mark.parametrize(
    ("reply", "expected"),
    [
        ("Yes, there is a dog.", "yes"),
        ("No.", "no"),
        ("There is not a dog", "no"),
        ("Yes. No other animal.", "yes"),  # only the first sentence
        ("NO", "yes"),  # words are compared as they are: only 'No', 'no' and 'not'
        ("nothing", "yes"),
        ("no, there isn't", "no"),
    ],
)
def test_pope_reading(reply, expected):
    assert pope_yes_no(reply) == expected


def test_pope_scores_per_split():
    metric = POPEScore()
    metric.update(
        ["Yes, there is a dog.", "No.", "There is a cat.", "There is not a dog", "yes", "Yes"],
        [["yes"], ["no"], ["no"], ["yes"], ["yes"], ["yes"]],
        [{"split": "random"}] * 4 + [{"split": "popular"}] * 2,
    )
    out = metric.compute()
    # random: TP 1, TN 1, FP 1, FN 1
    for key in ("accuracy", "precision", "recall", "f1", "yes_ratio"):
        assert out[f"random/{key}"].item() == pytest.approx(0.5)
        assert out[f"popular/{key}"].item() == pytest.approx(1.0)
    # all: TP 3, FP 1, TN 1, FN 1
    assert out["accuracy"].item() == pytest.approx(4 / 6)
    assert out["precision"].item() == pytest.approx(3 / 4)
    assert out["recall"].item() == pytest.approx(3 / 4)
    assert out["f1"].item() == pytest.approx(3 / 4)
    assert out["yes_ratio"].item() == pytest.approx(4 / 6)
    assert "adversarial/f1" not in out


def _item(i: int, reference: str, meta: dict, generation: bool) -> dict:
    ids = torch.tensor([1, 2, 3] if not generation else [1, 2])
    item = {
        "id": f"s{i}",
        "input_ids": ids,
        "labels": ids,
        "pixel_values": None,
        "num_images": 0,
        "meta": meta,
    }
    if generation:
        return item | {"prompt": "q", "references": [reference]}
    return item | {"generation": _item(i, reference, meta, True)}


def test_update_from_reads_replies_references_and_meta_of_the_generation_batch():
    rows = MME_ROWS[:4]
    items = [_item(i, r[2], {"subtask": r[0], "image": r[1]}, False) for i, r in enumerate(rows)]
    batch = collate(items, pad_token_id=0)
    assert batch.generation is not None and batch.generation.references == [["Yes"], ["No"], ["Yes"], ["No"]]
    metric = MMEScore()
    metric.update_from(EvalOutputs(batch, torch.zeros(4, 3, 5), [r[3] for r in rows]))
    assert metric.compute()["existence/score"].item() == pytest.approx(125.0)
    with pytest.raises(ValueError, match="MMEScore scores generated replies"):
        metric.update_from(EvalOutputs(batch, torch.zeros(4, 3, 5), None))
