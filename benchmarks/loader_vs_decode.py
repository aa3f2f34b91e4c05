"""Loader throughput against bare JPEG decoding: how close the full data pipeline gets to the cost of the
decode it cannot avoid.

Writes ``--samples`` JPEG photos-like images (``--width x --height``, noise + shapes, so they do not compress
to nothing) and a LLaVA-format file of multi-turn conversations about them, then measures

- bare decode: ``PIL.Image.open(path).convert("RGB")`` of every image, in this process;
- the full loader: :class:`lit_mllm.data.MixtureData`'s training loader with ``--workers`` loader workers (parse
  the record, decode the JPEG, resize to the tower's 336 px, tokenize with the chat format, expand 576 image
  tokens, collate padded batches of ``--batch-size``), an epoch at a time, iterated in this process. Its workers
  persist across epochs, as in training: the first epoch forks them (its rate is printed by itself); the headline
  pairs time the epochs after it, which is every epoch of a run but its first.

On a machine shared with other jobs the load changes between two measurements, so the two are measured in
``--repeats`` pairs (decode, then a loader epoch, alternating) and the headline is the median of the pairs' ratios.
Prints the rates in samples/s (also, in this process: decode + the tower's resize as the loader does them, and the
whole per-sample work of the loader without workers, which is the cost per sample its workers share out) and
``loader_vs_decode: <loader / decode>`` last (goal >= 0.8).

    python benchmarks/loader_vs_decode.py            # 1024 images of 640 x 480, 5 pairs
    python benchmarks/loader_vs_decode.py --quick    # 256 images, 1 pair
    python benchmarks/loader_vs_decode.py --breakdown    # also the cost of each stage per sample
"""

from __future__ import annotations

import collections
import contextlib
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch.utils.data import DataLoader

# harness.py sits beside this file; on the path also when the tests load this file by its path
sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness


def write_data(root: Path, n: int, width: int, height: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True)
    records = []
    for i in range(n):
        pixels = rng.integers(0, 256, (height // 8, width // 8, 3), dtype=np.uint8)
        image = Image.fromarray(pixels).resize((width, height), Image.Resampling.BILINEAR)
        draw = ImageDraw.Draw(image)
        for _ in range(6):
            x, y = int(rng.integers(0, width - 60)), int(rng.integers(0, height - 60))
            draw.ellipse((x, y, x + 60, y + 60), fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
        image.save(root / "images" / f"{i:06d}.jpg", quality=90)
        turns = [{"from": "human", "value": "<image>\nDescribe the picture in detail."}]
        for k in range(int(rng.integers(1, 5))):
            turns.append(
                {"from": "gpt", "value": "There are several coloured circles on a noisy field. " * 4}
            )
            turns.append({"from": "human", "value": f"What about circle {k}?"})
        turns.append({"from": "gpt", "value": "It is round and sits near the edge of the picture."})
        records.append({"id": str(i), "image": f"images/{i:06d}.jpg", "conversations": turns})
    (root / "train.json").write_text(json.dumps(records))


@contextlib.contextmanager
def one_torch_thread() -> Iterator[None]:
    """torch on one thread inside the block, as in a loader worker (on a busy machine a second thread waiting for
    its share of a small resize costs more than it gives)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def decode_rate(root: Path) -> float:
    """Images/s of bare decoding with Pillow in this process: ``Image.open(path).convert("RGB")``."""
    paths = sorted((root / "images").glob("*.jpg"))
    start = time.perf_counter()
    for p in paths:
        with Image.open(p) as im:
            im.convert("RGB")
    return len(paths) / (time.perf_counter() - start)


def decode_resize_rate(root: Path, size: int) -> float:
    """Images/s of decoding and resizing to the tower's ``size`` as the loader's image transform does them (default
    layout and resampler), in this process on one thread as in a loader worker."""
    from lit_mllm.data.images import ImageTransform
    from lit_mllm.data.sample import Sample

    transform = ImageTransform(size)
    paths = [str(p) for p in sorted((root / "images").glob("*.jpg"))]
    sample = Sample("bench", [], paths[:1], "benchmark")
    with one_torch_thread():
        start = time.perf_counter()
        for p in paths:
            transform(transform.load(p, sample))
        return len(paths) / (time.perf_counter() - start)


def build_loader(root: Path, workers: int, batch_size: int) -> DataLoader:
    """The training loader of :class:`lit_mllm.data.MixtureData` over the benchmark's data, as a run builds it."""
    from lit_mllm.data import Conversations, MixtureData, Processor
    from lit_mllm.data.images import ImageTransform
    from lit_mllm.nn.language import TinyLlama

    lm = TinyLlama(hidden_size=32, num_layers=1, max_length=4096)
    processor = Processor(
        lm.tokenizer,
        lm.chat_format,
        ImageTransform(336),
        lm.image_token,
        lm.image_token_id,
        tokens_per_image=576,
        max_length=4096,
    )
    dm = MixtureData(str(root), train={"llava": Conversations("train.json")}, batch_size=batch_size,
                     num_workers=workers)  # fmt: skip
    dm.connect(processor)
    dm.setup("fit")
    return dm.train_dataloader()


def epoch_rate(loader: DataLoader) -> tuple[float, float]:
    """``(samples/s, first-batch wait in s)`` of one pass through ``loader``, timed from asking for its first
    batch to receiving its last."""
    start = time.perf_counter()
    n, first = 0, 0.0
    for batch, _ in loader:
        if n == 0:
            first = time.perf_counter() - start
        n += len(batch.ids)
    return n / (time.perf_counter() - start), first


def workers_cpu_seconds(loader: DataLoader) -> float | None:
    """User + system CPU seconds the loader's running workers have used so far (from ``/proc``; None elsewhere)."""
    # torch's multi-process iterator, which the loader keeps while its workers persist
    iterator = getattr(loader, "_iterator", None)
    if iterator is None or not Path("/proc/self/stat").exists():
        return None
    total = 0
    for worker in iterator._workers:
        fields = Path(f"/proc/{worker.pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])  # utime, stime in clock ticks
    return total / os.sysconf("SC_CLK_TCK")


def stage_costs(stream, root: Path, batch_size: int, rounds: int = 3) -> dict[str, float]:
    """Milliseconds per sample of each stage of the loader's work, in this process on one thread, each the median
    of ``rounds`` interleaved passes over the data (the stages measured in the same minute): the reference decode,
    then what a loader worker does per sample, then the batch's collate in private and in shared memory (a worker
    collates into shared memory so that the batch reaches the main process without a copy). ``stream``: the
    dataset of a training loader from :func:`build_loader`."""
    from lit_mllm.data.collate import collate

    loader, processor = stream.loader, stream.loader.processor
    source = loader.sources["llava"]
    token = processor.image_token
    samples = [source.sample(i, token) for i in range(len(source))]
    decoded = [processor.image_transform.load(s.images[0], s) for s in samples[:batch_size]]
    images = [decoded[i % len(decoded)] for i in range(len(samples))]  # a batch's worth, cycled
    items = [loader.item("llava", i) for i in range(len(source))]
    batches = [items[k : k + batch_size] for k in range(0, len(items), batch_size)]
    pad = stream.collate_kwargs["pad_token_id"]
    paths = [str(p) for p in sorted((root / "images").glob("*.jpg"))]

    def pillow(p: str) -> None:
        with Image.open(p) as im:
            im.convert("RGB")

    def each(fn: Callable, xs: list) -> Callable[[], None]:
        """A pass of ``fn`` over ``xs`` that drops each result before the next, as a worker does (keeping a
        thousand decoded images would time fresh memory's page faults instead of the stage)."""
        return lambda: collections.deque(map(fn, xs), maxlen=0)

    stages = {
        "bare Pillow decode (the reference)": each(pillow, paths),
        "record parse": each(lambda i: source.sample(i, token), range(len(samples))),
        "image read + decode (loader)": each(
            lambda s: processor.image_transform.load(s.images[0], s), samples
        ),
        "resize to the tower's size": each(processor.image_transform, images),
        "text: template, tokens, labels": each(processor.encode_text, samples),
        "collate, private memory": each(lambda b: collate(b, pad, shared=False), batches),
        "collate, shared memory (a worker)": each(lambda b: collate(b, pad, shared=True), batches),
    }
    times: dict[str, list[float]] = {name: [] for name in stages}
    with one_torch_thread():
        for _ in range(rounds):
            for name, run in stages.items():
                start = time.perf_counter()
                run()
                times[name].append((time.perf_counter() - start) * 1e3 / len(samples))
    return {name: statistics.median(t) for name, t in times.items()}


def main(argv: list[str] | None = None) -> float:
    parser = harness.parser(__doc__, quick="256 images", torch_run=False, seed=False)
    parser.add_argument("--samples", type=int, default=1024)
    parser.add_argument("--width", type=int, default=640)
    parser.add_argument("--height", type=int, default=480)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument(
        "--breakdown",
        action="store_true",
        help="also print the milliseconds per sample of each stage (one process)",
    )
    parser.add_argument(
        "--repeats", type=int, default=None, help="(decode, loader epoch) pairs; default 5 (1 with --quick)"
    )
    args = parser.parse_args(argv)
    n = 256 if args.quick else args.samples
    repeats = args.repeats or (1 if args.quick else 5)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        write_data(root, n, args.width, args.height)
        decode_rate(root)  # warm the page cache
        decode_resize = decode_resize_rate(root, 336)
        without_workers = build_loader(root, 0, args.batch_size)
        with one_torch_thread():
            in_process, _ = epoch_rate(without_workers)
        costs = stage_costs(without_workers.dataset, root, args.batch_size) if args.breakdown else {}
        loader = build_loader(root, args.workers, args.batch_size)
        first_decode = decode_rate(root)
        first, first_wait = epoch_rate(loader)  # starts (forks) the workers
        cpu_before = workers_cpu_seconds(loader)
        pairs, waits = [], []
        for _ in range(repeats):  # the same workers
            decode = decode_rate(root)
            rate, wait = epoch_rate(loader)
            pairs.append((decode, rate))
            waits.append(wait)
        cpu_after = workers_cpu_seconds(loader)
        del loader  # stops the workers before their data goes
    ratios = [loader / decode for decode, loader in pairs]
    decode, loader = (statistics.median(x) for x in zip(*pairs))
    print(
        f"{n} JPEGs of {args.width} x {args.height}, batches of {args.batch_size}, {repeats} (decode, loader) pair(s)"
    )
    print(f"bare JPEG decode (1 process):                    {decode:8.1f} samples/s  (median)")
    print(f"decode + resize to 336 as the loader (1 process): {decode_resize:8.1f} samples/s")
    print(f"loader without workers (this process):           {in_process:8.1f} samples/s")
    print(
        f"full loader ({args.workers} workers), first epoch:         {first:8.1f} samples/s  "
        f"(starts the workers; {first / first_decode:.3f} of decode)"
    )
    print(
        f"first batch of an epoch after: {first_wait:.3f} s in the first (forks the workers), "
        f"{statistics.median(waits):.3f} s in the later ones (median)"
    )
    print(f"full loader ({args.workers} workers), later epochs:        {loader:8.1f} samples/s  (median)")
    if cpu_before is not None and cpu_after is not None:
        per_sample = (cpu_after - cpu_before) * 1e3 / (n * repeats)
        print(f"loader workers' CPU, later epochs:              {per_sample:8.3f} ms per sample")
    print("per-pair ratio: " + ", ".join(f"{r:.3f}" for r in ratios))
    if costs:
        print("per sample, one process, one thread (median of 3 interleaved passes):")
        for name, ms in costs.items():
            print(f"  {name:40s} {ms:6.3f} ms")
    return harness.headline("loader_vs_decode", statistics.median(ratios), 3)


if __name__ == "__main__":
    main()
