"""Synthetic linear-regression data: X ~ N(0, I), y = X w + b + noise * N(0, 1).

Block ``i`` of a store is a pure function of ``(seed, i)``: its generator is a
torch ``Generator`` (mt19937) seeded from ``numpy.random.SeedSequence(seed,
spawn_key=(1, i))``, so any process can make any block in any order and the
bytes never depend on the number of workers.  The default weights come from
``spawn_key=(0,)``.  The same code also backs two small in-memory streams for
the seed lesson's exercises: fresh data on every pass, or the same data on
every pass.

Example:
    >>> import tempfile, os
    >>> from shardset import generate_regression, BlockStore
    >>> path = os.path.join(tempfile.mkdtemp(), "reg.zarr")
    >>> store = generate_regression(path, rows=1000, features=2, block_rows=300, workers=1)
    >>> store.layout.num_blocks, store.missing_blocks()
    (4, [])
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from .errors import ArgumentError, StoreFormatError
from .format import DEFAULT_BLOCK_MB, FieldSpec, check_int
from .lock import check_part, locked, metadata_mutex
from .store import BlockStore
from .writer import layout_for, open_for_writing, write_blocks

__all__ = [
    "GENERATOR_NAME",
    "RegressionBlocks",
    "generate_regression",
    "default_weights",
    "true_parameters",
    "regression_blocks",
    "FreshRegressionStream",
    "FixedRegressionStream",
]

GENERATOR_NAME = "shardset.regression/1"
ALGORITHM = "torch mt19937 normal_ seeded by numpy SeedSequence(seed, spawn_key=(1, block)); w from spawn_key=(0,)"
_W_KEY = (0,)
_BLOCK_KEY = 1


def _torch_generator(seed: int, *spawn_key: int) -> torch.Generator:
    state = np.random.SeedSequence(seed, spawn_key=spawn_key).generate_state(1, np.uint64)[0]
    return torch.Generator().manual_seed(int(state))


def default_weights(features: int, seed: int = 0) -> np.ndarray:
    """The true ``w`` used when none is given: N(0, 1) draws from the seed."""
    w = torch.empty(features, dtype=torch.float32)
    w.normal_(generator=_torch_generator(seed, *_W_KEY))
    return w.numpy()


@contextmanager
def _one_thread():
    # The same arithmetic in every process: BLAS results may depend on the thread count.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _fill_regression(gen: torch.Generator, X: torch.Tensor, y: torch.Tensor, w: torch.Tensor, bias: float, noise: float):
    """X ~ N(0, 1) and y = X w + bias + noise * N(0, 1), written in place."""
    X.normal_(generator=gen)
    y.normal_(generator=gen)
    y.mul_(noise).add_(bias)
    y.addmm_(X, w.view(-1, 1))


@dataclass(frozen=True)
class RegressionBlocks:
    """Picklable ``block -> {"X", "y"}`` for :func:`shardset.write_blocks`."""

    rows: int
    block_rows: int
    weights: np.ndarray
    bias: float
    noise: float
    seed: int

    def __call__(self, block: int) -> dict[str, np.ndarray]:
        n = min(self.block_rows, self.rows - block * self.block_rows)
        out = {"X": np.empty((n, len(self.weights)), np.float32), "y": np.empty((n, 1), np.float32)}
        self.fill(block, out)
        return out

    def fill(self, block: int, out: dict[str, np.ndarray]) -> None:
        """Write block ``block`` into ``out["X"]`` and ``out["y"]`` (its exact row count)."""
        X, y = torch.from_numpy(out["X"]), torch.from_numpy(out["y"])
        with _one_thread():
            _fill_regression(_torch_generator(self.seed, _BLOCK_KEY, block), X, y, torch.from_numpy(self.weights), self.bias, self.noise)


@locked
def generate_regression(
    path: str | os.PathLike,
    rows: int,
    features: int,
    *,
    weights: Sequence[float] | np.ndarray | None = None,
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
) -> BlockStore:
    """Generate ``rows`` rows of synthetic regression data into a store at ``path``.

    Fields ``X`` (rows, features) and ``y`` (rows, 1), float32; the true ``w`` is
    stored as the array ``params/w`` and ``seed``, ``bias``, ``noise`` in the
    attributes.  Parallel over ``workers`` processes (default: all cores),
    resumable by rerunning, and the same bytes whatever ``workers`` is.
    ``part=(i, k)`` writes only blocks ``b % k == i`` (see :func:`shardset.write_blocks`).
    ``path`` may be a URL (``s3://bucket/prefix``) with ``storage_options``;
    ``scheduler="dask"`` makes each block a task on the Dask ``client``.
    """
    features, seed = check_int("features", features), check_int("seed", seed, 0)
    if not np.isfinite(bias) or not np.isfinite(noise) or noise < 0:
        raise ArgumentError(f"bias must be finite and noise a finite value >= 0, got bias={bias}, noise={noise}")
    fields = {"X": FieldSpec("float32", (int(features),)), "y": FieldSpec("float32", (1,))}
    layout = layout_for(rows, fields, block_mb=block_mb, block_rows=block_rows)  # checks sizes before w is drawn
    w = default_weights(int(features), int(seed)) if weights is None else np.asarray(weights, dtype=np.float32).reshape(-1)
    if w.shape != (features,):
        raise ArgumentError(f"weights must have {features} entries, got {w.size}")
    layout.generator = {
        "name": GENERATOR_NAME,
        "algorithm": ALGORITHM,
        "seed": int(seed),
        "bias": float(bias),
        "noise": float(noise),
        "weights": "params/w",
        "weights_crc32c": _crc(w),
        **_library_versions(),
    }
    make = RegressionBlocks(layout.rows, layout.block_rows, w, float(bias), float(noise), int(seed))
    check_part(part, overwrite)
    with metadata_mutex(path):  # part writers: the first one creates params/w
        store = open_for_writing(
            path, layout, compression=compression, checksum=checksum, overwrite=overwrite, storage_options=storage_options
        )
        if not _stored_weights_match(store, w):  # new, or torn by a kill while being written
            store.group.create_array("params/w", data=w, chunks=(min(len(w), 1 << 22),), overwrite=True)
    return write_blocks(path, layout, make, workers=workers, compression=compression, checksum=checksum,
                        progress=progress, part=part, storage_options=storage_options, scheduler=scheduler, client=client)


def true_parameters(store: BlockStore) -> tuple[np.ndarray, float] | None:
    """``(w, b)`` a synthetic store was generated with, or ``None`` for other stores."""
    gen = store.layout.generator
    if gen.get("name") != GENERATOR_NAME:
        return None
    try:
        w = np.asarray(store.group[gen["weights"]][:])
    except Exception as exc:  # missing, or a chunk that no longer decodes: zarr raises many kinds
        raise StoreFormatError(f"{store.where}: its weights {gen['weights']} cannot be read "
                               f"({type(exc).__name__}: {exc})") from None
    return w, float(gen["bias"])


def regression_blocks(store: BlockStore) -> RegressionBlocks:
    """The block source a synthetic store was generated with, from its attributes.

    Raises :class:`StoreFormatError` when the store has no generator, its
    ``params/w`` no longer matches the recorded checksum, or this torch/numpy
    differ from the ones recorded (their streams may change between versions, so
    a regenerated block could differ without any corruption).
    """
    params = true_parameters(store)
    if params is None:
        name = store.layout.generator.get("name") or "none recorded"
        raise StoreFormatError(f"{store.where}: its blocks cannot be regenerated (generator: {name}; "
                               f"verify regenerates {GENERATOR_NAME})")
    w, bias = params
    gen, lay = store.layout.generator, store.layout
    if _crc(w) != gen.get("weights_crc32c"):
        raise StoreFormatError(f"{store.where}: {gen['weights']} does not match its recorded crc32c")
    here = _library_versions()
    differ = [f"{k} {gen.get(k)} (here {v})" for k, v in here.items() if gen.get(k) != v]
    if differ:
        raise StoreFormatError(f"{store.where} was generated with {', '.join(differ)}: regenerated blocks could differ")
    return RegressionBlocks(lay.rows, lay.block_rows, w, bias, float(gen["noise"]), int(gen["seed"]))


def _stored_weights_match(store: BlockStore, w: np.ndarray) -> bool:
    try:
        return _crc(np.asarray(store.group["params/w"][:])) == _crc(w)
    except Exception:  # missing, or a chunk cut short: either way it is rewritten
        return False


def _library_versions() -> dict[str, str]:
    return {"torch": torch.__version__.split("+")[0], "numpy": np.__version__}


def _crc(a: np.ndarray) -> int:
    import crc32c

    return crc32c.crc32c(np.ascontiguousarray(a, dtype="<f4").tobytes())


class _RegressionStream(IterableDataset):
    """Batches of regression data drawn in memory, with no store (the lesson's exercises)."""

    def __init__(
        self, weights, bias: float = 4.2, noise: float = 0.01, *, rows: int, batch_size: int,
        drop_last: bool = False, seed: int | None = None,
    ) -> None:
        if rows < 1 or batch_size < 1:
            raise ArgumentError(f"rows and batch_size must be positive, got {rows} and {batch_size}")
        self.w = torch.as_tensor(np.asarray(weights, dtype=np.float32)).reshape(-1)
        self.bias, self.noise, self.rows = float(bias), float(noise), int(rows)
        self.batch_size, self.drop_last, self.seed = int(batch_size), bool(drop_last), seed

    def __len__(self) -> int:
        return self.rows // self.batch_size if self.drop_last else -(-self.rows // self.batch_size)

    def _batches(self, gen: torch.Generator) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        info = get_worker_info()
        wid, nw = (info.id, info.num_workers) if info is not None else (0, 1)
        for j in range(wid, len(self), nw):
            n = min(self.batch_size, self.rows - j * self.batch_size)
            X, y = torch.empty(n, len(self.w)), torch.empty(n, 1)
            if self.seed is not None:  # batch j is a pure function of (seed, j)
                gen = _torch_generator(self.seed, 2, j)
            _fill_regression(gen, X, y, self.w, self.bias, self.noise)
            yield X, y


class FreshRegressionStream(_RegressionStream):
    """New random data on every pass ("generate the data on the fly").

    >>> ds = FreshRegressionStream([2.0, -3.4], rows=10, batch_size=4)
    >>> [tuple(X.shape) for X, y in ds]
    [(4, 2), (4, 2), (2, 2)]
    """

    def __init__(self, weights, bias: float = 4.2, noise: float = 0.01, *, rows: int, batch_size: int, drop_last: bool = False):
        super().__init__(weights, bias, noise, rows=rows, batch_size=batch_size, drop_last=drop_last, seed=None)

    def __iter__(self):
        gen = torch.Generator().manual_seed(int(torch.randint(0, 2**62, (1,)).item()))
        return self._batches(gen)


class FixedRegressionStream(_RegressionStream):
    """The same data on every pass, from ``seed`` (a local generator, never the global RNG).

    >>> ds = FixedRegressionStream([2.0, -3.4], rows=10, batch_size=4, seed=7, drop_last=True)
    >>> a, b = list(ds), list(ds)
    >>> len(a), all(torch.equal(x[0], z[0]) for x, z in zip(a, b))
    (2, True)
    """

    def __init__(self, weights, bias: float = 4.2, noise: float = 0.01, *, rows: int, batch_size: int, seed: int = 0, drop_last: bool = False):
        super().__init__(weights, bias, noise, rows=rows, batch_size=batch_size, drop_last=drop_last, seed=seed)

    def __iter__(self):
        return self._batches(torch.Generator())
