"""The ``lit-mllm`` command: a table of subcommands, each run by the ``main(args)`` of one module of
:mod:`lit_mllm.commands`, imported only when that subcommand runs (``lit-mllm data`` never loads the model
families, ``lit-mllm --help`` not even torch). ``lit-mllm --help`` lists the table.

A new subcommand is a module in ``lit_mllm/commands/`` with a ``main(args: list[str])`` and a row here. Nothing
else in ``lit_mllm`` imports this module or the commands.

Errors a person can act on (:data:`PROBLEMS`: a config that does not parse or build, bad data, a checkpoint that
does not fit or is missing, a model a command does not support) reach the console as one message, without a stack trace, and a non-zero exit status;
an error raised in a DataLoader worker is shown as the worker raised it (torch re-raises it with the worker's
traceback inside its message). ``lit-mllm --debug COMMAND ...`` or ``LIT_MLLM_DEBUG=1`` shows the stack trace.
Other exceptions (bugs) keep their stack trace. :func:`run` raises them all, for callers in Python.
"""

from __future__ import annotations

import difflib
import importlib
import os
import re
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
    "evaluate": Command(
        "lit_mllm.commands.evaluate",
        "--config FILE --ckpt_path CKPT [--split val|test]",
        "score a model on a split with the config's metrics; a JSON report of scores and what produced them",
    ),
    "score-data": Command(
        "lit_mllm.commands.score_data",
        "--config FILE --ckpt_path CKPT --out DIR [--keep 0.2 | --threshold X]",
        "perplexity of every record under a model (resumable sidecar); a filtered copy of each source, a report",
    ),
    "soup": Command(
        "lit_mllm.commands.soup",
        "--config FILE --ckpt A --ckpt B ... --method uniform|max|greedy --out DIR",
        "average checkpoints of one model (uniform, best single, greedy by a validation metric) into one",
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
        "lit_mllm.commands.data",
        "shapesworld --out DIR | optimize --config FILE --out DIR",
        "write the generated ShapesWorld dataset, or a config's sources as streaming shards",
    ),
    "sweep": Command(
        "lit_mllm.commands.sweep",
        "FILE [--dry-run] [--status] [--parallel N] [--executor local|slurm]",
        "run an ablation grid's arms (ablations/*.yaml), resuming; locally or as a SLURM job array",
    ),
    "report": Command(
        "lit_mllm.commands.report",
        "STUDY_DIR",
        "a study's tables (mean, 95% interval over seeds), plots and TensorBoard HParams",
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
            f"`lit-mllm {DEBUG_FLAG} COMMAND ...` (or {DEBUG_ENV}=1) shows the stack trace of an error.",
        ]
    )


def run(args: list[str] | None = None) -> object:
    """Run a ``lit-mllm`` command and return what it built (the CLI, the describe figures, a report, or None);
    errors are raised (:func:`main` reports them).

    ``args`` None reads the process's command line. ``-h`` / ``--help`` or no argument prints the table; an
    option before any subcommand goes to LightningCLI's own parser, as it did before the table (``--debug``
    excepted, which only :func:`main` reads)."""
    argv = sys.argv[1:] if args is None else list(args)
    while argv and argv[0] == DEBUG_FLAG:
        argv.pop(0)
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
        return main_of(argv)
    return main_of(argv[1:])


# -- errors a person can act on ------------------------------------------------------------------------------------
DEBUG_FLAG = "--debug"
"""Before the subcommand (``lit-mllm --debug fit ...``): errors keep their stack trace."""
DEBUG_ENV = "LIT_MLLM_DEBUG"
"""Environment variable that does the same when set to anything but ``""`` or ``0``."""


@dataclass(frozen=True)
class Problem:
    """A kind of error :func:`main` reports as a message: the exception class, by module and name (looked up in
    ``sys.modules`` only: an error of a module that was never imported cannot have been raised)."""

    module: str
    name: str
    label: str
    """What the message starts with (``config error``)."""
    exit_code: int = 1
    hint: str = ""
    """What to do, when the error's message does not say it."""


PROBLEMS = (
    Problem("lit_mllm.commands.config_errors", "ConfigError", "config error", exit_code=2),
    Problem(
        "lit_mllm.data.sample",
        "DataError",
        "data error",
        hint="`lit-mllm validate-data --config FILE` checks every record of a config's data",
    ),
    Problem("lit_mllm.training.checkpoints", "WeightsMismatch", "checkpoint error"),
    Problem("lit_mllm.training.checkpoints", "UnsafeCheckpoint", "checkpoint error"),
    Problem("builtins", "FileNotFoundError", "missing file"),
    Problem("lit_mllm.training.memory", "UnsupportedModel", "not supported"),
    Problem("lit_mllm.training.export", "UnsupportedExport", "not supported"),
)

_WORKER = re.compile(r"^Caught \w+ in DataLoader worker process \d+\.\nOriginal Traceback", re.DOTALL)


def problem_of(error: BaseException) -> Problem | None:
    """The row of :data:`PROBLEMS` that ``error`` is an instance of; None for any other exception."""
    for problem in PROBLEMS:
        cls = getattr(sys.modules.get(problem.module), problem.name, None)
        if isinstance(cls, type) and isinstance(error, cls):
            return problem
    return None


def error_message(error: BaseException) -> str:
    """``error``'s message; for an error re-raised from a DataLoader worker (torch puts the worker's whole traceback
    in the message), the message the worker's exception had."""
    text = str(error)
    if _WORKER.match(text):
        cls = type(error)
        marker = (
            f"{cls.__name__}: " if cls.__module__ == "builtins" else f"{cls.__module__}.{cls.__qualname__}: "
        )
        cut = text.rfind(f"\n{marker}")
        if cut >= 0:
            return text[cut + 1 + len(marker) :].strip()
    return text


def report(error: BaseException, command: str) -> tuple[str, int] | None:
    """The console message and exit status for an error a person can act on; None for others (bugs)."""
    problem = problem_of(error)
    if problem is None:
        return None
    message = error_message(error)
    if problem.name == "FileNotFoundError" and "checkpoint" in message.lower():
        hint = "give --ckpt_path a checkpoint that exists (a run keeps its own in <run folder>/checkpoints/)"
    else:
        hint = problem.hint
    lines = [f"lit-mllm {command}: {problem.label}: {message}"]
    if hint and not _names_command_of(message, hint):
        lines.append(hint)
    lines.append(f"(`lit-mllm {DEBUG_FLAG} {command} ...` or {DEBUG_ENV}=1 shows the stack trace)")
    return "\n".join(lines), problem.exit_code


def _names_command_of(message: str, hint: str) -> bool:
    """Whether ``message`` names the command ``hint`` suggests (its first `lit-mllm NAME`)."""
    named = re.search(r"`(lit-mllm [\w-]+)", hint)
    return named is not None and named.group(1) in message


def main(args: list[str] | None = None) -> None:
    """The console script: exits 0 on success (returning an object would make ``sys.exit`` print it and exit 1);
    an error a person can act on is printed as one message and exits non-zero (2 for a config error), without a
    stack trace unless asked for (:data:`DEBUG_FLAG`, :data:`DEBUG_ENV`)."""
    argv = sys.argv[1:] if args is None else list(args)
    debug = bool(argv) and argv[0] == DEBUG_FLAG or os.environ.get(DEBUG_ENV, "") not in ("", "0")
    try:
        run(argv)
    except Exception as error:
        rest = [a for a in argv if a != DEBUG_FLAG]
        command = "fit" if not rest or rest[0].startswith("-") else rest[0]
        reported = None if debug else report(error, command)
        if reported is None:
            raise
        print(reported[0], file=sys.stderr)
        raise SystemExit(reported[1]) from None


if __name__ == "__main__":
    main()
