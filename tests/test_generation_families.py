"""Batched generation for every family (prefix, Flamingo, mPLUG-Owl3, CogVLM): a row of a left-padded prompt
batch (prompts of different lengths, with one, two, three or no images) gets the reply it gets alone, under greedy
decoding and beam search; beams repeat the per-layer inputs like the rows (``LayerInputs.expand``); the visual
features are computed once per ``generate`` call; stop strings end a row and cut its reply."""

from __future__ import annotations

import json

import pytest
import torch

from lit_mllm.data import Conversations, collate
from lit_mllm.eval import GenerationConfig
from lit_mllm.eval.generation import cut_at_stop
from lit_mllm.nn.fusion import MediaInputs
from lit_mllm.nn.fusion.visual_expert import ExpertInputs
from tests.conftest import tiny_model
from tests.test_cogvlm import build as tiny_cogvlm
from tests.test_cogvlm import perturb_experts
from tests.test_flamingo import set_gates, tiny_flamingo
from tests.test_owl3 import tiny_owl3

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread is fastest


def flamingo():
    model = tiny_flamingo()
    set_gates(model, attn=1.5, ff=0.5)
    return model


def cogvlm():
    model = tiny_cogvlm()
    perturb_experts(model, scale=2.0)
    return model


FAMILIES = {"prefix": tiny_model, "flamingo": flamingo, "owl3": tiny_owl3, "cogvlm": cogvlm}


def prompts(root, tmp_path) -> Conversations:
    """Four conversations of different lengths: one, two, three and no image."""
    images = [f"images/train_{i:06d}.png" for i in range(3)]
    turns = [
        ("<image>\nWhat shape is it?", images[:1]),
        ("First <image> then <image>. Which of the two pictures has more shapes in it?", images[:2]),
        ("Look: <image> and <image> and <image>. How many?", images),
        ("Name a colour.", []),
    ]
    records = [
        {
            "id": f"q{k}",
            "image": imgs,
            "conversations": [{"from": "human", "value": q}, {"from": "gpt", "value": "a"}],
        }
        for k, (q, imgs) in enumerate(turns)
    ]
    path = tmp_path / "prompts.json"
    path.write_text(json.dumps(records))
    return Conversations(str(path), image_folder=str(root)).open(root)


def prompt_batch(model, source, rows):
    proc = model.processor()
    items = [proc(source.sample(i, "<image>"), for_generation=True) for i in rows]
    return collate(items, pad_token_id=proc.tokenizer.pad_token_id, padding_side="left")


def new_tokens(model, batch, **options) -> list[list[int]]:
    """Each row's generated ids, without the padding after a row that finished early."""
    inputs = model.inputs(batch)
    lm = model.language_model
    new = lm.generate(inputs.embeds, batch.attention_mask, inputs.layer_inputs, **options)
    pad = lm.tokenizer.pad_token_id
    out = []
    for row in new.tolist():
        while row and row[-1] == pad:
            row.pop()
        out.append(row)
    return out


DECODING = {
    "greedy": dict(max_new_tokens=5, min_new_tokens=5, do_sample=False),
    "beam": dict(max_new_tokens=5, num_beams=3, do_sample=False),
}


@pytest.mark.parametrize("decoding", DECODING)
@pytest.mark.parametrize("family", FAMILIES)
def test_a_row_of_a_left_padded_batch_gets_the_reply_it_gets_alone(family, decoding, shapes_root, tmp_path):
    model = FAMILIES[family]().eval()
    source = prompts(shapes_root, tmp_path)
    batch = prompt_batch(model, source, range(4))
    assert (batch.attention_mask == 0).any() and batch.images_per_row[-1] == 0
    options = DECODING[decoding]
    with torch.no_grad():
        together = new_tokens(model, batch, **options)
        alone = [new_tokens(model, prompt_batch(model, source, [row]), **options)[0] for row in range(4)]
        assert together == alone
        assert all(together)
        # the module's replies (decoded, stripped) are those of the ids
        replies = model.generate(batch, **options)
    tokenizer = model.language_model.tokenizer
    assert replies == [tokenizer.decode(ids, skip_special_tokens=True).strip() for ids in together]


@pytest.mark.parametrize("family", ["flamingo", "owl3", "cogvlm"])
def test_beams_get_the_layer_inputs_of_their_prompt_row(family, shapes_root, tmp_path):
    """Beam search on 2 prompt rows runs the decoder layers on 2 * 3 rows whose layer inputs are each prompt row's,
    repeated in place (rows 0-2: prompt 0, rows 3-5: prompt 1); the images are encoded once."""
    model = FAMILIES[family]().eval()
    source = prompts(shapes_root, tmp_path)
    batch = prompt_batch(model, source, [0, 2])
    seen, encodes = [], []
    model.connector.register_forward_hook(lambda m, args, out: encodes.append(out.shape[0]))
    layer = model.language_model.decoder_layers[0]
    layer.register_forward_pre_hook(lambda m, args, kw: seen.append(kw["layer_inputs"]), with_kwargs=True)
    with torch.no_grad():
        inputs = model.inputs(batch)
        encodes.clear()
        model.generate(batch, max_new_tokens=3, num_beams=3)
    assert encodes == [4]  # the prompt rows' 1 + 3 images, once for the whole call
    assert len(seen) == 3 and all(s is seen[0] for s in seen)  # one expanded copy, made once
    given = inputs.layer_inputs
    field = "image_mask" if isinstance(given, ExpertInputs) else "media_mask"
    expected = getattr(given, field)[[0, 0, 0, 1, 1, 1]]
    assert torch.equal(getattr(seen[0], field), expected)
    if isinstance(given, MediaInputs):
        assert torch.equal(seen[0].features, given.features[[0, 0, 0, 1, 1, 1]])


def test_expand_repeats_every_tensor_field_by_row():
    features, mask = torch.randn(2, 3, 4, 5), torch.rand(2, 6, 3) > 0.5
    out = MediaInputs(features, mask).expand(2)
    assert type(out) is MediaInputs
    assert torch.equal(out.features, torch.stack([features[0], features[0], features[1], features[1]]))
    assert torch.equal(out.media_mask, torch.stack([mask[0], mask[0], mask[1], mask[1]]))
    same = MediaInputs(features, mask)
    assert same.expand(1) is same


def test_flamingo_encodes_the_images_once_per_generate_call(shapes_root, tmp_path):
    model = flamingo().eval()
    source = prompts(shapes_root, tmp_path)
    batch = prompt_batch(model, source, range(4))
    towers, steps = [], []
    model.vision_tower.register_forward_hook(lambda m, args, out: towers.append(args[0].shape[0]))
    model.xattn_layers()[0].xattn.register_forward_pre_hook(lambda m, args: steps.append(args[0].shape[1]))
    with torch.no_grad():
        model.generate(batch, max_new_tokens=4, min_new_tokens=4)
    assert towers == [6]  # 1 + 2 + 3 images, once
    assert steps == [batch.input_ids.shape[1], 1, 1, 1]  # the prompt, then one new position per step


@pytest.mark.parametrize("family", ["prefix", "flamingo"])
def test_a_stop_string_ends_its_row_and_cuts_the_reply(family, shapes_root, tmp_path):
    model = FAMILIES[family]().eval()
    source = prompts(shapes_root, tmp_path)
    batch = prompt_batch(model, source, range(4))
    tokenizer = model.language_model.tokenizer
    options = dict(max_new_tokens=8, min_new_tokens=8, do_sample=False)
    with torch.no_grad():
        free = new_tokens(model, batch, **options)
    # a stop string that row r first produces as its k-th token (k >= 1)
    r, k, stop = next(
        (r, k, text)
        for r in range(4)
        for k in range(1, 8)
        if (text := tokenizer.decode(free[r][k : k + 1])).strip().isalpha()
        and text not in tokenizer.decode(free[r][:k])
    )
    with torch.no_grad():
        stopped = new_tokens(model, batch, **options, stop_strings=[stop])
        replies = model.generate(batch, **options, stop_strings=[stop])
    assert stopped[r] == free[r][: k + 1]  # the row ended with the stop string
    full = [tokenizer.decode(ids, skip_special_tokens=True) for ids in stopped]
    assert replies == [cut_at_stop(text, [stop]).strip() for text in full]
    assert stop not in replies[r]
    assert replies[r] == tokenizer.decode(free[r][:k], skip_special_tokens=True).strip()
    for row in range(4):  # a row that never produces it runs on
        if stop not in tokenizer.decode(free[row], skip_special_tokens=True):
            assert stopped[row] == free[row]


def test_generation_config_stop_strings_and_cut():
    config = GenerationConfig(max_new_tokens=4, stop=["\n", "Question:"])
    assert config.kwargs()["stop_strings"] == ["\n", "Question:"]
    assert "stop_strings" not in GenerationConfig().kwargs()
    assert cut_at_stop("a circle\nQuestion: next", config.stop) == "a circle"
    assert cut_at_stop("red Question:\n", config.stop) == "red "
    assert cut_at_stop("no stop here", config.stop) == "no stop here"
    assert cut_at_stop("x", None) == "x"
    with pytest.raises(ValueError, match="non-empty"):
        GenerationConfig(stop=[""])
