"""Frozen-tower feature cache: wall time of a connector-study arm's epochs 2..N without the cache over with it.

    python benchmarks/feature_cache.py            # 256 samples, 4 epochs
    python benchmarks/feature_cache.py --quick    # 64 samples, 3 epochs

The arm is a toy of a connector study (MM1's: one frozen image encoder at one resolution, the connector varied):
a frozen CLIP-shaped tower much bigger than what trains, an average-pooling connector (MM1's) that trains, and a
small frozen LLM that gradients cross (LLaVA's ``align`` stage), fitted with the Lightning Trainer on ShapesWorld
(written once to a temporary folder) through the real DataModule. The same run is fitted twice, from the same seed:
without the cache, then with a cold cache (``lit_mllm.data.FeatureCache``) that epoch 1 fills and epochs 2..N
read. An epoch's time runs from its start to the next epoch's start (the cache's writes at the epoch's end
included). The loader still decodes and resizes every image in both runs: the cache saves the tower, not the image
pipeline. A third run, another connector (LLaVA-1.5's MLP) over the same tower and resolution, shows a sweep's
next arm reading the first arm's features from its first epoch.

What the figure means: the cache removes the tower's forward pass, so the speed-up is 1 / (1 - the tower's share of
the step), Amdahl's bound. This arm is chosen so the tower dominates (as in connector and probing studies with a
small LLM, or tiled high-resolution layouts); for a LLaVA-7B-sized LLM the tower is a few percent of a step and so
is the saving. The line before the headline gives the tower share the measured times imply.

The last line is ``feature_cache_speedup: <uncached epochs 2..N time / cached epochs 2..N time>`` (goal >= 3).
"""

from __future__ import annotations

import argparse
import functools
import logging
import math
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import lightning as L
import torch

# harness.py sits beside this file; on the path also when the tests load this file by its path
sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness

from lit_mllm.data import Conversations, FeatureCache, MixtureData, ShapesWorld
from lit_mllm.lit import PrefixFusionVLM
from lit_mllm.nn.connectors import AvgPoolConnector, MLPConnector
from lit_mllm.nn.language import TinyLlama
from lit_mllm.nn.vision import TinyCLIPVision
from lit_mllm.training import Stage

SIZES = {  # option -> (default, --quick default)
    "image_size": (96, 96),
    "patch_size": (8, 8),
    "vision_dim": (256, 256),
    "vision_layers": (7, 7),
    "vision_heads": (4, 4),
    "llm_dim": (128, 128),
    "llm_layers": (2, 2),
    "llm_heads": (4, 4),
    "llm_kv_heads": (2, 2),
}
RUN = {  # option -> (default, --quick default)
    "samples": (256, 64),
    "epochs": (4, 3),
}
ALIGN = Stage(name="align", trainable=["connector"])


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = harness.parser(__doc__, "64 samples, 3 epochs (a CPU smoke run)")
    p.add_argument(
        "--samples", type=int, default=None, help="training samples (one image each); 256 (64 quick)"
    )
    p.add_argument("--epochs", type=int, default=None, help="epochs per run, >= 2; 4 (3 quick)")
    p.add_argument("--batch", type=int, default=16, help="samples per batch")
    p.add_argument(
        "--workers", type=int, default=0, help="loader worker processes (0: in the training process)"
    )
    p.add_argument("--dtype", default="bfloat16", choices=["float16", "bfloat16", "float32"], help="storage")
    p.add_argument("--out-tokens", type=int, default=36, help="image tokens after the connector's pooling")
    p.add_argument("--cache-root", default=None, help="cache folder (default: a fresh temporary one)")
    harness.add_model_sizes(p, SIZES)
    args = p.parse_args(argv)
    harness.fill_defaults(args, {**SIZES, **RUN})
    if args.epochs < 2:
        p.error("--epochs must be >= 2: epoch 1 fills the cache, epochs 2..N are timed")
    return args


@dataclass
class Fit:
    """What one run measured."""

    name: str
    epoch_seconds: list[float] = field(default_factory=list)
    served: list[tuple[int, int]] = field(default_factory=list)
    """(hits, misses) per epoch; empty without a cache."""
    last_epoch_loss: float = math.nan


class EpochClock(L.Callback):
    """Epoch times (start to the next start, or to the end of training), cache counts and the last epoch's loss."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.starts, self.served, self.losses = device, [], [], []

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        harness.sync(self.device)
        self.starts.append(time.perf_counter())
        self.losses = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(float(outputs["loss"]))

    def on_train_epoch_end(self, trainer, pl_module) -> None:  # before the module's hook takes the counts
        cache = pl_module.feature_cache
        if cache is not None:
            self.served.append((cache.epoch.hits, cache.epoch.misses))

    def on_train_end(self, trainer, pl_module) -> None:
        harness.sync(self.device)
        self.starts.append(time.perf_counter())


def build(args: argparse.Namespace, connector, cache: FeatureCache | None) -> PrefixFusionVLM:
    """The arm's model, weights drawn from ``args.seed`` (tower first, so every arm has the same tower)."""
    torch.manual_seed(args.seed)
    tower = TinyCLIPVision(
        image_size=args.image_size,
        patch_size=args.patch_size,
        hidden_size=args.vision_dim,
        num_layers=args.vision_layers,
        num_heads=args.vision_heads,
        feature_layer=-2,
    )
    lm = TinyLlama(
        hidden_size=args.llm_dim,
        num_layers=args.llm_layers,
        num_heads=args.llm_heads,
        num_kv_heads=args.llm_kv_heads,
    )
    return PrefixFusionVLM(
        tower,
        lm,
        connector=connector,
        stage=ALIGN,
        optimizer=functools.partial(torch.optim.AdamW, lr=1e-3),
        feature_cache=cache,
    )


def fit(args, name: str, root: Path, connector, cache: FeatureCache | None, epochs: int) -> Fit:
    model = build(args, connector, cache)
    data = MixtureData(
        str(root),
        train={"shapesworld": Conversations("train.json")},
        batch_size=args.batch,
        num_workers=args.workers,
        seed=args.seed,
    )
    data.connect(model.processor())
    clock = EpochClock(torch.device(args.device))
    trainer = L.Trainer(
        max_epochs=epochs,
        accelerator="gpu" if args.device.startswith("cuda") else "cpu",
        devices=1,
        precision="bf16-mixed" if args.device.startswith("cuda") else "32-true",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        callbacks=[clock],
    )
    L.seed_everything(args.seed, verbose=False)
    trainer.fit(model, data)
    seconds = [b - a for a, b in zip(clock.starts, clock.starts[1:])]
    return Fit(name, seconds, clock.served, statistics.fmean(clock.losses))


def tower_share(model: PrefixFusionVLM) -> tuple[int, int]:
    """(tower parameters, trainable parameters)."""
    total = sum(p.numel() for p in model.vision_tower.parameters())
    return total, sum(p.numel() for p in model.parameters() if p.requires_grad)


def run(args: argparse.Namespace) -> dict:
    device = harness.setup_device(args)
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "shapesworld"
        ShapesWorld(
            image_size=args.image_size,
            num_train=args.samples,
            num_val=2,
            num_test=2,
            questions_per_image=1,
        ).write(root)
        cache_root = args.cache_root or str(Path(tmp) / "features")
        pool = functools.partial(AvgPoolConnector, out_tokens=args.out_tokens)
        plain = fit(args, "no cache", root, pool, None, args.epochs)
        cached = fit(args, "cache (cold)", root, pool, FeatureCache(cache_root, args.dtype), args.epochs)
        second = fit(
            args, "next arm: MLP connector", root, MLPConnector, FeatureCache(cache_root, args.dtype), 1
        )
        on_disk = sum(f.stat().st_size for f in Path(cache_root).rglob("*.shard"))
    tower, trainable = tower_share(build(args, pool, None))
    return {
        "device": device,
        "fits": [plain, cached, second],
        "tower_params": tower,
        "trainable_params": trainable,
        "cache_bytes": on_disk,
    }


def report(result: dict, args: argparse.Namespace) -> float:
    plain, cached, second = result["fits"]
    n = args.image_size // args.patch_size
    print(
        f"device {result['device']}{harness.threads_note(args)}; {args.samples} ShapesWorld samples, batch "
        f"{args.batch}, {args.workers} loader worker(s), {args.epochs} epochs, storage {args.dtype}"
    )
    print(
        f"arm: frozen CLIP tower {args.image_size} px / patch {args.patch_size} ({n * n} features), width "
        f"{args.vision_dim}, {args.vision_layers - 1} blocks run ({result['tower_params']:,} parameters) -> "
        f"AvgPool to {args.out_tokens} tokens (trains: {result['trainable_params']:,} parameters) -> frozen "
        f"Llama width {args.llm_dim}, {args.llm_layers} layers; stage align"
    )
    rows = []
    for f in (plain, cached, second):
        later = f.epoch_seconds[1:]
        served = " ".join(f"{h}/{h + m}" for h, m in f.served) or "-"
        rows.append(
            [
                f.name,
                f"{f.epoch_seconds[0]:.2f}",
                f"{sum(later):.2f}" if later else "-",
                f"{statistics.fmean(later):.2f}" if later else "-",
                served,
                f"{f.last_epoch_loss:.4f}",
            ]
        )
    harness.print_table(
        ["run", "epoch 1 s", "epochs 2..N s", "s/epoch 2..N", "served per epoch", "last-epoch loss"], rows
    )
    print(f"cache on disk: {result['cache_bytes'] / 2**20:.1f} MiB")
    speedup = sum(plain.epoch_seconds[1:]) / sum(cached.epoch_seconds[1:])
    print(f"tower share of an uncached epoch implied by the speed-up (1 - 1/x): {1 - 1 / speedup:.2f}")
    return harness.headline("feature_cache_speedup", speedup, 2)


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    report(run(args), args)


if __name__ == "__main__":
    main()
