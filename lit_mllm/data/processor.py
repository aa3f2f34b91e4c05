"""Turns a :class:`Sample` into model inputs: the tokenized conversation (or document) with each image placeholder
expanded to its image tokens (``T`` per tower input: the image, or each of its tiles under a tiling layout),
labels on the supervised tokens, and preprocessed images.

The family module builds its processor (it knows the tokenizer, chat format, tower preprocessing and
``T``) and hands it to the DataModule through ``connect``; tokenization happens lazily in the loader
workers, sample by sample.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from lit_mllm.data.feature_cache import image_key
from lit_mllm.data.images import ImageTransform
from lit_mllm.data.layouts import image_size
from lit_mllm.data.sample import Sample
from lit_mllm.nn.language.chat import IGNORE_INDEX, ChatFormat, encode_conversation_arrays


@dataclass
class Processor:
    tokenizer: Any
    chat_format: ChatFormat
    image_transform: ImageTransform
    image_token: str
    image_token_id: int
    tokens_per_image: int
    """Image tokens per tower input (an image, or one tile of it under a tiling layout)."""
    max_length: int | None = None
    eval_prompts: bool = False
    """Evaluation batches also carry each sample's prompt-only form (the model scores generations there)."""
    image_keys: bool = False
    """Name each tower input by its image's content and crop index (``image_keys``), for the feature cache."""

    def _tokens(self, sample: Sample, for_generation: bool) -> tuple[np.ndarray, np.ndarray]:
        """Token ids and labels, int64 ``[T]`` each, before image expansion."""
        if sample.text is None:
            turns = sample.turns[:-1] if for_generation else sample.turns
            return encode_conversation_arrays(self.tokenizer, self.chat_format, turns, for_generation)
        if for_generation:
            raise sample.fail("a document has no reply to generate; predict on conversations")
        tok = self.tokenizer
        ids = tok((tok.bos_token or "") + sample.text + tok.eos_token, add_special_tokens=False)["input_ids"]
        ids = np.asarray(ids, dtype=np.int64)
        labels = np.where(ids == self.image_token_id, IGNORE_INDEX, ids)
        if tok.bos_token is not None and len(labels):
            labels[0] = IGNORE_INDEX
        return ids, labels

    def encode_text(
        self, sample: Sample, crops: list[int] | None = None, for_generation: bool = False
    ) -> tuple[Tensor, Tensor]:
        """Token ids and labels, long ``[L]`` each, with image placeholders expanded (image ``k`` to
        ``crops[k] * T`` tokens; one crop per image by default); checks placeholders, length and supervision."""
        crops = [1] * len(sample.images) if crops is None else crops
        ids, labels = self._tokens(sample, for_generation)  # numpy: cheaper than torch for arrays this small
        is_image = ids == self.image_token_id
        found = int(is_image.sum())
        if found != len(sample.images):
            raise sample.fail(
                f"the tokenized text holds {found} image token(s) for {len(sample.images)} image(s); "
                f"is {self.image_token!r} split by the tokenizer or used literally in the text?",
                "image_mismatch",
            )
        repeats = np.ones_like(ids)
        repeats[is_image] = np.asarray(crops, dtype=np.int64) * self.tokens_per_image
        out_ids = torch.from_numpy(np.repeat(ids, repeats))
        out_labels = torch.from_numpy(np.repeat(np.where(is_image, IGNORE_INDEX, labels), repeats))
        if self.max_length is not None and len(out_ids) > self.max_length:
            raise sample.fail(
                f"{len(out_ids)} tokens after expanding {len(sample.images)} image(s) ({sum(crops)} tower "
                f"input(s) x {self.tokens_per_image} tokens), over max_length={self.max_length}; raise "
                "data.max_length (within the LLM's context) or shorten the record",
                "too_long",
            )
        if not for_generation and bool((out_labels == IGNORE_INDEX).all()):
            raise sample.fail("no supervised token: every assistant reply is empty", "no_supervision")
        return out_ids, out_labels

    def __call__(self, sample: Sample, for_generation: bool = False, with_prompt: bool = False) -> dict:
        """The processed sample: ``input_ids`` / ``labels`` ``[L]``, ``pixel_values`` ``[k, 3, S, S]`` uint8 (or None),
        ``num_images`` (tower inputs), and with :attr:`image_keys` ``image_keys`` (``<content hash>/<crop>`` per
        tower input, see :func:`~lit_mllm.data.feature_cache.image_key`). ``for_generation``: the conversation up to
        its last assistant turn, with ``prompt`` (the turn answered) and ``references`` (accepted answers: the
        sample's ``references``, else its last reply). ``with_prompt``: the whole conversation plus that prompt-only
        form as ``generation``."""
        images = [self.image_transform.load(ref, sample, k) for k, ref in enumerate(sample.images)]
        crops = [self.image_transform.num_crops(*image_size(im)) for im in images]
        pixels = [self.image_transform(im) for im in images]  # each [k, 3, S, S]
        keys = None
        if self.image_keys:
            keys = [f"{image_key(ref)}/{c}" for ref, n in zip(sample.images, crops) for c in range(n)]
        item = self._item(sample, crops, pixels, keys, for_generation)
        if with_prompt and not for_generation:
            item["generation"] = self._item(sample, crops, pixels, keys, True)
        return item

    def _item(
        self, sample: Sample, crops: list[int], pixels: list, keys: list[str] | None, for_generation: bool
    ) -> dict:
        ids, labels = self.encode_text(sample, crops, for_generation)
        item = {
            "id": sample.id,
            "source": sample.source,
            "meta": sample.meta,
            "input_ids": ids,
            "labels": labels,
            "pixel_values": (pixels[0] if len(pixels) == 1 else torch.cat(pixels)) if pixels else None,
            "num_images": sum(crops),
            "image_keys": keys,
        }
        if for_generation:
            answered = sample.turns[-1].role == "assistant"
            item["prompt"] = sample.turns[-2].text if answered else sample.turns[-1].text
            item["references"] = list(sample.references or ([sample.turns[-1].text] if answered else []))
        return item
