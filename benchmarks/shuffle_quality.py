"""Shuffle quality of the reader's orders, the cost of a shuffle window, and the write-time shuffle.

Run from the repository root::

    python -m benchmarks.shuffle_quality            # shuffles 1 and 4 GiB: ~10 minutes on 2 idle cores
    python -m benchmarks.shuffle_quality --shuffle-mib 1024,4096,12288   # the size series in the docs
    python -m benchmarks.shuffle_quality --quick    # smoke run
    python -m benchmarks.shuffle_quality --only write-shuffle --shuffle-mib 1024,4096 --memory-limit-mib 2048

Three parts:

1. **Quality** (:mod:`shardset.quality`) of the order one epoch delivers from a
   store of regression rows sorted by y (label = decile of y, so every block
   holds one or two classes): no shuffle, block shuffle with windows
   ``W = 1, 2, 4, 8``, and the same rows written with ``shuffle=True`` (the row
   shuffle) or copied by ``shuffle_store(method="segments")`` read with ``W = 1``;
   beside each, a uniform shuffle of the same labels.  Measured VIF
   against ``1 + rho (b - 1) / W``.  Epochs 0..``--repeats``-1 give the
   median [min-max].  Blocks are small (``--block-rows``): the metrics depend
   on rows per block and per batch, not on bytes.
2. **Throughput** of ``ShardedDataset`` with ``W = 8`` against ``W = 1`` on one
   store (warm page cache), rounds alternating the two, ratio per round; one
   dataset per window for the whole run, as in training, its first epoch (which
   faults its buffers in) not counted.
3. **Write-time shuffle** of a store (``shardset.shuffle_store`` with its
   defaults, ``method=--shuffle-method``: every core, the input evicted from the page cache
   before each run) against the durable sequential write bandwidth of the same
   disk for the same bytes in the store's pattern: block-sized files, each
   written and fsynced (:func:`benchmarks.common.fsync_write_bandwidth`), the two
   alternating round by round.  The peak RSS of its largest process over a fresh
   interpreter's is checked against ``shuffle_rss_budget`` (a formula of the
   block size) at every size in ``--shuffle-mib``.  Also: CPU-seconds per GB,
   the scatter's and the gather's share of the time, and the bytes the shuffle's
   processes wrote to and read from the disk per byte of data (``/proc/PID/io``:
   bucket pages deleted before the kernel wrote them out are not counted).
   Each round also measures what the disk allows a shuffle: its ``O_DIRECT``
   read rate and its rate reading and writing at once
   (:func:`benchmarks.common.mixed_io_rate`; this disk is nearly half duplex),
   hence the *I/O-bound ratio*, the ratio a shuffle moving the bytes this one
   moved at that rate would reach, the shuffle's time against that bound, and
   whether the disk or the CPU (CPU-seconds over the cores other programs
   left free) binds.
   ``--memory-limit-mib M`` runs each shuffle in a memory cgroup of ``M`` MiB
   (its page cache included), so that a store larger than ``M`` is larger than
   the memory the shuffle may use: the buckets cannot stay in the page cache
   and go to the disk, as they would for a store larger than RAM (this disk
   cannot hold the three copies of one).  Sizes whose source, output and buckets
   would not fit in the free disk less 5 GB are skipped.

``--only`` runs some of the parts (e.g. ``--only write-shuffle``).
Results: ``benchmarks/results/<name>.json`` and ``benchmarks/plots/<name>.png``
(default name ``shuffle_quality``; ``write_shuffle`` for ``--only write-shuffle``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import numpy as np

import shardset
from shardset import ShardedDataset
from shardset.bench import direct_read
from shardset.format import SLICES_PER_BLOCK

from . import common
from .common import fmt, fmt_ratio, print_table, ratio_summary, summarize, verdict
from .convergence import make_data, write_stores

WINDOWS = (1, 2, 4, 8)
METRICS = ("batch_tv", "vif", "effective_batch", "drift_tv", "rank_correlation", "adjacent_same_batch")

PARTS = ("quality", "throughput", "write-shuffle")

# One shuffle_store run, timed inside the child (its interpreter start is not the shuffle's).
# write_blocks is wrapped only to note when the scatter ended and the gather began; /proc/self/io
# counts this process and the scatter and gather processes it waited for.
_SHUFFLE_CHILD = """
import json, os, resource, sys, time
if sys.argv[3]:
    with open(sys.argv[3], "w") as f:  # into the memory cgroup before any work
        f.write(str(os.getpid()))
import shardset.shuffle as shuffle

def io():
    with open("/proc/self/io") as f:
        return {k: int(v) for k, v in (line.split(":") for line in f)}

def cpu():
    a, b = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return a.ru_utime + b.ru_utime + a.ru_stime + b.ru_stime

marks = {}
gather = shuffle.write_blocks

def timed_gather(*args, **kwargs):
    marks.setdefault("scatter_end", (time.perf_counter(), cpu()))
    return gather(*args, **kwargs)

shuffle.write_blocks = timed_gather
t0, c0, io0 = time.perf_counter(), cpu(), io()
shuffle.shuffle_store(sys.argv[1], sys.argv[2], seed=1, progress=False, method=sys.argv[4])
t1, c1, io1 = time.perf_counter(), cpu(), io()
t_s, c_s = marks["scatter_end"]
print(json.dumps({"seconds": t1 - t0, "scatter_s": t_s - t0, "gather_s": t1 - t_s, "cpu_s": c1 - c0,
                  "scatter_cpu_s": c_s - c0, "gather_cpu_s": c1 - c_s,
                  "disk_write_bytes": io1["write_bytes"] - io0["write_bytes"]
                  - (io1["cancelled_write_bytes"] - io0["cancelled_write_bytes"]),
                  "disk_read_bytes": io1["read_bytes"] - io0["read_bytes"]}))
"""


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=1 << 19, help="rows of the quality store")
    p.add_argument("--block-rows", type=int, default=1 << 12, help="rows per block of the quality store")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--read-mib", type=int, default=256, help="size of the throughput store")
    p.add_argument("--read-block-mib", type=int, default=16, help="block size of the throughput store")
    p.add_argument("--shuffle-mib", default="1024,4096",
                   help="store sizes (MiB, comma-separated) for the write-time shuffle, e.g. 1024,4096,12288")
    p.add_argument("--shuffle-block-mib", type=int, default=32)
    p.add_argument("--memory-limit-mib", type=int, default=None,
                   help="run each shuffle in a memory cgroup of this many MiB, page cache included")
    p.add_argument("--shuffle-method", choices=("rows", "segments"), default="rows",
                   help="shuffle_store's method for the write-time shuffle part")
    p.add_argument("--only", default=",".join(PARTS), help=f"comma-separated parts to run, of {', '.join(PARTS)}")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--name", default=None)
    p.add_argument("--no-plot", action="store_true")
    args = p.parse_args(argv)
    if args.quick:
        args.rows, args.block_rows, args.read_mib, args.read_block_mib = 1 << 16, 1 << 10, 64, 4
        args.shuffle_mib, args.shuffle_block_mib = "32,64", 4
    args.only = [part.strip() for part in args.only.split(",") if part.strip()]
    if not args.only or set(args.only) - set(PARTS):
        p.error(f"--only takes parts of {', '.join(PARTS)}, got {args.only}")
    default = "write_shuffle" if args.only == ["write-shuffle"] else "shuffle_quality"
    args.name = args.name or (f"{default}_quick" if args.quick else default)
    return args


# -- 1. quality ---------------------------------------------------------------------------


def quality(args, root: Path) -> dict[str, Any]:
    from shardset.quality import store_quality

    stores = write_stores(root / "quality", make_data(args.rows, 16, 1.0), args.block_rows)
    configs = [("no shuffle", stores["sorted"], 1, False)]
    configs += [(f"W = {w}", stores["sorted"], w, True) for w in WINDOWS]
    configs.append(("write shuffle + W = 1", stores["sorted write-shuffled"], 1, True))
    configs.append(("segment shuffle + W = 1", stores["sorted segment-shuffled"], 1, True))
    out: dict[str, Any] = {}
    for name, path, window, shuffle in configs:
        reps = [
            store_quality(path, args.batch_size, id_field="row", window_blocks=window, seed=0, epoch=e, shuffle=shuffle)
            for e in range(args.repeats if shuffle else 1)
        ]
        rec = {
            "window_blocks": window, "rho": reps[0]["rho"], "predicted_vif": reps[0]["predicted_vif"],
            "reader": {m: summarize([r["reader"][m] for r in reps]) for m in METRICS},
            "uniform": {m: summarize([r["uniform"][m] for r in reps]) for m in METRICS},
            "adjacent_same_batch_uniform": reps[0]["reader"]["adjacent_same_batch_uniform"],
            "tv_by_position": np.median([r["reader"]["tv_by_position"] for r in reps], axis=0).tolist(),
        }
        rec["vif_vs_formula"] = rec["reader"]["vif"]["median"] / rec["predicted_vif"]
        out[name] = rec
        print(f"{name:22} TV {fmt(rec['reader']['batch_tv'], digits=3)}  VIF {fmt(rec['reader']['vif'], digits=1)} "
              f"(formula {rec['predicted_vif']:.1f})", flush=True)
    return out


# -- 2. throughput --------------------------------------------------------------------------


def throughput(args, root: Path) -> dict[str, Any]:
    row_bytes = 17 * 4
    block_rows = args.read_block_mib * common.MiB // row_bytes
    rows = args.read_mib * common.MiB // row_bytes
    path = str(root / "read.zarr")
    shardset.generate_regression(path, rows=rows, features=16, block_rows=block_rows, workers=1, progress=False)
    common.warm(common.tree_files(path))
    # one dataset per window for the whole run, as in training: its first epoch, which also
    # faults in its buffers (W + 1 blocks, and the first touch of fresh memory is slow on
    # this VM), is a warm-up and not counted (nor is the untimed epoch before each timed one)
    readers = {w: ShardedDataset(path, args.batch_size, window_blocks=w) for w in (1, 8)}
    for ds in readers.values():
        for _ in ds:
            pass
    rates: dict[int, list[float]] = {1: [], 8: []}
    for r in range(args.repeats):
        for w in ((1, 8) if r % 2 == 0 else (8, 1)):
            rates[w].append(common.epoch_rows_per_s(readers[w], args.quick))
        print(f"read round {r + 1}: W=1 {rates[1][-1] / 1e6:.2f} M rows/s, W=8 {rates[8][-1] / 1e6:.2f} M rows/s", flush=True)
    return {
        "rows": rows, "block_rows": block_rows, "blocks": -(-rows // block_rows), "batch_size": args.batch_size,
        "rows_per_s": {f"W={w}": summarize(v) for w, v in rates.items()},
        "w8_over_w1": ratio_summary(rates[8], rates[1]),
    }


# -- 3. write-time shuffle -------------------------------------------------------------------


@contextlib.contextmanager
def memory_cgroup(limit_bytes: int | None) -> Iterator[dict[str, Any] | None]:
    """A fresh memory cgroup limited to ``limit_bytes`` (cgroup v1 or v2; page cache included),
    removed afterwards; yields ``{"procs": file a process writes its pid to, "peak": file of the
    peak usage, "limit_bytes"}``, or None when ``limit_bytes`` is None."""
    if limit_bytes is None:
        yield None
        return
    name = f"shardset-bench-{os.getpid()}"
    v1 = Path("/sys/fs/cgroup/memory")
    root, limit, peak = ((v1 / name, "memory.limit_in_bytes", "memory.max_usage_in_bytes") if v1.is_dir()
                         else (Path("/sys/fs/cgroup") / name, "memory.max", "memory.peak"))
    try:
        root.mkdir()
        (root / limit).write_text(str(limit_bytes))
    except OSError as exc:
        raise SystemExit(f"--memory-limit-mib needs a memory cgroup this user may create ({root}): {exc}") from None
    try:
        yield {"procs": str(root / "cgroup.procs"), "peak": root / peak, "limit_bytes": limit_bytes}
    finally:
        for _ in range(50):  # the last process may take a moment to leave
            try:
                root.rmdir()
                break
            except OSError:
                time.sleep(0.1)


def write_shuffle(args, root: Path, baseline_anon: float) -> list[dict[str, Any]]:
    import psutil

    from shardset import segment_shuffle
    from shardset.shuffle import shuffle_rss_budget

    row_bytes = 17 * 4
    block_rows = args.shuffle_block_mib * common.MiB // row_bytes
    block_rows -= block_rows % SLICES_PER_BLOCK  # whole checksummed slices of a few rows, as block_mb gives them
    block_bytes = block_rows * row_bytes
    ram = psutil.virtual_memory().total
    limit = None if args.memory_limit_mib is None else args.memory_limit_mib * common.MiB
    out = []
    for mib in (int(s) for s in args.shuffle_mib.split(",")):
        rows = mib * common.MiB // row_bytes
        need, free = 3 * rows * row_bytes + 5 * common.GB, shutil.disk_usage(root).free
        if need > free:
            print(f"shuffle {mib} MiB skipped: source, output and buckets need {need / common.GB:.0f} GB "
                  f"with 5 GB to spare, {free / common.GB:.0f} GB free", flush=True)
            continue
        src, dst = root / f"src-{mib}.zarr", root / f"dst-{mib}.zarr"
        shardset.generate_regression(src, rows=rows, features=16, block_rows=block_rows, workers=1, progress=False)
        layout = shardset.BlockStore.open(src).layout
        budget = (shuffle_rss_budget(layout, layout) if args.shuffle_method == "rows"  # the output keeps the input's blocks
                  else segment_shuffle.rss_budget(layout, layout, segment_shuffle.default_segments(layout)))
        runs, rss, disk, resident, other, cgroup_peak, read, mixed = [], [], [], [], [], [], [], []

        def measure_disk() -> None:
            disk.append(common.fsync_write_bandwidth(root, rows * row_bytes, file_bytes=block_bytes)["gb_per_s"])
            # what the disk can do besides writing: read alone, and read and write at once (it is
            # nearly half duplex, and a shuffle that spills its buckets does both)
            read.append(direct_read(common.tree_files(src))["gb_per_s"])
            mixed.append(common.mixed_io_rate(common.tree_files(src), root, file_bytes=block_bytes))

        def measure_shuffle() -> None:
            resident.append(common.evict_verified(common.tree_files(src))["resident_after"])
            with memory_cgroup(limit) as cg:
                proc = subprocess.Popen([sys.executable, "-c", _SHUFFLE_CHILD, str(src), str(dst), cg["procs"] if cg else "",
                                         args.shuffle_method],
                                        cwd=common.REPO_ROOT, stdout=subprocess.PIPE, text=True)
                with common.RssSampler(proc.pid, interval=0.02) as sampler, common.CpuLoad() as load:
                    report, _ = proc.communicate()
                if cg:
                    cgroup_peak.append(int(cg["peak"].read_text()))
            other.append(load.result()["other_busy_cores"])
            if proc.returncode != 0:
                raise SystemExit(f"shuffle_store failed with exit code {proc.returncode}")
            runs.append(json.loads(report))
            # anonymous RSS: a forked worker's plain RSS leaves out the library pages it never
            # touched, which would hide part of what it allocated
            rss.append(sampler.result()["max_anon"] - baseline_anon)
            shutil.rmtree(dst)

        for r in range(args.repeats):
            for step in (measure_disk, measure_shuffle) if r % 2 == 0 else (measure_shuffle, measure_disk):
                step()
        data = rows * row_bytes
        gbs = [data / run["seconds"] / common.GB for run in runs]
        cores = len(os.sched_getaffinity(0))
        bounds = [_io_bound(run, data, w, m["gb_per_s"], cores - busy)
                  for run, w, m, busy in zip(runs, disk, mixed, other)]
        rec = {
            "mib": mib, "rows": rows, "block_rows": block_rows, "block_bytes": block_bytes, "blocks": layout.num_blocks,
            "larger_than_ram": data > ram, "memory_limit_bytes": limit,
            "larger_than_memory_limit": limit is not None and data > limit,
            "shuffle_gb_per_s": summarize(gbs), "disk_write_gb_per_s": summarize(disk),
            "shuffle_over_disk": ratio_summary(gbs, disk),
            "scatter_share_of_time": summarize(run["scatter_s"] / run["seconds"] for run in runs),
            "peak_rss_bytes_over_baseline": summarize(rss),
            "peak_rss_blocks_over_baseline": summarize(v / block_bytes for v in rss),
            "rss_budget_bytes": budget, "peak_rss_over_budget": summarize(v / budget for v in rss),
            "cgroup_peak_bytes": summarize(cgroup_peak) if cgroup_peak else None,
            "input_resident_after_evict": summarize(resident),
            # CPU of the shuffle's processes per GB: how fast 2 idle cores could go, whatever the disk
            "shuffle_cpu_s_per_gb": summarize(run["cpu_s"] / (data / common.GB) for run in runs),
            "scatter_cpu_s_per_gb": summarize(run["scatter_cpu_s"] / (data / common.GB) for run in runs),
            "gather_cpu_s_per_gb": summarize(run["gather_cpu_s"] / (data / common.GB) for run in runs),
            # bytes that reached (or were queued for) the disk per byte of data: 1 is the output alone
            "disk_written_per_byte": summarize(run["disk_write_bytes"] / data for run in runs),
            "disk_read_per_byte": summarize(run["disk_read_bytes"] / data for run in runs),
            "other_busy_cores_during_shuffle": summarize(other),
            # the disk's limit, measured in each round beside the baseline: see _io_bound
            "disk_read_gb_per_s": summarize(read),
            "disk_mixed_gb_per_s": summarize(m["gb_per_s"] for m in mixed),
            "disk_mixed_read_write_gb_per_s": [summarize(m["read_gb_per_s"] for m in mixed),
                                               summarize(m["write_gb_per_s"] for m in mixed)],
            "io_bound_ratio": summarize(b["io_bound_ratio"] for b in bounds),
            "shuffle_over_io_bound": summarize(b["shuffle_over_io_bound"] for b in bounds),
            "cpu_bound_seconds": summarize(b["cpu_bound_s"] for b in bounds),
            "io_bound_seconds": summarize(b["io_bound_s"] for b in bounds),
            "io_bound_gb_per_s": summarize(data / b["io_bound_s"] / common.GB for b in bounds),
            "binds": [b["binds"] for b in bounds],
            "runs": runs,
        }
        out.append(rec)
        print(f"shuffle {mib} MiB: {fmt(rec['shuffle_gb_per_s'])} GB/s, disk {fmt(rec['disk_write_gb_per_s'])} GB/s, "
              f"ratio {fmt_ratio(rec['shuffle_over_disk'])}, "
              f"peak RSS {fmt(rec['peak_rss_bytes_over_baseline'], 1 / common.MiB, digits=0)} MiB "
              f"(budget {budget / common.MiB:.0f} MiB), {fmt(rec['shuffle_cpu_s_per_gb'], digits=1)} CPU-s/GB, "
              f"written {fmt(rec['disk_written_per_byte'])} B/B, read {fmt(rec['disk_read_per_byte'])} B/B, "
              f"other programs busy {fmt(rec['other_busy_cores_during_shuffle'], digits=1)} cores; disk read "
              f"{fmt(rec['disk_read_gb_per_s'])} GB/s, read+write at once {fmt(rec['disk_mixed_gb_per_s'])} GB/s: "
              f"I/O-bound ratio {fmt(rec['io_bound_ratio'])}, shuffle at {fmt(rec['shuffle_over_io_bound'])} of it, "
              f"bound by {'/'.join(rec['binds'])}", flush=True)
        shutil.rmtree(src)
    if not out:
        raise SystemExit("no write-shuffle size fits on this disk; give smaller --shuffle-mib")
    return out


def _io_bound(run: dict[str, Any], data: int, write_gb_per_s: float, mixed_gb_per_s: float,
              free_cores: float) -> dict[str, Any]:
    """How close one shuffle ``run`` of ``data`` bytes came to what this disk and CPU allow.

    The shuffle moved ``disk_read_bytes + disk_write_bytes``; at the rate the disk reaches
    reading and writing at once (``mixed_gb_per_s``) that takes ``io_bound_s``, and a shuffle
    taking that long reaches ``io_bound_ratio`` = baseline write time / ``io_bound_s``
    against the durable sequential write (a reference more than a hard limit: reads and
    writes done at separate times go a little faster than together on this disk).
    ``cpu_bound_s`` is its CPU time spread over the cores other programs left free (the
    shuffle runs beside them, not instead of them); the larger of the two bounds is what
    binds."""
    io_s = (run["disk_read_bytes"] + run["disk_write_bytes"]) / (mixed_gb_per_s * common.GB)
    cpu_s = run["cpu_s"] / max(free_cores, 0.1)
    return {"io_bound_s": io_s, "cpu_bound_s": cpu_s,
            "io_bound_ratio": data / (write_gb_per_s * common.GB) / io_s if io_s else float("inf"),
            "shuffle_over_io_bound": io_s / run["seconds"], "binds": "disk" if io_s >= cpu_s else "cpu"}


def main(argv=None) -> dict[str, Any]:
    args = parse_args(argv)
    started = time.perf_counter()
    with common.scratch_run(args, "shuffle-quality-") as (root, desc):
        base = common.baseline_rss()
        with common.CpuLoad() as load:
            q = quality(args, root) if "quality" in args.only else None
            t = throughput(args, root) if "throughput" in args.only else None
            s = write_shuffle(args, root, base["anon_rss_bytes"]["median"]) if "write-shuffle" in args.only else None
    b = args.batch_size
    targets = []
    if q is not None:
        uni = q["W = 1"]["uniform"]["batch_tv"]["median"]
        best_w8 = q["W = 8"]["reader"]["effective_batch"]["median"]
        vif_worst = max((q[f"W = {w}"]["vif_vs_formula"] for w in WINDOWS), key=lambda v: abs(v - 1))
        targets += [(f"{name.replace(' = ', '=')}: batch TV / uniform's (<= 2)", q[name]["reader"]["batch_tv"]["median"] / uni,
                     verdict(q[name]["reader"]["batch_tv"]["median"] / uni, 2.0, higher_is_better=False))
                    for name in ("write shuffle + W = 1", "segment shuffle + W = 1")]
        targets += [
            ("W=8 (8-block budget): effective batch / b (>= 0.5)", best_w8 / b, verdict(best_w8 / b, 0.5)),
            ("measured VIF / formula, worst of W=1..8 (within 10%)", vif_worst,
             "MET" if abs(vif_worst - 1) <= 0.1 else "MISSED"),
        ]
    if t is not None:
        targets.append(("read W=8 / W=1 (>= 0.90)", t["w8_over_w1"]["median"], verdict(t["w8_over_w1"]["median"], 0.9)))
    if s is not None:
        worst_ratio = min(r["shuffle_over_disk"]["median"] for r in s)
        worst_rss = max(r["peak_rss_over_budget"]["max"] for r in s)
        targets += [
            (f"write-time shuffle ({args.shuffle_method}) / durable sequential write, worst size (>= 0.30)", worst_ratio,
             verdict(worst_ratio, 0.3)),
            (f"write-time shuffle ({args.shuffle_method}): peak RSS / budget, worst run of every size (<= 1)", worst_rss,
             verdict(worst_rss, 1.0, higher_is_better=False)),
        ]
    result = {
        "machine": desc, "other_load": load.result(), "baseline_rss": base,
        "settings": {k: getattr(args, k) for k in ("rows", "block_rows", "batch_size", "repeats", "read_mib",
                                                     "read_block_mib", "shuffle_mib", "shuffle_block_mib",
                                                     "memory_limit_mib", "shuffle_method", "only")},
        "quality": q, "throughput": t, "write_shuffle": s,
        "targets": {k: {"value": v, "verdict": ok} for k, v, ok in targets},
    }
    if q is not None:
        rows = []
        for name, r in q.items():
            g = r["reader"]
            rows.append((name, fmt(g["batch_tv"], digits=3), fmt(g["vif"], digits=1), f"{r['predicted_vif']:.1f}",
                         fmt(g["effective_batch"], digits=1), fmt(g["drift_tv"], digits=3),
                         fmt(g["rank_correlation"], digits=3),
                         f"{g['adjacent_same_batch']['median']:.2g} / {r['adjacent_same_batch_uniform']:.2g}"))
        u = q["W = 1"]["uniform"]
        rows.append(("uniform shuffle", fmt(u["batch_tv"], digits=3), fmt(u["vif"], digits=2), "1.0",
                     fmt(u["effective_batch"], digits=1), fmt(u["drift_tv"], digits=3), fmt(u["rank_correlation"], digits=3),
                     f"{u['adjacent_same_batch']['median']:.2g}"))
        result["table"] = print_table(
            ["order", "batch TV", "VIF", "1+rho(b-1)/W", "b/VIF", "drift TV", "rank corr", "P(adjacent same batch) / uniform"],
            rows, title=f"y-sorted store, {args.rows:,} rows in {args.rows // args.block_rows} blocks of "
                        f"{args.block_rows:,}, batch {b}, label = decile of y, rho = {q['W = 1']['rho']:.3f}; "
                        f"median [min-max] of {args.repeats} epochs",
        )
    if t is not None:
        print_table(["read", "rows/s"], [(k, fmt(v, 1e-6) + " M") for k, v in t["rows_per_s"].items()]
                    + [("W=8 / W=1", fmt_ratio(t["w8_over_w1"]))],
                    title=f"ShardedDataset, {t['blocks']} blocks of {t['block_rows']:,} rows (d=16), batch {b}, warm cache")
    if s is not None:
        limit = "" if args.memory_limit_mib is None else f", each shuffle in a memory cgroup of {args.memory_limit_mib} MiB"
        result["write_shuffle_table"] = print_table(
            ["store", "shuffle GB/s", "block files+fsync GB/s", "ratio", "scatter share", "peak anon RSS MiB",
             "budget MiB", "CPU-s / GB", "disk written / read per byte", "other load (cores)",
             "disk read / read+write at once GB/s", "I/O-bound ratio", "shuffle / I/O bound", "binds"],
            [(f"{r['mib'] / 1024:g} GiB, {r['blocks']} blocks", fmt(r["shuffle_gb_per_s"]), fmt(r["disk_write_gb_per_s"]),
              fmt_ratio(r["shuffle_over_disk"]), fmt(r["scatter_share_of_time"]),
              fmt(r["peak_rss_bytes_over_baseline"], 1 / common.MiB, digits=0), f"{r['rss_budget_bytes'] / common.MiB:.0f}",
              fmt(r["shuffle_cpu_s_per_gb"], digits=1),
              f"{r['disk_written_per_byte']['median']:.2f} / {r['disk_read_per_byte']['median']:.2f}",
              fmt(r["other_busy_cores_during_shuffle"], digits=1),
              f"{fmt(r['disk_read_gb_per_s'])} / {fmt(r['disk_mixed_gb_per_s'])}", fmt(r["io_bound_ratio"]),
              fmt(r["shuffle_over_io_bound"]), "/".join(r["binds"])) for r in s],
            title=f"write-time shuffle (shuffle_store, both passes on all cores, input evicted), blocks of "
                  f"{args.shuffle_block_mib} MiB = B, R = B / 68 rows; peak anonymous RSS of the largest process over a "
                  f"fresh interpreter's; budget max(2 B + 26 R, 3 B + 12 R + min(B, 4 MiB)) + 8 MiB per process "
                  f"(shuffle_rss_budget; the third B: the writer's padded copy of a short last block); "
                  f"I/O-bound ratio: the ratio a shuffle moving the measured bytes at the read+write rate "
                  f"would reach; binds: disk or CPU, per round; "
                  f"RAM {desc['ram_total_gib']} GiB"
                  f"{limit}",
        )
    print_table(["target", "value", "verdict"], [(k, f"{v['value']:.3g}", v["verdict"]) for k, v in result["targets"].items()])
    return common.finish(args, result, plot, started)


def plot(args, result: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    q, s = result["quality"], result["write_shuffle"]
    panels = (2 if q is not None else 0) + (1 if s is not None else 0)
    fig, axes = plt.subplots(1, panels, figsize=(5.7 * panels, 4.5), squeeze=False)
    if q is not None:
        _plot_quality(q, result["settings"]["batch_size"], *axes[0][:2])
    if s is not None:
        _plot_write_shuffle(s, axes[0][-1])
    fig.suptitle("Shuffle quality on a y-sorted store (label = decile of y); write-time shuffle vs size"
                 if q is not None else "Write-time shuffle vs store size")
    common.save_plot(fig, args.name, dpi=120)


def _plot_quality(q: dict[str, Any], b: int, a1, a2) -> None:
    ws = np.array(WINDOWS)
    measured = [q[f"W = {w}"]["reader"]["vif"] for w in WINDOWS]
    med, lo, hi = zip(*(common.errbar(m) for m in measured))
    a1.errorbar(ws, med, yerr=[lo, hi], fmt="o", capsize=3, label="measured (y-sorted store)")
    a1.plot(ws, [q[f"W = {w}"]["predicted_vif"] for w in WINDOWS], "-", label="1 + rho (b - 1) / W")
    a1.axhline(q["write shuffle + W = 1"]["reader"]["vif"]["median"], color="tab:green", ls="--", label="write shuffle + W = 1")
    a1.axhline(q["segment shuffle + W = 1"]["reader"]["vif"]["median"], color="tab:purple", ls="-.",
               label="segment shuffle + W = 1")
    a1.axhline(2, color="gray", ls=":", label="effective batch b/2")
    a1.set_xscale("log", base=2)
    a1.set_yscale("log")
    a1.set_xlabel("window W (blocks)")
    a1.set_ylabel(f"VIF of batch label proportions (b = {b})")
    a1.legend(fontsize=8)
    for name, r in q.items():
        tv = r["tv_by_position"]
        a2.plot((np.arange(len(tv)) + 0.5) / len(tv), tv, marker=".", label=name)
    a2.axhline(q["W = 1"]["uniform"]["batch_tv"]["median"], color="black", ls=":", label="uniform shuffle")
    a2.set_xlabel("position in the epoch")
    a2.set_ylabel("mean batch label TV")
    a2.set_yscale("log")
    a2.legend(fontsize=7)


def _plot_write_shuffle(s: list[dict[str, Any]], a3) -> None:
    gib = [r["mib"] / 1024 for r in s]
    for key, label in (("shuffle_gb_per_s", "shuffle_store"), ("disk_write_gb_per_s", "block files written + fsynced"),
                       ("io_bound_gb_per_s", "I/O bound: its disk bytes at the read+write rate")):
        med, lo, hi = zip(*(common.errbar(r[key]) for r in s))
        a3.errorbar(gib, med, yerr=[lo, hi], fmt="o-", capsize=3, label=f"{label} (GB/s)")
    a3.set_xscale("log", base=2)
    a3.set_xlabel("store size (GiB)")
    a3.set_ylabel("GB/s of data")
    a3.set_ylim(bottom=0)
    a3.legend(fontsize=8, loc="upper left")
    r3 = a3.twinx()
    med, lo, hi = zip(*(common.errbar(r["peak_rss_bytes_over_baseline"], 1 / common.MiB) for r in s))
    r3.errorbar(gib, med, yerr=[lo, hi], fmt="s--", color="tab:red", capsize=3, label="peak RSS over interpreter")
    r3.plot(gib, [r["rss_budget_bytes"] / common.MiB for r in s], ":_", color="tab:red", markersize=14, label="RSS budget")
    r3.set_ylabel("MiB per process")
    r3.set_ylim(0, 1.25 * max(r["rss_budget_bytes"] for r in s) / common.MiB)
    r3.legend(fontsize=8, loc="lower right")
    a3.set_title("write-time shuffle", fontsize=10)


if __name__ == "__main__":
    main()
