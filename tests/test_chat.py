"""Chat formats and label masking: golden tests (exactly which tokens are learned) and properties."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import AutoTokenizer

from lit_mllm.nn.language.chat import (
    IGNORE_INDEX,
    Plain,
    TokenizerTemplate,
    Turn,
    VicunaV1,
    encode_conversation,
)
from lit_mllm.nn.language.tokenizer import TINY_TOKENIZER_DIR

TOK = AutoTokenizer.from_pretrained(TINY_TOKENIZER_DIR)
SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
    "detailed, and polite answers to the user's questions."
)
TWO_ROUNDS = [
    Turn("user", "<image>\nWhat color is the circle?"),
    Turn("assistant", "red"),
    Turn("user", "How many shapes are there?"),
    Turn("assistant", "2"),
]


def learned_runs(ids, labels):
    """Decoded maximal runs of supervised tokens."""
    runs, cur = [], []
    for i, lab in zip(ids, labels):
        if lab != IGNORE_INDEX:
            assert lab == i
            cur.append(i)
        elif cur:
            runs.append(cur)
            cur = []
    if cur:
        runs.append(cur)
    return [TOK.decode(r) for r in runs]


def test_vicuna_v1_golden():
    ids, labels = encode_conversation(TOK, VicunaV1(), TWO_ROUNDS)
    assert TOK.decode(ids) == (
        f"<s>{SYSTEM} USER: <image>\nWhat color is the circle? ASSISTANT: red</s>"
        "USER: How many shapes are there? ASSISTANT: 2</s>"
    )
    assert learned_runs(ids, labels) == [" red</s>", " 2</s>"]


def test_vicuna_v1_system_turn_and_generation_prompt():
    turns = [Turn("system", "Be brief."), *TWO_ROUNDS[:3]]
    ids, labels = encode_conversation(TOK, VicunaV1(), turns, add_generation_prompt=True)
    text = TOK.decode(ids)
    assert text.startswith("<s>Be brief. USER:") and text.endswith("ASSISTANT:")
    assert learned_runs(ids, labels) == [" red</s>"]


def test_plain_golden():
    turns = [Turn("user", "<image>\nDescribe the image briefly."), Turn("assistant", "A red circle.")]
    ids, labels = encode_conversation(TOK, Plain(), turns)
    assert TOK.decode(ids) == "<s><image>A red circle.</s>"
    assert learned_runs(ids, labels) == ["A red circle.</s>"]
    with pytest.raises(ValueError, match="single-round"):
        encode_conversation(TOK, Plain(), TWO_ROUNDS)


def test_tokenizer_template_chatml_golden():
    ids, labels = encode_conversation(TOK, TokenizerTemplate(), TWO_ROUNDS)
    assert TOK.decode(ids) == (
        "<|im_start|>user\n<image>\nWhat color is the circle?<|im_end|>\n<|im_start|>assistant\nred<|im_end|>\n"
        "<|im_start|>user\nHow many shapes are there?<|im_end|>\n<|im_start|>assistant\n2<|im_end|>\n"
    )
    assert learned_runs(ids, labels) == ["red<|im_end|>\n", "2<|im_end|>\n"]


def test_template_that_is_not_prefix_stable_is_refused():
    tok = AutoTokenizer.from_pretrained(TINY_TOKENIZER_DIR)
    tok.chat_template = "{{ messages | length }}{% for m in messages %}{{ m['content'] }}{% endfor %}"
    with pytest.raises(ValueError, match="prefix-stable"):
        encode_conversation(tok, TokenizerTemplate(), TWO_ROUNDS)


@pytest.mark.parametrize(
    "turns,match",
    [
        ([Turn("assistant", "hi")], "should be a user turn"),
        ([Turn("user", "a"), Turn("user", "b")], "should be a assistant turn"),
        ([Turn("user", "a")], "must end with a assistant turn"),
    ],
)
def test_bad_turn_order(turns, match):
    with pytest.raises(ValueError, match=match):
        encode_conversation(TOK, VicunaV1(), turns)


text = st.text(alphabet="abcdefgh XYZ0123?!.,:'-\n", min_size=1, max_size=30).filter(lambda s: s.strip())


@settings(max_examples=60, deadline=None)
@given(
    rounds=st.lists(st.tuples(text, text), min_size=1, max_size=4), fmt=st.sampled_from(["vicuna", "chatml"])
)
def test_learned_tokens_are_exactly_the_replies(rounds, fmt):
    turns = [t for q, a in rounds for t in (Turn("user", q), Turn("assistant", a))]
    chat = VicunaV1() if fmt == "vicuna" else TokenizerTemplate()
    ids, labels = encode_conversation(TOK, chat, turns)
    expected = [f" {a}</s>" if fmt == "vicuna" else f"{a}<|im_end|>\n" for _, a in rounds]
    assert "".join(learned_runs(ids, labels)) == "".join(expected)
    # prompt tokens are never learned: the unlearned text is everything else
    unlearned = TOK.decode([i for i, lab in zip(ids, labels) if lab == IGNORE_INDEX])
    assert all(q in unlearned for q, _ in rounds)


# -- the fast path of tokenizing and labelling (what the loader runs per sample) --------------------------------
TEXTS = [
    "",
    "plain words",
    SYSTEM + " USER: <image>\nWhat color is the circle? ASSISTANT: red</s>USER: und jetzt? ASSISTANT: 2</s>",
    "  leading spaces, ünïcödé, emoji \U0001f600 and <image><image> tokens\n\n\ttabs",
]


@pytest.mark.parametrize("text", TEXTS)
def test_tokenize_with_offsets_equals_the_tokenizer_call(text):
    from lit_mllm.nn.language.chat import tokenize_with_offsets

    enc = TOK(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = tokenize_with_offsets(TOK, text)
    assert list(ids) == enc["input_ids"]
    assert [tuple(o) for o in offsets] == [tuple(o) for o in enc["offset_mapping"]]


def test_tokenize_with_offsets_leaves_a_backend_that_truncates_to_the_tokenizer_call():
    """A tokenizer.json may enable truncation in the Rust backend; the tokenizer's own call switches it off for a
    call without truncation, so must the fast path (by not taking it)."""
    import copy

    from lit_mllm.nn.language.chat import tokenize_with_offsets

    tok = copy.deepcopy(TOK)
    tok.backend_tokenizer.enable_truncation(max_length=3)
    ids, _ = tokenize_with_offsets(tok, TEXTS[2])
    assert len(ids) > 3 and list(ids) == TOK(TEXTS[2], add_special_tokens=False)["input_ids"]


def per_character_labels(ids, offsets, learn):
    """The labelling rule spelled out character by character (a token is learned when any character it covers is
    supervised; a zero-width token when it sits strictly inside a supervised span)."""
    supervised = {c for start, end in learn for c in range(start, end)}
    out = []
    for tok, (a, b) in zip(ids, offsets):
        hit = (
            any(start < a < end for start, end in learn)
            if a == b
            else any(c in supervised for c in range(a, b))
        )
        out.append(tok if hit else IGNORE_INDEX)
    return out


@settings(max_examples=60, deadline=None)
@given(
    spans=st.lists(st.tuples(st.integers(0, 40), st.integers(0, 12)), max_size=4),
    tokens=st.lists(st.tuples(st.integers(0, 40), st.integers(0, 6)), max_size=30),
)
def test_learned_tokens_follow_the_per_character_rule(spans, tokens):
    import numpy as np

    from lit_mllm.nn.language.chat import learned_tokens

    learn = [(s, min(s + n, 48)) for s, n in spans]
    offsets = [(a, min(a + n, 48)) for a, n in tokens]  # zero-width ones included (n = 0)
    ids = list(range(100, 100 + len(offsets)))
    labels = np.where(learned_tokens(offsets, learn, 48), ids, IGNORE_INDEX).tolist()
    assert labels == per_character_labels(ids, offsets, learn)
