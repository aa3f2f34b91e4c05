"""Individual Select (lit_mllm/ablate/select.py): the rule on hand-written results (the best candidate joins only when
its gain beats the noise, checked against Welch's interval computed here; the selection stops when none does;
a candidate is never tried twice; one seed, lower-is-better, ties, max_rounds), the select block's errors, and
whole studies in a folder with a stand-in for training that writes each arm's metrics.json from the mixture in
its arm.yaml: rounds in order, the report's tables, and a study killed mid-round that resumes without training a
finished arm again and reaches the same decisions as an uninterrupted one; slow: lit-mllm sweep on real arms."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from lit_mllm.ablate.grid import GridError, expand, grid_from_dict
from lit_mllm.ablate.select import (
    Rule,
    folder_values,
    is_select_study,
    run_select,
    select,
    select_spec,
)
from lit_mllm.ablate.study import ARM_CONFIG, DONE, MANIFEST, METRICS, arm_state, mark, mark_done, write_json
from lit_mllm.commands import report as report_command
from lit_mllm.commands import sweep as sweep_command
from tests.ablate_grids import tiny_grid, write_grid

T_975_DF2 = 4.302652729911275  # Student's t, 0.975 quantile, 2 degrees of freedom (printed tables)


def _source(path: str) -> dict:
    return {"class_path": "lit_mllm.data.Conversations", "init_args": {"path": path}}


SELECT = {
    "current": {"base": _source("train.json")},
    "candidates": {"a": _source("a.json"), "b": _source("b.json"), "c": _source("c.json")},
    "metric": "val/accuracy",
}


def _spec(seeds=(0, 1), **select_fields):
    grid = grid_from_dict({"kind": "select", "seeds": list(seeds), "select": {**SELECT, **select_fields}})
    return select_spec(grid)


def _values(table: dict[str, list[float]]):
    return lambda condition: table.get(condition)


# -- the rule on hand-written results ---------------------------------------------------------------------------
def test_the_best_candidate_joins_only_when_its_gain_beats_the_noise():
    spec = _spec()
    # a has the best mean but seeds far apart; b gains less but surely
    noisy = {"r0": [0.30, 0.32], "r1+a": [0.10, 0.90], "r1+b": [0.40, 0.41], "r1+c": [0.29, 0.30]}
    selection = select(spec, _values(noisy))
    (r1,) = selection.rounds
    assert r1.best == "a" and r1.chosen is None
    assert selection.finished and "a, does not beat" in selection.reason
    assert selection.mixture == ("base",) and selection.current == "r0"
    gains = {e.candidate: e.gain for e in r1.entries}
    assert not gains["a"].beats and gains["b"].beats  # the rule tests the best by mean only
    assert gains["a"].mean == pytest.approx(0.19) and gains["a"].low < 0

    sure = {**noisy, "r1+a": [0.49, 0.51]}
    selection = select(spec, _values(sure))
    r1, r2 = selection.rounds
    assert r1.chosen == "a" and not selection.finished and not r2.decided
    # Welch by hand: sd 0.02 / sqrt(2) on both sides, so sd^2 / n = 0.01^2 each, and df = 2
    half = T_975_DF2 * math.sqrt(0.01**2 + 0.01**2)
    gain = next(e.gain for e in r1.entries if e.candidate == "a")
    assert (gain.low, gain.high) == pytest.approx((0.19 - half, 0.19 + half), rel=1e-6)
    assert r2.current == "r1+a" and r2.mixture == ("base", "a") and r2.candidates == ("b", "c")
    assert selection.reason == "round 2 waits for its arms"


def test_rounds_go_on_until_no_candidate_beats_the_noise_and_never_repeat_a_candidate():
    spec = _spec()
    table = {
        "r0": [0.30, 0.31],
        "r1+a": [0.50, 0.51],
        "r1+b": [0.40, 0.41],
        "r1+c": [0.29, 0.30],
        "r2+b": [0.60, 0.61],
        "r2+c": [0.505, 0.515],
        "r3+c": [0.59, 0.63],  # about the same as r2+b
    }
    selection = select(spec, _values(table))
    assert selection.chosen == ["a", "b"] and selection.mixture == ("base", "a", "b")
    assert selection.current == "r2+b" and selection.finished and "c, does not beat" in selection.reason
    assert [r.candidates for r in selection.rounds] == [("a", "b", "c"), ("b", "c"), ("c",)]
    for r in selection.rounds:
        assert not set(r.candidates) & set(r.mixture)
    assert [r.current for r in selection.rounds] == ["r0", "r1+a", "r2+b"]

    selection = select(spec, _values({**table, "r3+c": [0.80, 0.81]}))
    assert selection.chosen == ["a", "b", "c"] and selection.finished
    assert selection.reason == "every candidate joined the mixture" and len(selection.rounds) == 3

    capped = select(_spec(max_rounds=1), _values(table))
    assert capped.chosen == ["a"] and capped.finished and "max_rounds" in capped.reason


def test_one_seed_uses_the_margin_lower_is_better_flips_ties_go_to_the_first_and_nan_ranks_last():
    table = {"r0": [0.30], "r1+a": [0.34], "r1+b": [0.36], "r1+c": [0.36]}
    assert (
        select(_spec(seeds=[0], margin=0.05), _values(table)).rounds[0].chosen == "b"
    )  # gain 0.06; tie b, c
    assert select(_spec(seeds=[0], margin=0.07), _values(table)).rounds[0].chosen is None
    losses = select(_spec(seeds=[0], margin=0.0, lower_is_better=True), _values(table)).rounds[0]
    assert losses.best == "a" and losses.chosen is None  # every candidate raised the loss
    nan = select(_spec(seeds=[0], margin=0.0), _values({**table, "r1+b": [math.nan], "r1+c": [math.nan]}))
    assert nan.rounds[0].chosen == "a"
    assert Rule("m").gain([1.0], [math.nan]).beats is False
    assert Rule("m").gain([1.0, 1.0], [2.0, 2.0]).beats  # no spread at all: any gain beats it


def test_the_select_block_is_checked():
    def error(node: dict) -> str:
        with pytest.raises(GridError) as e:
            select_spec(grid_from_dict(node))
        return str(e.value)

    base = {"kind": "select", "seeds": [0, 1], "select": SELECT}
    assert "give `margin`" in error({**base, "seeds": [0]})
    assert "in the start mixture and among the candidates" in error(
        {**base, "select": {**SELECT, "current": {"a": _source("x.json")}}}
    )
    assert "metric is required" in error(
        {**base, "select": {k: v for k, v in SELECT.items() if k != "metric"}}
    )
    assert "unknown key(s) ['rounds']" in error({**base, "select": {**SELECT, "rounds": 2}})
    assert "source name 'a_b'" in error({**base, "select": {**SELECT, "candidates": {"a_b": _source("x")}}})
    with pytest.raises(GridError, match="takes no axes"):
        grid_from_dict({**base, "axes": {"x": [1, 2]}})
    with pytest.raises(GridError, match="add `kind: select`"):
        grid_from_dict({"select": SELECT})
    with pytest.raises(GridError, match="round by round"):
        expand(grid_from_dict(base))


# -- whole studies with a stand-in for training -----------------------------------------------------------------
GAINS = {"a": 0.10, "b": 0.05, "c": 0.0}
"""What each candidate adds to val/accuracy in the stand-in; seed 0 scores 0.005 lower, seed 1 0.005 higher."""


class Killed(Exception):
    """The stand-in's machine died."""


class StandIn:
    """Training stand-in for ``run_select``: each arm's metrics.json (val/accuracy from the sources in its arm.yaml
    and its seed) and done marker written directly; ``die_after``: raise :class:`Killed` after that many arms,
    leaving the next one marked running by a process that is gone."""

    def __init__(self, folder: Path, die_after: int | None = None) -> None:
        self.folder, self.die_after, self.trained, self.calls = folder, die_after, [], 0

    def __call__(self, names: list[str]) -> dict[str, str]:
        self.calls += 1
        for name in names:
            arm = self.folder / name
            if self.die_after is not None and len(self.trained) == self.die_after:
                mark(arm, "running", pid=2**22 + 4321, attempt=1)  # no such process
                raise Killed(name)
            config = yaml.safe_load((arm / ARM_CONFIG).read_text())
            sources = list(config["data"]["init_args"]["train"])
            score = (
                0.3
                + sum(GAINS.get(s, 0.0) for s in sources)
                + (0.005 if config["seed_everything"] else -0.005)
            )
            write_json(
                arm / METRICS, {"metrics": {"val/accuracy": score, "val/loss": 1 - score}, "completed": True}
            )
            mark_done(arm, returncode=0)
            self.trained.append(name)
        return {n: arm_state(self.folder / n).state for n in names}


def _study(tmp_path: Path, candidates: str = "abc") -> tuple:
    fields = {**SELECT, "candidates": {c: SELECT["candidates"][c] for c in candidates}}
    grid = grid_from_dict(tiny_grid(tmp_path / "data", tmp_path, kind="select", seeds=[0, 1], select=fields))
    return grid, tmp_path / "tiny"


def test_a_select_study_runs_round_after_round_and_reports_each_round(tmp_path):
    grid, folder = _study(tmp_path)
    stand_in = StandIn(folder)
    lines: list[str] = []
    selection = run_select(grid, folder, stand_in, echo=lines.append)
    assert selection.finished and selection.chosen == ["a", "b"]  # c adds nothing: round 3 stops
    assert selection.mixture == ("base", "a", "b") and selection.current == "r2+b"
    seeds = ("_seed=0", "_seed=1")
    expected = [f"{c}{s}" for s in seeds for c in ("r0", "r1+a", "r1+b", "r1+c")]
    expected += [f"{c}{s}" for s in seeds for c in ("r2+b", "r2+c")] + [f"r3+c{s}" for s in seeds]
    assert stand_in.trained == expected  # each arm once, round by round
    train = yaml.safe_load((folder / "r2+c_seed=1" / ARM_CONFIG).read_text())["data"]["init_args"]["train"]
    assert list(train) == ["base", "a", "c"] and train["c"]["init_args"]["path"] == "c.json"
    assert any("round 1: a joins the mixture" in line for line in lines)
    assert any("round 3: the best candidate, c, stays out" in line for line in lines)

    manifest = json.loads((folder / MANIFEST).read_text())
    assert manifest["kind"] == "select" and is_select_study(folder)
    assert [a["name"] for a in manifest["arms"]] == expected
    assert manifest["arms"][1]["labels"] == {"round": "r1", "candidate": "a", "seed": "0"}
    assert folder_values(folder, [0, 1], "val/accuracy")("r1+a") == pytest.approx([0.395, 0.405])

    path = report_command.main([str(folder)])
    text = path.read_text()
    assert "## Round 1: base plus one of a, b, c" in text and "## Round 3: base + a + b plus one of c" in text
    assert "| a | `r1+a` | 2 | 0.4 | " in text and "**yes**" in text and "best, within noise" in text
    rows = (path.parent / "rounds.csv").read_text().splitlines()
    assert len(rows) == 1 + (1 + 3) + (1 + 2) + (
        1 + 1
    )  # header, then per round the current and its candidates
    assert "Selected, in order: a, b." in text
    with pytest.raises(GridError, match="has no 'val/missing'"):
        folder_values(folder, [0, 1], "val/missing")("r0")


def test_a_study_killed_mid_round_resumes_without_rerunning_finished_arms_and_decides_the_same(tmp_path):
    grid, folder = _study(tmp_path, candidates="ab")
    first = StandIn(folder, die_after=7)  # round 1's 6 arms, one arm of round 2, then the machine dies
    with pytest.raises(Killed, match="r2\\+b_seed=1"):
        run_select(grid, folder, first, echo=lambda _: None)
    assert first.trained == [f"{c}_seed={s}" for s in (0, 1) for c in ("r0", "r1+a", "r1+b")] + [
        "r2+b_seed=0"
    ]
    assert arm_state(folder / "r2+b_seed=1").state == "interrupted"
    finished = {n: (folder / n / METRICS).read_bytes() for n in first.trained}

    second = StandIn(folder)
    selection = run_select(grid, folder, second, echo=lambda _: None)
    assert second.trained == ["r2+b_seed=1"]  # the killed arm only
    assert {n: (folder / n / METRICS).read_bytes() for n in first.trained} == finished
    assert all((folder / n / DONE).is_file() for n in first.trained + second.trained)
    # the decisions an uninterrupted study makes, from the stand-in's scores: a (+0.10) then b (+0.05)
    assert selection.chosen == ["a", "b"] and selection.reason == "every candidate joined the mixture"
    r1, r2 = selection.rounds
    assert {e.candidate: e.summary.mean for e in r1.entries} == pytest.approx({"a": 0.40, "b": 0.35})
    assert r1.current_summary.mean == pytest.approx(0.30) and r2.current_summary.mean == pytest.approx(0.40)
    assert [(e.candidate, e.summary.mean) for e in r2.entries] == [("b", pytest.approx(0.45))]
    half = T_975_DF2 * math.sqrt(2 * 0.005**2)  # sd 0.005 * sqrt(2) per side over 2 seeds, df 2
    assert (r2.entries[0].gain.low, r2.entries[0].gain.high) == pytest.approx((0.05 - half, 0.05 + half))


def test_sweep_dry_run_shows_the_rule_and_round_one_and_status_lists_its_arms(tmp_path, capsys):
    grid_file = write_grid(
        tmp_path / "select.yaml",
        tiny_grid(tmp_path / "data", tmp_path, kind="select", seeds=[0, 1], select=SELECT),
    )
    text = sweep_command.main([str(grid_file), "--dry-run"])
    assert "rule: each round, the candidate with the best mean val/accuracy (higher is better)" in text
    assert "Welch's 95% interval" in text and "round 1: base (r0) plus each of a, b, c" in text
    assert "8 arms" in text and "r1+c_seed=1" in text and "r2+" not in text
    assert "data.init_args.train.a.init_args.path: a.json" in text
    view = sweep_command.main([str(grid_file), "--status"])
    assert "8 pending (of 8)" in view


@pytest.mark.slow
def test_lit_mllm_sweep_runs_a_select_study_of_real_arms_and_a_rerun_trains_nothing(shapes_root, tmp_path):
    fields = {
        "current": {"qa": _source("train.json")},
        "candidates": {"captions": _source("captions_train.json"), "more": _source("val.json")},
        "metric": "val/loss",
        "lower_is_better": True,
        "margin": 0.0,
    }
    grid_file = write_grid(
        tmp_path / "select.yaml", tiny_grid(shapes_root, tmp_path, kind="select", select=fields)
    )
    first = _sweep(grid_file)
    assert first.returncode == 0, first.stdout + first.stderr
    folder = tmp_path / "tiny"
    loss = {
        n: json.loads((folder / n / METRICS).read_text())["metrics"]["val/loss"]
        for n in ("r0", "r1+captions", "r1+more")
    }
    best = min(("captions", "more"), key=lambda c: loss[f"r1+{c}"])  # the rule by hand: one seed, margin 0
    if loss["r0"] - loss[f"r1+{best}"] > 0:
        other = ({"captions", "more"} - {best}).pop()
        assert f"round 1: {best} joins the mixture" in first.stdout
        assert arm_state(folder / f"r2+{other}").state == "done"
    else:
        assert f"round 1: the best candidate, {best}, stays out" in first.stdout
        assert not (folder / "r2+captions").exists() and not (folder / "r2+more").exists()
    second = _sweep(grid_file)
    assert second.returncode == 0 and "started" not in second.stdout, second.stdout
    report = report_command.main([str(folder)]).read_text()
    assert "## Round 1: qa plus one of captions, more" in report


def _sweep(grid_file: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "lit_mllm", "sweep", str(grid_file)],
        cwd=Path(__file__).resolve().parents[1],
        capture_output=True,
        text=True,
        timeout=900,
    )
