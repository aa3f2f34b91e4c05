"""``lit-mllm sweep FILE``: run a grid file's arms (see :mod:`lit_mllm.ablate.grid` for the file,
:mod:`lit_mllm.ablate.runner` for how arms run and resume).

    lit-mllm sweep ablations/mm1_connector-toy.yaml --dry-run     # every arm checked; how the arms differ
    lit-mllm sweep ablations/mm1_connector-toy.yaml               # one after another, here
    lit-mllm sweep ablations/mm1_connector.yaml --parallel 8      # eight at once, one per GPU
    lit-mllm sweep ablations/mm1_connector.yaml --executor slurm  # a SLURM job array (the grid's `slurm:`)
    lit-mllm sweep ablations/mm1_connector-toy.yaml --status      # which arms are done, running, failed

Every arm is checked (parsed by ``lit-mllm fit``'s parser) before the first one starts. Running the command again
skips finished arms and resumes interrupted ones from their last checkpoint. The exit status is 0 when every arm
is done (or queued, on SLURM), 1 when some failed or are left.

A grid file with ``kind: select`` is an Individual Select study (:mod:`lit_mllm.ablate.select`): it runs round
after round until the selection stops; ``--dry-run`` shows the rule, the decisions so far and the next round.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import yaml

from lit_mllm.ablate.grid import Grid, GridError, expand, load_grid
from lit_mllm.ablate.resolve import describe_plans, resolve_arms
from lit_mllm.ablate.runner import LocalRunner, prepare, submit_slurm
from lit_mllm.ablate.select import dry_run, known_arms, run_select
from lit_mllm.ablate.study import MANIFEST, arm_state, progress, read_json


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="lit-mllm sweep", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("grid", help="a grid file (ablations/*.yaml)")
    p.add_argument(
        "--dry-run", action="store_true", help="check every arm and list how they differ; run nothing"
    )
    p.add_argument(
        "--status", action="store_true", help="the progress view: each arm done/running/failed/..."
    )
    p.add_argument("--parallel", type=int, default=1, help="arms at once (local; at most one per GPU)")
    p.add_argument("--gpus", default=None, help="comma-separated GPU ids to spread arms over (default: all)")
    p.add_argument("--executor", choices=("local", "slurm"), default="local", help="where arms run")
    p.add_argument("--wait", action="store_true", help="slurm: wait for the jobs and show the progress view")
    p.add_argument(
        "--out", default=None, help="folder the study's folder goes in (default: the grid's `out`)"
    )
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="set a dotted key in every arm, last (VALUE is YAML), e.g. --set trainer.fast_dev_run=true",
    )
    return p


def parse_sets(items: list[str]) -> dict[str, Any]:
    """``KEY=VALUE`` items as dotted keys to YAML values."""
    out = {}
    for item in items:
        key, equals, value = item.partition("=")
        if not equals or not key:
            raise GridError(f"--set takes KEY=VALUE (a dotted key), got {item!r}")
        out[key] = yaml.safe_load(value)
    return out


def study_folder(grid: Grid, out: str | None) -> Path:
    return (Path(out) if out else Path(grid.out)) / grid.study


def main(args: list[str]) -> dict[str, str] | str:
    """Run the command; the arms' states (the dry run's listing for ``--dry-run``, the view for ``--status``)."""
    opts = parser().parse_args(args)
    grid = load_grid(opts.grid)
    folder = study_folder(grid, opts.out)
    overrides = parse_sets(opts.set)
    if opts.status:
        manifest = read_json(folder / MANIFEST)
        if manifest:
            names = [a["name"] for a in manifest["arms"]]
        else:
            names = (
                known_arms(grid, folder)
                if grid.kind == "select"
                else [a.name for a in expand(grid, overrides)]
            )
        view = progress(folder, names)
        print(view)
        return view
    if grid.kind == "select":
        return _select(grid, folder, overrides, opts)
    plans = resolve_arms(grid, overrides)
    if opts.dry_run:
        listing = describe_plans(plans)
        done = [p.name for p in plans if arm_state(folder / p.name).state == "done"]
        listing += f"\nstudy folder: {folder}" + (f" ({len(done)} arms already done)" if done else "")
        print(listing)
        return listing
    names = prepare(grid, plans, folder)
    if opts.executor == "slurm":
        try:
            jobs = submit_slurm(folder, names, dict(grid.slurm), cluster="slurm", name=grid.study)
        except RuntimeError as e:  # submitit: no sbatch here
            raise GridError(f"cannot submit to SLURM from this machine: {e}") from e
        print(f"sweep: submitted {len(jobs)} arms as a job array" + (f" ({jobs[0].job_id})" if jobs else ""))
        if opts.wait:
            for job in jobs:
                job.wait()
        view = progress(folder, names)
        print(view)
        return {n: arm_state(folder / n).state for n in names}
    gpus = opts.gpus.split(",") if opts.gpus else None
    results = LocalRunner(folder, opts.parallel, gpus).run(names)
    print(progress(folder, names))
    if any(state != "done" for state in results.values()):
        raise SystemExit(1)
    return results


def _select(
    grid: Grid, folder: Path, overrides: dict[str, Any], opts: argparse.Namespace
) -> dict[str, str] | str:
    """A select study: the dry run's text, or the rounds run (one job array per round on SLURM)."""
    if opts.dry_run:
        text = dry_run(grid, folder, overrides)
        print(text)
        return text
    if opts.executor == "slurm":

        def run_round(names: list[str]) -> dict[str, str]:
            try:
                jobs = submit_slurm(folder, names, dict(grid.slurm), cluster="slurm", name=grid.study)
            except RuntimeError as e:  # submitit: no sbatch here
                raise GridError(f"cannot submit to SLURM from this machine: {e}") from e
            print(
                f"sweep: submitted {len(jobs)} arms as a job array" + (f" ({jobs[0].job_id})" if jobs else "")
            )
            if opts.wait:
                for job in jobs:
                    job.wait()
            return {n: arm_state(folder / n).state for n in names}

    else:
        gpus = opts.gpus.split(",") if opts.gpus else None
        run_round = LocalRunner(folder, opts.parallel, gpus).run
    selection = run_select(grid, folder, run_round, overrides)
    names = [a["name"] for a in (read_json(folder / MANIFEST) or {}).get("arms", [])]
    print(progress(folder, names))
    states = {n: arm_state(folder / n).state for n in names}
    if not selection.finished and not (opts.executor == "slurm" and not opts.wait):
        raise SystemExit(1)
    return states
