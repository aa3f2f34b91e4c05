"""Turns a :class:`Sample` into model inputs: tokenized conversation with each image placeholder expanded to
the connector's ``T`` image tokens, labels on the supervised tokens, and preprocessed images.

The family module builds its processor (it knows the tokenizer, chat format, tower preprocessing and
``T``) and hands it to the DataModule through ``connect``; tokenization happens lazily in the loader
workers, sample by sample.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from lit_mllm.data.images import ImageTransform, load_image
from lit_mllm.data.sample import Sample
from lit_mllm.nn.language.chat import IGNORE_INDEX, ChatFormat, encode_conversation


@dataclass
class Processor:
    tokenizer: Any
    chat_format: ChatFormat
    image_transform: ImageTransform
    image_token: str
    image_token_id: int
    tokens_per_image: int
    max_length: int | None = None

    def encode_text(self, sample: Sample, for_generation: bool = False) -> tuple[list[int], list[int]]:
        """Token ids and labels with image placeholders expanded; checks placeholders, length and supervision."""
        turns = sample.turns[:-1] if for_generation else sample.turns
        ids, labels = encode_conversation(self.tokenizer, self.chat_format, turns, for_generation)
        found = ids.count(self.image_token_id)
        if found != len(sample.images):
            raise sample.fail(
                f"the tokenized text holds {found} image token(s) for {len(sample.images)} image(s); "
                f"is {self.image_token!r} split by the tokenizer or used literally in the text?"
            )
        out_ids, out_labels = [], []
        for tok, lab in zip(ids, labels):
            if tok == self.image_token_id:
                out_ids += [tok] * self.tokens_per_image
                out_labels += [IGNORE_INDEX] * self.tokens_per_image
            else:
                out_ids.append(tok)
                out_labels.append(lab)
        if self.max_length is not None and len(out_ids) > self.max_length:
            raise sample.fail(
                f"{len(out_ids)} tokens after expanding {len(sample.images)} image(s) to {self.tokens_per_image} "
                f"tokens each, over max_length={self.max_length}; raise data.max_length (within the LLM's "
                "context) or shorten the record"
            )
        if not for_generation and all(lab == IGNORE_INDEX for lab in out_labels):
            raise sample.fail("no supervised token: every assistant reply is empty")
        return out_ids, out_labels

    def __call__(self, sample: Sample, for_generation: bool = False) -> dict:
        ids, labels = self.encode_text(sample, for_generation)
        pixels = [self.image_transform(load_image(p, sample)) for p in sample.images]
        item = {
            "id": sample.id,
            "input_ids": torch.tensor(ids, dtype=torch.long),
            "labels": torch.tensor(labels, dtype=torch.long),
            "pixel_values": torch.stack(pixels) if pixels else None,  # [k, 3, S, S]
            "num_images": len(pixels),
        }
        if for_generation:
            item["reference"] = sample.turns[-1].text if sample.turns[-1].role == "assistant" else None
            item["prompt"] = (
                sample.turns[-2].text if sample.turns[-1].role == "assistant" else sample.turns[-1].text
            )
        return item


def collate(items: list[dict], pad_token_id: int, padding_side: str = "right") -> dict:
    """Pad a list of processed samples into a batch.

    Returns ``input_ids``/``labels``/``attention_mask`` ``[B, L]``, ``pixel_values`` ``[I, 3, S, S]`` (all images
    of the batch, sample order) or None, ``images_per_sample`` and ``ids``; generation batches also carry
    ``reference``/``prompt`` lists. Use ``padding_side="left"`` for generation.
    """
    length = max(len(it["input_ids"]) for it in items)
    batch = len(items)
    input_ids = torch.full((batch, length), pad_token_id, dtype=torch.long)
    labels = torch.full((batch, length), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((batch, length), dtype=torch.long)
    for b, it in enumerate(items):
        n = len(it["input_ids"])
        sl = slice(length - n, length) if padding_side == "left" else slice(0, n)
        input_ids[b, sl] = it["input_ids"]
        labels[b, sl] = it["labels"]
        attention_mask[b, sl] = 1
    pixels = [it["pixel_values"] for it in items if it["pixel_values"] is not None]
    out = {
        "ids": [it["id"] for it in items],
        "input_ids": input_ids,
        "labels": labels,
        "attention_mask": attention_mask,
        "pixel_values": torch.cat(pixels) if pixels else None,
        "images_per_sample": [it["num_images"] for it in items],
    }
    for key in ("reference", "prompt"):
        if key in items[0]:
            out[key] = [it[key] for it in items]
    return out
