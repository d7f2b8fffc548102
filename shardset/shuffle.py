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

1. *scatter*: read the input a block at a time in order, compute every row's
   destination, sort the rows by destination block and append each run to
   that block's bucket (one file of offsets inside the block, one file per
   field).  The buckets are fsynced and a marker file records the parameters.
2. *gather*: for each destination block, load its bucket, put every row at its
   offset (one ``np.put`` per field) and write the block through
   :func:`shardset.write_blocks`, with its durability and completion records.

Disk: the buckets take as much space as the data, next to the output (or in
``tmp_dir``) until the output is complete.  An interrupted run is resumed by
running it again: once the marker exists only missing output blocks are
written; an interrupted scatter starts over.

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

import json
import multiprocessing as mp
import os
import shutil
import sys
import tempfile
import zlib
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping

import numpy as np
from tqdm import tqdm

from .errors import ArgumentError, ShardsetError, StoreFormatError, StoreURLError
from .format import DEFAULT_BLOCK_MB, Layout, check_int
from .lock import locked
from .permutation import FeistelPermutation
from .store import BlockStore, _fsync_file
from .urls import REMOTE_SCHEMES, parse_url, worker_start_method
from .writer import _die_with_parent, _resolve_workers, layout_for, open_for_writing, write_blocks

__all__ = ["SHUFFLE_NAME", "shuffle_store", "write_shuffled", "shuffled_position", "shuffle_rss_budget"]

SHUFFLE_NAME = "shardset.shuffle/1"
SHUFFLE_DOMAIN = "write-shuffle"
_MARKER = "scattered.json"


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
    and output (``dst``) layouts, the budget is ``max(2 B_in + 32 R_in, 3 B_out + 12 R_out)``:
    a scatter process holds one input block, its rows sorted by destination and at
    most 32 bytes of indices per row; a gather process two output blocks (one being
    filled, one being written), one field of the block's bucket and 12 bytes of
    offsets per row.  Nothing depends on the number of rows, so data larger than
    RAM shuffles in the same memory; ``workers`` processes hold ``workers`` times
    this.  For uncompressed stores (a codec adds its own buffers).

    >>> from shardset.format import FieldSpec
    >>> lay = Layout(10**9, 1000, {"x": FieldSpec("float32", (16,))})
    >>> shuffle_rss_budget(lay, lay)  # 3 blocks of 64,000 bytes + 12,000
    204000
    """
    return max(2 * src.block_rows * src.row_bytes + 32 * src.block_rows,
               3 * dst.block_rows * dst.row_bytes + 12 * dst.block_rows)


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
    The buckets go to ``<tmp_dir or the output's directory>/<output name>.shuffle-tmp``
    (for an object-store ``path``, with ``storage_options``: to ``tmp_dir`` or the
    system's temporary directory, named after the URL so that a rerun finds them).
    """

    def scatter(buckets: "_Buckets", seed: int, show: bool) -> None:
        position = shuffled_position(buckets.layout.rows, seed)
        buckets.finish(1, buckets.scatter_part(0, _numbered(chunks), position, show))

    return _shuffled(path, layout, scatter, seed=seed, source=source, workers=workers, compression=compression,
                     checksum=checksum, overwrite=overwrite, progress=progress, tmp_dir=tmp_dir,
                     storage_options=storage_options)


@locked
def _shuffled(path, layout: Layout, scatter: Callable[["_Buckets", int, bool], None], *, seed: int,
              source: Mapping[str, Any] | None, workers: int | None, compression: str | None, checksum: bool,
              overwrite: bool, progress: bool | None, tmp_dir, storage_options=None) -> BlockStore:
    """Create the output, run ``scatter(buckets, seed, show)`` unless a finished one is on disk, gather."""
    seed = check_int("seed", seed, 0)
    layout = replace(layout, generator={
        "name": SHUFFLE_NAME,
        "algorithm": f"input row i is output row FeistelPermutation(rows, seed, 0, domain={SHUFFLE_DOMAIN!r})(i)",
        "seed": seed,
        "source": dict(source or {}),
    })
    store = open_for_writing(path, layout, compression=compression, checksum=checksum, overwrite=overwrite,
                             storage_options=storage_options)
    # a directory of our own, even inside tmp_dir: it is deleted whole
    buckets = _Buckets(_bucket_dir(path, tmp_dir), layout)
    if store.missing_blocks():
        if overwrite or not buckets.ready():
            buckets.begin()
            scatter(buckets, seed, _show(progress))
        store = write_blocks(
            path, layout, buckets, workers=workers, compression=compression, checksum=checksum, progress=progress,
            storage_options=storage_options,
        )
        store.require_complete()
    shutil.rmtree(buckets.root, ignore_errors=True)
    return store


def _bucket_dir(path: str | os.PathLike, tmp_dir: str | os.PathLike | None) -> Path:
    """Where the buckets of a shuffle into ``path`` go: beside a local output, else in the temporary directory."""
    url = parse_url(path)
    if url.is_local:
        out = Path(url.local_path.rstrip("/"))
        return (out.parent if tmp_dir is None else Path(tmp_dir)) / f"{out.name}.shuffle-tmp"
    name = f"{url.prefix.rpartition('/')[2] or url.bucket}-{zlib.crc32(str(url).encode()):08x}"
    return Path(tempfile.gettempdir() if tmp_dir is None else tmp_dir) / f"{name}.shuffle-tmp"


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
) -> BlockStore:
    """Write a shuffled copy of the store ``src`` at ``dst`` (``shardset shuffle SRC DST``).

    Same fields and rows; the block size is ``src``'s unless ``block_mb`` or
    ``block_rows`` is given.  Both passes run on ``workers`` processes (default
    all cores); the bytes depend on ``seed`` only; rerun the same call to resume.
    ``src`` and ``dst`` may be URLs; ``storage_options`` apply to whichever is an
    object store (the buckets stay on local disk, see :func:`write_shuffled`).

    Memory does not grow with the data, so a store larger than RAM shuffles
    like a small one: each process holds at most
    ``max(2 B_in + 32 R_in, 3 B_out + 12 R_out)`` bytes beyond the interpreter
    (``R`` rows and ``B = R * row_bytes`` bytes per block of the input and the
    output, :func:`shuffle_rss_budget`), so about ``3 * workers`` blocks in all.
    The scatter hints the next input block to the kernel while it sorts the
    current one, and the gather drops each bucket from the page cache once read.
    """
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
    parts = _resolve_workers(workers, lay.num_blocks)

    def scatter(buckets: "_Buckets", seed: int, show: bool) -> None:
        if parts == 1:
            rows = _scatter_store_part(buckets, os.fspath(src), 0, 1, seed, show, src_options)
        else:  # forked, as the writer's processes are (no second import of torch), unless obstore forbids it
            method = worker_start_method(src) or ("fork" if "fork" in mp.get_all_start_methods() else "spawn")
            # the scatter processes die with this one, as the writer's do: no orphan scatters on
            with ProcessPoolExecutor(parts, mp_context=mp.get_context(method), initializer=_die_with_parent) as pool:
                jobs = [pool.submit(_scatter_store_part, buckets, os.fspath(src), k, parts, seed, False, src_options)
                        for k in range(parts)]
                rows = sum(job.result() for job in jobs)
        buckets.finish(parts, rows)

    return _shuffled(
        dst, out, scatter, seed=seed, source=lay.generator, workers=workers, compression=compression,
        checksum=checksum, overwrite=overwrite, progress=progress, tmp_dir=tmp_dir,
        storage_options=_options_for(dst, storage_options),
    )


def _scatter_store_part(buckets: "_Buckets", src: str, part: int, parts: int, seed: int, show: bool,
                        storage_options: Mapping[str, Any] | None = None) -> int:
    """Scatter blocks ``part, part + parts, ...`` of the store ``src`` into bucket part ``part``."""
    store = BlockStore.open(src, storage_options=storage_options)
    lay = store.layout
    bufs = {name: store.new_buffer(name) for name in lay.fields}

    def chunks() -> Iterator[tuple[int, dict[str, np.ndarray]]]:
        for b in range(part, lay.num_blocks, parts):
            for name in lay.fields:  # the disk reads the next block while this one is scattered
                if b + parts < lay.num_blocks:
                    store.will_need(name, b + parts)
            yield b * lay.block_rows, {name: store.read_block(name, b, bufs[name]) for name in lay.fields}

    return buckets.scatter_part(part, chunks(), shuffled_position(lay.rows, seed), show)


def _numbered(chunks: Iterable[Mapping[str, np.ndarray]]) -> Iterator[tuple[int, Mapping[str, np.ndarray]]]:
    """``(first row, chunk)`` for consecutive chunks."""
    start = 0
    for chunk in chunks:
        yield start, chunk
        start += len(next(iter(chunk.values())))


def _show(progress: bool | None) -> bool:
    return sys.stderr.isatty() if progress is None else progress


class _Buckets:
    """Bucket files per output block; callable as a block source for :func:`shardset.write_blocks`.

    Output block ``b`` has, per scatter *part* (one per scatter process), one file
    of uint32 offsets (where each row goes inside the block: a block holds at
    most 256 MiB of rows) and one file of rows per field, appended to in the
    same order.  ``fill(block, out)`` lets the writer reuse its output buffers.
    """

    def __init__(self, root: Path, layout: Layout) -> None:
        self.root, self.layout = root, layout
        self.fields = list(layout.fields.items())
        self.parts = 1
        self.params = {
            "rows": layout.rows, "block_rows": layout.block_rows, "generator": layout.generator,
            "fields": {k: v.to_json() for k, v in layout.fields.items()},
        }

    def paths(self, block: int, part: int) -> list[Path]:
        """The offsets file, then one file per field."""
        stem = f"{block}.{part}"
        return [self.root / f"{stem}.pos"] + [self.root / f"{stem}.{i}" for i in range(len(self.fields))]

    def ready(self) -> bool:
        """True when a finished scatter of these very parameters is on disk."""
        try:
            marker = json.loads((self.root / _MARKER).read_text())
        except (OSError, ValueError):
            return False
        parts = marker.pop("parts", None)
        if marker != self.params or not isinstance(parts, int) or parts < 1:
            return False
        self.parts = parts
        return True

    def begin(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)
        self.root.mkdir(parents=True)

    def scatter_part(
        self, part: int, chunks: Iterable[tuple[int, Mapping[str, np.ndarray]]], position: FeistelPermutation,
        show: bool,
    ) -> int:
        """Scatter ``(first row, chunk)`` pairs into bucket part ``part`` and make it durable;
        returns the rows scattered."""
        rows = 0
        with tqdm(total=self.layout.nbytes, unit="B", unit_scale=True, unit_divisor=1024, disable=not show,
                  desc="scattering", dynamic_ncols=True) as bar:
            for start, chunk in chunks:
                n = self._scatter_chunk(start, chunk, position, part)
                rows += n
                bar.update(n * self.layout.row_bytes)
        for block in range(self.layout.num_blocks):  # here, so that the parts' fsyncs overlap
            for path in self.paths(block, part):
                if path.exists():
                    _fsync_file(path)
        return rows

    def finish(self, parts: int, rows: int) -> None:
        """Mark the scatter of ``parts`` durable bucket parts finished."""
        if rows != self.layout.rows:
            raise ArgumentError(f"the input held {rows} rows, expected {self.layout.rows}")
        _fsync_file(self.root)
        tmp = self.root / f"{_MARKER}.partial"
        tmp.write_text(json.dumps({**self.params, "parts": parts}))
        _fsync_file(tmp)
        os.replace(tmp, self.root / _MARKER)
        _fsync_file(self.root)
        self.parts = parts

    def _scatter_chunk(
        self, start: int, chunk: Mapping[str, np.ndarray], position: FeistelPermutation, part: int
    ) -> int:
        lay = self.layout
        if set(chunk) != set(lay.fields):
            raise ArgumentError(f"input has fields {sorted(chunk)}, expected {sorted(lay.fields)}")
        n = len(chunk[self.fields[0][0]])
        if start + n > lay.rows:
            raise ArgumentError(f"the input holds more than the declared {lay.rows} rows")
        dest = position(np.arange(start, start + n, dtype=np.int64))
        block = dest // lay.block_rows
        # A stable sort of 16-bit keys is a radix sort in numpy: O(n) for up to 65536 blocks.
        keys = block.astype(np.uint16) if lay.num_blocks <= 1 << 16 else block
        order = np.argsort(keys, kind="stable")
        del keys
        bounds = np.concatenate([[0], np.cumsum(np.bincount(block, minlength=lay.num_blocks))])
        del block
        # np.take, not fancy indexing: several times faster for rows of a few bytes
        columns = [np.take(np.remainder(dest, lay.block_rows, out=dest).astype("<u4"), order)]
        del dest
        columns += [np.take(np.asarray(chunk[name], dtype=spec.dtype), order, axis=0) for name, spec in self.fields]
        del order
        for b in np.flatnonzero(np.diff(bounds)):
            for path, col in zip(self.paths(int(b), part), columns):
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
                try:
                    _write_all(fd, memoryview(col[bounds[b] : bounds[b + 1]]).cast("B"))
                finally:
                    os.close(fd)
        return n

    def fill(self, block: int, out: Mapping[str, np.ndarray]) -> None:
        n = self.layout.block_len(block)
        parts = [self.paths(block, p) for p in range(self.parts)]
        pos = self._load([p[0] for p in parts], np.dtype("<u4"), (), n).astype(np.intp)
        for i, (name, spec) in enumerate(self.fields):
            data = self._load([p[i + 1] for p in parts], np.dtype(spec.dtype), spec.shape, n)
            # one whole row per item: np.put writes rows to random places, which is about twice as
            # fast as np.take's reads from random places (and needs no inverse permutation)
            np.put(_rows(out[name]), pos, _rows(data))
            del data

    def _load(self, paths: list[Path], dtype: np.dtype, shape: tuple[int, ...], rows: int) -> np.ndarray:
        """The rows of one file kind over every part, checked to be exactly ``rows``, read into one array."""
        data = np.empty((rows, *shape), dtype)
        sizes = [p.stat().st_size if p.exists() else 0 for p in paths]
        if sum(sizes) != data.nbytes:
            raise StoreFormatError(
                f"shuffle bucket {paths[0]} is torn ({sum(sizes)} bytes); remove {self.root} and rerun"
            )
        view, at = memoryview(data.reshape(-1).view(np.uint8)), 0
        for path, size in zip(paths, sizes):
            if size:
                with open(path, "rb", buffering=0) as f:
                    while at < data.nbytes and (got := f.readinto(view[at:])):
                        at += got
                    # read once: dropping the pages leaves the page cache to the output and the input
                    os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
        if at != data.nbytes:
            raise StoreFormatError(f"shuffle bucket {paths[0]} changed while it was read; remove {self.root} and rerun")
        return data

    def __call__(self, block: int) -> dict[str, np.ndarray]:
        n = self.layout.block_len(block)
        out = {k: np.empty((n, *s.shape), s.dtype) for k, s in self.layout.fields.items()}
        self.fill(block, out)
        return out


def _rows(a: np.ndarray) -> np.ndarray:
    """A C-contiguous array as a 1-d array with one opaque item per row (a view: writes go through)."""
    if not a.flags.c_contiguous:
        raise ValueError("rows of a non-contiguous array cannot be viewed as items")
    return a.reshape(len(a), -1).view(np.dtype(("V", a[:1].nbytes))).reshape(len(a)) if len(a) else a.reshape(0)


def _write_all(fd: int, data: memoryview) -> None:
    while len(data):
        data = data[os.write(fd, data):]
