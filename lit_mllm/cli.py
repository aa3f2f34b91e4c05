"""The ``lit-mllm`` command.

    lit-mllm fit|validate|test|predict --config FILE   LightningCLI over a family module and a DataModule
    lit-mllm describe --config FILE                    parameters per part, image tokens, connector FLOPs
    lit-mllm data shapesworld --out DIR                write the generated ShapesWorld dataset

After the model and data are built from the config, the model's processor (tokenizer, chat format,
image transform, image tokens per image) is connected to the DataModule, so the YAML never repeats it.
"""

from __future__ import annotations

import sys
import warnings

from lightning import LightningDataModule
from lightning.pytorch.cli import LightningCLI

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
tokens per image, connector FLOPs per image); `lit-mllm data shapesworld --help` writes the ShapesWorld
dataset."""


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


def build_cli(args: list[str] | None = None, run: bool = True) -> LitMLLMCLI:
    """The LightningCLI behind ``lit-mllm``; ``run=False`` parses and instantiates without a subcommand."""
    # Frozen parts are in eval mode by design (the stage table printed at fit start says which).
    warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode at the start of training")
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


def run(args: list[str] | None = None) -> LitMLLMCLI | dict | None:
    """Run a ``lit-mllm`` command and return what it built (the CLI, the describe figures, or None)."""
    argv = sys.argv[1:] if args is None else list(args)
    if argv[:1] == ["data"]:
        data_main(argv[1:])
        return None
    if argv[:1] == ["describe"]:
        return describe_main(argv[1:])
    return build_cli(args)


def main(args: list[str] | None = None) -> None:
    """The console script: exits 0 on success (returning an object would make ``sys.exit`` print it and exit 1)."""
    run(args)


if __name__ == "__main__":
    main()
