"""POINTS at toy scale (arXiv 2409.04828): does perplexity filtering beat training on everything, and does a soup of
two skill-specific fine-tunes beat each of them? On ShapesWorld with noisy captions and skill sets, through the
``lit-mllm`` commands (fit, score-data, soup, evaluate) on the toy grids' model (the quickstart's at 32 px with
2 tower and 2 LLM layers, batch 16). Results and what they say: docs/points.md, "The toy demonstration".

1. Filter. A scorer is trained on the noisy training captions (``noisy_captions`` unrelated to their image,
   ``rare_token_captions`` with junk tokens); ``score-data --keep`` keeps the lowest-perplexity share. Two caption
   pretrainings of the same number of steps, on all captions and on the kept ones, are compared by their loss on
   the clean validation captions; the filter's recall of the noise is read from ``noise_train.json``.
2. Soup. A base model trained on the mixed instruction data is fine-tuned twice from its checkpoint, on the
   colour-only and on the count-only set; both and their uniform / greedy soups are scored on the two skills'
   validation sets (``val/accuracy`` over both, and per skill).

    python benchmarks/points_toy.py            # seeds 0 and 1; 5 min on the idle 2-core CPU (24 min shared)
    python benchmarks/points_toy.py --quick    # the pipeline end to end, minutes; its numbers mean nothing

Prints a table per experiment and ends with ``points_filter_gain: <value>`` (unfiltered minus filtered clean
validation loss, mean over seeds; > 0 means the filter helped).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import yaml

from lit_mllm.cli import run
from lit_mllm.data import ShapesWorld

QUICKSTART = Path(__file__).resolve().parents[1] / "configs" / "quickstart.yaml"


def options() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="Tiny sizes: checks the pipeline, measures nothing")
    p.add_argument("--out", default="runs/points_toy", help="Working folder (data, runs, reports)")
    p.add_argument(
        "--seeds", type=int, nargs="+", default=None, help="Seeds of the compared runs (default 0 1)"
    )
    p.add_argument("--keep", type=float, default=0.5, help="Share of the captions the filter keeps")
    return p.parse_args()


def sizes(quick: bool) -> dict:
    if quick:
        return dict(
            images=96, val=32, scorer_steps=6, pretrain_steps=6, base_steps=6, tune_steps=4, seeds=[0]
        )
    # At the toy model's size a base of 250 steps (batch 16) still answers colour and count at the blind baseline;
    # at 300 of 600 steps it counts well above it (0.42 against 0.24) and colour starts to rise (0.22 against 0.18),
    # so the base gets 600 steps. ~2,800 steps in all.
    return dict(
        images=2000,
        val=200,
        scorer_steps=200,
        pretrain_steps=200,
        base_steps=600,
        tune_steps=150,
        seeds=[0, 1],
    )


def config(out: Path, name: str, body: dict) -> str:
    """A config file stacked on the quickstart's (a YAML diff: what this run changes)."""
    path = out / "configs" / f"{name}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(body, sort_keys=False))
    return str(path)


def conversations(path: str, image_folder: str | None = None) -> dict:
    args = {"path": path} | ({"image_folder": image_folder} if image_folder else {})
    return {"class_path": "lit_mllm.data.Conversations", "init_args": args}


TOY = {  # the toy grids' model (ablations/mm1_*-toy.yaml) and only the callback the tables read
    "trainer": {
        "enable_progress_bar": False,
        "num_sanity_val_steps": 0,
        "callbacks": [{"class_path": "lit_mllm.eval.AnswerBaselines"}],
    },
    "model": {
        "init_args": {
            "vision_tower": {"init_args": {"image_size": 32, "num_layers": 2}},  # 16 image tokens
            "language_model": {"init_args": {"num_layers": 2}},
        }
    },
    "data": {"init_args": {"batch_size": 16, "eval_batch_size": 64}},
}


def common(cfg: str, out: Path, root: Path, name: str, seed: int, steps: int = 1) -> list[str]:
    """The quickstart, the toy sizes, the run's diff ``cfg``, and where data and runs go."""
    return [
        "--config", str(QUICKSTART), "--config", config(out, "toy", TOY), "--config", cfg,
        "--seed_everything", str(seed),
        "--data.init_args.root", str(root), "--data.init_args.num_workers", "1",
        "--trainer.max_steps", str(steps), "--trainer.max_epochs", "-1", "--trainer.val_check_interval", str(steps),
        "--trainer.check_val_every_n_epoch", "null",
        "--trainer.logger.init_args.save_dir", str(out / "runs"), "--trainer.logger.init_args.name", name,
        "--model.init_args.scheduler.init_args.warmup_steps", str(max(1, steps // 10)),
    ]  # fmt: skip


def fit(args: list[str]) -> tuple[Path, dict[str, float]]:
    """Train; the last checkpoint and the last validation's metrics."""
    cli = run(["fit", *args])
    metrics = {k: float(v) for k, v in cli.trainer.callback_metrics.items() if k.startswith("val/")}
    return max(Path(cli.trainer.log_dir).glob("checkpoints/*.ckpt"), key=lambda p: p.stat().st_mtime), metrics


PRETRAIN = {  # captions, the Plain chat format, everything trains
    "model": {
        "init_args": {
            "language_model": {"init_args": {"chat_format": {"class_path": "lit_mllm.nn.language.Plain"}}},
            "stage": {"name": "pretrain", "trainable": ["vision_tower", "connector", "language_model"]},
        }
    }
}


def filter_experiment(out: Path, root: Path, size: dict, keep: float) -> tuple[list[list], float]:
    val = {"shapesworld": conversations("captions_val.json")}
    everything = config(out, "captions_all", PRETRAIN | {"data": {"init_args": {
        "train": {"shapesworld": conversations("captions_train.json")}, "val": val, "test": None}}})  # fmt: skip
    scorer, _ = fit(common(everything, out, root, "scorer", 100, size["scorer_steps"]))
    scored = out / "scored"
    report = run(["score-data", *common(everything, out, root, "score", 100),
                  "--ckpt_path", str(scorer), "--out", str(scored), "--keep", str(keep)])  # fmt: skip
    kept_source = report["sources"]["shapesworld"]["filtered"]["init_args"]
    noise = json.loads((root / "noise_train.json").read_text())
    noisy_ids = {e["id"] for kind in noise.values() for e in kind}
    kept_ids = {r["id"] for r in json.loads(Path(kept_source["path"]).read_text())}
    recall = {
        kind: 1 - len({e["id"] for e in entries} & kept_ids) / max(1, len(entries))
        for kind, entries in noise.items()
    }
    filtered = config(out, "captions_filtered", PRETRAIN | {"data": {"init_args": {
        "train": {"shapesworld": conversations(kept_source["path"], kept_source["image_folder"])},
        "val": val, "test": None}}})  # fmt: skip
    rows, gains = [], []
    for seed in size["seeds"]:
        losses = {}
        for name, cfg in (("all", everything), ("filtered", filtered)):
            _, metrics = fit(common(cfg, out, root, f"pretrain_{name}", seed, size["pretrain_steps"]))
            losses[name] = metrics["val/loss"]
        gains.append(losses["all"] - losses["filtered"])
        rows.append(
            [seed, len(kept_ids), f"{losses['all']:.4f}", f"{losses['filtered']:.4f}", f"{gains[-1]:+.4f}"]
        )
    print(
        f"\nfilter: kept {len(kept_ids)} of {report['sources']['shapesworld']['scored']} captions; share of the "
        f"noise removed: unrelated {recall['unrelated']:.2f}, rare tokens {recall['rare_tokens']:.2f} "
        f"(a random filter removes {1 - keep:.2f}); noisy ids: {len(noisy_ids)}"
    )
    return rows, statistics.mean(gains)


def soup_experiment(out: Path, root: Path, size: dict) -> list[list]:
    val = {"colour": conversations("skill_colour_val.json"), "count": conversations("skill_count_val.json")}
    base_cfg = config(out, "instruct", {"data": {"init_args": {
        "train": {"shapesworld": conversations("train.json")}, "val": val, "test": None}}})  # fmt: skip
    rows = []
    for seed in size["seeds"]:
        base, base_metrics = fit(common(base_cfg, out, root, "base", seed, size["base_steps"]))
        tuned, scores = [], {"base": base_metrics}
        for skill in ("colour", "count"):
            cfg = config(out, f"tune_{skill}", {
                "model": {"init_args": {"init_from": str(base)}},
                "data": {"init_args": {"train": {"shapesworld": conversations(f"skill_{skill}_train.json")}, "val": val,
                                       "test": None}}})  # fmt: skip
            ckpt, scores[skill] = fit(common(cfg, out, root, f"tune_{skill}", seed, size["tune_steps"]))
            tuned.append(ckpt)
        ckpts = [a for c in tuned for a in ("--ckpt", str(c))]
        for method in ("uniform", "greedy"):
            record = run(["soup", *common(base_cfg, out, root, "soup", seed), *ckpts,
                          "--method", method, "--out", str(out / f"soup_{method}_{seed}")])  # fmt: skip
            report = json.loads((out / f"soup_{method}_{seed}" / "eval_val.json").read_text())
            scores[f"{method} soup ({len(record['members'])})"] = report["metrics"]
        for name, metrics in scores.items():
            rows.append(
                [seed, name]
                + [
                    f"{metrics.get(k, float('nan')):.3f}"
                    for k in ("val/accuracy", "val/colour/accuracy", "val/count/accuracy")
                ]  # fmt: skip
            )
    return rows


def table(header: list[str], rows: list[list]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    line = lambda r: "  ".join(str(x).ljust(w) for x, w in zip(r, widths))  # noqa: E731
    return "\n".join([line(header), *(line(r) for r in rows)])


def main() -> None:
    opts = options()
    size = sizes(opts.quick)
    size["seeds"] = opts.seeds or size["seeds"]
    out = Path(opts.out)
    root = out / "shapesworld"
    if not root.exists():
        ShapesWorld(
            num_train=size["images"], num_val=size["val"], num_test=8, noisy_captions=0.3, rare_token_captions=0.2,
            skill_sets=("colour", "count"), extras=(),
        ).write(root)  # fmt: skip
    rows, gain = filter_experiment(out, root, size, opts.keep)
    print(table(["seed", "kept", "val/loss all", "val/loss filtered", "gain"], rows))
    soup_rows = soup_experiment(out, root, size)
    print("\n" + table(["seed", "model", "val/accuracy", "colour", "count"], soup_rows))
    print(f"points_filter_gain: {gain:.4f}")


if __name__ == "__main__":
    sys.exit(main())
