"""The Flamingo family: the gated cross-attention block against transformers' Idefics (v1) layer with copied
weights, and its media mask against Idefics' own; zero gates leave the LLM's logits as they were (images present);
masking (no token sees a later image, nor an older one under ``latest``, nor any before the first image; packed
samples see only their own images); generation with a KV cache equals decoding without it, computes the visual
features once and gives each row of a left-padded batch what it gives alone; stages, parts, interleaved
documents, the configs through the CLI, the memory estimator and export; and a two-rank DDP run with a text-only
rank."""

from __future__ import annotations

import json
from functools import partial

import pytest
import torch
from torch import nn

from lit_mllm.cli import run
from lit_mllm.data import Conversations, Interleaved, collate
from lit_mllm.lit import FlamingoVLM
from lit_mllm.nn.connectors import PerceiverResampler
from lit_mllm.nn.fusion import GatedCrossAttentionBlock, MediaInputs, media_mask
from lit_mllm.nn.fusion.prefix import ImageTokenMismatch
from lit_mllm.nn.language import TinyLlama
from lit_mllm.nn.vision import TinyCLIPVision
from lit_mllm.training import Stage
from lit_mllm.training.stages import state_name, trainable_names
from tests.conftest import cli_args, overfit_losses

LM = dict(hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2)
IMAGE = 99  # a marker id in the hand-made sequences
CONFIGS = ["--config", "configs/quickstart.yaml", "--config", "configs/model/flamingo.yaml"]


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread is fastest


def tiny_flamingo(
    every: int = 1, media_attention: str = "latest", stage: Stage | None = None, **lm
) -> FlamingoVLM:
    torch.manual_seed(0)
    return FlamingoVLM(
        TinyCLIPVision(image_size=32, patch_size=8, hidden_size=32, num_layers=2, num_heads=2),
        TinyLlama(**LM, **lm),
        connector=partial(PerceiverResampler, num_latents=4, num_layers=1, num_heads=2, head_dim=16),
        xattn=partial(GatedCrossAttentionBlock, num_heads=2, head_dim=16),
        cross_attn_every=every,
        media_attention=media_attention,
        stage=stage,
    )


def set_gates(model: nn.Module, attn: float, ff: float) -> None:
    with torch.no_grad():
        for block in model.modules():
            if isinstance(block, GatedCrossAttentionBlock):
                block.attn_gate.fill_(attn)
                block.ff_gate.fill_(ff)


def bare_lm(model: FlamingoVLM) -> TinyLlama:
    """The model's LLM without its blocks: a TinyLlama holding the wrapped layers' weights."""
    lm = TinyLlama(**LM).eval()
    state = model.language_model.state_dict()
    lm.load_state_dict({k.replace("decoder_layer.", ""): v for k, v in state.items() if ".xattn." not in k})
    return lm


def two_image_conversations(root, tmp_path) -> Conversations:
    """LLaVA-format records with one, two and three images (ShapesWorld's), the placeholders inside the text."""
    images = [f"images/train_{i:06d}.png" for i in range(3)]
    records = [
        {
            "id": "one",
            "image": images[0],
            "conversations": [
                {"from": "human", "value": "<image>\nWhat shape is it?"},
                {"from": "gpt", "value": "a circle"},
            ],
        },
        {
            "id": "two",
            "image": images[:2],
            "conversations": [
                {"from": "human", "value": "First <image> then <image>. Which has more shapes?"},
                {"from": "gpt", "value": "the second"},
            ],
        },
        {
            "id": "three",
            "image": images,
            "conversations": [
                {"from": "human", "value": "Look: <image> and <image>"},
                {"from": "gpt", "value": "yes"},
                {"from": "human", "value": "And <image>? How many shapes?"},
                {"from": "gpt", "value": "3"},
            ],
        },
    ]
    path = tmp_path / "multi.json"
    path.write_text(json.dumps(records))
    return Conversations(str(path), image_folder=str(root)).open(root)


def batch_of(model, source, indices, for_generation=False):
    proc = model.processor()
    items = [proc(source.sample(i, "<image>"), for_generation=for_generation) for i in indices]
    side = "left" if for_generation else "right"
    return collate(items, pad_token_id=proc.tokenizer.pad_token_id, padding_side=side)


# -- the block against Idefics (v1) ----------------------------------------------------------------------------
def idefics_reference_mask(ids: torch.Tensor, num_images: int) -> torch.Tensor:
    """``[B, L, M]`` from transformers' Idefics processing helpers (latest image, none before the first)."""
    from transformers.models.idefics.processing_idefics import (
        image_attention_mask_for_packed_input_ids_pt,
        incremental_to_binary_attention_mask,
    )

    class Tokens:  # what the helper reads off a tokenizer
        eos_token_id = -1

        def convert_tokens_to_ids(self, token):
            return IMAGE

    incremental, _ = image_attention_mask_for_packed_input_ids_pt(ids.clone(), Tokens())
    return incremental_to_binary_attention_mask(incremental, "pt", num_classes=num_images).bool()


def test_media_mask_equals_idefics_processing():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 50, (4, 23), generator=g)
    ids[torch.rand(4, 23, generator=g) < 0.2] = IMAGE
    ids[3] = torch.randint(0, 50, (23,), generator=g)  # a row without images
    ours = media_mask(ids, IMAGE)
    assert ours.shape == (4, 23, int((ids == IMAGE).sum(-1).max())) and ours.any()
    assert torch.equal(ours, idefics_reference_mask(ids, ours.shape[-1]))


@pytest.mark.parametrize("gate", ["scalar", "vector"])
@pytest.mark.parametrize("qk_norm", [False, True], ids=["plain", "qk_norm"])
def test_block_equals_idefics_gated_cross_attention_layer(gate, qk_norm):
    """Idefics' layer configured as this block (RMSNorm, SwiGLU, heads of dim / heads), weights copied (gates and
    norm scales random, so every branch counts), the media mask given as Idefics' model builds it."""
    from transformers import IdeficsConfig
    from transformers.models.idefics.modeling_idefics import IdeficsGatedCrossAttentionLayer

    dim, heads, images, per_image = 32, 4, 3, 5
    config = IdeficsConfig(
        hidden_size=dim,
        num_attention_heads=heads,
        intermediate_size=4 * dim,
        hidden_act="silu",
        rms_norm_eps=1e-6,
        alpha_initializer="zeros",
        alpha_type="vector" if gate == "vector" else "float",
        qk_layer_norms=qk_norm,
        dropout=0.0,
        vision_config={"embed_dim": dim},
    )
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    theirs = IdeficsGatedCrossAttentionLayer(config, layer_idx=0).eval()
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            p.copy_(
                torch.randn_like(p) * (0.5 if "alpha" in name else 0.1) + (1.0 if "norm" in name else 0.0)
            )
    ours = GatedCrossAttentionBlock(
        dim, dim, num_heads=heads, head_dim=dim // heads, ff_mult=4, norm="rmsnorm", norm_eps=1e-6,
        mlp="swiglu", gate=gate, qk_norm=qk_norm,
    ).eval()  # fmt: skip
    renames = {
        "input_layernorm": "attn_norm",
        "post_attention_layernorm": "ff_norm",
        "cross_attn.q_layer_norm": "attn.q_norm",
        "cross_attn.k_layer_norm": "attn.k_norm",
        "cross_attn": "attn",
        "mlp": "ff",
        "alpha_cross_attn": "attn_gate",
        "alpha_dense": "ff_gate",
    }
    copied = {}
    for name, value in theirs.state_dict().items():
        for old, new in renames.items():
            if name.startswith(old):
                name = new + name[len(old) :]
                break
        copied[name] = value.reshape(-1) if name.endswith("_gate") else value
    ours.load_state_dict(copied)  # strict: every weight has its counterpart

    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 50, (2, 9), generator=g)
    ids[0, [2, 5]] = IMAGE
    ids[1, [0, 3, 7]] = IMAGE
    x = torch.randn(2, 9, dim, generator=g)
    features = torch.randn(2, images, per_image, dim, generator=g)  # [B, M, T, D]
    binary = idefics_reference_mask(ids, images)  # [B, L, M]
    # as IdeficsModel.forward: expanded over each image's tokens, additive, and the gate of tokens seeing none
    expanded = binary[..., None].expand(-1, -1, -1, per_image).reshape(2, 9, -1)
    additive = torch.where(expanded[:, None], 0.0, torch.finfo(x.dtype).min)
    gate_in = (additive == 0.0).any(-1).float().squeeze(1)
    with torch.no_grad():
        expected = theirs(
            x,
            image_hidden_states=features.reshape(2, images * per_image, dim),
            image_attention_mask=additive,
            cross_attention_gate=gate_in,
        )
        got = ours(x, features, media_mask(ids, IMAGE, num_media=images))
    assert not torch.equal(expected, x)  # both branches change the input
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


# -- masking -------------------------------------------------------------------------------------------------------
def test_media_mask_by_hand():
    ids = torch.tensor([[1, 2, IMAGE, 3, 4, IMAGE, 5, 6]])
    latest = media_mask(ids, IMAGE)[0].int().tolist()
    assert latest == [[0, 0], [0, 0], [1, 0], [1, 0], [1, 0], [0, 1], [0, 1], [0, 1]]
    every = media_mask(ids, IMAGE, only_latest=False)[0].int().tolist()
    assert every == [[0, 0], [0, 0], [1, 0], [1, 0], [1, 0], [1, 1], [1, 1], [1, 1]]
    # packed: sample 0 = positions 0..4 (image 0), sample 1 = 5..6 (image 1), sample 2 = 7 (no image), padding
    packed = torch.tensor([[1, IMAGE, 2, 3, 4, IMAGE, 5, 6, 0]])
    sample_index = torch.tensor([[0, 0, 0, 0, 0, 1, 1, 2, -1]])
    for only_latest in (True, False):
        mask = media_mask(packed, IMAGE, sample_index, only_latest)[0].int().tolist()
        assert mask == [[0, 0], [1, 0], [1, 0], [1, 0], [1, 0], [0, 1], [0, 1], [0, 0], [0, 0]]


def block_outputs(only_latest: bool, features: torch.Tensor) -> torch.Tensor:
    """One block (attention gate open, feed-forward gate shut) on a sequence with images at positions 2 and 5."""
    torch.manual_seed(0)
    block = GatedCrossAttentionBlock(16, 8, num_heads=2, head_dim=8).eval()
    set_gates(block, attn=1.0, ff=0.0)
    ids = torch.tensor([[1, 2, IMAGE, 3, 4, IMAGE, 5, 6]])
    x = torch.randn(1, 8, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return x, block(x, features, media_mask(ids, IMAGE, only_latest=only_latest))


@pytest.mark.parametrize("only_latest", [True, False], ids=["latest", "all"])
def test_a_token_sees_no_later_image_no_image_before_the_first_and_older_ones_only_under_all(only_latest):
    features = torch.randn(1, 2, 3, 8, generator=torch.Generator().manual_seed(2))  # [B, M=2, T=3, D]
    x, out = block_outputs(only_latest, features)
    later = features.clone()
    later[:, 1] += 1.0  # the second image (marker at 5) changes
    _, out_later = block_outputs(only_latest, later)
    older = features.clone()
    older[:, 0] += 1.0  # the first image (marker at 2) changes
    _, out_older = block_outputs(only_latest, older)

    assert torch.equal(out[:, :2], x[:, :2])  # before the first image: nothing seen, output exactly the input
    assert torch.equal(out_later[:, :5], out[:, :5])  # nobody before the second marker sees the second image
    assert not torch.isclose(out_later[:, 5:], out[:, 5:]).all(-1).any()  # everybody from it on does
    assert (
        not torch.isclose(out_older[:, 2:5], out[:, 2:5]).all(-1).any()
    )  # the first image's own span sees it
    if only_latest:
        assert torch.equal(out_older[:, 5:], out[:, 5:])  # after the second image the first is not seen
    else:
        assert not torch.isclose(out_older[:, 5:], out[:, 5:]).all(-1).any()


def test_positions_before_the_first_image_get_the_bare_lm_logits_and_later_ones_do_not(shapes_root, tmp_path):
    """End to end, attention gates open, feed-forward gates shut: the text before an image is the LLM's alone."""
    model = tiny_flamingo().eval()
    set_gates(model, attn=0.8, ff=0.0)
    batch = batch_of(model, two_image_conversations(shapes_root, tmp_path), [1])
    first = int((batch.input_ids[0] == model.language_model.image_token_id).nonzero()[0])
    with torch.no_grad():
        ours = model(batch)
        bare = bare_lm(model)(model.language_model.embed(batch.input_ids), batch.attention_mask)
    torch.testing.assert_close(ours[:, :first], bare[:, :first], rtol=0, atol=1e-6)
    assert not torch.isclose(ours[:, first:], bare[:, first:], atol=1e-4).all(-1).any()


def test_a_later_image_changes_no_logit_before_its_marker(shapes_root, tmp_path):
    model = tiny_flamingo().eval()
    set_gates(model, attn=0.8, ff=0.5)
    batch = batch_of(model, two_image_conversations(shapes_root, tmp_path), [1])
    second = int((batch.input_ids[0] == model.language_model.image_token_id).nonzero()[1])
    other = batch.pixel_values.clone()
    other[1] = 255 - other[1]
    with torch.no_grad():
        logits = model(batch)
        changed = model(type(batch)(**{**batch.__dict__, "pixel_values": other}))
    torch.testing.assert_close(changed[:, :second], logits[:, :second], rtol=0, atol=1e-6)
    assert not torch.isclose(changed[:, second:], logits[:, second:], atol=1e-4).all(-1).any()


def test_packed_samples_see_only_their_own_images(shapes_root, tmp_path):
    """Three samples packed in one row give the logits each gives alone (the second one's images are not seen by
    the third, which has its own)."""
    model = tiny_flamingo(media_attention="all").eval()
    set_gates(model, attn=1.0, ff=0.5)
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


# -- identity ----------------------------------------------------------------------------------------------------
def test_zero_gates_give_the_bare_lm_logits_with_images_present(shapes_root, tmp_path):
    model = tiny_flamingo().eval()  # gates as initialised: 0
    assert len(model.xattn_layers()) == 2
    source = two_image_conversations(shapes_root, tmp_path)
    batch = batch_of(model, source, [0, 1, 2])
    assert batch.images_per_row == [1, 2, 3]
    with torch.no_grad():
        ours = model(batch)
        bare = bare_lm(model)(model.language_model.embed(batch.input_ids), batch.attention_mask)
    assert torch.equal(ours, bare)


# -- generation ----------------------------------------------------------------------------------------------------
def greedy_without_cache(model: FlamingoVLM, batch, steps: int) -> torch.Tensor:
    """Greedy decoding of a one-row prompt by full forward passes, the media mask rebuilt for the longer text."""
    lm = model.language_model
    features = model.language_inputs(batch, model.encode_images(batch.pixel_values)).layer_inputs.features
    ids = batch.input_ids
    with torch.no_grad():
        for _ in range(steps):
            inputs = MediaInputs(features, media_mask(ids, lm.image_token_id))
            token = lm(lm.embed(ids), layer_inputs=inputs)[:, -1].argmax(-1, keepdim=True)  # [1, 1]
            ids = torch.cat([ids, token], dim=1)
    return ids[:, batch.input_ids.shape[1] :]


def generate_ids(model: FlamingoVLM, batch, steps: int) -> torch.Tensor:
    inputs = model.inputs(batch)
    options = dict(max_new_tokens=steps, min_new_tokens=steps, do_sample=False)
    return model.language_model.generate(inputs.embeds, batch.attention_mask, inputs.layer_inputs, **options)


@pytest.mark.parametrize("media_attention", ["latest", "all"])
def test_generation_with_a_kv_cache_equals_decoding_without_and_encodes_images_once(
    media_attention, shapes_root, tmp_path
):
    model = tiny_flamingo(media_attention=media_attention).eval()
    set_gates(model, attn=1.5, ff=0.5)
    source = two_image_conversations(shapes_root, tmp_path)
    prompt = batch_of(model, source, [2], for_generation=True)  # three images, the last in the question
    encodes, steps = [], []
    model.connector.register_forward_hook(lambda m, args, out: encodes.append(out.shape[0]))
    model.xattn_layers()[0].xattn.register_forward_pre_hook(lambda m, args: steps.append(args[0].shape[1]))
    with torch.no_grad():
        ours = generate_ids(model, prompt, 5)
    assert encodes == [3]  # the three images, once
    assert steps == [prompt.input_ids.shape[1], 1, 1, 1, 1]  # the prompt, then one new token per step
    assert torch.equal(ours, greedy_without_cache(model, prompt, 5))
    assert model.generate(prompt, max_new_tokens=3)  # the module's generate runs the same path


def test_each_row_of_a_left_padded_prompt_batch_generates_what_it_generates_alone(shapes_root, tmp_path):
    model = tiny_flamingo().eval()
    set_gates(model, attn=1.5, ff=0.5)
    source = two_image_conversations(shapes_root, tmp_path)
    batch = batch_of(model, source, [0, 1, 2], for_generation=True)
    assert batch.images_per_row == [1, 2, 3] and (batch.attention_mask == 0).any()
    with torch.no_grad():
        together = generate_ids(model, batch, 4)
        for row in range(3):
            alone = generate_ids(model, batch_of(model, source, [row], for_generation=True), 4)
            assert torch.equal(together[row : row + 1], alone), row


# -- the family module ---------------------------------------------------------------------------------------------
def test_one_marker_per_image_and_the_parts(shapes_root, tmp_path):
    model = tiny_flamingo(every=2)
    assert model.processor().tokens_per_image == 1 and model.media_tokens == 4
    batch = batch_of(model, two_image_conversations(shapes_root, tmp_path), [1])
    assert int((batch.input_ids == model.language_model.image_token_id).sum()) == 2
    assert len(model.xattn_layers()) == 1  # layers 0 (of 2) with every=2
    parts = model.parts()
    assert parts["xattn"] == [model.xattn_layers()[0].xattn]
    facts = model.describe()
    assert facts["image_tokens"] == 1 and facts["media_tokens"] == 4 and facts["xattn_layers"] == 1
    wrong = type(batch)(**{**batch.__dict__, "images_per_row": [1], "pixel_values": batch.pixel_values[:1]})
    with pytest.raises(ImageTokenMismatch, match="2 <image> markers"):
        model(wrong)


def test_tiling_layouts_are_refused():
    from lit_mllm.data.layouts import AnyRes

    with pytest.raises(ValueError, match="one tower input per image"):
        FlamingoVLM(TinyCLIPVision(image_size=32, patch_size=8, hidden_size=32, num_layers=2), TinyLlama(**LM),
                    image_layout=AnyRes())  # fmt: skip


def test_default_stage_trains_the_connector_and_the_blocks_and_the_gates_open_first(shapes_root, tmp_path):
    """The LLM and the tower frozen (eval mode); at zero gates only the gates get gradient (the blocks' outputs
    are multiplied by tanh(0)), so the connector's first gradient comes at the second step."""
    model = tiny_flamingo()
    assert model.stage.trainable == ["connector", "xattn"]
    names = trainable_names(model)
    assert names and all(n.startswith("connector.") or ".xattn." in n for n in names)
    assert any(".xattn." in n for n in names)
    model.train()
    assert all(layer.xattn.training for layer in model.xattn_layers())
    assert not model.language_model.training and not model.xattn_layers()[0].decoder_layer.training
    batch = batch_of(model, two_image_conversations(shapes_root, tmp_path), [0, 1])
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model.training_step(batch, 0).backward()
    gates = [p for layer in model.xattn_layers() for p in (layer.xattn.attn_gate, layer.xattn.ff_gate)]
    assert all(g.grad.abs().sum() > 0 for g in gates)
    assert all(p.grad is None or not p.grad.any() for p in model.connector.parameters())
    optimizer.step()
    optimizer.zero_grad()
    model.training_step(batch, 1).backward()
    assert any(p.grad is not None and p.grad.any() for p in model.connector.parameters())


def test_checkpointed_layers_give_the_same_loss_and_gradients(shapes_root, tmp_path):
    """gradient_checkpointing wraps the family's layers too (outermost): the media inputs pass through it."""
    batch = batch_of(tiny_flamingo(), two_image_conversations(shapes_root, tmp_path), [0, 1])
    results = []
    for checkpointing in (False, True):
        model = tiny_flamingo(gradient_checkpointing=checkpointing)
        set_gates(model, attn=0.7, ff=0.3)
        model.train()
        model.training_step(batch, 0).backward()
        results.append({state_name(n): p.grad for n, p in model.named_parameters() if p.grad is not None})
    plain, checkpointed = results
    assert plain.keys() == checkpointed.keys() and any(".xattn.attn.q_proj" in n for n in plain)
    for name, grad in plain.items():
        torch.testing.assert_close(checkpointed[name], grad, rtol=1e-5, atol=1e-7, msg=name)


def test_interleaved_documents_train(shapes_root):
    """OBELICS-style documents of four images from ShapesWorld (the Interleaved source): every image a marker,
    every text token after one attends to its latest image, a few steps lower the loss."""
    model = tiny_flamingo(stage=Stage(name="all", trainable=["connector", "language_model", "xattn"]))
    source = Interleaved("interleaved_train.jsonl").open(shapes_root)
    batch = batch_of(model, source, [0, 1])
    assert batch.images_per_row == [4, 4]
    inputs = model.inputs(batch)
    assert inputs.layer_inputs.features.shape == (2, 4, 4, 64)
    assert inputs.layer_inputs.media_mask.shape == (2, batch.input_ids.shape[1], 4)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    losses = []
    for step in range(8):
        optimizer.zero_grad()
        loss = model.training_step(batch, step)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.5


def test_text_only_batches_run_the_blocks_and_see_no_image(batch):
    """A text-only batch: the feed-forward branch runs, attention sees nothing (a blank image nobody sees)."""
    model = tiny_flamingo().eval()
    set_gates(model, attn=1.0, ff=0.0)
    text_only = [i for i, n in enumerate(batch.images_per_row) if n == 0]
    assert text_only
    proc = model.processor()
    items = batch.input_ids[text_only[0]][batch.sample_index[text_only[0]] >= 0]
    alone = collate(
        [
            {
                "id": "t",
                "source": "",
                "input_ids": items,
                "labels": items,
                "pixel_values": None,
                "num_images": 0,
            }
        ],
        pad_token_id=proc.tokenizer.pad_token_id,
    )
    with torch.no_grad():
        ours = model(alone)
        bare = bare_lm(model)(model.language_model.embed(alone.input_ids), alone.attention_mask)
    assert torch.equal(ours, bare)


# -- configs, commands, tools ------------------------------------------------------------------------------------
def test_tiny_config_runs_through_the_fit_command_and_describe(shapes_root, tmp_path):
    cli = run(
        ["fit", *CONFIGS, *cli_args(shapes_root, tmp_path, batch_size=2), "--trainer.fast_dev_run", "1"]
    )
    assert isinstance(cli.model, FlamingoVLM) and cli.trainer.state.finished
    assert len(cli.model.xattn_layers()) == 2  # before layers 0 and 2 of 4
    facts = run(["describe", *CONFIGS])
    assert facts["image_tokens"] == 1 and facts["media_tokens"] == 16
    assert facts["params_trainable/xattn"] == facts["params/xattn"] > 0


def test_memory_estimate_and_llava_export_say_they_do_not_support_the_family(tmp_path):
    from lit_mllm.training.export import UnsupportedExport, check_llava_exportable
    from lit_mllm.training.memory import estimate_memory

    model = tiny_flamingo()
    with pytest.raises(
        NotImplementedError, match=r"FlamingoVLM wraps the LLM.s decoder layers \(GatedCrossAttentionLayer"
    ):
        estimate_memory(model, batch_size=2, seq_len=40)
    with pytest.raises(UnsupportedExport, match="FlamingoVLM is not a PrefixFusionVLM"):
        check_llava_exportable(model)


def test_a_few_steps_overfit_shapesworld_samples(shapes_root):
    """Everything trains (a random LLM) on four ShapesWorld samples: twenty steps halve the loss."""
    model = tiny_flamingo(
        stage=Stage(name="all", trainable=["vision_tower", "connector", "language_model", "xattn"])
    )
    losses = overfit_losses(model, shapes_root, steps=20)
    assert losses[-1] < 0.5 * losses[0]
