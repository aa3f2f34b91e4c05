"""Spatial connectors: pooling (MM1), C-Abstractor (Honeybee), token merging (MiniGPT-v2, pixel shuffle)."""

import pytest
import torch
import torch.nn.functional as F

from lit_mllm.nn.connectors.abstractor import CAbstractor
from lit_mllm.nn.connectors.base import Connector
from lit_mllm.nn.connectors.pooling import AttentionPoolConnector, AvgPoolConnector
from lit_mllm.nn.connectors.token_merge import ConcatNeighbours, PixelShuffle, space_to_depth

IN, OUT = 16, 24

# (factory, N, expected T): several grid sizes per connector, 576 = CLIP-L/14 at 336 px.
CASES = [
    pytest.param(lambda: AvgPoolConnector(IN, OUT, out_tokens=16), 16, 16, id="AvgPoolConnector-N16"),
    pytest.param(lambda: AvgPoolConnector(IN, OUT, out_tokens=16), 64, 16, id="AvgPoolConnector-N64"),
    pytest.param(
        lambda: AvgPoolConnector(IN, OUT, out_tokens=144, proj_depth=2), 576, 144, id="AvgPoolConnector-N576"
    ),
    pytest.param(
        lambda: AvgPoolConnector(IN, OUT, out_tokens=9), 100, 9, id="AvgPoolConnector-N100"
    ),  # non-integer pooling ratio
    pytest.param(
        lambda: AttentionPoolConnector(IN, OUT, num_queries=8, num_heads=4),
        16,
        8,
        id="AttentionPoolConnector-N16",
    ),
    pytest.param(
        lambda: AttentionPoolConnector(IN, OUT, num_queries=8, num_heads=4, proj_depth=2),
        65,
        8,
        id="AttentionPoolConnector-N65",
    ),
    pytest.param(
        lambda: AttentionPoolConnector(IN, OUT, num_queries=64, num_heads=2),
        576,
        64,
        id="AttentionPoolConnector-N576",
    ),
    pytest.param(lambda: CAbstractor(IN, OUT, out_tokens=4, depth=1), 16, 4, id="CAbstractor-N16"),
    pytest.param(
        lambda: CAbstractor(IN, OUT, out_tokens=16, depth=2, hidden_dim=8), 64, 16, id="CAbstractor-N64"
    ),
    pytest.param(
        lambda: CAbstractor(IN, OUT, out_tokens=144, depth=1, squeeze_excite=False),
        576,
        144,
        id="CAbstractor-N576",
    ),
    pytest.param(
        lambda: CAbstractor(IN, OUT, out_tokens=4, depth=0, proj_depth=1), 16, 4, id="CAbstractor-depth0-N16"
    ),
    pytest.param(lambda: ConcatNeighbours(IN, OUT), 16, 4, id="ConcatNeighbours-N16"),
    pytest.param(lambda: ConcatNeighbours(IN, OUT, group=4, proj_depth=2), 64, 16, id="ConcatNeighbours-N64"),
    pytest.param(lambda: ConcatNeighbours(IN, OUT, group=3), 576, 192, id="ConcatNeighbours-N576"),
    pytest.param(lambda: PixelShuffle(IN, OUT), 16, 4, id="PixelShuffle-N16"),
    pytest.param(lambda: PixelShuffle(IN, OUT, scale_factor=0.25), 64, 4, id="PixelShuffle-N64"),
    pytest.param(
        lambda: PixelShuffle(IN, OUT, scale_factor=1 / 3, proj_depth=1), 576, 64, id="PixelShuffle-N576"
    ),
]


@pytest.mark.parametrize("factory,n,t", CASES)
def test_shapes_gradients_determinism(factory, n, t):
    torch.manual_seed(0)
    conn: Connector = factory()
    assert conn.num_tokens(n) == t
    x = torch.randn(2, n, IN, requires_grad=True)
    y = conn(x)
    assert y.shape == (2, t, OUT)
    y.square().sum().backward()
    for name, p in conn.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert x.grad.abs().sum() > 0
    conn.eval()
    with torch.no_grad():
        assert torch.equal(conn(x), conn(x))


# ---- clear errors for impossible N and options ------------------------------------------------------


@pytest.mark.parametrize(
    "factory",
    [
        lambda: AvgPoolConnector(IN, OUT, out_tokens=4),
        lambda: CAbstractor(IN, OUT, out_tokens=4, depth=1),
        lambda: PixelShuffle(IN, OUT),
    ],
)
def test_grid_connectors_need_square_grid(factory):
    conn = factory()
    with pytest.raises(ValueError, match=r"square number of features, got 65 \(drop the CLS token"):
        conn.num_tokens(65)
    with pytest.raises(ValueError, match="square number of features, got 60$"):
        conn.num_tokens(60)
    with pytest.raises(ValueError, match="square number of features"):
        conn(torch.randn(1, 65, IN))  # forward checks too, instead of failing in a reshape


@pytest.mark.parametrize("cls", [AvgPoolConnector, CAbstractor])
def test_pooling_options_and_small_grids(cls):
    with pytest.raises(
        ValueError, match=r"needs out_tokens to be a square number \(e.g. 64, 144, 256\), got 99"
    ):
        cls(IN, OUT, out_tokens=99)
    with pytest.raises(ValueError, match="out_tokens=64, which needs at least as many features, got 36"):
        cls(IN, OUT, out_tokens=64).num_tokens(36)


def test_option_errors():
    with pytest.raises(ValueError, match="num_heads to divide the vision width 16, got 3"):
        AttentionPoolConnector(IN, OUT, num_heads=3)
    with pytest.raises(ValueError, match="num_queries >= 1"):
        AttentionPoolConnector(IN, OUT, num_queries=0)
    with pytest.raises(ValueError, match="depth >= 0"):
        CAbstractor(IN, OUT, depth=-1)
    with pytest.raises(ValueError, match="group >= 1"):
        ConcatNeighbours(IN, OUT, group=0)
    for bad in (0.3, 2.0, 0.0, -0.5):
        with pytest.raises(ValueError, match="scale_factor = 1/r for an integer r"):
            PixelShuffle(IN, OUT, scale_factor=bad)


def test_concat_and_pixel_shuffle_errors():
    with pytest.raises(ValueError, match="divisible by group=4, got 18"):
        ConcatNeighbours(IN, OUT).num_tokens(18)
    with pytest.raises(ValueError, match="divisible by group=4, got 18"):
        ConcatNeighbours(IN, OUT)(torch.randn(1, 18, IN))
    with pytest.raises(ValueError, match="grid side divisible by 2, got a 5x5 grid \\(25 features\\)"):
        PixelShuffle(IN, OUT).num_tokens(25)
    assert AttentionPoolConnector(IN, OUT, num_queries=3, num_heads=2).num_tokens(7) == 3  # any N


# ---- direct references ---------------------------------------------------------------------------------


def test_avgpool_matches_adaptive_avg_pool2d():
    torch.manual_seed(0)
    conn = AvgPoolConnector(IN, OUT, out_tokens=9)
    x = torch.randn(2, 100, IN)
    grid = x.reshape(2, 10, 10, IN).permute(0, 3, 1, 2)  # raster order: row-major
    pooled = F.adaptive_avg_pool2d(grid, 3).flatten(2).transpose(1, 2)
    torch.testing.assert_close(conn(x), conn.proj(pooled))
    # a k x k pool is a block mean: token 0 is the mean of the top-left 4x4 patches of a 16x16 grid
    conn = AvgPoolConnector(IN, OUT, out_tokens=16, proj_depth=1)
    x = torch.randn(1, 256, IN)
    expected = x.reshape(16, 16, IN)[:4, :4].mean((0, 1))
    torch.testing.assert_close(conn(x)[0, 0], conn.proj(expected))


def test_attention_pool_reference():
    torch.manual_seed(0)
    conn = AttentionPoolConnector(IN, OUT, num_queries=5, num_heads=4).eval()
    x = torch.randn(2, 12, IN)
    kv = F.layer_norm(x, (IN,), conn.norm.weight, conn.norm.bias, conn.norm.eps)
    wq, wk, wv = conn.attn.in_proj_weight.chunk(3)
    bq, bk, bv = conn.attn.in_proj_bias.chunk(3)

    def heads(t):
        return t.unflatten(-1, (4, IN // 4)).transpose(1, 2)  # [B, h, L, d]

    q = heads(F.linear(conn.queries.expand(2, -1, -1), wq, bq))
    k, v = heads(F.linear(kv, wk, bk)), heads(F.linear(kv, wv, bv))
    attn = (q @ k.transpose(-1, -2) / (IN // 4) ** 0.5).softmax(-1) @ v  # [B, h, T, d]
    pooled = conn.attn.out_proj(attn.transpose(1, 2).flatten(2))
    torch.testing.assert_close(conn(x), conn.proj(pooled), rtol=1e-5, atol=1e-5)
    # permuting the features leaves the result unchanged: the pool sees a set
    torch.testing.assert_close(conn(x[:, torch.randperm(12)]), conn(x), rtol=1e-5, atol=1e-5)


def test_cabstractor_depth0_is_avgpool_then_mlp():
    torch.manual_seed(0)
    conn = CAbstractor(IN, OUT, out_tokens=4, depth=0)
    ref = AvgPoolConnector(IN, OUT, out_tokens=4, proj_depth=2)
    ref.proj.load_state_dict(conn.readout.state_dict())
    x = torch.randn(2, 36, IN)
    torch.testing.assert_close(conn(x), ref(x))


def test_cabstractor_is_local():
    # Without squeeze-excitation (the only global mixing), a 3x3 conv stack of depth 1 before a 2x2-block
    # pooling only lets a token see its own block plus a one-patch border: far patches do not change it.
    torch.manual_seed(0)
    conn = CAbstractor(IN, OUT, out_tokens=16, depth=1, squeeze_excite=False).eval()
    x = torch.randn(1, 64, IN)
    y = conn(x)
    x2 = x.clone().reshape(8, 8, IN)
    x2[7, 7] += 10.0  # bottom-right patch
    y2 = conn(x2.reshape(1, 64, IN))
    assert torch.equal(y[0, 0], y2[0, 0])  # top-left output token: untouched
    assert not torch.equal(y[0, 15], y2[0, 15])


def test_concat_neighbours_is_sequence_concat():
    torch.manual_seed(0)
    conn = ConcatNeighbours(IN, OUT, group=4)
    x = torch.randn(2, 64, IN)
    merged = torch.cat([x[:, i::4] for i in range(4)], dim=-1)  # token 4t+i fills slot i of token t
    torch.testing.assert_close(conn(x), conn.proj(merged), rtol=0, atol=0)


def test_space_to_depth_direct_definition():
    x = torch.randn(2, 36, 5)
    y = space_to_depth(x, 3)
    grid = x.reshape(2, 6, 6, 5)
    for i in range(2):
        for j in range(2):
            block = [grid[:, 3 * i + dy, 3 * j + dx] for dy in range(3) for dx in range(3)]
            torch.testing.assert_close(y[:, 2 * i + j], torch.cat(block, -1), rtol=0, atol=0)


@pytest.mark.parametrize("side,ratio", [(4, 2), (8, 2), (24, 2), (6, 3), (8, 4)])
def test_pixel_shuffle_matches_idefics3(side, ratio):
    from transformers import Idefics3Config
    from transformers.models.idefics3.modeling_idefics3 import Idefics3Connector

    config = Idefics3Config(
        vision_config={"hidden_size": IN, "num_attention_heads": 2},
        text_config={"hidden_size": OUT, "num_attention_heads": 2, "num_key_value_heads": 2},
        scale_factor=ratio,
    )
    ref = Idefics3Connector(config)
    x = torch.randn(2, side * side, IN)
    torch.testing.assert_close(space_to_depth(x, ratio), ref.pixel_shuffle(x, ratio), rtol=0, atol=0)
    # the whole connector: Idefics3 projects with one bias-free linear layer
    ours = PixelShuffle(IN, OUT, scale_factor=1 / ratio, proj_depth=1)
    with torch.no_grad():
        ours.proj.linear_1.weight.copy_(ref.modality_projection.proj.weight)
        ours.proj.linear_1.bias.zero_()
    torch.testing.assert_close(ours(x), ref(x))


def test_pixel_shuffle_matches_internvl():
    from transformers.models.internvl.modeling_internvl import InternVLModel

    x = torch.randn(2, 64, IN)
    # InternVL's pixel_shuffle reads nothing from the model; call it on the [B, S, S, D] grid as InternVL does
    ref = InternVLModel.pixel_shuffle(None, x.reshape(2, 8, 8, IN), scale_factor=0.5).reshape(2, 16, 4 * IN)
    torch.testing.assert_close(space_to_depth(x, 2), ref, rtol=0, atol=0)


# -- C-Abstractor against its reference form -----------------------------------------------------------------------
def _ln2d(x, weight, bias, eps):
    """Channel LayerNorm of ``[B, C, H, W]``, written out: mean and biased variance over C at each position."""
    mean = x.mean(1, keepdim=True)
    var = x.var(1, unbiased=False, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps) * weight[None, :, None, None] + bias[None, :, None, None]


def reference_block(x, p: dict, eps: float = 1e-5, act_after_add: bool = True):
    """Honeybee's residual block (timm ``RegStage`` bottleneck with ratio 1, group size 1, SiLU, LayerNorm2d,
    squeeze-excitation), written from its definition; ``p`` holds the weights by their role. The activation comes
    after the residual add (``act_after_add=False``: the planted mistake of activating the branch before it)."""
    silu = F.silu
    y = silu(_ln2d(F.conv2d(x, p["w1"]), *p["n1"], eps))  # 1x1
    y = silu(_ln2d(F.conv2d(y, p["w2"], padding=1, groups=y.shape[1]), *p["n2"], eps))  # depthwise 3x3
    if "se1" in p:
        s = y.mean((2, 3), keepdim=True)
        s = torch.sigmoid(F.conv2d(silu(F.conv2d(s, *p["se1"])), *p["se2"]))
        y = y * s
    y = _ln2d(F.conv2d(y, p["w3"]), *p["n3"], eps)  # 1x1, no activation
    shortcut = _ln2d(F.conv2d(x, p["ws"]), *p["ns"], eps) if "ws" in p else x
    return silu(y + shortcut) if act_after_add else silu(y) + shortcut


def block_params(block) -> dict:
    """The weights of one of our ResBlocks by their role in :func:`reference_block`."""
    p = {
        "w1": block.conv1[0].weight,
        "n1": (block.conv1[1].weight, block.conv1[1].bias),
        "w2": block.conv2[0].weight,
        "n2": (block.conv2[1].weight, block.conv2[1].bias),
        "w3": block.conv3[0].weight,
        "n3": (block.conv3[1].weight, block.conv3[1].bias),
    }
    if not isinstance(block.se, torch.nn.Identity):
        p["se1"] = (block.se.fc1.weight, block.se.fc1.bias)
        p["se2"] = (block.se.fc2.weight, block.se.fc2.bias)
    if not isinstance(block.shortcut, torch.nn.Identity):
        p["ws"], p["ns"] = block.shortcut[0].weight, (block.shortcut[1].weight, block.shortcut[1].bias)
    return p


@pytest.mark.parametrize("squeeze_excite", [True, False])
@pytest.mark.parametrize("widths", [(8, 12), (12, 12)], ids=["shortcut-conv", "identity"])
def test_cabstractor_block_equals_hand_written_reference(squeeze_excite, widths):
    from lit_mllm.nn.connectors.abstractor import ResBlock

    torch.manual_seed(0)
    block = ResBlock(*widths, squeeze_excite=squeeze_excite).double()
    with torch.no_grad():
        for p in block.parameters():
            p.copy_(torch.randn_like(p) * 0.7)
    x = torch.randn(2, widths[0], 5, 5, dtype=torch.float64) * 2
    with torch.no_grad():
        expected = reference_block(x, block_params(block))
        torch.testing.assert_close(block(x), expected, rtol=1e-10, atol=1e-10)
        # the test tells the two orders apart: activating before the add gives other values
        before = reference_block(x, block_params(block), act_after_add=False)
        assert (before - expected).abs().max() > 0.1


def test_cabstractor_equals_hand_written_reference():
    """The whole connector: grid, ``depth`` blocks, adaptive average pool, ``depth`` blocks, tokens, MLP."""
    torch.manual_seed(0)
    conn = CAbstractor(IN, OUT, out_tokens=4, depth=2, hidden_dim=8).double()
    with torch.no_grad():
        for p in conn.parameters():
            p.copy_(torch.randn_like(p) * 0.5)
    x = torch.randn(2, 36, IN, dtype=torch.float64)
    grid = x.transpose(1, 2).reshape(2, IN, 6, 6)  # raster order: token r * 6 + c at row r, column c
    for block in conn.before:
        grid = reference_block(grid, block_params(block))
    grid = F.adaptive_avg_pool2d(grid, 2)
    for block in conn.after:
        grid = reference_block(grid, block_params(block))
    tokens = grid.flatten(2).transpose(1, 2)  # [B, 4, 8]
    mlp = conn.readout
    expected = F.linear(
        F.gelu(F.linear(tokens, mlp.linear_1.weight, mlp.linear_1.bias)),
        mlp.linear_2.weight,
        mlp.linear_2.bias,
    )
    with torch.no_grad():
        torch.testing.assert_close(conn(x), expected, rtol=1e-10, atol=1e-10)


def test_cabstractor_blocks_equal_honeybee_regstage():
    """Parity with the module Honeybee builds (timm ``RegStage(depth, in, out, stride=1, dilation=1,
    act_layer=SiLU, norm_layer=LayerNorm2d)``, adaptive pool, the same again), weights copied over."""
    timm_regnet = pytest.importorskip("timm.models.regnet")
    from timm.layers import LayerNorm2d

    torch.manual_seed(0)
    conn = CAbstractor(IN, OUT, out_tokens=4, depth=2, hidden_dim=8).double()

    def stage(c_in, c_out):
        return timm_regnet.RegStage(
            2, c_in, c_out, stride=1, dilation=1, act_layer=torch.nn.SiLU, norm_layer=LayerNorm2d
        )

    net = torch.nn.Sequential(stage(IN, 8), torch.nn.AdaptiveAvgPool2d((2, 2)), stage(8, 8)).double().eval()
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn_like(p) * 0.5)
    names = {"conv1": "conv1", "conv2": "conv2", "conv3": "conv3", "downsample": "shortcut", "se": "se"}
    ours = {}
    for ours_name, theirs in (("before", net[0]), ("after", net[2])):
        for k, block in enumerate(theirs.children()):
            for key, value in block.state_dict().items():  # conv1.conv.weight -> before.0.conv1.0.weight
                part, rest = key.split(".", 1)
                rest = rest.replace("conv.", "0.").replace("bn.", "1.")
                ours[f"{ours_name}.{k}.{names[part]}.{rest}"] = value
    missing, unexpected = conn.load_state_dict(ours, strict=False)
    assert not unexpected and all(k.startswith("readout.") for k in missing)
    x = torch.randn(2, 36, IN, dtype=torch.float64)
    grid = x.transpose(1, 2).reshape(2, IN, 6, 6)
    with torch.no_grad():
        expected = conn.readout(net(grid).flatten(2).transpose(1, 2))
        torch.testing.assert_close(conn(x), expected, rtol=1e-10, atol=1e-10)
