"""Every arm of a grid checked before anything runs: parsed by the same LightningCLI parser as ``lit-mllm fit``,
given its compute budget, and dumped as the fully resolved config the runner starts it from. Nothing is built,
except each condition's model with ``check: build`` (cheap for toy grids: a class that refuses its options,
such as a tower too shallow for its ``feature_layer``, fails here) and each arm's model for FLOPs matching.

One parser is built for the whole grid and each arm's ``--config`` stack is parsed by it (stacked as
``lit-mllm fit`` stacks it: :func:`~lit_mllm.config_stack.stack_configs`), so an unknown key, a value of the wrong
type or an unknown class fails here, naming the arm and its axes. Two arms that resolve to the same config are an
error too (an axis that changes nothing, such as a variable no patch uses).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from copy import deepcopy
from dataclasses import dataclass, field
from typing import Any

import yaml
from jsonargparse import ArgumentParser

from lit_mllm.ablate.grid import Arm, Grid, GridError, expand
from lit_mllm.commands.config_errors import ConfigError
from lit_mllm.commands.lightning import build_cli, model_only_args
from lit_mllm.config_stack import stack_configs
from lit_mllm.lit.base import VLMModule


@dataclass
class Plan:
    """An arm, checked: its resolved config and compute budget."""

    arm: Arm
    config: dict
    """The resolved config (``lit-mllm fit``'s parser's dump) before the runner's folder settings."""
    steps: int | None = None
    """``trainer.max_steps`` set by the grid's ``match`` (None: the config's own)."""
    flops_per_sample: float | None = None
    """Estimated training FLOPs of one sample (``match: {flops: ...}`` only)."""
    notes: list[str] = field(default_factory=list)
    """Options dropped by stacking (a file changing a part's class)."""

    @property
    def name(self) -> str:
        return self.arm.name


class ArmParser:
    """One parse-only CLI reused for every arm of a grid."""

    def __init__(self, first: Sequence[str]) -> None:
        self.cli = build_cli(list(first), run=False, parse_only=True)
        self._model_parser: ArgumentParser | None = None

    def parse(self, args: Sequence[str], notes: list[str] | None = None) -> Any:
        """The parsed config (a jsonargparse Namespace) of ``args``; :class:`ConfigError` when it does not parse."""
        stacked = stack_configs(model_only_args(list(args)), log=(notes if notes is not None else []).append)
        self.cli.parse_arguments(self.cli.parser, stacked)
        return self.cli.config

    def dump(self, config: Any) -> dict:
        """The resolved config as a plain mapping (the form LightningCLI saves as ``config.yaml``)."""
        return yaml.safe_load(self.cli.parser.dump(config, skip_validation=True, skip_none=False))

    def build_model(self, config: Any) -> Any:
        """The model of a parsed config, built alone (no trainer, no data)."""
        if self._model_parser is None:
            self._model_parser = ArgumentParser(exit_on_error=False)
            self._model_parser.add_argument("--model", type=VLMModule)
        model = self.dump(config)["model"]
        return self._model_parser.instantiate_classes(self._model_parser.parse_object({"model": model})).model


def resolve_arms(
    grid: Grid,
    overrides: Mapping[str, Any] | None = None,
    names: Sequence[str] | None = None,
    arms: Sequence[Arm] | None = None,
) -> list[Plan]:
    """Every arm of ``grid`` parsed and given its budget (in run order).

    Args:
        grid: The grid.
        overrides: Dotted keys set in every arm, last (``lit-mllm sweep --set``).
        names: Only these arms (default all).
        arms: The arms to resolve (``overrides`` already in their arguments) instead of ``expand(grid,
            overrides)``: a select study's rounds (:mod:`lit_mllm.ablate.select`).

    Raises:
        GridError: An arm whose config does not parse (naming the arm, its levels and the option), or two arms
            with the same resolved config.
    """
    overrides = dict(overrides or {})
    arms = expand(grid, overrides) if arms is None else list(arms)
    if names is not None:
        unknown = sorted(set(names) - {a.name for a in arms})
        if unknown:
            raise GridError(f"{grid.source or 'grid'} has no arm(s) {unknown}")
        arms = [a for a in arms if a.name in set(names)]
    if not arms:
        return []
    try:
        parser = ArmParser(arms[0].args)
    except ConfigError as e:
        raise GridError(f"{_where(grid, arms[0])}: {e}") from e
    plans = []
    # the arms of one condition differ only in the seed keys (integers): the condition's first arm is parsed and
    # the others are its config with their seed set, unless an override sets a seed key too
    shortcut = bool(grid.seeds) and not set(overrides) & set(grid.seed_keys)
    parsed: dict[str, tuple[Any, list[str]]] = {}
    for arm in arms:
        if shortcut and arm.condition in parsed:
            first, notes = parsed[arm.condition]
            config = first.clone()
            for key in grid.seed_keys:
                config[key] = arm.seed
        else:
            notes = []
            try:
                config = parser.parse(arm.args, notes).clone()
            except (ConfigError, ValueError) as e:
                raise GridError(f"{_where(grid, arm)}: {e}") from e
            parsed[arm.condition] = (config.clone(), notes)
            if grid.check == "build":
                _build(grid, parser, config, arm)
        plan = Plan(arm, {}, notes=notes)
        if grid.match is not None and "trainer.max_steps" not in overrides:
            _match(grid, parser, config, plan)
        plan.config = parser.dump(config)
        plans.append(plan)
    _check_distinct(grid, plans)
    return plans


def _build(grid: Grid, parser: ArmParser, config: Any, arm: Arm) -> Any:
    """The arm's model, built; a :class:`GridError` naming the arm when its classes refuse their options."""
    try:
        return parser.build_model(config)
    except Exception as e:
        raise GridError(f"{_where(grid, arm)}: building the model: {type(e).__name__}: {e}") from e


def _where(grid: Grid, arm: Arm) -> str:
    levels = ", ".join(f"{k}={v}" for k, v in arm.labels.items())
    return f"{grid.source or 'grid'}: arm {arm.name}" + (f" ({levels})" if levels else "")


def _match(grid: Grid, parser: ArmParser, config: Any, plan: Plan) -> None:
    match = grid.match
    if match.steps is not None:
        steps = int(match.steps)
    else:
        batch = global_batch(config)
        if match.samples is not None:
            steps = math.ceil(match.samples / batch)
        else:
            model = _build(grid, parser, config, plan.arm)
            plan.flops_per_sample = flops_per_sample(model, match.text_tokens)
            steps = max(1, round(match.flops / (batch * plan.flops_per_sample)))
    plan.steps = steps
    config.trainer.max_steps = steps
    config.trainer.max_epochs = -1


def global_batch(config: Any) -> int:
    """Samples per optimizer step over all devices: batch size x gradient accumulation x devices x nodes (a
    device count that is not a number, such as ``auto``, counts as 1)."""
    batch = config.get("data.init_args.batch_size")
    if not isinstance(batch, int):
        raise GridError("compute matching by samples or FLOPs needs data.init_args.batch_size in the config")
    trainer = config.trainer
    devices = trainer.get("devices")
    devices = (
        devices
        if isinstance(devices, int) and devices > 0
        else len(devices)
        if isinstance(devices, list)
        else 1
    )
    return (
        batch
        * int(trainer.get("accumulate_grad_batches") or 1)
        * devices
        * int(trainer.get("num_nodes") or 1)
    )


def flops_per_sample(model: Any, text_tokens: int) -> float:
    """Estimated training FLOPs of one sample with one image (see :class:`~lit_mllm.ablate.grid.Match`)."""
    facts = model.describe()
    features = model.vision_tower.num_features
    llm, tower = facts["params/language_model"], facts["params/vision_tower"]
    return (
        6.0 * (llm * (text_tokens + facts["image_tokens"]) + tower * features)
        + 3.0 * facts["connector_flops_per_image"]
    )


def _check_distinct(grid: Grid, plans: list[Plan]) -> None:
    seen: dict[str, str] = {}
    for plan in plans:
        text = yaml.safe_dump(plan.config, sort_keys=True)
        if text in seen:
            raise GridError(
                f"{grid.source or 'grid'}: arms {seen[text]} and {plan.name} resolve to the same config: an axis "
                "changes nothing (a variable axis that no patch uses as ${axis}?)"
            )
        seen[text] = plan.name


# -- differences -----------------------------------------------------------------------------------------------
def flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    """A nested config as dotted keys (list items by index: ``trainer.callbacks.0.class_path``)."""
    if isinstance(node, dict) and node:
        out = {}
        for key, value in node.items():
            out.update(flatten(value, f"{prefix}{key}."))
        return out
    if isinstance(node, list) and node:
        out = {}
        for i, value in enumerate(node):
            out.update(flatten(value, f"{prefix}{i}."))
        return out
    return {prefix[:-1]: node}


def differences(plans: Sequence[Plan]) -> list[dict[str, Any]]:
    """Per arm, the dotted keys of its resolved config whose value is not the same in every arm (keys the arm's
    config lacks, such as another class's options, are left out)."""
    flat = [flatten(p.config) for p in plans]
    keys: dict[str, None] = {}
    for f in flat:
        keys.update(dict.fromkeys(f))
    varying = [k for k in keys if len({repr(f.get(k, "-")) for f in flat}) > 1]
    return [{k: f[k] for k in varying if k in f} for f in flat]


def with_runner_settings(config: dict, updates: Mapping[str, Any]) -> dict:
    """A copy of ``config`` with ``updates`` (dotted keys) set."""
    out = deepcopy(config)
    for key, value in updates.items():
        node = out
        parts = key.split(".")
        for part in parts[:-1]:
            if not isinstance(node.get(part), dict):
                node[part] = {}
            node = node[part]
        node[parts[-1]] = value
    return out


def describe_plans(plans: Sequence[Plan]) -> str:
    """The dry run's listing: each arm with its resolved differences and budget."""
    if not plans:
        return "no arms"
    diffs = differences(plans)
    lines = [f"{len(plans)} arms; keys that differ between arms are listed per arm"]
    for plan, diff in zip(plans, diffs):
        budget = f"  max_steps={plan.steps}" if plan.steps is not None else ""
        if plan.flops_per_sample is not None:
            budget += f"  ~{plan.flops_per_sample:.3g} FLOPs/sample"
        lines.append(f"{plan.name}{budget}")
        for key, value in diff.items():
            lines.append(f"    {key}: {_short(value)}")
    return "\n".join(lines)


def _short(value: Any, width: int = 90) -> str:
    text = yaml.safe_dump(value, default_flow_style=True, width=math.inf).strip()
    text = text[:-4] if text.endswith("\n...") else text.removesuffix("...").strip()
    return text if len(text) <= width else text[: width - 3] + "..."
