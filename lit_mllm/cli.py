"""The ``lit-mllm`` command: a table of subcommands, each run by the ``main(args)`` of one module of
:mod:`lit_mllm.commands`, imported only when that subcommand runs (``lit-mllm data`` never loads the model
families, ``lit-mllm --help`` not even torch). ``lit-mllm --help`` lists the table.

A new subcommand is a module in ``lit_mllm/commands/`` with a ``main(args: list[str])`` and a row here. Nothing
else in ``lit_mllm`` imports this module or the commands.
"""

from __future__ import annotations

import difflib
import importlib
import sys
from dataclasses import dataclass


@dataclass(frozen=True)
class Command:
    """One row of the table."""

    module: str
    """Module whose ``main(args)`` runs the subcommand; imported when it runs."""
    usage: str
    """Arguments shown after the subcommand's name in ``lit-mllm --help``."""
    summary: str
    """One line saying what it does."""
    lightning: bool = False
    """LightningCLI's own subcommand: ``main`` gets the whole command line, the name first."""


LIGHTNING = "lit_mllm.commands.lightning"
COMMANDS: dict[str, Command] = {
    "fit": Command(
        LIGHTNING,
        "--config FILE",
        "train (LightningCLI over a family module and a DataModule)",
        lightning=True,
    ),
    "validate": Command(
        LIGHTNING, "--config FILE --ckpt_path CKPT", "the validation split's metrics", lightning=True
    ),
    "test": Command(LIGHTNING, "--config FILE --ckpt_path CKPT", "the test split's metrics", lightning=True),
    "predict": Command(
        LIGHTNING, "--config FILE --ckpt_path CKPT", "generate replies (predictions.jsonl)", lightning=True
    ),
    "describe": Command(
        "lit_mllm.commands.describe",
        "--config FILE",
        "what a config builds: parameters per part, image tokens and connector FLOPs per image",
    ),
    "validate-data": Command(
        "lit_mllm.commands.validate_data",
        "--config FILE",
        "process every record of the config's data; problems per reason, named",
    ),
    "estimate-memory": Command(
        "lit_mllm.commands.estimate_memory",
        "--config FILE",
        "a training step's memory per device: weights, gradients, optimizer states, activations",
    ),
    "export": Command(
        "lit_mllm.commands.export",
        "--config FILE --ckpt_path CKPT --out DIR",
        "a trained model as a transformers LLaVA folder, or safetensors + config",
    ),
    "data": Command(
        "lit_mllm.commands.data", "shapesworld --out DIR", "write the generated ShapesWorld dataset"
    ),
}


def usage() -> str:
    """``lit-mllm --help``: every subcommand with its one-line summary."""
    rows = [f"  lit-mllm {name} {c.usage}\n      {c.summary}" for name, c in COMMANDS.items()]
    return "\n".join(
        [
            "usage: lit-mllm COMMAND [options]",
            "",
            "lit-mllm: train and evaluate multimodal LLMs from YAML.",
            "",
            "commands:",
            *rows,
            "",
            "`lit-mllm COMMAND --help` explains a command's options. Start with",
            "`lit-mllm fit --config configs/quickstart.yaml`: a tiny model on generated data (CPU, minutes).",
        ]
    )


def run(args: list[str] | None = None) -> object:
    """Run a ``lit-mllm`` command and return what it built (the CLI, the describe figures, a report, or None).

    ``args`` None reads the process's command line. ``-h`` / ``--help`` or no argument prints the table; an
    option before any subcommand goes to LightningCLI's own parser, as it did before the table."""
    argv = sys.argv[1:] if args is None else list(args)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage(), file=sys.stdout if argv else sys.stderr)
        raise SystemExit(0 if argv else 2)
    name = "fit" if argv[0].startswith("-") else argv[0]
    command = COMMANDS.get(name)
    if command is None:
        close = difflib.get_close_matches(name, list(COMMANDS), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        print(
            f"lit-mllm: unknown command {name!r}{hint}; the commands are {', '.join(COMMANDS)}. "
            "`lit-mllm --help` says what each does.",
            file=sys.stderr,
        )
        raise SystemExit(2)
    main_of = importlib.import_module(command.module).main
    if command.lightning:
        return main_of(None if args is None else argv)
    return main_of(argv[1:])


def main(args: list[str] | None = None) -> None:
    """The console script: exits 0 on success (returning an object would make ``sys.exit`` print it and exit 1)."""
    run(args)


if __name__ == "__main__":
    main()
