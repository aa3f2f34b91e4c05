"""The ``lit-mllm`` command.

    lit-mllm fit|validate|test|predict --config FILE   LightningCLI over a family module and a DataModule
    lit-mllm describe --config FILE                    parameters per part, image tokens, connector FLOPs
    lit-mllm validate-data --config FILE               every record processed; problems per reason, named
    lit-mllm export --config FILE --ckpt_path CKPT --out DIR   a transformers LLaVA folder, or safetensors
    lit-mllm estimate-memory --config FILE             weights / gradients / optimizer / activations, per part
    lit-mllm data shapesworld --out DIR                write the generated ShapesWorld dataset

After the model and data are built from the config, the model's processor (tokenizer, chat format,
image transform, image tokens per image) is connected to the DataModule, so the YAML never repeats it.
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import yaml
from lightning import LightningDataModule
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.utilities import rank_zero_info

from lit_mllm.lit.base import VLMModule

try:  # attribute docstrings (dataclass fields such as Stage.trainable) become --help text
    from jsonargparse import set_parsing_settings

    set_parsing_settings(docstring_parse_attribute_docstrings=True)
except ImportError:  # jsonargparse < 4.35
    from jsonargparse import set_docstring_parse_options

    set_docstring_parse_options(attribute_docstrings=True)

DESCRIPTION = """lit-mllm: train and evaluate multimodal LLMs from YAML.

Run `lit-mllm fit --config configs/quickstart.yaml` for a tiny model on generated data (CPU, minutes).
Other commands: `lit-mllm describe --config FILE` prints what a config builds (parameters per part, image
tokens per image, connector FLOPs per image); `lit-mllm validate-data --config FILE` processes every record of
the config's data and reports problems per reason; `lit-mllm estimate-memory --config FILE` breaks a training
step's memory into weights, gradients, optimizer states and activations; `lit-mllm export --help` writes a
trained model as a transformers LLaVA folder or safetensors; `lit-mllm data shapesworld --help` writes the
ShapesWorld dataset."""


class LitMLLMCLI(LightningCLI):
    """LightningCLI whose DataModule is connected to the model after both are built."""

    def instantiate_classes(self) -> None:
        super().instantiate_classes()
        connect = getattr(self.datamodule, "connect", None)
        if connect is not None:
            connect(self.model.processor())


def data_main(args: list[str]) -> None:
    from jsonargparse import CLI

    from lit_mllm.data.shapesworld import write_shapesworld

    CLI({"shapesworld": write_shapesworld}, args=args, prog="lit-mllm data", description="Write datasets.")


SUBCOMMAND_KEYS = ("ckpt_path", "weights_only", "verbose", "return_predictions")


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
    if not run and args is not None:
        args = model_only_args(list(args))
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


def describe_main(args: list[str]) -> dict:
    """Build the model of a config (no data, no training) and print the figures runs are compared on."""
    from lit_mllm.training.stages import trainable_table

    cli = build_cli(args, run=False)
    model = cli.model
    facts = model.describe()
    print(trainable_table(model.parts(), model.stage))
    width = max(map(len, facts))
    for key, value in facts.items():
        if not key.startswith("params"):
            print(f"{key:<{width}}  {value:,}" if isinstance(value, int) else f"{key:<{width}}  {value}")
    return facts


def run(args: list[str] | None = None) -> object:
    """Run a ``lit-mllm`` command and return what it built (the CLI, the describe figures, a report, or None)."""
    argv = sys.argv[1:] if args is None else list(args)
    if argv[:1] == ["data"]:
        data_main(argv[1:])
        return None
    if argv[:1] == ["describe"]:
        return describe_main(argv[1:])
    if argv[:1] == ["estimate-memory"]:
        from lit_mllm.training.memory import estimate_memory_main

        return estimate_memory_main(argv[1:])
    if argv[:1] == ["export"]:
        from lit_mllm.training.export import export_main

        return export_main(argv[1:])
    if argv[:1] == ["validate-data"]:
        from lit_mllm.data.validate import validate_main

        return validate_main(argv[1:])
    return build_cli(args)


def main(args: list[str] | None = None) -> None:
    """The console script: exits 0 on success (returning an object would make ``sys.exit`` print it and exit 1)."""
    run(args)


if __name__ == "__main__":
    main()
