"""The ``shardset`` command line: generate, info, read, train.

Errors about input or stores print one line to stderr and exit with status 2.

Example:
    >>> import tempfile, os
    >>> path = os.path.join(tempfile.mkdtemp(), "s.zarr")
    >>> main(["generate", path, "--rows", "1000", "--features", "4", "--block-rows", "300", "--quiet"])
    0
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Sequence

import numpy as np

from .errors import ShardsetError
from .format import DEFAULT_BLOCK_MB, check_int
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
    g.add_argument("--block-mb", type=_finite_float, default=DEFAULT_BLOCK_MB, help="block size in MiB (64-256)")
    g.add_argument("--block-rows", type=_positive_int, default=None, help="rows per block (overrides --block-mb)")
    g.add_argument("--seed", type=_nonneg_int, default=0)
    g.add_argument("--noise", type=_finite_float, default=0.01)
    g.add_argument("--bias", type=_finite_float, default=4.2)
    g.add_argument("--workers", type=_positive_int, default=None, help="processes (default: all cores)")
    g.add_argument("--compression", choices=COMPRESSIONS, default=None)
    g.add_argument("--no-checksum", action="store_true", help="store chunks without a crc32c checksum")
    g.add_argument("--overwrite", action="store_true", help="replace an existing store")
    g.add_argument("--quiet", action="store_true", help="no progress bar")

    i = sub.add_parser("info", help="describe a store")
    i.add_argument("path")
    i.add_argument("--json", action="store_true")

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
        else:
            r.add_argument("--lr", type=_finite_float, default=0.03)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return {"generate": _generate, "info": _info, "read": _read, "train": _train}[args.command](args)
    except (ShardsetError, ValueError, OSError) as exc:
        print(f"shardset: error: {_one_line(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("shardset: interrupted", file=sys.stderr)
        return 130


def _one_line(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return f"{exc.strerror}: {exc.filename}" if exc.filename else exc.strerror
    return " ".join(str(exc).split()) or type(exc).__name__


def _generate(args) -> int:
    from .synthetic import generate_regression

    start = time.perf_counter()
    store = generate_regression(
        args.path, args.rows, args.features, bias=args.bias, noise=args.noise, seed=args.seed,
        block_mb=args.block_mb, block_rows=args.block_rows, workers=args.workers, compression=args.compression,
        checksum=not args.no_checksum, overwrite=args.overwrite, progress=False if args.quiet else None,
    )
    if not args.quiet:
        secs = time.perf_counter() - start
        lay = store.layout
        print(f"{args.path}: {lay.rows:,} rows x {args.features} features in {lay.num_blocks} blocks, "
              f"{lay.nbytes / 2**30:.2f} GiB in {secs:.1f} s ({lay.nbytes / 2**20 / secs:.0f} MiB/s)")
    return 0


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
    d = describe(BlockStore.open(args.path))
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

    ds = ShardedDataset(args.path, args.batch_size, shuffle=not args.no_shuffle, seed=args.seed, prefetch=args.prefetch)
    loader = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=args.workers, persistent_workers=args.workers > 0)
    row_bytes = sum(ds.layout.fields[f].row_bytes for f in ds.fields)
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
              f"{s.rows_per_s:,.0f} rows/s ({s.rows_per_s * fit_row_bytes / 2**20:,.0f} MiB/s)", flush=True)

    fit_row_bytes = BlockStore.open(args.path).layout.row_bytes
    fit = fit_linear_regression(
        args.path, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, workers=args.workers,
        seed=args.seed, prefetch=args.prefetch, log=log,
    )
    np.set_printoptions(precision=4, suppress=True, linewidth=100)
    print(f"recovered w: {fit.w}")
    print(f"recovered b: {fit.b:.4f}")
    if fit.w_true is not None:
        print(f"true w:      {fit.w_true}")
        print(f"true b:      {fit.b_true:.4f}")
        print(f"max |w - w_true| = {fit.w_error:.2e}, |b - b_true| = {fit.b_error:.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
