"""``lit-mllm data optimize --config FILE --out DIR``: every source of a config's splits written as streaming
shards (:mod:`lit_mllm.data.shards`), with ``DIR/data.yaml`` to train from them. It builds the config's model (for
its image placeholder) and DataModule, as ``lit-mllm validate-data`` does; :mod:`lit_mllm.commands.data` imports it
by name only when it runs, so ``lit-mllm data shapesworld`` never loads the model families.
"""

from __future__ import annotations

import argparse
from pathlib import Path

OPTIMIZE_DESCRIPTION = """Write every source of a config's data splits into litdata-optimised shards that
StreamingShards reads by index, from a local folder or object storage: DIR/<split>/<source>/ and DIR/data.yaml,
a data config naming them. Record i of the shards is record i of the source (the same mixture plan, the same
samples); images are stored as their files' bytes. The config's model is built for its image placeholder, and
its DataModule for the sources (a ShapesWorld `generate_if_missing` writes its data first).

The config is given as to `lit-mllm fit`: one or more --config FILE, --data FILE, and --data.init_args...
overrides, which pass through in their order. DIR appears only when everything is written (a failed or
interrupted run leaves no DIR behind); bad records are counted per reason and reported."""

OPTIMIZE_EPILOG = """example:
  lit-mllm data optimize --config configs/quickstart.yaml --out data/shapesworld_shards
  lit-mllm fit --config configs/quickstart.yaml --config data/shapesworld_shards/data.yaml
  # object storage: upload the finished folder, then read it by URL
  lit-mllm data optimize --config configs/quickstart.yaml --out shards --remote s3://bucket/shapesworld"""


def optimize_parser() -> argparse.ArgumentParser:
    """The options of ``lit-mllm data optimize`` (the config's own arguments pass through to LightningCLI)."""
    parser = argparse.ArgumentParser(
        prog="lit-mllm data optimize --config FILE",
        description=OPTIMIZE_DESCRIPTION,
        epilog=OPTIMIZE_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--out", required=True, help="Folder to write (must not exist, unless --overwrite).")
    parser.add_argument(
        "--split",
        nargs="+",
        choices=["train", "val", "test", "predict"],
        help="Splits to write (default: train, val and test, those the config has).",
    )
    parser.add_argument(
        "--chunk_bytes", default="64MB", help="Size of each litdata chunk file (default 64MB)."
    )
    parser.add_argument(
        "--on_bad_record",
        choices=["keep", "drop", "fail"],
        default="keep",
        help="A record the source cannot give (bad JSON, missing image file, ...): keep it as a bad record that "
        "a run counts under on_bad_sample as it would have (default; indices stay the original's), drop it "
        "(indices shift, so the plan differs from the files'), or fail at the first. Counted and reported "
        "either way.",
    )
    parser.add_argument(
        "--remote",
        help="URL the finished folder will be uploaded to (s3://bucket/prefix): data.yaml then names each "
        "source by its URL there.",
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="Replace an existing --out folder once the new one is written.",
    )
    return parser


OWN_OPTIONS = {"--out": 1, "--split": "+", "--chunk_bytes": 1, "--on_bad_record": 1, "--remote": 1}
OWN_FLAGS = {"--overwrite", "-h", "--help"}


def split_arguments(args: list[str]) -> tuple[list[str], list[str]]:
    """``args`` as (this command's options, the config's arguments in their order)."""
    own, rest, i = [], [], 0
    while i < len(args):
        arg = args[i]
        flag = arg.split("=", 1)[0]
        i += 1
        if flag in OWN_FLAGS:
            own.append(arg)
        elif flag in OWN_OPTIONS:
            own.append(arg)
            if "=" in arg:
                continue
            if OWN_OPTIONS[flag] == 1:
                own += args[i : i + 1]
                i += 1
            else:
                while i < len(args) and not args[i].startswith("-"):
                    own.append(args[i])
                    i += 1
        else:
            rest.append(arg)
    return own, rest


def main(args: list[str]) -> list:
    """``lit-mllm data optimize``: build the config, open its splits' sources, write the shards and report."""
    own, rest = split_arguments(args)
    parser = optimize_parser()
    opts = parser.parse_args(own)
    if not any(a == "--config" or a.startswith("--config=") for a in rest):
        parser.error("give the run's config: --config FILE (as to `lit-mllm fit`)")
    out = Path(opts.out)
    if out.exists() and not opts.overwrite:
        parser.error(
            f"--out {out} exists; give a new folder, or --overwrite to replace it once the new one is done"
        )
    try:
        import litdata  # noqa: F401
    except ImportError:
        parser.error("streaming shards need litdata: pip install 'lit-mllm[stream]' (or pip install litdata)")

    from lit_mllm.commands.lightning import build_cli
    from lit_mllm.data.datamodule import SPLIT_KEYS, MixtureData
    from lit_mllm.data.shards import DATA_CONFIG, optimize_splits

    cli = build_cli(rest, run=False)
    dm = cli.datamodule
    if not isinstance(dm, MixtureData):
        parser.error(f"optimize needs a lit_mllm.data.MixtureData DataModule, got {type(dm).__name__}")
    dm.prepare_data()
    stage_of = {key: stage for stage, key in SPLIT_KEYS.items()}
    names = opts.split or [s for s in ("train", "val", "test") if dm.splits[stage_of[s]]]
    splits = {}
    for split in names:
        if not dm.splits[stage_of[split]]:
            parser.error(f"the config has no {split} sources (data.{split} is empty)")
        splits[split] = dm.sources(stage_of[split])  # a source that cannot be opened stops here, named
    reports = optimize_splits(
        splits,
        out,
        dm.processor.image_token,
        opts.chunk_bytes,
        opts.on_bad_record,
        opts.remote,
        opts.overwrite,
        progress=True,
    )
    for report in reports:
        print("\n".join(report.lines()))
    written = sum(r.written for r in reports)
    bad = sum(sum(r.bad.values()) for r in reports)
    print(
        f"\nWrote {written} records of {len(reports)} source(s) to {out} ({bad} bad record(s), "
        f"{opts.on_bad_record}).\nTrain from them: lit-mllm fit --config ... --config {out / DATA_CONFIG}"
    )
    return reports
