"""Writing stores: a streaming writer for any batches, and a parallel block writer.

Both end in the same loop: whole blocks go to :meth:`BlockStore.write_block`
on a background thread (so the next block is produced while the last one is
written and fsynced), and a block is recorded complete in the group attributes
only after its chunks are durable.  Rerunning an interrupted write with the
same parameters writes only the missing blocks.

Example:
    >>> import numpy as np, tempfile, os
    >>> from shardset import write, BlockStore
    >>> path = os.path.join(tempfile.mkdtemp(), "s.zarr")
    >>> batches = ({"x": np.full((3, 2), i, np.float32)} for i in range(4))
    >>> store = write(path, batches, rows=12, block_rows=5)
    >>> store.layout.num_blocks, BlockStore.open(path).missing_blocks()
    (3, [])
"""

from __future__ import annotations

import contextlib
import ctypes
import multiprocessing as mp
import os
import queue
import signal
import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable, Iterable, Iterator, Mapping

import numpy as np
import zarr
from tqdm import tqdm

from .errors import ArgumentError, ShardsetError, StoreFormatError, StoreIOError
from .format import (ATTRS_KEY, DEFAULT_BLOCK_MB, MAX_BLOCKS, MIB, RESERVED_NAMES, FieldSpec, Layout,
                     block_rows_for, check_int)
from .lock import check_part, locked, metadata_mutex, sole_writer
from .store import BlockStore, compressors_for, holds_only_temporaries
from .urls import open_store, parse_url, remote_error, store_exists

__all__ = ["write", "write_blocks", "write_some_blocks", "open_for_writing", "layout_for"]

BlockFn = Callable[[int], Mapping[str, np.ndarray]]
_FLUSH_SECONDS = 0.05  # completion records: at most 20 metadata rewrites a second


def layout_for(
    rows: int,
    fields: Mapping[str, FieldSpec],
    *,
    block_mb: float = DEFAULT_BLOCK_MB,
    block_rows: int | None = None,
    generator: Mapping[str, Any] | None = None,
) -> Layout:
    """The :class:`Layout` for ``rows`` rows of ``fields`` (``block_rows`` overrides ``block_mb``)."""
    rows = check_int("rows", rows)
    by_size = block_rows_for(fields, block_mb)  # validates block_mb even when block_rows overrides it
    row_bytes = sum(f.row_bytes for f in fields.values())
    if row_bytes > block_mb * MIB:
        raise ArgumentError(f"one row is {row_bytes:,} bytes, more than a block of block_mb={block_mb} MiB")
    if rows * row_bytes >= 1 << 63:
        raise ArgumentError(f"{rows:,} rows of {row_bytes:,} bytes exceed the 8 EiB (2**63 bytes) a store can hold")
    block_rows = by_size if block_rows is None else check_int("block_rows", block_rows)
    if (blocks := -(-rows // block_rows)) > MAX_BLOCKS:
        raise ArgumentError(f"{rows:,} rows in blocks of {block_rows:,} make {blocks:,} blocks, more than the "
                            f"{MAX_BLOCKS:,} a store may have; use larger blocks")
    taken = sorted(k for k in fields if isinstance(k, str) and k in RESERVED_NAMES)
    bad = [k for k in fields if not isinstance(k, str) or not k or "/" in k or k.startswith(".") or k.endswith(".partial")]
    if taken or bad:
        raise ArgumentError(f"field names {taken + bad} are not allowed: a name is a non-empty string, has no '/', "
                            "does not start with '.' or end with '.partial' (the writer's temporary files), and is "
                            f"not one of the store's own ({', '.join(sorted(RESERVED_NAMES))})")
    return Layout(rows, min(block_rows, rows), dict(fields), dict(generator or {}))


def open_for_writing(
    path: str | os.PathLike,
    layout: Layout,
    *,
    compression: str | None = None,
    checksum: bool = True,
    overwrite: bool = False,
    storage_options: Mapping[str, Any] | None = None,
) -> BlockStore:
    """Create the store (a path or URL), or reopen a compatible one to resume; refuse an incompatible one."""
    with metadata_mutex(path):  # cooperating part writers: one creates, the others reopen
        return _open_or_create(path, layout, compression, checksum, overwrite, storage_options)


def _open_or_create(
    path, layout: Layout, compression: str | None, checksum: bool, overwrite: bool, storage_options
) -> BlockStore:
    create = dict(compression=compression, checksum=checksum, storage_options=storage_options)
    if not overwrite and store_exists(path, storage_options):
        try:
            store = BlockStore.open(path, mode="r+", storage_options=storage_options)
        except StoreFormatError as exc:
            if _created_but_empty(path, layout, storage_options):  # killed while creating: nothing to keep
                return BlockStore.create(path, layout, overwrite=True, **create)
            raise StoreFormatError(f"{exc}; pass overwrite=True (--overwrite) to replace it") from None
        old = store.layout
        if store.foreign or not old.same_shape(layout) or old.generator != layout.generator:
            raise StoreFormatError(
                f"{path} holds a different dataset ({_describe(old)}) than requested ({_describe(layout)}); "
                "pass overwrite=True (--overwrite) to replace it"
            )
        want = [c.to_dict()["name"] for c in compressors_for(compression, checksum)]
        for name in layout.fields:
            if store.codec_names(name)[1:] != want:
                raise StoreFormatError(
                    f"{path} was written with codecs {store.codec_names(name)}; pass overwrite=True to rewrite"
                )
        if sole_writer(path):  # a live part writer's temporary files are still being written
            store.remove_partials()
        return store
    return BlockStore.create(path, layout, overwrite=overwrite, **create)


def _created_but_empty(path: str | os.PathLike, layout: Layout, storage_options) -> bool:
    """True for a store of this very layout whose creation was cut short before any block
    (also before its first metadata file: a local directory holding only temporaries)."""
    local = parse_url(path).local_path
    if local is not None and os.path.isdir(local) and holds_only_temporaries(local):
        return True
    try:
        attrs = zarr.open_group(open_store(path, storage_options, read_only=True), mode="r").attrs
        old = Layout.from_attrs(attrs)
    except Exception:
        return False
    return old.same_shape(layout) and old.generator == layout.generator and not attrs[ATTRS_KEY]["complete_blocks"]


@locked
def write(
    path: str | os.PathLike,
    batches: Iterable[Mapping[str, np.ndarray]] | Mapping[str, np.ndarray],
    *,
    rows: int | None = None,
    block_mb: float = DEFAULT_BLOCK_MB,
    block_rows: int | None = None,
    compression: str | None = None,
    checksum: bool = True,
    overwrite: bool = False,
    progress: bool | None = None,
    shuffle: bool = False,
    seed: int = 0,
    storage_options: Mapping[str, Any] | None = None,
) -> BlockStore:
    """Write batches (dicts of equally long arrays, any batch size) as a store.

    ``batches`` may also be one dict of whole arrays (numpy, memmap, zarr, torch),
    read a block at a time.  ``rows`` is required for an iterable of batches; the
    batches must add up to exactly that many rows.  Memory stays at about two
    blocks whatever the dataset size.  Rerunning after an interruption skips the
    blocks already complete (the batches are still consumed, not rewritten).

    ``shuffle=True`` stores the rows in a pseudorandom order drawn from ``seed``,
    so that every block is a random sample of the whole input (for data written
    sorted by label, time or source): see :mod:`shardset.shuffle`.  It takes
    about three blocks of memory and as much temporary disk as the data (beside
    the store, or in the system's temporary directory when ``path`` is a URL).

    ``path`` may be a URL (``s3://bucket/prefix``, see :mod:`shardset.urls`) with
    ``storage_options`` for its endpoint, region and credentials.
    """
    if isinstance(batches, Mapping):
        arrays = batches
        lens = {len(a) for a in arrays.values()}
        if len(lens) != 1:
            raise ArgumentError(f"arrays must share their first dimension, got lengths {sorted(lens)}")
        length = lens.pop()
        if rows is not None and rows != length:
            raise ArgumentError(f"rows={rows}, but the arrays hold {length} rows")
        rows = length
        specs = {k: FieldSpec.of(np.asarray(a[:1])) for k, a in arrays.items()}
        layout = layout_for(rows, specs, block_mb=block_mb, block_rows=block_rows)

        def block(b: int) -> dict[str, np.ndarray]:
            return {k: np.asarray(a[slice(*layout.block_range(b))]) for k, a in arrays.items()}

        if shuffle:
            blocks = map(block, range(layout.num_blocks))
            return _write_shuffled(path, layout, blocks, seed, compression, checksum, overwrite, progress,
                                   storage_options)
        store = open_for_writing(
            path, layout, compression=compression, checksum=checksum, overwrite=overwrite, storage_options=storage_options
        )
        todo = store.missing_blocks()
        _run(store, ((b, block(b)) for b in todo), len(todo), progress)
        return store
    if rows is None:
        raise ArgumentError("rows= is required when writing an iterable of batches")
    it = iter(batches)
    try:
        first = {k: np.asarray(v) for k, v in next(it).items()}
    except StopIteration:
        raise ArgumentError("no batches to write") from None
    layout = layout_for(rows, {k: FieldSpec.of(v) for k, v in first.items()}, block_mb=block_mb, block_rows=block_rows)
    if shuffle:
        chunks = (arr for _, arr in _rebatch(layout, _chain(first, it)))
        return _write_shuffled(path, layout, chunks, seed, compression, checksum, overwrite, progress,
                               storage_options)
    store = open_for_writing(
        path, layout, compression=compression, checksum=checksum, overwrite=overwrite, storage_options=storage_options
    )
    done = store.complete_blocks()
    blocks = ((b, arr) for b, arr in _rebatch(layout, _chain(first, it)) if b not in done)
    _run(store, blocks, layout.num_blocks - len(done), progress)
    return store


def _write_shuffled(path, layout: Layout, chunks, seed: int, compression, checksum: bool, overwrite, progress,
                    storage_options) -> BlockStore:
    from .shuffle import write_shuffled  # shuffle builds on this module

    return write_shuffled(
        path, layout, chunks, seed=seed, compression=compression, checksum=checksum, overwrite=overwrite,
        progress=progress, storage_options=storage_options,
    )


@locked
def write_blocks(
    path: str | os.PathLike,
    layout: Layout,
    make_block: BlockFn,
    *,
    workers: int | None = None,
    compression: str | None = None,
    checksum: bool = True,
    overwrite: bool = False,
    progress: bool | None = None,
    part: tuple[int, int] | None = None,
    storage_options: Mapping[str, Any] | None = None,
    scheduler: str = "processes",
    client: Any = None,
) -> BlockStore:
    """Write every block ``b`` as ``make_block(b)``, in parallel over processes.

    ``make_block`` must be picklable and a pure function of the block id: then the
    bytes do not depend on ``workers`` nor on the order blocks are written, and an
    interrupted run is finished by rerunning it.  ``part=(i, k)`` writes only the
    blocks ``b`` with ``b % k == i``, so ``k`` processes (on one host, or any hosts
    sharing a filesystem with working ``flock``) can split a store between them;
    the store is complete when every part has finished.  The writer lock
    (:mod:`shardset.lock`) refuses a second writer of the same blocks.

    ``scheduler="dask"`` runs one task per block on a ``dask.distributed`` cluster
    instead (``client``, default: the current client; ``workers`` is ignored): see
    :mod:`shardset.dask_writer`.  ``path`` may be a URL with ``storage_options``.
    """
    if scheduler not in ("processes", "dask"):
        raise ArgumentError(f"scheduler must be 'processes' or 'dask', got {scheduler!r}")
    part = check_part(part, overwrite)
    store = open_for_writing(
        path, layout, compression=compression, checksum=checksum, overwrite=overwrite, storage_options=storage_options
    )
    todo = [b for b in store.missing_blocks() if part is None or b % part[1] == part[0]]
    if scheduler == "dask":
        from .dask_writer import run_dask

        run_dask(store, make_block, todo, client, progress)
        return store
    write_some_blocks(store, make_block, todo, workers=workers, progress=progress)
    return store


def write_some_blocks(
    store: BlockStore, make_block: BlockFn, blocks: list[int], *, workers: int | None = None, progress: bool | None = None
) -> None:
    """Write ``blocks`` of an open store as ``make_block(b)`` and record them complete.

    The caller holds the writer lock (:func:`shardset.lock.writer_lock`); this is
    the loop behind :func:`write_blocks` and ``shardset verify --repair``.
    """
    workers = _resolve_workers(workers, len(blocks), store.where)
    if workers <= 1:
        _run(store, _produce(make_block, store.layout, blocks), len(blocks), progress)
    else:
        _run_processes(store, make_block, blocks, workers, progress)


# -- the shared write loop ---------------------------------------------------------


def _produce(make_block: BlockFn, layout: Layout, blocks: Iterable[int]) -> Iterator[tuple[int, Mapping[str, np.ndarray]]]:
    """``(block, arrays)`` for each block.

    When ``make_block`` also has ``fill(block, out)``, two buffer sets are reused
    in turn instead of allocating (and page-faulting) a block of memory each time:
    :func:`_write_loop` never holds more than the block being written and the one
    being produced.
    """
    fill = getattr(make_block, "fill", None)
    if fill is None:
        for b in blocks:
            yield b, make_block(b)
        return
    ring = [block_arrays(layout) for _ in range(2)]
    for i, b in enumerate(blocks):
        yield b, filled(fill, layout, b, ring[i % 2])


def block_arrays(layout: Layout) -> dict[str, np.ndarray]:
    """Uninitialized arrays for one whole block of ``layout``, one per field."""
    return {k: np.empty((layout.block_rows, *f.shape), f.dtype) for k, f in layout.fields.items()}


def filled(fill: Callable[[int, Mapping[str, np.ndarray]], None], layout: Layout, block: int,
           arrays: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Block ``block`` made by ``fill`` into ``arrays`` (from :func:`block_arrays`, reused):
    views of its rows, as many as the block holds."""
    out = {k: v[: layout.block_len(block)] for k, v in arrays.items()}
    fill(block, out)
    return out


class WrittenBlocks:
    """For a block source that passes its data through once: tells which blocks the writer
    has made durable, from the order this process fills them, and drops those from the
    page cache, so that the next blocks reuse their pages instead of taking fresh ones
    (which cost a virtual machine a fault in its host each, and a memory-limited process
    a reclaim).  The writer keeps one block in flight while the next is filled
    (:func:`_write_loop`), so every block filled before the previous one is durable.

    >>> w = WrittenBlocks(None)  # an output that is not on this disk: nothing to drop
    >>> w.filling(4), w.filling(6), w.filling(8), w.filled
    ([], [], [4], [6, 8])
    """

    def __init__(self, output: str | os.PathLike | None) -> None:
        url = None if output is None else parse_url(output)
        self.output = url.local_path if url is not None and url.is_local else None
        self.filled: list[int] = []  # the last two blocks this process filled, in order
        self._store: BlockStore | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_store": None}

    def filling(self, block: int) -> list[int]:
        """Note that ``block`` is being filled; returns the blocks made durable since the
        last call, dropped from the page cache."""
        done, self.filled = self.filled[:-1], self.filled[-1:] + [block]
        if self.output is not None and done:
            self._store = self._store or BlockStore.open(self.output)
            for b in done:
                for name in self._store.layout.fields:
                    self._store.drop_cached(name, b)
        return done


def _write_loop(store: BlockStore, blocks: Iterable[tuple[int, Mapping[str, np.ndarray]]], done: Callable[[int], None]):
    """Write blocks on a background thread, one in flight while the next is produced."""
    with ThreadPoolExecutor(1, thread_name_prefix="shardset-write") as pool:
        pending: tuple[int, Future] | None = None
        try:
            for block, arrays in blocks:
                fut = pool.submit(store.write_block, block, arrays)
                if pending is not None:
                    pending[1].result()
                    done(pending[0])
                pending = (block, fut)
                del arrays
        finally:  # a block already handed to the thread is finished even if the source failed
            if pending is not None:
                pending[1].result()
                done(pending[0])


class _Progress:
    """Progress bar plus periodic, durable completion records."""

    def __init__(self, store: BlockStore, nblocks: int, progress: bool | None) -> None:
        self.store, self.pending, self.last_flush = store, [], time.monotonic()
        lay = store.layout
        show = sys.stderr.isatty() if progress is None else progress
        todo_rows = sum(lay.block_len(b) for b in store.missing_blocks()) if nblocks else 0
        self.bar = tqdm(
            total=todo_rows * lay.row_bytes, unit="B", unit_scale=True, unit_divisor=1024,
            disable=not show, desc="writing", dynamic_ncols=True,
        )
        self.rows = 0

    def __call__(self, block: int) -> None:
        n = self.store.layout.block_len(block)
        self.rows += n
        self.bar.update(n * self.store.layout.row_bytes)
        self.bar.set_postfix_str(f"{self.rows:,} rows", refresh=False)
        self.pending.append(block)
        if time.monotonic() - self.last_flush > _FLUSH_SECONDS:
            self.flush()

    def flush(self) -> None:
        if self.pending:
            with metadata_mutex(self.store.where):  # part writers merge their records one at a time
                self.store.mark_complete(self.pending)
            self.pending = []
        self.last_flush = time.monotonic()

    def close(self) -> None:
        self.flush()
        self.bar.close()


def _run(store: BlockStore, blocks, nblocks: int, progress: bool | None) -> None:
    with _os_errors(store):
        prog = _Progress(store, nblocks, progress)
        try:
            _write_loop(store, blocks, prog)
        finally:
            prog.close()


@contextlib.contextmanager
def _os_errors(store: BlockStore) -> Iterator[None]:
    """Turn an OS error while writing (disk full, EIO) or an object store's failure
    (the server went away, ...) into a one-line :class:`StoreIOError` (or
    :class:`~shardset.errors.StoreAccessError`)."""
    try:
        yield
    except Exception as exc:
        mapped = _write_error(store, exc)
        if mapped is exc:
            raise
        raise mapped from exc


def _write_error(store: BlockStore, exc: BaseException) -> BaseException:
    """The typed error for ``exc`` raised while writing ``store``; ``exc`` itself when
    it is neither an OS error nor an object store's."""
    if isinstance(exc, ShardsetError):
        return exc
    if isinstance(exc, OSError):
        return _io_error(store, exc.errno, exc.strerror or str(exc))
    mapped = remote_error(exc, store.where, "writing")
    return exc if mapped is exc else _resumable(mapped)


def _resumable(err: ShardsetError) -> ShardsetError:
    """``err``, a typed object-store failure while writing, saying how to go on.  (No
    count of the complete blocks: asking the store would wait out the same failure.)"""
    out = type(err)(f"{err}; the finished blocks are kept: fix the cause and rerun to resume")
    out.errno = getattr(err, "errno", None)
    return out


def _io_error(store: BlockStore, errno: int | None, reason: str) -> StoreIOError:
    try:
        kept = f"{len(store.complete_blocks())} of {store.layout.num_blocks} blocks are complete and kept"
    except Exception:  # the metadata itself may be unreadable now; the message must still come out
        kept = "the finished blocks are kept"
    err = StoreIOError(f"writing {store.where} failed: {reason}; {kept}: fix the cause and rerun to resume")
    err.errno = errno
    return err


def _die_with_parent() -> None:
    """Linux: have the kernel SIGKILL this writer process when its parent dies; an
    orphan would write on, unrecorded, and then block forever on the full queue."""
    try:
        prctl = ctypes.CDLL(None).prctl
    except (OSError, AttributeError):  # not Linux
        return
    prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    if os.getppid() != mp.parent_process().pid:  # the parent died before the call above
        os._exit(1)


def _process_main(path: str, storage_options, make_block: BlockFn, blocks: list[int], results) -> None:
    try:
        _die_with_parent()
        import torch

        torch.set_num_threads(1)
        store = BlockStore.open(path, mode="r+", storage_options=storage_options)
        _write_loop(store, _produce(make_block, store.layout, blocks), lambda b: results.put(("done", b)))
        results.put(("exit", os.getpid()))
    except BaseException as exc:  # reported to the parent, which raises it
        remote = remote_error(exc, path, "writing")
        if remote is not exc:
            results.put(("remote", remote))
        elif isinstance(exc, OSError) and not isinstance(exc, ShardsetError):
            results.put(("oserror", (exc.errno, exc.strerror or str(exc))))
        else:
            results.put(("error", f"{type(exc).__name__}: {exc}" if not isinstance(exc, ShardsetError) else str(exc)))


def _run_processes(store: BlockStore, make_block: BlockFn, todo: list[int], workers: int, progress) -> None:
    ctx = process_context(store)
    results = ctx.Queue()
    args = (store.where, store.storage_options, make_block)
    procs = [
        ctx.Process(target=_process_main, args=(*args, todo[w::workers], results), daemon=True)
        for w in range(workers)
    ]
    for p in procs:
        p.start()
    prog = _Progress(store, len(todo), progress)
    exited, error, os_error, remote = 0, None, None, None
    try:
        while exited < workers and error is None:
            try:
                kind, value = results.get(timeout=0.5)
            except queue.Empty:
                dead = [p for p in procs if p.exitcode not in (None, 0)]
                if dead:
                    error = f"a writer process died (exit code {dead[0].exitcode})"
                continue
            if kind == "done":
                prog(value)
            elif kind == "exit":
                exited += 1
            elif kind == "oserror":
                os_error = error = value
            elif kind == "remote":
                remote = error = value
            else:
                error = value
    finally:
        for p in procs:
            if p.is_alive() and (error is not None or exited < workers):
                p.terminate()
            p.join()
        if error is not None and sole_writer(store.where):  # what the terminated writers left half done
            store.remove_partials()
        with _os_errors(store):
            prog.close()
    if os_error is not None:
        raise _io_error(store, *os_error)
    if remote is not None:
        raise _resumable(remote)
    if error is not None:
        raise ShardsetError(f"writing {store.where} failed: {error}; rerun to resume")


def process_context(store: BlockStore) -> mp.context.BaseContext:
    """How to start worker processes for ``store``.

    fork, as DataLoader workers do: torch resets its thread pools and zarr its event
    loop in a forked child, and a spawned child would spend seconds importing torch.
    Object stores need spawn: obstore's runtime, already used here, hangs after fork.
    """
    fork = "fork" in mp.get_all_start_methods() and store.local_root is not None
    return mp.get_context("fork" if fork else "spawn")


def _resolve_workers(workers: int | None, nblocks: int, where: str | os.PathLike | None = None) -> int:
    """Processes for ``nblocks`` blocks (default: the cores); one for a ``memory://``
    store at ``where``, whose data only this process sees."""
    if workers is None:
        workers = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    workers = check_int("workers", workers)  # checked even where one process will do
    if where is not None and not parse_url(where).shared:
        return 1
    return max(1, min(workers, nblocks))


# -- rebatching a stream of batches into blocks ----------------------------------


def _chain(first: Mapping[str, np.ndarray], rest: Iterator[Mapping[str, Any]]) -> Iterator[Mapping[str, np.ndarray]]:
    yield first
    for batch in rest:
        yield {k: np.asarray(v) for k, v in batch.items()}


def _rebatch(layout: Layout, batches: Iterable[Mapping[str, np.ndarray]]) -> Iterator[tuple[int, dict[str, np.ndarray]]]:
    """Cut batches of any size at block boundaries; yields ``(block, arrays)``."""
    names = set(layout.fields)
    block, fill, buf, last = 0, 0, None, None
    for i, batch in enumerate(batches):
        if set(batch) != names:
            raise ArgumentError(f"batch {i} has fields {sorted(batch)}, expected {sorted(names)}")
        lens = {len(v) for v in batch.values()}
        if len(lens) != 1:
            raise ArgumentError(f"batch {i}: fields have different lengths {sorted(lens)}")
        n, pos = lens.pop(), 0
        for name, v in batch.items():
            spec = layout.fields[name]
            if tuple(v.shape[1:]) != spec.shape:
                raise ArgumentError(f"batch {i}: field '{name}' rows have shape {tuple(v.shape[1:])}, expected {spec.shape}")
            if not _holds(np.dtype(spec.dtype), v):
                raise ArgumentError(f"batch {i}: field '{name}' is {v.dtype}, which the store's {spec.dtype} (set by "
                                    "the first batch) cannot hold; cast the batches to one dtype")
        while pos < n:
            if block >= layout.num_blocks:
                raise ArgumentError(f"batches hold more than the declared {layout.rows} rows")
            want = layout.block_len(block)
            if buf is None:
                buf = {k: np.empty((want, *s.shape), s.dtype) for k, s in layout.fields.items()}
            take = min(want - fill, n - pos)
            for name, v in batch.items():
                buf[name][fill : fill + take] = v[pos : pos + take]
            fill, pos = fill + take, pos + take
            if fill == want:
                if block + 1 < layout.num_blocks:
                    yield block, buf
                else:  # handed over once the input has shown it holds no more rows
                    last = buf
                block, fill, buf = block + 1, 0, None
    if block != layout.num_blocks:
        got = block * layout.block_rows + fill
        raise ArgumentError(f"batches hold {got} rows, fewer than the declared {layout.rows}")
    yield block - 1, last


def _describe(layout: Layout) -> str:
    fields = ", ".join(f"{k}:{v.dtype}{list(v.shape)}" for k, v in layout.fields.items())
    gen = layout.generator
    extra = "".join(f", {k}={gen[k]}" for k in ("seed", "bias", "noise") if k in gen)
    return f"{layout.rows} rows of {fields}, {layout.block_rows} rows per block{extra}"


def _holds(dtype: np.dtype, values: np.ndarray) -> bool:
    """Whether ``values`` fit ``dtype`` (a later batch in a store whose dtype the first set):
    a safe cast always, a narrower one of the same kind only if no value wraps around or
    overflows to infinity (a float64 batch in a float32 store keeps its rounding)."""
    if np.can_cast(values.dtype, dtype, casting="safe"):
        return True
    if not np.can_cast(values.dtype, dtype, casting="same_kind"):
        return False
    if dtype.kind in "iu" and values.size:
        info = np.iinfo(dtype)
        return bool(info.min <= values.min() and values.max() <= info.max)
    if dtype.kind in "fc":
        with np.errstate(over="ignore"):
            return bool(np.array_equal(np.isfinite(values.astype(dtype)), np.isfinite(values)))
    return True
