"""Stages: exactly the configured parts train; frozen parts stay in eval mode and run without autograd."""

import pytest
import torch

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


def test_train_last_blocks_of_the_tower(shapes_root):
    """POINTS' recipe: only the last N blocks of the vision tower train; they alone are in train mode and get
    gradients, the tower runs with autograd, the rest of it stays frozen in eval mode."""
    from lit_mllm.data import collate, read_llava
    from lit_mllm.lit import PrefixFusionVLM
    from lit_mllm.nn.language import TinyLlama
    from lit_mllm.nn.vision import TinyCLIPVision
    from lit_mllm.training.stages import trainable_table

    torch.manual_seed(0)
    tower = TinyCLIPVision(
        image_size=32, patch_size=8, hidden_size=32, num_layers=3, num_heads=2, feature_layer=-1
    )
    stage = Stage("pretrain", ["connector"], train_last_blocks={"vision_tower": 2})
    model = PrefixFusionVLM(tower, TinyLlama(hidden_size=64, num_layers=2), stage=stage)
    first, *last = list(tower.blocks)
    trained = {id(p) for b in last for p in b.parameters()}
    assert trained and all(p.requires_grad == (id(p) in trained) for p in tower.parameters())
    model.train()
    assert not first.training and not tower.model.embeddings.training and all(b.training for b in last)
    assert "last 2 blocks of vision_tower" in trainable_table(model.parts(), stage)
    assert "partial" in trainable_table(model.parts(), stage)

    proc = model.processor()
    batch = collate(
        [proc(s) for s in read_llava(shapes_root / "train.json")[:2]], proc.tokenizer.pad_token_id
    )
    model.training_step(batch, 0).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for b in last for p in b.parameters())
    assert all(p.grad is None for p in first.parameters())
    opt = model.configure_optimizers()
    assert {id(p) for g in opt.param_groups for p in g["params"]} == {
        id(p) for p in model.parameters() if p.requires_grad
    }


def test_train_last_blocks_errors():
    with pytest.raises(ValueError, match="in both trainable"):
        tiny_model(Stage("x", ["vision_tower"], train_last_blocks={"vision_tower": 1}))
    with pytest.raises(ValueError, match=r"unknown part\(s\) \['tower'\]"):
        tiny_model(Stage("x", ["connector"], train_last_blocks={"tower": 1}))
    with pytest.raises(ValueError, match="has no transformer blocks"):
        tiny_model(Stage("x", ["vision_tower"], train_last_blocks={"connector": 1}))
    with pytest.raises(ValueError, match="last 5 blocks"):
        tiny_model(Stage("x", ["connector"], train_last_blocks={"vision_tower": 5}))
