"""The memory estimate: model-state bytes against parameters counted by hand from the tiny architecture,
frozen parts without gradients or optimizer states, ZeRO divisions, optimizer states measured on real
optimizers, the activation formula against what autograd really saves in Hugging Face layers, and the command
on the quickstart and on a GPU config.
"""

from __future__ import annotations

import functools
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lit_mllm.commands.estimate_memory import main as estimate_memory_main
from lit_mllm.training import Stage, apply_stage
from lit_mllm.training.memory import (
    GIB,
    ElementBytes,
    block_shape,
    estimate_memory,
    probe_optimizer,
)
from tests.conftest import tiny_model

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
QUICKSTART = str(CONFIGS / "quickstart.yaml")

# tiny_model(): TinyCLIPVision(32 px, patch 8, width 32, 2 blocks cut to 1 at feature_layer -2) -> MLP
# connector 32 -> 64 -> 64 -> TinyLlama(width 64, 2 layers, 4 heads, 2 KV heads, MLP 192, vocabulary 813),
# counted by hand:
CLIP_BLOCK = 4 * (32 * 32 + 32) + 2 * 2 * 32 + (32 * 128 + 128) + (128 * 32 + 32)
TOWER = 3 * 8 * 8 * 32 + 32 + 17 * 32 + 2 * 32 + CLIP_BLOCK  # patch conv, CLS, positions, pre-norm, 1 block
CONNECTOR = (32 * 64 + 64) + (64 * 64 + 64)
LLAMA_LINEARS = 64 * 64 * 2 + 64 * 32 * 2 + 3 * 64 * 192  # q, o, k, v, gate, up, down
LLM = 813 * 64 + 2 * (LLAMA_LINEARS + 2 * 64) + 64 + 813 * 64  # embeddings, 2 layers, final norm, head
PARTS = ("vision_tower", "connector", "language_model")
HAND = dict(zip(PARTS, (TOWER, CONNECTOR, LLM)))


@pytest.fixture(scope="module")
def model():
    return tiny_model()


def staged(model, *trainable: str):
    apply_stage(model.parts(), Stage(name="test", trainable=list(trainable)))
    return model


def test_fp32_adamw_model_states_are_4_4_8_bytes_per_parameter(model):
    staged(model, "connector", "language_model")
    est = estimate_memory(model, batch_size=2, seq_len=40)
    for name in PARTS:
        part = est.parts[name]
        assert part.params == HAND[name]
        assert part.weights == 4 * HAND[name]
    trainable = CONNECTOR + LLM
    assert est.gradients == 4 * trainable
    assert est.optimizer == 8 * trainable
    assert est.settings["optimizer"] == "AdamW" and est.settings["optimizer_state_bytes_per_param"] == 8
    assert est.total == est.weights + est.buffers + est.optimizer + est.batch + max(est.phases.values())


def test_mixed_precision_adds_a_half_copy_of_the_matrices_backward_crosses(model):
    """The notes' 6 bytes: fp32 weights plus autocast's half copies, kept for the matrix layers of the
    connector and the LLM (and its head); the frozen tower runs without autograd and keeps none."""
    staged(model, "connector", "language_model")
    est = estimate_memory(model, batch_size=2, seq_len=40, precision="bf16-mixed")
    assert est.parts["vision_tower"].weights == 4 * TOWER
    assert est.parts["connector"].weights == 6 * CONNECTOR
    assert est.parts["language_model"].weights == 4 * LLM + 2 * (2 * LLAMA_LINEARS + 813 * 64)
    assert est.gradients == 4 * (CONNECTOR + LLM)  # gradients of fp32 weights are fp32
    assert est.optimizer == 8 * (CONNECTOR + LLM)
    true = estimate_memory(model, batch_size=2, seq_len=40, precision="bf16-true")
    assert true.weights == 2 * (TOWER + CONNECTOR + LLM)
    assert true.optimizer == 4 * (CONNECTOR + LLM)  # torch's AdamW keeps its moments at the parameters' dtype


@settings(max_examples=7, deadline=None)
@given(st.sets(st.sampled_from(PARTS), min_size=1))
def test_only_trainable_parts_have_gradients_and_optimizer_states(model, trainable):
    est = estimate_memory(staged(model, *trainable), batch_size=2, seq_len=40)
    for name in PARTS:
        part = est.parts[name]
        assert part.trainable == (HAND[name] if name in trainable else 0)
        assert part.gradients == 4 * part.trainable
        assert part.optimizer == 8 * part.trainable
    # a frozen tower runs without autograd: nothing saved; the LLM is crossed by gradients whatever trains
    assert (est.parts["vision_tower"].activations > 0) == ("vision_tower" in trainable)
    assert est.parts["language_model"].activations > 0


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_zero_stages_shard_optimizer_then_gradients_then_weights(model, stage):
    staged(model, "connector", "language_model")
    plain = estimate_memory(model, batch_size=2, seq_len=40)
    sharded = estimate_memory(model, batch_size=2, seq_len=40, devices=4, zero_stage=stage)
    for name in PARTS:
        a, b = plain.parts[name], sharded.parts[name]
        assert b.optimizer == (a.optimizer // 4 if stage >= 1 else a.optimizer)
        assert b.gradients == (a.gradients // 4 if stage >= 2 else a.gradients)
        assert b.weights == (a.weights // 4 if stage >= 3 else a.weights)
        assert b.activations == a.activations  # data parallel: every device runs its own batch
    assert sharded.step_temporaries == (plain.step_temporaries // 4 if stage >= 1 else plain.step_temporaries)


def test_optimizer_states_are_measured_and_match_the_notes():
    assert probe_optimizer(torch.optim.AdamW).state_bytes_per_param == 8
    assert probe_optimizer(torch.optim.AdamW, torch.bfloat16).state_bytes_per_param == 4
    assert (
        probe_optimizer(functools.partial(torch.optim.SGD, lr=0.1, momentum=0.9)).state_bytes_per_param == 4
    )
    assert probe_optimizer(functools.partial(torch.optim.SGD, lr=0.1)).state_bytes_per_param == 0
    assert probe_optimizer(functools.partial(torch.optim.Adam, amsgrad=True)).state_bytes_per_param == 12
    # and what a real step on a real layer keeps
    layer = torch.nn.Linear(48, 32)
    opt = torch.optim.AdamW(layer.parameters())
    layer(torch.randn(5, 48)).sum().backward()
    opt.step()
    state = sum(v.nbytes for s in opt.state.values() for v in s.values() if v.numel() > 1)
    assert state == 8 * sum(p.numel() for p in layer.parameters())


def test_8bit_adamw_is_measured_or_takes_the_notes_2_bytes():
    efficiency = pytest.importorskip("lit_mllm.training.efficiency")
    from lit_mllm.training.memory import _optimizer_facts

    facts = _optimizer_facts(functools.partial(efficiency.AdamW8bit, lr=1e-3), torch.float32)
    assert facts.state_bytes_per_param == pytest.approx(2, rel=0.05)  # + block scales when measured


def test_a_part_built_in_bf16_counts_2_bytes_and_no_autocast_copy(model):
    staged(model, "connector")
    fp32 = estimate_memory(model, batch_size=2, seq_len=40, precision="bf16-mixed")
    model.language_model.to(torch.bfloat16)
    try:
        est = estimate_memory(model, batch_size=2, seq_len=40, precision="bf16-mixed")
        assert est.parts["language_model"].weights == 2 * LLM  # no fp32 master, no half copy
        assert est.parts["connector"].weights == fp32.parts["connector"].weights == 6 * CONNECTOR
        plain = estimate_memory(model, batch_size=2, seq_len=40)
        assert plain.parts["language_model"].weights == 2 * LLM
        assert (
            plain.parts["language_model"].activations
            < estimate_memory(model.float(), batch_size=2, seq_len=40).parts["language_model"].activations
        )
    finally:
        model.float()


def _saved_bytes_per_token(module, make_input, tokens_per_call: tuple[int, int], trainable: bool) -> float:
    """Bytes autograd saves per token in ``module`` (parameters excluded), from two sizes so that what does
    not grow with the tokens cancels."""
    module.requires_grad_(trainable)
    totals = []
    for n in tokens_per_call:
        params = {p.untyped_storage().data_ptr() for p in module.parameters()}
        seen: dict[int, int] = {}

        def pack(t, seen=seen, params=params):
            if t.untyped_storage().data_ptr() not in params:
                seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        x = make_input(n)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            module(**x) if isinstance(x, dict) else module(x)
        totals.append(sum(seen.values()))
    return (totals[1] - totals[0]) / (tokens_per_call[1] - tokens_per_call[0])


@pytest.mark.parametrize("trainable", [True, False])
def test_block_formula_matches_what_a_llama_layer_saves(trainable):
    """A transformers Llama decoder layer in fp32 (SDPA, no mask): the formula counts every saved tensor of
    width D, D_kv or I; what it leaves out (rsqrt per norm, log-sum-exp per head, rotary tables) is a few
    elements per token."""
    from transformers import LlamaConfig, LlamaModel

    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=64,
        intermediate_size=160,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    lm = LlamaModel(config).train()
    one = _saved_bytes_per_token(
        lm,
        lambda n: {"inputs_embeds": torch.randn(2, n // 2, 64, requires_grad=True)},  # as from embeddings
        (64, 128),
        trainable,
    )
    layer = lm.layers[0]
    shape = block_shape(layer, 64, kv_width=32)
    assert (shape.mlp_width, shape.mlp, shape.norm_terms) == (160, "gated", 3)
    formula = ElementBytes.of("32-true", torch.float32).block(shape, trainable)
    final_norm = (
        (2 if trainable else 1) * 64 * 4
    )  # the model's last norm: input (+ normalised when it trains)
    small = 4 * (3 + 4 + 16)  # 3 rsqrt, log-sum-exp per head, cos + sin per position (2 x 16 / 2 rows)
    assert formula + final_norm <= one <= formula + final_norm + small


def test_block_formula_matches_what_a_clip_layer_saves():
    from transformers import CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(0)
    config = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=32,
        patch_size=8,
    )
    vision = CLIPVisionModel(config)
    encoder = getattr(vision, "vision_model", vision).encoder.train()
    shape = block_shape(encoder.layers[0], 32)
    assert (shape.mlp_width, shape.mlp, shape.norm_terms) == (128, "quick_gelu", 2)
    for trainable in (True, False):
        measured = _saved_bytes_per_token(
            encoder,
            lambda n, frozen=not trainable: torch.randn(2, n // 2, 32, requires_grad=frozen),
            (40, 80),
            trainable,
        )
        formula = 2 * ElementBytes.of("32-true", torch.float32).block(shape, trainable)
        small = 2 * 4 * (2 + 2 + 2)  # LayerNorm mean and rstd, log-sum-exp per head, per layer
        assert formula <= measured <= formula + small


def test_activation_checkpointing_keeps_layer_inputs_and_recomputes_one_layer(model):
    staged(model, "connector", "language_model")
    kwargs = dict(batch_size=3, seq_len=50, attention_mask=False)
    full = estimate_memory(model, **kwargs)
    ckpt = estimate_memory(model, activation_checkpointing=True, **kwargs)
    shape = block_shape(model.language_model.model.model.layers[0], 64, kv_width=32)
    layer = 3 * 50 * ElementBytes.of("32-true", torch.float32).block(shape, True)
    final_norm = 3 * 50 * 2 * 64 * 4
    assert full.parts["language_model"].activations == 2 * layer + final_norm
    assert ckpt.parts["language_model"].activations == 2 * 3 * 50 * 64 * 4 + final_norm
    assert ckpt.recomputed == layer


def test_bad_settings_say_what_to_change(model):
    staged(model, "connector")
    with pytest.raises(ValueError, match="leaves no text"):
        estimate_memory(model, batch_size=1, seq_len=model.tokens_per_image)
    with pytest.raises(ValueError, match="bf16-mixed"):
        estimate_memory(model, batch_size=1, seq_len=40, precision="fp8")
    apply_stage(model.parts(), Stage(name="none", trainable=[]))
    with pytest.raises(ValueError, match="nothing trains"):
        estimate_memory(model, batch_size=1, seq_len=40)


def test_command_on_the_quickstart(tmp_path, capsys):
    facts = estimate_memory_main(
        [
            "--config",
            QUICKSTART,
            "--trainer.logger.init_args.save_dir",
            str(tmp_path),
            "--seq_len",
            "200",
            "--zero_stage",
            "2",
            "--devices",
            "2",
        ]
    )
    params = 1_137_152  # quickstart: tower + connector + LLM, all trained (README)
    assert facts["batch_size"] == 32 and facts["precision"] == "32-true" and facts["optimizer"] == "AdamW"
    assert facts["weights"] == pytest.approx(4 * params / GIB)
    assert facts["gradients"] == pytest.approx(4 * params / 2 / GIB)
    assert facts["optimizer_states"] == pytest.approx(8 * params / 2 / GIB)
    assert facts["tokens_per_image"] == 64 and facts["supervised_tokens"] == 200 - 64
    out = capsys.readouterr().out
    assert "language_model" in out and "total (peak at" in out


def test_a_gpu_config_is_estimated_on_a_cpu_machine(tiny_hub, tmp_path, capsys):
    """LLaVA-1.5-7B's config asks for 8 GPUs and bf16-mixed: the model is built here on the CPU (tiny
    stand-ins for the hub checkpoints) and the estimate follows what the config asks for."""
    from tests.stand_ins import with_stand_ins

    config = with_stand_ins(CONFIGS / "llava15_7b.yaml", tiny_hub, tmp_path)
    common = ["--config", str(config), "--seq_len", "700", "--batch_size", "2"]
    facts = estimate_memory_main(common)
    assert (facts["precision"], facts["devices"], facts["zero_stage"]) == ("bf16-mixed", 8, 0)
    assert facts["foreach"]  # PyTorch's default optimizer step on CUDA
    sharded = estimate_memory_main([*common, "--zero_stage", "3"])
    assert sharded["weights"] == pytest.approx(facts["weights"] / 8, rel=1e-6)
    with pytest.raises(SystemExit) as exit_:
        estimate_memory_main(["--help"])
    assert exit_.value.code == 0 and "--activation_checkpointing" in capsys.readouterr().out


@pytest.mark.slow
def test_benchmark_estimate_is_within_the_goal_of_measured_peaks(capsys):
    """benchmarks/memory_estimate_error.py on the align and finetune stages: real Trainer steps, measured
    peaks."""
    import importlib.util
    import sys

    path = CONFIGS.parent / "benchmarks" / "memory_estimate_error.py"
    spec = importlib.util.spec_from_file_location("benchmark_memory_estimate_error", path)
    bench = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = bench  # dataclasses look their module up here
    threads = torch.get_num_threads()
    try:
        spec.loader.exec_module(bench)
        error = bench.main(["--cases", "align", "finetune", "--threads", str(threads)])
    finally:
        torch.set_num_threads(threads)
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith("memory_estimate_error: ")
    assert error <= 0.15
