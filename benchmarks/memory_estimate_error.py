"""How far the memory estimate (``lit-mllm estimate-memory``, :mod:`lit_mllm.training.memory`) is from the
peak memory of real training steps.

    python benchmarks/memory_estimate_error.py            # every case (CPU: a few minutes)
    python benchmarks/memory_estimate_error.py --quick    # the three stages only

Each case builds a small model from ``configs/quickstart.yaml`` (wider than the quickstart, so that weights,
optimizer states and activations all weigh), takes one real batch of generated ShapesWorld data, runs two
training steps of the config's Trainer on it (the second step is the steady state: optimizer states exist and
the first step's gradients live until ``zero_grad``) and measures the peak:

- CUDA: ``torch.cuda.max_memory_allocated`` over the fit;
- CPU: the peak of live tensor storage bytes, tracked by a ``TorchDispatchMode`` that registers every storage
  an operator returns and a weak reference that removes it when the storage is freed (parameters, buffers and
  the batch registered up front). It counts tensors, not allocator overhead or kernels' internal scratch
  buffers.

The estimate is given the batch's real shape (rows, length, tower inputs, supervised positions, padding). The
relative error is ``|estimate - measured| / measured``; the last line is
``memory_estimate_error: <max over cases>``.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import weakref
from dataclasses import dataclass, fields
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

# harness.py sits beside this file; on the path also when the tests load this file by its path
sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness

from lit_mllm.commands.lightning import build_cli
from lit_mllm.training.memory import estimate_memory

ROOT = Path(__file__).resolve().parents[1]
MIB = 2**20
SIZES = {  # wider than the quickstart's (vision 64, LLM 128), so weights, optimizer states and activations weigh
    "vision_dim": (128, 128),
    "llm_dim": (256, 256),
    "image_size": (64, 64),
}


@dataclass
class Case:
    name: str
    trainable: list[str]
    precision: str = "32-true"
    checkpointing: bool = False
    extra: list[str] | None = None  # further CLI args (optimizer, partly trained tower)


CASES = [
    Case("align", ["connector"]),
    Case("finetune", ["connector", "language_model"]),
    Case("all", ["vision_tower", "connector", "language_model"]),
    Case("finetune bf16-mixed", ["connector", "language_model"], precision="bf16-mixed"),
    Case("finetune bf16-true", ["connector", "language_model"], precision="bf16-true"),
    Case("finetune checkpointed", ["connector", "language_model"], checkpointing=True),
    Case(
        "align last tower block",
        ["connector"],
        extra=["--model.init_args.stage.train_last_blocks={vision_tower: 1}"],
    ),
    Case(
        "finetune SGD momentum",
        ["connector", "language_model"],
        extra=[
            "--model.init_args.optimizer=torch.optim.SGD",
            "--model.init_args.optimizer.init_args.lr=0.01",
            "--model.init_args.optimizer.init_args.momentum=0.9",
        ],
    ),
]


class PeakTensorMemory(TorchDispatchMode):
    """Peak bytes of live tensor storages: every storage an operator returns is counted until it is freed."""

    def __init__(self) -> None:
        super().__init__()
        self.live: dict[int, int] = {}
        self.refs: dict[int, weakref.ref] = {}
        self.current = 0
        self.peak = 0

    def track(self, *tensors: torch.Tensor) -> None:
        """Count tensors that exist before the mode starts (parameters, buffers, the batch)."""
        for t in tensors:
            self._add(t)
        self.peak = max(self.peak, self.current)

    def _add(self, t: torch.Tensor) -> None:
        if t.device.type == "meta":
            return
        storage = t.untyped_storage()
        key = id(storage)
        if key in self.live:
            return
        self.live[key] = storage.nbytes()
        self.current += self.live[key]
        self.refs[key] = weakref.ref(storage, lambda _, key=key: self._free(key))

    def _free(self, key: int) -> None:
        self.current -= self.live.pop(key, 0)
        self.refs.pop(key, None)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self._add(t)
        self.peak = max(self.peak, self.current)
        return out


def build(case: Case, args: argparse.Namespace, data_root: Path):
    cli_args = [
        "--config",
        str(ROOT / "configs" / "quickstart.yaml"),
        "--data.init_args.root",
        str(data_root),
        "--data.init_args.num_workers=0",
        f"--data.init_args.batch_size={args.batch}",
        "--data.init_args.generate_if_missing.init_args.num_train=32",
        "--data.init_args.generate_if_missing.init_args.num_val=4",
        "--data.init_args.generate_if_missing.init_args.num_test=4",
        f"--model.init_args.vision_tower.init_args.hidden_size={args.vision_dim}",
        f"--model.init_args.vision_tower.init_args.image_size={args.image_size}",
        f"--model.init_args.language_model.class_path=lit_mllm.nn.language.{args.llm}",
        f"--model.init_args.language_model.init_args.hidden_size={args.llm_dim}",
        f"--model.init_args.stage.name={case.name.split()[0]}",
        f"--model.init_args.stage.trainable=[{', '.join(case.trainable)}]",
        f"--trainer.accelerator={'gpu' if args.device == 'cuda' else 'cpu'}",
        "--trainer.devices=1",
        f"--trainer.precision={case.precision}",
        "--trainer.max_steps=2",
        "--trainer.limit_val_batches=0",
        "--trainer.num_sanity_val_steps=0",
        "--trainer.logger=false",
        f"--trainer.default_root_dir={data_root.parent}",  # where the CLI saves the resolved config
        "--trainer.callbacks=[]",
        "--trainer.enable_checkpointing=false",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
        *(case.extra or []),
    ]
    return build_cli(cli_args, run=False)


def measure(case: Case, args: argparse.Namespace, data_root: Path) -> dict:
    cli = build(case, args, data_root)
    model, trainer, dm = cli.model, cli.trainer, cli.datamodule
    if case.checkpointing:
        model.language_model.model.gradient_checkpointing_enable(
            gradient_checkpointing_kwargs={"use_reentrant": False}
        )
    dm.prepare_data()
    dm.setup("fit")
    batch, _ = next(iter(dm.train_dataloader()))
    rows, length = batch.input_ids.shape
    images = 0 if batch.pixel_values is None else batch.pixel_values.shape[0]
    supervised = int((batch.labels[:, 1:] != -100).sum())
    padded = batch.attention_mask is not None and not bool(batch.attention_mask.all())
    estimate = estimate_memory(
        model,
        batch_size=rows,
        seq_len=length,
        images_per_sample=images // rows,
        supervised_tokens=supervised / rows,
        precision=case.precision,
        activation_checkpointing=case.checkpointing,
        attention_mask=padded,
        accelerator=args.device,
    )
    loader = torch.utils.data.DataLoader([batch, batch], batch_size=None, collate_fn=lambda b: b)
    if args.device == "cuda":
        torch.cuda.empty_cache()
        # over what is allocated before: the model is still on the CPU, so nothing of the case yet
        with harness.timed(torch.device("cuda"), cuda_memory=True) as measured:
            trainer.fit(model, train_dataloaders=loader)
        peak = measured.peak_bytes
    else:
        tracker = PeakTensorMemory()
        batch_tensors = [getattr(batch, f.name) for f in fields(batch)]
        tensors = [*model.parameters(), *model.buffers(), *(v for v in batch_tensors if torch.is_tensor(v))]
        tracker.track(*tensors)
        with tracker:
            trainer.fit(model, train_dataloaders=loader)
        peak = tracker.peak
    gradients = sum(p.grad.nbytes for p in model.parameters() if p.grad is not None)
    optimizer = trainer.optimizers[0]
    states = sum(
        v.nbytes for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v) and v.numel() > 1
    )
    return {
        "case": case.name,
        "precision": case.precision,
        "shape": f"{rows}x{length}",
        "estimate": estimate.total,
        "measured": peak,
        "grad_opt_estimate": estimate.gradients + estimate.optimizer,
        "grad_opt_measured": gradients + states,
        "activations_estimate": estimate.activations,
        "phase": estimate.peak_phase,
        "error": abs(estimate.total - peak) / peak,
    }


def report(results: list[dict], args: argparse.Namespace) -> float:
    how = (
        "torch.cuda.max_memory_allocated over a 2-step fit"
        if args.device == "cuda"
        else "peak live tensor-storage bytes over a 2-step fit (TorchDispatchMode tracker; parameters, "
        "buffers and the batch counted from the start)"
    )
    print(
        f"device {args.device}, vision width {args.vision_dim} at {args.image_size} px, {args.llm} width "
        f"{args.llm_dim} (4 layers), "
        f"batch {args.batch}, "
        f"{torch.get_num_threads()} thread(s)"
    )
    print(f"measured: {how}")
    header = [
        "case",
        "precision",
        "rows x len",
        "estimate MiB",
        "measured MiB",
        "rel. error",
        "grad+opt est/meas MiB",
        "est. activations MiB",
        "estimated peak at",
    ]
    table = [
        [
            r["case"],
            r["precision"],
            r["shape"],
            f"{r['estimate'] / MIB:.2f}",
            f"{r['measured'] / MIB:.2f}",
            f"{r['error']:.3f}",
            f"{r['grad_opt_estimate'] / MIB:.2f} / {r['grad_opt_measured'] / MIB:.2f}",
            f"{r['activations_estimate'] / MIB:.2f}",
            r["phase"],
        ]
        for r in results
    ]
    harness.print_table(header, table, left=(0, 1, 8))
    worst = max(results, key=lambda r: r["error"])
    print(f"largest error: {worst['case']} ({worst['error']:.3f})")
    return harness.headline("memory_estimate_error", worst["error"], 4)


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    quick = "only the three stages (align, finetune, all), fp32"
    parser = harness.parser(__doc__, quick, devices=["cpu", "cuda"], seed=False)
    harness.add_model_sizes(parser, SIZES)
    parser.add_argument(
        "--llm", default="TinyLlama", choices=["TinyLlama", "TinyQwen2"], help="LLM architecture"
    )
    parser.add_argument("--batch", type=int, default=8, help="rows per step")
    parser.add_argument("--cases", nargs="+", default=None, metavar="NAME", help="only the cases named")
    args = parser.parse_args(argv)
    harness.fill_defaults(args, SIZES)
    return args


def main(argv: list[str] | None = None) -> float:
    args = parse(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    harness.setup_device(args)
    cases = CASES[:3] if args.quick else CASES
    if args.cases:
        cases = [c for c in CASES if c.name in args.cases]
    with tempfile.TemporaryDirectory() as tmp:
        results = [measure(case, args, Path(tmp) / "shapesworld") for case in cases]
    return report(results, args)


if __name__ == "__main__":
    main()
