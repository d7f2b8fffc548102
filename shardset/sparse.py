"""Wide sparse regression sets: y = sum_j values_j * w[indices_j] + b + noise.

Each row touches exactly ``nnz`` of ``features`` weights, at distinct indices
(uniform, or Zipf-skewed like a vocabulary), with N(0, 1) values.  The store
holds three fields that share ``block_rows`` (so the reader streams them like
any other store): ``indices`` (N, nnz) int32 (int64 from 2^31 features),
``values`` (N, nnz) float32 and ``y`` (N, 1) float32.  The true ``w`` is the
chunked array ``params/w``, written chunk by chunk before any block; a block
reads only the part of ``w`` its indices touch.

Block ``i`` is a pure function of ``(seed, i)`` and ``w`` (values and noise
from torch seeded by ``SeedSequence(seed, spawn_key=(1, i))``, indices from
numpy PCG64 with ``spawn_key=(1, i, 0)``; ``w`` from ``spawn_key=(0,)``), so
the bytes never depend on the number of writer processes.  docs/sparse.md
explains the design and the measurements.

Example:
    >>> import tempfile, os, torch
    >>> from shardset import generate_sparse_regression, ShardedDataset, embedding_bag_inputs
    >>> path = os.path.join(tempfile.mkdtemp(), "sparse.zarr")
    >>> store = generate_sparse_regression(path, rows=1000, features=50, nnz=4, block_rows=300, workers=1)
    >>> ds = ShardedDataset(path, batch_size=8, fields=["indices", "values", "y"])
    >>> batch = next(iter(ds))
    >>> tuple(batch["indices"].shape), batch["indices"].dtype
    ((8, 4), torch.int32)
    >>> bag = torch.nn.EmbeddingBag(50, 1, mode="sum")
    >>> input, offsets, weights = embedding_bag_inputs(batch)
    >>> tuple(bag(input, offsets, per_sample_weights=weights).shape)
    (8, 1)
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np
import torch

from .errors import ArgumentError
from .format import DEFAULT_BLOCK_MB, FieldSpec, Layout, check_int
from .lock import check_part, locked, metadata_mutex
from .store import BlockStore, compressors_for
from .synthetic import _BLOCK_KEY, _W_KEY, _library_versions, _torch_generator
from .writer import layout_for, open_for_writing, write_blocks

__all__ = [
    "SPARSE_GENERATOR_NAME",
    "SPARSE_FIELDS",
    "SparseRegressionBlocks",
    "generate_sparse_regression",
    "is_sparse",
    "sparse_true_parameters",
    "sparse_batch",
    "embedding_bag_inputs",
]

SPARSE_GENERATOR_NAME = "shardset.sparse_regression/1"
ALGORITHM = (
    "values then noise: torch mt19937 normal_ seeded by numpy SeedSequence(seed, spawn_key=(1, block)); indices: "
    "numpy PCG64 from SeedSequence(seed, spawn_key=(1, block, 0)), 16384 rows at a time, each row sorted with "
    "repeats redrawn until none (Zipf: rejection-inversion); w: PCG64 standard_normal from spawn_key=(0,), in order"
)
SPARSE_FIELDS = ("indices", "values", "y")
W_CHUNK = 1 << 22  # floats per chunk of params/w (16 MiB)
W_CACHE_FLOATS = 1 << 25  # a w up to this size (128 MiB) is read once per writer process and kept
_SLICE_ROWS = 1 << 14  # rows drawn (and gathered, when w is kept) at a time: temporaries stay in cache
_MIN_NEW_MASS = 0.01  # Zipf: least probability that a draw misses a row's first nnz - 1 picks


def is_sparse(layout: Layout) -> bool:
    """True when ``layout`` has the sparse fields: ``indices`` and ``values`` (N, nnz), ``y`` (N, 1)."""
    f = layout.fields
    return (
        all(k in f for k in SPARSE_FIELDS) and len(f["indices"].shape) == 1
        and f["values"].shape == f["indices"].shape and f["y"].shape == (1,)
    )


class _Zipf:
    """Draws from P(k) proportional to (k + 1)^-s on [0, n): rejection-inversion
    (Hormann & Derflinger 1996), vectorized; about 1.1 uniform draws per sample."""

    def __init__(self, n: int, s: float) -> None:
        self.n, self.s = n, s
        self.h_x1 = self._H(1.5) - 1.0
        self.h_n = self._H(n + 0.5)
        self.squeeze = 2.0 - self._H_inv(self._H(2.5) - 2.0**-s)

    def _H(self, x):  # integral of x^-s, shifted so that it is smooth at s = 1
        log_x = np.log(x)
        return _expm1_over((1.0 - self.s) * log_x) * log_x

    def _H_inv(self, u):
        t = np.maximum(u * (1.0 - self.s), -1.0)
        return np.exp(_log1p_over(t) * u)

    def __call__(self, rng: np.random.Generator, size: int) -> np.ndarray:
        out = np.empty(size, np.int64)
        todo = np.arange(size)
        while todo.size:
            u = self.h_n + rng.random(todo.size) * (self.h_x1 - self.h_n)
            x = self._H_inv(u)
            k = np.clip(np.floor(x + 0.5), 1, self.n)
            ok = (k - x <= self.squeeze) | (u >= self._H(k + 0.5) - np.exp(-self.s * np.log(k)))
            out[todo[ok]] = k[ok].astype(np.int64) - 1
            todo = todo[~ok]
        return out

    def new_mass(self, picked: int) -> float:
        """Probability that a draw is not one of the ``picked`` most likely values."""
        exact = min(self.n, 1000)
        k = np.arange(1, exact + 1, dtype=np.float64)
        p = k**-self.s
        tail = float(self._H(self.n + 0.5) - self._H(exact + 0.5)) if self.n > exact else 0.0
        return 1.0 - float(p[:picked].sum()) / (float(p.sum()) + tail)


def _expm1_over(x):
    x = np.asarray(x, np.float64)
    small = np.abs(x) < 1e-8
    safe = np.where(small, 1.0, x)
    return np.where(small, 1.0 + x / 2 * (1.0 + x / 3 * (1.0 + x / 4)), np.expm1(safe) / safe)


def _log1p_over(x):
    x = np.asarray(x, np.float64)
    small = np.abs(x) < 1e-8
    safe = np.where(small, 1.0, x)
    return np.where(small, 1.0 - x * (0.5 - x * (1.0 / 3.0 - 0.25 * x)), np.log1p(safe) / safe)


def _fill_distinct_sorted(out: np.ndarray, draw) -> None:
    """Fill ``out`` (n, k) with draws, each row sorted and without repeats.

    Every repeat is redrawn (only the rows that have one are sorted again) until
    no row has any: a row is the first ``k`` distinct values of a stream of
    independent draws, so uniform draws give uniform ``k``-subsets.
    """
    n, k = out.shape
    out[...] = draw(n * k).reshape(n, k)
    out.sort(axis=1)
    rows = np.flatnonzero((out[:, 1:] == out[:, :-1]).any(axis=1))
    while rows.size:
        sub = out[rows]
        again = np.zeros(sub.shape, bool)
        again[:, 1:] = sub[:, 1:] == sub[:, :-1]
        sub[again] = draw(int(again.sum()))
        sub.sort(axis=1)
        out[rows] = sub
        rows = rows[(sub[:, 1:] == sub[:, :-1]).any(axis=1)]


class _Weights:
    """The store's true ``w``, read for the indices of one block at a time.

    A ``w`` of up to ``cache_floats`` entries is read once per process and kept;
    a larger one is read chunk by chunk for every block, and each chunk serves
    the entries that fall in it (grouped with a stable radix argsort of the
    chunk ids), so memory holds one chunk of ``w`` at a time.
    """

    def __init__(self, path: str, storage_options: Mapping[str, Any] | None, cache_floats: int) -> None:
        self.path, self.storage_options, self.cache_floats = path, storage_options, cache_floats
        self._array = self._whole = self._pid = None

    def __getstate__(self) -> dict[str, Any]:  # only the address crosses processes, never the arrays
        return {"path": self.path, "storage_options": self.storage_options, "cache_floats": self.cache_floats}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(**state)

    def _open(self):
        if self._pid != os.getpid():  # a handle is never reused across fork
            store = BlockStore.open(self.path, storage_options=self.storage_options)
            self._array, self._whole, self._pid = store.group["params/w"], None, os.getpid()
        return self._array

    def kept(self) -> np.ndarray | None:
        """The whole ``w`` when it has at most ``cache_floats`` entries (read on first use), else ``None``."""
        arr = self._open()
        if arr.shape[0] > self.cache_floats:
            return None
        if self._whole is None:
            self._whole = arr[:]
        return self._whole

    def dot(self, indices: np.ndarray, values: np.ndarray) -> np.ndarray:
        """``sum_j values[r, j] * w[indices[r, j]]`` for every row ``r``, reading ``w`` chunk by chunk."""
        arr = self._open()
        chunk, n = int(arr.chunks[0]), int(arr.shape[0])
        flat = indices.reshape(-1).astype(np.intp)
        ids = flat // chunk
        ids = ids.astype(np.uint8 if n <= 256 * chunk else np.uint16 if n <= (1 << 16) * chunk else np.int64)
        order = np.argsort(ids, kind="stable")  # a radix sort for small unsigned ids: O(n)
        counts = np.bincount(ids, minlength=-(-n // chunk))
        w_at = np.empty(flat.size, np.float32)
        start = 0
        for c in np.flatnonzero(counts):
            pos = order[start : start + counts[c]]
            lo = int(c) * chunk
            w_at[pos] = arr[lo : min(lo + chunk, n)][flat[pos] - lo]
            start += int(counts[c])
        return _row_dot(values, w_at.reshape(values.shape))


@dataclass(frozen=True)
class SparseRegressionBlocks:
    """Picklable ``fill(block, out)`` of the sparse fields for :func:`shardset.write_blocks`.

    Needs the store's ``params/w`` (written by :func:`generate_sparse_regression`).
    """

    path: str
    rows: int
    block_rows: int
    features: int
    nnz: int
    bias: float
    noise: float
    seed: int
    zipf: float | None = None
    storage_options: Mapping[str, Any] | None = None
    w_cache_floats: int = W_CACHE_FLOATS

    def __post_init__(self) -> None:
        object.__setattr__(self, "_weights", _Weights(self.path, self.storage_options, self.w_cache_floats))
        object.__setattr__(self, "_zipf", None if self.zipf is None else _Zipf(self.features, self.zipf))

    def __call__(self, block: int) -> dict[str, np.ndarray]:
        n = min(self.block_rows, self.rows - block * self.block_rows)
        dtype = _index_dtype(self.features)
        out = {
            "indices": np.empty((n, self.nnz), dtype),
            "values": np.empty((n, self.nnz), np.float32),
            "y": np.empty((n, 1), np.float32),
        }
        self.fill(block, out)
        return out

    def fill(self, block: int, out: Mapping[str, np.ndarray]) -> None:
        """Write block ``block`` into ``out["indices"]``, ``out["values"]`` and ``out["y"]``."""
        indices, values, y = out["indices"], out["values"], out["y"]
        gen = _torch_generator(self.seed, _BLOCK_KEY, block)  # torch's normal_ is 2.5x numpy's here
        torch.from_numpy(values).normal_(generator=gen)
        torch.from_numpy(y).normal_(generator=gen)
        y *= np.float32(self.noise)
        y += np.float32(self.bias)
        rng = np.random.default_rng(np.random.SeedSequence(self.seed, spawn_key=(_BLOCK_KEY, block, 0)))
        if self._zipf is None:
            draw = lambda size: rng.integers(0, self.features, size, dtype=indices.dtype)  # noqa: E731
        else:
            draw = lambda size: self._zipf(rng, size)  # noqa: E731
        w = self._weights.kept()
        for lo in range(0, len(y), _SLICE_ROWS):  # slices keep the temporaries in cache
            sl = slice(lo, lo + _SLICE_ROWS)
            _fill_distinct_sorted(indices[sl], draw)
            if w is not None:
                y[sl, 0] += _row_dot(values[sl], np.take(w, indices[sl].astype(np.intp)))
        if w is None:
            y[:, 0] += self._weights.dot(indices, values)


def _row_dot(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.einsum("ij,ij->i", a, b)


def _index_dtype(features: int) -> np.dtype:
    return np.dtype(np.int32 if features < 2**31 else np.int64)


def _write_weights(store: BlockStore, features: int, seed: int, chunk: int, checksum: bool) -> None:
    """Write ``params/w`` chunk by chunk (one chunk in memory), then mark it complete."""
    if "params/w" in store.group and store.group["params/w"].attrs.get("complete") is True:
        return
    arr = store.group.create_array(
        "params/w", shape=(features,), chunks=(min(chunk, features),), dtype=np.float32,
        compressors=compressors_for(None, checksum), fill_value=np.nan, overwrite=True,
    )
    rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=_W_KEY))
    for lo in range(0, features, arr.chunks[0]):
        arr[lo : lo + arr.chunks[0]] = rng.standard_normal(min(arr.chunks[0], features - lo), dtype=np.float32)
    arr.attrs["complete"] = True


@locked
def generate_sparse_regression(
    path: str | os.PathLike,
    rows: int,
    features: int,
    nnz: int,
    *,
    zipf: float | None = None,
    bias: float = 4.2,
    noise: float = 0.01,
    seed: int = 0,
    block_mb: float = DEFAULT_BLOCK_MB,
    block_rows: int | None = None,
    workers: int | None = None,
    compression: str | None = None,
    checksum: bool = True,
    overwrite: bool = False,
    progress: bool | None = None,
    part: tuple[int, int] | None = None,
    storage_options: Mapping[str, Any] | None = None,
    scheduler: str = "processes",
    client: Any = None,
    w_chunk: int = W_CHUNK,
) -> BlockStore:
    """Generate ``rows`` sparse regression rows with ``nnz`` of ``features`` weights each.

    ``zipf=s`` draws index ``k`` with probability proportional to ``(k + 1)^-s``
    (``s > 0``; index 0 is the most frequent) instead of uniformly.  ``w`` (N(0, 1)
    draws) is stored as ``params/w`` in chunks of ``w_chunk`` floats.  Parallel
    over ``workers`` processes, resumable by rerunning, the same bytes whatever
    ``workers`` is; ``part``, ``storage_options``, ``scheduler`` and ``client``
    are as for :func:`shardset.generate_regression`.
    """
    features, nnz = check_int("features", features), check_int("nnz", nnz)
    seed, w_chunk = check_int("seed", seed, 0), check_int("w_chunk", w_chunk)
    if nnz > features:
        raise ArgumentError(f"nnz must be at most features ({features}), got {nnz}")
    if not np.isfinite(bias) or not np.isfinite(noise) or noise < 0:
        raise ArgumentError(f"bias must be finite and noise a finite value >= 0, got bias={bias}, noise={noise}")
    if zipf is not None:
        if not (isinstance(zipf, (int, float)) and math.isfinite(zipf) and zipf > 0):
            raise ArgumentError(f"zipf must be a finite exponent > 0, got {zipf!r}")
        mass = _Zipf(features, float(zipf)).new_mass(nnz - 1)
        if mass < _MIN_NEW_MASS:
            raise ArgumentError(
                f"zipf exponent {zipf} is too steep for {nnz} distinct indices per row among {features}: "
                f"only {mass:.2g} of the probability lies outside the {nnz - 1} most frequent indices"
            )
    dtype = _index_dtype(features)
    fields = {
        "indices": FieldSpec(dtype.name, (nnz,)),
        "values": FieldSpec("float32", (nnz,)),
        "y": FieldSpec("float32", (1,)),
    }
    layout = layout_for(rows, fields, block_mb=block_mb, block_rows=block_rows)
    layout.generator = {
        "name": SPARSE_GENERATOR_NAME,
        "algorithm": ALGORITHM,
        "seed": int(seed),
        "bias": float(bias),
        "noise": float(noise),
        "features": int(features),
        "nnz": int(nnz),
        "zipf": None if zipf is None else float(zipf),
        "weights": "params/w",
        "weights_chunk": int(min(w_chunk, features)),
        **_library_versions(),
    }
    check_part(part, overwrite)
    with metadata_mutex(path):  # part writers: the first one writes params/w
        store = open_for_writing(
            path, layout, compression=compression, checksum=checksum, overwrite=overwrite, storage_options=storage_options
        )
        _write_weights(store, features, seed, w_chunk, checksum)
    make = SparseRegressionBlocks(
        os.fspath(path), layout.rows, layout.block_rows, features, nnz, float(bias), float(noise), seed,
        None if zipf is None else float(zipf), storage_options,
    )
    return write_blocks(path, layout, make, workers=workers, compression=compression, checksum=checksum,
                        progress=progress, part=part, storage_options=storage_options, scheduler=scheduler, client=client)


def sparse_true_parameters(store: BlockStore):
    """``(w, b)`` of a sparse synthetic store, ``w`` as the (lazy, chunked) zarr array; else ``None``."""
    gen = store.layout.generator
    if gen.get("name") != SPARSE_GENERATOR_NAME:
        return None
    return store.group[gen["weights"]], float(gen["bias"])


# -- batches for nn.EmbeddingBag ------------------------------------------------------------


def sparse_batch(batch: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(indices, values, y)`` of a sparse batch: indices (B, nnz) int64, values (B, nnz), y (B, 1).

    ``bag(indices, per_sample_weights=values)`` with ``bag = nn.EmbeddingBag(features, 1, mode="sum")``
    is ``sum_j values[:, j] * w[indices[:, j]]``.
    """
    return batch["indices"].long(), batch["values"], batch["y"]


def embedding_bag_inputs(batch: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The flat ``(input, offsets, per_sample_weights)`` form of a sparse batch for
    ``nn.EmbeddingBag(features, dim, mode="sum")``: input and weights (B * nnz,),
    offsets (B,) int64 (every bag has nnz entries)."""
    indices = batch["indices"]
    rows, nnz = indices.shape
    return indices.reshape(-1).long(), torch.arange(0, rows * nnz, nnz), batch["values"].reshape(-1)
