"""``lit-mllm fit|validate|test|predict``: LightningCLI over a family module and a DataModule.

After the model and data are built from the config, the model's processor (tokenizer, chat format, image
transform, image tokens per image) is connected to the DataModule, so the YAML never repeats it. The other
commands build a config's model and data through :func:`build_cli` with ``run=False``.

The console: a config that cannot be parsed or built raises :class:`ConfigError` (the option, where it was set,
the nearest valid keys; see :mod:`lit_mllm.commands.config_errors`), which ``lit-mllm`` prints without a stack
trace. Lightning's model summary is off by default (the stage's table of parameters is printed at fit start), its
cloud tips are not printed, and the progress display suits the output
(:func:`lit_mllm.training.callbacks.console_progress_bar`: a bar on a terminal, plain lines in a log file).
"""

from __future__ import annotations

import argparse
import logging
import sys
import warnings
from pathlib import Path
from typing import Any

import yaml
from jsonargparse import Namespace
from lightning import LightningDataModule, LightningModule, Trainer
from lightning.pytorch.callbacks import ProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.utilities import rank_zero_info

from lit_mllm.commands.config_errors import ConfigError, build_error, clean, parse_error, root_cause
from lit_mllm.config_stack import stack_configs
from lit_mllm.data.sample import DataError
from lit_mllm.training.callbacks import console_progress_bar
from lit_mllm.training.checkpoints import UnsafeCheckpoint, WeightsMismatch

DESCRIPTION = """lit-mllm fit|validate|test|predict: train and evaluate multimodal LLMs from YAML.

Run `lit-mllm fit --config configs/quickstart.yaml` for a tiny model on generated data (CPU, minutes);
`lit-mllm --help` lists the other commands."""

SUBCOMMAND_KEYS = ("ckpt_path", "weights_only", "verbose", "return_predictions")
"""Keys of a run's saved ``config.yaml`` that belong to its subcommand, not to the trainer/model/data."""


NOT_CONFIG_ERRORS = (DataError, WeightsMismatch, UnsafeCheckpoint)
"""Errors that building the config's classes may raise about data or weights (reading ``init_from``, generating a
dataset), reported as what they are rather than as config errors."""


class LitMLLMCLI(LightningCLI):
    """LightningCLI whose DataModule is connected to the model after both are built; parse and build errors are
    :class:`ConfigError`; the console's progress display is added unless the config names one."""

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        """Parse ``args`` (jsonargparse's errors become a :class:`ConfigError`). LightningCLI's own version warns
        when ``args`` are given to a process that has a command line, printing both lists whole (with
        :func:`build_cli`'s ``--config`` YAML strings, whole configs on one line); :func:`build_cli` notes that
        case in one short line instead."""
        # kept for error messages that name where an option was set
        self.arguments = [] if isinstance(args, (dict, Namespace)) else list(args or [])
        try:
            if isinstance(args, (dict, Namespace)):
                self.config = parser.parse_object(args)
            else:
                self.config = parser.parse_args(args)
        except argparse.ArgumentError as e:
            raise parse_error(e, parser, self.arguments) from e

    def _parse_ckpt_path(self) -> None:
        # LightningCLI (2.6) re-parses the model's hyperparameters saved in --ckpt_path; with exit_on_error=False a
        # checkpoint whose hyperparameters this parser refuses raises instead of exiting
        try:
            super()._parse_ckpt_path()
        except argparse.ArgumentError as e:
            subcommand = self.config.get("subcommand")
            ckpt = self.config[subcommand].get("ckpt_path") if subcommand else None
            raise ConfigError(
                f"the model's hyperparameters saved in {ckpt} do not fit this config's parser: "
                f"{clean(str(e))}\n(was the checkpoint written by another version or family? give the run's own "
                "config.yaml with --config)"
            ) from e

    def instantiate_classes(self) -> None:
        try:
            super().instantiate_classes()
            connect = getattr(self.datamodule, "connect", None)
            if connect is not None:
                connect(self.model.processor())
        except (ValueError, TypeError) as e:
            root = root_cause(e)
            if isinstance(root, NOT_CONFIG_ERRORS):
                raise root from None
            if isinstance(e, ConfigError):
                raise
            raise build_error(e, self.arguments) from e

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        """The Trainer, with :func:`~lit_mllm.training.callbacks.console_progress_bar` among its callbacks unless
        the config names a progress bar or turns it off (``trainer.enable_progress_bar: false``)."""
        config = self._get(self.config_init, "trainer", default={})
        callbacks = config.get("callbacks") or []
        callbacks = list(callbacks) if isinstance(callbacks, (list, tuple)) else [callbacks]
        if config.get("enable_progress_bar") is not False and not any(
            isinstance(c, ProgressBar) for c in callbacks
        ):
            kwargs.setdefault("callbacks", [*callbacks, console_progress_bar()])
        return super().instantiate_trainer(**kwargs)


def model_only_args(args: list[str]) -> list[str]:
    """A run's saved ``config.yaml`` also records its subcommand's options (``ckpt_path``, ...), which the
    model-only parser refuses: pass such files on as YAML text without those keys."""
    out, i = [], 0
    while i < len(args):
        arg = args[i]
        value = None
        if arg == "--config" and i + 1 < len(args):
            value, i = args[i + 1], i + 2
        elif arg.startswith("--config="):
            value, i = arg.split("=", 1)[1], i + 1
        else:
            out.append(arg)
            i += 1
            continue
        path = Path(value)
        # a YAML string longer than a file name can be is no file (is_file raises on it)
        is_yaml = path.suffix in (".yaml", ".yml") and len(value) < 4096 and path.is_file()
        node = yaml.safe_load(path.read_text()) if is_yaml else None
        if isinstance(node, dict) and any(k in node for k in SUBCOMMAND_KEYS):
            dropped = {k: node.pop(k) for k in SUBCOMMAND_KEYS if k in node}
            if dropped.get("ckpt_path"):
                rank_zero_info(
                    f"ignoring ckpt_path={dropped['ckpt_path']} recorded in {path} (where that run started); "
                    "give --ckpt_path"
                )
            value = yaml.safe_dump(node, sort_keys=False)
        out += ["--config", value]
    return out


class ParseOnlyCLI(LitMLLMCLI):
    """Parses and checks a config and builds nothing (``build_cli(..., parse_only=True)``)."""

    def instantiate_classes(self) -> None:
        """Nothing is built: the config is only parsed (``self.config``)."""


def build_cli(args: list[str] | None = None, run: bool = True, parse_only: bool = False) -> LitMLLMCLI:
    """The LightningCLI behind ``lit-mllm``; ``run=False`` parses and instantiates without a subcommand (a run's
    saved ``config.yaml`` is accepted: its subcommand keys are dropped); ``parse_only`` (with ``run=False``) only
    parses (:class:`ParseOnlyCLI`: ``lit-mllm sweep`` checks every arm of a grid so, reusing its parser)."""
    if args is None:  # the console script: LightningCLI would read the same list
        args = sys.argv[1:]
    elif not parse_only:  # a parse-only CLI never runs on the command line, so there is nothing to note
        note_arguments(list(args), sys.argv[1:])
    if not run:
        args = model_only_args(list(args))
    # A later --config that changes a part's class starts that part from the class's own defaults (jsonargparse
    # would keep the earlier file's options the new class also accepts); each dropped option is printed.
    args = stack_configs(args, log=rank_zero_info)
    quiet_lightning()
    return (ParseOnlyCLI if parse_only else LitMLLMCLI)(
        LightningModule,  # a family module (a VLMModule), QFormerPretraining (BLIP-2 stage 1) or CLIPPretraining
        LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        args=args,
        run=run,
        save_config_kwargs={"overwrite": True},
        parser_kwargs={"description": DESCRIPTION, "exit_on_error": False},
        trainer_defaults={
            "logger": {
                "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                "init_args": {"save_dir": "runs"},
            },
            # the stage's table (parts, parameters, trainable, mode) is printed at fit start; Lightning's summary
            # would add a second table (with "Total FLOPs: 0" unless a FLOP counter runs)
            "enable_model_summary": False,
        },
    )


class _NoCloudTips(logging.Filter):
    """Drops Lightning's "💡 Tip: ... try installing litlogger / litmodels" lines (printed at every run by its
    logger and checkpoint connectors whatever the config says; Lightning has no setting for them)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("💡 Tip:")


def quiet_lightning() -> None:
    """Silence Lightning's messages that say nothing about this run (idempotent)."""
    log = logging.getLogger("lightning.pytorch.utilities.rank_zero")  # rank_zero_info's logger
    if not any(isinstance(f, _NoCloudTips) for f in log.filters):
        log.addFilter(_NoCloudTips())
    # Frozen parts are in eval mode by design (the stage table printed at fit start says which).
    warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode at the start of training")
    # MixtureData's training stream knows its exact length per rank (workers split batches, not samples).
    warnings.filterwarnings("ignore", message=r"Your `IterableDataset` has `__len__` defined")
    # Lightning 2.6 calls an API that torch >= 2.8 deprecates, on every run
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated")


def note_arguments(args: list[str], command_line: list[str]) -> None:
    """One line when ``args`` given from Python are not this process's command line (which is then ignored): what
    differs, each argument shortened (LightningCLI's own warning prints both lists whole)."""
    if not command_line or args == command_line[len(command_line) - len(args) :]:
        return  # no command line, or a subcommand's share of it (``lit-mllm describe --config ...``)
    only_args = [a for a in args if a not in command_line]
    only_line = [a for a in command_line if a not in args]
    rank_zero_info(
        "lit-mllm: running on the arguments given in Python, not on this process's command line"
        + (f"; given: {_short_list(only_args)}" if only_args else "")
        + (f"; ignored from the command line: {_short_list(only_line)}" if only_line else "")
    )


def _short_list(items: list[str], most: int = 6) -> str:
    shown = [a if len(a) <= 40 and "\n" not in a else a.replace("\n", " ")[:37] + "..." for a in items[:most]]
    return " ".join(shown) + (f" (+{len(items) - most} more)" if len(items) > most else "")


def main(args: list[str] | None = None) -> LitMLLMCLI:
    """Run a LightningCLI subcommand: ``args`` starts with it (``["fit", "--config", FILE]``). None reads the
    process's command line."""
    return build_cli(args)
