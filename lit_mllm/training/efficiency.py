"""Efficiency options that live outside the model: gradient accumulation derived from a global batch size, and
8-bit AdamW (bitsandbytes).

The other options are init arguments of the parts or trainer flags, so each is one line of YAML (see
``configs/efficiency/``):

* precision: ``trainer.precision: bf16-mixed`` (CPU and recent GPUs) or ``16-mixed`` (CUDA only, with loss
  scaling; Lightning falls back to bf16-mixed on a CPU). The loss is computed in float32 from the logits either
  way. ``language_model.init_args.dtype: bfloat16`` holds a frozen LLM's weights in bf16 while the trainable
  parts stay float32 (``bf16-true`` would cast the trainable parts too);
* gradient checkpointing: ``gradient_checkpointing: true`` on the language model and on the vision tower;
* ``torch.compile``: ``compile: true`` on the language model (each decoder layer).
"""

from __future__ import annotations

from collections.abc import Iterable

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info


class GlobalBatchSize(L.Callback):
    """Accumulate gradients over as many batches as it takes to reach a global batch size.

    ``accumulate_grad_batches = global_batch_size / (batch_size x world_size)``, with ``batch_size`` the
    DataModule's samples per batch and rank, and ``world_size`` the number of processes (devices x nodes). It is
    set in the ``setup`` hook of a fit, before the optimizer and the learning-rate schedule are built, so
    ``trainer.estimated_stepping_batches`` (the schedule's length) counts optimizer steps of the global batch.
    """

    def __init__(self, global_batch_size: int) -> None:
        """
        Args:
            global_batch_size: Samples per optimizer step summed over all processes (LLaVA-1.5: 256 for align,
                128 for finetune); a multiple of ``data.batch_size`` times the number of processes.
        """
        if global_batch_size < 1:
            raise ValueError(
                f"global_batch_size must be a positive number of samples, not {global_batch_size}"
            )
        self.global_batch_size = global_batch_size
        self.accumulate_grad_batches: int | None = None
        """What the last fit chose."""

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        batch_size = getattr(trainer.datamodule, "batch_size", None)
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(
                "GlobalBatchSize reads the per-device batch size from the DataModule's `batch_size` attribute, but "
                f"{type(trainer.datamodule).__name__} has {batch_size!r}; use a DataModule with an integer "
                "batch_size (MixtureData has one), or set trainer.accumulate_grad_batches yourself"
            )
        world_size = trainer.world_size
        per_step = batch_size * world_size
        if self.global_batch_size % per_step:
            lower = max(per_step, self.global_batch_size // per_step * per_step)
            raise ValueError(
                f"global_batch_size={self.global_batch_size} is not a multiple of batch_size {batch_size} x "
                f"{world_size} process(es) = {per_step} samples per batch: use global_batch_size {lower} or "
                f"{lower + per_step}, or a batch_size that divides {self.global_batch_size // world_size}"
            )
        accumulate = self.global_batch_size // per_step
        if trainer.accumulate_grad_batches not in (1, accumulate):
            raise ValueError(
                f"trainer.accumulate_grad_batches={trainer.accumulate_grad_batches} is set and GlobalBatchSize "
                f"derives {accumulate} from global_batch_size={self.global_batch_size}; set only one of them"
            )
        if accumulate > 1 and not pl_module.automatic_optimization:
            raise ValueError(
                f"GlobalBatchSize needs {accumulate} accumulated batches, which Lightning does only under automatic "
                "optimization; lower global_batch_size to batch_size x processes or accumulate in training_step"
            )
        trainer.accumulate_grad_batches = accumulate
        self.accumulate_grad_batches = accumulate
        rank_zero_info(
            f"GlobalBatchSize: {self.global_batch_size} samples per optimizer step = batch_size {batch_size} x "
            f"{world_size} process(es) x accumulate_grad_batches {accumulate}"
        )
        for logger in trainer.loggers:
            logger.log_hyperparams(
                {"global_batch_size": self.global_batch_size, "accumulate_grad_batches": accumulate}
            )


BITSANDBYTES_MISSING = (
    "AdamW8bit needs bitsandbytes, which is not installed: `pip install bitsandbytes` (its 8-bit optimizers "
    "run on CUDA GPUs; a CPU build has none), or use torch.optim.AdamW"
)


class AdamW8bit(torch.optim.Optimizer):
    """AdamW with 8-bit block-wise optimizer states (Dettmers et al. 2022, "8-bit Optimizers via Block-wise
    Quantization"): ``bitsandbytes.optim.AdamW8bit`` behind a typed signature that imports without bitsandbytes.

    Constructing it returns the bitsandbytes optimizer itself (Lightning and checkpoints see that class), or raises
    an ``ImportError`` saying how to install bitsandbytes when it is missing."""

    def __new__(
        cls,
        params: Iterable,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        min_8bit_size: int = 4096,
        paged: bool = False,
    ) -> torch.optim.Optimizer:
        """
        Args:
            params: Parameters or parameter groups (filled in by the model).
            lr: Learning rate.
            betas: Coefficients of the running averages of the gradient and its square.
            eps: Added to the denominator for numerical stability.
            weight_decay: Decoupled weight decay (groups of norms, biases and embeddings override it with 0).
            min_8bit_size: Tensors with fewer elements keep 32-bit states (bitsandbytes' default 4096).
            paged: Page the states to CPU memory under GPU memory pressure (``PagedAdamW8bit``).
        """
        try:
            import bitsandbytes
        except ImportError as err:
            raise ImportError(BITSANDBYTES_MISSING) from err
        optimizer = bitsandbytes.optim.PagedAdamW8bit if paged else bitsandbytes.optim.AdamW8bit
        return optimizer(
            params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, min_8bit_size=min_8bit_size
        )
