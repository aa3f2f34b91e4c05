"""BLIP-2 stage 1 (Li et al. 2023, "BLIP-2: Bootstrapping Language-Image Pre-training with Frozen Image Encoders
and Large Language Models", section 3.2): the Q-Former with both its branches, the three attention masks and the
pieces of the three losses.

The Q-Former runs learned queries and text tokens through one BERT-style stack. In every layer they share the
self-attention (who sees whom is set by the objective's mask), only the queries cross-attend to the frozen image
features (layers 0, f, 2f, ...), and each branch has its own feed-forward::

    query_tokens [1, Q, H] --expand--> [B, Q, H] --.
    input_ids [B, L] --word + position embeddings--> [B, L, H] --cat, query_norm--> [B, Q + L, H]
      --layers(., vision_norm(features [B, N, D_v]), mask [B, Q + L, Q + L])--> [B, Q + L, H]

``query_norm`` is BERT's embedding LayerNorm, applied to the queries and the text embeddings alike (``transformers``:
``qformer.layernorm``; LAVIS: ``Qformer.bert.embeddings.LayerNorm``). The query branch has the names of
:class:`~lit_mllm.nn.connectors.QFormerConnector` (``vision_norm``, ``query_tokens``, ``query_norm``,
``layers.i.self_attn`` / ``cross_attn`` / ``ffn``); the text branch adds ``word_embeddings``,
``position_embeddings`` and ``layers.i.text_ffn``. So a stage-1 Q-Former starts the stage-2 connector
(``QFormerConnector(init_from=...)``) with the text branch left behind.

The objectives (:func:`objective_mask` builds each one's mask over ``[queries; text]``):

- ITC, image-text contrastive (unimodal mask): queries see queries, text sees text. Similarity of image ``i`` and
  text ``j`` is the largest over queries of ``vision_proj(query) . text_proj(text [CLS])`` (both L2-normalised),
  divided by a learned temperature (:func:`itc_similarity`).
- ITM, image-text matching (bidirectional mask): everything sees everything; a linear head on each query output,
  averaged over queries, says match / no match. Each image gets a negative text and each text a negative image,
  drawn from the ITC similarities (:func:`sample_hard_negatives`).
- ITG, image-grounded text generation (multimodal causal mask): queries see queries, a text token sees every query
  and the text up to itself; ``[DEC]`` replaces ``[CLS]`` and an LM head (tied to the word embeddings) predicts
  the next token. The queries' states are those of the ITC pass (LAVIS reuses them through the key/value cache).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lit_mllm.nn.connectors.qformer import (
    QFORMER_LAYER_NORM_EPS,
    VISION_LAYER_NORM_EPS,
    QFormerLayer,
    _FeedForward,
    blip2_key_to_connector,
)

Objective = Literal["itc", "itm", "itg"]
OBJECTIVES: tuple[Objective, ...] = ("itc", "itm", "itg")


def objective_mask(objective: Objective, num_queries: int, text_mask: Tensor) -> Tensor:
    """Who may attend to whom over ``[queries; text]`` for one stage-1 objective.

    Args:
        objective: ``itc`` (unimodal: queries see only queries, text only text), ``itm`` (bidirectional: all see
            all) or ``itg`` (multimodal causal: queries see only queries, text sees every query and the text up to
            and including itself).
        num_queries: ``Q``, the learned queries in front of the text.
        text_mask: ``[B, L]`` 1 (True) on real text tokens, 0 on padding; padding is never seen.

    Returns:
        ``[B, Q + L, Q + L]`` bool, True where row position may attend to column position.
    """
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective!r}")
    batch, length = text_mask.shape
    total = num_queries + length
    is_query = torch.arange(total, device=text_mask.device) < num_queries  # [Q + L]
    if objective == "itm":
        allowed = torch.ones(total, total, dtype=torch.bool, device=text_mask.device)
    else:
        same_side = is_query[:, None] == is_query[None, :]  # [Q + L, Q + L]
        allowed = same_side if objective == "itc" else same_side | (~is_query[:, None] & is_query[None, :])
        if objective == "itg":
            causal = torch.ones(total, total, dtype=torch.bool, device=text_mask.device).tril()
            allowed = allowed & (is_query[None, :] | causal)  # text keys only up to the row's position
    keys = torch.cat([text_mask.new_ones(batch, num_queries), text_mask], dim=1).bool()  # [B, Q + L]
    return allowed[None] & keys[:, None, :]  # [B, Q + L, Q + L]


class QFormerTextLayer(QFormerLayer):
    """One Q-Former layer over ``[queries; text]``: the connector's layer (shared masked self-attention,
    cross-attention to the image for the queries, their feed-forward ``ffn``) with a feed-forward of the text's own
    (BLIP-2: ``intermediate_query`` / ``output_query`` for the queries, ``intermediate`` / ``output`` for the text)."""

    def __init__(
        self,
        hidden_size: int,
        vision_dim: int,
        num_heads: int,
        intermediate_size: int,
        cross_attention: bool,
        dropout: float,
    ) -> None:
        super().__init__(hidden_size, vision_dim, num_heads, intermediate_size, cross_attention, dropout)
        self.text_ffn = _FeedForward(hidden_size, intermediate_size, dropout)

    def forward(self, x: Tensor, features: Tensor, num_queries: int, mask: Tensor) -> Tensor:
        """``x [B, Q + L, H]``, ``features [B, N, D_v]``, ``mask [B, 1, Q + L, Q + L]`` -> ``[B, Q + L, H]``."""
        x = self.self_attn(x, x, mask)  # [B, Q + L, H]
        queries, text = x[:, :num_queries], x[:, num_queries:]
        if self.cross_attn is not None:
            queries = self.cross_attn(queries, features)  # [B, Q, H]
        return torch.cat([self.ffn(queries), self.text_ffn(text)], dim=1)


class QFormer(nn.Module):
    """BLIP-2's Q-Former with its query and text branches (see the module docstring for the names)."""

    def __init__(
        self,
        vision_dim: int,
        vocab_size: int,
        num_queries: int = 32,
        num_layers: int = 12,
        hidden_size: int = 768,
        num_heads: int = 12,
        intermediate_size: int = 3072,
        cross_attention_frequency: int = 2,
        dropout: float = 0.0,
        vision_norm: bool = True,
        max_positions: int = 512,
    ) -> None:
        """
        Args:
            vision_dim: Width ``D_v`` of the vision features (from the tower).
            vocab_size: Text vocabulary (from the tokenizer).
            num_queries: Learned query tokens (BLIP-2: 32).
            num_layers: Transformer layers (BLIP-2: 12, initialised from BERT-base).
            hidden_size: Width of the Q-Former (BLIP-2: 768).
            num_heads: Attention heads; must divide hidden_size (BLIP-2: 12).
            intermediate_size: Width of the feed-forward blocks (BLIP-2: 3072).
            cross_attention_frequency: Cross-attention to the image in layers 0, f, 2f, ... (BLIP-2: 2).
            dropout: Dropout on attention probabilities, residual branches and embeddings (BLIP-2: 0.1).
            vision_norm: LayerNorm the vision features first (BLIP-2's ln_vision); off if the tower normalises.
            max_positions: Text positions with an embedding (BERT: 512).
        """
        super().__init__()
        for name, value in (
            ("num_queries", num_queries),
            ("num_layers", num_layers),
            ("num_heads", num_heads),
            ("cross_attention_frequency", cross_attention_frequency),
            ("max_positions", max_positions),
        ):
            if value < 1:
                raise ValueError(f"QFormer needs {name} >= 1, got {value}")
        if hidden_size % num_heads:
            raise ValueError(
                f"QFormer needs hidden_size divisible by num_heads, got {hidden_size} and {num_heads}"
            )
        self.num_queries, self.hidden_size, self.max_positions = num_queries, hidden_size, max_positions
        self.vision_norm = (
            nn.LayerNorm(vision_dim, eps=VISION_LAYER_NORM_EPS) if vision_norm else nn.Identity()
        )
        self.query_tokens = nn.Parameter(torch.empty(1, num_queries, hidden_size))  # [1, Q, H]
        self.word_embeddings = nn.Embedding(vocab_size, hidden_size)
        self.position_embeddings = nn.Embedding(max_positions, hidden_size)
        self.query_norm = nn.LayerNorm(hidden_size, eps=QFORMER_LAYER_NORM_EPS)  # queries' and text's alike
        self.embed_dropout = nn.Dropout(dropout)
        self.layers = nn.ModuleList(
            QFormerTextLayer(
                hidden_size,
                vision_dim,
                num_heads,
                intermediate_size,
                cross_attention=i % cross_attention_frequency == 0,
                dropout=dropout,
            )
            for i in range(num_layers)
        )
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """BERT / BLIP-2 initialisation: normal(0, 0.02) weights, embeddings and queries, zero biases, unit norms."""
        nn.init.normal_(self.query_tokens, std=0.02)
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=0.02)
            if isinstance(module, nn.Linear):
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def forward(self, features: Tensor, input_ids: Tensor, mask: Tensor) -> Tensor:
        """``features [B, N, D_v]``, ``input_ids [B, L]`` (right-padded; positions from 0), ``mask [B, Q + L,
        Q + L]`` (:func:`objective_mask`) -> hidden states ``[B, Q + L, H]``, queries first."""
        length = input_ids.shape[1]
        if length > self.max_positions:
            raise ValueError(f"{length} text tokens, over the Q-Former's max_positions={self.max_positions}")
        positions = torch.arange(length, device=input_ids.device)
        text = self.word_embeddings(input_ids) + self.position_embeddings(positions)  # [B, L, H]
        queries = self.query_tokens.expand(input_ids.shape[0], -1, -1)  # [B, Q, H]
        x = self.embed_dropout(self.query_norm(torch.cat([queries, text], dim=1)))  # [B, Q + L, H]
        features = self.vision_norm(features)  # [B, N, D_v]
        for layer in self.layers:
            x = layer(x, features, self.num_queries, mask[:, None])
        return x


QFormerFactory = Callable[[int, int], QFormer]
"""What configs provide: called with ``(vision width, vocabulary size)`` by the stage-1 module."""


class PretrainingHeads(nn.Module):
    """The stage-1 heads on the Q-Former: ITC projections and temperature, the ITM classifier, the LM head."""

    def __init__(
        self, hidden_size: int, vocab_size: int, embed_dim: int = 256, temperature: float = 0.07
    ) -> None:
        """
        Args:
            hidden_size: Width of the Q-Former.
            vocab_size: Text vocabulary (the LM head's outputs).
            embed_dim: Width of the contrastive embeddings (BLIP-2: 256).
            temperature: Initial contrastive temperature, learned (as its log) and kept in [0.001, 0.5] (BLIP-2:
                0.07).
        """
        super().__init__()
        self.vision_proj = nn.Linear(hidden_size, embed_dim)
        self.text_proj = nn.Linear(hidden_size, embed_dim)
        self.itm_head = nn.Linear(hidden_size, 2)
        # BERT's prediction head: dense + GELU + LayerNorm, then the word embeddings (tied) and a bias
        self.lm_transform = nn.Sequential(
            nn.Linear(hidden_size, hidden_size),
            nn.GELU(),
            nn.LayerNorm(hidden_size, eps=QFORMER_LAYER_NORM_EPS),
        )
        self.lm_bias = nn.Parameter(torch.zeros(vocab_size))
        # BLIP-2 learns the temperature itself (at lr 1e-4); its log is learned here: Adam moves a scalar by about
        # the learning rate per step, which at the tiny configs' 1e-3 drives a raw temperature to its 0.5 clamp in a
        # few hundred steps, before the similarities separate anything (and ITC stalls at log B)
        self.log_temperature = nn.Parameter(torch.tensor(float(temperature)).log())
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)

    def temperature(self) -> Tensor:
        """The temperature, clamped in place to [0.001, 0.5] first as BLIP-2 does at each step."""
        with torch.no_grad():
            self.log_temperature.clamp_(math.log(0.001), math.log(0.5))
        return self.log_temperature.exp()

    def lm_logits(self, hidden: Tensor, word_embeddings: nn.Embedding) -> Tensor:
        """``[..., H] -> [..., V]`` through the tied word embeddings."""
        return F.linear(self.lm_transform(hidden), word_embeddings.weight, self.lm_bias)


def itc_similarity(query_embeds: Tensor, text_embeds: Tensor) -> Tensor:
    """Image-text similarity of BLIP-2's ITC: for image ``i`` and text ``j``, the largest over queries ``q`` of
    ``query_embeds[i, q] . text_embeds[j]``.

    Args:
        query_embeds: ``[I, Q, E]`` L2-normalised projected query outputs.
        text_embeds: ``[T, E]`` L2-normalised projected text ``[CLS]`` outputs.

    Returns:
        ``[I, T]`` similarities (cosines, before the temperature).
    """
    return torch.einsum("iqe,te->itq", query_embeds, text_embeds).amax(dim=-1)


def sample_hard_negatives(
    logits: Tensor, positive: Tensor, generator: torch.Generator | None = None
) -> Tensor:
    """For each row, a column drawn with probability ``softmax(logits[row])`` over the row's non-positive columns
    (BLIP-2's hard negatives: similar pairs are drawn more often).

    Args:
        logits: ``[B, B]`` ITC similarities over the temperature (image -> text for a negative text per image,
            its transpose for a negative image per text).
        positive: ``[B, B]`` bool, True where a column counts as a positive of the row (the diagonal, and e.g.
            pairs with identical captions); never drawn. A row whose every other column is positive draws
            uniformly among the other columns.
        generator: Random generator for the draw (None: torch's default).

    Returns:
        ``[B]`` column index of each row's negative.
    """
    size = logits.shape[0]
    if size < 2:
        raise ValueError("hard negatives need at least two pairs in a batch")
    diagonal = torch.eye(size, dtype=torch.bool, device=logits.device)
    positive = positive | diagonal
    weights = logits.detach().float().masked_fill(positive, float("-inf")).softmax(dim=-1)  # [B, B]
    stuck = positive.all(dim=-1)  # rows with nothing but positives: any other column
    weights[stuck] = (~diagonal[stuck]).float()
    return torch.multinomial(weights, 1, generator=generator).squeeze(1)  # [B]


_TEXT_BRANCH = [  # transformers / LAVIS names of the text branch -> QFormer names
    (
        r"(?:qformer\.|Qformer\.bert\.)?encoder\.layer\.(\d+)\.intermediate\.dense\.(weight|bias)",
        r"layers.\1.text_ffn.fc1.\2",
    ),
    (
        r"(?:qformer\.|Qformer\.bert\.)?encoder\.layer\.(\d+)\.output\.dense\.(weight|bias)",
        r"layers.\1.text_ffn.fc2.\2",
    ),
    (
        r"(?:qformer\.|Qformer\.bert\.)?encoder\.layer\.(\d+)\.output\.LayerNorm\.(weight|bias)",
        r"layers.\1.text_ffn.norm.\2",
    ),
    (
        r"(?:embeddings|Qformer\.bert\.embeddings)\.(word|position)_embeddings\.weight",
        r"\1_embeddings.weight",
    ),
]
_HEADS = {  # Blip2ForImageTextRetrieval / LAVIS Blip2Qformer -> PretrainingHeads
    "vision_projection": "vision_proj",
    "vision_proj": "vision_proj",
    "text_projection": "text_proj",
    "text_proj": "text_proj",
    "itm_head": "itm_head",
}


def blip2_stage1_key(key: str) -> str | None:
    """Name in :class:`~lit_mllm.lit.QFormerPretraining`'s state dict (``qformer.*``, ``heads.*``) of a BLIP-2
    stage-1 checkpoint key (``transformers``' ``Blip2ForImageTextRetrieval`` or LAVIS' ``Blip2Qformer``), or None
    for keys without a place (the vision model, LAVIS' LM head and ``temp``, learned here as its log). Query-branch
    names are the connector's (:func:`~lit_mllm.nn.connectors.qformer.blip2_key_to_connector`)."""
    for pattern, replacement in _TEXT_BRANCH:
        match = re.fullmatch(pattern, key)
        if match:
            return "qformer." + match.expand(replacement)
    head, _, param = key.rpartition(".")
    if head in _HEADS and param in ("weight", "bias"):
        return f"heads.{_HEADS[head]}.{param}"
    name = blip2_key_to_connector(key)
    if name is None or name.startswith("proj."):
        return None
    return "qformer." + name
