"""``shardset verify``: check every block of a store; audit and repair synthetic stores.

A plain check reads every block recorded complete, field by field, through
:meth:`BlockStore.read_block`, which insists on the chunk existing, having its
exact size and passing its CRC-32C, and checks the block's slice checksums
(where the store has them) against the same bytes; blocks not recorded
complete are faults too.  ``deep=True`` (synthetic stores only) also regenerates each block from
``(seed, block)`` with the generator recorded in the attributes and compares
the bytes: the store is a pure function of its parameters, so this is an exact
audit that also covers stores written without checksums.  ``repair=True``
takes the writer lock, marks the faulty blocks incomplete and rewrites them
through the writer's own loop (:func:`shardset.writer.write_some_blocks`), then
checks them again.  Blocks are checked in parallel over ``workers`` processes.

Example:
    >>> import tempfile, os
    >>> from shardset import generate_regression
    >>> path = os.path.join(tempfile.mkdtemp(), "reg.zarr")
    >>> _ = generate_regression(path, rows=1000, features=2, block_rows=300, workers=1)
    >>> os.remove(os.path.join(path, "X", "c", "2", "0"))
    >>> report = verify(path, workers=1)
    >>> report.ok, [(f.block, f.field) for f in report.faults]
    (False, [(2, 'X')])
    >>> verify(path, repair=True, workers=1).repaired, verify(path, deep=True, workers=1).ok
    ([2], True)
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any, Iterator, Mapping

import numpy as np
from tqdm import tqdm

from .errors import CorruptBlockError
from .lock import WriterLock, metadata_mutex, writer_lock
from .store import BlockStore
from .synthetic import RegressionBlocks, regression_blocks
from .writer import _resolve_workers, process_context, write_some_blocks

__all__ = ["verify", "Fault", "VerifyReport"]

_SHOWN = 20  # faults listed in a summary


@dataclass(frozen=True)
class Fault:
    """One problem: ``field`` is ``None`` when the whole block is not recorded complete."""

    block: int
    field: str | None
    problem: str


@dataclass
class VerifyReport:
    """What :func:`verify` found (``faults``), rewrote (``repaired``) and what is still wrong."""

    path: str
    blocks: int
    fields: list[str]
    checksummed: bool
    deep: bool
    checked_bytes: int = 0
    seconds: float = 0.0
    faults: list[Fault] = field(default_factory=list)
    repaired: list[int] = field(default_factory=list)
    remaining: list[Fault] = field(default_factory=list)
    partial_files: int = 0
    writers: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when no fault is left (none found, or all repaired)."""
        return not self.remaining

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "ok": self.ok}

    def summary(self) -> str:
        what = "present with the right size" + (" and checksum" if self.checksummed else "")
        if self.deep:
            what += ", equal to its regeneration from (seed, block)"
        lines = [
            f"{self.path}: {self.blocks} blocks x {len(self.fields)} fields, {self.checked_bytes / 2**20:,.1f} MiB "
            f"checked in {self.seconds:.1f} s{' (deep)' if self.deep else ''}"
        ]
        if not self.checksummed and not self.deep:
            lines.append("note: no checksums in this store; only presence and size were checked (--deep compares bytes)")
        for w in self.writers:
            lines.append(f"note: being written by {w}; its unfinished blocks show as faults")
        if self.partial_files:
            lines.append(f"note: {self.partial_files} temporary *.partial files (a rerun of the writer removes them)")
        if self.faults:
            bad = sorted({f.block for f in self.faults})
            lines.append(f"found {len(self.faults)} faults in {len(bad)} of {self.blocks} blocks:")
            lines += [f"  {f.problem}" for f in self.faults[:_SHOWN]]
            if len(self.faults) > _SHOWN:
                lines.append(f"  ... and {len(self.faults) - _SHOWN} more")
        if self.repaired:
            lines.append(f"repaired {len(self.repaired)} blocks: {_short_list(self.repaired)}")
        lines.append(f"OK: every block is {what}" if self.ok else f"FAULTY: {len({f.block for f in self.remaining})} "
                     f"blocks still bad" + ("" if self.repaired else " (--repair rewrites them in a synthetic store)"))
        return "\n".join(lines)


def verify(
    path: str | os.PathLike,
    *,
    deep: bool = False,
    repair: bool = False,
    workers: int | None = None,
    progress: bool | None = None,
    storage_options: Mapping[str, Any] | None = None,
) -> VerifyReport:
    """Check every block of the store at ``path`` (see the module docstring).

    Raises :class:`StoreFormatError` for ``deep``/``repair`` on a store without a
    generator; faults are reported, not raised.
    """
    start = time.perf_counter()
    with writer_lock(path, storage_options=storage_options) if repair else contextlib.nullcontext():
        store = BlockStore.open(path, storage_options=storage_options)
        make = regression_blocks(store) if deep or repair else None  # refuse early, before any work
        lay, done = store.layout, store.complete_blocks()
        report = VerifyReport(
            store.where, lay.num_blocks, list(lay.fields),
            checksummed=all("crc32c" in store.codec_names(f) for f in lay.fields), deep=deep,
        )
        unrecorded = [
            Fault(b, None, f"block {b} is not recorded complete (never written, or its writer was interrupted)")
            for b in range(lay.num_blocks) if b not in done
        ]
        found, report.checked_bytes = _check(store, sorted(done), deep, workers, progress, storage_options)
        report.faults = report.remaining = sorted(unrecorded + found, key=lambda f: f.block)
        if repair and report.faults:
            report.repaired, report.remaining = _repair(store, make, report.faults, deep, workers, progress, storage_options)
    report.partial_files = sum(p.is_file() for p in store.local_root.rglob("*.partial")) if store.local_root else 0
    lock = WriterLock(store.local_root) if store.local_root is not None and not repair else None
    if lock is not None and os.path.exists(lock.path):
        report.writers = [o.describe() for o in lock.owners() if not o.is_stale()]
    report.seconds = time.perf_counter() - start
    return report


def _repair(store, make: RegressionBlocks, faults, deep, workers, progress, storage_options):
    """Rewrite the faulty blocks (the writer lock is held); returns (repaired, still faulty)."""
    bad = sorted({f.block for f in faults})
    writable = BlockStore.open(store.where, mode="r+", storage_options=storage_options)
    with metadata_mutex(store.where):  # a crash from here on leaves them listed as missing, never as good
        writable.mark_incomplete(bad)
    writable.remove_partials()
    for block in bad:  # a directory in a chunk's place, which no rewrite can replace
        for name in writable.layout.fields:
            chunk = writable.chunk_path(name, block)
            if chunk is not None and chunk.is_dir():
                shutil.rmtree(chunk)
    write_some_blocks(writable, make, bad, workers=workers, progress=progress)
    remaining, _ = _check(writable, bad, deep, workers, progress, storage_options)
    still = {f.block for f in remaining}
    return [b for b in bad if b not in still], remaining


def _check(store: BlockStore, blocks: list[int], deep: bool, workers, progress, storage_options):
    """Faults and bytes read over ``blocks``, in parallel over processes when there are several."""
    faults: list[Fault] = []
    nbytes = 0
    show = sys.stderr.isatty() if progress is None else progress
    bar = tqdm(total=len(blocks), unit="block", desc="verifying", disable=not show, dynamic_ncols=True)
    with bar, _checkers(store, blocks, deep, workers, storage_options) as results:
        for found, n in results:
            faults += found
            nbytes += n
            bar.update(1)
    return faults, nbytes


@contextlib.contextmanager
def _checkers(store: BlockStore, blocks: list[int], deep: bool, workers, storage_options) -> Iterator[Iterator]:
    workers = _resolve_workers(workers, len(blocks), store.where)
    if workers <= 1:
        check = _BlockChecker(store, deep)
        yield map(check, blocks)
        return
    with ProcessPoolExecutor(workers, mp_context=process_context(store), initializer=_init_worker,
                             initargs=(store.where, storage_options, deep)) as pool:
        yield pool.map(_check_in_worker, blocks, chunksize=max(1, len(blocks) // (8 * workers)))


class _BlockChecker:
    """Reads (and for ``deep``, regenerates) one block at a time with reused buffers."""

    def __init__(self, store: BlockStore, deep: bool) -> None:
        self.store = store
        self.make = regression_blocks(store) if deep else None
        self.buffers = {f: store.new_buffer(f) for f in store.layout.fields}

    def __call__(self, block: int) -> tuple[list[Fault], int]:
        faults, nbytes = [], 0
        expected = self.make(block) if self.make is not None else None
        for name, buf in self.buffers.items():
            try:
                data = self.store.read_block(name, block, buf)
                if self.store.slice_table is not None:  # the chunk is whole, its slice table must agree
                    self.store.check_slices(name, block, buf[: self.store.block_nbytes(name)])
            except CorruptBlockError as exc:
                faults.append(Fault(block, name, str(exc)))
                continue
            nbytes += data.nbytes
            if expected is not None:
                got = data.view(np.uint8).reshape(len(data), -1)
                want = np.ascontiguousarray(expected[name]).view(np.uint8).reshape(len(data), -1)
                rows = int((got != want).any(axis=1).sum())
                if rows:
                    faults.append(Fault(block, name, f"{self.store._describe(name, block)} differs from its "
                                                     f"regeneration in {rows} of {len(data)} rows"))
        return faults, nbytes


_worker_check: _BlockChecker | None = None


def _init_worker(path: str, storage_options, deep: bool) -> None:
    global _worker_check
    import torch

    torch.set_num_threads(1)
    _worker_check = _BlockChecker(BlockStore.open(path, storage_options=storage_options), deep)


def _check_in_worker(block: int) -> tuple[list[Fault], int]:
    return _worker_check(block)


def _short_list(blocks: list[int]) -> str:
    return ", ".join(map(str, blocks[:_SHOWN])) + (", ..." if len(blocks) > _SHOWN else "")
