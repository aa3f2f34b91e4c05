"""Generation settings: one typed object for every place a model generates (``predict``, generation metrics during
validation and test), so a run's decoding is written once in its config and recorded with its results.

    model:
      init_args:
        generation: {max_new_tokens: 16, num_beams: 3, stop: ["\n"]}

Decoding is batched over left-padded prompts with a KV cache, for every family; a row's reply does not depend on
the other rows of its batch (greedy and beam search; tested per family in ``tests/test_generation.py``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class GenerationConfig:
    """How replies are decoded (greedy by default)."""

    max_new_tokens: int = 32
    """Longest reply in tokens."""
    do_sample: bool = False
    """Sample from the distribution (with ``temperature`` / ``top_p``) instead of taking the most likely token."""
    num_beams: int = 1
    """Beam search with this many beams (1: no beam search)."""
    temperature: float = 1.0
    """Sampling temperature (only with ``do_sample``)."""
    top_p: float = 1.0
    """Nucleus sampling: keep the smallest set of tokens whose probability reaches ``top_p`` (only with
    ``do_sample``)."""
    stop: list[str] = field(default_factory=list)
    """Stop strings: a row stops generating once its reply holds one, and the reply is cut before the first one
    (e.g. ``["\\n"]`` for one-line answers, ``["Question:"]`` for few-shot prompts). Empty: only the end-of-reply
    token stops."""

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"generation.max_new_tokens={self.max_new_tokens}; give at least 1")
        if self.num_beams < 1:
            raise ValueError(f"generation.num_beams={self.num_beams}; give at least 1 (1 = no beam search)")
        if self.temperature <= 0 or not 0 < self.top_p <= 1:
            raise ValueError(
                f"generation.temperature={self.temperature} must be > 0 and top_p={self.top_p} in (0, 1]"
            )
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise ValueError(f"generation.stop={self.stop!r}: every stop string must be a non-empty string")

    def kwargs(self) -> dict[str, Any]:
        """Keyword arguments of ``transformers``' ``generate`` (sampling knobs only when sampling)."""
        out: dict[str, Any] = {
            "max_new_tokens": self.max_new_tokens,
            "do_sample": self.do_sample,
            "num_beams": self.num_beams,
        }
        if self.do_sample:
            out.update(temperature=self.temperature, top_p=self.top_p)
        if self.stop:
            out["stop_strings"] = list(self.stop)
        return out


def cut_at_stop(text: str, stop: list[str] | None) -> str:
    """``text`` up to the first occurrence of any stop string (all of it when none occurs)."""
    cut = min((i for i in (text.find(s) for s in stop or []) if i >= 0), default=len(text))
    return text[:cut]
