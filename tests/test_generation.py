"""Generation: the KV cache changes nothing, and greedy generation agrees with the teacher-forced forward
that ``val/accuracy`` relies on (left-padded generation vs right-padded training positions)."""

import torch

from lit_mllm.data import collate, read_llava
from lit_mllm.eval.metrics import reply_exact_match
from lit_mllm.nn.language.chat import IGNORE_INDEX
from tests.conftest import tiny_model


def _prompts(model, shapes_root, n=3):
    proc = model.processor()
    items = [proc(s, for_generation=True) for s in read_llava(shapes_root / "train.json")[:n]]
    # different prompt lengths, so left padding matters
    assert len({len(it["input_ids"]) for it in items}) > 1
    return proc, items


def _sharpen(model):
    with torch.no_grad():  # a random tiny LM is near uniform; make argmax decisive
        model.language_model.model.lm_head.weight.mul_(20)


def test_kv_cache_gives_the_same_tokens(shapes_root):
    model = tiny_model().eval()
    _sharpen(model)
    proc, items = _prompts(model, shapes_root)
    batch = collate(items, proc.tokenizer.pad_token_id, padding_side="left")
    embeds = model.inputs(batch).embeds
    with_cache = model.language_model.generate(
        embeds, batch.attention_mask, max_new_tokens=8, do_sample=False, use_cache=True
    )
    without = model.language_model.generate(
        embeds, batch.attention_mask, max_new_tokens=8, do_sample=False, use_cache=False
    )
    assert torch.equal(with_cache, without)


def test_greedy_generation_equals_teacher_forced_argmax(shapes_root):
    model = tiny_model().eval()
    _sharpen(model)
    proc, items = _prompts(model, shapes_root)
    batch = collate(items, proc.tokenizer.pad_token_id, padding_side="left")
    new = model.language_model.generate(
        model.inputs(batch).embeds, batch.attention_mask, max_new_tokens=6, do_sample=False
    )
    eos = proc.tokenizer.eos_token_id
    forced = []
    for it, gen in zip(items, new.tolist()):
        gen = gen[: gen.index(eos) + 1] if eos in gen else gen
        gen = [g for g in gen if g != proc.tokenizer.pad_token_id]
        forced.append(
            {
                **it,
                "input_ids": torch.cat([it["input_ids"], torch.tensor(gen)]),
                "labels": torch.tensor([IGNORE_INDEX] * len(it["input_ids"]) + gen),
            }
        )
    right = collate(forced, proc.tokenizer.pad_token_id)
    with torch.no_grad():
        correct, total = reply_exact_match(model(right), right.labels)
    assert int(total) == len(items) and int(correct) == len(items)


def test_predict_step_returns_answers_with_references(shapes_root):
    model = tiny_model().eval()
    proc, items = _prompts(model, shapes_root, n=2)
    out = model.predict_step(collate(items, proc.tokenizer.pad_token_id, padding_side="left"), 0)
    assert [o["id"] for o in out] == [it["id"] for it in items]
    assert all(isinstance(o["answer"], str) and o["references"] for o in out)
