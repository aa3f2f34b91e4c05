"""The parts of CLIP pretraining besides the vision tower (Radford et al. 2021, "Learning Transferable Visual Models
From Natural Language Supervision"): a text tower and the contrastive head that puts both modalities in one space.

    image features [B, N, D_v] --mean over N--> LayerNorm --> Linear --> [B, E] --L2-->  image embeddings
    caption ids [B, L] --text tower (its end token)--> [B, D_t] --> Linear --> [B, E] --L2--> text embeddings
    logits = exp(logit_scale) * images @ texts.T                                            [B, B]

The image side pools the tower's output tokens by their mean (the patch tokens a VLM later reads, so they are what
the objective shapes; MM1 and SigLIP pool the same way) and normalises them, because the towers give the
pre-norm hidden state of their last kept block (:mod:`lit_mllm.nn.vision.hf`). The text side reads the final
hidden state at each caption's last token, its end token ``</s>``, as CLIP reads its EOT token.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lit_mllm.nn.language.tokenizer import TINY_TOKENIZER_DIR


class TextTower(nn.Module, ABC):
    """Encodes tokenized captions to one vector each; subclasses set the attributes below."""

    hidden_size: int
    """Width D_t of the caption vector."""
    max_length: int
    """Longest caption in tokens (its end token included)."""
    tokenizer: Any
    """The Hugging Face tokenizer the captions are tokenized with (it has ``bos``, ``eos`` and ``pad`` tokens)."""

    @abstractmethod
    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """``input_ids [B, L]`` right-padded captions each ending in the end token, ``attention_mask [B, L]`` 1 on
        their tokens -> ``[B, D_t]``."""


class TinyCLIPText(TextTower):
    """A randomly initialised ``transformers`` ``CLIPTextModel`` (causal self-attention, learned positions) over the
    shipped tiny tokenizer, or another tokenizer given by name or path."""

    def __init__(
        self,
        hidden_size: int = 64,
        num_layers: int = 2,
        num_heads: int = 4,
        max_length: int = 77,
        tokenizer: str | None = None,
    ) -> None:
        """
        Args:
            hidden_size: Width of the text transformer and of its caption vector.
            num_layers: Transformer blocks.
            num_heads: Attention heads.
            max_length: Longest caption in tokens, end token included (CLIP's context is 77); longer captions are
                refused by the processor as ``too_long``.
            tokenizer: Hugging Face tokenizer name or folder; None = the shipped tiny tokenizer.
        """
        super().__init__()
        from transformers import AutoTokenizer, CLIPTextConfig, CLIPTextModel

        self.tokenizer = AutoTokenizer.from_pretrained(tokenizer or TINY_TOKENIZER_DIR)
        tok = self.tokenizer
        if tok.eos_token is None or tok.pad_token_id is None:
            raise ValueError(
                f"tokenizer {tokenizer!r} lacks an end token or a padding token; TinyCLIPText reads each caption "
                "at its end token and pads the batch: give a tokenizer with both"
            )
        config = CLIPTextConfig(
            vocab_size=len(tok),
            hidden_size=hidden_size,
            intermediate_size=4 * hidden_size,
            num_hidden_layers=num_layers,
            num_attention_heads=num_heads,
            max_position_embeddings=max_length,
            pad_token_id=tok.pad_token_id,
            bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id,
        )
        self.model = CLIPTextModel(config)
        self.hidden_size, self.max_length = hidden_size, max_length

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        if input_ids.shape[1] > self.max_length:
            raise ValueError(
                f"captions of {input_ids.shape[1]} tokens exceed the text tower's max_length={self.max_length}; "
                "build it with a larger max_length"
            )
        hidden = self.model(
            input_ids=input_ids, attention_mask=attention_mask
        ).last_hidden_state  # [B, L, D_t]
        last = attention_mask.sum(1) - 1  # [B] the end token of each caption
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]  # [B, D_t]


class ContrastiveHead(nn.Module):
    """Projections of both modalities to ``embed_dim`` and the learned temperature (see the module docstring)."""

    def __init__(
        self,
        vision_dim: int,
        text_dim: int,
        embed_dim: int = 64,
        init_logit_scale: float = math.log(1 / 0.07),
        max_logit_scale: float = 100.0,
    ) -> None:
        """
        Args:
            vision_dim: Width of the tower's features (inferred from the tower).
            text_dim: Width of the text tower's caption vector (inferred from it).
            embed_dim: Width of the joint embedding space.
            init_logit_scale: Initial log of the logit scale (CLIP: log(1 / 0.07)).
            max_logit_scale: Ceiling of the logit scale itself (CLIP clips it at 100).
        """
        super().__init__()
        if max_logit_scale <= 0 or init_logit_scale > math.log(max_logit_scale):
            raise ValueError(
                f"init_logit_scale={init_logit_scale} must be at most log(max_logit_scale) = "
                f"{math.log(max_logit_scale) if max_logit_scale > 0 else 'undefined'} (max_logit_scale > 0)"
            )
        self.image_norm = nn.LayerNorm(vision_dim)
        self.image_projection = nn.Linear(vision_dim, embed_dim, bias=False)
        self.text_projection = nn.Linear(text_dim, embed_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(float(init_logit_scale)))
        self.max_logit_scale = max_logit_scale

    def scale(self) -> Tensor:
        """The logit scale ``exp(logit_scale)``, clipped at ``max_logit_scale`` (no gradient past the ceiling)."""
        return self.logit_scale.clamp(max=math.log(self.max_logit_scale)).exp()

    def embed_images(self, features: Tensor) -> Tensor:
        """``[B, N, D_v]`` tower features -> ``[B, E]`` unit image embeddings."""
        return F.normalize(self.image_projection(self.image_norm(features.mean(dim=1))), dim=-1)

    def embed_texts(self, pooled: Tensor) -> Tensor:
        """``[B, D_t]`` caption vectors -> ``[B, E]`` unit text embeddings."""
        return F.normalize(self.text_projection(pooled), dim=-1)
