"""Read benchmark: ``ShardedDataset`` against plain file reads, O_DIRECT and a naive memmap loader.

Run from the repository root::

    python -m benchmarks.bench_read             # default, 4 GiB store, ~10 minutes
    python -m benchmarks.bench_read --quick     # ~2-3 minute smoke run
    python -m benchmarks.bench_read --gib 40    # a store larger than RAM (needs the disk)

One invocation writes a store (d=16, 128 MB blocks, X and y float32) in a
scratch directory, then measures, in
interleaved rounds so every comparison is made in the same run:

* warm page cache, one process: a full shuffled epoch of ``ShardedDataset``
  (batch 1024, consumed by touching one element per batch) against the baseline
  "plain ``readinto`` of the same chunk files into a reused buffer + one
  ``torch.randperm`` + ``torch.index_select`` per block into a reused buffer";
  also ``shuffle=False``, ``prefetch`` 0/1/2 and ``num_workers`` 0/1/2, and
  two workers handing out ready-made batches with nothing to read (the
  ceiling of ``num_workers > 0``);
* cold cache (chunk files evicted with ``posix_fadvise(DONTNEED)``, checked with
  ``mincore``): ``ShardedDataset`` against a sequential ``O_DIRECT`` read of the
  same files (8 MiB reads into a page-aligned buffer);
* the naive loader: ``numpy.memmap`` views of the same chunk files behind a map-style
  Dataset with ``DataLoader(shuffle=True, batch_size=1024)`` (``shardset.bench.naive_read``),
  warm and cold, for a time budget
  (its epoch time is extrapolated from the rate, as the output says);
* peak RSS of the reader (prefetch=1) in a fresh process, on this store and on a
  2-block store, against the interpreter+torch baseline;
* time to first batch; and a breakdown of where an epoch's time goes (timers
  around read, crc32c, the row-order computation, gathers and queue waits).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import time
from collections import defaultdict
from typing import Any, Callable, Iterator

import torch

from . import common
from .common import GB, GiB, MiB, fmt, fmt_ratio, print_table, ratio_summary, summarize
from shardset import bench as sbench
from shardset.bench import consume
from shardset.memory import direct_nbytes
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

MEMORY_BOUND_ARGUMENT = (
    "ShardedDataset's memory does not depend on the number of rows N: each consumer allocates 1 + prefetch "
    "block buffers once (BlockStore.new_buffer per field, reused for every block), plus per block in flight an "
    "int64 row order of block_rows entries (8 bytes per row, e.g. 16 MiB for a 128 MB block of d=16 rows) and "
    "the batch being assembled. The epoch plan is O(1): the block order and the row order inside a block are "
    "keyed permutations computed on demand per block, so no per-row or per-block table of the dataset is built. "
    "A store of any size is therefore read with the same buffers as this one; the 2-block store measured next "
    "to the full store shows the same peak. Data read through the page cache is kernel memory, reclaimable, "
    "and not part of the process RSS."
)

NOTES = [
    "GB/s counts logical bytes delivered (rows x 68 bytes for d=16: X 64 + y 4) over the wall time from "
    "iter(DataLoader) to the last batch, except the cold comparison, which divides the chunk-file bytes "
    "(incl. 4-byte crc32c trailers) by the time for both contenders.",
    "Every batch is consumed by reading one element (float(X[0, 0])), the same for every contender.",
    "Baseline (warm): blocks in a random order; per block one readinto per field into a reused buffer, one "
    "torch.randperm and one torch.index_select per field into a reused output buffer; batches are slices of "
    "it (the last batch of each block may be short). It verifies no checksum; ShardedDataset verifies crc32c.",
    "ShardedDataset uses a background reader thread (prefetch blocks ahead); the baseline is synchronous.",
    "Cold: the chunk files are evicted with posix_fadvise(POSIX_FADV_DONTNEED) before each run and the "
    "residency is checked with mincore(2) (fraction of pages cached before/after); this drops the guest's page "
    "cache only; the hypervisor may cache the virtual disk, so 'cold' is cold for this VM.",
    "Naive loader: the sampler builds torch.randperm(N).tolist() before the first batch; its rows/s is measured "
    "from the first batch for a fixed time budget, and its epoch time is extrapolated as "
    "time-to-first-batch + N / rows/s. In the cold runs the page cache fills during the window "
    "(each mmap fault reads ahead), so the cold figure is an average over a partly warming cache.",
    "num_workers > 0 includes forking the workers in the epoch time (non-persistent workers).",
    "Ratios are the median of the per-round ratios [their min-max] (ratio of the medians in parentheses); verdicts "
    "use the per-round median. Each round measures every contender back "
    "to back; the order of the contenders rotates between rounds.",
]


# -- the baseline: plain reads + one permutation per block --------------------------------------


class PlainShuffled:
    """Blocks in random order, read whole with readinto, permuted with one index_select per block."""

    def __init__(self, store, batch_size: int, seed: int = 0, timers: dict | None = None) -> None:
        import numpy as np

        self.np, self.torch = np, torch
        self.layout = store.layout
        lay = store.layout
        self.fields = ["X", "y"]
        self.paths = {f: [store.chunk_path(f, b) for b in range(lay.num_blocks)] for f in self.fields}
        self.shapes = {f: lay.fields[f].shape for f in self.fields}
        self.raw = {f: np.empty(os.path.getsize(self.paths[f][0]), dtype=np.uint8) for f in self.fields}
        self.out = {f: torch.empty((lay.block_rows, *self.shapes[f]), dtype=torch.float32) for f in self.fields}
        self.batch_size = batch_size
        self.gen = torch.Generator().manual_seed(seed)
        self.timers = timers if timers is not None else defaultdict(float)

    def __iter__(self):
        torch, np = self.torch, self.np
        lay, bs, T = self.layout, self.batch_size, self.timers
        for b in torch.randperm(lay.num_blocks, generator=self.gen).tolist():
            n = lay.block_len(b)
            t0 = time.perf_counter()
            views = {}
            for f in self.fields:
                mv = memoryview(self.raw[f])
                with open(self.paths[f][b], "rb", buffering=0) as fh:
                    got = fh.readinto(mv)
                row_floats = int(np.prod(self.shapes[f]))
                views[f] = torch.from_numpy(self.raw[f][: n * row_floats * 4].view(np.float32).reshape(n, *self.shapes[f]))
                assert got >= n * row_floats * 4
            t1 = time.perf_counter()
            perm = torch.randperm(n, generator=self.gen)
            t2 = time.perf_counter()
            outs = {f: torch.index_select(views[f], 0, perm, out=self.out[f][:n]) for f in self.fields}
            t3 = time.perf_counter()
            T["read"] += t1 - t0
            T["permutation (randperm)"] += t2 - t1
            T["gather (index_select per block)"] += t3 - t2
            X, y = outs["X"], outs["y"]
            for s in range(0, n, bs):
                yield X[s : s + bs], y[s : s + bs]


class ReadyBatches(IterableDataset):
    """Fresh ``(X, y)`` float32 tensors of a batch's shape, ``batches`` of them split over
    the DataLoader's workers, made with no reading at all: what moving batches out of
    worker processes costs by itself (a diagnostic for the ``num_workers`` rows).  X and
    y view one storage, as ShardedDataset's batches do in a worker: each storage is a
    shared-memory segment of its own on the way to the main process."""

    def __init__(self, batches: int, batch_size: int, features: int) -> None:
        self.batches, self.batch_size, self.features = batches, batch_size, features

    def __iter__(self):
        info = get_worker_info()
        share = range(self.batches) if info is None else range(info.id, self.batches, info.num_workers)
        n, d = self.batch_size, self.features
        for _ in share:
            flat = torch.empty(n * (d + 1), dtype=torch.float32)
            yield flat[: n * d].view(n, d), flat[n * d :].view(n, 1)


# -- ShardedDataset runs --------------------------------------------------------------------------


def sd_loader(path: str, batch_size: int, *, num_workers=0, **kw):
    from shardset import ShardedDataset

    t0 = time.perf_counter()
    ds = ShardedDataset(path, batch_size, **kw)
    construct = time.perf_counter() - t0
    return torch.utils.data.DataLoader(ds, batch_size=None, num_workers=num_workers), construct


def sd_epoch(path: str, batch_size: int, max_batches: int | None = None, max_seconds: float | None = None,
             dataloader: bool = True, **kw) -> dict[str, Any]:
    """``shardset.bench.shardset_read``; with ``dataloader=False`` the dataset is iterated
    directly (no DataLoader per-batch overhead: a diagnostic)."""
    if dataloader:
        return sbench.shardset_read(path, batch_size, max_batches=max_batches, max_seconds=max_seconds, **kw)
    loader, construct = sd_loader(path, batch_size, **kw)
    return {**consume(loader.dataset, max_batches, max_seconds), "construct_s": construct}


# -- instrumentation (monkeypatching in this process only; shardset/ is not modified) -------------


class Timers:
    def __init__(self) -> None:
        self.t: dict[str, float] = defaultdict(float)
        self.n: dict[str, int] = defaultdict(int)

    def add(self, key: str, dt: float) -> None:
        self.t[key] += dt
        self.n[key] += 1

    def as_dict(self) -> dict[str, dict[str, float]]:
        return {k: {"seconds": v, "calls": self.n[k]} for k, v in sorted(self.t.items())}


WAIT_KEY = "consumer: waits for the next block (next() on the block reader)"
ORDER_KEY = "reader: block_order (row order inside the block)"
READ_KEY = "reader: read_block (I/O thread; the reader leaves the crc32c to check_block)"
CHECK_KEY = "reader: check_block (crc32c, on a thread of its own)"


@contextlib.contextmanager
def instrument(timers: Timers, per_batch: bool) -> Iterator[None]:
    """Wrap the reader's per-block work (read_block, check_block, block_order), the consumer's
    waits for the next block and, with ``per_batch``, the consumer's torch.index_select /
    torch.cat, in timers.  Patches only what exists (shardset's internals may change)."""
    import shardset.dataset as dsm
    import shardset.plan as plm
    import shardset.store as stm

    undo: list[Callable[[], None]] = []

    def timed(key: str, fn: Callable) -> Callable:
        def wrapper(*a, **k):
            t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                timers.add(key, time.perf_counter() - t0)

        return wrapper

    for name, key in (("read_block", READ_KEY), ("check_block", CHECK_KEY)):
        if callable(getattr(stm.BlockStore, name, None)):
            orig = getattr(stm.BlockStore, name)
            setattr(stm.BlockStore, name, timed(key, orig))
            undo.append(lambda name=name, orig=orig: setattr(stm.BlockStore, name, orig))
    orig_order = plm.EpochPlan.block_order
    plm.EpochPlan.block_order = timed(ORDER_KEY, orig_order)
    undo.append(lambda: setattr(plm.EpochPlan, "block_order", orig_order))

    reader_cls = getattr(dsm, "_BlockReader", None)
    if reader_cls is not None and hasattr(reader_cls, "__iter__"):
        orig_iter = reader_cls.__iter__

        def timed_iter(self):
            it = orig_iter(self)
            while True:
                t0 = time.perf_counter()
                try:
                    item = next(it)
                except StopIteration:
                    timers.add(WAIT_KEY, time.perf_counter() - t0)
                    return
                timers.add(WAIT_KEY, time.perf_counter() - t0)
                yield item

        reader_cls.__iter__ = timed_iter
        undo.append(lambda: setattr(reader_cls, "__iter__", orig_iter))
    if per_batch and callable(getattr(dsm, "_gather", None)):
        orig_gather = dsm._gather
        dsm._gather = timed("consumer: gather rows (shardset.dataset._gather)", orig_gather)
        undo.append(lambda: setattr(dsm, "_gather", orig_gather))
    if per_batch:
        class TorchProxy:
            index_select = staticmethod(timed("consumer: torch.index_select (per batch, per field)", torch.index_select))
            cat = staticmethod(timed("consumer: torch.cat (batches spanning blocks)", torch.cat))

            def __getattr__(self, name):
                return getattr(torch, name)

        orig_torch = dsm.torch
        dsm.torch = TorchProxy()
        undo.append(lambda: setattr(dsm, "torch", orig_torch))
    try:
        yield
    finally:
        for fn in reversed(undo):
            fn()


def profiled_sd_epoch(path: str, batch_size: int, cprofile: bool = False) -> dict[str, Any]:
    """One warm shuffled epoch (num_workers=0, prefetch=1) with timers, optionally under cProfile."""
    timers = Timers()
    with instrument(timers, per_batch=True):
        loader, construct = sd_loader(path, batch_size)
        prof = None
        if cprofile:
            import cProfile

            prof = cProfile.Profile()
            prof.enable()
        t0 = time.perf_counter()
        it = iter(loader)
        rows = nb = 0
        acc = 0.0
        consume_t = 0.0
        next_t = 0.0
        while True:
            a = time.perf_counter()
            try:
                X, y = next(it)
            except StopIteration:
                next_t += time.perf_counter() - a
                break
            b = time.perf_counter()
            rows += X.shape[0]
            nb += 1
            acc += float(X[0, 0])
            c = time.perf_counter()
            next_t += b - a
            consume_t += c - b
        wall = time.perf_counter() - t0
        if prof is not None:
            prof.disable()
    out = {"seconds": wall, "rows": rows, "batches": nb, "next_s": next_t, "consume_s": consume_t, "timers": timers.as_dict()}
    if prof is not None:
        import io
        import pstats

        s = io.StringIO()
        pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(18)
        out["cprofile_top_tottime"] = s.getvalue()
    return out


def read_blocks_only(path: str) -> dict[str, Any]:
    """Every block of X and y through ``BlockStore.read_block`` (readinto + crc32c) into reused
    buffers, in the order of epoch 0's shuffle, with no consumer: shardset's read path alone."""
    from shardset import BlockStore
    from shardset.plan import EpochPlan

    store = BlockStore.open(path)
    lay = store.layout
    plan = EpochPlan(rows=lay.rows, block_rows=lay.block_rows, batch_size=1024, seed=0, epoch=0)
    bufs = {f: store.new_buffer(f) for f in lay.fields}
    total = 0
    t0 = time.perf_counter()
    for k in range(lay.num_blocks):
        b = plan.block_at(k)
        for f in lay.fields:
            store.read_block(f, b, bufs[f])
            total += os.path.getsize(store.chunk_path(f, b))
    dt = time.perf_counter() - t0
    return {"bytes": total, "seconds": dt, "gb_per_s": total / dt / GB}


# -- naive memmap loader --------------------------------------------------------------------------


def naive_run(path: str, batch_size: int, budget: float, seed: int) -> dict[str, Any]:
    """``shardset.bench.naive_read`` (numpy memmap of the chunk files + map-style Dataset +
    ``DataLoader(shuffle=True)``) for ``budget`` seconds, under this script's key names."""
    r = sbench.naive_read(path, batch_size, budget, seed=seed)
    return {"first_batch_s": r["first_batch_s"], "window_s": r["seconds"] - r["first_batch_s"], "rows_in_window": r["rows"],
            "rows_per_s_steady": r["steady_rows_per_s"] or r["rows_per_s"], "epoch_s_extrapolated": r["epoch_s_extrapolated"],
            "rows_per_s_epoch_extrapolated": r["epoch_rows_per_s_extrapolated"], "fraction_of_epoch_read": r["fraction_of_epoch_read"]}


# -- RSS in a fresh process ------------------------------------------------------------------------


_RSS_CODE = r"""
import json, sys, time
import numpy, torch, zarr, crc32c, psutil
import shardset
from benchmarks import common
from shardset.bench import shardset_read
cfg = json.loads(sys.argv[1])
base = psutil.Process().memory_info().rss
with common.RssSampler(interval=0.05) as s:
    r = shardset_read(cfg["path"], cfg["batch_size"], prefetch=cfg["prefetch"], num_workers=cfg["num_workers"],
                      max_batches=cfg.get("max_batches"))
print(json.dumps({"baseline_rss": base, "rss": s.result(), "epoch": r}))
"""


def rss_run(path: str, batch_size: int, prefetch: int, num_workers: int, max_batches: int | None) -> dict[str, Any]:
    cfg = {"path": path, "batch_size": batch_size, "prefetch": prefetch, "num_workers": num_workers, "max_batches": max_batches}
    out = subprocess.run([sys.executable, "-c", _RSS_CODE, json.dumps(cfg)], cwd=common.REPO_ROOT, capture_output=True,
                         text=True, timeout=3600)
    if out.returncode != 0:
        raise RuntimeError(f"RSS run failed: {out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# -- setup -----------------------------------------------------------------------------------------


# -- main --------------------------------------------------------------------------------------------


def parse_args(argv=None) -> argparse.Namespace:
    p = common.arg_parser("bench_read", __doc__)
    p.add_argument("--gib", type=float, default=None, help="store size in GiB (default 4; quick 0.25); whole 128 MB blocks")
    p.add_argument("--rows", type=int, default=None, help="store rows (overrides --gib)")
    p.add_argument("--features", type=int, default=16)
    p.add_argument("--block-mb", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=1024)
    p.add_argument("--naive-seconds", type=float, default=None, help="time budget of each naive-loader run (default 6; quick 2)")
    p.add_argument("--variant-seconds", type=float, default=None,
                   help="time budget of each variant run (all but the baseline and the shuffled ShardedDataset; default 8; quick 2)")
    p.add_argument("--warmup-blocks", type=int, default=None, help="blocks read by each contender in the discarded warm-up round (default 2; quick 1)")
    p.add_argument("--no-cold", action="store_true", help="skip the cold-cache measurements")
    p.add_argument("--no-naive", action="store_true", help="skip the naive memmap loader")
    p.add_argument("--no-profile", action="store_true", help="skip the instrumented epochs (time breakdown)")
    p.add_argument("--cprofile", action="store_true", help="also run one epoch under cProfile and store the top functions")
    return common.parse_args(p, argv, {"gib": (4.0, 0.25), "naive_seconds": (6.0, 2.0), "variant_seconds": (8.0, 2.0),
                                       "warmup_blocks": (2, 1)})


# Full epochs for the two contenders of the target; the variants run for --variant-seconds
# (a partial epoch: their steady rate, start-up included) to keep the default run ~10 minutes.
WARM_CONFIGS: list[tuple[str, dict[str, Any]]] = [
    ("baseline", {}),
    ("sd shuffle", {"shuffle": True, "prefetch": 1, "num_workers": 0}),
    ("sd shuffle=False", {"shuffle": False, "prefetch": 1, "num_workers": 0, "budget": True}),
    ("sd prefetch=0", {"shuffle": True, "prefetch": 0, "num_workers": 0, "budget": True}),
    ("sd prefetch=2", {"shuffle": True, "prefetch": 2, "num_workers": 0, "budget": True}),
    ("sd num_workers=1", {"shuffle": True, "prefetch": 1, "num_workers": 1, "budget": True}),
    ("sd num_workers=2", {"shuffle": True, "prefetch": 1, "num_workers": 2, "budget": True}),
    # diagnostics: what the shuffled epoch costs without the DataLoader, and what the
    # DataLoader's workers cost with nothing to read
    ("diag: sd shuffle, no DataLoader", {"shuffle": True, "prefetch": 1, "num_workers": 0, "dataloader": False, "budget": True}),
    ("diag: ready batches, num_workers=2 (no reads)", {"ready": True, "num_workers": 2, "budget": True}),
]


def order_costs(path: str, blocks: int = 3) -> dict[str, Any]:
    """Seconds to compute one block's row order, alone on an idle thread: shardset's
    ``EpochPlan.block_order`` against a plain ``torch.randperm`` (what the baseline uses)."""
    from shardset import BlockStore
    from shardset.plan import EpochPlan

    lay = BlockStore.open(path).layout
    plan = EpochPlan(rows=lay.rows, block_rows=lay.block_rows, batch_size=1024, seed=0, epoch=0)
    ours, randperm = [], []
    for b in range(min(blocks, lay.num_blocks)):
        n = lay.block_len(b)
        t0 = time.perf_counter()
        plan.block_order(b)
        t1 = time.perf_counter()
        torch.randperm(n, generator=torch.Generator().manual_seed(b))
        t2 = time.perf_counter()
        ours.append(t1 - t0)
        randperm.append(t2 - t1)
    return {"rows_per_block": lay.block_rows, "block_order_s": summarize(ours), "torch_randperm_s": summarize(randperm),
            "torch_num_threads": torch.get_num_threads()}


def main(argv=None) -> dict[str, Any]:
    args = parse_args(argv)
    if (res := common.replot(args, plot)) is not None:
        return res
    from shardset import BlockStore, generate_regression

    started = time.perf_counter()
    with common.scratch_run(args, "read-") as (root, desc):
        rows = args.rows if args.rows is not None else common.rows_for(args.gib, args.features, args.block_mb)
        row_bytes = 4 * (args.features + 1)
        need = rows * row_bytes * 1.05 + GiB
        free = desc["data_dir_free_gib_at_start"] * GiB
        if need > free:
            raise SystemExit(f"need about {need / GiB:.1f} GiB in {root}, only {free / GiB:.1f} GiB free")
        if rows * row_bytes > desc["ram_total_bytes"]:
            print(f"note: the store ({rows * row_bytes / GiB:.1f} GiB) is larger than RAM; 'warm' runs cannot be fully cached")

        path = str(root / "store.zarr")
        setup: dict[str, Any] = {}
        print(f"writing the store: {rows:,} rows of d={args.features} ({rows * row_bytes / GiB:.2f} GiB) ...", flush=True)
        t0 = time.perf_counter()
        generate_regression(path, rows=rows, features=args.features, block_mb=args.block_mb, workers=2, overwrite=True, progress=False)
        setup["generate_s"] = time.perf_counter() - t0
        store = BlockStore.open(path)
        lay = store.layout
        block_bytes = lay.block_rows * lay.row_bytes
        chunk_files = [store.chunk_path(f, b) for f in ("X", "y") for b in range(lay.num_blocks)]
        chunk_bytes = sum(os.path.getsize(p) for p in chunk_files)
        setup["warm_read"] = common.warm(chunk_files)
        setup["rows"], setup["num_blocks"], setup["block_rows"], setup["block_bytes"] = rows, lay.num_blocks, lay.block_rows, block_bytes
        setup["chunk_file_bytes"] = chunk_bytes
        setup["logical_bytes"] = rows * row_bytes
        print(f"store: {lay.num_blocks} blocks of {lay.block_rows:,} rows ({block_bytes / MiB:.1f} MiB); "
              f"generate {setup['generate_s']:.1f} s; page cache warm: {setup['warm_read']['fraction']:.3f} resident, "
              f"buffered warm-up read {setup['warm_read']['gb_per_s']:.2f} GB/s\n", flush=True)
        bs = args.batch_size
        logical = rows * row_bytes
        blocks_batches = max(1, args.warmup_blocks * lay.block_rows // bs)

        def run_config(name: str, cfg: dict, max_batches=None, timers=None, seed=0) -> dict[str, Any]:
            if name == "baseline":
                t = defaultdict(float) if timers is None else timers
                r = consume(PlainShuffled(store, bs, seed=seed, timers=t), max_batches)
                r["timers"] = dict(t)
                r["construct_s"] = 0.0
                return r
            cfg = dict(cfg)
            budget = args.variant_seconds if cfg.pop("budget", False) and max_batches is None else None
            if cfg.pop("ready", False):
                ready = ReadyBatches(-(-rows // bs), bs, args.features)
                return {**consume(DataLoader(ready, batch_size=None, num_workers=cfg["num_workers"]), max_batches, budget),
                        "construct_s": 0.0}
            return sd_epoch(path, bs, max_batches=max_batches, max_seconds=budget, seed=seed, **cfg)

        # ---- warm, interleaved rounds ------------------------------------------------------------
        warm_runs: dict[str, list] = {n: [] for n, _ in WARM_CONFIGS}
        warm_load: list[dict] = []
        print(f"warm-up round (discarded): {args.warmup_blocks} block(s) per contender ...", flush=True)
        for name, cfg in WARM_CONFIGS:
            run_config(name, cfg, max_batches=blocks_batches)
        for r in range(args.repeats):
            order = WARM_CONFIGS[r % len(WARM_CONFIGS):] + WARM_CONFIGS[: r % len(WARM_CONFIGS)]
            with common.CpuLoad() as load:
                for name, cfg in order:
                    res = run_config(name, cfg, seed=r)
                    warm_runs[name].append(res)
            warm_load.append(load.result())
            line = ", ".join(f"{n} {warm_runs[n][-1]['rows'] / warm_runs[n][-1]['seconds'] / 1e6:.2f}" for n, _ in WARM_CONFIGS)
            print(f"[warm round {r + 1}/{args.repeats}] Mrows/s: {line}; other load {warm_load[-1]['other_busy_cores']:.2f} cores", flush=True)
        res_rows = [warm_runs["baseline"][0]["rows"], warm_runs["sd shuffle"][0]["rows"]]
        if len(set(res_rows)) != 1 and abs(res_rows[0] - res_rows[1]) > bs:
            print(f"warning: row counts differ: {res_rows}")

        # ---- breakdown (instrumented warm epochs) ---------------------------------------------------
        profile_runs: list[dict] = []
        setup["row_order_cost_per_block"] = order_costs(path)
        if not args.no_profile:
            for r in range(args.repeats):
                with common.CpuLoad() as load:
                    profile_runs.append(profiled_sd_epoch(path, bs))
                profile_runs[-1]["load"] = load.result()
                print(f"[profile {r + 1}/{args.repeats}] instrumented shuffled epoch {profile_runs[-1]['seconds']:.2f} s; "
                      f"other load {profile_runs[-1]['load']['other_busy_cores']:.2f} cores", flush=True)
            if args.cprofile:
                cp = profiled_sd_epoch(path, bs, cprofile=True)
                profile_runs.append({"cprofile_only": True, **cp})

        # ---- cold ------------------------------------------------------------------------------------
        cold_runs: list[dict] = []
        if not args.no_cold:
            for r in range(args.repeats):
                rec: dict[str, Any] = {}
                with common.CpuLoad() as load:
                    rec["evict_sd"] = common.evict_verified(chunk_files)
                    rec["fincore_after_evict"] = common.fincore_text(chunk_files) if r == 0 else None
                    timers = Timers()
                    with instrument(timers, per_batch=False):
                        rec["sd"] = sd_epoch(path, bs, seed=100 + r)
                    rec["sd"]["timers"] = timers.as_dict()
                    rec["resident_after_sd"] = common.resident_bytes(chunk_files)["fraction"]
                    rec["evict_sd2"] = common.evict_verified(chunk_files)
                    rec["sd_prefetch2"] = sd_epoch(path, bs, seed=300 + r, prefetch=2)
                    rec["evict_sd_direct"] = common.evict_verified(chunk_files)
                    rec["sd_direct"] = sd_epoch(path, bs, seed=200 + r, direct=True)
                    rec["evict_direct"] = common.evict_verified(chunk_files)
                    # whole-file reads, as the reader's direct reads are: smaller ones are slower here
                    rec["direct"] = sbench.direct_read(chunk_files, piece=direct_nbytes(max(p.stat().st_size for p in chunk_files)))
                    rec["resident_after_direct"] = common.resident_bytes(chunk_files)["fraction"]
                    rec["evict_readblock"] = common.evict_verified(chunk_files)
                    rec["readblock"] = read_blocks_only(path)
                rec["load"] = load.result()
                cold_runs.append(rec)
                print(f"[cold round {r + 1}/{args.repeats}] cached before: {rec['evict_sd']['resident_after']:.4f}; "
                      f"ShardedDataset {chunk_bytes / rec['sd']['seconds'] / GB:.3f} GB/s, "
                      f"(prefetch=2 {chunk_bytes / rec['sd_prefetch2']['seconds'] / GB:.3f}, "
                      f"direct=True {chunk_bytes / rec['sd_direct']['seconds'] / GB:.3f}), O_DIRECT {rec['direct']['gb_per_s']:.3f} GB/s, read_block only {rec['readblock']['gb_per_s']:.3f} GB/s; other load {rec['load']['other_busy_cores']:.2f} cores", flush=True)
            # time to first batch with workers, cold
            for r in range(args.repeats):
                for nw in (0, 2):
                    ev = common.evict_verified(chunk_files)
                    t = sd_epoch(path, bs, max_batches=1, num_workers=nw, seed=200 + r)
                    cold_runs[r][f"ttfb_nw{nw}"] = {"evict": ev, **t}
            common.warm(chunk_files)

        # ---- naive ------------------------------------------------------------------------------------
        naive: dict[str, list] = {"warm": [], "cold": []}
        if not args.no_naive:
            for r in range(args.repeats):
                for mode in ("warm", "cold"):
                    if mode == "warm":
                        common.warm(chunk_files)
                    ev = common.evict_verified(chunk_files) if mode == "cold" else {"resident": common.resident_bytes(chunk_files)["fraction"]}
                    nr = naive_run(path, bs, args.naive_seconds, seed=r)
                    nr["cache"] = ev
                    nr["resident_after"] = common.resident_bytes(chunk_files)["fraction"]
                    naive[mode].append(nr)
                    print(f"[naive {mode} {r + 1}/{args.repeats}] {nr['rows_per_s_steady'] / 1e3:.1f} k rows/s over "
                          f"{nr['window_s']:.1f} s ({100 * nr['fraction_of_epoch_read']:.2f}% of the epoch), first batch "
                          f"{nr['first_batch_s']:.2f} s; page cache after: {nr['resident_after']:.3f}", flush=True)

        # ---- memory ----------------------------------------------------------------------------------
        print("memory: peak RSS of a fresh reader process (prefetch=1) ...", flush=True)
        small_path = str(root / "small.zarr")
        generate_regression(small_path, rows=2 * lay.block_rows, features=args.features, block_mb=args.block_mb, workers=1,
                            overwrite=True, progress=False)
        limit = max(1, min(lay.num_blocks, 8) * lay.block_rows // bs)
        mem_cfgs = {
            "full store, prefetch=1, num_workers=0 (full epoch)": (path, 1, 0, None),
            "2-block store, prefetch=1, num_workers=0 (full epoch)": (small_path, 1, 0, None),
            "full store, prefetch=2, num_workers=0 (first 8 blocks)": (path, 2, 0, limit),
            "full store, prefetch=1, num_workers=2 (first 8 blocks)": (path, 1, 2, limit),
        }
        if args.quick:  # keep the smoke run short: one config in a worker, one in the main process
            mem_cfgs = {k: v for k, v in mem_cfgs.items() if "prefetch=2" not in k and "2-block" not in k}
        mem_runs: dict[str, list] = {k: [] for k in mem_cfgs}
        for r in range(args.repeats):
            for k, (p_, pf, nw, mb) in mem_cfgs.items():
                mem_runs[k].append(rss_run(p_, bs, pf, nw, mb))
        baseline = common.baseline_rss(3)

        result = analyse(args, desc, setup, warm_runs, warm_load, profile_runs, cold_runs, naive, mem_runs, baseline, logical,
                         chunk_bytes, block_bytes, rows)
        common.finish(args, result, plot, started)
        return result


def analyse(args, desc, setup, warm_runs, warm_load, profile_runs, cold_runs, naive, mem_runs, baseline, logical, chunk_bytes,
            block_bytes, rows) -> dict[str, Any]:
    warm: dict[str, Any] = {}
    base_rate = [r["rows"] / r["seconds"] for r in warm_runs["baseline"]]
    for name, runs in warm_runs.items():
        rate = [r["rows"] / r["seconds"] for r in runs]
        warm[name] = {
            "rows_per_s": summarize(rate),
            "gb_per_s": summarize([x * logical / rows / GB for x in rate]),
            "epoch_s": summarize([r["seconds"] for r in runs]),
            "first_batch_s": summarize([r["first_batch_s"] for r in runs]),
            "construct_s": summarize([r["construct_s"] for r in runs]),
            "ratio_to_baseline": ratio_summary(rate, base_rate),
            "rows": runs[0]["rows"],
            "batches": runs[0]["batches"],
            "partial_epoch": any(r.get("partial") for r in runs),
            "fraction_of_epoch": summarize([r["rows"] / rows for r in runs]),
        }
    base_timers = defaultdict(list)
    for r in warm_runs["baseline"]:
        for k, v in r["timers"].items():
            base_timers[k].append(v)
        base_timers["consumer remainder (slicing, yield, touch, loop)"].append(r["seconds"] - sum(r["timers"].values()))
    breakdown: dict[str, Any] = {"baseline": {k: summarize(v) for k, v in base_timers.items()}}
    prof = [p for p in profile_runs if not p.get("cprofile_only")]
    if prof:
        keys = sorted({k for p in prof for k in p["timers"]})
        sd_t = {k: summarize([p["timers"].get(k, {"seconds": 0.0})["seconds"] for p in prof]) for k in keys}
        calls = {k: prof[0]["timers"].get(k, {}).get("calls") for k in keys}
        cons_keys = [k for k in keys if k.startswith("consumer")]
        remainder = [p["next_s"] - sum(p["timers"].get(k, {"seconds": 0})["seconds"] for k in cons_keys) for p in prof]
        breakdown["sharded_dataset"] = {
            "epoch_s": summarize([p["seconds"] for p in prof]),
            "timers": sd_t,
            "calls": calls,
            "consumer: next() total (DataLoader + _assemble)": summarize([p["next_s"] for p in prof]),
            "consumer: Python overhead per epoch (next() - gathers - cat - queue waits)": summarize(remainder),
            "consumer: Python overhead per batch, microseconds": summarize([1e6 * x / p["batches"] for x, p in zip(remainder, prof)]),
            "consumer: touch one element per batch": summarize([p["consume_s"] for p in prof]),
            "batches": prof[0]["batches"],
        }
        cp = [p for p in profile_runs if p.get("cprofile_only")]
        if cp:
            breakdown["cprofile_top_tottime"] = cp[0]["cprofile_top_tottime"]
    cold: dict[str, Any] = {}
    if cold_runs:
        sd_gbs = [chunk_bytes / c["sd"]["seconds"] / GB for c in cold_runs]
        d_gbs = [c["direct"]["gb_per_s"] for c in cold_runs]
        cold = {
            "sd_gb_per_s_file_bytes": summarize(sd_gbs),
            "sd_rows_per_s": summarize([c["sd"]["rows"] / c["sd"]["seconds"] for c in cold_runs]),
            "o_direct_gb_per_s": summarize(d_gbs),
            "ratio_sd_over_o_direct": ratio_summary(sd_gbs, d_gbs),
            "sd_prefetch2_gb_per_s_file_bytes": summarize([chunk_bytes / c["sd_prefetch2"]["seconds"] / GB for c in cold_runs]),
            "ratio_sd_prefetch2_over_o_direct": ratio_summary([chunk_bytes / c["sd_prefetch2"]["seconds"] / GB for c in cold_runs], d_gbs),
            "sd_direct_gb_per_s_file_bytes": summarize([chunk_bytes / c["sd_direct"]["seconds"] / GB for c in cold_runs]),
            "ratio_sd_direct_over_o_direct": ratio_summary([chunk_bytes / c["sd_direct"]["seconds"] / GB for c in cold_runs], d_gbs),
            "read_block_only_gb_per_s": summarize([c["readblock"]["gb_per_s"] for c in cold_runs]),
            "ratio_read_block_only_over_o_direct": ratio_summary([c["readblock"]["gb_per_s"] for c in cold_runs], d_gbs),
            "sd_first_batch_s": summarize([c["sd"]["first_batch_s"] for c in cold_runs]),
            "sd_reader_read_block_s": summarize([c["sd"]["timers"].get(READ_KEY, {"seconds": 0})["seconds"] for c in cold_runs]),
            "sd_reader_crc_s": summarize([c["sd"]["timers"].get(CHECK_KEY, {"seconds": 0})["seconds"] for c in cold_runs]),
            "sd_reader_block_order_s": summarize([c["sd"]["timers"].get(ORDER_KEY, {"seconds": 0})["seconds"]
                                                   for c in cold_runs]),
            "sd_consumer_waits_s": summarize([c["sd"]["timers"].get(WAIT_KEY, {"seconds": 0})["seconds"]
                                              for c in cold_runs]),
            "sd_epoch_s": summarize([c["sd"]["seconds"] for c in cold_runs]),
            "o_direct_s": summarize([c["direct"]["seconds"] for c in cold_runs]),
            "eviction_evidence": [
                {"before_sd": {"cached_fraction_before_evict": c["evict_sd"]["resident_before"], "after_evict": c["evict_sd"]["resident_after"]},
                 "after_sd_epoch": c["resident_after_sd"],
                 "before_o_direct": {"cached_fraction_before_evict": c["evict_direct"]["resident_before"], "after_evict": c["evict_direct"]["resident_after"]},
                 "after_o_direct": c["resident_after_direct"]}
                for c in cold_runs
            ],
            "fincore_after_evict": cold_runs[0].get("fincore_after_evict"),
            "warm_buffered_read_gb_per_s_at_setup": setup["warm_read"]["gb_per_s"],
            "first_batch_cold_nw0_s": summarize([c["ttfb_nw0"]["first_batch_s"] + c["ttfb_nw0"]["construct_s"] for c in cold_runs if "ttfb_nw0" in c]),
            "first_batch_cold_nw2_s": summarize([c["ttfb_nw2"]["first_batch_s"] + c["ttfb_nw2"]["construct_s"] for c in cold_runs if "ttfb_nw2" in c]),
            "load": [c["load"] for c in cold_runs],
        }
    nv: dict[str, Any] = {}
    for mode, runs in naive.items():
        if not runs:
            continue
        nv[mode] = {
            "rows_per_s_steady": summarize([r["rows_per_s_steady"] for r in runs]),
            "first_batch_s": summarize([r["first_batch_s"] for r in runs]),
            "epoch_s_extrapolated": summarize([r["epoch_s_extrapolated"] for r in runs]),
            "rows_per_s_epoch_extrapolated": summarize([r["rows_per_s_epoch_extrapolated"] for r in runs]),
            "window_s": summarize([r["window_s"] for r in runs]),
            "fraction_of_epoch_read": summarize([r["fraction_of_epoch_read"] for r in runs]),
            "page_cache_fraction_after_window": summarize([r["resident_after"] for r in runs]),
            "runs": runs,
        }
    if "warm" in nv:
        sd_rate = [r["rows"] / r["seconds"] for r in warm_runs["sd shuffle"]]
        nv["warm"]["sd_speedup_epoch"] = ratio_summary(sd_rate, [r["rows_per_s_epoch_extrapolated"] for r in naive["warm"]])
        nv["warm"]["sd_speedup_steady"] = ratio_summary(sd_rate, [r["rows_per_s_steady"] for r in naive["warm"]])
    if "cold" in nv and cold_runs:
        sd_rate = [c["sd"]["rows"] / c["sd"]["seconds"] for c in cold_runs]
        nv["cold"]["sd_speedup_epoch"] = ratio_summary(sd_rate, [r["rows_per_s_epoch_extrapolated"] for r in naive["cold"]])
        nv["cold"]["sd_speedup_steady"] = ratio_summary(sd_rate, [r["rows_per_s_steady"] for r in naive["cold"]])
    mem: dict[str, Any] = {}
    base_rss = baseline["rss_bytes"]["median"]
    for k, runs in mem_runs.items():
        parent = [r["rss"]["parent_max_rss"] for r in runs]
        workers = [r["rss"]["max_worker_rss"] for r in runs if r["rss"]["max_worker_rss"]]
        own_base = [r["baseline_rss"] for r in runs]
        mem[k] = {
            "process_baseline_rss_bytes": summarize(own_base),
            "parent_peak_rss_bytes": summarize(parent),
            "parent_peak_over_own_baseline_blocks": summarize([(p - b) / block_bytes for p, b in zip(parent, own_base)]),
            "worker_peak_rss_bytes": summarize(workers) if workers else None,
            "worker_peak_over_baseline_blocks": summarize([(w - base_rss) / block_bytes for w in workers]) if workers else None,
            "batches": runs[0]["epoch"]["batches"],
            "per_process": [r["rss"]["processes"] for r in runs],
        }
    ttfb: dict[str, Any] = {}
    for name, runs in warm_runs.items():
        ttfb[f"warm, {name}"] = summarize([r["construct_s"] + r["first_batch_s"] for r in runs])
    if cold_runs:
        ttfb["cold, sd shuffle, num_workers=0"] = cold["first_batch_cold_nw0_s"]
        ttfb["cold, sd shuffle, num_workers=2"] = cold["first_batch_cold_nw2_s"]
    for mode in ("warm", "cold"):
        if mode in nv:
            ttfb[f"{mode}, naive memmap DataLoader(shuffle=True)"] = nv[mode]["first_batch_s"]
    # verdicts use the median of the per-round ratios (each round measures both back to back)
    ratio_warm = warm["sd shuffle"]["ratio_to_baseline"]["median"]
    ratio_cold = cold.get("ratio_sd_direct_over_o_direct", {}).get("median")
    targets = {
        "warm: ShardedDataset shuffled / baseline >= 0.90": {
            "value": ratio_warm, "ratio_of_medians": warm["sd shuffle"]["ratio_to_baseline"]["of_medians"],
            "verdict": common.verdict(ratio_warm, 0.90)},
        "cold: ShardedDataset(direct=True) / O_DIRECT sequential >= 0.90": {
            "value": ratio_cold, "ratio_of_medians": cold.get("ratio_sd_direct_over_o_direct", {}).get("of_medians"),
            "verdict": common.verdict(ratio_cold, 0.90)},
    }
    result = {
        "benchmark": "read",
        "args": vars(args),
        "machine": desc,
        "notes": NOTES,
        "memory_bound_argument": MEMORY_BOUND_ARGUMENT,
        "setup": setup,
        "warm": warm,
        "warm_other_load_cores": warm_load,
        "breakdown": breakdown,
        "cold": cold,
        "naive": nv,
        "memory": mem,
        "time_to_first_batch_s": ttfb,
        "baseline_interpreter": baseline,
        "targets": targets,
    }
    print_report(result, block_bytes)
    return result


def print_report(res: dict[str, Any], block_bytes: int) -> None:
    W, st = res["warm"], res["setup"]
    print()
    print(f"store: {st['rows']:,} rows, {st['num_blocks']} blocks of {st['block_rows']:,} rows ({block_bytes / MiB:.1f} MiB), "
          f"{st['logical_bytes'] / GiB:.2f} GiB; batch {res['args']['batch_size']}")
    rows = []
    for name, w in W.items():
        rows.append([name, fmt(w["rows_per_s"], 1e-6), fmt(w["gb_per_s"], digits=3), fmt(w["epoch_s"]), fmt_ratio(w["ratio_to_baseline"]),
                     fmt(w["first_batch_s"], 1e3, 1), f"{w['fraction_of_epoch']['median']:.2f}"])
    print_table(["warm page cache, one process", "M rows/s", "GB/s", "seconds", "vs baseline", "first batch ms", "epoch read"], rows,
                title=("Warm (median [min-max] of rounds): baseline and 'sd shuffle' read full epochs, the others run for "
                           f"{res['args']['variant_seconds']:g} s ('epoch read' < 1); baseline = readinto + randperm + index_select per block"))
    B = res["breakdown"]
    if "sharded_dataset" in B:
        S = B["sharded_dataset"]
        lines = []
        for k, s in B["baseline"].items():
            lines.append(["baseline", k, fmt(s)])
        for k, s in S["timers"].items():
            lines.append(["ShardedDataset", f"{k} [{S['calls'].get(k)} calls]", fmt(s)])
        lines.append(["ShardedDataset", "consumer: next() total (DataLoader + _assemble)", fmt(S["consumer: next() total (DataLoader + _assemble)"])])
        lines.append(["ShardedDataset", "consumer: Python overhead (next() - gathers - cat - waits)",
                      fmt(S["consumer: Python overhead per epoch (next() - gathers - cat - queue waits)"])])
        lines.append(["ShardedDataset", "  ... per batch, us", fmt(S["consumer: Python overhead per batch, microseconds"], digits=1)])
        lines.append(["ShardedDataset", "consumer: touch one element per batch", fmt(S["consumer: touch one element per batch"])])
        lines.append(["ShardedDataset", "instrumented epoch wall", fmt(S["epoch_s"])])
        print_table(["who", "component (seconds per epoch; reader runs on its own thread)", "s median [min-max]"], lines,
                    title="Where a warm shuffled epoch goes (timers; num_workers=0, prefetch=1)")
    oc = st.get("row_order_cost_per_block")
    if oc:
        print(f"row order of one block ({oc['rows_per_block']:,} rows) computed alone: shardset block_order "
              f"{fmt(oc['block_order_s'], 1e3, 0)} ms, plain torch.randperm {fmt(oc['torch_randperm_s'], 1e3, 0)} ms\n")
    C = res["cold"]
    if C:
        ev = C["eviction_evidence"]
        print_table(
            ["cold (chunk files evicted before each run)", "GB/s of file bytes", "epoch s", "first batch s"],
            [["ShardedDataset shuffled, num_workers=0", fmt(C["sd_gb_per_s_file_bytes"], digits=3), fmt(C["sd_epoch_s"]), fmt(C["sd_first_batch_s"])],
             ["ShardedDataset shuffled, prefetch=2", fmt(C["sd_prefetch2_gb_per_s_file_bytes"], digits=3), "", "-"],
             ["ShardedDataset shuffled, direct=True (O_DIRECT)", fmt(C["sd_direct_gb_per_s_file_bytes"], digits=3), "", "-"],
             ["sequential O_DIRECT, whole-file reads", fmt(C["o_direct_gb_per_s"], digits=3), fmt(C["o_direct_s"]), "-"],
             ["BlockStore.read_block only (no consumer)", fmt(C["read_block_only_gb_per_s"], digits=3), "", "-"],
             ["ratio ShardedDataset / O_DIRECT", fmt_ratio(C["ratio_sd_over_o_direct"]), "", ""],
             ["ratio ShardedDataset prefetch=2 / O_DIRECT", fmt_ratio(C["ratio_sd_prefetch2_over_o_direct"]), "", ""],
             ["ratio ShardedDataset direct=True / O_DIRECT", fmt_ratio(C["ratio_sd_direct_over_o_direct"]), "", ""],
             ["ratio read_block only / O_DIRECT", fmt_ratio(C["ratio_read_block_only_over_o_direct"]), "", ""]],
            title=(f"Cold: cached fraction after eviction {max(e['before_sd']['after_evict'] for e in ev):.4f} (max over runs, mincore); "
                   f"after the ShardedDataset epoch {min(e['after_sd_epoch'] for e in ev):.3f}; after O_DIRECT {max(e['after_o_direct'] for e in ev):.4f}; "
                   f"warm buffered read {C['warm_buffered_read_gb_per_s_at_setup']:.2f} GB/s"),
        )
        print_table(["cold ShardedDataset reader thread", "s median [min-max]"],
                    [["read_block (I/O thread)", fmt(C["sd_reader_read_block_s"])],
                     ["check_block (crc32c, its own thread)", fmt(C["sd_reader_crc_s"])],
                     ["block_order (row order)", fmt(C["sd_reader_block_order_s"])],
                     ["consumer waits for blocks", fmt(C["sd_consumer_waits_s"])]], title="Cold epoch: reader-thread timers")
    N = res["naive"]
    if N:
        rows = []
        for mode in ("warm", "cold"):
            if mode not in N:
                continue
            n = N[mode]
            rows.append([mode, fmt(n["rows_per_s_steady"], 1e-3, 1), fmt(n["first_batch_s"]), fmt(n["epoch_s_extrapolated"], digits=0),
                         fmt(n["fraction_of_epoch_read"], 100, 2), fmt(n["page_cache_fraction_after_window"], digits=3),
                         fmt_ratio(n.get("sd_speedup_epoch"), digits=1), fmt_ratio(n.get("sd_speedup_steady"), digits=1)])
        print_table(["naive memmap + DataLoader(shuffle=True)", "k rows/s (steady)", "first batch s", "epoch s (EXTRAPOLATED)",
                     "% of epoch measured", "cached after", "shardset speed-up (epoch)", "(steady)"], rows,
                    title=f"Naive loader: measured for {res['args']['naive_seconds']:.0f} s per run, epoch time extrapolated from that rate")
    M = res["memory"]
    b = res["baseline_interpreter"]["rss_bytes"]
    rows = [["fresh interpreter + numpy/torch/zarr/shardset", fmt(b, 1 / MiB, 0), "-", "-"]]
    for k, m in M.items():
        rows.append([k + ": main process", fmt(m["parent_peak_rss_bytes"], 1 / MiB, 0), fmt(m["parent_peak_over_own_baseline_blocks"]), m["batches"]])
        if m["worker_peak_rss_bytes"]:
            rows.append([k + ": each worker (max)", fmt(m["worker_peak_rss_bytes"], 1 / MiB, 0), fmt(m["worker_peak_over_baseline_blocks"]), ""])
    print_table(["reader process", "peak RSS MiB", "over baseline, blocks", "batches"], rows,
                title=f"Peak RSS (block = {block_bytes / MiB:.1f} MiB, sampled every 50 ms); bound: 1 + prefetch buffers, independent of N")
    print_table(["time to first batch (construction + iter + first batch)", "ms median [min-max]"],
                [[k, fmt(v, 1e3, 1)] for k, v in res["time_to_first_batch_s"].items()], title="Time to first batch")
    T = res["targets"]
    print_table(["target", "median of per-round ratios", "ratio of medians", "verdict"],
                [[k, f"{v['value']:.3f}" if v["value"] is not None else "-",
                  f"{v['ratio_of_medians']:.3f}" if v.get("ratio_of_medians") is not None else "-", v["verdict"]] for k, v in T.items()],
                title="Targets (verdict on the median of the per-round ratios)")


def plot(args, res: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(14, 9))
    W = res["warm"]
    names = list(W)
    vals = [common.errbar(W[n]["rows_per_s"], 1e-6) for n in names]
    ax = axes[0][0]
    labels = [n.replace("diag: sd shuffle, ", "diag: ") for n in names]
    ax.barh(labels, [v[0] for v in vals], xerr=[[v[1] for v in vals], [v[2] for v in vals]], capsize=3,
            color=["#999" if n == "baseline" else ("#ff7f0e" if n.startswith("diag") else "#1f77b4") for n in names])
    ax.tick_params(axis="y", labelsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("M rows/s (median, min-max)")
    ax.set_title("warm page cache, batch 1024 (diag = diagnostic variants)")

    ax = axes[0][1]
    C, N = res["cold"], res["naive"]
    items = []
    if C:
        items += [("cold: ShardedDataset", C["sd_rows_per_s"]),
                  ("cold: O_DIRECT seq. (rows equiv.)", {k: (v * GB / (4 * (args.features + 1)) if isinstance(v, float) else v) for k, v in C["o_direct_gb_per_s"].items() if k != "runs"})]
    items += [("warm: ShardedDataset", W["sd shuffle"]["rows_per_s"]), ("warm: baseline", W["baseline"]["rows_per_s"])]
    for mode in ("warm", "cold"):
        if mode in N:
            items.append((f"{mode}: naive memmap (extrap.)", N[mode]["rows_per_s_epoch_extrapolated"]))
    vals = [common.errbar(s, 1e-6) for _, s in items]
    ax.barh([n for n, _ in items], [v[0] for v in vals], xerr=[[v[1] for v in vals], [v[2] for v in vals]], capsize=3)
    ax.set_xscale("log")
    common.log_axis(ax)
    ax.invert_yaxis()
    ax.set_xlabel("M rows/s (log)")
    ax.set_title("cold vs O_DIRECT, and the naive memmap loader")

    ax = axes[1][0]
    B = res["breakdown"]
    if "sharded_dataset" in B:
        S = B["sharded_dataset"]
        comp = [(k.replace("reader: ", "R: ").replace("consumer: ", "C: ")[:48], s["median"]) for k, s in S["timers"].items()]
        comp.append(("C: Python overhead (remainder)", S["consumer: Python overhead per epoch (next() - gathers - cat - queue waits)"]["median"]))
        comp.append(("epoch wall", S["epoch_s"]["median"]))
        ax.barh([c[0] for c in comp], [c[1] for c in comp], color=["#2ca02c" if c[0].startswith("R") else "#d62728" for c in comp[:-1]] + ["#333"])
        ax.invert_yaxis()
        ax.set_xlabel("seconds per epoch (R = reader thread, C = consumer)")
        ax.set_title("where a warm shuffled epoch goes")
        ax.tick_params(axis="y", labelsize=7)
    else:
        ax.axis("off")

    ax = axes[1][1]
    M = res["memory"]
    labels, meds = [], []
    for k, m in M.items():
        labels.append(k.replace(", num_workers", "\nnum_workers")[:70])
        meds.append(common.errbar(m["parent_peak_over_own_baseline_blocks"]))
        if m["worker_peak_over_baseline_blocks"]:
            labels.append("  per worker")
            meds.append(common.errbar(m["worker_peak_over_baseline_blocks"]))
    ax.barh(labels, [v[0] for v in meds], xerr=[[v[1] for v in meds], [v[2] for v in meds]], capsize=3, color="#9467bd")
    ax.invert_yaxis()
    ax.set_xlabel("peak RSS over interpreter baseline, in blocks")
    ax.set_title("reader memory")
    ax.tick_params(axis="y", labelsize=7)
    m = res["machine"]
    fig.suptitle(f"bench_read ({args.name}): {res['setup']['logical_bytes'] / GiB:.2f} GiB, d={args.features}, {args.block_mb} MB blocks; "
                 f"{m['cpu_model']}, {m['cpu_affinity_cores']} cores, {m['data_dir_filesystem'].get('fstype')}, {m['date']}; "
                 f"median of {args.repeats}, bars min-max", fontsize=9)
    common.save_plot(fig, args.name)


if __name__ == "__main__":
    main()
