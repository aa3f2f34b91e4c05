"""The mPLUG-Owl3 family: with no images (or before the first image) the logits are the bare LLM's; masking (no
token sees a later image; packed samples only their own); MI-RoPE (an image's keys rotate with its marker's
position: a shift of all positions changes nothing, moving one marker's position does); generation with a KV cache
equals decoding without it; parts, the default stage, the configs through the CLI, the memory estimator and export
refusing the family; and a few-step overfit on ShapesWorld samples."""

from __future__ import annotations

from functools import partial

import pytest
import torch

from lit_mllm.cli import run
from lit_mllm.data import collate
from lit_mllm.lit import MPLUGOwl3VLM
from lit_mllm.nn.connectors import LinearConnector
from lit_mllm.nn.fusion import HyperAttentionInputs, HyperAttentionLayer, media_mask
from lit_mllm.nn.fusion.hyper_attention import HyperAttention, apply_rope, rope_cos_sin
from lit_mllm.nn.language import TinyLlama
from lit_mllm.nn.vision import TinyCLIPVision
from lit_mllm.training import Stage
from tests.conftest import cli_args, overfit_losses
from tests.test_flamingo import batch_of, two_image_conversations

LM = dict(hidden_size=64, num_layers=3, num_heads=4, num_kv_heads=2)
CONFIGS = ["--config", "configs/quickstart.yaml", "--config", "configs/model/owl3.yaml"]


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread is fastest


def tiny_owl3(layers=(0, 2), stage: Stage | None = None, **lm) -> MPLUGOwl3VLM:
    torch.manual_seed(0)
    model = MPLUGOwl3VLM(
        TinyCLIPVision(image_size=32, patch_size=8, hidden_size=32, num_layers=2, num_heads=2),
        TinyLlama(**LM, **lm),
        connector=partial(LinearConnector),
        hyper_layers=list(layers),
        stage=stage,
    )
    with torch.no_grad():  # a gate and keys far from their start, so the visual branch is visible
        for module in model.modules():
            if isinstance(module, HyperAttention):
                module.gate_proj.bias.fill_(1.0)
                module.v_kv_proj.weight.normal_(0, 0.3)
    return model


def bare_lm(model: MPLUGOwl3VLM) -> TinyLlama:
    """The model's LLM without hyper-attention: a TinyLlama holding the wrapped layers' weights."""
    lm = TinyLlama(**LM).eval()
    state = model.language_model.state_dict()
    lm.load_state_dict(
        {k.replace("decoder_layer.", ""): v for k, v in state.items() if ".hyper_attention." not in k}
    )
    return lm


# -- identity ------------------------------------------------------------------------------------------------------
def test_no_images_give_the_bare_lm_logits(shapes_root, tmp_path):
    """A call without images (the zero-image fallback the module builds for text-only batches: one image nobody
    sees) and a call without layer inputs both give the bare LLM's logits bit for bit."""
    model = tiny_owl3().eval()
    batch = batch_of(model, two_image_conversations(shapes_root, tmp_path), [0, 1])
    ids = batch.input_ids.masked_fill(batch.input_ids == model.language_model.image_token_id, 5)
    text_only = type(batch)(
        **{**batch.__dict__, "input_ids": ids, "images_per_row": [0, 0], "pixel_values": None}
    )
    lm = model.language_model
    with torch.no_grad():
        inputs = model.language_inputs(text_only, None)
        assert (
            isinstance(inputs.layer_inputs, HyperAttentionInputs) and not inputs.layer_inputs.media_mask.any()
        )
        ours = lm(inputs.embeds, batch.attention_mask, layer_inputs=inputs.layer_inputs)
        plain = lm(inputs.embeds, batch.attention_mask)
        bare = bare_lm(model)(inputs.embeds, batch.attention_mask)
    assert torch.equal(ours, bare) and torch.equal(plain, bare)


def test_text_before_the_first_image_gets_the_bare_lm_logits_and_later_text_does_not(shapes_root, tmp_path):
    model = tiny_owl3().eval()
    batch = batch_of(model, two_image_conversations(shapes_root, tmp_path), [1])
    first = int((batch.input_ids[0] == model.language_model.image_token_id).nonzero()[0])
    with torch.no_grad():
        ours = model(batch)
        bare = bare_lm(model)(model.language_model.embed(batch.input_ids), batch.attention_mask)
    assert torch.equal(ours[:, :first], bare[:, :first])
    assert not torch.isclose(ours[:, first:], bare[:, first:], atol=1e-4).all(-1).any()


# -- masking and MI-RoPE ---------------------------------------------------------------------------------------------
def test_a_later_image_changes_no_logit_before_its_marker(shapes_root, tmp_path):
    model = tiny_owl3().eval()
    batch = batch_of(model, two_image_conversations(shapes_root, tmp_path), [1])
    second = int((batch.input_ids[0] == model.language_model.image_token_id).nonzero()[1])
    other = batch.pixel_values.clone()
    other[1] = 255 - other[1]
    with torch.no_grad():
        logits = model(batch)
        changed = model(type(batch)(**{**batch.__dict__, "pixel_values": other}))
    assert torch.equal(changed[:, :second], logits[:, :second])
    assert not torch.isclose(changed[:, second:], logits[:, second:], atol=1e-5).all(-1).any()


def test_packed_samples_see_only_their_own_images(shapes_root, tmp_path):
    model = tiny_owl3().eval()
    source = two_image_conversations(shapes_root, tmp_path)
    proc = model.processor()
    items = [proc(source.sample(i, "<image>")) for i in range(3)]
    packed = collate(items, pad_token_id=proc.tokenizer.pad_token_id, pack_length=400)
    assert packed.num_rows == 1 and packed.images_per_row == [6]
    with torch.no_grad():
        together = model(packed)[0]
        for i in range(3):
            alone = model(batch_of(model, source, [i]))[0]
            torch.testing.assert_close(together[packed.sample_index[0] == i], alone, rtol=1e-5, atol=1e-5)


def test_image_keys_take_their_markers_rotary_position():
    """The branch depends on positions only through query position minus marker position (RoPE's relative form):
    shifting every position leaves it, moving one image's marker position changes it."""
    torch.manual_seed(0)
    hyper = HyperAttention(dim=32, num_heads=4, num_kv_heads=2, head_dim=8)
    q, media = torch.randn(1, 4, 5, 8), torch.randn(1, 6, 32)
    mask = torch.ones(1, 5, 6, dtype=torch.bool)

    def branch(query_pos, media_pos):
        cos, sin = rope_cos_sin(torch.tensor([query_pos]), 8, 10000.0)
        kcos, ksin = rope_cos_sin(torch.tensor([media_pos]).repeat_interleave(3, dim=1), 8, 10000.0)
        return hyper(apply_rope(q, cos, sin), media, kcos, ksin, mask)

    base = branch([3, 4, 5, 6, 7], [1, 4])
    torch.testing.assert_close(branch([13, 14, 15, 16, 17], [11, 14]), base, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(branch([3, 4, 5, 6, 7], [1, 2]), base, atol=1e-4)


def test_media_positions_are_the_markers_positions(shapes_root, tmp_path):
    model = tiny_owl3()
    batch = batch_of(model, two_image_conversations(shapes_root, tmp_path), [0, 2], for_generation=True)
    inputs = model.language_inputs(batch, model.encode_images(batch.pixel_values)).layer_inputs
    for row in range(2):  # left-padded rows: positions count real tokens
        real = batch.input_ids[row][batch.attention_mask[row].bool()]
        expected = (real == model.language_model.image_token_id).nonzero()[:, 0]
        assert inputs.media_positions[row, : len(expected)].tolist() == expected.tolist()


# -- generation ----------------------------------------------------------------------------------------------------
def test_generation_with_a_kv_cache_equals_decoding_without(shapes_root, tmp_path):
    model = tiny_owl3().eval()
    prompt = batch_of(model, two_image_conversations(shapes_root, tmp_path), [2], for_generation=True)
    lm = model.language_model
    inputs = model.inputs(prompt)
    options = dict(max_new_tokens=5, min_new_tokens=5, do_sample=False)
    with torch.no_grad():
        ours = lm.generate(inputs.embeds, prompt.attention_mask, inputs.layer_inputs, **options)
        features, positions = inputs.layer_inputs.features, inputs.layer_inputs.media_positions
        ids = prompt.input_ids
        for _ in range(5):  # full forward passes, the mask rebuilt for the longer text
            layer_inputs = HyperAttentionInputs(features, media_mask(ids, lm.image_token_id), positions)
            token = lm(lm.embed(ids), layer_inputs=layer_inputs)[:, -1].argmax(-1, keepdim=True)
            ids = torch.cat([ids, token], dim=1)
    assert torch.equal(ours, ids[:, prompt.input_ids.shape[1] :])
    assert model.generate(prompt, max_new_tokens=3)  # the module's generate runs the same path


# -- the family module ---------------------------------------------------------------------------------------------
def test_one_marker_per_image_the_parts_and_the_default_stage(shapes_root, tmp_path):
    model = tiny_owl3(layers=[1])
    assert model.processor().tokens_per_image == 1 and model.media_tokens == 16
    assert [
        i for i, e in enumerate(model.language_model.decoder_layers) if isinstance(e, HyperAttentionLayer)
    ] == [1]
    layer = model.hyper_layers()[0]
    assert model.parts()["hyper_attention"] == [layer.hyper_attention]
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("connector.") or ".hyper_attention." in n for n in trainable)
    assert any(".hyper_attention.v_kv_proj." in n for n in trainable)
    # the shared norm and query projection are the LLM's own (frozen), not copies
    assert not any("input_layernorm" in n or "q_proj" in n for n in trainable)
    facts = model.describe()
    assert facts["image_tokens"] == 1 and facts["media_tokens"] == 16 and facts["hyper_layers"] == 1


def test_a_few_steps_overfit_shapesworld_samples(shapes_root):
    """Everything trains (a random LLM) on four ShapesWorld samples: thirty steps halve the loss."""
    model = tiny_owl3(
        stage=Stage(name="all", trainable=["vision_tower", "connector", "language_model", "hyper_attention"])
    )
    losses = overfit_losses(model, shapes_root, steps=30)
    assert losses[-1] < 0.5 * losses[0]


def test_checkpointed_layers_and_a_deep_copy_give_the_same_loss_and_gradients(shapes_root, tmp_path):
    """The mix runs in a pre-hook on the layer's o_proj: under gradient checkpointing (recomputed with the
    wrapper) and in a deep copy (weight averaging: the copy's hook reads the copy's branch) it gives the same."""
    import copy

    from lit_mllm.training.stages import state_name

    stage = Stage(name="all", trainable=["connector", "language_model", "hyper_attention"])
    batch = batch_of(tiny_owl3(), two_image_conversations(shapes_root, tmp_path), [0, 1])
    results = []
    for checkpointing in (False, True):
        model = tiny_owl3(stage=stage, gradient_checkpointing=checkpointing).train()
        model.training_step(batch, 0).backward()
        results.append({state_name(n): p.grad for n, p in model.named_parameters() if p.grad is not None})
    plain, checkpointed = results
    assert plain.keys() == checkpointed.keys() and any(".hyper_attention.gate_proj" in n for n in plain)
    for name, grad in plain.items():
        torch.testing.assert_close(checkpointed[name], grad, rtol=1e-5, atol=1e-7, msg=name)
    model = tiny_owl3().eval()
    twin = copy.deepcopy(model)
    with torch.no_grad():
        for layer in twin.hyper_layers():
            layer.hyper_attention.gate_proj.bias.fill_(-30.0)  # the copy's gates shut: its text branch only
        ours, copied = model(batch), twin(batch)
        bare = bare_lm(model)(model.language_model.embed(batch.input_ids), batch.attention_mask)
    assert not torch.allclose(ours, bare, atol=1e-4)
    torch.testing.assert_close(copied, bare, rtol=1e-5, atol=1e-5)


# -- configs, commands, tools ------------------------------------------------------------------------------------
def test_tiny_config_runs_through_the_fit_command_and_describe(shapes_root, tmp_path):
    cli = run(
        ["fit", *CONFIGS, *cli_args(shapes_root, tmp_path, batch_size=2), "--trainer.fast_dev_run", "1"]
    )
    assert isinstance(cli.model, MPLUGOwl3VLM) and cli.trainer.state.finished
    assert len(cli.model.hyper_layers()) == 2
    facts = run(["describe", *CONFIGS])
    assert facts["image_tokens"] == 1 and facts["media_tokens"] == 64
    assert facts["params_trainable/hyper_attention"] == facts["params/hyper_attention"] > 0


def test_memory_estimate_and_llava_export_say_they_do_not_support_the_family():
    from lit_mllm.training.export import UnsupportedExport, check_llava_exportable
    from lit_mllm.training.memory import estimate_memory

    model = tiny_owl3()
    with pytest.raises(
        NotImplementedError, match=r"MPLUGOwl3VLM wraps the LLM.s decoder layers \(HyperAttentionLayer"
    ):
        estimate_memory(model, batch_size=2, seq_len=40)
    with pytest.raises(UnsupportedExport, match="MPLUGOwl3VLM is not a PrefixFusionVLM"):
        check_llava_exportable(model)


def test_real_preset_wraps_layers_1_9_17_25_of_a_qwen2_and_describes(tiny_hub, tmp_path):
    """configs/model/real/owl3.yaml with its hub names pointed at tiny stand-ins (a 28-layer Qwen2, SigLIP)."""
    from pathlib import Path

    from tests.stand_ins import with_stand_ins

    local = with_stand_ins(Path("configs/model/real/owl3.yaml"), tiny_hub, tmp_path)
    facts = run(["describe", "--config", "configs/quickstart.yaml", "--config", str(local)])
    assert facts["image_tokens"] == 1 and facts["media_tokens"] == 729 and facts["hyper_layers"] == 4
    assert facts["params_trainable/hyper_attention"] == facts["params/hyper_attention"] > 0
    assert (
        facts["params_trainable/language_model"] == 0
    )  # the LLM's own weights (the nested part counted apart)


def test_each_row_of_a_left_padded_prompt_batch_generates_what_it_generates_alone(shapes_root, tmp_path):
    """Left padding shifts no rotary position: queries and image keys count real tokens in every row."""
    model = tiny_owl3().eval()
    source = two_image_conversations(shapes_root, tmp_path)
    batch = batch_of(model, source, [0, 1, 2], for_generation=True)
    assert batch.images_per_row == [1, 2, 3] and (batch.attention_mask == 0).any()
    options = dict(max_new_tokens=4, min_new_tokens=4, do_sample=False)

    def generate(prompt):
        inputs = model.inputs(prompt)
        return model.language_model.generate(
            inputs.embeds, prompt.attention_mask, inputs.layer_inputs, **options
        )

    with torch.no_grad():
        together = generate(batch)
        for row in range(3):
            assert torch.equal(together[row : row + 1], generate(batch_of(model, source, [row], True))), row
