"""A subset of a source's records written in the source's own format (what ``lit-mllm score-data`` keeps).

| source | written |
|---|---|
| :class:`~lit_mllm.data.Conversations`, :class:`~lit_mllm.data.Interleaved`, :class:`~lit_mllm.data.TextOnly`, :class:`~lit_mllm.data.Grounding` (``format: objects``) | the kept records as they were: ``.jsonl`` lines byte for byte, a ``.json`` list re-dumped |
| :class:`~lit_mllm.data.Captions` manifests | ``.jsonl`` lines byte for byte; ``.csv`` rows under the same header |
| :class:`~lit_mllm.data.Captions` webdataset shards | every member of each kept sample (image, ``.txt``, ``.json``, ...) copied under its key into new shards |

Other sources (``Grounding`` in the ``rows`` / ``refer`` forms, whose index entries are not records; any other
:class:`~lit_mllm.data.Source`) are refused by name. Records keep the order of the source. Image paths inside the
records are left as they were: the written source reads them with ``image_folder`` set to the original's folder
(:func:`write_subset` returns the source to configure).
"""

from __future__ import annotations

import csv
import io
import json
import tarfile
from pathlib import Path

from lit_mllm.data.sources import Captions, Conversations, Grounding, Interleaved, Source, TextOnly

RECORD_SOURCES = (Conversations, Interleaved, TextOnly, Grounding)
SUPPORTED = (
    "Conversations, Interleaved, TextOnly and Grounding (format objects) .json / .jsonl files; Captions .jsonl / "
    ".csv manifests and webdataset .tar shards"
)


def check_supported(source: Source, name: str) -> None:
    """Raise ``ValueError`` naming ``source`` when :func:`write_subset` cannot write it."""
    kind = type(source).__name__
    if isinstance(source, Grounding) and source.format != "objects":
        raise ValueError(
            f"source {name!r} is a Grounding source in the {source.format!r} form, whose entries are referring "
            f"expressions, not records: a filtered copy cannot be written in that form. Supported: {SUPPORTED}"
        )
    if type(source) not in (*RECORD_SOURCES, Captions):
        raise ValueError(f"source {name!r} is a {kind}; a filtered copy can be written of: {SUPPORTED}")


def write_subset(source: Source, indices: list[int], out: Path, shard_size: int = 1000) -> dict:
    """Write the records ``indices`` of the opened ``source`` (kept in source order) into the folder ``out``, in
    the source's format; return the source to configure for it (``class_path`` / ``init_args``: ``path`` and,
    for files that name images, ``image_folder``)."""
    check_supported(source, type(source).__name__)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    kept = sorted(set(indices))
    init: dict = {}
    if isinstance(source, Captions) and source._rows is None:
        path = out / source.file.name.removesuffix(".tar")
        _write_shards(source, kept, path, shard_size)
    else:
        path = out / source.file.name
        tmp = path.with_name(path.name + ".partial")
        if source.file.suffix == ".jsonl":
            lines = source._rows if isinstance(source, Captions) else source._lines
            tmp.write_text("".join(lines[i][1] + "\n" for i in kept), encoding="utf-8")
        elif source.file.suffix == ".csv":
            _write_csv(source, kept, tmp)
        else:  # a .json list
            tmp.write_text(json.dumps([source._records[i] for i in kept], indent=1), encoding="utf-8")
        tmp.replace(path)
        init["image_folder"] = str(source.folder.resolve())
    cls = type(source)
    return {"class_path": f"{cls.__module__}.{cls.__qualname__}", "init_args": {"path": str(path), **init}}


def _write_csv(source: Captions, kept: list[int], path: Path) -> None:
    with open(source.file, newline="", encoding="utf-8") as f:
        header = next(csv.reader(f))
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=header)
        writer.writeheader()
        writer.writerows(source._rows[i][1] for i in kept)


def _write_shards(source: Captions, kept: list[int], folder: Path, shard_size: int) -> None:
    """The members of the kept samples, ``shard_size`` samples a shard, as ``{n:05d}.tar`` in ``folder``."""
    tmp = folder.with_name(folder.name + ".partial")
    tmp.mkdir(parents=True, exist_ok=True)
    for old in tmp.glob("*.tar"):
        old.unlink()
    for n, start in enumerate(range(0, max(len(kept), 1), shard_size)):
        with tarfile.open(tmp / f"{n:05d}.tar", "w", format=tarfile.PAX_FORMAT) as tar:
            for i in kept[start : start + shard_size]:
                shard, key, exts = source._members[i]
                for ext, span in exts.items():
                    data = source._read(shard, span)
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size, info.mtime, info.mode = len(data), 0, 0o444
                    tar.addfile(info, io.BytesIO(data))
    if folder.exists():
        for old in folder.glob("*.tar"):
            old.unlink()
        folder.rmdir()
    tmp.rename(folder)
