"""Every shipped config is parsed and instantiated; real-weight configs are instantiated with their hub
names pointed at tiny checkpoints saved in a temp dir (same architectures, nothing downloaded)."""

from pathlib import Path

import pytest
import torch
import yaml

from lit_mllm.cli import build_cli
from lit_mllm.lit import PrefixFusionVLM
from tests.conftest import tiny_clip_vision_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
TOP_LEVEL = sorted(p for p in CONFIGS.glob("*.yaml"))
OVERLAYS = {"align_shapesworld.yaml": ["quickstart.yaml"]}  # configs meant to be stacked on a base
STAGES = sorted((CONFIGS / "stage").glob("*.yaml"))


@pytest.fixture(scope="module")
def tiny_checkpoints(tmp_path_factory):
    """A tiny CLIP vision tower and a tiny Llama with a tokenizer, saved like hub checkpoints."""
    from transformers import AutoTokenizer, CLIPVisionModel, LlamaConfig, LlamaForCausalLM

    from lit_mllm.nn.language.tokenizer import TINY_TOKENIZER_DIR

    root = tmp_path_factory.mktemp("ckpt")
    torch.manual_seed(0)
    CLIPVisionModel(tiny_clip_vision_config()).save_pretrained(root / "clip")
    tok = AutoTokenizer.from_pretrained(TINY_TOKENIZER_DIR)
    LlamaForCausalLM(
        LlamaConfig(
            vocab_size=len(tok),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=2,
        )
    ).save_pretrained(root / "llama")
    tok.save_pretrained(root / "llama")
    return root


def overrides(path: Path, ckpt: Path, data_root: Path, out: Path) -> list[str]:
    """Command-line overrides: hub names -> tiny local checkpoints, data -> a temp ShapesWorld, CPU trainer."""
    args = [
        "--data.init_args.root",
        str(data_root),
        "--data.init_args.num_workers",
        "0",
        "--trainer.accelerator",
        "cpu",
        "--trainer.devices",
        "1",
        "--trainer.precision",
        "32-true",
        "--trainer.logger.init_args.save_dir",
        str(out),
    ]
    config = yaml.safe_load(path.read_text())
    if not (data_root / config["data"]["init_args"].get("train", "train.json")).is_file():
        args += ["--data.init_args.train", "train.json"]  # a real dataset's file name
    model = config["model"]["init_args"]
    for key, local in (("vision_tower", "clip"), ("language_model", "llama")):
        if "name_or_path" in model.get(key, {}).get("init_args", {}):
            args += [f"--model.init_args.{key}.init_args.name_or_path", str(ckpt / local)]
    return args


@pytest.mark.parametrize("path", TOP_LEVEL, ids=lambda p: p.name)
def test_config_parses_and_instantiates(path, tiny_checkpoints, shapes_root, tmp_path):
    stack = [a for base in OVERLAYS.get(path.name, []) for a in ("--config", str(CONFIGS / base))]
    cli = build_cli(
        [*stack, "--config", str(path), *overrides(path, tiny_checkpoints, shapes_root, tmp_path)], run=False
    )
    assert isinstance(cli.model, PrefixFusionVLM)
    assert cli.datamodule.processor is not None  # connected by the CLI
    cli.datamodule.setup("fit")
    batch = next(iter(cli.datamodule.train_dataloader()))
    assert cli.model.training_step(batch, 0).isfinite()


def test_overlay_stacks_on_its_base(shapes_root, tmp_path):
    """The documented command line: two --config files, the second overriding the first."""
    cli = build_cli(
        [
            "--config",
            str(CONFIGS / "quickstart.yaml"),
            "--config",
            str(CONFIGS / "align_shapesworld.yaml"),
            "--data.init_args.root",
            str(shapes_root),
            "--data.init_args.num_workers",
            "0",
            "--trainer.logger.init_args.save_dir",
            str(tmp_path),
        ],
        run=False,
    )
    assert cli.model.stage.trainable == ["connector"]
    assert type(cli.model.language_model.chat_format).__name__ == "Plain"
    assert cli.datamodule.files["fit"] == "captions_train.json"


@pytest.mark.parametrize("path", STAGES, ids=lambda p: p.name)
def test_stage_files_plug_into_the_quickstart(path, shapes_root, tmp_path):
    cli = build_cli(
        [
            "--config",
            str(CONFIGS / "quickstart.yaml"),
            "--model.init_args.stage",
            str(path),
            "--data.init_args.root",
            str(shapes_root),
            "--trainer.logger.init_args.save_dir",
            str(tmp_path),
        ],
        run=False,
    )
    assert cli.model.stage.name == path.stem
    frozen = set(cli.model.parts()) - set(cli.model.stage.trainable)
    assert frozen and all(not p.requires_grad for n in frozen for p in cli.model.parts()[n].parameters())
