"""Block I/O on a Zarr group: create, open, read and durably write whole blocks.

zarr-python validates and describes the arrays; the bytes of a block move on a
fast path when the store is a local directory and the codec chain is the
default (little-endian bytes, optionally followed by a crc32c checksum): the
chunk file is read with one ``readinto`` into a reused buffer and its checksum
verified in place, and a block is written with one ``writev`` + ``fsync`` +
rename.  On object stores (``s3://``, ... see :mod:`shardset.urls`) a block's
chunk is fetched with concurrent ranged GETs of :attr:`BlockStore.read_part_bytes`
straight into the buffer and verified the same way; a put of one object is
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

import asyncio
import os
import shutil
import uuid
from pathlib import Path
from typing import Any, Iterable, Mapping

import crc32c
import numpy as np
import zarr
from zarr.abc.store import RangeByteRequest
from zarr.codecs import BytesCodec, Crc32cCodec
from zarr.core.buffer import default_buffer_prototype
from zarr.core.sync import sync
from zarr.storage import LocalStore

from .errors import (
    ArgumentError,
    CorruptBlockError,
    IncompleteStoreError,
    StoreAccessError,
    StoreFormatError,
    StoreNotFoundError,
)
from .format import ATTRS_KEY, FieldSpec, Layout, ranges_to_blocks
from .urls import open_store, parse_url, store_exists

__all__ = ["BlockStore", "COMPRESSIONS", "compressors_for"]

COMPRESSIONS = ("lz4", "zstd")
CRC_BYTES = 4


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

    read_part_bytes = 16 << 20  # object stores: one ranged GET per this many bytes of a chunk, all concurrent

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
            self.arrays[name] = arr
        store = group.store
        self.local_root: Path | None = Path(store.root) if isinstance(store, LocalStore) else None
        self._raw = {name: self._raw_chain(arr) for name, arr in self.arrays.items()}

    # -- opening and creating ------------------------------------------------------

    @classmethod
    def open(
        cls, path: str | os.PathLike, *, mode: str = "r", storage_options: Mapping[str, Any] | None = None
    ) -> "BlockStore":
        """Open an existing store (a path or URL); ``mode="r+"`` to write blocks or metadata."""
        where = str(path)
        target = open_store(path, storage_options, read_only=mode == "r")
        try:
            group = zarr.open_group(target, mode=mode)
        except PermissionError as exc:
            raise StoreAccessError(f"cannot read {where}: {exc.strerror or exc}") from None
        except (FileNotFoundError, FileExistsError, NotADirectoryError, zarr.errors.GroupNotFoundError,
                zarr.errors.NodeTypeValidationError):  # FileExistsError: mode "r+" on a plain file
            kind = StoreFormatError if store_exists(path, storage_options) else StoreNotFoundError
            raise kind(f"{where} is not a shardset store (no Zarr group there)") from None
        except zarr.errors.ContainsArrayError:
            raise StoreFormatError(f"{where} is a Zarr array, not a shardset store (a group)") from None
        if ATTRS_KEY in group.attrs:
            return cls(group, Layout.from_attrs(group.attrs, where), where, storage_options=storage_options)
        return cls(group, _infer_layout(group, where), where, foreign=True, storage_options=storage_options)

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
        local = parse_url(path).local_path
        if local is not None and os.path.exists(local) and not os.path.isdir(local):
            raise StoreFormatError(f"{where} is a file, not a store; remove it or choose another path")
        if overwrite and local is not None and os.path.isdir(local):
            shutil.rmtree(local)  # zarr's mode "w" empties an object-store prefix itself
        target = open_store(path, storage_options)
        try:
            # The attributes come first: from its first moment the group says it is an
            # incomplete shardset store, never a plain (complete-looking) Zarr group.
            group = zarr.open_group(target, mode="w-" if not overwrite else "w", attributes={ATTRS_KEY: layout.to_attrs()})
        except (FileExistsError, zarr.errors.ContainsGroupError, zarr.errors.ContainsArrayError):
            raise StoreFormatError(f"{where} already exists; pass overwrite=True (--overwrite) to replace it") from None
        except OSError as exc:
            raise StoreFormatError(f"cannot create a store at {where}: {exc.strerror or exc}") from None
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
                config={"write_empty_chunks": True},
            )
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
        path = self.chunk_path(name, block)
        if path is None or not hasattr(os, "posix_fadvise"):
            return
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            return  # a missing chunk is reported by the read itself
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_WILLNEED)
        finally:
            os.close(fd)

    def block_nbytes(self, name: str) -> int:
        """Bytes of one decoded block of ``name`` (the full chunk, padding included)."""
        return self.layout.block_rows * self.layout.fields[name].row_bytes

    def new_buffer(self, name: str) -> np.ndarray:
        """A reusable buffer for :meth:`read_block` (room for the checksum trailer)."""
        return np.empty(self.block_nbytes(name) + CRC_BYTES, dtype=np.uint8)

    def read_block(self, name: str, block: int, buffer: np.ndarray | None = None) -> np.ndarray:
        """The valid rows of ``block`` of field ``name``, verified.

        With ``buffer`` (from :meth:`new_buffer`) the result is a view into it and the
        fast path copies nothing beyond the read itself.
        """
        start, stop = self.layout.block_range(block)
        spec = self.layout.fields[name]
        path = self.chunk_path(name, block)
        if path is not None and self._raw[name] is not None:
            raw = self._read_raw(name, block, path, buffer)
        elif self._raw[name] is not None:
            raw = self._read_remote(name, block, buffer)
        else:
            raw = self._read_zarr(name, block, start, stop, buffer)
        return raw.view(spec.dtype).reshape(self.layout.block_rows, *spec.shape)[: stop - start]

    def write_block(self, block: int, arrays: Mapping[str, np.ndarray]) -> None:
        """Write every field of ``block`` and make it durable (the caller marks it complete)."""
        if set(arrays) != set(self.layout.fields):
            raise ArgumentError(f"block needs fields {sorted(self.layout.fields)}, got {sorted(arrays)}")
        start, stop = self.layout.block_range(block)
        for name, data in arrays.items():
            spec = self.layout.fields[name]
            want = (stop - start, *spec.shape)
            if tuple(data.shape) != want:
                raise ArgumentError(f"block {block} of '{name}' must have shape {want}, got {tuple(data.shape)}")
            path = self.chunk_path(name, block)
            if path is not None and self._raw[name] is not None:
                self._write_raw(name, block, path, data)
            else:
                self.arrays[name][start:stop] = data
                if path is not None:
                    _fsync_file(path)

    def remove_partials(self) -> int:
        """Delete temporary ``*.partial`` files a killed writer left; returns how many."""
        if self.local_root is None:
            return 0
        count = 0
        for p in self.local_root.rglob("*.partial"):
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

    def _raw_buffer(self, name: str, buffer: np.ndarray | None) -> tuple[np.ndarray, int]:
        """``(buffer, bytes of the stored chunk)`` for a fast-path read of field ``name``."""
        want = self.block_nbytes(name) + (CRC_BYTES if self._raw[name] else 0)
        if buffer is None:
            buffer = np.empty(want, dtype=np.uint8)
        elif buffer.nbytes < want:
            raise ArgumentError(f"buffer too small: {buffer.nbytes} < {want}")
        return buffer, want

    def _verified(self, name: str, block: int, buffer: np.ndarray, want: int) -> np.ndarray:
        """The block's bytes in ``buffer``, after checking the stored crc32c (if any)."""
        data = buffer[: self.block_nbytes(name)]
        if self._raw[name]:
            stored = int.from_bytes(buffer[want - CRC_BYTES : want].tobytes(), "little")
            if crc32c.crc32c(data) != stored:
                raise CorruptBlockError(f"{self._describe(name, block)} fails its crc32c checksum")
        return data

    def _read_raw(self, name: str, block: int, path: Path, buffer: np.ndarray | None) -> np.ndarray:
        buffer, want = self._raw_buffer(name, buffer)
        try:
            with open(path, "rb", buffering=0) as f:
                got = f.readinto(memoryview(buffer)[:want])
                extra = len(f.read(1))
        except FileNotFoundError:
            raise CorruptBlockError(f"{self._describe(name, block)} is missing") from None
        except OSError as exc:  # EIO from a bad sector, a directory in its place, ...
            raise CorruptBlockError(f"{self._describe(name, block)} cannot be read: {exc.strerror or exc}") from None
        if got != want or extra:
            size = path.stat().st_size
            raise CorruptBlockError(f"{self._describe(name, block)} has {size} bytes, expected {want}")
        return self._verified(name, block, buffer, want)

    def _read_remote(self, name: str, block: int, buffer: np.ndarray | None) -> np.ndarray:
        """Fetch a chunk from an object store in concurrent ranged GETs, straight into ``buffer``.

        Each part is copied into place as it arrives (the event loop never holds the
        whole block twice).  The last range asks for one byte more than the chunk, so
        an object that is too long is caught as surely as one that is too short.
        """
        buffer, want = self._raw_buffer(name, buffer)
        store, key = self.group.store, self.chunk_key(name, block)
        proto = default_buffer_prototype()
        step = max(1, int(self.read_part_bytes))
        starts = range(0, want, step)

        async def fetch(start: int) -> int | None:
            stop = min(start + step, want)
            got = await store.get(key, proto, RangeByteRequest(start, stop + (stop == want)))
            if got is None:
                return None
            part = got.as_numpy_array()
            n = min(len(part), stop - start)
            buffer[start : start + n] = part[:n]
            return len(part) - (stop - start)  # 0 when exact, < 0 short, 1 for a long object

        async def fetch_all() -> list:
            return await asyncio.gather(*(fetch(a) for a in starts), return_exceptions=True)

        results = sync(fetch_all())
        if any(r is None for r in results):
            raise CorruptBlockError(f"{self._describe(name, block)} is missing")
        if any(r != 0 for r in results):  # a short or long object, or a range past its end
            try:
                size = sync(store.getsize(key))
            except FileNotFoundError:
                raise CorruptBlockError(f"{self._describe(name, block)} is missing") from None
            if size != want:
                raise CorruptBlockError(f"{self._describe(name, block)} has {size} bytes, expected {want}")
            for r in results:
                if isinstance(r, BaseException):
                    raise r
            raise CorruptBlockError(f"{self._describe(name, block)} changed while it was being read")
        return self._verified(name, block, buffer, want)

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

    def _write_raw(self, name: str, block: int, path: Path, data: np.ndarray) -> None:
        spec = self.layout.fields[name]
        dtype = np.dtype(spec.dtype).newbyteorder("<")
        full = (self.layout.block_rows, *spec.shape)
        if data.shape[0] != full[0]:  # the last block is padded with the fill value, as zarr does
            padded = np.full(full, _fill_value(dtype), dtype=dtype)
            padded[: data.shape[0]] = data
            data = padded
        data = np.ascontiguousarray(data, dtype=dtype)
        parts = [memoryview(data).cast("B")]
        if self._raw[name]:
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

    def _sync_metadata(self) -> None:
        if self.local_root is not None:
            _fsync_file(self.local_root / "zarr.json")
            _fsync_dir(self.local_root)


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
