"""``lit-mllm fit|validate|test|predict``: LightningCLI over a family module and a DataModule.

After the model and data are built from the config, the model's processor (tokenizer, chat format, image
transform, image tokens per image) is connected to the DataModule, so the YAML never repeats it. The other
commands build a config's model and data through :func:`build_cli` with ``run=False``.
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import yaml
from lightning import LightningDataModule
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.utilities import rank_zero_info

from lit_mllm.config_stack import stack_configs
from lit_mllm.lit.base import VLMModule

DESCRIPTION = """lit-mllm fit|validate|test|predict: train and evaluate multimodal LLMs from YAML.

Run `lit-mllm fit --config configs/quickstart.yaml` for a tiny model on generated data (CPU, minutes);
`lit-mllm --help` lists the other commands."""

SUBCOMMAND_KEYS = ("ckpt_path", "weights_only", "verbose", "return_predictions")
"""Keys of a run's saved ``config.yaml`` that belong to its subcommand, not to the trainer/model/data."""


class LitMLLMCLI(LightningCLI):
    """LightningCLI whose DataModule is connected to the model after both are built."""

    def instantiate_classes(self) -> None:
        super().instantiate_classes()
        connect = getattr(self.datamodule, "connect", None)
        if connect is not None:
            connect(self.model.processor())


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
        node = (
            yaml.safe_load(path.read_text()) if path.is_file() and path.suffix in (".yaml", ".yml") else None
        )
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


def build_cli(args: list[str] | None = None, run: bool = True) -> LitMLLMCLI:
    """The LightningCLI behind ``lit-mllm``; ``run=False`` parses and instantiates without a subcommand (a run's
    saved ``config.yaml`` is accepted: its subcommand keys are dropped)."""
    if args is None:  # the console script: LightningCLI would read the same list
        args = sys.argv[1:]
        warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")
    if not run:
        args = model_only_args(list(args))
    # A later --config that changes a part's class starts that part from the class's own defaults (jsonargparse
    # would keep the earlier file's options the new class also accepts); each dropped option is printed.
    args = stack_configs(args, log=rank_zero_info)
    # Frozen parts are in eval mode by design (the stage table printed at fit start says which).
    warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode at the start of training")
    # MixtureData's training stream knows its exact length per rank (workers split batches, not samples).
    warnings.filterwarnings("ignore", message=r"Your `IterableDataset` has `__len__` defined")
    return LitMLLMCLI(
        VLMModule,
        LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        args=args,
        run=run,
        save_config_kwargs={"overwrite": True},
        parser_kwargs={"description": DESCRIPTION},
        trainer_defaults={
            "logger": {
                "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                "init_args": {"save_dir": "runs"},
            }
        },
    )


def main(args: list[str] | None = None) -> LitMLLMCLI:
    """Run a LightningCLI subcommand: ``args`` starts with it (``["fit", "--config", FILE]``). None reads the
    process's command line (LightningCLI warns when given ``args`` while the process has a command line)."""
    return build_cli(args)
