"""Packing efficiency: real tokens / processed token positions, packed vs padded, on a LLaVA-Instruct-like mix.

Lengths are counted after image expansion, as the collate sees them. The mix (LLaVA-1.5's 665K instruction
data in outline): 90% single-image samples with ``--image-tokens`` (576 for CLIP ViT-L/14-336) plus a
conversation of 20-1500 text tokens (log-normal, median ~180), and 10% text-only conversations of 200-1500
tokens. Each batch of ``--batch-size`` samples is packed by :func:`lit_mllm.data.pack` into rows of at most
``--pack-length`` tokens (what ``data.pack_length`` does); the padding baseline pads every sample to the longest
of its batch (``pack_length: null``).

    python benchmarks/packing_efficiency.py            # headline: batch 32, rows of 4096
    python benchmarks/packing_efficiency.py --quick    # fewer batches

Prints a table over batch sizes and row lengths, then ``packing_efficiency: <value>`` for the headline setting
(goal >= 0.95).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

# harness.py sits beside this file; on the path also when the tests load this file by its path
sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness

from lit_mllm.data import pack


def lengths(rng: np.random.Generator, n: int, image_tokens: int) -> list[int]:
    out = []
    for _ in range(n):
        if rng.random() < 0.9:
            text = int(np.clip(rng.lognormal(np.log(180), 0.9), 20, 1500))
            out.append(image_tokens + text)
        else:
            out.append(int(rng.integers(200, 1501)))
    return out


def efficiency(batches: list[list[int]], pack_length: int | None) -> float:
    real = processed = 0
    for batch in batches:
        real += sum(batch)
        if pack_length is None:
            processed += len(batch) * max(batch)
        else:
            rows = pack(batch, pack_length)
            processed += len(rows) * max(sum(batch[i] for i in row) for row in rows)
    return real / processed


def main(argv: list[str] | None = None) -> float:
    parser = harness.parser(__doc__, quick="fewer batches", torch_run=False)
    parser.add_argument("--image-tokens", type=int, default=576)
    parser.add_argument("--batch-size", type=int, default=32, help="samples per batch (headline)")
    parser.add_argument("--pack-length", type=int, default=4096, help="row length (headline)")
    args = parser.parse_args(argv)
    rng = np.random.default_rng(args.seed)
    n_batches = 20 if args.quick else 100
    print(f"{'batch':>5} {'pack_length':>11} {'padded':>7} {'packed':>7}")
    chosen = None
    for batch_size in sorted({8, 16, args.batch_size}):
        batches = [lengths(rng, batch_size, args.image_tokens) for _ in range(n_batches)]
        padded = efficiency(batches, None)
        for pack_length in sorted({args.pack_length, 8192}):
            packed = efficiency(batches, pack_length)
            print(f"{batch_size:>5} {pack_length:>11} {padded:>7.3f} {packed:>7.3f}")
            if (batch_size, pack_length) == (args.batch_size, args.pack_length):
                chosen = (padded, packed)
    print(f"padding_baseline: {chosen[0]:.3f}")
    return harness.headline("packing_efficiency", chosen[1], 3)


if __name__ == "__main__":
    main()
