"""Block I/O on a Zarr group: create, open, read and durably write whole blocks.

zarr-python validates and describes the arrays; the bytes of a block move on a
fast path when the store is a local directory and the codec chain is the
default (little-endian bytes, optionally followed by a crc32c checksum): the
chunk file is read with one ``readinto`` into a reused buffer (or, asked for
with ``direct=True`` and not in the page cache, one ``O_DIRECT`` read) and its
checksum verified in place, and a block is written with one ``writev`` +
``fsync`` + rename.  On object stores (``s3://``, ... see :mod:`shardset.urls`) a block's
chunk arrives straight into the buffer, streamed by one GET (its checksum
computed on the way) or as concurrent ranged GETs of about
:attr:`BlockStore.read_part_bytes` when larger, and is verified the same way; a put of one object is
atomic, so no temporary object is needed.  Any other codec chain goes through
zarr's own encode/decode.

Example:
    >>> import numpy as np, tempfile, os
    >>> from shardset.format import Layout, FieldSpec
    >>> from shardset.store import BlockStore
    >>> path = os.path.join(tempfile.mkdtemp(), "s.zarr")
    >>> lay = Layout(rows=5, block_rows=2, fields={"x": FieldSpec("float32", (3,))})
    >>> bs = BlockStore.create(path, lay)
    >>> for b in range(lay.num_blocks):
    ...     bs.write_block(b, {"x": np.full((lay.block_len(b), 3), b, np.float32)})
    >>> bs.mark_complete(range(lay.num_blocks))
    >>> BlockStore.open(path).read_block("x", 2)[:1].tolist()
    [[2.0, 2.0, 2.0]]
"""

from __future__ import annotations

import errno
import fcntl
import contextlib
import functools
import json
import os
import shutil
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Iterable, Mapping

import crc32c
import numpy as np
import zarr
from zarr.codecs import BytesCodec, Crc32cCodec
from zarr.core.sync import sync
from zarr.storage import LocalStore

from .checksum import joined_crc
from .direct_io import DirectRead, Steps, run_steps, scratch_buffer
from .errors import (
    ArgumentError,
    CorruptBlockError,
    IncompleteStoreError,
    StoreAccessError,
    StoreFormatError,
    StoreIOError,
    StoreNotFoundError,
)
from .format import ATTRS_KEY, SLICE_TABLE, FieldSpec, Layout, ranges_to_blocks, slice_rows_for
from .memory import DIRECT_ALIGN, aligned_buffer, direct_nbytes, is_aligned
from .page_cache import cached_pages
from .urls import open_store, parse_url, remote_errors, store_exists

__all__ = ["BlockStore", "COMPRESSIONS", "compressors_for"]

COMPRESSIONS = ("lz4", "zstd")
CRC_BYTES = 4
TABLE_CACHE_BLOCKS = 4096  # slice tables kept in memory (4 KiB a field each at 1024 slices)
# Object stores: a streamed GET hands over the body in pieces of at least this many bytes
# (obstore joins its network reads, 240 KiB on average against moto, until they reach
# it): few enough thread wake-ups per byte, and each piece still in cache when it is
# checksummed.  Against moto on an idle machine, pinned, 5 interleaved rounds: block
# loads at 0.80, 0.89 and 0.87 of plain GETs with 1, 2 and 4 in flight, against
# 0.65, 0.65 and 0.63 for 256 KiB pieces (0.77, 0.78 and 0.99 for 4 MiB).  Runs on a
# loaded machine had favoured 256 KiB: the choice was made on the quiet ones.
STREAM_PIECE = 1 << 20
ADVICE_PIECE = 1 << 20  # bytes per POSIX_FADV_WILLNEED call (see fadvise)


def compressors_for(compression: str | None, checksum: bool) -> list[Any]:
    """The bytes-to-bytes codecs after the little-endian serializer."""
    codecs: list[Any] = []
    if compression == "zstd":
        codecs.append(zarr.codecs.ZstdCodec(level=1))
    elif compression == "lz4":
        from zarr.codecs.numcodecs import LZ4

        codecs.append(LZ4())  # zarr warns that it is outside the v3 spec; docs/format.md says so too
    elif compression is not None:
        raise ArgumentError(f"unknown compression {compression!r}; choose one of {', '.join(COMPRESSIONS)} or none")
    if checksum:
        codecs.append(Crc32cCodec())
    return codecs


def _fill_value(dtype: np.dtype):
    return np.nan if dtype.kind in "fc" else 0


class BlockStore:
    """A shardset store (or any row-chunked Zarr group) opened for whole-block I/O.

    ``where`` is a local path or a URL (see :mod:`shardset.urls`); ``storage_options``
    configure an object store (endpoint, region, credentials).
    """

    read_part_bytes = 16 << 20  # object stores: ranged GETs of about this many bytes of a chunk, all concurrent

    def __init__(
        self, group: zarr.Group, layout: Layout, where: str, *, foreign: bool = False,
        storage_options: Mapping[str, Any] | None = None,
    ) -> None:
        self.group = group
        self.layout = layout
        self.where = where
        self.storage_options = dict(storage_options or {})
        self.foreign = foreign  # a plain Zarr group without shardset attributes
        self.arrays: dict[str, zarr.Array] = {}
        for name, spec in layout.fields.items():
            arr = group.get(name)
            if not isinstance(arr, zarr.Array):
                raise StoreFormatError(f"{where}: field '{name}' is missing")
            want_shape = (layout.rows, *spec.shape)
            want_chunks = (layout.block_rows, *spec.shape)
            if tuple(arr.shape) != want_shape or tuple(arr.chunks) != want_chunks or arr.dtype != np.dtype(spec.dtype):
                raise StoreFormatError(
                    f"{where}: field '{name}' is {arr.dtype}{tuple(arr.shape)} in chunks {tuple(arr.chunks)}, "
                    f"expected {spec.dtype}{want_shape} in chunks {want_chunks}"
                )
            # The creation's config is not stored with the array: without this, zarr skips
            # writing a chunk that holds only fill values (an all-NaN or all-zero block).
            self.arrays[name] = arr.with_config({"write_empty_chunks": True})
        store = group.store
        self.local_root: Path | None = Path(store.root) if isinstance(store, LocalStore) else None
        self._raw = {name: self._raw_chain(arr) for name, arr in self.arrays.items()}
        self.slice_table: zarr.Array | None = None
        if layout.slice_rows is not None:
            table = group.get(SLICE_TABLE)
            want = (layout.num_blocks, len(layout.fields), layout.slices_per_block)
            if not isinstance(table, zarr.Array) or tuple(table.shape) != want or tuple(table.chunks) != (1, *want[1:]):
                raise StoreFormatError(f"{where}: the '{SLICE_TABLE}' array is missing or not {want} in blocks")
            self.slice_table = table.with_config({"write_empty_chunks": True})
        # block -> its slice checksums, for the blocks used last (lock-free under the GIL:
        # a reader has up to 16 I/O threads asking)
        self.slice_checksums = functools.lru_cache(maxsize=TABLE_CACHE_BLOCKS)(self._slice_checksums)

    # -- opening and creating ------------------------------------------------------

    @classmethod
    def open(
        cls, path: str | os.PathLike, *, mode: str = "r", storage_options: Mapping[str, Any] | None = None
    ) -> "BlockStore":
        """Open an existing store (a path or URL); ``mode="r+"`` to write blocks or metadata."""
        where = str(path)
        target = open_store(path, storage_options, read_only=mode == "r")
        try:
            with remote_errors(where, "opening"):
                group = zarr.open_group(target, mode=mode)
        except PermissionError as exc:
            raise StoreAccessError(f"cannot read {where}: {exc.strerror or exc}") from None
        except (FileNotFoundError, FileExistsError, NotADirectoryError, zarr.errors.GroupNotFoundError,
                zarr.errors.NodeTypeValidationError):  # FileExistsError: mode "r+" on a plain file
            kind = StoreFormatError if store_exists(path, storage_options) else StoreNotFoundError
            raise kind(f"{where} is not a shardset store (no Zarr group there)") from None
        except zarr.errors.ContainsArrayError:
            raise StoreFormatError(f"{where} is a Zarr array, not a shardset store (a group)") from None
        except json.JSONDecodeError as exc:
            raise StoreFormatError(f"{where} has a damaged zarr.json (not JSON: {exc})") from None
        try:
            with remote_errors(where, "opening"):  # the arrays' metadata is read here
                if ATTRS_KEY in group.attrs:
                    return cls(group, Layout.from_attrs(group.attrs, where), where, storage_options=storage_options)
                return cls(group, _infer_layout(group, where), where, foreign=True, storage_options=storage_options)
        except json.JSONDecodeError as exc:
            raise StoreFormatError(f"{where} has an array with a damaged zarr.json (not JSON: {exc})") from None
        except PermissionError as exc:
            raise StoreAccessError(f"cannot read {where}: {exc.strerror or exc}: {exc.filename}") from None

    @classmethod
    def create(
        cls,
        path: str | os.PathLike,
        layout: Layout,
        *,
        compression: str | None = None,
        checksum: bool = True,
        overwrite: bool = False,
        storage_options: Mapping[str, Any] | None = None,
    ) -> "BlockStore":
        """Create an empty store (no block complete yet) for ``layout`` at a path or URL."""
        where = str(path)
        compressors = compressors_for(compression, checksum)
        # Slice checksums let a reader verify part of a block; a compressed chunk
        # cannot be read in parts anyway.
        layout.slice_rows = slice_rows_for(layout.block_rows) if checksum and compression is None else None
        local = parse_url(path).local_path
        if local is not None:
            _check_target(local, where, overwrite)
        if overwrite and local is not None and os.path.isdir(local):
            try:
                with contextlib.suppress(FileNotFoundError):  # first: a deletion cut short leaves no store behind
                    os.remove(os.path.join(local, "zarr.json"))
                shutil.rmtree(local)  # zarr's mode "w" empties an object-store prefix itself
            except OSError as exc:
                raise StoreAccessError(f"cannot delete the store at {where} to replace it ({exc.strerror or exc}: "
                                       f"{exc.filename}); remove it yourself or choose another path") from None
        target = open_store(path, storage_options)
        try:
            # The attributes come first: from its first moment the group says it is an
            # incomplete shardset store, never a plain (complete-looking) Zarr group.
            group = zarr.open_group(target, mode="w-" if not overwrite else "w", attributes={ATTRS_KEY: layout.to_attrs()})
        except (FileExistsError, zarr.errors.ContainsGroupError, zarr.errors.ContainsArrayError):
            raise StoreFormatError(f"{where} already exists; pass overwrite=True (--overwrite) to replace it") from None
        except OSError as exc:
            raise StoreFormatError(f"cannot create a store at {where}: {exc.strerror or exc}") from None
        try:  # a full disk here is the writer's error too, not a raw OSError
            for name, spec in layout.fields.items():
                dtype = np.dtype(spec.dtype)
                group.create_array(
                    name,
                    shape=(layout.rows, *spec.shape),
                    chunks=(layout.block_rows, *spec.shape),
                    dtype=dtype,
                    serializer=BytesCodec(endian="little") if dtype.itemsize > 1 else BytesCodec(endian=None),
                    compressors=compressors,
                    fill_value=_fill_value(dtype),
                )
            if layout.slice_rows is not None:
                group.create_array(
                    SLICE_TABLE, shape=(layout.num_blocks, len(layout.fields), layout.slices_per_block),
                    chunks=(1, len(layout.fields), layout.slices_per_block), dtype=np.uint32,
                    serializer=BytesCodec(endian="little"), compressors=[Crc32cCodec()], fill_value=0,
                )
        except OSError as exc:
            err = StoreIOError(f"creating {where} failed: {exc.strerror or exc}; fix the cause and rerun with "
                               "overwrite=True (--overwrite)")
            err.errno = exc.errno
            raise err from None
        bs = cls(group, layout, where, storage_options=storage_options)
        bs._sync_metadata()
        return bs

    # -- completeness ---------------------------------------------------------------

    def complete_blocks(self) -> set[int]:
        """Blocks recorded as durably written (every block of a foreign Zarr group)."""
        if self.foreign:
            return set(range(self.layout.num_blocks))
        fresh = zarr.open_group(self.group.store, mode="r")
        return ranges_to_blocks(fresh.attrs[ATTRS_KEY].get("complete_blocks", []))

    def missing_blocks(self) -> list[int]:
        done = self.complete_blocks()
        return [b for b in range(self.layout.num_blocks) if b not in done]

    def require_complete(self) -> None:
        """Raise :class:`IncompleteStoreError` naming the missing blocks, if any."""
        missing = self.missing_blocks()
        if missing:
            shown = ", ".join(map(str, missing[:8])) + (", ..." if len(missing) > 8 else "")
            raise IncompleteStoreError(
                f"{self.where} is incomplete: {len(missing)} of {self.layout.num_blocks} blocks missing ({shown}); "
                "rerun the command that wrote it to finish"
            )

    def mark_complete(self, blocks: Iterable[int]) -> None:
        """Record ``blocks`` (whose chunks are already durable) as complete, durably."""
        self.group.attrs[ATTRS_KEY] = self.layout.to_attrs(self.complete_blocks() | set(blocks))
        self._sync_metadata()

    def mark_incomplete(self, blocks: Iterable[int]) -> None:
        """Drop ``blocks`` from the complete list, durably (before they are rewritten)."""
        self.group.attrs[ATTRS_KEY] = self.layout.to_attrs(self.complete_blocks() - set(blocks))
        self._sync_metadata()

    def set_generator(self, generator: Mapping[str, Any]) -> None:
        self.layout.generator = dict(generator)
        self.group.attrs[ATTRS_KEY] = self.layout.to_attrs(self.complete_blocks())
        self._sync_metadata()

    # -- block I/O ------------------------------------------------------------------

    def chunk_key(self, name: str, block: int) -> str:
        arr = self.arrays[name]
        return f"{name}/{arr.metadata.encode_chunk_key((block,) + (0,) * (arr.ndim - 1))}"

    def chunk_path(self, name: str, block: int) -> Path | None:
        return None if self.local_root is None else self.local_root / self.chunk_key(name, block)

    def will_need(self, name: str, block: int) -> None:
        """Ask the kernel to start reading ``block`` of ``name`` into the page cache now
        (local stores; elsewhere a no-op).  The reader calls it for the block after the
        ones it is loading, so the disk keeps streaming while those wait for a free
        buffer, at no cost in resident memory."""
        self._advise(name, block, "POSIX_FADV_WILLNEED")

    def drop_cached(self, name: str, block: int) -> None:
        """Ask the kernel to drop ``block`` of ``name`` from the page cache (local stores;
        elsewhere a no-op; dirty pages stay until written): for data that passes through
        once, so that the next block reuses those pages instead of taking fresh ones."""
        self._advise(name, block, "POSIX_FADV_DONTNEED")

    def _advise(self, name: str, block: int, advice: str) -> None:
        path = self.chunk_path(name, block)
        if path is not None:
            fadvise(path, advice)

    def block_nbytes(self, name: str) -> int:
        """Bytes of one decoded block of ``name`` (the full chunk, padding included)."""
        return self.layout.block_rows * self.layout.fields[name].row_bytes

    def new_buffer(self, name: str) -> np.ndarray:
        """A reusable buffer for :meth:`read_block` (room for the checksum trailer,
        aligned and sized for ``direct=True``)."""
        return aligned_buffer(direct_nbytes(self.block_nbytes(name) + CRC_BYTES))

    def read_block(self, name: str, block: int, buffer: np.ndarray | None = None, *,
                   direct: bool = False, verify: bool = True) -> np.ndarray:
        """The valid rows of ``block`` of field ``name``, verified.

        With ``buffer`` (from :meth:`new_buffer`) the result is a view into it and the
        fast path copies nothing beyond the read itself.

        ``direct``: read a local chunk that is not in the page cache with
        ``O_DIRECT`` (no copy out of the cache, and the disk gets the whole chunk as
        one deep request).  It needs a ``buffer`` from :meth:`new_buffer` (or from
        :func:`shardset.memory.aligned_buffer` with room for
        :func:`shardset.memory.direct_nbytes` of the chunk file).  Otherwise (a
        cached chunk, a buffer that does not qualify, a file system without direct
        I/O such as tmpfs) it reads the ordinary way.  Errors are the same either way.

        ``verify=False`` leaves the CRC-32C of a chunk read whole (a pass over its
        bytes) to :meth:`check_block`, which the caller must run before using them:
        a reader checks one block on another thread while the next one is read.
        Sizes, and checksums computed while the bytes arrive, are checked anyway.
        """
        start, stop = self.layout.block_range(block)
        spec = self.layout.fields[name]
        path = self.chunk_path(name, block)
        if path is not None and self._raw[name] is not None:
            raw = self._read_raw(name, block, path, buffer, direct, verify)
        elif self._raw[name] is not None:
            raw = self._read_remote(name, block, buffer, verify)
        else:
            raw = self._read_zarr(name, block, start, stop, buffer)
        return raw.view(spec.dtype).reshape(self.layout.block_rows, *spec.shape)[: stop - start]

    def check_block(self, name: str, block: int, buffer: np.ndarray) -> None:
        """Check ``block`` of field ``name``, as read into ``buffer`` by
        ``read_block(..., verify=False)``, against its stored CRC-32C; raise
        :class:`CorruptBlockError` if it differs.

        >>> import numpy as np, tempfile, os
        >>> from shardset import write
        >>> s = write(os.path.join(tempfile.mkdtemp(), "c.zarr"), {"x": np.arange(10)}, block_rows=4, progress=False)
        >>> buf = s.new_buffer("x")
        >>> s.read_block("x", 1, buf, verify=False).tolist()
        [4, 5, 6, 7]
        >>> s.check_block("x", 1, buf)
        """
        self._verified(name, block, buffer, self._chunk_nbytes(name))  # a no-op where zarr's codecs checked it

    def write_block(self, block: int, arrays: Mapping[str, np.ndarray]) -> None:
        """Write every field of ``block`` and make it durable (the caller marks it complete)."""
        if set(arrays) != set(self.layout.fields):
            raise ArgumentError(f"block needs fields {sorted(self.layout.fields)}, got {sorted(arrays)}")
        start, stop = self.layout.block_range(block)
        for name, data in arrays.items():
            want = (stop - start, *self.layout.fields[name].shape)
            if tuple(data.shape) != want:
                raise ArgumentError(f"block {block} of '{name}' must have shape {want}, got {tuple(data.shape)}")
        chunks = {}
        for name, data in arrays.items():
            path = self.chunk_path(name, block)
            if path is not None and self._raw[name] is not None:
                chunks[name] = self._chunk_data(name, data)
                self._write_file(path, chunks[name], self._raw[name])
            else:
                self.arrays[name][start:stop] = data
                if path is not None:
                    _fsync_file(path)
        if self.slice_table is not None:
            self._write_slice_table(block, {n: chunks[n] if n in chunks else self._chunk_data(n, a) for n, a in arrays.items()})

    def require_slices(self) -> None:
        """Raise :class:`StoreFormatError` unless parts of blocks can be read and verified."""
        if self.slice_table is None or None in self._raw.values():
            raise StoreFormatError(f"{self.where} has no slice checksums (it is compressed, or was written by an "
                                   "older shardset): read whole blocks, or rewrite it with `shardset shuffle`")

    def read_rows(self, name: str, start: int, stop: int, buffer: np.ndarray | None = None, *,
                  direct: bool = False, order: np.ndarray | None = None, at: int = 0) -> np.ndarray:
        """Rows ``[start, stop)`` of field ``name`` (they may span blocks), reading only
        the checksummed slices that hold them and verifying each.  (:meth:`read_rows_steps`
        is the same read as steps for :class:`shardset.direct_io.AsyncDirectReads`.)

        Needs a store with slice checksums (``layout.slice_rows``).  ``buffer``: at
        least ``(stop - start) * row_bytes`` bytes to read into; the result views it.
        ``direct``: read slices that are not in the page cache with ``O_DIRECT``
        (through a per-thread aligned buffer of the read's size).  ``order``: row
        ``i`` of the result is row ``order[i]`` of the range (indices into it, as
        many as wanted): the rows are verified as stored, then gathered into
        ``buffer`` in the pass that would otherwise copy them there, so a reader
        that shuffles them gets them in place, ready to be read in sequence.
        ``at``: the byte of ``buffer`` where the rows go.  Without ``order``, a
        direct read lands straight there, with no copy, when that byte lies at the
        file offset's place in a 4 KiB page and the aligned span around the rows
        fits in ``buffer``; the read may then overwrite ``buffer`` around the rows.

        >>> import numpy as np, tempfile, os
        >>> from shardset import write
        >>> s = write(os.path.join(tempfile.mkdtemp(), "r.zarr"), {"x": np.arange(10) * 10}, block_rows=4)
        >>> s.read_rows("x", 3, 6).tolist(), s.read_rows("x", 3, 6, order=np.array([2, 0])).tolist()
        ([30, 40, 50], [50, 30])
        """
        return run_steps(self.read_rows_steps(name, start, stop, buffer, direct=direct, order=order, at=at))

    def read_rows_steps(self, name: str, start: int, stop: int, buffer: np.ndarray | None = None, *,
                        direct: bool = False, order: np.ndarray | None = None, at: int = 0) -> Steps[np.ndarray]:
        """:meth:`read_rows` as a steps generator (:mod:`shardset.direct_io`): it yields
        its ``O_DIRECT`` reads to the driver that runs it."""
        lay, spec = self.layout, self.layout.fields[name]
        self.require_slices()
        if not 0 <= start <= stop <= lay.rows:
            raise ArgumentError(f"rows [{start}, {stop}) are outside [0, {lay.rows})")
        rb = spec.row_bytes
        rows = stop - start if order is None else len(order)
        room, at = (np.empty(rows * rb, np.uint8), 0) if buffer is None else (buffer, at)
        out = room[at : at + rows * rb]
        parts = []  # (block, first row, last row) of each block the range touches
        pos = start
        while pos < stop:
            block, first = divmod(pos, lay.block_rows)
            end = min(stop, (block + 1) * lay.block_rows)
            parts.append((block, first, first + end - pos))
            pos = end
        if order is None:
            for block, first, last in parts:
                got = yield from self._slice_rows_steps(name, block, first, last, direct, room, at)
                _place(got, room, at)
                at += len(got)
        elif len(order) and not (0 <= order.min() and order.max() < stop - start):
            raise ArgumentError(f"order must hold indices into the {stop - start} rows read")
        elif len(parts) == 1:
            _take_rows((yield from self._slice_rows_steps(name, *parts[0], direct)), order, out, rb)
        else:  # a range across blocks: its parts side by side first (a scratch view lasts one read)
            whole = np.empty((stop - start) * rb, np.uint8)
            yield from self.read_rows_steps(name, start, stop, whole, direct=direct)
            _take_rows(whole, order, out, rb)
        return out.view(spec.dtype).reshape(rows, *spec.shape)

    def remove_partials(self) -> int:
        """Delete temporary ``*.partial`` files a killed writer left; returns how many."""
        if self.local_root is None:
            return 0
        count = 0
        for p in self.local_root.rglob("*.partial"):
            if p.is_file():
                p.unlink(missing_ok=True)
                count += 1
        return count

    def nbytes_stored(self) -> int:
        """Bytes of chunk data on disk (local stores) or in the store (others)."""
        if self.local_root is not None:
            return sum(p.stat().st_size for name in self.arrays for p in (self.local_root / name).rglob("*") if p.is_file())
        return sum(int(a.nbytes_stored()) for a in self.arrays.values())

    def codec_names(self, name: str) -> list[str]:
        return [c.to_dict()["name"] for c in self.arrays[name].metadata.codecs]

    # -- internals ------------------------------------------------------------------

    @staticmethod
    def _raw_chain(arr: zarr.Array) -> bool | None:
        """True/False (checksummed or not) if the fast path can read the chunks, else None."""
        codecs = arr.metadata.codecs if arr.metadata.zarr_format == 3 else ()
        if not codecs or not isinstance(codecs[0], BytesCodec):
            return None
        if arr.dtype.itemsize > 1 and codecs[0].endian is not None and codecs[0].endian.value != "little":
            return None
        rest = list(codecs[1:])
        if not rest:
            return False
        if len(rest) == 1 and isinstance(rest[0], Crc32cCodec):
            return True
        return None

    def _describe(self, name: str, block: int) -> str:
        return f"block {block} of field '{name}' ({self.where}/{self.chunk_key(name, block)})"

    def _chunk_nbytes(self, name: str) -> int:
        """Bytes of a stored chunk of field ``name`` read by the fast path (its checksum trailer included)."""
        return self.block_nbytes(name) + (CRC_BYTES if self._raw[name] else 0)

    def _raw_buffer(self, name: str, buffer: np.ndarray | None) -> tuple[np.ndarray, int]:
        """``(buffer, bytes of the stored chunk)`` for a fast-path read of field ``name``."""
        want = self._chunk_nbytes(name)
        if buffer is None:
            buffer = np.empty(want, dtype=np.uint8)
        elif buffer.nbytes < want:
            raise ArgumentError(f"buffer too small: {buffer.nbytes} < {want}")
        return buffer, want

    def _verified(self, name: str, block: int, buffer: np.ndarray, want: int, crc: int | None = None,
                  verify: bool = True) -> np.ndarray:
        """The block's bytes in ``buffer``, after checking the stored crc32c (if any)
        against ``crc``, the crc32c of the bytes if it was computed while they arrived
        (without ``verify``, only then)."""
        data = buffer[: self.block_nbytes(name)]
        if self._raw[name] and (verify or crc is not None):
            stored = int.from_bytes(buffer[want - CRC_BYTES : want].tobytes(), "little")
            if (crc32c.crc32c(data) if crc is None else crc) != stored:
                raise CorruptBlockError(f"{self._describe(name, block)} fails its crc32c checksum")
        return data

    def _read_raw(self, name: str, block: int, path: Path, buffer: np.ndarray | None,
                  direct: bool = False, verify: bool = True) -> np.ndarray:
        buffer, want = self._raw_buffer(name, buffer)
        try:
            with open(path, "rb", buffering=0) as f:
                got = _read_direct(f.fileno(), buffer, want) if direct else None
                extra = 0
                if got is None:
                    got = f.readinto(memoryview(buffer)[:want])
                    extra = len(f.read(1))
        except FileNotFoundError:
            raise CorruptBlockError(f"{self._describe(name, block)} is missing") from None
        except OSError as exc:  # EIO from a bad sector, a directory in its place, ...
            raise CorruptBlockError(f"{self._describe(name, block)} cannot be read: {exc.strerror or exc}") from None
        if got != want or extra:
            size = path.stat().st_size
            raise CorruptBlockError(f"{self._describe(name, block)} has {size} bytes, expected {want}")
        return self._verified(name, block, buffer, want, verify=verify)

    def _read_remote(self, name: str, block: int, buffer: np.ndarray | None, verify: bool = True) -> np.ndarray:
        """Fetch a chunk from an object store straight into ``buffer``.

        A chunk of under 1.5 :attr:`read_part_bytes` (one range) is one GET whose body is
        copied into place piece by piece as it arrives, its CRC-32C computed on
        each piece while it is still in cache (:func:`_stream_into`), so the
        client's work overlaps the transfer instead of following it.  A larger
        chunk is fetched as concurrent ranged GETs (:func:`_fetch_ranges`), each
        streamed into place the same way on a thread of its own, and checksummed
        once all have arrived.  Every response states the object's
        size, so an object too long or too short is caught before its bytes are used.
        """
        buffer, want = self._raw_buffer(name, buffer)
        key, crc = self.chunk_key(name, block), None
        with remote_errors(self.where, f"reading {self._describe(name, block)} from"):
            if _range_bytes(want, self.read_part_bytes) >= want:
                size, crc = _stream_into(self.group.store.store, key, buffer, want,
                                         want - CRC_BYTES if self._raw[name] else 0)
                sizes = [size]
            else:
                sizes = _fetch_ranges(self.group.store.store, key, buffer, want, self.read_part_bytes)
        self._check_sizes(name, block, sizes, want)
        return self._verified(name, block, buffer, want, crc, verify)

    def _check_sizes(self, name: str, block: int, sizes: list[int | None], want: int) -> None:
        """Raise :class:`CorruptBlockError` unless every GET of the chunk (``sizes``, as
        :func:`_stream_into` reports them) found an object of ``want`` bytes."""
        if None in sizes:
            raise CorruptBlockError(f"{self._describe(name, block)} is missing")
        wrong = [n for n in sizes if n != want]
        if wrong and wrong[0] < 0:
            raise CorruptBlockError(f"{self._describe(name, block)} changed while it was being read")
        if wrong:
            raise CorruptBlockError(f"{self._describe(name, block)} has {wrong[0]} bytes, expected {want}")

    def _read_zarr(self, name: str, block: int, start: int, stop: int, buffer: np.ndarray | None) -> np.ndarray:
        arr = self.arrays[name]
        if not sync(self.group.store.exists(self.chunk_key(name, block))):
            raise CorruptBlockError(f"{self._describe(name, block)} is missing")
        try:
            data = arr[start:stop]
        except Exception as exc:  # zarr raises plain errors for bad checksums or codecs
            raise CorruptBlockError(f"{self._describe(name, block)} cannot be decoded: {exc}") from None
        out = np.empty(self.block_nbytes(name), np.uint8) if buffer is None else buffer[: self.block_nbytes(name)]
        flat = out.view(arr.dtype)
        flat[: data.size] = data.reshape(-1)
        return out

    def _chunk_data(self, name: str, data: np.ndarray) -> np.ndarray:
        """``data`` as its chunk holds it: little-endian, C order, padded to a whole block."""
        spec = self.layout.fields[name]
        dtype = np.dtype(spec.dtype).newbyteorder("<")
        full = (self.layout.block_rows, *spec.shape)
        if data.shape[0] != full[0]:  # the last block is padded with the fill value, as zarr does
            padded = np.full(full, _fill_value(dtype), dtype=dtype)
            padded[: data.shape[0]] = data
            data = padded
        return np.ascontiguousarray(data, dtype=dtype)

    @staticmethod
    def _write_file(path: Path, data: np.ndarray, checksum: bool) -> None:
        """Write a chunk file (``data``'s bytes and its crc32c) atomically and durably."""
        parts = [memoryview(data).cast("B")]
        if checksum:
            parts.append(crc32c.crc32c(parts[0]).to_bytes(CRC_BYTES, "little"))
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{uuid.uuid4().hex}.partial")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            _writev_all(fd, parts)
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            tmp.unlink(missing_ok=True)
            raise
        os.close(fd)
        os.replace(tmp, path)
        _fsync_dir(path.parent)
        _fsync_dir(path.parent.parent)

    # -- slice checksums --------------------------------------------------------------

    def _slice_table_path(self, block: int) -> Path | None:
        if self.local_root is None:
            return None
        return self.local_root / SLICE_TABLE / self.slice_table.metadata.encode_chunk_key((block, 0, 0))

    def _write_slice_table(self, block: int, chunks: Mapping[str, np.ndarray]) -> None:
        lay = self.layout
        table = np.empty((1, len(lay.fields), lay.slices_per_block), np.uint32)
        for i, name in enumerate(lay.fields):
            raw = memoryview(chunks[name]).cast("B")
            step = lay.slice_rows * lay.fields[name].row_bytes
            table[0, i] = [crc32c.crc32c(raw[a : a + step]) for a in range(0, len(raw), step)]
        path = self._slice_table_path(block)
        if path is not None:
            self._write_file(path, table, True)
        else:
            self.slice_table[block : block + 1] = table
        self.slice_checksums.cache_clear()

    def _slice_checksums(self, block: int) -> np.ndarray:
        """The ``(field, slice)`` crc32c table of ``block`` (``slice_checksums`` caches it)."""
        if not sync(self.group.store.exists(f"{SLICE_TABLE}/{self.slice_table.metadata.encode_chunk_key((block, 0, 0))}")):
            raise CorruptBlockError(f"the slice checksums of block {block} are missing ({self.where}/{SLICE_TABLE})")
        try:
            table = self.slice_table[block]
        except Exception as exc:  # zarr raises plain errors for bad checksums
            raise CorruptBlockError(f"the slice checksums of block {block} cannot be read: {exc}") from None
        return table

    def _slice_rows_steps(self, name: str, block: int, first: int, last: int, direct: bool,
                          room: np.ndarray | None = None, at: int = 0) -> Steps[np.ndarray]:
        """The verified bytes of rows ``[first, last)`` of ``block``: read straight into
        ``room`` at byte ``at`` when they are whole slices, else into a scratch buffer
        (the result then views it until the next read)."""
        lay = self.layout
        rb, sr = lay.fields[name].row_bytes, lay.slice_rows
        s0, s1 = first // sr, -(-last // sr)
        lead = (first - s0 * sr) * rb
        whole = room is not None and lead == 0 and last == s1 * sr
        raw = yield from self._read_range_steps(name, block, s0 * sr * rb, (s1 - s0) * sr * rb,
                                                room if whole else None, at, direct)
        self.check_slices(name, block, raw, s0)
        return raw[lead : lead + (last - first) * rb]

    def check_slices(self, name: str, block: int, raw: np.ndarray, first: int = 0) -> None:
        """Check the bytes ``raw`` of slices ``first, first + 1, ...`` of ``block`` of
        ``name`` against the slice checksums; raise :class:`CorruptBlockError` if one differs."""
        step = self.layout.slice_rows * self.layout.fields[name].row_bytes
        n = len(raw) // step
        expected = self.slice_checksums(block)[list(self.layout.fields).index(name), first : first + n].tolist()
        if not n or crc32c.crc32c(raw[: n * step]) == joined_crc(expected, step):  # one pass for the whole run
            return
        for i in range(n):  # name the slice that differs
            if crc32c.crc32c(raw[i * step : (i + 1) * step]) != expected[i]:
                raise CorruptBlockError(f"{self._describe(name, block)} fails the crc32c of its slice {first + i}")

    def _read_range_steps(self, name: str, block: int, offset: int, nbytes: int, room: np.ndarray | None = None,
                          at: int = 0, direct: bool = False) -> Steps[np.ndarray]:
        """The chunk's ``nbytes`` bytes from ``offset`` (one ranged read): in ``room`` at
        byte ``at`` when given, else in a scratch buffer (valid until the next read)."""
        dest = None if room is None else room[at : at + nbytes]
        path = self.chunk_path(name, block)
        if path is None:  # one ranged GET, streamed into place
            out = scratch_buffer(nbytes)[:nbytes] if dest is None else dest
            want = self._chunk_nbytes(name)
            with remote_errors(self.where, f"reading {self._describe(name, block)} from"):
                size = _stream_into(self.group.store.store, self.chunk_key(name, block), out, want,
                                    start=offset, stop=offset + nbytes, base=offset)[0]
            self._check_sizes(name, block, [size], want)
            return out
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            raise CorruptBlockError(f"{self._describe(name, block)} is missing") from None
        except OSError as exc:
            raise CorruptBlockError(f"{self._describe(name, block)} cannot be read: {exc.strerror or exc}") from None
        try:
            got = (yield from _range_direct_steps(fd, offset, nbytes, _aligned_span(room, at, offset, nbytes))) \
                if direct else None
            if got is not None:
                if len(got) < nbytes:
                    raise CorruptBlockError(f"{self._describe(name, block)} is shorter than expected")
                if dest is None:
                    return got
                _place(got, room, at)
                return dest
            if hasattr(os, "posix_fadvise"):  # no readahead past the range: the next read is elsewhere
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
            out = scratch_buffer(nbytes)[:nbytes] if dest is None else dest
            done = 0
            while done < nbytes:
                n = os.preadv(fd, [memoryview(out)[done:]], offset + done)
                if n == 0:
                    raise CorruptBlockError(f"{self._describe(name, block)} is shorter than expected")
                done += n
            return out
        except OSError as exc:
            raise CorruptBlockError(f"{self._describe(name, block)} cannot be read: {exc.strerror or exc}") from None
        finally:
            os.close(fd)

    def _sync_metadata(self) -> None:
        if self.local_root is not None:
            _fsync_file(self.local_root / "zarr.json")
            _fsync_dir(self.local_root)


def _range_bytes(want: int, part: int) -> int:
    """The length of each ranged GET of an object of ``want`` bytes read in parts of
    about ``part`` bytes: equal ranges, as many as make them closest to ``part`` (a
    32 MiB chunk and its 4-byte checksum trailer are 2 GETs at 16 MiB parts, not 3
    with a round trip for the last 4 bytes)."""
    return -(-want // max(1, round(want / max(1, int(part)))))


def _stream_into(store: Any, key: str, buffer: np.ndarray, want: int, checked: int = 0, start: int = 0,
                 stop: int | None = None, base: int = 0) -> tuple[int | None, int]:
    """GET bytes ``[start, stop)`` (default: all) of ``key``, an object of ``want``
    bytes, into ``buffer`` as the body arrives (byte ``i`` of the object to
    ``buffer[i - base]``), with the crc32c of the chunk's first ``checked`` bytes
    computed on the way (from ``start == 0``).  Returns the object's size (``None``
    when it is missing, -1 when the body did not fill the range) and that crc32c.

    The body comes as obstore's own network reads (joined into pieces of at least
    :data:`STREAM_PIECE` bytes), not collected into one buffer first: that saves
    a copy of the whole range, and each piece is copied and checksummed while in
    cache and while the next one is on its way.  obstore releases the GIL while it
    waits, so this blocks only the calling thread.
    """
    import obstore as obs

    stop = want if stop is None else stop
    try:  # a whole object is a plain GET: an object of another size is then reported, not refused
        resp = obs.get(store, key, options=None if (start, stop) == (0, want) else {"range": (start, stop)})
    except FileNotFoundError:
        return None, 0
    size = resp.meta["size"]
    if size != want:
        return size, 0
    pos, crc = start, 0
    for piece in resp.stream(min_chunk_size=STREAM_PIECE):
        end = pos + len(piece)
        if end > stop:
            return -1, 0
        buffer[pos - base : end - base] = np.frombuffer(piece, np.uint8)
        if pos < checked:
            crc = crc32c.crc32c(buffer[pos - base : min(end, checked) - base], crc)
        pos = end
    return (size if pos == stop else -1), crc


def _fetch_ranges(store: Any, key: str, buffer: np.ndarray, want: int, part: int) -> list[int | None]:
    """GET ``key`` (an object of ``want`` bytes) into ``buffer`` as concurrent ranges
    (:func:`_range_bytes`), each streamed into place by :func:`_stream_into` on a
    thread of its own (the first on the calling thread).  Per range: the object's
    size, ``None`` when it is missing, -1 when the bytes did not fill the range."""
    import obstore as obs

    step = _range_bytes(want, part)
    spans = [(a, min(a + step, want)) for a in range(0, want, step)]

    def fetch(span: tuple[int, int]) -> int | None | BaseException:
        try:
            return _stream_into(store, key, buffer, want, 0, *span)[0]
        except Exception as exc:
            return exc

    # leaving the pool waits for every range: none writes into the buffer after this returns or raises
    with ThreadPoolExecutor(max(1, len(spans) - 1), thread_name_prefix="shardset-range") as pool:
        others = pool.map(fetch, spans[1:])
        results = [fetch(spans[0]), *others]
    errors = [r for r in results if isinstance(r, BaseException)]
    if not errors:
        return results
    try:  # a range past the end of a short object fails: report the object's size instead
        size = obs.head(store, key)["size"]
    except FileNotFoundError:
        return [None]
    except Exception:
        raise errors[0] from None
    if size != want:
        return [size]
    raise errors[0]


def _check_target(local: str, where: str, overwrite: bool) -> None:
    """Refuse to create a store over a file, inside another shardset store, or, with
    ``overwrite``, over a directory that is not a Zarr store or that holds another
    shardset store (whose files it would delete)."""
    if os.path.exists(local) and not os.path.isdir(local):
        raise StoreFormatError(f"{where} is a file, not a store; remove it or choose another path")
    refuse_inside_a_store(local, where)
    if not (overwrite and os.path.isdir(local)):
        return
    if os.path.islink(local):
        raise StoreFormatError(f"{where} is a symbolic link; overwrite replaces a store only, so give the path it "
                               "points to, or remove the link")
    if not os.path.isfile(os.path.join(local, "zarr.json")) and not holds_only_temporaries(local):
        raise StoreFormatError(f"{where} is a directory that is not a Zarr store; overwrite replaces a store only, "
                               "so remove the directory yourself or choose another path")
    inner = next((meta.parent for meta in Path(local).glob("*/**/zarr.json") if _is_shardset_dir(meta.parent)), None)
    if inner is not None:
        raise StoreFormatError(f"{where} holds the shardset store {inner}, which overwrite would delete; remove it "
                               "yourself or choose another path")


def refuse_inside_a_store(local: str | os.PathLike, where: str) -> None:
    """Raise :class:`StoreFormatError` if the path ``local`` lies inside a shardset store."""
    for parent in Path(os.path.realpath(local)).parents:
        if _is_shardset_dir(parent):
            raise StoreFormatError(f"{where} is inside the shardset store {parent}; choose a path outside it")


def holds_only_temporaries(local: str | os.PathLike) -> bool:
    """Whether the directory ``local`` holds nothing but ``*.partial`` files (or nothing):
    a store whose creation was cut short before its first metadata file."""
    return all(p.is_file() and p.name.endswith(".partial") for p in Path(local).rglob("*"))


def _is_shardset_dir(path: Path) -> bool:
    """Whether ``path`` holds a shardset store's group metadata."""
    try:
        meta = json.loads((path / "zarr.json").read_bytes())
    except (OSError, ValueError):
        return False
    return isinstance(meta, dict) and isinstance(meta.get("attributes"), dict) and ATTRS_KEY in meta["attributes"]


def _infer_layout(group: zarr.Group, where: str) -> Layout:
    """Layout of a plain Zarr group whose arrays share a row-chunked leading dimension."""
    arrays = {name: a for name, a in group.arrays() if a.ndim >= 1}
    if not arrays:
        raise StoreFormatError(f"{where} is not a shardset store (no arrays in the group)")
    rows = {a.shape[0] for a in arrays.values()}
    block_rows = {a.chunks[0] for a in arrays.values()}
    if len(rows) != 1 or len(block_rows) != 1:
        raise StoreFormatError(f"{where}: arrays do not share one leading dimension and row chunking")
    for name, a in arrays.items():
        if tuple(a.chunks[1:]) != tuple(a.shape[1:]):
            raise StoreFormatError(f"{where}: array '{name}' is chunked along more than rows")
    fields = {name: FieldSpec(a.dtype.name, tuple(a.shape[1:])) for name, a in arrays.items()}
    return Layout(rows=rows.pop(), block_rows=block_rows.pop(), fields=fields)


def _read_direct(fd: int, buffer: np.ndarray, want: int) -> int | None:
    """Read the chunk file open on ``fd`` (``want`` bytes expected) into ``buffer`` with
    ``O_DIRECT``; returns the bytes read (or the file's size, when that is not
    ``want``), or None where the ordinary read should be used instead: the file is in
    the page cache (a copy from RAM beats reading the disk again), ``buffer`` is not
    aligned or is too small for the rounded-up length, or the file system refuses
    direct I/O.  Errors of the read itself propagate as from the ordinary read.
    """
    size = direct_nbytes(want)
    if not hasattr(os, "O_DIRECT") or buffer.nbytes < size or not is_aligned(buffer) or _page_cached(fd, want):
        return None
    actual = os.fstat(fd).st_size
    if actual != want:
        return actual
    got = run_steps(_direct_steps(fd, 0, size, buffer[:size]))
    return None if got is None else len(got)


def _range_direct_steps(fd: int, offset: int, nbytes: int, into: np.ndarray | None = None) -> Steps[np.ndarray | None]:
    """The ``nbytes`` bytes from ``offset`` of the file on ``fd``, read with ``O_DIRECT``:
    the 4 KiB-aligned span around them goes into ``into`` (see :func:`_aligned_span`)
    or else the driver's aligned buffer, and the result views it (fewer bytes at the
    end of the file).  None where the ordinary read should be used (the range is in
    the page cache, or the file system refuses direct I/O)."""
    if not hasattr(os, "O_DIRECT") or _page_cached(fd, nbytes, offset):
        return None
    start = offset - offset % DIRECT_ALIGN
    got = yield from _direct_steps(fd, start, direct_nbytes(offset + nbytes - start), into)
    if got is None:
        return None
    lead = offset - start
    return got[lead : lead + max(0, min(nbytes, len(got) - lead))]


def _aligned_span(room: np.ndarray | None, at: int, offset: int, nbytes: int) -> np.ndarray | None:
    """The part of ``room`` that an ``O_DIRECT`` read of the aligned span around file
    bytes ``[offset, offset + nbytes)`` fills when byte ``offset`` is to land at
    ``room[at]``: None unless that byte lies at the offset's place in a 4 KiB page
    and the span fits in ``room``."""
    if room is None:
        return None
    lead = offset % DIRECT_ALIGN
    begin, end = at - lead, at - lead + direct_nbytes(lead + nbytes)
    if begin < 0 or end > len(room) or (room.ctypes.data + begin) % DIRECT_ALIGN:
        return None
    return room[begin:end]


def _place(got: np.ndarray, room: np.ndarray, at: int) -> None:
    """Copy ``got`` to ``room[at:]`` unless a read put it there already."""
    if got.ctypes.data != room.ctypes.data + at:
        room[at : at + len(got)] = got


def _take_rows(raw: np.ndarray, order: np.ndarray, out: np.ndarray, row_bytes: int) -> None:
    """``out``'s rows (``row_bytes`` each) = ``raw``'s rows ``order``, one opaque item a row."""
    item = np.dtype(("V", row_bytes))
    np.take(raw.view(item), order.astype(np.intp, copy=False), out=out.view(item), mode="clip")


def _direct_steps(fd: int, offset: int, nbytes: int, into: np.ndarray | None = None) -> Steps[np.ndarray | None]:
    """Switch ``fd`` to ``O_DIRECT`` and read the aligned span (a :class:`DirectRead`);
    returns the bytes read (fewer at the end of the file), or None where the file
    system refuses direct I/O (``fd`` is then switched back for an ordinary read)."""
    flags = fcntl.fcntl(fd, fcntl.F_GETFL)
    try:
        fcntl.fcntl(fd, fcntl.F_SETFL, flags | os.O_DIRECT)
    except OSError:
        return None  # EINVAL: no direct I/O on this file system
    try:
        return (yield DirectRead(fd, offset, nbytes, into))
    except OSError as exc:
        if exc.errno != errno.EINVAL:
            raise
    fcntl.fcntl(fd, fcntl.F_SETFL, flags)
    return None  # the file system wants another alignment


def _page_cached(fd: int, size: int, start: int = 0) -> bool:
    """Whether most (9 in 10) of the pages of the ``size`` bytes at ``start`` of the
    file on ``fd`` are in the page cache (:mod:`shardset.page_cache`, which caches
    nothing itself).  True where that cannot be known, so the caller keeps its
    ordinary read."""
    try:
        resident, total = cached_pages(fd, start, size)
    except (OSError, AttributeError):  # no mmap or mincore here
        return True
    return resident * 10 >= total * 9


def fadvise(path: Path, advice: str, nbytes: int | None = None) -> None:
    """``posix_fadvise`` the first ``nbytes`` (default: all) of the file at ``path`` with
    ``os.<advice>``; a no-op where the file is missing or the call does not exist (the
    advice is only a hint).  ``POSIX_FADV_WILLNEED`` goes in 1 MiB pieces: Linux reads
    at most the device's readahead window per call (8 MiB of a 64 MiB file here), and
    1 MiB is within any device's window."""
    if not hasattr(os, "posix_fadvise"):
        return
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        if advice != "POSIX_FADV_WILLNEED":
            os.posix_fadvise(fd, 0, nbytes or 0, getattr(os, advice))
            return
        for at in range(0, os.fstat(fd).st_size if nbytes is None else nbytes, ADVICE_PIECE):
            os.posix_fadvise(fd, at, ADVICE_PIECE, os.POSIX_FADV_WILLNEED)
    finally:
        os.close(fd)


def _writev_all(fd: int, parts: list) -> None:
    views = [memoryview(p).cast("B") for p in parts]
    while views:
        n = os.writev(fd, views)
        while views and n >= len(views[0]):
            n -= len(views[0])
            views.pop(0)
        if views and n:
            views[0] = views[0][n:]


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    _fsync_file(path)
