"""Perceiver Resampler connector (Flamingo, Alayrac et al. 2022): learned latents cross-attend to the features.

Any number ``N`` of vision features becomes ``num_latents`` tokens. Each block lets the latents attend to the
concatenation of the (normed) features and the (normed) latents themselves, then applies a feed-forward, both
pre-norm with residuals; a final norm and a projection to the LLM width close it::

    x = in_proj(features) + time_embed                          # [B, N, H]
    z = latents                                                 # [B, R, H]
    for each block:
        z = z + attn(q=norm_latents(z), kv=[norm_media(x), norm_latents(z)])
        z = z + ff(norm_ff(z))
    out = proj(norm(z))                                         # [B, R, out_dim]

Defaults are Flamingo's layout with OpenFlamingo's sizes (Awadalla et al. 2023): LayerNorms, a GELU
feed-forward 4x wide, 8 heads of 64, 6 blocks, 64 latents, no biases inside the blocks. Flamingo adds a learned
time embedding per video frame before flattening; a connector sees one image per call, so that embedding has
length 1 here (one learned vector added to every feature, zero-initialised) and ``time_embedding=False``
drops it. Multi-frame inputs ``[B, frames, N, D]`` are outside the connector contract.

The typed options also select the Idefics2 variant (Laurençon et al. 2024; ``Idefics2PerceiverResampler`` in
transformers), which this module reproduces exactly with copied weights: :func:`idefics2_perceiver_kwargs` gives
the options for an ``Idefics2PerceiverConfig`` and :func:`idefics2_perceiver_state_dict` renames its weights.
Idefics2 differs from Flamingo in:

- RMSNorm (weight only, eps 1e-6) instead of LayerNorm (``norm="rmsnorm"``);
- a SwiGLU feed-forward (``gate_proj``, ``up_proj``, ``down_proj``, SiLU) instead of GELU (``mlp="swiglu"``);
- grouped-query attention, fewer key/value heads than query heads (``num_kv_heads``);
- no time embedding (``time_embedding=False``);
- widths: Idefics2 maps vision features to the LLM width with its own SwiGLU MLP *before* the perceiver and
  has no projection after it. Here the input projection is one ``Linear`` (only when ``in_dim != hidden_size``)
  and the output projection is optional (``project_out=False`` needs ``hidden_size == out_dim``), so the
  parity configuration is ``in_dim == hidden_size == out_dim``;
- a padding mask over the features (NaViT-style padded patches): a connector receives only valid features,
  so no mask is taken here (Idefics2 with an all-ones mask is what this reproduces);
- latents initialised to ones (Idefics2) rather than a standard normal (here, as in Flamingo implementations).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lit_mllm.nn.connectors.base import Connector


class RMSNorm(nn.Module):
    """Root-mean-square norm with a learned scale, computed in fp32 and cast back (as Llama/Idefics2)."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


def _norm(kind: str, dim: int, eps: float) -> nn.Module:
    return RMSNorm(dim, eps) if kind == "rmsnorm" else nn.LayerNorm(dim, eps=eps)


class PerceiverAttention(nn.Module):
    """Latents as queries; keys/values from ``[features, latents]``; ``num_kv_heads`` <= ``num_heads`` (GQA)."""

    def __init__(self, dim: int, num_heads: int, head_dim: int, num_kv_heads: int) -> None:
        super().__init__()
        self.num_heads, self.head_dim, self.num_kv_heads = num_heads, head_dim, num_kv_heads
        self.q_proj = nn.Linear(dim, num_heads * head_dim, bias=False)
        self.k_proj = nn.Linear(dim, num_kv_heads * head_dim, bias=False)
        self.v_proj = nn.Linear(dim, num_kv_heads * head_dim, bias=False)
        self.o_proj = nn.Linear(num_heads * head_dim, dim, bias=False)

    def forward(self, latents: Tensor, media: Tensor) -> Tensor:
        b, r, _ = latents.shape  # [B, R, H], already normed
        kv = torch.cat([media, latents], dim=1)  # [B, N + R, H]
        s = kv.shape[1]
        q = self.q_proj(latents).view(b, r, self.num_heads, self.head_dim).transpose(1, 2)  # [B, h, R, d]
        k = self.k_proj(kv).view(b, s, self.num_kv_heads, self.head_dim).transpose(1, 2)  # [B, g, N + R, d]
        v = self.v_proj(kv).view(b, s, self.num_kv_heads, self.head_dim).transpose(1, 2)  # [B, g, N + R, d]
        if self.num_kv_heads != self.num_heads:  # key/value head j serves query heads j*rep .. (j+1)*rep - 1
            rep = self.num_heads // self.num_kv_heads
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)  # [B, h, N + R, d]
        out = F.scaled_dot_product_attention(q, k, v)  # [B, h, R, d], scale head_dim ** -0.5
        return self.o_proj(out.transpose(1, 2).reshape(b, r, self.num_heads * self.head_dim))  # [B, R, H]


class GELUFeedForward(nn.Module):
    """Flamingo's feed-forward: ``Linear -> GELU -> Linear`` without biases."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden, bias=False)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class SwiGLUFeedForward(nn.Module):
    """Idefics2's feed-forward: ``down_proj(silu(gate_proj(x)) * up_proj(x))`` without biases."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class PerceiverBlock(nn.Module):
    """One resampler block: pre-norm cross-attention then pre-norm feed-forward, both residual."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        head_dim: int,
        num_kv_heads: int,
        ff_mult: int,
        norm: str,
        norm_eps: float,
        mlp: str,
    ) -> None:
        super().__init__()
        self.norm_media = _norm(norm, dim, norm_eps)
        self.norm_latents = _norm(norm, dim, norm_eps)
        self.attn = PerceiverAttention(dim, num_heads, head_dim, num_kv_heads)
        self.norm_ff = _norm(norm, dim, norm_eps)
        self.ff = (SwiGLUFeedForward if mlp == "swiglu" else GELUFeedForward)(dim, dim * ff_mult)

    def forward(self, latents: Tensor, media: Tensor) -> Tensor:
        latents = latents + self.attn(self.norm_latents(latents), self.norm_media(media))  # [B, R, H]
        return latents + self.ff(self.norm_ff(latents))  # [B, R, H]


class PerceiverResampler(Connector):
    """``[B, N, D_vision] -> [B, num_latents, D_llm]`` through ``num_layers`` latent cross-attention blocks."""

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        num_latents: int = 64,
        num_layers: int = 6,
        hidden_size: int | None = None,
        num_heads: int = 8,
        head_dim: int = 64,
        ff_mult: int = 4,
        num_kv_heads: int | None = None,
        norm: Literal["layernorm", "rmsnorm"] = "layernorm",
        norm_eps: float = 1e-5,
        mlp: Literal["gelu", "swiglu"] = "gelu",
        time_embedding: bool = True,
        project_out: bool = True,
    ) -> None:
        """
        Args:
            num_latents: Number of learned latents, i.e. output tokens per image (Flamingo: 64).
            num_layers: Number of attention + feed-forward blocks (Flamingo: 6, Idefics2: 3).
            hidden_size: Resampler width; defaults to the vision width (a linear input projection is added otherwise).
            num_heads: Attention (query) heads per block.
            head_dim: Width of each attention head.
            ff_mult: Feed-forward width as a multiple of hidden_size.
            num_kv_heads: Key/value heads for grouped-query attention (Idefics2: 4); defaults to num_heads.
            norm: Normalisation: "layernorm" (Flamingo) or "rmsnorm" (Idefics2).
            norm_eps: Epsilon of every norm (Idefics2 uses 1e-6).
            mlp: Feed-forward kind: "gelu" (Flamingo) or "swiglu" (Idefics2).
            time_embedding: Add Flamingo's learned time embedding (length 1: one image per call) to the features.
            project_out: End with a linear projection to the LLM width; False needs hidden_size == LLM width.
        """
        super().__init__(in_dim, out_dim)
        hidden_size = hidden_size or in_dim
        num_kv_heads = num_kv_heads or num_heads
        for name, value in [
            ("num_latents", num_latents),
            ("num_layers", num_layers),
            ("num_heads", num_heads),
        ]:
            if value < 1:
                raise ValueError(f"PerceiverResampler needs {name} >= 1, got {value}")
        if num_heads % num_kv_heads:
            raise ValueError(
                f"PerceiverResampler needs num_heads divisible by num_kv_heads, got {num_heads} and {num_kv_heads}"
            )
        if not project_out and hidden_size != out_dim:
            raise ValueError(
                f"PerceiverResampler with project_out=False needs hidden_size == out_dim, got {hidden_size} != {out_dim}"
            )
        self.num_latents = num_latents
        self.in_proj = nn.Linear(in_dim, hidden_size) if in_dim != hidden_size else nn.Identity()
        self.time_embed = nn.Parameter(torch.zeros(1, hidden_size)) if time_embedding else None  # [T=1, H]
        self.latents = nn.Parameter(torch.randn(num_latents, hidden_size))  # [R, H]
        self.layers = nn.ModuleList(
            PerceiverBlock(hidden_size, num_heads, head_dim, num_kv_heads, ff_mult, norm, norm_eps, mlp)
            for _ in range(num_layers)
        )
        self.norm = _norm(norm, hidden_size, norm_eps)
        self.proj = nn.Linear(hidden_size, out_dim) if project_out else nn.Identity()

    def num_tokens(self, num_features: int) -> int:
        if num_features < 1:
            raise ValueError(f"PerceiverResampler needs at least one feature (N >= 1), got N={num_features}")
        return self.num_latents

    def forward(self, features: Tensor) -> Tensor:
        self.num_tokens(features.shape[1])
        x = self.in_proj(features)  # [B, N, H]
        if self.time_embed is not None:
            x = x + self.time_embed  # same time step for every feature of the image
        z = self.latents.expand(features.shape[0], -1, -1)  # [B, R, H]
        for layer in self.layers:
            z = layer(z, x)  # [B, R, H]
        return self.proj(self.norm(z))  # [B, R, D_llm]


def idefics2_perceiver_kwargs(config: Any) -> dict[str, Any]:
    """Options that make :class:`PerceiverResampler` the module ``Idefics2PerceiverResampler(config)`` builds.

    ``config`` is an ``Idefics2PerceiverConfig`` (read by attribute only). Build with
    ``PerceiverResampler(config.hidden_size, config.hidden_size, **idefics2_perceiver_kwargs(config))``.
    """
    if config.hidden_act != "silu":
        raise ValueError(
            f"Only Idefics2's SwiGLU with hidden_act='silu' is supported, got {config.hidden_act!r}"
        )
    return dict(
        num_latents=config.resampler_n_latents,
        num_layers=config.resampler_depth,
        hidden_size=config.hidden_size,
        num_heads=config.resampler_n_heads,
        head_dim=config.resampler_head_dim,
        ff_mult=4,  # Idefics2PerceiverLayer: intermediate_size = hidden_size * 4
        num_kv_heads=config.num_key_value_heads,
        norm="rmsnorm",
        norm_eps=config.rms_norm_eps,
        mlp="swiglu",
        time_embedding=False,
        project_out=False,
    )


_IDEFICS2_BLOCK_NAMES = {
    "input_latents_norm": "norm_latents",
    "input_context_norm": "norm_media",
    "self_attn": "attn",  # q_proj, k_proj, v_proj, o_proj keep their names
    "post_attention_layernorm": "norm_ff",
    "mlp": "ff",  # gate_proj, up_proj, down_proj keep their names
}


def idefics2_perceiver_state_dict(state_dict: Mapping[str, Tensor], prefix: str = "") -> dict[str, Tensor]:
    """Rename an ``Idefics2PerceiverResampler`` state dict to :class:`PerceiverResampler` keys.

    ``prefix`` selects the perceiver inside a larger checkpoint (e.g. ``"model.connector.perceiver_resampler."``
    for ``Idefics2ForConditionalGeneration``); keys outside it are dropped. Load the result with
    ``load_state_dict(..., strict=True)`` into a resampler built with :func:`idefics2_perceiver_kwargs`.
    """
    out = {}
    for key, value in state_dict.items():
        if not key.startswith(prefix):
            continue
        parts = key[len(prefix) :].split(".")
        if parts[0] == "layers" and len(parts) > 2:  # layers.{i}.<submodule>.…
            parts[2] = _IDEFICS2_BLOCK_NAMES.get(parts[2], parts[2])
        out[".".join(parts)] = value
    return out
