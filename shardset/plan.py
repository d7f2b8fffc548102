"""Which rows each consumer reads in an epoch, computed in O(1) from (seed, epoch).

An epoch is one *stream* of all N rows: the blocks in the order of
``FeistelPermutation(num_blocks, seed, epoch)``, and inside each block the rows
in the order of ``torch.randperm`` with a generator keyed by
``(seed, epoch, block)`` (a C loop that releases the GIL: as the row order of a
whole block it ran 1.5x faster end to end than a vectorized Feistel evaluation,
which holds the GIL between its many numpy calls and so stalls the consumer).  Rank ``r`` of ``W`` takes the contiguous slice
``[r * R, (r + 1) * R)`` of that stream with ``R = N // W`` (so at most W - 1
rows are dropped and every rank gets the same count), cut into batches; the
DataLoader workers of a rank split its batches into contiguous runs.  Contiguous
slices keep read amplification to the blocks that straddle two consumers.

Example:
    >>> from shardset.plan import EpochPlan
    >>> p = EpochPlan(rows=10, block_rows=4, batch_size=3, seed=0, epoch=0)
    >>> p.num_batches, [(s.block, s.stop - s.start) for s in p.segments(0, p.num_batches)]
    (4, [(1, 4), (2, 2), (0, 4)])
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Iterator

import numpy as np
import torch

from .permutation import FeistelPermutation

__all__ = ["EpochPlan", "Segment"]

BLOCK_DOMAIN = "block-order"
_RECORD_KEY = 2  # spawn_key namespace of the row order (synthetic data uses 0 and 1)


@dataclass(frozen=True)
class Segment:
    """Rows ``[start, stop)`` of ``block`` in its epoch order (positions, not row ids)."""

    block: int
    start: int
    stop: int


@dataclass(frozen=True)
class EpochPlan:
    """The epoch's stream and one consumer's share of it (batches ``[first, last)``)."""

    rows: int
    block_rows: int
    batch_size: int
    seed: int = 0
    epoch: int = 0
    shuffle: bool = True
    drop_last: bool = False
    rank: int = 0
    world_size: int = 1

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {self.batch_size}")
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank must be in [0, {self.world_size}), got {self.rank}")

    @property
    def num_blocks(self) -> int:
        return -(-self.rows // self.block_rows)

    @property
    def rank_rows(self) -> int:
        return self.rows // self.world_size

    @property
    def num_batches(self) -> int:
        """Batches this rank yields in the epoch (the same on every rank)."""
        r, b = self.rank_rows, self.batch_size
        return r // b if self.drop_last else -(-r // b)

    def worker_batches(self, worker: int, num_workers: int) -> tuple[int, int]:
        """Batch range ``[first, last)`` of this rank that DataLoader worker ``worker`` yields."""
        nb = self.num_batches
        return worker * nb // num_workers, (worker + 1) * nb // num_workers

    def batch_rows(self, first: int, last: int) -> tuple[int, int]:
        """Stream positions ``[a, b)`` covered by this rank's batches ``[first, last)``."""
        base = self.rank * self.rank_rows
        end = self.rank_rows if not self.drop_last else self.num_batches * self.batch_size
        return base + min(first * self.batch_size, end), base + min(last * self.batch_size, end)

    # -- the stream -----------------------------------------------------------------

    @cached_property
    def _order(self) -> FeistelPermutation | None:
        if not self.shuffle or self.num_blocks == 0:
            return None
        return FeistelPermutation(self.num_blocks, self.seed, self.epoch, domain=BLOCK_DOMAIN)

    @cached_property
    def _short(self) -> tuple[int, int]:
        """(stream index of the short last block, rows it lacks)."""
        last = self.num_blocks - 1
        deficit = self.num_blocks * self.block_rows - self.rows
        k = last if self._order is None else int(self._order.inverse(last))
        return k, deficit

    def block_at(self, k: int) -> int:
        """Block id visited ``k``-th in this epoch."""
        return k if self._order is None else int(self._order(k))

    def offset(self, k: int) -> int:
        """Stream position where the ``k``-th visited block starts."""
        ks, deficit = self._short
        return k * self.block_rows - (deficit if k > ks else 0)

    def visit_index(self, pos: int) -> int:
        """Index ``k`` of the visited block holding stream position ``pos``."""
        k = pos // self.block_rows
        while self.offset(k + 1) <= pos:
            k += 1
        return k

    def segments(self, first: int, last: int) -> Iterator[Segment]:
        """The block pieces, in stream order, that batches ``[first, last)`` of this rank need."""
        a, b = self.batch_rows(first, last)
        if a >= b:
            return
        k = self.visit_index(a)
        while self.offset(k) < b:
            lo, hi = self.offset(k), self.offset(k + 1)
            yield Segment(self.block_at(k), max(a, lo) - lo, min(b, hi) - lo)
            k += 1

    def record_order(self, block: int, start: int, stop: int) -> np.ndarray:
        """Row ids inside ``block`` at its epoch positions ``[start, stop)`` (int64)."""
        if not self.shuffle:
            return np.arange(start, stop, dtype=np.int64)
        n = min(self.block_rows, self.rows - block * self.block_rows)
        key = np.random.SeedSequence(self.seed, spawn_key=(_RECORD_KEY, self.epoch, block)).generate_state(1, np.uint64)
        gen = torch.Generator().manual_seed(int(key[0]))
        return torch.randperm(n, generator=gen).numpy()[start:stop]
