"""What ``lit-mllm validate-data --config FILE`` (:mod:`lit_mllm.commands.validate_data`) does: process every
record of every source of a data config (parse, decode images, tokenize, expand image tokens, check length and
supervision) and report samples per source and problems per reason, naming the records, and the sources that
cannot be opened (naming split and source); say whether the config's bad-sample policy would stop a run (``fail``
and any bad sample or unopenable source; ``skip``: an unopenable source, or the run's own rule,
:func:`~lit_mllm.data.datamodule.over_budget`, applied batch by batch to the first epoch's plan on one device).
"""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass, field

from tqdm import tqdm

from lit_mllm.data.datamodule import SPLIT_KEYS, MixtureData, SampleLoader, over_budget
from lit_mllm.data.sample import REASONS

SHOWN_PER_REASON = 5


@dataclass
class FirstEpoch:
    """The first epoch's training plan played against the scanned records, as a one-device run would meet it."""

    seen: int
    """Samples drawn up to the end of the epoch, or up to the batch where the run would stop."""
    skipped: Counter
    """Bad samples among them, per reason."""
    batches: int
    """Batches of the epoch."""
    stop_batch: int | None = None
    """The batch (0-based) after which the run would stop; None: it would not."""


@dataclass
class Report:
    samples: Counter = field(default_factory=Counter)  # (split, source) -> records
    problems: Counter = field(default_factory=Counter)  # (split, source, reason) -> count
    examples: dict = field(default_factory=lambda: defaultdict(list))  # reason -> messages
    unopened: dict = field(default_factory=dict)  # (split, source) -> the DataError saying why
    bad_records: dict = field(default_factory=dict)  # (split, source, index) -> reason
    first_epoch: FirstEpoch | None = None
    plan_error: str | None = None
    """Why no training plan can be drawn (no source with records and a positive weight)."""

    def bad(self, split: str) -> int:
        return sum(n for (s, _, _), n in self.problems.items() if s == split)

    def total(self, split: str) -> int:
        return sum(n for (s, _), n in self.samples.items() if s == split)


def scan(dm: MixtureData, splits: tuple[str, ...] = ("fit", "validate", "test")) -> Report:
    """Process every record of the given splits under the skip policy and count what fails, by reason; a source
    that cannot be opened is recorded and the others are scanned. With ``fit``, play the first epoch's plan."""
    report = Report()
    for split in splits:
        sources, failed = dm.open_sources(split)
        report.unopened.update({(split, name): e for name, e in failed.items()})
        loader = SampleLoader(sources, dm.processor, "skip", split)
        for name, source in sources.items():
            for i in tqdm(range(len(source)), desc=f"{split}/{name}", leave=False):
                item = loader.item(name, i)
                report.samples[(split, name)] += 1
                if "skipped" in item:
                    report.problems[(split, name, item["skipped"])] += 1
                    report.examples[item["skipped"]].append(item["message"])
                    report.bad_records[(split, name, i)] = item["skipped"]
    if "fit" in splits and dm.splits["fit"] and not any(s == "fit" for s, _ in report.unopened):
        try:
            report.first_epoch = first_epoch(dm, report)
        except ValueError as e:
            report.plan_error = str(e)
    return report


def first_epoch(dm: MixtureData, report: Report) -> FirstEpoch:
    """Draw epoch 0 of the training plan (one device) batch by batch, counting the scanned bad records it meets,
    and stop where the run's rule would."""
    plan = dm.mixture().batches(0)
    seen, skipped = 0, Counter()
    for k, batch in enumerate(plan):
        seen += len(batch)
        skipped.update(
            reason for name, i in batch if (reason := report.bad_records.get(("fit", name, i))) is not None
        )
        if over_budget(seen, sum(skipped.values()), dm.max_bad_fraction, epoch_end=k + 1 == len(plan)):
            return FirstEpoch(seen, skipped, len(plan), stop_batch=k)
    return FirstEpoch(seen, skipped, len(plan))


def render(report: Report) -> str:
    used = [r for r in REASONS if any(k[2] == r for k in report.problems)]
    header = ["split", "source", "samples", "ok", *used]
    rows = [
        [split, name, str(n), str(n - sum(report.problems[(split, name, r)] for r in REASONS))]
        + [str(report.problems[(split, name, r)]) for r in used]
        for (split, name), n in report.samples.items()
    ]
    if report.unopened:
        header.append("problem")
        rows = [row + [""] for row in rows]
        rows += [
            [split, name, "-", "-", *["-"] * len(used), f"cannot be opened ({e.reason})"]
            for (split, name), e in report.unopened.items()
        ]
    widths = [max(len(x) for x in col) for col in zip(header, *rows)]
    lines = ["  ".join(x.ljust(w) for x, w in zip(row, widths)).rstrip() for row in [header, *rows]]
    if report.unopened:
        lines.append(f"\nsources that cannot be opened ({len(report.unopened)}):")
        lines += [f"  {split}/{name}: {e}" for (split, name), e in report.unopened.items()]
    for reason in used:
        shown = report.examples[reason][:SHOWN_PER_REASON]
        lines.append(f"\n{reason} ({len(report.examples[reason])}):")
        lines += [f"  {m}" for m in shown]
        if len(report.examples[reason]) > len(shown):
            lines.append(f"  ... and {len(report.examples[reason]) - len(shown)} more")
    return "\n".join(lines)


def would_stop(dm: MixtureData, report: Report) -> str | None:
    """Why a run with this data config would stop on bad samples, or None."""
    if report.unopened:
        names = ", ".join(f"data.{SPLIT_KEYS[s]}.{n}" for s, n in report.unopened)
        return f"{len(report.unopened)} source(s) cannot be opened ({names})"
    if report.plan_error:
        return f"no training plan: {report.plan_error}"
    if dm.on_bad_sample == "fail":
        bad_any = sum(report.problems.values())
        return f"{bad_any} bad sample(s) and data.on_bad_sample is 'fail'" if bad_any else None
    epoch = report.first_epoch
    if epoch is None or epoch.stop_batch is None:
        return None
    bad = sum(epoch.skipped.values())
    inline = ", ".join(f"{r}: {n}" for r, n in epoch.skipped.most_common())
    when = "at the end of epoch 0" if epoch.stop_batch + 1 == epoch.batches else f"after {epoch.seen} samples"
    return (
        f"{bad} of {epoch.seen} training samples are bad ({inline}), over data.max_bad_fraction="
        f"{dm.max_bad_fraction} ({when}, as one device draws them)"
    )
