"""Individual Select (POINTS, Liu et al. 2024, arXiv 2409.04828, section 3.2): greedy forward selection of training
sources, as a study kind of the sweep runner. Each round trains the current mixture plus one candidate source per
arm; the best candidate joins the mixture if it beats the current mixture by more than the seeds' noise, and the
selection stops when none does.

A select study is a grid file (:mod:`lit_mllm.ablate.grid`: ``base``, ``set``, ``seeds``, ``match``, ``check``,
``slurm``, ... as in any grid) with ``kind: select``, a ``select:`` block and no ``axes``::

    kind: select
    study: individual_select-toy
    base: [configs/quickstart.yaml]
    seeds: [0, 1]
    match: {steps: 40}
    select:
      key: data.init_args.train          # where the mixture goes (default): source name -> source, set whole
      current:                           # the starting mixture: at least one source (the base's are replaced)
        captions: {class_path: lit_mllm.data.Conversations, init_args: {path: captions_train.json}}
      candidates:                        # sources that may join it (this order breaks ties)
        colour: {class_path: lit_mllm.data.Conversations, init_args: {path: skill_colour_train.json}}
        count: {class_path: lit_mllm.data.Conversations, init_args: {path: skill_count_train.json}}
      metric: val/accuracy               # a key of the arms' metrics.json `metrics` (required)
      lower_is_better: false             # true for losses
      margin: 0.0                        # the gain must exceed this; required with one seed
      level: 0.95                        # confidence of the Welch interval
      max_rounds: null                   # stop after this many rounds (default: until no candidate helps)

Every arm sets ``key`` to a whole mixture (the base config's sources there are replaced): the start mixture's
sources, then the selected ones in the order they were chosen, then the arm's candidate. Weights are the sources'
own (``init_args.weight``, default 1) and are normalised over the mixture, so a source that joins takes a share
from the others at the same number of steps (``match``), as adding a dataset to a fixed budget does.

Rounds. Arm ``r0`` trains the start mixture. Round r (1, 2, ...) trains one arm per candidate not yet selected:
the current mixture plus that candidate, named ``r{r}+{candidate}`` (``_seed={s}`` appended with several seeds,
as in any grid); ``r0`` runs with round 1. When every arm of a round is done, the candidate with the best mean
over its seeds (ties: the first in ``candidates``; a non-finite mean ranks last) joins the mixture if its gain over
the current mixture (candidate minus current, negated when lower is better) beats the noise:

- two seeds or more: the lower end of Welch's ``level`` interval of the gain is above ``margin``;
- one seed: the gain itself is above ``margin``, which must then be given (one seed has no noise estimate).

The chosen arm is the next round's current mixture (it is not trained again). The selection stops when the best
candidate does not beat the current mixture, when every candidate has joined, or after ``max_rounds`` rounds.

Resume. Decisions are never stored: they are recomputed from the done arms' ``metrics.json`` every time
(:func:`select`, a pure function of the metrics), so running ``lit-mllm sweep FILE`` again resumes the open round
(done arms are skipped, interrupted ones resume from their checkpoints) and never reruns a decided round.
``study.json`` lists the arms of the rounds reached (``kind: select``, the ``select:`` block); a changed rule may
take another path, and arms off the new path stay in the folder, unlisted. On SLURM each round is one job array:
``--wait`` waits for it and goes on to the next round; without it, run the command again once the jobs are done.

    lit-mllm sweep ablations/individual_select-toy.yaml --dry-run    # the rule, decisions so far, the next round
    lit-mllm sweep ablations/individual_select-toy.yaml              # round after round until it stops
    lit-mllm report runs/ablations/individual_select-toy             # a table per round
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from lit_mllm.ablate.grid import SEED_AXIS, Arm, Axis, Grid, GridError, Level, expand
from lit_mllm.ablate.report import arm_rows, load_study, plot_curves, summary_rows, write_csv, write_hparams
from lit_mllm.ablate.resolve import Plan, describe_plans, resolve_arms
from lit_mllm.ablate.runner import manifest, prepare
from lit_mllm.ablate.stats import Summary, summarize, welch
from lit_mllm.ablate.study import LOG, MANIFEST, METRICS, arm_state, read_json, write_json

START = "r0"
"""The condition of the start mixture's arm."""
NO_CANDIDATE = "-"
"""The start arm's ``candidate`` label."""
FIELDS = ("key", "current", "candidates", "metric", "lower_is_better", "margin", "level", "max_rounds")
_SOURCE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9.-]*$")

Echo = Callable[[str], None]
Values = Callable[[str], "list[float] | None"]
"""A condition -> its metric over all its seeds, or None while any of its arms is not done."""


# -- the rule --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Gain:
    """A candidate's gain over the current mixture, signed so that positive is better."""

    mean: float
    low: float
    """Lower end of Welch's interval (nan with one seed)."""
    high: float
    beats: bool
    """Whether the gain beats the noise (see :meth:`Rule.gain`)."""


@dataclass(frozen=True)
class Rule:
    """When the best candidate of a round joins the mixture."""

    metric: str
    """The metric compared (a key of the arms' ``metrics.json`` ``metrics``)."""
    lower_is_better: bool = False
    """Whether smaller values are better (losses)."""
    margin: float | None = None
    """How much the gain must exceed (Welch's lower end with seeds, the gain itself with one seed); None: 0."""
    level: float = 0.95
    """Confidence of Welch's interval."""

    def gain(self, current: Sequence[float], candidate: Sequence[float]) -> Gain:
        """The candidate's gain over ``current`` (values over seeds) and whether it beats the noise: with two
        values or more on both sides Welch's interval's lower end must be above the margin, otherwise the gain
        itself (a non-finite value never beats)."""
        better, worse = (current, candidate) if self.lower_is_better else (candidate, current)
        margin = self.margin or 0.0
        d = welch(better, worse, self.level)
        if min(len(current), len(candidate)) >= 2:
            return Gain(d.diff, d.low, d.high, bool(d.low > margin))
        return Gain(d.diff, math.nan, math.nan, bool(math.isfinite(d.diff) and d.diff > margin))

    def describe(self, seeds: int) -> str:
        """The rule in words (the dry run's and the report's)."""
        direction = "lower" if self.lower_is_better else "higher"
        margin = self.margin or 0.0
        if seeds >= 2:
            test = (
                f"the lower end of Welch's {self.level:.0%} interval of its gain over the current mixture is "
                f"above {margin:g}"
            )
        else:
            test = f"its gain over the current mixture is above the margin {margin:g} (one seed: no noise estimate)"
        over = f"over its {seeds} seeds" if seeds >= 2 else "(one seed)"
        return (
            f"each round, the candidate with the best mean {self.metric} ({direction} is better) {over} joins the "
            f"mixture if {test}; the selection stops when it does not, or when the candidates run out"
        )


@dataclass(frozen=True)
class SelectSpec:
    """A parsed ``select:`` block (see the module docstring)."""

    key: str
    current: Mapping[str, Any]
    """The start mixture: source name -> source (``class_path`` and ``init_args``)."""
    candidates: Mapping[str, Any]
    """Sources that may join it, in tie-breaking order."""
    rule: Rule
    max_rounds: int | None = None

    def source(self, name: str) -> Any:
        return self.current[name] if name in self.current else self.candidates[name]


def select_spec(grid: Grid) -> SelectSpec:
    """The ``select:`` block of a ``kind: select`` grid, checked.

    Raises:
        GridError: Not a select study, an unknown or missing field, a bad source name, a candidate also in the start
            mixture, or one seed without a ``margin``.
    """
    where = f"{grid.source or 'the grid'}: select"
    if grid.kind != "select":
        raise GridError(f"{grid.source or 'the grid'} is a {grid.kind} study, not kind: select")
    node = dict(grid.select)
    unknown = [k for k in node if k not in FIELDS]
    if unknown:
        raise GridError(f"{where}: unknown key(s) {unknown}; the select block's keys are {', '.join(FIELDS)}")
    key = node.get("key", "data.init_args.train")
    if not isinstance(key, str) or not key or any(not part for part in key.split(".")):
        raise GridError(f"{where}: key {key!r} is not a dotted key such as data.init_args.train")
    current = _sources(node.get("current"), f"{where}.current")
    candidates = _sources(node.get("candidates"), f"{where}.candidates")
    both = sorted(set(current) & set(candidates))
    if both:
        raise GridError(
            f"{where}: {both} are in the start mixture and among the candidates; keep each in one"
        )
    metric = node.get("metric")
    if not isinstance(metric, str) or not metric:
        raise GridError(f"{where}.metric is required: a key of the arms' metrics.json, such as val/accuracy")
    lower = node.get("lower_is_better", False)
    if not isinstance(lower, bool):
        raise GridError(f"{where}.lower_is_better must be true or false, got {lower!r}")
    margin = node.get("margin")
    if margin is not None and not (_is_number(margin) and margin >= 0):
        raise GridError(f"{where}.margin must be a number >= 0, got {margin!r}")
    if margin is None and len(grid.seeds) < 2:
        raise GridError(
            f"{where}: with one seed there is no noise estimate: give `margin` (the gain a candidate must exceed "
            "to join the mixture), or two seeds or more"
        )
    level = node.get("level", 0.95)
    if not (_is_number(level) and 0 < level < 1):
        raise GridError(f"{where}.level must be in (0, 1), got {level!r}")
    rounds = node.get("max_rounds")
    if rounds is not None and not (isinstance(rounds, int) and not isinstance(rounds, bool) and rounds >= 1):
        raise GridError(f"{where}.max_rounds must be a positive integer or null, got {rounds!r}")
    rule = Rule(metric, lower, None if margin is None else float(margin), float(level))
    return SelectSpec(key, current, candidates, rule, rounds)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _sources(node: Any, where: str) -> dict[str, Any]:
    if not isinstance(node, dict) or not node:
        raise GridError(
            f"{where} must be a non-empty mapping of source names to sources (class_path, init_args)"
        )
    for name, source in node.items():
        if not isinstance(name, str) or not _SOURCE.match(name):
            raise GridError(f"{where}: source name {name!r} must be letters, digits and .- (it names arms)")
        if not isinstance(source, dict):
            raise GridError(f"{where}.{name} must be a source: a mapping with class_path and init_args")
    return dict(node)


# -- the decisions ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Entry:
    """A candidate's row in a decided round."""

    candidate: str
    condition: str
    summary: Summary
    gain: Gain


@dataclass(frozen=True)
class Round:
    """A round: the current mixture, the candidates tried against it and, once its arms are done, the decision."""

    number: int
    current: str
    """The current mixture's condition (``r0``, or the arm chosen in the previous round)."""
    mixture: tuple[str, ...]
    """The current mixture's sources."""
    candidates: tuple[str, ...]
    entries: tuple[Entry, ...] | None = None
    """One per candidate once every arm of the round is done; None before."""
    current_summary: Summary | None = None
    best: str | None = None
    chosen: str | None = None
    """The candidate that joined the mixture (None: the best did not beat the noise, or undecided)."""

    @property
    def decided(self) -> bool:
        return self.entries is not None

    def conditions(self) -> list[str]:
        """The conditions this round trains (``r0`` with round 1)."""
        return ([START] if self.number == 1 else []) + [condition(self.number, c) for c in self.candidates]


@dataclass(frozen=True)
class Selection:
    """Where a select study stands."""

    rounds: tuple[Round, ...]
    mixture: tuple[str, ...]
    """The selected mixture so far: the start sources, then the chosen ones in order."""
    current: str
    """Its arm's condition."""
    finished: bool
    reason: str
    """Why it stopped, or which round waits for its arms."""

    @property
    def chosen(self) -> list[str]:
        """The candidates selected, in order."""
        return [r.chosen for r in self.rounds if r.chosen is not None]

    @property
    def open_round(self) -> Round | None:
        """The round whose arms are not all done (None once finished)."""
        return None if self.finished else self.rounds[-1]


def condition(number: int, candidate: str) -> str:
    """The condition of round ``number``'s arm adding ``candidate``: ``r{number}+{candidate}``."""
    return f"r{number}+{candidate}"


def select(spec: SelectSpec, values: Values) -> Selection:
    """Replay the selection from the arms' results: the rounds decided, and the open round or why it stopped.

    Args:
        spec: The study's select block.
        values: A condition -> its ``spec.rule.metric`` over all its seeds, or None while any of its arms is not
            done (:func:`folder_values`).
    """
    rule = spec.rule
    mixture, current, rounds = tuple(spec.current), START, []
    current_values = values(START)
    number = 1
    while True:
        remaining = tuple(c for c in spec.candidates if c not in mixture)
        if not remaining:
            return Selection(tuple(rounds), mixture, current, True, "every candidate joined the mixture")
        if spec.max_rounds is not None and number > spec.max_rounds:
            reason = f"max_rounds ({spec.max_rounds}) rounds decided"
            return Selection(tuple(rounds), mixture, current, True, reason)
        found = {c: values(condition(number, c)) for c in remaining}
        if current_values is None or any(v is None for v in found.values()):
            rounds.append(Round(number, current, mixture, remaining))
            reason = f"round {number} waits for its arms"
            return Selection(tuple(rounds), mixture, current, False, reason)
        entries = tuple(
            Entry(c, condition(number, c), summarize(found[c]), rule.gain(current_values, found[c]))
            for c in remaining
        )
        best = max(entries, key=lambda e: (_goodness(e.summary.mean, rule), -remaining.index(e.candidate)))
        chosen = best.candidate if best.gain.beats else None
        rounds.append(
            Round(
                number,
                current,
                mixture,
                remaining,
                entries,
                summarize(current_values),
                best.candidate,
                chosen,
            )
        )
        if chosen is None:
            reason = (
                f"round {number}'s best candidate, {best.candidate}, does not beat the current mixture "
                f"beyond the noise"
            )
            return Selection(tuple(rounds), mixture, current, True, reason)
        mixture, current, current_values = (*mixture, chosen), best.condition, found[chosen]
        number += 1


def _goodness(mean: float, rule: Rule) -> float:
    if not math.isfinite(mean):
        return -math.inf
    return -mean if rule.lower_is_better else mean


def arm_name(condition: str, seed: int | None, seeds: Sequence[int]) -> str:
    """An arm's name, as a grid names it: the condition, with ``_seed={seed}`` when there are several seeds."""
    return f"{condition}_{SEED_AXIS}={seed}" if len(seeds) > 1 else condition


def folder_values(folder: Path, seeds: Sequence[int], metric: str) -> Values:
    """:func:`select`'s ``values`` read from a study folder: the arms' ``metrics.json`` once they are done.

    Raises (when called):
        GridError: A done arm whose metrics.json lacks ``metric``.
    """

    def values(condition: str) -> list[float] | None:
        out = []
        for seed in seeds or [None]:
            arm = folder / arm_name(condition, seed, seeds)
            if arm_state(arm).state != "done":
                return None
            metrics = (read_json(arm / METRICS) or {}).get("metrics") or {}
            if metric not in metrics:
                raise GridError(
                    f"arm {arm.name} is done but its {METRICS} has no {metric!r} (it has "
                    f"{', '.join(sorted(metrics)) or 'nothing'}): select.metric must be a metric every arm records"
                )
            out.append(float(metrics[metric]))
        return out

    return values


# -- the arms --------------------------------------------------------------------------------------------------
def round_arms(
    grid: Grid, spec: SelectSpec, rounds: Sequence[Round], overrides: Mapping[str, Any] | None = None
) -> list[Arm]:
    """The arms of ``rounds`` (``r0`` with round 1), round by round (within a round seed first, as a grid runs),
    each setting ``spec.key`` to its mixture; built like any grid's arms (base, ``set``, the mixture, the seed,
    ``--set`` overrides) and named by :func:`arm_name`."""
    arms = []
    for r in rounds:
        levels, labels = [], {}
        for c in ([NO_CANDIDATE] if r.number == 1 else []) + list(r.candidates):
            name = START if c == NO_CANDIDATE else condition(r.number, c)
            sources = r.mixture if c == NO_CANDIDATE else (*r.mixture, c)
            levels.append(Level(name, name, patch={spec.key: {s: spec.source(s) for s in sources}}))
            labels[name] = {"round": "r0" if c == NO_CANDIDATE else f"r{r.number}", "candidate": c}
        plain = replace(grid, kind="grid", select={}, axes=(Axis("arm", tuple(levels)),), zip=())
        for arm in expand(plain, overrides):
            cond = arm.labels["arm"]
            seed = {SEED_AXIS: arm.labels[SEED_AXIS]} if SEED_AXIS in arm.labels else {}
            arms.append(
                replace(
                    arm,
                    name=arm_name(cond, arm.seed, grid.seeds),
                    condition=cond,
                    labels={**labels[cond], **seed},
                    values={**labels[cond], **({SEED_AXIS: arm.seed} if seed else {})},
                )
            )
    return arms


def first_round(grid: Grid, overrides: Mapping[str, Any] | None = None) -> list[Arm]:
    """The arms a new select study runs first: ``r0`` and round 1 (every candidate added to the start mixture)."""
    spec = select_spec(grid)
    return round_arms(grid, spec, [Round(1, START, tuple(spec.current), tuple(spec.candidates))], overrides)


def write_manifest(grid: Grid, plans: Sequence[Plan], folder: Path, selection: Selection) -> None:
    """``study.json`` for a select study: the runner's manifest of the path's arms, ``kind: select``, the select
    block, and the axes ``round`` and ``candidate`` (what ``lit-mllm report`` tabulates)."""
    content = manifest(grid, plans)
    rounds = ["r0", *(f"r{r.number}" for r in selection.rounds)]
    candidates = [NO_CANDIDATE, *grid.select.get("candidates", {})]
    axes = [
        {"name": "round", "labels": rounds, "varying": len(rounds) > 1},
        {"name": "candidate", "labels": candidates, "varying": True},
    ]
    if grid.seeds:
        axes.append(
            {"name": SEED_AXIS, "labels": [str(s) for s in grid.seeds], "varying": len(grid.seeds) > 1}
        )
    content.update(kind="select", axes=axes, select=dict(grid.select))
    write_json(folder.resolve() / MANIFEST, content)


def is_select_study(folder: str | Path) -> bool:
    """Whether the study in ``folder`` is a select study (its ``study.json`` says ``kind: select``)."""
    return (read_json(Path(folder) / MANIFEST) or {}).get("kind") == "select"


# -- running ---------------------------------------------------------------------------------------------------
def run_select(
    grid: Grid,
    folder: Path,
    run_round: Callable[[list[str]], Mapping[str, str]],
    overrides: Mapping[str, Any] | None = None,
    echo: Echo = print,
) -> Selection:
    """Run a select study round after round until it stops, or until a round's arms do not all finish.

    Each pass replays the decisions from the folder (:func:`select`), checks and writes every arm of the path so
    far (:func:`~lit_mllm.ablate.runner.prepare`: an arm whose config changed is refused), and hands the open
    round's unfinished arms to ``run_round`` (a :class:`~lit_mllm.ablate.runner.LocalRunner`'s ``run``, or a
    SLURM submission), which returns each arm's state.

    Returns:
        Where the study stands: finished, or the open round (an arm failed, was interrupted, or is queued).
    """
    spec = select_spec(grid)
    told: set[int] = set()
    resolved: dict[str, Plan] = {}  # an arm's config does not change within one run: each is parsed once
    while True:
        selection = select(spec, folder_values(folder, grid.seeds, spec.rule.metric))
        arms = round_arms(grid, spec, selection.rounds, overrides)
        new = [a for a in arms if a.name not in resolved]
        if new:
            resolved.update((p.name, p) for p in resolve_arms(grid, overrides, arms=new))
        plans = [resolved[a.name] for a in arms]
        prepare(grid, plans, folder)
        write_manifest(grid, plans, folder, selection)
        for r in selection.rounds:
            if r.decided and r.number not in told:
                echo(f"select: {decision_line(r)}")
                told.add(r.number)
        if selection.finished:
            echo(
                f"select: stopped: {selection.reason}; selected {' + '.join(selection.mixture)} (arm {selection.current})"
            )
            return selection
        r = selection.open_round
        names = [p.name for p in plans if p.arm.condition in set(r.conditions())]
        todo = [n for n in names if arm_state(folder / n).state != "done"]
        echo(
            f"select: round {r.number}: {' + '.join(r.mixture)} plus each of {', '.join(r.candidates)}: "
            f"{len(todo)} of {len(names)} arms to run"
        )
        states = run_round(todo)
        left = [n for n in todo if states.get(n) != "done"]
        if left:
            echo(f"select: round {r.number} is not finished ({len(left)} arms not done); run the sweep again")
            return selection


def decision_line(r: Round) -> str:
    """One line saying what a decided round chose."""
    best = next(e for e in r.entries if e.candidate == r.best)
    gain = f"gain {best.gain.mean:+.4g}" + (
        f" [{best.gain.low:.4g}, {best.gain.high:.4g}]" if math.isfinite(best.gain.low) else ""
    )
    if r.chosen is not None:
        return f"round {r.number}: {r.chosen} joins the mixture ({gain})"
    return f"round {r.number}: the best candidate, {r.best}, stays out ({gain}: within the noise)"


def dry_run(grid: Grid, folder: Path, overrides: Mapping[str, Any] | None = None) -> str:
    """The dry run's text: the rule, the decisions the folder's arms give so far, and the next round's arms
    checked (round 1 with ``r0`` on a new study)."""
    spec = select_spec(grid)
    selection = select(spec, folder_values(folder, grid.seeds, spec.rule.metric))
    lines = [
        f"select study {grid.study}: start {' + '.join(spec.current)}; candidates {', '.join(spec.candidates)}",
        f"rule: {spec.rule.describe(len(grid.seeds))}"
        + (f"; at most {spec.max_rounds} rounds" if spec.max_rounds else ""),
    ]
    lines += [decision_line(r) for r in selection.rounds if r.decided]
    if selection.finished:
        lines.append(f"finished: {selection.reason}; selected {' + '.join(selection.mixture)}")
    else:
        r = selection.open_round
        plans = resolve_arms(grid, overrides, arms=round_arms(grid, spec, [r], overrides))
        done = [p.name for p in plans if arm_state(folder / p.name).state == "done"]
        lines.append(
            f"round {r.number}: {' + '.join(r.mixture)} ({r.current}) plus each of {', '.join(r.candidates)}"
            + (f" ({len(done)} arms already done)" if done else "")
        )
        lines.append(describe_plans(plans))
    lines.append(f"study folder: {folder}")
    return "\n".join(lines)


def known_arms(grid: Grid, folder: Path) -> list[str]:
    """The arms of the path so far (for the progress view of a study not yet prepared)."""
    spec = select_spec(grid)
    selection = select(spec, folder_values(folder, grid.seeds, spec.rule.metric))
    return [
        arm_name(c, s, grid.seeds)
        for r in selection.rounds
        for c in r.conditions()
        for s in (grid.seeds or [None])
    ]


# -- the report ------------------------------------------------------------------------------------------------
def round_rows(selection: Selection, values: Callable[[str], list[float]]) -> list[dict[str, Any]]:
    """One row per round and arm condition (the current mixture first): n, mean, interval, gain, chosen. An
    undecided round's rows hold what its done arms give (``values``: the done arms' metric) and no gain."""
    rows = []
    for r in selection.rounds:
        current = r.current_summary or summarize(values(r.current))
        rows.append(_row(r, "(current)", r.current, current, None, ""))
        by_candidate = {e.candidate: e for e in r.entries or ()}
        for c in r.candidates:
            e = by_candidate.get(c)
            if e is None:
                rows.append(
                    _row(r, c, condition(r.number, c), summarize(values(condition(r.number, c))), None, "…")
                )
            else:
                verdict = "yes" if c == r.chosen else "best, within noise" if c == r.best else "no"
                rows.append(_row(r, c, e.condition, e.summary, e.gain, verdict))
    return rows


def _row(r: Round, candidate: str, cond: str, s: Summary, gain: Gain | None, chosen: str) -> dict[str, Any]:
    nan = math.nan
    return {
        "round": r.number,
        "candidate": candidate,
        "arm": cond,
        "n": s.n,
        "mean": s.mean,
        "ci_low": s.low,
        "ci_high": s.high,
        "gain": gain.mean if gain else nan,
        "gain_low": gain.low if gain else nan,
        "gain_high": gain.high if gain else nan,
        "beats_noise": gain.beats if gain else "",
        "chosen": chosen,
    }


def select_markdown(
    name: str, spec: SelectSpec, seeds: int, selection: Selection, rows: list[dict], notes: Sequence[str]
) -> str:
    """The report's Markdown: the rule, the outcome, a table per round."""
    metric = spec.rule.metric
    state = f"stopped: {selection.reason}" if selection.finished else f"open: {selection.reason}"
    lines = [
        f"# Study {name} (Individual Select)",
        "",
        f"Rule: {spec.rule.describe(seeds)}"
        + (f"; at most {spec.max_rounds} rounds." if spec.max_rounds else "."),
        "",
        f"Start mixture: {' + '.join(spec.current)}. Selected, in order: {', '.join(selection.chosen) or 'nothing'}."
        f" Mixture now: {' + '.join(selection.mixture)} (arm `{selection.current}`); {state}.",
        "",
        *notes,
        "",
    ]
    for r in selection.rounds:
        lines += [f"## Round {r.number}: {' + '.join(r.mixture)} plus one of {', '.join(r.candidates)}", ""]
        lines += [
            f"| candidate | arm | n | mean {metric} | 95% interval | gain | gain interval ({spec.rule.level:.0%}) "
            "| chosen |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for row in (x for x in rows if x["round"] == r.number):
            interval = (
                "-" if not math.isfinite(row["ci_low"]) else f"[{row['ci_low']:.4g}, {row['ci_high']:.4g}]"
            )
            gain = "-" if not math.isfinite(row["gain"]) else f"{row['gain']:+.4g}"
            gain_ci = (
                "-"
                if not math.isfinite(row["gain_low"])
                else f"[{row['gain_low']:.4g}, {row['gain_high']:.4g}]"
            )
            chosen = "**yes**" if row["chosen"] == "yes" else row["chosen"]
            lines.append(
                f"| {row['candidate']} | `{row['arm']}` | {row['n']} | {_fmt(row['mean'])} | {interval} | {gain} "
                f"| {gain_ci} | {chosen} |"
            )
        lines += ["", decision_line(r) + "." if r.decided else "Waiting for this round's arms.", ""]
    return "\n".join(lines)


def write_select_report(
    folder: str | Path, out: str | Path | None = None, curve_tags: Sequence[str] = ("train/loss",)
) -> Path:
    """Write a select study's report into ``out`` (default ``folder/report``); its Markdown file.

    ``report.md`` (the rule, the outcome, a table per round: each candidate's mean and interval over seeds, its
    gain over the current mixture with Welch's interval, and which one joined), ``rounds.csv`` (those rows),
    ``arms.csv`` and ``summary.csv`` (as for any study), the training curves and TensorBoard HParams. The decisions
    are recomputed from the arms' metrics.json with the study's rule, as the sweep makes them.
    """
    study = load_study(folder)
    content = read_json(study.folder / MANIFEST) or {}
    seeds = list(content.get("seeds") or [])
    grid = Grid(study=study.name, seeds=tuple(seeds), kind="select", select=content.get("select") or {})
    spec = select_spec(replace(grid, source=str(study.folder / MANIFEST)))
    selection = select(spec, folder_values(study.folder, seeds, spec.rule.metric))
    out = Path(out) if out else study.folder / "report"
    out.mkdir(parents=True, exist_ok=True)
    rows = round_rows(selection, lambda cond: study.values(spec.rule.metric, cond))
    write_csv(out / "rounds.csv", rows)
    write_csv(out / "arms.csv", arm_rows(study))
    metrics = list(dict.fromkeys([spec.rule.metric, *study.metric_names()]))
    write_csv(out / "summary.csv", summary_rows(study, metrics))
    notes = [
        f"- failed: `{a.name}` (log `{study.folder / a.name / LOG}`)"
        for a in study.arms
        if a.state == "failed"
    ]
    plots = [p for tag in curve_tags if (p := plot_curves(study, tag, out / f"curves_{_slug(tag)}.png"))]
    write_hparams(study, out / "hparams", metrics)
    text = select_markdown(study.name, spec, len(seeds), selection, rows, notes)
    if plots:
        text += "\n## Plots\n\n" + "\n".join(f"![{p.stem}]({p.name})" for p in plots) + "\n"
    path = out / "report.md"
    path.write_text(text)
    return path


def _fmt(value: float) -> str:
    return f"{value:.4g}" if math.isfinite(value) else "-"


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.+-]+", "-", text).strip("-")
