"""The canonical sample every source yields, and the error type for bad input."""

from __future__ import annotations

from dataclasses import dataclass, field

from lit_mllm.nn.language.chat import Turn


class DataError(ValueError):
    """A record cannot be used; the message names the file, the record and what to do."""


@dataclass
class Sample:
    id: str
    """Unique name of the sample (the record's ``id``, else ``file#index``)."""
    turns: list[Turn]
    """The conversation; image placeholders sit in the text where images go."""
    images: list[str] = field(default_factory=list)
    """Image paths in placeholder order (resolved against the source's image folder)."""
    where: str = ""
    """Where the record came from, for error messages (``file.json record 12``)."""

    def fail(self, problem: str) -> DataError:
        return DataError(f"{self.where} (id {self.id!r}): {problem}")
