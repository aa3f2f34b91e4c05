"""The way into the decoder layers: wrapping every layer of a tiny Llama and a tiny Qwen2 in the identity wrapper
changes nothing, bit for bit (plain, checkpointed with gradients, generating with a KV cache); per-layer inputs
reach every layer call in forward, hidden_states and every generate step; the efficiency wrappers stay outermost
and keep the state-dict keys."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import pytest
import torch
from torch import Tensor, nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointWrapper

from lit_mllm.nn.language import DecoderLayerWrapper, LayerInputs, TinyLlama, TinyQwen2, bare_layer
from lit_mllm.nn.language.layers import CompiledLayer
from lit_mllm.training.stages import state_name

WIDTH = 32
FAMILIES = [TinyLlama, TinyQwen2]


def tiny(cls=TinyLlama, **kwargs) -> TinyLlama | TinyQwen2:
    torch.manual_seed(0)
    return cls(hidden_size=WIDTH, num_layers=3, num_heads=4, num_kv_heads=2, max_length=64, **kwargs)


def identity(index: int, layer: nn.Module) -> nn.Module:
    return DecoderLayerWrapper(layer)


def same_weights(cls, plain: nn.Module, wrap=identity, indices=None, **kwargs):
    """A model of ``cls`` built with ``kwargs`` holding ``plain``'s weights, then wrapped by ``wrap``."""
    lm = tiny(cls, **kwargs)
    lm.load_state_dict(plain.state_dict())
    lm.wrap_decoder_layers(wrap, indices)
    return lm


@dataclass
class Probe(LayerInputs):
    """Per-layer inputs of the test wrappers: a shift added to the hidden states, and a log of the calls (kept in
    the inputs, not on the layers)."""

    shift: Tensor | None = None  # [B, 1, D]
    calls: list[tuple[int, int]] = field(default_factory=list)  # (layer index, new positions)


class Shifted(DecoderLayerWrapper):
    """Adds ``layer_inputs.shift`` to the layer's input and logs the call."""

    def __init__(self, layer: nn.Module, index: int) -> None:
        super().__init__(layer)
        self.index = index

    def forward(self, hidden_states, *args, layer_inputs=None, **kwargs):
        if layer_inputs is not None:
            layer_inputs.calls.append((self.index, hidden_states.shape[1]))
            if layer_inputs.shift is not None:
                hidden_states = hidden_states + layer_inputs.shift
        return self.call_layer(hidden_states, *args, layer_inputs=layer_inputs, **kwargs)


def shifted(index: int, layer: nn.Module) -> nn.Module:
    return Shifted(layer, index)


def attention_calls(lm) -> list[int]:
    """A counter of layer 0's attention calls (it counts recomputations in the backward pass too)."""
    calls = [0]
    bare_layer(lm.decoder_layers[0]).self_attn.register_forward_pre_hook(
        lambda m, args: calls.__setitem__(0, calls[0] + 1)
    )
    return calls


def greedy_without_cache(lm, embeds: Tensor, steps: int, layer_inputs=None) -> Tensor:
    """Greedy decoding by full forward passes over the growing sequence: ``[1, L, D] -> [1, steps]``."""
    tokens = []
    with torch.no_grad():
        for _ in range(steps):
            token = lm(embeds, layer_inputs=layer_inputs)[:, -1].argmax(-1, keepdim=True)  # [1, 1]
            tokens.append(token)
            embeds = torch.cat([embeds, lm.embed(token)], dim=1)
    return torch.cat(tokens, dim=1)


# -- identity wrappers change nothing --------------------------------------------------------------------------
@pytest.mark.parametrize("cls", FAMILIES, ids=lambda c: c.__name__)
def test_identity_wrappers_give_bit_identical_logits(cls):
    plain = tiny(cls).eval()
    wrapped = same_weights(cls, plain).eval()
    assert all(type(layer) is DecoderLayerWrapper for layer in wrapped.decoder_layers)
    x = torch.randn(2, 7, WIDTH)  # [B, L, D]
    mask = torch.tensor([[0, 1, 1, 1, 1, 1, 1], [1] * 7])
    with torch.no_grad():
        assert torch.equal(wrapped(x, mask), plain(x, mask))
        assert torch.equal(wrapped.hidden_states(x, mask), plain.hidden_states(x, mask))


@pytest.mark.parametrize("cls", FAMILIES, ids=lambda c: c.__name__)
@pytest.mark.parametrize("trains", [True, False], ids=["trained", "frozen"])
def test_identity_wrappers_inside_checkpoints_give_identical_logits_and_gradients(cls, trains):
    """Checkpointed layers around the wrappers, with autograd recording: a trained LLM (train mode) and a frozen
    one in eval mode that passes gradients to its input (the align stage): the same logits and gradients as the
    plain model, and the layers really run again in the backward pass."""
    plain = tiny(cls)
    ckpt = same_weights(cls, plain, gradient_checkpointing=True)
    results = []
    for lm in (plain, ckpt):
        lm.train(trains).requires_grad_(trains)
        calls = attention_calls(lm)
        x = torch.randn(2, 6, WIDTH, generator=torch.Generator().manual_seed(1)).requires_grad_()
        logits = lm(x)
        logits.square().mean().backward()
        grads = {state_name(n): p.grad for n, p in lm.named_parameters() if p.grad is not None}
        results.append((logits.detach(), x.grad, grads, calls[0]))
    (logits_a, x_a, grads_a, calls_a), (logits_b, x_b, grads_b, calls_b) = results
    assert torch.equal(logits_b, logits_a) and torch.equal(x_b, x_a)
    # the wrapper adds `decoder_layer.` to the HF layer's names; the checkpoint adds nothing to them
    assert {n.replace("decoder_layer.", "") for n in grads_b} == grads_a.keys() and bool(grads_a) == trains
    for name, grad in grads_b.items():
        assert torch.equal(grad, grads_a[name.replace("decoder_layer.", "")]), name
    assert (calls_a, calls_b) == (1, 2)


@pytest.mark.parametrize("cls", FAMILIES, ids=lambda c: c.__name__)
def test_identity_wrappers_generate_the_same_tokens_with_a_kv_cache(cls):
    plain = tiny(cls).eval()
    wrapped = same_weights(cls, plain, gradient_checkpointing=True).eval()  # no autograd: no checkpoint
    ids = torch.tensor([[5, 9, 12, 7], [3, 8, 8, 11]])
    mask = torch.ones_like(ids)
    options = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False)
    ours = wrapped.generate(wrapped.embed(ids), mask, **options)
    theirs = plain.generate(plain.embed(ids), mask, **options)
    assert ours.shape == (2, 6) and torch.equal(ours, theirs)
    for row in range(2):
        assert torch.equal(
            greedy_without_cache(plain, plain.embed(ids[row : row + 1]), 6), ours[row : row + 1]
        )


# -- per-layer inputs ------------------------------------------------------------------------------------------
def test_layer_inputs_reach_every_layer_call_in_forward_hidden_states_and_each_generate_step():
    lm = tiny().eval()
    lm.wrap_decoder_layers(shifted)
    x = torch.randn(1, 5, WIDTH)
    layers = range(len(lm.decoder_layers))
    for run in (lm.forward, lm.hidden_states):
        probe = Probe()
        with torch.no_grad():
            run(x, layer_inputs=probe)
        assert probe.calls == [(i, 5) for i in layers]
    probe = Probe()
    lm.generate(x, torch.ones(1, 5, dtype=torch.long), layer_inputs=probe, max_new_tokens=4, min_new_tokens=4)
    # the prompt, then one new position per step (the 4th token comes from the 3rd step's logits)
    assert probe.calls == [(i, 5) for i in layers] + [(i, 1) for _ in range(3) for i in layers]
    assert lm.model._forward_pre_hooks == {}  # nothing left on the model


def test_layer_inputs_change_every_generate_step_like_full_forward_passes():
    """A shift carried by the layer inputs acts on every cached step exactly as on a full forward pass."""
    lm = tiny().eval()
    lm.wrap_decoder_layers(shifted, indices=[0, 2])
    x = lm.embed(torch.tensor([[5, 9, 12, 7]]))
    shift = 3 * torch.randn(1, 1, WIDTH)
    new = lm.generate(
        x,
        torch.ones(1, 4, dtype=torch.long),
        Probe(shift),
        max_new_tokens=6,
        min_new_tokens=6,
        do_sample=False,
    )
    assert torch.equal(new, greedy_without_cache(lm, x, 6, Probe(shift)))
    assert not torch.equal(new, greedy_without_cache(lm, x, 6))  # the shift matters


def test_gradients_reach_layer_inputs_through_checkpoints():
    plain = tiny()
    plain.wrap_decoder_layers(shifted)
    ckpt = same_weights(TinyLlama, tiny(), shifted, gradient_checkpointing=True)
    x = torch.randn(2, 5, WIDTH)
    grads = []
    for lm in (plain, ckpt):
        shift = torch.randn(2, 1, WIDTH, generator=torch.Generator().manual_seed(2)).requires_grad_()
        lm(x, layer_inputs=Probe(shift)).square().mean().backward()
        grads.append(shift.grad)
    assert grads[0].abs().sum() > 0 and torch.equal(grads[1], grads[0])


def test_unwrapped_layers_ignore_layer_inputs_bit_identically():
    lm = tiny().eval()
    x = torch.randn(2, 6, WIDTH)
    probe = Probe(shift=torch.ones(2, 1, WIDTH))
    with torch.no_grad():
        assert torch.equal(lm(x, layer_inputs=probe), lm(x))
        assert torch.equal(lm.hidden_states(x, layer_inputs=probe), lm.hidden_states(x))
    mask = torch.ones(2, 6, dtype=torch.long)
    options = dict(max_new_tokens=3, min_new_tokens=3, do_sample=False)
    assert torch.equal(lm.generate(x, mask, probe, **options), lm.generate(x, mask, **options))
    assert probe.calls == []


def test_layer_inputs_are_checked():
    lm = tiny()
    with pytest.raises(TypeError, match="must be a LayerInputs"):
        lm(torch.randn(1, 3, WIDTH), layer_inputs={"shift": None})


# -- where the wrappers sit ------------------------------------------------------------------------------------
def test_family_wrapper_goes_inside_the_efficiency_wrappers_built_before_it():
    lm = tiny(gradient_checkpointing=True, compile={"backend": "eager"})
    hf_layers = [bare_layer(layer) for layer in lm.decoder_layers]
    assert type(hf_layers[0]).__name__ == "LlamaDecoderLayer"
    lm.wrap_decoder_layers(shifted, indices=[1])
    lm.wrap_decoder_layers(identity, indices=[1])  # a second family wrapper goes around the first
    entry = lm.decoder_layers[1]
    assert isinstance(entry, CheckpointWrapper)
    compiled = entry._checkpoint_wrapped_module
    assert isinstance(compiled, CompiledLayer) and type(compiled._orig_mod) is DecoderLayerWrapper
    assert isinstance(compiled._orig_mod.decoder_layer, Shifted)
    assert [bare_layer(layer) for layer in lm.decoder_layers] == hf_layers  # the same HF modules, untouched
    assert not any(isinstance(m, CheckpointWrapper | CompiledLayer) for m in compiled._orig_mod.modules())
    # the HF layer's name inside a family wrapper: decoder_layer
    assert "model.model.layers.1.decoder_layer.decoder_layer.self_attn.q_proj.weight" in lm.state_dict()


def test_compiled_and_checkpointed_wrappers_give_the_same_logits():
    """Compiled (dynamo, eager backend) and checkpointed identity wrappers on a frozen LLM passing gradients on."""
    plain = tiny().eval().requires_grad_(False)
    fast = same_weights(TinyLlama, plain, gradient_checkpointing=True, compile={"backend": "eager"})
    fast.eval().requires_grad_(False)
    outputs = []
    for lm in (plain, fast):
        x = torch.randn(1, 5, WIDTH, generator=torch.Generator().manual_seed(3)).requires_grad_()
        logits = lm(x)
        logits.square().mean().backward()
        outputs.append((logits.detach(), x.grad))
    torch.testing.assert_close(outputs[1], outputs[0], rtol=0, atol=0)


def test_efficiency_options_keep_the_state_dict_keys():
    plain = tiny()
    for options in (
        {"gradient_checkpointing": True},
        {"compile": True},
        {"gradient_checkpointing": True, "compile": True},
    ):
        lm = tiny(**options)
        assert list(lm.state_dict()) == list(plain.state_dict()), options
        lm.load_state_dict(plain.state_dict())  # strict: the same keys load back
        # with a family wrapper, the keys are those of the wrapped model without the efficiency options
        family = copy.deepcopy(plain)
        family.wrap_decoder_layers(identity)
        lm.wrap_decoder_layers(identity)
        assert list(lm.state_dict()) == list(family.state_dict()), options
        assert {state_name(n) for n, _ in lm.named_parameters()} == set(family.state_dict()), options


def test_wrap_refuses_bad_indices_and_a_wrapper_without_the_layer():
    lm = tiny()
    with pytest.raises(ValueError, match=r"0\.\.2"):
        lm.wrap_decoder_layers(identity, indices=[3])
    with pytest.raises(ValueError, match="distinct"):
        lm.wrap_decoder_layers(identity, indices=[1, 1])
    with pytest.raises(TypeError, match="DecoderLayerWrapper"):
        lm.wrap_decoder_layers(lambda i, layer: nn.Identity())
    lm.wrap_decoder_layers(lambda i, layer: layer)  # handing the layer back leaves it as it is
    assert type(lm.decoder_layers[0]).__name__ == "LlamaDecoderLayer"
