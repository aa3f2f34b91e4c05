"""Training throughput of our step over ``transformers``' ``LlavaForConditionalGeneration``, same weights, same data.

    python benchmarks/train_speedup_vs_hf.py            # real sizes (CLIP ViT-L/14-336 + a 1.1B Llama): a GPU job
    python benchmarks/train_speedup_vs_hf.py --quick    # small widths, same length mix scaled down: CPU, ~1 min

Both models hold the same weights: ours is built first (a CLIP tower, LLaVA-1.5's 2-layer MLP connector, a Llama
LLM, stage ``finetune``: connector + LLM train, tower frozen), then ``lit_mllm.training.export.to_llava`` copies it
into a ``LlavaForConditionalGeneration`` whose vision tower gets ``requires_grad_(False)``, as a typical Hugging
Face training script freezes it. Both take the same batches of the same samples, in the same process, one step of
ours then one step of theirs on each batch (the order swapped every other batch); a step is forward, loss,
backward, AdamW step and ``zero_grad``.

- ours: ``collate(..., pack_length=...)`` packs the samples into rows (positions restart per sample, block-diagonal
  attention), the frozen tower runs under no-grad, and ``training_step`` computes logits only at supervised
  positions (``supervised_logits``);
- transformers: the plain padded batch (``collate`` without packing: right padding, attention mask, labels -100
  off the replies) and ``model(**batch).loss``, which computes logits at every position.

The samples follow a LLaVA-Instruct-like mix: one image per sample (``T`` image tokens, as the model gives) except
a fraction of text-only samples, and a text length drawn log-uniformly between ``--text-min`` and ``--text-max``
(20-1500 tokens at the real sizes), split into question/answer rounds of which only the answers are supervised.
Token ids and pixels are random; only lengths and label layout matter for speed. Before timing, the two models'
losses on the first batch are compared: they must agree (it is the same model on the same samples).

Throughput counts real tokens (image tokens included, padding excluded). For each of ``--repeats`` passes over the
``--steps`` batches (after ``--warmup`` untimed steps), tokens/s = real tokens / summed step time; the medians over
passes are reported, and the last line is ``train_speedup_vs_hf: <ours / transformers>``. See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import random
import statistics
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

# harness.py sits beside this file; on the path also when the tests load this file by its path
sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness

from lit_mllm.data import Batch, collate
from lit_mllm.lit import PrefixFusionVLM
from lit_mllm.nn.language.chat import IGNORE_INDEX
from lit_mllm.training import Stage
from lit_mllm.training.export import to_llava

GIB = 2**30
SIZES = {  # (default: CLIP ViT-L/14-336 and TinyLlama-1.1B shapes, --quick: small widths)
    "image_size": (336, 64),
    "patch_size": (14, 8),
    "vision_dim": (1024, 64),
    "vision_layers": (24, 3),
    "vision_heads": (16, 2),
    "llm_dim": (2048, 256),
    "llm_layers": (22, 4),
    "llm_heads": (32, 4),
    "llm_kv_heads": (4, 2),
    "llm_intermediate": (5632, None),
    "vocab": (32000, None),
}
RUN = {  # (default, --quick: the length mix scaled down by 9)
    "batch": (8, 16),
    "text_min": (20, 4),
    "text_max": (1500, 170),
    "steps": (8, 4),
    "warmup": (3, 1),
    "repeats": (5, 3),
}


@dataclass
class Pair:
    packed: Batch
    """Our training batch: packed rows, position ids, no attention mask."""
    padded: Batch
    """The transformers batch: one right-padded row per sample, attention mask."""
    tokens: int
    """Real tokens (image tokens included, padding excluded)."""
    supervised: int
    """Positions whose next token is learned."""


@dataclass
class Timing:
    seconds: list[list[float]]
    """Step times per pass, per batch."""
    peak_gib: float = math.nan
    """CUDA: largest extra memory a step allocated over what was allocated before it."""


# -- data -------------------------------------------------------------------------------------------------------
def make_item(
    rng: random.Random, index: int, text_len: int, image: bool, args: argparse.Namespace, meta: dict
) -> dict:
    """One processed sample as :class:`lit_mllm.data.processor.Processor` returns it: BOS, the image's ``T`` tokens
    (if any), then ``text_len`` tokens in question/answer rounds; labels on the answers only."""
    tokens_per_image, image_token_id = meta["tokens_per_image"], meta["image_token_id"]
    rounds = rng.randint(1, max(1, min(args.max_rounds, text_len // 8)))
    cuts = sorted(rng.sample(range(1, text_len), rounds - 1)) if rounds > 1 else []
    ids, labels = [meta["bos"]], [IGNORE_INDEX]
    if image:
        ids += [image_token_id] * tokens_per_image
        labels += [IGNORE_INDEX] * tokens_per_image
    for start, end in zip([0, *cuts], [*cuts, text_len]):
        n = end - start
        question = min(n - 1, max(1, round(n * rng.uniform(0.2, 0.8)))) if n > 1 else 0
        # any id but the image token's
        text = [t + (t >= image_token_id) for t in (rng.randrange(meta["vocab"] - 1) for _ in range(n))]
        ids += text
        labels += [IGNORE_INDEX] * question + text[question:]
    return {
        "id": f"s{index}",
        "source": "",
        "input_ids": torch.tensor(ids, dtype=torch.long),
        "labels": torch.tensor(labels, dtype=torch.long),
        "pixel_values": torch.randn(1, 3, meta["image_size"], meta["image_size"]) if image else None,
        "num_images": int(image),
    }


def make_batches(args: argparse.Namespace, meta: dict, device: torch.device) -> list[Pair]:
    rng = random.Random(args.seed)
    lo, hi = math.log(args.text_min), math.log(args.text_max)
    batches = []
    for step in range(args.steps):
        items = []
        for k in range(args.batch):
            text_len = max(2, round(math.exp(rng.uniform(lo, hi))))
            image = rng.random() >= args.text_only
            items.append(make_item(rng, step * args.batch + k, text_len, image, args, meta))
        pad = meta["pad"]
        packed = collate(items, pad, pack_length=args.pack_length)
        padded = collate(items, pad)
        tokens = sum(len(it["input_ids"]) for it in items)
        supervised = int((packed.labels[:, 1:] != IGNORE_INDEX).sum())
        batches.append(Pair(packed.to(device), padded.to(device), tokens, supervised))
    return batches


# -- models -----------------------------------------------------------------------------------------------------
def build(args: argparse.Namespace, device: torch.device):
    """(ours, transformers LLaVA with the same weights, their optimizers, facts for the data)."""
    stage = Stage("finetune", ["connector", "language_model"])
    ours = harness.tiny_prefix_vlm(args, stage, args.lr, max_length=args.pack_length)
    tower, lm = ours.vision_tower, ours.language_model
    hf = to_llava(ours)
    # LLaVA finetune: the tower is frozen (transformers >= 4.52 nests the parts under .model)
    (hf.model if hasattr(hf, "lm_head") else hf).vision_tower.requires_grad_(False)
    for model in (ours.language_model.model, ours.vision_tower.model, hf):
        if hasattr(model, "set_attn_implementation"):
            model.set_attn_implementation(args.attn)
        elif args.attn != "sdpa":
            raise SystemExit(
                f"--attn {args.attn} needs a transformers with set_attn_implementation; upgrade it"
            )
    dtype = torch.bfloat16 if args.precision == "bf16-true" else torch.float32
    ours.to(device=device, dtype=dtype).train()  # frozen parts stay in eval mode (VLMModule.train)
    hf.to(device=device, dtype=dtype).train()  # as a Trainer does; dropout is 0 in both
    ours_opt = ours.configure_optimizers()
    hf_opt = torch.optim.AdamW([p for p in hf.parameters() if p.requires_grad], lr=args.lr)
    tokens_per_image = ours.tokens_per_image
    hf_image_tokens = hf.config.image_seq_length
    assert tokens_per_image == hf_image_tokens, (tokens_per_image, hf_image_tokens)
    tok = lm.tokenizer
    meta = {
        "tokens_per_image": tokens_per_image,
        "image_token_id": lm.image_token_id,
        "image_size": tower.image_size,
        "vocab": lm.model.get_input_embeddings().num_embeddings,
        "bos": tok.bos_token_id,
        "pad": tok.pad_token_id,
    }
    return ours, hf, ours_opt, hf_opt, meta


# -- steps ------------------------------------------------------------------------------------------------------
def autocast(args: argparse.Namespace, device: torch.device):
    if args.precision == "bf16-mixed":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def ours_loss(model: PrefixFusionVLM, batch: Pair, args, device) -> torch.Tensor:
    with autocast(args, device):
        return model.training_step(batch.packed, 0)


def hf_loss(model, batch: Pair, args, device) -> torch.Tensor:
    b = batch.padded
    with autocast(args, device):
        return model(
            input_ids=b.input_ids,
            pixel_values=b.pixel_values,
            attention_mask=b.attention_mask,
            labels=b.labels,
        ).loss


def step(loss_fn, model, optimizer, batch: Pair, args, device, timing: Timing | None) -> float:
    """One optimizer step; returns its wall time (CUDA synchronised around it)."""
    with harness.timed(device, cuda_memory=timing is not None) as measured:
        loss = loss_fn(model, batch, args, device)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    if not math.isnan(measured.peak_bytes):
        extra = measured.peak_bytes / GIB
        timing.peak_gib = extra if math.isnan(timing.peak_gib) else max(timing.peak_gib, extra)
    return measured.seconds


def check_same_loss(ours, hf, batch: Pair, args, device) -> tuple[float, float]:
    """Both models' loss on one batch before any step: the same model on the same samples must agree."""
    with torch.no_grad():
        a, b = float(ours_loss(ours, batch, args, device)), float(hf_loss(hf, batch, args, device))
    tol = 1e-4 if args.precision == "32-true" else 3e-2
    if not math.isclose(a, b, rel_tol=tol):
        raise SystemExit(
            f"the two models disagree on the first batch (loss {a:.6f} ours vs {b:.6f} transformers, relative "
            f"tolerance {tol}): they are not computing the same thing, so their speeds are not comparable"
        )
    return a, b


def run(args: argparse.Namespace) -> dict:
    device = harness.setup_device(args)
    warnings.filterwarnings("ignore", message=".*self.log.*")  # training_step logs; there is no Trainer here
    ours, hf, ours_opt, hf_opt, meta = build(args, device)
    longest = 1 + meta["tokens_per_image"] + args.text_max
    if longest > args.pack_length:
        raise SystemExit(f"--pack-length {args.pack_length} is below the longest possible sample ({longest})")
    batches = make_batches(args, meta, device)
    losses = check_same_loss(ours, hf, batches[0], args, device)
    runners = {"ours": (ours_loss, ours, ours_opt), "transformers": (hf_loss, hf, hf_opt)}
    for w in range(args.warmup):  # untimed: first-step allocations, optimizer state, kernel choice
        for fn, model, opt in runners.values():
            step(fn, model, opt, batches[w % len(batches)], args, device, None)
    timings = {name: Timing([]) for name in runners}
    for _ in range(args.repeats):
        for timing in timings.values():
            timing.seconds.append([])
        for k, batch in enumerate(batches):
            order = list(runners) if k % 2 == 0 else list(reversed(runners))
            for name in order:
                fn, model, opt = runners[name]
                timings[name].seconds[-1].append(step(fn, model, opt, batch, args, device, timings[name]))
    return {
        "batches": batches,
        "timings": timings,
        "losses": losses,
        "meta": meta,
        "trainable": sum(p.numel() for p in harness.unique_params(ours) if p.requires_grad),
        "total": sum(p.numel() for p in ours.parameters()),
    }


# -- report -----------------------------------------------------------------------------------------------------
def report(result: dict, args: argparse.Namespace) -> float:
    batches, timings, meta = result["batches"], result["timings"], result["meta"]
    tokens = sum(b.tokens for b in batches)
    positions = {
        "ours": sum(b.packed.input_ids.numel() for b in batches),
        "transformers": sum(b.padded.input_ids.numel() for b in batches),
    }
    rows = {"ours": sum(b.packed.input_ids.shape[0] for b in batches)}
    rows["transformers"] = sum(b.padded.input_ids.shape[0] for b in batches)
    logits = {"ours": sum(b.supervised for b in batches), "transformers": positions["transformers"]}
    per_pass = {name: [tokens / sum(p) for p in t.seconds] for name, t in timings.items()}
    tps = {name: statistics.median(v) for name, v in per_pass.items()}
    ratios = [a / b for a, b in zip(per_pass["ours"], per_pass["transformers"])]
    cuda = args.device.startswith("cuda")
    text_only = sum(b.padded.images_per_row.count(0) for b in batches)
    samples = len(batches) * args.batch

    print(
        f"device {args.device}, precision {args.precision}, attention {args.attn}"
        + harness.threads_note(args)
        + (", --quick defaults" if args.quick else "")
    )
    print(
        f"tower: CLIP {args.image_size} px / patch {args.patch_size}, width {args.vision_dim}, "
        f"{args.vision_layers} layers (feature layer -2), {meta['tokens_per_image']} image tokens; LLM: Llama width "
        f"{args.llm_dim}, {args.llm_layers} layers, {args.llm_heads}/{args.llm_kv_heads} heads, vocab {meta['vocab']}; "
        f"{result['trainable']:,} of {result['total']:,} parameters train (connector + LLM)"
    )
    print(
        f"data: {len(batches)} batches of {args.batch} samples, text {args.text_min}-{args.text_max} tokens "
        f"log-uniform, {text_only} of {samples} text-only; {tokens / samples:.0f} real tokens per sample, "
        f"{sum(b.supervised for b in batches) / samples:.0f} supervised; pack length {args.pack_length}"
    )
    print(
        f"timing: {args.warmup} warm-up step(s) untimed, then {args.repeats} passes over the batches alternating "
        f"ours / transformers; tokens/s = real tokens / pass time, median over passes"
    )
    print(
        f"loss on the first batch before training: ours {result['losses'][0]:.5f}, "
        f"transformers {result['losses'][1]:.5f}"
    )
    header = [
        "model",
        "rows/step",
        "positions/step",
        "real/positions",
        "logit rows/step",
        "ms/step",
        "tokens/s",
    ]
    if cuda:
        header.append("peak step GiB")
    table = []
    for name, label in (
        ("ours", "ours (packed, supervised logits)"),
        ("transformers", "transformers LLaVA (padded)"),
    ):
        ms = 1e3 * statistics.median(sum(p) for p in timings[name].seconds) / len(batches)
        cells = [
            label,
            f"{rows[name] / len(batches):.1f}",
            f"{positions[name] / len(batches):.0f}",
            f"{tokens / positions[name]:.2f}",
            f"{logits[name] / len(batches):.0f}",
            f"{ms:.1f}",
            f"{tps[name]:.0f}",
        ]
        if cuda:
            cells.append(f"{timings[name].peak_gib:.2f}")
        table.append(cells)
    harness.print_table(header, table)
    speedup = tps["ours"] / tps["transformers"]
    print(
        f"per-pass ratio: min {min(ratios):.2f}, median {statistics.median(ratios):.2f}, max {max(ratios):.2f}"
    )
    return harness.headline("train_speedup_vs_hf", speedup, 2)


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = harness.parser(__doc__, quick="small widths, the length mix scaled down by 9 (CPU run)")
    parser.add_argument(
        "--precision",
        choices=["32-true", "bf16-mixed", "bf16-true"],
        default=None,
        help="as Lightning's: bf16-mixed autocasts over fp32 weights; default bf16-mixed on CUDA, 32-true on CPU",
    )
    parser.add_argument(
        "--attn",
        default="sdpa",
        help="attention implementation of both LLMs and towers (sdpa, eager, flash_attention_2)",
    )
    harness.add_model_sizes(
        parser, SIZES, "sizes (defaults: CLIP ViT-L/14-336 and TinyLlama-1.1B shapes; --quick: small)"
    )
    data = parser.add_argument_group("data")
    data.add_argument("--batch", type=int, default=None, help="samples per step; default 8 (16)")
    data.add_argument("--text-min", type=int, default=None, help="shortest text in tokens; default 20 (4)")
    data.add_argument("--text-max", type=int, default=None, help="longest text in tokens; default 1500 (170)")
    data.add_argument("--text-only", type=float, default=0.1, help="fraction of text-only samples (0.1)")
    data.add_argument("--max-rounds", type=int, default=6, help="most question/answer rounds in a sample (6)")
    data.add_argument(
        "--pack-length",
        type=int,
        default=None,
        help="our packed row length; default twice the longest possible sample, rounded up to 64",
    )
    timing = parser.add_argument_group("timing")
    timing.add_argument("--steps", type=int, default=None, help="distinct batches per pass; default 8 (4)")
    timing.add_argument("--warmup", type=int, default=None, help="untimed steps of each model; default 3 (1)")
    timing.add_argument(
        "--repeats", type=int, default=None, help="timed passes, median reported; default 5 (3)"
    )
    timing.add_argument(
        "--lr", type=float, default=2e-5, help="AdamW learning rate of both (2e-5, LLaVA finetune)"
    )
    args = parser.parse_args(argv)
    harness.fill_defaults(args, {**SIZES, **RUN})
    if args.precision is None:
        args.precision = "bf16-mixed" if args.device.startswith("cuda") else "32-true"
    if args.text_min < 2 or args.text_max < args.text_min:
        parser.error("need 2 <= --text-min <= --text-max (a sample needs a question and an answer token)")
    if args.pack_length is None:
        longest = 1 + (args.image_size // args.patch_size) ** 2 + args.text_max
        args.pack_length = 64 * math.ceil(2 * longest / 64)
    return args


def main(argv: list[str] | None = None) -> float:
    args = parse(argv)
    return report(run(args), args)


if __name__ == "__main__":
    main()
