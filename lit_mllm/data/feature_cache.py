"""Frozen-tower feature cache: a frozen vision tower's features computed once per (image, layout, tower) and read
back from disk, across epochs and across the runs of a sweep that share the tower and the resolution.

Turned on by the family module's ``feature_cache`` init argument (off by default; refused when a stage trains the
tower, see :meth:`lit_mllm.lit.base.VLMModule.encode_images`)::

    model:
      init_args:
        feature_cache:
          class_path: lit_mllm.data.FeatureCache
          init_args: {root: cache/features, dtype: bfloat16}

**Key.** Everything that changes the features is hashed into the cache key (the module builds it, see
``VLMModule.feature_identity``): the tower's class, its weights (a digest of every tensor of its state dict),
its settings (feature layer, image size, patch, prefix tokens, ...), the normalisation mean/std, the image layout,
the weights' dtype, the autocast dtype and the device type, and the storage dtype and format version here. Each
key has its own folder ``<root>/<key digest>/`` with ``key.json`` (the key in full, readable), so a changed tower
can never read stale features: it reads another folder.

**Entries.** One entry per tower input: ``<image content hash>/<crop index>`` (:func:`image_key`). Images are
identified by a hash of their encoded bytes, whatever the source: a file path, a shard member or bytes in memory
give the same key for the same image; a path + mtime + size key would miss for bytes sources, for a copy of the
data on another node, and would serve stale features for an image rewritten in place within the same second.
Hashing costs ~0.1 ms per 100 kB JPEG in the loader workers, next to several ms of decoding.

**Files.** Entries are written in shards, ``<uuid>.shard``: a header (magic, JSON with the key digest, dtype,
shape ``[N, D]``, entry names and a CRC-32 per entry) and then the features ``[count, N, D]`` raw, read through a
memory map. A shard is written to a hidden temporary file, fsynced and renamed into place, so readers see whole
shards or nothing, and concurrent writers (the arms of a sweep, the ranks of a run) each write their own shards:
no lock is needed and two writers of the same entry only store it twice. A shard whose header, size or key does
not match, or an entry whose CRC fails on its first read, is refused: the whole shard is renamed aside
(``.refused``), warned about, and its entries are computed again and rewritten. Nothing is ever half-used.

Features pass through the storage dtype also on a miss, so a run gives the same results whether the cache was cold
or warm; ``dtype: float32`` stores them exactly (a cached run then equals an uncached one).
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import uuid
import warnings
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor, nn

from lit_mllm.data.sample import ImageRef

FORMAT = 1
"""Version of the shard layout; part of the key, so a new layout starts a new folder."""
MAGIC = b"LMFCACHE"
ALIGN = 64
StorageDtype = Literal["float16", "bfloat16", "float32"]
_TORCH = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
_NUMPY = {"float16": np.float16, "bfloat16": np.uint16, "float32": np.float32}  # bf16 read as its bits


def image_key(ref: ImageRef) -> str:
    """Content key of an image: the BLAKE2b-128 hex digest of its encoded bytes (read from the file for a path)."""
    data = ref if isinstance(ref, bytes) else Path(ref).read_bytes()
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def weights_digest(module: nn.Module) -> str:
    """Digest of every tensor of ``module``'s state dict (names, dtypes, shapes and bytes), in name order."""
    digest = hashlib.blake2b(digest_size=16)
    for name, tensor in sorted(module.state_dict().items()):
        t = tensor.detach().to("cpu").contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().data)
    return digest.hexdigest()


def key_digest(identity: dict[str, Any]) -> str:
    """The folder name of a key: digest of its canonical JSON."""
    return hashlib.blake2b(json.dumps(identity, sort_keys=True).encode(), digest_size=16).hexdigest()


class CacheKeyMismatch(RuntimeError):
    """A cache folder holds another key than the one its name says."""


@dataclass
class _Shard:
    """One shard file, memory-mapped: entries ``[count, N, D]`` and their CRC-32s."""

    path: Path
    data: np.memmap
    crcs: list[int]
    checked: set[int] = field(default_factory=set)
    """Rows whose CRC passed in this process (checked on first read)."""


class _Store:
    """The entries of one key: shards on disk plus entries computed in this process and not written yet."""

    def __init__(self, folder: Path, identity: dict[str, Any], dtype: StorageDtype, shard_bytes: int) -> None:
        self.folder, self.identity, self.dtype, self.shard_bytes = folder, identity, dtype, shard_bytes
        self.digest = folder.name
        folder.mkdir(parents=True, exist_ok=True)
        key_file = folder / "key.json"
        text = json.dumps(identity, sort_keys=True, indent=1)
        if key_file.exists():
            if json.loads(key_file.read_text()) != json.loads(text):
                raise CacheKeyMismatch(
                    f"{key_file} holds another key than its folder's name says; the folder was edited or copied "
                    "by hand: delete it and the features will be computed again"
                )
        else:
            _write_atomic(key_file, text.encode())
        self.index: dict[str, tuple[_Shard, int]] = {}
        self.pending: dict[str, Tensor] = {}  # key -> [N, D] storage dtype, CPU
        self.out_dtype: torch.dtype | None = None  # what the tower returns, restored on reads
        self.opened: set[str] = set()  # shard file names looked at (kept or refused)
        self.refused: list[str] = []
        self.written = 0
        self._stamp: int | None = None
        self.refresh()

    # -- reading --------------------------------------------------------------------------------------------------
    def refresh(self) -> bool:
        """Index shards written since the last look (by this or other processes); whether the folder changed."""
        stamp = os.stat(self.folder).st_mtime_ns
        if stamp == self._stamp:
            return False
        self._stamp = stamp
        for path in sorted(self.folder.glob("*.shard")):
            if path.name not in self.opened:
                self.opened.add(path.name)
                self._open(path)
        return True

    def _open(self, path: Path) -> None:
        try:
            header, offset = read_header(path)
            if header.get("key") != self.digest or header.get("dtype") != self.dtype:
                raise ValueError(f"written for key {header.get('key')} / {header.get('dtype')}")
            count, shape = int(header["count"]), tuple(header["shape"])
            itemsize = np.dtype(_NUMPY[self.dtype]).itemsize
            expected = offset + count * int(np.prod(shape)) * itemsize
            size = path.stat().st_size
            if size != expected or len(header["entries"]) != count or len(header["crc32"]) != count:
                raise ValueError(f"{size} bytes where the header says {expected} (incomplete or truncated)")
            data = np.memmap(path, dtype=_NUMPY[self.dtype], mode="r", offset=offset, shape=(count, *shape))
        except (OSError, ValueError, KeyError, TypeError) as error:
            self._refuse(path, str(error))
            return
        shard = _Shard(path, data, [int(c) for c in header["crc32"]])
        self.out_dtype = self.out_dtype or getattr(torch, header.get("out_dtype", "float32"))
        for row, name in enumerate(header["entries"]):
            self.index.setdefault(name, (shard, row))

    def _refuse(self, path: Path, why: str) -> None:
        """Drop every entry of the shard at ``path`` and rename it aside, so none of it is used again."""
        self.index = {k: v for k, v in self.index.items() if v[0].path != path}
        self.refused.append(path.name)
        warnings.warn(
            f"feature cache: refused {path} ({why}); its entries are computed again and rewritten",
            stacklevel=3,
        )
        try:
            os.replace(path, path.with_suffix(".refused"))
        except OSError:  # another process moved it already
            pass

    def get(self, key: str) -> Tensor | None:
        """The entry ``[N, D]`` (storage dtype, CPU), or None when absent or refused."""
        if key in self.pending:
            return self.pending[key]
        found = self.index.get(key)
        if found is None:
            return None
        shard, row = found
        raw = np.array(shard.data[row])  # a copy: the map may be closed by a refusal later
        if row not in shard.checked:
            if zlib.crc32(raw.view(np.uint8)) != shard.crcs[row]:
                self._refuse(shard.path, f"entry {key} fails its CRC-32")
                return None
            shard.checked.add(row)
        out = torch.from_numpy(raw)
        return out.view(torch.bfloat16) if self.dtype == "bfloat16" else out

    # -- writing --------------------------------------------------------------------------------------------------
    def put(self, key: str, features: Tensor) -> None:
        """Keep an entry ``[N, D]`` (storage dtype, CPU) for this run and write it with the next shard."""
        if key in self.pending or key in self.index:
            return
        self.pending[key] = features
        if sum(t.numel() * t.element_size() for t in self.pending.values()) >= self.shard_bytes:
            self.flush()

    def flush(self) -> None:
        """Write the pending entries as one shard (temporary file, fsync, rename) and index it."""
        if not self.pending:
            return
        names = list(self.pending)
        rows = torch.stack([self.pending[k] for k in names]).contiguous()  # [C, N, D]
        raw = rows.view(torch.uint8).numpy() if self.dtype == "bfloat16" else rows.numpy()
        header = {
            "format": FORMAT,
            "key": self.digest,
            "dtype": self.dtype,
            "out_dtype": str(self.out_dtype or torch.float32).removeprefix("torch."),
            "shape": list(rows.shape[1:]),
            "count": len(names),
            "entries": names,
            "crc32": [zlib.crc32(np.ascontiguousarray(r).view(np.uint8)) for r in raw],
        }
        body = json.dumps(header).encode()
        start = len(MAGIC) + 8 + len(body)
        offset = -(-start // ALIGN) * ALIGN
        name = f"{uuid.uuid4().hex}.shard"
        parts = [MAGIC, struct.pack("<Q", len(body)), body, b"\0" * (offset - start)]
        _write_atomic(self.folder / name, b"".join(parts), raw)
        self.written += len(names)
        self.pending.clear()
        self.opened.add(name)
        self._open(self.folder / name)


def _write_atomic(path: Path, head: bytes, body: np.ndarray | None = None) -> None:
    """Write ``head`` (+ ``body``'s bytes) to a hidden temporary file beside ``path``, fsync, rename into place."""
    tmp = path.with_name(f".tmp-{uuid.uuid4().hex}")
    try:
        with open(tmp, "wb") as f:
            f.write(head)
            if body is not None:
                f.write(memoryview(np.ascontiguousarray(body)).cast("B"))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def read_header(path: Path) -> tuple[dict, int]:
    """(header, data offset) of a shard; ValueError when it is not one."""
    with open(path, "rb") as f:
        head = f.read(len(MAGIC) + 8)
        if len(head) < len(MAGIC) + 8 or head[: len(MAGIC)] != MAGIC:
            raise ValueError("not a feature-cache shard (bad magic)")
        (length,) = struct.unpack("<Q", head[len(MAGIC) :])
        body = f.read(length)
    if len(body) != length:
        raise ValueError("header cut short")
    header = json.loads(body)
    if header.get("format") != FORMAT:
        raise ValueError(f"format {header.get('format')}, this version reads {FORMAT}")
    start = len(MAGIC) + 8 + length
    return header, -(-start // ALIGN) * ALIGN


@dataclass
class CacheCounts:
    """Tower inputs served from the cache (``hits``) and computed by the tower (``misses``)."""

    hits: int = 0
    misses: int = 0

    @property
    def served(self) -> float:
        """Fraction of tower inputs the cache served."""
        total = self.hits + self.misses
        return self.hits / total if total else 0.0

    def __str__(self) -> str:
        return (
            f"{self.hits} of {self.hits + self.misses} tower inputs from the cache ({self.misses} computed)"
        )


class FeatureCache:
    """On-disk, memory-mapped cache of a frozen vision tower's features ``[N, D]`` per tower input (module
    docstring). The family module asks it for a batch's features with :meth:`features`."""

    def __init__(self, root: str, dtype: StorageDtype = "bfloat16", shard_mib: int = 256) -> None:
        """
        Args:
            root: Folder of the cache; each key gets a sub-folder, so one root serves every tower and resolution
                of a sweep (point the arms at the same root).
            dtype: Storage dtype: ``bfloat16`` (the range of float32, 8 bits of mantissa), ``float16`` (finer, but
                features beyond +-65504 are refused) or ``float32`` (exact; twice the disk).
            shard_mib: Entries computed in this process are written as a shard once they reach this size (and at
                every epoch's end).
        """
        if dtype not in _TORCH:
            raise ValueError(f"dtype must be one of {sorted(_TORCH)}, got {dtype!r}")
        if shard_mib < 1:
            raise ValueError(f"shard_mib must be >= 1, got {shard_mib}")
        self.root = Path(root)
        self.dtype = dtype
        self.shard_bytes = shard_mib * 2**20
        self.run = CacheCounts()
        """Counts since the cache was built."""
        self.epoch = CacheCounts()
        """Counts since the last :meth:`take_epoch`."""
        self._stores: dict[str, _Store] = {}

    def __getstate__(self) -> dict:  # memory maps are reopened after a copy or a pickle
        return {**self.__dict__, "_stores": {}}

    def store(self, identity: dict[str, Any]) -> _Store:
        """The store of ``identity`` (the key without the storage fields), opened on first use."""
        identity = {**identity, "storage_dtype": self.dtype, "format": FORMAT}
        digest = key_digest(identity)
        if digest not in self._stores:
            self._stores[digest] = _Store(self.root / digest, identity, self.dtype, self.shard_bytes)
        return self._stores[digest]

    def features(
        self,
        identity: dict[str, Any],
        pixel_values: Tensor,
        keys: list[str],
        compute: Callable[[Tensor], Tensor],
    ) -> Tensor:
        """Features ``[I, N, D]`` of ``pixel_values [I, 3, S, S]`` whose entries are named ``keys`` (one per tower
        input): read where cached, ``compute`` (the tower) run on the others only, which are then cached. The
        result is on the pixels' device, in the dtype the tower returns, rounded to the storage dtype."""
        if len(keys) != pixel_values.shape[0]:
            raise ValueError(f"{len(keys)} cache keys for {pixel_values.shape[0]} tower inputs")
        store = self.store(identity)
        found = [store.get(k) for k in keys]
        if None in found and store.refresh():  # other processes may have written them meanwhile
            found = [f if f is not None else store.get(k) for f, k in zip(found, keys)]
        missing = [i for i, f in enumerate(found) if f is None]
        if missing:
            computed = compute(pixel_values[missing])  # [M, N, D]
            store.out_dtype = computed.dtype
            rounded = computed.detach().to("cpu", _TORCH[self.dtype])
            if not torch.isfinite(rounded).all() and torch.isfinite(computed).all():
                raise OverflowError(
                    f"tower features reach {computed.abs().max().item():.4g}, beyond {self.dtype}'s range; "
                    "use feature_cache dtype: bfloat16 (or float32)"
                )
            for j, i in enumerate(missing):
                found[i] = rounded[j].clone()
                store.put(keys[i], found[i])
        for counts in (self.run, self.epoch):
            counts.hits += len(keys) - len(missing)
            counts.misses += len(missing)
        out_dtype = store.out_dtype or torch.float32
        return torch.stack(found).to(pixel_values.device, out_dtype)  # [I, N, D]

    def flush(self) -> None:
        """Write every entry computed and not yet written (the module calls it at each epoch's end and teardown)."""
        for store in self._stores.values():
            store.flush()

    def take_epoch(self) -> CacheCounts:
        """The counts since the last call, reset."""
        counts, self.epoch = self.epoch, CacheCounts()
        return counts

    def describe(self) -> str:
        """Where the cache is and what it held, for the run log."""
        if not self._stores:
            return f"feature cache at {self.root}: not used (no batch carried image keys)"
        stores = ", ".join(
            f"{s.folder} ({len(s.index)} entries on disk, {s.written} written by this process"
            + (f", refused {s.refused}" if s.refused else "")
            + ")"
            for s in self._stores.values()
        )
        return f"feature cache ({self.dtype}) {stores}"
