"""Loader throughput against bare JPEG decoding: how close the full data pipeline gets to the cost of the
decode it cannot avoid.

Writes ``--samples`` JPEG photos-like images (``--width x --height``, noise + shapes, so they do not compress
to nothing) and a LLaVA-format file of multi-turn conversations about them, then measures

- bare decode: ``PIL.Image.open(path).convert("RGB")`` of every image, in this process;
- the full loader: :class:`lit_mllm.data.MixtureData` with ``--workers`` loader workers (parse the record,
  decode the JPEG, resize to the tower's 336 px, tokenize with the chat format, expand 576 image
  tokens, collate padded batches of ``--batch-size``), one epoch, iterated in this process.

Prints the rates in samples/s (also decode + the tower's resize in one process, the part of the work no loader
can skip) and ``loader_vs_decode: <loader / decode>`` last (goal >= 0.8).

    python benchmarks/loader_vs_decode.py            # 1024 images of 640 x 480
    python benchmarks/loader_vs_decode.py --quick    # 256 images
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

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


def decode_rate(root: Path, resize_to: int | None = None) -> float:
    """Images/s of decoding (and, with ``resize_to``, the tower's bicubic resize) in this process."""
    from lit_mllm.data.layouts import Resize

    paths = sorted((root / "images").glob("*.jpg"))
    start = time.perf_counter()
    for p in paths:
        with Image.open(p) as im:
            rgb = im.convert("RGB")
        if resize_to:
            Resize().crops(rgb, resize_to)
    return len(paths) / (time.perf_counter() - start)


def loader_rate(root: Path, workers: int, batch_size: int) -> float:
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
    loader = dm.train_dataloader()
    start = time.perf_counter()
    n = sum(len(batch.ids) for batch, _ in loader)  # includes worker start-up, as a real epoch does
    return n / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> float:
    parser = harness.parser(__doc__, quick="256 images", torch_run=False, seed=False)
    parser.add_argument("--samples", type=int, default=1024)
    parser.add_argument("--width", type=int, default=640)
    parser.add_argument("--height", type=int, default=480)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args(argv)
    n = 256 if args.quick else args.samples
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        write_data(root, n, args.width, args.height)
        decode_rate(root)  # warm the page cache
        decode = decode_rate(root)
        decode_resize = decode_rate(root, 336)
        loader = loader_rate(root, args.workers, args.batch_size)
    print(f"bare JPEG decode (1 process):            {decode:8.1f} samples/s")
    print(f"decode + bicubic resize to 336 (1 proc): {decode_resize:8.1f} samples/s")
    print(f"full loader ({args.workers} workers):               {loader:8.1f} samples/s")
    return harness.headline("loader_vs_decode", loader / decode, 3)


if __name__ == "__main__":
    main()
