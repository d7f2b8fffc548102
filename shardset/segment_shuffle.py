"""One-pass write-time shuffle: every output block is one segment from each stratum of the input.

The row shuffle of :mod:`shardset.shuffle` sends every row to its own
pseudorandom place, so data larger than RAM crosses the disk four times (read,
bucket write, bucket read, write).  This method crosses it twice: the input is
read once, in ranged reads of a few MiB, and the output is written once.  It
moves rows in contiguous *segments* instead of one at a time:

* the input's rows are cut into ``m`` *strata*, consecutive ranges of about
  ``1/m`` of the rows each;
* stratum ``s`` is cut into one segment per output block, laid out in a
  pseudorandom order: output block ``j`` owns the segment at position
  ``perm_s[j]``, with ``perm_s`` the permutation of the output blocks drawn by
  ``numpy.random.Generator(PCG64(SeedSequence(seed, spawn_key=(3, s))))``;
* output block ``j`` is its ``m`` segments (one per stratum), their rows then
  permuted: output row ``i`` of the block is row ``order[i]`` of the segments
  put end to end, ``order`` drawn the same way with ``spawn_key=(4, j)``.

Every output block is therefore a *stratified* sample of the whole input: it
holds ``block_rows / m`` consecutive input rows from every ``1/m`` of it.  For
data written in an order (sorted by label, by time), each block's label mix
matches the whole set's to within the segments that straddle a boundary, and
the reader's in-block shuffle mixes the rows.  What it does not do is
separate neighbours: rows that were next to each other stay in the same block
(not in the same batch) unless a segment edge falls between them.  The segment
size is a trade: smaller segments mix more finely and make shorter random
reads, which disks serve more slowly (default: about 2 MiB, and at least 64
strata).

The input needs slice checksums (``layout.slice_rows``): every segment is read
with :meth:`BlockStore.read_rows`, which verifies the slices it covers.  The
output goes through :func:`shardset.write_blocks`, so the method is
deterministic (the bytes depend on the seed and ``segments`` only), parallel
over processes and resumed by running it again.

Example:
    >>> from shardset.format import FieldSpec
    >>> m = SegmentShuffle(Layout(rows=10, block_rows=4, fields={"x": FieldSpec("int64")}), segments=2, seed=0)
    >>> sorted(int(r) for b in range(m.num_blocks) for r in m.source_rows(b)) == list(range(10))
    True
    >>> [[b - a for a, b in m.ranges(j)] for j in range(m.num_blocks)]
    [[2, 2], [2, 2], [1, 1]]
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from functools import cached_property
from typing import Any, Mapping

import numpy as np

from .errors import ArgumentError, StoreFormatError
from .format import MIB, Layout, check_int
from .memory import HUGE_PAGE_BYTES
from .store import BlockStore, _take_rows
from .writer import WrittenBlocks, block_arrays, filled

__all__ = ["SegmentShuffle", "SegmentSource", "default_segments", "plan_for", "rss_budget"]

# spawn_key namespaces (synthetic data uses 0 and 1, the reader's row orders 2)
_STRATUM_KEY, _ROW_KEY = 3, 4
SEGMENT_BYTES = 2 * MIB  # default segment size (see default_segments)
MIN_SEGMENTS = 64  # strata at least, whatever the block size
READS = 4  # segment reads in flight per process


def default_segments(layout: Layout) -> int:
    """Segments per output block by default: about :data:`SEGMENT_BYTES` each, and at
    least :data:`MIN_SEGMENTS` (never more than a block's rows).

    >>> from shardset.format import FieldSpec
    >>> default_segments(Layout(10**9, 2**21, {"x": FieldSpec("float32", (16,))}))  # 128 MiB blocks
    64
    >>> default_segments(Layout(10**9, 2**22, {"x": FieldSpec("float32", (16,))}))  # 256 MiB blocks
    128
    """
    return min(layout.block_rows, max(MIN_SEGMENTS, layout.block_rows * layout.row_bytes // SEGMENT_BYTES))


class SegmentShuffle:
    """Which input rows make up each output block of a segment shuffle (see the module).

    Args:
        layout: the output's geometry (its rows are the input's).
        segments: segments per output block, ``m`` (the number of strata).
        seed: the shuffle seed.
    """

    def __init__(self, layout: Layout, segments: int, seed: int = 0) -> None:
        self.layout, self.num_blocks = layout, layout.num_blocks
        self.segments, self.seed = check_int("segments", segments), check_int("seed", seed, 0)
        m, block_rows, last = self.segments, layout.block_rows, layout.block_len(self.num_blocks - 1)
        s = np.arange(m + 1, dtype=np.int64)
        self._full = np.diff(s * block_rows // m)  # segment s of a whole block
        self._last = np.diff(s * last // m)  # segment s of the last block (the same when it is whole)
        sizes = (self.num_blocks - 1) * self._full + self._last
        self._starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])  # where each stratum begins

    @cached_property
    def _positions(self) -> np.ndarray:
        """``[s, j]``: the position of output block ``j``'s segment in stratum ``s`` (8 bytes
        per block and stratum, computed once, in the process that uses them)."""
        return np.stack([self._generator(_STRATUM_KEY, s).permutation(self.num_blocks) for s in range(self.segments)])

    def _generator(self, *key: int) -> np.random.Generator:
        # numpy's permutation, not a Feistel network evaluated on every row: 9 against about 60 ms
        # for a block of 492,544 rows (cProfile of an 8-block shuffle here)
        return np.random.Generator(np.random.PCG64(np.random.SeedSequence(self.seed, spawn_key=key)))

    def _segments(self, block: int) -> tuple[np.ndarray, np.ndarray]:
        """``(starts, lengths)`` of output block ``block``'s segments in the input, stratum by stratum."""
        if not 0 <= block < self.num_blocks:
            raise ArgumentError(f"block must be in [0, {self.num_blocks}), got {block}")
        at, last_at = self._positions[:, block], self._positions[:, -1]  # segments after the last block's move by its deficit
        starts = self._starts + at * self._full + np.where(last_at < at, self._last - self._full, 0)
        return starts, (self._last if block == self.num_blocks - 1 else self._full)

    def ranges(self, block: int) -> list[tuple[int, int]]:
        """The input row ranges ``[start, stop)`` of ``block``'s non-empty segments, stratum by stratum."""
        starts, lengths = self._segments(block)
        return [(int(a), int(a + n)) for a, n in zip(starts, lengths) if n]

    def row_order(self, block: int) -> np.ndarray:
        """Output row ``i`` of ``block`` is row ``row_order(block)[i]`` of its segments end to end."""
        return self._generator(_ROW_KEY, block).permutation(self.layout.block_len(block))

    def source_rows(self, block: int) -> np.ndarray:
        """The input row of every row of output ``block``, in output order."""
        rows = np.concatenate([np.arange(a, b, dtype=np.int64) for a, b in self.ranges(block)])
        return rows[self.row_order(block)]

    def record(self) -> dict[str, Any]:
        """What the output's metadata says about the shuffle (with the seed and the source)."""
        return {"algorithm": f"output block j is segment perm_s[j] of each of {self.segments} strata s, its rows "
                             "permuted by order_j (perm_s, order_j: permutations by numpy.random.Generator(PCG64("
                             "SeedSequence(seed, spawn_key=(3, s) or (4, j)))))",
                "segments": self.segments}


def rss_budget(src: Layout, dst: Layout, segments: int) -> int:
    """Bytes of memory one process of a segment shuffle holds, at most, beyond the interpreter's own.

    Three output blocks (two in the writer's hands, one gathered from its
    segments), the row order and its indices (16 bytes a row), and the scratch
    buffers of the :data:`READS` reading threads: a segment plus a checksummed
    slice on each side, rounded up to huge pages; plus 8 MiB for the rest.

    >>> from shardset.format import FieldSpec
    >>> lay = Layout(10**9, 2**21, {"x": FieldSpec("float32", (16,))})
    >>> rss_budget(lay, lay, 64) // MIB  # 3 x 128 MiB + 32 MiB of order + 4 x 6 MiB of scratch + 8 MiB
    448
    """
    seg = max(f.row_bytes for f in src.fields.values()) * (-(-dst.block_rows // segments) + 2 * (src.slice_rows or 1))
    scratch = -(-seg // HUGE_PAGE_BYTES) * HUGE_PAGE_BYTES + HUGE_PAGE_BYTES
    return 3 * dst.block_rows * dst.row_bytes + 16 * dst.block_rows + READS * scratch + 8 * MIB


class SegmentSource:
    """A block source for :func:`shardset.write_blocks`: output block ``j`` read from its
    segments of the store ``src`` and permuted (picklable: each process opens the store).
    Blocks of ``output`` (the store written) leave the page cache once durable."""

    def __init__(self, src: str, storage_options: Mapping[str, Any] | None, plan: SegmentShuffle,
                 output: str | os.PathLike | None = None) -> None:
        self.src, self.storage_options, self.plan = src, storage_options, plan
        self._written = WrittenBlocks(output)
        self._store: BlockStore | None = None
        self._pool: ThreadPoolExecutor | None = None
        self._gathered: dict[str, np.ndarray] | None = None
        self._pid = -1

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_store": None, "_pool": None, "_gathered": None, "_pid": -1}

    def _open(self) -> BlockStore:
        if self._pid != os.getpid():
            self._store = BlockStore.open(self.src, storage_options=self.storage_options)
            self._pool = ThreadPoolExecutor(READS, thread_name_prefix="shardset-segment-read")
            lay = self._store.layout
            self._gathered = {k: np.empty(self.plan.layout.block_rows * f.row_bytes, np.uint8)
                              for k, f in lay.fields.items()}
            self._pid = os.getpid()
        return self._store

    def fill(self, block: int, out: Mapping[str, np.ndarray]) -> None:
        store = self._open()
        self._written.filling(block)
        ranges = self.plan.ranges(block)
        at = np.concatenate([[0], np.cumsum([b - a for a, b in ranges])])
        jobs = []
        for name, spec in store.layout.fields.items():
            rb, raw = spec.row_bytes, self._gathered[name]
            jobs += [self._pool.submit(store.read_rows, name, a, b, raw[at[i] * rb : at[i + 1] * rb], direct=True)
                     for i, (a, b) in enumerate(ranges)]
        for job in jobs:  # all of them, so no read is still writing into the buffers after an error
            job.exception()
        for job in jobs:
            job.result()
        order = self.plan.row_order(block)
        for name, spec in store.layout.fields.items():
            dest = out[name].reshape(-1).view(np.uint8)
            _take_rows(self._gathered[name], order, dest, spec.row_bytes)

    def __call__(self, block: int) -> dict[str, np.ndarray]:
        return filled(self.fill, self.plan.layout, block, block_arrays(self.plan.layout))


def plan_for(source: BlockStore, layout: Layout, segments: int | None, seed: int) -> SegmentShuffle:
    """The segment shuffle of the store ``source`` into ``layout`` (``segments`` per block, by
    default :func:`default_segments`), after checking that ``source`` can be read a segment
    at a time: it has slice checksums, and a segment is at least one slice long."""
    try:
        source.require_slices()
    except StoreFormatError:
        raise StoreFormatError(f"{source.where} has no slice checksums (it is compressed, or was written by an older "
                               "shardset), so its segments cannot be read and verified: shuffle it with "
                               "method='rows' (`--method rows`)") from None
    m = default_segments(layout) if segments is None else min(check_int("segments", segments), layout.block_rows)
    slice_rows = source.layout.slice_rows
    if layout.block_rows // m < slice_rows:
        fix = (f"use at most {layout.block_rows // slice_rows} segments" if layout.block_rows >= slice_rows else
               f"use output blocks of at least {slice_rows} rows")
        raise ArgumentError(f"segments of {layout.block_rows // m} rows are shorter than the checksummed slices of "
                            f"{source.where} ({slice_rows} rows): each would read whole slices; {fix}, or "
                            "method='rows'")
    return SegmentShuffle(layout, m, seed)
