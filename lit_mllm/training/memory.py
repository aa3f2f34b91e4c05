"""Training memory per device, estimated from a config before a GPU is spent: weights, gradients, optimizer
states, activations of one training step, buffers, and the peak they add up to.

    lit-mllm estimate-memory --config configs/llava15_7b.yaml --seq_len 700 --zero_stage 3 --devices 8

(the command: :mod:`lit_mllm.commands.estimate_memory`; here: :func:`estimate_memory` on a built model).

Model states, in bytes per parameter as counted by Hugging Face's notes on the anatomy of training memory and
by ZeRO (Rajbhandari et al. 2020, "ZeRO: Memory Optimizations Toward Training Trillion Parameter Models"):

- weights: 4 in fp32 training; 6 under mixed precision (the fp32 weight plus the half copy autocast makes for
  the forward). The half copy is counted where autocast makes and keeps it: weights of matrix layers (Linear,
  Conv, MultiheadAttention) in the parts a backward pass crosses. ``*-true`` precisions keep one copy at their
  dtype (bf16-true: 2).
- gradients: 4 (fp32 or mixed precision: gradients take the dtype of the fp32 weights; ZeRO counts 2 for fp16
  gradients), trainable parameters only.
- optimizer states: AdamW 8 (first and second moments in fp32; ZeRO's fp32 master copy is the 4 bytes of the
  weights above, so mixed-precision AdamW is 6 + 4 + 8 = 18 bytes, ZeRO's 16 with fp16 gradients), 8-bit AdamW
  2, SGD with momentum 4, plain SGD 0; trainable parameters only. The figure is not looked up by name: the
  config's optimizer is built on a probe parameter at the training dtype, stepped once, and its state tensors
  measured (so AdamW under bf16-true, which keeps bf16 moments, is 4).
- ZeRO over N devices: stage 1 divides the optimizer states (and the optimizer step's temporaries) by N, stage
  2 also the gradients, stage 3 also the weights.

Activations (what autograd keeps for backward), per transformer block and token, in elements; D is the block's
width, D_kv the key/value width, I the MLP width:

    trainable block:                     2 c D  +  2 D + 2 D_kv  +  m_t I
    frozen block that gradients cross:   2 D    +  2 D + 2 D_kv  +  m_f I

``2 c D``: the two norms (c = 3 for RMSNorm written as ``w * (x * rsqrt(mean(x^2)))``, as ``transformers``
does: input, normalised, output; c = 2 for a fused LayerNorm/RMSNorm: input and output); a frozen block keeps
only the norms' inputs. ``2 D + 2 D_kv``: query, key, value and attention output; fused SDPA and flash
attention keep no ``L x L`` matrix, and ``transformers`` repeats grouped keys and values to every head (D_kv =
D) unless SDPA runs without a mask or flash attention runs. ``m I``: the MLP, m_t/m_f = 4/3 for a gated MLP
(SwiGLU: gate, its activation, up, product), 2/1 for a plain GELU/ReLU MLP, 3/2 for QuickGELU (``x *
sigmoid(1.702 x)``, unfused). Elements are 4 bytes in fp32. Under mixed precision the norm terms are fp32
(autocast runs norms in fp32 and the residual stream stays fp32), the rest 2 bytes; under bf16/16-true
everything is 2 bytes except RMSNorm's input, which it keeps as an fp32 copy. Attention adds per layer ``B
L^2`` elements when rows carry an attention mask (SDPA keeps the mask expanded to the query dtype), or ``B H
L^2`` fp32 probabilities with eager attention.

Per part, with B rows of L tokens (image tokens included), I_img tower inputs of n tokens, S supervised
positions and a vocabulary of V:

- vision tower: ``I_img * n * sum over blocks``; a frozen tower runs without autograd and keeps nothing; with
  only its last blocks trained, the blocks before them keep nothing either.
- connector: measured rather than modelled (connectors differ too much): the tensors autograd saves in a
  forward on one image at the real shapes (``torch.autograd.graph.saved_tensors_hooks``), times ``I_img``.
- language model: ``B * L * sum over layers`` plus the final norm (``(c - 1) D`` trainable, ``D`` frozen) and
  the loss head: logits at the S supervised positions, their fp32 copy under half precision, the fp32
  log-probabilities kept for backward. With ``activation_checkpointing`` a layer keeps only its input (``D``
  per token) and backward recomputes one layer at a time (Chen et al. 2016, "Training Deep Nets with Sublinear
  Memory Cost").

Peak: Lightning runs ``training_step``, ``zero_grad``, ``backward``, then the optimizer step, so a
steady-state step (optimizer states exist) peaks at weights + buffers + optimizer states + batch + the largest
of three phases:

- end of forward: the previous step's gradients (alive until ``zero_grad``) + activations;
- backward, which starts with all activations and the loss's gradients (log-probabilities and logits,
  ``2 S V`` fp32), then crosses the layers top down; at a layer it holds the activations of the layers below
  (and, under checkpointing, the recomputed layer), the gradients already allocated (head, final norm, layers
  above) and the working gradients of the layer's MLP, ``D + w I`` per token (w = 3 for a frozen gated MLP:
  the product's, the gate activation's and the up projection's gradients; 2 when the layer trains, as its
  saved product is released first; plain MLP 2 / 1);
- optimizer step: gradients + the step's temporaries (one copy of the tensors updated at once: a whole
  parameter group for ``foreach`` implementations, PyTorch's default on CUDA; the largest tensor otherwise).

Not counted: allocator rounding and fragmentation, kernels' workspaces (cuBLAS, flash attention), the CUDA
context, communication buffers, CPU-offloaded states, small per-token scalars (norm statistics, attention
log-sum-exp).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

from lit_mllm.nn.language.layers import DecoderLayerWrapper, bare_layer, without_efficiency

PRECISIONS = ("32-true", "64-true", "bf16-true", "16-true", "bf16-mixed", "16-mixed")
_LEGACY_PRECISIONS = {"32": "32-true", "64": "64-true", "16": "16-mixed", "bf16": "bf16-mixed"}
GIB = 2**30
PROBE_SHAPE = (256, 256)
"""Shape of the parameter an optimizer's state is measured on (large enough for 8-bit block quantisation)."""


class UnsupportedModel(NotImplementedError, TypeError):
    """The estimate does not model this kind of model (the message says which it does); ``lit-mllm`` prints it
    without a stack trace."""


# -- precision -------------------------------------------------------------------------------------------
def normalize_precision(precision: str | int) -> str:
    """Lightning's precision names; legacy ``32`` / ``16`` / ``bf16`` are mapped as Lightning maps them."""
    value = _LEGACY_PRECISIONS.get(str(precision), str(precision))
    if value not in PRECISIONS:
        raise ValueError(f"precision {precision!r} is not one of {', '.join(PRECISIONS)}")
    return value


def _half(precision: str) -> bool:
    return precision.startswith(("bf16", "16"))


def _param_dtype(precision: str, dtype: torch.dtype) -> torch.dtype:
    """The dtype a parameter trains at: ``*-true`` converts the model, ``*-mixed`` keeps it as built."""
    if not dtype.is_floating_point:
        return dtype
    return {
        "bf16-true": torch.bfloat16,
        "16-true": torch.float16,
        "64-true": torch.float64,
    }.get(precision, dtype)


def _nbytes(t: torch.Tensor, precision: str) -> int:
    return t.numel() * _param_dtype(precision, t.dtype).itemsize


# -- model introspection ---------------------------------------------------------------------------------
def unique_params(module: nn.Module) -> list[nn.Parameter]:
    """Parameters of ``module``, shared tensors once."""
    seen: dict[int, nn.Parameter] = {}
    for p in module.parameters():
        seen.setdefault(id(p), p)
    return list(seen.values())


def _castable_params(modules: list[nn.Module]) -> list[nn.Parameter]:
    """Parameters autocast casts to half precision: those of Linear, Conv and MultiheadAttention layers."""
    kinds = (nn.Linear, nn.modules.conv._ConvNd, nn.MultiheadAttention)
    seen: dict[int, nn.Parameter] = {}
    for root in modules:
        for m in root.modules():
            if isinstance(m, kinds):
                for p in m.parameters(recurse=isinstance(m, nn.MultiheadAttention)):
                    seen.setdefault(id(p), p)
    return list(seen.values())


def _quick_gelu_types() -> tuple[type, ...]:
    found = []
    for module, name in (
        ("transformers.activations", "QuickGELUActivation"),
        ("open_clip.transformer", "QuickGELU"),
    ):
        try:
            found.append(getattr(importlib.import_module(module), name))
        except (ImportError, AttributeError):
            pass
    return tuple(found)


@dataclass(frozen=True)
class BlockShape:
    """What the activation formula needs to know of a transformer block."""

    width: int
    """D: the residual width."""
    kv_width: int
    """D_kv: width of keys and values (D without grouped-query attention)."""
    mlp_width: int
    """I: the MLP's inner width."""
    norm_terms: int
    """c: tensors a trainable norm keeps (3 for transformers' RMSNorm, 2 for a fused LayerNorm/RMSNorm)."""
    mlp: Literal["gated", "plain", "quick_gelu"]
    """MLP kind: gated (SwiGLU), plain (GELU/ReLU), QuickGELU."""

    def elements(self, trainable: bool) -> tuple[int, int, int]:
        """Saved elements per token: ``(norm inputs, other norm tensors, the rest)`` (module docstring)."""
        d, kv, i = self.width, self.kv_width, self.mlp_width
        m_t, m_f = {"gated": (4, 3), "plain": (2, 1), "quick_gelu": (3, 2)}[self.mlp]
        if trainable:
            return 2 * d, 2 * (self.norm_terms - 1) * d, 2 * d + 2 * kv + m_t * i
        return 2 * d, 0, 2 * d + 2 * kv + m_f * i

    def backward_elements(self, trainable: bool) -> tuple[int, int]:
        """Gradients alive per token while backward crosses the block's MLP: ``(D, w I)``, the residual
        stream's gradient and the MLP's own (gated: product, gate activation and up projection, w = 3; plain:
        activation output and input, w = 2; QuickGELU 3), one fewer in a trainable block, whose saved product
        (activation output) the down projection's backward releases before the others are allocated."""
        w = {"gated": 3, "plain": 2, "quick_gelu": 3}[self.mlp] - int(trainable)
        return self.width, w * self.mlp_width


@dataclass(frozen=True)
class ElementBytes:
    """Bytes of a saved element by role, for a precision."""

    act: int
    """Linear, attention and MLP tensors."""
    residual: int
    """The residual stream: norm inputs, checkpointed layer inputs."""
    norm_out: int
    """What a trainable norm keeps besides its input."""
    upcast: bool
    """RMSNorm (c = 3) keeps an fp32 copy of its half-precision input."""

    @classmethod
    def of(cls, precision: str, dtype: torch.dtype) -> ElementBytes:
        """For a precision and the dtype a part's parameters train at (after ``*-true`` conversion)."""
        if precision.endswith("mixed"):  # autocast: matmuls in half, norms and the residual stream in fp32
            return cls(2, 4, 4, False)
        if dtype.itemsize == 2:  # bf16/16-true, or a part built in half precision
            return cls(2, 2, 2, True)
        return cls(dtype.itemsize, dtype.itemsize, dtype.itemsize, False)

    def norm_input(self, norm_terms: int) -> int:
        return 4 if self.upcast and norm_terms == 3 else self.residual

    def block(self, shape: BlockShape, trainable: bool) -> int:
        """Saved bytes per token of a block."""
        norm_in, norm_out, rest = shape.elements(trainable)
        return norm_in * self.norm_input(shape.norm_terms) + norm_out * self.norm_out + rest * self.act


def block_shape(block: nn.Module, width: int, kv_width: int | None = None) -> BlockShape:
    """Read a block's MLP width and kind and its norm kind from its modules (no names): the MLP's down
    projection is the Linear from ``I != D`` back to ``D``; two Linears ``D -> I`` (or one ``D -> 2I``) make
    it gated."""
    linears = [m for m in block.modules() if isinstance(m, nn.Linear)]
    downs = [lin.in_features for lin in linears if lin.out_features == width and lin.in_features != width]
    inner = max(downs, default=width)
    ups = [lin for lin in linears if lin.in_features == width and lin.out_features in (inner, 2 * inner)]
    gated = len([u for u in ups if u.out_features == inner]) >= 2 or any(
        u.out_features == 2 * inner for u in ups
    )
    quick = _quick_gelu_types()
    mlp = (
        "gated"
        if gated
        else "quick_gelu"
        if quick and any(isinstance(m, quick) for m in block.modules())
        else "plain"
    )
    fused_norm = any(isinstance(m, (nn.LayerNorm, nn.RMSNorm)) for m in block.modules())
    return BlockShape(width, kv_width or width, inner, 2 if fused_norm else 3, mlp)


def _hf_config(module: nn.Module):
    config = getattr(module, "config", None) or getattr(getattr(module, "model", None), "config", None)
    if config is not None and hasattr(config, "get_text_config"):
        config = config.get_text_config()
    return config


def _trains(module: nn.Module) -> bool:
    return any(p.requires_grad for p in module.parameters())


def _tower_list(tower: nn.Module) -> list[nn.Module]:
    from lit_mllm.nn.vision.fused import FusedTowers

    return list(tower.towers) if isinstance(tower, FusedTowers) else [tower]


# -- optimizer -------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class OptimizerFacts:
    """What an optimizer keeps per trainable parameter, measured on a probe."""

    name: str
    state_bytes_per_param: float
    """Bytes of state tensors per parameter element (scalars such as Adam's step count excluded)."""
    foreach: bool | None
    """The optimizer's ``foreach`` option (None: PyTorch's default, foreach on CUDA)."""
    fused: bool


def probe_optimizer(
    optimizer: type[torch.optim.Optimizer] | object, dtype: torch.dtype = torch.float32
) -> OptimizerFacts:
    """Build ``optimizer`` (a class or the config's optimizer callable) on a probe parameter of ``dtype``,
    take one step and measure its state tensors (per-tensor scalars excluded)."""
    probe = nn.Parameter(torch.zeros(PROBE_SHAPE, dtype=dtype))
    probe.grad = torch.full_like(probe, 1e-3)
    try:
        opt = optimizer([probe])
        opt.step()
    except Exception as e:  # noqa: BLE001 - an optimizer may fail on a CPU probe (a CUDA-only 8-bit one)
        name = getattr(optimizer, "__name__", optimizer)
        raise RuntimeError(
            f"could not measure the state of optimizer {name!r} on a CPU probe parameter "
            f"({type(e).__name__}: {e}); pass --optimizer_state_bytes (bytes per trainable parameter: "
            "AdamW 8, 8-bit AdamW 2, SGD with momentum 4, SGD 0)"
        ) from e
    state = opt.state.get(probe, {})
    total = sum(v.numel() * v.element_size() for v in state.values() if torch.is_tensor(v) and v.numel() > 1)
    return OptimizerFacts(
        type(opt).__name__,
        total / probe.numel(),
        opt.defaults.get("foreach"),
        bool(opt.defaults.get("fused")),
    )


def _optimizer_class(optimizer) -> type | None:
    """The class behind a config's optimizer callable (a class, or a ``functools.partial`` holding it)."""
    if isinstance(optimizer, type):
        return optimizer
    return next(
        (
            a
            for a in (getattr(optimizer, "func", None), *getattr(optimizer, "args", ()))
            if isinstance(a, type)
        ),
        None,
    )


def _optimizer_facts(optimizer, dtype: torch.dtype) -> OptimizerFacts:
    """Measured on a probe; an 8-bit AdamW that cannot run here (bitsandbytes missing, or CUDA-only) takes the
    notes' 2 bytes per parameter."""
    try:
        return probe_optimizer(optimizer, dtype)
    except RuntimeError:
        cls = _optimizer_class(optimizer)
        try:
            from lit_mllm.training.efficiency import AdamW8bit
        except ImportError:
            AdamW8bit = None  # noqa: N806
        if AdamW8bit is not None and cls is not None and issubclass(cls, AdamW8bit):
            return OptimizerFacts(cls.__name__, 2.0, None, False)
        raise


# -- the estimate ----------------------------------------------------------------------------------------
@dataclass
class PartMemory:
    """Bytes of one part (per device)."""

    params: int = 0
    trainable: int = 0
    weights: int = 0
    gradients: int = 0
    optimizer: int = 0
    activations: int = 0


@dataclass
class MemoryEstimate:
    """Per-device training memory in bytes; :meth:`table` prints it, :meth:`as_dict` gives GiB."""

    parts: dict[str, PartMemory]
    loss_head: int
    """Activations of the vocabulary projection and the loss at the end of the forward."""
    backward: int
    """What backward holds at its fullest, besides weights, optimizer states and batch: the largest, over the
    LLM's layers, of the activations not yet released, the gradients already allocated (head, final norm,
    layers above), the layer's recomputation under checkpointing and its MLP's working gradients; or, at the
    very start, all activations + the loss's gradients."""
    recomputed: int
    """Activations of the one layer recomputed at a time in backward under activation checkpointing."""
    batch: int
    buffers: int
    step_temporaries: int
    settings: dict = field(default_factory=dict)

    @property
    def weights(self) -> int:
        return sum(p.weights for p in self.parts.values())

    @property
    def gradients(self) -> int:
        return sum(p.gradients for p in self.parts.values())

    @property
    def optimizer(self) -> int:
        return sum(p.optimizer for p in self.parts.values())

    @property
    def activations(self) -> int:
        return sum(p.activations for p in self.parts.values()) + self.loss_head

    @property
    def phases(self) -> dict[str, int]:
        """What is added to the persistent memory at each candidate peak of a steady-state step."""
        return {
            "end of forward": self.gradients + self.activations,
            "backward": self.backward,
            "optimizer step": self.gradients + self.step_temporaries,
        }

    @property
    def peak_phase(self) -> str:
        phases = self.phases
        return max(phases, key=phases.get)

    @property
    def total(self) -> int:
        return self.weights + self.buffers + self.optimizer + self.batch + max(self.phases.values())

    def as_dict(self) -> dict[str, float | int | str | bool]:
        """GiB per component (and per part), the peak phase and the settings the estimate was made for."""
        out: dict[str, float | int | str | bool] = {
            "weights": self.weights / GIB,
            "gradients": self.gradients / GIB,
            "optimizer_states": self.optimizer / GIB,
            "activations": self.activations / GIB,
        }
        for name, part in self.parts.items():
            out[f"activations/{name}"] = part.activations / GIB
        out |= {
            "activations/loss_head": self.loss_head / GIB,
            "recomputed": self.recomputed / GIB,
            "batch": self.batch / GIB,
            "buffers": self.buffers / GIB,
            "step_temporaries": self.step_temporaries / GIB,
            "total": self.total / GIB,
            "peak_phase": self.peak_phase,
        }
        for name, part in self.parts.items():
            out[f"params/{name}"] = part.params
            out[f"params_trainable/{name}"] = part.trainable
        return out | self.settings

    def table(self) -> str:
        """A readable table: one row per part plus the rows without parameters; GiB per device (MiB when the
        total is under 1 GiB)."""
        s = self.settings
        unit, scale = ("GiB", GIB) if self.total >= GIB else ("MiB", 2**20)

        def g(x: int) -> str:
            return f"{x / scale:,.4g}" if x else "0"

        header = (
            "part",
            "parameters",
            "trainable",
            "weights",
            "gradients",
            "optimizer",
            "activations",
            "other",
        )
        rows = []
        for name, p in self.parts.items():
            cells = (g(p.weights), g(p.gradients), g(p.optimizer), g(p.activations), "")
            rows.append((name, f"{p.params:,}", f"{p.trainable:,}", *cells))
        rows.append(("loss head", "", "", "", "", "", g(self.loss_head), ""))
        rows.append(("batch", "", "", "", "", "", "", g(self.batch)))
        rows.append(("buffers", "", "", "", "", "", "", g(self.buffers)))
        total = (
            "sum",
            f"{sum(p.params for p in self.parts.values()):,}",
            f"{sum(p.trainable for p in self.parts.values()):,}",
            g(self.weights),
            g(self.gradients),
            g(self.optimizer),
            g(self.activations),
            g(self.batch + self.buffers),
        )
        widths = [max(len(r[i]) for r in [header, *rows, total]) for i in range(len(header))]

        def line(cells) -> str:
            return "  ".join(
                c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths))
            )

        rule = line(["-" * w for w in widths])
        lines = [
            f"stage {s['stage']!r}, precision {s['precision']}, {s['optimizer']} "
            f"({s['optimizer_state_bytes_per_param']:g} bytes/param), {s['devices']} device(s), ZeRO stage "
            f"{s['zero_stage']}, activation checkpointing {'on' if s['activation_checkpointing'] else 'off'}",
            f"per device: {s['batch_size']} rows x {s['seq_len']} tokens ({s['images_per_sample']} tower "
            f"input(s) x {s['tokens_per_image']} tokens per row), {s['supervised_tokens']:g} supervised "
            f"positions per row, attention mask {'yes' if s['attention_mask'] else 'no'}; {unit}",
            line(header),
            rule,
            *map(line, rows),
            rule,
            line(total),
            "",
            "peak = weights + optimizer + batch + buffers + the largest of:",
        ]
        for phase, value in self.phases.items():
            lines.append(f"  {phase:<18} {g(value):>10}")
        lines.append(
            f"  ({f'recomputed layer {g(self.recomputed)}; ' if self.recomputed else ''}"
            f"step temporaries {g(self.step_temporaries)})"
        )
        lines.append(f"total (peak at {self.peak_phase}): {g(self.total)} {unit}")
        return "\n".join(lines)


def estimate_memory(
    model: nn.Module,
    batch_size: int,
    seq_len: int | None = None,
    images_per_sample: int = 1,
    supervised_tokens: float | None = None,
    precision: str = "32-true",
    devices: int = 1,
    zero_stage: int = 0,
    activation_checkpointing: bool | None = None,
    attention_mask: bool = True,
    foreach: bool | None = None,
    optimizer_state_bytes: float | None = None,
    accelerator: Literal["cpu", "cuda"] = "cuda",
) -> MemoryEstimate:
    """Estimate the per-device memory of one training step of a prefix-fusion model (``vision_tower``,
    ``connector``, ``language_model``; what trains is read from ``requires_grad``).

    Args:
        model: A built :class:`~lit_mllm.lit.VLMModule` (stage applied).
        batch_size: Rows per device.
        seq_len: Tokens per row, image tokens included; default the LLM's context length.
        images_per_sample: Tower inputs per row (images, or tiles of tiled layouts).
        supervised_tokens: Positions per row whose next token is learned (logits are computed there only);
            default every text position, ``seq_len - images_per_sample * tokens_per_image``.
        precision: Lightning precision (``32-true``, ``bf16-mixed``, ``16-mixed``, ``bf16-true``, ...).
        devices: Data-parallel devices the model states are sharded over under ZeRO.
        zero_stage: 0 (plain data parallel), 1 (optimizer states sharded), 2 (+ gradients), 3 (+ weights).
        activation_checkpointing: The LLM's layers keep only their inputs and are recomputed in backward;
            None reads the language model's ``gradient_checkpointing`` (or transformers' flag).
        attention_mask: Rows carry an attention mask (padded or packed batches); SDPA then keeps it per layer.
        foreach: The optimizer's foreach option; None reads it from the optimizer (default: foreach on CUDA).
        optimizer_state_bytes: Optimizer state bytes per trainable parameter; None measures the model's
            optimizer.
        accelerator: Where training runs (decides PyTorch's default foreach optimizer step).
    """
    precision = normalize_precision(precision)
    if zero_stage not in (0, 1, 2, 3):
        raise ValueError(f"zero_stage must be 0, 1, 2 or 3, got {zero_stage}")
    if devices < 1 or batch_size < 1:
        raise ValueError(f"devices and batch_size must be at least 1, got {devices} and {batch_size}")
    for attr in ("vision_tower", "connector", "language_model", "tokens_per_image"):
        if not hasattr(model, attr):
            raise UnsupportedModel(
                f"{type(model).__name__} has no {attr!r}: the estimate covers prefix-fusion models (a vision "
                "tower, a connector and a decoder LLM, as lit_mllm.lit.PrefixFusionVLM)"
            )
    tower, connector, lm = model.vision_tower, model.connector, model.language_model
    wrapped = {
        type(e).__name__
        for e in map(without_efficiency, lm.decoder_layers)
        if isinstance(e, DecoderLayerWrapper)
    }
    if wrapped:
        raise UnsupportedModel(
            f"{type(model).__name__} wraps the LLM's decoder layers ({', '.join(sorted(wrapped))}: weights and "
            "activations inside the layers that the estimate does not model); the memory estimate covers the prefix "
            "family (lit_mllm.lit.PrefixFusionVLM), whose layers are the LLM's own"
        )
    params = unique_params(model)
    if not any(p.requires_grad for p in params):
        raise ValueError("nothing trains: the stage leaves every parameter frozen")
    half = _half(precision)
    mixed = precision.endswith("mixed")
    trainable_dtype = _param_dtype(precision, next(p for p in params if p.requires_grad).dtype)

    def element_bytes(part: nn.Module) -> ElementBytes:
        dtype = next((p.dtype for p in part.parameters() if p.is_floating_point()), torch.float32)
        return ElementBytes.of(precision, _param_dtype(precision, dtype))

    if activation_checkpointing is None:
        hf_model = model.language_model.model
        flag = next(
            (
                f
                for f in ("is_activation_checkpointing", "is_gradient_checkpointing")
                if hasattr(type(hf_model), f)
            ),
            None,
        )
        activation_checkpointing = bool(
            getattr(model.language_model, "gradient_checkpointing", False)
            or (flag and getattr(hf_model, flag))
        )

    tokens_per_image = int(model.tokens_per_image)
    context = getattr(lm, "max_length", None)
    seq_len = seq_len or context
    if seq_len is None:
        raise ValueError("the LLM names no context length: pass seq_len")
    text_tokens = seq_len - images_per_sample * tokens_per_image
    if text_tokens < 1:
        raise ValueError(
            f"seq_len {seq_len} leaves no text after {images_per_sample} x {tokens_per_image} image tokens; "
            "raise seq_len"
        )
    supervised = text_tokens if supervised_tokens is None else supervised_tokens
    rows, images = batch_size, batch_size * images_per_sample
    tokens = rows * seq_len

    if optimizer_state_bytes is None:
        facts = _optimizer_facts(model.optimizer, trainable_dtype)
    else:
        cls = _optimizer_class(getattr(model, "optimizer", None))
        facts = OptimizerFacts(cls.__name__ if cls else "optimizer", optimizer_state_bytes, foreach, False)
    use_foreach = facts.foreach if foreach is None else foreach
    if use_foreach is None:
        use_foreach = accelerator == "cuda" and not facts.fused

    shard_o = devices if zero_stage >= 1 else 1
    shard_g = devices if zero_stage >= 2 else 1
    shard_w = devices if zero_stage >= 3 else 1

    # which modules a backward pass runs through (their autocast half copies are kept)
    grad_path: list[nn.Module] = []
    parts = {}

    # vision tower: blocks from the first trained one on
    tower_act = 0
    tower_flows = False
    for sub in _tower_list(tower):
        eb = element_bytes(sub)
        block_ids = {id(p) for b in sub.blocks for p in b.parameters()}
        stem_trains = any(p.requires_grad for p in sub.parameters() if id(p) not in block_ids)
        flows = stem_trains
        if stem_trains:
            grad_path.append(sub)
        n = sub.grid[0] * sub.grid[1] + sub.num_prefix_tokens  # tokens the blocks compute, CLS included
        for block in sub.blocks:
            trains = _trains(block)
            if not (trains or flows):
                continue
            flows = True
            if not stem_trains:
                grad_path.append(block)
            tower_act += images * n * eb.block(block_shape(block, sub.hidden_size), trains)
        tower_flows |= flows

    # connector: measured at the real shapes on one image
    connector_flows = tower_flows or _trains(connector)
    connector_act = 0
    if connector_flows:
        grad_path.append(connector)
        saved = _connector_saved_bytes(connector, tower.num_features, tower_flows)  # fp32-equivalent bytes
        connector_act = images * saved * element_bytes(connector).act // 4

    # language model
    hf = lm.model
    eb = element_bytes(lm)
    act = eb.act
    config = _hf_config(lm)
    layers = lm.decoder_layers  # entries: a family's wrapper weights count with their layer
    width = config.hidden_size
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or width // heads
    kv_width = getattr(config, "num_key_value_heads", None) or heads
    kv_width *= head_dim
    attn = getattr(config, "_attn_implementation", None) or "sdpa"
    layer_ids = {id(p) for layer in layers for p in layer.parameters()}
    embed = hf.get_input_embeddings()
    flows = connector_flows or any(p.requires_grad for p in embed.parameters())
    # transformers repeats grouped keys/values to every head unless SDPA runs without a mask or flash runs
    native_gqa = attn == "flash_attention_2" or (attn != "eager" and not attention_mask)
    kv_kept = kv_width if native_gqa else heads * head_dim
    per_layer: list[int] = []  # saved bytes of each layer
    working: list[int] = []  # gradients alive while backward crosses each layer's MLP
    layer_grads: list[int] = []  # gradient bytes of each layer's trainable parameters
    for layer in layers:
        trains = _trains(layer)
        layer_grads.append(
            sum(_nbytes(p, precision) for p in layer.parameters() if p.requires_grad) // shard_g
        )
        if not (trains or flows):
            per_layer.append(0)
            working.append(0)
            continue
        flows = True
        grad_path.append(layer)
        shape = block_shape(bare_layer(layer), width, kv_kept)
        d_terms, i_terms = shape.backward_elements(trains)
        working.append(tokens * (d_terms * eb.residual + i_terms * act))
        extra = 0
        if attn == "eager":
            extra = rows * heads * seq_len**2 * (4 + (act if act < 4 else 0))
        elif attn != "flash_attention_2" and attention_mask:
            extra = rows * seq_len**2 * act
        per_layer.append(tokens * eb.block(shape, trains) + extra)
    recomputed = 0
    kept = list(per_layer)
    if activation_checkpointing:  # layer inputs are kept; backward recomputes one layer at a time
        kept = [tokens * width * eb.residual if a else 0 for a in per_layer]
        recomputed = max(per_layer, default=0)
    lm_act = sum(kept)
    embed_ids = {id(p) for p in embed.parameters()}
    tail_trains = any(p.requires_grad for p in unique_params(hf) if id(p) not in layer_ids | embed_ids)
    norm_terms = block_shape(bare_layer(layers[-1]), width, kv_width).norm_terms
    head = hf.get_output_embeddings()
    head_trains = head is not None and _trains(head)
    positions = round(rows * supervised)
    vocab = head.out_features if isinstance(head, nn.Linear) else config.vocab_size
    # the final norm's output is read by the head at the supervised positions only (counted in the loss head)
    final_norm = tokens * width * (eb.norm_input(norm_terms) + (norm_terms - 2) * eb.norm_out * tail_trains)
    lm_act += final_norm
    grad_path.append(head if head is not None else hf)
    loss_head = positions * vocab * (act + 4 + (4 if act < 4 else 0))  # logits (+ fp32 copy) + log-probs
    if head_trains:
        loss_head += positions * width * act  # the gathered hidden states the head's weight gradient needs
    # Backward starts with the loss's gradients (log-probabilities and logits, fp32), then crosses the layers
    # top down: the loss head's and final norm's activations are released, their gradients allocated, and
    # each layer releases its activations as the gradients of its parameters are allocated.
    head_ids = {id(p) for p in (head.parameters() if head is not None else [])}
    tail_grads = sum(
        _nbytes(p, precision)
        for p in unique_params(hf)
        if p.requires_grad and (id(p) not in layer_ids | embed_ids or id(p) in head_ids)
    )
    other_act = tower_act + connector_act
    backward = other_act + lm_act + loss_head + 2 * positions * vocab * 4
    grads_above = tail_grads // shard_g
    for index in reversed(range(len(layers))):
        if not per_layer[index]:
            continue
        layer_now = (kept[index] + per_layer[index]) if activation_checkpointing else per_layer[index]
        held = other_act + sum(kept[:index]) + layer_now + working[index] + grads_above
        backward = max(backward, held)
        grads_above += layer_grads[index]

    # model states per part
    state_bytes = facts.state_bytes_per_param
    # autocast keeps half copies of fp32 matrices (a part built in half precision needs none)
    castable = {id(p) for p in _castable_params(grad_path) if p.dtype == torch.float32} if mixed else set()
    for name, part in model.parts().items():
        ps = unique_params(part)
        trainable = [p for p in ps if p.requires_grad]
        weights = sum(_nbytes(p, precision) for p in ps)
        weights += sum(2 * p.numel() for p in ps if id(p) in castable)
        parts[name] = PartMemory(
            params=sum(p.numel() for p in ps),
            trainable=sum(p.numel() for p in trainable),
            weights=weights // shard_w,
            gradients=sum(_nbytes(p, precision) for p in trainable) // shard_g,
            optimizer=int(state_bytes * sum(p.numel() for p in trainable)) // shard_o,
        )
    parts["vision_tower"].activations = tower_act
    parts["connector"].activations = connector_act
    parts["language_model"].activations = lm_act

    buffers = {id(b): b for b in model.buffers()}
    buffer_bytes = sum(_nbytes(b, precision) for b in buffers.values())
    pixel_bytes = 2 if precision.endswith("true") and half else 4
    batch = images * 3 * tower.image_size**2 * pixel_bytes + 4 * tokens * 8  # pixels + 4 int64 [B, L] tensors

    temporaries = 0
    if facts.state_bytes_per_param > 0:
        trainable = [p for p in params if p.requires_grad]
        if use_foreach:
            from lit_mllm.training.stages import param_groups

            groups = param_groups(model.parts(), model.stage)
            temporaries = max(sum(_nbytes(p, precision) for p in g["params"]) for g in groups)
        else:
            temporaries = max(_nbytes(p, precision) for p in trainable)
        temporaries //= shard_o

    settings = {
        "stage": getattr(getattr(model, "stage", None), "name", "?"),
        "precision": precision,
        "optimizer": facts.name,
        "optimizer_state_bytes_per_param": round(facts.state_bytes_per_param, 4),
        "foreach": bool(use_foreach),
        "devices": devices,
        "zero_stage": zero_stage,
        "activation_checkpointing": activation_checkpointing,
        "batch_size": batch_size,
        "seq_len": seq_len,
        "images_per_sample": images_per_sample,
        "tokens_per_image": tokens_per_image,
        "supervised_tokens": supervised,
        "attention_mask": attention_mask,
    }
    return MemoryEstimate(parts, loss_head, backward, recomputed, batch, buffer_bytes, temporaries, settings)


def _connector_saved_bytes(connector: nn.Module, num_features: int, input_grad: bool) -> int:
    """Bytes autograd saves in one connector forward on one image ``[1, N, D_v]`` (its input included,
    parameters excluded), counted at fp32."""
    params = {p.untyped_storage().data_ptr() for p in connector.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            seen[storage.data_ptr()] = (
                storage.nbytes() * 4 // max(t.element_size(), 1)
                if t.is_floating_point()
                else storage.nbytes()
            )
        return t

    param = next(connector.parameters(), torch.zeros(()))
    x = torch.zeros(1, num_features, connector.in_dim, device=param.device, dtype=param.dtype)
    x.requires_grad_(input_grad)
    with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = connector(x)
    del out
    return sum(seen.values())
