"""``lit-mllm validate-data --config FILE``: process every record of every source of the config's data and
report samples per source and problems per reason, and the sources that cannot be opened
(:mod:`lit_mllm.data.validate`); exit 1 when a run would stop (a source it cannot open, or the config's bad-sample
policy on the first epoch's plan).
"""

from __future__ import annotations

from lit_mllm.commands.lightning import build_cli
from lit_mllm.data.datamodule import MixtureData
from lit_mllm.data.validate import Report, render, scan, would_stop


def main(args: list[str]) -> Report:
    """Build the config's model (for its processor) and DataModule, scan, print; exit 1 if a run would stop."""
    dm = build_cli(args, run=False).datamodule
    if not isinstance(dm, MixtureData):
        raise SystemExit(
            f"validate-data needs a lit_mllm.data.MixtureData DataModule, got {type(dm).__name__}"
        )
    dm.prepare_data()
    report = scan(dm)
    print(render(report))
    reason = would_stop(dm, report)
    if reason:
        print(f"\nA run would stop: {reason}.")
        raise SystemExit(1)
    print("\nNo problem would stop a run.")
    return report
