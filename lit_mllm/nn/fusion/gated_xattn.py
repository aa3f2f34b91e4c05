"""Gated cross-attention dense blocks (Flamingo, Alayrac et al. 2022, "Flamingo: a Visual Language Model for
Few-Shot Learning"): text tokens attend to the visual tokens of the images before them, through blocks inserted
between the frozen decoder layers of any Hugging Face LLM, by composition.

One block, before the untouched decoder layer it wraps (OpenFlamingo's ``GatedCrossAttentionBlock`` shape)::

    x = x + tanh(attn_gate) * attn(q=attn_norm(x), kv=media)     # [B, L, D]; masked, see below
    x = x + tanh(ff_gate) * ff(ff_norm(x))                         # [B, L, D]

Both gates start at 0, so at initialisation every block is the identity and the LLM computes what it computed
without them (bit for bit: ``x + 0 * y == x`` for finite ``y``).

Media masking. Images stay in the text as ONE marker token each (the ``<image>`` placeholder); the markers
define the media locations. ``media_mask [B, L, M]`` says which of the row's ``M`` images each position attends
to: with ``only_latest`` (Flamingo) the latest image at or before it (an image's own marker sees that image),
otherwise every image at or before it. A position with no image before it (text before the first image, padding)
attends to none: its cross-attention output is exactly zero (the feed-forward still runs, as in Flamingo). In
packed rows an image is seen only by positions of its own sample (``sample_index``).

Generation. The visual features are computed once per ``generate`` call and handed, with the prompt's media mask,
to every step in :class:`MediaInputs` (the per-layer inputs of :mod:`lit_mllm.nn.language.layers`), next to the
LLM's KV cache; a step's new positions come after the prompt, so they see what the prompt's last position sees
(the latest image before them; a generated ``<image>`` token brings no new image).

The block's options also give the ``transformers`` Idefics (v1) gated cross-attention layer
(``IdeficsGatedCrossAttentionLayer``, Laurençon et al. 2023), which it reproduces with copied weights
(``tests/test_flamingo.py``): ``norm="rmsnorm"``, ``norm_eps=config.rms_norm_eps``, ``mlp="swiglu"`` (with
``ff_mult * dim == config.intermediate_size``), ``num_heads=config.num_attention_heads`` of ``head_dim = dim /
num_heads``, ``qk_norm=config.qk_layer_norms``, ``gate="vector"`` for ``alpha_type="vector"`` (``"scalar"`` for
``"float"``). Idefics' gate initialisers other than zeros (ones, normal) are not offered: a block that is not the
identity at the start changes the pretrained LLM.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lit_mllm.nn.connectors.perceiver import GELUFeedForward, RMSNorm, SwiGLUFeedForward
from lit_mllm.nn.language.layers import DecoderLayerWrapper, LayerInputs


def _norm(kind: str, dim: int, eps: float) -> nn.Module:
    if kind not in ("layernorm", "rmsnorm"):
        raise ValueError(f"norm must be 'layernorm' or 'rmsnorm', got {kind!r}")
    return RMSNorm(dim, eps) if kind == "rmsnorm" else nn.LayerNorm(dim, eps=eps)


class MaskedCrossAttention(nn.Module):
    """Multi-head attention from text positions ``[B, L, D]`` to media tokens ``[B, S, D_media]`` under a boolean
    mask; positions that may see no media token get exactly zero."""

    def __init__(
        self,
        dim: int,
        media_dim: int,
        num_heads: int,
        head_dim: int,
        qk_norm: bool = False,
        norm: str = "layernorm",
        norm_eps: float = 1e-5,
    ) -> None:
        super().__init__()
        self.num_heads, self.head_dim = num_heads, head_dim
        inner = num_heads * head_dim
        self.q_proj = nn.Linear(dim, inner, bias=False)
        self.k_proj = nn.Linear(media_dim, inner, bias=False)
        self.v_proj = nn.Linear(media_dim, inner, bias=False)
        self.o_proj = nn.Linear(inner, dim, bias=False)
        # Idefics' qk_layer_norms: each head's queries and keys normalised over head_dim
        self.q_norm = _norm(norm, head_dim, norm_eps) if qk_norm else None
        self.k_norm = _norm(norm, head_dim, norm_eps) if qk_norm else None

    def forward(self, x: Tensor, media: Tensor, mask: Tensor) -> Tensor:
        """``x [B, L, D]`` (normed), ``media [B, S, D_media]``, ``mask [B, L, S]`` (True: may attend) ->
        ``[B, L, D]``."""
        b, length, _ = x.shape
        s = media.shape[1]
        q = self.q_proj(x).view(b, length, self.num_heads, self.head_dim).transpose(1, 2)  # [B, h, L, d]
        k = self.k_proj(media).view(b, s, self.num_heads, self.head_dim).transpose(1, 2)  # [B, h, S, d]
        v = self.v_proj(media).view(b, s, self.num_heads, self.head_dim).transpose(1, 2)  # [B, h, S, d]
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        sees = mask.any(-1)  # [B, L] positions with at least one media token to attend to
        # a row with nothing to attend to attends to everything (no NaN), and its output is zeroed below
        allowed = mask | ~sees[..., None]  # [B, L, S]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed[:, None])  # [B, h, L, d]
        out = self.o_proj(out.transpose(1, 2).reshape(b, length, self.num_heads * self.head_dim))  # [B, L, D]
        return out.masked_fill(~sees[..., None], 0.0)


class GatedCrossAttentionBlock(nn.Module):
    """Flamingo's gated cross-attention dense block, ``[B, L, D] -> [B, L, D]`` (see the module docstring).

    Built with ``(dim, media_dim)`` (the LLM width and the visual features' width) plus its own options, so a
    config names it like a connector: ``xattn: {class_path: ...GatedCrossAttentionBlock, init_args: {...}}``."""

    def __init__(
        self,
        dim: int,
        media_dim: int,
        num_heads: int = 8,
        head_dim: int = 64,
        ff_mult: int = 4,
        norm: Literal["layernorm", "rmsnorm"] = "layernorm",
        norm_eps: float = 1e-5,
        mlp: Literal["gelu", "swiglu"] = "gelu",
        gate: Literal["scalar", "vector"] = "scalar",
        qk_norm: bool = False,
    ) -> None:
        """
        Args:
            dim: LLM width ``D``.
            media_dim: Width of the visual features (the connector's output width).
            num_heads: Cross-attention heads (OpenFlamingo: 8).
            head_dim: Width of each head (OpenFlamingo: 64; Idefics: ``dim / num_heads``).
            ff_mult: Feed-forward width as a multiple of ``dim`` (Flamingo: 4).
            norm: The pre-norms: ``layernorm`` (Flamingo) or ``rmsnorm`` (Idefics).
            norm_eps: Epsilon of every norm.
            mlp: Feed-forward kind: ``gelu`` (Flamingo: Linear-GELU-Linear, no biases) or ``swiglu`` (Idefics).
            gate: One tanh gate per branch (``scalar``, Flamingo) or one per channel (``vector``, Idefics option).
            qk_norm: Normalise each head's queries and keys (Idefics' ``qk_layer_norms``).
        """
        super().__init__()
        if min(dim, media_dim, num_heads, head_dim, ff_mult) < 1:
            raise ValueError(
                f"GatedCrossAttentionBlock needs positive sizes, got dim={dim}, media_dim={media_dim}, "
                f"num_heads={num_heads}, head_dim={head_dim}, ff_mult={ff_mult}"
            )
        if mlp not in ("gelu", "swiglu"):
            raise ValueError(f"mlp must be 'gelu' or 'swiglu', got {mlp!r}")
        if gate not in ("scalar", "vector"):
            raise ValueError(f"gate must be 'scalar' or 'vector', got {gate!r}")
        self.dim, self.media_dim = dim, media_dim
        self.attn_norm = _norm(norm, dim, norm_eps)
        self.attn = MaskedCrossAttention(dim, media_dim, num_heads, head_dim, qk_norm, norm, norm_eps)
        self.ff_norm = _norm(norm, dim, norm_eps)
        self.ff = (SwiGLUFeedForward if mlp == "swiglu" else GELUFeedForward)(dim, dim * ff_mult)
        gate_size = dim if gate == "vector" else 1
        self.attn_gate = nn.Parameter(torch.zeros(gate_size))  # tanh(0) = 0: the LLM unchanged at the start
        self.ff_gate = nn.Parameter(torch.zeros(gate_size))

    def forward(self, x: Tensor, features: Tensor, media_mask: Tensor) -> Tensor:
        """``x [B, L, D]``, ``features [B, M, T, D_media]`` (the row's ``M`` images, ``T`` tokens each),
        ``media_mask [B, L, M]`` (True: position attends to the image) -> ``[B, L, D]``."""
        b, m, t, _ = features.shape
        media = features.reshape(b, m * t, -1)  # [B, M*T, D_media]
        mask = media_mask.repeat_interleave(t, dim=-1)  # [B, L, M*T]
        x = x + torch.tanh(self.attn_gate) * self.attn(self.attn_norm(x), media, mask)
        return x + torch.tanh(self.ff_gate) * self.ff(self.ff_norm(x))


GatedXAttnFactory = Callable[[int, int], GatedCrossAttentionBlock]
"""What configs provide: called with ``(D_llm, D_media)`` by the family module, once per wrapped layer."""


def media_mask(
    input_ids: Tensor,
    image_token_id: int,
    sample_index: Tensor | None = None,
    only_latest: bool = True,
    num_media: int | None = None,
) -> Tensor:
    """``[B, L, M]`` boolean: which of its row's images (in reading order) each position attends to.

    Args:
        input_ids: ``[B, L]`` token ids, one ``image_token_id`` marker per image.
        image_token_id: The marker's id.
        sample_index: ``[B, L]`` sample of each position (packed rows; ``-1`` on padding): an image is seen only
            by positions of its own sample, and padding sees none. None: a row is one sample.
        only_latest: Each position sees only the latest image at or before it (Flamingo); False: all of them.
        num_media: ``M``; default the most markers in a row.

    A position with no image at or before it (in its sample) sees none.
    """
    markers = input_ids == image_token_id  # [B, L]
    time = markers.long().cumsum(-1)  # [B, L] images at or before each position
    m = int(markers.sum(-1).max()) if num_media is None else num_media
    media_time = torch.arange(1, m + 1, device=input_ids.device)  # [M] image k is the k-th marker
    if only_latest:
        mask = time[..., None] == media_time  # [B, L, M]
    else:
        mask = time[..., None] >= media_time
    if sample_index is not None and m:
        # the sample each image belongs to: the sample of its marker
        first = (time[..., None] == media_time) & markers[..., None]  # [B, L, M] the marker of image k
        image_sample = torch.where(first, sample_index[..., None], -2).amax(1)  # [B, M]; -2: no such image
        mask = mask & (sample_index[..., None] == image_sample[:, None, :]) & (sample_index[..., None] >= 0)
    return mask


def media_features(images: Tensor, images_per_row: list[int], num_media: int | None = None) -> Tensor:
    """``images [I, T, D]`` of the batch in reading order -> ``[B, M, T, D]`` per row, zero-padded to ``M``
    images (default the most images in a row)."""
    m = max(images_per_row, default=0) if num_media is None else num_media
    out = images.new_zeros(len(images_per_row), m, *images.shape[1:])
    for row, chunk in enumerate(images.split(list(images_per_row))):
        out[row, : len(chunk)] = chunk
    return out


@dataclass
class MediaInputs(LayerInputs):
    """The per-layer inputs of the gated cross-attention layers for one call (a batch, or one ``generate``)."""

    features: Tensor
    """``[B, M, T, D_media]`` visual tokens of each row's images (zero rows past a row's own images)."""
    media_mask: Tensor
    """``[B, L, M]`` which images each position of the call's input attends to (see :func:`media_mask`)."""

    def mask_for(self, length: int) -> Tensor:
        """``[B, length, M]``: the mask of the positions a layer call runs on. The whole input (``length == L``),
        or, in ``generate`` with a KV cache, new positions after the prompt: they see what the prompt's last
        position sees."""
        known = self.media_mask.shape[1]
        if length == known:
            return self.media_mask
        if length < known:
            return self.media_mask[:, -1:].expand(-1, length, -1)
        raise ValueError(
            f"a decoder layer ran on {length} positions but the media mask covers {known}; build MediaInputs "
            "from the same input ids the language model runs on"
        )


class GatedCrossAttentionLayer(DecoderLayerWrapper):
    """A gated cross-attention block run before an untouched HF decoder layer. Without :class:`MediaInputs` (a
    plain language-model call) the layer runs alone."""

    def __init__(self, decoder_layer: nn.Module, xattn: GatedCrossAttentionBlock) -> None:
        """
        Args:
            decoder_layer: The HF decoder layer (or a wrapper around it), kept as it is.
            xattn: This layer's gated cross-attention block.
        """
        super().__init__(decoder_layer)
        self.xattn = xattn

    def forward(self, hidden_states: Tensor, *args: Any, layer_inputs: LayerInputs | None = None, **kwargs):
        """``[B, L, D] -> [B, L, D]``: the block (on :class:`MediaInputs`), then the wrapped layer."""
        if isinstance(layer_inputs, MediaInputs):
            dtype = (
                self.xattn.attn_gate.dtype
            )  # a bf16 LLM under 32-true: the block computes in its own dtype
            mask = layer_inputs.mask_for(hidden_states.shape[1])
            out = self.xattn(hidden_states.to(dtype), layer_inputs.features.to(dtype), mask)
            hidden_states = out.to(hidden_states.dtype)
        return self.call_layer(hidden_states, *args, layer_inputs=layer_inputs, **kwargs)


def xattn_layer_indices(num_layers: int, every: int) -> list[int]:
    """The decoder layers that get a block: ``0, every, 2 * every, ...`` (Idefics' placement: the block runs
    before layer ``i`` when ``i % every == 0``; OpenFlamingo uses ``(i + 1) % every == 0``)."""
    if every < 1:
        raise ValueError(f"cross_attn_every must be >= 1, got {every}")
    return list(range(0, num_layers, every))
