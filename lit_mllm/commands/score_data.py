"""``lit-mllm score-data --config FILE --ckpt_path CKPT --out DIR [--split train] [--source NAME] [--keep 0.2
[--order ascending] | --threshold X]``: the perplexity of every record of a split's sources under a trained model
(:mod:`lit_mllm.eval.perplexity`), written to a resumable sidecar ``DIR/scores.csv``; with ``--keep`` or
``--threshold``, a filtered copy of each source in its own format (:mod:`lit_mllm.data.subsets`); and a report
(``DIR/report.json`` and a histogram per source with the cut marked, examples from both ends).

POINTS (arXiv 2409.04828) filters pre-training captions this way: sort by perplexity ascending, keep the first 20%.

Scoring runs in one process on the trainer's first device (``trainer.accelerator``), under its precision, batches
of ``data.eval_batch_size`` built by ``data.num_workers`` loader workers. A second run into the same ``--out``
skips the records the sidecar holds (checking that each still has the id it was scored under) and refuses a
different checkpoint or split.
"""

from __future__ import annotations

import argparse
import json
import math
from collections import Counter
from pathlib import Path

from torch.utils.data import DataLoader, Dataset

from lit_mllm.commands.lightning import build_cli
from lit_mllm.data.collate import collate
from lit_mllm.data.datamodule import SampleLoader
from lit_mllm.data.sample import DataError, Sample
from lit_mllm.data.subsets import check_supported, write_subset
from lit_mllm.eval.perplexity import KEEP_RULE, Score, ScoreWriter, batch_scores, read_scores, select
from lit_mllm.eval.report import file_digest, versions
from lit_mllm.training.checkpoints import load_weights

SPLITS = {"train": "fit", "val": "validate", "test": "test"}
"""The ``--split`` choices and the DataModule split each reads."""
EXAMPLES = 5
"""Records the report shows from each end of a source's ranking."""


def parser() -> argparse.ArgumentParser:
    """The command's own options; every other argument is a `lit-mllm fit` option building the model and data."""
    p = argparse.ArgumentParser(
        prog="lit-mllm score-data",
        allow_abbrev=False,
        description=(
            "Score every record of a split's sources (--config FILE and any --model/--data/--trainer option as in "
            "`lit-mllm fit`) by the perplexity of its supervised text under the model of --ckpt_path; write the "
            "scores to DIR/scores.csv (resumable), a report with histograms, and with --keep or --threshold a "
            f"filtered copy of each source in its own format. Keep rule: {KEEP_RULE}."
        ),
    )
    p.add_argument("--ckpt_path", required=True, help="Lightning .ckpt or .safetensors of the scoring model")
    p.add_argument("--out", required=True, help="Folder for scores.csv, report.json, histograms, filtered/")
    p.add_argument("--split", choices=SPLITS, default="train", help="Which split's sources (default: train)")
    p.add_argument("--source", action="append", default=None, help="Only this source (repeatable)")
    cut = p.add_mutually_exclusive_group()
    cut.add_argument("--keep", type=float, default=None, help="Fraction of each source to keep, e.g. 0.2")
    cut.add_argument("--threshold", type=float, default=None, help="Keep perplexity <= this (descending: >=)")
    p.add_argument(
        "--order",
        choices=("ascending", "descending"),
        default="ascending",
        help="ascending keeps the lowest perplexities (POINTS), descending the highest (default: ascending)",
    )
    p.add_argument(
        "--shard_size", type=int, default=1000, help="Samples per written .tar shard (default 1000)"
    )
    return p


class _ToScore(Dataset):
    """Every record of one source: processed, or its id alone where the sidecar scored it already."""

    def __init__(self, loader: SampleLoader, name: str, done: dict[int, str]) -> None:
        self.loader, self.name, self.done = loader, name, done
        self.source = loader.sources[name]

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, i: int) -> dict:
        try:
            sample_id = self.source.sample(i, self.loader.processor.image_token).id
        except DataError:  # a record too malformed to name itself
            sample_id = ""
        if i in self.done:
            return {"index": i, "done": sample_id}
        item = self.loader.item(self.name, i)
        item["index"] = i
        item.setdefault("id", sample_id)  # a record the processor refused keeps its id in the sidecar
        return item


class _Collate:
    """Loader workers' collation: the batch of the processable records and the rest as they are."""

    def __init__(self, pad_token_id: int) -> None:
        self.pad_token_id = pad_token_id

    def __call__(self, items: list[dict]) -> tuple:
        good = [it for it in items if "input_ids" in it]
        batch = collate(good, self.pad_token_id) if good else None
        return batch, [it["index"] for it in good], [it for it in items if "input_ids" not in it]


def score_source(model, datamodule, name: str, source, sidecar: Path, device, forward_context) -> None:
    """Score every record of ``source`` (named ``name``) the sidecar lacks, appending a batch at a time (with a
    progress bar); the DataModule gives the processor, batch size and loader workers."""
    from tqdm.auto import tqdm

    loader = SampleLoader({name: source}, datamodule.processor, "skip", "score")
    done = {s.index: s.id for s in read_scores(sidecar) if s.source == name}
    dataset = _ToScore(loader, name, done)
    loaded = DataLoader(
        dataset,
        batch_size=datamodule.eval_batch_size,
        num_workers=datamodule.num_workers,
        collate_fn=_Collate(datamodule.processor.tokenizer.pad_token_id),
    )
    with ScoreWriter(sidecar) as writer, tqdm(total=len(dataset), desc=f"scoring {name}", unit="rec") as bar:
        for batch, indices, others in loaded:
            rows = []
            for it in others:
                if "done" in it:
                    if it["done"] != done[it["index"]]:
                        raise DataError(
                            f"source {name!r} record {it['index']} is now id {it['done']!r} but {sidecar} scored "
                            f"it as {done[it['index']]!r}: the source changed since; score into a new --out"
                        )
                else:
                    rows.append(Score(name, it["index"], it["id"], 0, math.nan, math.nan, it["skipped"]))
            if batch is not None:
                with forward_context():
                    rows += batch_scores(model, batch.to(device), name, indices)
            writer.write(sorted(rows, key=lambda s: s.index))
            bar.update(len(indices) + len(others))


def supervised_text(sample: Sample) -> str:
    """The text a sample learns: its assistant replies (joined by `` / ``) or its document."""
    if sample.text is not None:
        return sample.text
    return " / ".join(t.text for t in sample.turns if t.role == "assistant")


def _example(source, score: Score, image_token: str) -> dict:
    try:
        text = supervised_text(source.sample(score.index, image_token))
    except DataError as e:
        text = f"(cannot be read now: {e})"
    return {"id": score.id, "index": score.index, "perplexity": score.perplexity, "text": text[:400]}


def histogram(scores: list[Score], cut: float | None, title: str, path: Path) -> str | None:
    """A histogram of log perplexity with the cut marked, as a PNG; None (and nothing written) without
    matplotlib (a dev extra)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    values = [math.log(s.perplexity) for s in scores if s.scored]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.hist(values, bins=min(60, max(5, len(values) // 5)), color="#4c72b0")
    if cut is not None and cut > 0:
        ax.axvline(math.log(cut), color="#c44e52", linestyle="--", label=f"cut: perplexity {cut:.3g}")
        ax.legend()
    ax.set_xlabel("log perplexity of the supervised text")
    ax.set_ylabel("records")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path.name


def source_report(name: str, source, scores: list[Score], known, out: Path, image_token: str) -> dict:
    """The report's entry of one source; writes its histogram and, when asked, its filtered copy."""
    from lit_mllm.eval.perplexity import ranked

    order = ranked(scores, "ascending")
    entry: dict = {
        "records": len(source),
        "scored": len(order),
        "skipped": dict(Counter(s.skipped for s in scores if not s.scored)),
    }
    if order:
        ppl = [s.perplexity for s in order]
        entry["perplexity"] = {
            "min": ppl[0],
            "median": ppl[len(ppl) // 2],
            "mean": sum(ppl) / len(ppl),
            "max": ppl[-1],
        }
        entry["lowest"] = [_example(source, s, image_token) for s in order[:EXAMPLES]]
        entry["highest"] = [_example(source, s, image_token) for s in order[::-1][:EXAMPLES]]
    cut = None
    if known.keep is not None or known.threshold is not None:
        kept = select(scores, known.keep, known.threshold, known.order)
        cut = kept[-1].perplexity if kept and known.keep is not None else known.threshold
        entry["kept"] = len(kept)
        entry["cut_perplexity"] = cut
        entry["filtered"] = write_subset(
            source, [s.index for s in kept], out / "filtered" / name, known.shard_size
        )
    entry["histogram"] = histogram(
        scores, cut, f"{name}: {len(order)} records", out / f"histogram_{name}.png"
    )
    return entry


def main(args: list[str]) -> dict:
    """Build, load, score (resuming), filter, write the report; return it."""
    known, rest = parser().parse_known_args(args)
    if known.keep is not None and not 0 <= known.keep <= 1:
        raise ValueError(f"--keep is a fraction in [0, 1], got {known.keep}")
    cli = build_cli(rest, run=False)
    model, datamodule, trainer = cli.model, cli.datamodule, cli.trainer
    load_weights(model, known.ckpt_path)
    split = SPLITS[known.split]
    every = datamodule.sources(split)
    names = known.source or list(every)
    unknown = [n for n in names if n not in every]
    if unknown:
        raise ValueError(
            f"no source {unknown[0]!r} in the {known.split} split; its sources are {list(every)}"
        )
    sources = {n: every[n] for n in names}
    if known.keep is not None or known.threshold is not None:
        for n, s in sources.items():
            check_supported(s, n)  # refuse before hours of scoring
    out = Path(known.out)
    out.mkdir(parents=True, exist_ok=True)
    scored_with = {
        "checkpoint": {"path": str(known.ckpt_path), "sha256": file_digest(Path(known.ckpt_path))},
        "split": known.split,
    }
    meta_path = out / "scores.meta.json"
    if meta_path.exists():
        before = json.loads(meta_path.read_text())
        if (
            before["checkpoint"]["sha256"] != scored_with["checkpoint"]["sha256"]
            or before["split"] != known.split
        ):
            raise ValueError(
                f"{out} holds scores of checkpoint {before['checkpoint']['path']} on the {before['split']} split; "
                "give another --out to score with another checkpoint or split"
            )
    else:
        meta_path.write_text(json.dumps(scored_with, indent=1) + "\n")

    device = trainer.strategy.root_device
    model.to(device).eval()
    sidecar = out / "scores.csv"
    for name, source in sources.items():
        score_source(
            model, datamodule, name, source, sidecar, device, trainer.precision_plugin.forward_context
        )

    scores = read_scores(sidecar)
    image_token = datamodule.processor.image_token
    report = {
        **scored_with,
        "scores": str(sidecar),
        "rule": KEEP_RULE,
        "keep": known.keep,
        "threshold": known.threshold,
        "order": known.order,
        "sources": {
            n: source_report(n, s, [r for r in scores if r.source == n], known, out, image_token)
            for n, s in sources.items()
        },
        "versions": versions(),
    }
    (out / "report.json").write_text(json.dumps(report, indent=1) + "\n")
    for n, entry in report["sources"].items():
        kept = f", kept {entry['kept']}" if "kept" in entry else ""
        median = entry.get("perplexity", {}).get("median", math.nan)
        print(
            f"{n}: {entry['scored']} of {entry['records']} records scored, median perplexity {median:.3f}{kept}"
        )
    print(f"wrote {out / 'report.json'}")
    return report
