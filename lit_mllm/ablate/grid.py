"""Grid files: a study as base configs plus axes, expanded into named arms (a pure function; nothing is parsed by
LightningCLI or run here: :mod:`lit_mllm.ablate.resolve` checks every arm, :mod:`lit_mllm.ablate.runner` runs them).

A grid file (YAML; paths are relative to the working directory, as on the ``lit-mllm`` command line)::

    study: mm1_connector-toy          # the study's name; default the file's stem
    out: runs/ablations               # the study's folder is OUT/STUDY
    base:                             # stacked first, in order: a file is `--config FILE`,
      - configs/quickstart.yaml       #   {data: FILE} is `--data FILE` (replaces the data block)
      - configs/model/mm1_cabstractor.yaml
    set:                              # dotted keys set in every arm, after the base
      trainer.enable_progress_bar: false
    axes:                             # each arm takes one level of every axis
      resolution:                     # a key and its values (labels optional: default from the values)
        key: model.init_args.vision_tower.init_args.image_size
        values: [32, 48]
        labels: [32px, 48px]
      tokens: [16, 36]                # no key: a variable that patches use as ${tokens}
      connector:                      # label: patch (dotted keys, and `config` files stacked first)
        avgpool: {config: configs/model/mm1_avgpool.yaml,
                  model.init_args.connector.init_args.out_tokens: ${tokens}}
        attnpool: {config: configs/model/mm1_attnpool.yaml,
                   model.init_args.connector.init_args.num_queries: ${tokens}}
      layout:                         # `configs`: each value a file or a list of files to stack
        configs: [configs/a.yaml, [configs/b.yaml, configs/c.yaml]]
    zip: [[resolution, layout]]       # axes that move together (equal lengths) instead of crossing
    seeds: [0, 1, 2]                  # an axis named `seed` setting every key of `seed_keys`
    seed_keys: [seed_everything, data.init_args.seed]
    match: {steps: 300}               # compute matching: see :class:`Match`
    checkpoint_every: 50              # training steps between the runner's resume checkpoints
    check: build                      # also build each condition's model at expansion (default: parse only)
    slurm: {timeout_min: 120, gpus_per_node: 1, slurm_partition: gpu}   # submitit parameters
    report: {metric: val/accuracy, x: tokens, group: connector}           # what `lit-mllm report` plots
    kind: grid                        # `select`: Individual Select, rounds of arms (then `select:`, no axes;
                                      #   see lit_mllm/ablate/select.py)

An axis is one of: a list of values (a variable, used only through ``${axis}``); a mapping with ``key`` (or
``keys``: one value set at several keys) or ``configs`` plus ``values`` and optional ``labels``; or a mapping
from labels to patches. ``${axis}`` in any value of ``set`` or a patch is that arm's value of the axis (the
label, for an axis of patches); a value that is exactly ``${axis}`` keeps the value's type.

An arm applies, in order: the base, ``set``, each axis's configs then its dotted keys (in the order of ``axes``),
the seed, the compute matching, and the command line's ``--set`` overrides. Later settings win, and a file or
patch that changes a part's class starts that part from the new class's defaults
(:func:`lit_mllm.config_stack.stack_configs`).

Arms are named by the axes that vary only (an axis with one level, or a single seed, is applied but not named):
``connector=avgpool_tokens=16_seed=0``; the name depends only on the arm's labels, never on the order of values
in the file. Labels are short: given, a mapping's key, or made from the value (a number as written, a config
file by its stem, a list joined by ``+``), restricted to letters, digits and ``.+-``; two levels of one axis
with the same label are an error asking for ``labels``. Arms are ordered seed first (a study cut short holds
whole grids of the first seeds), then the axes' cartesian product, the last axis fastest.
"""

from __future__ import annotations

import itertools
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from lit_mllm.commands.config_errors import ConfigError

SEED_AXIS = "seed"
"""The name of the axis ``seeds`` makes."""
DEFAULT_NAME = "default"
"""The name of the only arm of a grid in which nothing varies."""
FIELDS = (
    "study",
    "out",
    "base",
    "set",
    "axes",
    "zip",
    "seeds",
    "seed_keys",
    "match",
    "checkpoint_every",
    "check",
    "slurm",
    "report",
    "kind",
    "select",
)
KINDS = ("grid", "select")
"""Study kinds: ``grid`` (axes crossed, every arm known up front) or ``select`` (:mod:`lit_mllm.ablate.select`:
rounds of arms, each round chosen from the last one's results)."""
AXIS_FIELDS = ("key", "keys", "configs", "values", "labels")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9-]*$")
_LABEL_CHARS = re.compile(r"[^A-Za-z0-9.+-]+")
_REFERENCE = re.compile(r"\$\{([A-Za-z0-9-]+)\}")


class GridError(ConfigError):
    """A grid file that cannot be expanded, or an arm whose config does not parse; the message names the arm."""


@dataclass(frozen=True)
class Level:
    """One value of an axis."""

    label: str
    """Short name of the level in run names and reports."""
    value: Any
    """What ``${axis}`` gives: the value, or the label for an axis of patches."""
    configs: tuple[str, ...] = ()
    """Config files stacked (``--config``) for this level, before its patch."""
    patch: Mapping[str, Any] = field(default_factory=dict)
    """Dotted keys set for this level (``${...}`` not yet substituted)."""


@dataclass(frozen=True)
class Axis:
    """A named list of levels."""

    name: str
    levels: tuple[Level, ...]

    @property
    def varying(self) -> bool:
        """Whether it has more than one level (only such axes name arms)."""
        return len(self.levels) > 1


@dataclass(frozen=True)
class Match:
    """Compute matching: every arm trains for the same steps, the same samples, or the same estimated FLOPs.

    ``steps: N`` sets ``trainer.max_steps`` to N. ``samples: S`` sets it to ceil(S / global batch), the global
    batch being the arm's ``data.init_args.batch_size`` x ``accumulate_grad_batches`` x devices x nodes, so arms
    with other batch sizes see the same data. ``flops: F`` sets it to round(F / (global batch x FLOPs per
    sample)), with the FLOPs of one training sample estimated from ``lit-mllm describe``'s figures (the model is
    built once per arm): 6 x (LLM parameters x (``text_tokens`` + image tokens) + tower parameters x tower
    features) + 3 x the connector's FLOPs per image (forward + backward ~ 3 forwards; counted as if every part
    trained). Each sets ``trainer.max_epochs: -1`` so the steps decide; a ``--set trainer.max_steps=...`` on the
    command line wins."""

    steps: int | None = None
    samples: int | None = None
    flops: float | None = None
    text_tokens: int = 128
    """Text tokens per training sample assumed by the FLOPs estimate."""

    def __post_init__(self) -> None:
        given = [k for k in ("steps", "samples", "flops") if getattr(self, k) is not None]
        if len(given) != 1:
            raise GridError(f"match takes exactly one of steps, samples, flops; got {given or 'none'}")
        value = getattr(self, given[0])
        if not (isinstance(value, (int, float)) and value > 0):
            raise GridError(f"match.{given[0]} must be a positive number, got {value!r}")


@dataclass(frozen=True)
class ReportSpec:
    """What ``lit-mllm report`` shows by default."""

    metric: str | None = None
    """The main metric (a key of the arms' metrics.json ``metrics``); default the first ``val/`` metric found."""
    metrics: tuple[str, ...] = ()
    """Metrics tabulated; default every ``val/`` and ``test/`` metric found."""
    x: str | None = None
    """Axis on the plot's x axis; default the first varying axis."""
    group: str | None = None
    """Axis whose levels are the plot's lines; default the second varying axis."""
    lower_is_better: bool = False
    """Whether smaller values of ``metric`` are better (losses)."""


@dataclass(frozen=True)
class Grid:
    """A parsed grid file (see the module docstring)."""

    study: str
    out: str = "runs/ablations"
    base: tuple[tuple[str, str], ...] = ()
    """(flag, file) pairs: ``("--config", path)`` or ``("--data", path)``."""
    set: Mapping[str, Any] = field(default_factory=dict)
    axes: tuple[Axis, ...] = ()
    zip: tuple[tuple[str, ...], ...] = ()
    seeds: tuple[int, ...] = ()
    seed_keys: tuple[str, ...] = ("seed_everything",)
    match: Match | None = None
    checkpoint_every: int = 50
    check: str = "parse"
    """``parse``: every arm parsed; ``build``: also each condition's model built (toy grids)."""
    slurm: Mapping[str, Any] = field(default_factory=dict)
    report: ReportSpec = field(default_factory=ReportSpec)
    source: str | None = None
    """The file it was read from."""
    kind: str = "grid"
    """One of :data:`KINDS`."""
    select: Mapping[str, Any] = field(default_factory=dict)
    """``kind: select`` only: the ``select:`` block, read by :func:`lit_mllm.ablate.select.select_spec`."""

    @property
    def all_axes(self) -> tuple[Axis, ...]:
        """The axes with the seed axis last (when ``seeds`` is given)."""
        if not self.seeds:
            return self.axes
        seeds = Axis(
            SEED_AXIS, tuple(Level(str(s), s, patch=dict.fromkeys(self.seed_keys, s)) for s in self.seeds)
        )
        return (*self.axes, seeds)

    @property
    def folder(self) -> Path:
        """The study's folder, ``out/study``."""
        return Path(self.out) / self.study


@dataclass(frozen=True)
class Arm:
    """One run of a study: its name, its levels, and the argument list that configures it."""

    name: str
    condition: str
    """The name without the seed: the arms of one condition differ by seed only."""
    seed: int | None
    labels: Mapping[str, str]
    """Every axis (the seed axis included, when given) -> this arm's label."""
    values: Mapping[str, Any]
    """Every axis -> this arm's value (what ``${axis}`` gives)."""
    args: tuple[str, ...]
    """``lit-mllm fit`` arguments (``--config`` files and YAML strings) without the compute matching."""


# -- reading ---------------------------------------------------------------------------------------------------
def load_grid(path: str | Path) -> Grid:
    """Read and check a grid file (structure only; the arms' configs are checked by
    :func:`lit_mllm.ablate.resolve.resolve_arms`)."""
    path = Path(path)
    try:
        node = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise GridError(f"{path} is not valid YAML: {e}") from e
    return grid_from_dict(node, source=str(path), default_study=path.stem)


def grid_from_dict(node: Any, source: str | None = None, default_study: str = "study") -> Grid:
    """A :class:`Grid` from a grid file's content (``source`` names the file in messages)."""
    where = source or "the grid"
    if not isinstance(node, dict):
        raise GridError(f"{where} must be a mapping with keys among {', '.join(FIELDS)}")
    unknown = [k for k in node if k not in FIELDS]
    if unknown:
        raise GridError(f"{where}: unknown key(s) {unknown}; a grid file's keys are {', '.join(FIELDS)}")
    study = str(node.get("study") or default_study)
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", study):
        raise GridError(f"{where}: study name {study!r} must be letters, digits and ._- (it names a folder)")
    axes = tuple(_axis(name, spec, where) for name, spec in (node.get("axes") or {}).items())
    names = [a.name for a in axes]
    seeds = tuple(node.get("seeds") or ())
    if seeds:
        if SEED_AXIS in names:
            raise GridError(f"{where}: an axis is named {SEED_AXIS!r} and `seeds` is given; use one of them")
        if not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds) or len(set(seeds)) < len(
            seeds
        ):
            raise GridError(f"{where}: seeds must be distinct integers, got {list(seeds)}")
    zips = tuple(tuple(group) for group in node.get("zip") or ())
    kind = _choice(node.get("kind") or "grid", KINDS, f"{where}: kind")
    select = node.get("select")
    if kind == "select":
        if not isinstance(select, dict):
            raise GridError(
                f"{where}: kind: select needs a `select:` mapping (see lit_mllm/ablate/select.py)"
            )
        if axes or zips:
            raise GridError(
                f"{where}: a select study takes no axes or zip: its arms are the rounds' candidates "
                "(seeds still apply)"
            )
    elif select is not None:
        raise GridError(f"{where}: `select:` is for kind: select studies; add `kind: select` or remove it")
    _check_zip(zips, axes, where)
    match = node.get("match")
    if match is not None:
        if not isinstance(match, dict):
            raise GridError(f"{where}: match must be a mapping such as {{steps: 300}}, got {match!r}")
        try:
            match = Match(**{k: _number(v) for k, v in match.items()})
        except TypeError as e:
            raise GridError(f"{where}: match: {e} (its keys: steps, samples, flops, text_tokens)") from e
    report = node.get("report") or {}
    try:
        report = ReportSpec(**{k: tuple(v) if k == "metrics" else v for k, v in report.items()})
    except TypeError as e:
        raise GridError(f"{where}: report: {e} (its keys: metric, metrics, x, group, lower_is_better)") from e
    for key in ("x", "group"):
        if getattr(report, key) is not None and getattr(report, key) not in [*names, SEED_AXIS]:
            raise GridError(
                f"{where}: report.{key} {getattr(report, key)!r} is not an axis ({', '.join(names)})"
            )
    grid = Grid(
        study=study,
        out=str(node.get("out") or Grid.out),
        base=tuple(_base_item(item, where) for item in _as_list(node.get("base"))),
        set=_dotted(node.get("set") or {}, f"{where}: set"),
        axes=axes,
        zip=zips,
        seeds=seeds,
        seed_keys=tuple(_as_list(node.get("seed_keys") or ["seed_everything"])),
        match=match,
        checkpoint_every=int(node.get("checkpoint_every") or Grid.checkpoint_every),
        check=_choice(node.get("check") or "parse", ("parse", "build"), f"{where}: check"),
        slurm=dict(node.get("slurm") or {}),
        report=report,
        source=source,
        kind=kind,
        select=select,
    )
    if kind == "grid":
        expand(grid)  # references, labels and names are checked here, before anything is parsed
    return grid


def _choice(value: Any, choices: tuple[str, ...], where: str) -> str:
    if value not in choices:
        raise GridError(f"{where} must be one of {', '.join(choices)}, got {value!r}")
    return value


def _number(value: Any) -> Any:
    """YAML reads ``2e13`` as a string; numbers given so are numbers here."""
    if isinstance(value, str):
        try:
            number = float(value)
        except ValueError:
            return value
        return int(number) if number.is_integer() else number
    return value


def _as_list(value: Any) -> list:
    return [] if value is None else list(value) if isinstance(value, (list, tuple)) else [value]


def _base_item(item: Any, where: str) -> tuple[str, str]:
    if isinstance(item, str):
        return "--config", item
    if isinstance(item, dict) and len(item) == 1:
        ((option, value),) = item.items()
        if option in ("config", "data", "model", "trainer") and isinstance(value, str):
            return f"--{option}", value
    raise GridError(
        f"{where}: a base entry is a config file or {{data: FILE}} (also model/trainer: FILE), got {item!r}"
    )


def _dotted(patch: Any, where: str) -> dict[str, Any]:
    if not isinstance(patch, dict):
        raise GridError(f"{where} must be a mapping of dotted keys to values, got {patch!r}")
    for key in patch:
        if not isinstance(key, str) or not key or any(not part for part in key.split(".")):
            raise GridError(f"{where}: {key!r} is not a dotted key such as trainer.max_steps")
    return dict(patch)


def _axis(name: Any, spec: Any, where: str) -> Axis:
    if not isinstance(name, str) or not _NAME.match(name):
        raise GridError(
            f"{where}: axis name {name!r} must be letters, digits and - (it is part of run names)"
        )
    where = f"{where}: axis {name!r}"
    if isinstance(spec, list):
        levels = [Level(_label(v), v) for v in spec]
    elif isinstance(spec, dict) and any(k in spec for k in AXIS_FIELDS):
        unknown = [k for k in spec if k not in AXIS_FIELDS]
        if unknown:
            raise GridError(f"{where}: unknown key(s) {unknown}; an axis takes {', '.join(AXIS_FIELDS)}")
        levels = _keyed_levels(spec, where)
    elif isinstance(spec, dict):
        levels = []
        for label, patch in spec.items():
            patch = dict(patch or {})
            configs = tuple(_as_list(patch.pop("config", None)))
            levels.append(Level(_label(label), str(label), configs, _dotted(patch, f"{where}: {label}")))
    else:
        raise GridError(
            f"{where} must be a list of values or a mapping (see lit_mllm/ablate/grid.py), got {spec!r}"
        )
    if not levels:
        raise GridError(f"{where} has no values")
    labels = [level.label for level in levels]
    twice = sorted({label for label in labels if labels.count(label) > 1})
    if twice:
        raise GridError(
            f"{where}: levels share the label(s) {twice}; give `labels` (one short name per value)"
        )
    return Axis(name, tuple(levels))


def _keyed_levels(spec: dict, where: str) -> list[Level]:
    keys = _as_list(spec.get("keys")) + _as_list(spec.get("key"))
    if "configs" in spec:
        if keys or "values" in spec:
            raise GridError(f"{where}: give either configs or key(s) with values")
        values = list(spec["configs"])
    else:
        if "values" not in spec:
            raise GridError(f"{where}: `values` is missing")
        values = list(spec["values"])
    labels = spec.get("labels")
    if labels is not None and len(labels) != len(values):
        raise GridError(f"{where}: {len(labels)} labels for {len(values)} values")
    levels = []
    for i, value in enumerate(values):
        label = _label(labels[i]) if labels is not None else None
        if "configs" in spec:
            files = tuple(_as_list(value))
            levels.append(Level(label or "+".join(_label(Path(f).stem) for f in files), value, configs=files))
        else:
            levels.append(Level(label or _label(value), value, patch=dict.fromkeys(keys, value)))
    return levels


def _label(value: Any) -> str:
    """A short label for a value: numbers as written, lists joined by ``+``, other characters as ``-``."""
    if isinstance(value, bool) or value is None:
        text = str(value).lower()
    elif isinstance(value, float):
        text = format(value, "g")
    elif isinstance(value, (list, tuple)):
        text = "+".join(_label(v) for v in value)
    elif isinstance(value, dict):
        text = _label(value.get("class_path", "").rsplit(".", 1)[-1] or "-".join(map(str, value)))
    else:
        text = str(value)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return text  # digits, ".", "e", "+" and "-" only: -1 stays apart from 1
    text = _LABEL_CHARS.sub("-", text).strip("-")
    return text or "x"


def _check_zip(zips: tuple[tuple[str, ...], ...], axes: tuple[Axis, ...], where: str) -> None:
    by_name = {a.name: a for a in axes}
    seen: set[str] = set()
    for group in zips:
        missing = [n for n in group if n not in by_name]
        if missing:
            raise GridError(f"{where}: zip names {missing}, which are not axes ({', '.join(by_name)})")
        if seen & set(group):
            raise GridError(f"{where}: axes {sorted(seen & set(group))} are in two zip groups")
        seen |= set(group)
        lengths = {n: len(by_name[n].levels) for n in group}
        if len(set(lengths.values())) > 1:
            raise GridError(f"{where}: zipped axes must have as many values each, got {lengths}")


# -- expansion -------------------------------------------------------------------------------------------------
def expand(grid: Grid, overrides: Mapping[str, Any] | None = None) -> list[Arm]:
    """Every arm of ``grid``, in run order; ``overrides`` (dotted keys) are set in every arm, last.

    Raises:
        GridError: A ``${name}`` that names no axis, two arms with the same name, or a select study (whose arms
            come round by round: :mod:`lit_mllm.ablate.select`).
    """
    if grid.kind != "grid":
        raise GridError(
            f"{grid.source or 'the grid'} is a {grid.kind} study: its arms come round by round "
            "(lit_mllm.ablate.select.first_round, round_arms), not from expand"
        )
    axes = grid.all_axes
    by_name = {a.name: a for a in axes}
    # groups of axes that move together, at the place of their first axis; the seed axis is the outer loop
    zipped = {name: group for group in grid.zip for name in group}
    groups: list[tuple[str, ...]] = []
    for axis in grid.axes:
        group = zipped.get(axis.name, (axis.name,))
        if group not in groups:
            groups.append(group)
    choices = [
        [dict(zip(group, idx)) for idx in zip(*(range(len(by_name[n].levels)) for n in group))]
        for group in groups
    ]
    seed_levels = range(len(grid.seeds)) if grid.seeds else [None]
    arms = []
    for s in seed_levels:
        for combo in itertools.product(*choices) if choices else [()]:
            picked = {k: v for part in combo for k, v in part.items()}
            if s is not None:
                picked[SEED_AXIS] = s
            arms.append(_arm(grid, axes, picked, overrides or {}))
    names = [a.name for a in arms]
    if len(set(names)) != len(names):  # labels are unique per axis, so this means a bug or zipped duplicates
        twice = sorted({n for n in names if names.count(n) > 1})
        raise GridError(f"{grid.source or 'the grid'}: arms share the name(s) {twice}")
    return arms


def _arm(grid: Grid, axes: tuple[Axis, ...], picked: dict[str, int], overrides: Mapping[str, Any]) -> Arm:
    levels = {a.name: a.levels[picked[a.name]] for a in axes}
    values = {name: level.value for name, level in levels.items()}
    labels = {name: level.label for name, level in levels.items()}
    parts = [f"{a.name}={labels[a.name]}" for a in grid.axes if a.varying]
    condition = "_".join(parts) or DEFAULT_NAME
    seed = values.get(SEED_AXIS) if grid.seeds else None
    name = "_".join([*parts, f"{SEED_AXIS}={seed}"]) if len(grid.seeds) > 1 else condition
    where = f"arm {name}"
    args: list[str] = []
    for flag, path in grid.base:
        args += [flag, path]
    patches: list[dict] = []  # YAML patches in a row, merged into one --config string (fewer parser passes)
    if grid.set:
        patches.append(nest(substitute(grid.set, values, f"{where}: set"), f"{where}: set"))
    for axis in axes:
        level = levels[axis.name]
        if level.configs and patches:
            args += ["--config", _yaml(merge(patches))]
            patches = []
        for path in level.configs:
            args += ["--config", path]
        if level.patch:
            at = f"{where}: axis {axis.name}={level.label}"
            patches.append(nest(substitute(level.patch, values, at), at))
    if overrides:
        patches.append(nest(dict(overrides), f"{where}: --set"))
    if patches:
        args += ["--config", _yaml(merge(patches))]
    return Arm(name, condition, seed, labels, values, tuple(args))


def substitute(patch: Mapping[str, Any], values: Mapping[str, Any], where: str) -> dict[str, Any]:
    """``patch`` with every ``${axis}`` replaced by ``values[axis]`` (a whole-string reference keeps the type)."""

    def sub(value: Any) -> Any:
        if isinstance(value, str):
            whole = _REFERENCE.fullmatch(value)
            if whole:
                return lookup(whole.group(1))
            return _REFERENCE.sub(lambda m: str(lookup(m.group(1))), value)
        if isinstance(value, list):
            return [sub(v) for v in value]
        if isinstance(value, dict):
            return {k: sub(v) for k, v in value.items()}
        return value

    def lookup(name: str) -> Any:
        if name not in values:
            raise GridError(f"{where}: ${{{name}}} names no axis; the axes are {', '.join(values) or 'none'}")
        return values[name]

    return {key: sub(value) for key, value in patch.items()}


def nest(patch: Mapping[str, Any], where: str = "a patch") -> dict:
    """Dotted keys as nested mappings: ``{"a.b": 1, "a.c": 2}`` -> ``{"a": {"b": 1, "c": 2}}``."""
    out: dict = {}
    for key, value in patch.items():
        node = out
        parts = key.split(".")
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise GridError(f"{where}: {key} sets inside a value another key of the same patch sets")
            node = child
        if parts[-1] in node and isinstance(node[parts[-1]], dict) != isinstance(value, dict):
            raise GridError(f"{where}: {key} and another key of the same patch set the same option")
        if isinstance(value, dict) and isinstance(node.get(parts[-1]), dict):
            node[parts[-1]].update(value)
        else:
            node[parts[-1]] = value
    return out


def merge(patches: Sequence[dict]) -> dict:
    """Nested patches merged in order, later values winning; a part whose ``class_path`` changes is replaced
    whole (the new class starts from its own defaults, as :func:`~lit_mllm.config_stack.stack_configs` does)."""
    out: dict = {}
    for patch in patches:
        out = _merge_two(out, patch)
    return out


def _merge_two(old: dict, new: dict) -> dict:
    if "class_path" in old and "class_path" in new and old["class_path"] != new["class_path"]:
        return dict(new)
    out = dict(old)
    for key, value in new.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge_two(out[key], value)
        else:
            out[key] = value
    return out


def _yaml(node: dict) -> str:
    """YAML text of a patch for a ``--config`` argument (flow style: one line)."""
    return yaml.safe_dump(node, default_flow_style=True, sort_keys=False, width=math.inf).strip()
