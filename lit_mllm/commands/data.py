"""``lit-mllm data``: write datasets.

- ``lit-mllm data shapesworld --out DIR``: the generated ShapesWorld dataset.
- ``lit-mllm data optimize --config FILE --out DIR``: every source of a config's splits as streaming shards
  (:mod:`lit_mllm.commands.data_optimize`), with ``DIR/data.yaml`` to train from them.
"""

from __future__ import annotations

import importlib
import sys

USAGE = """usage: lit-mllm data COMMAND [options]

commands:
  lit-mllm data shapesworld --out DIR
      write the generated ShapesWorld dataset (`lit-mllm data shapesworld --help` lists its options)
  lit-mllm data optimize --config FILE --out DIR [--split train val test] [--on_bad_record keep|drop|fail]
      write every source of a config's splits as litdata streaming shards, and DIR/data.yaml to train from
      them (`lit-mllm data optimize --help`)"""

CONFIG_COMMANDS = {"optimize": "lit_mllm.commands.data_optimize"}
"""Subcommands that build a config's model and data: each module's ``main(args)`` runs it, imported by name only
when it runs (so writing a generated dataset never loads the model families)."""


def main(args: list[str]):
    """Run ``lit-mllm data COMMAND``: a config command by its module, a dataset generator through jsonargparse."""
    if args and args[0] in CONFIG_COMMANDS:
        return importlib.import_module(CONFIG_COMMANDS[args[0]]).main(args[1:])
    if not args or args[0] in ("-h", "--help"):
        print(USAGE, file=sys.stdout if args else sys.stderr)
        raise SystemExit(0 if args else 2)
    from jsonargparse import CLI

    from lit_mllm.data.shapesworld import write_shapesworld

    CLI({"shapesworld": write_shapesworld}, args=args, prog="lit-mllm data", description="Write datasets.")
