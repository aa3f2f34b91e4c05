"""Model presets (configs/model/): every preset parses and instantiates stacked on the quickstart, as documented.

Tiny presets (configs/model/*.yaml) each take one optimiser step on a tiny ShapesWorld, and one goes through the
real ``lit-mllm fit`` command. Real presets (configs/model/real/*.yaml, same names) are built with their hub names
pointed at tiny local checkpoints of the same architecture families and the same patch geometry (HF CLIP at 224 and
336 px; open_clip ViTs at 224 and 378 px and a timm-Eva open_clip tower at 224 px, the EVA-CLIP-g family; Llama /
OPT / Qwen2 causal LMs), so image-token counts are the real ones and nothing is downloaded.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from lit_mllm.cli import build_cli, run
from lit_mllm.lit import PrefixFusionVLM

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
QUICKSTART = CONFIGS / "quickstart.yaml"
LLAVA15_7B = CONFIGS / "llava15_7b.yaml"  # the real-data base the real presets' headers stack on
PRESETS = CONFIGS / "model"
TINY = sorted(PRESETS.glob("*.yaml"))
REAL = sorted((PRESETS / "real").glob("*.yaml"))

# Image tokens per image each preset promises in its header (tiny: 64 px towers; real: the published geometry).
TINY_TOKENS = {
    "llava": 64,
    "llava15": 64,
    "minigpt4": 32,
    "minigpt_v2": 64,
    "blip2": 32,
    "qwen_vl": 64,
    "mm1_avgpool": 144,
    "mm1_attnpool": 144,
    "mm1_cabstractor": 144,
    "points": 64,  # 256 features (64 px / 4 px patches), pixel shuffle 0.5 -> 64
    "prismatic": 64,
}
REAL_TOKENS = {
    "llava": 256,
    "llava15": 576,
    "minigpt4": 32,
    "minigpt_v2": 256,  # 448 px: 1024 EVA features / 4
    "blip2": 32,
    "qwen_vl": 256,
    "mm1_avgpool": 144,
    "mm1_attnpool": 144,
    "mm1_cabstractor": 144,
    "points": 144,  # 576 CLIP-L/336 features, pixel shuffle 0.5 -> 144
    "prismatic": 729,  # 378 px / 14 px patches: 27 x 27, concatenated channels keep the count
}

# Hub name in a real preset -> the tiny local checkpoint standing in for it (see ``tiny_hub``).
HF_STAND_INS = {
    "openai/clip-vit-large-patch14": "clip224",
    "openai/clip-vit-large-patch14-336": "clip336",
    "lmsys/vicuna-13b-v1.3": "llama",
    "lmsys/vicuna-7b-v1.5": "llama",
    "Vision-CAIR/vicuna-7b": "llama",
    "meta-llama/Llama-2-7b-chat-hf": "llama",
    "facebook/opt-2.7b": "opt",
    "Qwen/Qwen-7B": "qwen2",
    "Qwen/Qwen1.5-7B": "qwen2",
    "01-ai/Yi-1.5-9B-Chat": "llama",
    "meta-llama/Llama-2-7b-hf": "llama",
    "facebook/dinov2-large": "dinov2",
    "google/siglip-so400m-patch14-384": "siglip",
}
OPEN_CLIP_STAND_INS = {  # (model_name, pretrained) -> tiny open_clip folder, loaded as local-dir:
    ("ViT-bigG-14", "laion2b_s39b_b160k"): "openclip224",
    ("hf-hub:apple/DFN5B-CLIP-ViT-H-14-378", None): "openclip378",
    ("EVA01-g-14", "laion400m_s11b_b41k"): "openclip_eva224",
}
TINY_EVA = "lit_mllm_test_eva_patch14_224"  # a timm Eva trunk (EVA-CLIP-g's class), 3 blocks of width 32


def model_args(path: Path) -> dict:
    return yaml.safe_load(path.read_text())["model"]["init_args"]


def base_args(path: Path, data_root: Path, out: Path, base: Path = QUICKSTART) -> list[str]:
    """A stack (``base``, then the preset) on a temp ShapesWorld, small batches, no workers."""
    args = [
        "--config",
        str(base),
        "--config",
        str(path),
        "--data.init_args.root",
        str(data_root),
        "--data.init_args.num_workers",
        "0",
        "--data.init_args.batch_size",
        "2",
        "--trainer.logger.init_args.save_dir",
        str(out),
    ]
    chat = model_args(path)["language_model"]["init_args"].get("chat_format") or {}
    if chat.get("class_path", "").endswith(".Plain"):  # single-round format: train on the caption files
        args += ["--data.init_args.train", "captions_train.json", "--data.init_args.val", "captions_val.json"]
    elif base != QUICKSTART:  # a real dataset's file names
        args += ["--data.init_args.train", "train.json", "--data.init_args.val", "val.json"]
    return args


def with_stand_ins(path: Path, hub: Path, out: Path) -> Path:
    """A copy of a real preset with every hub name, at any depth (fused towers hold a list of towers), pointed at
    a tiny local checkpoint."""

    def swap(node):
        if isinstance(node, list):
            return [swap(n) for n in node]
        if not isinstance(node, dict):
            return node
        node = {k: swap(v) for k, v in node.items()}
        if "model_name" in node:  # open_clip
            key = (node["model_name"], node.get("pretrained"))
            assert key in OPEN_CLIP_STAND_INS, f"{path.name}: add a tiny stand-in for open_clip {key}"
            node.update(model_name=f"local-dir:{hub / OPEN_CLIP_STAND_INS[key]}", pretrained=None)
        for field in ("name_or_path", "tokenizer"):
            if node.get(field) is not None:
                assert node[field] in HF_STAND_INS, f"{path.name}: add a tiny stand-in for {node[field]}"
                node[field] = str(hub / HF_STAND_INS[node[field]])
        return node

    local = out / f"{path.stem}_stand_ins.yaml"
    local.write_text(yaml.safe_dump(swap(yaml.safe_load(path.read_text()))))
    return local


def tower_settings(tower) -> list[tuple[int, bool]]:
    """(feature_layer, keep_cls) of a tower, or of each tower of a fused one."""
    inner = getattr(tower, "towers", None)
    return (
        [(t.feature_layer, t.keep_cls) for t in inner]
        if inner is not None
        else [(tower.feature_layer, tower.keep_cls)]
    )


def preset_tower_settings(tower: dict) -> list[tuple[int, bool]]:
    inner = tower["init_args"].get("towers")
    towers = [t["init_args"] for t in inner] if inner else [tower["init_args"]]
    return [(t["feature_layer"], t["keep_cls"]) for t in towers]


def register_tiny_eva() -> None:
    """A tiny timm ``Eva`` (EVA-CLIP-g's trunk class: absolute positions, CLS token, no RoPE) open_clip can build."""
    import timm
    from timm.models import register_model
    from timm.models.eva import Eva

    if timm.is_model(TINY_EVA):
        return

    def tiny_eva(pretrained: bool = False, **kwargs) -> Eva:
        kwargs = {k: v for k, v in kwargs.items() if not k.startswith(("pretrained_cfg", "cache_dir"))}
        arch = dict(img_size=224, patch_size=14, embed_dim=32, depth=3, num_heads=2, mlp_ratio=6144 / 1408)
        return Eva(**{**arch, **kwargs})

    tiny_eva.__name__ = TINY_EVA
    register_model(tiny_eva)


def save_open_clip(folder: Path, vision_cfg: dict) -> None:
    import open_clip

    cfg = {
        "embed_dim": 16,
        "vision_cfg": vision_cfg,
        "text_cfg": {"context_length": 8, "vocab_size": 64, "width": 16, "heads": 2, "layers": 1},
    }
    folder.mkdir()
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": cfg, "preprocess_cfg": {}}))
    torch.save(open_clip.model.CLIP(**cfg).state_dict(), folder / "open_clip_pytorch_model.bin")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models run fastest on one thread; on a shared machine more threads only wait on each other."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny_hub(tmp_path_factory):
    """Tiny checkpoints saved like hub ones: HF CLIP towers (224/336 px, 14 px patches), open_clip towers (ViT at
    224 and 378 px, timm Eva at 224 px, 14 px patches) and Llama / OPT / Qwen2 causal LMs with the tiny tokenizer."""
    from transformers import (
        AutoTokenizer,
        CLIPVisionConfig,
        CLIPVisionModel,
        Dinov2Config,
        Dinov2Model,
        LlamaConfig,
        LlamaForCausalLM,
        OPTConfig,
        OPTForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
        SiglipVisionConfig,
        SiglipVisionModel,
    )

    from lit_mllm.nn.language.tokenizer import TINY_TOKENIZER_DIR

    root = tmp_path_factory.mktemp("hub")
    torch.manual_seed(0)
    vision = dict(
        patch_size=14, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2
    )
    for size in (224, 336):
        CLIPVisionModel(CLIPVisionConfig(image_size=size, **vision)).save_pretrained(root / f"clip{size}")
    # DINOv2 (trained at 518 px) and SigLIP (384 px) stand-ins; the Prismatic preset resamples both to 378 px
    Dinov2Model(Dinov2Config(image_size=518, **vision)).save_pretrained(root / "dinov2")
    SiglipVisionModel(SiglipVisionConfig(image_size=384, **vision)).save_pretrained(root / "siglip")

    tok = AutoTokenizer.from_pretrained(TINY_TOKENIZER_DIR)
    ids = dict(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    lm = dict(vocab_size=len(tok), hidden_size=32, num_hidden_layers=1, num_attention_heads=2, **ids)
    llms = {
        "llama": LlamaForCausalLM(LlamaConfig(intermediate_size=64, num_key_value_heads=2, **lm)),
        "qwen2": Qwen2ForCausalLM(Qwen2Config(intermediate_size=64, num_key_value_heads=2, **lm)),
        "opt": OPTForCausalLM(OPTConfig(ffn_dim=64, word_embed_proj_dim=32, **lm)),
    }
    for name, model in llms.items():
        model.save_pretrained(root / name)
        tok.save_pretrained(root / name)

    for size in (224, 378):
        vit = {"image_size": size, "layers": 2, "width": 32, "head_width": 16, "patch_size": 14}
        save_open_clip(root / f"openclip{size}", vit)
    register_tiny_eva()
    eva = {
        "image_size": 224,
        "timm_model_name": TINY_EVA,
        "timm_model_pretrained": False,
        "timm_pool": "token",
    }
    save_open_clip(root / "openclip_eva224", {**eva, "timm_proj": None})
    return root


def first_batch(cli) -> dict:
    assert cli.datamodule.processor is not None  # connected by the CLI
    cli.datamodule.setup("fit")
    return next(iter(cli.datamodule.train_dataloader()))


# -- the files themselves ----------------------------------------------------------------------------------------


def test_every_tiny_preset_has_a_real_twin_and_a_header():
    assert [p.name for p in TINY] == [p.name for p in REAL]
    assert set(TINY_TOKENS) == {p.stem for p in TINY}
    for path in TINY + REAL:
        text = path.read_text()
        assert text.startswith("# "), f"{path.name} opens with a comment"
        command = f"--config configs/model/{path.relative_to(PRESETS).as_posix()}"
        assert "lit-mllm fit --config configs/" in text and command in text, f"{path} shows its command"
        assert set(yaml.safe_load(text)) == {"model"}, f"{path.name} is a model section only"


# -- tiny presets: one training step each, and the real command for one ------------------------------------------


@pytest.mark.parametrize("path", TINY, ids=lambda p: p.stem)
def test_tiny_preset_takes_a_training_step(path, shapes_root, tmp_path):
    cli = build_cli(base_args(path, shapes_root, tmp_path), run=False)
    model = cli.model
    assert isinstance(model, PrefixFusionVLM)
    assert model.tokens_per_image == TINY_TOKENS[path.stem]
    batch = first_batch(cli)

    trainable = [p for p in model.parameters() if p.requires_grad]
    before = [p.detach().clone() for p in trainable]
    optimizer = model.optimizer(trainable)
    loss = model.training_step(batch, 0)
    assert loss.isfinite()
    loss.backward()
    assert all(p.grad is None or p.grad.isfinite().all() for p in trainable)
    for name in model.stage.trainable:  # every trainable part receives gradient
        part = model.parts()[name]
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in part.parameters()), name
    optimizer.step()
    assert any(not torch.equal(a, p.detach()) for a, p in zip(before, trainable))


def test_tiny_preset_through_the_fit_command(shapes_root, tmp_path):
    """The command every header documents, end to end (fast_dev_run), for the preset with a different LLM family."""
    cli = run(
        ["fit", *base_args(PRESETS / "qwen_vl.yaml", shapes_root, tmp_path), "--trainer.fast_dev_run", "1"]
    )
    assert type(cli.model.connector).__name__ == "QwenVLResampler"
    assert type(cli.model.language_model).__name__ == "TinyQwen2"
    assert cli.trainer.state.finished


# -- real presets: hub names -> tiny local checkpoints of the same families ------------------------------------------


@pytest.mark.parametrize("path", REAL, ids=lambda p: p.stem)
def test_real_preset_instantiates_with_local_checkpoints(path, tiny_hub, shapes_root, tmp_path):
    args = [
        *base_args(with_stand_ins(path, tiny_hub, tmp_path), shapes_root, tmp_path),
        "--trainer.precision",
        "32-true",
    ]
    cli = build_cli(args, run=False)
    model = cli.model
    preset = model_args(path)
    assert model.tokens_per_image == REAL_TOKENS[path.stem]
    for part in ("vision_tower", "language_model", "connector"):
        assert type(getattr(model, part)).__name__ == preset[part]["class_path"].rsplit(".", 1)[1], part
    assert tower_settings(model.vision_tower) == preset_tower_settings(preset["vision_tower"])
    assert model.stage.trainable == preset["stage"]["trainable"]
    assert model.training_step(first_batch(cli), 0).isfinite()


@pytest.mark.parametrize("path", REAL, ids=lambda p: p.stem)
def test_real_preset_stacks_on_the_real_base(path, tiny_hub, shapes_root, tmp_path):
    """The command the real headers document: the preset over configs/llava15_7b.yaml (GPU trainer, bf16 LLM)."""
    args = [
        *base_args(with_stand_ins(path, tiny_hub, tmp_path), shapes_root, tmp_path, base=LLAVA15_7B),
        "--trainer.accelerator",
        "cpu",
        "--trainer.devices",
        "1",
        "--trainer.precision",
        "32-true",
    ]
    cli = build_cli(args, run=False)
    preset = model_args(path)
    for part in ("vision_tower", "language_model", "connector"):
        assert type(getattr(cli.model, part)).__name__ == preset[part]["class_path"].rsplit(".", 1)[1], part
    assert cli.model.tokens_per_image == REAL_TOKENS[path.stem]
    assert cli.model.stage.trainable == preset["stage"]["trainable"]
