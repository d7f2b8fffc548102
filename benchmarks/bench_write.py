"""Write benchmark: ``generate_regression`` throughput against the machine's limits.

Run from the repository root::

    python -m benchmarks.bench_write            # default, ~5-10 minutes
    python -m benchmarks.bench_write --quick    # ~1 minute smoke run

Measured in one invocation, in interleaved rounds (so slow phases of a noisy
machine hit every figure alike):

* limits: float32 N(0, 1) generation rate on one core into a preallocated buffer
  (torch ``Tensor.normal_`` with a ``torch.Generator``, numpy PCG64
  ``standard_normal(out=, dtype=float32)``), the same with two processes at once,
  ``np.copyto`` bandwidth of a 128 MiB buffer, and sequential write bandwidth with
  fsync (8 MiB ``os.write`` pieces, then one ``fsync``);
* ``generate_regression`` (d=16, 128 MB blocks) with workers=1 and workers=2:
  GB/s of stored bytes (wall time of the call, process start-up included), and
  the peak RSS of the writing processes (sampled every 50 ms) in blocks;
* sweeps with workers=1 over block_mb, d and the codec chain.

``generate_regression`` runs in a separate driver process (so its memory is not
mixed with the benchmark's own buffers); the limits run in this process.
Results go to ``benchmarks/results/<name>.json`` and ``benchmarks/plots/<name>.png``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from . import common
from .common import GB, GiB, MiB, fmt, fmt_ratio, print_table, ratio_summary, summarize
from shardset import bench as sbench

ROW_FLOATS_D16 = 17  # X (16 floats) + y (1 float)

NOTES = [
    "The writer fsyncs every block file (and its directory) before the block is recorded complete, "
    "so generate+write figures are durable-write throughput: the page cache cannot absorb the writes. "
    "Each run starts from a deleted store (deletion not timed).",
    "GB/s of generate_regression counts stored bytes (chunk files incl. crc32c trailers and the padded last block) "
    "over the wall time of the call, which includes creating the store and, for workers>1, starting the worker "
    "processes.",
    "The generator limit is per core: float32 into a preallocated, already touched buffer, one thread per process; "
    "'fastest per core' is, per round, the best of torch and numpy in this process and half the two-process aggregate "
    "(this VM's per-process rates differ). "
    "generate_regression draws X and y with torch mt19937 normal_ and adds y += X w (addmm).",
    "memcpy GB/s counts the bytes copied once (memory traffic is twice that).",
    "Two disk figures: --disk-gib (1 GiB) with one fsync at the end, and the main-run volume with an fsync every "
    "block (what the writer does). On this VM a 1 GiB write is absorbed faster than several GiB are sustained, so "
    "the sustained figure is the relevant limit for multi-GiB writes.",
    "Peak RSS is sampled every 50 ms with psutil over the driver process and its children; 'over baseline' "
    "subtracts the RSS of a fresh interpreter that imported numpy, torch, zarr and shardset (workers=1: of the "
    "driver itself after those imports). Forked workers share pages with the parent, and RSS counts shared "
    "pages in every process that maps them.",
    "Ratios are the median of the per-round ratios [their min-max] (ratio of the medians in parentheses); verdicts "
    "use the per-round median. Each round measures every "
    "figure once, back to back. Round 0 (warm-up) is discarded when --warmup 1: on this VM the first touch "
    "of fresh memory is several times slower than later use.",
]


# -- the driver process (runs generate_regression) --------------------------------------


GEN_KEY = "main thread: generate a block (normal_ X, y; addmm)"


class _Timers:
    def __init__(self) -> None:
        self.t: dict[str, float] = {}
        self.n: dict[str, int] = {}

    def add(self, key: str, dt: float) -> None:
        self.t[key] = self.t.get(key, 0.0) + dt
        self.n[key] = self.n.get(key, 0) + 1

    def as_dict(self) -> dict[str, dict[str, float]]:
        return {k: {"seconds": v, "calls": self.n[k]} for k, v in sorted(self.t.items())}


def _instrument_writer(timers: _Timers):
    """Wrap the in-process (workers=1) write path in timers by monkeypatching this process
    only: block generation, crc32c, writev, fsync of data / directories, completion records.
    Returns a function that undoes the patches."""
    import types

    import shardset.store as stm
    import shardset.synthetic as syn
    import shardset.writer as wrm

    undo = []

    def patch(obj, name, key):
        orig = getattr(obj, name, None)
        if orig is None:
            return

        def wrapper(*a, **k):
            t0 = time.perf_counter()
            try:
                return orig(*a, **k)
            finally:
                timers.add(key, time.perf_counter() - t0)

        setattr(obj, name, wrapper)
        undo.append(lambda: setattr(obj, name, orig))

    # the writer calls fill(block, out) into reused buffers when the source has it, else __call__
    patch(syn.RegressionBlocks, "fill" if hasattr(syn.RegressionBlocks, "fill") else "__call__", GEN_KEY)
    patch(stm.BlockStore, "write_block", "writer thread: write_block total")
    patch(stm, "_writev_all", "writer thread: writev (copy into the page cache)")
    patch(stm, "_fsync_dir", "writer thread: fsync of directories")
    patch(stm.BlockStore, "mark_complete", "main thread: mark_complete (attributes + fsync)")
    crc_mod = getattr(stm, "crc32c", None)
    if crc_mod is not None and hasattr(crc_mod, "crc32c"):
        proxy = types.SimpleNamespace(**{k: getattr(crc_mod, k) for k in dir(crc_mod) if not k.startswith("__")})
        orig_crc = crc_mod.crc32c

        def crc(data, *a):
            t0 = time.perf_counter()
            try:
                return orig_crc(data, *a)
            finally:
                timers.add("writer thread: crc32c", time.perf_counter() - t0)

        proxy.crc32c = crc
        stm.crc32c = proxy
        undo.append(lambda: setattr(stm, "crc32c", crc_mod))
    orig_fsync = os.fsync

    def fsync(fd):
        t0 = time.perf_counter()
        try:
            return orig_fsync(fd)
        finally:
            timers.add("fsync, all (data + directories + metadata)", time.perf_counter() - t0)

    os.fsync = fsync
    undo.append(lambda: setattr(os, "fsync", orig_fsync))
    del wrm
    return lambda: [u() for u in reversed(undo)]


def _driver_main() -> None:
    """Read JSON commands on stdin, run them, answer one JSON line each on the original stdout."""
    out = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)  # stray prints go to stderr, never into the result channel
    import psutil
    import torch  # noqa: F401  (counted in the baseline, as in the workers)

    import shardset
    from shardset import generate_regression

    proc = psutil.Process()
    out.write(json.dumps({"ready": True, "rss": proc.memory_info().rss}) + "\n")
    out.flush()
    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd.get("op") == "quit":
            break
        try:
            path = Path(cmd["path"])
            shutil.rmtree(path, ignore_errors=True)
            rss_before = proc.memory_info().rss
            timers = _Timers()
            undo = _instrument_writer(timers) if cmd.get("profile") else None
            with common.RssSampler(interval=cmd.get("rss_interval", 0.05)) as sampler:
                t0 = time.perf_counter()
                store = generate_regression(
                    path, rows=cmd["rows"], features=cmd["features"], block_mb=cmd["block_mb"], workers=cmd["workers"],
                    compression=cmd["compression"], checksum=cmd["checksum"], seed=cmd.get("seed", 0),
                    overwrite=True, progress=False,
                )
                dt = time.perf_counter() - t0
            if undo is not None:
                undo()
            lay = store.layout
            res = {
                "seconds": dt,
                "stored_bytes": store.nbytes_stored(),
                "logical_bytes": lay.rows * lay.row_bytes,
                "block_bytes": lay.block_rows * lay.row_bytes,
                "block_rows": lay.block_rows,
                "num_blocks": lay.num_blocks,
                "rss_before": rss_before,
                "rss": sampler.result(),
                "shardset_file": shardset.__file__,
            }
            if cmd.get("profile"):
                res["timers"] = timers.as_dict()
            shutil.rmtree(path, ignore_errors=True)
        except Exception as exc:  # reported to the benchmark, which stops
            res = {"error": f"{type(exc).__name__}: {exc}"}
        out.write(json.dumps(res) + "\n")
        out.flush()


class Driver:
    def __init__(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", "from benchmarks.bench_write import _driver_main; _driver_main()"],
            cwd=common.REPO_ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )
        hello = self._read()
        self.baseline_rss = hello["rss"]

    def _read(self) -> dict[str, Any]:
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the driver process exited (code {self.proc.wait()})")
        return json.loads(line)

    def run(self, **cmd: Any) -> dict[str, Any]:
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        res = self._read()
        if "error" in res:
            raise RuntimeError(f"generate_regression failed in the driver: {res['error']} (command {cmd})")
        return res

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write(json.dumps({"op": "quit"}) + "\n")
                self.proc.stdin.flush()
                self.proc.wait(timeout=60)
            except Exception:
                self.proc.kill()
                self.proc.wait()


# -- limits (this process) -------------------------------------------------------------------


class Limits:
    """Preallocated, pre-touched buffers for the per-core limits."""

    def __init__(self, buf_bytes: int) -> None:
        import numpy as np
        import torch

        self.np, self.torch = np, torch
        n = buf_bytes // 4
        self.t = torch.empty(n, dtype=torch.float32)
        self.a = np.empty(n, dtype=np.float32)
        self.b = np.empty(n, dtype=np.float32)
        self.gen = torch.Generator().manual_seed(1)
        self.rng = np.random.Generator(np.random.PCG64(1))
        # touch everything once (first touch of fresh memory is slow on this VM)
        self.t.normal_(generator=self.gen)
        self.rng.standard_normal(out=self.a, dtype=np.float32)
        np.copyto(self.b, self.a)

    def torch_normal(self, passes: int) -> float:
        before = self.torch.get_num_threads()
        self.torch.set_num_threads(1)
        try:
            t0 = time.perf_counter()
            for _ in range(passes):
                self.t.normal_(generator=self.gen)
            dt = time.perf_counter() - t0
        finally:
            self.torch.set_num_threads(before)
        return passes * self.t.numel() * 4 / dt / GB

    def numpy_normal(self, passes: int) -> float:
        t0 = time.perf_counter()
        for _ in range(passes):
            self.rng.standard_normal(out=self.a, dtype=self.np.float32)
        dt = time.perf_counter() - t0
        return passes * self.a.nbytes / dt / GB

    def memcpy(self, passes: int) -> float:
        t0 = time.perf_counter()
        for _ in range(passes):
            self.np.copyto(self.b, self.a)
        dt = time.perf_counter() - t0
        return passes * self.a.nbytes / dt / GB


def _gen_task(buf_bytes: int, passes: int, start_at: float) -> tuple[float, float, int]:
    """One process of the two-process generator limit: torch normal_ on one thread."""
    import torch

    torch.set_num_threads(1)
    t = torch.empty(buf_bytes // 4, dtype=torch.float32)
    g = torch.Generator().manual_seed(os.getpid())
    t.normal_(generator=g)  # first touch, untimed
    while time.time() < start_at:
        time.sleep(0.001)
    t0 = time.time()
    for _ in range(passes):
        t.normal_(generator=g)
    return t0, time.time(), passes * t.numel() * 4


def _noop() -> int:
    import torch  # noqa: F401

    return os.getpid()


def gen_two_processes(pool, buf_bytes: int, passes: int) -> float:
    start_at = time.time() + 0.5
    futs = [pool.submit(_gen_task, buf_bytes, passes, start_at) for _ in range(2)]
    res = [f.result() for f in futs]
    t0, t1 = min(r[0] for r in res), max(r[1] for r in res)
    return sum(r[2] for r in res) / (t1 - t0) / GB


# -- main --------------------------------------------------------------------------------------


def parse_args(argv=None) -> argparse.Namespace:
    p = common.arg_parser("bench_write", __doc__)
    p.add_argument("--gib", type=float, default=None, help="GiB of stored data for the workers=1/2 runs (default 4; quick 0.5)")
    p.add_argument("--sweep-gib", type=float, default=None, help="GiB per sweep run (default 1; quick 0.125)")
    p.add_argument("--disk-gib", type=float, default=None, help="GiB for the fsync write-bandwidth limit (default 1; quick 0.25)")
    p.add_argument("--gen-mib", type=int, default=128, help="buffer size of the generator and memcpy limits (MiB)")
    p.add_argument("--gen-passes", type=int, default=None, help="buffer fills per generator measurement (default 4; quick 2)")
    p.add_argument("--warmup", type=int, default=1, help="discarded rounds before the measured ones")
    p.add_argument("--features", type=int, default=16, help="d for the main runs")
    p.add_argument("--block-mb", type=int, default=128, help="block size of the main runs")
    p.add_argument("--block-mbs", default="64,128,256", help="block_mb sweep")
    p.add_argument("--ds", default="2,16,128,1024", help="d sweep")
    p.add_argument("--codecs", default="crc32c,none,lz4,zstd", help="codec sweep (crc32c = checksum only; none = checksum=False)")
    p.add_argument("--no-sweeps", action="store_true", help="only limits and the workers=1/2 runs")
    return common.parse_args(p, argv, {"gib": (4.0, 0.25), "sweep_gib": (1.0, 0.125), "disk_gib": (1.0, 0.25), "gen_passes": (4, 2)})


def codec_args(codec: str) -> dict[str, Any]:
    return {
        "crc32c": {"compression": None, "checksum": True},
        "none": {"compression": None, "checksum": False},
        "lz4": {"compression": "lz4", "checksum": True},
        "zstd": {"compression": "zstd", "checksum": True},
    }[codec]


def main(argv=None) -> dict[str, Any]:
    args = parse_args(argv)
    if (res := common.replot(args, plot)) is not None:
        return res
    started = time.perf_counter()
    with common.scratch_run(args, "write-") as (root, desc):
        print()
        print("baseline: fresh interpreter importing numpy, torch, zarr, shardset ...", flush=True)
        baseline = common.baseline_rss(3)
        base_rss = baseline["rss_bytes"]["median"]
        import_s = baseline["import_seconds"]["median"]

        import concurrent.futures as cf
        import multiprocessing as mp

        pool = cf.ProcessPoolExecutor(2, mp_context=mp.get_context("spawn"))
        [f.result() for f in [pool.submit(_noop) for _ in range(2)]]
        limits = Limits(args.gen_mib * MiB)
        driver = Driver()
        main_rows = common.rows_for(args.gib, args.features, args.block_mb)
        store_path = str(root / "store.zarr")
        keys = ["torch_normal", "numpy_normal", "gen_2proc", "memcpy", "disk_fsync", "disk_sustained", "w1", "w2", "load"]
        main_runs: dict[str, list] = {k: [] for k in keys}
        warm_runs: dict[str, list] = {k: [] for k in keys}
        disk_detail: list[dict] = []
        try:
            total_rounds = args.warmup + args.repeats
            for r in range(total_rounds):
                tag = "warm-up" if r < args.warmup else f"round {r - args.warmup + 1}/{args.repeats}"
                rec: dict[str, Any] = {}
                load = common.CpuLoad().__enter__()
                rec["torch_normal"] = limits.torch_normal(args.gen_passes)
                rec["numpy_normal"] = limits.numpy_normal(args.gen_passes)
                rec["gen_2proc"] = gen_two_processes(pool, args.gen_mib * MiB, args.gen_passes)
                rec["memcpy"] = limits.memcpy(args.gen_passes)
                disk = sbench.fsync_write(root, int(args.disk_gib * GiB))
                rec["disk_fsync"] = disk["gb_per_s"]
                sustained = sbench.fsync_write(root, int(args.gib * GiB), fsync_every=args.block_mb * MiB)
                rec["disk_sustained"] = sustained["gb_per_s"]
                for w in (1, 2):
                    rec[f"w{w}"] = driver.run(
                        path=store_path, rows=main_rows, features=args.features, block_mb=args.block_mb, workers=w,
                        compression=None, checksum=True,
                    )
                load.__exit__(None, None, None)
                rec["load"] = load.result()
                gbs = {w: rec[f"w{w}"]["stored_bytes"] / rec[f"w{w}"]["seconds"] / GB for w in (1, 2)}
                print(
                    f"[{tag}] torch normal_ {rec['torch_normal']:.3f} GB/s, numpy {rec['numpy_normal']:.3f}, "
                    f"2 procs {rec['gen_2proc']:.3f}, memcpy {rec['memcpy']:.2f}, disk+fsync {rec['disk_fsync']:.3f}, "
                    f"sustained {rec['disk_sustained']:.3f}, "
                    f"gen+write w1 {gbs[1]:.3f} GB/s, w2 {gbs[2]:.3f} GB/s; other load {rec['load']['other_busy_cores']:.2f} cores",
                    flush=True,
                )
                target = warm_runs if r < args.warmup else main_runs
                for k in keys:
                    target[k].append(rec[k])
                if r >= args.warmup:
                    disk_detail.append({"spec_1_fsync": disk, "sustained_fsync_per_block": sustained})

            sweep_runs: dict[str, list] = {}
            sweep_load: list[dict] = []
            sweep_cfgs: dict[str, dict[str, Any]] = {}
            if not args.no_sweeps:
                srows = lambda d, bm: common.rows_for(args.sweep_gib, d, bm)  # noqa: E731
                ref = {"features": 16, "block_mb": 128, "codec": "crc32c"}
                sweep_cfgs["ref"] = ref
                for bm in [int(x) for x in args.block_mbs.split(",")]:
                    if bm != 128:
                        sweep_cfgs[f"block_mb={bm}"] = {**ref, "block_mb": bm}
                for d in [int(x) for x in args.ds.split(",")]:
                    if d != 16:
                        sweep_cfgs[f"d={d}"] = {**ref, "features": d}
                for c in args.codecs.split(","):
                    if c != "crc32c":
                        sweep_cfgs[f"codec={c}"] = {**ref, "codec": c}
                sweep_runs = {k: [] for k in sweep_cfgs}
                for r in range(args.repeats):
                    line = []
                    load = common.CpuLoad().__enter__()
                    for k, cfg in sweep_cfgs.items():
                        res = driver.run(
                            path=store_path, rows=srows(cfg["features"], cfg["block_mb"]), features=cfg["features"], block_mb=cfg["block_mb"],
                            workers=1, **codec_args(cfg["codec"]),
                        )
                        sweep_runs[k].append(res)
                        line.append(f"{k} {res['stored_bytes'] / res['seconds'] / GB:.3f}")
                    load.__exit__(None, None, None)
                    sweep_load.append(load.result())
                    print(f"[sweep round {r + 1}/{args.repeats}] GB/s stored: " + ", ".join(line)
                          + f"; other load {sweep_load[-1]['other_busy_cores']:.2f} cores", flush=True)
            profile_runs: list[dict] = []
            prows = common.rows_for(args.sweep_gib, args.features, args.block_mb)
            for r in range(args.repeats):
                res = driver.run(path=store_path, rows=prows, features=args.features, block_mb=args.block_mb, workers=1,
                                 compression=None, checksum=True, profile=True)
                profile_runs.append(res)
                print(f"[profile {r + 1}/{args.repeats}] instrumented workers=1 run: {res['stored_bytes'] / res['seconds'] / GB:.3f} GB/s",
                      flush=True)
        finally:
            driver.close()
            pool.shutdown()

        result = analyse(args, desc, baseline, driver.baseline_rss, main_runs, warm_runs, disk_detail, sweep_runs, sweep_cfgs, import_s, base_rss)
        result["other_load_cores"] = {"main_rounds": main_runs["load"], "sweep_rounds": sweep_load,
                                      "median_main": summarize([x["other_busy_cores"] for x in main_runs["load"]])}
        result["breakdown_workers1"] = breakdown(profile_runs)
        print_breakdown(result["breakdown_workers1"])
        ol = result["other_load_cores"]["median_main"]
        print(f"other programs on this machine used {fmt(ol)} cores (median [min-max] over the measured rounds) "
              f"of {desc['cpu_affinity_cores']}; see other_load_cores in the JSON")
        common.finish(args, result, plot, started)
        return result


def _gbs(runs: list[dict], key: str = "stored_bytes") -> list[float]:
    return [r[key] / r["seconds"] / GB for r in runs]


def analyse(args, desc, baseline, driver_base_rss, main_runs, warm_runs, disk_detail, sweep_runs, sweep_cfgs, import_s, base_rss):
    w1, w2 = _gbs(main_runs["w1"]), _gbs(main_runs["w2"])
    # the fastest per-core rate seen in the round: one thread in this process (torch, numpy)
    # or half the aggregate of two processes generating at once
    fastest = [max(a, b, c / 2) for a, b, c in zip(main_runs["torch_normal"], main_runs["numpy_normal"], main_runs["gen_2proc"])]
    block_bytes = main_runs["w1"][0]["block_bytes"]
    res_limits = {k: summarize(main_runs[k]) for k in ("torch_normal", "numpy_normal", "gen_2proc", "memcpy", "disk_fsync", "disk_sustained")}
    res_limits["fastest_generator_per_core"] = summarize(fastest)

    # memory, in blocks over the interpreter baseline
    def mem(runs, workers):
        parent = [r["rss"]["parent_max_rss"] for r in runs]
        if workers == 1:
            gen_proc = parent
            over = [(p - driver_base_rss) / block_bytes for p in parent]
        else:
            # a short run's workers can exit between two samples: no figure then
            gen_proc = [r["rss"]["max_worker_rss"] for r in runs if r["rss"]["max_worker_rss"] is not None]
            over = [(p - base_rss) / block_bytes for p in gen_proc]
        return {
            "writer_process_peak_rss_bytes": summarize(gen_proc),
            "writer_process_peak_over_baseline_blocks": summarize(over),
            "parent_peak_rss_bytes": summarize(parent),
            "parent_peak_over_baseline_blocks": summarize([(p - driver_base_rss) / block_bytes for p in parent]),
            "per_process": [r["rss"]["processes"] for r in runs],
        }

    ratios = {
        "w1_over_fastest_generator": ratio_summary(w1, fastest),
        "w2_over_w1": ratio_summary(w2, w1),
        "w2_over_disk_fsync": ratio_summary(w2, main_runs["disk_fsync"]),
        "w1_over_disk_fsync": ratio_summary(w1, main_runs["disk_fsync"]),
        "w1_over_disk_sustained": ratio_summary(w1, main_runs["disk_sustained"]),
        "w2_over_disk_sustained": ratio_summary(w2, main_runs["disk_sustained"]),
        "w2_over_gen_2proc": ratio_summary(w2, main_runs["gen_2proc"]),
        "gen_2proc_over_torch_1proc": ratio_summary(main_runs["gen_2proc"], main_runs["torch_normal"]),
    }
    mem1, mem2 = mem(main_runs["w1"], 1), mem(main_runs["w2"], 2)
    disk_med = min(res_limits["disk_fsync"]["median"], res_limits["disk_sustained"]["median"])
    w1_med = statistics.median(w1)
    disk_limited = disk_med is not None and 2 * w1_med > 0.9 * disk_med
    fastest_med = statistics.median(fastest)
    reachable = disk_med is None or disk_med >= 0.70 * fastest_med
    targets = {
        "w1_over_fastest_generator>=0.70": {
            "value": ratios["w1_over_fastest_generator"]["median"], "target": 0.70,
            "verdict": common.verdict(ratios["w1_over_fastest_generator"]["median"], 0.70),
            "reachable_on_this_disk": reachable,
            "note": ("the disk's write+fsync bandwidth is at least 0.70 x the generator, so the target is reachable here"
                     if reachable else
                     f"probably unreachable on this disk: its lower write+fsync figure {disk_med:.3f} GB/s is < 0.70 x the "
                     f"generator {fastest_med:.3f} GB/s; compare workers=1 with the disk figures"),
        },
        "w2_over_w1>=1.6": {
            "value": ratios["w2_over_w1"]["median"], "target": 1.6,
            "verdict": common.verdict(ratios["w2_over_w1"]["median"], 1.6),
            "disk_is_limit": disk_limited,
            "note": ("2 x workers=1 exceeds 90% of the (lower) disk write+fsync figure, so the disk may be the limit; "
                     "see w2_over_disk_sustained" if disk_limited else
                     "both disk figures are above 2 x workers=1, so the disk is not the limit"),
            "w2_over_disk_fsync": ratios["w2_over_disk_fsync"]["median"],
            "w2_over_disk_sustained": ratios["w2_over_disk_sustained"]["median"],
        },
        "rss_per_worker_blocks<3": {
            "value_w1": mem1["writer_process_peak_over_baseline_blocks"]["max"],
            "value_w2": mem2["writer_process_peak_over_baseline_blocks"]["max"],
            "target": 3.0,
            "verdict": common.verdict(max((m["writer_process_peak_over_baseline_blocks"]["max"] for m in (mem1, mem2)),
                                          key=lambda v: -1.0 if v is None else v), 3.0, higher_is_better=False),
        },
    }
    # the target: generate+write >= 0.80 x min(generation rate x workers, disk write bandwidth), per round
    for w, got in ((1, w1), (2, w2)):
        bound = [min(f * w, d) for f, d in zip(fastest, main_runs["disk_sustained"])]
        ratio = ratio_summary(got, bound)
        ratios[f"w{w}_over_min_gen_x_workers_disk"] = ratio
        targets[f"w{w}_over_min(gen x workers, disk)>=0.80"] = {
            "value": ratio["median"], "target": 0.80, "verdict": common.verdict(ratio["median"], 0.80),
            "bound_gb_per_s": summarize(bound),
            "note": "per round: min(fastest generator per core x workers, sustained write+fsync with an fsync per block)"}
    main = {
        "rows": main_runs["w1"][0]["logical_bytes"] // (4 * (args.features + 1)),
        "features": args.features,
        "block_mb": args.block_mb,
        "block_bytes": block_bytes,
        "block_rows": main_runs["w1"][0]["block_rows"],
        "num_blocks": main_runs["w1"][0]["num_blocks"],
        "stored_bytes": main_runs["w1"][0]["stored_bytes"],
        "w1_gb_per_s": summarize(w1),
        "w2_gb_per_s": summarize(w2),
        "w1_seconds": summarize([r["seconds"] for r in main_runs["w1"]]),
        "w2_seconds": summarize([r["seconds"] for r in main_runs["w2"]]),
        "memory_w1": mem1,
        "memory_w2": mem2,
    }
    sweeps: dict[str, Any] = {}
    ref_runs = sweep_runs.get("ref", [])
    for k, runs in sweep_runs.items():
        g = _gbs(runs)
        sweeps[k] = {
            "config": sweep_cfgs[k],
            "rows": runs[0]["logical_bytes"] // (4 * (sweep_cfgs[k]["features"] + 1)),
            "block_rows": runs[0]["block_rows"],
            "num_blocks": runs[0]["num_blocks"],
            "stored_gb_per_s": summarize(g),
            "logical_gb_per_s": summarize(_gbs(runs, "logical_bytes")),
            "stored_over_logical": runs[0]["stored_bytes"] / runs[0]["logical_bytes"],
            "ratio_to_ref_logical": ratio_summary(_gbs(runs, "logical_bytes"), _gbs(ref_runs, "logical_bytes")),
            "peak_rss_over_baseline_blocks": summarize([(r["rss"]["parent_max_rss"] - driver_base_rss) / r["block_bytes"] for r in runs]),
        }
    result = {
        "benchmark": "write",
        "args": vars(args),
        "machine": desc,
        "notes": NOTES,
        "baseline_interpreter": baseline,
        "driver_baseline_rss_bytes": driver_base_rss,
        "limits_gb_per_s": res_limits,
        "disk_fsync_detail": disk_detail,
        "generate_regression": main,
        "ratios": ratios,
        "targets": targets,
        "sweeps_workers1": sweeps,
        "warmup_rounds_discarded": {
            k: (_gbs(v) if k in ("w1", "w2") else v) for k, v in warm_runs.items() if k != "load"
        },
    }
    print_report(result)
    return result


def print_report(res: dict[str, Any]) -> None:
    L = res["limits_gb_per_s"]
    g = res["generate_regression"]
    R = res["ratios"]
    T = res["targets"]
    print()
    print_table(
        ["figure", "GB/s median [min-max]"],
        [
            ["torch normal_ float32, 1 core (mt19937)", fmt(L["torch_normal"], digits=3)],
            ["numpy PCG64 standard_normal float32, 1 core", fmt(L["numpy_normal"], digits=3)],
            ["torch normal_, 2 processes at once (aggregate)", fmt(L["gen_2proc"], digits=3)],
            ["fastest per core: max(torch, numpy, 2 processes / 2) per round", fmt(L["fastest_generator_per_core"], digits=3)],
            ["np.copyto 128 MiB", fmt(L["memcpy"], digits=2)],
            [f"sequential write 8 MiB pieces + fsync ({res['args']['disk_gib']:g} GiB, one fsync)", fmt(L["disk_fsync"], digits=3)],
            [f"the same, {res['args']['gib']:g} GiB with an fsync every {res['args']['block_mb']} MiB (sustained, as the writer)",
             fmt(L["disk_sustained"], digits=3)],
            [f"generate_regression workers=1 (d={g['features']}, {g['block_mb']} MB blocks, {g['stored_bytes'] / GiB:.2f} GiB)",
             fmt(g["w1_gb_per_s"], digits=3)],
            ["generate_regression workers=2", fmt(g["w2_gb_per_s"], digits=3)],
        ],
        title="Write limits and generate+write throughput (stored bytes / wall time)",
    )
    notes = [T["w1_over_fastest_generator>=0.70"].get("note"), T["w2_over_w1>=1.6"].get("note")]
    print_table(
        ["ratio (same run)", "per-round median [min-max] (of medians)", "target", "verdict"],
        [
            ["workers=1 / fastest generator per core", fmt_ratio(R["w1_over_fastest_generator"]), ">= 0.70",
             T["w1_over_fastest_generator>=0.70"]["verdict"]],
            ["workers=2 / workers=1", fmt_ratio(R["w2_over_w1"]), ">= 1.6 (unless disk-bound)", T["w2_over_w1>=1.6"]["verdict"]],
            ["workers=2 / disk write+fsync", fmt_ratio(R["w2_over_disk_fsync"]), "", ""],
            ["workers=1 / disk write+fsync", fmt_ratio(R["w1_over_disk_fsync"]), "", ""],
            ["workers=2 / disk sustained", fmt_ratio(R["w2_over_disk_sustained"]), "", ""],
            ["workers=1 / disk sustained", fmt_ratio(R["w1_over_disk_sustained"]), "", ""],
            ["workers=2 / generator with 2 processes", fmt_ratio(R["w2_over_gen_2proc"]), "", ""],
            ["generator 2 processes / 1 process", fmt_ratio(R["gen_2proc_over_torch_1proc"]), "", ""],
        ],
        title="Ratios (verdicts on the median of the per-round ratios)",
    )
    for n in notes:
        if n:
            print(f"note: {n}")
    print()
    b = res["baseline_interpreter"]["rss_bytes"]
    m1, m2 = g["memory_w1"], g["memory_w2"]
    print_table(
        ["process", "peak RSS MiB", "over interpreter baseline, blocks", "target"],
        [
            ["interpreter + numpy/torch/zarr/shardset (fresh process)", fmt(b, 1 / MiB, 0), "-", ""],
            ["workers=1: the writing process", fmt(m1["writer_process_peak_rss_bytes"], 1 / MiB, 0),
             fmt(m1["writer_process_peak_over_baseline_blocks"]), "< 3"],
            ["workers=2: each worker process (max of the two)", fmt(m2["writer_process_peak_rss_bytes"], 1 / MiB, 0),
             fmt(m2["writer_process_peak_over_baseline_blocks"]), "< 3"],
            ["workers=2: parent", fmt(m2["parent_peak_rss_bytes"], 1 / MiB, 0), fmt(m2["parent_peak_over_baseline_blocks"]), ""],
        ],
        title=f"Peak RSS (block = {g['block_bytes'] / MiB:.1f} MiB; sampled every 50 ms); verdict: {T['rss_per_worker_blocks<3']['verdict']}",
    )
    if res["sweeps_workers1"]:
        rows = []
        for k, s in res["sweeps_workers1"].items():
            c = s["config"]
            rows.append([
                "reference" if k == "ref" else k, c["features"], c["block_mb"], c["codec"], s["num_blocks"],
                fmt(s["stored_gb_per_s"], digits=3), fmt(s["logical_gb_per_s"], digits=3), f"{s['stored_over_logical']:.3f}",
                fmt_ratio(s["ratio_to_ref_logical"]), fmt(s["peak_rss_over_baseline_blocks"]),
            ])
        print_table(
            ["config", "d", "block_mb", "codec", "blocks", "stored GB/s", "logical GB/s", "stored/logical", "vs reference (logical)",
             "peak RSS blocks"],
            rows,
            title="Sweeps, workers=1 (codec crc32c = checksum only; none = checksum=False)",
        )


def breakdown(runs: list[dict]) -> dict[str, Any]:
    """Seconds per run in each instrumented component (workers=1; the writer thread overlaps the main thread)."""
    if not runs:
        return {}
    keys = sorted({k for r in runs for k in r["timers"]})
    get = lambda r, k: r["timers"].get(k, {"seconds": 0.0})["seconds"]  # noqa: E731
    out: dict[str, Any] = {
        "stored_bytes": runs[0]["stored_bytes"],
        "num_blocks": runs[0]["num_blocks"],
        "wall_s": summarize([r["seconds"] for r in runs]),
        "gb_per_s": summarize([r["stored_bytes"] / r["seconds"] / GB for r in runs]),
        "components_s": {k: summarize([get(r, k) for r in runs]) for k in keys},
        "calls": {k: runs[0]["timers"].get(k, {}).get("calls") for k in keys},
    }
    gen = GEN_KEY
    wb = "writer thread: write_block total"
    out["derived"] = {
        "generation GB/s (stored bytes / generation time)": summarize([r["stored_bytes"] / max(1e-9, get(r, gen)) / GB for r in runs]),
        "write_block GB/s (stored bytes / write_block time)": summarize([r["stored_bytes"] / max(1e-9, get(r, wb)) / GB for r in runs]),
        "main thread not generating (waiting for the writer, store setup, completion records)": summarize(
            [r["seconds"] - get(r, gen) for r in runs]),
    }
    return out


def print_breakdown(b: dict[str, Any]) -> None:
    if not b:
        return
    rows = [[k, b["calls"].get(k), fmt(s)] for k, s in b["components_s"].items()]
    rows += [[k, "", fmt(s, digits=3 if "GB/s" in k else 2)] for k, s in b["derived"].items()]
    rows.append(["wall time of generate_regression", "", fmt(b["wall_s"])])
    print_table(["component (workers=1; generation and writing overlap on two threads)", "calls", "seconds [or GB/s]"], rows,
                title=f"Where a workers=1 run goes ({b['stored_bytes'] / GiB:.2f} GiB, {b['num_blocks']} blocks, timers)")


def plot(args, res: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(13, 9))
    L, g = res["limits_gb_per_s"], res["generate_regression"]
    items = [
        ("torch normal_ 1 core", L["torch_normal"]), ("numpy PCG64 1 core", L["numpy_normal"]),
        ("torch normal_ 2 procs", L["gen_2proc"]), ("memcpy", L["memcpy"]), ("disk write+fsync", L["disk_fsync"]),
        ("disk sustained (fsync/block)", L["disk_sustained"]),
        ("generate_regression w=1", g["w1_gb_per_s"]), ("generate_regression w=2", g["w2_gb_per_s"]),
    ]
    ax = axes[0][0]
    vals = [common.errbar(s) for _, s in items]
    ax.barh([n for n, _ in items], [v[0] for v in vals], xerr=[[v[1] for v in vals], [v[2] for v in vals]],
            color=["#999"] * 6 + ["#1f77b4", "#ff7f0e"], capsize=3)
    ax.set_xscale("log")
    common.log_axis(ax)
    ax.set_xlabel("GB/s (median, min-max)")
    ax.set_title(f"limits vs generate+write (d={g['features']}, {g['block_mb']} MB blocks)")
    ax.invert_yaxis()
    sw = res["sweeps_workers1"]
    if sw:
        def panel(ax, keys, labels, title):
            ss = [sw[k] for k in keys]
            st = [common.errbar(s["stored_gb_per_s"]) for s in ss]
            lg = [common.errbar(s["logical_gb_per_s"]) for s in ss]
            x = list(range(len(keys)))
            ax.bar([i - 0.2 for i in x], [v[0] for v in st], 0.4, yerr=[[v[1] for v in st], [v[2] for v in st]], capsize=3, label="stored")
            ax.bar([i + 0.2 for i in x], [v[0] for v in lg], 0.4, yerr=[[v[1] for v in lg], [v[2] for v in lg]], capsize=3, label="logical")
            ax.set_xticks(x)
            ax.set_xticklabels(labels)
            ax.set_ylabel("GB/s")
            ax.set_title(title)
            ax.legend()

        bms = sorted({s["config"]["block_mb"] for s in sw.values()})
        panel(axes[0][1], [("ref" if b == 128 else f"block_mb={b}") for b in bms], [f"{b} MB" for b in bms], "workers=1 vs block_mb (d=16)")
        ds = sorted({s["config"]["features"] for s in sw.values()})
        panel(axes[1][0], [("ref" if d == 16 else f"d={d}") for d in ds], [f"d={d}" for d in ds], "workers=1 vs d (128 MB blocks)")
        codecs = ["crc32c"] + [k.split("=", 1)[1] for k in sw if k.startswith("codec=")]
        panel(axes[1][1], [("ref" if c == "crc32c" else f"codec={c}") for c in codecs],
              ["checksum only" if c == "crc32c" else ("no checksum" if c == "none" else c) for c in codecs],
              "workers=1 vs codec (d=16, 128 MB blocks)")
    else:
        for ax in (axes[0][1], axes[1][0], axes[1][1]):
            ax.axis("off")
    m = res["machine"]
    fig.suptitle(f"bench_write ({args.name}): {m['cpu_model']}, {m['cpu_affinity_cores']} cores, "
                 f"{m['data_dir_filesystem'].get('fstype')}, {m['date']}; median of {args.repeats} runs, bars min-max", fontsize=10)
    common.save_plot(fig, args.name)


if __name__ == "__main__":
    main()
