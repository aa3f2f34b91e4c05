"""The canonical sample every source yields, and the error type for bad input (with its counted reason)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from lit_mllm.nn.language.chat import Turn

Reason = Literal[
    "malformed_record",
    "missing_file",
    "missing_caption",
    "undecodable_image",
    "image_mismatch",
    "box_outside_image",
    "no_supervision",
    "too_long",
]
"""Why a sample cannot be used; runs count skipped samples per reason (``data/skipped/<reason>``).

``malformed_record``: the record does not parse or lacks a field; ``missing_file``: its image (file or shard
member) is not there; ``missing_caption``: an image-caption sample without a caption; ``undecodable_image``;
``image_mismatch``: image placeholders and images disagree; ``box_outside_image``: a grounding box reaches
outside its image; ``no_supervision``: nothing to learn (no assistant reply, empty document); ``too_long``:
over the length limit after image expansion."""
REASONS: tuple[str, ...] = Reason.__args__

ImageRef = str | bytes
"""An image as a file path, or as the encoded file's bytes (a webdataset shard member)."""


class DataError(ValueError):
    """A record cannot be used; the message names the file, the record and what to do."""

    def __init__(self, message: str, reason: Reason = "malformed_record") -> None:
        super().__init__(message)
        self.reason = reason


@dataclass
class Sample:
    id: str
    """Unique name of the sample (the record's ``id``, else ``file#index``)."""
    turns: list[Turn] = field(default_factory=list)
    """A conversation; image placeholders sit in the text where images go. Empty for a document."""
    images: list[ImageRef] = field(default_factory=list)
    """Images in placeholder order: paths (resolved against the source's image folder) or encoded bytes."""
    where: str = ""
    """Where the record came from, for error messages (``file.json record 12``)."""
    source: str = ""
    """Name of the mixture source it was drawn from (set by the DataModule)."""
    text: str | None = None
    """A document (interleaved or text-only) instead of a conversation: every text token is learned."""
    references: list[str] = field(default_factory=list)
    """Accepted answers for the last reply when there are several (VQA's ten human answers); empty: the last
    assistant turn is the one reference."""
    meta: dict[str, Any] = field(default_factory=dict)
    """What evaluation needs to know about the sample beyond its text (JSON values): ShapesWorld's question
    ``kind``; a benchmark's grouping keys (MME ``subtask`` / ``image``, MMBench ``group`` of a question's
    rotations, VQA ``question_id`` / ``answer_type``, a grounding ``box``). Metrics read it from
    :attr:`~lit_mllm.data.batch.Batch.meta`; nothing in training does."""

    def fail(self, problem: str, reason: Reason = "malformed_record") -> DataError:
        return DataError(f"{self.where} (id {self.id!r}): {problem}", reason)

    def image_name(self, k: int) -> str:
        ref = self.images[k]
        return ref if isinstance(ref, str) else f"image {k} ({len(ref)} bytes)"
