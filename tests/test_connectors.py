"""Connector contract and parity with transformers' LLaVA projector."""

import pytest
import torch

from lit_mllm.nn.connectors import Connector, LinearConnector, MLPConnector

CONNECTORS = [LinearConnector, MLPConnector]


@pytest.mark.parametrize("cls", CONNECTORS)
def test_contract(cls):
    torch.manual_seed(0)
    conn: Connector = cls(24, 40)
    x = torch.randn(3, 16, 24, requires_grad=True)
    y = conn(x)
    assert y.shape == (3, conn.num_tokens(16), 40)
    y.square().sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in conn.parameters())
    assert torch.equal(conn(x), conn(x))  # deterministic


def test_mlp_matches_llava_projector():
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig
    from transformers.models.llava.modeling_llava import LlavaMultiModalProjector

    config = LlavaConfig(
        vision_config=CLIPVisionConfig(hidden_size=24, num_attention_heads=4),
        text_config=LlamaConfig(hidden_size=40, num_attention_heads=4, num_key_value_heads=4),
        projector_hidden_act="gelu",
    )
    ref = LlavaMultiModalProjector(config)
    ours = MLPConnector(24, 40)
    ours.load_state_dict(ref.state_dict())  # same parameter names: linear_1, linear_2
    x = torch.randn(2, 9, 24)
    torch.testing.assert_close(ours(x), ref(x), rtol=0, atol=0)


def test_mlp_depth_validation():
    with pytest.raises(ValueError, match="depth >= 1"):
        MLPConnector(4, 4, depth=0)
    assert len([m for m in MLPConnector(4, 8, depth=3).modules() if isinstance(m, torch.nn.Linear)]) == 3
