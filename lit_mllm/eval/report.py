"""The evaluation report: one JSON file holding a run's scores with everything needed to trust and reproduce them.

``lit-mllm evaluate`` writes it; a sweep's report reads its ``metrics``. Fields:

- ``metrics``: every logged ``<split>/...`` value (overall, per task, per kind);
- ``split``, ``checkpoint`` (path and sha256), ``created`` (UTC), ``command``;
- ``generation``: the decoding settings; ``prompting``: the chat format, image token and tokens per image, and
  the first prompts as the model saw them;
- ``data``: the DataModule's root and, per source of the split, its class, options and the sha256 of its file
  (a folder: of its file names and sizes);
- ``versions``: Python and the packages that change scores.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import platform
import sys
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

PACKAGES = ("lit_mllm", "torch", "lightning", "torchmetrics", "transformers", "open_clip_torch", "pillow")
"""Packages whose versions a report records."""


def file_digest(path: Path) -> str:
    """sha256 of a file's bytes; of a folder, of its files' relative names and sizes (not their bytes: shard
    folders run to terabytes)."""
    h = hashlib.sha256()
    if path.is_dir():
        for f in sorted(p for p in path.rglob("*") if p.is_file()):
            h.update(f"{f.relative_to(path).as_posix()}\0{f.stat().st_size}\n".encode())
        return "folder:" + h.hexdigest()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def versions() -> dict[str, str]:
    """Python's version and each of :data:`PACKAGES`' (``"absent"`` when not installed)."""
    out = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "absent"
    return out


def _plain(value: Any) -> Any:
    """A JSON-able copy of an option value (paths and other objects as text)."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, str | int | float | bool) or value is None:
        return value
    return str(value)


def data_record(datamodule, split: str) -> dict[str, Any]:
    """The split's sources: class, options and the digest of what they read (see :func:`file_digest`)."""
    sources = datamodule.sources(split) if hasattr(datamodule, "sources") else {}
    out: dict[str, Any] = {"root": str(getattr(datamodule, "root", "")), "sources": {}}
    for name, source in sources.items():
        options = {k: _plain(v) for k, v in vars(source).items() if not k.startswith("_") and k != "root"}
        entry = {"class": f"{type(source).__module__}.{type(source).__qualname__}", "options": options}
        path = getattr(source, "file", None)
        if isinstance(path, Path) and path.exists():
            entry["file"] = str(path)
            entry["sha256"] = file_digest(path)
        out["sources"][name] = entry
    return out


def build_report(
    *,
    metrics: dict[str, float],
    split: str,
    data_split: str,
    model,
    datamodule,
    checkpoint: str | None,
    prompts: list[str],
) -> dict[str, Any]:
    """The report's fields (see the module docstring) for a finished evaluation of ``split`` (``val``), read from the
    DataModule's ``data_split`` (``validate``)."""
    processor = model.processor()
    return {
        "metrics": dict(sorted(metrics.items())),
        "split": split,
        "checkpoint": (
            {"path": str(checkpoint), "sha256": file_digest(Path(checkpoint))} if checkpoint else None
        ),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": sys.argv,
        "model": f"{type(model).__module__}.{type(model).__qualname__}",
        "generation": (  # a module that does not generate (CLIP pretraining) has none
            dataclasses.asdict(model.generation) if getattr(model, "generation", None) is not None else None
        ),
        "prompting": {
            "chat_format": _plain(processor.chat_format),
            "image_token": processor.image_token,
            "tokens_per_image": processor.tokens_per_image,
            "first_prompts": prompts,
        },
        "data": data_record(datamodule, data_split),
        "versions": versions(),
    }


def write_report(report: dict[str, Any], path: Path) -> Path:
    """Write ``report`` as indented JSON, atomically (a partial file is never left under ``path``)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".partial")
    tmp.write_text(json.dumps(report, indent=1) + "\n")
    tmp.replace(path)
    return path


def read_metrics(path: Path) -> dict[str, float]:
    """The ``metrics`` of a report file."""
    report = json.loads(Path(path).read_text())
    if not isinstance(report, dict) or not isinstance(report.get("metrics"), dict):
        raise ValueError(f"{path} is not an evaluation report (no 'metrics' object)")
    return report["metrics"]
