"""How much bigger a training checkpoint is than what it has to hold: the trainable weights and the optimizer state.

    python benchmarks/checkpoint_overhead.py            # a ~60 M parameter model (vocab 32000): CPU, about a minute
    python benchmarks/checkpoint_overhead.py --quick    # a ~1 M parameter model: CPU, seconds

Our checkpoints keep only the weights a stage trains (``VLMModule.on_save_checkpoint``); frozen weights are rebuilt
from the config's sources. For each stage (``align``: connector; ``finetune``: connector + LLM; ``all``: tower +
connector + LLM) a prefix model (CLIP tower, LLaVA-1.5 MLP connector, Llama LLM) trains one step of a real
Lightning ``Trainer`` (AdamW) on a batch of generated ShapesWorld conversations, then ``Trainer.save_checkpoint``
writes a ``.ckpt``. The ratio is the file's bytes over (trainable parameter bytes + optimizer state bytes, i.e. the
tensors of ``optimizer.state``); 1.0 means nothing but what is needed, the frozen parts would push it far above.

The last line is ``checkpoint_overhead: <largest ratio over the stages>``. See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

# harness.py sits beside this file; on the path also when the tests load this file by its path
sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness

from lit_mllm.data import ShapesWorld, collate, read_llava
from lit_mllm.training import Stage

MIB = 2**20
STAGES = {
    "align": ["connector"],
    "finetune": ["connector", "language_model"],
    "all": ["vision_tower", "connector", "language_model"],
}
SIZES = {  # (default: ~60 M parameters, --quick: ~1 M)
    "image_size": (64, 64),
    "patch_size": (8, 8),
    "vision_dim": (256, 64),
    "vision_layers": (4, 3),
    "vision_heads": (4, 2),
    "llm_dim": (512, 128),
    "llm_layers": (8, 2),
    "llm_heads": (8, 4),
    "llm_kv_heads": (4, 2),
    "vocab": (32000, None),
}


@dataclass
class Row:
    stage: str
    trainable: int
    """Trainable parameters."""
    trainable_bytes: int
    optimizer_bytes: int
    frozen_bytes: int
    """Bytes of the frozen parameters, which the checkpoint leaves out."""
    checkpoint_bytes: int
    extra_tensors: int
    """Tensors in the checkpoint's ``state_dict`` that are not trainable parameters (buffers)."""

    @property
    def ratio(self) -> float:
        return self.checkpoint_bytes / (self.trainable_bytes + self.optimizer_bytes)


def measure(args: argparse.Namespace, name: str, trainable: list[str], data: Path, out: Path) -> Row:
    import lightning as L

    model = harness.tiny_prefix_vlm(args, Stage(name, trainable), lr=1e-4)
    proc = model.processor()
    items = [proc(s) for s in read_llava(data / "train.json")[: args.batch]]
    batch = collate(items, pad_token_id=proc.tokenizer.pad_token_id)
    loader = torch.utils.data.DataLoader([batch], batch_size=None, collate_fn=lambda b: b)
    trainer = L.Trainer(
        accelerator="gpu" if args.device.startswith("cuda") else "cpu",
        devices=1,
        precision=args.precision,
        max_steps=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
    )
    trainer.fit(model, train_dataloaders=loader)
    path = out / f"{name}.ckpt"
    trainer.save_checkpoint(path)

    params = harness.unique_params(model)
    trained = [p for p in params if p.requires_grad]
    optimizer_bytes = sum(
        v.nbytes
        for opt in trainer.optimizers
        for state in opt.state.values()
        for v in state.values()
        if isinstance(v, torch.Tensor)
    )
    saved = torch.load(path, map_location="cpu", weights_only=False)["state_dict"]
    trainable_names = {n for n, p in model.named_parameters() if p.requires_grad}
    missing = sorted(trainable_names - saved.keys())
    if missing:
        raise SystemExit(f"stage {name!r}: the checkpoint lacks trainable weights {missing[:3]}")
    return Row(
        stage=name,
        trainable=sum(p.numel() for p in trained),
        trainable_bytes=sum(p.numel() * p.element_size() for p in trained),
        optimizer_bytes=optimizer_bytes,
        frozen_bytes=sum(p.numel() * p.element_size() for p in params if not p.requires_grad),
        checkpoint_bytes=path.stat().st_size,
        extra_tensors=len(saved.keys() - trainable_names),
    )


def run(args: argparse.Namespace) -> list[Row]:
    harness.setup_device(args)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", module="lightning")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "shapesworld"
        ShapesWorld(
            image_size=args.image_size, num_train=args.batch, num_val=1, num_test=1, min_object_px=4
        ).write(data)
        for name in args.stages:
            rows.append(measure(args, name, STAGES[name], data, Path(tmp)))
    return rows


def report(rows: list[Row], args: argparse.Namespace) -> float:
    print(
        f"device {args.device}, precision {args.precision}; tower CLIP {args.image_size} px / patch "
        f"{args.patch_size}, width {args.vision_dim}, {args.vision_layers} layers; LLM Llama width {args.llm_dim}, "
        f"{args.llm_layers} layers, vocab {args.vocab or 'of the tiny tokenizer'}; AdamW; one step on "
        f"{args.batch} ShapesWorld samples, then Trainer.save_checkpoint"
        + (", quick (small widths)" if args.quick else "")
    )
    print("ratio = checkpoint file bytes / (trainable parameter bytes + optimizer state bytes)")
    header = [
        "stage",
        "trainable params",
        "trainable MiB",
        "optimizer MiB",
        "frozen MiB (left out)",
        "other tensors",
        "checkpoint MiB",
        "ratio",
    ]
    table = [
        [
            r.stage,
            f"{r.trainable:,}",
            f"{r.trainable_bytes / MIB:.2f}",
            f"{r.optimizer_bytes / MIB:.2f}",
            f"{r.frozen_bytes / MIB:.2f}",
            str(r.extra_tensors),
            f"{r.checkpoint_bytes / MIB:.2f}",
            f"{r.ratio:.4f}",
        ]
        for r in rows
    ]
    harness.print_table(header, table)
    return harness.headline("checkpoint_overhead", max(r.ratio for r in rows), 4)


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = harness.parser(__doc__, quick="small widths (CPU, seconds)")
    parser.add_argument(
        "--precision",
        default="32-true",
        help="Lightning precision of the training step (32-true, bf16-mixed)",
    )
    parser.add_argument("--stages", nargs="+", choices=list(STAGES), default=list(STAGES))
    harness.add_model_sizes(parser, SIZES)
    parser.add_argument("--batch", type=int, default=4, help="samples in the training batch (4)")
    args = parser.parse_args(argv)
    harness.fill_defaults(args, SIZES)
    return args


def main(argv: list[str] | None = None) -> float:
    args = parse(argv)
    return report(run(args), args)


if __name__ == "__main__":
    main()
