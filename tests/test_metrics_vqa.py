"""VQA accuracy: the official answer processing rule by rule (each expected value worked out by hand from
``vqaEval.py``'s code), the leave-one-out average, and exact match with that processing."""

import pytest

from lit_mllm.eval import GeneratedExactMatch, VQAAccuracy, vqa_accuracy, vqa_normalize
from lit_mllm.eval.answers import vqa_digit_article, vqa_punctuation


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("yes!", "yes "),  # no space next to '!' anywhere, no digit-comma: '!' becomes a space
        ("hello, world", "hello world"),  # ', ' occurs: every comma is deleted
        ("red,blue", "red blue"),  # no space next to a comma: it becomes a space
        ("a, b,c", "a bc"),  # one ', ' in the text deletes every comma, also the unspaced one
        ("1,000", "1000"),  # digit-comma-digit: deleted
        ("1,000/2", "10002"),  # a digit-comma anywhere deletes every punctuation mark, '/' too
        ("1000/2", "1000 2"),  # ... without it, '/' becomes a space
        ("t-shirt", "t shirt"),
        ("well - known", "well  known"),
        ("2.5", "2.5"),  # a period before a digit stays
        (".5", ".5"),
        ("3.", "3"),  # the look-behind is really a look-ahead: a period after a digit goes
        ("e.g.", "eg"),
        ("mr. smith", "mr smith"),
        ("3:30", "3:30"),  # the colon is not in the list
        ("don't", "don't"),  # nor the apostrophe
        ("(dog)", " dog "),
        ("." * 40, "." * 8),  # re.UNICODE passed as the count: at most 32 periods go
    ],
)
def test_punctuation(text, expected):
    assert vqa_punctuation(text) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Two dogs", "2 dogs"),
        ("none", "0"),
        ("ten", "10"),
        ("eleven", "eleven"),  # only zero..ten (and none)
        ("The one", "1"),  # article dropped, number word converted
        ("a dog", "dog"),
        ("an apple", "apple"),
        ("The", ""),
        ("dont", "don't"),
        ("isnt it", "isn't it"),
        ("Im", "im"),  # the map's key is 'Im', but words are lower-cased first: never matched
        ("  many   spaces ", "many spaces"),
    ],
)
def test_digit_article(text, expected):
    assert vqa_digit_article(text) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Yes.", "yes"),
        ("yes\n", "yes"),
        ("\tTwo.", "2"),
        ("The Dog!", "dog"),
        ("1,000 people", "1000 people"),
    ],
)
def test_normalize(text, expected):
    assert vqa_normalize(text) == expected


@pytest.mark.parametrize(
    ("reply", "answers", "expected"),
    [
        ("yes", ["yes"] * 10, 1.0),
        # 2 of 10 match: the 2 matching left out see 1 match (1/3), the 8 others see 2 (2/3): (2/3 + 16/3) / 10
        ("2", ["2"] * 2 + ["3"] * 8, 0.6),
        ("two", ["2"] * 2 + ["3"] * 8, 0.6),  # answers differ: the reply is processed ("two" -> "2")
        ("red", ["red"] * 3 + ["blue"] * 7, 0.9),  # 3 matches: (3 * 2/3 + 7 * 1) / 10
        ("red", ["red"] * 4 + ["blue"] * 6, 1.0),  # 4 matches: 3 or 4 remain, min(., 1) = 1
        ("red", ["red"] + ["blue"] * 9, 0.3),  # 1 match: (0 + 9 * 1/3) / 10
        ("green", ["red"] * 5 + ["blue"] * 5, 0.0),
        ("dog", ["the dog"] * 3 + ["cat"] * 7, 0.9),  # answers processed too: "the dog" -> "dog"
    ],
)
def test_accuracy_leave_one_out(reply, answers, expected):
    assert vqa_accuracy(reply, answers) == pytest.approx(expected)


def test_unanimous_answers_are_not_processed_by_the_official_code():
    # vqaEval.py processes only when the ten answers differ; the raw "Yes." then misses ten "yes"
    assert vqa_accuracy("Yes.", ["yes"] * 10, normalize_reply=False) == 0.0
    assert vqa_accuracy("Yes.", ["yes"] * 10, normalize_reply=True) == 1.0
    # with differing answers both readings process the reply
    answers = ["yes"] * 9 + ["no"]
    assert vqa_accuracy("Yes.", answers, normalize_reply=False) == vqa_accuracy("Yes.", answers) == 1.0


def test_single_answer_is_refused():
    with pytest.raises(ValueError, match="GeneratedExactMatch"):
        vqa_accuracy("yes", ["yes"])


def test_metric_per_answer_type():
    metric = VQAAccuracy()
    metric.update(
        ["yes", "2", "red", "cat"],
        [["yes"] * 10, ["2"] * 2 + ["3"] * 8, ["red"] * 3 + ["blue"] * 7, []],  # the last is not counted
        [{"answer_type": "yes/no"}, {"answer_type": "number"}, {"answer_type": "other"}, {}],
    )
    out = metric.compute()
    assert out["accuracy"].item() == pytest.approx((1.0 + 0.6 + 0.9) / 3)
    assert out["yes_no"].item() == pytest.approx(1.0)
    assert out["number"].item() == pytest.approx(0.6)
    assert out["other"].item() == pytest.approx(0.9)
    with pytest.raises(ValueError, match="declared groups"):
        metric.update(["x"], [["x", "y"]], [{"answer_type": "colour"}])


def test_exact_match_with_vqa_processing():
    plain = GeneratedExactMatch()
    plain.update(["Two.", "the cat"], [["2"], ["cat"]])
    assert plain.compute().item() == 0.0
    metric = GeneratedExactMatch(normalize="vqa")
    metric.update(["Two.", "the cat", "dog", "square"], [["2"], ["cat"], ["cat"], ["square"]])
    assert metric.compute().item() == pytest.approx(3 / 4)
