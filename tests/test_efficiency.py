"""Efficiency options: gradient checkpointing (same gradients, fewer kept activations, real recomputation),
precision (bf16-mixed on CPU, a frozen bf16 LLM under an fp32 connector, fp16 with loss scaling on CUDA),
gradient accumulation from a global batch size, 8-bit AdamW's missing-dependency error, torch.compile, and the
shipped configs/efficiency overlays."""

from __future__ import annotations

import copy
import importlib.util
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.plugins.precision import HalfPrecision, MixedPrecision
from torch import nn

from lit_mllm.commands.lightning import build_cli
from lit_mllm.data import collate, read_llava
from lit_mllm.lit import PrefixFusionVLM
from lit_mllm.lit.base import lm_loss
from lit_mllm.nn.language import LanguageModel, TinyLlama, bare_layer
from lit_mllm.nn.vision import FusedTowers, OpenCLIPTower, TinyCLIPVision
from lit_mllm.training import Stage
from lit_mllm.training.efficiency import AdamW8bit, GlobalBatchSize
from lit_mllm.training.stages import state_name
from tests.conftest import shapes_data, tiny_model
from tests.stand_ins import save_open_clip

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
EFFICIENCY = sorted((CONFIGS / "efficiency").glob("*.yaml"))
HAS_CUDA = torch.cuda.is_available()
HAS_BNB = importlib.util.find_spec("bitsandbytes") is not None
ALIGN = Stage(name="align", trainable=["connector"])


def count_calls(module: nn.Module) -> list[int]:
    """A counter of ``module``'s forward calls (pre-hook: it also fires when a recomputation stops early)."""
    calls = [0]
    module.register_forward_pre_hook(lambda m, args: calls.__setitem__(0, calls[0] + 1))
    return calls


def saved_for_backward(fn) -> tuple[object, int]:
    """``fn()`` and the number of tensors autograd keeps for the backward pass while it runs (tensors saved inside
    a checkpointed region are the checkpoint's business and not counted)."""
    count = [0]

    def pack(t):
        count[0] += 1
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, count[0]


def hf_checkpointing(model) -> bool:
    """Whether ``transformers``' checkpointing is on (its flag's name changed in transformers 5)."""
    flag = getattr(type(model), "is_activation_checkpointing", None)
    return model.is_activation_checkpointing if flag is not None else model.is_gradient_checkpointing


def tiny_llm(**kwargs) -> TinyLlama:
    torch.manual_seed(0)
    return TinyLlama(hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, **kwargs)


def llm_backward(lm: TinyLlama, trains: bool) -> dict:
    """Input and parameter gradients of a scalar of the logits, the tensors kept for backward and layer-0 calls.

    A frozen LLM is in eval mode with no trainable parameter, as stages leave it; gradients still reach its input
    (the connector's output in the align stage)."""
    lm.train(trains)
    lm.requires_grad_(trains)
    calls = count_calls(bare_layer(lm.decoder_layers[0]).self_attn)
    torch.manual_seed(1)
    x = torch.randn(2, 7, lm.hidden_size, requires_grad=True)  # [B, L, D]
    logits, kept = saved_for_backward(lambda: lm(x))
    (logits.float().square().mean()).backward()
    grads = {state_name(n): p.grad for n, p in lm.named_parameters() if p.grad is not None}
    return {"x": x.grad, "params": grads, "kept": kept, "calls": calls[0], "logits": logits.detach()}


@pytest.fixture
def pair(shapes_root, model) -> dict:
    """Two training samples: enough for a step, cheap enough to take several."""
    proc = model.processor()
    return collate([proc(s) for s in read_llava(shapes_root / "train.json")[:2]], proc.tokenizer.pad_token_id)


# -- gradient checkpointing ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("trains", [True, False], ids=["trained", "frozen"])
def test_llm_checkpointing_same_gradients_recomputed(trains):
    plain = llm_backward(tiny_llm(), trains)
    ckpt = llm_backward(tiny_llm(gradient_checkpointing=True), trains)
    torch.testing.assert_close(ckpt["logits"], plain["logits"], rtol=0, atol=0)
    torch.testing.assert_close(ckpt["x"], plain["x"])
    assert ckpt["params"].keys() == plain["params"].keys() and (len(plain["params"]) > 0) == trains
    for name, grad in plain["params"].items():
        torch.testing.assert_close(ckpt["params"][name], grad, msg=name)
    assert (plain["calls"], ckpt["calls"]) == (1, 2)  # layer 0 ran again in the backward pass
    assert ckpt["kept"] < plain["kept"] / 3


def test_llm_checkpointing_needs_autograd():
    lm = tiny_llm(gradient_checkpointing=True)
    calls = count_calls(bare_layer(lm.decoder_layers[0]).self_attn)
    with torch.no_grad():
        logits = lm(torch.randn(1, 5, 64))
        lm.generate(lm.embed(torch.tensor([[5, 6, 7]])), torch.ones(1, 3, dtype=torch.long), max_new_tokens=2)
    assert logits.shape == (1, 5, len(lm.tokenizer)) and calls[0] == 3  # one call per forward, no recompute


def test_llm_checkpointing_keeps_names_and_survives_copies():
    plain, ckpt = tiny_llm(), tiny_llm(gradient_checkpointing=True)
    assert list(ckpt.state_dict()) == list(plain.state_dict())
    # weight-averaging callbacks copy the model: the copy must compute with its own weights
    copied = copy.deepcopy(ckpt)
    with torch.no_grad():
        for p in copied.parameters():
            p.mul_(0.5)
    x = torch.randn(1, 4, 64)
    assert not torch.allclose(copied(x), ckpt(x))
    torch.testing.assert_close(ckpt(x), plain(x))


def tower_backward(tower: nn.Module, image_size: int) -> dict:
    torch.manual_seed(1)
    pixels = torch.randn(2, 3, image_size, image_size)
    # a block's first child: transformers recomputes a block's forward, not its call (and hooks)
    calls = [count_calls(next(block.children())) for block in tower.blocks]
    features, kept = saved_for_backward(lambda: tower(pixels))
    features.square().mean().backward()
    grads = {n: p.grad for n, p in tower.named_parameters() if p.grad is not None}
    return {"grads": grads, "kept": kept, "calls": [c[0] for c in calls], "features": features.detach()}


def hf_tower(**kwargs) -> TinyCLIPVision:
    torch.manual_seed(0)
    return TinyCLIPVision(image_size=32, patch_size=8, hidden_size=32, num_layers=3, num_heads=2, **kwargs)


def test_hf_tower_checkpointing_same_gradients_recomputed():
    plain, ckpt = hf_tower(), hf_tower(gradient_checkpointing=True)
    a, b = tower_backward(plain.train(), 32), tower_backward(ckpt.train(), 32)
    torch.testing.assert_close(b["features"], a["features"], rtol=0, atol=0)
    assert a["grads"].keys() == b["grads"].keys() and a["grads"]
    for name, grad in a["grads"].items():
        torch.testing.assert_close(b["grads"][name], grad, msg=name)
    assert a["calls"] == [1, 1] and b["calls"] == [2, 2] and b["kept"] < a["kept"]


def test_hf_tower_checkpointing_of_a_partly_trained_tower(pair):
    """POINTS-style: only the last block trains (train mode), so only it is recomputed; the model step still
    gives the same loss and connector/tower gradients as without checkpointing."""
    stage = Stage(name="last", trainable=["connector"], train_last_blocks={"vision_tower": 1})
    results = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = PrefixFusionVLM(  # the tower keeps 2 blocks; the last one trains
            hf_tower(gradient_checkpointing=checkpointing),
            TinyLlama(hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2),
            stage=stage,
        )
        model.train()
        calls = [count_calls(b.self_attn) for b in model.vision_tower.blocks]
        loss = model.training_step(pair, 0)
        loss.backward()
        grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
        results.append((loss.detach(), grads, [c[0] for c in calls]))
    (loss_a, grads_a, calls_a), (loss_b, grads_b, calls_b) = results
    torch.testing.assert_close(loss_b, loss_a)
    for name, grad in grads_a.items():
        torch.testing.assert_close(grads_b[name], grad, msg=name)
    assert any("vision_tower" in n for n in grads_a)
    assert calls_a == [1, 1] and calls_b == [1, 2]  # the frozen first block is not recomputed


@pytest.fixture(scope="module")
def open_clip_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("oc") / "vit"
    save_open_clip(folder, {"image_size": 32, "layers": 3, "width": 32, "head_width": 16, "patch_size": 8})
    return f"local-dir:{folder}"


def test_open_clip_tower_checkpointing_same_gradients_recomputed(open_clip_dir):
    plain = OpenCLIPTower(open_clip_dir, feature_layer=-1)
    ckpt = OpenCLIPTower(open_clip_dir, feature_layer=-1, gradient_checkpointing=True)
    assert ckpt.visual.transformer.grad_checkpointing and not plain.visual.transformer.grad_checkpointing
    a, b = tower_backward(plain.train(), 32), tower_backward(ckpt.train(), 32)
    torch.testing.assert_close(b["features"], a["features"], rtol=0, atol=0)
    assert a["grads"]
    for name, grad in a["grads"].items():
        torch.testing.assert_close(b["grads"][name], grad, msg=name)
    assert a["calls"] == [1, 1, 1] and b["calls"] == [2, 2, 2] and b["kept"] < a["kept"]


def test_fused_towers_checkpoint_every_tower():
    fused = FusedTowers([hf_tower(), hf_tower()], gradient_checkpointing=True)
    assert all(hf_checkpointing(t.model) for t in fused.towers)
    assert tower_backward(fused.train(), 32)["calls"] == [2, 2, 2, 2]


def test_model_step_equal_with_checkpointing(pair):
    """The whole prefix model, tower and LLM checkpointed: same loss and gradients as without."""
    results = []
    for checkpointing in (False, True):
        stage = Stage(name="all", trainable=["vision_tower", "connector", "language_model"])
        model = tiny_model(stage, gradient_checkpointing=checkpointing)
        if checkpointing:
            model.vision_tower.enable_gradient_checkpointing()
        model.train()
        loss = model.training_step(pair, 0)
        loss.backward()
        grads = {state_name(n): p.grad for n, p in model.named_parameters() if p.grad is not None}
        results.append((loss.detach(), grads))
    (loss_a, grads_a), (loss_b, grads_b) = results
    torch.testing.assert_close(loss_b, loss_a)
    assert grads_a.keys() == grads_b.keys()
    for name, grad in grads_a.items():
        torch.testing.assert_close(grads_b[name], grad, msg=name)


# -- precision -----------------------------------------------------------------------------------------------------
def test_loss_is_float32_under_bf16_autocast(model, pair):
    """Autocast runs the model in bf16; the cross-entropy is computed in fp32 from those logits (a bf16 loss would
    be off by ~1e-2 relative), in training and in evaluation."""
    model.train()
    with MixedPrecision("bf16-mixed", "cpu").forward_context():
        logits, target, _ = model.supervised_logits(pair)
        loss = model.training_step(pair, 0)
        full = model(pair)
        eval_loss = lm_loss(full, pair.labels)
    assert logits.dtype == full.dtype == torch.bfloat16
    assert loss.dtype == eval_loss.dtype == torch.float32
    reference = F.cross_entropy(logits.double(), target)
    assert abs(loss.double() - reference) < 1e-5 * reference
    mask = pair.labels[:, 1:] != -100
    eval_reference = F.cross_entropy(full[:, :-1][mask].double(), pair.labels[:, 1:][mask])
    assert abs(eval_loss.double() - eval_reference) < 1e-5 * eval_reference


def test_frozen_bf16_llm_under_fp32_connector(pair):
    """A frozen LLM held in bf16 with a float32 connector that trains: fp32 (32-true), bf16-mixed and bf16-true
    steps all give a finite loss close to an all-fp32 model's, and the connector gets its gradients."""
    batch = pair
    reference = tiny_model(ALIGN).train().training_step(batch, 0).detach()
    for precision in ("32-true", "bf16-mixed", "bf16-true"):
        model = tiny_model(ALIGN, dtype="bfloat16")
        assert {p.dtype for p in model.language_model.parameters()} == {torch.bfloat16}
        assert {p.dtype for p in model.connector.parameters()} == {torch.float32}
        plugin = {"32-true": None, "bf16-mixed": MixedPrecision("bf16-mixed", "cpu")}.get(
            precision, HalfPrecision("bf16-true")
        )
        if isinstance(plugin, HalfPrecision):
            model = plugin.convert_module(model)  # bf16-true casts every part, the connector included
        model.train()
        with plugin.forward_context() if plugin else torch.enable_grad():
            loss = model.training_step(batch, 0)
        loss.backward()
        assert loss.dtype == torch.float32 and torch.isfinite(loss), precision
        assert abs(loss - reference) < 0.02 * reference, precision
        grads = [p.grad for p in model.connector.parameters()]
        assert all(g is not None and torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads), precision
        assert all(p.grad is None for p in model.language_model.parameters()), precision
        expected = torch.bfloat16 if precision == "bf16-true" else torch.float32
        assert {g.dtype for g in grads} == {expected}, precision


def test_language_model_loads_weights_in_a_dtype(tmp_path):
    lm = tiny_llm()
    lm.model.save_pretrained(tmp_path)
    lm.tokenizer.save_pretrained(tmp_path)
    loaded = LanguageModel(str(tmp_path), dtype="bfloat16", gradient_checkpointing=True)
    assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16} and loaded.gradient_checkpointing
    x = torch.randn(1, 4, 64)
    torch.testing.assert_close(loaded(x.bfloat16()).float(), lm(x), atol=0.1, rtol=0.05)


@pytest.mark.slow
def test_bf16_mixed_fit_with_global_batch_size(shapes_root, tmp_path):
    """A real fit of the prefix model under bf16-mixed with accumulation from a global batch size: the optimizer
    steps every 2 batches, the weights stay float32 and the loss is finite."""
    model = tiny_model()
    data = shapes_data(shapes_root, batch_size=4)
    data.connect(model.processor())
    steps = []

    class Record(L.Callback):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            steps.append(trainer.fit_loop.epoch_loop.batch_progress.current.ready)

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            assert torch.isfinite(outputs["loss"])

    trainer = L.Trainer(
        accelerator="cpu",
        precision="bf16-mixed",
        max_epochs=1,
        limit_train_batches=4,
        limit_val_batches=0,
        callbacks=[GlobalBatchSize(8), Record()],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(model, data)
    assert trainer.accumulate_grad_batches == 2 and steps == [2, 4] and trainer.global_step == 2
    assert {p.dtype for p in model.parameters()} == {torch.float32}


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="fp16 mixed precision (loss scaling) needs CUDA")
def test_fp16_mixed_fit_scales_the_loss(shapes_root, tmp_path):
    model = tiny_model()
    trainer = L.Trainer(
        accelerator="gpu",
        devices=1,
        precision="16-mixed",
        max_steps=3,
        limit_val_batches=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        default_root_dir=tmp_path,
    )
    data = shapes_data(shapes_root, batch_size=4)
    data.connect(model.processor())
    trainer.fit(model, data)
    scaler = trainer.precision_plugin.scaler
    assert isinstance(scaler, torch.amp.GradScaler) and scaler.get_scale() > 1
    assert trainer.global_step == 3 and {p.dtype for p in model.parameters()} == {torch.float32}


# -- global batch size ---------------------------------------------------------------------------------------------
def fake_trainer(batch_size, world_size=1, accumulate=1, datamodule=True):
    return SimpleNamespace(
        datamodule=SimpleNamespace(batch_size=batch_size) if datamodule else None,
        world_size=world_size,
        accumulate_grad_batches=accumulate,
        loggers=[],
    )


@pytest.mark.parametrize(
    ("global_size", "batch_size", "world_size", "expected"),
    [(128, 32, 1, 4), (128, 8, 4, 4), (256, 16, 16, 1), (6, 2, 1, 3)],
)
def test_global_batch_size_derives_accumulation(global_size, batch_size, world_size, expected):
    trainer = fake_trainer(batch_size, world_size)
    GlobalBatchSize(global_size).setup(trainer, SimpleNamespace(automatic_optimization=True), "fit")
    assert trainer.accumulate_grad_batches == expected
    assert expected * batch_size * world_size == global_size


def test_global_batch_size_errors():
    module = SimpleNamespace(automatic_optimization=True)
    with pytest.raises(ValueError, match=r"not a multiple of batch_size 32 x 2 process\(es\) = 64.*use "):
        GlobalBatchSize(100).setup(fake_trainer(32, 2), module, "fit")
    with pytest.raises(ValueError, match="`batch_size` attribute"):
        GlobalBatchSize(64).setup(fake_trainer(None, datamodule=False), module, "fit")
    with pytest.raises(ValueError, match="set only one of them"):
        GlobalBatchSize(64).setup(fake_trainer(8, accumulate=4), module, "fit")
    with pytest.raises(ValueError, match="automatic optimization"):
        GlobalBatchSize(64).setup(fake_trainer(8), SimpleNamespace(automatic_optimization=False), "fit")
    with pytest.raises(ValueError, match="positive"):
        GlobalBatchSize(0)
    trainer = fake_trainer(32, 2)
    GlobalBatchSize(100).setup(trainer, module, "validate")  # only a fit accumulates
    assert trainer.accumulate_grad_batches == 1


class _Linear(L.LightningModule):
    """The smallest module that records how many optimizer steps Lightning plans and takes."""

    def __init__(self):
        super().__init__()
        self.layer = nn.Linear(2, 1)
        self.planned, self.steps = None, 0

    def training_step(self, batch, batch_idx):
        return self.layer(batch).square().mean()

    def on_before_optimizer_step(self, optimizer):
        self.steps += 1

    def configure_optimizers(self):
        self.planned = self.trainer.estimated_stepping_batches  # what a schedule's total_steps would be
        return torch.optim.SGD(self.parameters(), lr=0.1)


class _Data(L.LightningDataModule):
    def __init__(self, batch_size: int, n: int):
        super().__init__()
        self.batch_size, self.n = batch_size, n

    def train_dataloader(self):
        return torch.utils.data.DataLoader(torch.randn(self.n, 2), batch_size=self.batch_size)


@pytest.mark.parametrize(("batches", "epochs"), [(12, 1), (12, 2), (10, 1)])
def test_lightning_steps_once_per_accumulated_global_batch(batches, epochs, tmp_path):
    """Accumulation set in the callback's setup hook is honoured by the fit loop and by the step estimate the LR
    schedule is built from; a last partial group still steps at the end of an epoch (Lightning's rule)."""
    module = _Linear()
    trainer = L.Trainer(
        accelerator="cpu",
        max_epochs=epochs,
        callbacks=[GlobalBatchSize(6)],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(module, _Data(batch_size=2, n=2 * batches))
    per_epoch = -(-batches // 3)  # ceil: 3 batches of 2 per global batch of 6
    assert trainer.accumulate_grad_batches == 3
    assert module.steps == trainer.global_step == module.planned == per_epoch * epochs


# -- 8-bit AdamW ---------------------------------------------------------------------------------------------------
def test_adamw8bit_without_bitsandbytes_says_how_to_get_it(monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "bitsandbytes", None)  # import fails even where installed
    with pytest.raises(ImportError, match=r"pip install bitsandbytes.*CUDA"):
        AdamW8bit([nn.Parameter(torch.zeros(2))], lr=1e-3)


@pytest.mark.gpu
@pytest.mark.skipif(not (HAS_CUDA and HAS_BNB), reason="needs bitsandbytes and CUDA")
def test_adamw8bit_is_the_bitsandbytes_optimizer():
    import bitsandbytes

    param = nn.Parameter(torch.randn(64, 128, device="cuda"))
    optimizer = AdamW8bit([param], lr=1e-2, weight_decay=0.0, min_8bit_size=16)
    assert isinstance(optimizer, bitsandbytes.optim.AdamW8bit)
    param.square().sum().backward()
    before = param.detach().clone()
    optimizer.step()
    assert not torch.equal(before, param) and optimizer.state[param]["state1"].dtype == torch.uint8


# -- torch.compile -------------------------------------------------------------------------------------------------
def test_compiled_layers_compose_with_checkpointing_and_stages(pair):
    """Compiled decoder layers (dynamo with the eager backend: the graph capture, not inductor's kernels) inside
    checkpoints, in a prefix model whose stage freezes the LLM: same loss and connector gradients as the plain
    model, fewer kept tensors, unchanged parameter names (checkpoints and stages address parameters by name)."""
    results = []
    for lm in ({}, {"compile": {"backend": "eager"}, "gradient_checkpointing": True}):
        model = tiny_model(ALIGN, **lm).train()
        loss, kept = saved_for_backward(lambda m=model: m.training_step(pair, 0))
        loss.backward()
        results.append((model, loss.detach(), model.connector.linear_1.weight.grad, kept))
    (plain, loss_a, grad_a, kept_a), (compiled, loss_b, grad_b, kept_b) = results
    assert compiled.language_model.compiled and list(compiled.state_dict()) == list(plain.state_dict())
    torch.testing.assert_close(loss_b, loss_a)
    torch.testing.assert_close(grad_b, grad_a)
    assert kept_b < kept_a


@pytest.mark.slow
def test_inductor_compiled_llm_gives_the_same_logits_and_gradients():
    """torch.compile's default backend (inductor: C++ kernels on a CPU, about a minute per graph on a small
    machine), inside checkpoints: same logits and gradients as the plain model."""
    plain = llm_backward(tiny_llm(), trains=True)
    compiled = llm_backward(tiny_llm(compile=True, gradient_checkpointing=True), trains=True)
    torch.testing.assert_close(compiled["logits"], plain["logits"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(compiled["x"], plain["x"], atol=1e-5, rtol=1e-4)
    for name, grad in plain["params"].items():
        torch.testing.assert_close(compiled["params"][name], grad, atol=1e-5, rtol=1e-4, msg=name)


def test_compile_option_is_checked():
    with pytest.raises(TypeError, match="dict of torch.compile options"):
        tiny_llm(compile="max-autotune")


# -- shipped overlays ----------------------------------------------------------------------------------------------
BASES = {"bf16_frozen_llm.yaml": ["quickstart.yaml", "align_shapesworld.yaml"]}
COMPOSED = [
    "bf16_frozen_llm.yaml",
    "grad_checkpointing.yaml",
    "global_batch_size.yaml",
    "adamw8bit.yaml",
    "compile.yaml",
]


def build_stack(names: list[str], shapes_root: Path, tmp_path: Path, base: list[str] | None = None):
    """``--config quickstart.yaml [--config base...] --config configs/efficiency/<name>...`` on a tiny ShapesWorld."""
    files = [CONFIGS / b for b in base or ["quickstart.yaml"]] + [CONFIGS / "efficiency" / n for n in names]
    args = [a for f in files for a in ("--config", str(f))]
    args += ["--data.init_args.root", str(shapes_root), "--data.init_args.num_workers", "0"]
    args += ["--data.init_args.batch_size", "4", "--trainer.logger.init_args.save_dir", str(tmp_path)]
    return build_cli(args, run=False)


def effect_of(name: str, cli) -> None:
    """What each overlay must change in the quickstart."""
    model, trainer = cli.model, cli.trainer
    if name == "bf16.yaml":
        assert trainer.precision == "bf16-mixed"
    elif name == "fp16.yaml":  # a CPU falls back to bf16-mixed (Lightning warns); CUDA gets loss scaling
        assert trainer.precision == ("16-mixed" if HAS_CUDA else "bf16-mixed")
    elif name == "grad_checkpointing.yaml":
        assert model.language_model.gradient_checkpointing and hf_checkpointing(model.vision_tower.model)
    elif name == "global_batch_size.yaml":
        (callback,) = [c for c in trainer.callbacks if isinstance(c, GlobalBatchSize)]
        assert callback.global_batch_size == 128
        # appended to the quickstart's callbacks, not replacing them
        assert sum(type(c).__name__ == "AnswerBaselines" for c in trainer.callbacks) == 1
    elif name == "adamw8bit.yaml":
        if HAS_BNB:
            assert type(model.configure_optimizers()["optimizer"]).__name__ == "AdamW8bit"
        else:
            with pytest.raises(ImportError, match="pip install bitsandbytes"):
                model.configure_optimizers()
    elif name == "compile.yaml":
        assert model.language_model.compiled
    elif name == "bf16_frozen_llm.yaml":
        assert trainer.precision == "bf16-mixed" and model.stage.trainable == ["connector"]
        assert {p.dtype for p in model.language_model.parameters()} == {torch.bfloat16}
        assert {p.dtype for p in model.connector.parameters()} == {torch.float32}
    else:
        raise AssertionError(f"add the expected effect of configs/efficiency/{name} here")


def test_every_overlay_has_a_check():
    assert {p.name for p in EFFICIENCY} <= set(COMPOSED) | {"bf16.yaml", "fp16.yaml"}


def test_overlays_stack_together(shapes_root, tmp_path):
    """The overlays that compose, stacked at once on the quickstart's align stage: each one's effect is there."""
    cli = build_stack(COMPOSED, shapes_root, tmp_path, BASES["bf16_frozen_llm.yaml"])
    for name in COMPOSED:
        effect_of(name, cli)


@pytest.mark.slow
@pytest.mark.parametrize("path", EFFICIENCY, ids=lambda p: p.name)
def test_efficiency_overlay_stacks_on_the_quickstart(path, shapes_root, tmp_path):
    cli = build_stack([path.name], shapes_root, tmp_path, BASES.get(path.name))
    effect_of(path.name, cli)
    if path.name not in ("fp16.yaml", "adamw8bit.yaml", "compile.yaml"):  # a CPU step means something
        cli.datamodule.setup("fit")
        batch, _ = next(iter(cli.datamodule.train_dataloader()))
        with cli.trainer.precision_plugin.forward_context():
            loss = cli.model.train().training_step(batch, 0)
        loss.backward()
        assert torch.isfinite(loss)


def test_bf16_mixed_quickstart_step_close_to_fp32(shapes_root, tmp_path):
    """The quickstart model, one batch: the bf16-mixed loss is finite and within 1% of the fp32 loss."""
    cli = build_stack(["bf16.yaml"], shapes_root, tmp_path)
    cli.datamodule.setup("fit")
    batch, _ = next(iter(cli.datamodule.train_dataloader()))
    model = cli.model.train()
    fp32 = model.training_step(batch, 0).detach()
    with cli.trainer.precision_plugin.forward_context():
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
        bf16 = model.training_step(batch, 0).detach()
    assert torch.isfinite(bf16) and bf16 != fp32
    assert abs(bf16 - fp32) < 0.01 * fp32


def test_fp16_mixed_on_a_cpu_falls_back_to_bf16_mixed():
    """What configs/efficiency/fp16.yaml gives without CUDA: Lightning warns and uses bf16 autocast, no scaler."""
    with pytest.warns(UserWarning, match="not supported on CPU"):
        trainer = L.Trainer(accelerator="cpu", precision="16-mixed", logger=False, enable_progress_bar=False)
    assert trainer.precision == "bf16-mixed" and trainer.precision_plugin.scaler is None
