"""LoRA / QLoRA on a model's parts: the adapted layer computes LoRA's formula; only the adapters (and the stage's
trainable parts) train, with adapter dropout in train mode inside an otherwise frozen, eval-mode part; checkpoints
hold the adapters only; merging reproduces the adapted logits, and a LoRA model exports to a LLaVA folder with our
logits. QLoRA without bitsandbytes or a GPU is refused at build time, naming what is missing."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from transformers import LlamaForCausalLM

from lit_mllm.data.images import normalize
from lit_mllm.lit import PrefixFusionVLM
from lit_mllm.nn.language import TinyLlama
from lit_mllm.nn.vision import TinyCLIPVision
from lit_mllm.training import Stage
from lit_mllm.training.checkpoints import safe_globals
from lit_mllm.training.peft import LoRA, adapter_parameter_count, has_adapters, merge_adapters
from lit_mllm.training.stages import trainable_names, trainable_table
from tests.conftest import tiny_model

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
LM_LORA = LoRA(r=4, alpha=8.0, dropout=0.1, target_modules=["q_proj", "v_proj"])
TOWER_LORA = LoRA(r=2, alpha=2.0, target_modules=["q_proj", "k_proj", "v_proj"])


def lora_stage(**kw) -> Stage:
    return Stage(
        "lora", kw.pop("trainable", ["connector"]), lora=kw.pop("lora", {"language_model": LM_LORA}), **kw
    )


def build(stage: Stage, seed: int = 0) -> PrefixFusionVLM:
    """A tiny LLaVA-1.5-like model whose tower (3 blocks, last hidden state) LLaVA can express exactly."""
    torch.manual_seed(seed)
    tower = TinyCLIPVision(
        image_size=32, patch_size=8, hidden_size=32, num_layers=3, num_heads=2, feature_layer=-1
    )
    lm = TinyLlama(hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2)
    return PrefixFusionVLM(tower, lm, stage=stage)


def randomize_adapters(model, scale: float = 0.5) -> None:
    """Fresh adapters have B = 0 (they change nothing); give them values so a wrong merge could not hide."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_" in name:
                p.copy_(torch.randn_like(p) * scale)


def scramble(model) -> None:
    """Random tiny inits give near-zero logits; scale the base weights so a mapping error could not hide."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_" not in name:
                p.mul_(3.0)


def lora_names(model) -> set[str]:
    return {n for n, _ in model.named_parameters() if ".lora_A." in n or ".lora_B." in n}


# -- injection and training ---------------------------------------------------------------------------------------
def test_adapted_layer_computes_the_lora_formula():
    """``W x + b + (alpha / r) B A x``, computed by hand from the layer's weights (dropout off in eval)."""
    model = build(lora_stage()).eval()
    randomize_adapters(model)
    layer = model.language_model.model.model.layers[1].self_attn.v_proj
    W = layer.base_layer.weight
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight  # [r, D_in], [D_out, r]
    x = torch.randn(3, 5, W.shape[1])
    expected = x @ W.T + (LM_LORA.alpha / LM_LORA.r) * (x @ A.T @ B.T)
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)
    assert A.shape == (4, 64) and B.shape[1] == 4


def test_only_the_adapters_train_and_the_parts_keep_their_types(batch):
    model = tiny_model(lora_stage())
    lm = model.language_model
    assert type(lm) is TinyLlama and type(lm.model) is LlamaForCausalLM  # family code keeps working
    assert lm.model.get_decoder() is lm.model.model
    connector = {f"connector.{n}" for n, _ in model.connector.named_parameters()}
    adapters = lora_names(model)
    assert adapters and all(n.startswith("language_model.") for n in adapters)
    assert {n.rsplit(".", 4)[-4] for n in adapters} == {"q_proj", "v_proj"}
    assert trainable_names(model) == connector | adapters

    model.train()  # what Lightning calls after validation
    attention = lm.model.model.layers[0].self_attn
    assert not attention.training and not attention.q_proj.base_layer.training
    assert attention.q_proj.lora_dropout["default"].training  # adapter dropout is on while training
    assert not any(m.training for m in model.vision_tower.modules())

    model.training_step(batch, 0).backward()
    for name, p in model.named_parameters():
        assert (p.grad is not None) == (name in connector | adapters), name
    # B gets a gradient; A's is 0 while B = 0
    assert all(p.grad.abs().sum() > 0 for n, p in model.named_parameters() if ".lora_B." in n)

    optimizer = model.configure_optimizers()
    assert {id(p) for g in optimizer.param_groups for p in g["params"]} == {
        id(p) for p in model.parameters() if p.requires_grad
    }


def test_pink_style_adapters_in_the_tower_run_it_with_autograd(batch):
    stage = lora_stage(lora={"vision_tower": TOWER_LORA, "language_model": LM_LORA})
    model = tiny_model(stage)
    model.train()
    tower = model.vision_tower
    assert all(p.requires_grad == (".lora_" in n) for n, p in tower.named_parameters())
    assert not any(m.training for n, m in tower.named_modules() if n and "lora_" not in n)
    out = model.encode_images(batch.pixel_values)
    assert out.requires_grad
    model.training_step(batch, 0).backward()
    tower_adapters = [p for n, p in tower.named_parameters() if ".lora_B." in n]
    assert tower_adapters and all(p.grad is not None and p.grad.abs().sum() > 0 for p in tower_adapters)
    assert all(p.grad is None for n, p in tower.named_parameters() if ".lora_" not in n)


def test_a_part_both_trainable_and_adapted_trains_whole():
    model = tiny_model(lora_stage(trainable=["connector", "language_model"]))
    assert all(p.requires_grad for p in model.language_model.parameters())
    assert lora_names(model) <= trainable_names(model)


def test_table_shows_the_adapters():
    model = tiny_model(lora_stage())
    table = trainable_table(model.parts(), model.stage)
    n_lora = sum(p.numel() for n, p in model.named_parameters() if ".lora_" in n)
    assert n_lora == adapter_parameter_count(model.language_model) > 0
    header, _, *rows = table.splitlines()[1:]
    assert header.split() == ["part", "parameters", "trainable", "mode"]
    lm_row = next(r for r in rows if r.startswith("language_model")).split()
    assert lm_row == ["language_model", lm_row[1], "0", "eval"]  # the frozen rest of the LLM
    lora_row = next(r for r in rows if r.startswith("  language_model[LoRA]")).split()  # nested under it
    assert lora_row == ["language_model[LoRA]", f"{n_lora:,}", f"{n_lora:,}", "train"]
    assert "trains connector, LoRA r=4 on q_proj, v_proj of language_model" in table


def test_lr_scale_reaches_the_adapters():
    model = tiny_model(lora_stage(lr_scale={"language_model": 0.1}))
    model.optimizer = lambda params: torch.optim.AdamW(params, lr=1e-3)
    optimizer = model.configure_optimizers()
    lm = [g for g in optimizer.param_groups if g["part"] == "language_model[LoRA]"]
    assert lm and all(g["lr"] == pytest.approx(1e-4) for g in lm)
    assert {id(p) for g in lm for p in g["params"]} == {
        id(p) for n, p in model.named_parameters() if ".lora_" in n
    }


def test_bad_lora_configs_say_what_is_wrong():
    with pytest.raises(ValueError, match=r"match no linear layer of language_model .* named \[.*'q_proj'"):
        tiny_model(lora_stage(lora={"language_model": LoRA(target_modules=["query"])}))
    with pytest.raises(ValueError, match=r"unknown part\(s\) \['llm'\]"):
        tiny_model(lora_stage(lora={"llm": LM_LORA}))
    with pytest.raises(ValueError, match="r=0"):
        LoRA(r=0)
    with pytest.raises(ValueError, match="4-bit weights cannot train"):
        tiny_model(
            lora_stage(
                trainable=["connector", "language_model"], lora={"language_model": LoRA(quantize_base="nf4")}
            )
        )


# -- QLoRA --------------------------------------------------------------------------------------------------------
def _qlora_possible() -> bool:
    from lit_mllm.training.peft import quantization_missing

    return not quantization_missing()


@pytest.mark.skipif(_qlora_possible(), reason="bitsandbytes and a GPU are present: QLoRA builds")
def test_qlora_without_bitsandbytes_or_gpu_names_what_is_missing():
    import importlib.util

    with pytest.raises(
        RuntimeError, match=r"quantize_base='nf4' on language_model \(QLoRA\) needs bitsandbytes"
    ) as e:
        tiny_model(lora_stage(lora={"language_model": LoRA(quantize_base="nf4")}))
    if importlib.util.find_spec("bitsandbytes") is None:
        assert "pip install bitsandbytes" in str(e.value)
    if not torch.cuda.is_available():
        assert "no CUDA GPU" in str(e.value)


@pytest.mark.gpu
@pytest.mark.skipif(not _qlora_possible(), reason="QLoRA needs bitsandbytes and a CUDA GPU")
def test_qlora_trains_adapters_on_4bit_weights_and_merges(batch):
    import bitsandbytes as bnb

    spec = LoRA(r=4, alpha=8.0, quantize_base="nf4", compute_dtype="float32")
    model = tiny_model(lora_stage(lora={"language_model": spec})).cuda()
    layers = model.language_model.model.model.layers
    assert isinstance(layers[0].mlp.up_proj, bnb.nn.Linear4bit)  # every linear but the head is 4-bit
    assert isinstance(layers[0].self_attn.q_proj.base_layer, bnb.nn.Linear4bit)
    assert type(model.language_model.model.lm_head) is torch.nn.Linear
    on_gpu = {k: (v.cuda() if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}
    model.train()
    model.training_step(on_gpu, 0).backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if ".lora_A." in n)
    model.eval()
    randomize_adapters(model, scale=0.05)
    with torch.no_grad():
        adapted = model(on_gpu)
        merge_adapters(model)
        merged = model(on_gpu)
    assert not has_adapters(model)
    torch.testing.assert_close(merged, adapted, rtol=1e-3, atol=1e-3)


# -- checkpoints --------------------------------------------------------------------------------------------------
def test_checkpoint_holds_the_adapters_and_restores_them(tmp_path, shapes_root):
    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint

    from tests.conftest import shapes_data

    model = tiny_model(lora_stage())
    dm = shapes_data(shapes_root, batch_size=4)
    dm.connect(model.processor())
    trainer = L.Trainer(
        max_steps=2,
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        callbacks=[ModelCheckpoint(tmp_path, every_n_train_steps=2)],
    )
    trainer.fit(model, dm)
    ckpt = next(tmp_path.glob("*.ckpt"))
    with torch.serialization.safe_globals(safe_globals()):  # enough for a checkpoint holding LoRA stages
        saved = torch.load(ckpt, weights_only=True, map_location="cpu")
    assert set(saved["state_dict"]) == trainable_names(model)
    saved_numel = sum(v.numel() for v in saved["state_dict"].values())
    assert saved_numel < 0.05 * sum(p.numel() for p in model.parameters())  # the LLM's weights are not in it
    trained_b = {n: p.detach().clone() for n, p in model.named_parameters() if ".lora_B." in n}
    assert any(v.abs().sum() > 0 for v in trained_b.values())  # the adapters trained (B starts at 0)

    fresh = tiny_model(lora_stage())
    assert all(p.abs().sum() == 0 for n, p in fresh.named_parameters() if ".lora_B." in n)
    validator = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, limit_val_batches=1)
    with torch.serialization.safe_globals(
        safe_globals()
    ):  # the stage (with its LoRA) is in the hyperparameters
        validator.validate(fresh, dm, ckpt_path=str(ckpt), verbose=False)
    for name, value in trained_b.items():
        assert torch.equal(dict(fresh.named_parameters())[name], value), name


# -- merging and export -------------------------------------------------------------------------------------------
def test_merged_model_gives_the_adapted_logits(batch):
    model = tiny_model(lora_stage(lora={"vision_tower": TOWER_LORA, "language_model": LM_LORA})).eval()
    plain = tiny_model(Stage("align", ["connector"])).eval()  # same seed: the same base weights
    with torch.no_grad():
        base = plain(batch)
        # fresh adapters (B = 0) change nothing
        torch.testing.assert_close(model(batch), base, rtol=0, atol=0)
        randomize_adapters(model)
        adapted = model(batch)
    assert (adapted - base).abs().max() > 1e-2  # the adapters matter
    assert merge_adapters(model) == 2 * 2 + 3  # q, v in 2 LLM layers; q, k, v in the tower's one block used
    assert not has_adapters(model) and not hasattr(model.language_model, "peft_config")
    assert set(model.state_dict()) == set(plain.state_dict())  # plain layers back, plain names
    assert not any(p.requires_grad for p in model.language_model.parameters())
    with torch.no_grad():
        torch.testing.assert_close(model(batch), adapted, rtol=1e-5, atol=1e-5)


def test_llava_export_after_a_lora_stage_gives_our_logits(tmp_path, shapes_root):
    from transformers import LlavaForConditionalGeneration

    from lit_mllm.training.export import export_llava, with_adapters_merged
    from tests.test_export import assert_same_logits, batch_of

    model = build(lora_stage(lora={"vision_tower": TOWER_LORA, "language_model": LM_LORA})).eval()
    scramble(model)
    randomize_adapters(model, scale=0.3)
    out = export_llava(model, tmp_path / "llava")
    assert has_adapters(model)  # the caller's model keeps its adapters; a merged copy was written
    llava = LlavaForConditionalGeneration.from_pretrained(out).eval()
    batch = batch_of(model, shapes_root)
    assert_same_logits(with_adapters_merged(model), llava, batch)  # the same weights: equal to float rounding
    merged = with_adapters_merged(model)
    with torch.no_grad():  # our adapted model: W x + B A x rounds differently from (W + B A) x
        adapted, merged = model(batch), merged(batch)
    mask = batch.attention_mask.bool()
    torch.testing.assert_close(merged[mask], adapted[mask], rtol=1e-4, atol=1e-4 * adapted.abs().max().item())


def test_safetensors_export_after_a_lora_stage_loads_without_adapters(tmp_path, batch):
    from lit_mllm.training.checkpoints import load_weights
    from lit_mllm.training.export import export_safetensors

    model = tiny_model(lora_stage()).eval()
    randomize_adapters(model)
    stage = {"name": "lora", "trainable": ["connector"], "lora": {"language_model": {"r": 4}}}
    config = {"model": {"class_path": "lit_mllm.lit.PrefixFusionVLM", "init_args": {"stage": stage}}}
    out = export_safetensors(model, config, tmp_path / "export")
    written = yaml.safe_load((out / "config.yaml").read_text())
    assert written["model"]["init_args"]["stage"]["lora"] == {}

    fresh = tiny_model(Stage("lora", ["connector"]))  # what the written config builds: no adapters
    report = load_weights(fresh, out / "model.safetensors")
    assert report.missing == []
    with torch.no_grad():
        torch.testing.assert_close(fresh.eval()(batch), model(batch), rtol=1e-5, atol=1e-5)


# -- YAML ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["lora", "pink"])
def test_shipped_lora_stages_build_from_yaml(name, tmp_path, shapes_root):
    from lit_mllm.commands.lightning import build_cli

    cli = build_cli(
        [
            "--config",
            str(CONFIGS / "quickstart.yaml"),
            "--model.init_args.stage",
            str(CONFIGS / "stage" / f"{name}.yaml"),
            "--data.init_args.root",
            str(shapes_root),
            "--trainer.logger.init_args.save_dir",
            str(tmp_path),
        ],
        run=False,
    )
    model = cli.model
    declared = yaml.safe_load((CONFIGS / "stage" / f"{name}.yaml").read_text())["lora"]
    assert set(model.stage.lora) == set(declared)
    for part, spec in model.stage.lora.items():
        assert isinstance(spec, LoRA) and spec.r == declared[part]["r"]
        assert spec.target_modules == declared[part]["target_modules"]
        assert has_adapters(model.parts()[part])
    connector = {f"connector.{n}" for n, _ in model.connector.named_parameters()}
    assert trainable_names(model) == connector | lora_names(model)


@pytest.mark.slow
def test_export_command_merges_a_lora_run(tmp_path, shapes_root):
    """`lit-mllm export` after a LoRA run: the run's config + checkpoint (connector and adapters only) give a LLaVA
    folder and a safetensors folder whose config builds a model without adapters, all with the run's logits."""
    from transformers import LlavaForConditionalGeneration

    from lit_mllm.commands.export import main as export_main
    from lit_mllm.commands.lightning import build_cli
    from tests.test_export import batch_of, lightning_checkpoint

    args = [
        "--config",
        str(CONFIGS / "quickstart.yaml"),
        "--model.init_args.stage",
        str(CONFIGS / "stage" / "lora.yaml"),
        "--data.init_args.root",
        str(shapes_root),
        "--data.init_args.num_workers",
        "0",
    ]
    cli = build_cli(args, run=False)
    model = cli.model.eval()
    # what the run trained; the frozen base comes from the config's sources (not in the checkpoint)
    randomize_adapters(model, scale=1.0)
    with torch.no_grad():
        for p in model.connector.parameters():
            p.mul_(3.0)
    lightning_checkpoint(model, tmp_path / "run.ckpt")
    assert set(torch.load(tmp_path / "run.ckpt", weights_only=True)["state_dict"]) == trainable_names(model)
    run_config = yaml.safe_load(cli.parser.dump(cli.config, skip_none=False))
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(run_config))
    batch = batch_of(model, shapes_root)
    with torch.no_grad():
        ours = model(batch)
    mask = batch.attention_mask.bool()
    assert ours.abs().max() > 0.5
    tol = dict(rtol=1e-4, atol=1e-4 * ours.abs().max().item())

    common = ["--config", str(tmp_path / "config.yaml"), "--ckpt_path", str(tmp_path / "run.ckpt")]
    llava = LlavaForConditionalGeneration.from_pretrained(
        export_main([*common, "--out", str(tmp_path / "llava")])
    )
    with torch.no_grad():
        theirs = llava.eval()(
            input_ids=batch.input_ids,
            pixel_values=normalize(batch.pixel_values, model.vision_tower.mean, model.vision_tower.std),
            attention_mask=batch.attention_mask,
        ).logits
    torch.testing.assert_close(theirs[mask], ours[mask], **tol)

    out = export_main([*common, "--out", str(tmp_path / "st"), "--format", "safetensors"])
    assert yaml.safe_load((out / "config.yaml").read_text())["model"]["init_args"]["stage"]["lora"] == {}
    rebuilt = build_cli(["--config", str(out / "config.yaml")], run=False).model.eval()
    assert not has_adapters(rebuilt)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(batch)[mask], ours[mask], **tol)


def test_exported_config_drops_every_stage_lora():
    from lit_mllm.training.export import drop_adapters_from_config

    lora = {"language_model": {"r": 4}}
    single = {"init_args": {"stage": {"name": "x", "trainable": ["connector"], "lora": dict(lora)}}}
    drop_adapters_from_config(single)
    assert single["init_args"]["stage"]["lora"] == {}
    milestones = [
        {"at_step": 0, "stage": {"name": "a"}},
        {"at_step": 5, "stage": {"name": "b", "lora": lora}},
    ]
    schedule = {
        "init_args": {
            "stage": {
                "class_path": "lit_mllm.training.stages.StageSchedule",
                "init_args": {"stages": milestones},
            }
        }
    }
    drop_adapters_from_config(schedule)
    assert [m["stage"].get("lora") for m in milestones] == [None, {}]
