"""``lit-mllm evaluate --config FILE --ckpt_path CKPT [--split val|test] [--report PATH]``: score a trained model
on a split of its config's data with the config's metrics, and write the evaluation report
(:mod:`lit_mllm.eval.report`: the scores with the checkpoint, generation settings, prompts, data files and package
versions behind them). The numbers are those the run logged for the same split and weights.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from lit_mllm.commands.lightning import build_cli
from lit_mllm.eval.report import build_report, write_report
from lit_mllm.training.checkpoints import load_weights

SPLITS = {"val": "validate", "test": "test"}
"""The ``--split`` choices and the DataModule split each reads."""


def parser() -> argparse.ArgumentParser:
    """The command's own options; every other argument is a `lit-mllm fit` option building the model and data."""
    p = argparse.ArgumentParser(
        prog="lit-mllm evaluate",
        allow_abbrev=False,
        description=(
            "Score a model on a split of its config's data (--config FILE, repeatable, and any --model/--data/"
            "--trainer option as in `lit-mllm fit`) with the config's metrics, and write a JSON report of the "
            "scores with the checkpoint, generation settings, prompts, data files (sha256) and package versions."
        ),
    )
    p.add_argument(
        "--ckpt_path", default=None, help="Lightning .ckpt or .safetensors to load; default: as built"
    )
    p.add_argument("--split", choices=SPLITS, default="val", help="Which split to score (default: val)")
    p.add_argument(
        "--report",
        default=None,
        help="Report file (default: eval_<split>.json beside the checkpoint, or in the current folder)",
    )
    p.add_argument("--prompts", type=int, default=3, help="How many prompts the report shows (default: 3)")
    return p


def first_prompts(model, datamodule, split: str, count: int) -> list[str]:
    """The first ``count`` prompts of the split as the model reads them (a run of image tokens shown once, with its
    length)."""
    processor, out = model.processor(), []
    for source in datamodule.sources(split).values():
        for i in range(min(count - len(out), len(source))):
            item = processor(source.sample(i, processor.image_token), for_generation=True)
            text = processor.tokenizer.decode(item["input_ids"])
            token = re.escape(processor.image_token)
            out.append(
                re.sub(
                    f"(?:{token})+",
                    lambda m: f"{processor.image_token}x{m[0].count(processor.image_token)}",
                    text,
                )
            )
        if len(out) >= count:
            break
    return out


def main(args: list[str]) -> dict:
    """Build, load, score, write the report; return it."""
    known, rest = parser().parse_known_args(args)
    cli = build_cli(rest, run=False)
    model, datamodule, trainer = cli.model, cli.datamodule, cli.trainer
    if known.ckpt_path is not None:
        load_weights(model, known.ckpt_path)
    run = trainer.validate if known.split == "val" else trainer.test
    results = run(model, datamodule=datamodule, verbose=False)
    metrics = {k: float(v) for result in results for k, v in result.items()}
    report = build_report(
        metrics=metrics,
        split=known.split,
        data_split=SPLITS[known.split],
        model=model,
        datamodule=datamodule,
        checkpoint=known.ckpt_path,
        prompts=first_prompts(model, datamodule, SPLITS[known.split], known.prompts),
    )
    where = Path(known.ckpt_path).parent if known.ckpt_path else Path(".")
    path = write_report(report, Path(known.report) if known.report else where / f"eval_{known.split}.json")
    width = max(map(len, metrics), default=0)
    for key, value in sorted(metrics.items()):
        print(f"{key:<{width}}  {value:.4f}")
    print(f"wrote {path}")
    return report
