"""What every family's LightningModule shares: the stage (what trains), the language-modelling loss on
supervised tokens, metrics, optimizer wiring and prediction. A family adds its parts and ``forward``.

Metric names are ``split/name``: ``train/loss``, ``val/loss``, ``val/accuracy`` (reply exact match,
see :mod:`lit_mllm.eval.metrics`), ``test/...``.
"""

from __future__ import annotations

from abc import abstractmethod

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torchmetrics import MeanMetric

from lit_mllm.data.processor import Processor
from lit_mllm.eval.metrics import ReplyExactMatch
from lit_mllm.nn.language.chat import IGNORE_INDEX
from lit_mllm.training.peft import add_lora
from lit_mllm.training.stages import (
    Milestone,
    Stage,
    StageSchedule,
    apply_stage,
    count,
    param_groups,
    set_modes,
    trainable_names,
    trainable_table,
)


class NoSupervisedTokens(ValueError):
    """A batch has nothing to learn: its loss would be a silent zero."""


def supervised(labels: Tensor) -> Tensor:
    """``[R, L-1]`` mask of the positions whose next token is learned (``labels[:, 1:] != -100``)."""
    return labels[:, 1:] != IGNORE_INDEX


def token_losses(logits: Tensor, target: Tensor, ids: list[str] | None = None) -> Tensor:
    """fp32 cross-entropy of each supervised position (``logits [S, V]``, ``target [S]``) -> ``[S]``.

    A batch with no supervised token raises :class:`NoSupervisedTokens` naming its samples."""
    if target.numel() == 0:
        raise NoSupervisedTokens(
            f"batch of samples {ids} has no supervised token (every label is -100); check the chat format "
            "and that each sample ends with a non-empty assistant reply"
        )
    return F.cross_entropy(logits.float(), target, reduction="none")


def lm_loss(logits: Tensor, labels: Tensor, ids: list[str] | None = None) -> Tensor:
    """Mean next-token cross-entropy over supervised tokens: ``logits [B, L, V]`` predict ``labels [B, L]``
    shifted by one (see :func:`token_losses`)."""
    mask = supervised(labels)
    return token_losses(logits[:, :-1][mask], labels[:, 1:][mask], ids).mean()


class VLMModule(L.LightningModule):
    """Base of the family modules; subclasses define ``parts``, ``forward``, ``processor`` and ``generate``."""

    def __init__(
        self,
        stage: Stage | StageSchedule | None = None,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        scheduler: LRSchedulerCallable | None = None,
        max_new_tokens: int = 32,
    ) -> None:
        super().__init__()
        # Checkpoints hold trainable weights only (on_load_checkpoint checks those); set before any strategy loads.
        self.strict_loading = False
        if not isinstance(stage, StageSchedule):
            stage = StageSchedule([Milestone(0, stage or Stage())])
        self.schedule = stage  # the run's stages; a single stage is a schedule of one
        self.stage_index = 0  # index in schedule.stages of the stage that trains now
        self.stage = stage.stages[0].stage  # the stage that trains now
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.max_new_tokens = max_new_tokens
        self.metrics = nn.ModuleDict(
            {
                f"{split}_{m}": (ReplyExactMatch() if m == "accuracy" else MeanMetric())
                for split in ("val", "test")
                for m in ("loss", "accuracy")
            }
        )

    # -- to be provided by a family ---------------------------------------------------------------------------
    @abstractmethod
    def parts(self) -> dict[str, nn.Module]:
        """The named parts a stage can train (e.g. ``vision_tower``, ``connector``, ``language_model``)."""

    @abstractmethod
    def processor(self) -> Processor:
        """The processor the DataModule uses to turn samples into this model's inputs."""

    @abstractmethod
    def generate(self, batch: dict, **kwargs) -> list[str]:
        """Decoded continuations of a left-padded generation batch."""

    # -- stage ------------------------------------------------------------------------------------------------
    def apply_stage(self) -> None:
        """Freeze all parts but the stage's; call at the end of a family's ``__init__``. Every stage of the schedule
        is checked against the parts, and the LoRA adapters of all of them are injected now."""
        parts = self.parts()
        for milestone in self.schedule.stages:
            milestone.stage.check(parts)
        for name, spec in self.schedule.adapters().items():
            add_lora(parts[name], spec, name)
        apply_stage(parts, self.stage)

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

    def on_train_batch_start(self, batch: dict, batch_idx: int) -> None:
        index = self.schedule.index_at(self.global_step)
        if index != self.stage_index:
            self.enter_stage(index)

    def train(self, mode: bool = True):
        super().train(mode)
        if mode:  # frozen parts stay in eval mode whatever Lightning asks
            set_modes(self.parts(), self.stage)
        return self

    def describe(self) -> dict[str, int | str]:
        """Figures logged as hyperparameters of every run, so runs can be compared on them."""
        facts: dict[str, int | str] = {"stage": self.stage.name}
        if len(self.schedule.stages) > 1:
            facts["stages"] = self.schedule.describe()
        for name, part in self.parts().items():
            facts[f"params/{name}"], facts[f"params_trainable/{name}"] = count(part)
        facts["params/total"], facts["params_trainable/total"] = count(self)
        return facts

    def on_fit_start(self) -> None:
        if len(self.schedule.stages) > 1:
            rank_zero_info(f"stages: {self.schedule.describe()}")
        rank_zero_info(trainable_table(self.parts(), self.stage))
        if self.logger is not None:
            self.logger.log_hyperparams(self.describe())

    # -- steps ------------------------------------------------------------------------------------------------
    def supervised_logits(self, batch: dict) -> tuple[Tensor, Tensor, Tensor]:
        """``(logits [S, V], targets [S], sample index [S])`` at the ``S`` positions whose next token is learned.

        This default slices full logits; a family computes the vocabulary projection at those positions only."""
        mask = supervised(batch["labels"])  # [R, L-1]
        return self(batch)[:, :-1][mask], batch["labels"][:, 1:][mask], batch["sample_index"][:, 1:][mask]

    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        logits, target, which = self.supervised_logits(batch)
        losses = token_losses(logits, target, batch["ids"])  # [S]
        loss = losses.mean()
        if not torch.isfinite(loss):
            raise FloatingPointError(
                f"training loss is {loss.item()} at step {self.global_step} on samples {batch['ids']}; lower the "
                "learning rate, check these samples, or use bf16-mixed instead of fp16"
            )
        n = len(batch["ids"])
        self.log("train/loss", loss, prog_bar=True, batch_size=n)
        self._log_sources(batch, losses.detach(), which)
        return loss

    def _log_sources(self, batch: dict, losses: Tensor, which: Tensor) -> None:
        """``train/loss/<source>`` (mean over the source's supervised tokens in the batch) and the DataModule's
        ``data/...`` figures (realised ratio per source, skipped samples per reason)."""
        for key, value in batch.get("data_stats", {}).items():
            self.log(f"data/{key}", float(value), batch_size=len(batch["ids"]))
        names = sorted(set(batch["sources"]))
        if len(names) < 2 and not batch.get("data_stats"):
            return
        of_sample = torch.tensor([names.index(s) for s in batch["sources"]], device=losses.device)
        of_token = of_sample[which]
        sums = torch.zeros(len(names), device=losses.device).index_add_(0, of_token, losses.float())
        counts = torch.bincount(of_token, minlength=len(names))
        for k, name in enumerate(names):
            if name:
                self.log(
                    f"train/loss/{name}",
                    sums[k] / counts[k].clamp(min=1),
                    batch_size=batch["sources"].count(name),
                )

    def _eval_step(self, batch: dict, split: str) -> None:
        if not batch["ids"]:  # every sample of the batch was bad and skipped
            return
        logits = self(batch)
        loss = lm_loss(logits, batch["labels"], batch["ids"])
        tokens = supervised(batch["labels"]).sum()
        self.metrics[f"{split}_loss"].update(loss, weight=tokens)
        self.metrics[f"{split}_accuracy"].update(logits, batch["labels"])
        self.log(f"{split}/loss", self.metrics[f"{split}_loss"], prog_bar=True, batch_size=len(batch["ids"]))
        self.log(
            f"{split}/accuracy",
            self.metrics[f"{split}_accuracy"],
            prog_bar=True,
            batch_size=len(batch["ids"]),
        )

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self._eval_step(batch, "val")

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self._eval_step(batch, "test")

    def predict_step(self, batch: dict, batch_idx: int) -> list[dict]:
        answers = self.generate(batch, max_new_tokens=self.max_new_tokens)
        return [
            {"id": i, "prompt": p, "answer": a, "reference": r}
            for i, p, a, r in zip(batch["ids"], batch["prompt"], answers, batch["reference"])
        ]

    # -- checkpoints: trainable weights (+ optimizer state); frozen weights are rebuilt from their source --------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        if (
            "state_dict" in checkpoint
        ):  # absent when a strategy saves the weights itself (sharded FSDP / DeepSpeed)
            frozen = trainable_names(self, trains=False)
            checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k not in frozen}
        checkpoint["lit_mllm"] = {
            "stage": self.stage.name,
            "stage_index": self.stage_index,
            "frozen_weights": "rebuilt from the config's sources",
        }

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        # Of a schedule, the stage that wrote the checkpoint (its optimizer state is in it); a milestone reached at
        # the checkpoint's step is entered at the next batch, as in an uninterrupted run.
        index = (checkpoint.get("lit_mllm") or {}).get("stage_index")
        if not isinstance(index, int) or not 0 <= index < len(self.schedule.stages):
            index = self.schedule.index_at(checkpoint.get("global_step", 0))
        if index != self.stage_index:
            self.stage_index = index
            self.stage = self.schedule.stages[index].stage
            apply_stage(self.parts(), self.stage)
        if "state_dict" not in checkpoint:  # FSDP has loaded (and removed) the weights already
            return
        trainable = trainable_names(self)
        missing = sorted(trainable - checkpoint["state_dict"].keys())
        if missing:
            raise KeyError(
                f"the checkpoint lacks {len(missing)} weights that stage {self.stage.name!r} trains (e.g. {missing[:3]}); "
                f"it was saved by stage {checkpoint.get('lit_mllm', {}).get('stage', '?')!r}. Use the same stage, "
                "or start from it with the weights as initialisation"
            )

    # -- optimisation -----------------------------------------------------------------------------------------
    def configure_optimizers(self):
        """One optimizer over parameter groups per part (stage ``lr_scale``; no weight decay on norms, biases and
        embeddings); every trainable parameter must be in it."""
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
