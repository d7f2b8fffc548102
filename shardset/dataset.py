"""``ShardedDataset``: stream a store as shuffled torch batches, block by block.

Each epoch visits the blocks in a fresh Feistel order, reads every block whole
(one sequential read per field, on a background thread that stays ``prefetch``
blocks ahead), permutes its rows in RAM and yields ready batches.  Rows are
split exactly once across distributed ranks and DataLoader workers, every rank
gets the same number of batches, and ``state_dict()`` resumes mid-epoch.

Epochs advance by themselves: once every consumer of a rank (the main process,
or each DataLoader worker) has yielded its last batch, the next pass uses the
next epoch.  The counter lives in shared memory, so persistent workers see it
too.  ``set_epoch(e)`` pins the epoch, as with ``DistributedSampler``.  A pass
that runs to its end starts reading the next epoch's first blocks while its last
batches are gathered, so epochs run back to back keep the disk busy.

Example:
    >>> import tempfile, os, torch
    >>> from shardset import generate_regression, ShardedDataset
    >>> path = os.path.join(tempfile.mkdtemp(), "reg.zarr")
    >>> _ = generate_regression(path, rows=1000, features=3, block_rows=256, workers=1)
    >>> ds = ShardedDataset(path, batch_size=100, seed=1)
    >>> loader = torch.utils.data.DataLoader(ds, batch_size=None)
    >>> X, y = next(iter(loader))
    >>> tuple(X.shape), tuple(y.shape), len(ds)
    ((100, 3), (100, 1), 10)
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import math
import multiprocessing as mp
import os
import threading
import warnings
import weakref
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import IterableDataset, get_worker_info

from .direct_io import AsyncDirectReads, Steps, ThreadedSteps, run_steps
from .errors import ArgumentError, CorruptBlockError
from .format import MIB, check_int, check_positive, is_integer
from .memory import DIRECT_ALIGN, HUGE_PAGE_BYTES, aligned_buffer, direct_nbytes
from .plan import EpochPlan, Piece, undelivered
from .store import CRC_BYTES, BlockStore

__all__ = ["ShardedDataset"]

Batch = tuple[torch.Tensor, ...] | dict[str, torch.Tensor]
# Rows are gathered into chunks of about this size: big enough to amortize a call; the
# few chunks in flight at a time are reused (_ChunkArrays), so that is all they cost.
GATHER_BYTES = 8 << 20
# Reads in flight at most: whole blocks are long sequential reads; slices are a few
# MiB at random offsets, which a disk serves fast only with many in flight (2 MiB
# O_DIRECT reads on this project's disk, a one-off run on a busy machine: 0.13 GB/s
# one at a time, 0.52 at 16), so slice units get about SLICE_IO_BYTES in flight,
# 4 to 16 reads: more threads than that only contend for the GIL (8 MiB units, three
# interleaved one-off rounds on the idle machine: 0.68-0.73 GB/s with 8 reads, 0.65-0.67
# with 16; 4 MiB units were even between 8 and 16).
IO_THREADS, SLICE_IO_THREADS, SLICE_IO_BYTES = 4, 16, 64 << 20
# Slice units of rows at least this wide are read into their slots as stored (an
# O_DIRECT read lands there with no copy) and the window's gather takes their rows in
# their random order; narrower rows are put in that order by the copy out of the
# read buffer instead, so that a stage reads each unit in sequence (why and what
# each costs: docs/design.md#shuffle-windows-as-staggered-stages).
IN_PLACE_ROW_BYTES = 512


class ShardedDataset(IterableDataset):
    """An ``IterableDataset`` of ready batches from a shardset store.

    Args:
        path: the store (a local directory).
        batch_size: rows per batch; use ``DataLoader(ds, batch_size=None)``.
        shuffle: visit blocks in a per-epoch Feistel order and permute rows in
            each block; ``False`` reads the store in order.
        seed: the shuffle seed (with the epoch it determines the whole order).
        drop_last: drop each rank's final partial batch.
        rank, world_size: default to ``torch.distributed`` when initialized, else 0 and 1.
        prefetch: blocks read ahead on background threads (memory is about
            ``window + prefetch`` blocks per consumer; never more read ahead than
            the stream holds, and a window and read-ahead that would not fit in
            the RAM are refused).
        fields: the fields to read, in output order (default: all). Batches are
            ``(X, y)`` tuples when the fields are exactly X and y, else dicts.
        window_blocks: mix the rows of this many consecutive blocks of the epoch's
            order (default 1: shuffle inside each block only); with ``slice_mb``,
            this many blocks' memory of slices.  See :mod:`shardset.plan`.
        window_mb: alternatively, the largest window that fits this many MiB of
            the fields read.
        slice_mb: read slices of about this many MiB instead of whole blocks, and
            make them the units that are visited in a Feistel order and mixed in
            the window: a window of the same memory then mixes rows from many
            more places of the store (sub-block mixing; needs a store with slice
            checksums, see ``docs/format.md``).  ``window_blocks`` and ``prefetch``
            still count blocks.
        on_error: ``"raise"`` (default) stops at a block that fails its checks;
            ``"skip"`` warns and replaces its rows with those of the next readable
            block, so every rank still yields the same batches.
        allow_incomplete: stream only the complete blocks of a store that is
            still being written (the stream is fixed when the dataset is made).
        direct: read blocks (or slices) that are not in the page cache with
            ``O_DIRECT`` (no copy out of the cache, and nothing cached for later epochs);
            ``"auto"`` does so when the fields read exceed half of the RAM, so a
            set that fits stays cached between epochs.
        storage_options: for a URL (``s3://...``): endpoint, region, credentials.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        batch_size: int,
        *,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = False,
        rank: int | None = None,
        world_size: int | None = None,
        prefetch: int = 1,
        fields: Sequence[str] | None = None,
        window_blocks: int | None = None,
        window_mb: float | None = None,
        slice_mb: float | None = None,
        on_error: str = "raise",
        allow_incomplete: bool = False,
        direct: bool | str = "auto",
        storage_options: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        batch_size, prefetch = check_int("batch_size", batch_size), check_int("prefetch", prefetch, 0)
        if on_error not in ("raise", "skip"):
            raise ArgumentError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
        self.path = os.fspath(path)
        self.storage_options = dict(storage_options or {})
        store = BlockStore.open(self.path, storage_options=self.storage_options)
        if not allow_incomplete:
            store.require_complete()
        self.layout = store.layout
        if isinstance(fields, str):
            raise ArgumentError(f"fields must be a list of field names, got the string {fields!r}")
        self.fields = list(self.layout.fields) if fields is None else list(fields)
        unknown = [f for f in self.fields if f not in self.layout.fields]
        if unknown or not self.fields:
            raise ArgumentError(f"unknown fields {unknown}; the store has {list(self.layout.fields)}")
        self.unit_rows = self._unit_rows(store, slice_mb)
        self.blocks: tuple[int, ...] | None = None  # the plan's units to stream (None: all)
        if allow_incomplete and store.missing_blocks():
            self.blocks = self._units_of(store.complete_blocks())
        self.batch_size, self.shuffle, self.seed = batch_size, bool(shuffle), check_int("seed", seed, 0)
        self.drop_last, self.on_error = bool(drop_last), on_error
        per_block = self.layout.block_rows / (self.unit_rows or self.layout.block_rows)
        self.prefetch = max(prefetch, round(prefetch * per_block))  # in the plan's units
        self.window = self._window(window_blocks, window_mb, per_block)
        if direct not in (True, False, "auto"):
            raise ArgumentError(f"direct must be True, False or 'auto', got {direct!r}")
        self.direct = direct if direct != "auto" else self.layout.rows * self.row_bytes > _ram_bytes() / 2
        self.rank, self.world_size = _resolve_rank(rank, world_size)
        plan = self._plan_for(0, self.rank, self.world_size, self.batch_size, self.drop_last, None)
        if plan.stream_rows < self.world_size:
            raise ArgumentError(f"{plan.stream_rows} rows cannot be split across {self.world_size} ranks")
        self.prefetch = min(self.prefetch, plan.num_blocks)  # reading further ahead than the stream holds buys nothing
        slots, each, ram = plan.window + self.prefetch, plan.block_rows * self.row_bytes, _ram_bytes()
        if slots * each > ram:
            unit = "blocks" if self.unit_rows is None else "slice units"
            raise ArgumentError(f"a window and read-ahead of {slots} x {each / 2**20:,.0f} MiB ({unit}) need "
                                f"{slots * each / 2**30:,.1f} GiB of buffers, more than the {ram / 2**30:,.1f} GiB of "
                                "RAM here: lower window_blocks, window_mb or prefetch")
        self.as_tuple = sorted(self.fields) == ["X", "y"]
        if self.as_tuple:  # (X, y) whatever the store's or the caller's order
            self.fields = ["X", "y"]
        # [epoch, consumers finished with it]; shared so DataLoader workers (persistent
        # or not) and the main process agree on the epoch.
        self._shared = mp.RawArray("q", 2)
        self._lock = mp.get_context("spawn").Lock()
        self._store: BlockStore | None = store
        self._buffers: _Buffers | None = None
        # (pid, the next epoch's pass already reading, its finalizer): see _BlockReader.follow_with
        self._ahead: tuple[int, _BlockReader, weakref.finalize] | None = None
        self._store_pid = os.getpid()
        self._position: tuple[int, int] | None = None  # (epoch, batches handed out) of this consumer
        # a loaded state that the next pass continues: (epoch, batches to skip, (DataLoader worker, workers))
        self._loaded: tuple[int, int, tuple[int, int]] | None = None
        self._pass_end: tuple[int, int] | None = None  # _position once the current pass has handed out everything
        self._pass: object | None = None  # the current pass (the newest iterator): only it moves _position
        self._consumer = (0, 1)  # (DataLoader worker, workers) of the last pass
        self._remaining: tuple[int, tuple[tuple[int, int], ...]] | None = None  # (epoch, intervals) left
        self._in_worker = False

    # -- epochs and checkpoints ------------------------------------------------------

    @property
    def epoch(self) -> int:
        return int(self._shared[0])

    def set_epoch(self, epoch: int) -> None:
        """Use ``epoch`` for the next pass (as ``DistributedSampler.set_epoch``).  The
        epoch that :meth:`load_state_dict` continues keeps its place: a training loop
        that calls ``set_epoch`` at the top of every epoch resumes where it stopped."""
        epoch = check_int("epoch", epoch, 0)
        if epoch >= 2**63:
            raise ArgumentError(f"epoch must be below 2**63, got {epoch}")
        if self._loaded is not None and epoch == self._loaded[0]:
            return
        self._start_epoch(epoch)

    def _start_epoch(self, epoch: int) -> None:
        with self._lock:
            self._shared[0], self._shared[1] = epoch, 0
        self._forget_position()

    def _forget_position(self) -> None:
        """Drop this consumer's place in the stream (its pass, a loaded state)."""
        self._position, self._pass, self._loaded, self._remaining = None, None, None, None

    def _unit_rows(self, store: BlockStore, slice_mb: float | None) -> int | None:
        """Rows of the plan's unit: ``None`` for whole blocks, else whole slices."""
        if slice_mb is None:
            return None
        check_positive("slice_mb", slice_mb)
        store.require_slices()
        sr = self.layout.slice_rows
        unit = max(1, round(slice_mb * MIB / (sr * self.row_bytes))) * sr
        return None if unit >= self.layout.block_rows else unit

    def _units_of(self, blocks: set[int]) -> tuple[int, ...]:
        """The plan's units whose rows all lie in ``blocks``."""
        if self.unit_rows is None:
            return tuple(sorted(blocks))
        lay, ok = self.layout, np.zeros(self.layout.num_blocks, bool)
        ok[list(blocks)] = True
        starts = np.arange(0, lay.rows, self.unit_rows, dtype=np.int64)
        ends = np.minimum(starts + self.unit_rows, lay.rows) - 1
        return tuple(np.flatnonzero(ok[starts // lay.block_rows] & ok[ends // lay.block_rows]).tolist())

    @property
    def row_bytes(self) -> int:
        """Bytes of one row of the fields read."""
        return sum(self.layout.fields[f].row_bytes for f in self.fields)

    def _window(self, blocks: int | None, mb: float | None, per_block: float) -> int:
        """The window in the plan's units (blocks, or slices with ``slice_mb``)."""
        if blocks is not None and mb is not None:
            raise ArgumentError("give window_blocks or window_mb, not both")
        if mb is None:  # one block's memory by default, however many units fill it
            return max(1, round((1 if blocks is None else check_int("window_blocks", blocks)) * per_block))
        check_positive("window_mb", mb)
        return max(1, int(mb * MIB) // ((self.unit_rows or self.layout.block_rows) * self.row_bytes))

    def plan(self, epoch: int | None = None) -> EpochPlan:
        """This rank's :class:`EpochPlan` for ``epoch`` (default: the current one)."""
        epoch = self.epoch if epoch is None else epoch
        left = self._remaining[1] if self._remaining is not None and self._remaining[0] == epoch else None
        return self._plan_for(epoch, self.rank, self.world_size, self.batch_size, self.drop_last, left)

    def _plan_for(self, epoch: int, rank: int, world_size: int, batch_size: int, drop_last: bool,
                  remaining: tuple[tuple[int, int], ...] | None) -> EpochPlan:
        return EpochPlan(
            rows=self.layout.rows, block_rows=self.unit_rows or self.layout.block_rows, batch_size=batch_size,
            seed=self.seed, epoch=epoch, shuffle=self.shuffle, drop_last=drop_last, rank=rank,
            world_size=world_size, window_blocks=self.window, blocks=self.blocks, remaining=remaining,
        )

    def __len__(self) -> int:
        """Batches of this rank's current epoch.  An epoch continued from one
        consumer's state still counts whole, as ``DataLoader`` and torchdata count a
        resumed epoch from its start; one continued from every consumer's states
        (elastic) counts the rest that this rank is given."""
        return self.plan().num_batches

    def state_dict(self) -> dict[str, Any]:
        """Where this consumer is: ``(epoch, batches consumed)`` plus the settings that
        define the stream.  O(1) in size, or O(consumers of the run it resumed) for an
        epoch continued with another world size."""
        if self._position is not None:
            (epoch, batches), (worker, workers) = self._position, self._consumer
        elif self._loaded is not None:  # not continued yet
            epoch, batches, (worker, workers) = self._loaded
        else:
            epoch, batches, (worker, workers) = self.epoch, 0, self._consumer
        left = self._remaining[1] if self._remaining is not None and self._remaining[0] == epoch else None
        return {**self._stream_settings(), **self._consumer_settings(), "epoch": epoch, "batches": batches,
                "worker": worker, "workers": workers, "remaining": None if left is None else [list(i) for i in left]}

    def load_state_dict(self, state: Mapping[str, Any] | Sequence[Mapping[str, Any]]) -> None:
        """Continue an epoch: the next pass yields exactly what was not delivered yet.

        ``state`` is this consumer's own :meth:`state_dict` (same ranks, batch size
        and DataLoader worker), or the list of the states of *every* consumer of the interrupted run
        (each rank, or each DataLoader worker of each rank; see
        :meth:`global_state_dict`): then any world size, rank and batch size may
        continue it, and the ranks split the undelivered rows between them.
        """
        states = [state] if isinstance(state, Mapping) else list(state)
        for s in states:
            lacking = [k for k in ("epoch", "batches", *self._stream_settings()) if k not in s]
            if lacking:
                raise ArgumentError(f"not a ShardedDataset state: it lacks {', '.join(lacking)}")
        if isinstance(state, Mapping):
            self._check(state, {**self._stream_settings(), **self._consumer_settings()})
            epoch, batches = check_int("epoch", state["epoch"], 0), check_int("batches", state["batches"], 0)
            worker, workers = check_int("worker", state.get("worker", 0), 0), check_int("workers", state.get("workers", 1))
            left = None if state.get("remaining") is None else tuple(tuple(i) for i in state["remaining"])
            first, last = self._plan_for(epoch, self.rank, self.world_size, self.batch_size, self.drop_last,
                                         left).worker_batches(worker, workers)
            if batches > last - first:
                raise ArgumentError(f"state says {batches} batches were consumed, but that consumer's share of "
                                    f"the epoch is {last - first}")
            # A consumer that had handed out its whole share never moves the epoch back: a
            # StatefulDataLoader restored from a checkpoint taken at an epoch's end loads it
            # into workers that run beside those of the next epoch (set with set_epoch).
            if batches == last - first and self.epoch > epoch:
                self._forget_position()
            else:
                self._start_epoch(epoch)
            self._loaded = (epoch, batches, (worker, workers))
            self._remaining = None if left is None else (epoch, left)
            return
        if not states:
            raise ArgumentError("need the states of every consumer of the run, got none")
        for s in states:
            self._check(s, {**self._stream_settings(), "epoch": states[0]["epoch"]})
        consumers = sorted((int(s["rank"]), int(s.get("worker", 0))) for s in states)
        world, workers = int(states[0]["world_size"]), int(states[0].get("workers", 1))
        if consumers != [(r, w) for r in range(world) for w in range(workers)]:
            raise ArgumentError(f"need the states of all {world} x {workers} consumers (rank, worker) of the run, "
                             f"got {consumers}")
        epoch = int(states[0]["epoch"])
        plans = [(self._plan_for(epoch, int(s["rank"]), world, int(s["batch_size"]), bool(s["drop_last"]),
                                 None if s.get("remaining") is None else tuple(map(tuple, s["remaining"]))),
                  int(s.get("worker", 0)), workers, int(s["batches"])) for s in states]
        self._start_epoch(epoch)
        self._loaded, self._remaining = (epoch, 0, self._consumer), (epoch, undelivered(plans))

    def global_state_dict(self) -> list[dict[str, Any]]:
        """The states of every rank (gathered over ``torch.distributed`` when it is
        initialized), for :meth:`load_state_dict` with any world size.  Call it on
        every rank; it covers consumers in the main process (``num_workers=0``)."""
        mine = self.state_dict()
        if not (dist.is_available() and dist.is_initialized()):
            return [mine]
        gathered: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, mine)
        return gathered

    @staticmethod
    def _check(state: Mapping[str, Any], mine: Mapping[str, Any]) -> None:
        differ = {k: (state.get(k), v) for k, v in mine.items() if k in state and state[k] != v}
        if differ:
            detail = ", ".join(f"{k}={a!r} (this dataset: {b!r})" for k, (a, b) in differ.items())
            raise ArgumentError(f"state is for another stream: {detail}")

    def _stream_settings(self) -> dict[str, Any]:
        """What defines the epoch's stream (must match to continue it)."""
        return {
            "store": self.layout.fingerprint(), "seed": self.seed, "shuffle": self.shuffle, "rows": self.layout.rows,
            "window": self.window, "unit_rows": self.unit_rows,
            "blocks": self.layout.num_blocks if self.blocks is None else len(self.blocks),
        }

    def _consumer_settings(self) -> dict[str, Any]:
        """How this run splits the stream (may change between runs, see :meth:`load_state_dict`)."""
        return {"world_size": self.world_size, "rank": self.rank, "batch_size": self.batch_size,
                "drop_last": self.drop_last}

    # -- iteration ------------------------------------------------------------------

    def __iter__(self) -> Iterator[Batch]:
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        epoch, skip, (w, n) = self._loaded or (None, 0, (worker, num_workers))
        if skip and (worker, num_workers) != (w, n):  # checked first: the state stays loaded
            raise ArgumentError(f"this state continues DataLoader worker {w} of {n}, not worker {worker} of "
                                f"{num_workers}: continue with num_workers={0 if n == 1 else n} (each worker with "
                                "its own state), or load the states of every consumer (global_state_dict)")
        self._in_worker = info is not None
        if info is not None:
            _quiet_worker()
        if self._position is not None and self._position == self._pass_end:
            # The last pass handed out all its batches but was never run to its end
            # (``islice(ds, len(ds))``): its epoch is over all the same.
            self._finish_epoch(self._position[0], self._consumer[1])
        plan, self._loaded = self.plan(epoch), None
        self._consumer = (worker, num_workers)
        first, last = plan.worker_batches(worker, num_workers)
        self._pass_end = (plan.epoch, last - first)
        self._position, self._pass = (plan.epoch, skip), object()
        first = min(first + skip, last)
        return self._batches(plan, first, last, num_workers, self._pass)

    def _batches(self, plan: EpochPlan, first: int, last: int, num_workers: int, token: object) -> Iterator[Batch]:
        store = self._open()
        # Taken while in use, so a second live iterator gets buffers of its own.
        buffers, self._buffers = self._buffers, None
        ahead, self._ahead = self._ahead, None
        reader = None
        if ahead is not None:
            pid, following, finalizer = ahead
            finalizer.detach()
            if pid == os.getpid():  # one made before a fork has no threads in this process
                if (following.plan, following.span) == (plan, (first, last)):
                    reader = following
                else:
                    following.close()
        in_place = self.unit_rows is not None and self.row_bytes >= IN_PLACE_ROW_BYTES
        if reader is None:
            if buffers is None or buffers.key != (tuple(self.fields), plan.window + self.prefetch, self.unit_rows,
                                                  in_place):
                buffers = None  # free the old ones first
                buffers = _Buffers(store, self.fields, plan.window + self.prefetch, self.unit_rows, in_place)
            reader = _BlockReader(store, plan, self.fields, (first, last), self.prefetch, self.on_error, buffers,
                                  self.unit_rows is not None, self.direct)
        reader.follow_with(functools.partial(self._following, plan, token))
        delivered = False
        try:
            yield from self._assemble(reader, token)
            delivered = True
        finally:
            # The pass that reads on into the next epoch is kept for it (its reads land in
            # the buffers); else every thread stops: nothing writes into the buffers after this.
            following = reader.hand_over() if delivered and self._pass is token else None
            if following is None:
                reader.close()
            else:
                self._ahead = (os.getpid(), following, weakref.finalize(self, _close_aside, following))
            self._buffers = reader.buffers
        self._finish_epoch(plan.epoch, num_workers, token)

    def _following(self, plan: EpochPlan, token: object) -> tuple[EpochPlan, tuple[int, int]] | None:
        """The plan and batch range of this consumer's next pass, if pass ``token`` (of
        ``plan``) is still the current one and the next is the next epoch from its start."""
        if self._pass is not token or plan.epoch + 1 >= 2**63:
            return None
        following = self._plan_for(plan.epoch + 1, plan.rank, plan.world_size, plan.batch_size, plan.drop_last, None)
        return following, following.worker_batches(*self._consumer)

    def _assemble(self, reader: "_BlockReader", token: object) -> Iterator[Batch]:
        """Cut the stream of gathered chunks into batches.

        A batch never aliases a reused block buffer: batches view the gathered
        chunks, whose arrays are reused only once no batch views them
        (:class:`_ChunkArrays`).  A batch that spans two pieces is concatenated
        from its two parts.
        """
        bs, have = self.batch_size, 0
        carry: list[list[torch.Tensor]] = []
        chunk = max(1, GATHER_BYTES // (self.row_bytes * bs)) * bs
        with contextlib.closing(_ahead(_gathered(reader, self.fields, bs, chunk))) as chunks:
            for gathered in chunks:
                n, pos = len(gathered[0]), 0
                if have:  # finish the batch that started in the previous piece
                    pos = min(bs - have, n)
                    carry.append([g[:pos] for g in gathered])
                    have += pos
                    if have < bs:
                        continue
                    yield self._emit([_joined(parts) for parts in zip(*carry)], token)
                    carry, have = [], 0
                full = (n - pos) // bs * bs
                # one split per field: slicing a tensor costs more than a microsecond a call
                for views in zip(*(g[pos : pos + full].split(bs) for g in gathered)) if full else ():
                    yield self._emit(list(views), token)
                if pos + full < n:  # only a piece's last chunk can leave a remainder
                    carry, have = [[g[pos + full :] for g in gathered]], n - pos - full
        if have:
            yield self._emit([_joined(parts) for parts in zip(*carry)], token)

    def _emit(self, tensors: list[torch.Tensor], token: object) -> Batch:
        if self._in_worker:
            tensors = _packed(tensors)
        if self._pass is token:  # an older iterator, or one that set_epoch has reset, counts no more
            epoch, done = self._position
            self._position = (epoch, done + 1)
        return tuple(tensors) if self.as_tuple else dict(zip(self.fields, tensors))

    def _finish_epoch(self, epoch: int, num_workers: int, token: object | None = None) -> None:
        """End ``epoch`` for this consumer: the pass ``token`` (default: the current one)
        delivered its share."""
        if token is None or self._pass is token:
            self._position = (epoch + 1, 0)
        with self._lock:
            if self._shared[0] != epoch:  # set_epoch was called meanwhile
                return
            self._shared[1] += 1
            if self._shared[1] >= num_workers:
                self._shared[0], self._shared[1] = epoch + 1, 0

    def _open(self) -> BlockStore:
        # One store handle per process: never reuse a handle across fork or spawn.
        if self._store is None or self._store_pid != os.getpid():
            self._store, self._store_pid = BlockStore.open(self.path, storage_options=self.storage_options), os.getpid()
        return self._store

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_store"] = state["_buffers"] = state["_ahead"] = None
        return state


class _Buffers:
    """A consumer's block slots, row orders and gather indices, kept across epochs.

    One slot holds a block (or a slice unit) of every field, the same rows in
    each, with room for the checksum trailer and for a read with ``O_DIRECT``
    rounded up to 4 KiB.  Reusing them across epochs saves faulting the pages in
    again, and reusing the scratch arrays keeps the heap from fragmenting: peak RSS
    at prefetch=1 in ``python -m benchmarks.bench_read`` went from 3.07 blocks to
    2.37 when they came in, and is 2.61-2.64 with the O_DIRECT room, the
    ``(slots, rows)`` row orders and 8 MiB gather chunks (``benchmarks/results/read.json``).
    """

    def __init__(self, store: BlockStore, fields: list[str], slots: int, unit_rows: int | None = None,
                 in_place: bool = False) -> None:
        layout = store.layout
        self.key, self.slots = (tuple(fields), slots, unit_rows, in_place), slots
        row_bytes = [layout.fields[f].row_bytes for f in fields]
        self.in_place, self.align_rows = False, 1
        if unit_rows is None:  # room for a chunk file read with O_DIRECT, every slot of every field aligned for it
            need = max(-(-direct_nbytes(store.block_nbytes(f) + CRC_BYTES) // rb) for f, rb in zip(fields, row_bytes))
            step = math.lcm(*(DIRECT_ALIGN // math.gcd(DIRECT_ALIGN, rb) for rb in row_bytes))
            self.slot_rows = -(-need // step) * step
        else:
            self.slot_rows = unit_rows
            if in_place:
                # A unit's rows go to the row that puts the widest field's first byte where
                # the file has it in a 4 KiB page (row_shift), with room around them for the
                # aligned read; slots are a whole number of such steps, so each starts on a
                # page (as the ring does).  Where that room is over a 16th of a unit (an
                # awkward row width), the unit is copied in its row order instead.
                widest = max(row_bytes)
                step = DIRECT_ALIGN // math.gcd(DIRECT_ALIGN, widest)
                need = step - 1 + unit_rows + -(-DIRECT_ALIGN // widest)
                if need - unit_rows <= unit_rows // 16:
                    self.in_place, self.align_rows, self.slot_rows = True, step, -(-need // step) * step
        self.raw = {f: aligned_buffer(slots * self.slot_rows * rb) for f, rb in zip(fields, row_bytes)}
        self.rings = {f: self.raw[f].view(layout.fields[f].dtype).reshape(slots * self.slot_rows, *layout.fields[f].shape)
                      for f in fields}
        self.orders = np.empty((slots, self.slot_rows), np.int32)  # row orders, by slot
        self.index_dtype = np.int32 if slots * self.slot_rows < 2**31 else np.int64
        self.indices: list[np.ndarray] = []

    def slot(self, field: str, slot: int) -> np.ndarray:
        """The raw bytes of ``slot`` of ``field`` (a buffer for ``BlockStore.read_block``)."""
        size = len(self.raw[field]) // self.slots
        return self.raw[field][slot * size : (slot + 1) * size]

    def row_shift(self, first: int) -> int:
        """Where in its slot a unit whose first row is row ``first`` of its block starts
        (0 unless units are read in place)."""
        return first % self.align_rows if self.in_place else 0

    def index_buffer(self) -> np.ndarray:
        """Room for one piece's gather index (a stage has at most a block's rows plus one per block)."""
        return self.indices.pop() if self.indices else np.empty(self.slot_rows + self.slots, self.index_dtype)


class _BlockReader:
    """Load the blocks a consumer's pieces need, ahead of the consumer.

    Blocks go into a ring of ``window + prefetch`` slots per field, one array per
    field, so a stage that mixes several blocks is gathered with one ``np.take``.
    Each field of a unit is its own read.  Blocks are read on ``max(1, prefetch)``
    I/O threads (at most ``IO_THREADS``); slice units keep about
    ``SLICE_IO_BYTES`` of reads in flight, from one thread with Linux AIO when
    they are read with ``O_DIRECT`` from local files (:mod:`shardset.direct_io`).
    Block row orders and each piece's gather index are computed on a separate
    thread, and block checksums on another, so none waits for the others (all
    release the GIL).  A slice
    unit's row order is computed when its load starts, and its reads store the
    rows in that order.  A block's slot is reused once the consumer is past the
    last stage that needs it.  Iterating yields ``(ring rows by field, gather
    index)`` per piece, in stream order.

    Slice units of wide rows are read in place instead (``_Buffers.in_place``): as
    stored, at a row of their slot that lets an ``O_DIRECT`` read land there, with
    their row orders computed on the separate thread as for blocks.

    Past its last load, a reader can hand the slots it frees to the next pass's
    reader, on the same threads (:meth:`follow_with`, :meth:`hand_over`).
    """

    def __init__(self, store: BlockStore, plan: EpochPlan, fields: list[str], span: tuple[int, int], prefetch: int,
                 on_error: str, buffers: "_Buffers", slices: bool = False, direct: bool = False,
                 threads: "_ReadThreads | None" = None, slots: Sequence[int] | None = None) -> None:
        self.store, self.plan, self.fields, self.on_error, self.slices = store, plan, fields, on_error, slices
        self.prefetch, self.direct = prefetch, direct
        self.ordered = slices and not buffers.in_place  # slots hold their units in their row order
        self.span = span  # the batches [first, last) of the plan that this pass delivers
        self.pieces: list[Piece] = list(plan.pieces(*span))
        self.window = plan.window
        self.buffers, self.rings, self.slot_rows = buffers, buffers.rings, buffers.slot_rows
        self.free = list(range(buffers.slots))[::-1] if slots is None else list(slots)
        self.threads = threads or _ReadThreads(store, plan, fields, prefetch, slices, direct)
        self.io, self.cpu, self.checks = self.threads.io, self.threads.cpu, self.threads.checks
        # The pass that follows this one, once known (see follow_with): it gets the slots
        # this pass frees after its last load, and starts its own loads in them.
        self.then: Callable[[], tuple[EpochPlan, tuple[int, int]] | None] | None = None
        self.successor: _BlockReader | None = None
        self.slot_of: dict[int, int] = {}  # visit index -> slot
        self.loads: dict[int, Future] = {}
        # visit index -> slot, for the gather indices computed on the CPU thread: set when the
        # load is submitted and never removed (slot_of loses a visit once it is retired).  A
        # slot's row order is filled by a task on that single thread, so every later task
        # there sees it done.
        self.slot_by_visit = np.zeros(plan.num_blocks, np.int64)
        self.shift_by_visit = np.zeros(plan.num_blocks, np.int64)  # the same for the rows' place in their slot
        self.order_error: BaseException | None = None
        self.indices: deque[Future] = deque()
        self.indexed = 0  # pieces whose gather index has been submitted
        # Every visit k feeds stages k .. k+W-1; it is needed if a piece is in one of
        # them, until the last such piece (monotone in k, as the pieces' stages are).
        stages = np.fromiter((p.stage for p in self.pieces), np.int64, len(self.pieces))
        ks = np.arange(max(0, stages[0] - self.window + 1) if len(stages) else 0,
                       min(stages[-1] + 1, plan.num_blocks) if len(stages) else 0)
        last = np.searchsorted(stages, ks + self.window - 1, side="right") - 1
        used = (last >= 0) & (stages[np.maximum(last, 0)] >= ks) if len(stages) else np.zeros(0, bool)
        self.visits, self.last_use = ks[used].tolist(), last[used].tolist()  # in visit order
        self.needed = deque(self.visits)  # visits still to load
        self.waited = self.freed = 0  # visits waited for / retired, as counts into self.visits

    def _load(self, unit: int, slot: int, shift: int) -> list[Future]:
        """Start reading ``unit`` into ``slot`` (its rows from row ``shift`` on): one read
        per field, in flight together."""
        if self.ordered:
            # A unit of slices is stored in the slot already in its row order (gathered in the
            # copy out of the read buffer), so the stages read each unit in sequence: 4-5x
            # cheaper than gathering random rows of 100+ units (a one-off timing here).
            self.plan.block_order(unit, self.buffers.orders[slot])
        else:
            self.cpu.submit(self._order, unit, self.buffers.orders[slot])
            self._will_need(unit)  # every field's whole chunk is requested before the first read waits
        if self.slices:
            return [self.io.submit(self._field_steps(unit, slot, f, shift)) for f in self.fields]
        return [self._checked(self.io.submit(self._field_steps(unit, slot, f, shift, verify=False)), f, unit, slot)
                for f in self.fields]

    def _checked(self, read: Future, field: str, block: int, slot: int) -> Future:
        """A future of ``read`` (of a whole block into ``slot``, unverified) that also has
        the block's checksum checked, on a thread of its own once the bytes have arrived.

        Checked on the I/O thread, a block's checksum held back the next block's read:
        with one block read ahead, W = 1 read cold 128 MiB blocks (d = 256) at 0.68 of
        ``O_DIRECT`` with the check there and 0.82 without it (medians of 6 epochs,
        alternating, 2026-11-28).  On the row-order thread it queued behind the row
        orders: 0.78 against 0.82 on a thread of its own (4 alternating epochs each).
        """
        checked: Future = Future()

        def check() -> None:
            try:
                read.result()
                self.store.check_block(field, block, self.buffers.slot(field, slot))
            except BaseException as exc:
                checked.set_exception(exc)
            else:
                checked.set_result(None)

        def submit(_: Future) -> None:
            try:
                self.checks.submit(check)
            except RuntimeError as exc:  # the thread is shut down: closed, or the interpreter is exiting
                checked.set_exception(exc)

        read.add_done_callback(submit)
        return checked

    def _field_steps(self, unit: int, slot: int, field: str, shift: int, verify: bool = True) -> Steps[None]:
        """Read ``field`` of ``unit`` into ``slot``: a block as stored (its checksum left
        to :meth:`_checked` without ``verify``); a slice unit in the slot's row order, or
        in place as stored from row ``shift`` on."""
        if not self.slices:
            self.store.read_block(field, unit, self.buffers.slot(field, slot), direct=self.direct, verify=verify)
            return
        start, rows, room = unit * self.plan.block_rows, self.plan.block_size(unit), self.buffers.slot(field, slot)
        if self.ordered:
            yield from self.store.read_rows_steps(field, start, start + rows, room, direct=self.direct,
                                                  order=self.buffers.orders[slot][:rows])
        else:
            at = shift * self.store.layout.fields[field].row_bytes
            yield from self.store.read_rows_steps(field, start, start + rows, room, direct=self.direct, at=at)

    def _wait(self, k: int) -> None:
        """Wait for the reads of visit ``k``; with ``on_error="skip"``, replace a unit
        that failed its checks (on this thread: a rare, slow path)."""
        error = None
        for future in self.loads[k]:
            try:
                future.result()
            except CorruptBlockError as err:
                error = error or err
        if error is None:
            return
        if self.on_error != "skip":
            raise error
        slot, shift = self.slot_of[k], int(self.shift_by_visit[k])
        run_steps(self._substitute_steps(k, self.plan.block_at(k), slot, shift, error))

    def _read_steps(self, unit: int, slot: int, shift: int) -> Steps[None]:
        """Read every field of ``unit`` into ``slot``, one after the other."""
        if self.ordered:
            self.plan.block_order(unit, self.buffers.orders[slot])
        for f in self.fields:
            yield from self._field_steps(unit, slot, f, shift)

    def _name(self, unit: int) -> str:
        if not self.slices:
            return f"block {unit}"
        start = unit * self.plan.block_rows
        return f"rows [{start}, {start + self.plan.block_size(unit)})"

    def _will_need(self, unit: int) -> None:
        """Hint the kernel to read block ``unit`` (slices have several reads
        in flight instead: a hint costs an open, as much as a slice's read; direct reads
        bypass the cache a hint would fill)."""
        if not self.slices and not self.direct:
            for f in self.fields:
                self.store.will_need(f, unit)

    def _substitute_steps(self, k: int, block: int, slot: int, shift: int, err: CorruptBlockError) -> Steps[None]:
        """Fill ``slot`` (from row ``shift`` on, where the failed block's rows were to go)
        with the next readable block of the visit order that has at least as many rows,
        so batch counts stay equal on every rank.  Its rows take the failed block's
        row order where the reads do not order them."""
        plan = self.plan
        for j in range(1, plan.num_blocks):
            other = plan.block_at((k + j) % plan.num_blocks)
            if plan.block_size(other) < plan.block_size(block):
                continue
            try:
                yield from self._read_steps(other, slot, shift)
            except CorruptBlockError:
                continue
            warnings.warn(f"skipping {self._name(block)}: {err}; its rows are replaced by those of "
                          f"{self._name(other)}", RuntimeWarning, stacklevel=2)
            return
        raise err

    def follow_with(self, then: Callable[[], tuple[EpochPlan, tuple[int, int]] | None]) -> None:
        """Read on into the pass ``then()`` gives (its plan and batch range; ``None``: none)
        once this pass has started its last load, in the slots it frees from then on.

        The last ``W - 1`` stages of a window need no reads (0.12 s of a 1.3 s epoch
        of a 4 GiB store in 1/24-block slices with a 7-block window); the next epoch's
        first units are read meanwhile, so epochs run back to back keep the disk busy.
        Take the pass that reads on with :meth:`hand_over`.
        """
        self.then = then

    def hand_over(self) -> "_BlockReader | None":
        """After the last piece: the following pass (see :meth:`follow_with`), which now
        owns the threads and every slot, or ``None`` if there is none (then close this one)."""
        self._read_on()
        successor, self.successor = self.successor, None
        return successor

    def _read_on(self) -> None:
        """Past this pass's last load: give its free slots to the following pass."""
        if self.needed or (self.then is None and self.successor is None):
            return
        if self.successor is None:
            following, self.then = self.then(), None
            if following is None:
                return
            plan, span = following
            self.successor = _BlockReader(self.store, plan, self.fields, span, self.prefetch, self.on_error,
                                          self.buffers, self.slices, self.direct, threads=self.threads, slots=())
        self.successor.free += self.free
        self.free.clear()
        self.successor._advance()

    def _advance(self) -> None:
        plan = self.plan
        while self.free and self.needed:
            k, slot = self.needed.popleft(), self.free.pop()
            unit = plan.block_at(k)
            shift = self.buffers.row_shift(unit * plan.block_rows % self.store.layout.block_rows)
            self.slot_of[k] = slot
            self.loads[k] = self._load(unit, slot, shift)
            self.slot_by_visit[k], self.shift_by_visit[k] = slot, shift
            for ahead in itertools.islice(self.needed, 2):  # the disk reads ahead of the buffers
                self._will_need(plan.block_at(ahead))
        while self.indexed < len(self.pieces):
            stage = self.pieces[self.indexed].stage
            if plan.visits_of(stage)[-1] not in self.slot_of:  # slots go to visits in order
                return
            self.indices.append(self.cpu.submit(self._index, self.pieces[self.indexed], self.buffers.index_buffer()))
            self.indexed += 1
        self._read_on()

    def __iter__(self) -> Iterator[tuple[dict[str, np.ndarray], np.ndarray]]:
        visits, last_use = self.visits, self.last_use
        for i, piece in enumerate(self.pieces):
            self._advance()
            index = self.indices.popleft().result()
            newest = self.plan.visits_of(piece.stage)[-1]
            while self.waited < len(visits) and visits[self.waited] <= newest:
                self._wait(visits[self.waited])
                self.waited += 1
            yield self.rings, index
            self.buffers.indices.append(index.base if index.base is not None else index)
            while self.freed < len(visits) and last_use[self.freed] <= i:  # retire what no later piece needs
                k = visits[self.freed]
                self.free.append(self.slot_of.pop(k))
                del self.loads[k]
                self.freed += 1

    def _order(self, block: int, out: np.ndarray) -> None:
        try:
            self.plan.block_order(block, out)
        except BaseException as exc:  # raised by the next gather index, and so by the next batch
            self.order_error = exc

    def _index(self, piece: Piece, out: np.ndarray) -> np.ndarray:
        if self.order_error is not None:
            raise self.order_error
        return self.plan.piece_index(piece, self._rows, out)

    def _rows(self, visits: np.ndarray, firsts: np.ndarray, out: np.ndarray) -> None:
        """Write the ring rows at positions ``firsts[j] ..`` of visit ``visits[j]``'s row
        order into column ``j`` of ``out`` (an ``EpochPlan.piece_index`` lookup)."""
        slots = self.slot_by_visit[visits]
        base, orders = slots * self.slot_rows + self.shift_by_visit[visits], self.buffers.orders
        m, w = out.shape
        if self.ordered:  # a slot holds its unit in its row order
            np.add(base + firsts, np.arange(m)[:, None], out=out, casting="unsafe")
        elif w <= 16:  # a few long runs: one add each, no temporaries
            for j, (slot, first) in enumerate(zip(slots.tolist(), firsts.tolist())):
                np.add(orders[slot, first : first + m], base[j], out=out[:, j], dtype=out.dtype)
        else:  # many short runs (a window of many small blocks): one gather for all
            np.add(orders[slots, firsts + np.arange(m)[:, None]], base, out=out, casting="unsafe")

    def close(self) -> None:
        """Stop the threads (this pass's and any following pass's): nothing writes into
        the buffers after this."""
        self.threads.close()
        self.successor = self.then = None


class _ReadThreads:
    """The threads of a consumer's block readers, which a pass hands on to the next
    (:meth:`_BlockReader.follow_with`): the I/O driver, the row-order thread and,
    for whole blocks, the checksum thread."""

    def __init__(self, store: BlockStore, plan: EpochPlan, fields: list[str], prefetch: int, slices: bool,
                 direct: bool) -> None:
        most = IO_THREADS
        if slices:  # plan.block_rows is the unit's
            unit_bytes = plan.block_rows * sum(store.layout.fields[f].row_bytes for f in fields)
            most = min(SLICE_IO_THREADS, max(4, SLICE_IO_BYTES // unit_bytes))
        depth, local = min(max(1, prefetch), most), store.chunk_path(fields[0], 0) is not None
        self.io: AsyncDirectReads | ThreadedSteps | None = None
        if slices and direct and local:
            with contextlib.suppress(OSError):  # no AIO here, or the system's AIO contexts are used up
                self.io = AsyncDirectReads(depth * len(fields))  # each field's reads in flight together
        if self.io is None:
            self.io = ThreadedSteps(depth, thread_name_prefix="shardset-read")
        # One intra-op thread for this thread's torch calls (a thread-local setting):
        # randperm of over 32k rows otherwise wakes the intra-op pool, which cost
        # 20 ms instead of 0.3 ms for 61k rows (a one-off timing on a busy 2-core machine).
        self.cpu = ThreadPoolExecutor(1, thread_name_prefix="shardset-order", initializer=torch.set_num_threads,
                                      initargs=(1,))
        # Whole blocks' checksums, checked beside both the reads and the row orders (see _checked).
        self.checks = None if slices else ThreadPoolExecutor(1, thread_name_prefix="shardset-check")

    def close(self) -> None:
        self.io.shutdown(wait=True, cancel_futures=True)  # before the checks: a finished read submits one
        for pool in (self.checks, self.cpu):
            if pool is not None:
                pool.shutdown(wait=True, cancel_futures=True)


def _joined(parts: list[torch.Tensor]) -> torch.Tensor:
    """The rows of ``parts`` (CPU tensors over numpy arrays) in one tensor, joined by
    numpy on the calling thread.

    ``torch.cat`` of a batch of wide rows runs on torch's intra-op threads once the
    process has started them (any torch call that asks for them does, even
    ``torch.get_num_threads()``), and on two cores those competed with the reader's
    threads at each of the stream's joins (about one a stage): after a
    ``torch.get_num_threads()``, 1/24-block slices read at 0.70 of ``O_DIRECT``
    instead of 0.90, and at 0.98 with this join (d = 256, one run each of
    ``bench_slices``' throughput part, 3 rounds, 2026-11-28).
    """
    return torch.from_numpy(np.concatenate([p.numpy() for p in parts]))


def _close_aside(reader: "_BlockReader") -> None:
    """Close ``reader`` on a thread of its own: a finalizer runs wherever a garbage
    collection happens, which may be one of the threads ``close`` waits for."""
    threading.Thread(target=reader.close, name="shardset-close", daemon=True).start()


def _packed(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Copies of ``tensors`` that are views of one fresh shared-memory storage.

    A DataLoader worker sends each storage to the main process as a shared-memory
    segment: a view of the gathered chunk would ship the whole chunk, and one
    storage per field costs one segment per field (1.5x slower measured with two
    workers, batch 1024, d = 16).  A storage made in shared memory is sent as it
    is, where an ordinary one would be copied into a segment first (what
    ``default_collate`` does in a worker too).
    """
    sizes = [t.numel() * t.element_size() for t in tensors]
    offsets, total = [], 0
    for t, n in zip(tensors, sizes):
        total = -(-total // t.element_size()) * t.element_size()  # each field aligned for its dtype (complex128: 16)
        offsets.append(total)
        total += n
    flat = torch.empty(0, dtype=torch.uint8).set_(torch.UntypedStorage._new_shared(total))
    out = []
    for t, off, n in zip(tensors, offsets, sizes):
        view = flat[off : off + n].view(t.dtype).view(t.shape)
        view.copy_(t)
        out.append(view)
    return out


def _gathered(reader: "_BlockReader", fields: list[str], batch_size: int, chunk: int) -> Iterator[list[torch.Tensor]]:
    """The rows of the reader's pieces, gathered ``chunk`` rows (a multiple of the batch
    size) at a time (one gather per field amortizes the call) into tensors over
    arrays that no earlier batch still views (:class:`_ChunkArrays`).

    Chunks are cut on batch boundaries of the whole stream: after a piece that ends
    mid-batch, the next chunk holds just the rows that complete the batch.
    """
    done, arrays = 0, {f: _ChunkArrays(reader.rings[f], chunk) for f in fields}
    for rings, index in reader:
        pos = 0
        while pos < len(index):
            stop = min(len(index), pos + (-done % batch_size or chunk))
            # np.take is about twice as fast with intp indices as with the int32 ones
            # kept in the index buffers (a one-off timing here: 4.6 vs 10.8 ns a row of y)
            rows = index[pos:stop].astype(np.intp, copy=False)
            yield [_gather(rings[f], rows, arrays[f].next(stop - pos)) for f in fields]
            done += stop - pos
            pos = stop


def _ahead(items: Iterator[Any], depth: int = 2) -> Iterator[Any]:
    """Yield ``items``, produced on a thread of their own up to ``depth`` ahead.

    The gather of rows from random places in a window of blocks is the costliest
    step of a batch (memory bound: about 20 ns a row and field in a 1 GiB window,
    a one-off timing here); on its own thread it overlaps the consumer's slicing
    and the training step, as ``np.take`` releases the GIL.  The generator runs
    on one thread at a time and is closed by the caller's thread once nothing
    runs it any more.
    """
    end = object()
    # One intra-op thread for torch there (a thread-local setting): the reader starts
    # its loads on this thread, and a slice unit's randperm of over 32k rows would
    # otherwise wake the intra-op pool (see _BlockReader).
    pool = ThreadPoolExecutor(1, thread_name_prefix="shardset-gather", initializer=torch.set_num_threads,
                              initargs=(1,))
    pending = deque(pool.submit(next, items, end) for _ in range(depth))
    try:
        while (item := pending.popleft().result()) is not end:
            pending.append(pool.submit(next, items, end))
            yield item
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        items.close()


class _ChunkArrays:
    """The arrays one field's gathered chunks are written into, each reused once no
    batch views the chunk it held.

    A fresh array per chunk cost more than the gather into it: freed chunks went
    back to the kernel, and ``perf`` showed 14 % of the reader's CPU in zeroing the
    fresh pages of the next ones (1/32-block slices, d = 256; the steady rate rose
    from 0.59-0.77 to 0.70-0.78 of ``O_DIRECT`` without it, 3 alternating rounds).
    A finalizer on the view handed out returns its array when the last tensor that
    holds it is gone, so a consumer that keeps its batches only makes new arrays
    be allocated; at most ``keep`` wait for reuse.

    Example:
        >>> arrays = _ChunkArrays(np.zeros((10, 3), np.float32), rows=4)
        >>> a = arrays.next(4); base = a.base
        >>> del a
        >>> arrays.next(2).base is base
        True
    """

    def __init__(self, ring: np.ndarray, rows: int, keep: int = 4) -> None:
        self._shape, self._dtype, self._keep = (rows, *ring.shape[1:]), ring.dtype, keep
        self._nbytes = rows * ring.itemsize * math.prod(ring.shape[1:])
        self._spare: deque[np.ndarray] = deque()

    def next(self, rows: int) -> np.ndarray:
        """An array of ``rows`` rows (at most the chunk's) that no batch views."""
        try:
            array = self._spare.pop()
        except IndexError:
            raw = aligned_buffer(self._nbytes, hugepages=self._nbytes >= HUGE_PAGE_BYTES)
            array = raw.view(self._dtype).reshape(self._shape)
        out = array[:rows]
        weakref.finalize(out, self._give_back, array)
        return out

    def _give_back(self, array: np.ndarray) -> None:
        if len(self._spare) < self._keep:
            self._spare.append(array)


def _gather(block: np.ndarray, rows: np.ndarray, out: np.ndarray) -> torch.Tensor:
    # numpy's take is single-threaded: torch's index_select splits a gather over the
    # intra-op pool and runs ~3x slower when another thread (the block reader, or the
    # training step) competes for the same two cores.  (``out`` with mode="raise" would
    # be filled through a temporary copy; the plan's indices are in range.)
    np.take(block, rows, axis=0, out=out, mode="clip")
    return torch.from_numpy(out)


def _resolve_rank(rank: int | None, world_size: int | None) -> tuple[int, int]:
    distributed = dist.is_available() and dist.is_initialized()
    if world_size is None:
        world_size = dist.get_world_size() if distributed else 1
    if rank is None:
        if not distributed and world_size != 1:
            raise ArgumentError(f"world_size={world_size} needs rank= as well (or an initialized torch.distributed)")
        rank = dist.get_rank() if distributed else 0
    for name, value in (("rank", rank), ("world_size", world_size)):
        if not is_integer(value):
            raise ArgumentError(f"{name} must be an integer, got {value!r}")
    if world_size < 1 or not 0 <= rank < world_size:
        raise ArgumentError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
    return int(rank), int(world_size)


def _ram_bytes() -> int:
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):  # not POSIX: assume plenty
        return 1 << 62


def _quiet_worker() -> None:
    """Inside a DataLoader worker: keep zarr's thread pool small on few cores."""
    import zarr

    zarr.config.set({"threading.max_workers": 1})
