"""Write-time shuffling: rewrite rows so that every block is a random sample of the whole set.

The reader only permutes blocks and the rows inside a block (or a window of a
few blocks), so rows written next to each other stay close all epoch long.
Data written in a meaningful order (sorted by label, by time, by source) is
therefore shuffled once, when it is written: row ``i`` of the input goes to
row ``FeistelPermutation(N, seed, domain="write-shuffle")(i)`` of the output.
Output block ``d`` then holds the input rows whose images fall in its range, a
pseudorandom sample of the whole dataset, already in random order.

It is a two-pass bucket scatter that never holds more than a few blocks
(:func:`shuffle_rss_budget`), whatever the size of the data:

1. *scatter*: read the input a block at a time in order (the next block on a
   thread, into the same buffer, once this one's rows are sorted), compute
   every row's destination, sort the rows by destination block and append each
   run (its offsets inside the block and its values, one ``writev``) to that
   block's bucket file.  The buckets are not fsynced: a marker file records the
   parameters and every bucket file's size and crc32c.
2. *gather*: for each destination block, read its bucket, checking it against
   the marker, put every row at its offset (``np.put`` per run and field) and
   write the block through :func:`shardset.write_blocks`, with its durability
   and completion records; the buckets of blocks already durable are deleted,
   and the next block's are read into the page cache meanwhile.

Disk: the buckets take as much space as the data, next to the output (or in
``tmp_dir``) until the output is complete; data that fits the page cache
never writes them to the disk.  An interrupted run is resumed by running it
again: once the marker exists only missing output blocks are written; an
interrupted scatter starts over, and so does a resumed gather that finds a
bucket the crash kept from the disk.

Example:
    >>> import numpy as np, tempfile, os
    >>> from shardset import write, BlockStore
    >>> path = os.path.join(tempfile.mkdtemp(), "s.zarr")
    >>> _ = write(path, {"x": np.arange(10)}, block_rows=4, shuffle=True, seed=3)
    >>> s = BlockStore.open(path)
    >>> data = np.concatenate([s.read_block("x", b) for b in range(3)])
    >>> sorted(data.tolist()) == list(range(10)), data.tolist() != list(range(10))
    (True, True)
"""

from __future__ import annotations

import functools
import json
import multiprocessing as mp
import os
import shutil
import sys
import tempfile
import zlib
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import numpy as np
from crc32c import crc32c
from tqdm import tqdm

from .errors import ArgumentError, ShardsetError, StoreFormatError, StoreURLError
from .format import DEFAULT_BLOCK_MB, Layout, check_int
from .lock import locked
from .permutation import FeistelPermutation
from .segment_shuffle import SegmentSource, plan_for
from .store import BlockStore, _writev_all, fadvise
from .urls import REMOTE_SCHEMES, parse_url, worker_start_method
from .writer import (WrittenBlocks, _die_with_parent, _os_errors, _resolve_workers, block_arrays, filled, layout_for,
                     open_for_writing, write_blocks)

__all__ = ["SHUFFLE_NAME", "shuffle_store", "write_shuffled", "shuffled_position", "shuffle_rss_budget"]

SHUFFLE_NAME = "shardset.shuffle/1"
SHUFFLE_DOMAIN = "write-shuffle"
_MARKER = "scattered.json"
_PIECE = 4 << 20  # bytes of one field's values a gather reads at a time
_INDEX_PIECE = 1 << 16  # rows whose destinations a scatter computes at a time
_OWN_BYTES = 8 << 20  # what a shuffle process holds besides blocks and per-row indices (see shuffle_rss_budget)


class _Torn(Exception):
    """A bucket file differs from what the scatter recorded."""


def shuffled_position(rows: int, seed: int) -> FeistelPermutation:
    """The map from input row to output row used by a write-time shuffle with ``seed``.

    >>> p = shuffled_position(5, seed=0)
    >>> sorted(p(np.arange(5)).tolist())
    [0, 1, 2, 3, 4]
    """
    return FeistelPermutation(rows, seed, 0, domain=SHUFFLE_DOMAIN)


def shuffle_rss_budget(src: Layout, dst: Layout) -> int:
    """Bytes of memory one process of :func:`shuffle_store` holds, at most, beyond the interpreter's own.

    With ``B = block_rows * row_bytes`` and ``R = block_rows`` of the input (``src``)
    and output (``dst``) layouts, the budget is
    ``max(2 B_in + 26 R_in, K B_out + 12 R_out + min(B_out, 4 MiB)) + 8 MiB``:
    a scatter process holds one input block (the next one is read into the same
    buffer once its rows are sorted), the same rows sorted by destination,
    and 26 bytes of indices per row (a 2-byte block key, a 4-byte offset and its
    sorted copy, the sort's 8-byte order and its 8-byte work array); a gather
    process two output blocks (one being filled, one being written), one run of
    a bucket's offsets (at most 12 bytes a row) and at most 4 MiB of its values,
    and ``K = 3`` where the output's last block is short: the writer pads it to a
    whole block in a copy (``K = 2`` otherwise).  The 8 MiB are the rest:
    destinations computed 65,536 rows at a time, open stores, the process pool.
    Nothing depends on the number of rows, so data larger than RAM shuffles in
    the same memory; ``workers`` processes hold ``workers`` times this.  For
    uncompressed stores (a codec adds its own buffers).

    >>> from shardset.format import FieldSpec
    >>> lay = Layout(10**9, 1000, {"x": FieldSpec("float32", (16,))})
    >>> shuffle_rss_budget(lay, lay)  # 2 blocks of 64,000 bytes + 64,000 + 12,000, + 8 MiB
    8592608
    """
    out_blocks = 2 if dst.rows % dst.block_rows == 0 else 3
    return max(2 * src.block_rows * src.row_bytes + 26 * src.block_rows,
               out_blocks * dst.block_rows * dst.row_bytes + 12 * dst.block_rows
               + min(dst.block_rows * dst.row_bytes, _PIECE)) + _OWN_BYTES


def write_shuffled(
    path: str | os.PathLike,
    layout: Layout,
    chunks: Iterable[Mapping[str, np.ndarray]],
    *,
    seed: int = 0,
    source: Mapping[str, Any] | None = None,
    workers: int | None = 1,
    compression: str | None = None,
    checksum: bool = True,
    overwrite: bool = False,
    progress: bool | None = None,
    tmp_dir: str | os.PathLike | None = None,
    storage_options: Mapping[str, Any] | None = None,
) -> BlockStore:
    """Write the rows of ``chunks`` (consecutive pieces of the input, in row order) shuffled.

    ``layout`` is the output's geometry; its generator attributes are replaced by
    a record of the shuffle (``seed`` and the input's own ``source`` generator),
    so a rerun with another seed is refused instead of mixing two shuffles.
    ``chunks`` is consumed only if the scatter pass has not finished before.
    The buckets go to ``<tmp_dir or the output's directory>/<output name>-<crc>.shuffle-tmp``
    (the CRC-32 of the output's real path or URL; for an object-store ``path``, to
    ``tmp_dir`` or the system's temporary directory), where a rerun finds them.
    """

    def scatter(buckets: "_Buckets", seed: int, show: bool) -> None:
        position = shuffled_position(buckets.layout.rows, seed)
        buckets.finish([buckets.scatter_part(0, _numbered(chunks), position, show)])

    return _shuffled(path, layout, scatter, seed=seed, source=source, workers=workers, compression=compression,
                     checksum=checksum, overwrite=overwrite, progress=progress, tmp_dir=tmp_dir,
                     storage_options=storage_options)


@locked
def _shuffled(path, layout: Layout, scatter: Callable[["_Buckets", int, bool], None], *, seed: int,
              source: Mapping[str, Any] | None, workers: int | None, compression: str | None, checksum: bool,
              overwrite: bool, progress: bool | None, tmp_dir, storage_options=None) -> BlockStore:
    """Create the output, run ``scatter(buckets, seed, show)`` unless a finished one is on disk, gather."""
    seed = check_int("seed", seed, 0)
    layout = _recorded(layout, seed, source, algorithm="input row i is output row FeistelPermutation(rows, seed, 0, "
                                                      f"domain={SHUFFLE_DOMAIN!r})(i)")
    store = open_for_writing(path, layout, compression=compression, checksum=checksum, overwrite=overwrite,
                             storage_options=storage_options)
    # a directory of our own, even inside tmp_dir: it is deleted whole
    buckets = _Buckets(_bucket_dir(path, tmp_dir), layout, path)
    if store.missing_blocks():
        resumed = not overwrite and buckets.ready()
        while True:
            if not resumed:
                buckets.begin()
                with _os_errors(store):  # the buckets fill the disk first: a full disk is the writer's error
                    scatter(buckets, seed, _show(progress))
            try:
                store = write_blocks(
                    path, layout, buckets, workers=workers, compression=compression, checksum=checksum,
                    progress=progress, storage_options=storage_options,
                )
                break
            except ShardsetError:
                if not resumed or buckets.ready():
                    raise
                resumed = False  # a resumed gather found a bucket that a crash kept from the disk: scatter again
        store.require_complete()
    shutil.rmtree(buckets.root, ignore_errors=True)
    return store


def _recorded(layout: Layout, seed: int, source: Mapping[str, Any] | None, **how: Any) -> Layout:
    """``layout`` with its generator replaced by the record of a shuffle: a rerun with another seed
    or method is then refused instead of mixing two shuffles."""
    return replace(layout, generator={"name": SHUFFLE_NAME, **how, "seed": seed, "source": dict(source or {})})


def _bucket_dir(path: str | os.PathLike, tmp_dir: str | os.PathLike | None) -> Path:
    """Where the buckets of a shuffle into ``path`` go: beside a local output, else in the
    temporary directory; named after the output and a CRC of where it is, so that two
    outputs of one name never share a ``tmp_dir``."""
    url = parse_url(path)
    if url.is_local:
        out = Path(url.local_path.rstrip("/"))
        parent, name = out.parent if tmp_dir is None else Path(tmp_dir), out.name
    else:
        parent, name = Path(tempfile.gettempdir() if tmp_dir is None else tmp_dir), url.prefix.rpartition("/")[2] or url.bucket
    return parent / f"{name}-{zlib.crc32(_location(path).encode()):08x}.shuffle-tmp"


def _location(path: str | os.PathLike) -> str:
    """Where a store is, in one spelling: the real path of a local one, else its URL."""
    url = parse_url(path)
    return os.path.realpath(url.local_path) if url.is_local else str(url)


def _options_for(location: str | os.PathLike, storage_options: Mapping[str, Any] | None) -> Mapping[str, Any] | None:
    """``storage_options`` where ``location`` is an object store, else ``None`` (a path takes none)."""
    return storage_options if parse_url(location).scheme in REMOTE_SCHEMES else None


def shuffle_store(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    *,
    seed: int = 0,
    block_mb: float | None = None,
    block_rows: int | None = None,
    workers: int | None = None,
    compression: str | None = None,
    checksum: bool = True,
    overwrite: bool = False,
    progress: bool | None = None,
    tmp_dir: str | os.PathLike | None = None,
    storage_options: Mapping[str, Any] | None = None,
    method: str = "rows",
    segments: int | None = None,
) -> BlockStore:
    """Write a shuffled copy of the store ``src`` at ``dst`` (``shardset shuffle SRC DST``).

    Same fields and rows; the block size is ``src``'s unless ``block_mb`` or
    ``block_rows`` is given.  Both passes run on ``workers`` processes (default
    all cores); the bytes depend on ``seed`` only; rerun the same call to resume.
    ``src`` and ``dst`` may be URLs; ``storage_options`` apply to whichever is an
    object store (the buckets stay on local disk, see :func:`write_shuffled`).

    Memory does not grow with the data, so a store larger than RAM shuffles
    like a small one: each process holds at most
    ``max(2 B_in + 26 R_in, 3 B_out + 12 R_out + min(B_out, 4 MiB)) + 8 MiB``
    beyond the interpreter (``R`` rows and ``B = R * row_bytes`` bytes per block
    of the input and the output; ``2 B_out`` when the output's last block is
    whole: :func:`shuffle_rss_budget`), so about ``3 * workers`` blocks in all.  The scatter
    reads the input with ``O_DIRECT`` (it is read once: no page cache to fill and evict),
    each block on a thread while the one before is written to its buckets and the
    destinations of its own rows are computed; the gather has the kernel
    read the next block's buckets while it writes one, so the disk need not wait for the CPU.

    ``method="segments"`` shuffles in one pass instead, half the disk traffic of
    data larger than RAM, moving rows in contiguous segments: every output block
    is one segment from each of ``segments`` strata of the input, its rows
    permuted (:mod:`shardset.segment_shuffle`; the input needs slice checksums).
    """
    if method not in ("rows", "segments"):
        raise ArgumentError(f"method must be 'rows' or 'segments', got {method!r}")
    if segments is not None and method != "segments":
        raise ArgumentError("segments applies to method='segments' only")
    if tmp_dir is not None and method != "rows":
        raise ArgumentError("tmp_dir (where the buckets go) applies to method='rows' only")
    src_url, dst_url = parse_url(src), parse_url(dst)
    if (src_url.is_local and dst_url.is_local and os.path.realpath(src_url.local_path) == os.path.realpath(
            dst_url.local_path)) or (not src_url.is_local and str(src_url) == str(dst_url)):
        raise ShardsetError(f"cannot shuffle {src} onto itself; choose another destination")
    src_options = _options_for(src, storage_options)
    if storage_options and src_options is None and _options_for(dst, storage_options) is None:
        raise StoreURLError(f"storage options {sorted(storage_options)} apply to object stores, not to {src} or {dst}")
    source = BlockStore.open(src, storage_options=src_options)
    source.require_complete()
    lay = source.layout
    if block_mb is None and block_rows is None:
        block_rows = lay.block_rows
    block_mb = DEFAULT_BLOCK_MB if block_mb is None else block_mb
    out = layout_for(lay.rows, lay.fields, block_mb=block_mb, block_rows=block_rows)
    # The input's place goes into the record: a rerun from another input with the same
    # layout (stores made by write() record no generator) is refused, not resumed.
    origin = {**lay.generator, "input": _location(src)}
    if method == "segments":
        return _segment_shuffled(source, dst, out, origin, seed=seed, segments=segments, workers=workers,
                                 compression=compression, checksum=checksum, overwrite=overwrite, progress=progress,
                                 storage_options=_options_for(dst, storage_options))
    parts = _resolve_workers(workers, lay.num_blocks, src)

    def scatter(buckets: "_Buckets", seed: int, show: bool) -> None:
        if parts == 1:
            done = [_scatter_store_part(buckets, os.fspath(src), 0, 1, seed, show, src_options)]
        else:  # forked, as the writer's processes are (no second import of torch), unless obstore forbids it
            method = worker_start_method(src) or ("fork" if "fork" in mp.get_all_start_methods() else "spawn")
            # the scatter processes die with this one, as the writer's do: no orphan scatters on
            with ProcessPoolExecutor(parts, mp_context=mp.get_context(method), initializer=_die_with_parent) as pool:
                jobs = [pool.submit(_scatter_store_part, buckets, os.fspath(src), k, parts, seed, False, src_options)
                        for k in range(parts)]
                done = [job.result() for job in jobs]
        buckets.finish(done)

    return _shuffled(
        dst, out, scatter, seed=seed, source=origin, workers=workers, compression=compression,
        checksum=checksum, overwrite=overwrite, progress=progress, tmp_dir=tmp_dir,
        storage_options=_options_for(dst, storage_options),
    )


def _segment_shuffled(source: BlockStore, dst, layout: Layout, origin: Mapping[str, Any], *, seed: int,
                      segments: int | None, **how: Any) -> BlockStore:
    """The one-pass shuffle of :func:`shuffle_store` (``method="segments"``) of the open store
    ``source`` (``origin``: what the output records of it)."""
    plan = plan_for(source, layout, segments, check_int("seed", seed, 0))
    layout = _recorded(layout, plan.seed, origin, **plan.record())
    store = write_blocks(dst, layout, SegmentSource(source.where, source.storage_options or None, plan, dst), **how)
    store.require_complete()
    return store


def _scatter_store_part(buckets: "_Buckets", src: str, part: int, parts: int, seed: int, show: bool,
                        storage_options: Mapping[str, Any] | None = None) -> tuple[int, list[list[int]]]:
    """Scatter blocks ``part, part + parts, ...`` of the store ``src`` into bucket part ``part``,
    each read on a thread while the one before it is scattered (into the same buffers: see
    :func:`_read_ahead`)."""
    store = BlockStore.open(src, storage_options=storage_options)
    lay = store.layout
    mine = range(part, lay.num_blocks, parts)
    bufs = {name: store.new_buffer(name) for name in lay.fields}

    def read(b: int) -> dict[str, np.ndarray]:
        return {name: store.read_block(name, b, bufs[name], direct=True) for name in lay.fields}

    chunks = ((b * lay.block_rows, lay.block_len(b), get, done)
              for b, (get, done) in zip(mine, _read_ahead(read, mine)))
    return buckets.scatter_part(part, chunks, shuffled_position(lay.rows, seed), show)


def _read_ahead(read: Callable[[Any], Any], items: Sequence[Any]
                ) -> Iterator[tuple[Callable[[], Any], Callable[[], None]]]:
    """``(get, done)`` for each of ``items``: ``get()`` waits for ``read(item)``, run on a thread.

    ``done()`` says the caller is finished with what ``get`` returned; it starts the read of
    the next item, which may reuse that memory, while the caller goes on with its work: a
    scatter computes the next block's destinations, which need no data, while it is read.
    (Called or not, ``done`` takes effect when the next item is asked for.)"""
    started, ahead = -1, None
    with ThreadPoolExecutor(1, thread_name_prefix="shardset-scatter-read") as pool:

        def start(k: int) -> None:
            nonlocal started, ahead
            if k == started + 1 and k < len(items):
                ahead, started = pool.submit(read, items[k]), k

        for k in range(len(items)):
            start(k)
            yield ahead.result, functools.partial(start, k + 1)


def _numbered(chunks: Iterable[Mapping[str, np.ndarray]]) -> Iterator[tuple[int, int, Callable, Callable]]:
    """``(first row, rows, get, done)`` for consecutive chunks in memory, as
    :meth:`_Buckets.scatter_part` takes them."""
    start = 0
    for chunk in chunks:
        n = len(next(iter(chunk.values()))) if chunk else 0
        yield start, n, lambda chunk=chunk: chunk, lambda: None
        start += n


def _show(progress: bool | None) -> bool:
    return sys.stderr.isatty() if progress is None else progress


class _Buckets:
    """Bucket files per output block; callable as a block source for :func:`shardset.write_blocks`.

    Output block ``b`` has one file per scatter *part* (one per scatter process),
    ``<b>.<part>``: a sequence of *runs*, one per input chunk that sends rows to
    ``b``, each written with one ``writev``: the row count (uint64), then the
    rows' offsets inside the block (uint32: a block holds at most 256 MiB of
    rows), then their values field by field.  The files are not fsynced: the
    marker records each file's size and crc32c, and the gather checks every file
    it reads against them, so a bucket that a crash kept from the disk is found
    and the scatter redone (:meth:`fill`).  Until then the buckets may live in the
    page cache only, and are deleted without ever being written out when the
    data fits there.  ``fill(block, out)`` lets the writer reuse its output buffers.
    """

    def __init__(self, root: Path, layout: Layout, output: str | os.PathLike) -> None:
        self.root, self.layout = root, layout
        self._written = WrittenBlocks(output)
        self.fields = list(layout.fields.items())
        self.parts = 1
        self.sums: list[list[list[int]]] = []  # [part][block] = [bytes, crc32c] of each bucket file
        self.params = {
            "rows": layout.rows, "block_rows": layout.block_rows, "generator": layout.generator,
            "fields": {k: v.to_json() for k, v in layout.fields.items()},
        }
        self._scratch = _Scratch()

    def path(self, block: int, part: int) -> Path:
        return self.root / f"{block}.{part}"

    def ready(self) -> bool:
        """True when a finished scatter of these very parameters is on disk."""
        try:
            marker = json.loads((self.root / _MARKER).read_text())
        except (OSError, ValueError):
            return False
        parts, sums = marker.pop("parts", None), marker.pop("buckets", None)
        if marker != self.params or not isinstance(parts, int) or parts < 1 or not isinstance(sums, list) \
                or [len(s) for s in sums] != [self.layout.num_blocks] * parts:
            return False
        self.parts, self.sums = parts, sums
        return True

    def begin(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)
        self.root.mkdir(parents=True)

    def scatter_part(
        self, part: int, chunks: Iterable[tuple[int, int, Callable[[], Mapping[str, np.ndarray]], Callable[[], None]]],
        position: FeistelPermutation, show: bool,
    ) -> tuple[int, list[list[int]]]:
        """Scatter ``(first row, rows, get, done)`` chunks into bucket part ``part``: ``get()``
        returns the chunk's fields, ``done()`` is called once they are no longer needed (see
        :func:`_read_ahead`).  Returns the rows scattered and ``[bytes, crc32c]`` of each of
        the part's files, for :meth:`finish`."""
        rows, sums, scratch = 0, [[0, 0] for _ in range(self.layout.num_blocks)], _Scratch()
        with tqdm(total=self.layout.nbytes, unit="B", unit_scale=True, unit_divisor=1024, disable=not show,
                  desc="scattering", dynamic_ncols=True) as bar:
            for start, n, get, done in chunks:
                self._scatter_chunk(start, n, get, done, position, part, sums, scratch)
                rows += n
                bar.update(n * self.layout.row_bytes)
        return rows, sums

    def finish(self, parts: list[tuple[int, list[list[int]]]]) -> None:
        """Record the scatter finished: ``parts`` are :meth:`scatter_part`'s results, in part order."""
        rows = sum(n for n, _ in parts)
        if rows != self.layout.rows:
            raise ArgumentError(f"the input held {rows} rows, expected {self.layout.rows}")
        self.parts, self.sums = len(parts), [s for _, s in parts]
        tmp = self.root / f"{_MARKER}.partial"
        tmp.write_text(json.dumps({**self.params, "parts": self.parts, "buckets": self.sums}))
        os.replace(tmp, self.root / _MARKER)

    def _scatter_chunk(
        self, start: int, n: int, get: Callable[[], Mapping[str, np.ndarray]], done: Callable[[], None],
        position: FeistelPermutation, part: int, sums: list[list[int]], scratch: "_Scratch",
    ) -> None:
        lay = self.layout
        if start + n > lay.rows:
            raise ArgumentError(f"the input holds more than the declared {lay.rows} rows")
        # The temporaries live in scratch buffers reused chunk after chunk (fresh pages cost more to
        # fault in than the arithmetic done on them), and the destinations are computed a piece at a
        # time, straight into each row's block (16-bit keys: numpy's stable sort of them is a radix
        # sort) and its offset inside the block: no array of n 8-byte destinations.
        keys = scratch.get("keys", n, np.uint16 if lay.num_blocks <= 1 << 16 else np.uint32)
        offsets = scratch.get("offsets", n, np.dtype("<u4"))
        # (one int64 division, then a multiply-subtract: half the time of dividing twice straight
        # into the narrow types, whose casting loops are slow)
        quotients = scratch.get("quotients", min(n, _INDEX_PIECE), np.int64)
        for lo in range(0, n, _INDEX_PIECE):
            hi = min(n, lo + _INDEX_PIECE)
            dest = position(np.arange(start + lo, start + hi, dtype=np.int64))
            q = np.floor_divide(dest, lay.block_rows, out=quotients[: hi - lo])
            keys[lo:hi] = q
            dest -= np.multiply(q, lay.block_rows, out=q)
            offsets[lo:hi] = dest
        order = np.argsort(keys, kind="stable")
        counts = np.bincount(keys, minlength=lay.num_blocks).astype("<u8")
        bounds = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        # np.take, not fancy indexing: several times faster for rows of a few bytes
        columns = [np.take(offsets, order, out=scratch.get("column -1", n, offsets.dtype), mode="clip")]
        chunk = get()  # the data is needed from here on only, and not after the rows are sorted
        if set(chunk) != set(lay.fields):
            raise ArgumentError(f"input has fields {sorted(chunk)}, expected {sorted(lay.fields)}")
        for i, (name, spec) in enumerate(self.fields):
            if len(chunk[name]) != n:
                raise ArgumentError(f"input field {name!r} has {len(chunk[name])} rows in a chunk of {n}")
            out = scratch.get(f"column {i}", n, np.dtype(spec.dtype), spec.shape)
            columns.append(np.take(np.asarray(chunk[name], dtype=spec.dtype), order, axis=0, out=out, mode="clip"))
        del order, chunk
        done()
        for b in np.flatnonzero(counts).tolist():
            a, z = bounds[b], bounds[b + 1]
            run = [counts[b : b + 1].view(np.uint8)] + [col[a:z].reshape(-1).view(np.uint8) for col in columns]
            fd = os.open(self.path(b, part), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
            try:
                _writev_all(fd, run)
            finally:
                os.close(fd)
            for piece in run:
                sums[b][1] = crc32c(piece, sums[b][1])
                sums[b][0] += len(piece)

    def fill(self, block: int, out: Mapping[str, np.ndarray]) -> None:
        # The buckets of the blocks now durable are deleted, so that the kernel hands their pages
        # to the output instead of taking fresh ones (or writing buckets out to make room).
        # Were this process killed before the writer records those blocks, the rerun would find
        # their buckets gone and redo the scatter: slower, never wrong.
        for done in self._written.filling(block):
            for p in range(self.parts):
                self.path(done, p).unlink(missing_ok=True)
        targets = [(_rows(out[name]), spec.row_bytes) for name, spec in self.fields]
        rows = sum(self._place(block, p, targets) for p in range(self.parts))
        if rows != self.layout.block_len(block):  # the checksums matched: only a bug gets here
            raise StoreFormatError(f"shuffle bucket {self.path(block, 0)} holds {rows} rows, not "
                                   f"{self.layout.block_len(block)}")
        filled = self._written.filled
        if len(filled) == 2:  # the writer hands this process every k-th missing block: guess the stride
            self._read_soon(2 * block - filled[0])

    def _read_soon(self, block: int) -> None:
        """Have the kernel read ``block``'s bucket files into the page cache now, while this
        block is written and the previous one waited for: the next :meth:`fill` then finds
        them there instead of waiting on the disk.  A wrong guess of the next block costs
        only a useless read; a missing bucket is reported by the gather of its block."""
        if 0 <= block < self.layout.num_blocks:
            for p in range(self.parts):
                fadvise(self.path(block, p), "POSIX_FADV_WILLNEED", self.sums[p][block][0])

    def _place(self, block: int, part: int, targets: list[tuple[np.ndarray, int]]) -> int:
        """Put every row of one bucket file at its offset in ``targets`` (one row array per field)
        and check the file against the marker's size and crc32c; returns the rows placed.

        The file is read a run at a time and a field's values in pieces of at most
        ``_PIECE`` bytes, so memory holds one run's offsets, not the bucket."""
        size, crc = self.sums[part][block]
        if size == 0:  # this part sent no row to this block, so it wrote no file
            return 0
        path, scratch = self.path(block, part), self._scratch
        at, running, rows = 0, 0, 0

        def read(f, nbytes: int, key: str) -> np.ndarray:
            nonlocal at, running
            if at + nbytes > size:
                raise _Torn
            buf = scratch.get(key, nbytes, np.uint8)
            got = 0
            while got < nbytes and (more := f.readinto(memoryview(buf[got:]))):
                got += more
            if got != nbytes:
                raise _Torn
            at, running = at + nbytes, crc32c(buf, running)
            return buf

        try:
            with open(path, "rb", buffering=0) as f:
                while at < size:
                    n = int(read(f, 8, "header").view("<u8")[0])
                    pos = scratch.get("positions", n, np.intp)
                    pos[...] = read(f, 4 * n, "offsets").view("<u4")
                    for rows_of, width in targets:
                        step = max(1, min(_PIECE, self.layout.block_rows * width) // width)
                        for a in range(0, n, step):
                            b = min(n, a + step)
                            # whole rows as items: np.put writes rows to random places, about twice as
                            # fast as np.take's reads from random places (and needs no inverse permutation)
                            np.put(rows_of, pos[a:b], read(f, (b - a) * width, "values").view(rows_of.dtype))
                    rows += n
                if f.read(1) or running != crc:
                    raise _Torn
        except (_Torn, FileNotFoundError, IndexError):  # IndexError: an offset past the block
            self._discard()
            raise StoreFormatError(
                f"shuffle bucket {path} is not what the scatter wrote (torn, or lost in a crash before it reached "
                "the disk): the scatter is discarded; rerun to redo it"
            ) from None
        return rows

    def _discard(self) -> None:
        """Forget the finished scatter, so that the next run redoes it."""
        (self.root / _MARKER).unlink(missing_ok=True)

    def __call__(self, block: int) -> dict[str, np.ndarray]:
        return filled(self.fill, self.layout, block, block_arrays(self.layout))


class _Scratch:
    """Named arrays reused from one call to the next, grown when a call needs more rows."""

    def __init__(self) -> None:
        self._arrays: dict[str, np.ndarray] = {}

    def get(self, key: str, rows: int, dtype: np.dtype | type, shape: tuple[int, ...] = ()) -> np.ndarray:
        """An uninitialized ``(rows, *shape)`` array of ``dtype``, the same memory as last time when it fits."""
        a = self._arrays.get(key)
        if a is None or len(a) < rows or a.dtype != dtype or a.shape[1:] != shape:
            a = self._arrays[key] = np.empty((rows, *shape), dtype)
        return a[:rows]


def _rows(a: np.ndarray) -> np.ndarray:
    """A C-contiguous array as a 1-d array with one opaque item per row (a view: writes go through)."""
    if not a.flags.c_contiguous:
        raise ValueError("rows of a non-contiguous array cannot be viewed as items")
    return a.reshape(len(a), -1).view(np.dtype(("V", a[:1].nbytes))).reshape(len(a)) if len(a) else a.reshape(0)
