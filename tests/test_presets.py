"""Model presets (configs/model/): a base per family and each paper as a diff over it, every one run the way its
header documents.

The prefix family's bases are ``configs/model/prefix.yaml`` (tiny; the quickstart's own model) and
``configs/model/real/prefix.yaml`` (LLaVA-1.5-7B; the model of ``configs/llava15_7b.yaml``). Each preset's header
shows its command; the ``--config`` files of that command are the stack the tests build (through
``stack_configs``, as the CLI does). Tiny presets each take one optimiser step on a tiny ShapesWorld, and one goes
through the real ``lit-mllm fit`` command. Real presets are built with their hub names pointed at tiny local
checkpoints of the same architecture families and the same patch geometry (HF CLIP at 224 and 336 px; open_clip
ViTs at 224 and 378 px and a timm-Eva open_clip tower at 224 px, the EVA-CLIP-g family; Llama / OPT / Qwen2 causal
LMs), so image-token counts are the real ones and nothing is downloaded: once on the real base they name, and once
on the quickstart after the real base (a stack that changes every part's class).
"""

from __future__ import annotations

import copy
import importlib
import inspect
import shlex
from pathlib import Path

import pytest
import torch
import yaml

from lit_mllm.cli import run
from lit_mllm.commands.lightning import LitMLLMCLI, build_cli
from lit_mllm.config_stack import stack_configs
from lit_mllm.lit import QFormerPretraining, VLMModule
from lit_mllm.training.stages import resolve
from tests.conftest import cli_args
from tests.stand_ins import with_stand_ins

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
QUICKSTART = CONFIGS / "quickstart.yaml"
LLAVA15_7B = CONFIGS / "llava15_7b.yaml"  # the real-data base the real presets' headers stack on
PRESETS = CONFIGS / "model"
TINY = sorted(PRESETS.glob("*.yaml"))
REAL = sorted((PRESETS / "real").glob("*.yaml"))
TINY_BASE, REAL_BASE = PRESETS / "prefix.yaml", PRESETS / "real" / "prefix.yaml"
PARTS = ("vision_tower", "language_model", "connector")
FAMILIES = (VLMModule, QFormerPretraining)  # QFormerPretraining (BLIP-2 stage 1) has no LLM and no connector


def parts_of(model: dict) -> list[str]:
    """The PARTS a preset's model has (BLIP-2 stage 1: the tower only; its Q-Former is its own)."""
    return [p for p in PARTS if p in model["init_args"]]


# Image tokens per image each preset promises in its header (tiny: 64 px towers; real: the published geometry).
TINY_TOKENS = {
    "prefix": 64,  # LLaVA-1.5
    "llava": 64,
    "minigpt4": 32,
    "minigpt_v2": 64,
    "blip2": 32,
    "qwen_vl": 64,
    "mm1_avgpool": 144,
    "mm1_attnpool": 144,
    "mm1_cabstractor": 144,
    "points": 64,  # 256 features (64 px / 4 px patches), pixel shuffle 0.5 -> 64
    "prismatic": 64,
    "cogvlm": 64,
    "flamingo": 1,  # one <image> marker per image; its 16 visual tokens reach the LLM through cross-attention
    "owl3": 1,  # one <image> marker per image; its 64 visual tokens reach the LLM through hyper-attention
    "blip2_stage1": 32,  # no LLM: the Q-Former's query outputs per image (what stage 2 hands the LLM)
}
REAL_TOKENS = {
    "prefix": 576,  # LLaVA-1.5-7B: CLIP-L/336
    "llava": 256,
    "minigpt4": 32,
    "minigpt_v2": 256,  # 448 px: 1024 EVA features / 4
    "blip2": 32,
    "qwen_vl": 256,
    "mm1_avgpool": 144,
    "mm1_attnpool": 144,
    "mm1_cabstractor": 144,
    "points": 144,  # 576 CLIP-L/336 features, pixel shuffle 0.5 -> 144
    "prismatic": 729,  # 378 px / 14 px patches: 27 x 27, concatenated channels keep the count
    "cogvlm": 1225,  # CogVLM-17B: EVA2-CLIP-E at 490 px / 14 px patches: 35 x 35
    "flamingo": 1,  # OpenFlamingo-9B: a marker per image, 64 latents through cross-attention
    "owl3": 1,  # mPLUG-Owl3-7B: a marker per image, 729 SigLIP features through hyper-attention
    "blip2_stage1": 32,
}


# -- reading the files ----------------------------------------------------------------------------------------------


def header(path: Path) -> str:
    lines = []
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        lines.append(line.lstrip("#").strip())
    return "\n".join(lines)


def documented_stack(path: Path) -> list[Path]:
    """The ``--config`` files of the first ``lit-mllm fit`` command in a preset's header, in order."""
    command = header(path).replace("\\\n", " ").split("lit-mllm fit", 1)[1].split("\n", 1)[0]
    words = shlex.split(command)
    return [ROOT / words[i + 1] for i, w in enumerate(words) if w == "--config"]


def model_section(path: Path) -> dict:
    return yaml.safe_load(path.read_text())["model"]


def family_base(path: Path) -> bool:
    """A family's base sets the whole model and names its class; a paper's preset is a diff over a base."""
    return "class_path" in model_section(path)


def reference_merge(paths: list[Path]) -> dict:
    """The model section a stack means, merged independently of jsonargparse: later files override earlier ones
    key by key, and a part whose class_path changes starts from nothing (lists are replaced)."""

    def merge(old, new):
        if not (isinstance(old, dict) and isinstance(new, dict)):
            return copy.deepcopy(new)
        if "class_path" in new and old.get("class_path") != new["class_path"]:
            return copy.deepcopy(new)
        out = dict(old)
        for key, value in new.items():
            out[key] = merge(old.get(key), value)
        return out

    merged: dict = {}
    for path in paths:
        merged = merge(merged, model_section(path))
    return merged


def option(part: dict, name: str):
    """A part's option as the merged YAML gives it, else its class's default."""
    if name in (part.get("init_args") or {}):
        return part["init_args"][name]
    module, _, name_ = part["class_path"].rpartition(".")
    cls = getattr(importlib.import_module(module), name_)
    return inspect.signature(cls).parameters[name].default


def tower_settings(tower) -> list[tuple[int, bool]]:
    """(feature_layer, keep_cls) of a built tower, or of each tower of a fused one."""
    inner = getattr(tower, "towers", None)
    towers = inner if inner is not None else [tower]
    return [(t.feature_layer, t.keep_cls) for t in towers]


def reference_tower_settings(tower: dict) -> list[tuple[int, bool]]:
    towers = (tower.get("init_args") or {}).get("towers") or [tower]
    return [(option(t, "feature_layer"), option(t, "keep_cls")) for t in towers]


# -- building a stack -------------------------------------------------------------------------------------------


def overrides(data_root: Path, out: Path, model: dict, source: str) -> list[str]:
    """A temp ShapesWorld, small batches, no workers; caption files for the single-round Plain chat format."""
    args = cli_args(data_root, out, batch_size=2)
    lm = model["init_args"].get("language_model") or {}
    chat = (lm.get("init_args") or {}).get("chat_format") or {}
    if chat.get("class_path", "").endswith(".Plain") or model["class_path"].endswith(".QFormerPretraining"):
        args += [f"--data.init_args.train.{source}.init_args.path", "captions_train.json"]
        if source == "shapesworld":
            args += ["--data.init_args.val.shapesworld.init_args.path", "captions_val.json"]
    elif source != "shapesworld":  # a real dataset's file names
        args += [f"--data.init_args.train.{source}.init_args.path", "train.json"]
    return args


def configs(paths: list[Path]) -> list[str]:
    return [a for p in paths for a in ("--config", str(p))]


class ParseOnly(LitMLLMCLI):
    """The CLI's parser without building anything (for comparing configs that name hub checkpoints)."""

    def instantiate_classes(self) -> None:
        pass


def parsed_model(paths: list[Path]) -> dict:
    from lightning import LightningDataModule

    from lit_mllm.lit.base import VLMModule

    args = stack_configs(configs(paths), log=lambda line: None)
    cli = ParseOnly(
        VLMModule,
        LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        args=args,
        run=False,
    )
    return cli.config.model.as_dict()


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread is fastest


def first_batch(cli) -> dict:
    assert cli.datamodule.processor is not None  # connected by the CLI
    cli.datamodule.setup("fit")
    return next(iter(cli.datamodule.train_dataloader()))[0]


# -- the files themselves ----------------------------------------------------------------------------------------


def test_every_tiny_preset_has_a_real_twin_and_a_header():
    assert [p.name for p in TINY] == [p.name for p in REAL]
    assert set(TINY_TOKENS) == {p.stem for p in TINY} == set(REAL_TOKENS)
    for path in TINY + REAL:
        text = path.read_text()
        assert text.startswith("# "), f"{path.name} opens with a comment"
        assert set(yaml.safe_load(text)) == {"model"}, f"{path.name} is a model section only"
        stack = documented_stack(path)
        assert stack[0] == (QUICKSTART if path in TINY else LLAVA15_7B), (
            f"{path}: the command starts at a base"
        )
        assert stack[-1] == path and all(p.is_file() for p in stack), f"{path} shows its command"
        base = TINY_BASE if path in TINY else REAL_BASE
        if path != base and not family_base(path):
            assert "A diff over configs/model/" in text, f"{path} names the file it is a diff over"


@pytest.mark.parametrize("path", [p for p in TINY + REAL if not family_base(p)], ids=str)
def test_presets_are_diffs(path):
    """No preset repeats a value its base already sets (or a class_path its base already names), so copies cannot
    creep back; and each one changes something."""
    family_base = TINY_BASE if path in TINY else REAL_BASE
    base_files = [
        family_base,
        *documented_stack(path)[1:-1],
    ]  # the command's files between its base and this one
    base = reference_merge(base_files)
    repeats, absent = [], object()

    def walk(node, base_node, at):
        if not isinstance(node, dict) or not isinstance(base_node, dict):
            if node == base_node:
                repeats.append(at)
            return
        if "class_path" in node and node["class_path"] != base_node.get("class_path"):
            return  # a new part: its options are new, whatever their values
        for key, value in node.items():
            walk(value, base_node.get(key, absent), f"{at}.{key}")

    walk(model_section(path), base, "model")
    assert not repeats, f"{path} repeats its base at {repeats}: leave these out"
    assert reference_merge([*base_files, path]) != base, f"{path} changes nothing"


def test_the_bases_are_the_models_of_the_quickstart_and_of_llava15_7b():
    """Stacking the tiny base on the quickstart (the real base on configs/llava15_7b.yaml) changes nothing: the
    headers' commands that start at those files start at the family's base."""
    assert parsed_model([QUICKSTART, TINY_BASE]) == parsed_model([QUICKSTART])
    assert parsed_model([LLAVA15_7B, REAL_BASE]) == parsed_model([LLAVA15_7B])


# -- tiny presets: one training step each, and the real command for one ------------------------------------------


@pytest.mark.parametrize("path", TINY, ids=lambda p: p.stem)
def test_tiny_preset_takes_a_training_step(path, shapes_root, tmp_path):
    stack = documented_stack(path)
    reference = reference_merge(stack)
    args = [*configs(stack), *overrides(shapes_root, tmp_path, reference, "shapesworld")]
    cli = build_cli(stack_configs(args), run=False)
    model = cli.model
    assert isinstance(model, FAMILIES) and type(model).__name__ == reference["class_path"].rsplit(".", 1)[1]
    assert model.tokens_per_image == TINY_TOKENS[path.stem]
    for part in parts_of(reference):
        assert (
            type(getattr(model, part)).__name__
            == reference["init_args"][part]["class_path"].rsplit(".", 1)[1]
        )
    batch = first_batch(cli)

    trainable = [p for p in model.parameters() if p.requires_grad]
    before = [p.detach().clone() for p in trainable]
    optimizer = model.optimizer(trainable)
    reached = set()  # the trainable parts that received gradient
    for step in range(2):  # a part behind a zero-initialised gate (Flamingo's) gets its first one at step 2
        optimizer.zero_grad()
        loss = model.training_step(batch, step)
        assert loss.isfinite()
        loss.backward()
        assert all(p.grad is None or p.grad.isfinite().all() for p in trainable)
        for name in model.stage.trainable:
            params = [p for m in resolve(model.parts(), name) for p in m.parameters()]
            if any(p.grad is not None and p.grad.abs().sum() > 0 for p in params):
                reached.add(name)
        optimizer.step()
        if step == 0:
            assert any(not torch.equal(a, p.detach()) for a, p in zip(before, trainable))
        if reached == set(model.stage.trainable):
            break
    assert reached == set(model.stage.trainable)  # every trainable part receives gradient


def test_tiny_preset_through_the_fit_command(shapes_root, tmp_path):
    """The command every header documents, end to end (fast_dev_run), for the preset with a different LLM family."""
    path = PRESETS / "qwen_vl.yaml"
    stack = documented_stack(path)
    args = [*configs(stack), *overrides(shapes_root, tmp_path, reference_merge(stack), "shapesworld")]
    cli = run(["fit", *stack_configs(args), "--trainer.fast_dev_run", "1"])
    assert type(cli.model.connector).__name__ == "QwenVLResampler"
    assert type(cli.model.language_model).__name__ == "TinyQwen2"
    assert cli.model.vision_tower.feature_layer == -1  # the diff's, over the base's -2
    assert cli.trainer.state.finished


# -- real presets: hub names -> tiny local checkpoints of the same families ------------------------------------------


def check_real(cli, path: Path, stack: list[Path]) -> None:
    model, reference = cli.model, reference_merge(stack)["init_args"]
    assert model.tokens_per_image == REAL_TOKENS[path.stem]
    for part in parts_of(reference_merge(stack)):
        assert type(getattr(model, part)).__name__ == reference[part]["class_path"].rsplit(".", 1)[1], part
    assert tower_settings(model.vision_tower) == reference_tower_settings(reference["vision_tower"])
    assert model.stage.trainable == reference["stage"]["trainable"]


@pytest.mark.parametrize("path", REAL, ids=lambda p: p.stem)
def test_real_preset_stacks_on_the_real_base(path, tiny_hub, shapes_root, tmp_path):
    """The command the real headers document: over configs/llava15_7b.yaml (GPU trainer, bf16 LLM), on the CPU."""
    stack = documented_stack(path)
    local = [with_stand_ins(p, tiny_hub, tmp_path) for p in stack]
    args = [
        *configs(local),
        *overrides(shapes_root, tmp_path, reference_merge(stack), "llava_mix665k"),
        "--trainer.accelerator",
        "cpu",
        "--trainer.devices",
        "1",
        "--trainer.precision",
        "32-true",
    ]
    cli = build_cli(stack_configs(args), run=False)
    check_real(cli, path, stack)


@pytest.mark.parametrize("path", REAL, ids=lambda p: p.stem)
def test_real_preset_on_any_base_after_the_real_base(path, tiny_hub, shapes_root, tmp_path):
    """The quickstart's trainer and data, then the real base, then the preset: every part changes class from the
    quickstart's tiny one, and none keeps a tiny option (e.g. the quickstart's image_size=64 on an HF tower)."""
    stack = [REAL_BASE, *(p for p in documented_stack(path)[1:] if p != REAL_BASE)]
    local = [with_stand_ins(p, tiny_hub, tmp_path) for p in stack]
    args = [
        *configs([QUICKSTART, *local]),
        *overrides(shapes_root, tmp_path, reference_merge(stack), "shapesworld"),
        "--trainer.precision",
        "32-true",
    ]
    cli = build_cli(stack_configs(args), run=False)
    check_real(cli, path, stack)
    assert cli.model.training_step(first_batch(cli), 0).isfinite()
