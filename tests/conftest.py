"""Shared fixtures: small stores whose rows encode their row id.

Every store made here can be checked row by row after any shuffle:

* ``id`` stores (fields ``X`` and ``y``): ``X[i, j] = i * (j + 1)`` as float32 and
  ``y[i] = i`` as int64 (shape ``(N,)``), so ``y`` is the row id and ``X[:, 0]``
  repeats it (exact in float32 below 2**24 rows).
* ``mixed`` stores (fields ``a``, ``b``, ``c``, ``d`` of different dtypes and row
  shapes): ``b`` is the row id (int64) and the other fields are functions of it,
  see :func:`mixed_arrays`.

Use the function-scoped ``make_*`` factories for stores a test modifies (they
write under ``tmp_path``), and the session-scoped, cached ``*_store`` factories
for stores a test only reads.
"""

from __future__ import annotations

import multiprocessing.util
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

import numpy as np
import pytest

import shardset


_SCRATCH = pytest.StashKey[tuple[str, str | None, dict[str, str | None]]]()


def pytest_sessionstart(session: pytest.Session) -> None:
    """Send the run's ``tempfile.mkdtemp()`` directories (the docstring examples make
    one each) into one directory that the end of the run removes; pytest's own
    ``tmp_path`` stays where it was (kept for the last runs, as usual)."""
    multiprocessing.util.get_temp_dir()  # this process's own, which multiprocessing removes after this hook's end
    root = tempfile.mkdtemp(prefix="shardset-tests-")
    os.chmod(root, 0o1777)  # as /tmp: tests run commands as an unprivileged user too
    saved = {k: os.environ.get(k) for k in ("TMPDIR", "PYTEST_DEBUG_TEMPROOT")}
    session.config.stash[_SCRATCH] = (root, tempfile.tempdir, saved)
    os.environ.setdefault("PYTEST_DEBUG_TEMPROOT", tempfile.gettempdir())
    os.environ["TMPDIR"] = tempfile.tempdir = root


def pytest_sessionfinish(session: pytest.Session) -> None:
    root, tempdir, saved = session.config.stash[_SCRATCH]
    tempfile.tempdir = tempdir
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    shutil.rmtree(root, ignore_errors=True)


def id_arrays(rows: int, features: int = 3) -> dict[str, np.ndarray]:
    """``X[i, j] = i * (j + 1)`` (float32, ``(rows, features)``) and ``y[i] = i`` (int64)."""
    ids = np.arange(rows, dtype=np.int64)
    X = ids[:, None].astype(np.float32) * np.arange(1, features + 1, dtype=np.float32)
    return {"X": np.ascontiguousarray(X, dtype=np.float32), "y": ids}


def mixed_arrays(rows: int) -> dict[str, np.ndarray]:
    """Fields of several dtypes and row shapes, all functions of the row id ``b``.

    * ``a``: float32 ``(3, 2)``, ``a[i, r, s] = i + (2 r + s) / 8``
    * ``b``: int64 ``()``, ``b[i] = i``
    * ``c``: int16 ``(2,)``, ``c[i] = (i % 30000, -(i % 30000))``
    * ``d``: uint8 ``()``, ``d[i] = i % 251``
    """
    ids = np.arange(rows, dtype=np.int64)
    a = ids[:, None, None].astype(np.float32) + (np.arange(6, dtype=np.float32).reshape(3, 2) / 8)
    c = np.stack([ids % 30000, -(ids % 30000)], axis=1).astype(np.int16)
    d = (ids % 251).astype(np.uint8)
    return {"a": a.astype(np.float32), "b": ids, "c": c, "d": d}


def write_id_store(path: str | os.PathLike, rows: int, block_rows: int, *, features: int = 3, **write_kw) -> str:
    """Write an ``id`` store (see the module docstring) at ``path``; returns the path."""
    shardset.write(path, id_arrays(rows, features), block_rows=block_rows, progress=False, **write_kw)
    return os.fspath(path)


def write_mixed_store(path: str | os.PathLike, rows: int, block_rows: int, **write_kw) -> str:
    """Write a ``mixed`` store (see :func:`mixed_arrays`) at ``path``; returns the path."""
    shardset.write(path, mixed_arrays(rows), block_rows=block_rows, progress=False, **write_kw)
    return os.fspath(path)


def _name(kind: str, rows: int, block_rows: int, extra: dict) -> str:
    tail = "".join(f"-{k}{v}" for k, v in sorted(extra.items()))
    return f"{kind}-{rows}-{block_rows}{tail}.zarr"


@pytest.fixture
def make_id_store(tmp_path: Path) -> Callable[..., str]:
    """Factory ``make_id_store(rows, block_rows, features=3, name=None, **write_kw) -> path``
    writing a fresh ``id`` store under this test's ``tmp_path`` (safe to modify)."""

    def make(rows: int, block_rows: int, *, features: int = 3, name: str | None = None, **write_kw) -> str:
        path = tmp_path / (name or _name("id", rows, block_rows, {"f": features, **write_kw}))
        return write_id_store(path, rows, block_rows, features=features, **write_kw)

    return make


@pytest.fixture
def make_mixed_store(tmp_path: Path) -> Callable[..., str]:
    """Factory ``make_mixed_store(rows, block_rows, name=None, **write_kw) -> path`` (safe to modify)."""

    def make(rows: int, block_rows: int, *, name: str | None = None, **write_kw) -> str:
        path = tmp_path / (name or _name("mixed", rows, block_rows, write_kw))
        return write_mixed_store(path, rows, block_rows, **write_kw)

    return make


@pytest.fixture(scope="session")
def id_store(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., str]:
    """Cached factory ``id_store(rows, block_rows, features=3, **write_kw) -> path``.

    The store is written once per session and shared: tests must only read it.
    """
    root = tmp_path_factory.mktemp("id-stores")
    made: dict[str, str] = {}

    def get(rows: int, block_rows: int, *, features: int = 3, **write_kw) -> str:
        name = _name("id", rows, block_rows, {"f": features, **write_kw})
        if name not in made:
            made[name] = write_id_store(root / name, rows, block_rows, features=features, **write_kw)
        return made[name]

    return get


@pytest.fixture(scope="session")
def mixed_store(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., str]:
    """Cached factory ``mixed_store(rows, block_rows, **write_kw) -> path`` (read only)."""
    root = tmp_path_factory.mktemp("mixed-stores")
    made: dict[str, str] = {}

    def get(rows: int, block_rows: int, **write_kw) -> str:
        name = _name("mixed", rows, block_rows, write_kw)
        if name not in made:
            made[name] = write_mixed_store(root / name, rows, block_rows, **write_kw)
        return made[name]

    return get


@pytest.fixture(scope="session")
def regression_store(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., str]:
    """Cached factory ``regression_store(rows, features, block_rows, seed=0, **kw) -> path``
    of :func:`shardset.generate_regression` stores (read only; one writer process)."""
    root = tmp_path_factory.mktemp("regression-stores")
    made: dict[str, str] = {}

    def get(rows: int, features: int, block_rows: int, *, seed: int = 0, **kw) -> str:
        name = _name("reg", rows, block_rows, {"f": features, "s": seed, **kw})
        if name not in made:
            path = root / name
            shardset.generate_regression(
                path, rows=rows, features=features, block_rows=block_rows, seed=seed, workers=1, progress=False, **kw
            )
            made[name] = os.fspath(path)
        return made[name]

    return get
