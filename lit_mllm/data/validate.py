"""What ``lit-mllm validate-data --config FILE`` (:mod:`lit_mllm.commands.validate_data`) does: process every
record of every source of a data config (parse, decode images, tokenize, expand image tokens, check length and
supervision) and report samples per source and problems per reason, naming the records; say whether the
config's bad-sample policy would stop a run (``fail`` and any bad training sample, or ``skip`` above
``max_bad_fraction``).
"""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass, field

from tqdm import tqdm

from lit_mllm.data.datamodule import MixtureData, _Loader
from lit_mllm.data.sample import REASONS

SHOWN_PER_REASON = 5


@dataclass
class Report:
    samples: Counter = field(default_factory=Counter)  # (split, source) -> records
    problems: Counter = field(default_factory=Counter)  # (split, source, reason) -> count
    examples: dict = field(default_factory=lambda: defaultdict(list))  # reason -> messages

    def bad(self, split: str) -> int:
        return sum(n for (s, _, _), n in self.problems.items() if s == split)

    def total(self, split: str) -> int:
        return sum(n for (s, _), n in self.samples.items() if s == split)


def scan(dm: MixtureData, splits: tuple[str, ...] = ("fit", "validate", "test")) -> Report:
    """Process every record of the given splits under the skip policy and count what fails, by reason."""
    report = Report()
    for split in splits:
        sources = dm.sources(split)
        loader = _Loader(sources, dm.processor, "skip", split)
        for name, source in sources.items():
            for i in tqdm(range(len(source)), desc=f"{split}/{name}", leave=False):
                item = loader.item(name, i)
                report.samples[(split, name)] += 1
                if "skipped" in item:
                    report.problems[(split, name, item["skipped"])] += 1
                    report.examples[item["skipped"]].append(item["message"])
    return report


def render(report: Report) -> str:
    used = [r for r in REASONS if any(k[2] == r for k in report.problems)]
    header = ["split", "source", "samples", "ok", *used]
    rows = [
        [split, name, str(n), str(n - sum(report.problems[(split, name, r)] for r in REASONS))]
        + [str(report.problems[(split, name, r)]) for r in used]
        for (split, name), n in report.samples.items()
    ]
    widths = [max(len(x) for x in col) for col in zip(header, *rows)]
    lines = ["  ".join(x.ljust(w) for x, w in zip(row, widths)) for row in [header, *rows]]
    for reason in used:
        shown = report.examples[reason][:SHOWN_PER_REASON]
        lines.append(f"\n{reason} ({len(report.examples[reason])}):")
        lines += [f"  {m}" for m in shown]
        if len(report.examples[reason]) > len(shown):
            lines.append(f"  ... and {len(report.examples[reason]) - len(shown)} more")
    return "\n".join(lines)


def would_stop(dm: MixtureData, report: Report) -> str | None:
    """Why a run with this data config would stop on bad samples, or None."""
    bad, total = report.bad("fit"), report.total("fit")
    if dm.on_bad_sample == "fail":
        bad_any = sum(report.problems.values())
        return f"{bad_any} bad sample(s) and data.on_bad_sample is 'fail'" if bad_any else None
    if total and bad > dm.max_bad_fraction * total:
        return f"{bad} of {total} training samples are bad, over data.max_bad_fraction={dm.max_bad_fraction}"
    return None
