"""The language model: any Hugging Face causal LM with its tokenizer and chat format, plus tiny offline
presets (Llama-like and Qwen2-like) built from a config and the shipped tiny tokenizer.

The wrapper adds the image placeholder token (resizing embeddings when it is new), picks a pad token,
and exposes the three things a family needs: ``embed`` ids, run the decoder on embeddings, ``generate``.

The decoder layers are one ``nn.ModuleList``, :attr:`LanguageModel.decoder_layers`, found once when the model is
built; the memory estimator, the FSDP policy and the efficiency options all use it. A family reaches into chosen
layers by composition, :meth:`LanguageModel.wrap_decoder_layers` with a
:class:`~lit_mllm.nn.language.layers.DecoderLayerWrapper`, and hands them per-call inputs through ``layer_inputs``
(see :mod:`lit_mllm.nn.language.layers`).

Two efficiency options wrap each decoder-layer entry, outermost whenever a family wraps its layers, leaving the
state-dict keys unchanged (checkpoints and exports do not depend on them):

* ``gradient_checkpointing``: a layer keeps only its inputs for the backward pass and recomputes the rest
  (``torch.utils.checkpoint``, non-reentrant) whenever it runs with autograd, whether the LLM trains or is frozen
  and only passes gradients on to the connector (LLaVA's align stage; a frozen LLM stays in eval mode, where
  ``transformers``' own checkpointing would be off).
* ``compile``: each layer goes through ``torch.compile`` (regional compilation: one layer's graph, reused by all
  layers of the same class), inside the checkpoint when both are on.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, Literal

import torch
from torch import Tensor, nn

from lit_mllm.nn.language.chat import ChatFormat, TokenizerTemplate, VicunaV1
from lit_mllm.nn.language.layers import (
    LAYER_INPUTS,
    CompiledLayer,
    LayerInputs,
    bare_layer,
    checkpointed,
    without_efficiency,
)
from lit_mllm.nn.language.tokenizer import IMAGE_TOKEN, TINY_TOKENIZER_DIR


class LanguageModel(nn.Module):
    """A ``transformers`` causal LM (``AutoModelForCausalLM``) by hub name or local path."""

    def __init__(
        self,
        name_or_path: str,
        tokenizer: str | None = None,
        chat_format: ChatFormat | None = None,
        image_token: str = IMAGE_TOKEN,
        dtype: Literal["bfloat16", "float16", "float32"] | None = None,
        attn_implementation: str | None = "sdpa",
        trust_remote_code: bool = False,
        gradient_checkpointing: bool = False,
        compile: bool | dict[str, Any] = False,
    ) -> None:
        """
        Args:
            name_or_path: Hub name (``lmsys/vicuna-7b-v1.5``) or local folder saved with ``save_pretrained``.
            tokenizer: Tokenizer name or path if it differs from ``name_or_path``.
            chat_format: How conversations are rendered; None uses the tokenizer's own chat template.
            image_token: Placeholder for one image in the text; added to the vocabulary if missing.
            dtype: Weight dtype to load (``bfloat16``, ``float16``, ``float32``); None keeps the checkpoint's.
            attn_implementation: ``sdpa``, ``eager`` or ``flash_attention_2``.
            trust_remote_code: Allow code shipped with the checkpoint to run; off unless you trust the source.
            gradient_checkpointing: Recompute each decoder layer in the backward pass instead of keeping its
                activations (less memory, about one more forward of compute); active whenever the LLM runs with
                autograd, frozen or not.
            compile: ``torch.compile`` each decoder layer's forward; ``true`` with PyTorch's defaults, or a dict of
                its options (``{mode: max-autotune}``, ``{dynamic: true}``, ``{backend: aot_eager}``).
        """
        super().__init__()
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tok = AutoTokenizer.from_pretrained(tokenizer or name_or_path, trust_remote_code=trust_remote_code)
        model = AutoModelForCausalLM.from_pretrained(
            name_or_path,
            dtype=getattr(torch, dtype) if dtype else "auto",
            attn_implementation=attn_implementation,
            trust_remote_code=trust_remote_code,
        )
        self._wrap(model, tok, chat_format or TokenizerTemplate(), image_token)
        self._set_efficiency(gradient_checkpointing, compile)

    def _wrap(self, model: nn.Module, tokenizer, chat_format: ChatFormat, image_token: str) -> None:
        if image_token not in tokenizer.get_vocab():
            from tokenizers import AddedToken

            tokenizer.add_tokens(
                [AddedToken(image_token, special=True, normalized=False)], special_tokens=True
            )
        if tokenizer.pad_token is None:  # Llama/Vicuna ship none; labels mask padding anyway
            tokenizer.pad_token = tokenizer.unk_token or tokenizer.eos_token
        if len(tokenizer) > model.get_input_embeddings().num_embeddings:
            model.resize_token_embeddings(len(tokenizer))
        if tokenizer.eos_token is None:
            raise ValueError(
                f"tokenizer {type(tokenizer).__name__} has no eos_token; replies need an end marker"
            )
        self.model = model
        self.tokenizer = tokenizer
        self.chat_format = chat_format
        self.image_token = image_token
        self.image_token_id = tokenizer.convert_tokens_to_ids(image_token)
        self.hidden_size = model.config.hidden_size
        for knob in ("final_logit_softcapping", "logit_scale", "output_multiplier_scale"):
            if getattr(model.config, knob, None) not in (None, 1, 1.0):
                raise ValueError(
                    f"{type(model).__name__} post-processes its logits ({knob}); LanguageModel.head projects hidden "
                    "states directly and does not support it yet"
                )
        self.max_length = getattr(model.config, "max_position_embeddings", None)
        self.gradient_checkpointing = False
        self.compiled = False
        self._compile_options: dict[str, Any] | None = None
        self._layers_path = _find_decoder_layers(model)

    @property
    def decoder_layers(self) -> nn.ModuleList:
        """The decoder's layers, input side first: the model's own ``nn.ModuleList`` as it sits, so an entry is
        the HF layer or its wrappers (``gradient_checkpointing`` / ``compile`` outermost, then a family's
        :class:`~lit_mllm.nn.language.layers.DecoderLayerWrapper`); :func:`~lit_mllm.nn.language.layers.bare_layer`
        gives the HF layer inside an entry."""
        return self.model.get_submodule(self._layers_path)

    def wrap_decoder_layers(
        self, wrap: Callable[[int, nn.Module], nn.Module], indices: Iterable[int] | None = None
    ) -> None:
        """Replace the chosen decoder layers by ``wrap(index, layer)``, a family's module around each (Flamingo:
        ``range(0, n, 4)``; CogVLM: all).

        ``layer`` is the entry without the efficiency wrappers (the HF layer, or an earlier family wrapper), and
        ``wrap`` must return a :class:`~lit_mllm.nn.language.layers.DecoderLayerWrapper` around it (or ``layer``
        itself to leave it as it is). ``gradient_checkpointing`` and ``compile``, set when the model was built, are
        put back around the result, so they stay outermost and cover the family's computation too.

        Args:
            wrap: ``(index, layer) -> wrapped layer``; the index is the layer's position, input side first.
            indices: The layers to wrap; None wraps every layer.
        """
        layers = self.decoder_layers
        chosen = list(range(len(layers))) if indices is None else [int(i) for i in indices]
        bad = [i for i in chosen if not 0 <= i < len(layers)]
        if bad or len(set(chosen)) != len(chosen):
            raise ValueError(
                f"wrap_decoder_layers: indices {chosen} must be distinct layer positions in 0..{len(layers) - 1} "
                f"({type(self.model).__name__} has {len(layers)} decoder layers)"
            )
        for index in chosen:
            inner = without_efficiency(layers[index])
            wrapped = wrap(index, inner)
            if not isinstance(wrapped, nn.Module) or bare_layer(wrapped) is not bare_layer(inner):
                raise TypeError(
                    f"wrap_decoder_layers: wrap({index}, layer) returned {type(wrapped).__name__}, which does not "
                    "hold the layer it was given; return a DecoderLayerWrapper built around that layer "
                    "(lit_mllm.nn.language.layers.DecoderLayerWrapper)"
                )
            layers[index] = self._with_efficiency(wrapped)

    def _set_efficiency(self, gradient_checkpointing: bool, compile: bool | dict[str, Any]) -> None:
        """Wrap every decoder layer in the checkpoint and/or the compiled-layer wrapper."""
        if compile is True:
            options: dict[str, Any] | None = {}
        elif compile is False:
            options = None
        elif isinstance(compile, dict):
            options = dict(compile)
        else:
            raise TypeError(f"compile must be true/false or a dict of torch.compile options, got {compile!r}")
        self.gradient_checkpointing = gradient_checkpointing
        self.compiled = options is not None
        self._compile_options = options
        layers = self.decoder_layers
        for index, layer in enumerate(layers):
            layers[index] = self._with_efficiency(without_efficiency(layer))

    def _with_efficiency(self, layer: nn.Module) -> nn.Module:
        """``layer`` compiled (when ``compile``) inside the checkpoint (when ``gradient_checkpointing``)."""
        if self._compile_options is not None:
            layer = CompiledLayer(layer, self._compile_options)
        if self.gradient_checkpointing:
            layer = checkpointed(layer)
        return layer

    def embed(self, input_ids: Tensor) -> Tensor:
        """``[B, L] -> [B, L, D]`` token embeddings."""
        return self.model.get_input_embeddings()(input_ids)

    def forward(
        self,
        inputs_embeds: Tensor,
        attention_mask: Tensor | None = None,
        position_ids: Tensor | None = None,
        layer_inputs: LayerInputs | None = None,
    ) -> Tensor:
        """``[B, L, D] -> [B, L, V]`` logits. Packed rows pass ``position_ids`` (restarting at 0 per sample) and no
        attention mask: the model then masks attention block-diagonally. ``layer_inputs`` reaches every decoder
        layer call (see :mod:`lit_mllm.nn.language.layers`)."""
        return self.model(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=False,
            **_layer_kwargs(layer_inputs),
        ).logits

    def hidden_states(
        self,
        inputs_embeds: Tensor,
        attention_mask: Tensor | None = None,
        position_ids: Tensor | None = None,
        layer_inputs: LayerInputs | None = None,
    ) -> Tensor:
        """``[B, L, D] -> [B, L, D]`` final hidden states (after the last norm), before the vocabulary projection;
        arguments as in :meth:`forward`."""
        out = self.model.get_decoder()(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=False,
            **_layer_kwargs(layer_inputs),
        )
        return out.last_hidden_state

    def head(self, hidden: Tensor) -> Tensor:
        """``[..., D] -> [..., V]`` logits from hidden states."""
        return self.model.get_output_embeddings()(hidden)

    @torch.no_grad()
    def generate(
        self, inputs_embeds: Tensor, attention_mask: Tensor, layer_inputs: LayerInputs | None = None, **kwargs
    ) -> Tensor:
        """Greedy / beam / sampled continuation of a left-padded prompt batch ``[B, L, D]`` with a KV cache;
        returns only the new token ids ``[B * n, L_new]`` (``n``: ``num_return_sequences``, default 1), rows that
        finish early padded with the pad token. ``kwargs`` are ``transformers``' generation options
        (``max_new_tokens``, ``num_beams``, ``do_sample``, ``stop_strings``, ...); with ``stop_strings`` the
        tokenizer is handed over too, so a row ends once its text holds one.

        ``layer_inputs`` reaches every decoder-layer call of every step. ``transformers``' ``generate`` refuses
        keyword arguments its model's ``forward`` does not name, so they are added to each forward call of this one
        ``generate`` by a keyword pre-hook on the causal LM, removed when it returns (nothing is left on the model
        or its layers). Where ``transformers`` runs ``k`` rows per prompt row (beam search, several returned
        sequences: the prompt's rows repeated ``k`` times each), the layers get ``layer_inputs.expand(k)``, made
        once per call."""
        kwargs.setdefault("pad_token_id", self.tokenizer.pad_token_id)
        kwargs.setdefault("eos_token_id", self.tokenizer.eos_token_id)
        if kwargs.get("stop_strings"):
            kwargs.setdefault("tokenizer", self.tokenizer)
        if not _layer_kwargs(layer_inputs):
            return self.model.generate(inputs_embeds=inputs_embeds, attention_mask=attention_mask, **kwargs)
        rows = inputs_embeds.shape[0]
        expanded: dict[int, LayerInputs] = {1: layer_inputs}

        def add_layer_inputs(module: nn.Module, args: tuple, call_kwargs: dict) -> tuple[tuple, dict]:
            given = call_kwargs.get("inputs_embeds")
            given = call_kwargs.get("input_ids") if given is None else given
            if given is None:
                given = args[0]
            if given.shape[0] % rows:
                raise RuntimeError(
                    f"generate ran the language model on {given.shape[0]} rows for a prompt batch of {rows}; the "
                    "layer inputs can follow only whole repeats of the prompt rows (beams, returned sequences)"
                )
            times = given.shape[0] // rows
            if times not in expanded:
                expanded[times] = layer_inputs.expand(times)
            return args, {**call_kwargs, **_layer_kwargs(expanded[times])}

        handle = self.model.register_forward_pre_hook(add_layer_inputs, with_kwargs=True)
        try:
            return self.model.generate(inputs_embeds=inputs_embeds, attention_mask=attention_mask, **kwargs)
        finally:
            handle.remove()


def _layer_kwargs(layer_inputs: LayerInputs | None) -> dict[str, LayerInputs]:
    """The keyword arguments that carry ``layer_inputs`` to the decoder layers (none without any)."""
    if layer_inputs is None:
        return {}
    if not isinstance(layer_inputs, LayerInputs):
        raise TypeError(
            f"layer_inputs must be a LayerInputs (lit_mllm.nn.language.layers), got {type(layer_inputs).__name__}; "
            "a family defines its inputs as a dataclass subclassing it"
        )
    return {LAYER_INPUTS: layer_inputs}


def _find_decoder_layers(model: nn.Module) -> str:
    """The dotted path in ``model`` of the ModuleList of a causal LM's decoder layers (``layers`` in
    Llama/Qwen2/OPT, ``h`` in GPT-2, ...)."""
    num_layers = model.config.get_text_config().num_hidden_layers
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else model
    # only the decoder's own modules: a multimodal model's vision blocks may be as many
    prefix = next(name for name, module in model.named_modules() if module is decoder)
    for name, module in decoder.named_modules(prefix=prefix):
        for attr in ("layers", "h", "layer", "blocks"):
            blocks = getattr(module, attr, None)
            if isinstance(blocks, nn.ModuleList) and len(blocks) == num_layers:
                return f"{name}.{attr}" if name else attr
    raise ValueError(
        f"could not find the {num_layers} decoder layers of {type(model).__name__} (looked for a ModuleList named "
        "layers, h, layer or blocks); LanguageModel needs them for its layer wrappers and efficiency options"
    )


def _tiny_config(config_cls, vocab_size: int | None = None, **arch):
    """A config of ``config_cls`` sized by ``arch``, with the shipped tiny tokenizer's ids and vocabulary (or a
    larger embedding table of ``vocab_size`` rows)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(TINY_TOKENIZER_DIR)
    if vocab_size is not None and vocab_size < len(tok):
        raise ValueError(f"vocab_size={vocab_size} is below the tiny tokenizer's {len(tok)} tokens")
    arch["intermediate_size"] = arch["intermediate_size"] or 3 * arch["hidden_size"]
    config = config_cls(
        vocab_size=vocab_size or len(tok),
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        **arch,
    )
    return config, tok


class _TinyLM(LanguageModel):
    """A randomly initialised causal LM of a ``transformers`` architecture with the shipped tiny tokenizer."""

    _architecture: tuple[str, str]  # (config class, model class) in transformers
    _tied_embeddings = False

    def __init__(
        self,
        hidden_size: int = 128,
        num_layers: int = 4,
        num_heads: int = 4,
        num_kv_heads: int = 2,
        intermediate_size: int | None = None,
        max_length: int = 512,
        chat_format: ChatFormat | None = None,
        dtype: Literal["bfloat16", "float16", "float32"] | None = None,
        gradient_checkpointing: bool = False,
        compile: bool | dict[str, Any] = False,
        vocab_size: int | None = None,
    ) -> None:
        """
        Args:
            hidden_size: Model width.
            num_layers: Decoder layers.
            num_heads: Attention heads.
            num_kv_heads: Key/value heads (grouped-query attention when smaller than ``num_heads``).
            intermediate_size: MLP width; default ``3 * hidden_size``.
            max_length: Context length in tokens (image tokens included).
            chat_format: Conversation format; default the architecture's usual one (Vicuna v1 for TinyLlama as in
                LLaVA-1.5, the tokenizer's ChatML template for TinyQwen2).
            dtype: Weight dtype (``bfloat16``, ``float16``, ``float32``); None keeps float32.
            gradient_checkpointing: Recompute each decoder layer in the backward pass, as in :class:`LanguageModel`.
            compile: ``torch.compile`` each decoder layer's forward, as in :class:`LanguageModel`.
            vocab_size: Rows of the embedding and output tables; default the tiny tokenizer's size. Larger values
                give a real LLM's vocabulary cost (32000 for Llama-2) to speed and memory measurements.
        """
        nn.Module.__init__(self)
        import transformers

        config_cls, model_cls = (getattr(transformers, name) for name in self._architecture)
        config, tok = _tiny_config(
            config_cls,
            vocab_size,
            hidden_size=hidden_size,
            num_hidden_layers=num_layers,
            num_attention_heads=num_heads,
            num_key_value_heads=num_kv_heads,
            intermediate_size=intermediate_size,
            max_position_embeddings=max_length,
            tie_word_embeddings=self._tied_embeddings,
        )
        model = model_cls(config)
        if dtype is not None:
            model.to(getattr(torch, dtype))
        self._wrap(model, tok, chat_format or self._default_chat_format(), IMAGE_TOKEN)
        self._set_efficiency(gradient_checkpointing, compile)

    def _default_chat_format(self) -> ChatFormat:
        return VicunaV1()


class TinyLlama(_TinyLM):
    """A randomly initialised Llama-architecture LM with the shipped tiny tokenizer (Vicuna v1 chat format)."""

    _architecture = ("LlamaConfig", "LlamaForCausalLM")


class TinyQwen2(_TinyLM):
    """A randomly initialised Qwen2-architecture LM (tied embeddings) with the tiny tokenizer's ChatML template."""

    _architecture = ("Qwen2Config", "Qwen2ForCausalLM")
    _tied_embeddings = True

    def _default_chat_format(self) -> ChatFormat:
        return TokenizerTemplate()
