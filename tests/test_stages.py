"""Stages: exactly the configured parts train; frozen parts stay in eval mode and run without autograd. Schedules:
at a milestone exactly the next stage's parameters train and the optimizer holds exactly them; a run resumed at
the milestone matches an uninterrupted one."""

from pathlib import Path

import lightning as L
import pytest
import torch
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from lit_mllm.lit import PrefixFusionVLM
from lit_mllm.training import Stage
from lit_mllm.training.checkpoints import safe_globals
from lit_mllm.training.peft import LoRA
from lit_mllm.training.stages import (
    Milestone,
    StageSchedule,
    apply_stage,
    count,
    param_groups,
    part_trains,
    set_modes,
    trainable_names,
    trainable_table,
)
from tests.conftest import shapes_data, tiny_fit, tiny_model


@pytest.mark.parametrize(
    "stage,trainable",
    [
        (Stage("align", ["connector"]), {"connector"}),
        (Stage("finetune", ["connector", "language_model"]), {"connector", "language_model"}),
        (
            Stage("full", ["vision_tower", "connector", "language_model"]),
            {"vision_tower", "connector", "language_model"},
        ),
    ],
)
def test_trainable_parts_are_exactly_the_stage(stage, trainable):
    model = tiny_model(stage)
    for name, part in model.parts().items():
        flags = {p.requires_grad for p in part.parameters()}
        assert flags == {name in trainable}, name
    model.train()  # what Lightning calls after validation
    for name, part in model.parts().items():
        assert all(m.training == (name in trainable) for m in part.modules()), name
    opt = model.configure_optimizers()
    in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
    assert in_opt == {id(p) for p in model.parameters() if p.requires_grad}


def test_frozen_tower_runs_without_autograd(batch):
    model = tiny_model(Stage("align", ["connector"]))
    model.train()
    seen = {}

    def hook(module, inputs, output):
        seen["grad"] = output.requires_grad

    model.vision_tower.register_forward_hook(hook)
    loss = model.encode_images(batch.pixel_values).square().mean()
    loss.backward()
    assert seen["grad"] is False
    assert all(p.grad is not None for p in model.connector.parameters())


def test_unknown_part_names_the_valid_ones():
    with pytest.raises(
        ValueError,
        match=r"unknown part\(s\) \['llm'\]; valid parts: \['connector', 'language_model', 'vision_tower'\]",
    ):
        tiny_model(Stage("x", ["llm"]))


def test_nothing_to_train_is_an_error():
    with pytest.raises(ValueError, match="leaves nothing to train"):
        tiny_model(Stage("none", [])).configure_optimizers()


def test_table_lists_every_part():
    from lit_mllm.training.stages import count, trainable_table

    model = tiny_model(Stage("align", ["connector"]))
    table = trainable_table(model.parts(), model.stage)
    assert "stage 'align': trains connector" in table
    total, trainable = count(model.connector)
    assert f"{total:,}" in table and trainable == total
    for name in ("vision_tower", "connector", "language_model"):
        assert name in table


def test_train_last_blocks_of_the_tower(shapes_root):
    """POINTS' recipe: only the last N blocks of the vision tower train; they alone are in train mode and get
    gradients, the tower runs with autograd, the rest of it stays frozen in eval mode."""
    from lit_mllm.data import collate, read_llava
    from lit_mllm.lit import PrefixFusionVLM
    from lit_mllm.nn.language import TinyLlama
    from lit_mllm.nn.vision import TinyCLIPVision
    from lit_mllm.training.stages import trainable_table

    torch.manual_seed(0)
    tower = TinyCLIPVision(
        image_size=32, patch_size=8, hidden_size=32, num_layers=3, num_heads=2, feature_layer=-1
    )
    stage = Stage("pretrain", ["connector"], train_last_blocks={"vision_tower": 2})
    model = PrefixFusionVLM(tower, TinyLlama(hidden_size=64, num_layers=2), stage=stage)
    first, *last = list(tower.blocks)
    trained = {id(p) for b in last for p in b.parameters()}
    assert trained and all(p.requires_grad == (id(p) in trained) for p in tower.parameters())
    model.train()
    assert not first.training and not tower.model.embeddings.training and all(b.training for b in last)
    table = trainable_table(model.parts(), stage)
    assert "last 2 blocks of vision_tower" in table
    rows = {r.rsplit(maxsplit=3)[0].strip(): r.rsplit(maxsplit=3)[1:] for r in table.splitlines()[3:-2]}
    n_last = sum(p.numel() for b in last for p in b.parameters())
    assert rows["vision_tower[last 2 blocks]"] == [f"{n_last:,}", f"{n_last:,}", "train"]  # a derived part
    assert rows["vision_tower"][1:] == ["0", "eval"]  # the rest of the tower

    proc = model.processor()
    batch = collate(
        [proc(s) for s in read_llava(shapes_root / "train.json")[:2]], proc.tokenizer.pad_token_id
    )
    model.training_step(batch, 0).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for b in last for p in b.parameters())
    assert all(p.grad is None for p in first.parameters())
    opt = model.configure_optimizers()
    assert {id(p) for g in opt.param_groups for p in g["params"]} == {
        id(p) for p in model.parameters() if p.requires_grad
    }


def test_train_last_blocks_errors():
    with pytest.raises(ValueError, match="in both trainable"):
        tiny_model(Stage("x", ["vision_tower"], train_last_blocks={"vision_tower": 1}))
    with pytest.raises(ValueError, match=r"unknown part\(s\) \['tower'\]"):
        tiny_model(Stage("x", ["connector"], train_last_blocks={"tower": 1}))
    with pytest.raises(ValueError, match="has no transformer blocks"):
        tiny_model(Stage("x", ["vision_tower"], train_last_blocks={"connector": 1}))
    with pytest.raises(ValueError, match="last 5 blocks"):
        tiny_model(Stage("x", ["connector"], train_last_blocks={"vision_tower": 5}))


# -- several stages in one run ------------------------------------------------------------------------------------
ALIGN = Stage("align", ["connector"])
LORA = Stage(
    "lora", ["connector"], lora={"language_model": LoRA(r=4, alpha=8.0, target_modules=["q_proj", "v_proj"])}
)


def two_stages(at_step: int = 2) -> StageSchedule:
    return StageSchedule([Milestone(0, ALIGN), Milestone(at_step, LORA)])


class Watch(L.Callback):
    """Per optimizer step: the stage, the trainable names, the optimizer's parameters, the modes of frozen parts,
    the loss; and the weights before/after."""

    def __init__(self) -> None:
        self.steps: list[dict] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        names = {id(p): n for n, p in pl_module.named_parameters()}
        lm = pl_module.language_model.model.model.layers[0].self_attn
        self.steps.append(
            {
                "stage": pl_module.stage.name,
                "trainable": trainable_names(pl_module),
                "in_optimizer": {names[id(p)] for g in optimizer.param_groups for p in g["params"]},
                "with_grad": {n for n, p in pl_module.named_parameters() if p.grad is not None},
                "tower_training": any(m.training for m in pl_module.vision_tower.modules()),
                "lm_attention_training": lm.training,
                "lora_dropout_training": lm.q_proj.lora_dropout["default"].training,
            }
        )

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.steps[-1]["loss"] = float(outputs["loss"])


def fit_schedule(root, tmp_path, max_steps, ckpt_path=None, save_every=None, validate=False):
    model, watch = tiny_model(two_stages()), Watch()
    dm = shapes_data(root, batch_size=4, seed=3)
    dm.connect(model.processor())
    with torch.serialization.safe_globals(safe_globals()):  # the model's stages are in its hyperparameters
        trainer = tiny_fit(
            model,
            dm,
            max_steps,
            tmp_path,
            ckpt_path,
            save_every,
            callbacks=[watch],
            num_sanity_val_steps=0,
            # validation after every step: frozen parts must come back in eval mode
            val_check_interval=1 if validate else None,
            limit_val_batches=1 if validate else 0,
        )
    return model, watch, trainer


def test_schedule_switches_stage_and_optimizer_at_the_milestone(shapes_root, tmp_path):
    before = tiny_model(two_stages())
    start = {n: p.detach().clone() for n, p in before.named_parameters()}
    model, watch, trainer = fit_schedule(shapes_root, tmp_path, max_steps=4, validate=True)
    connector = {f"connector.{n}" for n, _ in model.connector.named_parameters()}
    adapters = {n for n, _ in model.named_parameters() if ".lora_" in n}
    assert adapters  # injected at build time, for every stage of the schedule
    assert [s["stage"] for s in watch.steps] == ["align", "align", "lora", "lora"]
    for i, step in enumerate(watch.steps):
        expected = connector if i < 2 else connector | adapters
        assert step["trainable"] == step["in_optimizer"] == expected, i
        assert step["with_grad"] <= expected, i
        assert not step["tower_training"] and not step["lm_attention_training"], i  # after validation too
        assert step["lora_dropout_training"] == (i >= 2), i
    # the same names as a model built for the second stage alone
    assert watch.steps[-1]["trainable"] == trainable_names(tiny_model(LORA))
    assert len(trainer.optimizers) == 1
    after = dict(model.named_parameters())
    changed = {n for n, p in after.items() if not torch.equal(p.detach(), start[n])}
    assert {n for n in changed if ".lora_B." in n}  # the adapters trained in the second stage
    assert changed <= connector | adapters  # nothing frozen in both stages moved


def test_schedule_resumed_at_the_milestone_matches_an_uninterrupted_run(shapes_root, tmp_path):
    _, full, _ = fit_schedule(shapes_root, tmp_path / "full", max_steps=4, save_every=2)
    ckpt = next((tmp_path / "full").glob("*step=2*.ckpt"))
    with torch.serialization.safe_globals(safe_globals()):
        saved = torch.load(ckpt, weights_only=True, map_location="cpu")
    assert saved["lit_mllm"]["stage"] == "align" and saved["lit_mllm"]["stage_index"] == 0
    assert all(".lora_" not in k for k in saved["state_dict"])  # written before the switch
    model, resumed, _ = fit_schedule(shapes_root, tmp_path / "b", max_steps=4, ckpt_path=str(ckpt))
    assert [s["stage"] for s in resumed.steps] == ["lora", "lora"]
    assert [s["loss"] for s in resumed.steps] == pytest.approx([s["loss"] for s in full.steps[2:]], rel=1e-5)


def test_schedule_spans_and_lr_schedule_per_stage():
    from lit_mllm.training import WarmupCosine

    schedule = StageSchedule([Milestone(0, ALIGN), Milestone(300, LORA)])
    assert [schedule.index_at(s) for s in (0, 299, 300, 10_000)] == [0, 0, 1, 1]
    assert schedule.steps_of(0, 1000) == 300 and schedule.steps_of(1, 1000) == 700
    model = tiny_model(schedule)
    model.scheduler = lambda opt: WarmupCosine(opt, warmup_steps=10)

    class _Trainer:  # what configure_optimizers reads of a trainer (not fitting: no optimizer is rebuilt)
        estimated_stepping_batches = 1000
        training = False

    model._trainer = _Trainer()
    assert model.configure_optimizers()["lr_scheduler"]["scheduler"].total_steps == 300
    model.enter_stage(1)
    assert model.stage is LORA
    assert model.configure_optimizers()["lr_scheduler"]["scheduler"].total_steps == 700
    assert model.describe()["stages"] == "align (from step 0) -> lora (from step 300)"


def test_bad_schedules_are_refused_when_built():
    with pytest.raises(ValueError, match="first must be at step 0"):
        StageSchedule([Milestone(5, ALIGN)])
    with pytest.raises(ValueError, match="each later one at a larger step"):
        StageSchedule([Milestone(0, ALIGN), Milestone(3, LORA), Milestone(3, ALIGN)])
    other = Stage("lora2", ["connector"], lora={"language_model": LoRA(r=8)})
    with pytest.raises(ValueError, match="different LoRA adapters"):
        StageSchedule([Milestone(0, LORA), Milestone(3, other)])
    with pytest.raises(ValueError, match=r"unknown part\(s\) \['llm'\]"):  # a later stage is checked at build
        tiny_model(StageSchedule([Milestone(0, ALIGN), Milestone(3, Stage("x", ["llm"]))]))


class ScheduledPrefixVLM(PrefixFusionVLM):
    """PrefixFusionVLM whose ``stage`` argument is typed to also take a schedule (what the family itself declares
    once its signature says ``Stage | StageSchedule | None``)."""

    def __init__(self, stage: Stage | StageSchedule | None = None, **kwargs) -> None:
        """
        Args:
            stage: One stage, or a schedule of stages.
        """
        super().__init__(stage=stage, **kwargs)


CONFIGS = Path(__file__).resolve().parents[1] / "configs"
SCHEDULE = CONFIGS / "stage" / "schedules" / "align_then_lora.yaml"


def cli_args(shapes_root, tmp_path) -> list[str]:
    return [
        "--config",
        str(CONFIGS / "quickstart.yaml"),
        "--model.class_path",
        f"{__name__}.ScheduledPrefixVLM",
        "--data.init_args.root",
        str(shapes_root),
        "--data.init_args.num_workers",
        "0",
        "--data.init_args.batch_size",
        "4",
        "--trainer.logger.init_args.save_dir",
        str(tmp_path),
    ]


def test_schedule_yaml_builds_typed_stages(tmp_path, shapes_root):
    """The shipped schedule, over the quickstart (whose single stage it replaces), gives typed stages."""
    from lit_mllm.commands.lightning import build_cli

    args = [*cli_args(shapes_root, tmp_path), "--model.init_args.stage", str(SCHEDULE)]
    schedule = build_cli(args, run=False).model.schedule
    assert [(m.at_step, m.stage.name) for m in schedule.stages] == [(0, "align"), (300, "lora")]
    spec = schedule.stages[1].stage.lora["language_model"]
    assert isinstance(spec, LoRA)
    assert (spec.r, spec.alpha, spec.target_modules) == (64, 16, ["q_proj", "v_proj"])


@pytest.mark.slow
def test_schedule_fit_through_the_cli(tmp_path, shapes_root):
    """A short fit through the CLI (the quickstart's LearningRateMonitor and WarmupCosine) switches at the milestone."""
    from lit_mllm.cli import run

    common = cli_args(shapes_root, tmp_path)
    short = yaml.safe_load(SCHEDULE.read_text())
    short["init_args"]["stages"][1]["at_step"] = 2
    (tmp_path / "short.yaml").write_text(yaml.safe_dump(short))
    cli = run(
        [
            "fit",
            *common,
            "--model.init_args.stage",
            str(tmp_path / "short.yaml"),
            "--trainer.max_steps",
            "3",
            "--trainer.limit_val_batches",
            "0",
            "--trainer.enable_checkpointing",
            "false",
        ]
    )
    assert cli.model.stage.name == "lora" and cli.trainer.global_step == 3
    assert {id(p) for g in cli.trainer.optimizers[0].param_groups for p in g["params"]} == {
        id(p) for p in cli.model.parameters() if p.requires_grad
    }


# -- under DDP: the model is wrapped again at the milestone --------------------------------------------------------
class KeepsTheOldDDP(PrefixFusionVLM):
    """The control: a stage switch that leaves the DDP wrapper built for the first stage."""

    def _wrap_ddp_again(self, strategy) -> None:
        pass


class SaveParams(L.Callback):
    def __init__(self, out: str) -> None:
        self.out = out

    def on_train_end(self, trainer, pl_module) -> None:
        state = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}
        torch.save(state, Path(self.out) / f"params{trainer.global_rank}.pt")


def ddp_schedule_fit(cls, root: Path, out: Path) -> list[dict]:
    from datetime import timedelta
    from functools import partial

    from lightning.pytorch.strategies import DDPStrategy

    from lit_mllm.nn.language import TinyLlama
    from lit_mllm.nn.vision import TinyCLIPVision

    torch.manual_seed(0)
    model = cls(
        TinyCLIPVision(image_size=32, patch_size=8, hidden_size=32, num_layers=2, num_heads=2),
        TinyLlama(hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2),
        stage=two_stages(at_step=1),
        optimizer=partial(torch.optim.SGD, lr=0.5),
    )
    dm = shapes_data(root, batch_size=2, seed=3)
    dm.connect(model.processor())
    trainer = L.Trainer(
        accelerator="cpu",
        devices=2,
        strategy=DDPStrategy(start_method="fork", timeout=timedelta(seconds=60)),
        max_steps=3,
        limit_val_batches=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[SaveParams(str(out))],
    )
    trainer.fit(model, dm)
    return [torch.load(out / f"params{r}.pt", weights_only=True) for r in range(2)]


@pytest.mark.parametrize("cls", [PrefixFusionVLM, KeepsTheOldDDP], ids=["rewrapped", "control"])
def test_ddp_ranks_stay_in_step_after_the_milestone(cls, shapes_root, tmp_path):
    """Two CPU ranks on different samples: after the milestone the adapters (frozen when DDP first wrapped the
    model) must still get all-reduced gradients, so both ranks end with the same weights. The control, which keeps
    the first wrapper, lets them drift apart silently."""
    p0, p1 = ddp_schedule_fit(cls, shapes_root, tmp_path)
    adapters = [n for n in p0 if ".lora_B." in n]
    assert adapters and all(p0[n].abs().sum() > 0 for n in adapters)  # they trained after the milestone
    same = all(torch.equal(p0[n], p1[n]) for n in p0)
    assert same == (cls is PrefixFusionVLM)


# -- nested parts: the innermost named part owns each parameter and module -----------------------------------------
class XAttn(nn.Module):
    """A cross-attention block stand-in: a projection, a gate and a dropout."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.proj = nn.Linear(d, d)
        self.gate = nn.Parameter(torch.zeros(1))
        self.drop = nn.Dropout(0.1)


class Layer(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.attn = nn.Linear(d, d)
        self.norm = nn.LayerNorm(d)
        self.drop = nn.Dropout(0.1)
        self.xattn = XAttn(d)


class ToyLM(nn.Module):
    """An LLM stand-in with one cross-attention block inside each of its layers."""

    def __init__(self, d: int = 4, n: int = 3) -> None:
        super().__init__()
        self.embed = nn.Embedding(7, d)
        self.layers = nn.ModuleList(Layer(d) for _ in range(n))
        self.head = nn.Linear(d, 7, bias=False)


class ToyTower(nn.Module):
    """A tower stand-in with transformer blocks (``last_blocks`` as the real towers give them)."""

    def __init__(self, d: int = 4, n: int = 3) -> None:
        super().__init__()
        self.patch = nn.Linear(3, d)
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(d, d), nn.Dropout(0.1)) for _ in range(n))

    def last_blocks(self, n: int) -> list[nn.Module]:
        return list(self.blocks)[len(self.blocks) - n :]


class MiniGPT4Connector(nn.Module):
    """MiniGPT-4's connector shape: a Q-Former then a linear projection."""

    def __init__(self, d: int = 4) -> None:
        super().__init__()
        self.qformer = nn.Sequential(nn.Linear(d, d), nn.Dropout(0.1), nn.LayerNorm(d))
        self.proj = nn.Linear(d, d)


class ToyVLM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.vision_tower = ToyTower()
        self.connector = MiniGPT4Connector()
        self.language_model = ToyLM()

    def parts(self) -> dict:
        return {
            "vision_tower": self.vision_tower,
            "connector": self.connector,
            "language_model": self.language_model,
            "xattn": [layer.xattn for layer in self.language_model.layers],  # a part inside language_model
        }


def applied(stage: Stage) -> ToyVLM:
    model = ToyVLM()
    apply_stage(model.parts(), stage)
    model.train()  # what Lightning calls; the family's train() then sets the modes again
    set_modes(model.parts(), stage)
    return model


def ids(*modules) -> set[int]:
    return {id(p) for m in modules for p in m.parameters()}


def table_rows(table: str) -> dict[str, list[str]]:
    """``{part: [parameters, trainable, mode]}`` of a trainable_table (names unindented) and its total."""
    rows = {}
    for line in table.splitlines()[3:]:
        if line.startswith("---"):
            continue
        name, *cells = line.rsplit(maxsplit=3) if not line.startswith("total") else (*line.split(), "")
        rows[name.strip()] = cells
    return rows


def lr_of(groups: list[dict]) -> dict[int, float]:
    """lr_scale of every parameter in the groups, checking that none is in two groups."""
    found: dict[int, float] = {}
    for g in groups:
        for p in g["params"]:
            assert id(p) not in found, "a parameter in two groups"
            found[id(p)] = g["lr_scale"]
    return found


def test_xattn_inside_the_llm_trains_alone_in_train_mode():
    stage = Stage("xattn", ["xattn"])
    model = applied(stage)
    xattn = [layer.xattn for layer in model.language_model.layers]
    assert all(p.requires_grad == (id(p) in ids(*xattn)) for p in model.parameters())
    assert all(m.training for x in xattn for m in x.modules())
    inside = {id(m) for x in xattn for m in x.modules()}
    assert not any(m.training for m in model.language_model.modules() if id(m) not in inside)
    assert part_trains(model.parts(), "language_model") and not part_trains(model.parts(), "connector")

    rows = table_rows(trainable_table(model.parts(), stage))
    total, trainable = count(model)
    assert rows["total"][:2] == [f"{total:,}", f"{trainable:,}"]
    owned = [int(cells[0].replace(",", "")) for name, cells in rows.items() if name != "total"]
    assert sum(owned) == total  # nothing counted twice
    n_x = sum(p.numel() for p in model.parameters() if id(p) in ids(*xattn))
    assert rows["xattn"] == [f"{n_x:,}", f"{n_x:,}", "train"]
    n_lm = sum(p.numel() for p in model.language_model.parameters())
    assert rows["language_model"] == [f"{n_lm - n_x:,}", "0", "eval"]
    assert "\n  xattn " in trainable_table(model.parts(), stage)  # indented under language_model


def test_lr_scale_of_a_nested_part_listed_after_its_parent():
    stage = Stage("both", ["language_model", "xattn"], lr_scale={"xattn": 10.0})
    model = applied(stage)
    xattn = ids(*(layer.xattn for layer in model.language_model.layers))
    lrs = lr_of(param_groups(model.parts(), stage))
    assert set(lrs) == ids(model.language_model)  # every trainable parameter, once
    assert {lrs[i] for i in xattn} == {10.0}
    assert {lrs[i] for i in ids(model.language_model) - xattn} == {1.0}
    assert all(m.training for m in model.language_model.modules())


def test_named_parts_do_not_inherit_lr_scale_derived_parts_do():
    """CogVLM: the LLM at 0.1, its nested visual experts (here xattn) at 1. POINTS: the tower's last blocks train
    at the tower's scale."""
    stage = Stage(
        "cog",
        ["language_model", "xattn"],
        train_last_blocks={"vision_tower": 1},
        lr_scale={"language_model": 0.1, "vision_tower": 0.5},
    )
    model = applied(stage)
    lrs = lr_of(param_groups(model.parts(), stage))
    xattn = ids(*(layer.xattn for layer in model.language_model.layers))
    assert {lrs[i] for i in xattn} == {1.0}
    assert {lrs[i] for i in ids(model.language_model) - xattn} == {0.1}
    last = model.vision_tower.blocks[-1]
    assert {lrs[i] for i in ids(last)} == {0.5} and set(lrs) & ids(model.vision_tower) == ids(last)
    assert last.training and not model.vision_tower.blocks[0].training and not model.vision_tower.training
    assert "vision_tower[last 1 blocks]" in table_rows(trainable_table(model.parts(), stage))


def test_minigpt4_trains_the_projection_and_keeps_the_qformer_frozen():
    stage = Stage("align", ["connector"], frozen=["connector.qformer"])
    model = applied(stage)
    connector = model.connector
    assert all(p.requires_grad for p in connector.proj.parameters()) and connector.proj.training
    assert not any(p.requires_grad for p in connector.qformer.parameters())
    assert not any(m.training for m in connector.qformer.modules())  # its dropout is off
    assert {id(p) for p in model.parameters() if p.requires_grad} == ids(connector.proj)
    table = trainable_table(model.parts(), stage)
    assert "trains connector; keeps connector.qformer frozen" in table
    n_q = sum(p.numel() for p in connector.qformer.parameters())
    assert table_rows(table)["connector.qformer"] == [f"{n_q:,}", "0", "eval"]
    assert "\n  connector.qformer " in table


def test_a_dotted_name_wins_over_a_family_part_with_the_same_parameters():
    model = ToyVLM()
    parts = {**model.parts(), "head": model.language_model.head}
    stage = Stage("x", ["language_model", "head"], frozen=["language_model.head"])
    apply_stage(parts, stage)
    assert not model.language_model.head.weight.requires_grad
    assert model.language_model.embed.weight.requires_grad


def test_tied_parameters_are_counted_and_grouped_once():
    model = ToyVLM()
    model.connector.proj.weight = model.language_model.layers[0].attn.weight  # tied across two parts
    stage = Stage("x", ["connector"])
    apply_stage(model.parts(), stage)
    assert model.connector.proj.weight.requires_grad  # trains: one of its owners does
    lrs = lr_of(param_groups(model.parts(), stage))
    assert set(lrs) == {id(p) for p in model.parameters() if p.requires_grad}
    rows = table_rows(trainable_table(model.parts(), stage))
    assert rows["total"][:2] == [f"{n:,}" for n in count(model)]


def test_bad_nested_names_say_what_is_wrong():
    model = ToyVLM()
    with pytest.raises(
        ValueError,
        match=r"'connector.qformr' names nothing: connector \(MiniGPT4Connector\) has no child module 'qformr'; "
        r"its children are \['proj', 'qformer'\]",
    ):
        apply_stage(model.parts(), Stage("x", ["connector.qformr"]))
    with pytest.raises(
        ValueError, match=r"xattn\[0\]\.proj \(Linear\) has no child module 'w'; its children are \[\]"
    ):
        apply_stage(model.parts(), Stage("x", ["xattn.proj.w"]))
    with pytest.raises(ValueError, match=r"unknown part\(s\) \['llm.layers'\]; valid parts: \['connector'"):
        apply_stage(model.parts(), Stage("x", ["llm.layers"]))
    with pytest.raises(ValueError, match=r"\['connector'\] in both trainable .* and frozen"):
        apply_stage(model.parts(), Stage("x", ["connector"], frozen=["connector"]))
    with pytest.raises(ValueError, match="gives lr_scale to \\['connector.proj'\\], which it does not train"):
        apply_stage(model.parts(), Stage("x", ["connector"], lr_scale={"connector.proj": 2.0}))
    with pytest.raises(ValueError, match="trainable=None"):
        apply_stage(model.parts(), Stage("x"))
    layers = model.language_model.layers
    overlapping = {
        "language_model": model.language_model,
        "a": [layers[0], layers[1]],
        "b": [layers[1], layers[2]],
    }
    with pytest.raises(
        ValueError, match="parts 'a' and 'b' share some modules but neither contains the other"
    ):
        apply_stage(overlapping, Stage("x", ["a"]))


# -- property: random part trees -----------------------------------------------------------------------------------
class Node(nn.Module):
    """A node of a random module tree: maybe a parameter of its own, a dropout, children ``c0``, ``c1``, ..."""

    def __init__(self, own: int, children: list[nn.Module]) -> None:
        super().__init__()
        if own:
            self.w = nn.Parameter(torch.zeros(own, 2))
        self.drop = nn.Dropout(0.1)
        for i, child in enumerate(children):
            self.add_module(f"c{i}", child)


def random_tree(data, depth: int = 0) -> Node:
    n = data.draw(st.integers(0, 3 if depth < 3 else 0))
    return Node(data.draw(st.integers(0, 3)), [random_tree(data, depth + 1) for _ in range(n)])


@settings(max_examples=80, deadline=None)
@given(st.data())
def test_random_part_trees_follow_the_innermost_part(data):
    """Random module trees, random family parts (nested, list-valued), random dotted names, trainable / frozen /
    lr_scale: each parameter's flag and lr_scale, each module's mode, and each table row match the innermost named
    part, computed here from the tree's paths; every trainable parameter is in one group; totals are the model's."""
    root = Node(0, [random_tree(data, 1) for _ in range(data.draw(st.integers(1, 3)))])
    paths = {(): root}  # path of child names -> module
    for name, module in root.named_modules():
        if name:
            paths[tuple(name.split("."))] = module
    nodes = sorted(p for p in paths if p and p[-1].startswith("c"))
    roots = {f"p{i}": [(f"c{i}",)] for i in range(sum(len(p) == 1 for p in nodes))}  # the top children
    for k in range(data.draw(st.integers(0, 3))):  # family parts inside them, some list-valued
        roots[f"f{k}"] = data.draw(st.lists(st.sampled_from(nodes), min_size=1, max_size=3, unique=True))
    inner = [p for p in nodes if len(p) > 1]
    dotted = data.draw(st.lists(st.sampled_from(inner), max_size=3, unique=True)) if inner else []
    for path in dotted:
        roots[f"p{path[0][1:]}." + ".".join(path[1:])] = [path]
    family = [n for n in roots if "." not in n]
    parts = {n: [paths[p] for p in roots[n]] if n.startswith("f") else paths[roots[n][0]] for n in family}

    names = list(roots)
    trainable = data.draw(st.lists(st.sampled_from(names), unique=True))
    rest = [n for n in names if n not in trainable and "." in n]
    frozen = data.draw(st.lists(st.sampled_from(rest), unique=True)) if rest else []
    scalable = [n for n in names if "." not in n or n in trainable]
    keys = data.draw(st.lists(st.sampled_from(scalable), unique=True))
    lr_scale = {n: float(data.draw(st.integers(1, 9))) for n in keys}
    mentioned = [n for n in dict.fromkeys([*trainable, *frozen, *lr_scale]) if "." in n]
    stage = Stage("random", trainable, frozen=frozen, lr_scale=lr_scale)
    dotted_names = [n for n in names if "." in n]
    for n in dotted_names:
        if n not in mentioned:  # a dotted name is a part only while the stage mentions it
            del roots[n]
    rank = {n: i for i, n in enumerate([*family, *mentioned])}

    def below(name: str) -> set[tuple]:
        return {p for p in paths if any(p[: len(r)] == r for r in roots[name])}

    def params_below(name: str) -> frozenset[int]:
        return frozenset(id(paths[p].w) for p in below(name) if hasattr(paths[p], "w"))

    named = list(roots)
    clash = any(
        below(a) & below(b) and not (below(a) <= below(b) or below(b) <= below(a))
        for i, a in enumerate(named)
        for b in named[i + 1 :]
    )
    if clash:
        with pytest.raises(ValueError, match="share some modules but neither contains the other"):
            apply_stage(parts, stage)
        return

    def owner(path: tuple) -> str | None:
        """The innermost part: the nearest root above ``path``; the same root: the higher rank; the same
        parameters as another part: the higher rank."""
        for cut in range(len(path), -1, -1):
            holders = [n for n in named if path[:cut] in roots[n]]
            if holders:
                first = max(holders, key=rank.get)
                same = [n for n in named if params_below(first) and params_below(n) == params_below(first)]
                return max(same or [first], key=rank.get)
        return None  # the root's own modules

    root.train(data.draw(st.booleans()))
    apply_stage(parts, stage)
    root.train()
    set_modes(parts, stage)
    groups = lr_of(param_groups(parts, stage))
    counted = dict.fromkeys(named, 0)
    for path, module in paths.items():
        who = owner(path)
        if who is None:
            continue
        assert module.training == (who in trainable), (path, who)
        if hasattr(module, "w"):
            counted[who] += module.w.numel()
            assert module.w.requires_grad == (who in trainable), (path, who)
            if who in trainable:
                assert groups[id(module.w)] == lr_scale.get(who, 1.0), (path, who)
    assert set(groups) == {id(p) for p in root.parameters() if p.requires_grad}

    rows = table_rows(trainable_table(parts, stage))
    assert rows.pop("total")[:2] == [f"{n:,}" for n in count(root)]
    assert {n: int(cells[0].replace(",", "")) for n, cells in rows.items()} == counted
