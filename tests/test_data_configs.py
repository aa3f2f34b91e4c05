"""Shipped data configs (configs/data/*.yaml, used as `--data FILE`): each is parsed on top of the quickstart and
takes a training step; the ShapesWorld mixture of all five source kinds trains with a curve per source."""

from pathlib import Path

import lightning as L
import pytest

from lit_mllm.commands.lightning import build_cli
from lit_mllm.config_stack import stack_configs
from lit_mllm.data import ShapesWorld
from tests.conftest import cli_args

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
QUICKSTART = str(CONFIGS / "quickstart.yaml")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A small ShapesWorld with every format."""
    root = tmp_path_factory.mktemp("mix") / "sw"
    ShapesWorld(image_size=32, num_train=40, num_val=8, num_test=8, min_object_px=4, shard_size=16).write(
        root
    )
    return root


def small(root) -> list[str]:
    return [
        *cli_args(root, batch_size=10),
        "--model.init_args.vision_tower.init_args.image_size", "32",
        "--trainer.max_steps", "4",
        "--trainer.log_every_n_steps", "2",
        "--trainer.limit_val_batches", "1",
        "--trainer.enable_checkpointing", "false",
    ]  # fmt: skip


class Seen(L.Callback):
    def __init__(self) -> None:
        self.keys: set[str] = set()

    def on_train_batch_end(self, trainer, *args) -> None:
        self.keys |= set(trainer.callback_metrics)


def test_shapesworld_mixture_of_five_kinds_trains_with_per_source_curves(world, tmp_path):
    args = [
        "--config",
        QUICKSTART,
        "--data",
        str(CONFIGS / "data" / "shapesworld_mixture.yaml"),
        *small(world),
    ]
    args += ["--trainer.logger.init_args.save_dir", str(tmp_path), "--trainer.log_every_n_steps", "2"]
    cli = build_cli(args, run=False)
    assert set(cli.datamodule.splits["fit"]) == {"instruct", "captions", "interleaved", "text", "grounding"}
    seen = Seen()
    cli.trainer.callbacks.append(seen)
    cli.trainer.fit(cli.model, cli.datamodule)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(cli.trainer.logger.log_dir)
    events.Reload()
    logged = set(events.Tags()["scalars"])  # the DataModule writes its data/ figures to the logger itself
    for source in ("instruct", "captions", "interleaved", "text", "grounding"):
        assert f"train/loss/{source}" in seen.keys and f"train/loss/{source}" in logged
        assert f"data/ratio/{source}" in logged
    assert "data/skipped/too_long" in logged


def test_mm1_mixture_parses_and_packs(world):
    to_shapesworld = {
        "interleaved": ["interleaved_train.jsonl", "."],
        "captions": ["captions_train", None],
        "text": ["text_train.jsonl", None],
    }
    args = ["--config", QUICKSTART, "--data", str(CONFIGS / "data" / "mm1_mixture.yaml"), *small(world)]
    for name, (path, images) in to_shapesworld.items():
        args += [f"--data.init_args.train.{name}.init_args.path", path]
        if images:
            args += [f"--data.init_args.train.{name}.init_args.image_folder", images]
    args += ["--data.init_args.max_length", "512", "--data.init_args.pack_length", "512"]
    cli = build_cli(args, run=False)
    weights = {n: s.weight for n, s in cli.datamodule.splits["fit"].items()}
    assert weights == {"interleaved": 45, "captions": 45, "text": 10}
    cli.datamodule.setup("fit")
    batch, _ = next(iter(cli.datamodule.train_dataloader()))
    assert batch.attention_mask is None and batch.position_ids is not None  # packed
    assert len(batch.ids) == 10 and batch.input_ids.shape[0] < 10
    assert cli.model.training_step(batch, 0).isfinite()


def test_data_file_replaces_the_run_configs_data(world, tmp_path):
    """The quickstart's test source and generator do not leak into a --data file's config; each dropped option is
    printed, naming the file that set it. A --data YAML string still merges."""
    mine = tmp_path / "mine.yaml"
    mine.write_text(
        f"""
class_path: lit_mllm.data.MixtureData
init_args:
  root: {world}
  train:
    mine: {{class_path: lit_mllm.data.Conversations, init_args: {{path: train.json}}}}
  batch_size: 5
"""
    )
    args = ["--config", QUICKSTART, "--data", str(mine), "--data.init_args.num_workers", "0"]
    lines = []
    stacked = stack_configs(args, log=lines.append)
    assert stacked == ["--config", QUICKSTART, "--config", "{data: null}", *args[2:]]
    assert sorted(line.split(": dropped ")[1].split("=")[0] for line in lines) == [
        "generate_if_missing",
        "test",
        "train.shapesworld",
        "val",
    ]  # batch_size is set by the file, num_workers=2 is the default
    assert all(
        line.startswith(f"{mine} replaces data: ") and line.endswith(f"set by {QUICKSTART}") for line in lines
    )

    dm = build_cli(args, run=False).datamodule
    assert {split: list(sources) for split, sources in dm.splits.items()} == {
        "fit": ["mine"],
        "validate": [],
        "test": [],
        "predict": [],
    }
    assert dm.generator is None and dm.batch_size == 5 and dm.num_workers == 0 and dm.root == world

    merged = build_cli(
        ["--config", QUICKSTART, "--data", "{init_args: {batch_size: 5}}"], run=False
    ).datamodule
    assert merged.batch_size == 5 and list(merged.splits["test"]) == ["shapesworld"]
