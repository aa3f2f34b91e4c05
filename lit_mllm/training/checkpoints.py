"""Checkpoint files: written atomically, read back with ``weights_only=True``.

A checkpoint is written to a temporary file in the destination folder, flushed to disk (``fsync``) and renamed
over the destination (``os.replace``, atomic on POSIX and Windows), then the folder entry is synced. A write
that stops half-way (an exception, a kill, a full disk) leaves the previous checkpoint of that name intact and no
partial file under it. Lightning's own writer serialises the whole checkpoint into memory first and, on a local
disk, moves a temporary file from the system temp folder (a copy, not an atomic rename, when that is another
file system) without ``fsync``.

Reading is ``weights_only=True`` unless asked otherwise: plain tensors and containers, plus the dataclasses a
family module keeps in its hyperparameters (its ``stage``: :class:`~lit_mllm.training.stages.Stage` and whatever
dataclasses a stage's fields hold). :func:`safe_globals` finds them from the type hints of the family modules'
``__init__`` arguments, so a new dataclass field needs no list kept by hand. The allow-list is scoped to our
reads (``torch.serialization.safe_globals``), never added process-wide.

Use it through the Trainer's plugins (``configs/checkpointing.yaml``)::

    trainer:
      plugins:
        - class_path: lit_mllm.training.checkpoints.AtomicCheckpointIO
"""

from __future__ import annotations

import dataclasses
import os
import pickle
import tempfile
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.plugins.io import TorchCheckpointIO

from lit_mllm.training.stages import Stage


def safe_globals() -> list[type]:
    """The classes a checkpoint of ours may hold besides tensors and plain containers: every dataclass reachable
    from the type hints of the ``__init__`` arguments of :class:`~lit_mllm.lit.base.VLMModule` and its (imported)
    subclasses, through the hints of the dataclasses' own fields."""
    from lit_mllm.lit.base import VLMModule

    modules, stack = [VLMModule], [VLMModule]
    while stack:
        for sub in stack.pop().__subclasses__():
            modules.append(sub)
            stack.append(sub)
    found: set[type] = set()
    todo = [Stage] + [hint for cls in modules for hint in _hints(cls.__init__)]
    while todo:
        hint = todo.pop()
        todo.extend(typing.get_args(hint))
        if dataclasses.is_dataclass(hint) and isinstance(hint, type) and hint not in found:
            found.add(hint)
            todo.extend(_hints(hint))
    return sorted(found, key=lambda c: f"{c.__module__}.{c.__qualname__}")


def _hints(obj: Any) -> list[Any]:
    try:
        return list(typing.get_type_hints(obj).values())
    except Exception:  # an unresolvable annotation (a name imported for type checking only): no hints from it
        return []


class UnsafeCheckpoint(RuntimeError):
    """A checkpoint holds objects that ``weights_only=True`` loading refuses."""


def atomic_save(obj: Any, path: str | Path) -> None:
    """``torch.save(obj)`` to ``path`` through a temporary file in the same folder, fsynced and renamed over it.

    On any error (or interruption) the temporary file is removed and an existing ``path`` is left untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_folder(path.parent)


def _fsync_folder(folder: Path) -> None:
    """Make the rename itself durable (POSIX); folders cannot be opened for syncing on Windows."""
    if os.name != "posix":
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read_checkpoint(path: str | Path, map_location: Any = "cpu", weights_only: bool = True) -> dict[str, Any]:
    """Load a checkpoint file; ``weights_only=True`` admits tensors, plain containers and :func:`safe_globals`."""
    if not weights_only:
        return torch.load(path, map_location=map_location, weights_only=False)
    try:
        with torch.serialization.safe_globals(safe_globals()):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:  # an object outside the allow-list
        first = str(e).split("WeightsUnpickler error:")[-1].strip().splitlines()[0]
        raise UnsafeCheckpoint(
            f"{path} holds an object that weights_only=True loading refuses ({first}). If you trust the file, "
            "load it with weights_only=False (`lit-mllm fit ... --weights_only false`); a dataclass of this "
            "project is allowed when a family module's __init__ (or a dataclass it takes) names it in a type hint"
        ) from e


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning checkpoint IO: atomic local writes (:func:`atomic_save`), ``weights_only=True`` reads with
    :func:`safe_globals` allowed. Remote paths (``s3://`` ...) fall back to Lightning's fsspec writer."""

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: _PATH, storage_options: Any | None = None
    ) -> None:
        if storage_options is not None:
            raise TypeError(
                f"{type(self).__name__} takes no storage_options (got {storage_options!r}); drop them or use "
                "another CheckpointIO plugin"
            )
        if not _is_local(path):
            return super().save_checkpoint(checkpoint, path)
        atomic_save(checkpoint, path)

    def load_checkpoint(
        self,
        path: _PATH,
        map_location: Callable | None = lambda storage, loc: storage,
        weights_only: bool | None = None,
    ) -> dict[str, Any]:
        """``weights_only`` None (Lightning's default) means True."""
        if not _is_local(path):
            with torch.serialization.safe_globals(safe_globals()):
                return super().load_checkpoint(path, map_location, weights_only is not False)
        if not Path(path).is_file():
            raise FileNotFoundError(f"Checkpoint file not found: {path}")
        return read_checkpoint(path, map_location, weights_only is not False)


def _is_local(path: _PATH) -> bool:
    from fsspec.implementations.local import LocalFileSystem

    return isinstance(get_filesystem(path), LocalFileSystem)
