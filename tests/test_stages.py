"""Stages: exactly the configured parts train; frozen parts stay in eval mode and run without autograd."""

import pytest

from lit_mllm.training import Stage
from tests.conftest import tiny_model


@pytest.mark.parametrize(
    "stage,trainable",
    [
        (Stage("align", ["connector"]), {"connector"}),
        (Stage("finetune", ["connector", "language_model"]), {"connector", "language_model"}),
        (
            Stage("full", ["vision_tower", "connector", "language_model"]),
            {"vision_tower", "connector", "language_model"},
        ),
    ],
)
def test_trainable_parts_are_exactly_the_stage(stage, trainable):
    model = tiny_model(stage)
    for name, part in model.parts().items():
        flags = {p.requires_grad for p in part.parameters()}
        assert flags == {name in trainable}, name
    model.train()  # what Lightning calls after validation
    for name, part in model.parts().items():
        assert all(m.training == (name in trainable) for m in part.modules()), name
    opt = model.configure_optimizers()
    in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
    assert in_opt == {id(p) for p in model.parameters() if p.requires_grad}


def test_frozen_tower_runs_without_autograd(batch):
    model = tiny_model(Stage("align", ["connector"]))
    model.train()
    seen = {}

    def hook(module, inputs, output):
        seen["grad"] = output.requires_grad

    model.vision_tower.register_forward_hook(hook)
    loss = model.encode_images(batch["pixel_values"]).square().mean()
    loss.backward()
    assert seen["grad"] is False
    assert all(p.grad is not None for p in model.connector.parameters())


def test_unknown_part_names_the_valid_ones():
    with pytest.raises(
        ValueError,
        match=r"unknown part\(s\) \['llm'\]; valid parts: \['connector', 'language_model', 'vision_tower'\]",
    ):
        tiny_model(Stage("x", ["llm"]))


def test_nothing_to_train_is_an_error():
    with pytest.raises(ValueError, match="leaves nothing to train"):
        tiny_model(Stage("none", [])).configure_optimizers()


def test_table_lists_every_part():
    from lit_mllm.training.stages import count, trainable_table

    model = tiny_model(Stage("align", ["connector"]))
    table = trainable_table(model.parts(), model.stage)
    assert "stage 'align': trains connector" in table
    total, trainable = count(model.connector)
    assert f"{total:,}" in table and trainable == total
    for name in ("vision_tower", "connector", "language_model"):
        assert name in table
