"""The CogVLM family (visual experts in every decoder layer): with the experts as initialised (copies of the LLM's
weights) the logits are the prefix family's with the same tower, connector and LLM; only image positions go through
the expert weights; generation with a KV cache equals full forward passes; stages, checkpoints of the experts,
gradient checkpointing; the tiny config runs under fast_dev_run and learns a handful of samples; export and the
memory estimator say what they support; two DDP ranks, one of them text-only, train in step."""

from __future__ import annotations

import json
import re
from functools import partial
from pathlib import Path

import pytest
import torch

from lit_mllm.cli import run
from lit_mllm.config_stack import stack_configs
from lit_mllm.data import collate, read_llava
from lit_mllm.lit import CogVLM, PrefixFusionVLM
from lit_mllm.nn.fusion.visual_expert import ROUTED, ExpertInputs, TokenRouted, VisualExpertLayer
from lit_mllm.nn.language import TinyLlama, TinyQwen2
from lit_mllm.nn.vision import TinyCLIPVision
from lit_mllm.training import Stage
from lit_mllm.training.export import UnsupportedExport, export_llava, export_safetensors
from lit_mllm.training.memory import estimate_memory
from lit_mllm.training.stages import param_groups, state_name, trainable_table
from tests.conftest import cli_args

ROOT = Path(__file__).resolve().parents[1]
TINY_CONFIG = ROOT / "configs" / "model" / "cogvlm.yaml"
QUICKSTART = ROOT / "configs" / "quickstart.yaml"
LLMS = [TinyLlama, TinyQwen2]


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread is fastest


def build(cls=CogVLM, lm=TinyLlama, stage: Stage | None = None, **kwargs):
    """The suite's tiny model (seeded: a CogVLM and a prefix model built alike hold the same weights)."""
    torch.manual_seed(0)
    return cls(
        TinyCLIPVision(image_size=32, patch_size=8, hidden_size=32, num_layers=2, num_heads=2),
        lm(hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2),
        stage=stage,
        **kwargs,
    )


def llm_name(name: str) -> str:
    """A CogVLM parameter's name in the bare model: the wrapper's and the routed pair's levels removed."""
    return re.sub(r"\.(text|image)(?=\.)", "", name.replace("decoder_layer.", ""))


def batch_of(model, root: Path, text_only: int = 1):
    """Three ShapesWorld samples with their image, then ``text_only`` samples without one."""
    proc = model.processor()
    samples = read_llava(root / "train.json")[: 3 + text_only]
    for sample in samples[3:]:
        sample.images = []
        sample.turns[0] = type(sample.turns[0])("user", sample.turns[0].text.replace("<image>\n", ""))
    return collate([proc(s) for s in samples], pad_token_id=proc.tokenizer.pad_token_id)


def perturb_experts(model: CogVLM, scale: float = 0.5) -> None:
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for expert in model.parts()["visual_expert"]:
            for p in expert.parameters():
                p.add_(scale * torch.randn(p.shape, generator=generator))


def rows_seen(modules) -> tuple[list[int], list]:
    """A counter of the rows (positions) that ``modules`` process, with their hook handles."""
    rows = [0]

    def hook(module, args):
        rows[0] += args[0].shape[:-1].numel()

    return rows, [m.register_forward_pre_hook(hook) for m in modules]


def routed(model: CogVLM) -> list[TokenRouted]:
    return [m for layer in model.expert_layers() for m in layer.routed_modules()]


# -- identity and routing ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("lm", LLMS, ids=lambda c: c.__name__)
def test_experts_as_initialised_give_the_prefix_familys_logits(lm, shapes_root):
    prefix, cog = build(PrefixFusionVLM, lm).eval(), build(CogVLM, lm).eval()
    bare = dict(prefix.named_parameters())
    names = [n for n, _ in cog.named_parameters()]
    assert len(names) == len(bare) + sum(
        1 for n in names if ".image." in n
    )  # every expert a copy of its LLM weight
    for name, p in cog.named_parameters():
        assert torch.equal(p, bare[llm_name(name)]), name
    assert all(isinstance(layer, VisualExpertLayer) for layer in cog.language_model.decoder_layers)
    batch = batch_of(cog, shapes_root)
    with torch.no_grad():
        ours, theirs = cog(batch), prefix(batch)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)


@pytest.mark.parametrize("lm", LLMS, ids=lambda c: c.__name__)
def test_only_image_positions_go_through_the_experts(lm, shapes_root):
    """Perturbed experts: text before a row's first image is unchanged bit for bit, every image position changes;
    the expert modules see exactly the image positions, the LLM's modules exactly the text ones."""
    cog = build(CogVLM, lm).eval()
    batch = batch_of(cog, shapes_root)
    with torch.no_grad():
        before = cog(batch)
    perturb_experts(cog)
    pairs = routed(cog)
    image_rows, handles = rows_seen([m.image for m in pairs])
    text_rows, more = rows_seen([m.text for m in pairs])
    with torch.no_grad():
        after = cog(batch)
    for h in handles + more:
        h.remove()
    is_image = batch.input_ids == cog.language_model.image_token_id  # [R, L]
    first = torch.where(is_image.any(1), is_image.int().argmax(1), is_image.shape[1])  # [R]
    before_image = torch.arange(is_image.shape[1])[None] < first[:, None]  # [R, L]
    assert before_image.sum() > 0 and is_image.sum() > 0
    assert torch.equal(after[before_image], before[before_image])
    assert (after[is_image] - before[is_image]).abs().amax(-1).min() > 1e-3  # every image position changed
    assert image_rows[0] == len(pairs) * int(is_image.sum())
    assert text_rows[0] == len(pairs) * int((~is_image).sum())
    text_row = ~is_image.any(1)  # the text-only sample: all of it before any image
    assert text_row.sum() == 1 and torch.equal(after[text_row], before[text_row])


def test_without_layer_inputs_or_outside_a_layer_call_every_position_is_text():
    cog = build().eval()
    perturb_experts(cog)
    plain = build(PrefixFusionVLM).eval()
    x = torch.randn(2, 5, 64)
    with torch.no_grad():
        assert torch.equal(cog.language_model(x), plain.language_model(x))
        mask = torch.zeros(2, 5, dtype=torch.bool)
        assert torch.equal(cog.language_model(x, layer_inputs=ExpertInputs(mask)), plain.language_model(x))
    pair = routed(cog)[0]
    assert pair.route.image_mask is None  # nothing left between calls
    assert torch.equal(pair(x), pair.text(x))


def test_generate_with_a_kv_cache_equals_full_forward_passes_and_new_tokens_are_text(shapes_root):
    """Left-padded prompt batch: each row's cached generation equals greedy decoding by full forward passes over
    its own unpadded sequence (image mask padded with text for the new tokens); the experts run on the prompt's
    image positions only."""
    cog = build().eval()
    perturb_experts(cog, scale=2.0)
    proc = cog.processor()
    samples = read_llava(shapes_root / "train.json")[:2]
    samples[1].turns[0] = type(samples[1].turns[0])("user", samples[1].turns[0].text + " and more words here")
    items = [proc(s, for_generation=True) for s in samples]
    prompt = collate(items, pad_token_id=proc.tokenizer.pad_token_id, padding_side="left")
    assert (prompt.attention_mask == 0).any()  # left padding on one row
    lm = cog.language_model
    image_token = lm.image_token_id
    steps = 5
    pairs = routed(cog)
    image_rows, handles = rows_seen([m.image for m in pairs])
    inputs = cog.inputs(prompt)
    new = lm.generate(
        inputs.embeds,
        prompt.attention_mask,
        layer_inputs=inputs.layer_inputs,
        max_new_tokens=steps,
        min_new_tokens=steps,
        do_sample=False,
    )
    for h in handles:
        h.remove()
    is_image = prompt.input_ids == image_token
    assert image_rows[0] == len(pairs) * int(is_image.sum())  # the prompt's image positions, once
    assert new.shape == (2, steps)
    for row in range(2):
        keep = prompt.attention_mask[row].bool()
        embeds, mask = inputs.embeds[row : row + 1, keep], is_image[row : row + 1, keep]
        tokens = []
        with torch.no_grad():
            for _ in range(steps):
                layer_inputs = ExpertInputs(torch.nn.functional.pad(mask, (0, len(tokens)), value=False))
                token = lm(embeds, layer_inputs=layer_inputs)[:, -1].argmax(-1, keepdim=True)  # [1, 1]
                tokens.append(token)
                embeds = torch.cat([embeds, lm.embed(token)], dim=1)
        assert torch.equal(new[row : row + 1], torch.cat(tokens, 1)), row
    assert lm.model._forward_pre_hooks == {}


# -- training: parts, stages, gradients ----------------------------------------------------------------------------
def test_default_stage_trains_connector_and_experts_and_the_finetune_stage_scales_the_llm():
    cog = build()
    parts = cog.parts()
    experts = parts["visual_expert"]
    assert len(experts) == 2 * len(ROUTED)  # two layers
    expert_params = {id(p) for e in experts for p in e.parameters()}
    for name, p in cog.named_parameters():
        trains = name.startswith("connector.") or id(p) in expert_params
        assert p.requires_grad == trains, name
    assert all(not e.training for e in [cog.vision_tower, cog.language_model.model.model.norm])
    cog.train()
    assert all(e.training for e in experts) and not cog.language_model.model.model.layers[0].training
    table = trainable_table(parts, cog.stage)
    assert "visual_expert" in table

    finetune = Stage(
        name="finetune",
        trainable=["connector", "visual_expert", "language_model"],
        lr_scale={"language_model": 0.1},
    )
    scales = {g["part"]: g["lr_scale"] for g in param_groups(build(stage=finetune).parts(), finetune)}
    assert scales == {"connector": 1.0, "visual_expert": 1.0, "language_model": 0.1}


def test_text_only_batch_gives_the_experts_a_zero_gradient(shapes_root):
    """A text-only batch (a DDP rank without images) still reaches every expert weight, with an exact zero, so DDP
    needs no find_unused_parameters; a batch with images gives them a real gradient."""
    cog = build().train()
    experts = [p for e in cog.parts()["visual_expert"] for p in e.parameters()]
    for text_only, nonzero in ((3, False), (1, True)):
        batch = batch_of(cog, shapes_root, text_only=text_only)
        if text_only == 3:  # text-only rows only
            batch = collate(
                [cog.processor()(s) for s in _text_samples(shapes_root)],
                pad_token_id=cog.processor().tokenizer.pad_token_id,
            )
            assert batch.pixel_values is None
        cog.zero_grad(set_to_none=True)
        cog.training_step(batch, 0).backward()
        assert all(p.grad is not None for p in experts)
        assert any(p.grad.abs().sum() > 0 for p in experts) == nonzero
        assert all(
            p.grad is None for n, p in cog.language_model.named_parameters() if ".text." in n
        )  # the LLM's weights: frozen


def _text_samples(root: Path):
    samples = read_llava(root / "train.json")[:2]
    for sample in samples:
        sample.images = []
        sample.turns[0] = type(sample.turns[0])("user", sample.turns[0].text.replace("<image>\n", ""))
    return samples


def test_gradient_checkpointing_gives_the_same_logits_and_gradients(shapes_root):
    """The route is set again when a checkpointed layer is recomputed in the backward pass."""
    results = []
    for options in ({}, {"gradient_checkpointing": True}):
        torch.manual_seed(0)
        cog = CogVLM(
            TinyCLIPVision(image_size=32, patch_size=8, hidden_size=32, num_layers=2, num_heads=2),
            TinyLlama(hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, **options),
        )
        perturb_experts(cog)
        batch = batch_of(cog, shapes_root)
        logits = cog(batch)
        logits.square().mean().backward()
        grads = {state_name(n): p.grad for n, p in cog.named_parameters() if p.grad is not None}
        results.append((logits.detach(), grads))
    for logits, grads in results[1:]:
        assert torch.equal(logits, results[0][0])
        assert grads.keys() == results[0][1].keys() and grads
        for name, grad in grads.items():
            torch.testing.assert_close(grad, results[0][1][name], rtol=0, atol=0, msg=name)


def fixed_batch_losses(cog: CogVLM, batch, steps: int) -> list[float]:
    optimizer = cog.configure_optimizers()
    losses = []
    for _ in range(steps):
        optimizer.zero_grad()
        loss = cog.training_step(batch, 0)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def test_a_few_steps_fit_a_handful_of_samples(shapes_root):
    """CogVLM's pretraining stage (connector + experts; the random tower and LLM frozen) lowers the loss of a fixed
    batch at every step, through the experts' keys and values the text attends to; with the LLM training too (the
    tiny config's stage) the loss halves in 15 steps."""
    cog = build(optimizer=partial(torch.optim.AdamW, lr=1e-2)).train()
    batch = batch_of(cog, shapes_root, text_only=0)
    losses = fixed_batch_losses(cog, batch, 8)
    assert all(b < a for a, b in zip(losses, losses[1:])) and losses[-1] < losses[0] - 0.2, losses
    everything = Stage(name="finetune", trainable=["connector", "visual_expert", "language_model"])
    cog = build(stage=everything, optimizer=partial(torch.optim.AdamW, lr=3e-3)).train()
    losses = fixed_batch_losses(cog, batch, 15)
    assert losses[-1] < 0.5 * losses[0], losses


# -- configs, commands -----------------------------------------------------------------------------------------
def test_tiny_config_fits_under_fast_dev_run_and_describes(shapes_root, tmp_path):
    stack = ["--config", str(QUICKSTART), "--config", str(TINY_CONFIG)]
    cli = run(
        [
            "fit",
            *stack_configs([*stack, *cli_args(shapes_root, tmp_path, batch_size=2)]),
            "--trainer.fast_dev_run",
            "1",
        ]
    )
    model = cli.model
    assert isinstance(model, CogVLM) and cli.trainer.state.finished
    assert len(model.parts()["visual_expert"]) == 4 * len(ROUTED)  # every one of the 4 layers
    assert model.stage.trainable == ["vision_tower", "connector", "language_model", "visual_expert"]
    facts = run(["describe", *stack_configs([*stack, *cli_args(shapes_root, tmp_path)])])
    assert facts["image_tokens"] == 64
    layer = model.language_model.decoder_layers[0]
    per_layer = sum(p.numel() for e in layer.experts() for p in e.parameters())
    assert facts["params/visual_expert"] == 4 * per_layer
    assert facts["params_trainable/visual_expert"] == 4 * per_layer


def test_memory_estimator_and_llava_export_refuse_and_safetensors_export_round_trips(tmp_path, shapes_root):
    cog = build()
    with pytest.raises(NotImplementedError, match="CogVLM wraps the LLM's decoder layers.*VisualExpertLayer"):
        estimate_memory(cog, batch_size=2, seq_len=40)
    with pytest.raises(UnsupportedExport, match="CogVLM is not a PrefixFusionVLM"):
        export_llava(cog, tmp_path / "llava")
    perturb_experts(cog)
    config = {"model": {"class_path": "lit_mllm.lit.CogVLM", "init_args": {}}}
    out = export_safetensors(cog, config, tmp_path / "st")
    init_from = json.dumps(str(out / "model.safetensors"))
    assert init_from.strip('"') in (out / "config.yaml").read_text()
    again = build(init_from=str(out / "model.safetensors")).eval()
    batch = batch_of(cog, shapes_root)
    with torch.no_grad():
        assert torch.equal(again(batch), cog.eval()(batch))
