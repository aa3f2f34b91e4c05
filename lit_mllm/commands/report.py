"""``lit-mllm report STUDY_DIR``: a study's tables (mean and t-based 95% interval over seeds per condition, and
which differences exceed their noise) as Markdown and CSV, its plots, and TensorBoard HParams (see
:mod:`lit_mllm.ablate.report`).

    lit-mllm report runs/ablations/mm1_connector-toy
    lit-mllm report runs/ablations/mm1_connector-toy --metric val/loss --x resolution --group connector

A select study (``kind: select``) gets a table per round instead (:func:`lit_mllm.ablate.select.write_select_report`:
each candidate's mean, interval and gain over the current mixture, and which one joined); ``--metric``, ``--x``
and ``--group`` do not apply to it (its rule names the metric).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from lit_mllm.ablate.report import write_report
from lit_mllm.ablate.select import is_select_study, write_select_report


def main(args: list[str]) -> Path:
    """Write the report; the path of its Markdown file."""
    p = argparse.ArgumentParser(
        prog="lit-mllm report", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("study", help="the study's folder (the sweep's out/<study>)")
    p.add_argument("--out", default=None, help="where the report goes (default STUDY_DIR/report)")
    p.add_argument("--metric", default=None, help="the main metric (default the grid's report.metric)")
    p.add_argument("--x", default=None, help="axis on the plot's x axis")
    p.add_argument("--group", default=None, help="axis whose levels are the plot's lines")
    p.add_argument(
        "--curves", nargs="*", default=["train/loss"], help="TensorBoard scalars plotted per condition"
    )
    opts = p.parse_args(args)
    if is_select_study(opts.study):
        path = write_select_report(opts.study, opts.out, opts.curves)
    else:
        path = write_report(opts.study, opts.out, opts.metric, opts.x, opts.group, opts.curves)
    print(f"report: {path} (tables, plots, CSV beside it); `tensorboard --logdir {opts.study}` for HParams")
    return path
