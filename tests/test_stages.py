"""Stages: exactly the configured parts train; frozen parts stay in eval mode and run without autograd. Schedules:
at a milestone exactly the next stage's parameters train and the optimizer holds exactly them; a run resumed at
the milestone matches an uninterrupted one."""

from pathlib import Path

import lightning as L
import pytest
import torch
import yaml

from lit_mllm.lit import PrefixFusionVLM
from lit_mllm.training import Stage
from lit_mllm.training.checkpoints import safe_globals
from lit_mllm.training.peft import LoRA
from lit_mllm.training.stages import Milestone, StageSchedule, trainable_names
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
    from lit_mllm.cli import build_cli

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
