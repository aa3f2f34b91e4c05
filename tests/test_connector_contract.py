"""One contract for every connector (found by subclass discovery, so a new connector is covered by existing):
declared T, shape, gradients to every trainable parameter, determinism, FLOP counting, and a training step
inside the prefix family built from YAML-style ``class_path`` arguments."""

import pytest
import torch

import lit_mllm.nn.connectors as connectors
from lit_mllm.nn.connectors import Connector, connector_flops


def all_connectors() -> list[type[Connector]]:
    found, todo = [], list(Connector.__subclasses__())
    while todo:
        cls = todo.pop()
        found.append(cls)
        todo += cls.__subclasses__()
    return sorted({c for c in found if c.__module__.startswith("lit_mllm.")}, key=lambda c: c.__name__)


# Small options for the heavy defaults (BLIP-2's 12-layer Q-Former, Qwen-VL's 256 queries, ...); every other
# connector runs with its defaults at N = 64 (an 8 x 8 grid).
SMALL = {
    "AvgPoolConnector": {"out_tokens": 16},
    "AttentionPoolConnector": {"num_queries": 16, "num_heads": 4},
    "CAbstractor": {"out_tokens": 16, "depth": 1},
    "QFormerConnector": {
        "num_queries": 8,
        "num_layers": 2,
        "hidden_size": 32,
        "num_heads": 4,
        "intermediate_size": 64,
    },
    "PerceiverResampler": {"num_latents": 8, "num_layers": 2, "num_heads": 2, "head_dim": 16},
    "QwenVLResampler": {"num_queries": 16, "num_heads": 4},
}
N, D_IN, D_OUT = 64, 32, 48


@pytest.fixture(params=all_connectors(), ids=lambda c: c.__name__)
def cls(request):
    return request.param


def test_every_connector_is_exported(cls):
    assert getattr(connectors, cls.__name__) is cls


def test_contract(cls):
    torch.manual_seed(0)
    conn = cls(D_IN, D_OUT, **SMALL.get(cls.__name__, {}))
    x = torch.randn(2, N, D_IN, requires_grad=True)
    y = conn(x)
    assert y.shape == (2, conn.num_tokens(N), D_OUT)
    y.square().mean().backward()
    silent = [
        n for n, p in conn.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.any())
    ]
    assert not silent, f"no gradient reaches {silent}"
    conn.eval()
    with torch.no_grad():
        torch.testing.assert_close(conn(x), conn(x), rtol=0, atol=0)
    assert connector_flops(conn, N) > 0


def test_trains_inside_the_prefix_family(cls, shapes_root):
    """Built the way the CLI builds it (a factory called with the tower and LLM widths), one training step on
    ShapesWorld with the image tokens expanded to this connector's T."""
    from functools import partial

    from lit_mllm.data import collate, read_llava
    from lit_mllm.lit import PrefixFusionVLM
    from lit_mllm.nn.language import TinyLlama
    from lit_mllm.nn.vision import TinyCLIPVision

    torch.manual_seed(0)
    model = PrefixFusionVLM(
        TinyCLIPVision(image_size=32, patch_size=8, hidden_size=32, num_layers=2, num_heads=2),  # N = 16
        TinyLlama(hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2),
        connector=partial(cls, **SMALL.get(cls.__name__, {})),
    )
    proc = model.processor()
    batch = collate(
        [proc(s) for s in read_llava(shapes_root / "train.json")[:2]], proc.tokenizer.pad_token_id
    )
    assert int((batch["input_ids"] == proc.image_token_id).sum()) == 2 * model.tokens_per_image
    loss = model.training_step(batch, 0)
    loss.backward()
    assert loss.isfinite() and all(
        p.grad is not None for p in model.connector.parameters() if p.requires_grad
    )
