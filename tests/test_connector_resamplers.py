"""Resampler connectors: Perceiver Resampler (parity with transformers' Idefics2 perceiver) and Qwen-VL resampler."""

import inspect
import math

import pytest
import torch
import torch.nn.functional as F

from lit_mllm.nn.connectors.perceiver import (
    PerceiverResampler,
    idefics2_perceiver_kwargs,
    idefics2_perceiver_state_dict,
)
from lit_mllm.nn.connectors.resampler import QwenVLResampler, resize_pos_embed, sincos_2d_pos_embed

IDEFICS2_LIKE = dict(norm="rmsnorm", mlp="swiglu", num_kv_heads=1, time_embedding=False, project_out=False)

# (factory, feature counts N to try); in_dim 24, out_dim 40 unless the variant needs equal widths
CASES = {
    "perceiver": (
        lambda: PerceiverResampler(24, 40, num_latents=5, num_layers=2, num_heads=2, head_dim=8),
        [1, 7, 16],
    ),
    "perceiver-hidden": (
        lambda: PerceiverResampler(
            24, 40, num_latents=3, num_layers=1, hidden_size=16, num_heads=4, head_dim=4
        ),
        [2, 9],
    ),
    "perceiver-idefics2-like": (
        lambda: PerceiverResampler(
            40, 40, num_latents=4, num_layers=2, num_heads=2, head_dim=8, **IDEFICS2_LIKE
        ),
        [5, 12],
    ),
    "qwen": (lambda: QwenVLResampler(24, 40, num_queries=9, num_heads=4), [1, 4, 9, 16]),
    "qwen-hidden": (lambda: QwenVLResampler(24, 40, num_queries=4, hidden_size=24), [9, 25]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_contract(case):
    factory, counts = CASES[case]
    torch.manual_seed(0)
    conn = factory()
    for n in counts:
        conn.zero_grad()
        x = torch.randn(3, n, conn.in_dim, requires_grad=True)
        y = conn(x)
        assert y.shape == (3, conn.num_tokens(n), conn.out_dim)
        y.square().sum().backward()
        assert x.grad.abs().sum() > 0
        for name, p in conn.named_parameters():
            assert p.grad is not None and p.grad.abs().sum() > 0, f"no gradient reaches {name} (N={n})"
        conn.eval()
        with torch.no_grad():
            assert torch.equal(conn(x), conn(x))  # deterministic in eval mode
            # samples do not interact
            torch.testing.assert_close(conn(x[1:2]), conn(x)[1:2], rtol=1e-5, atol=1e-5)
        conn.train()


def test_num_tokens_is_fixed():
    assert PerceiverResampler(8, 8, num_latents=7).num_tokens(1) == 7
    assert PerceiverResampler(8, 8, num_latents=7).num_tokens(577) == 7
    assert QwenVLResampler(8, 8, num_queries=16).num_tokens(576) == 16
    assert QwenVLResampler(8, 8).num_tokens(1024) == 256  # Qwen-VL: 448px / 14 = 32 x 32 features -> 256


# ---------------------------------------------------------------- Perceiver Resampler


def _idefics2_reference(num_kv_heads):
    from transformers import Idefics2PerceiverConfig
    from transformers.models.idefics2.modeling_idefics2 import Idefics2PerceiverResampler

    config = Idefics2PerceiverConfig(
        hidden_size=48,
        resampler_n_latents=6,
        resampler_depth=2,
        resampler_n_heads=4,
        resampler_head_dim=12,
        num_key_value_heads=num_kv_heads,
    )
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    ref = Idefics2PerceiverResampler(config).eval()
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if p.dim() == 1 or name == "latents":  # norm weights / latents start constant: make them distinct
                p.copy_(torch.randn_like(p))
            p.mul_(3.0)  # the random init is small; scale up so a mismatch could not hide under the tolerance
    return config, ref


@pytest.mark.parametrize("num_kv_heads", [2, 4])  # grouped-query and plain multi-head attention
def test_perceiver_matches_idefics2(num_kv_heads):
    config, ref = _idefics2_reference(num_kv_heads)
    ours = PerceiverResampler(48, 48, **idefics2_perceiver_kwargs(config)).eval()
    prefix = "model.connector.perceiver_resampler."
    checkpoint = {prefix + k: v for k, v in ref.state_dict().items()} | {"model.other.weight": torch.zeros(1)}
    ours.load_state_dict(idefics2_perceiver_state_dict(checkpoint, prefix=prefix), strict=True)

    x = torch.randn(2, 11, 48)
    with torch.no_grad():
        expected = ref(context=x, attention_mask=torch.ones(2, 11, dtype=torch.long))
        actual = ours(x)
    assert expected.abs().max() > 1  # the comparison is not between near-zero tensors
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)


def test_perceiver_is_permutation_invariant_over_features():
    # Flamingo's resampler carries no spatial position of its own: positions come from the vision tower only
    torch.manual_seed(0)
    conn = PerceiverResampler(16, 12, num_latents=4, num_layers=2, num_heads=2, head_dim=8).eval()
    with torch.no_grad():
        conn.time_embed.normal_()
        x = torch.randn(2, 10, 16)
        torch.testing.assert_close(conn(x[:, torch.randperm(10)]), conn(x), rtol=1e-5, atol=1e-5)


def test_perceiver_options_and_errors():
    conn = PerceiverResampler(24, 40)
    assert len(conn.layers) == 6 and conn.latents.shape == (64, 24) and conn.time_embed.shape == (1, 24)
    assert isinstance(conn.layers[0].norm_media, torch.nn.LayerNorm)
    assert isinstance(conn.in_proj, torch.nn.Identity)
    with pytest.raises(ValueError, match="num_heads divisible by num_kv_heads"):
        PerceiverResampler(8, 8, num_heads=4, num_kv_heads=3)
    with pytest.raises(ValueError, match="project_out=False needs hidden_size == out_dim"):
        PerceiverResampler(8, 16, project_out=False)
    with pytest.raises(ValueError, match="num_latents >= 1"):
        PerceiverResampler(8, 8, num_latents=0)
    with pytest.raises(ValueError, match="at least one feature"):
        conn.num_tokens(0)


# ---------------------------------------------------------------- Qwen-VL resampler


def test_sincos_table_matches_direct_formula():
    dim, side = 12, 3
    table = sincos_2d_pos_embed(dim, side)
    quarter = dim // 4
    for row in range(side):
        for col in range(side):
            expected = []
            for coord in (col, row):  # first half: column (x); second half: row (y), as MAE / Qwen-VL
                freqs = [coord / 10000 ** (k / quarter) for k in range(quarter)]
                expected += [math.sin(f) for f in freqs] + [math.cos(f) for f in freqs]
            torch.testing.assert_close(table[row * side + col], torch.tensor(expected), rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="divisible by 4"):
        sincos_2d_pos_embed(10, 2)


def test_resize_pos_embed():
    table = sincos_2d_pos_embed(8, 4)
    assert resize_pos_embed(table, 4) is table
    assert resize_pos_embed(table, 7).shape == (49, 8)
    # channel 4 is sin(row): a channel that depends on the row only stays constant along each resized row
    grid = resize_pos_embed(table, 6).reshape(6, 6, 8)
    torch.testing.assert_close(grid[:, :, 4], grid[:, :1, 4].expand(6, 6))


def qwen_get_abs_pos(abs_pos, tgt_size: int):
    """Qwen-VL's ``get_abs_pos`` (visual.py), restated: ``[L, C]`` table, target token count ``M`` -> ``[M, C]``,
    bicubic ``F.interpolate`` (``align_corners=False``, no antialias) of the square grid in fp32, back to the
    table's dtype; the table itself when the sides agree."""
    src, tgt = int(math.sqrt(abs_pos.size(0))), int(math.sqrt(tgt_size))
    if src == tgt:
        return abs_pos
    grid = abs_pos.float().reshape(1, src, src, -1).permute(0, 3, 1, 2)  # [1, C, src, src]
    out = F.interpolate(grid, size=(tgt, tgt), mode="bicubic", align_corners=False)
    return out.permute(0, 2, 3, 1).flatten(0, 2).to(abs_pos.dtype)


@pytest.mark.parametrize("src,side", [(4, 7), (4, 6), (5, 3), (16, 24), (3, 3)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_resize_pos_embed_equals_qwen_get_abs_pos(src, side, dtype):
    """On a random table (so a transposed grid or swapped halves would show), up- and downsampling."""
    torch.manual_seed(0)
    table = torch.randn(src * src, 8).to(dtype)
    resized = resize_pos_embed(table, side)
    expected = qwen_get_abs_pos(table, side * side)
    assert resized.dtype == dtype and resized.shape == (side * side, 8)
    torch.testing.assert_close(resized, expected, rtol=0, atol=0)
    if src != side:  # the reference is not met by other resizes: bilinear, corner-aligned, or antialiased
        grid = table.float().reshape(1, src, src, 8).permute(0, 3, 1, 2)
        for kwargs in (
            {"mode": "bilinear", "align_corners": False},
            {"mode": "bicubic", "align_corners": True},
            {"mode": "bicubic", "align_corners": False, "antialias": True},
        ):
            other = F.interpolate(grid, size=(side, side), **kwargs).permute(0, 2, 3, 1).reshape(-1, 8)
            assert (other.to(dtype).float() - expected.float()).abs().max() > 1e-3, kwargs


def test_qwen_forward_matches_direct_formula():
    torch.manual_seed(0)
    conn = QwenVLResampler(12, 20, num_queries=4, hidden_size=16, num_heads=2).eval()
    for p in conn.parameters():
        with torch.no_grad():
            p.add_(torch.randn_like(p) * 0.5)
    x = torch.randn(2, 9, 12)

    heads, d = 2, 8
    w_q, w_k, w_v = conn.attn.in_proj_weight.chunk(3)
    b_q, b_k, b_v = conn.attn.in_proj_bias.chunk(3)
    kv = F.layer_norm(x @ conn.kv_proj.weight.T, (16,), conn.ln_kv.weight, conn.ln_kv.bias, 1e-6)
    q = F.layer_norm(conn.query, (16,), conn.ln_q.weight, conn.ln_q.bias, 1e-6) + sincos_2d_pos_embed(16, 2)
    k = kv + qwen_get_abs_pos(sincos_2d_pos_embed(16, 2), 9)  # position on the keys only (Qwen-VL's resize)
    qh = (q @ w_q.T + b_q).view(4, heads, d).transpose(0, 1)  # [h, Q, d]
    kh = (k @ w_k.T + b_k).view(2, 9, heads, d).transpose(1, 2)  # [B, h, N, d]
    vh = (kv @ w_v.T + b_v).view(2, 9, heads, d).transpose(1, 2)
    attn = torch.softmax(qh @ kh.transpose(-1, -2) / math.sqrt(d), dim=-1) @ vh  # [B, h, Q, d]
    z = attn.transpose(1, 2).reshape(2, 4, 16) @ conn.attn.out_proj.weight.T + conn.attn.out_proj.bias
    expected = F.layer_norm(z, (16,), conn.ln_post.weight, conn.ln_post.bias, 1e-6) @ conn.proj.weight.T
    with torch.no_grad():
        torch.testing.assert_close(conn(x), expected.detach(), rtol=1e-5, atol=1e-5)


def test_qwen_position_comes_from_the_pos_embed():
    torch.manual_seed(0)
    conn = QwenVLResampler(8, 8, num_queries=4, num_heads=2).eval()
    x = torch.randn(1, 16, 8)
    flipped = x.view(1, 4, 4, 8).transpose(1, 2).reshape(1, 16, 8)  # same features, transposed grid
    with torch.no_grad():
        assert not torch.allclose(conn(flipped), conn(x), atol=1e-4)
        conn.pos_embed.zero_()  # without positions a single cross-attention is order-invariant over features
        torch.testing.assert_close(conn(flipped), conn(x), rtol=1e-5, atol=1e-5)


def test_qwen_options_and_errors():
    conn = QwenVLResampler(24, 256)
    # width defaults to the LLM width, heads to width // 128, as in Qwen-VL
    assert conn.query.shape == (256, 256) and conn.attn.num_heads == 2
    assert isinstance(conn.kv_proj, torch.nn.Linear)
    assert "pos_embed" not in conn.state_dict()
    with pytest.raises(ValueError, match="num_queries to be a square"):
        QwenVLResampler(8, 8, num_queries=10)
    with pytest.raises(ValueError, match="divisible by num_heads"):
        QwenVLResampler(8, 12, num_queries=4, num_heads=5)
    with pytest.raises(ValueError, match="divisible by 4"):
        QwenVLResampler(8, 10, num_queries=4, num_heads=1)
    small = QwenVLResampler(8, 8, num_queries=4, num_heads=2)
    for n in (0, 10, 577):  # 577 = 24 x 24 patches + CLS
        with pytest.raises(ValueError, match="square number of features"):
            small.num_tokens(n)
    with pytest.raises(ValueError, match="square number of features"):
        small(torch.randn(1, 10, 8))


def test_help_text_documents_every_option():
    from jsonargparse import ArgumentParser

    for cls in (PerceiverResampler, QwenVLResampler):
        parser = ArgumentParser()
        parser.add_class_arguments(cls, "c", skip={"in_dim", "out_dim"})
        actions = {a.dest: a for a in parser._actions if a.dest.startswith("c.")}
        assert len(actions) == len(inspect.signature(cls).parameters) - 2
        for dest, action in actions.items():
            assert action.help, f"{cls.__name__}: {dest} has no description in the Args: section"
