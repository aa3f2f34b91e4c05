"""A LLaVA-1.5-7B training step on a GPU: tokens/s and MFU of our step, and of the same step through
``transformers``' ``LlavaForConditionalGeneration`` on the same weights and batches.

    python benchmarks/gpu_step.py                                   # LLaVA-1.5-7B shapes, bf16, one GPU
    torchrun --nproc-per-node 8 benchmarks/gpu_step.py --fsdp       # the same step, FSDP over 8 GPUs
    python benchmarks/gpu_step.py --smoke                           # scaled-down shapes on the CPU, seconds

The model has the real shapes with random weights: a CLIP ViT-L/14-336 tower (24 blocks of width 1024, features
from the penultimate block, so 23 run; 576 image tokens), LLaVA-1.5's 2-layer GELU MLP connector (1024 -> 4096 ->
4096) and a Llama-2-7B LLM (32 layers of width 4096, 32 heads, MLP 11008, vocabulary 32000). Stage ``finetune``
(LLaVA-1.5's second stage): connector and LLM train, the tower is frozen. Weights, gradients and AdamW's moments
are bf16 (``bf16-true``: 8 bytes per trained parameter, about 50 GiB for the 6.76 B trained here, which is why
the two models are timed one after the other, each alone on the card). Both are built on the CPU (random
initialisation of 7 B weights there takes a minute or two) and moved to the device. The transformers model is
:func:`lit_mllm.training.export.to_llava` of ours (same weights), its tower frozen as a typical training script
does; both take the same batches (the LLaVA-Instruct-like length mix of ``train_speedup_vs_hf.py``: one image per
sample but 10% text-only, text 20-1500 tokens), ours packed, theirs padded. Before timing, both models' losses on
the first batch must agree.

A step is forward, loss, backward, AdamW (fused on CUDA) and ``zero_grad``. With ``--fsdp`` (under ``torchrun``)
every decoder layer of the LLM is an FSDP2 unit (``fully_shard``) in both models; the rest (tower, connector,
embeddings, head) is replicated and its gradients averaged over the ranks after backward; each rank draws its
own batches.

MFU (model FLOPs utilisation) = model FLOPs per second / the card's dense bf16 peak (:data:`PEAK_BF16_TFLOPS`,
looked up by ``torch.cuda.get_device_name``; ``--peak-tflops`` for another card). Model FLOPs are those the
step needs, counted from the batch's real lengths, the same for both implementations: the frozen tower forward
(2 per weight per patch token, plus its attention), the connector (4 per weight per image token for the first
layer, whose input needs no gradient, 6 for the second), the LLM (6 per decoder weight per real token, plus
causal attention 6 * width * n * (n + 1) per layer for a sample of n tokens) and the head at the supervised
positions only (6 * vocabulary * width each). Work a model does beyond that (padding, logits nobody learns from)
lowers its MFU. The last line is ``gpu_step_mfu: <ours>``. See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import gc
import math
import os
import statistics
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

# harness.py and train_speedup_vs_hf.py sit beside this file; on the path also when the tests load it by its path
sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness
import train_speedup_vs_hf as speed

from lit_mllm.training import Stage
from lit_mllm.training.callbacks import part_blocks
from lit_mllm.training.export import to_llava

GIB = 2**30
PEAK_BF16_TFLOPS = (  # substring of torch.cuda.get_device_name -> dense bf16 tensor-core peak; first match wins
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("GH200", 989.4),
    ("H200", 989.4),
    ("H100", 989.4),  # SXM (e.g. "NVIDIA H100 80GB HBM3")
    ("H800", 989.4),
    ("B200", 2250.0),
    ("A100", 312.0),
    ("A800", 312.0),
    ("L40S", 362.1),
    ("L4", 121.0),
)
"""Known cards' dense (no sparsity) bf16 peak in TFLOP/s, from their vendor data sheets."""
SIZES = {  # (default: CLIP ViT-L/14-336 + Llama-2-7B, i.e. LLaVA-1.5-7B; --smoke: small)
    "image_size": (336, 32),
    "patch_size": (14, 8),
    "vision_dim": (1024, 32),
    "vision_layers": (24, 3),
    "vision_heads": (16, 2),
    "llm_dim": (4096, 64),
    "llm_layers": (32, 2),
    "llm_heads": (32, 4),
    "llm_kv_heads": (32, 4),
    "llm_intermediate": (11008, None),
    "vocab": (32000, None),
}
RUN = {  # (default, --smoke)
    "batch": (2, 4),
    "text_min": (20, 4),
    "text_max": (1500, 40),
    "steps": (4, 2),
    "warmup": (2, 1),
    "repeats": (3, 1),
}


def peak_for(name: str) -> float | None:
    """The dense bf16 peak in TFLOP/s of the card called ``name`` (``torch.cuda.get_device_name``), if known."""
    return next((peak for key, peak in PEAK_BF16_TFLOPS if key in name), None)


def peak_tflops(device: torch.device, given: float | None) -> tuple[float | None, str]:
    """The dense bf16 peak per device in TFLOP/s (``given`` wins) and the device's name."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return (given if given is not None else peak_for(name)), name


# -- model FLOPs --------------------------------------------------------------------------------------------------
def _linear_weights(modules) -> list[int]:
    return [m.weight.numel() for part in modules for m in part.modules() if isinstance(m, nn.Linear)]


@dataclass
class FlopModel:
    """What the FLOP count needs from the model (read off ours)."""

    decoder_weights: int
    """Weights of the LLM's decoder layers' matrix products."""
    llm_layers: int
    llm_dim: int
    head_weights: int
    """Vocabulary x width."""
    connector_weights: list[int]
    """Each connector layer's weights, first layer first."""
    tower_weights: int
    """Weights of the matrix products of the tower blocks that run."""
    tower_layers: int
    tower_dim: int
    tower_tokens: int
    """Tokens through the tower per image (patches + CLS)."""
    patch_weights: int
    """The patch embedding's weights (one matrix product per patch)."""
    image_tokens: int
    """Tokens an image becomes in the LLM."""

    @classmethod
    def of(cls, model) -> FlopModel:
        tower, lm = model.vision_tower, model.language_model
        blocks, layers = part_blocks(tower), part_blocks(lm)
        patch = next(m for m in tower.modules() if isinstance(m, nn.Conv2d))
        return cls(
            decoder_weights=sum(_linear_weights(layers)),
            llm_layers=len(layers),
            llm_dim=lm.model.config.hidden_size,
            head_weights=lm.model.get_output_embeddings().weight.numel(),
            connector_weights=_linear_weights([model.connector]),
            tower_weights=sum(_linear_weights(blocks)),
            tower_layers=len(blocks),
            tower_dim=tower.model.config.hidden_size,
            tower_tokens=(tower.image_size // tower.model.config.patch_size) ** 2 + 1,
            patch_weights=patch.weight.numel(),
            image_tokens=model.tokens_per_image,
        )

    def parts(self, lengths: list[int], images: int, supervised: int) -> dict[str, float]:
        """Model FLOPs of one training step on samples of ``lengths`` real tokens holding ``images`` images, with
        ``supervised`` positions whose next token is learned: the matrix products (and the patch convolution)
        and the two attentions, apart."""
        t = self.tower_tokens
        first, *rest = self.connector_weights
        products = (
            images * (2 * self.tower_weights * t + 2 * self.patch_weights * (t - 1))  # frozen: forward only
            + images * self.image_tokens * (4 * first + 6 * sum(rest))  # no gradient into the tower
            + 6 * self.decoder_weights * sum(lengths)
            + 6 * self.head_weights * supervised
        )
        return {
            "products": float(products),
            "tower attention": float(images * 4 * self.tower_dim * t * t * self.tower_layers),
            "llm attention": float(6 * self.llm_dim * self.llm_layers * sum(n * (n + 1) for n in lengths)),
        }

    def step(self, lengths: list[int], images: int, supervised: int) -> float:
        """The sum of :meth:`parts`."""
        return sum(self.parts(lengths, images, supervised).values())


# -- distributed --------------------------------------------------------------------------------------------------
@dataclass
class Ranks:
    """This process's place among the ``torchrun`` ranks (one rank without ``--fsdp``)."""

    rank: int = 0
    world: int = 1
    started: bool = False
    """This run started the process group (and ends it)."""

    def all_sum(self, value: float, device: torch.device) -> float:
        if self.world == 1:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=device)
        torch.distributed.all_reduce(t)
        return float(t)

    def all_max(self, value: float, device: torch.device) -> float:
        if self.world == 1:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=device)
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
        return float(t)


def setup(args: argparse.Namespace) -> tuple[torch.device, Ranks]:
    """The device of this rank and the ranks (``--fsdp``: the process group from ``torchrun``'s environment)."""
    if not args.fsdp:
        return harness.setup_device(args), Ranks()
    import torch.distributed as dist

    for var in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        if var not in os.environ:
            raise SystemExit(
                f"--fsdp runs under torchrun (it sets {var}): torchrun --nproc-per-node N {__file__}"
            )
    cuda = args.device.startswith("cuda")
    started = not dist.is_initialized()
    if started:
        dist.init_process_group("nccl" if cuda else "gloo")
    if cuda:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    else:
        device = harness.setup_device(args)
    return device, Ranks(dist.get_rank(), dist.get_world_size(), started)


def shard(model: nn.Module, layers: list[nn.Module]) -> list[nn.Parameter]:
    """FSDP2: each of ``layers`` becomes a unit; returns the trainable parameters left replicated (their
    gradients are averaged over the ranks by :func:`step`)."""
    from torch.distributed.fsdp import fully_shard

    for layer in layers:
        fully_shard(layer)
    sharded = {id(p) for layer in layers for p in layer.parameters()}
    return [p for p in harness.unique_params(model) if p.requires_grad and id(p) not in sharded]


# -- the step -----------------------------------------------------------------------------------------------------
@dataclass
class Run:
    """One implementation's timed steps."""

    name: str
    seconds: list[list[float]] = field(default_factory=list)
    """Step times per pass, per batch."""
    peak_gib: float = math.nan
    """CUDA: most memory allocated during the steps (weights, optimizer state and activations)."""


def step(
    loss_fn, model, optimizer, batch, args, device, replicated: list[nn.Parameter], ranks: Ranks
) -> float:
    """One optimizer step; its wall time (the device synchronised around it)."""
    with harness.timed(device) as measured:
        loss = loss_fn(model, batch, args, device)
        loss.backward()
        if ranks.world > 1:
            for p in replicated:
                if p.grad is not None:
                    torch.distributed.all_reduce(p.grad, op=torch.distributed.ReduceOp.AVG)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return measured.seconds


def time_model(name, loss_fn, model, layers, batches, args, device, ranks: Ranks) -> Run:
    """Move ``model`` to the device (shard it with ``--fsdp``), build its AdamW, run the warm-up steps, then
    ``repeats`` timed passes over ``batches``."""
    model.to(device)
    replicated = shard(model, layers) if args.fsdp else []
    params = [p for p in harness.unique_params(model) if p.requires_grad]
    fused = device.type == "cuda" and not args.fsdp
    optimizer = torch.optim.AdamW(params, lr=args.lr, fused=fused or None)
    run = Run(name)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for w in range(args.warmup):  # untimed: first-step allocations, optimizer state, kernel choice
        step(loss_fn, model, optimizer, batches[w % len(batches)], args, device, replicated, ranks)
    for _ in range(args.repeats):
        run.seconds.append(
            [step(loss_fn, model, optimizer, b, args, device, replicated, ranks) for b in batches]
        )
    if device.type == "cuda":
        run.peak_gib = torch.cuda.max_memory_allocated(device) / GIB
    del optimizer
    return run


def build(args: argparse.Namespace):
    """Ours (bf16, on the CPU), the transformers LLaVA with the same weights (bf16, CPU) and the data facts."""
    stage = Stage("finetune", ["connector", "language_model"])
    ours = harness.tiny_prefix_vlm(args, stage, args.lr, max_length=args.pack_length).to(torch.bfloat16)
    hf = to_llava(ours)  # built in bf16, as ours now is
    (hf.model if hasattr(hf, "lm_head") else hf).vision_tower.requires_grad_(False)
    for model in (ours.language_model.model, ours.vision_tower.model, hf):
        model.set_attn_implementation(args.attn)
    ours.train()  # frozen parts stay in eval mode (VLMModule.train)
    hf.to(torch.bfloat16).train()
    lm, tower = ours.language_model, ours.vision_tower
    meta = {
        "tokens_per_image": ours.tokens_per_image,
        "image_token_id": lm.image_token_id,
        "image_size": tower.image_size,
        "vocab": lm.model.get_input_embeddings().num_embeddings,
        "bos": lm.tokenizer.bos_token_id,
        "pad": lm.tokenizer.pad_token_id,
    }
    return ours, hf, meta


def run(args: argparse.Namespace) -> dict:
    device, ranks = setup(args)
    try:
        warnings.filterwarnings(
            "ignore", message=".*self.log.*"
        )  # training_step logs; there is no Trainer here
        ours, hf, meta = build(args)
        flop_model = FlopModel.of(ours)
        trainable = sum(p.numel() for p in harness.unique_params(ours) if p.requires_grad)
        total = sum(p.numel() for p in harness.unique_params(ours))
        layer_type = type(part_blocks(ours.language_model)[0])
        hf_layers = [m for m in hf.modules() if isinstance(m, layer_type)]
        data_args = argparse.Namespace(**{**vars(args), "seed": args.seed + ranks.rank})
        batches = speed.make_batches(data_args, meta, device)
        ours.to(device)
        hf.to(device)
        losses = speed.check_same_loss(ours, hf, batches[0], args, device)
        hf.to("cpu")  # each model is timed alone on the device
        runs = [
            time_model(
                "ours", speed.ours_loss, ours, part_blocks(ours.language_model), batches, args, device, ranks
            )
        ]
        del ours  # nothing else holds its weights: the card is free for the other model
        gc.collect()  # modules can sit in reference cycles
        if device.type == "cuda":
            torch.cuda.empty_cache()
        runs.append(time_model("transformers", speed.hf_loss, hf, hf_layers, batches, args, device, ranks))
        flops = sum(
            flop_model.step(
                b.padded.attention_mask.sum(1).tolist(), sum(b.padded.images_per_row), b.supervised
            )
            for b in batches
        )
        return {
            "runs": runs,
            "losses": losses,
            "device": device,
            "ranks": ranks,
            "tokens": ranks.all_sum(sum(b.tokens for b in batches), device),
            "flops": ranks.all_sum(flops, device),
            "samples": ranks.all_sum(len(batches) * args.batch, device),
            "pass_seconds": [
                [ranks.all_max(sum(p), device) for p in r.seconds] for r in runs
            ],  # the slowest rank's pass time
            "trainable": trainable,
            "total": total,
            "meta": meta,
        }
    finally:
        if ranks.started:
            torch.distributed.destroy_process_group()


# -- report -------------------------------------------------------------------------------------------------------
def report(result: dict, args: argparse.Namespace) -> float:
    device, ranks = result["device"], result["ranks"]
    peak, name = peak_tflops(device, args.peak_tflops)
    if peak is None:
        raise SystemExit(
            f"no bf16 peak known for {name!r} (known: {', '.join(k for k, _ in PEAK_BF16_TFLOPS)}); give the "
            "card's dense bf16 TFLOP/s with --peak-tflops"
        )
    steps = args.steps
    rows = []
    mfu = {}
    for run, passes in zip(result["runs"], result["pass_seconds"]):
        seconds = statistics.median(passes)  # one pass = `steps` batches on every rank
        tps = result["tokens"] / seconds
        achieved = result["flops"] / seconds / ranks.world  # per device
        mfu[run.name] = achieved / (peak * 1e12)
        cells = [
            run.name,
            f"{1e3 * seconds / steps:.1f}",
            f"{tps:,.0f}",
            f"{tps / ranks.world:,.0f}",
            f"{achieved / 1e12:.1f}",
            f"{100 * mfu[run.name]:.1f}%",
        ]
        if device.type == "cuda":
            cells.append(f"{run.peak_gib:.1f}")
        rows.append(cells)
    if ranks.rank != 0:
        return mfu["ours"]
    fsdp = f"FSDP2 over {ranks.world} rank(s)" if args.fsdp else "one device"
    print(
        f"device {name} ({fsdp}), bf16-true, attention {args.attn}{harness.threads_note(args)}; peak {peak:g} TFLOP/s"
    )
    print(
        f"tower: CLIP {args.image_size} px / patch {args.patch_size}, width {args.vision_dim}, {args.vision_layers} "
        f"layers (feature layer -2), {result['meta']['tokens_per_image']} image tokens; connector: 2-layer MLP; LLM: "
        f"Llama width {args.llm_dim}, {args.llm_layers} layers, {args.llm_heads}/{args.llm_kv_heads} heads, MLP "
        f"{args.llm_intermediate or 3 * args.llm_dim}, vocab {result['meta']['vocab']}; {result['trainable']:,} of "
        f"{result['total']:,} parameters train (connector + LLM)"
    )
    samples = result["samples"]
    print(
        f"data: {args.steps} batches of {args.batch} samples per rank, text {args.text_min}-{args.text_max} tokens, "
        f"{result['tokens'] / samples:.0f} real tokens per sample; model FLOPs per sample "
        f"{result['flops'] / samples / 1e9:,.1f} G"
    )
    print(
        f"timing: {args.warmup} warm-up step(s), then {args.repeats} pass(es) over the batches, each model alone; "
        f"median pass; first-batch loss ours {result['losses'][0]:.4f}, transformers {result['losses'][1]:.4f}"
    )
    header = ["model", "ms/step", "tokens/s", "tokens/s/device", "model TFLOP/s/device", "MFU"]
    if device.type == "cuda":
        header.append("peak GiB")
    harness.print_table(header, rows)
    print(f"speedup (tokens/s ours / transformers): {mfu['ours'] / mfu['transformers']:.2f}")
    return harness.headline("gpu_step_mfu", mfu["ours"], 3)


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = harness.parser(__doc__, quick="same as --smoke")
    parser.add_argument(
        "--smoke", dest="quick", action="store_true", help="scaled-down shapes, short run: a CPU smoke test"
    )
    parser.add_argument("--fsdp", action="store_true", help="FSDP2 over the ranks of torchrun")
    parser.add_argument(
        "--attn", default="sdpa", help="attention implementation (sdpa, eager, flash_attention_2)"
    )
    parser.add_argument(
        "--peak-tflops",
        type=float,
        default=None,
        help="the device's dense bf16 peak (default: from the card's name)",
    )
    harness.add_model_sizes(parser, SIZES, "sizes (defaults: LLaVA-1.5-7B; --smoke: small)")
    data = parser.add_argument_group("data")
    data.add_argument("--batch", type=int, default=None, help="samples per step and rank; default 2 (4)")
    data.add_argument("--text-min", type=int, default=None, help="shortest text in tokens; default 20 (4)")
    data.add_argument("--text-max", type=int, default=None, help="longest text in tokens; default 1500 (40)")
    data.add_argument("--text-only", type=float, default=0.1, help="fraction of text-only samples (0.1)")
    data.add_argument("--max-rounds", type=int, default=6, help="most question/answer rounds in a sample (6)")
    timing = parser.add_argument_group("timing")
    timing.add_argument("--steps", type=int, default=None, help="distinct batches per pass; default 4 (2)")
    timing.add_argument("--warmup", type=int, default=None, help="untimed steps of each model; default 2 (1)")
    timing.add_argument(
        "--repeats", type=int, default=None, help="timed passes, median reported; default 3 (1)"
    )
    timing.add_argument("--lr", type=float, default=2e-5, help="AdamW learning rate (2e-5, LLaVA finetune)")
    args = parser.parse_args(argv)
    harness.fill_defaults(args, {**SIZES, **RUN})
    args.precision = "bf16-true"  # what speed.check_same_loss and the loss functions read
    longest = 1 + (args.image_size // args.patch_size) ** 2 + args.text_max
    args.pack_length = 64 * math.ceil(args.batch * longest / 64)  # one row can hold the whole batch
    return args


def main(argv: list[str] | None = None) -> float:
    args = parse(argv)
    return report(run(args), args)


if __name__ == "__main__":
    main()
