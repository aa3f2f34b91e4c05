"""Smoke runs of the training-recipe benchmarks at their smallest settings: each runs end to end and ends with its
headline as ``name: value`` (a positive float). Times are never asserted; the checks are on what the figures must
be whatever the machine."""

from __future__ import annotations

import importlib.util
import logging
import re
import sys
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
HEADLINE = re.compile(r"^([a-z_]+): ([0-9]+(?:\.[0-9]+)?(?:[eE][-+]?[0-9]+)?)$")


def load(name: str):
    """A benchmark script as a module (benchmarks/ is not a package)."""
    spec = importlib.util.spec_from_file_location(f"benchmark_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up here
    spec.loader.exec_module(module)
    return module


def headline(output: str, name: str) -> float:
    last = output.strip().splitlines()[-1]
    match = HEADLINE.match(last)
    assert match, f"last line {last!r} is not `name: value`"
    assert match.group(1) == name
    value = float(match.group(2))
    assert value > 0
    return value


@pytest.fixture
def same_threads():
    """The benchmarks set torch's thread count; run them at the current one and restore logging levels."""
    threads = torch.get_num_threads()
    level = logging.getLogger("lightning.pytorch").level
    yield ["--threads", str(threads)]
    torch.set_num_threads(threads)
    logging.getLogger("lightning.pytorch").setLevel(level)


def test_headline_parser_rejects_malformed_lines():
    for bad in ("speedup 1.5", "train_speedup_vs_hf: fast", "train_speedup_vs_hf: -1.0", "x: 1.0\n"):
        with pytest.raises(AssertionError):
            headline(bad, "train_speedup_vs_hf")
    assert headline("table\ntrain_speedup_vs_hf: 1.25\n", "train_speedup_vs_hf") == 1.25


def test_train_speedup_vs_hf_smallest(capsys, same_threads):
    bench = load("train_speedup_vs_hf")
    argv = ["--quick", "--device", "cpu", "--llm-dim", "64", "--llm-layers", "2", "--vision-layers", "2"]
    argv += ["--batch", "4", "--steps", "2", "--warmup", "1", "--repeats", "1", "--text-max", "40"]
    args = bench.parse(argv + same_threads)
    result = bench.run(args)  # refuses to time the two models unless their losses on a batch agree
    returned = bench.report(result, args)
    assert headline(capsys.readouterr().out, "train_speedup_vs_hf") == pytest.approx(returned, abs=0.005)
    ours, theirs = result["losses"]
    assert ours == pytest.approx(theirs, rel=1e-4)
    for batch in result["batches"]:  # same samples: packing keeps every real token in fewer positions
        assert int((batch.packed.sample_index >= 0).sum()) == batch.tokens
        assert int(batch.padded.attention_mask.sum()) == batch.tokens
        assert batch.packed.input_ids.numel() <= batch.padded.input_ids.numel()


def test_checkpoint_overhead_smallest(capsys, same_threads):
    bench = load("checkpoint_overhead")
    argv = ["--quick", "--device", "cpu", "--llm-dim", "64", "--llm-layers", "1", "--vision-layers", "2"]
    args = bench.parse(argv + ["--batch", "1"] + same_threads)
    rows = bench.run(args)
    returned = bench.report(rows, args)
    ratio = headline(capsys.readouterr().out, "checkpoint_overhead")
    assert ratio == pytest.approx(returned, abs=5e-5)
    assert [r.stage for r in rows] == ["align", "finetune", "all"]
    for r in rows:
        needed = r.trainable_bytes + r.optimizer_bytes
        # AdamW keeps two moments per trainable weight (+ a step count per tensor)
        assert 2 * r.trainable_bytes <= r.optimizer_bytes <= 2 * r.trainable_bytes + 8 * 1024
        # torch.save does not compress: the file holds at least what it must
        assert r.checkpoint_bytes >= needed
        # had the frozen parts been saved, the file would be larger by their bytes
        assert r.checkpoint_bytes < needed + r.frozen_bytes or r.frozen_bytes == 0
    align = rows[0]
    assert (align.checkpoint_bytes + align.frozen_bytes) / (
        align.trainable_bytes + align.optimizer_bytes
    ) > 1.5
    assert 1.0 <= ratio < 1.5
