"""``lit-mllm soup --config FILE --ckpt A --ckpt B ... --method uniform|max|greedy --metric val/accuracy --out
DIR``: merge checkpoints of one model (:mod:`lit_mllm.training.soups`), choosing by a metric of the selection split
scored as ``lit-mllm evaluate`` scores it (the config's model and data, the checkpoint loaded, the trainer's
validation or test loop, the config's metrics).

Writes ``DIR/soup.ckpt`` (for ``lit-mllm evaluate --ckpt_path``, ``export``, ``init_from``), ``DIR/soup.json``
(the method, metric, each checkpoint's score and sha256, each soup tried and whether it was kept, the soup's
members and score) and ``DIR/eval_<split>.json``, the evaluation report of the soup.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from lit_mllm.commands.evaluate import SPLITS, first_prompts
from lit_mllm.commands.lightning import build_cli
from lit_mllm.eval.report import build_report, file_digest, write_report
from lit_mllm.training.checkpoints import WeightsMismatch, load_weights
from lit_mllm.training.soups import METHODS, Ingredient, State, check_compatible, cook, save_soup


def parser() -> argparse.ArgumentParser:
    """The command's own options; every other argument is a `lit-mllm fit` option building the model and data."""
    p = argparse.ArgumentParser(
        prog="lit-mllm soup",
        allow_abbrev=False,
        description=(
            "Average checkpoints of one model and stage (--config FILE and any --model/--data/--trainer option as "
            "in `lit-mllm fit`): uniform (all of them), max (the best one) or greedy (best first, each next one "
            "joins only if the soup's --metric on --split improves). Writes soup.ckpt, soup.json and the soup's "
            "evaluation report."
        ),
    )
    p.add_argument("--ckpt", action="append", required=True, help="A checkpoint to merge (repeat for each)")
    p.add_argument("--method", choices=METHODS, default="greedy", help="How to merge (default: greedy)")
    p.add_argument(
        "--metric", default="val/accuracy", help="Selection metric as logged (default val/accuracy)"
    )
    p.add_argument(
        "--mode", choices=("max", "min"), default="max", help="Whether higher (max) or lower (min) is better"
    )
    p.add_argument("--split", choices=SPLITS, default="val", help="Selection split (default: val)")
    p.add_argument("--out", required=True, help="Folder for soup.ckpt, soup.json and the evaluation report")
    return p


class Scorer:
    """A state's metrics on a split: loaded into the config's model (the frozen parts as the config builds them),
    then the trainer's validation (or test) loop; what ``lit-mllm evaluate`` does with a checkpoint file."""

    def __init__(self, cli, split: str, metric: str) -> None:
        self.model, self.datamodule, self.trainer = cli.model, cli.datamodule, cli.trainer
        self.split, self.metric = split, metric
        self.last: dict[str, float] = {}

    def metrics(self, state: State) -> dict[str, float]:
        missing = self.model.load_state_dict(state, strict=False).unexpected_keys
        if missing:  # load_weights checked every checkpoint against the model; a soup holds the same names
            raise WeightsMismatch(f"the soup holds tensors the model lacks, e.g. {missing[:3]}")
        run = self.trainer.validate if self.split == "val" else self.trainer.test
        results = run(self.model, datamodule=self.datamodule, verbose=False)
        self.last = {k: float(v) for result in results for k, v in result.items()}
        return self.last

    def __call__(self, state: State) -> float:
        metrics = self.metrics(state)
        if self.metric not in metrics:
            raise ValueError(
                f"--metric {self.metric!r} is not among the metrics the {self.split} split logs: "
                f"{sorted(metrics)}"
            )
        value = metrics[self.metric]
        print(f"  {self.metric} = {value:.4f}")
        return value


def main(args: list[str]) -> dict:
    """Read and check the checkpoints, cook the soup, write it with its record and report; return the record."""
    known, rest = parser().parse_known_args(args)
    cli = build_cli(rest, run=False)
    ingredients = [Ingredient.read(path) for path in known.ckpt]
    check_compatible(ingredients)
    for ingredient in ingredients:  # each must fit the config's model (names and shapes), as evaluate checks
        load_weights(cli.model, ingredient.path)
    scorer = Scorer(cli, known.split, known.metric)
    soup = cook(ingredients, known.method, scorer, higher_is_better=known.mode == "max")
    out = Path(known.out)
    path = save_soup(soup, ingredients[0].stage, out / "soup.ckpt")
    metrics = scorer.metrics(soup.state)  # the soup's every metric, for its report
    if not math.isclose(metrics[known.metric], soup.score, rel_tol=1e-6, abs_tol=1e-9):
        print(
            f"note: the soup scored {metrics[known.metric]} on re-evaluation but {soup.score} when chosen: the "
            f"{known.split} loop is not deterministic on this device; the report holds the re-evaluation"
        )
    report = build_report(
        metrics=metrics,
        split=known.split,
        data_split=SPLITS[known.split],
        model=cli.model,
        datamodule=cli.datamodule,
        checkpoint=str(path),
        prompts=first_prompts(cli.model, cli.datamodule, SPLITS[known.split], 3),
    )
    write_report(report, out / f"eval_{known.split}.json")
    record = {
        "method": known.method,
        "metric": known.metric,
        "mode": known.mode,
        "split": known.split,
        "checkpoint": str(path),
        "stage": ingredients[0].stage,
        "score": soup.score,
        "members": [str(p) for p in soup.members],
        "ingredients": [
            {"path": p, "sha256": file_digest(Path(p)), "score": s, "in_soup": p in map(str, soup.members)}
            for p, s in soup.member_scores.items()
        ],
        "steps": soup.steps,
    }
    (out / "soup.json").write_text(json.dumps(record, indent=1) + "\n")
    print(
        f"{known.method} soup of {len(soup.members)} of {len(ingredients)} checkpoints: {known.metric} {soup.score:.4f}"
    )
    for p, s in soup.member_scores.items():
        print(f"  member {p}: {s:.4f}")
    print(f"wrote {path} and {out / 'soup.json'}")
    return record
