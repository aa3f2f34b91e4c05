"""``lit-mllm export --config FILE [--ckpt_path CKPT] --out DIR [--format llava|safetensors]``: build the model of
a config, load trained weights into it (:func:`~lit_mllm.training.checkpoints.load_weights`) and write it as a
``transformers`` LLaVA folder or as safetensors + config (:mod:`lit_mllm.training.export`).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import yaml

from lit_mllm.commands.lightning import build_cli
from lit_mllm.training.checkpoints import load_weights
from lit_mllm.training.export import FORMATS, drop_adapters_from_config, export_llava, export_safetensors
from lit_mllm.training.peft import merge_adapters


def parser() -> argparse.ArgumentParser:
    """The export's own options; every other argument is a `lit-mllm fit` option building the model."""
    p = argparse.ArgumentParser(
        prog="lit-mllm export",
        allow_abbrev=False,
        description=(
            "Build the model of a config (--config FILE, repeatable, and any --model... option as in `lit-mllm "
            "fit`), load trained weights into it and write it out. `llava`: a transformers "
            "LlavaForConditionalGeneration folder (CLIP/SigLIP tower + 2-layer MLP connector); `safetensors`: "
            "model.safetensors + config.yaml for `lit-mllm predict --config DIR/config.yaml` (any model)."
        ),
    )
    p.add_argument("--ckpt_path", default=None, help="Lightning .ckpt or .safetensors to load; default none")
    p.add_argument("--out", required=True, help="Folder to write")
    p.add_argument("--format", choices=FORMATS, default="llava", help="Export format (default: llava)")
    return p


def main(args: list[str]) -> Path:
    """Build, load, merge LoRA adapters in place, write; return the folder written."""
    known, rest = parser().parse_known_args(args)
    cli = build_cli(rest, run=False)
    model = cli.model
    if known.ckpt_path is not None:
        load_weights(model, known.ckpt_path)
    model.eval()
    merge_adapters(model)  # in place: this model is built for the export alone (no copy needed)
    if known.format == "llava":
        return export_llava(model, known.out)
    config = yaml.safe_load(cli.parser.dump(cli.config, skip_none=False))
    drop_adapters_from_config(config["model"])  # the written config must build a model without adapters
    return export_safetensors(model, config, known.out)
