"""The ``shardset`` command line: generate, info, read, train, bench, shuffle, quality, verify.

Errors about input or stores print one line to stderr and exit with status 2;
``verify`` exits with status 1 when it finds a fault it did not repair.

Example:
    >>> import tempfile, os
    >>> path = os.path.join(tempfile.mkdtemp(), "s.zarr")
    >>> main(["generate", path, "--rows", "1000", "--features", "4", "--block-rows", "300", "--quiet"])
    0
"""

from __future__ import annotations

import argparse
import functools
import json
import re
import sys
import time
import warnings
from typing import Sequence

import numpy as np

from .errors import ShardsetError, StoreFormatError
from .format import DEFAULT_BLOCK_MB, check_int
from .sparse import is_sparse
from .store import COMPRESSIONS, BlockStore

__all__ = ["main"]


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, no usage dump
        self.exit(2, f"{self.prog}: error: {message}\n")


def _int_at_least(minimum: int):
    def parse(text: str) -> int:
        try:
            return check_int("value", int(text), minimum)
        except ValueError:
            kind = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
            raise argparse.ArgumentTypeError(f"expected {kind}, got {text!r}") from None

    return parse


_positive_int, _nonneg_int = _int_at_least(1), _int_at_least(0)


def _finite_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not np.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text}")
    return value


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="shardset", description="Out-of-core sharded datasets for PyTorch.")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    g = sub.add_parser("generate", help="write a synthetic regression dataset (X ~ N(0, I), y = Xw + b + noise)")
    g.add_argument("path")
    g.add_argument("--rows", type=_positive_int, required=True)
    g.add_argument("--features", type=_positive_int, required=True)
    g.add_argument("--nnz", type=_positive_int, default=None,
                   help="a sparse set: NNZ distinct feature indices per row, with values (y = sum values * w[indices] + b)")
    g.add_argument("--zipf", type=_finite_float, default=None, metavar="S",
                   help="with --nnz: index k drawn with probability proportional to (k + 1)^-S (default: uniform)")
    g.add_argument("--block-mb", type=_finite_float, default=DEFAULT_BLOCK_MB, help="block size in MiB (64-256)")
    g.add_argument("--block-rows", type=_positive_int, default=None, help="rows per block (overrides --block-mb)")
    g.add_argument("--seed", type=_nonneg_int, default=0)
    g.add_argument("--noise", type=_finite_float, default=0.01)
    g.add_argument("--bias", type=_finite_float, default=4.2)
    g.add_argument("--workers", type=_positive_int, default=None, help="processes (default: all cores)")
    g.add_argument("--compression", choices=COMPRESSIONS, default=None)
    g.add_argument("--no-checksum", action="store_true", help="store chunks without a crc32c checksum")
    g.add_argument("--overwrite", action="store_true", help="replace an existing store")
    g.add_argument("--quiet", action="store_true", help="no progress bar and no summary line")
    g.add_argument("--part", type=_part, default=None, metavar="I/K",
                   help="write only the blocks b with b %% K == I (0 <= I < K); run K such writers to split the work")
    g.add_argument("--dask", metavar="ADDRESS", default=None,
                   help="run one task per block on this dask.distributed scheduler (e.g. tcp://host:8786)")

    i = sub.add_parser("info", help="describe a store")
    i.add_argument("path")
    i.add_argument("--json", action="store_true")
    for parser in (g, i):
        _add_storage_option(parser)

    for name, text in (("read", "stream epochs and report throughput"), ("train", "fit linear regression by SGD")):
        r = sub.add_parser(name, help=text)
        r.add_argument("path")
        r.add_argument("--epochs", type=_positive_int, default=1 if name == "read" else 3)
        r.add_argument("--batch-size", type=_positive_int, default=1024)
        r.add_argument("--workers", type=_nonneg_int, default=0, help="DataLoader worker processes")
        r.add_argument("--prefetch", type=_nonneg_int, default=1, help="blocks read ahead")
        r.add_argument("--seed", type=_nonneg_int, default=0)
        if name == "read":
            r.add_argument("--no-shuffle", action="store_true")
            _add_window_options(r)
        else:
            r.add_argument("--lr", type=_finite_float, default=None,
                           help="learning rate (default: 0.03 for SGD on X/y stores, 1.0 for Adagrad / 0.1 for SparseAdam on sparse ones)")
            r.add_argument("--optimizer", choices=("adagrad", "adam"), default="adagrad", help="sparse stores: Adagrad or SparseAdam")
            r.add_argument("--min-count", type=_nonneg_int, default=20,
                           help="sparse stores: report the error of the features seen at least this often")
        _add_storage_option(r)

    b = sub.add_parser("bench", help="measure write and read throughput of a storage location against its raw disk figures")
    b.add_argument("path", nargs="?", default=".", help="directory on the storage to test (default: the current one)")
    b.add_argument("--size", type=_size, default="4GB", help="data written and read, e.g. 4GB, 512MiB (default 4GB)")
    b.add_argument("--quick", action="store_true", help="at most 512 MB, one run per figure: under a minute")
    b.add_argument("--repeats", type=_positive_int, default=None, help="runs per figure (default 3; 1 with --quick)")
    b.add_argument("--batch-size", type=_positive_int, default=1024)
    b.add_argument("--features", type=_positive_int, default=16)
    b.add_argument("--png", default="shardset-bench.png", help="where to save the plot (default ./shardset-bench.png)")
    b.add_argument("--json", default=None, help="also save the figures as JSON here")

    s = sub.add_parser("shuffle", help="write a copy of a store with its rows shuffled across all blocks")
    s.add_argument("src")
    s.add_argument("dst")
    s.add_argument("--seed", type=_nonneg_int, default=0)
    s.add_argument("--block-mb", type=_finite_float, default=None, help="block size in MiB (default: as SRC)")
    s.add_argument("--block-rows", type=_positive_int, default=None, help="rows per block (overrides --block-mb)")
    s.add_argument("--method", choices=("rows", "segments"), default="rows",
                   help="rows: every row to its own pseudorandom place, in two passes (default); segments: one pass "
                        "(half the disk traffic), every block one segment of each stratum of SRC, rows mixed")
    s.add_argument("--segments", type=_positive_int, default=None,
                   help="--method segments: segments per block (default: about 2 MiB each, at least 64)")
    s.add_argument("--workers", type=_positive_int, default=None, help="processes (default: all cores)")
    s.add_argument("--tmp-dir", default=None, help="--method rows: where the buckets go (default: beside DST; needs "
                                                   "the data's size)")
    s.add_argument("--compression", choices=COMPRESSIONS, default=None)
    s.add_argument("--no-checksum", action="store_true", help="store chunks without a crc32c checksum")
    s.add_argument("--overwrite", action="store_true", help="replace an existing DST")
    s.add_argument("--quiet", action="store_true", help="no progress bar and no summary line")
    _add_storage_option(s)

    q = sub.add_parser("quality", help="measure how well one epoch of the reader is shuffled")
    q.add_argument("path")
    _add_window_options(q)
    q.add_argument("--batch-size", type=_positive_int, default=256)
    q.add_argument("--label", default=None, help="class field (default: label, else y); floats: --bins quantile classes")
    q.add_argument("--bins", type=_positive_int, default=10)
    q.add_argument("--id-field", default=None, help="field numbering the rows in their original order (displacement metrics)")
    q.add_argument("--seed", type=_nonneg_int, default=0)
    q.add_argument("--epoch", type=_nonneg_int, default=0)
    q.add_argument("--no-shuffle", action="store_true")
    q.add_argument("--json", action="store_true")
    _add_storage_option(q)

    v = sub.add_parser("verify", help="check every block (presence, size, checksum); exit 1 on any fault")
    v.add_argument("path")
    v.add_argument("--deep", action="store_true", help="synthetic stores: regenerate every block and compare bytes")
    v.add_argument("--repair", action="store_true", help="synthetic stores: rewrite bad or missing blocks")
    v.add_argument("--workers", type=_positive_int, default=None, help="processes (default: all cores)")
    v.add_argument("--quiet", action="store_true", help="no progress bar")
    v.add_argument("--json", action="store_true", help="print the report as JSON")
    _add_storage_option(v)
    return p


def _part(text: str) -> tuple[int, int]:
    from .lock import check_part

    try:
        i, k = text.split("/")
        return check_part((int(i), int(k)))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected I/K with 0 <= I < K, got {text!r}") from None


def _add_storage_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--storage-option", action="append", default=[], metavar="KEY=VALUE",
                        help="object-store option such as endpoint=URL, region=NAME (repeatable; PATH may be s3://...)")


def _add_window_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--window-blocks", type=_positive_int, default=1, help="blocks mixed together by the reader")
    parser.add_argument("--slice-mb", type=_finite_float, default=None,
                        help="read slices of about this many MiB as the mixed units (sub-block mixing)")


def _storage_options(args) -> dict:
    from .urls import parse_storage_options

    return parse_storage_options(args.storage_option)


def _size(text: str) -> int:
    from .bench import parse_size

    try:
        return parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        with warnings.catch_warnings():
            # said once in docs/format.md, not on every command run on an lz4 store
            warnings.filterwarnings("ignore", "Numcodecs codecs are not in the Zarr version 3 specification",
                                    UserWarning)
            return {"generate": _generate, "info": _info, "read": _read, "train": _train, "bench": _bench,
                    "shuffle": _shuffle, "quality": _quality, "verify": _verify}[args.command](args)
    except (ShardsetError, ValueError, OSError) as exc:
        print(f"shardset: error: {_one_line(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("shardset: interrupted", file=sys.stderr)
        return 130


# torch re-raises the error of a DataLoader worker with the worker's whole traceback as its message
_WORKER_ERROR = re.compile(r"Caught (\w+) in DataLoader worker process \d+\.\nOriginal Traceback")


def _one_line(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return f"{exc.strerror}: {exc.filename}" if exc.filename else exc.strerror
    text = str(exc)
    worker = _WORKER_ERROR.match(text)
    last = worker and re.match(rf"(?s).*^(?:[\w.]+\.)?{worker[1]}:?(.*)", text, re.M)
    if last:  # keep the message of the traceback's last line, "module.Class: message"
        text = last[1]
    return " ".join(text.split()) or type(exc).__name__


def _generate(args) -> int:
    from .sparse import generate_sparse_regression
    from .synthetic import generate_regression

    if args.zipf is not None and args.nnz is None:
        raise ValueError("--zipf needs --nnz (it skews the indices of a sparse set)")
    if args.nnz is None:
        generate = generate_regression
    else:
        generate = functools.partial(generate_sparse_regression, nnz=args.nnz, zipf=args.zipf)
    opts = _storage_options(args)
    before = _complete_blocks(args.path, opts, args.overwrite)
    start = time.perf_counter()
    kw = dict(
        bias=args.bias, noise=args.noise, seed=args.seed, block_mb=args.block_mb, block_rows=args.block_rows,
        workers=args.workers, compression=args.compression, checksum=not args.no_checksum, overwrite=args.overwrite,
        progress=False if args.quiet else None, part=args.part, storage_options=opts,
    )
    if args.dask is None:
        store = generate(args.path, args.rows, args.features, **kw)
    else:
        from distributed import Client

        with Client(args.dask) as client:
            store = generate(args.path, args.rows, args.features, scheduler="dask", client=client, **kw)
    if not args.quiet:
        written = _written(store, before, time.perf_counter() - start, args.part)
        sparse = "" if args.nnz is None else f" ({args.nnz} per row)"
        print(f"{args.path}: {store.layout.rows:,} rows x {args.features} features{sparse} in "
              f"{store.layout.num_blocks} blocks, {written}")
    return 0


def _complete_blocks(path: str, storage_options: dict, overwrite: bool) -> set[int]:
    """The blocks of the store at ``path`` that a write there will not redo."""
    if overwrite:
        return set()
    try:
        return BlockStore.open(path, storage_options=storage_options).complete_blocks()
    except StoreFormatError:  # no store yet, or none the write could resume
        return set()


def _written(store: BlockStore, before: set[int], secs: float, part: tuple[int, int] | None = None) -> str:
    """The summary of what a run wrote: the blocks of ``store`` (of its ``part``) complete now and not ``before``."""
    lay = store.layout
    new = [b for b in store.complete_blocks() - before if part is None or b % part[1] == part[0]]
    if not new:
        return "already complete" if part is None else f"part {part[0]}/{part[1]} already complete"
    nbytes = sum(lay.block_len(b) for b in new) * lay.row_bytes
    return f"{len(new)} written: {nbytes / 2**30:.2f} GiB in {secs:.1f} s ({nbytes / 2**20 / secs:.0f} MiB/s)"


def describe(store: BlockStore) -> dict:
    """Everything ``shardset info`` reports, as a JSON-ready dict."""
    lay = store.layout
    missing = store.missing_blocks()
    return {
        "path": store.where,
        "rows": lay.rows,
        "fields": {k: {"dtype": v.dtype, "shape": list(v.shape)} for k, v in lay.fields.items()},
        "blocks": lay.num_blocks,
        "block_rows": lay.block_rows,
        "block_bytes": lay.block_rows * lay.row_bytes,
        "data_bytes": lay.nbytes,
        "stored_bytes": store.nbytes_stored(),
        "codecs": {k: store.codec_names(k) for k in lay.fields},
        "complete": not missing,
        "missing_blocks": missing,
        "generator": lay.generator,
        "shardset_store": not store.foreign,
    }


def _info(args) -> int:
    d = describe(BlockStore.open(args.path, storage_options=_storage_options(args)))
    if args.json:
        print(json.dumps(d, indent=2))
        return 0
    fields = ", ".join(f"{k} {v['dtype']}{tuple([d['rows'], *v['shape']])}" for k, v in d["fields"].items())
    codecs = sorted({"+".join(c) for c in d["codecs"].values()})
    status = "complete" if d["complete"] else f"INCOMPLETE: {len(d['missing_blocks'])} of {d['blocks']} blocks missing"
    print(f"path:     {d['path']}")
    print(f"rows:     {d['rows']:,}")
    print(f"fields:   {fields}")
    print(f"blocks:   {d['blocks']} of {d['block_rows']:,} rows ({d['block_bytes'] / 2**20:.1f} MiB)")
    print(f"size:     {d['data_bytes'] / 2**20:.1f} MiB of data, {d['stored_bytes'] / 2**20:.1f} MiB stored")
    print(f"codecs:   {', '.join(codecs)}")
    print(f"status:   {status}")
    gen = d["generator"]
    if gen:
        print(f"generator: {gen.get('name')} seed={gen.get('seed')} bias={gen.get('bias')} noise={gen.get('noise')}")
    return 0


def _read(args) -> int:
    import torch

    from .dataset import ShardedDataset

    from .urls import worker_start_method

    opts = _storage_options(args)
    ds = ShardedDataset(args.path, args.batch_size, shuffle=not args.no_shuffle, seed=args.seed, prefetch=args.prefetch,
                        window_blocks=args.window_blocks, slice_mb=args.slice_mb, storage_options=opts)
    loader = torch.utils.data.DataLoader(
        ds, batch_size=None, num_workers=args.workers, persistent_workers=args.workers > 0,
        multiprocessing_context=worker_start_method(args.path) if args.workers else None,
    )
    row_bytes = ds.row_bytes
    for epoch in range(args.epochs):
        start, rows = time.perf_counter(), 0
        for batch in loader:
            rows += len(next(iter(batch.values())) if isinstance(batch, dict) else batch[0])
        secs = time.perf_counter() - start
        print(f"epoch {epoch}: {rows:,} rows in {secs:.2f} s, {rows / secs:,.0f} rows/s, "
              f"{rows * row_bytes / 2**20 / secs:,.0f} MiB/s")
    return 0


def _train(args) -> int:
    from .train import fit_linear_regression

    def log(s) -> None:
        print(f"epoch {s.epoch}: loss {s.loss:.6f}, {s.rows:,} rows in {s.seconds:.2f} s, "
              f"{s.rows_per_s:,.0f} rows/s ({s.mib_per_s:,.0f} MiB/s)", flush=True)

    opts = _storage_options(args)
    lr = {} if args.lr is None else {"lr": args.lr}
    if is_sparse(BlockStore.open(args.path, storage_options=opts).layout):
        return _train_sparse(args, lr, log, opts)
    fit = fit_linear_regression(
        args.path, epochs=args.epochs, batch_size=args.batch_size, **lr, workers=args.workers,
        seed=args.seed, prefetch=args.prefetch, log=log, storage_options=opts,
    )
    np.set_printoptions(precision=4, suppress=True, linewidth=100)
    print(f"recovered w: {fit.w}")
    print(f"recovered b: {fit.b:.4f}")
    if fit.w_true is not None:
        print(f"true w:      {fit.w_true}")
        print(f"true b:      {fit.b_true:.4f}")
        print(f"max |w - w_true| = {fit.w_error:.2e}, |b - b_true| = {fit.b_error:.2e}")
    return 0


def _train_sparse(args, lr: dict, log, storage_options: dict) -> int:
    from .train import fit_sparse_regression

    fit = fit_sparse_regression(
        args.path, epochs=args.epochs, batch_size=args.batch_size, **lr, optimizer=args.optimizer,
        min_count=args.min_count, workers=args.workers, seed=args.seed, prefetch=args.prefetch, log=log,
        storage_options=storage_options,
    )
    seen = int(fit.learnable.sum())
    print(f"features seen >= {fit.min_count} times in an epoch: {seen:,} of {len(fit.w):,}")
    print(f"recovered b: {fit.b:.4f}")
    if fit.w_true is not None:
        print(f"true b:      {fit.b_true:.4f}")
        if seen:
            print(f"on those features: RMS |w - w_true| = {fit.w_rms:.2e}, max {fit.w_error:.2e}; "
                  f"|b - b_true| = {fit.b_error:.2e}")
    return 0


def _bench(args) -> int:
    from .bench import run

    png = args.png
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print("shardset: no plot: matplotlib is not installed", file=sys.stderr)
        png = None
    run(args.path, args.size, quick=args.quick, repeats=args.repeats, batch_size=args.batch_size,
        features=args.features, png=png, json_path=args.json, log=lambda s: print(s, flush=True))
    return 0


def _shuffle(args) -> int:
    from .shuffle import shuffle_store

    opts = _storage_options(args)
    before = _complete_blocks(args.dst, opts, args.overwrite)
    start = time.perf_counter()
    store = shuffle_store(
        args.src, args.dst, seed=args.seed, block_mb=args.block_mb, block_rows=args.block_rows, workers=args.workers,
        compression=args.compression, checksum=not args.no_checksum, overwrite=args.overwrite,
        progress=False if args.quiet else None, tmp_dir=args.tmp_dir, storage_options=opts,
        method=args.method, segments=args.segments,
    )
    if not args.quiet:
        written = _written(store, before, time.perf_counter() - start)
        print(f"{args.dst}: {store.layout.rows:,} rows shuffled into {store.layout.num_blocks} blocks, {written}")
    return 0


def _quality(args) -> int:
    from .quality import store_quality

    r = store_quality(
        args.path, args.batch_size, label=args.label, id_field=args.id_field, window_blocks=args.window_blocks,
        slice_mb=args.slice_mb, seed=args.seed, epoch=args.epoch, bins=args.bins, shuffle=not args.no_shuffle,
        storage_options=_storage_options(args),
    )
    if args.json:
        print(json.dumps(r, indent=2))
        return 0
    got, ref = r["reader"], r["uniform"]
    print(f"{r['path']}: {r['rows']:,} rows in {r['blocks']} blocks of {r['block_rows']:,}; batch {r['batch_size']}, "
          f"window {r['window_blocks']} blocks ({r['window_units']} units of {r['unit_rows']:,} rows); label '{r['label']}' ({r['classes']} classes), epoch {r['epoch']}")
    rows = [
        ("batch label TV", "batch_tv", "{:.4f}"), ("VIF of batch label proportions", "vif", "{:.2f}"),
        ("effective batch size b/VIF", "effective_batch", "{:.1f}"), ("drift TV (1% stretches)", "drift_tv", "{:.4f}"),
        ("rank corr. storage vs delivery", "rank_correlation", "{:+.4f}"),
        ("P(storage neighbours share a batch)", "adjacent_same_batch", "{:.3g}"),
    ]
    print(f"{'metric':38} {'reader':>10} {'uniform':>10}")
    for name, key, f in rows:
        cells = ["n/a (--id-field)" if d[key] is None else f.format(d[key]) for d in (got, ref)]
        print(f"{name:38} {cells[0]:>10} {cells[1]:>10}")
    print(f"within-block label correlation rho = {r['rho']:.3f}; predicted VIF 1 + rho(b-1)/W = {r['predicted_vif']:.2f}")
    parts = got["tv_by_position"]
    print(f"batch TV along the epoch ({len(parts)} parts): " + " ".join(f"{v:.3f}" for v in parts))
    return 0


def _verify(args) -> int:
    from .verify import verify

    report = verify(args.path, deep=args.deep, repair=args.repair, workers=args.workers,
                    progress=False if args.quiet else None, storage_options=_storage_options(args))
    print(json.dumps(report.to_json(), indent=2) if args.json else report.summary())
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
