"""Hyper-attention (mPLUG-Owl3, Ye et al. 2024, "mPLUG-Owl3: Towards Long Image-Sequence Understanding in
Multi-Modal Large Language Models"): at chosen decoder layers, text tokens attend to the visual features of the
images at or before them, through a cross-attention that reuses the layer's own input norm and query projection.

Images add no tokens to the LLM's input beyond their markers (one ``<image>`` each). At a wrapped layer (the HF
layer untouched, by composition), with ``x`` the layer input ``[B, L, D]`` and ``F`` the row's visual features
``[B, M * T, D]`` (``M`` images of ``T`` tokens)::

    q        = rope(q_proj(norm(x)), pos(x))                       # [B, H, L, hd]: the LAYER's norm and q_proj
    k, v     = v_kv_proj(norm(F)), k = rope(k, pos(marker of F))   # [B, H_kv, M*T, hd]: new K/V, MI-RoPE
    visual   = softmax(q k^T / sqrt(hd), masked) v                  # [B, L, H * hd]; images at or before only
    text     = the layer's own self-attention context               # [B, L, H * hd], before o_proj
    g        = sigmoid(gate_proj(text))                            # per head, hd -> hd (channel-wise)
    o_proj((1 - g) * text + g * visual)                            # then the layer's residual and MLP as usual

This is mPLUG-Owl3's ``HyperQwen2`` attention: the shared input norm (visual features go through the layer's
``input_layernorm``), the shared query (the self-attention's ``q_proj``, rotated at the text positions),
modality-specific key/value projections (one ``v_kv_proj`` ``D -> 2 * H_kv * hd`` with bias, grouped-query heads
repeated), MI-RoPE (every visual token of image ``k`` takes the rotary position of image ``k``'s marker in the
interleaved sequence), causal attention over media (a token sees the images whose marker is at or before it) and
the channel-wise dynamic sigmoid gate computed from the text attention context, mixing the two contexts before
the output projection (so the mix then passes the layer's MLP).

How it gets inside an untouched layer: the wrapper computes the visual context before calling the layer (the
query is recomputed from the same normed input), keeps it for the duration of that call only, and a forward
pre-hook on the layer's ``o_proj`` (registered once, at construction) replaces ``o_proj``'s input by the mix. The
hook does nothing outside a call with :class:`HyperAttentionInputs`; gradient checkpointing recomputes the
wrapper, hence the branch, and a deep copy's hook reads the copy's branch (tested).

Approximated: RoPE is the plain one (``rope_theta``, no scaling), computed here for both the hyper-attention
queries and the image keys from the positions the layer is called with (Qwen2 / Llama defaults match the LLM's).
``v_kv_proj`` starts as a copy of the layer's ``k_proj`` / ``v_proj`` (a choice of this template). A token that
sees no image (text before the first image, every token of a call without images) keeps its text context
exactly, so with no images the model equals the bare LLM bit for bit. The hyper-attention computes in eager
PyTorch (no flash kernel).

Generation: the features, masks and marker positions are computed once per ``generate`` call and reach every step
in :class:`HyperAttentionInputs`; new positions see every image of the prompt.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from lit_mllm.nn.fusion.gated_xattn import MediaInputs
from lit_mllm.nn.language.layers import DecoderLayerWrapper, LayerInputs, bare_layer


@dataclass
class HyperAttentionInputs(MediaInputs):
    """The per-layer inputs of the hyper-attention layers for one call: ``features [B, M, T, D]``,
    ``media_mask [B, L, M]`` (every image at or before each position; see
    :func:`~lit_mllm.nn.fusion.gated_xattn.media_mask` with ``only_latest=False``) and the images' positions."""

    media_positions: Tensor
    """``[B, M]`` the rotary position of each image's marker (MI-RoPE); 0 for padding images nobody sees."""


def rope_cos_sin(positions: Tensor, head_dim: int, theta: float) -> tuple[Tensor, Tensor]:
    """``positions [B, S]`` -> ``cos, sin [B, 1, S, head_dim]`` of the plain (Llama / Qwen2) rotary embedding."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=positions.device).float() / head_dim)
    angles = positions.float()[..., None] * inv_freq  # [B, S, hd / 2]
    emb = torch.cat([angles, angles], dim=-1)[:, None]  # [B, 1, S, hd]
    return emb.cos(), emb.sin()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """``x [B, H, S, hd]`` rotated (the half-split convention of ``transformers``' Llama / Qwen2)."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos.to(x.dtype) + torch.cat([-x2, x1], dim=-1) * sin.to(x.dtype)


class HyperAttention(nn.Module):
    """The new weights of one hyper-attention layer: the visual key/value projection and the gate."""

    def __init__(self, dim: int, num_heads: int, num_kv_heads: int, head_dim: int) -> None:
        """
        Args:
            dim: The LLM's hidden size ``D`` (the visual features' width too).
            num_heads: The layer's query heads ``H``.
            num_kv_heads: The layer's key/value heads ``H_kv`` (grouped-query attention).
            head_dim: Width ``hd`` of a head.
        """
        super().__init__()
        if num_heads % num_kv_heads:
            raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.v_kv_proj = nn.Linear(dim, 2 * num_kv_heads * head_dim, bias=True)
        self.gate_proj = nn.Linear(head_dim, head_dim, bias=True)

    def forward(self, q: Tensor, media: Tensor, key_cos: Tensor, key_sin: Tensor, mask: Tensor) -> Tensor:
        """``q [B, H, L, hd]`` (rotated), ``media [B, S, D]`` (normed), ``key_cos / key_sin [B, 1, S, hd]``,
        ``mask [B, L, S]`` (True: may attend) -> the visual context ``[B, L, H * hd]`` (rows that may see nothing
        get a finite value the caller discards)."""
        b, s, _ = media.shape
        kv = self.v_kv_proj(media).view(b, s, 2, self.num_kv_heads, self.head_dim)
        k = apply_rope(kv[:, :, 0].transpose(1, 2), key_cos, key_sin)  # [B, H_kv, S, hd]
        v = kv[:, :, 1].transpose(1, 2)
        rep = self.num_heads // self.num_kv_heads
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)  # [B, H, S, hd]
        scores = q @ k.transpose(-1, -2) / self.head_dim**0.5  # [B, H, L, S]
        scores = scores.masked_fill(~mask[:, None], torch.finfo(scores.dtype).min)
        ctx = scores.softmax(-1) @ v  # [B, H, L, hd]
        return ctx.transpose(1, 2).flatten(2)

    def mix(self, text: Tensor, visual: Tensor) -> Tensor:
        """``text, visual [B, L, H * hd]`` attention contexts -> ``(1 - g) * text + g * visual`` with the
        channel-wise gate ``g = sigmoid(gate_proj(text))`` (one ``hd -> hd`` map for every head)."""
        gate = torch.sigmoid(self.gate_proj(text.unflatten(-1, (self.num_heads, self.head_dim)))).flatten(2)
        return text * (1 - gate) + visual * gate


class HyperAttentionLayer(DecoderLayerWrapper):
    """An untouched HF decoder layer (Llama / Qwen2 layout: ``input_layernorm``, ``self_attn.{q,k,v,o}_proj``)
    with hyper-attention mixed into its self-attention context before ``o_proj``. Without
    :class:`HyperAttentionInputs` the layer runs alone."""

    def __init__(self, decoder_layer: nn.Module, rope_theta: float) -> None:
        """
        Args:
            decoder_layer: The HF decoder layer (or a wrapper around it), kept as it is; its norm and query /
                output projections are shared, not copied.
            rope_theta: The LLM's rotary base (MI-RoPE uses the same rotation).
        """
        super().__init__(decoder_layer)
        attn = bare_layer(decoder_layer).self_attn
        head_dim = attn.head_dim
        num_heads = attn.q_proj.out_features // head_dim
        num_kv_heads = attn.k_proj.out_features // head_dim
        dim = attn.q_proj.in_features
        if num_heads * head_dim != dim:
            raise ValueError(
                f"hyper-attention needs num_heads * head_dim == hidden size (the gate splits the hidden state "
                f"into heads); this layer has {num_heads} x {head_dim} != {dim}"
            )
        self.rope_theta = float(rope_theta)
        self.hyper_attention = HyperAttention(dim, num_heads, num_kv_heads, head_dim)
        with torch.no_grad():  # start the visual keys / values as the text ones
            w = self.hyper_attention.v_kv_proj
            w.weight.copy_(torch.cat([attn.k_proj.weight, attn.v_proj.weight]))
            if attn.k_proj.bias is not None and attn.v_proj.bias is not None:
                w.bias.copy_(torch.cat([attn.k_proj.bias, attn.v_proj.bias]))
            else:
                w.bias.zero_()
        # The visual context of the current call, set and cleared by forward, read by the o_proj pre-hook.
        self._visual: tuple[Tensor, Tensor] | None = None
        attn.o_proj.register_forward_pre_hook(self._mix_before_o_proj)

    def forward(self, hidden_states: Tensor, *args: Any, layer_inputs: LayerInputs | None = None, **kwargs):
        """``[B, L, D] -> [B, L, D]``: the wrapped layer, its self-attention context mixed with the visual one
        (positions that see an image) before the output projection."""
        if not isinstance(layer_inputs, HyperAttentionInputs):
            return self.call_layer(hidden_states, *args, layer_inputs=layer_inputs, **kwargs)
        self._visual = self.visual_context(hidden_states, layer_inputs, kwargs)
        try:  # read once, by the o_proj pre-hook, during this call
            return self.call_layer(hidden_states, *args, layer_inputs=layer_inputs, **kwargs)
        finally:
            self._visual = None

    def visual_context(
        self, hidden_states: Tensor, inputs: HyperAttentionInputs, layer_kwargs: dict[str, Any]
    ) -> tuple[Tensor, Tensor]:
        """The visual branch of a call: ``[B, L, H * hd]`` context (in the branch's dtype) and ``[B, L, 1]``
        whether each position sees any image."""
        layer = bare_layer(self.decoder_layer)
        attn, hyper = layer.self_attn, self.hyper_attention
        b, length, _ = hidden_states.shape
        positions = layer_kwargs.get("position_ids")
        if positions is None:
            start = layer_kwargs.get("cache_position")
            start = 0 if start is None else int(start[0])
            positions = torch.arange(start, start + length, device=hidden_states.device)[None]
        positions = positions.expand(b, length)
        features = inputs.features  # [B, M, T, D]
        t = features.shape[2]
        x_norm = layer.input_layernorm(hidden_states)  # [B, L, D]: the same normed input self-attention reads
        media = layer.input_layernorm(features.flatten(1, 2).to(x_norm.dtype))  # [B, M*T, D] shared norm
        dtype = hyper.v_kv_proj.weight.dtype  # a bf16 LLM under 32-true: the branch computes in its own dtype
        q = attn.q_proj(x_norm).view(b, length, hyper.num_heads, hyper.head_dim).transpose(1, 2)
        cos, sin = rope_cos_sin(positions, hyper.head_dim, self.rope_theta)
        key_pos = inputs.media_positions.repeat_interleave(t, dim=1)  # [B, M*T] MI-RoPE
        key_cos, key_sin = rope_cos_sin(key_pos, hyper.head_dim, self.rope_theta)
        mask = inputs.mask_for(length)  # [B, L, M]
        visual = hyper(
            apply_rope(q, cos, sin).to(dtype),
            media.to(dtype),
            key_cos,
            key_sin,
            mask.repeat_interleave(t, dim=-1),
        )
        return visual, mask.any(-1, keepdim=True)

    def _mix_before_o_proj(self, module: nn.Module, args: tuple) -> tuple | None:
        """Forward pre-hook on the layer's ``o_proj``: replaces the self-attention context ``[B, L, H * hd]`` by
        its gated mix with the visual one where a position sees an image; outside a call with images, nothing."""
        if self._visual is None:
            return None
        visual, sees = self._visual
        text = args[0]
        fused = self.hyper_attention.mix(text.to(visual.dtype), visual).to(text.dtype)
        return (torch.where(sees, fused, text), *args[1:])


def rope_theta_of(config: Any) -> float:
    """The rotary base of a ``transformers`` config (``rope_theta``, or ``rope_parameters['rope_theta']`` in 5.x)."""
    theta = getattr(config, "rope_theta", None)
    if theta is None:
        params = getattr(config, "rope_parameters", None) or {}
        theta = params.get("rope_theta")
    if theta is None:
        raise ValueError(f"cannot find the rotary base (rope_theta) of {type(config).__name__}")
    return float(theta)
