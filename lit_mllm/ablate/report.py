"""A study's comparison: tables over seeds, which differences exceed their noise, plots, TensorBoard HParams.

:func:`write_report` (``lit-mllm report STUDY_DIR``) writes into ``STUDY_DIR/report/``:

    report.md          per metric: each condition's mean and t-based 95% interval over its seeds (a metric equal in
                       every arm, such as an answer baseline, once in a list); per axis, each level against the
                       axis's first level with the other axes held, Welch's 95% interval of the difference and
                       whether it excludes 0 ("exceeds noise"); the main effects (each axis's levels pooled over
                       the other axes and the seeds: which axis moves the metric most, MM1's question); failed and
                       unfinished arms, with logs
    arms.csv           one row per arm: its levels, state and every metric of its metrics.json
    summary.csv        one row per condition and metric: n, mean, sd, interval
    differences.csv    the differences above, for the main metric
    effects.csv        the main effects, for the main metric
    <metric>_by_<x>.png    the main metric against one axis, a line per level of another, a panel per level of
                       the rest (MM1's connector figure: accuracy against image tokens, a line per connector)
    curves_<tag>.png   training curves per condition (mean over seeds) read from the arms' TensorBoard events
    hparams/<arm>/     TensorBoard HParams: each arm's levels and metrics (``tensorboard --logdir STUDY_DIR``)

A condition is an arm without its seed; an arm's result is the ``metrics`` mapping of its ``metrics.json``
(:mod:`lit_mllm.ablate.study`). Only done arms count.
"""

from __future__ import annotations

import csv
import itertools
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lit_mllm.ablate.grid import SEED_AXIS
from lit_mllm.ablate.stats import Summary, summarize, welch
from lit_mllm.ablate.study import LOG, MANIFEST, METRICS, arm_state, read_json


@dataclass
class ArmResult:
    """One arm of a loaded study."""

    name: str
    condition: str
    seed: int | None
    labels: dict[str, str]
    state: str
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass
class Study:
    """A study's manifest and its arms' results."""

    folder: Path
    name: str
    axes: list[dict]
    """``{"name", "labels", "varying"}`` per axis, the seed axis included."""
    report: dict
    arms: list[ArmResult]

    @property
    def varying(self) -> list[str]:
        """The axes that vary, without the seed."""
        return [a["name"] for a in self.axes if a["varying"] and a["name"] != SEED_AXIS]

    def levels(self, axis: str) -> list[str]:
        """The labels of ``axis`` in the grid's order."""
        return next(a["labels"] for a in self.axes if a["name"] == axis)

    @property
    def done(self) -> list[ArmResult]:
        return [a for a in self.arms if a.state == "done"]

    def conditions(self) -> list[tuple[str, dict[str, str]]]:
        """(condition, its labels on the varying axes) in the grid's order."""
        seen: dict[str, dict[str, str]] = {}
        for arm in self.arms:
            seen.setdefault(arm.condition, {k: arm.labels[k] for k in self.varying})
        return list(seen.items())

    def values(self, metric: str, condition: str) -> list[float]:
        """``metric`` of the condition's done arms (one per seed)."""
        return [
            a.metrics[metric]
            for a in self.done
            if a.condition == condition and _finite(a.metrics.get(metric))
        ]

    def metric_names(self) -> list[str]:
        """The metrics tabulated: the grid's ``report.metrics``, else every ``val/`` and ``test/`` metric found."""
        chosen = list(self.report.get("metrics") or [])
        if chosen:
            return chosen
        found: dict[str, None] = {}
        for arm in self.done:
            found.update(dict.fromkeys(k for k in arm.metrics if k.startswith(("val/", "test/"))))
        return sorted(found)

    def main_metric(self) -> str | None:
        """The grid's ``report.metric``, else the first tabulated metric."""
        names = self.metric_names()
        return self.report.get("metric") or (names[0] if names else None)


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def load_study(folder: str | Path) -> Study:
    """Read a study's manifest and its arms' states and metrics."""
    folder = Path(folder)
    manifest = read_json(folder / MANIFEST)
    if manifest is None:
        raise FileNotFoundError(
            f"{folder / MANIFEST} is missing: give the folder `lit-mllm sweep` wrote (runs/ablations/<study>)"
        )
    arms = []
    for arm in manifest["arms"]:
        state = arm_state(folder / arm["name"]).state
        content = read_json(folder / arm["name"] / METRICS) if state == "done" else None
        metrics = {k: float(v) for k, v in ((content or {}).get("metrics") or {}).items() if _finite(v)}
        arms.append(ArmResult(arm["name"], arm["condition"], arm.get("seed"), arm["labels"], state, metrics))
    return Study(folder, manifest["study"], manifest["axes"], manifest.get("report") or {}, arms)


# -- tables ----------------------------------------------------------------------------------------------------
def summary_rows(study: Study, metrics: Sequence[str]) -> list[dict[str, Any]]:
    """One row per condition and metric: its labels, n, mean, sd and 95% interval over seeds."""
    rows = []
    for metric in metrics:
        for condition, labels in study.conditions():
            s = summarize(study.values(metric, condition))
            rows.append(
                {"condition": condition, **labels, "metric": metric, "n": s.n, "mean": s.mean, "sd": s.sd}
                | {"ci_low": s.low, "ci_high": s.high}
            )
    return rows


def difference_rows(study: Study, metric: str) -> list[dict[str, Any]]:
    """Per varying axis, each level against the axis's first level with the other axes held at each of their
    combinations: the difference of means, Welch's 95% interval, whether it exceeds the noise."""
    rows = []
    conditions = study.conditions()
    for axis in study.varying:
        others = [a for a in study.varying if a != axis]
        base_level = study.levels(axis)[0]
        for held in itertools.product(*(study.levels(a) for a in others)):
            fixed = dict(zip(others, held))

            def find(level: str, fixed: dict = fixed, axis: str = axis) -> str | None:
                for condition, labels in conditions:
                    if labels[axis] == level and all(labels[k] == v for k, v in fixed.items()):
                        return condition
                return None

            base = find(base_level)
            for level in study.levels(axis)[1:]:
                other = find(level)
                if base is None or other is None:
                    continue
                d = welch(study.values(metric, other), study.values(metric, base))
                rows.append(
                    {
                        "axis": axis,
                        "level": level,
                        "versus": base_level,
                        "held": ", ".join(f"{k}={v}" for k, v in fixed.items()),
                        "metric": metric,
                        "difference": d.diff,
                        "ci_low": d.low,
                        "ci_high": d.high,
                        "exceeds_noise": d.exceeds_noise,
                    }
                )
    return rows


def effect_rows(study: Study, metric: str) -> list[dict[str, Any]]:
    """Main effects: per varying axis and level, ``metric`` over every done arm at that level (the other axes and
    the seeds pooled), and per axis its range (best level's mean minus the worst's) with Welch's 95% interval of
    that difference. Pooling counts the other axes' effects as noise, so the interval is conservative; in a full
    grid every level sees the same mix of the other axes, so the means compare fairly."""
    rows = []
    for axis in study.varying:
        pooled = {
            level: [
                a.metrics[metric]
                for a in study.done
                if a.labels[axis] == level and _finite(a.metrics.get(metric))
            ]
            for level in study.levels(axis)
        }
        summaries = {level: summarize(v) for level, v in pooled.items() if v}
        if len(summaries) < 2:
            continue
        best = max(summaries, key=lambda k: summaries[k].mean)
        worst = min(summaries, key=lambda k: summaries[k].mean)
        d = welch(pooled[best], pooled[worst])
        for level, s in summaries.items():
            rows.append(
                {"axis": axis, "level": level, "metric": metric, "n": s.n, "mean": s.mean, "sd": s.sd}
                | {"ci_low": s.low, "ci_high": s.high, "range": d.diff, "best": best, "worst": worst}
                | {"range_ci_low": d.low, "range_ci_high": d.high, "exceeds_noise": d.exceeds_noise}
            )
    return rows


def constant_metrics(study: Study, metrics: Sequence[str]) -> dict[str, float]:
    """The metrics with one and the same value in every done arm (answer baselines, for instance): reported once."""
    same = {}
    for metric in metrics:
        values = {a.metrics.get(metric) for a in study.done}
        if len(study.done) > 1 and len(values) == 1 and _finite(next(iter(values))):
            same[metric] = next(iter(values))
    return same


def arm_rows(study: Study) -> list[dict[str, Any]]:
    """One row per arm: name, condition, seed, state, its labels and its metrics."""
    return [
        {"arm": a.name, "condition": a.condition, "seed": a.seed, "state": a.state, **a.labels, **a.metrics}
        for a in study.arms
    ]


def write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    columns: dict[str, None] = {}
    for row in rows:
        columns.update(dict.fromkeys(row))
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(columns))
        writer.writeheader()
        writer.writerows(rows)


def _fmt(value: float) -> str:
    return "-" if not _finite(value) else f"{value:.4g}"


def _bounds(low: float, high: float) -> str:
    return "-" if not _finite(low) else f"[{low:.4g}, {high:.4g}]"


def _interval(s: Summary) -> str:
    return _bounds(s.low, s.high)


def markdown(study: Study, metrics: Sequence[str], main: str | None, plots: Sequence[Path]) -> str:
    """The report's Markdown."""
    lines = [f"# Study {study.name}", ""]
    counts = {s: sum(a.state == s for a in study.arms) for s in dict.fromkeys(a.state for a in study.arms)}
    lines.append(f"{len(study.arms)} arms: " + ", ".join(f"{n} {s}" for s, n in counts.items()) + ".")
    failed = [a for a in study.arms if a.state == "failed"]
    for arm in failed:
        lines.append(f"- failed: `{arm.name}` (log `{study.folder / arm.name / LOG}`)")
    lines += [
        "",
        "Means over seeds with t-based 95% intervals (n = seeds done; no interval with one seed).",
        "",
    ]
    same = constant_metrics(study, metrics)
    if same:
        lines += ["Equal in every arm (not tabulated per condition): "
                  + ", ".join(f"`{k}` {_fmt(v)}" for k, v in same.items()) + ".", ""]  # fmt: skip
    for metric in (m for m in metrics if m not in same):
        lines += [f"## {metric}", ""]
        head = [*study.varying, "n", "mean", "95% interval"]
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for condition, labels in study.conditions():
            s = summarize(study.values(metric, condition))
            lines.append("| " + " | ".join([*labels.values(), str(s.n), _fmt(s.mean), _interval(s)]) + " |")
        lines.append("")
    if main is not None:
        rows = difference_rows(study, main)
        lines += [
            f"## Differences in {main}",
            "",
            "Each level against its axis's first level, the other axes held; Welch's 95% interval of the difference "
            "of means. **yes**: the interval excludes 0, the difference is larger than the seeds' noise.",
            "",
            "| axis | level | versus | held | difference | 95% interval | exceeds noise |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in rows:
            interval = _bounds(r["ci_low"], r["ci_high"])
            verdict = "**yes**" if r["exceeds_noise"] else "no"
            lines.append(
                f"| {r['axis']} | {r['level']} | {r['versus']} | {r['held'] or '-'} | {_fmt(r['difference'])} | "
                f"{interval} | {verdict} |"
            )
        beyond = sum(r["exceeds_noise"] for r in rows)
        lines += ["", f"{beyond} of {len(rows)} differences exceed their noise.", ""]
        lines += _effects_markdown(study, main)
    if plots:
        lines += ["## Plots", ""] + [f"![{p.stem}]({p.name})" for p in plots] + [""]
    return "\n".join(lines)


def _effects_markdown(study: Study, main: str) -> list[str]:
    rows = effect_rows(study, main)
    if not rows:
        return []
    lines = [
        f"## Main effects on {main}",
        "",
        "Each axis's levels with the other axes and the seeds pooled; the axis's range is its best level's mean "
        "minus its worst's, with Welch's 95% interval (conservative: the other axes' effects count as noise). "
        "The axis with the largest range moves the metric most.",
        "",
        "| axis | level | n | mean | 95% interval | axis range | range's 95% interval | exceeds noise |",
        "|---|---|---|---|---|---|---|---|",
    ]
    shown: set[str] = set()
    for r in rows:
        first = r["axis"] not in shown
        shown.add(r["axis"])
        interval = _bounds(r["ci_low"], r["ci_high"])
        rng = f"{_fmt(r['range'])} ({r['best']} - {r['worst']})" if first else ""
        rng_ci = _bounds(r["range_ci_low"], r["range_ci_high"]) if first else ""
        verdict = ("**yes**" if r["exceeds_noise"] else "no") if first else ""
        lines.append(
            f"| {r['axis']} | {r['level']} | {r['n']} | {_fmt(r['mean'])} | {interval} | {rng} | {rng_ci} | {verdict} |"
        )
    return [*lines, ""]


# -- plots -----------------------------------------------------------------------------------------------------
def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.+-]+", "-", text).strip("-")


def plot_metric(study: Study, metric: str, x: str, group: str | None, path: Path) -> Path:
    """``metric`` (mean and 95% interval over seeds) against the levels of axis ``x``, one line per level of
    ``group``, one panel per combination of the other varying axes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rest = [a for a in study.varying if a not in (x, group)]
    panels = list(itertools.product(*(study.levels(a) for a in rest))) or [()]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4), squeeze=False, sharey=True)
    xs = study.levels(x)
    groups = study.levels(group) if group else [None]
    for ax, panel in zip(axes[0], panels):
        fixed = dict(zip(rest, panel))
        for g in groups:
            means, errs = [], []
            for level in xs:
                want = {x: level, **fixed, **({group: g} if group else {})}
                condition = next(
                    (c for c, labels in study.conditions() if all(labels[k] == v for k, v in want.items())),
                    None,
                )
                s = summarize(study.values(metric, condition)) if condition else summarize([])
                means.append(s.mean)
                errs.append(s.half_width if _finite(s.half_width) else 0.0)
            ax.errorbar(range(len(xs)), means, yerr=errs, marker="o", capsize=3, label=g if g else metric)
        ax.set_xticks(range(len(xs)), xs)
        ax.set_xlabel(x)
        ax.set_title(", ".join(f"{k}={v}" for k, v in fixed.items()) or study.name, fontsize=9)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel(metric)
    axes[0][-1].legend(title=group, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def read_scalars(folder: Path, tag: str) -> dict[int, float]:
    """The scalar ``tag`` of the TensorBoard events in ``folder`` (not its subfolders): step -> last value logged
    there (a resumed arm's files are read in order, so a step logged twice keeps the later value)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out: dict[int, float] = {}
    for events in sorted(folder.glob("events.out.tfevents.*"), key=lambda p: p.stat().st_mtime_ns):
        accumulator = EventAccumulator(str(events), size_guidance={"scalars": 0})
        accumulator.Reload()
        if tag in accumulator.Tags()["scalars"]:
            out.update({e.step: e.value for e in accumulator.Scalars(tag)})
    return out


def curves(study: Study, tag: str) -> dict[str, tuple[list[int], list[float]]]:
    """Per condition, ``tag`` against the step, the mean over its done arms at the steps all of them logged."""
    out = {}
    for condition, _ in study.conditions():
        series = [read_scalars(study.folder / a.name, tag) for a in study.done if a.condition == condition]
        series = [s for s in series if s]
        if not series:
            continue
        steps = sorted(set.intersection(*(set(s) for s in series)))
        out[condition] = (steps, [sum(s[k] for s in series) / len(series) for k in steps])
    return out


def plot_curves(study: Study, tag: str, path: Path) -> Path | None:
    """Training curves of ``tag`` per condition (mean over seeds); None when no arm logged it."""
    found = curves(study, tag)
    if not found:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for condition, (steps, values) in found.items():
        ax.plot(steps, values, label=condition, linewidth=1)
    ax.set_xlabel("step")
    ax.set_ylabel(tag)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6, ncol=1 + len(found) // 12)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_hparams(study: Study, folder: Path, metrics: Sequence[str]) -> int:
    """Each done arm's levels (and seed) with its metrics, for TensorBoard's HParams view; arms written."""
    from torch.utils.tensorboard import SummaryWriter

    written = 0
    for arm in study.done:
        values = {m: arm.metrics[m] for m in metrics if m in arm.metrics}
        if not values:
            continue
        hparams = {**arm.labels, **({SEED_AXIS: arm.seed} if arm.seed is not None else {})}
        with SummaryWriter(log_dir=str(folder / arm.name)) as writer:
            writer.add_hparams(hparams, values, run_name=".")
        written += 1
    return written


def write_report(
    folder: str | Path,
    out: str | Path | None = None,
    metric: str | None = None,
    x: str | None = None,
    group: str | None = None,
    curve_tags: Sequence[str] = ("train/loss",),
) -> Path:
    """Write the report of the study in ``folder`` into ``out`` (default ``folder/report``); its Markdown file.

    Args:
        folder: The study's folder.
        out: Where the report goes.
        metric: The main metric (plotted, differences tested); default the grid's ``report.metric``.
        x: Axis on the plot's x axis; default the grid's ``report.x``, else the first varying axis.
        group: Axis whose levels are the plot's lines; default the grid's ``report.group``, else the second.
        curve_tags: TensorBoard scalars plotted as training curves.
    """
    study = load_study(folder)
    out = Path(out) if out else study.folder / "report"
    out.mkdir(parents=True, exist_ok=True)
    metrics = study.metric_names()
    main = metric or study.main_metric()
    if main is not None and main not in metrics:
        metrics = [main, *metrics]
    write_csv(out / "arms.csv", arm_rows(study))
    write_csv(out / "summary.csv", summary_rows(study, metrics))
    if main is not None:
        write_csv(out / "differences.csv", difference_rows(study, main))
        write_csv(out / "effects.csv", effect_rows(study, main))
    plots: list[Path] = []
    varying = study.varying
    x = x or study.report.get("x") or (varying[0] if varying else None)
    group = group or study.report.get("group") or next((a for a in varying if a != x), None)
    for name, axis in (("x", x), ("group", group)):
        if axis is not None and axis not in varying:
            raise ValueError(
                f"--{name} {axis!r} is not a varying axis of {study.name} ({', '.join(varying)})"
            )
    if main is not None and x is not None and study.done:
        plots.append(plot_metric(study, main, x, group, out / f"{_slug(main)}_by_{x}.png"))
    for tag in curve_tags:
        plot = plot_curves(study, tag, out / f"curves_{_slug(tag)}.png")
        if plot is not None:
            plots.append(plot)
    write_hparams(study, out / "hparams", metrics)
    path = out / "report.md"
    path.write_text(markdown(study, metrics, main, plots))
    return path
