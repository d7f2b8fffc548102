"""How fast does a storage location feed training? The code behind ``shardset bench``.

:func:`run` writes a synthetic store on the storage under test and measures, each
against the raw figure of the same disk taken in the same run:

* writing: ``generate_regression`` against a sequential write + ``fsync`` of the same size;
* sequential and block-shuffled reading with :class:`~shardset.ShardedDataset`, cold
  (the files evicted from the page cache) against a sequential ``O_DIRECT`` read, and
  warm against a buffered read from the page cache;
* the naive random read a user would otherwise write: ``numpy.memmap`` + a map-style
  ``Dataset`` + ``DataLoader(shuffle=True)``, for a time budget.

The measurement functions (:func:`fsync_write`, :func:`direct_read`,
:func:`buffered_read`, :func:`evict`, :func:`consume`, :func:`shardset_read`,
:func:`naive_read`) are also what the scripts in ``benchmarks/`` use, so each figure
is made by one piece of code.

Example:
    >>> import tempfile
    >>> res = run(tempfile.mkdtemp(), size=4 << 20, quick=True, png=None, log=None,
    ...           block_rows=8192, naive_seconds=0.2)
    >>> res["figures"]["block-shuffled read, warm"]["rows"] == res["rows"]
    True
"""

from __future__ import annotations

import contextlib
import json
import math
import mmap
import os
import re
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import torch

from .format import check_int
from .memory import aligned_buffer

__all__ = [
    "buffered_read", "consume", "direct_read", "evict", "format_table", "fsync_write", "naive_read", "parse_size",
    "plot", "run", "shardset_read",
]

MiB = 1 << 20
GB = 1e9
_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([kmgt]?)(i?)b?\s*$", re.IGNORECASE)


def parse_size(text: str) -> int:
    """Bytes in a size such as ``4GB`` (decimal), ``512MiB`` (binary) or ``1e6``.

    >>> parse_size("4GB"), parse_size("512MiB"), parse_size("100")
    (4000000000, 536870912, 100)
    """
    m = _SIZE.match(str(text))
    if not m:
        try:
            value = float(text)
        except ValueError:
            raise ValueError(f"expected a size such as 4GB or 512MiB, got {text!r}") from None
        m_value, power, base = value, 0, 1000
    else:
        m_value, power = float(m.group(1)), "kmgt".find(m.group(2).lower()) + 1 if m.group(2) else 0
        base = 1024 if m.group(3) else 1000
    if not math.isfinite(m_value):
        raise ValueError(f"expected a finite size such as 4GB or 512MiB, got {text!r}")
    size = int(m_value * base**power)
    if size < 1:
        raise ValueError(f"size must be at least one byte, got {text!r}")
    return size


# -- raw disk figures ---------------------------------------------------------------


def fsync_write(directory: str | os.PathLike, total: int, piece: int = 8 * MiB, fsync_every: int | None = None) -> dict[str, Any]:
    """Write ``total`` random bytes to a new file in ``piece``-sized ``os.write`` calls and
    ``fsync`` it (also after every ``fsync_every`` bytes, as a writer that makes each block
    durable does); the file is removed. ``gb_per_s`` counts write and fsync."""
    buf = np.random.default_rng(12345).integers(0, 256, piece, dtype=np.uint8)
    mv = memoryview(buf)
    path = Path(directory) / f"fsync-probe-{os.getpid()}.bin"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    written = since = 0
    fsync_s = 0.0
    try:
        t0 = time.perf_counter()
        while written < total:
            view = mv[: min(piece, total - written)]
            while len(view):
                n = os.write(fd, view)
                written, since, view = written + n, since + n, view[n:]
            if fsync_every and since >= fsync_every and written < total:
                a = time.perf_counter()
                os.fsync(fd)
                fsync_s += time.perf_counter() - a
                since = 0
        t1 = time.perf_counter()
        os.fsync(fd)
        t2 = time.perf_counter()
        fsync_s += t2 - t1
    finally:
        os.close(fd)
        path.unlink(missing_ok=True)
    return {"bytes": written, "seconds": t2 - t0, "fsync_s": fsync_s, "fsync_every": fsync_every,
            "gb_per_s": written / (t2 - t0) / GB}


def direct_read(paths: Iterable[str | os.PathLike], piece: int = 8 * MiB) -> dict[str, Any]:
    """Sequential ``O_DIRECT`` read of the files (the page cache bypassed: a cold read)
    into one buffer backed by huge pages, ``piece`` bytes at a time. Raises ``OSError``
    where the filesystem refuses direct I/O (tmpfs, some network filesystems).

    Huge pages matter: a direct read becomes requests of physically contiguous
    segments, at most ``max_segments`` of them (254 for this project's virtio disk),
    so 4 KiB pages cap a request near 1 MiB where 2 MiB pages allow the disk's
    ``max_sectors_kb`` (4 MiB). Whole-file reads here ran at 2.0 GB/s against
    0.86 GB/s with a 4 KiB-page buffer (3 interleaved rounds, 32 files of 128 MiB).
    """
    buf = aligned_buffer(piece)
    mv = memoryview(buf)
    # Fault the buffer in before the clock starts: a reader reuses its buffers, and
    # the first touch of fresh memory is slow on a VM (1.2 GiB took 4.5 s here).
    buf[:: mmap.PAGESIZE] = 0
    total = 0
    t0 = time.perf_counter()
    try:
        for p in paths:
            fd = os.open(p, os.O_RDONLY | getattr(os, "O_DIRECT", 0))
            try:
                while True:
                    n = os.readv(fd, [mv])
                    total += n
                    if n < piece:
                        break
            finally:
                os.close(fd)
    finally:
        mv.release()
    dt = time.perf_counter() - t0
    return {"bytes": total, "seconds": dt, "gb_per_s": total / dt / GB if dt else None}


def buffered_read(paths: Iterable[str | os.PathLike], piece: int = 8 * MiB) -> dict[str, Any]:
    """Sequential buffered read of the files ``piece`` bytes at a time (from the page cache
    when they are cached; afterwards they are, if they fit)."""
    buf = np.empty(piece, np.uint8)
    mv = memoryview(buf)
    total = 0
    t0 = time.perf_counter()
    for p in paths:
        with open(p, "rb", buffering=0) as f:
            while n := f.readinto(mv):
                total += n
    dt = time.perf_counter() - t0
    return {"bytes": total, "seconds": dt, "gb_per_s": total / dt / GB if dt else None}


def evict(paths: Iterable[str | os.PathLike]) -> None:
    """Drop the files' pages from the page cache: ``fdatasync`` (dirty pages are not
    dropped), then ``posix_fadvise(POSIX_FADV_DONTNEED)``."""
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            with contextlib.suppress(OSError):
                os.fdatasync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


# -- readers ------------------------------------------------------------------------------


def consume(batches: Iterable, max_batches: int | None = None, max_seconds: float | None = None) -> dict[str, Any]:
    """Iterate ``(X, y)`` batches, reading one element of each; time the first batch and the whole.

    Stops after ``max_batches``, or ``max_seconds`` after the first batch (then ``partial``
    is true); ``steady_rows_per_s`` counts the rows after the first batch.
    """
    t0 = time.perf_counter()
    it = iter(batches)
    first = None
    rows = nb = first_rows = 0
    acc = 0.0
    partial = False
    for X, _ in it:
        if first is None:
            first, first_rows = time.perf_counter() - t0, X.shape[0]
        rows += X.shape[0]
        nb += 1
        acc += float(X[0, 0])
        if (max_batches is not None and nb >= max_batches) or (max_seconds is not None and time.perf_counter() - t0 - first >= max_seconds):
            partial = True
            break
    dt = time.perf_counter() - t0
    del it
    steady = (rows - first_rows) / (dt - first) if first is not None and dt > first and rows > first_rows else None
    return {"seconds": dt, "rows": rows, "batches": nb, "first_batch_s": first, "rows_per_s": rows / dt if dt else None,
            "steady_rows_per_s": steady, "checksum": acc, "partial": partial}


def shardset_read(path: str | os.PathLike, batch_size: int, *, num_workers: int = 0, max_batches: int | None = None,
                  max_seconds: float | None = None, **dataset_kw: Any) -> dict[str, Any]:
    """One epoch (or ``max_batches`` / ``max_seconds`` of it) of
    ``DataLoader(ShardedDataset(path, batch_size, **dataset_kw), batch_size=None, num_workers=...)``;
    ``construct_s`` is the dataset's construction time, not included in ``seconds``."""
    from .dataset import ShardedDataset

    t0 = time.perf_counter()
    ds = ShardedDataset(path, batch_size, **dataset_kw)
    construct = time.perf_counter() - t0
    loader = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=num_workers)
    return {**consume(loader, max_batches, max_seconds), "construct_s": construct}


class MemmapRows(torch.utils.data.Dataset):
    """The naive map-style dataset: row ``i`` of ``X`` and ``y`` through ``numpy.memmap``
    views of the store's chunk files (one file per block and field, rows at their
    natural offsets), read one row per ``__getitem__`` as a plain memmap loader does."""

    def __init__(self, path: str | os.PathLike) -> None:
        from .store import BlockStore

        store = BlockStore.open(path)
        lay = self.layout = store.layout
        self.maps = {f: [np.memmap(store.chunk_path(f, b), dtype=lay.fields[f].dtype, mode="r",
                                   shape=(lay.block_len(b), *lay.fields[f].shape)) for b in range(lay.num_blocks)]
                     for f in ("X", "y")}

    def __len__(self) -> int:
        return self.layout.rows

    def __getitem__(self, i: int):
        b, r = divmod(int(i), self.layout.block_rows)
        return torch.from_numpy(np.array(self.maps["X"][b][r])), torch.from_numpy(np.array(self.maps["y"][b][r]))


def naive_read(path: str | os.PathLike, batch_size: int, seconds: float, seed: int = 0) -> dict[str, Any]:
    """``DataLoader(MemmapRows(path), batch_size, shuffle=True)`` for ``seconds``: random row
    reads. The epoch time is extrapolated as first batch + rows / steady rate (``extrapolated``)."""
    ds = MemmapRows(path)
    loader = torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=True, generator=torch.Generator().manual_seed(seed))
    res = consume(loader, max_seconds=seconds)
    rate = res["steady_rows_per_s"] or res["rows_per_s"]
    epoch = res["first_batch_s"] + len(ds) / rate
    return {**res, "epoch_s_extrapolated": epoch, "epoch_rows_per_s_extrapolated": len(ds) / epoch, "extrapolated": True,
            "fraction_of_epoch_read": res["rows"] / len(ds)}


# -- the user-facing benchmark ------------------------------------------------------------------


def _median(values: list[float | None]) -> dict[str, Any] | None:
    vals = [v for v in values if v is not None]
    if not vals:
        return None
    return {"median": statistics.median(vals), "min": min(vals), "max": max(vals), "runs": vals}


def run(path: str | os.PathLike = ".", size: int = 4 * 10**9, *, quick: bool = False, repeats: int | None = None,
        features: int = 16, batch_size: int = 1024, workers: int | None = None, naive_seconds: float | None = None,
        png: str | os.PathLike | None = "shardset-bench.png", log: Callable[[str], None] | None = print,
        block_rows: int | None = None, json_path: str | os.PathLike | None = None) -> dict[str, Any]:
    """Benchmark the storage at ``path`` (a directory) with a synthetic store of about
    ``size`` bytes, written in a scratch directory there that is removed at the end.

    ``quick`` caps the size at 512 MB, uses 64 MB blocks, one run per figure and 2 s of
    naive reading (well under a minute); otherwise every figure is the median of
    ``repeats`` (3) runs. Returns the figures (GB/s, rows/s and the ratio to the raw disk
    figure of the same run); prints the table and saves the PNG unless ``log`` /
    ``png`` is ``None``, and saves the result as JSON to ``json_path`` if given (the
    directories of both are checked before the benchmark starts).
    """
    batch_size, features = check_int("batch_size", batch_size), check_int("features", features)
    repeats = check_int("repeats", repeats if repeats is not None else (1 if quick else 3))
    size = min(size, 512 * 10**6) if quick else size
    naive_seconds = naive_seconds if naive_seconds is not None else (2.0 if quick else 8.0)
    say = log or (lambda s: None)
    from .synthetic import generate_regression

    parent = Path(path)
    if not parent.is_dir():
        raise ValueError(f"{path} is not a directory")
    for out in (png, json_path):
        if out is not None:
            _check_output(out)
    row_bytes = 4 * (features + 1)
    rows = max(1, size // row_bytes)
    if shutil.disk_usage(parent).free < 1.1 * rows * row_bytes + 64 * MiB:
        raise ValueError(f"{path} has {shutil.disk_usage(parent).free / GB:.1f} GB free; the benchmark needs about {1.1 * size / GB:.1f} GB")
    runs: dict[str, list[dict[str, Any]]] = {}

    def record(name: str, res: dict[str, Any], nbytes: int, nrows: int | None = None) -> None:
        runs.setdefault(name, []).append({**res, "nbytes": nbytes, "nrows": nrows})

    scratch = Path(tempfile.mkdtemp(prefix="shardset-bench-", dir=parent))
    try:
        store_path = scratch / "bench.zarr"
        block_mb = 64 if quick else 128
        for r in range(repeats):
            tag = f"[{r + 1}/{repeats}]"
            if r == 0:
                say(f"{tag} writing {rows:,} rows x {features} features ({rows * row_bytes / GB:.2f} GB) in {scratch} ...")
            shutil.rmtree(store_path, ignore_errors=True)
            t0 = time.perf_counter()
            store = generate_regression(store_path, rows, features, block_mb=block_mb, block_rows=block_rows, workers=workers,
                                        seed=r, overwrite=True, progress=False)
            dt = time.perf_counter() - t0
            stored = store.nbytes_stored()
            record("write: generate_regression", {"seconds": dt, "gb_per_s": stored / dt / GB}, stored, rows)
            files = [store.chunk_path(f, b) for f in store.layout.fields for b in range(store.layout.num_blocks)]
            record("disk: sequential write + fsync", fsync_write(scratch, stored, fsync_every=store.layout.block_rows * row_bytes), stored)
            evict(files)
            try:
                record("disk: O_DIRECT read (cold)", direct_read(files), stored)
            except OSError as exc:
                say(f"{tag} O_DIRECT read not possible here ({exc.strerror}); cold ratios use a buffered read of evicted files")
                evict(files)
                record("disk: O_DIRECT read (cold)", buffered_read(files), stored)
            buffered_read(files)
            record("disk: page-cache read (warm)", buffered_read(files), stored)
            for mode in ("cold", "warm"):
                if mode == "warm":  # the cold runs leave the files evicted, or partly read back by the naive loader
                    buffered_read(files)
                for name, shuffle in (("sequential read", False), ("block-shuffled read", True)):
                    if mode == "cold":
                        evict(files)
                    res = shardset_read(store_path, batch_size, shuffle=shuffle, seed=r)
                    record(f"{name}, {mode}", res, res["rows"] * row_bytes, res["rows"])
                if mode == "cold":
                    evict(files)
                res = naive_read(store_path, batch_size, naive_seconds, seed=r)
                record(f"naive random read, {mode}", {**res, "seconds": res["epoch_s_extrapolated"]}, rows * row_bytes, rows)
            say(f"{tag} " + ", ".join(f"{k} {v[-1]['nbytes'] / v[-1]['seconds'] / GB:.3f}" for k, v in runs.items()) + " GB/s")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    result = _summarize(runs, path, rows, features, batch_size, repeats, naive_seconds)
    if log is not None:
        log(format_table(result))
    if json_path is not None:
        Path(json_path).write_text(json.dumps(result, indent=2))
    if png is not None:
        plot(result, png)
        say(f"plot: {png}")
    return result


def _check_output(path: str | os.PathLike) -> None:
    directory = Path(path).parent
    if not directory.is_dir():
        raise ValueError(f"cannot save {path}: no directory {directory}")
    if not os.access(directory, os.W_OK):
        raise ValueError(f"cannot save {path}: directory {directory} is not writable")


_RAW = {"write: generate_regression": "disk: sequential write + fsync"}
for _m in ("cold", "warm"):
    for _n in ("sequential read", "block-shuffled read", "naive random read"):
        _RAW[f"{_n}, {_m}"] = "disk: O_DIRECT read (cold)" if _m == "cold" else "disk: page-cache read (warm)"


def _summarize(runs, path, rows, features, batch_size, repeats, naive_seconds) -> dict[str, Any]:
    figures: dict[str, Any] = {}
    for name, rs in runs.items():
        gbs = [x["nbytes"] / x["seconds"] / GB for x in rs]
        fig = {"gb_per_s": _median(gbs), "rows": rs[0]["nrows"],
               "rows_per_s": _median([x["nrows"] / x["seconds"] for x in rs]) if rs[0]["nrows"] else None}
        raw = _RAW.get(name)
        if raw:
            fig["vs"] = raw
            fig["ratio"] = _median([g / (y["nbytes"] / y["seconds"] / GB) for g, y in zip(gbs, runs[raw])])
        if "first_batch_s" in rs[0]:
            fig["first_batch_s"] = _median([x["first_batch_s"] for x in rs])
        if rs[0].get("extrapolated"):
            fig["note"] = f"rate over {naive_seconds:g} s of reading, epoch time extrapolated"
        figures[name] = fig
    speedup = {m: _median([b["seconds"] / a["seconds"] for a, b in
                           zip(runs[f"block-shuffled read, {m}"], runs[f"naive random read, {m}"])]) for m in ("cold", "warm")}
    return {"path": str(path), "rows": rows, "features": features, "batch_size": batch_size, "repeats": repeats,
            "figures": figures, "shuffled_over_naive": speedup,
            "torch": torch.__version__, "numpy": np.__version__, "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def format_table(result: dict[str, Any]) -> str:
    """The table ``shardset bench`` prints."""
    def cell(s, scale=1.0, digits=3):  # significant digits: the naive reader is 1000x slower than the rest
        if not s:
            return "-"
        text = f"{s['median'] * scale:.{digits}g}"
        return text if len(s["runs"]) == 1 else f"{text} [{s['min'] * scale:.{digits}g}-{s['max'] * scale:.{digits}g}]"

    head = ["figure", "GB/s", "M rows/s", "vs raw disk", "raw disk figure"]
    rows = [[name, cell(f["gb_per_s"]), cell(f["rows_per_s"], 1e-6), cell(f.get("ratio"), digits=2), f.get("vs", "")]
            for name, f in result["figures"].items()]
    widths = [max(len(str(r[i])) for r in [head, *rows]) for i in range(len(head))]
    line = lambda r: "  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip()  # noqa: E731
    sp = result["shuffled_over_naive"]
    n = len(next(iter(result["figures"].values()))["gb_per_s"]["runs"])
    out = [f"{result['rows']:,} rows x {result['features']} features, batch {result['batch_size']}, on {result['path']}; "
           f"{'median [min-max] of ' + str(n) + ' runs' if n > 1 else 'one run per figure'}",
           line(head), line(["-" * w for w in widths]), *map(line, rows),
           f"block-shuffled / naive random read: {cell(sp['cold'])}x cold, {cell(sp['warm'])}x warm "
           "(naive epoch extrapolated from its rate)"]
    return "\n".join(out)


def plot(result: dict[str, Any], png: str | os.PathLike) -> None:
    """A bar chart of the figures (GB/s, log scale), raw disk figures in grey."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(result["figures"])
    med = [result["figures"][n]["gb_per_s"] for n in names]
    fig, ax = plt.subplots(figsize=(9, 0.45 * len(names) + 1.5))
    ax.barh(names, [m["median"] for m in med],
            xerr=[[m["median"] - m["min"] for m in med], [m["max"] - m["median"] for m in med]], capsize=3,
            color=["#999" if n.startswith("disk") else ("#d62728" if n.startswith("naive") else "#1f77b4") for n in names])
    for i, n in enumerate(names):
        r = result["figures"][n].get("ratio")
        if r:
            ax.annotate(f" {r['median']:.2g}x raw", (med[i]["median"], i), va="center", fontsize=8)
    ax.set_xscale("log")
    ax.invert_yaxis()
    ax.set_xlabel("GB/s (log scale; bars: median, whiskers: min-max)")
    ax.set_title(f"shardset bench: {result['rows']:,} rows x {result['features']}, batch {result['batch_size']}, {result['path']}",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)
