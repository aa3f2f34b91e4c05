"""Parameter-efficient fine-tuning of a model's parts with ``peft``: LoRA (Hu et al. 2021, "LoRA: Low-Rank
Adaptation of Large Language Models") and QLoRA (Dettmers et al. 2023, "QLoRA: Efficient Finetuning of Quantized
LLMs": the frozen base weights held in 4 bits).

A stage declares adapters per part (see :class:`lit_mllm.training.stages.Stage`)::

    stage:
      name: finetune
      trainable: [connector]
      lora:
        language_model: {r: 64, alpha: 16, dropout: 0.05, target_modules: [q_proj, v_proj]}   # MiniGPT-v2

Adapters are injected in place (``peft.inject_adapter_in_model``): each targeted ``nn.Linear`` becomes a
``peft`` LoRA layer wrapping it, and every part keeps its own type, so the family code that calls
``language_model.model.get_decoder()`` or the tower's blocks works unchanged. The adapted layer computes
``W x + (alpha / r) * B(A(dropout(x)))`` with ``B`` initialised to zero, so a fresh adapter changes nothing.

Parameter names gain ``.base_layer`` (the frozen weight) and ``.lora_A.default`` / ``.lora_B.default`` (the
adapter), e.g. ``language_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight``.
:func:`merge_adapters` folds the adapters back into plain layers (for export).
"""

from __future__ import annotations

import importlib.util
import os
import sys
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

ADAPTER = "default"
"""Name of the one adapter per part (peft's default name; it appears in parameter names)."""


@dataclass
class LoRA:
    """LoRA adapters on some linear layers of one part; only the adapters train unless the stage also lists the part
    in ``trainable``. With ``quantize_base`` the part's frozen linear weights are held in 4 bits (QLoRA)."""

    r: int = 8
    """Rank of the update ``B @ A`` (MiniGPT-v2: 64)."""
    alpha: float = 16.0
    """The update is scaled by ``alpha / r`` (MiniGPT-v2: 16 with r=64, i.e. 0.25)."""
    dropout: float = 0.0
    """Dropout on the adapter's input while training (MiniGPT-v2: 0.05)."""
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])
    """Linear layers to adapt, matched against the end of each module's dotted name: ``q_proj`` matches
    ``model.layers.3.self_attn.q_proj``. Llama/Qwen2 and CLIP/SigLIP attention: ``q_proj``, ``k_proj``, ``v_proj``
    (``o_proj`` / ``out_proj``); their MLPs: ``gate_proj``, ``up_proj``, ``down_proj`` / ``fc1``, ``fc2``."""
    quantize_base: Literal["nf4", "fp4"] | None = None
    """QLoRA: hold every linear weight of the part in 4 bits (``nf4`` as in QLoRA, or ``fp4``) with bitsandbytes, on
    the CUDA GPU; the LoRA weights stay in full precision. Needs bitsandbytes and a CUDA GPU. A quantized part cannot
    also be in ``trainable``."""
    compute_dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"
    """QLoRA: dtype the 4-bit weights are dequantized to for each matmul."""
    double_quant: bool = True
    """QLoRA: also quantize the quantization constants (about 0.4 bits per weight less)."""
    keep_full_precision: list[str] = field(default_factory=lambda: ["lm_head"])
    """QLoRA: linear layers (matched like ``target_modules``) left unquantized; QLoRA keeps the LLM's output head."""

    def __post_init__(self) -> None:
        if self.r < 1:
            raise ValueError(f"LoRA rank r={self.r}; give r >= 1")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoRA dropout={self.dropout}; give a probability in [0, 1)")
        if not self.target_modules:
            raise ValueError(
                "LoRA target_modules is empty; name the linear layers to adapt (e.g. [q_proj, v_proj])"
            )
        self.target_modules = list(self.target_modules)
        self.keep_full_precision = list(self.keep_full_precision)

    def peft_config(self):
        """The equivalent ``peft.LoraConfig``."""
        from peft import LoraConfig

        return LoraConfig(
            r=self.r,
            lora_alpha=self.alpha,
            lora_dropout=self.dropout,
            target_modules=list(self.target_modules),
        )

    def describe(self) -> str:
        quant = f", base in {self.quantize_base}" if self.quantize_base else ""
        return f"LoRA r={self.r} on {', '.join(self.target_modules)}{quant}"


def _matches(name: str, suffixes: list[str]) -> bool:
    return any(name == s or name.endswith("." + s) for s in suffixes)


def tuner_layers(module: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(name, layer)`` of every ``peft`` adapter layer inside ``module`` (none, without importing ``peft``, when
    nothing has imported it: then no adapter can exist)."""
    if "peft" not in sys.modules:
        return []
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [(name, m) for name, m in module.named_modules() if isinstance(m, BaseTunerLayer)]


def has_adapters(module: nn.Module) -> bool:
    """Whether ``module`` holds ``peft`` adapter layers."""
    return bool(tuner_layers(module))


def adapter_modules(module: nn.Module) -> list[nn.Module]:
    """The submodules holding adapter weights and adapter dropout (``lora_A``, ``lora_B``, ``lora_dropout``, ...):
    what trains and runs in train mode when the rest of the part is frozen."""
    found = []
    for _, layer in tuner_layers(module):
        for attr in (*layer.adapter_layer_names, *layer.other_param_names):
            sub = getattr(layer, attr, None)
            if isinstance(sub, nn.Module):
                found.append(sub)
    return found


def adapter_parameter_count(module: nn.Module) -> int:
    """Number of adapter weights in ``module``."""
    return sum(p.numel() for m in adapter_modules(module) for p in m.parameters())


def add_lora(part: nn.Module, spec: LoRA, part_name: str) -> None:
    """Inject ``spec``'s adapters into ``part`` in place (quantizing its linear layers first for QLoRA). A part that
    already holds exactly these adapters is left as it is; other adapters are refused."""
    present = getattr(part, "peft_config", {}).get(ADAPTER)
    if present is not None:
        if present.to_dict() != _injected(spec).to_dict():
            raise ValueError(
                f"{part_name} already holds LoRA adapters (r={present.r}, alpha={present.lora_alpha}, targets "
                f"{sorted(present.target_modules)}) that differ from {spec}; give every stage of a schedule the same "
                f"LoRA for {part_name}"
            )
        return
    if importlib.util.find_spec("peft") is None:
        raise ImportError(f"LoRA on {part_name} needs peft: pip install peft")
    from peft import inject_adapter_in_model
    from peft.tuners.tuners_utils import BaseTunerLayer

    if any(isinstance(m, BaseTunerLayer) for m in part.modules()):
        raise ValueError(
            f"{part_name} already holds peft adapter layers not made by its stage; build it afresh"
        )
    linear = [n for n, m in part.named_modules() if isinstance(m, nn.Linear)]
    if not any(_matches(n, spec.target_modules) for n in linear):
        raise ValueError(
            f"LoRA target_modules {spec.target_modules} match no linear layer of {part_name} "
            f"({type(part).__name__}); its linear layers are named {sorted({n.rsplit('.', 1)[-1] for n in linear})}"
        )
    if spec.quantize_base is not None:
        quantize_linear_layers(part, spec, part_name)
    inject_adapter_in_model(spec.peft_config(), part, adapter_name=ADAPTER)


def _injected(spec: LoRA):
    """The ``LoraConfig`` as peft stores it after an injection (target modules as a set)."""
    config = spec.peft_config()
    config.target_modules = set(config.target_modules)
    return config


# -- QLoRA ------------------------------------------------------------------------------------------------------
def quantization_missing() -> list[str]:
    """What QLoRA needs that this machine lacks (empty when bitsandbytes and a CUDA GPU are there)."""
    missing = []
    if importlib.util.find_spec("bitsandbytes") is None:
        missing.append("bitsandbytes is not installed (pip install bitsandbytes)")
    if not torch.cuda.is_available():
        missing.append("no CUDA GPU is visible (torch.cuda.is_available() is False)")
    return missing


def quantize_linear_layers(part: nn.Module, spec: LoRA, part_name: str) -> int:
    """Replace every ``nn.Linear`` of ``part`` (but ``spec.keep_full_precision``) by a bitsandbytes ``Linear4bit``
    holding its weight in 4 bits on this process's CUDA device; returns how many were replaced.

    The weights are quantized where they are put on the GPU: on ``cuda:LOCAL_RANK`` (the device a distributed
    launcher gives this process; ``cuda:0`` alone)."""
    missing = quantization_missing()
    if missing:
        raise RuntimeError(
            f"LoRA quantize_base={spec.quantize_base!r} on {part_name} (QLoRA) needs bitsandbytes and a CUDA GPU: "
            f"{'; '.join(missing)}. Drop quantize_base for plain LoRA"
        )
    import bitsandbytes as bnb

    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    targets = [
        (name, m)
        for name, m in part.named_modules()
        if type(m) is nn.Linear and not _matches(name, spec.keep_full_precision)
    ]
    for name, linear in targets:
        quantized = bnb.nn.Linear4bit(
            linear.in_features,
            linear.out_features,
            bias=linear.bias is not None,
            compute_dtype=getattr(torch, spec.compute_dtype),
            compress_statistics=spec.double_quant,
            quant_type=spec.quantize_base,
        )
        quantized.weight = bnb.nn.Params4bit(
            linear.weight.data.cpu(),
            requires_grad=False,
            compress_statistics=spec.double_quant,
            quant_type=spec.quantize_base,
        )
        if linear.bias is not None:
            quantized.bias = nn.Parameter(linear.bias.data.clone(), requires_grad=False)
        _replace(part, name, quantized.to(device))  # quantized here
    return len(targets)


# -- merging ----------------------------------------------------------------------------------------------------
def merge_adapters(model: nn.Module) -> int:
    """Fold every LoRA adapter of ``model`` into its base weight (``W + (alpha / r) B A``) and put the plain layer
    back in place of the adapter layer, in place; returns the number of layers merged. A 4-bit (QLoRA) base is
    dequantized to a plain ``nn.Linear`` in its compute dtype before the update is added (no re-quantization).
    The result holds no ``peft`` layer: what an export writes."""
    if not has_adapters(model):
        return 0
    from peft.utils.integrations import dequantize_bnb_weight

    layers = tuner_layers(model)
    for name, layer in layers:
        base = layer.get_base_layer()
        if type(base.weight).__name__ == "Params4bit":
            dense = nn.Linear(base.in_features, base.out_features, bias=base.bias is not None)
            dense = dense.to(device=base.weight.device, dtype=base.compute_dtype or torch.float32)
            weight = dequantize_bnb_weight(base.weight, state=base.weight.quant_state).to(dense.weight.dtype)
            for adapter in layer.active_adapters:
                weight = weight + layer.get_delta_weight(adapter).to(weight.dtype)
            dense.weight.data.copy_(weight)
            if base.bias is not None:
                dense.bias.data.copy_(base.bias.data)
            base = dense
        else:
            layer.merge(safe_merge=True)
        base.requires_grad_(False)
        _replace(model, name, base)
    for module in model.modules():
        if isinstance(getattr(module, "peft_config", None), dict):
            del module.peft_config
    return len(layers)


def _replace(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    setattr(root.get_submodule(parent_name) if parent_name else root, attr, new)
