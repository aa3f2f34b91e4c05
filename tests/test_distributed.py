"""Distributed training on CPU: two DDP processes (gloo), one rank fed only text-only samples, the other only
samples with images, under Lightning's default DDP settings (``find_unused_parameters=False``), for every family
(prefix, Flamingo, mPLUG-Owl3, CogVLM), every part of each training.

Under DDP a text-only batch runs a blank image through the tower and connector (the base's ``needs_blank_image``;
its contribution is exactly zero), and each family's own weights take part without an image (Flamingo's blocks and
gates and mPLUG-Owl3's hyper-attention on an all-zero image nobody sees, CogVLM's experts on no rows), so every
trainable parameter takes part in every backward pass on every rank. Checked here, per family: on one process,
a text-only batch gives every trainable parameter a gradient (without the blank image exactly the tower's and
connector's lack one); on two, the run finishes (no "parameters that did not receive grad" error, no hang), both
ranks end with the same parameters, every part moved, and they equal an independent single-process replay (the
mean of the two ranks' losses, one optimizer step per step); the ranks draw disjoint samples that together are
the mixture plan's first global batches. A control run without the blank image fails with DDP's unused-parameter
error, so the check can fail.
"""

from __future__ import annotations

import importlib.util
import json
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import timedelta
from functools import partial
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy

from lit_mllm.commands.lightning import LitMLLMCLI, build_cli
from lit_mllm.data import Batch, Conversations, MixtureData, collate
from lit_mllm.data.sample import Turn
from lit_mllm.lit import CogVLM, FlamingoVLM, MPLUGOwl3VLM, PrefixFusionVLM, VLMModule
from lit_mllm.nn.connectors import LinearConnector, PerceiverResampler
from lit_mllm.nn.fusion import GatedCrossAttentionBlock
from lit_mllm.nn.language import TinyLlama
from lit_mllm.nn.vision import TinyCLIPVision
from lit_mllm.training import Stage
from lit_mllm.training.stages import resolve

STEPS = 2
BATCH = 2
SEED = 3
BASE_PARTS = ["vision_tower", "connector", "language_model"]


@dataclass(frozen=True)
class Family:
    """A family's tiny model in these tests: its class, its arguments beyond the tower, the LLM and the stage, and
    its own part (nested in ``language_model``), if any."""

    cls: type[VLMModule]
    options: dict = field(default_factory=dict)
    part: str | None = None

    def all_parts(self) -> Stage:
        """Every part trains (the family's own part named: an unnamed nested part stays frozen)."""
        return Stage(name="all", trainable=BASE_PARTS + ([self.part] if self.part else []))


FAMILIES = {
    "prefix": Family(PrefixFusionVLM),
    "flamingo": Family(
        FlamingoVLM,
        dict(
            connector=partial(PerceiverResampler, num_latents=4, num_layers=1, num_heads=2, head_dim=16),
            xattn=partial(GatedCrossAttentionBlock, num_heads=2, head_dim=16),
            cross_attn_every=1,
        ),
        "xattn",
    ),
    "owl3": Family(MPLUGOwl3VLM, dict(connector=LinearConnector, hyper_layers=[1]), "hyper_attention"),
    "cogvlm": Family(CogVLM, {}, "visual_expert"),
}


class TextView(Conversations):
    """The same records with their images (and placeholders) removed: text-only samples with the ids of the
    image samples, so the two ranks share one mixture plan and one id space."""

    def sample(self, i: int, image_token: str):
        sample = super().sample(i, image_token)
        sample.images = []
        sample.turns = [
            Turn(t.role, t.text.replace(f"{image_token}\n", "").replace(image_token, ""))
            for t in sample.turns
        ]
        return sample


class ByRank(MixtureData):
    """Rank 0 reads the training records as text only, every other rank with their images."""

    def setup(self, stage: str) -> None:
        if self.trainer is not None and self.trainer.global_rank == 0:
            self.splits["fit"] = {"shapesworld": TextView("train.json")}
        super().setup(stage)


class Record(L.Callback):
    """Each rank writes what it trained on (ids, whether images came, the batch tensors) and its final
    parameters into ``out``."""

    def __init__(self, out: str) -> None:
        self.out = out
        self.batches: list[Batch] = []

    def setup(self, trainer, pl_module, stage: str) -> None:
        torch.set_num_threads(1)  # a forked worker must not enter the parent's OpenMP pool (it hangs)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.batches.append(batch)

    def on_train_end(self, trainer, pl_module) -> None:
        rank = trainer.global_rank
        torch.save(self.batches, Path(self.out) / f"batches{rank}.pt")
        torch.save(
            {k: v.detach().clone() for k, v in pl_module.state_dict().items()},
            Path(self.out) / f"params{rank}.pt",
        )
        ids = [b.ids for b in self.batches]
        images = [b.pixel_values is not None for b in self.batches]
        (Path(self.out) / f"rank{rank}.json").write_text(json.dumps({"ids": ids, "images": images}))


class ReportingDDP(DDPStrategy):
    """Default DDP; a worker writes the error its training step raised to ``error<rank>.txt`` in ``out`` (a
    spawned worker's error reaches the main process only if it is the first to fail)."""

    def __init__(self, out: str, **kwargs) -> None:
        super().__init__(**kwargs)
        self.out = out

    def training_step(self, *args, **kwargs):
        try:
            return super().training_step(*args, **kwargs)
        except Exception as e:
            (Path(self.out) / f"error{self.global_rank}.txt").write_text(f"{type(e).__name__}: {e}")
            raise


class NoBlankImage(PrefixFusionVLM):
    """The control: a text-only batch skips the image path, as a naive implementation would."""

    def needs_blank_image(self) -> bool:
        return False


def build(
    family: str = "prefix",
    stage: Stage | None = None,
    num_layers: int = 2,
    optimizer=None,
    cls: type[VLMModule] | None = None,
) -> VLMModule:
    """The family's tiny model (seeded), every part training unless ``stage``, SGD unless ``optimizer``;
    ``num_layers`` tower blocks before the cut at the penultimate layer; ``cls`` a subclass of the family's."""
    spec = FAMILIES[family]
    torch.manual_seed(0)
    return (cls or spec.cls)(
        TinyCLIPVision(image_size=32, patch_size=8, hidden_size=32, num_layers=num_layers, num_heads=2),
        TinyLlama(hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2),
        stage=stage or spec.all_parts(),
        optimizer=optimizer or partial(torch.optim.SGD, lr=0.5),
        **spec.options,
    )


@contextmanager
def child_env():
    """The environment forked ranks inherit, restored afterwards: a free MASTER_PORT (Lightning's launcher leaves
    its port in the environment, and the next run would reuse it), and one OpenMP thread (a forked child that
    enters the parent's OpenMP pool hangs; Lightning sets the thread count from OMP_NUM_THREADS)."""
    from lightning.fabric.plugins.environments.lightning import find_free_network_port

    with pytest.MonkeyPatch.context() as env:
        env.setenv("MASTER_PORT", str(find_free_network_port()))
        env.setenv("OMP_NUM_THREADS", "1")
        yield


def run_forked(fn, args: tuple, nprocs: int, limit_s: float = 300) -> None:
    """``fn(rank, *args)`` in ``nprocs`` forked processes; they are killed (and this raises) if still running
    after ``limit_s``, so a broken test cannot hang the suite."""
    context = torch.multiprocessing.start_processes(
        fn, args=args, nprocs=nprocs, start_method="fork", join=False
    )
    deadline = time.monotonic() + limit_s
    while not context.join(timeout=1):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            raise TimeoutError(f"{fn.__name__} still running after {limit_s} s")


def ddp_fit(model: VLMModule, root: Path, out: Path, timeout_s: int = 60) -> None:
    data = ByRank(
        str(root),
        train={"shapesworld": Conversations("train.json")},
        batch_size=BATCH,
        num_workers=0,
        seed=SEED,
    )
    data.connect(model.processor())
    trainer = L.Trainer(
        accelerator="cpu",
        devices=2,
        # fork: no re-import in the workers; default DDP settings otherwise (find_unused_parameters=False)
        strategy=ReportingDDP(str(out), start_method="fork", timeout=timedelta(seconds=timeout_s)),
        max_steps=STEPS,
        limit_val_batches=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[Record(str(out))],
    )
    with child_env():
        trainer.fit(model, data)


def replay(family: str, batches: list[list[Batch]]) -> dict[str, torch.Tensor]:
    """One process, no DDP: each step minimises the mean of the ranks' losses (what DDP's gradient averaging
    does); on the text-only batch the image path simply gets no gradient."""
    model = build(family)
    model.train()
    optimizer = model.configure_optimizers()
    for step in range(STEPS):
        optimizer.zero_grad()
        losses = []
        for rank_batches in batches:
            batch = rank_batches[step]
            logits, target, _ = model.supervised_logits(batch)
            losses.append(F.cross_entropy(logits.float(), target))
        (sum(losses) / len(losses)).backward()
        optimizer.step()
    return model.state_dict()


def part_params(model: VLMModule) -> dict[str, set[str]]:
    """The state-dict names of each part's parameters (a nested part's are in its outer part's too)."""
    names = {id(p): n for n, p in model.named_parameters()}
    parts = model.parts()
    return {
        part: {names[id(p)] for module in resolve(parts, part) for p in module.parameters()} for part in parts
    }


# -- one process: a text-only batch reaches every trainable parameter ---------------------------------------------
@pytest.fixture
def process_group(tmp_path):
    """A one-process gloo group: ``torch.distributed`` initialised, as under DDP (what ``needs_blank_image`` reads)."""
    torch.distributed.init_process_group(
        "gloo", init_method=f"file://{tmp_path}/rendezvous", rank=0, world_size=1
    )
    yield
    torch.distributed.destroy_process_group()


def text_only_grads(model: VLMModule, root: Path) -> set[str]:
    """One backward pass of ``model`` (training) on two ShapesWorld samples without their images; the names of
    the trainable parameters left without a gradient."""
    processor = model.processor()
    source = TextView("train.json").open(root)
    items = [processor(source.sample(i, processor.image_token)) for i in range(2)]
    batch = collate(items, pad_token_id=processor.tokenizer.pad_token_id)
    assert batch.pixel_values is None and sum(batch.images_per_row) == 0
    model.train()
    logits, target, _ = model.supervised_logits(batch)
    F.cross_entropy(logits.float(), target).backward()
    return {n for n, p in model.named_parameters() if p.requires_grad and p.grad is None}


@pytest.mark.parametrize("stage", ["all", "default"])
@pytest.mark.parametrize("family", FAMILIES)
def test_under_ddp_a_text_only_batch_gives_every_trainable_parameter_a_gradient(
    family, stage, process_group, shapes_root
):
    """Every part training, and the family's default stage (e.g. Flamingo's connector + blocks, the LLM frozen)."""
    model = build(family, stage=FAMILIES[family].cls.default_stage() if stage == "default" else None)
    assert model.needs_blank_image()
    assert sum(p.requires_grad for p in model.parameters()) > 0
    assert text_only_grads(model, shapes_root) == set()


@pytest.mark.parametrize("family", FAMILIES)
def test_without_ddp_a_text_only_batch_leaves_exactly_the_vision_path_without_gradients(family, shapes_root):
    """The control of the test above: no process group, no blank image. The tower and the connector get no
    gradient; everything else does, the family's own part included (its mechanism runs without an image)."""
    model = build(family)
    assert not model.needs_blank_image()
    params = part_params(model)
    assert text_only_grads(model, shapes_root) == params["vision_tower"] | params["connector"]


# -- two processes: a text-only rank beside an image rank ----------------------------------------------------------
@pytest.fixture(scope="module", params=list(FAMILIES))
def ddp_run(request, shapes_root, tmp_path_factory):
    family = request.param
    out = tmp_path_factory.mktemp(f"ddp-{family}")
    ddp_fit(build(family), shapes_root, out)
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    return family, out, ranks


def test_text_only_rank_and_image_rank_train_in_step(ddp_run):
    """The run finished; both ranks hold the same parameters, and every part (the family's own included) moved."""
    family, out, ranks = ddp_run
    assert ranks[0]["images"] == [False] * STEPS  # rank 0 saw only text-only batches
    assert ranks[1]["images"] == [True] * STEPS  # rank 1 only batches with images
    p0, p1 = (torch.load(out / f"params{r}.pt", weights_only=True) for r in range(2))
    assert p0.keys() == p1.keys()
    for name in p0:
        torch.testing.assert_close(
            p0[name], p1[name], rtol=0, atol=0, msg=f"{name} differs between the ranks"
        )
    model = build(family)
    initial = model.state_dict()
    changed = {n for n in p0 if not torch.equal(p0[n], initial[n])}
    parts = part_params(model)
    assert set(parts) == set(FAMILIES[family].all_parts().trainable)  # every part trained
    for part, names in parts.items():
        assert names & changed, f"no parameter of {part} moved"


def test_ddp_step_equals_the_single_process_replay(ddp_run):
    family, out, _ = ddp_run
    batches = [torch.load(out / f"batches{r}.pt", weights_only=False) for r in range(2)]
    expected = replay(family, batches)
    trained = torch.load(out / "params0.pt", weights_only=True)
    assert trained.keys() == expected.keys()
    for name, value in expected.items():
        torch.testing.assert_close(trained[name], value, rtol=1e-5, atol=1e-6, msg=f"{family}: {name}")


def test_ranks_draw_disjoint_shares_of_one_plan(ddp_run, shapes_root):
    _, _, ranks = ddp_run
    ids0 = [i for b in ranks[0]["ids"] for i in b]
    ids1 = [i for b in ranks[1]["ids"] for i in b]
    assert not set(ids0) & set(ids1)
    # independently: the plan's global batches 0..3, rank r taking r, r + 2
    source = Conversations("train.json").open(shapes_root)
    mixture = MixtureData(
        str(shapes_root), train={"shapesworld": source}, batch_size=BATCH, seed=SEED
    ).mixture()
    plan = mixture.batches(0)  # world size 1: every global batch in order
    names = [[source.sample(i, "<image>").id for _, i in b] for b in plan]
    assert ranks[0]["ids"] == names[0 : 2 * STEPS : 2]
    assert ranks[1]["ids"] == names[1 : 2 * STEPS : 2]


def test_without_the_blank_image_ddp_refuses_the_text_only_rank(shapes_root, tmp_path):
    """The control: the same run with the image path skipped on the text-only rank. The image rank waits in
    its gradient all-reduce for buckets the text-only rank never sends (the hang a real run shows) until the
    process group's timeout, short here; the text-only rank's next step fails with DDP's "parameters that
    were not used in producing loss" error. Which of the two the main process reports first varies."""
    with pytest.raises(Exception):  # noqa: B017 - rank 0's own error is read below
        ddp_fit(build(cls=NoBlankImage), shapes_root, tmp_path, timeout_s=10)
    assert (
        "Expected to have finished reduction in the prior iteration" in (tmp_path / "error0.txt").read_text()
    )
    assert not list(tmp_path.glob("params*.pt"))  # no rank finished


# -- FSDP: the wrap policy, on CPU (Lightning runs FSDP on CUDA only; torch's FSDP runs on CPU with gloo) ---------
STAGES = [
    Stage(name="finetune", trainable=["connector", "language_model"]),
    Stage(name="align", trainable=["connector"]),
    Stage(name="points", trainable=["connector"], train_last_blocks={"vision_tower": 1}),
]
CASES = [(stage, True) for stage in STAGES] + [(STAGES[0], False)]  # (stage, PartBlocks.wrap_parts)


def one_batch(model: PrefixFusionVLM, root: Path) -> dict:
    from lit_mllm.data import collate, read_llava

    processor = model.processor()
    items = [processor(s) for s in read_llava(root / "train.json")[:3]]
    return collate(items, pad_token_id=processor.tokenizer.pad_token_id)


def fsdp_units(root) -> list[tuple[str, list[bool]]]:
    """Per FSDP unit: the class it wraps and the ``requires_grad`` values of the parameters it holds itself."""
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    units = []
    for unit in FSDP.fsdp_modules(root):
        nested = {id(p) for inner in FSDP.fsdp_modules(unit) if inner is not unit for p in inner.parameters()}
        own = sorted({p.requires_grad for p in unit.parameters() if id(p) not in nested})
        units.append((type(unit.module).__name__, own))
    return units


def test_part_blocks_reads_the_block_classes_off_the_model():
    """Without a process group: FSDP's entry point names the blocks, the tower and the connector; the recursive
    entry point (activation checkpointing) with ``wrap_parts: false`` wraps exactly the blocks."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
        CheckpointWrapper,
        apply_activation_checkpointing,
        checkpoint_wrapper,
    )

    from lit_mllm.training.callbacks import PartBlocks

    model = build(num_layers=3)
    targets = PartBlocks()._run_policy(model, set(), {})
    names = sorted(type(m).__name__ for m in targets)
    assert names == ["CLIPEncoderLayer"] * 2 + ["LlamaDecoderLayer"] * 2 + ["MLPConnector", "TinyCLIPVision"]
    apply_activation_checkpointing(
        model, checkpoint_wrapper_fn=checkpoint_wrapper, auto_wrap_policy=PartBlocks(False)
    )
    wrapped = [m._checkpoint_wrapped_module for m in model.modules() if isinstance(m, CheckpointWrapper)]
    assert sorted(type(m).__name__ for m in wrapped) == ["CLIPEncoderLayer"] * 2 + ["LlamaDecoderLayer"] * 2


def _fsdp_rank(rank: int, root: str, out: str) -> None:
    """One of two ranks, parameters sharded (FULL_SHARD), for every case: the units PartBlocks makes, and one SGD
    step on a batch (the same on both ranks), written as a full state dict."""
    from lightning.pytorch.strategies.strategy import _ForwardRedirection
    from torch.distributed.fsdp import FullStateDictConfig, StateDictType
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    from lit_mllm.training.callbacks import PartBlocks

    torch.set_num_threads(1)  # a forked child must not enter the parent's OpenMP pool (it hangs)
    torch.distributed.init_process_group(
        "gloo", init_method=f"file://{out}/rendezvous", rank=rank, world_size=2
    )
    for k, (stage, wrap_parts) in enumerate(CASES):
        model = build(stage=stage, num_layers=3)  # two tower blocks left: under `points` one trains
        batch = one_batch(model, Path(root))
        policy = PartBlocks(wrap_parts=wrap_parts)
        wrapped = FSDP(model, auto_wrap_policy=policy, device_id=torch.device("cpu"), use_orig_params=True)
        (Path(out) / f"units{k}.json").write_text(json.dumps(fsdp_units(wrapped)))
        model.train()
        optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
        # the family's methods run inside the root unit's forward, as Lightning runs training_step under FSDP
        logits, target, _ = _ForwardRedirection()(wrapped, model, "supervised_logits", batch)
        F.cross_entropy(logits.float(), target).backward()
        optimizer.step()
        with FSDP.state_dict_type(
            wrapped, StateDictType.FULL_STATE_DICT, FullStateDictConfig(rank0_only=False)
        ):
            torch.save(wrapped.state_dict(), Path(out) / f"state{k}-{rank}.pt")
    torch.distributed.destroy_process_group()


@pytest.fixture(scope="module")
def fsdp_run(shapes_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp")
    with child_env():
        run_forked(_fsdp_rank, (str(shapes_root), str(out)), nprocs=2)
    return out


@pytest.mark.parametrize("k", range(len(STAGES)), ids=[s.name for s in STAGES])
def test_part_blocks_units_never_mix_frozen_and_trainable(k, fsdp_run):
    units = json.loads((fsdp_run / f"units{k}.json").read_text())
    assert {name for name, _ in units} == {
        "PrefixFusionVLM",  # the root: the LLM's embeddings, final norm and head
        "TinyCLIPVision",
        "MLPConnector",
        "CLIPEncoderLayer",
        "LlamaDecoderLayer",
    }
    assert all(len(flags) == 1 for _, flags in units), units
    blocks = [flags for name, flags in units if name == "CLIPEncoderLayer"]
    assert sorted(blocks) == ([[False], [True]] if STAGES[k].train_last_blocks else [blocks[0]] * 2)


def test_without_part_units_the_root_mixes_frozen_and_trainable(fsdp_run):
    """The control: blocks alone leave the frozen tower's embeddings in the root unit with the trainable LLM
    embeddings and head (FSDP then keeps gradients for frozen weights)."""
    units = dict(json.loads((fsdp_run / f"units{len(STAGES)}.json").read_text()))
    assert "TinyCLIPVision" not in units and "MLPConnector" not in units
    assert units["PrefixFusionVLM"] == [False, True]


@pytest.mark.parametrize("k", range(len(CASES)))
def test_sharded_step_equals_the_plain_step(k, fsdp_run, shapes_root):
    """A unit's weights exist in full only inside its forward, so a part called other than through its forward
    (the LLM's ``embed``/``head``, were the LLM a unit) would fail or differ here."""
    stage, _ = CASES[k]
    reference = build(stage=stage, num_layers=3)
    reference.train()
    optimizer = torch.optim.SGD([p for p in reference.parameters() if p.requires_grad], lr=0.5)
    logits, target, _ = reference.supervised_logits(one_batch(reference, shapes_root))
    F.cross_entropy(logits.float(), target).backward()
    optimizer.step()
    expected = reference.state_dict()
    for rank in range(2):
        trained = torch.load(fsdp_run / f"state{k}-{rank}.pt", weights_only=True)
        assert trained.keys() == expected.keys()
        for name, value in expected.items():
            torch.testing.assert_close(trained[name], value, rtol=1e-5, atol=1e-6, msg=f"rank {rank}: {name}")


class CPUFSDP(FSDPStrategy):
    """Lightning's FSDPStrategy on CPU, for tests: Lightning passes FSDP the CUDA device index (None on CPU)."""

    def _setup_model(self, model):
        from torch.distributed.fsdp import FullyShardedDataParallel

        kwargs = dict(self.kwargs, sharding_strategy=self.sharding_strategy, device_id=torch.device("cpu"))
        return FullyShardedDataParallel(module=model, **kwargs)


def _fsdp_fit_and_resume(rank: int, root: str, out: str) -> None:
    """A Lightning FSDP run (one process) saves after 2 steps; a second run resumes from it to step 4."""
    from lit_mllm.training.callbacks import PartBlocks
    from lit_mllm.training.checkpoints import AtomicCheckpointIO, read_checkpoint

    torch.set_num_threads(1)
    stage = Stage(name="finetune", trainable=["connector", "language_model"])

    def fit(steps: int, ckpt_path: str | None = None) -> L.Trainer:
        # AdamW: Lightning's FSDP resume fails on an optimizer without state (SGD without momentum)
        model = build(stage=stage, optimizer=torch.optim.AdamW)
        data = MixtureData(
            root, train={"shapesworld": Conversations("train.json")}, batch_size=BATCH, num_workers=0
        )
        data.connect(model.processor())
        trainer = L.Trainer(
            accelerator="cpu",
            devices=1,
            strategy=CPUFSDP(auto_wrap_policy=PartBlocks()),
            plugins=[AtomicCheckpointIO()],
            max_steps=steps,
            limit_val_batches=0,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
        )
        trainer.fit(model, data, ckpt_path=ckpt_path)
        return trainer

    path = Path(out) / "fsdp.ckpt"
    fit(2).save_checkpoint(path)
    saved = read_checkpoint(path)["state_dict"]
    frozen = [k for k in saved if k.startswith("vision_tower.")]
    assert not frozen, f"frozen tower weights in the checkpoint: {frozen[:3]}"
    assert fit(4, str(path)).global_step == 4


def test_fsdp_checkpoint_holds_trainable_weights_and_resumes(shapes_root, tmp_path):
    with child_env():
        run_forked(_fsdp_fit_and_resume, (str(shapes_root), str(tmp_path)), nprocs=1)


# -- strategy configs ---------------------------------------------------------------------------------------------
CONFIGS = Path(__file__).resolve().parents[1] / "configs"
STRATEGIES = sorted((CONFIGS / "strategy").glob("*.yaml"))


class ParseOnly(LitMLLMCLI):
    """Parse (every class_path and init_arg checked against its signature) without building anything."""

    def instantiate_classes(self) -> None:
        pass


@pytest.mark.parametrize("path", STRATEGIES, ids=lambda p: p.name)
def test_strategy_config_parses_stacked_on_the_quickstart(path, monkeypatch):
    import lit_mllm.commands.lightning

    monkeypatch.setattr(lit_mllm.commands.lightning, "LitMLLMCLI", ParseOnly)
    cli = build_cli(["--config", str(CONFIGS / "quickstart.yaml"), "--config", str(path)], run=False)
    assert cli.config.trainer.strategy.class_path.startswith("lightning.pytorch.strategies.")
    assert cli.config.model.class_path == "lit_mllm.lit.PrefixFusionVLM"  # the run config is kept
    assert cli.config.trainer.callbacks  # with its callbacks


def stacked(name: str, root: Path, out: Path) -> list[str]:
    return [
        "--config",
        str(CONFIGS / "quickstart.yaml"),
        "--config",
        str(CONFIGS / "strategy" / name),
        "--data.init_args.root",
        str(root),
        "--trainer.accelerator",
        "cpu",
        "--trainer.devices",
        "1",
        "--trainer.logger.init_args.save_dir",
        str(out),
    ]


def test_ddp_config_builds_a_trainer_with_the_checkpoint_plugin(shapes_root, tmp_path):
    from lit_mllm.training.checkpoints import AtomicCheckpointIO

    cli = build_cli(stacked("ddp.yaml", shapes_root, tmp_path), run=False)
    assert isinstance(cli.trainer.strategy, DDPStrategy)
    assert isinstance(cli.trainer.strategy.checkpoint_io, AtomicCheckpointIO)


def test_fsdp_config_needs_cuda_and_says_so(shapes_root, tmp_path):
    """What a CPU machine gets: Lightning's own message (FSDP runs on CUDA devices only)."""
    with pytest.raises(ValueError, match="requires a GPU accelerator"):
        build_cli(stacked("fsdp.yaml", shapes_root, tmp_path), run=False)


@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is not None, reason="deepspeed is installed")
@pytest.mark.parametrize("name", ["deepspeed_zero2.yaml", "deepspeed_zero3.yaml"])
def test_deepspeed_configs_without_deepspeed_name_the_install(name, shapes_root, tmp_path):
    """deepspeed is no dependency: Lightning stops at the Trainer with the pip command."""
    with pytest.raises(Exception, match="pip install -U deepspeed"):
        build_cli(stacked(name, shapes_root, tmp_path), run=False)


# -- two processes: validation scores per task when a rank meets none of a task's samples ----------------------
class SaveValidation(L.Callback):
    """Each rank writes the validation figures it ends with to ``val<rank>.json`` in ``out``."""

    def __init__(self, out: str) -> None:
        self.out = out

    def setup(self, trainer, pl_module, stage: str) -> None:
        torch.set_num_threads(1)  # a forked worker must not enter the parent's OpenMP pool (it hangs)

    def on_validation_end(self, trainer, pl_module) -> None:
        figures = {k: float(v) for k, v in trainer.callback_metrics.items()}
        (Path(self.out) / f"val{trainer.global_rank}.json").write_text(json.dumps(figures))


def validate_on(root: Path, out: Path, devices: int) -> dict[str, float]:
    model = build("prefix")
    data = MixtureData(
        str(root),
        train={"a": Conversations("a.json")},
        val={"a": Conversations("a.json"), "b": Conversations("b.json")},
        batch_size=BATCH,
        num_workers=0,
    )
    data.connect(model.processor())
    out.mkdir(parents=True, exist_ok=True)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=devices,
        strategy=DDPStrategy(start_method="fork", timeout=timedelta(seconds=60)) if devices > 1 else "auto",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[SaveValidation(str(out))],
    )
    with child_env():
        trainer.validate(model, data, verbose=False)
    return json.loads((out / "val0.json").read_text())


def test_per_task_scores_under_ddp_when_a_rank_meets_no_sample_of_a_task(shapes_root, tmp_path):
    """Validation split over two ranks by Lightning's sampler: sources ``a`` (5 records) and ``b`` (1), 6 samples,
    so rank 0 reads a0, a2, a4 and never meets ``b``. Every rank still computes every task's loss and metrics (a
    rank that skipped one would leave the other in a collective until the timeout); both ranks end with the same
    figures, the ones a single process computes."""
    records = json.loads((shapes_root / "val.json").read_text())
    (shapes_root / "a.json").write_text(json.dumps(records[:5]))
    (shapes_root / "b.json").write_text(json.dumps(records[5:6]))
    single = validate_on(shapes_root, tmp_path / "one", devices=1)
    ranks = [validate_on(shapes_root, tmp_path / "two", devices=2)]
    ranks.append(json.loads((tmp_path / "two" / "val1.json").read_text()))
    for key in ("val/loss", "val/a/loss", "val/b/loss", "val/accuracy", "val/a/accuracy", "val/b/accuracy"):
        assert ranks[0][key] == pytest.approx(ranks[1][key], rel=1e-5), key
        assert ranks[0][key] == pytest.approx(single[key], rel=1e-4), key
