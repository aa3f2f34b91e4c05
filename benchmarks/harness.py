"""What the benchmarks share: their common options, the CPU thread setup, timing with CUDA synchronised, the tiny
prefix model they train, table printing and the headline line. Each benchmark keeps only what it measures.

A benchmark runs as ``python benchmarks/<name>.py`` and is also loaded by file path in the tests
(``tests/test_benchmarks_smoke.py``); either way it puts this folder on ``sys.path`` and imports ``harness``,
which puts the checkout on ``sys.path`` when ``lit_mllm`` is not installed (a checkout without
``pip install -e .``).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import math
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

try:
    import lit_mllm  # noqa: F401
except ImportError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


# -- options ----------------------------------------------------------------------------------------------------
def parser(
    doc: str, quick: str, *, torch_run: bool = True, devices: list[str] | None = None, seed: bool = True
) -> argparse.ArgumentParser:
    """A parser described by the first paragraph of ``doc`` (the benchmark's docstring) with the options the
    benchmarks share: ``--quick`` (``quick`` says what it changes); for a benchmark that runs torch
    (``torch_run``) ``--device`` (default CUDA when there is one; ``devices``: the accepted values) and
    ``--threads``; with ``seed``, ``--seed`` (default 0)."""
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help=quick)
    if torch_run:
        p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=devices)
        p.add_argument(
            "--threads",
            type=int,
            default=None,
            help="CPU threads for torch (default 1 on CPU: steadier timings on a shared machine)",
        )
    if seed:
        p.add_argument("--seed", type=int, default=0)
    return p


MODEL_SIZES = {  # option -> (help, what leaving it unset means)
    "image_size": ("tower input side in pixels", ""),
    "patch_size": ("tower patch side in pixels", ""),
    "vision_dim": ("tower width", ""),
    "vision_layers": ("tower blocks (features come from the one before the last)", ""),
    "vision_heads": ("tower attention heads", ""),
    "llm_dim": ("LLM width", ""),
    "llm_layers": ("LLM decoder layers", ""),
    "llm_heads": ("LLM attention heads", ""),
    "llm_kv_heads": ("LLM key/value heads", ""),
    "llm_intermediate": ("LLM MLP width", "3 x the width"),
    "vocab": ("LLM vocabulary rows", "the tiny tokenizer's 813"),
}
"""The size options of the tiny models, named as :func:`tiny_prefix_vlm` reads them."""


def add_model_sizes(
    p: argparse.ArgumentParser, defaults: dict[str, tuple[Any, Any]], title: str = "model sizes"
) -> None:
    """A group of the :data:`MODEL_SIZES` options named in ``defaults`` (option -> ``(default, --quick
    default)``); they parse to None, which :func:`fill_defaults` replaces with the default."""
    group = p.add_argument_group(title)
    for key, (full, quick) in defaults.items():
        what, unset = MODEL_SIZES[key]
        shown = [unset if v is None else str(v) for v in (full, quick)]
        default = shown[0] if full == quick else f"{shown[0]} ({shown[1]} with --quick)"
        group.add_argument(
            "--" + key.replace("_", "-"), type=int, default=None, help=f"{what}; default {default}"
        )


def fill_defaults(args: argparse.Namespace, defaults: dict[str, tuple[Any, Any]]) -> None:
    """Set every option of ``defaults`` (option -> ``(default, --quick default)``) left at None on the command
    line to its default for ``args.quick``."""
    for key, (full, quick) in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, quick if args.quick else full)


# -- device and timing ------------------------------------------------------------------------------------------
def setup_device(args: argparse.Namespace) -> torch.device:
    """``args.device``; on a CPU torch runs ``args.threads`` threads (default 1: steadier timings on a shared
    machine than oversubscribed threads)."""
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(args.threads or 1)
    return device


def threads_note(args: argparse.Namespace) -> str:
    """``", N CPU thread(s)"`` for a CPU run, for the line that describes the run; empty on CUDA."""
    return "" if args.device.startswith("cuda") else f", {torch.get_num_threads()} CPU thread(s)"


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA; a no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class Measured:
    """What :func:`timed` measured of a block."""

    seconds: float = math.nan
    """Wall time, the device synchronised before and after."""
    peak_bytes: float = math.nan
    """CUDA, when asked for: the most memory allocated during the block minus what was allocated when it began
    (its activations and temporaries, plus whatever it keeps); NaN otherwise."""


@contextlib.contextmanager
def timed(device: torch.device, cuda_memory: bool = False) -> Iterator[Measured]:
    """Measure the block: its wall time and, with ``cuda_memory`` on a CUDA device, its peak extra memory (the
    allocator's peak statistics are reset when the block begins)."""
    measured = Measured()
    track = cuda_memory and device.type == "cuda"
    sync(device)
    if track:
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
    start = time.perf_counter()
    yield measured
    sync(device)
    measured.seconds = time.perf_counter() - start
    if track:
        measured.peak_bytes = torch.cuda.max_memory_allocated(device) - before


# -- models -----------------------------------------------------------------------------------------------------
def tiny_prefix_vlm(args: argparse.Namespace, stage, lr: float, max_length: int = 512):
    """The prefix model the training benchmarks measure: a random CLIP tower (feature layer -2), LLaVA-1.5's
    2-layer MLP connector and a random Llama, sized by the :data:`MODEL_SIZES` options in ``args``
    (``llm_intermediate`` optional), trained in ``stage`` (a :class:`lit_mllm.training.Stage`) with AdamW at
    ``lr``; weights drawn after ``torch.manual_seed(args.seed)``, tower first."""
    from lit_mllm.lit import PrefixFusionVLM
    from lit_mllm.nn.connectors import MLPConnector
    from lit_mllm.nn.language import TinyLlama
    from lit_mllm.nn.vision import TinyCLIPVision

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
        intermediate_size=getattr(args, "llm_intermediate", None),
        max_length=max_length,
        vocab_size=args.vocab,
    )
    return PrefixFusionVLM(
        tower,
        lm,
        connector=MLPConnector,
        stage=stage,
        optimizer=functools.partial(torch.optim.AdamW, lr=lr),
    )


def unique_params(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The model's parameters, each once however many modules share it."""
    return list({id(p): p for p in model.parameters()}.values())


# -- report -----------------------------------------------------------------------------------------------------
def print_table(header: list[str], rows: Sequence[list[str]], left: Sequence[int] = (0,)) -> None:
    """Print ``rows`` under ``header`` and a dashed rule: each column as wide as its widest cell, two spaces
    apart, the columns in ``left`` left-aligned and the others right-aligned. A row with fewer cells than the
    header fills the first columns and its last cell is a note written after them (it widens no column)."""
    full = [r for r in rows if len(r) == len(header)]
    widths = [max([len(h), *(len(r[i]) for r in full)]) for i, h in enumerate(header)]

    def line(cells: list[str]) -> str:
        return "  ".join(
            c.ljust(w) if i in left else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths))
        )

    print(line(header))
    print(line(["-" * w for w in widths]))
    for cells in rows:
        print(line(cells) if len(cells) == len(header) else "  ".join([line(cells[:-1]), cells[-1]]))


def headline(name: str, value: float, digits: int) -> float:
    """Print the benchmark's last line, ``name: value`` with ``digits`` decimals (the form the README's table
    and the smoke tests read), and return ``value`` unrounded."""
    print(f"{name}: {value:.{digits}f}")
    return value
