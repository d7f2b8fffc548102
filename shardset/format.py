"""The on-disk format: block geometry and the metadata kept in the group's attributes.

A shardset store is a Zarr v3 group.  Every *field* is an array whose leading
dimension is the row count N, chunked along rows only, and all fields share
``block_rows``, so block ``i`` is rows ``[i * block_rows, min((i+1) * block_rows, N))``
of every field.  ``docs/format.md`` is the full specification; this module is
its single implementation.

Example:
    >>> from shardset.format import Layout, FieldSpec
    >>> lay = Layout(rows=10, block_rows=4, fields={"X": FieldSpec("float32", (3,))})
    >>> lay.num_blocks, lay.block_range(2)
    (3, (8, 10))
"""

from __future__ import annotations

import json
import math
import zlib
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

import numpy as np

from .errors import ArgumentError, StoreFormatError

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "ATTRS_KEY",
    "DEFAULT_BLOCK_MB",
    "FieldSpec",
    "Layout",
    "block_rows_for",
    "check_int",
    "slice_rows_for",
    "ranges_to_blocks",
    "blocks_to_ranges",
]

FORMAT_NAME = "shardset"
FORMAT_VERSION = 1
ATTRS_KEY = "shardset"
DEFAULT_BLOCK_MB = 128
MIN_BLOCK_MB, MAX_BLOCK_MB = 64, 256
MIB = 1 << 20
# Checksummed slices per block: fine enough that a 4 MiB read of a 128 MiB block
# wastes little on slice edges, coarse enough that the table is 4 KiB a field.
SLICES_PER_BLOCK = 1024
SLICE_TABLE = "slice_checksums"  # (block, field, slice) -> crc32c of the slice's bytes in the chunk
RESERVED_NAMES = frozenset({SLICE_TABLE, "params", "zarr.json"})  # the store's own nodes beside the fields
# Bookkeeping grows with the block count (complete-block records, visit orders): 2**24
# blocks is 2 PiB in 128 MiB blocks.
MAX_BLOCKS = 1 << 24


@dataclass(frozen=True)
class FieldSpec:
    """dtype and per-row shape of one field (the array is ``(N, *shape)``)."""

    dtype: str
    shape: tuple[int, ...] = ()

    @property
    def row_bytes(self) -> int:
        return np.dtype(self.dtype).itemsize * math.prod(self.shape)

    def to_json(self) -> dict[str, Any]:
        return {"dtype": self.dtype, "shape": list(self.shape)}

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> "FieldSpec":
        return cls(_number_dtype(np.dtype(str(d["dtype"]))).name, tuple(int(s) for s in d["shape"]))

    @classmethod
    def of(cls, array: np.ndarray) -> "FieldSpec":
        """The spec of a batch or whole array whose first axis is rows."""
        return cls(_number_dtype(np.dtype(array.dtype)).name, tuple(int(s) for s in array.shape[1:]))


def _number_dtype(dtype: np.dtype) -> np.dtype:
    """``dtype`` if a field may have it: booleans and numbers (stored little-endian)."""
    if dtype.kind not in "biufc" or dtype.fields is not None or dtype.subdtype is not None:
        raise ArgumentError(f"a field's dtype must be a boolean or numeric type (bool, int, uint, float, complex), "
                            f"got {dtype}")
    return dtype


def check_int(name: str, value: object, minimum: int = 1) -> int:
    """``value`` as an int if it is an integer (not a bool) >= ``minimum``, else ValueError."""
    if not is_integer(value) or value < minimum:
        kind = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
        raise ArgumentError(f"{name} must be {kind}, got {value!r}")
    return int(value)


def is_integer(value: object) -> bool:
    """Whether ``value`` is a Python or numpy integer (a bool is not)."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def check_positive(name: str, value: object) -> float:
    """``value`` as a float if it is a finite number > 0 (not a bool), else ArgumentError."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)) or not (
            math.isfinite(value) and value > 0):
        raise ArgumentError(f"{name} must be positive (a finite number), got {value!r}")
    return float(value)


def block_rows_for(fields: Mapping[str, FieldSpec], block_mb: float = DEFAULT_BLOCK_MB) -> int:
    """Rows per block so that one block of all fields together is about ``block_mb`` MiB.

    >>> block_rows_for({"X": FieldSpec("float32", (16,)), "y": FieldSpec("float32", (1,))}, 68)
    1048576
    """
    if not MIN_BLOCK_MB <= block_mb <= MAX_BLOCK_MB:
        raise ArgumentError(f"block_mb must be between {MIN_BLOCK_MB} and {MAX_BLOCK_MB}, got {block_mb}")
    row_bytes = sum(f.row_bytes for f in fields.values())
    if row_bytes <= 0:
        raise ArgumentError("fields must have at least one byte per row")
    rows = max(1, int(block_mb * MIB) // row_bytes)
    if rows >= 16 * SLICES_PER_BLOCK:  # a whole number of slices, losing under 1/16 of the block
        rows -= rows % SLICES_PER_BLOCK
    return rows


def slice_rows_for(block_rows: int) -> int:
    """Rows per checksummed slice: the smallest divisor of ``block_rows`` that cuts a
    block into at most ``SLICES_PER_BLOCK`` slices (slices never straddle blocks).

    >>> slice_rows_for(1024 * 1926), slice_rows_for(1700)
    (1926, 2)
    """
    least = -(-block_rows // SLICES_PER_BLOCK)
    return next(d for d in range(least, block_rows + 1) if block_rows % d == 0)


@dataclass
class Layout:
    """Block geometry and field specs of a store, plus free-form generator metadata.

    ``slice_rows``: rows per slice with its own crc32c in the ``slice_checksums``
    array (uncompressed stores written by this version; ``None`` when there is none),
    which lets a reader check a part of a block without reading all of it.
    """

    rows: int
    block_rows: int
    fields: dict[str, FieldSpec]
    generator: dict[str, Any] = field(default_factory=dict)
    slice_rows: int | None = None

    def __post_init__(self) -> None:
        if self.rows < 0:
            raise ArgumentError(f"rows must be >= 0, got {self.rows}")
        if self.block_rows < 1:
            raise ArgumentError(f"block_rows must be a positive integer, got {self.block_rows}")
        if not self.fields:
            raise ArgumentError("a store needs at least one field")
        if self.slice_rows is not None and (self.slice_rows < 1 or self.block_rows % self.slice_rows):
            raise StoreFormatError(f"slice_rows {self.slice_rows} does not divide block_rows {self.block_rows}")

    @property
    def num_blocks(self) -> int:
        return -(-self.rows // self.block_rows)

    @property
    def row_bytes(self) -> int:
        return sum(f.row_bytes for f in self.fields.values())

    @property
    def nbytes(self) -> int:
        return self.rows * self.row_bytes

    def block_range(self, block: int) -> tuple[int, int]:
        """Rows ``[start, stop)`` of ``block``."""
        if not 0 <= block < self.num_blocks:
            raise IndexError(f"block {block} out of range [0, {self.num_blocks})")
        start = block * self.block_rows
        return start, min(start + self.block_rows, self.rows)

    def block_len(self, block: int) -> int:
        start, stop = self.block_range(block)
        return stop - start

    @property
    def slices_per_block(self) -> int:
        return 0 if self.slice_rows is None else self.block_rows // self.slice_rows

    def same_shape(self, other: "Layout") -> bool:
        return (self.rows, self.block_rows, self.fields) == (other.rows, other.block_rows, other.fields)

    def to_attrs(self, complete_blocks: Iterable[int] = ()) -> dict[str, Any]:
        done = sorted(set(complete_blocks))
        slices = {} if self.slice_rows is None else {"slice_rows": self.slice_rows}
        return {
            "format": FORMAT_NAME,
            "version": FORMAT_VERSION,
            "rows": self.rows,
            "block_rows": self.block_rows,
            "num_blocks": self.num_blocks,
            **slices,
            "fields": {k: v.to_json() for k, v in self.fields.items()},
            "generator": self.generator,
            "complete_blocks": blocks_to_ranges(done),
            "complete": len(done) == self.num_blocks,
        }

    def fingerprint(self) -> int:
        """A CRC-32 of the geometry, fields and generator: two stores that differ in any
        of them (another seed, bias, shape) get different fingerprints."""
        meta = {k: v for k, v in self.to_attrs().items() if k not in ("complete_blocks", "complete")}
        return zlib.crc32(json.dumps(meta, sort_keys=True, default=str).encode())

    @classmethod
    def from_attrs(cls, attrs: Mapping[str, Any], where: str = "store") -> "Layout":
        meta = attrs.get(ATTRS_KEY)
        if not isinstance(meta, Mapping) or meta.get("format") != FORMAT_NAME:
            raise StoreFormatError(f"{where} is not a shardset store (no '{ATTRS_KEY}' attributes)")
        if meta.get("version") != FORMAT_VERSION:
            raise StoreFormatError(
                f"{where} has shardset format version {meta.get('version')}; this shardset reads {FORMAT_VERSION}"
            )
        try:
            lay = cls(
                rows=int(meta["rows"]),
                block_rows=int(meta["block_rows"]),
                fields={k: FieldSpec.from_json(v) for k, v in meta["fields"].items()},
                generator=dict(meta.get("generator") or {}),
                slice_rows=None if meta.get("slice_rows") is None else int(meta["slice_rows"]),
            )
            complete = [(int(start), int(stop)) for start, stop in meta.get("complete_blocks") or []]
        except (AttributeError, KeyError, TypeError, ValueError) as exc:
            raise StoreFormatError(f"{where} has malformed shardset attributes: {exc}") from None
        if int(meta.get("num_blocks", lay.num_blocks)) != lay.num_blocks:
            raise StoreFormatError(f"{where}: num_blocks does not match rows and block_rows")
        if not all(0 <= start < stop <= lay.num_blocks for start, stop in complete):
            raise StoreFormatError(f"{where}: complete_blocks holds runs outside blocks [0, {lay.num_blocks})")
        return lay


def blocks_to_ranges(blocks: Iterable[int]) -> list[list[int]]:
    """Compress sorted block ids into ``[start, stop)`` runs: ``[0,1,2,5] -> [[0,3],[5,6]]``."""
    runs: list[list[int]] = []
    for b in sorted(set(blocks)):
        if runs and runs[-1][1] == b:
            runs[-1][1] = b + 1
        else:
            runs.append([b, b + 1])
    return runs


def ranges_to_blocks(runs: Iterable[Iterable[int]]) -> set[int]:
    """Inverse of :func:`blocks_to_ranges`."""
    out: set[int] = set()
    for start, stop in runs:
        out.update(range(int(start), int(stop)))
    return out
