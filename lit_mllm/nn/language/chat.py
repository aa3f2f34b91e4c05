"""Chat formats: how a conversation becomes one string, and which characters of it the model learns.

A format renders turns to text and returns the character spans to supervise (each assistant reply
plus its end-of-turn marker). :func:`encode_conversation` tokenizes the whole string once and marks a
token as learned when it covers any supervised character, so labels always agree with the tokenization
actually used (no per-round re-tokenization, no "tokenization mismatch" to ignore).

Formats:
- :class:`VicunaV1` — LLaVA-v1 / Vicuna v1.1 (``conv_vicuna_v1``): ``SYSTEM USER: q ASSISTANT: a</s>USER: ...``
- :class:`Plain` — LLaVA pretraining (``conv_llava_plain``): ``<image>caption</s>``, caption learned
- :class:`Llama2Inst` — Llama-2-chat (MiniGPT-v2, Pink): ``<s>[INST] q [/INST] a </s><s>[INST] ...``
- :class:`TokenizerTemplate` — the tokenizer's own Jinja ``chat_template`` (ChatML, Llama, Qwen, ...)
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import chain
from typing import Literal

import numpy as np

IGNORE_INDEX = -100
Role = Literal["system", "user", "assistant"]


@dataclass(frozen=True)
class Turn:
    role: Role
    text: str


@dataclass
class Rendered:
    text: str
    learn: list[tuple[int, int]]
    """Half-open character spans ``[start, end)`` of ``text`` that are supervised."""


def check_turns(turns: Sequence[Turn], for_generation: bool = False) -> None:
    """Raise ``ValueError`` unless turns are ``[system] user assistant user assistant ...``.

    For training the last turn is an assistant reply; for generation it is a user turn.
    """
    body = list(turns[1:] if turns and turns[0].role == "system" else turns)
    if not body:
        raise ValueError("conversation has no user/assistant turns")
    for i, turn in enumerate(body):
        expected = "user" if i % 2 == 0 else "assistant"
        if turn.role != expected:
            raise ValueError(f"turn {i} should be a {expected} turn, got {turn.role!r}: turns must alternate")
    last = "user" if for_generation else "assistant"
    if body[-1].role != last:
        raise ValueError(
            f"conversation must end with a {last} turn {'to answer' if for_generation else 'to learn'}"
        )


class ChatFormat(ABC):
    """Renders a conversation; subclasses implement :meth:`render`."""

    @abstractmethod
    def render(self, turns: Sequence[Turn], tokenizer, add_generation_prompt: bool = False) -> Rendered:
        """Text of ``turns`` and its supervised spans; with ``add_generation_prompt`` the text ends where the
        assistant's reply should begin (``turns`` then ends with a user turn)."""


class VicunaV1(ChatFormat):
    """LLaVA-v1 conversation format (Vicuna v1.1), as used by LLaVA-1.5 finetuning."""

    def __init__(
        self,
        system: str = "A chat between a curious user and an artificial intelligence assistant. "
        "The assistant gives helpful, detailed, and polite answers to the user's questions.",
        user: str = "USER",
        assistant: str = "ASSISTANT",
    ) -> None:
        """
        Args:
            system: System prompt used when the conversation brings none.
            user: Name of the user role in the text.
            assistant: Name of the assistant role in the text.
        """
        self.system, self.user, self.assistant = system, user, assistant

    def render(self, turns, tokenizer, add_generation_prompt=False):
        check_turns(turns, for_generation=add_generation_prompt)
        system = self.system
        if turns[0].role == "system":
            system, turns = turns[0].text, turns[1:]
        text = (tokenizer.bos_token or "") + system + " "
        learn = []
        for turn in turns:
            if turn.role == "user":
                text += f"{self.user}: {turn.text} {self.assistant}:"
            else:
                start = len(text)
                text += " " + turn.text + tokenizer.eos_token
                learn.append((start, len(text)))
        return Rendered(text, learn)


class Plain(ChatFormat):
    """LLaVA pretraining format: the user turn contributes only its image placeholders, the reply is learned."""

    def __init__(self, image_token: str = "<image>") -> None:
        """
        Args:
            image_token: Placeholder kept from the user turn.
        """
        self.image_token = image_token

    def render(self, turns, tokenizer, add_generation_prompt=False):
        check_turns(turns, for_generation=add_generation_prompt)
        body = [t for t in turns if t.role != "system"]
        if len(body) > 2:
            raise ValueError("the Plain format takes single-round conversations (one user turn, one reply)")
        text = (tokenizer.bos_token or "") + self.image_token * body[0].text.count(self.image_token)
        learn = []
        if not add_generation_prompt:
            start = len(text)
            text += body[1].text + tokenizer.eos_token
            learn.append((start, len(text)))
        return Rendered(text, learn)


class Llama2Inst(ChatFormat):
    """Llama-2-chat format (MiniGPT-v2, Pink): ``<s>[INST] user [/INST] reply </s><s>[INST] user [/INST] ...``.

    A system prompt (the conversation's system turn, else ``system``) goes inside the first ``[INST]`` as
    ``<<SYS>>\\n{system}\\n<</SYS>>\\n\\n``, as in Llama-2's reference code and chat template. Each reply is
    learned with its leading space and end token.
    """

    def __init__(self, system: str = "", space_before_eos: bool = True) -> None:
        """
        Args:
            system: System prompt used when the conversation brings none; "" (MiniGPT-v2, Pink) writes no
                ``<<SYS>>`` block.
            space_before_eos: Llama-2's ``reply </s>``; False gives ``reply</s>``, the text MiniGPT-v2 trains on.
        """
        self.system, self.space_before_eos = system, space_before_eos

    def render(self, turns, tokenizer, add_generation_prompt=False):
        check_turns(turns, for_generation=add_generation_prompt)
        system = self.system
        if turns[0].role == "system":
            system, turns = turns[0].text, turns[1:]
        text, learn = "", []
        for i, turn in enumerate(turns):
            if turn.role == "user":
                sys_block = f"<<SYS>>\n{system}\n<</SYS>>\n\n" if i == 0 and system else ""
                text += f"{tokenizer.bos_token or ''}[INST] {sys_block}{turn.text} [/INST]"
            else:
                start = len(text)
                text += " " + turn.text + (" " if self.space_before_eos else "") + tokenizer.eos_token
                learn.append((start, len(text)))
        return Rendered(text, learn)


class TokenizerTemplate(ChatFormat):
    """The tokenizer's own ``chat_template``; supervised spans are found by rendering growing prefixes.

    Requires the template to be prefix-stable (rendering the first k turns is a prefix of rendering all),
    which holds for ChatML, Llama-2/3, Qwen, Mistral templates; a clear error is raised otherwise.
    """

    def render(self, turns, tokenizer, add_generation_prompt=False):
        check_turns(turns, for_generation=add_generation_prompt)
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError(
                f"{type(tokenizer).__name__} has no chat_template; choose a ChatFormat explicitly "
                "(VicunaV1 or Plain) for this language model"
            )

        def apply(ts, gen):
            msgs = [{"role": t.role, "content": t.text} for t in ts]
            return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)

        text = apply(turns, add_generation_prompt)
        learn = []
        for i, turn in enumerate(turns):
            if turn.role != "assistant":
                continue
            prefix, upto = apply(turns[:i], True), apply(turns[: i + 1], False)
            if not (upto.startswith(prefix) and text.startswith(upto)):
                raise ValueError(
                    "the tokenizer's chat_template is not prefix-stable (rendering fewer turns is not a prefix "
                    "of rendering more), so supervised tokens cannot be located; use another ChatFormat"
                )
            learn.append((len(prefix), len(upto)))
        return Rendered(text, learn)


def tokenize_with_offsets(tokenizer, text: str) -> tuple[list[int], list[tuple[int, int]]]:
    """Token ids of ``text`` (no special tokens added) and each token's character span ``(start, end)``.

    A fast tokenizer whose Rust backend has no truncation or padding of its own is called directly (the ids and
    offsets of ``tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)``, tested, without the
    wrapper's per-call work: about a third of the time on a multi-turn sample); any other through that call."""
    backend = getattr(tokenizer, "backend_tokenizer", None) if getattr(tokenizer, "is_fast", False) else None
    if (
        backend is not None
        and backend.truncation is None
        and backend.padding is None
        and backend.encode_special_tokens == bool(getattr(tokenizer, "split_special_tokens", False))
    ):
        enc = backend.encode(text, add_special_tokens=False)
        return enc.ids, enc.offsets
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    return enc["input_ids"], enc["offset_mapping"]


def learned_tokens(
    offsets: Sequence[tuple[int, int]], learn: Sequence[tuple[int, int]], length: int
) -> np.ndarray:
    """Which tokens are learned: bool ``[T]``, True for a token covering any character of a supervised span of
    ``learn`` (half-open spans of a ``length``-character text); a zero-width token is learned when it sits
    strictly inside a supervised span."""
    supervised = np.zeros(length, dtype=bool)
    for start, end in learn:
        supervised[start:end] = True
    before = np.zeros(length + 1, dtype=np.int64)  # before[c]: supervised characters in text[:c]
    np.cumsum(supervised, out=before[1:])
    flat = np.fromiter(chain.from_iterable(offsets), dtype=np.int64, count=2 * len(offsets))
    a, b = flat[0::2], flat[1::2]  # each token's start and end
    learned = before[b] > before[a]
    for i in np.flatnonzero(a == b):
        learned[i] = any(start < a[i] < end for start, end in learn)
    return learned


def encode_conversation_arrays(
    tokenizer, chat_format: ChatFormat, turns: Sequence[Turn], add_generation_prompt: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """:func:`encode_conversation` as int64 arrays ``[T]`` (what the loader's processor takes)."""
    rendered = chat_format.render(turns, tokenizer, add_generation_prompt)
    ids, offsets = tokenize_with_offsets(tokenizer, rendered.text)
    ids = np.asarray(ids, dtype=np.int64)
    learned = learned_tokens(offsets, rendered.learn, len(rendered.text))
    return ids, np.where(learned, ids, IGNORE_INDEX)


def encode_conversation(
    tokenizer, chat_format: ChatFormat, turns: Sequence[Turn], add_generation_prompt: bool = False
) -> tuple[list[int], list[int]]:
    """Tokenize a conversation once; return ``(input_ids, labels)`` with ``IGNORE_INDEX`` on unlearned tokens."""
    ids, labels = encode_conversation_arrays(tokenizer, chat_format, turns, add_generation_prompt)
    return ids.tolist(), labels.tolist()
