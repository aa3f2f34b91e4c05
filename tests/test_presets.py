"""Model presets (configs/model/): every preset parses and instantiates stacked on the quickstart, as documented.

Tiny presets (configs/model/*.yaml) each take one optimiser step on a tiny ShapesWorld, and one goes through the
real ``lit-mllm fit`` command. Real presets (configs/model/real/*.yaml, same names) are built with their hub names
pointed at tiny local checkpoints of the same architecture families and the same patch geometry (HF CLIP at 224 and
336 px; open_clip ViTs at 224 and 378 px and a timm-Eva open_clip tower at 224 px, the EVA-CLIP-g family; Llama /
OPT / Qwen2 causal LMs), so image-token counts are the real ones and nothing is downloaded.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from lit_mllm.cli import run
from lit_mllm.commands.lightning import build_cli
from lit_mllm.lit import PrefixFusionVLM
from tests.stand_ins import with_stand_ins

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
    source = "shapesworld" if base == QUICKSTART else "llava_mix665k"  # the base config's training source
    if chat.get("class_path", "").endswith(".Plain"):  # single-round format: train on the caption files
        args += [f"--data.init_args.train.{source}.init_args.path", "captions_train.json"]
        if base == QUICKSTART:
            args += ["--data.init_args.val.shapesworld.init_args.path", "captions_val.json"]
    elif base != QUICKSTART:  # a real dataset's file names
        args += [f"--data.init_args.train.{source}.init_args.path", "train.json"]
    return args


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


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models run fastest on one thread; on a shared machine more threads only wait on each other."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def first_batch(cli) -> dict:
    assert cli.datamodule.processor is not None  # connected by the CLI
    cli.datamodule.setup("fit")
    return next(iter(cli.datamodule.train_dataloader()))[0]


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
