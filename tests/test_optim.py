"""Optimizer groups (per-part lr scale from YAML, no decay on norms / biases / embeddings) and the NaN guard."""

from pathlib import Path

import pytest
import torch
from torch import nn

from lit_mllm.commands.lightning import build_cli
from lit_mllm.training import Stage
from tests.conftest import tiny_model

QUICKSTART = str(Path(__file__).resolve().parents[1] / "configs" / "quickstart.yaml")


def test_lr_scale_from_yaml_reaches_the_optimizer(tmp_path, shapes_root):
    stage = tmp_path / "stage.yaml"
    stage.write_text(
        "name: cogvlm_like\ntrainable: [connector, language_model]\nlr_scale: {language_model: 0.1}\n"
    )
    cli = build_cli(
        [
            "--config",
            QUICKSTART,
            "--model.init_args.stage",
            str(stage),
            "--model.init_args.scheduler",
            "null",
            "--model.init_args.optimizer.init_args.weight_decay",
            "0.05",
            "--data.init_args.root",
            str(shapes_root),
            "--trainer.logger.init_args.save_dir",
            str(tmp_path),
        ],
        run=False,
    )
    optimizer = cli.model.configure_optimizers()
    lrs = {(g["part"], g["weight_decay"]): g["lr"] for g in optimizer.param_groups}
    assert lrs == {
        ("connector", 0.05): 1e-3,
        ("connector", 0.0): 1e-3,
        ("language_model", 0.05): pytest.approx(1e-4),
        ("language_model", 0.0): pytest.approx(1e-4),
    }


def test_no_decay_on_norms_biases_and_embeddings():
    model = tiny_model(Stage("all", ["vision_tower", "connector", "language_model"]))
    model.optimizer = lambda params: torch.optim.AdamW(params, lr=1e-3, weight_decay=0.1)
    optimizer = model.configure_optimizers()
    where = {id(p): g["weight_decay"] for g in optimizer.param_groups for p in g["params"]}
    assert len(where) == sum(1 for p in model.parameters() if p.requires_grad)  # each trainable param once
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if id(p) not in where:
                continue
            no_decay = (
                p.ndim < 2
                or isinstance(module, (nn.Embedding, nn.LayerNorm))
                or "norm" in type(module).__name__.lower()
            )
            assert where[id(p)] == (0.0 if no_decay else 0.1), (type(module).__name__, name)
    assert {g["weight_decay"] for g in optimizer.param_groups} == {0.0, 0.1}


def test_nan_loss_stops_with_the_sample_ids(batch):
    model = tiny_model()
    with torch.no_grad():
        model.language_model.model.lm_head.weight.fill_(float("nan"))
    with pytest.raises(
        FloatingPointError, match=r"training loss is nan at step 0 on samples \['train_000000'"
    ):
        model.training_step(batch, 0)


def test_lr_scale_for_an_unknown_part_is_refused():
    with pytest.raises(ValueError, match=r"unknown part\(s\) \['llm'\]"):
        tiny_model(Stage("x", ["connector"], lr_scale={"llm": 0.1}))
