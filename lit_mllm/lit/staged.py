"""The stage, optimizer and checkpoint machinery every LightningModule of the project shares: the VLM families (on
:class:`~lit_mllm.lit.base.VLMModule`), BLIP-2 stage 1 (:class:`~lit_mllm.lit.QFormerPretraining`) and CLIP
pretraining (:class:`~lit_mllm.lit.CLIPPretraining`).

A subclass names its parts (:meth:`StagedModule.parts`: a name -> a module, or a list of modules), says what trains
when the config names no stage (:meth:`StagedModule.default_stage`), calls ``super().__init__(stage, optimizer,
scheduler)`` first, builds its modules, and ends ``__init__`` with :meth:`StagedModule.freeze_and_load`. The base
then owns (see :mod:`lit_mllm.training.stages` for what a stage is):

- the stage, or a :class:`~lit_mllm.training.stages.StageSchedule` of stages switched at step milestones (a single
  stage is a schedule of one); every stage checked against the parts, the LoRA adapters of all of them injected
  when the model is built, the freeze asserted; frozen parts kept in eval mode whatever Lightning asks;
- one optimizer over parameter groups per part with the stage's ``lr_scale`` (every trainable parameter in it), a
  scheduler stepped every optimizer step whose ``total_steps: null`` spans the stage (for one stage: the run);
- the parameter table printed at fit start and ``describe()``'s figures logged as hyperparameters;
- per-step seeding (:meth:`StagedModule.seed_step`), so a resumed run draws what an uninterrupted one draws;
- checkpoints: trainable weights only (frozen ones are rebuilt from the config's sources, ``strict_loading`` off
  and the trainable ones checked at load), or every weight where a subclass sets ``full_checkpoints``; the
  ``lit_mllm`` entry says which stage wrote it, its index in the schedule and the run seed.
"""

from __future__ import annotations

import dataclasses
from abc import abstractmethod
from typing import ClassVar

import lightning as L
import numpy as np
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.utilities import rank_zero_info
from torch.nn.parallel import DistributedDataParallel

from lit_mllm.training.checkpoints import load_weights
from lit_mllm.training.peft import add_lora
from lit_mllm.training.stages import (
    Milestone,
    Parts,
    Stage,
    StageSchedule,
    apply_stage,
    count,
    param_groups,
    part_counts,
    resolve,
    set_modes,
    trainable_names,
    trainable_table,
)


class StagedModule(L.LightningModule):
    """Named parts trained by stage: freezing, optimizer groups, stage schedules, per-step seeding and checkpoints
    (see the module docstring)."""

    full_checkpoints: ClassVar[bool] = False
    """Whether checkpoints keep the frozen weights too (CLIP pretraining: a VLM's tower loads from one whatever
    trained); False: trainable weights only, the frozen ones rebuilt from the config's sources."""

    def __init__(
        self,
        stage: Stage | StageSchedule | None = None,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        scheduler: LRSchedulerCallable | None = None,
    ) -> None:
        """Subclasses call this first, build their parts, and end with :meth:`freeze_and_load`."""
        super().__init__()
        if not self.full_checkpoints:
            # Checkpoints hold trainable weights only (on_load_checkpoint checks those); set before any strategy loads.
            self.strict_loading = False
        self.optimizer = optimizer
        self.scheduler = scheduler
        if not isinstance(stage, StageSchedule):
            stage = StageSchedule([Milestone(0, stage or self.default_stage())])
        for milestone in stage.stages:  # a stage that names no trainable parts trains the default ones
            if milestone.stage.trainable is None:
                milestone.stage = dataclasses.replace(
                    milestone.stage, trainable=self.default_stage().trainable
                )
        self.schedule = stage  # the run's stages; a single stage is a schedule of one
        self.stage_index = 0  # index in schedule.stages of the stage that trains now
        self.stage = stage.stages[0].stage  # the stage that trains now
        # seeds every training step's random draws (seed_step); kept in checkpoints
        self.run_seed: int | None = None

    # -- what a subclass provides -----------------------------------------------------------------------------
    @classmethod
    @abstractmethod
    def default_stage(cls) -> Stage:
        """What trains when the config names no stage (or a stage without ``trainable``)."""
        raise NotImplementedError(
            f"{cls.__name__} must say what trains by default: implement default_stage()"
        )

    @abstractmethod
    def parts(self) -> Parts:
        """The named parts a stage can train (one may sit inside another)."""
        raise NotImplementedError(f"{type(self).__name__} must name its parts: implement parts()")

    def check_schedule(self, parts: Parts) -> None:
        """Refuse a schedule this module cannot run; called by :meth:`freeze_and_load` once the adapters are in and
        before ``init_from`` loads. Nothing by default."""

    # -- the stage --------------------------------------------------------------------------------------------
    def freeze_and_load(self, init_from: str | None = None) -> None:
        """End of a subclass's ``__init__``: apply the stage (every stage of the schedule checked against the
        parts, LoRA adapters of all of them injected), then load ``init_from`` if given."""
        parts = self.parts()
        for milestone in self.schedule.stages:
            milestone.stage.check(parts)
        for name, spec in self.schedule.adapters().items():
            for module in resolve(parts, name):
                add_lora(module, spec, name)
        apply_stage(parts, self.stage)
        self.check_schedule(parts)
        if init_from is not None:
            load_weights(self, init_from)

    def train(self, mode: bool = True):
        super().train(mode)
        if mode:  # frozen parts stay in eval mode whatever Lightning asks
            set_modes(self.parts(), self.stage)
        return self

    def on_train_batch_start(self, batch, batch_idx: int) -> None:
        index = self.schedule.index_at(self.global_step)
        if index != self.stage_index:
            self.enter_stage(index)
        self.seed_step(batch_idx)

    def seed_step(self, batch_idx: int) -> None:
        """Seed torch's generators (CPU and CUDA) for this training batch from (run seed, epoch, batch, rank).

        A step's random draws (dropout, LoRA dropout, hard negatives) then depend on the step alone, not on all that
        drew before it (validations, loader iterators): a run resumed from a checkpoint draws what an uninterrupted
        run draws at the same step, which a saved generator state would not give (Lightning saves none, and what
        draws between the checkpoint and the next step differs between the two runs). The run seed is drawn from
        the (seeded) generator at the first step, the same on every rank, and kept in checkpoints."""
        if self.run_seed is None:
            seed = int(torch.randint(0, 2**62, ()).item())
            self.run_seed = int(self.trainer.strategy.broadcast(seed, src=0))
        key = [self.run_seed, self.current_epoch, batch_idx, self.global_rank]
        high, low = np.random.SeedSequence(key).generate_state(2)
        torch.manual_seed(int(high) << 32 | int(low))

    def enter_stage(self, index: int) -> None:
        """Make ``schedule.stages[index]`` the stage that trains: re-freeze, and during a fit build a new optimizer
        over exactly its trainable parameters (checked), print its table, and under DDP re-wrap the model so
        gradients of the newly trainable parameters are reduced."""
        previous = self.stage
        self.stage_index = index
        self.stage = self.schedule.stages[index].stage
        apply_stage(self.parts(), self.stage)
        for p in self.parameters():
            if not p.requires_grad:
                p.grad = None
        trainer = self._trainer
        if trainer is None or not trainer.training:
            return
        strategy = trainer.strategy
        if isinstance(strategy, DDPStrategy) and isinstance(strategy.model, DistributedDataParallel):
            self._wrap_ddp_again(strategy)
        elif strategy.model is not self:
            raise NotImplementedError(
                f"switching stages within a run supports single-device and DDP training, not "
                f"{type(strategy).__name__}; run the stages as separate runs (init_from the previous checkpoint)"
            )
        strategy.setup_optimizers(trainer)
        in_optimizer = {id(p) for o in trainer.optimizers for g in o.param_groups for p in g["params"]}
        trainable = {id(p) for p in self.parameters() if p.requires_grad}
        if in_optimizer != trainable:
            raise RuntimeError(
                f"after entering stage {self.stage.name!r} the optimizer holds {len(in_optimizer)} parameters but "
                f"{len(trainable)} train; configure_optimizers must cover exactly the trainable parameters"
            )
        rank_zero_info(
            f"step {self.global_step}: stage {previous.name!r} -> {self.stage.name!r}, new optimizer over "
            f"{len(trainable)} tensors\n" + trainable_table(self.parts(), self.stage)
        )

    def _wrap_ddp_again(self, strategy: DDPStrategy) -> None:
        """DDP reduces the gradients of the parameters that trained when it wrapped the model, and silently not the
        others: unwrap and wrap again for the new stage."""
        strategy.model = self
        strategy.configure_ddp()

    # -- what a run logs at its start -------------------------------------------------------------------------
    def describe(self) -> dict[str, int | str]:
        """Figures logged as hyperparameters of every run, so runs can be compared on them: the stage (and the
        schedule, if several), parameters per part and in all, trainable and total. Subclasses add their own."""
        facts: dict[str, int | str] = {"stage": self.stage.name}
        if len(self.schedule.stages) > 1:
            facts["stages"] = self.schedule.describe()
        for name, (total, trainable) in part_counts(self.parts(), self.stage).items():
            facts[f"params/{name}"], facts[f"params_trainable/{name}"] = total, trainable
        facts["params/total"], facts["params_trainable/total"] = count(self)
        return facts

    def on_fit_start(self) -> None:
        if len(self.schedule.stages) > 1:
            rank_zero_info(f"stages: {self.schedule.describe()}")
        rank_zero_info(trainable_table(self.parts(), self.stage))
        if self.logger is not None:
            self.logger.log_hyperparams(self.describe())

    # -- checkpoints: trainable weights (+ optimizer state); frozen weights are rebuilt from their source --------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # state_dict is absent when a strategy saves the weights itself (sharded FSDP / DeepSpeed)
        if "state_dict" in checkpoint and not self.full_checkpoints:
            frozen = trainable_names(self, trains=False)
            checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k not in frozen}
        checkpoint["lit_mllm"] = {
            "stage": self.stage.name,
            "stage_index": self.stage_index,
            "frozen_weights": "in the checkpoint"
            if self.full_checkpoints
            else "rebuilt from the config's sources",
            "run_seed": self.run_seed,
        }

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        # Of a schedule, the stage that wrote the checkpoint (its optimizer state is in it); a milestone reached at
        # the checkpoint's step is entered at the next batch, as in an uninterrupted run.
        saved = checkpoint.get("lit_mllm") or {}
        self.run_seed = saved.get("run_seed", self.run_seed)
        index = saved.get("stage_index")
        if not isinstance(index, int) or not 0 <= index < len(self.schedule.stages):
            index = self.schedule.index_at(checkpoint.get("global_step", 0))
        if index != self.stage_index:
            self.stage_index = index
            self.stage = self.schedule.stages[index].stage
            apply_stage(self.parts(), self.stage)
        if "state_dict" not in checkpoint:  # FSDP has loaded (and removed) the weights already
            return
        missing = sorted(trainable_names(self) - checkpoint["state_dict"].keys())
        if missing:
            raise KeyError(
                f"the checkpoint lacks {len(missing)} weights that stage {self.stage.name!r} trains (e.g. {missing[:3]}); "
                f"it was saved by stage {saved.get('stage', '?')!r}. Use the same stage, "
                "or start from it with the weights as initialisation"
            )

    # -- optimisation -----------------------------------------------------------------------------------------
    def configure_optimizers(self):
        """One optimizer over parameter groups per part (stage ``lr_scale``; no weight decay on norms, biases,
        embeddings and logit scales); every trainable parameter must be in it."""
        groups = param_groups(self.parts(), self.stage)
        if not groups:
            raise ValueError(f"stage {self.stage.name!r} leaves nothing to train")
        optimizer = self.optimizer(groups)
        for group in optimizer.param_groups:
            group["lr"] = group["lr"] * group["lr_scale"]
        in_optimizer = {id(p) for g in optimizer.param_groups for p in g["params"]}
        missing = [n for n, p in self.named_parameters() if p.requires_grad and id(p) not in in_optimizer]
        if missing:
            raise ValueError(
                f"trainable parameters outside the optimizer: {missing[:5]} ({len(missing)} in all)"
            )
        if self.scheduler is None:
            return optimizer
        scheduler = self.scheduler(optimizer)
        if getattr(scheduler, "total_steps", 0) is None:  # spans the stage (for one stage: the run)
            run_steps = int(self.trainer.estimated_stepping_batches)
            scheduler.total_steps = self.schedule.steps_of(self.stage_index, run_steps)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
