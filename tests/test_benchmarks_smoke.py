"""Smoke runs of the training-recipe benchmarks at their smallest settings: each runs end to end and ends with its
headline as ``name: value`` (a positive float). Times are never asserted; the checks are on what the figures must
be whatever the machine. Also the parts the benchmarks share (``benchmarks/harness.py``)."""

from __future__ import annotations

import argparse
import importlib.util
import logging
import math
import re
import statistics
import sys
import time
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


# -- the shared harness ------------------------------------------------------------------------------------------
def test_options_take_their_quick_defaults_unless_given():
    harness = load("harness")
    sizes = {"vision_dim": (1024, 64), "vocab": (32000, None)}

    def parse(argv):
        parser = harness.parser("A benchmark.\n\nMore.", quick="small")
        harness.add_model_sizes(parser, sizes)
        args = parser.parse_args(argv)
        harness.fill_defaults(args, sizes)
        return args

    full, quick, given = parse([]), parse(["--quick"]), parse(["--quick", "--vision-dim", "7", "--seed", "3"])
    assert (full.vision_dim, full.vocab, full.quick) == (1024, 32000, False)
    assert (quick.vision_dim, quick.vocab, quick.quick) == (64, None, True)
    assert (given.vision_dim, given.vocab, given.seed) == (7, None, 3)
    assert (full.threads, full.seed) == (None, 0)
    assert full.device == ("cuda" if torch.cuda.is_available() else "cpu")
    plain = harness.parser("A benchmark.", quick="small", torch_run=False, seed=False).parse_args([])
    assert vars(plain) == {"quick": False}
    with pytest.raises(SystemExit):
        harness.parser("A benchmark.", quick="small", devices=["cpu", "cuda"]).parse_args(["--device", "tpu"])


def test_setup_device_runs_one_cpu_thread_unless_told(same_threads):
    harness = load("harness")
    assert harness.setup_device(argparse.Namespace(device="cpu", threads=None)) == torch.device("cpu")
    assert torch.get_num_threads() == 1
    harness.setup_device(argparse.Namespace(device="cpu", threads=2))
    assert torch.get_num_threads() == 2


def test_timed_measures_the_block():
    harness = load("harness")
    with harness.timed(torch.device("cpu"), cuda_memory=True) as measured:
        assert math.isnan(measured.seconds)
        time.sleep(0.02)
    assert measured.seconds >= 0.02
    assert math.isnan(measured.peak_bytes)  # CUDA only


def test_print_table_aligns_columns_and_writes_notes_whole(capsys):
    harness = load("harness")
    header = ["name", "x", "unit"]
    rows = [["a", "1.5", "ms"], ["long name", "10", "s"], ["b", "skipped: a reason longer than any column"]]
    harness.print_table(header, rows, left=(0, 2))
    assert capsys.readouterr().out.splitlines() == [
        "name         x  unit",
        "---------  ---  ----",
        "a          1.5  ms  ",
        "long name   10  s   ",
        "b          skipped: a reason longer than any column",
    ]


def test_headline_prints_the_parsed_form_and_returns_the_unrounded_value(capsys):
    harness = load("harness")
    assert harness.headline("some_ratio", 1.23456, 2) == 1.23456
    assert headline(capsys.readouterr().out, "some_ratio") == 1.23


def test_tiny_prefix_vlm_has_the_sizes_asked_and_its_seed_decides_the_weights():
    harness = load("harness")
    from lit_mllm.training import Stage

    args = argparse.Namespace(
        seed=0, image_size=32, patch_size=8, vision_dim=32, vision_layers=2, vision_heads=2,
        llm_dim=32, llm_layers=1, llm_heads=2, llm_kv_heads=1, vocab=900,
    )  # fmt: skip
    model = harness.tiny_prefix_vlm(args, Stage("align", ["connector"]), lr=1e-3)
    llm = model.language_model.model.config
    assert model.vision_tower.model.config.hidden_size == 32
    assert (llm.hidden_size, llm.num_hidden_layers, llm.num_key_value_heads, llm.vocab_size) == (
        32,
        1,
        1,
        900,
    )
    assert llm.intermediate_size == 96 and llm.max_position_embeddings == 512  # TinyLlama's defaults
    assert model.tokens_per_image == (32 // 8) ** 2
    trained = {n.split(".")[0] for n, p in model.named_parameters() if p.requires_grad}
    assert trained == {"connector"}
    assert {g["lr"] for g in model.configure_optimizers().param_groups} == {1e-3}
    again = harness.tiny_prefix_vlm(args, Stage("align", ["connector"]), lr=1e-3).state_dict()
    assert all(torch.equal(v, again[k]) for k, v in model.state_dict().items())
    args.seed = 1
    other = harness.tiny_prefix_vlm(args, Stage("align", ["connector"]), lr=1e-3).state_dict()
    assert not all(torch.equal(v, other[k]) for k, v in model.state_dict().items())


# -- the GPU step benchmark, scaled down on the CPU ---------------------------------------------------------------
def test_gpu_step_smoke(capsys, same_threads):
    bench = load("gpu_step")
    args = bench.parse(["--smoke", "--device", "cpu", "--peak-tflops", "0.001"] + same_threads)
    result = bench.run(args)  # refuses to time the two models unless their losses on a batch agree
    returned = bench.report(result, args)
    out = capsys.readouterr().out
    assert headline(out, "gpu_step_mfu") == pytest.approx(returned, abs=5e-4)
    ours, theirs = result["losses"]
    assert ours == pytest.approx(theirs, rel=3e-2)
    assert [r.name for r in result["runs"]] == ["ours", "transformers"]
    assert all(len(p) == args.repeats for p in result["pass_seconds"])
    # MFU = model FLOPs / pass time / peak
    seconds = statistics.median(result["pass_seconds"][0])
    assert returned == pytest.approx(result["flops"] / seconds / 1e9, rel=1e-6)


def test_gpu_step_fsdp_smoke_on_one_cpu_rank(capsys, same_threads, monkeypatch):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {
        "RANK": "0",
        "LOCAL_RANK": "0",
        "WORLD_SIZE": "1",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
    }
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    bench = load("gpu_step")
    args = bench.parse(["--smoke", "--fsdp", "--device", "cpu", "--peak-tflops", "0.001"] + same_threads)
    returned = bench.report(bench.run(args), args)
    assert headline(capsys.readouterr().out, "gpu_step_mfu") == pytest.approx(returned, abs=5e-4)
    assert not torch.distributed.is_initialized()  # the run ended the process group it started


def test_gpu_step_counts_the_products_a_flop_counter_sees(same_threads):
    """The matrix products (and patch convolution) of FlopModel are exactly what torch's FLOP counter records for
    our forward + backward (frozen tower under no-grad, supervised logits only); attention it does not record."""
    from torch.utils.flop_counter import FlopCounterMode

    bench, speed = load("gpu_step"), load("train_speedup_vs_hf")
    args = bench.parse(["--smoke", "--device", "cpu"] + same_threads)
    ours, _, meta = bench.build(args)
    batch = speed.make_batches(args, meta, torch.device("cpu"))[0]
    with FlopCounterMode(display=False) as counter:
        speed.ours_loss(ours, batch, args, torch.device("cpu")).backward()
    lengths = batch.padded.attention_mask.sum(1).tolist()
    parts = bench.FlopModel.of(ours).parts(lengths, sum(batch.padded.images_per_row), batch.supervised)
    assert parts["products"] == counter.get_total_flops()
    assert parts["tower attention"] > 0 and parts["llm attention"] > 0


def test_gpu_step_peak_table():
    bench = load("gpu_step")
    assert bench.peak_for("NVIDIA H100 80GB HBM3") == 989.4
    assert bench.peak_for("NVIDIA H100 PCIe") == 756.0
    assert bench.peak_for("NVIDIA H200") == 989.4
    assert bench.peak_for("NVIDIA L40S") == 362.1
    assert bench.peak_for("NVIDIA L4") == 121.0
    assert bench.peak_for("NVIDIA A100-SXM4-80GB") == 312.0
    assert bench.peak_for("NVIDIA GeForce GTX 1080") is None


def test_loader_vs_decode_smallest(capsys):
    """The loader benchmark end to end on 32 images: its workers persist (a first epoch, then the timed ones) and
    the breakdown prices every stage."""
    threads = torch.get_num_threads()
    try:
        ratio = load("loader_vs_decode").main(
            ["--samples", "32", "--repeats", "2", "--workers", "1", "--batch-size", "8", "--breakdown"]
        )
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    assert headline(out, "loader_vs_decode") == pytest.approx(ratio, abs=5e-4)
    assert "first epoch" in out and "workers' CPU" in out and "first batch of an epoch" in out
    assert len(re.findall(r"per-pair ratio: ([0-9.]+), ([0-9.]+)$", out, re.M)) == 1
    stages = re.findall(r"^  (.+?) +([0-9]+\.[0-9]+) ms$", out, re.M)
    assert [name for name, _ in stages][:2] == ["bare Pillow decode (the reference)", "record parse"]
    assert len(stages) == 7 and all(float(ms) > 0 for _, ms in stages)
