"""Cost of every connector: forward+backward time and memory per image, at 224 / 336 / 448 px.

    python benchmarks/connector_cost.py            # full grid, realistic widths (vision 1024, LLM 4096): a GPU job
    python benchmarks/connector_cost.py --quick    # small widths, 224 px only: a CPU smoke run in seconds

Every connector class exported by ``lit_mllm.nn.connectors`` is built with its default (published) options at
vision width ``--vision-dim`` and LLM width ``--llm-dim`` and fed ``[B, N, D_vision]`` random features, N = 256 /
576 / 1024 (patch 14 at 224 / 336 / 448 px). Connectors whose token count T is an option (``out_tokens``,
``num_queries``, ``num_latents``) run at T = 64, 144 and 256; the others at their natural T (N, N/4, ...).
A connector that refuses a setting (e.g. pooling to more tokens than there are features) is listed as skipped.

The last line is ``slowest_over_mlp: <x>``: the slowest measured time per image over the MLP connector's time at
the same resolution. See benchmarks/README.md for the columns.
"""

from __future__ import annotations

import argparse
import inspect
import math
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

# harness.py sits beside this file; on the path also when the tests load this file by its path
sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness

from lit_mllm.nn import connectors as zoo
from lit_mllm.nn.connectors import Connector, connector_flops

PATCH = 14
TOKEN_OPTIONS = (
    "out_tokens",
    "num_queries",
    "num_latents",
)  # the option that sets T, where a connector has one
# --quick shrinks the connectors' own inner widths too, so a CPU run takes seconds (the full run keeps defaults).
QUICK_OPTIONS = {
    "QFormerConnector": dict(num_layers=4, hidden_size=64, num_heads=4, intermediate_size=256),
    "PerceiverResampler": dict(num_layers=2, num_heads=2, head_dim=32),
}
DEFAULTS = {  # (default, --quick)
    "vision_dim": (1024, 64),
    "llm_dim": (4096, 128),
    "resolutions": ([224, 336, 448], [224]),
    "batch": (8, 2),
    "warmup": (3, 2),
    "repeats": (10, 5),
}


@dataclass
class Row:
    name: str
    px: int
    n: int
    t: int | None = None
    ms: float = math.nan
    act_mib: float = math.nan
    param_mib: float = math.nan
    gflop: float = math.nan
    skipped: str = ""


def connector_classes() -> list[type[Connector]]:
    """The concrete connector classes ``lit_mllm.nn.connectors`` exports, in its ``__all__`` order."""
    found = []
    for name in zoo.__all__:
        obj = getattr(zoo, name)
        if inspect.isclass(obj) and issubclass(obj, Connector) and not inspect.isabstract(obj):
            found.append(obj)
    return found


def token_option(cls: type[Connector]) -> str | None:
    params = inspect.signature(cls.__init__).parameters
    return next((p for p in TOKEN_OPTIONS if p in params), None)


def fwd_bwd(connector: Connector, x: torch.Tensor) -> None:
    out = connector(x)  # [B, T, D_llm]
    out.float().square().mean().backward()


def saved_bytes(connector: Connector, x: torch.Tensor) -> int:
    """Bytes of the tensors autograd saves for backward in one forward (storages counted once, parameters not)."""
    params = {p.untyped_storage().data_ptr() for p in connector.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = connector(x)
    del out
    return sum(seen.values())


def measure(connector: Connector, x: torch.Tensor, warmup: int, repeats: int) -> tuple[float, float]:
    """(median seconds per fwd+bwd of the batch, activation bytes for the batch)."""
    device = x.device
    for _ in range(max(warmup, 1)):  # also allocates .grad, so the memory baseline below includes gradients
        fwd_bwd(connector, x)
    times = []
    for _ in range(repeats):
        connector.zero_grad(set_to_none=False)
        with harness.timed(device) as measured:
            fwd_bwd(connector, x)
        times.append(measured.seconds)
    if device.type == "cuda":
        connector.zero_grad(set_to_none=False)
        with harness.timed(device, cuda_memory=True) as measured:  # over parameters, gradients, input
            fwd_bwd(connector, x)
        act = measured.peak_bytes
    else:
        act = saved_bytes(connector, x)
    return statistics.median(times), act


def run(args: argparse.Namespace) -> list[Row]:
    device = harness.setup_device(args)
    dtype = getattr(torch, args.dtype)
    rows = []
    for cls in connector_classes():
        if args.connectors and cls.__name__ not in {*args.connectors, "MLPConnector"}:
            continue
        option = token_option(cls)
        extra = QUICK_OPTIONS.get(cls.__name__, {}) if args.quick else {}
        for px in args.resolutions:
            n = (px // PATCH) ** 2
            for t in args.tokens if option else [None]:
                row = Row(cls.__name__, px, n, t)
                rows.append(row)
                torch.manual_seed(0)
                try:
                    kwargs = {**extra, **({option: t} if option else {})}
                    connector = cls(args.vision_dim, args.llm_dim, **kwargs).to(device=device, dtype=dtype)
                    row.t = connector.num_tokens(n)
                except ValueError as err:  # a setting this connector refuses
                    row.skipped = str(err).split(";")[0]
                    continue
                connector.train()
                x = torch.randn(args.batch, n, args.vision_dim, device=device, dtype=dtype)
                seconds, act = measure(connector, x, args.warmup, args.repeats)
                row.ms = 1e3 * seconds / args.batch
                row.act_mib = act / args.batch / 2**20
                n_params = sum(p.numel() for p in connector.parameters())
                row.param_mib = 2 * n_params * torch.finfo(dtype).bits / 8 / 2**20  # parameters + gradients
                row.gflop = connector_flops(connector, n) / 1e9
                del connector, x
                if device.type == "cuda":
                    torch.cuda.empty_cache()
    return rows


def report(rows: list[Row], args: argparse.Namespace) -> float:
    mlp = {r.px: r.ms for r in rows if r.name == "MLPConnector" and not r.skipped}
    act_label = "peak act MiB/img" if args.device.startswith("cuda") else "saved MiB/img"
    header = ["connector", "px", "N", "T", "ms/img", "x MLP", act_label, "param+grad MiB", "GFLOP/img"]
    table = []
    for r in rows:
        if r.skipped:
            table.append([r.name, str(r.px), str(r.n), str(r.t), "skipped: " + r.skipped])  # a note
            continue
        table.append(
            [
                r.name,
                str(r.px),
                str(r.n),
                str(r.t),
                f"{r.ms:.3f}",
                f"{r.ms / mlp[r.px]:.2f}" if r.px in mlp else "-",
                f"{r.act_mib:.2f}",
                f"{r.param_mib:.1f}",
                f"{r.gflop:.3f}",
            ]
        )
    memory = (
        "torch.cuda.max_memory_allocated during fwd+bwd minus what was allocated before (parameters, gradients, "
        "input), per image"
        if args.device.startswith("cuda")
        else "bytes of the tensors autograd saves for backward (torch.autograd.graph.saved_tensors_hooks; input "
        "included, parameters excluded), per image"
    )
    print(
        f"device {args.device}, dtype {args.dtype}, vision width {args.vision_dim}, LLM width {args.llm_dim}, "
        f"batch {args.batch}, median of {args.repeats} after {args.warmup} warmup"
        + harness.threads_note(args)
        + (", quick (small inner widths)" if args.quick else "")
    )
    print(f"memory column: {memory}")
    harness.print_table(header, table)

    measured = [r for r in rows if not r.skipped and r.px in mlp]
    slowest = max(measured, key=lambda r: r.ms)
    ratio = slowest.ms / mlp[slowest.px]
    print(f"slowest: {slowest.name} at {slowest.px} px, T={slowest.t}: {slowest.ms:.3f} ms/img")
    return harness.headline("slowest_over_mlp", ratio, 2)


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = harness.parser(
        __doc__, quick="small widths, 224 px only, few repeats (CPU smoke run)", seed=False
    )
    parser.add_argument(
        "--dtype",
        choices=["float32", "bfloat16", "float16"],
        default=None,
        help="default: bfloat16 on CUDA, float32 on CPU",
    )
    harness.add_model_sizes(parser, {k: DEFAULTS[k] for k in ("vision_dim", "llm_dim")})
    parser.add_argument(
        "--resolutions", type=int, nargs="+", default=None, help="default 224 336 448 (224 with --quick)"
    )
    parser.add_argument(
        "--tokens",
        type=int,
        nargs="+",
        default=[64, 144, 256],
        help="T for connectors with a token-count option (squares, for the pooling ones)",
    )
    parser.add_argument(
        "--connectors",
        nargs="+",
        default=None,
        metavar="NAME",
        help="only these classes (MLPConnector is always kept, as the reference)",
    )
    parser.add_argument(
        "--batch", type=int, default=None, help="images per fwd+bwd; default 8 (2 with --quick)"
    )
    parser.add_argument("--warmup", type=int, default=None, help="default 3 (2 with --quick)")
    parser.add_argument(
        "--repeats",
        type=int,
        default=None,
        help="timed repeats, median reported; default 10 (5 with --quick)",
    )
    args = parser.parse_args(argv)
    harness.fill_defaults(args, DEFAULTS)
    if args.dtype is None:
        args.dtype = "bfloat16" if args.device.startswith("cuda") else "float32"
    return args


def main(argv: list[str] | None = None) -> float:
    args = parse(argv)
    return report(run(args), args)


if __name__ == "__main__":
    main()
