"""Write-time shuffling: rewrite rows so that every block is a random sample of the whole set.

The reader only permutes blocks and the rows inside a block (or a window of a
few blocks), so rows written next to each other stay close all epoch long.
Data written in a meaningful order (sorted by label, by time, by source) is
therefore shuffled once, when it is written: row ``i`` of the input goes to
row ``FeistelPermutation(N, seed, domain="write-shuffle")(i)`` of the output.
Output block ``d`` then holds the input rows whose images fall in its range, a
pseudorandom sample of the whole dataset, already in random order.

It is a two-pass bucket scatter that never holds more than a few blocks:

1. *scatter*: read the input a block at a time in order, compute every row's
   destination, sort the rows by destination block and append each run to
   that block's bucket (one file of offsets inside the block, one file per
   field).  The buckets are fsynced and a marker file records the parameters.
2. *gather*: for each destination block, load its bucket, put every row at its
   offset (one ``np.take`` per field) and write the block through
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
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping

import numpy as np
from tqdm import tqdm

from .errors import ArgumentError, ShardsetError, StoreFormatError
from .format import DEFAULT_BLOCK_MB, Layout, check_int
from .lock import locked
from .permutation import FeistelPermutation
from .store import BlockStore, _fsync_file
from .writer import _resolve_workers, layout_for, open_for_writing, write_blocks

__all__ = ["SHUFFLE_NAME", "shuffle_store", "write_shuffled", "shuffled_position"]

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
) -> BlockStore:
    """Write the rows of ``chunks`` (consecutive pieces of the input, in row order) shuffled.

    ``layout`` is the output's geometry; its generator attributes are replaced by
    a record of the shuffle (``seed`` and the input's own ``source`` generator),
    so a rerun with another seed is refused instead of mixing two shuffles.
    ``chunks`` is consumed only if the scatter pass has not finished before.
    The buckets go to ``<tmp_dir or the output's directory>/<output name>.shuffle-tmp``.
    """

    def scatter(buckets: "_Buckets", seed: int, show: bool) -> None:
        position = shuffled_position(buckets.layout.rows, seed)
        buckets.finish(1, buckets.scatter_part(0, _numbered(chunks), position, show))

    return _shuffled(path, layout, scatter, seed=seed, source=source, workers=workers, compression=compression,
                     checksum=checksum, overwrite=overwrite, progress=progress, tmp_dir=tmp_dir)


@locked
def _shuffled(path, layout: Layout, scatter: Callable[["_Buckets", int, bool], None], *, seed: int,
              source: Mapping[str, Any] | None, workers: int | None, compression: str | None, checksum: bool,
              overwrite: bool, progress: bool | None, tmp_dir) -> BlockStore:
    """Create the output, run ``scatter(buckets, seed, show)`` unless a finished one is on disk, gather."""
    seed = check_int("seed", seed, 0)
    layout = replace(layout, generator={
        "name": SHUFFLE_NAME,
        "algorithm": f"input row i is output row FeistelPermutation(rows, seed, 0, domain={SHUFFLE_DOMAIN!r})(i)",
        "seed": seed,
        "source": dict(source or {}),
    })
    store = open_for_writing(path, layout, compression=compression, checksum=checksum, overwrite=overwrite)
    out = Path(os.fspath(path).rstrip("/"))
    # a directory of our own, even inside tmp_dir: it is deleted whole
    buckets = _Buckets((out.parent if tmp_dir is None else Path(tmp_dir)) / f"{out.name}.shuffle-tmp", layout)
    if store.missing_blocks():
        if overwrite or not buckets.ready():
            buckets.begin()
            scatter(buckets, seed, _show(progress))
        store = write_blocks(
            path, layout, buckets, workers=workers, compression=compression, checksum=checksum, progress=progress
        )
        store.require_complete()
    shutil.rmtree(buckets.root, ignore_errors=True)
    return store


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
) -> BlockStore:
    """Write a shuffled copy of the store ``src`` at ``dst`` (``shardset shuffle SRC DST``).

    Same fields and rows; the block size is ``src``'s unless ``block_mb`` or
    ``block_rows`` is given.  Both passes run on ``workers`` processes (default
    all cores), each holding a few blocks whatever the store's size; the bytes
    depend on ``seed`` only; rerun the same call to resume.
    """
    if os.path.realpath(src) == os.path.realpath(dst):
        raise ShardsetError(f"cannot shuffle {src} onto itself; choose another destination")
    source = BlockStore.open(src)
    source.require_complete()
    lay = source.layout
    if block_mb is None and block_rows is None:
        block_rows = lay.block_rows
    block_mb = DEFAULT_BLOCK_MB if block_mb is None else block_mb
    out = layout_for(lay.rows, lay.fields, block_mb=block_mb, block_rows=block_rows)
    parts = _resolve_workers(workers, lay.num_blocks)

    def scatter(buckets: "_Buckets", seed: int, show: bool) -> None:
        if parts == 1:
            rows = _scatter_store_part(buckets, os.fspath(src), 0, 1, seed, show)
        else:  # forked, as the writer's processes are: no second import of torch
            ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
            with ProcessPoolExecutor(parts, mp_context=ctx) as pool:
                jobs = [pool.submit(_scatter_store_part, buckets, os.fspath(src), k, parts, seed, False)
                        for k in range(parts)]
                rows = sum(job.result() for job in jobs)
        buckets.finish(parts, rows)

    return _shuffled(
        dst, out, scatter, seed=seed, source=lay.generator, workers=workers, compression=compression,
        checksum=checksum, overwrite=overwrite, progress=progress, tmp_dir=tmp_dir,
    )


def _scatter_store_part(buckets: "_Buckets", src: str, part: int, parts: int, seed: int, show: bool) -> int:
    """Scatter blocks ``part, part + parts, ...`` of the store ``src`` into bucket part ``part``."""
    store = BlockStore.open(src)
    lay = store.layout
    bufs = {name: store.new_buffer(name) for name in lay.fields}
    chunks = (
        (b * lay.block_rows, {name: store.read_block(name, b, bufs[name]) for name in lay.fields})
        for b in range(part, lay.num_blocks, parts)
    )
    return buckets.scatter_part(part, chunks, shuffled_position(lay.rows, seed), show)


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
        """Scatter ``(first row, chunk)`` pairs into bucket part ``part``; returns the rows scattered."""
        rows = 0
        with tqdm(total=self.layout.nbytes, unit="B", unit_scale=True, unit_divisor=1024, disable=not show,
                  desc="scattering", dynamic_ncols=True) as bar:
            for start, chunk in chunks:
                n = self._scatter_chunk(start, chunk, position, part)
                rows += n
                bar.update(n * self.layout.row_bytes)
        return rows

    def finish(self, parts: int, rows: int) -> None:
        """Make the ``parts`` bucket parts durable and mark the scatter finished."""
        if rows != self.layout.rows:
            raise ArgumentError(f"the input held {rows} rows, expected {self.layout.rows}")
        for path in self.root.iterdir():
            _fsync_file(path)
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
        # np.take, not fancy indexing: several times faster for rows of a few bytes
        columns = [np.take(dest - block * lay.block_rows, order).astype("<u4")]
        columns += [np.take(np.asarray(chunk[name], dtype=spec.dtype), order, axis=0) for name, spec in self.fields]
        bounds = np.concatenate([[0], np.cumsum(np.bincount(block, minlength=lay.num_blocks))])
        for b in np.flatnonzero(np.diff(bounds)):
            for path, col in zip(self.paths(int(b), part), columns):
                with open(path, "ab") as f:
                    f.write(memoryview(np.ascontiguousarray(col[bounds[b] : bounds[b + 1]])).cast("B"))
        return n

    def fill(self, block: int, out: Mapping[str, np.ndarray]) -> None:
        n = self.layout.block_len(block)
        parts = [self.paths(block, p) for p in range(self.parts)]
        pos = self._load([p[0] for p in parts], np.dtype("<u4"), (), n)
        where = np.empty(n, np.intp)
        where[pos] = np.arange(n)  # row of the bucket that goes to each position
        for i, (name, spec) in enumerate(self.fields):
            data = self._load([p[i + 1] for p in parts], np.dtype(spec.dtype), spec.shape, n)
            np.take(data, where, axis=0, out=out[name])

    def _load(self, paths: list[Path], dtype: np.dtype, shape: tuple[int, ...], rows: int) -> np.ndarray:
        """The rows of one file kind over every part, checked to be exactly ``rows``."""
        pieces = [np.fromfile(p, dtype=dtype) if p.exists() else np.empty(0, dtype) for p in paths]
        data = np.concatenate(pieces) if len(pieces) > 1 else pieces[0]
        if data.size != rows * int(np.prod(shape, dtype=np.int64)):
            raise StoreFormatError(
                f"shuffle bucket {paths[0]} is torn ({data.nbytes} bytes); remove {self.root} and rerun"
            )
        return data.reshape(rows, *shape)

    def __call__(self, block: int) -> dict[str, np.ndarray]:
        n = self.layout.block_len(block)
        out = {k: np.empty((n, *s.shape), s.dtype) for k, s in self.layout.fields.items()}
        self.fill(block, out)
        return out
