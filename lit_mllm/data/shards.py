"""Streaming shards: any source written once into litdata-optimised chunks and read back by index, from a local
folder or from object storage, so a run that outgrows a shared filesystem streams the same samples.

``lit-mllm data optimize --config FILE --out DIR`` (:func:`optimize_splits`) writes each source of a config's
splits into ``DIR/<split>/<source>/`` with :func:`write_shards`, and ``DIR/data.yaml``, a data config naming the
shards (stack it after the run's config: ``--config FILE --config DIR/data.yaml``). :class:`StreamingShards`
reads such a folder (a path, or a URL ``s3://`` / ``gs://`` / ``azure://`` / ``r2://``; ``local:/abs/path``
reads a local folder as object storage, through a cache folder) with litdata's ``StreamingDataset``.

Each stored record is the canonical :class:`~lit_mllm.data.Sample` the original source gives for that index
(turns or document text, the images' encoded bytes, references, meta), as a JSON text plus the concatenated image
bytes; record ``i`` of the shards is record ``i`` of the source. The mixture plan asks ``sample(i)`` by index,
and that is all the shards answer: litdata's own iteration, shuffling and rank/worker splitting are never used,
so which records a rank and a loader worker read, in which order, and where a resumed run continues, are the
plan's (:mod:`lit_mllm.data.mixture`), exactly as for the original files.

A record the source cannot give (a :class:`~lit_mllm.data.DataError`, or an image file missing when written) is
kept by default as a bad record that raises the same error, with the same reason, when drawn: the plan's indices
stay the original's and the run's ``on_bad_sample`` policy counts it as it would have. ``on_bad_record: drop``
leaves it out instead (the indices then shift) and ``fail`` stops at the first; either way every bad record is
counted per reason and reported.

A folder is taken only once it is finished: everything is written beside the destination and renamed into place
at the end, and the manifest ``lit_mllm.json`` (format, record count, image placeholder, bad records per
reason) must be there and agree with litdata's index. litdata is an optional dependency: ``pip install
'lit-mllm[stream]'``.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from lit_mllm.data.sample import REASONS, DataError, Sample
from lit_mllm.data.sources import Source
from lit_mllm.nn.language.chat import Turn

FORMAT = "lit_mllm.shards/1"
"""The stored record's layout, written in every manifest; a reader refuses another."""
MANIFEST = "lit_mllm.json"
"""The file beside litdata's ``index.json`` that says the folder is finished and what it holds."""
DATA_CONFIG = "data.yaml"
"""The data config :func:`optimize_splits` writes at the top of its output."""
URL_SCHEMES = ("s3://", "gs://", "azure://", "r2://", "hf://", "local:")
"""Locations litdata streams through a cache folder (``local:`` is a local folder read the same way)."""
SPLITS = ("train", "val", "test", "predict")
"""The ``MixtureData`` arguments :func:`optimize_splits` can write (``predict``: only when asked)."""
OnBadRecord = Literal["keep", "drop", "fail"]


def _litdata():
    """litdata's module, or an error saying how to install it."""
    try:
        import litdata
    except ImportError:
        raise ImportError(
            "streaming shards need litdata: pip install 'lit-mllm[stream]' (or pip install litdata)"
        ) from None
    return litdata


def is_url(path: str) -> bool:
    """Whether ``path`` names object storage (or ``local:``) rather than a folder under the data root."""
    return path.startswith(URL_SCHEMES)


# -- one record ---------------------------------------------------------------------------------------------------
def encode(sample: Sample) -> dict:
    """The stored item of a good sample: ``{"record": JSON text, "images": the images' bytes, concatenated}``.
    Every image must be bytes already (:func:`_with_image_bytes`)."""
    record = {
        "id": sample.id,
        "where": sample.where,
        "turns": [{"role": t.role, "text": t.text} for t in sample.turns],
        "text": sample.text,
        "references": sample.references,
        "meta": sample.meta,
        "image_sizes": [len(im) for im in sample.images],
        "error": None,
    }
    return {"record": json.dumps(record, ensure_ascii=False), "images": b"".join(sample.images)}


def encode_error(error: DataError) -> dict:
    """The stored item of a bad record: drawing it raises ``error`` again (same message, same reason)."""
    record = {"error": {"reason": error.reason, "message": str(error)}}
    return {"record": json.dumps(record, ensure_ascii=False), "images": b""}


def decode(item: dict, where: str) -> Sample:
    """The sample of a stored item (``where``: the shard record, for messages); a bad record raises its error."""
    record = json.loads(item["record"])
    error = record.get("error")
    if error:
        raise DataError(error["message"], error["reason"])
    blob, images, start = bytes(item["images"]), [], 0
    for size in record["image_sizes"]:
        images.append(blob[start : start + size])
        start += size
    return Sample(
        id=record["id"],
        turns=[Turn(t["role"], t["text"]) for t in record["turns"]],
        images=images,
        where=f"{where} (written from {record['where']})",
        text=record["text"],
        references=record["references"],
        meta=record["meta"],
    )


def _with_image_bytes(sample: Sample) -> Sample:
    """``sample`` with every image path replaced by the file's bytes; a file that cannot be read raises the
    :class:`DataError` a run would (``missing_file``, or ``undecodable_image`` for a path that is no file)."""
    images = []
    for k, ref in enumerate(sample.images):
        if isinstance(ref, bytes):
            images.append(ref)
            continue
        try:
            images.append(Path(ref).read_bytes())
        except FileNotFoundError:
            raise sample.fail(f"image file not found: {ref}", "missing_file") from None
        except OSError as e:
            raise sample.fail(f"could not decode {sample.image_name(k)}: {e}", "undecodable_image") from None
    sample.images = images
    return sample


# -- writing ------------------------------------------------------------------------------------------------------
@dataclass
class ShardReport:
    """What :func:`write_shards` wrote for one source."""

    name: str
    """The source's name (``train/instruct``)."""
    records: int = 0
    """Records the source has."""
    written: int = 0
    """Records written (bad ones kept as bad records included)."""
    bad: Counter = field(default_factory=Counter)
    """Bad records per reason (kept or dropped)."""
    examples: dict[str, str] = field(default_factory=dict)
    """The first bad record's message per reason."""
    on_bad_record: str = "keep"

    def lines(self) -> list[str]:
        """The report as console lines: counts, then one line per reason with an example."""
        bad = sum(self.bad.values())
        fate = {"keep": "kept as bad records (a run counts them)", "drop": "dropped"}.get(
            self.on_bad_record, ""
        )
        head = f"{self.name}: {self.written} of {self.records} records written"
        head += f"; {bad} bad, {fate}:" if bad else "; no bad record"
        rows = [f"  {r:<18} {self.bad[r]:>6}  {self.examples[r][:150]}" for r in REASONS if self.bad[r]]
        return [head, *rows]


def write_shards(
    source: Source,
    out: str | Path,
    image_token: str,
    name: str = "",
    chunk_bytes: str | int = "64MB",
    on_bad_record: OnBadRecord = "keep",
    progress: bool = True,
) -> ShardReport:
    """Write every record of an opened ``source`` (in index order) into the folder ``out``, which must not exist.

    The folder appears only when finished (written beside it, then renamed): litdata's chunks and ``index.json``
    and the manifest. ``image_token`` is the placeholder of the model the samples are read for (the reader
    refuses another). Bad records follow ``on_bad_record`` (see the module docstring); a record that cannot be
    written for another reason (a bug) stops the writing and leaves nothing behind."""
    if on_bad_record not in ("keep", "drop", "fail"):
        raise ValueError(f"on_bad_record must be 'keep', 'drop' or 'fail', got {on_bad_record!r}")
    out = Path(out)
    if out.exists():
        raise FileExistsError(f"{out} exists; write the shards into a new folder")
    from litdata.streaming.writer import BinaryWriter
    from tqdm import tqdm

    report = ShardReport(name or str(out), records=len(source), on_bad_record=on_bad_record)
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.parent / f".{out.name}.partial-{uuid.uuid4().hex[:8]}"
    try:
        writer = BinaryWriter(str(partial), chunk_bytes=chunk_bytes)
        for i in tqdm(range(len(source)), desc=report.name, disable=not progress, unit="rec"):
            try:
                item = encode(_with_image_bytes(source.sample(i, image_token)))
            except DataError as e:
                report.bad[e.reason] += 1
                report.examples.setdefault(e.reason, str(e))
                if on_bad_record == "fail":
                    raise DataError(
                        f"[{report.name}] {e}\n(on_bad_record is 'fail'; 'keep' writes such records as bad records "
                        "a run counts, 'drop' leaves them out)",
                        e.reason,
                    ) from None
                if on_bad_record == "drop":
                    continue
                item = encode_error(e)
            writer[report.written] = item
            report.written += 1
        if report.written == 0:
            raise DataError(f"[{report.name}] no record to write: all {report.records} were bad or dropped")
        writer.done()
        writer.merge()
        manifest = {
            "format": FORMAT,
            "records": report.written,
            "image_token": image_token,
            "source": {"name": report.name, "class": type(source).__name__, "path": source.path},
            "source_records": report.records,
            "bad": dict(report.bad),
            "on_bad_record": on_bad_record,
        }
        (partial / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
        os.rename(partial, out)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return report


def optimize_splits(
    splits: dict[str, dict[str, Source]],
    out: str | Path,
    image_token: str,
    chunk_bytes: str | int = "64MB",
    on_bad_record: OnBadRecord = "keep",
    remote: str | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> list[ShardReport]:
    """Write the opened sources of each split (``{"train": {"instruct": source, ...}, "val": ...}``) into
    ``out/<split>/<name>/`` and ``out/data.yaml``, the data config that reads them (training weights kept).

    The whole output appears at once when every source is written; ``overwrite`` replaces an existing ``out``
    only then. ``remote``: the URL the folder will be uploaded to; ``data.yaml`` then names each source by its
    URL there (``{remote}/train/instruct``) instead of by its path under ``out``."""
    import yaml

    out = Path(out)
    unknown = sorted(set(splits) - set(SPLITS))
    if unknown:
        raise ValueError(f"unknown split(s) {unknown}; the splits are {list(SPLITS)}")
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists; give a new folder, or --overwrite to replace it once done")
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.parent / f".{out.name}.partial-{uuid.uuid4().hex[:8]}"
    partial.mkdir()
    reports = []
    try:
        data: dict = {"root": str(out.resolve())}
        for split, sources in splits.items():
            entries = {}
            for name, source in sources.items():
                reports.append(
                    write_shards(
                        source,
                        partial / split / name,
                        image_token,
                        f"{split}/{name}",
                        chunk_bytes,
                        on_bad_record,
                        progress,
                    )
                )
                location = f"{remote.rstrip('/')}/{split}/{name}" if remote else f"{split}/{name}"
                args: dict = {"path": location}
                if split == "train":
                    args["weight"] = source.weight
                entries[name] = {"class_path": "lit_mllm.data.StreamingShards", "init_args": args}
            data[split] = entries
        config = {"data": {"class_path": "lit_mllm.data.MixtureData", "init_args": data}}
        header = (
            "# Written by `lit-mllm data optimize`: the shards of this folder as a data config. Stack it after the\n"
            "# run's config (a source of the same name switches to its shards):\n"
            f"#   lit-mllm fit --config RUN.yaml --config {out / DATA_CONFIG}\n"
        )
        (partial / DATA_CONFIG).write_text(header + yaml.safe_dump(config, sort_keys=False))
        old = None
        if out.exists():
            old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
            os.rename(out, old)
        os.rename(partial, out)
        if old is not None:
            shutil.rmtree(old)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return reports


# -- reading ------------------------------------------------------------------------------------------------------
class StreamingShards(Source):
    """A source written by ``lit-mllm data optimize`` (litdata-optimised chunks), read by index through litdata's
    ``StreamingDataset``: record ``i`` is the sample the original source gave for ``i``.

    ``path`` is a folder under the DataModule's ``root`` (or absolute, or ``file://``), or a URL: ``s3://``,
    ``gs://``, ``azure://``, ``r2://``, or ``local:/abs/folder`` (a local folder read as object storage is). From
    a URL the index is copied into ``cache_dir`` and each record is fetched as a byte range (S3, R2) or from
    its chunk, copied into ``cache_dir`` once (the other stores). Only ``sample(i)`` is used: the mixture plan
    chooses the indices of every rank and worker, so litdata's own shuffling and splitting never apply."""

    def __init__(
        self,
        path: str,
        weight: float = 1.0,
        cache_dir: str | None = None,
        storage_options: dict | None = None,
    ) -> None:
        """
        Args:
            path: The shard folder (under ``root``, absolute, or ``file://``) or its URL (``s3://bucket/x/train/
                instruct``; ``local:/abs/folder`` stands in for object storage).
            weight: Share of this source in a training mixture.
            cache_dir: For a URL, the local folder litdata keeps the index and fetched chunks in; default
                litdata's own.
            storage_options: For a URL, litdata's connection options (credentials, ``endpoint_url``, ...).
        """
        super().__init__(path, weight)
        self.cache_dir, self.storage_options = cache_dir, storage_options
        self.manifest: dict = {}
        self._dataset, self._pid = None, None

    @property
    def location(self) -> str:
        """Where the shards are: the URL, or the local folder."""
        if is_url(self.path):
            return self.path
        if self.path.startswith("file://"):
            return self.path[len("file://") :]
        return str(self.root / self.path)

    def _read_manifest(self) -> dict:
        location = self.location
        if is_url(location):
            from litdata.streaming.downloader import get_downloader

            with tempfile.TemporaryDirectory() as tmp:
                local = os.path.join(tmp, MANIFEST)
                try:
                    get_downloader(location, tmp, [], self.storage_options).download_file(
                        f"{location.rstrip('/')}/{MANIFEST}", local
                    )
                    text = Path(local).read_text()
                except Exception as e:  # each store's client raises its own error types
                    raise DataError(
                        f"{location}: no {MANIFEST} could be read ({type(e).__name__}: {e}); is it a finished, "
                        "fully uploaded `lit-mllm data optimize` folder?",
                        "missing_file",
                    ) from None
        else:
            folder = Path(location)
            if not folder.is_dir():
                raise DataError(
                    f"{folder}: no such shard folder (source path {self.path!r}, root {self.root}); write it with "
                    "`lit-mllm data optimize --config FILE --out DIR`",
                    "missing_file",
                )
            if not (folder / MANIFEST).is_file():
                raise DataError(
                    f"{folder}: no {MANIFEST}, so not a finished `lit-mllm data optimize` folder (a partial "
                    "output, or shards written by something else); write it again",
                    "missing_file",
                )
            text = (folder / MANIFEST).read_text()
        manifest = json.loads(text)
        if manifest.get("format") != FORMAT:
            raise DataError(
                f"{location}: shards of format {manifest.get('format')!r}, this version reads {FORMAT!r}; write "
                "them again with this version's `lit-mllm data optimize`"
            )
        return manifest

    def _streaming(self):
        """This process's ``StreamingDataset`` (one per process: a loader worker builds its own, so no client,
        memory map or thread crosses a fork)."""
        if self._dataset is None or self._pid != os.getpid():
            litdata = _litdata()
            self._dataset = litdata.StreamingDataset(
                self.location,
                cache_dir=self.cache_dir,
                shuffle=False,
                storage_options=self.storage_options,
                batch_decode=0,  # random access: decode the one record asked for
            )
            self._pid = os.getpid()
        return self._dataset

    def _index(self) -> int:
        _litdata()
        self.manifest = self._read_manifest()
        try:
            dataset = self._streaming()
        except (ValueError, FileNotFoundError) as e:
            raise DataError(
                f"{self.location}: litdata cannot read these shards: {e}", "missing_file"
            ) from None
        # the whole index: len(dataset) is litdata's share of one rank (the plan does the splitting here)
        size = sum(end - begin for begin, end in dataset.region_of_interest)
        if size != self.manifest["records"]:
            raise DataError(
                f"{self.location}: litdata's index holds {size} records but {MANIFEST} says "
                f"{self.manifest['records']}: a partial copy or upload; copy the finished folder again"
            )
        return size

    def sample(self, i: int, image_token: str) -> Sample:
        if image_token != self.manifest["image_token"]:
            raise ValueError(
                f"{self.location} was written for the image placeholder {self.manifest['image_token']!r}, this "
                f"model uses {image_token!r}; write the shards again with this model's config"
            )
        return decode(self._streaming()[i], f"{self.location} record {i}")

    def __getstate__(self) -> dict:
        """Pickled without the ``StreamingDataset`` (each process opens its own)."""
        return {**self.__dict__, "_dataset": None, "_pid": None}
