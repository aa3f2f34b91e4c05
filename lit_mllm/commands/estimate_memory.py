"""``lit-mllm estimate-memory --config FILE [options]``: per-device training memory of a config (weights,
gradients, optimizer states, activations, peak) from :func:`~lit_mllm.training.memory.estimate_memory`, without
training. Precision, devices, ZeRO stage and batch size default to what the config asks for.
"""

from __future__ import annotations

import argparse
import importlib

from lit_mllm.commands.lightning import build_cli
from lit_mllm.training.memory import estimate_memory


# -- the command -----------------------------------------------------------------------------------------
def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="lit-mllm estimate-memory",
        description="Estimate per-device training memory of a config (weights, gradients, optimizer states, "
        "activations, peak) without training. Every other option is a `lit-mllm fit` option (--config FILE "
        "...).",
        allow_abbrev=False,
    )
    p.add_argument(
        "--precision",
        default=None,
        help="bf16-mixed, 16-mixed, 32-true, bf16-true, ... (default: the config's trainer.precision)",
    )
    p.add_argument(
        "--devices",
        type=int,
        default=None,
        help="devices the model states are sharded over (default: the config's trainer.devices x num_nodes)",
    )
    p.add_argument(
        "--zero_stage",
        type=int,
        choices=[0, 1, 2, 3],
        default=None,
        help="ZeRO stage (default: read from the config's DeepSpeed/FSDP strategy, else 0)",
    )
    p.add_argument(
        "--batch_size", type=int, default=None, help="rows per device (default: data.init_args.batch_size)"
    )
    p.add_argument(
        "--seq_len",
        type=int,
        default=None,
        help="tokens per row incl. image tokens (default: the LLM's context length, the worst case)",
    )
    p.add_argument("--images_per_sample", type=int, default=1, help="tower inputs per row (images or tiles)")
    p.add_argument(
        "--supervised_tokens",
        type=int,
        default=None,
        help="supervised positions per row (default: every text position)",
    )
    p.add_argument(
        "--activation_checkpointing",
        action="store_true",
        default=None,
        help="recompute the LLM's layers in backward (default: the language model's gradient_checkpointing)",
    )
    p.add_argument(
        "--no_attention_mask",
        action="store_true",
        help="rows carry no attention mask (equal lengths or varlen flash attention)",
    )
    p.add_argument(
        "--optimizer_state_bytes",
        type=float,
        default=None,
        help="optimizer state bytes per trainable parameter (default: measured on the config's optimizer)",
    )
    return p


def config_defaults(cli, original) -> dict:
    """Precision, devices, ZeRO stage, accelerator and batch size the config asks for."""
    trainer = original.get("trainer") or {}
    out = {"precision": trainer.get("precision") or "32-true"}
    devices = trainer.get("devices")
    count = (
        devices
        if isinstance(devices, int) and devices > 0
        else len(devices)
        if isinstance(devices, list)
        else 1
    )
    out["devices"] = count * int(trainer.get("num_nodes") or 1)
    out["zero_stage"] = zero_stage(trainer.get("strategy"))
    out["accelerator"] = "cpu" if str(trainer.get("accelerator")) == "cpu" else "cuda"
    data = original.get("data") or {}
    init = data.get("init_args") if hasattr(data, "get") else None
    out["batch_size"] = getattr(cli.datamodule, "batch_size", None) or (
        init.get("batch_size") if init else None
    )
    return out


def zero_stage(strategy) -> int:
    """ZeRO stage of a Lightning strategy given by registry name or class_path (DeepSpeed: its stage; FSDP:
    full shard 3, gradient and optimizer shard 2)."""
    if strategy is None:
        return 0
    if isinstance(strategy, str):
        from lightning.pytorch.strategies import StrategyRegistry

        if strategy not in StrategyRegistry:
            return 0
        entry = dict.__getitem__(StrategyRegistry, strategy)
        cls, init = entry["strategy"], entry["init_params"]
    else:
        module, _, name = str(strategy.get("class_path")).rpartition(".")
        cls, init = getattr(importlib.import_module(module), name), dict(strategy.get("init_args") or {})
    from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy

    if issubclass(cls, DeepSpeedStrategy):
        return int(init.get("stage", 2))
    if issubclass(cls, FSDPStrategy):
        sharding = str(init.get("sharding_strategy", "FULL_SHARD")).upper()
        return {"NO_SHARD": 0, "SHARD_GRAD_OP": 2, "_HYBRID_SHARD_ZERO2": 2}.get(sharding.split(".")[-1], 3)
    return 0


def main(args: list[str]) -> dict:
    """``lit-mllm estimate-memory --config FILE [options]``: build the model of a config (no data, no
    training), print the memory table and return it as a dict (GiB)."""
    ours, rest = parser().parse_known_args(args)  # -h / --help prints these options and exits
    # The model is built here whatever the config's trainer asks for (GPUs, DeepSpeed, ...); what it asks for
    # is read back from the parsed config.
    cli = build_cli(
        [
            *rest,
            "--trainer.accelerator=cpu",
            "--trainer.devices=1",
            "--trainer.strategy=auto",
            "--trainer.precision=32-true",
            "--trainer.num_nodes=1",
            "--trainer.logger=false",
        ],
        run=False,
    )
    defaults = config_defaults(cli, cli.parser.parse_args(rest).as_dict())
    batch_size = ours.batch_size or defaults["batch_size"]
    if not batch_size:
        raise ValueError("the config's data module names no batch_size: pass --batch_size")
    estimate = estimate_memory(
        cli.model,
        batch_size=batch_size,
        seq_len=ours.seq_len,
        images_per_sample=ours.images_per_sample,
        supervised_tokens=ours.supervised_tokens,
        precision=ours.precision or defaults["precision"],
        devices=ours.devices or defaults["devices"],
        zero_stage=defaults["zero_stage"] if ours.zero_stage is None else ours.zero_stage,
        activation_checkpointing=ours.activation_checkpointing,
        attention_mask=not ours.no_attention_mask,
        optimizer_state_bytes=ours.optimizer_state_bytes,
        accelerator=defaults["accelerator"],
    )
    print(estimate.table())
    return estimate.as_dict()
