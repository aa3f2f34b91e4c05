"""Every shipped config is parsed and instantiated; real-weight configs are instantiated with their hub
names pointed at tiny checkpoints saved in a temp dir (same architectures, nothing downloaded). Stacked --config
files (lit_mllm/config_stack.py): a later file that changes a part's class starts it from the class's defaults."""

import inspect
import json
from pathlib import Path

import pytest
import torch
import yaml

from lit_mllm.commands.lightning import build_cli
from lit_mllm.config_stack import stack_configs
from lit_mllm.lit import CLIPPretraining, PrefixFusionVLM
from lit_mllm.nn.connectors import CAbstractor
from tests.conftest import cli_args
from tests.stand_ins import with_stand_ins

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
TOP_LEVEL = sorted(p for p in CONFIGS.glob("*.yaml"))
OVERLAYS = {"align_shapesworld.yaml": ["quickstart.yaml"]}  # configs meant to be stacked on a base
STAGES = sorted((CONFIGS / "stage").glob("*.yaml"))
CLIP = sorted((CONFIGS / "clip").glob("*.yaml"))  # CLIP pretraining of towers: tiny.yaml and diffs over it


def overrides(path: Path, data_root: Path, out: Path) -> list[str]:
    """Command-line overrides: data -> a temp ShapesWorld, CPU trainer."""
    args = cli_args(data_root, out, cpu=True)
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


@pytest.mark.parametrize("path", CLIP, ids=lambda p: p.name)
def test_clip_config_fast_dev_runs(path, shapes_root, tmp_path):
    """configs/clip/tiny.yaml, and each variant stacked on it as its header says, pretrains a tower for a step and
    validates through ``lit-mllm fit``."""
    base = CONFIGS / "clip" / "tiny.yaml"
    stack = [] if path == base else ["--config", str(base)]
    command = "lit-mllm fit --config configs/clip/tiny.yaml" + (
        "" if path == base else f" --config {path.relative_to(CONFIGS.parent)}"
    )
    assert command in path.read_text(), f"{path.name}'s header gives the command that runs it"
    args = [*stack, "--config", str(path), *cli_args(shapes_root, tmp_path, cpu=True)]
    args += [
        "--trainer.fast_dev_run",
        "1",
        "--trainer.default_root_dir",
        str(tmp_path),
    ]  # last.ckpt goes there
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model on a shared machine: more threads only wait on each other
    try:
        cli = build_cli(["fit", *args])
    finally:
        torch.set_num_threads(threads)
    assert isinstance(cli.model, CLIPPretraining)
    metrics = cli.trainer.callback_metrics
    assert metrics["train/loss"].isfinite() and 0 <= metrics["val/image_to_text"] <= 1


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


# -- stacked --config files: a later file that changes a part's class starts it from that class's defaults ----------


def stacked(args: list[str]) -> tuple[list[str], list[str]]:
    lines: list[str] = []
    return stack_configs(args, log=lines.append), lines


def test_a_preset_that_changes_a_class_drops_the_earlier_option_the_new_class_also_accepts(
    shapes_root, tmp_path, monkeypatch, capsys
):
    """prefix.yaml sets MLPConnector depth=2; a preset naming CAbstractor without depth must get CAbstractor's own
    default (3), not the MLP's 2 (what jsonargparse alone gives: it keeps init_args the new class accepts)."""
    preset = tmp_path / "cabstractor.yaml"
    preset.write_text(
        "model:\n  init_args:\n    connector:\n"
        "      class_path: lit_mllm.nn.connectors.CAbstractor\n      init_args: {out_tokens: 16}\n"
    )
    base = str(CONFIGS / "model" / "prefix.yaml")
    files = ["--config", str(CONFIGS / "quickstart.yaml"), "--config", base, "--config", str(preset)]
    small = ["--data.init_args.root", str(shapes_root), "--trainer.logger.init_args.save_dir", str(tmp_path)]

    with monkeypatch.context() as m:  # jsonargparse alone
        m.setattr("lit_mllm.commands.lightning.stack_configs", lambda args, log: list(args))
        unstacked = build_cli([*files, *small], run=False)
    assert len(unstacked.model.connector.before) == 2  # the stale value, without stacking

    args, lines = stacked([*files, *small])
    cli = build_cli([*files, *small], run=False)  # the CLI stacks its --config files itself
    default = inspect.signature(CAbstractor).parameters["depth"].default
    assert default == 3
    assert len(cli.model.connector.before) == default  # residual blocks: the stale 2 is dropped
    assert cli.model.tokens_per_image == 16  # the preset's own option is kept
    assert lines == [
        f"{preset} changes model.init_args.connector to CAbstractor: dropped depth=2 set by {base} "
        "(now CAbstractor's default, 3)"
    ]
    added = {i for i, a in enumerate(args) if a.startswith("{")}  # the YAML strings and their --config flags
    kept = [a for i, a in enumerate(args) if i not in added and i + 1 not in added]
    assert kept == [*files, *small]  # nothing given is removed or moved


def test_stack_configs_resets_parts_at_any_depth(tmp_path):
    """A class change nulls the part before the file (tower, logger, list items, dict entries); a class other than
    the option's default class gets the options the default class would leak pinned after the file."""
    earlier = tmp_path / "earlier.yaml"
    earlier.write_text(
        yaml.safe_dump(
            {
                "trainer": {
                    "logger": {
                        "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                        "init_args": {"save_dir": "runs", "name": "quickstart"},
                    }
                },
                "model": {
                    "class_path": "lit_mllm.lit.PrefixFusionVLM",
                    "init_args": {
                        "vision_tower": {
                            "class_path": "lit_mllm.nn.vision.FusedTowers",
                            "init_args": {
                                "towers": [
                                    {
                                        "class_path": "lit_mllm.nn.vision.TinyCLIPVision",
                                        "init_args": {"image_size": 32},
                                    }
                                ]
                            },
                        }
                    },
                },
                "data": {
                    "class_path": "lit_mllm.data.MixtureData",
                    "init_args": {
                        "train": {
                            "a": {
                                "class_path": "lit_mllm.data.Conversations",
                                "init_args": {"path": "a.json"},
                            }
                        }
                    },
                },
            }
        )
    )
    later = tmp_path / "later.yaml"
    later.write_text(
        yaml.safe_dump(
            {
                "trainer": {
                    "logger": {
                        "class_path": "lightning.pytorch.loggers.CSVLogger",
                        "init_args": {"save_dir": "x"},
                    }
                },
                "model": {
                    "init_args": {
                        "vision_tower": {
                            "init_args": {
                                "towers": [
                                    {
                                        "class_path": "lit_mllm.nn.vision.HFVisionTower",
                                        "init_args": {"name_or_path": "h"},
                                    }
                                ]
                            }
                        },
                        "optimizer": {"class_path": "torch.optim.SGD", "init_args": {"lr": 0.1}},
                    }
                },
                "data": {
                    "init_args": {
                        "train": {
                            "a": {"class_path": "lit_mllm.data.Captions", "init_args": {"path": "c.json"}}
                        }
                    }
                },
            }
        )
    )
    args, lines = stacked(
        ["fit", "--config", str(earlier), "--config=" + str(later), "--trainer.max_steps", "3"]
    )
    assert args[:3] == ["fit", "--config", str(earlier)] and args[-2:] == ["--trainer.max_steps", "3"]
    before, after = yaml.safe_load(args[4]), yaml.safe_load(args[7])
    assert args[5] == "--config=" + str(later)
    assert before == {
        "trainer": {"logger": None},
        "model": {"init_args": {"vision_tower": {"init_args": {"towers": None}}}},
        "data": {"init_args": {"train": None}},
    }
    assert after == {
        "model": {"init_args": {"optimizer": {"init_args": {"weight_decay": 0}}}}
    }  # AdamW's 0.01
    assert (
        f"{later} changes trainer.logger to CSVLogger: dropped name='quickstart' set by {earlier} "
        in "\n".join(lines)
    )
    assert any("towers[0] to HFVisionTower: dropped image_size=32" in line for line in lines)
    assert any(
        "sets model.init_args.optimizer to SGD: dropped weight_decay=0.01, AdamW's default" in line
        for line in lines
    )


def test_stack_configs_leaves_same_class_overlays_and_flags_alone():
    """align_shapesworld.yaml only changes options of the quickstart's parts: nothing is added."""
    args = [
        "--config",
        str(CONFIGS / "quickstart.yaml"),
        "--config",
        str(CONFIGS / "align_shapesworld.yaml"),
        "--model.init_args.connector",
        "lit_mllm.nn.connectors.LinearConnector",
    ]
    assert stacked(args) == (args, [])


def test_stack_configs_refuses_to_drop_an_option_the_new_class_requires(tmp_path):
    """A data source switched to another format without its path: Captions has no default path, so the earlier
    file's path cannot silently carry over; the message says where to set it."""
    earlier, later = tmp_path / "a.yaml", tmp_path / "b.yaml"
    source = "data:\n  init_args:\n    train:\n      s: {{class_path: lit_mllm.data.{}}}\n"
    earlier.write_text(source.format("Conversations, init_args: {path: a.json}"))
    later.write_text(source.format("Captions"))
    with pytest.raises(ValueError, match=r"Captions, which has no default for path: .*set path in .*b\.yaml"):
        stacked(["--config", str(earlier), "--config", str(later)])


def test_relative_references_inside_a_config_resolve_from_its_folder(shapes_root, tmp_path, monkeypatch):
    """No shipped config includes another file, but a part may be given as a path relative to the config that names
    it: the argument stays a path (jsonargparse resolves it from the file's folder, whatever the working folder),
    and the class it names is still seen (a class change starts from the class's defaults)."""
    folder = tmp_path / "presets" / "sub"
    folder.mkdir(parents=True)
    (folder / "connector.yaml").write_text(
        "class_path: lit_mllm.nn.connectors.CAbstractor\ninit_args: {out_tokens: 16}\n"
    )
    (folder / "stage.yaml").write_text("name: align\ntrainable: [connector]\n")
    (folder / "preset.yaml").write_text(
        "model:\n  init_args:\n    connector: connector.yaml\n    stage: stage.yaml\n"
    )
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    preset = str(Path("..") / "presets" / "sub" / "preset.yaml")
    args, lines = stacked(
        [
            "--config",
            str(CONFIGS / "quickstart.yaml"),
            "--config",
            preset,
            "--data.init_args.root",
            str(shapes_root),
            "--trainer.logger.init_args.save_dir",
            str(tmp_path),
        ]
    )
    assert preset in args
    assert lines == [
        f"{preset} sets model.init_args.connector to CAbstractor: dropped depth=2, MLPConnector's "
        "default (now CAbstractor's default, 3)"
    ]
    cli = build_cli(args, run=False)
    assert type(cli.model.connector).__name__ == "CAbstractor"
    assert cli.model.tokens_per_image == 16 and len(cli.model.connector.before) == 3
    assert cli.model.stage.name == "align" and cli.model.stage.trainable == ["connector"]
