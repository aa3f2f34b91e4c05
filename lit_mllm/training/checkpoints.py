"""Checkpoint files: written atomically, read back with ``weights_only=True``, loaded into a model built from its
config (:func:`load_weights`).

A checkpoint is written to a temporary file in the destination folder, flushed to disk (``fsync``) and renamed
over the destination (``os.replace``, atomic on POSIX and Windows), then the folder entry is synced. A write
that stops half-way (an exception, a kill, a full disk) leaves the previous checkpoint of that name intact and no
partial file under it. Lightning's own writer serialises the whole checkpoint into memory first and, on a local
disk, moves a temporary file from the system temp folder (a copy, not an atomic rename, when that is another
file system) without ``fsync``.

Reading is ``weights_only=True`` unless asked otherwise: plain tensors and containers, plus the dataclasses a
family module keeps in its hyperparameters (its ``stage``: :class:`~lit_mllm.training.stages.Stage` and whatever
dataclasses a stage's fields hold). :func:`safe_globals` finds them from the type hints of the ``__init__``
arguments of every ``LightningModule`` subclass defined in the process (a checkpoint is read once its module's
class exists), so a new dataclass field needs no list kept by hand, and this file imports no family. The
allow-list is scoped to our reads (``torch.serialization.safe_globals``), never added process-wide.

Our checkpoints hold only the weights a stage trains (+ optimizer state); frozen weights are rebuilt from the
config's sources. So a trained model is: build it from the config, then :func:`load_weights` (a non-strict load in
which every tensor of the file must land on a parameter or buffer of the model).

Use it through the Trainer's plugins (``configs/checkpointing.yaml``)::

    trainer:
      plugins:
        - class_path: lit_mllm.training.checkpoints.AtomicCheckpointIO
"""

from __future__ import annotations

import dataclasses
import difflib
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
from lightning.pytorch import LightningModule
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn

from lit_mllm.training.stages import Stage, StageSchedule


def safe_globals() -> list[type]:
    """The classes a checkpoint of ours may hold besides tensors and plain containers: every dataclass reachable
    from :class:`~lit_mllm.training.stages.Stage`, :class:`~lit_mllm.training.stages.StageSchedule` and the type
    hints of the ``__init__`` arguments of every ``LightningModule`` subclass defined so far (the families, and
    any module a user defines), through the hints of the dataclasses' own fields."""
    modules, stack = [], [LightningModule]
    while stack:
        for sub in stack.pop().__subclasses__():
            if sub not in modules:
                modules.append(sub)
                stack.append(sub)
    found: set[type] = set()
    todo = [Stage, StageSchedule] + [hint for cls in modules for hint in _hints(cls.__init__)]
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


# -- loading into a model --------------------------------------------------------------------------------------
class WeightsMismatch(ValueError):
    """A weights file does not fit the model it is loaded into."""


@dataclasses.dataclass(frozen=True)
class LoadedWeights:
    """What :func:`load_weights` did."""

    path: Path
    loaded: list[str]
    """Names of the model's tensors set from the file."""
    missing: list[str]
    """Names of the model's parameters and buffers the file does not hold: they keep the values the config built
    (for a checkpoint of ours, the frozen parts, rebuilt from their sources)."""
    stage: str | None = None
    """Stage that wrote the checkpoint, when it says."""


def read_weights(path: str | Path) -> tuple[dict[str, Tensor], str | None]:
    """The tensors of a ``.safetensors`` file or of a Lightning checkpoint's ``state_dict``, and the stage that
    wrote the checkpoint (None if it does not say). Checkpoints are read with ``weights_only=True``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no weights file at {path}: give a Lightning .ckpt or a .safetensors file")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path), device="cpu"), None
    try:
        checkpoint = read_checkpoint(path)  # weights_only=True, our stage dataclasses allowed
    except Exception as e:  # pickle errors come in many types; all mean the same here
        raise WeightsMismatch(
            f"could not read {path} as a Lightning checkpoint with weights_only=True ({type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else e}); give a Lightning .ckpt or a .safetensors file"
        ) from e
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("state_dict"), dict):
        raise WeightsMismatch(
            f"{path} is not a Lightning checkpoint (no 'state_dict' in it); give a Lightning .ckpt or a "
            ".safetensors file"
        )
    ours = checkpoint.get("lit_mllm")  # written by VLMModule.on_save_checkpoint
    return checkpoint["state_dict"], ours.get("stage") if isinstance(ours, dict) else None


def load_weights(module: nn.Module, path: str | Path) -> LoadedWeights:
    """Load a Lightning ``.ckpt`` or a ``.safetensors`` file into ``module`` (built from its config) in place.

    Non-strict the way our checkpoints need (a stage's checkpoint holds only the weights it trains; the rest keep
    the values the config built), but every tensor of the file must match a parameter or buffer of ``module`` by
    name and shape: a tensor that matches nothing raises :class:`WeightsMismatch` naming it (and the closest name
    the module has), as does a shape mismatch. Returns what was loaded and what was left as built.
    """
    path = Path(path)
    state, stage = read_weights(path)
    own = module.state_dict()
    unexpected = [k for k in state if k not in own]
    if unexpected:
        close = difflib.get_close_matches(unexpected[0], list(own), n=1)
        hint = f"; the closest name in the model is {close[0]!r}" if close else ""
        raise WeightsMismatch(
            f"{len(unexpected)} of the {len(state)} tensors in {path} match no parameter or buffer of "
            f"{type(module).__name__}, e.g. {unexpected[:3]}{hint}. The file was written for another model: "
            "build the model from the config it was trained with"
        )
    shapes = [(k, tuple(v.shape), tuple(own[k].shape)) for k, v in state.items() if v.shape != own[k].shape]
    if shapes:
        listed = ", ".join(f"{k}: file {a} vs model {b}" for k, a, b in shapes[:3])
        raise WeightsMismatch(
            f"{len(shapes)} tensors in {path} have another shape than in {type(module).__name__} ({listed}); "
            "the config builds parts of other sizes than the ones trained: use the config of the run"
        )
    result = module.load_state_dict(state, strict=False)
    # A tied weight (e.g. lm_head = embed_tokens) is stored once; its other name is set through the tie.
    loaded_storage = {own[k].data_ptr() for k in state if own[k].numel()}
    missing = sorted(k for k in result.missing_keys if own[k].data_ptr() not in loaded_storage)
    loaded = sorted(k for k in own if k not in missing)
    rank_zero_info(
        f"loaded {len(state)} tensors from {path}"
        + (f" (written by stage {stage!r})" if stage else "")
        + (
            f"; {len(missing)} of {type(module).__name__}'s tensors are not in it and keep the values the config "
            f"built (e.g. {missing[:2]})"
            if missing
            else ""
        )
    )
    return LoadedWeights(path=path, loaded=loaded, missing=missing, stage=stage)
