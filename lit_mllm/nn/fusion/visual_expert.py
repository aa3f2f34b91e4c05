"""Deep fusion by visual experts (Wang et al. 2023, "CogVLM: Visual Expert for Pretrained Language Models").

Image features stay in the sequence, spliced in at the image tokens as in prefix fusion
(:func:`lit_mllm.nn.fusion.prefix.splice_image_features`), but inside every chosen decoder layer the image positions
go through weights of their own, the *visual expert*: their own query/key/value and output projections and their
own MLP, each initialised as a copy of the LLM's. Text positions keep the LLM's weights. Attention itself is
shared: one softmax over all positions, with the LLM's causal mask and rotary embedding, so text attends to image
keys and values made by the expert and image positions to text ones made by the LLM. For one layer, ``x [B, L, D]``
and the image mask ``m [B, L]``::

    h = x + o_m(Attention(q_m(n1(x)), k_m(n1(x)), v_m(n1(x))))      # *_m: the expert's weights where m, else the LLM's
    y = h + mlp_m(n2(h))

Done by composition: :class:`VisualExpertLayer` is a
:class:`~lit_mllm.nn.language.layers.DecoderLayerWrapper` around the Hugging Face layer, whose forward and norms are
untouched; the layer's projection modules (``self_attn.q_proj``, ``k_proj``, ``v_proj``, ``o_proj`` and the whole
``mlp`` in Llama / Qwen2) are replaced in place by :class:`TokenRouted` pairs that hold the original module as
``text`` and its copy as ``image``. CogVLM has the same pairs (``language_expert_query_key_value`` /
``vision_expert_query_key_value``, ``*_dense``, ``language_mlp`` / ``vision_mlp``) and routes them the same way:
gather each kind of position, run its weights, scatter back.

The mask comes from the call's per-layer inputs (:class:`ExpertInputs`); nothing is stored between calls. For the
duration of one layer call the wrapper shows the mask of that call's positions to its routed modules through a
:class:`TokenRoute` they share (set on entry, cleared on exit, also when the layer is recomputed under gradient
checkpointing). With a KV cache the layer sees only the new positions: the cache's length says where they start in
the sequence, and positions past the mask (generated tokens) are text.

Left out: CogVLM gives all image tokens of an image one shared rotary position (the core hands position ids from
the batch and ``transformers``' generation, not from a family); here image tokens take consecutive positions.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lit_mllm.nn.language.layers import DecoderLayerWrapper, LayerInputs, bare_layer, family_wrappers

ROUTED = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp")
"""The modules of a Llama / Qwen2 decoder layer (paths inside the HF layer) that get a visual expert: CogVLM's
query/key/value, dense (output projection) and MLP."""


@dataclass
class ExpertInputs(LayerInputs):
    """Per-layer inputs of the visual-expert layers."""

    image_mask: Tensor
    """``[B, L]`` bool, True at the image-token positions of the input sequence (in ``generate``: of the prompt;
    generated positions are text)."""


class TokenRoute:
    """Which positions of the layer call in progress are image positions, shared by one :class:`VisualExpertLayer`
    and its :class:`TokenRouted` modules. Set only while the layer runs (:meth:`during`); None otherwise."""

    def __init__(self) -> None:
        self.image_mask: Tensor | None = None  # [B, L] bool during a call

    @contextmanager
    def during(self, image_mask: Tensor) -> Iterator[None]:
        """Show ``image_mask [B, L]`` to the routed modules for the duration of one layer call."""
        self.image_mask = image_mask
        try:
            yield
        finally:
            self.image_mask = None


class TokenRouted(nn.Module):
    """A position-wise module (a projection, an MLP) with a twin for image positions: ``[B, L, D_in] ->
    [B, L, D_out]``, ``text`` at text positions and ``image`` at image positions of the current route.

    ``image`` starts as a copy of ``text`` (the visual expert initialised from the LLM). Outside a layer call (no
    route set) every position is text. A call without image positions still runs ``image`` on no rows, so its
    weights take part in the backward pass (with zero gradient) like on a rank with images: DDP needs no
    ``find_unused_parameters`` for a text-only batch.
    """

    def __init__(self, text: nn.Module, route: TokenRoute) -> None:
        """
        Args:
            text: The LLM's module (kept as it is, as ``text``).
            route: The route of the layer this module sits in.
        """
        super().__init__()
        self.text = text
        self.image = copy.deepcopy(text)
        self.route = route  # a plain object, not a module: shared with the layer wrapper

    def forward(self, x: Tensor) -> Tensor:
        mask = self.route.image_mask
        if mask is None:
            return self.text(x)
        if mask.shape != x.shape[:-1]:
            raise ValueError(
                f"image mask {tuple(mask.shape)} does not fit the layer input {tuple(x.shape)}; the mask must be "
                "[B, L] over the positions of the call"
            )
        if (
            not mask.any()
        ):  # text only: the LLM's module as it is; under autograd the expert joins with an exact 0
            out = self.text(x)
            return out + 0.0 * self.image(x[:0]).sum() if torch.is_grad_enabled() else out
        text, image = self.text(x[~mask]), self.image(x[mask])  # [N_text, D_out], [N_image, D_out]
        out = text.new_empty(*mask.shape, text.shape[-1])
        out[~mask] = text
        out[mask] = image.to(text.dtype)
        return out


class VisualExpertLayer(DecoderLayerWrapper):
    """One decoder layer whose image positions take their own weights (see the module docstring).

    ``forward(hidden_states [B, L, D], *args, layer_inputs=ExpertInputs, **kwargs) -> [B, L, D]``, the HF layer's
    arguments passed on unchanged. Without layer inputs every position is text (the bare LM)."""

    def __init__(self, decoder_layer: nn.Module, index: int, routed: Sequence[str] = ROUTED) -> None:
        """
        Args:
            decoder_layer: The HF decoder layer (or a family wrapper around it).
            index: The layer's position in the decoder, which is also its layer index in the KV cache.
            routed: Paths inside the HF layer of the modules that get an expert (default :data:`ROUTED`).
        """
        super().__init__(decoder_layer)
        self.index = index
        self.route = TokenRoute()
        layer = bare_layer(decoder_layer)
        self.routed_paths = list(routed)
        for path in self.routed_paths:
            try:
                module = layer.get_submodule(path)
            except AttributeError:
                names = [n for n, m in layer.named_modules() if n and not list(m.children())]
                raise ValueError(
                    f"{type(layer).__name__} has no module {path!r} to give a visual expert; name modules of the "
                    f"layer in `routed`, e.g. {names[:8]}"
                ) from None
            if isinstance(module, TokenRouted):
                raise ValueError(f"{path!r} of layer {index} already has a visual expert")
            layer.set_submodule(path, TokenRouted(module, self.route))

    def routed_modules(self) -> list[TokenRouted]:
        """The routed pairs of this layer, in the order of ``routed``."""
        layer = bare_layer(self.decoder_layer)
        return [layer.get_submodule(p) for p in self.routed_paths]

    def experts(self) -> list[nn.Module]:
        """The visual-expert modules of this layer (the ``image`` halves)."""
        return [m.image for m in self.routed_modules()]

    def mask_of_call(self, hidden_states: Tensor, layer_inputs: ExpertInputs | None, kwargs: dict) -> Tensor:
        """``[B, L]`` image mask of the ``L`` new positions of this call: a window of the sequence's mask that
        starts after the positions already in the KV cache; positions beyond the mask are generated text."""
        batch, length = hidden_states.shape[:2]
        if layer_inputs is None:
            return torch.zeros(batch, length, dtype=torch.bool, device=hidden_states.device)
        if not isinstance(layer_inputs, ExpertInputs):
            raise TypeError(
                f"visual-expert layers read ExpertInputs, got {type(layer_inputs).__name__}; hand the LM "
                "ExpertInputs(image_mask=input_ids == image_token_id)"
            )
        mask = layer_inputs.image_mask.to(device=hidden_states.device, dtype=torch.bool)
        if mask.shape[0] != batch:
            raise ValueError(f"image mask has {mask.shape[0]} rows for a call of {batch} rows")
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        start = cache.get_seq_length(self.index) if cache is not None else 0
        window = mask[:, start : start + length]
        return F.pad(window, (0, length - window.shape[1]), value=False)

    def forward(self, hidden_states: Tensor, *args: Any, layer_inputs: LayerInputs | None = None, **kwargs):
        mask = self.mask_of_call(hidden_states, layer_inputs, kwargs)
        with self.route.during(mask):
            return self.call_layer(hidden_states, *args, layer_inputs=layer_inputs, **kwargs)


def visual_expert_layers(layers: Sequence[nn.Module]) -> list[VisualExpertLayer]:
    """The visual-expert wrappers among decoder-layer entries, input side first."""
    return family_wrappers(layers, VisualExpertLayer)
