"""The way into the language model's decoder layers: the wrapper a family subclasses to act inside chosen layers
(Flamingo's gated cross-attention every N layers, mPLUG-Owl3's hyper-attention at chosen layers, CogVLM's visual
experts in every layer), the per-layer inputs a call hands those wrappers, and the efficiency wrappers (gradient
checkpointing, ``torch.compile``) that sit outermost around each decoder-layer entry.

An entry of :attr:`LanguageModel.decoder_layers <lit_mllm.nn.language.LanguageModel.decoder_layers>` is, from
the outside in::

    CheckpointWrapper        gradient_checkpointing (torch's activation-checkpoint wrapper)
      CompiledLayer          compile (the module compiled in place with ``nn.Module.compile``)
        <family wrapper>     a DecoderLayerWrapper subclass, its own weights next to ``decoder_layer``
          <HF layer>         e.g. LlamaDecoderLayer, untouched

each level present only when used. The two efficiency wrappers keep the state-dict keys of what they wrap (their
attribute names, ``_checkpoint_wrapped_module`` and ``_orig_mod``, are the ones PyTorch's own wrappers use and
:func:`lit_mllm.training.stages.state_name` removes from parameter names); a family wrapper is part of the model
and appears in the names: ``model.layers.3.decoder_layer.self_attn.q_proj.weight`` beside its own
``model.layers.3.<its modules>``.

Per-layer inputs. ``LanguageModel.forward`` / ``hidden_states`` / ``generate`` take ``layer_inputs``, one
:class:`LayerInputs` object (a family's dataclass: visual features, media masks, image positions), and every
decoder-layer call receives it as the keyword argument ``layer_inputs``: ``transformers`` passes extra keyword
arguments from ``XForCausalLM.forward`` through the decoder to each layer (Llama, Qwen2 and the other 5.x
decoders). A :class:`DecoderLayerWrapper` takes it out of the keyword arguments before calling its HF layer; an
unwrapped layer hands it on to its attention function, which ignores keyword arguments it does not know (the
results are bit-identical, tested). Nothing is stored on a layer between calls.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, fields, replace
from typing import Any, TypeVar

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

W = TypeVar("W", bound="DecoderLayerWrapper")

LAYER_INPUTS = "layer_inputs"
"""The keyword argument every decoder-layer call receives the call's :class:`LayerInputs` in."""


@dataclass
class LayerInputs:
    """Base class of the per-call inputs a family hands its decoder-layer wrappers.

    A family subclasses it as a dataclass with documented, shaped fields, e.g.
    ``media: Tensor  # [B, T_img, D] visual features`` and ``media_mask: Tensor  # [B, L] latest image per token``.
    Batch-indexed fields follow the rows of the call. In ``generate`` they are the prompt rows, and where
    ``transformers`` runs several rows per prompt (beam search, several returned sequences) the language model
    hands the layers :meth:`expand`'s copy, each row repeated as ``transformers`` repeats the prompt rows. The same
    object reaches every layer on every call, including every step of ``generate``, where the wrapper sees only
    the new positions (``position_ids`` in its keyword arguments says which)."""

    def expand(self, times: int) -> LayerInputs:
        """The inputs of a call whose rows are this call's rows each repeated ``times`` times in a row (row ``r``
        becomes rows ``r * times ... r * times + times - 1``, as ``transformers``' ``generate`` expands a prompt
        for its beams): every tensor field repeated along its first (row) dimension. A family whose inputs hold a
        tensor not indexed by row overrides this."""
        if times == 1:
            return self
        repeated = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, Tensor):
                repeated[f.name] = value.repeat_interleave(times, dim=0)
        return replace(self, **repeated)


class DecoderLayerWrapper(nn.Module):
    """A family's module around one untouched HF decoder layer, made by composition (see
    :meth:`LanguageModel.wrap_decoder_layers <lit_mllm.nn.language.LanguageModel.wrap_decoder_layers>`).

    The HF layer is the attribute ``decoder_layer`` (so its parameters are named
    ``model.layers.<i>.decoder_layer.<name>``). The base class runs the layer alone: it is the identity wrapper.
    Subclasses add their modules in ``__init__`` and override :meth:`forward` with this signature::

        def forward(self, hidden_states, *args, layer_inputs=None, **kwargs):
            # hidden_states: [B, L, D]; layer_inputs: the family's LayerInputs or None (a call without any)
            hidden_states = self.cross_attention(hidden_states, layer_inputs)      # the family's part
            return self.call_layer(hidden_states, *args, layer_inputs=layer_inputs, **kwargs)

    ``*args`` / ``**kwargs`` are what the HF decoder hands each layer (``attention_mask``, ``position_ids``,
    ``position_embeddings``, ``cache``, ``use_cache``, ...); pass them on unchanged. ``L`` is the number of new
    positions: the whole sequence in ``forward``, the prompt and then one token per step in ``generate`` with a KV
    cache. The return value is the HF layer's (in transformers 5 the hidden states ``[B, L, D]``).
    """

    def __init__(self, decoder_layer: nn.Module) -> None:
        """
        Args:
            decoder_layer: The HF decoder layer (or a wrapper around it) to wrap; kept as it is.
        """
        super().__init__()
        self.decoder_layer = decoder_layer

    def call_layer(
        self, hidden_states: Tensor, *args: Any, layer_inputs: LayerInputs | None = None, **kwargs
    ):
        """Run the wrapped layer; ``layer_inputs`` goes on only to a wrapper nested inside this one."""
        if isinstance(self.decoder_layer, DecoderLayerWrapper):
            kwargs[LAYER_INPUTS] = layer_inputs
        return self.decoder_layer(hidden_states, *args, **kwargs)

    def forward(self, hidden_states: Tensor, *args: Any, layer_inputs: LayerInputs | None = None, **kwargs):
        """``[B, L, D] -> [B, L, D]``: the wrapped layer alone (the identity wrapper); subclasses override."""
        return self.call_layer(hidden_states, *args, layer_inputs=layer_inputs, **kwargs)


class CompiledLayer(nn.Module):
    """A decoder-layer entry run through ``torch.compile``, compiled in place (``nn.Module.compile``).

    Regional compilation: all layers of one class share a compiled graph (dynamo guards on the module's structure,
    not its identity, and treats the weights as inputs), so compiling takes about one layer's time whatever the
    depth. State-dict keys are those of the wrapped module (the ``_orig_mod.`` level is left out, as in
    ``torch.compile``'s own wrapper's name). A deep copy (weight averaging) runs uncompiled, with its own weights.
    """

    def __init__(self, layer: nn.Module, options: dict[str, Any]) -> None:
        """
        Args:
            layer: The decoder-layer entry to run compiled.
            options: ``torch.compile`` keyword arguments (``mode``, ``backend``, ``dynamic``, ...).
        """
        super().__init__()
        self._orig_mod = layer
        self.register_state_dict_post_hook(_drop_level)
        self.register_load_state_dict_pre_hook(_add_level)
        self.compile(**options)

    def forward(self, *args: Any, **kwargs: Any):
        return self._orig_mod(*args, **kwargs)


def _drop_level(module: nn.Module, state_dict: dict, prefix: str, local_metadata: dict) -> None:
    """State-dict hook: ``<prefix>_orig_mod.<key>`` is written ``<prefix><key>`` (order kept)."""
    inner = f"{prefix}_orig_mod."
    for key in [k for k in state_dict if k.startswith(inner)]:
        state_dict[prefix + key[len(inner) :]] = state_dict.pop(key)


def _add_level(module: nn.Module, state_dict: dict, prefix: str, *args: Any) -> None:
    """Load hook: ``<prefix><key>`` is read into ``<prefix>_orig_mod.<key>``."""
    inner = f"{prefix}_orig_mod."
    for key in [k for k in state_dict if k.startswith(prefix) and not k.startswith(inner)]:
        state_dict[inner + key[len(prefix) :]] = state_dict.pop(key)


def checkpoint_with_autograd(function, *args: Any, **kwargs: Any):
    """``torch.utils.checkpoint`` (non-reentrant) when autograd records, else a plain call: the checkpoint
    function of the decoder layers' ``CheckpointWrapper``, active whatever the layer's train/eval mode and whether
    its own weights train (a frozen LLM that passes gradients to the connector is checkpointed too)."""
    if torch.is_grad_enabled():
        return checkpoint(function, *args, use_reentrant=False, **kwargs)
    return function(*args, **kwargs)


def checkpointed(layer: nn.Module) -> nn.Module:
    """``layer`` in PyTorch's activation-checkpoint wrapper (state-dict keys unchanged) with
    :func:`checkpoint_with_autograd`."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointWrapper

    return CheckpointWrapper(layer, checkpoint_fn=checkpoint_with_autograd)


_EFFICIENCY_LEVELS = ("_checkpoint_wrapped_module", "_orig_mod", "_fsdp_wrapped_module")
"""Attribute under which PyTorch's wrappers (activation checkpoint, compile, FSDP) and :class:`CompiledLayer`
hold the module they wrap; :data:`lit_mllm.training.stages.WRAPPER_PREFIXES` names the same."""


def without_efficiency(entry: nn.Module) -> nn.Module:
    """``entry`` without its checkpoint / compile / FSDP wrappers: the family wrapper, or the HF layer."""
    while True:
        children = dict(entry.named_children())
        inner = next((children[a] for a in _EFFICIENCY_LEVELS if a in children), None)
        if inner is None:
            return entry
        entry = inner


def family_wrappers(layers: Iterable[nn.Module], kind: type[W]) -> list[W]:
    """The ``kind`` wrappers among decoder-layer entries (efficiency wrappers and other family wrappers looked
    through), input side first: a family's own layers, e.g. ``family_wrappers(lm.decoder_layers, MyLayer)``."""
    found = []
    for entry in layers:
        entry = without_efficiency(entry)
        while isinstance(entry, DecoderLayerWrapper):
            if isinstance(entry, kind):
                found.append(entry)
                break
            entry = without_efficiency(entry.decoder_layer)
    return found


def bare_layer(entry: nn.Module) -> nn.Module:
    """The HF decoder layer inside a decoder-layer entry (every efficiency and family wrapper removed)."""
    entry = without_efficiency(entry)
    while isinstance(entry, DecoderLayerWrapper):
        entry = without_efficiency(entry.decoder_layer)
    return entry
