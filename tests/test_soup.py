"""``lit-mllm soup``: the average of identical checkpoints is the checkpoint; greedy never returns a soup scoring
below its best member; incompatible checkpoints are refused naming the difference; the soup written is what
``lit-mllm evaluate --ckpt_path`` scores as the soup's recorded score."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lit_mllm.cli import run
from lit_mllm.commands.lightning import build_cli
from lit_mllm.training.checkpoints import atomic_save, read_weights
from lit_mllm.training.soups import Ingredient, SoupMismatch, average, check_compatible, cook
from tests.conftest import cli_args
from tests.test_score_data import QUICKSTART, SMALLER


def state(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "a.weight": torch.randn(3, 4, generator=g),
        "b.weight": torch.randn(5, generator=g).to(torch.bfloat16),
        "steps": torch.tensor([7, 1]),
    }


def test_average_of_identical_checkpoints_is_the_checkpoint():
    one = state(0)
    for n in (1, 2, 3, 7):
        soup = average([one] * n)
        for k, v in one.items():
            assert soup[k].dtype == v.dtype and torch.equal(soup[k], v), k
    two = average([state(0), state(1)])
    assert torch.allclose(two["a.weight"], (state(0)["a.weight"] + state(1)["a.weight"]) / 2)


def ingredients(n: int, seed: int) -> list[Ingredient]:
    return [Ingredient(Path(f"m{k}.ckpt"), state(seed * 100 + k), "finetune") for k in range(n)]


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 6), st.integers(0, 10_000), st.sampled_from([True, False]))
def test_greedy_never_scores_below_its_best_member(n, seed, higher):
    target = state(seed + 1)["a.weight"]

    def score(s):  # a bumpy landscape: averaging helps some mixtures and hurts others
        d = s["a.weight"] - target
        value = float(-(d**2).sum() + 3 * torch.sin(4 * s["a.weight"]).sum())
        return value if higher else -value

    pieces = ingredients(n, seed)
    members = [score(p.state) for p in pieces]
    best = max(members) if higher else min(members)
    soup = cook(pieces, "greedy", score, higher_is_better=higher)
    assert (soup.score >= best) if higher else (soup.score <= best)
    assert soup.score == score(soup.state)  # the score recorded is the soup's
    assert soup.members[0] == pieces[members.index(best)].path
    kept = [s for s in soup.steps if s["accepted"]]
    assert len(soup.members) == 1 + len(kept) and len(soup.steps) == n - 1
    for earlier, later in zip(kept, kept[1:]):  # every accepted step improved on the soup before it
        assert (later["score"] > earlier["score"]) if higher else (later["score"] < earlier["score"])

    top = cook(pieces, "max", score, higher_is_better=higher)
    assert top.score == best and top.members == [pieces[members.index(best)].path]
    uniform = cook(pieces, "uniform", score, higher_is_better=higher)
    assert len(uniform.members) == n and uniform.score == score(average([p.state for p in pieces]))


def test_incompatible_checkpoints_are_refused_naming_the_difference():
    base = Ingredient(Path("a.ckpt"), state(0), "finetune")
    cases = [
        (Ingredient(Path("b.ckpt"), state(1), "align"), r"different stages \('finetune' vs 'align'\)"),
        (
            Ingredient(Path("b.ckpt"), {k: v for k, v in state(1).items() if k != "b.weight"}, "finetune"),
            r"'b.weight' is only in a.ckpt",
        ),
        (
            Ingredient(Path("b.ckpt"), {**state(1), "c.bias": torch.zeros(2)}, "finetune"),
            "'c.bias' is only in b",
        ),
        (
            Ingredient(Path("b.ckpt"), {**state(1), "a.weight": torch.zeros(4, 3)}, "finetune"),
            r"shape of 'a.weight'",
        ),
        (
            Ingredient(Path("b.ckpt"), {**state(1), "a.weight": torch.zeros(3, 4).double()}, "finetune"),
            "dtype",
        ),
    ]
    for other, message in cases:
        with pytest.raises(SoupMismatch, match=message):
            check_compatible([base, base, other])
    with pytest.raises(SoupMismatch, match="integer tensor 'steps'"):
        average([state(0), {**state(0), "steps": torch.tensor([7, 2])}])


def test_soup_command_writes_a_checkpoint_evaluate_scores_the_same(tmp_path, shapes_root, capsys):
    args = ["--config", QUICKSTART, *SMALLER, *cli_args(shapes_root, tmp_path, batch_size=8)]
    model = build_cli(args, run=False).model
    torch.manual_seed(0)
    paths = []
    for k, scale in enumerate((0.0, 0.05, 0.3)):  # one as built, two moved off it by noise
        moved = {
            n: v + scale * torch.randn_like(v) if v.is_floating_point() else v
            for n, v in model.state_dict().items()
        }
        atomic_save({"state_dict": moved, "lit_mllm": {"stage": model.stage.name}}, tmp_path / f"m{k}.ckpt")
        paths.append(str(tmp_path / f"m{k}.ckpt"))
    out = tmp_path / "soup"
    ckpts = [a for p in paths for a in ("--ckpt", p)]
    record = run(
        [
            "soup",
            *args,
            *ckpts,
            "--method",
            "greedy",
            "--metric",
            "val/loss",
            "--mode",
            "min",
            "--out",
            str(out),
        ]
    )
    assert record == json.loads((out / "soup.json").read_text())
    assert record["score"] <= min(i["score"] for i in record["ingredients"])
    assert len(record["steps"]) == 2 and record["members"][0] == record["ingredients"][0]["path"]
    state, stage = read_weights(out / "soup.ckpt")
    assert stage == model.stage.name and set(state) == set(model.state_dict())

    report = run(
        ["evaluate", *args, "--ckpt_path", str(out / "soup.ckpt"), "--report", str(tmp_path / "e.json")]
    )
    assert report["metrics"]["val/loss"] == pytest.approx(record["score"], abs=1e-6)
    assert json.loads((out / "eval_val.json").read_text())["metrics"]["val/loss"] == pytest.approx(
        record["score"]
    )

    wrong = torch.load(paths[1], weights_only=True)
    wrong["lit_mllm"]["stage"] = "align"
    atomic_save(wrong, tmp_path / "align.ckpt")
    with pytest.raises(SoupMismatch, match="different stages"):
        run(["soup", *args, "--ckpt", paths[0], "--ckpt", str(tmp_path / "align.ckpt"), "--out", str(out)])
