"""The DataModule: named sources per split, mixed by weight for training, with a bad-sample policy.

    data:
      class_path: lit_mllm.data.MixtureData
      init_args:
        root: data/shapesworld
        train:
          instruct: {class_path: lit_mllm.data.Conversations, init_args: {path: train.json, weight: 45}}
          captions: {class_path: lit_mllm.data.Captions, init_args: {path: captions_train, weight: 45}}
          text: {class_path: lit_mllm.data.TextOnly, init_args: {path: text_train.jsonl, weight: 10}}
        val:
          instruct: {class_path: lit_mllm.data.Conversations, init_args: {path: val.json}}

Training batches come from a :class:`~lit_mllm.data.mixture.Mixture` plan (deterministic in seed, epoch,
rank; resumable mid-epoch: the plan position and the running counts are the DataModule's checkpoint state).
Loader workers parse, tokenize, decode and collate whole batches (padded, or packed with ``pack_length``).
Every batch carries its samples' sources; the module logs ``train/loss/<source>``, the realised
``data/ratio/<source>`` and ``data/skipped/<reason>``.

Bad samples (the reasons of :data:`~lit_mllm.data.sample.Reason`: missing or undecodable image, missing caption,
placeholder/image mismatch, box outside its image, no supervised token, too long after image expansion, malformed
record): ``on_bad_sample: fail`` stops at the first, naming it; ``skip`` drops it from its batch (never replaced
by another sample), counts it per reason, and stops the run once the bad fraction exceeds ``max_bad_fraction``
(:func:`over_budget`: at the end of every epoch whatever the count, and after any batch once
``MIN_SEEN_FOR_FRACTION`` samples were seen). Skips are printed per reason (count, an example) at each epoch end
and at the end of the run, and ``data/skipped/<reason>`` is logged at each epoch end whatever the logging
interval. ``lit-mllm validate-data --config FILE`` scans everything beforehand and applies the same rule to the
first epoch's plan.

The model is connected at run time: ``connect(processor)`` hands over the tokenizer, chat format, image
transform and image-token count, so nothing the model determines is written twice in YAML.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Literal, Protocol, runtime_checkable

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, get_worker_info

from lit_mllm.data.batch import Batch, LoaderReport
from lit_mllm.data.collate import collate
from lit_mllm.data.mixture import Mixture
from lit_mllm.data.processor import Processor
from lit_mllm.data.sample import REASONS, DataError, Sample
from lit_mllm.data.sources import Conversations, Source

MIN_SEEN_FOR_FRACTION = 100
"""Before an epoch ends the bad fraction is checked once this many training samples were seen (a first bad
sample is not 100%); at the end of an epoch it is checked whatever the count."""
SPLIT_KEYS = {"fit": "train", "validate": "val", "test": "test", "predict": "predict"}
"""The ``MixtureData`` argument holding each split's sources (for messages: ``data.train.<source>``)."""


def over_budget(seen: int, bad: int, max_bad_fraction: float, epoch_end: bool) -> bool:
    """The bad-sample rule of a run under ``on_bad_sample: skip`` (``validate-data`` applies the same): stop when
    more than ``max_bad_fraction`` of the ``seen`` training samples were bad, judged at the end of an epoch
    whatever the count, and before that once ``MIN_SEEN_FOR_FRACTION`` samples were seen."""
    return (epoch_end or seen >= MIN_SEEN_FOR_FRACTION) and bad > max_bad_fraction * seen


def skip_table(counts: dict[str, int], examples: dict[str, str], width: int = 160) -> str:
    """One line per reason with skipped samples: the reason, its count and an example message (``examples``
    may lack a reason)."""
    lines = []
    for reason in REASONS:
        if counts.get(reason):
            example = examples.get(reason, "")
            example = example if len(example) <= width else example[: width - 3] + "..."
            lines.append(f"  {reason:<18} {counts[reason]:>6}  {example}".rstrip())
    return "\n".join(lines)


@runtime_checkable
class DatasetGenerator(Protocol):
    """Anything with ``write(root)`` that writes a dataset folder (the sources' files + images)."""

    def write(self, root: Path) -> None:
        """Write the dataset into ``root`` (which does not exist yet)."""


class SampleLoader:
    """Parses and processes drawn records under the bad-sample policy: what the training stream, the evaluation
    datasets, ``lit-mllm validate-data`` and ``lit-mllm score-data`` read samples through.

    ``split`` decides the form: ``predict`` gives prompt-only samples; ``validate``/``test`` add the prompt-only
    form when the processor asks for it (generation metrics)."""

    def __init__(self, sources: dict[str, Source], processor: Processor, policy: str, split: str) -> None:
        self.sources, self.processor, self.policy = sources, processor, policy
        self.for_generation = split == "predict"
        self.with_prompt = split in ("validate", "test") and processor.eval_prompts

    def item(self, name: str, index: int) -> dict:
        """A processed sample, or ``{"skipped": reason, "message": ...}`` under the skip policy."""
        try:
            sample = self.sources[name].sample(index, self.processor.image_token)
            sample.source = name
            return self.processor(sample, self.for_generation, self.with_prompt)
        except DataError as e:
            if self.policy == "fail":
                raise DataError(
                    f"[source {name!r}] {e}\n(data.on_bad_sample is 'fail'; 'skip' drops and counts such samples, "
                    "`lit-mllm validate-data --config ...` lists them all)",
                    e.reason,
                ) from None
            return {"skipped": e.reason, "message": f"[source {name!r}] {e}"}

    def batch(self, items: list[dict], **collate_kwargs) -> tuple[Batch, LoaderReport]:
        """The batch of the good items and the report of the bad ones."""
        bad = [it for it in items if "skipped" in it]
        batch = collate([it for it in items if "skipped" not in it], **collate_kwargs)
        skipped = Counter(it["skipped"] for it in bad)
        order = {reason: k for k, reason in enumerate(skipped)}
        report = LoaderReport(
            seen=len(items),
            skipped=skipped,
            messages=[it["message"] for it in sorted(bad, key=lambda it: order[it["skipped"]])],
        )
        return batch, report


class MixtureStream(IterableDataset):
    """This rank's training batches of one epoch, built in the loader workers (worker ``w`` of ``W`` builds
    batches ``w, w + W, ...``, which the DataLoader yields in order).

    The pass's epoch and first batch (:meth:`set_pass`) live in shared memory: the workers persist across epochs
    (no fork of the training process per epoch) and read both when a pass starts."""

    def __init__(
        self, loader: SampleLoader, mixture: Mixture, rank: int, world_size: int, collate_kwargs: dict
    ) -> None:
        self.loader, self.mixture, self.collate_kwargs = loader, mixture, collate_kwargs
        self.rank, self.world_size = rank, world_size
        self._pass = torch.zeros(2, dtype=torch.long).share_memory_()  # (epoch, start)

    def set_pass(self, epoch: int, start: int = 0) -> None:
        """The next pass is epoch ``epoch`` from its batch ``start`` (a resume's position)."""
        self._pass[0], self._pass[1] = epoch, start

    def __len__(self) -> int:
        return self.mixture.num_batches(self.world_size)

    def __iter__(self) -> Iterator[tuple[Batch, LoaderReport]]:
        info = get_worker_info()
        worker, workers = (0, 1) if info is None else (info.id, info.num_workers)
        epoch, start = self._pass.tolist()
        plan = self.mixture.batches(epoch, self.rank, self.world_size)
        for k in range(start + worker, len(plan), workers):
            batch, report = self.loader.batch(
                [self.loader.item(n, i) for n, i in plan[k]], **self.collate_kwargs
            )
            report.position = (epoch, k)
            yield batch, report


def _as_is(batch: tuple[Batch, LoaderReport]) -> tuple[Batch, LoaderReport]:
    """Batches are collated in the workers; torch's default conversion would re-add Counter values."""
    return batch


class _OnFirstNext:
    """An iterator built by ``make()`` when its first item is asked for, not when it is created."""

    def __init__(self, make: Callable[[], Iterator]) -> None:
        self.make, self.iterator = make, None

    def __iter__(self) -> _OnFirstNext:
        return self

    def __next__(self):
        if self.iterator is None:
            self.iterator = self.make()
        return next(self.iterator)


class _EpochLoader(DataLoader):
    """Sets the stream's epoch (and resume position) before each pass; Lightning does not do this for
    iterable datasets.

    Both are read when the pass's first batch is asked for, not when Lightning calls ``iter()``: a module whose
    ``configure_optimizers`` asks for ``trainer.estimated_stepping_batches`` (a schedule spanning the run) makes
    Lightning build the loader and call ``iter()`` before a checkpoint's loops are restored, when
    ``trainer.current_epoch`` still reads 0. The plan position itself is the DataModule's checkpoint state
    (:meth:`MixtureData.state_dict`), which Lightning restores before training in every order; a loader's own
    state it loads only when it builds the loader after restoring the loops, which that early build prevents."""

    def __init__(self, stream: MixtureStream, datamodule: MixtureData, **kwargs) -> None:
        workers = kwargs.get("num_workers", 0) > 0
        super().__init__(stream, batch_size=None, collate_fn=_as_is, persistent_workers=workers, **kwargs)
        self.datamodule = datamodule

    def __iter__(self) -> Iterator[tuple[Batch, LoaderReport]]:
        return _OnFirstNext(self._start_pass)

    def _start_pass(self) -> Iterator[tuple[Batch, LoaderReport]]:
        trainer = self.datamodule.trainer
        epoch = trainer.current_epoch if trainer is not None else 0
        resume = self.datamodule.resume_at
        self.dataset.set_pass(epoch, resume[1] if resume is not None and resume[0] == epoch else 0)
        self.datamodule.resume_at = None
        return DataLoader.__iter__(self)

    def state_dict(self) -> dict:
        """Empty: the DataModule's checkpoint state holds the position. Being stateful tells Lightning that a
        mid-epoch resume continues where it stopped (it warns otherwise)."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        """A checkpoint written when the loader held the position (before it moved to the DataModule)."""
        if state:
            self.datamodule.load_plan_state(state)


class EvalDataset(Dataset):
    """Every record of the split's sources once, in order (source by source)."""

    def __init__(self, loader: SampleLoader) -> None:
        self.loader = loader
        self.index = [(n, i) for n, s in loader.sources.items() for i in range(len(s))]

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> dict:
        return self.loader.item(*self.index[i])


class MixtureData(L.LightningDataModule):
    """Named sources per split (``train`` mixed by weight; ``val``/``test``/``predict`` read once, in order)."""

    def __init__(
        self,
        root: str,
        train: dict[str, Source] | None = None,
        val: dict[str, Source] | None = None,
        test: dict[str, Source] | None = None,
        predict: dict[str, Source] | None = None,
        batch_size: int = 8,
        eval_batch_size: int | None = None,
        num_workers: int = 2,
        max_length: int | None = None,
        pack_length: int | None = None,
        samples_per_epoch: int | None = None,
        stratified: bool = False,
        seed: int = 0,
        on_bad_sample: Literal["fail", "skip"] = "fail",
        max_bad_fraction: float = 0.01,
        generate_if_missing: DatasetGenerator | None = None,
    ) -> None:
        """
        Args:
            root: Folder the sources' relative paths resolve against.
            train: Training sources keyed by name, each with its mixture ``weight``.
            val: Validation sources keyed by name (every record once); None = no validation.
            test: Test sources keyed by name.
            predict: Sources whose last assistant turns ``predict`` generates; default: the test sources.
            batch_size: Samples per training batch (per rank).
            eval_batch_size: Samples per val/test/predict batch; default ``batch_size``.
            num_workers: Loader worker processes (parsing, tokenization, image decoding and collation run there);
                they start once per run and serve every epoch.
            max_length: Longest allowed sample after image expansion; default the LLM's context length.
            pack_length: Pack each training batch's samples into rows of at most this many tokens (positions
                restart per sample, attention never crosses samples); None pads each sample to the batch's longest.
            samples_per_epoch: Samples drawn per epoch over all ranks; default the sum of the training sources' sizes.
            stratified: Every training batch holds the mixture ratio (within one sample); default: i.i.d. draws.
            seed: Seed of the mixture plan (with the epoch; the rank picks its share of the plan).
            on_bad_sample: ``fail`` stops at the first bad sample naming it; ``skip`` drops and counts it by reason.
            max_bad_fraction: Under ``skip``, stop once more than this fraction of the training samples seen was
                bad (checked at the end of each epoch, and after every batch once 100 samples were seen).
            generate_if_missing: A generator that writes the dataset into ``root`` when ``root`` does not exist
                (it never writes into an existing folder, even an empty one).
        """
        super().__init__()
        self.root = Path(root)
        self.splits = {"fit": train or {}, "validate": val or {}, "test": test or {}}
        self.splits["predict"] = predict if predict is not None else self.splits["test"]
        for split, sources in self.splits.items():
            for name in sources:
                if not name or "/" in name:
                    raise ValueError(f"{split} source name {name!r} must be non-empty and hold no '/'")
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers, self.max_length, self.pack_length = num_workers, max_length, pack_length
        self.samples_per_epoch, self.stratified, self.seed = samples_per_epoch, stratified, seed
        if not 0 <= max_bad_fraction <= 1:
            raise ValueError(f"max_bad_fraction must be in [0, 1], got {max_bad_fraction}")
        self.on_bad_sample, self.max_bad_fraction = on_bad_sample, max_bad_fraction
        self.generator = generate_if_missing
        self.processor: Processor | None = None
        self.resume_at: tuple[int, int] | None = None
        self.position: tuple[int, int] | None = None
        self.counts: Counter = Counter()  # training samples seen / per source / skipped per reason
        self.examples: dict[str, str] = {}  # reason -> the first skipped sample's message (this process)
        self._logged_step: int | None = None
        self._plan_batches: int | None = None  # this rank's batches per epoch
        self._summarised_seen = 0  # samples seen when skips were last printed

    # -- wiring -----------------------------------------------------------------------------------------------
    def connect(self, processor: Processor) -> None:
        """Receive the model's processor; ``max_length`` here (if set) overrides the LLM's context length."""
        if self.max_length is not None:
            if processor.max_length is not None and self.max_length > processor.max_length:
                raise ValueError(
                    f"data.max_length={self.max_length} exceeds the language model's context of "
                    f"{processor.max_length} tokens"
                )
            processor.max_length = self.max_length
        if self.pack_length is not None and processor.max_length is not None:
            if self.pack_length > processor.max_length:
                raise ValueError(
                    f"data.pack_length={self.pack_length} exceeds the longest sequence the model takes "
                    f"({processor.max_length}); lower pack_length"
                )
        self.processor = processor

    def prepare_data(self) -> None:
        """Write the generator's dataset when ``root`` does not exist; say why not when ``root`` is empty."""
        if self.generator is None:
            return
        if not self.root.exists():
            try:
                self.generator.write(self.root)
            except FileExistsError:  # another run (a sweep's parallel arm) wrote it since the check above
                if not self.root.exists():
                    raise
        elif self._empty_root():
            print(self._empty_root_note(), flush=True)

    def _empty_root(self) -> bool:
        return self.root.is_dir() and not any(self.root.iterdir())

    def _empty_root_note(self) -> str:
        return (
            f"data.root {self.root} exists but is empty, so data.generate_if_missing "
            f"({type(self.generator).__name__}) wrote nothing: it writes only a folder that does not exist yet; "
            "remove the empty folder (or point data.root elsewhere) to have the dataset generated there"
        )

    def open_sources(self, split: str) -> tuple[dict[str, Source], dict[str, DataError]]:
        """The split's active sources opened (indexed) once, and those that cannot be opened with the error that
        names them (``data.train.<name>``, the path, what to do); a training source of weight 0 is switched off
        (not opened)."""
        opened, failed = {}, {}
        for name, source in self.splits[split].items():
            if split == "fit" and source.weight <= 0:
                continue
            if source._size is None:
                try:
                    source.open(self.root)
                except (DataError, OSError) as e:
                    reason = e.reason if isinstance(e, DataError) else "missing_file"
                    note = f"; {self._empty_root_note()}" if self.generator and self._empty_root() else ""
                    failed[name] = DataError(
                        f"data.{SPLIT_KEYS[split]}.{name} ({type(source).__name__}) cannot be opened: {e}{note}",
                        reason,
                    )
                    continue
            opened[name] = source
        return opened, failed

    def sources(self, split: str) -> dict[str, Source]:
        """The split's sources (``fit``, ``validate``, ``test``, ``predict``), opened (indexed) once; a training
        source of weight 0 is switched off (not opened). Raises the first :class:`DataError` of a source that
        cannot be opened."""
        opened, failed = self.open_sources(split)
        if failed:
            raise next(iter(failed.values()))
        return opened

    def setup(self, stage: str) -> None:
        if self.processor is None:
            raise RuntimeError(
                "the DataModule is not connected to a model: call data.connect(model.processor()) first "
                "(lit-mllm's CLI does this for you)"
            )
        for split in {"fit": ["fit", "validate"]}.get(stage, [stage]):
            self.sources(split)

    def samples(self, split: str) -> list[Sample]:
        """Parsed samples of the split's conversation sources (for answer baselines); bad records are left out."""
        token = self.processor.image_token if self.processor else "<image>"
        out = []
        for source in self.sources(split).values():
            if isinstance(source, Conversations):
                for i in range(len(source)):
                    try:
                        out.append(source.sample(i, token))
                    except DataError:
                        pass
        return out

    def mixture(self) -> Mixture:
        sources = self.sources("fit")
        if not sources:
            raise ValueError("no training sources: set data.train")
        return Mixture(
            {n: len(s) for n, s in sources.items()},
            {n: s.weight for n, s in sources.items()},
            self.batch_size,
            self.seed,
            self.samples_per_epoch,
            self.stratified,
        )

    # -- loaders ----------------------------------------------------------------------------------------------
    def _loader_for(self, split: str) -> SampleLoader:
        return SampleLoader(self.sources(split), self.processor, self.on_bad_sample, split)

    def train_dataloader(self) -> DataLoader:
        trainer = self.trainer
        rank, world = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
        collate_kwargs = {
            "pad_token_id": self.processor.tokenizer.pad_token_id,
            "pack_length": self.pack_length,
        }
        stream = MixtureStream(self._loader_for("fit"), self.mixture(), rank, world, collate_kwargs)
        self._plan_batches = len(stream)
        return _EpochLoader(stream, self, num_workers=self.num_workers)

    def _eval_loader(self, split: str) -> DataLoader:
        loader = self._loader_for(split)
        return DataLoader(
            EvalDataset(loader),
            batch_size=self.eval_batch_size,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            collate_fn=partial(
                loader.batch,
                pad_token_id=self.processor.tokenizer.pad_token_id,
                padding_side="left" if split == "predict" else "right",
            ),
        )

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader("validate") if self.splits["validate"] else []

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader("test")

    def predict_dataloader(self) -> DataLoader:
        return self._eval_loader("predict")

    # -- bookkeeping: counts, bad fraction, resume position ---------------------------------------------------
    def on_before_batch_transfer(self, batch: tuple[Batch, LoaderReport], dataloader_idx: int) -> Batch:
        """Count the loader's report (training: seen, per source, skipped per reason; stop above the bad fraction;
        remember the plan position) and hand the model the batch alone. At the last batch of an epoch the
        fraction is checked whatever the count, the skips are printed and the data figures logged."""
        batch, report = batch
        if self.trainer is not None and self.trainer.training:
            self.position = report.position
            self.counts["seen"] += report.seen
            self.counts.update(f"source/{s}" for s in batch.sources)
            self.counts.update({f"skipped/{r}": n for r, n in report.skipped.items()})
            for reason, message in zip(self._reasons(report), report.messages):
                self.examples.setdefault(reason, message)
            epoch_end = self._ends_epoch(report.position)
            seen, bad = self.counts["seen"], sum(self.skipped().values())
            if over_budget(seen, bad, self.max_bad_fraction, epoch_end):
                inline = ", ".join(f"{r}: {n}" for r, n in self.skipped().items())
                when = f"at the end of epoch {report.position[0]}" if epoch_end else f"after {seen} samples"
                raise DataError(
                    f"{bad} of {seen} training samples were bad ({inline}), over data.max_bad_fraction="
                    f"{self.max_bad_fraction} ({when}):\n{skip_table(self.skipped(), self.examples)}\n"
                    "Run `lit-mllm validate-data --config ...` to list them all; fix or remove those records, or "
                    "raise data.max_bad_fraction"
                )
            if epoch_end:
                self._print_skips(f"epoch {report.position[0]}")
            self._log_stats(force=epoch_end)
        return batch

    @staticmethod
    def _reasons(report: LoaderReport) -> list[str]:
        """The reason of each message of ``report`` (its messages are grouped by reason in ``skipped``'s order)."""
        return [r for r, n in report.skipped.items() for _ in range(n)]

    def _ends_epoch(self, position: tuple[int, int] | None) -> bool:
        """Whether the batch about to train is its epoch's last: Lightning knows it (its loader is exhausted), or
        it is the last batch of this rank's plan."""
        loop = getattr(getattr(self.trainer, "fit_loop", None), "epoch_loop", None)
        if loop is not None and loop.batch_progress.is_last_batch:
            return True
        return (
            position is not None and self._plan_batches is not None and position[1] + 1 >= self._plan_batches
        )

    def skipped(self) -> dict[str, int]:
        """Training samples skipped so far, per reason (reasons with none left out)."""
        return {r: self.counts[f"skipped/{r}"] for r in REASONS if self.counts[f"skipped/{r}"]}

    def skip_summary(self, when: str) -> str:
        """The skipped training samples so far as one short block: a headline, then reason, count and an example."""
        seen, skipped = self.counts["seen"], self.skipped()
        bad = sum(skipped.values())
        over = bad > self.max_bad_fraction * seen
        headline = (
            f"Skipped {bad} of {seen} training samples ({bad / max(seen, 1):.1%}) by the end of {when}; "
            f"data.max_bad_fraction={self.max_bad_fraction}{' (over it)' if over else ''}:"
        )
        return f"{headline}\n{skip_table(skipped, self.examples)}"

    def _print_skips(self, when: str) -> None:
        """Print :meth:`skip_summary` on global rank zero when there is anything new to say."""
        if not self.skipped() or self.counts["seen"] == self._summarised_seen:
            return
        self._summarised_seen = self.counts["seen"]
        if getattr(self.trainer, "is_global_zero", True):
            print(self.skip_summary(when), flush=True)

    def teardown(self, stage: str) -> None:
        """At the end of a fit: print the skipped samples (unless the last epoch's summary said it all)."""
        if stage == "fit":
            self._print_skips("the run")

    def stats(self) -> dict[str, float]:
        """The realised mixture ratio per training source and the skipped samples per reason, so far."""
        names = list(self.sources("fit"))
        good = sum(self.counts[f"source/{n}"] for n in names)
        return {
            **{f"data/ratio/{n}": self.counts[f"source/{n}"] / max(good, 1) for n in names},
            **{f"data/skipped/{r}": float(self.counts[f"skipped/{r}"]) for r in REASONS},
        }

    def _log_stats(self, force: bool = False) -> None:
        """Write :meth:`stats` to the run's loggers at the trainer's logging interval (or, ``force``, now: an
        epoch's end), at the step the batch about to train is logged under (Lightning logs ``train/loss`` of step
        ``k`` when ``(k + 1) % log_every_n_steps == 0``)."""
        trainer = self.trainer
        step = trainer.global_step
        if not trainer.loggers:
            return
        if not force and ((step + 1) % trainer.log_every_n_steps or step == self._logged_step):
            return
        self._logged_step = step  # once per optimizer step, whatever the gradient accumulation
        for logger in trainer.loggers:
            logger.log_metrics(self.stats(), step=step)

    def plan_state(self) -> dict:
        """Where training is in the plan (epoch, next batch), the running counts (samples seen, per source,
        skipped per reason: the mixture ratio and the bad-sample budget go on from them) and the plan's seed."""
        if self.position is None:
            return {}
        epoch, k = self.position
        return {"epoch": epoch, "next_batch": k + 1, "counts": dict(self.counts), "seed": self.seed}

    def load_plan_state(self, state: dict) -> None:
        """Continue from :meth:`plan_state`: the next training pass of that epoch starts at its next batch."""
        if not state:
            return
        if state.get("seed", self.seed) != self.seed:
            raise ValueError(
                f"the checkpoint's data plan used seed {state['seed']}, this run data.seed={self.seed}; resuming "
                "would not continue the same sample order"
            )
        self.resume_at = (state["epoch"], state["next_batch"])
        self.position = (state["epoch"], state["next_batch"] - 1)
        self.counts = Counter(state["counts"])

    def state_dict(self) -> dict:
        """Lightning's DataModule checkpoint hook: :meth:`plan_state`."""
        return self.plan_state()

    def load_state_dict(self, state_dict: dict) -> None:
        """Lightning's DataModule checkpoint hook (called before training starts): :meth:`load_plan_state`."""
        self.load_plan_state(state_dict)
