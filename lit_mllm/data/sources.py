"""Sources: the formats people have, each read into the canonical :class:`~lit_mllm.data.Sample`.

A source is an indexable collection of records with a mixture ``weight``; the DataModule mixes sources keyed
by name (``data.train: {captions: ..., instruct: ...}``). Reading a source builds only an index (lines of a
JSONL file, member offsets of tar shards); a record is parsed when it is drawn, in a loader worker, so a bad
record is one counted problem (:class:`DataError` with a reason) rather than a crash at start-up.

| source | format |
|---|---|
| :class:`Conversations` | LLaVA JSON / JSONL conversations (multi-turn, ``<image>`` anywhere, several images) |
| :class:`Captions` | image-caption pairs: img2dataset webdataset shards (``000000123.jpg`` + ``.txt`` + ``.json``), JSONL or CSV manifests |
| :class:`Interleaved` | OBELICS-style documents (parallel ``texts`` / ``images`` lists with nulls) or MMC4 (``text_list`` + ``image_info``) |
| :class:`TextOnly` | JSONL ``{"text": ...}`` documents |
| :class:`Grounding` | RefCOCO-style records: an image and objects with pixel boxes, rendered by a task template |

Relative paths resolve against the DataModule's ``root``; image paths in records resolve against the source's
``image_folder`` (default: the folder of the file).
"""

from __future__ import annotations

import csv
import json
import random
import tarfile
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Literal

from lit_mllm.data.sample import DataError, Sample
from lit_mllm.data.tasks import Box, Task, TaskTemplate
from lit_mllm.nn.language.chat import Turn, check_turns

ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")


class Source(ABC):
    """Base of the sources: an index built by :meth:`open`, and :meth:`sample` to parse one record."""

    def __init__(self, path: str, weight: float = 1.0, image_folder: str | None = None) -> None:
        """
        Args:
            path: File (or shard folder / glob) relative to the DataModule's root, or absolute.
            weight: Share of this source in a training mixture (weights are normalised over the sources).
            image_folder: Folder that image paths in records are relative to; default: the file's folder.
        """
        if not weight >= 0:
            raise ValueError(f"a source weight must be >= 0, got {weight}")
        self.path, self.weight, self.image_folder = path, float(weight), image_folder
        self.root = Path(".")
        self._size: int | None = None

    def open(self, root: Path) -> Source:
        """Resolve paths against ``root`` and build the index (cheap: no record is parsed)."""
        self.root = Path(root)
        self._size = self._index()
        return self

    @property
    def file(self) -> Path:
        return self.root / self.path

    @property
    def folder(self) -> Path:
        if self.image_folder is not None:
            return self.root / self.image_folder
        return self.file if self.file.is_dir() else self.file.parent

    def __len__(self) -> int:
        if self._size is None:
            raise RuntimeError(f"{type(self).__name__}({self.path!r}) is not open: call open(root) first")
        return self._size

    @abstractmethod
    def _index(self) -> int:
        """Build the index; return the number of records."""

    @abstractmethod
    def sample(self, i: int, image_token: str) -> Sample:
        """Parse record ``i``; raise :class:`DataError` (with its reason) when it cannot be used."""


def _jsonl_lines(path: Path) -> list[tuple[str, str]]:
    """``(where, line)`` of the non-blank lines of a JSON Lines file; each is parsed when drawn."""
    lines = path.read_text(encoding="utf-8").splitlines()
    return [(f"{path} line {n}", line) for n, line in enumerate(lines, start=1) if line.strip()]


def _json_object(where: str, line: str) -> dict:
    """One JSON Lines record, which must be an object; :class:`DataError` naming ``where`` otherwise."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise DataError(f"{where}: not valid JSON ({e.msg})") from None
    if not isinstance(record, dict):
        raise DataError(f"{where}: a record must be a JSON object, got {type(record).__name__}")
    return record


class JsonRecords(Source):
    """Records of a ``.jsonl`` file (one per line, parsed lazily) or a ``.json`` list: the base of the sources
    whose file holds one JSON object per record (:meth:`record` gives record ``i`` and where it is)."""

    def _index(self) -> int:
        path = self.file
        if not path.is_file():
            raise DataError(
                f"{path}: no such file (source path {self.path!r}, root {self.root})", "missing_file"
            )
        if path.suffix == ".jsonl":
            self._lines, self._records = _jsonl_lines(path), None
            return len(self._lines)
        try:
            records = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise DataError(f"{path} line {e.lineno} column {e.colno}: not valid JSON ({e.msg})") from None
        if not isinstance(records, list):
            raise DataError(f"{path}: expected a JSON list of records, got {type(records).__name__}")
        self._records = records
        return len(records)

    def record(self, i: int) -> tuple[dict, str]:
        """Record ``i`` as a dict and where it is (for messages)."""
        if self._records is None:
            where, line = self._lines[i]
            return _json_object(where, line), where
        record, where = self._records[i], f"{self.file} record {i}"
        if not isinstance(record, dict):
            raise DataError(f"{where}: a record must be a JSON object, got {type(record).__name__}")
        return record, where

    def image_path(self, p: str) -> str:
        return str(self.folder / p)


class Conversations(JsonRecords):
    """LLaVA-format conversations (LLaVA-Pretrain-558K, LLaVA-Instruct-665K), ``.json`` list or ``.jsonl``::

        {"id": "000000033471", "image": "coco/train2017/000000033471.jpg",
         "conversations": [{"from": "human", "value": "<image>\\nWhat are the colors of the bus?"},
                           {"from": "gpt", "value": "The bus is white and red."}]}

    ``image`` may be a list (several images, one ``<image>`` each, anywhere in the text) or absent (text only).
    Roles ``human``/``user``, ``gpt``/``assistant`` and ``system`` are accepted. An optional ``answers`` list of
    strings gives the accepted answers of the last reply (VQA's ten human answers) for generation metrics; an
    optional ``meta`` object is kept as the sample's :attr:`~lit_mllm.data.sample.Sample.meta` (what metrics group
    by: a question's ``kind``, a benchmark's subtask).
    """

    def sample(self, i: int, image_token: str) -> Sample:
        record, where = self.record(i)
        sample_id = str(record.get("id", f"{self.file.name}#{i}"))
        convs = record.get("conversations")
        if not isinstance(convs, list) or not convs:
            raise DataError(f"{where} (id {sample_id!r}): missing or empty 'conversations' list")
        turns = []
        for k, msg in enumerate(convs):
            if (
                not isinstance(msg, dict)
                or not isinstance(msg.get("value"), str)
                or msg.get("from") not in ROLES
            ):
                raise DataError(
                    f"{where} (id {sample_id!r}): conversations[{k}] must be {{'from': one of {sorted(ROLES)}, "
                    f"'value': str}}, got {msg!r}"[:400]
                )
            turns.append(Turn(ROLES[msg["from"]], msg["value"]))
        images = record.get("image", [])
        images = [images] if isinstance(images, str) else images
        if not isinstance(images, list) or not all(isinstance(p, str) for p in images):
            raise DataError(f"{where} (id {sample_id!r}): 'image' must be a path or a list of paths")
        sample = Sample(sample_id, turns, [self.image_path(p) for p in images], where)
        if not any(t.role == "assistant" for t in turns):
            raise sample.fail(
                "no assistant reply to learn (a 'gpt'/'assistant' turn answering the question)",
                "no_supervision",
            )
        try:
            check_turns(turns)
        except ValueError as e:
            raise sample.fail(str(e)) from None
        placeholders = sum(t.text.count(image_token) for t in turns)
        if placeholders != len(images):
            raise sample.fail(
                f"{placeholders} {image_token} placeholder(s) in the text but {len(images)} image(s) listed; "
                f"each image needs exactly one {image_token} where it belongs in the text",
                "image_mismatch",
            )
        answers = record.get("answers", [])
        if not isinstance(answers, list) or not all(isinstance(a, str) for a in answers):
            raise sample.fail(
                f"'answers' must be a list of strings (the accepted answers), got {answers!r}"[:400]
            )
        sample.references = answers
        meta = record.get("meta", {})
        if not isinstance(meta, dict):
            raise sample.fail(f"'meta' must be an object (what evaluation groups by), got {meta!r}"[:400])
        sample.meta = meta
        return sample


def _caption_turns(
    caption: str, image_token: str, template: TaskTemplate | None, rng: random.Random, size: tuple[int, int]
) -> list[Turn]:
    if template is None:  # LLaVA-Pretrain style: the image, then the caption to learn
        return [Turn("user", image_token), Turn("assistant", caption)]
    return template.render("caption", {"caption": caption}, image_token, *size, rng)


class Captions(Source):
    """Image-caption pairs from img2dataset webdataset shards (a folder of ``.tar``, a glob, or one ``.tar``:
    members ``{key}.jpg`` + ``{key}.txt`` [+ ``{key}.json``]; without ``.txt`` the caption is the ``.json``
    sidecar's ``caption``), or a manifest (``.jsonl`` lines ``{"image": path, "caption": text}``, or ``.csv`` with
    those columns). A sample without a caption is bad with reason ``missing_caption``."""

    def __init__(
        self,
        path: str,
        weight: float = 1.0,
        image_folder: str | None = None,
        template: TaskTemplate | None = None,
        image_column: str = "image",
        caption_column: str = "caption",
    ) -> None:
        """
        Args:
            path: Shard folder, shard glob (``captions/*.tar``), one ``.tar``, or a ``.jsonl`` / ``.csv`` manifest.
            weight: Share of this source in a training mixture.
            image_folder: Folder manifest image paths are relative to; default: the manifest's folder.
            template: Task template giving the caption instruction; None: the bare image, then the caption
                (LLaVA pretraining with the ``Plain`` chat format).
            image_column: Manifest field holding the image path.
            caption_column: Manifest field holding the caption.
        """
        super().__init__(path, weight, image_folder)
        self.template, self.image_column, self.caption_column = template, image_column, caption_column

    def _shards(self) -> list[Path]:
        if any(c in self.path for c in "*?["):
            return sorted(self.root.glob(self.path))
        return sorted(self.file.glob("*.tar")) if self.file.is_dir() else [self.file]

    def _index(self) -> int:
        suffix = self.file.suffix
        if suffix in (".jsonl", ".csv"):
            if not self.file.is_file():
                raise DataError(
                    f"{self.file}: no such file (source path {self.path!r}, root {self.root})", "missing_file"
                )
            if suffix == ".jsonl":
                self._rows = _jsonl_lines(self.file)
            else:
                with open(self.file, newline="", encoding="utf-8") as f:
                    self._rows = [(f"{self.file} row {n}", row) for n, row in enumerate(csv.DictReader(f), 2)]
            return len(self._rows)
        is_glob = any(c in self.path for c in "*?[")
        if not is_glob and not self.file.exists():
            raise DataError(
                f"{self.file}: no such shard folder, .tar shard or manifest (source path {self.path!r}, root "
                f"{self.root})",
                "missing_file",
            )
        shards = self._shards()
        if not shards:
            raise DataError(f"no .tar shards at {self.file}", "missing_file")
        self._shard_paths, self._members = [str(s) for s in shards], []
        for s, shard in enumerate(shards):
            groups: dict[str, dict[str, tuple[int, int]]] = {}
            try:
                with tarfile.open(shard) as tar:
                    for m in tar:
                        # webdataset: a sample's key is the member path up to the basename's first dot
                        folder, _, base = m.name.rpartition("/")
                        if m.isfile() and "." in base:
                            stem, ext = base.split(".", 1)
                            key = f"{folder}/{stem}" if folder else stem
                            groups.setdefault(key, {})[ext.lower()] = (m.offset_data, m.size)
            except (tarfile.TarError, OSError) as e:
                raise DataError(f"{shard}: not a readable tar shard ({e})") from None
            self._members += [(s, key, exts) for key, exts in groups.items()]
        self._rows = None
        return len(self._members)

    def _read(self, shard: int, span: tuple[int, int]) -> bytes:
        with open(self._shard_paths[shard], "rb") as f:
            f.seek(span[0])
            return f.read(span[1])

    def _caption(self, shard: int, key: str, exts: dict[str, tuple[int, int]], where: str) -> str:
        """A shard sample's caption: its ``.txt`` member, else the ``caption`` of its ``.json`` sidecar (as
        img2dataset writes it); :class:`DataError` ``missing_caption`` when neither holds one."""
        if "txt" in exts:
            caption = self._read(shard, exts["txt"]).decode("utf-8", errors="replace").strip()
            if caption:
                return caption
            found = "an empty .txt member"
        elif "json" in exts:
            try:
                meta = json.loads(self._read(shard, exts["json"]))
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                meta, found = None, f"no .txt member and an unreadable .json sidecar ({e})"
            caption = meta.get("caption") if isinstance(meta, dict) else None
            if isinstance(caption, str) and caption.strip():
                return caption.strip()
            if meta is not None:
                found = f"no .txt member and no 'caption' in the .json sidecar (got {caption!r})"[:200]
        else:
            found = f"no .txt or .json member (found {sorted(exts)})"
        raise DataError(f"{where} (id {key!r}): no caption: {found}", "missing_caption")

    def sample(self, i: int, image_token: str) -> Sample:
        rng = random.Random(f"{self.path}:{i}")
        if self._rows is not None:
            where, row = self._rows[i]
            if isinstance(row, str):  # a JSON Lines manifest; CSV rows are dicts already
                row = _json_object(where, row)
            image, caption = row.get(self.image_column), row.get(self.caption_column)
            sample_id = str(row.get("id") or image or where)
            if not isinstance(image, str) or not image or not isinstance(caption, (str, type(None))):
                raise DataError(
                    f"{where}: needs string fields {self.image_column!r} and {self.caption_column!r}, got {row!r}"[
                        :400
                    ]
                )
            if not caption or not caption.strip():
                raise DataError(
                    f"{where} (id {sample_id!r}): no caption (empty or missing {self.caption_column!r})",
                    "missing_caption",
                )
            turns = _caption_turns(caption, image_token, self.template, rng, (1, 1))
            return Sample(sample_id, turns, [str(self.folder / image)], where)
        shard, key, exts = self._members[i]
        where = f"{self._shard_paths[shard]} key {key}"
        image_ext = next((e for e in IMAGE_EXTENSIONS if e in exts), None)
        if image_ext is None:
            raise DataError(
                f"{where} (id {key!r}): a sample needs an image member ({'/'.join(IMAGE_EXTENSIONS)}), "
                f"found {sorted(exts)}",
                "missing_file",
            )
        caption = self._caption(shard, key, exts, where)
        turns = _caption_turns(caption, image_token, self.template, rng, (1, 1))
        return Sample(key, turns, [self._read(shard, exts[image_ext])], where)


class Interleaved(JsonRecords):
    """Interleaved image-text documents, one JSON object per line: OBELICS style ``{"texts": [str|null, ...],
    "images": [path|null, ...]}`` (parallel lists, one non-null per position) or MMC4 style ``{"text_list":
    [...], "image_info": [{"image_name": path, "matched_text_index": k}, ...]}`` (image before text ``k``).

    Rendered as a document (every text token learned): ``plain`` puts each image's placeholder where it
    stands; ``mmicl`` names images as MMICL does (``Image 1: <image>``) so the text can refer to them.
    """

    def __init__(
        self,
        path: str,
        weight: float = 1.0,
        image_folder: str | None = None,
        style: Literal["plain", "mmicl"] = "plain",
        separator: str = "\n",
    ) -> None:
        """
        Args:
            path: ``.jsonl`` file of documents.
            weight: Share of this source in a training mixture.
            image_folder: Folder image paths are relative to; default: the file's folder.
            style: ``plain`` (placeholder in place) or ``mmicl`` (``Image k: <image>``).
            separator: Text between consecutive parts of a document.
        """
        super().__init__(path, weight, image_folder)
        self.style, self.separator = style, separator

    def parts(self, record: dict, where: str) -> list[tuple[str, str]]:
        """The document as ``("text", str)`` / ``("image", path)`` parts in reading order."""
        if "texts" in record or "images" in record:
            texts, images = record.get("texts"), record.get("images")
            if not isinstance(texts, list) or not isinstance(images, list) or len(texts) != len(images):
                raise DataError(f"{where}: 'texts' and 'images' must be lists of the same length")
            parts = []
            for k, (t, im) in enumerate(zip(texts, images)):
                if (t is None) == (im is None) or not isinstance(t if im is None else im, str):
                    raise DataError(f"{where}: position {k} must hold exactly one of a text or an image path")
                parts.append(("text", t) if im is None else ("image", im))
            return parts
        texts, infos = record.get("text_list"), record.get("image_info", [])
        if not isinstance(texts, list) or not isinstance(infos, list):
            raise DataError(
                f"{where}: expected OBELICS ('texts', 'images') or MMC4 ('text_list', 'image_info') keys"
            )
        before: dict[int, list[str]] = {}
        for info in infos:
            k = info.get("matched_text_index") if isinstance(info, dict) else None
            if (
                not isinstance(k, int)
                or not 0 <= k < len(texts)
                or not isinstance(info.get("image_name"), str)
            ):
                raise DataError(f"{where}: bad image_info entry {info!r}"[:300])
            before.setdefault(k, []).append(info["image_name"])
        return [
            p for k, t in enumerate(texts) for p in [("image", i) for i in before.get(k, [])] + [("text", t)]
        ]

    def sample(self, i: int, image_token: str) -> Sample:
        record, where = self.record(i)
        sample_id = str(record.get("id", f"{self.file.name}#{i}"))
        pieces, images = [], []
        for kind, value in self.parts(record, f"{where} (id {sample_id!r})"):
            if kind == "image":
                images.append(self.image_path(value))
                pieces.append(image_token if self.style == "plain" else f"Image {len(images)}: {image_token}")
            elif image_token in value:
                raise DataError(
                    f"{where} (id {sample_id!r}): text holds a literal {image_token}", "image_mismatch"
                )
            else:
                pieces.append(value)
        if not any(kind == "text" and v.strip() for kind, v in self.parts(record, where)):
            raise DataError(f"{where} (id {sample_id!r}): document has no text to learn", "no_supervision")
        return Sample(sample_id, images=images, where=where, text=self.separator.join(pieces))


class TextOnly(JsonRecords):
    """Text-only documents, ``.jsonl`` lines ``{"text": ...}`` (optional ``id``); every token is learned."""

    def sample(self, i: int, image_token: str) -> Sample:
        record, where = self.record(i)
        sample_id = str(record.get("id", f"{self.file.name}#{i}"))
        text = record.get("text")
        if not isinstance(text, str) or not text.strip():
            raise DataError(f"{where} (id {sample_id!r}): needs a non-empty string 'text'", "no_supervision")
        if image_token in text:
            raise DataError(
                f"{where} (id {sample_id!r}): text-only record holds {image_token}", "image_mismatch"
            )
        return Sample(sample_id, where=where, text=text)


SENTENCE_FIELDS = ("sentences", "sentence", "captions", "answer")
"""Fields a flattened RefCOCO row may hold its referring expressions in, looked up in this order: ``sentences``
(the refer toolkit's ``[{"sent": ...}]`` or strings), ``sentence``, ``captions`` (jxu124/refcoco), ``answer``
(lmms-lab/RefCOCO)."""
PICKLE_SUFFIXES = (".p", ".pkl", ".pickle")


def _sentences(row: dict, where: str) -> list[str]:
    """The referring expressions of a RefCOCO row or ref (see :data:`SENTENCE_FIELDS`)."""
    key = next((k for k in SENTENCE_FIELDS if row.get(k) is not None), None)
    value = row.get(key) if key else None
    values = [value] if isinstance(value, str) else value
    if not isinstance(values, list):
        raise DataError(
            f"{where}: no referring expression: expected one of the fields {list(SENTENCE_FIELDS)}"
        )
    out = []
    for v in values:
        text = v.get("sent", v.get("raw")) if isinstance(v, dict) else v
        if not isinstance(text, str):
            raise DataError(f"{where}: {key!r} must hold strings or {{'sent': str}} objects, got {v!r}"[:400])
        out.append(text)
    if not any(t.strip() for t in out):
        raise DataError(f"{where}: {key!r} holds no referring expression", "no_supervision")
    return out


def _sentence_count(row) -> int:
    """Index entries of a row: one per referring expression (a row that cannot be read counts once: its error
    comes when it is drawn)."""
    try:
        return max(1, len(_sentences(row, "")))
    except (DataError, AttributeError):
        return 1


def _xyxy(box, box_format: str, where: str) -> list[float]:
    """A pixel box as ``[x1, y1, x2, y2]`` from ``box_format`` (``xywh``: COCO's top-left corner, width, height)."""
    if not isinstance(box, list | tuple) or len(box) != 4 or not all(isinstance(v, int | float) for v in box):
        raise DataError(f"{where}: 'bbox' must be 4 numbers ({box_format}, pixels), got {box!r}"[:400])
    if box_format == "xyxy":
        return [float(v) for v in box]
    x, y, w, h = (float(v) for v in box)
    return [x, y, x + w, y + h]


class Grounding(JsonRecords):
    """Grounding records (RefCOCO/+/g and the like), in one of three forms (``format``):

    - ``objects`` (default): ``.jsonl`` lines / a ``.json`` list ``{"id", "image", "width", "height", "objects":
      [{"phrase": "the small red circle", "box": [x1, y1, x2, y2]}, ...]}`` with pixel boxes.
    - ``rows``: flattened RefCOCO rows as people download them (jxu124/refcoco, lmms-lab/RefCOCO exported to
      JSON / JSONL, one referred object per row): COCO ``bbox`` ``[x, y, w, h]`` in pixels, the expressions in
      ``sentences`` (strings or ``{"sent": ...}``), ``sentence``, ``captions`` or ``answer``, the image as
      ``image_path``, ``image`` (a path), ``image_pattern`` filled from the row (``image_id`` only), or
      ``file_name``; the image size from ``width``/``height``, jxu124's ``raw_image_info``, or the image file.
    - ``refer``: the refer toolkit's layout: ``path`` is the refs file (``refs(unc).json``; the pickled
      ``refs(unc).p`` only with ``trust_pickle: true``: unpickling can run code) and ``instances`` the COCO-style
      ``instances.json`` (``images`` with ``file_name``/``width``/``height``, ``annotations`` with ``bbox``
      ``[x, y, w, h]``); each ref's ``ann_id`` gives its box and ``image_id`` its image.

    ``rows`` and ``refer`` give one sample per referring expression (RefCOCO has about three per object) and
    keep one RefCOCO ``split`` if asked; their index is built when the source is opened. Boxes are converted to
    corners by ``box_format``, which defaults to each form's convention: ``xyxy`` for ``objects``, COCO's
    ``xywh`` for ``rows`` and ``refer``.

    Each draw renders one task (chosen per record, deterministically) with the task template's instruction and
    box format: ``refer`` (phrase -> box), ``identify`` (box -> phrase), ``detection`` (all objects with boxes).
    The sample's meta holds the ``task``, the drawn object's ``box`` (``[x1, y1, x2, y2]`` pixels) and the image's
    ``width`` / ``height``, for grounding accuracy.
    """

    def __init__(
        self,
        path: str,
        template: TaskTemplate,
        weight: float = 1.0,
        image_folder: str | None = None,
        tasks: list[Task] | None = None,
        clip_boxes: bool = False,
        format: Literal["objects", "rows", "refer"] = "objects",
        box_format: Literal["xyxy", "xywh"] | None = None,
        split: str | None = None,
        instances: str | None = None,
        image_pattern: str | None = None,
        trust_pickle: bool = False,
    ) -> None:
        """
        Args:
            path: ``.jsonl`` / ``.json`` file of records or rows; for ``refer`` the refs file.
            template: Task template: instructions and box format (MiniGPT-v2, Qwen-VL, Pink, plain).
            weight: Share of this source in a training mixture.
            image_folder: Folder image paths are relative to (COCO's ``train2014`` for RefCOCO); default: the
                file's folder.
            tasks: Tasks to render, one per draw (default ``[refer, identify]``).
            format: ``objects`` (records with an ``objects`` list), ``rows`` (flattened RefCOCO rows) or
                ``refer`` (refs file + COCO instances); see the class docstring.
            box_format: How boxes are written: ``xyxy`` (corners) or ``xywh`` (top-left, width, height), in pixels;
                default ``xyxy`` for ``objects``, ``xywh`` (COCO) for ``rows`` and ``refer``.
            split: ``rows`` / ``refer``: keep only the rows or refs whose ``split`` field is this (``train``,
                ``val``, ``testA``, ``testB``, ``test``); None keeps all.
            instances: ``refer``: the COCO-style ``instances.json``; default ``instances.json`` beside the refs
                file.
            image_pattern: ``rows`` without an image path: the file name built from the row's fields, e.g.
                ``COCO_train2014_{image_id:012d}.jpg``.
            trust_pickle: Read a pickled refs file (``refs(unc).p``). Unpickling runs whatever code the file holds:
                set it only for a file you trust, or convert the file to JSON once.
            clip_boxes: Clamp a box that reaches outside its image to the image (a box wholly outside stays
                bad); False: such a record is bad, reason ``box_outside_image``.
        """
        super().__init__(path, weight, image_folder)
        self.template, self.tasks = template, list(tasks or ["refer", "identify"])
        self.clip_boxes = clip_boxes
        if format not in ("objects", "rows", "refer"):
            raise ValueError(f"Grounding format must be 'objects', 'rows' or 'refer', got {format!r}")
        if box_format not in (None, "xyxy", "xywh"):
            raise ValueError(f"Grounding box_format must be 'xyxy' or 'xywh', got {box_format!r}")
        self.format, self.split, self.image_pattern = format, split, image_pattern
        self.box_format = box_format or ("xyxy" if format == "objects" else "xywh")
        self.instances, self.trust_pickle = instances, trust_pickle
        if Path(path).suffix.lower() in PICKLE_SUFFIXES and not trust_pickle:
            raise ValueError(
                f"Grounding: {path!r} is a Python pickle, and loading a pickle runs whatever code it holds; it is "
                "read only with trust_pickle: true (set it for a file you trust, such as the refer toolkit's "
                'refs(unc).p), or convert it to JSON once: python -c "import json, pickle; '
                "json.dump(pickle.load(open('refs(unc).p', 'rb')), open('refs(unc).json', 'w'))\""
            )

    # -- reading the formats: every form becomes an ``objects`` record (pixel corners) -------------------------
    def _index(self) -> int:
        if self.format == "refer":
            return self._index_refer()
        size = super()._index()
        if self.format == "objects":
            return size
        self._entries = []  # (row, expression)
        for i in range(size):
            try:
                row, where = super().record(i)
            except DataError:
                self._entries.append((i, 0))  # reported when drawn
                continue
            if self.split is not None and row.get("split") != self.split:
                if "split" not in row:
                    raise DataError(
                        f"{where}: split={self.split!r} keeps the rows of one RefCOCO split, but this row has no "
                        "'split' field; set split: null for a file that holds one split"
                    )
                continue
            self._entries += [(i, k) for k in range(_sentence_count(row))]
        return len(self._entries)

    def _load_json(self, path: Path, what: str):
        if not path.is_file():
            raise DataError(f"{path}: no such file ({what}; root {self.root})", "missing_file")
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise DataError(
                f"{path} line {e.lineno} column {e.colno}: not valid JSON ({e.msg}); a pickled refs file is "
                f"read when its name ends in {'/'.join(PICKLE_SUFFIXES)} and trust_pickle is true"
            ) from None

    def _index_refer(self) -> int:
        path = self.file
        if path.suffix.lower() in PICKLE_SUFFIXES:
            if not path.is_file():
                raise DataError(f"{path}: no such file (refs; root {self.root})", "missing_file")
            import pickle

            with open(path, "rb") as f:
                refs = pickle.load(f)  # trust_pickle is true (checked when the source was built)
        else:
            refs = self._load_json(path, "refs")
        instances_path = self.root / self.instances if self.instances else path.parent / "instances.json"
        instances = self._load_json(instances_path, "COCO instances")
        if not isinstance(refs, list) or not isinstance(instances, dict):
            raise DataError(
                f"{path}: expected a list of refs and {instances_path} a COCO instances object with 'images' "
                "and 'annotations'"
            )
        try:
            self._images = {im["id"]: im for im in instances["images"]}
            self._anns = {a["id"]: a for a in instances["annotations"]}
        except (KeyError, TypeError) as e:
            raise DataError(
                f"{instances_path}: not COCO instances ('images' and 'annotations' with 'id' each): {e!r}"
            ) from None
        self._instances_path = instances_path
        self._refs = refs
        self._entries = [
            (r, k)
            for r, ref in enumerate(refs)
            if self.split is None or not isinstance(ref, dict) or ref.get("split") == self.split
            for k in range(_sentence_count(ref))
        ]
        return len(self._entries)

    def record(self, i: int) -> tuple[dict, str]:
        """Record ``i`` as an ``objects`` record with pixel corners, and where it is."""
        if self.format == "objects":
            record, where = super().record(i)
            if self.box_format == "xywh" and isinstance(record.get("objects"), list):
                objects = [
                    {**o, "box": _xyxy(o["box"], "xywh", where)} if isinstance(o, dict) and "box" in o else o
                    for o in record["objects"]
                ]
                record = {**record, "objects": objects}
            return record, where
        r, k = self._entries[i]
        if self.format == "rows":
            row, where = super().record(r)
            return self._from_row(row, r, k, where), where
        ref = self._refs[r]
        where = f"{self.file} ref {r}"
        if not isinstance(ref, dict):
            raise DataError(f"{where}: a ref must be an object, got {type(ref).__name__}")
        ann, image = self._anns.get(ref.get("ann_id")), self._images.get(ref.get("image_id"))
        if ann is None or image is None:
            raise DataError(
                f"{where} (ref_id {ref.get('ref_id')!r}): ann_id {ref.get('ann_id')!r} / image_id "
                f"{ref.get('image_id')!r} not found in {self._instances_path}; use the instances file of the "
                "same dataset as the refs"
            )
        phrase = _sentences(ref, where)[k]
        return {
            "id": f"{ref.get('ref_id', r)}/{k}",
            "image": image.get("file_name"),
            "width": image.get("width"),
            "height": image.get("height"),
            "objects": [{"phrase": phrase, "box": _xyxy(ann.get("bbox"), self.box_format, where)}],
        }, where

    def _from_row(self, row: dict, r: int, k: int, where: str) -> dict:
        """The ``objects`` record of expression ``k`` of flattened RefCOCO row ``r``."""
        phrase = _sentences(row, where)[k]
        box = _xyxy(row.get("bbox"), self.box_format, where)
        image = row.get("image_path") or (row["image"] if isinstance(row.get("image"), str) else None)
        if image is None and self.image_pattern is not None:
            try:
                image = self.image_pattern.format(**row)
            except (KeyError, IndexError, ValueError) as e:
                raise DataError(
                    f"{where}: image_pattern {self.image_pattern!r} does not fit the row ({e!r})"
                ) from None
        image = image or row.get("file_name")
        if not isinstance(image, str):
            raise DataError(
                f"{where}: no image path ('image_path', 'image' or 'file_name'); for rows that name only an "
                "'image_id', set image_pattern, e.g. 'COCO_train2014_{image_id:012d}.jpg'"
            )
        width, height = row.get("width"), row.get("height")
        if (width is None or height is None) and isinstance(row.get("raw_image_info"), str):
            try:
                info = json.loads(row["raw_image_info"])
                width, height = info.get("width"), info.get("height")
            except (json.JSONDecodeError, AttributeError):
                pass
        if width is None or height is None:
            width, height = _image_size(self.image_path(image), where)
        row_id = next((row[f] for f in ("ref_id", "question_id", "id") if row.get(f) is not None), None)
        return {
            "id": f"{row_id if row_id is not None else f'{self.file.name}#{r}'}/{k}",
            "image": image,
            "width": int(width) if isinstance(width, float) and width.is_integer() else width,
            "height": int(height) if isinstance(height, float) and height.is_integer() else height,
            "objects": [{"phrase": phrase, "box": box}],
        }

    def sample(self, i: int, image_token: str) -> Sample:
        record, where = self.record(i)
        sample_id = str(record.get("id", f"{self.file.name}#{i}"))
        w, h, image, objects = (record.get(k) for k in ("width", "height", "image", "objects"))
        if not (
            isinstance(w, int) and isinstance(h, int) and isinstance(image, str) and isinstance(objects, list)
        ):
            raise DataError(
                f"{where} (id {sample_id!r}): needs int 'width'/'height', 'image' and an 'objects' list"
            )
        parsed = []
        for obj in objects:
            try:
                phrase, box = str(obj["phrase"]), Box(*map(float, obj["box"]))
            except (KeyError, TypeError, ValueError) as e:
                raise DataError(f"{where} (id {sample_id!r}): bad object {obj!r}: {e}"[:400]) from None
            parsed.append((phrase, _fit_box(box, w, h, self.clip_boxes, f"{where} (id {sample_id!r})")))
        if not parsed:
            raise DataError(f"{where} (id {sample_id!r}): no objects", "no_supervision")
        rng = random.Random(f"{self.path}:{i}")
        task = self.tasks[rng.randrange(len(self.tasks))]
        phrase, box = parsed[rng.randrange(len(parsed))]
        fields = {"phrase": phrase, "box": box, "objects": parsed, "caption": record.get("caption")}
        turns = self.template.render(task, fields, image_token, w, h, rng)
        # what grounding accuracy compares a reply with
        meta = {"task": task, "box": list(box), "width": w, "height": h}
        return Sample(f"{sample_id}/{task}", turns, [self.image_path(image)], where, meta=meta)


def _fit_box(box: Box, width: int, height: int, clip: bool, where: str) -> Box:
    """``box`` if it lies in the ``width`` x ``height`` image; reaching outside: clamped to the image when ``clip``,
    else :class:`DataError` ``box_outside_image``; not a box (``x1 >= x2`` or ``y1 >= y2``): ``malformed_record``."""
    if not (box.x1 < box.x2 and box.y1 < box.y2):
        raise DataError(f"{where}: box {tuple(box)} is not a box (need x1 < x2 and y1 < y2, pixels)")
    if 0 <= box.x1 and box.x2 <= width and 0 <= box.y1 and box.y2 <= height:
        return box
    clipped = box.clip(width, height)
    if clip and clipped.x1 < clipped.x2 and clipped.y1 < clipped.y2:
        return clipped
    problem = "lies wholly outside" if clip else "reaches outside"
    fix = (
        "fix the annotation"
        if clip
        else "fix the annotation, or set clip_boxes: true on this Grounding source"
    )
    raise DataError(
        f"{where}: box {tuple(box)} {problem} the {width}x{height} image; {fix}", "box_outside_image"
    )


def _image_size(path: str, where: str) -> tuple[int, int]:
    """``(width, height)`` of an image file, read from its header."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            return image.size
    except FileNotFoundError:
        raise DataError(
            f"{where}: image {path} not found (its size is needed for the box)", "missing_file"
        ) from None
    except (UnidentifiedImageError, OSError) as e:
        raise DataError(f"{where}: image {path} cannot be read ({e})", "undecodable_image") from None


def read_llava(
    path: str | Path, image_folder: str | None = None, image_token: str = "<image>"
) -> list[Sample]:
    """Every record of a LLaVA-format file as samples, raising :class:`DataError` at the first bad one."""
    path = Path(path)
    source = Conversations(path.name, image_folder=image_folder).open(path.parent)
    return [source.sample(i, image_token) for i in range(len(source))]
