"""Every shipped config is parsed and instantiated; real-weight configs are instantiated with their hub
names pointed at tiny checkpoints saved in a temp dir (same architectures, nothing downloaded)."""

import json
from pathlib import Path

import pytest
import yaml

from lit_mllm.commands.lightning import build_cli
from lit_mllm.lit import PrefixFusionVLM
from tests.stand_ins import with_stand_ins

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
TOP_LEVEL = sorted(p for p in CONFIGS.glob("*.yaml"))
OVERLAYS = {"align_shapesworld.yaml": ["quickstart.yaml"]}  # configs meant to be stacked on a base
STAGES = sorted((CONFIGS / "stage").glob("*.yaml"))


def overrides(path: Path, data_root: Path, out: Path) -> list[str]:
    """Command-line overrides: data -> a temp ShapesWorld, CPU trainer."""
    args = [
        "--data.init_args.root",
        str(data_root),
        "--data.init_args.num_workers",
        "0",
        "--data.init_args.batch_size",
        "4",
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
    train = config["data"]["init_args"].get("train") or {}
    missing = {
        name: {"init_args": {"path": "train.json"}}  # a real dataset's files -> ShapesWorld's
        for name, source in train.items()
        if not (data_root / source["init_args"]["path"]).exists()
    }
    if missing:
        args += ["--data.init_args.train", json.dumps(missing)]
    return args


@pytest.mark.parametrize("path", TOP_LEVEL, ids=lambda p: p.name)
def test_config_parses_and_instantiates(path, tiny_hub, shapes_root, tmp_path):
    """Hub names point at tiny stand-ins of the same families (tests/stand_ins.py)."""
    stack = [a for base in OVERLAYS.get(path.name, []) for a in ("--config", str(CONFIGS / base))]
    local = with_stand_ins(path, tiny_hub, tmp_path)
    cli = build_cli([*stack, "--config", str(local), *overrides(path, shapes_root, tmp_path)], run=False)
    assert isinstance(cli.model, PrefixFusionVLM)
    assert cli.datamodule.processor is not None  # connected by the CLI
    cli.datamodule.setup("fit")
    batch, _ = next(iter(cli.datamodule.train_dataloader()))
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
    assert cli.datamodule.splits["fit"]["shapesworld"].path == "captions_train.json"


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
    untrained = set(cli.model.parts()) - set(
        cli.model.stage.trainable
    )  # frozen, or trained through LoRA only
    assert untrained
    for name in untrained:
        for param_name, p in cli.model.parts()[name].named_parameters():
            assert p.requires_grad == (".lora_" in param_name), (name, param_name)
