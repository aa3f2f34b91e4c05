"""The mixture plan: which (source, record) fills each place of each batch, for every epoch and rank.

Sources are keyed by name with weights (MM1: interleaved : caption : text = 45 : 45 : 10). For epoch ``e`` the
plan is a pure function of ``(seed, e)`` and the sources' names, sizes and weights:

- each place of the epoch draws its source with probability ``weight / sum(weights)`` (``stratified``: every
  batch holds ``floor(p * B)`` of each source, the remaining places drawn by the fractional parts, so each batch
  is within one sample of the ratio);
- a source's draws walk through a permutation of its records (seeded by seed, epoch, the source's *name* and
  the pass), without replacement until it is exhausted; a small source with a large weight starts another
  pass (counted: :meth:`Mixture.passes`), a large one is subsampled;
- the epoch is cut into global batches; rank ``r`` of ``W`` takes global batches ``r, r + W, ...`` so ranks
  see disjoint records and the same number of batches (the remainder is dropped, never padded by repeats).

Because a rank's batch ``k`` depends only on (seed, epoch, rank, k), a run resumed at batch ``k`` sees exactly
what an uninterrupted run would have seen, whatever the number of loader workers.
"""

from __future__ import annotations

import zlib

import numpy as np


class Mixture:
    """Deterministic mixture plan over named sources."""

    def __init__(
        self,
        sizes: dict[str, int],
        weights: dict[str, float],
        batch_size: int,
        seed: int = 0,
        samples_per_epoch: int | None = None,
        stratified: bool = False,
    ) -> None:
        if sizes.keys() != weights.keys():
            raise ValueError(
                f"sources {sorted(sizes)} and weights {sorted(weights)} must have the same names"
            )
        self.names = sorted(n for n in sizes if weights[n] > 0)
        if not self.names:
            raise ValueError(f"no source has a positive weight: {weights}")
        empty = [n for n in self.names if sizes[n] == 0]
        if empty:
            raise ValueError(f"sources {empty} have a positive weight but no records")
        self.sizes = np.array([sizes[n] for n in self.names])
        total = sum(weights[n] for n in self.names)
        self.probs = np.array([weights[n] / total for n in self.names])
        self.batch_size, self.seed, self.stratified = batch_size, seed, stratified
        self.samples_per_epoch = samples_per_epoch or int(self.sizes.sum())
        self.global_batches = self.samples_per_epoch // batch_size
        if self.global_batches == 0:
            raise ValueError(
                f"an epoch of {self.samples_per_epoch} samples holds no full batch of {batch_size}; "
                "lower batch_size or raise samples_per_epoch"
            )

    def num_batches(self, world_size: int = 1) -> int:
        """Batches per epoch on each rank."""
        return self.global_batches // world_size

    def _choices(self, epoch: int) -> np.ndarray:
        """Source index of every place of the epoch, ``[global_batches, B]``."""
        rng = np.random.default_rng([self.seed, epoch, 0])
        shape = (self.global_batches, self.batch_size)
        if not self.stratified:
            return rng.choice(len(self.names), size=shape, p=self.probs)
        base = np.floor(self.probs * self.batch_size).astype(int)
        rest = self.batch_size - int(base.sum())
        frac = self.probs * self.batch_size - base
        rows = []
        for _ in range(self.global_batches):
            extra = rng.choice(len(self.names), size=rest, replace=False, p=frac / frac.sum()) if rest else []
            row = np.repeat(np.arange(len(self.names)), base)
            rows.append(rng.permutation(np.concatenate([row, np.asarray(extra, dtype=int)])))
        return np.stack(rows)

    def _records(self, epoch: int, s: int, count: int) -> np.ndarray:
        """The first ``count`` records source ``s`` gives in ``epoch``: permutations, pass after pass."""
        name_key = zlib.crc32(self.names[s].encode())
        passes = -(-count // int(self.sizes[s]))
        perms = [
            np.random.default_rng([self.seed, epoch, 1, name_key, p]).permutation(int(self.sizes[s]))
            for p in range(passes)
        ]
        return np.concatenate(perms)[:count] if perms else np.zeros(0, dtype=int)

    def plan(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """``(source index, record index)`` of every place of the epoch, each ``[global_batches, B]``."""
        choices = self._choices(epoch)
        records = np.zeros_like(choices)
        flat_c, flat_r = choices.reshape(-1), records.reshape(-1)
        for s in range(len(self.names)):
            where = np.flatnonzero(flat_c == s)
            flat_r[where] = self._records(epoch, s, len(where))
        return choices, records

    def batches(self, epoch: int, rank: int = 0, world_size: int = 1) -> list[list[tuple[str, int]]]:
        """This rank's batches of ``epoch`` as lists of ``(source name, record index)``."""
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world size {world_size}")
        choices, records = self.plan(epoch)
        mine = range(rank, self.num_batches(world_size) * world_size, world_size)
        return [[(self.names[s], int(i)) for s, i in zip(choices[g], records[g])] for g in mine]

    def passes(self, epoch: int) -> dict[str, float]:
        """How many times each source is gone through in ``epoch`` (above 1: records repeat within the epoch)."""
        counts = np.bincount(self._choices(epoch).reshape(-1), minlength=len(self.names))
        return {n: float(c / size) for n, c, size in zip(self.names, counts, self.sizes)}
