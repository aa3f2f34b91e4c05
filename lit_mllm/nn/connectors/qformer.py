"""Q-Former connector (BLIP-2, Li et al. 2023, "BLIP-2: Bootstrapping Language-Image Pre-training with Frozen
Image Encoders and Large Language Models").

A fixed set of ``num_queries`` learned query tokens reads the image through cross-attention, so the LLM
receives ``T = num_queries`` tokens whatever the number of vision features ``N``::

    features [B, N, D_v] --vision_norm--> [B, N, D_v] ----------------------------.
    query_tokens [1, Q, H] --expand, query_norm--> [B, Q, H] --layers(., features)--> [B, Q, H] --proj--> [B, Q, D_llm]

Each layer is BERT-style post-LN: self-attention over the queries, cross-attention to the (normalised)
vision features in every ``cross_attention_frequency``-th layer (layers 0, f, 2f, ...; BLIP-2 uses every
other layer), then a GELU feed-forward; each sub-block is ``LayerNorm(x + sublayer(x))``.

``vision_norm`` is BLIP-2's ``ln_vision``, the LayerNorm on the frozen ViT's output. In ``transformers``
checkpoints it lives in the vision model (``vision_model.post_layernorm``), but lit_mllm's Hugging Face towers
return ``hidden_states[...]``, which is *before* that norm, so the connector applies it. Turn it off when the
tower already normalises its output.

Only the Q-Former's image path is built (the queries); the text-side embeddings and feed-forward that BLIP-2's
first stage uses are not needed to feed an LLM. That first stage is :class:`lit_mllm.nn.fusion.QFormer` (both
branches, the same names for the query branch) trained by :class:`lit_mllm.lit.QFormerPretraining`; ``init_from``
starts this connector from its checkpoint (BLIP-2's stage 2). :meth:`QFormerConnector.from_blip2`
and :meth:`QFormerConnector.load_blip2_state_dict` read ``transformers`` BLIP-2 checkpoints
(``Blip2Model`` / ``Blip2ForConditionalGeneration``, or a bare ``Blip2QFormerModel``) and original LAVIS /
MiniGPT-4 ones (``Qformer.bert.*``, ``ln_vision``, ``opt_proj`` / ``t5_proj`` / ``llama_proj``).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lit_mllm.nn.connectors.base import Connector

QFORMER_LAYER_NORM_EPS = 1e-12
"""BERT's epsilon, used by every LayerNorm of the Q-Former."""
VISION_LAYER_NORM_EPS = 1e-6
"""Epsilon of ``transformers``' ``Blip2VisionConfig``, which holds BLIP-2's ``ln_vision``."""


class _Attention(nn.Module):
    """Multi-head attention of ``x`` over ``context`` with BERT's post-LN residual: ``norm(x + attn)``."""

    def __init__(self, dim: int, context_dim: int, num_heads: int, dropout: float) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.dropout = dropout
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(context_dim, dim)
        self.v_proj = nn.Linear(context_dim, dim)
        self.out_proj = nn.Linear(dim, dim)
        self.out_dropout = nn.Dropout(dropout)
        self.norm = nn.LayerNorm(dim, eps=QFORMER_LAYER_NORM_EPS)

    def _heads(self, x: Tensor) -> Tensor:
        return x.unflatten(-1, (self.num_heads, -1)).transpose(1, 2)  # [B, L, H] -> [B, heads, L, H/heads]

    def forward(self, x: Tensor, context: Tensor, mask: Tensor | None = None) -> Tensor:
        """``x [B, Q, H]`` attends to ``context [B, L, D]``; ``mask`` (bool, broadcast to ``[B, heads, Q, L]``):
        True where a position of ``x`` may see one of ``context``; None: everything is seen."""
        q = self._heads(self.q_proj(x))  # [B, h, Q, d]
        k = self._heads(self.k_proj(context))  # [B, h, L, d]
        v = self._heads(self.v_proj(context))  # [B, h, L, d]
        attn = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0
        )
        attn = attn.transpose(1, 2).flatten(2)  # [B, Q, H]
        return self.norm(x + self.out_dropout(self.out_proj(attn)))  # [B, Q, H]


class _FeedForward(nn.Module):
    """``norm(x + fc2(gelu(fc1(x))))``, BERT's intermediate + output block."""

    def __init__(self, dim: int, intermediate_size: int, dropout: float) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, intermediate_size)
        self.fc2 = nn.Linear(intermediate_size, dim)
        self.act = nn.GELU()
        self.out_dropout = nn.Dropout(dropout)
        self.norm = nn.LayerNorm(dim, eps=QFORMER_LAYER_NORM_EPS)

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(x + self.out_dropout(self.fc2(self.act(self.fc1(x)))))  # [B, Q, H]


class QFormerLayer(nn.Module):
    """One Q-Former layer on the queries: self-attention, optional cross-attention to the image, feed-forward."""

    def __init__(
        self,
        hidden_size: int,
        vision_dim: int,
        num_heads: int,
        intermediate_size: int,
        cross_attention: bool,
        dropout: float,
    ) -> None:
        super().__init__()
        self.self_attn = _Attention(hidden_size, hidden_size, num_heads, dropout)
        self.cross_attn = _Attention(hidden_size, vision_dim, num_heads, dropout) if cross_attention else None
        self.ffn = _FeedForward(hidden_size, intermediate_size, dropout)

    def forward(self, queries: Tensor, features: Tensor) -> Tensor:
        x = self.self_attn(queries, queries)  # [B, Q, H]
        if self.cross_attn is not None:
            x = self.cross_attn(x, features)  # [B, Q, H], keys/values from [B, N, D_v]
        return self.ffn(x)  # [B, Q, H]


class QFormerConnector(Connector):
    """``[B, N, D_vision] -> [B, num_queries, D_llm]``: learned queries cross-attend to the features (T = num_queries)."""

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        num_queries: int = 32,
        num_layers: int = 12,
        hidden_size: int = 768,
        num_heads: int = 12,
        intermediate_size: int = 3072,
        cross_attention_frequency: int = 2,
        dropout: float = 0.0,
        vision_norm: bool = True,
        init_from: str | None = None,
    ) -> None:
        """
        Args:
            num_queries: Learned query tokens, i.e. image tokens given to the LLM (BLIP-2: 32).
            num_layers: Q-Former transformer layers (BLIP-2: 12, initialised from BERT-base).
            hidden_size: Width of the Q-Former (BLIP-2: 768).
            num_heads: Attention heads per attention block; must divide hidden_size (BLIP-2: 12).
            intermediate_size: Width of the feed-forward blocks (BLIP-2: 3072).
            cross_attention_frequency: Cross-attention to the image in layers 0, f, 2f, ... (BLIP-2: 2, every other layer).
            dropout: Dropout on attention probabilities and residual branches (BLIP-2 pre-training: 0.1).
            vision_norm: LayerNorm the vision features first (BLIP-2's ln_vision); off if the tower already normalises.
            init_from: A checkpoint of BLIP-2's stage 1 trained here (``.ckpt`` or exported ``.safetensors`` of
                ``lit_mllm.lit.QFormerPretraining``): its Q-Former's query branch is loaded, the projection stays
                initialised (stage 1 has no LLM). See :meth:`load_qformer_pretraining`.
        """
        super().__init__(in_dim, out_dim)
        for name, value in (
            ("num_queries", num_queries),
            ("num_layers", num_layers),
            ("num_heads", num_heads),
            ("cross_attention_frequency", cross_attention_frequency),
        ):
            if value < 1:
                raise ValueError(f"QFormerConnector needs {name} >= 1, got {value}")
        if hidden_size % num_heads:
            raise ValueError(
                f"QFormerConnector needs hidden_size divisible by num_heads, got {hidden_size} and {num_heads}"
            )
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"QFormerConnector needs 0 <= dropout < 1, got {dropout}")
        self.num_queries = num_queries
        self.hidden_size = hidden_size
        self.cross_attention_frequency = cross_attention_frequency

        self.vision_norm = nn.LayerNorm(in_dim, eps=VISION_LAYER_NORM_EPS) if vision_norm else nn.Identity()
        self.query_tokens = nn.Parameter(torch.empty(1, num_queries, hidden_size))  # [1, Q, H]
        self.query_norm = nn.LayerNorm(hidden_size, eps=QFORMER_LAYER_NORM_EPS)
        self.query_dropout = nn.Dropout(dropout)
        self.layers = nn.ModuleList(
            QFormerLayer(
                hidden_size,
                in_dim,
                num_heads,
                intermediate_size,
                cross_attention=i % cross_attention_frequency == 0,
                dropout=dropout,
            )
            for i in range(num_layers)
        )
        self.proj = nn.Linear(hidden_size, out_dim)
        self.reset_parameters()
        if init_from is not None:
            self.load_qformer_pretraining(init_from)

    def reset_parameters(self) -> None:
        """BERT / BLIP-2 initialisation: normal(0, 0.02) weights and query tokens, zero biases, unit LayerNorms."""
        nn.init.normal_(self.query_tokens, std=0.02)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def num_tokens(self, num_features: int) -> int:
        if num_features < 1:
            raise ValueError(
                f"QFormerConnector needs at least one vision feature to attend to (N >= 1), got N={num_features}"
            )
        return self.num_queries

    def forward(self, features: Tensor) -> Tensor:
        features = self.vision_norm(features)  # [B, N, D_v]
        queries = self.query_tokens.expand(features.shape[0], -1, -1)  # [B, Q, H]
        x = self.query_dropout(self.query_norm(queries))  # [B, Q, H]
        for layer in self.layers:
            x = layer(x, features)  # [B, Q, H]
        return self.proj(x)  # [B, Q, D_llm]

    # ------------------------------------------------------------------------------------------------
    # Loading BLIP-2 weights
    # ------------------------------------------------------------------------------------------------

    def load_blip2_state_dict(self, state_dict: Mapping[str, Tensor], strict: bool = True) -> list[str]:
        """Copy BLIP-2 weights into this connector, renaming them; keys it has no use for are skipped.

        Accepts ``transformers`` names (a ``Blip2Model`` / ``Blip2ForConditionalGeneration`` state dict, or a
        bare ``Blip2QFormerModel`` one) and original LAVIS ones (``Qformer.bert.*``, ``query_tokens``,
        ``ln_vision``, ``opt_proj`` / ``t5_proj`` / ``llm_proj``; MiniGPT-4's ``llama_proj``). For MiniGPT-4,
        pass the BLIP-2 Q-Former checkpoint merged with MiniGPT-4's own (``{**blip2_sd, **minigpt4_sd}``).
        The vision LayerNorm is skipped when this connector was built with ``vision_norm=False``.

        Args:
            state_dict: Checkpoint tensors by name.
            strict: Raise if some parameter of this connector is not in the checkpoint (e.g. the projection
                when loading a bare Q-Former); otherwise leave those as initialised.

        Returns:
            Names of this connector's parameters the checkpoint did not provide.

        Raises:
            ValueError: when the checkpoint holds Q-Former weights this connector has no place for (other
                ``num_layers`` or ``cross_attention_frequency``), or when ``strict`` and some are missing.
            RuntimeError: on a shape mismatch (other widths or ``num_queries``), from ``load_state_dict``.
        """
        mapped = {}
        for key, value in state_dict.items():
            name = blip2_key_to_connector(key)
            if name is None or (
                name.startswith("vision_norm.") and isinstance(self.vision_norm, nn.Identity)
            ):
                continue
            mapped[name] = value
        missing, unexpected = self.load_state_dict(mapped, strict=False)
        hint = "; do num_layers and cross_attention_frequency match the checkpoint?"
        if unexpected:
            raise ValueError(
                f"the checkpoint has Q-Former weights this QFormerConnector has no place for{hint} {unexpected}"
            )
        if strict and missing:
            layer_hint = hint if any(name.startswith("layers.") for name in missing) else ""
            raise ValueError(
                f"the checkpoint lacks {missing}; pass strict=False to keep those parameters as initialised{layer_hint}"
            )
        return list(missing)

    def load_qformer_pretraining(self, path: str | os.PathLike) -> list[str]:
        """Load the query branch of a stage-1 checkpoint (``lit_mllm.lit.QFormerPretraining``: a Lightning ``.ckpt``
        or an exported ``.safetensors``): its ``qformer.*`` tensors with this connector's names (the same names:
        query tokens, vision and query norms, every layer's attention and query feed-forward). The text branch and
        the pre-training heads are left out; ``proj`` keeps its initialisation. Returns the names loaded.

        Raises:
            ValueError: the file holds no Q-Former, or lacks some of this connector's weights (a stage-1 run with
                ``vision_norm`` off, or fewer layers).
            RuntimeError: a weight of another shape (other widths, ``num_queries`` or ``cross_attention_frequency``
                than stage 1's), from ``load_state_dict``.
        """
        from lit_mllm.training.checkpoints import (
            read_weights,
        )  # reads .ckpt with weights_only=True, or safetensors

        state_dict, _ = read_weights(path)
        prefix = "qformer."
        theirs = {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}
        if not theirs:
            raise ValueError(
                f"{path} holds no 'qformer.*' weights: init_from takes a checkpoint of "
                "lit_mllm.lit.QFormerPretraining (BLIP-2 stage 1); for a BLIP-2 release use QFormerConnector.from_blip2"
            )
        wanted = [k for k in self.state_dict() if not k.startswith("proj.")]
        missing = [k for k in wanted if k not in theirs]
        if missing:
            raise ValueError(
                f"{path} lacks {len(missing)} of the connector's Q-Former weights (e.g. {missing[:3]}); build the "
                "connector with the stage-1 Q-Former's options (num_layers, cross_attention_frequency, vision_norm)"
            )
        self.load_state_dict({k: theirs[k] for k in wanted}, strict=False)
        return wanted

    @classmethod
    def from_blip2(
        cls,
        source: str | os.PathLike | nn.Module,
        out_dim: int | None = None,
        dropout: float = 0.0,
        vision_norm: bool = True,
    ) -> QFormerConnector:
        """Build the connector of a BLIP-2 checkpoint, with its architecture, query tokens and projection.

        Args:
            source: A ``transformers`` ``Blip2Model`` / ``Blip2ForConditionalGeneration`` (any module with a
                ``Blip2Config``), or a hub name / local folder saved with ``save_pretrained``; from a folder
                or the hub only the connector's tensors are read (the LLM's shards are skipped when indexed).
            out_dim: LLM width; defaults to the checkpoint's. A different width keeps a freshly initialised
                projection (MiniGPT-4's recipe: BLIP-2's Q-Former, a new projection to another LLM).
            dropout: Dropout of the new connector (see ``__init__``); pre-trained BLIP-2 used 0.1.
            vision_norm: Apply BLIP-2's vision LayerNorm (see ``__init__``).
        """
        if isinstance(source, nn.Module):
            config, state_dict = source.config, source.state_dict()
        else:
            config, state_dict = _read_blip2_checkpoint(os.fspath(source))
        qformer = getattr(config, "qformer_config", None)
        if qformer is None or not hasattr(config, "num_query_tokens"):
            raise ValueError(
                f"expected a BLIP-2 model or checkpoint (a Blip2Config), got {type(config).__name__}"
            )
        if qformer.hidden_act != "gelu":
            raise ValueError(
                f"QFormerConnector implements the GELU Q-Former, got hidden_act={qformer.hidden_act!r}"
            )
        llm_width = config.text_config.hidden_size
        connector = cls(
            qformer.encoder_hidden_size,
            out_dim or llm_width,
            num_queries=config.num_query_tokens,
            num_layers=qformer.num_hidden_layers,
            hidden_size=qformer.hidden_size,
            num_heads=qformer.num_attention_heads,
            intermediate_size=qformer.intermediate_size,
            cross_attention_frequency=qformer.cross_attention_frequency,
            dropout=dropout,
            vision_norm=vision_norm,
        )
        for module in connector.modules():
            if isinstance(module, nn.LayerNorm):
                module.eps = qformer.layer_norm_eps
        if vision_norm:
            connector.vision_norm.eps = config.vision_config.layer_norm_eps
        new_projection = connector.out_dim != llm_width
        if new_projection:
            state_dict = {k: v for k, v in state_dict.items() if not _is_projection(k)}
        missing = connector.load_blip2_state_dict(state_dict, strict=False)
        unexplained = set(missing) - ({"proj.weight", "proj.bias"} if new_projection else set())
        if unexplained:
            raise ValueError(f"the BLIP-2 checkpoint lacks {sorted(unexplained)}")
        return connector


# --------------------------------------------------------------------------------------------------------
# Checkpoint names -> connector names
# --------------------------------------------------------------------------------------------------------

_QFORMER = r"(?:qformer\.|Qformer\.bert\.)?"  # transformers / LAVIS prefix; none in a bare Blip2QFormerModel
_LAYER = _QFORMER + r"encoder\.layer\.(\d+)\."
_PROJECTIONS = r"(?:language_projection|opt_proj|t5_proj|llm_proj|llama_proj)"


def _renames() -> list[tuple[re.Pattern[str], str]]:
    table = [
        (r"query_tokens", "query_tokens"),
        (r"(?:vision_model\.post_layernorm|ln_vision)\.(weight|bias)", r"vision_norm.\1"),
        (_PROJECTIONS + r"\.(weight|bias)", r"proj.\1"),
        (_QFORMER + r"(?:layernorm|embeddings\.LayerNorm)\.(weight|bias)", r"query_norm.\1"),
    ]
    sublayers = {"query": "q_proj", "key": "k_proj", "value": "v_proj"}
    for theirs, ours in (("attention", "self_attn"), ("crossattention", "cross_attn")):
        for their_proj, our_proj in sublayers.items():  # transformers: .attention.query, LAVIS: .self.query
            pattern = _LAYER + rf"{theirs}\.(?:attention|self)\.{their_proj}\.(weight|bias)"
            table.append((pattern, rf"layers.\1.{ours}.{our_proj}.\2"))
        table.append((_LAYER + rf"{theirs}\.output\.dense\.(weight|bias)", rf"layers.\1.{ours}.out_proj.\2"))
        table.append((_LAYER + rf"{theirs}\.output\.LayerNorm\.(weight|bias)", rf"layers.\1.{ours}.norm.\2"))
    table += [  # the query feed-forward; the text one (intermediate / output) is not used for the LLM
        (_LAYER + r"intermediate_query\.dense\.(weight|bias)", r"layers.\1.ffn.fc1.\2"),
        (_LAYER + r"output_query\.dense\.(weight|bias)", r"layers.\1.ffn.fc2.\2"),
        (_LAYER + r"output_query\.LayerNorm\.(weight|bias)", r"layers.\1.ffn.norm.\2"),
    ]
    return [(re.compile(pattern), replacement) for pattern, replacement in table]


_RENAMES = _renames()


def blip2_key_to_connector(key: str) -> str | None:
    """``QFormerConnector`` parameter name of a BLIP-2 checkpoint key, or ``None`` if the connector has no use for it.

    ``qformer.encoder.layer.2.crossattention.attention.key.weight`` (transformers) and
    ``Qformer.bert.encoder.layer.2.crossattention.self.key.weight`` (LAVIS) both map to
    ``layers.2.cross_attn.k_proj.weight``.
    """
    for pattern, replacement in _RENAMES:
        match = pattern.fullmatch(key)
        if match:
            return match.expand(replacement)
    return None


def _is_projection(key: str) -> bool:
    return re.fullmatch(_PROJECTIONS + r"\.(weight|bias)", key) is not None


def _read_blip2_checkpoint(name_or_path: str) -> tuple[object, dict[str, Tensor]]:
    """Config and the connector's tensors of a ``save_pretrained`` BLIP-2 folder or hub repository."""
    from transformers import AutoConfig
    from transformers.utils import cached_file

    config = AutoConfig.from_pretrained(name_or_path)

    def fetch(filename: str) -> str | None:
        return cached_file(name_or_path, filename, _raise_exceptions_for_missing_entries=False)

    for index_name, single_name in (
        ("model.safetensors.index.json", "model.safetensors"),
        ("pytorch_model.bin.index.json", "pytorch_model.bin"),
    ):
        index = fetch(index_name)
        if index is not None:
            with open(index) as f:
                weight_map = json.load(f)["weight_map"]
            names = sorted(
                {file for key, file in weight_map.items() if blip2_key_to_connector(key) is not None}
            )
        else:
            names = [single_name]
        files = [fetch(name) for name in names]
        if names and all(files):
            return config, _load_tensors(files)
    raise FileNotFoundError(f"no safetensors or pytorch_model.bin weights found for {name_or_path!r}")


def _load_tensors(files: list[str]) -> dict[str, Tensor]:
    tensors: dict[str, Tensor] = {}
    for file in files:
        if file.endswith(".safetensors"):
            from safetensors import safe_open

            with safe_open(file, framework="pt") as f:
                for key in f.keys():
                    if blip2_key_to_connector(key) is not None:
                        tensors[key] = f.get_tensor(key)
        else:
            state_dict = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
            tensors.update({k: v for k, v in state_dict.items() if blip2_key_to_connector(k) is not None})
    return tensors
