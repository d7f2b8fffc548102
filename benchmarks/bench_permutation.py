"""Permutation benchmark: :class:`shardset.FeistelPermutation` indices per second.

Run from the repository root::

    python -m benchmarks.bench_permutation            # ~1 minute
    python -m benchmarks.bench_permutation --quick    # smoke run, a few seconds

One core, pure numpy: the process is pinned to a single CPU while it measures
(numpy's element-wise kernels are single-threaded, and no BLAS call is timed).

Measured for n in {2^20, 2^32, 2^40, 2^40+1, 3*2^38, 2^62}, for array sizes
64K and 4M, forward (``p(x)``) and inverse (``p.inverse(x)``), on random
positions uniform in ``[0, n)`` drawn before timing.  One run processes 4M
indices: a single 4M call, or 64 calls on consecutive 64K slices of the same
4M input.  Every figure is the median of ``--repeats`` runs (default 5) with
min and max; runs are interleaved in rounds (each round measures every figure
once), so slow phases of a noisy machine hit all figures alike, and a
warm-up round is discarded.

Reference in the same rounds: ``np.random.default_rng(0).permutation(2**22)``,
per element (materializes the whole permutation; a different tool, given only
as a yardstick for "numpy speed per element").

Results: ``benchmarks/results/<name>.json`` and ``benchmarks/plots/<name>.png``
(default name ``permutation``).  Target: 20 M indices/s at n <= 2^40.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import platform
import time
from typing import Any, Callable, Iterator

import numpy as np

from shardset.permutation import FeistelPermutation

from . import common
from .common import fmt, print_table, summarize

TARGET_INDICES_PER_S = 20e6
TARGET_MAX_N = 2**40

NS: list[tuple[str, int]] = [
    ("2^20", 2**20),
    ("2^32", 2**32),
    ("2^40", 2**40),
    ("2^40+1", 2**40 + 1),
    ("3*2^38", 3 * 2**38),
    ("2^62", 2**62),
]
SIZES: list[tuple[str, int]] = [("64K", 1 << 16), ("4M", 1 << 22)]
DIRECTIONS = ("forward", "inverse")
REFERENCE_N = 2**22

NOTES = [
    "indices/s = indices mapped / wall time of the calls (time.perf_counter), one core "
    "(sched_setaffinity to a single CPU), pure numpy.",
    "Each run maps 4M (2^22) random positions uniform in [0, n): one call on the 4M array, or 64 calls on its "
    "consecutive 64K slices. Figures are median [min-max] of the runs; runs are interleaved in rounds and "
    "the warm-up round(s) are discarded.",
    "walk factor = 2^width / n: the expected number of passes through the 8-round network per index "
    "(cycle walking re-applies the network to values that land in [n, 2^width)); 2^40+1 needs width 41, "
    "so about 2 passes per index.",
    "reference: np.random.default_rng(0).permutation(2^22) per element (generator construction included); "
    "it materializes a table of n entries, which the Feistel permutation avoids.",
    "indices/CPU-s divides by the CPU time of the benchmark thread (time.thread_time) instead of wall time: "
    "on a shared machine it discounts the time the process waited for the core (cache and memory-bandwidth "
    "contention still count). The target verdict uses the wall-clock median.",
    "The machine is shared and noisy (see machine.loadavg_at_start): compare figures within one run "
    "(same rounds) rather than across runs.",
]


@contextlib.contextmanager
def one_cpu() -> Iterator[int | None]:
    """This process pinned to one CPU of its affinity set (the CPU id; None where it cannot
    be pinned), and its affinity restored afterwards (a caller in the same process, such
    as the test suite, keeps its cores)."""
    try:
        before = os.sched_getaffinity(0)
        cpu = max(before)  # the last one: CPU 0 tends to take more interrupts
        os.sched_setaffinity(0, {cpu})
    except (AttributeError, OSError):
        yield None
        return
    try:
        yield cpu
    finally:
        os.sched_setaffinity(0, before)


class Case:
    """One (n, size, direction) figure: a callable that performs one run and its inputs."""

    def __init__(self, label: str, n: int, size_label: str, size: int, direction: str, x: np.ndarray):
        self.label, self.n, self.size_label, self.size, self.direction = label, n, size_label, size, direction
        self.p = FeistelPermutation(n, seed=1234, epoch=5)
        self.fn: Callable[[np.ndarray], np.ndarray] = self.p if direction == "forward" else self.p.inverse
        self.x = x
        self.slices = [x[s : s + size] for s in range(0, x.size, size)]
        self.rates: list[float] = []  # indices per wall-clock second
        self.cpu_rates: list[float] = []  # indices per CPU second of this thread
        self.warm_rates: list[float] = []

    @property
    def key(self) -> str:
        return f"{self.label}/{self.size_label}/{self.direction}"

    def run_once(self) -> tuple[float, float]:
        """Map all 4M indices once; returns (indices per wall second, per CPU second)."""
        fn = self.fn
        c0, t0 = time.thread_time(), time.perf_counter()
        for part in self.slices:
            fn(part)
        dt, dc = time.perf_counter() - t0, time.thread_time() - c0
        return self.x.size / dt, self.x.size / max(dc, 1e-9)


def reference_run(n: int) -> float:
    t0 = time.perf_counter()
    np.random.default_rng(0).permutation(n)
    return n / (time.perf_counter() - t0)


def check_correctness(n: int, x: np.ndarray) -> None:
    """Cheap sanity check before timing: in range and inverse(forward(x)) == x."""
    p = FeistelPermutation(n, seed=1234, epoch=5)
    part = x[: 1 << 14]
    y = p(part)
    assert int(y.min()) >= 0 and int(y.max()) < n, n
    assert np.array_equal(p.inverse(y), part), n


def parse_args(argv=None) -> argparse.Namespace:
    ap = common.arg_parser("bench_permutation", __doc__, repeats=5, data_dir=False)
    ap.add_argument("--warmup", type=int, default=1, help="discarded warm-up rounds (default 1)")
    return common.parse_args(ap, argv)


def main(argv=None) -> dict[str, Any]:
    args = parse_args(argv)
    if (res := common.replot(args, plot)) is not None:
        return res
    started = time.perf_counter()
    desc = common.machine_description()  # before pinning: it reports the cores available
    desc.setdefault("platform", platform.platform())
    desc.setdefault("numpy", np.__version__)
    with one_cpu() as cpu:
        return _measure(args, desc, cpu, started)


def _measure(args, desc: dict[str, Any], cpu: int | None, started: float) -> dict[str, Any]:
    print(f"machine: {common.describe_machine_line(desc)}")
    print(f"pinned to CPU {cpu}; numpy {np.__version__}\n", flush=True)

    total = 1 << 18 if args.quick else 1 << 22
    sizes = [(lbl, min(s, total)) for lbl, s in SIZES]
    rng = np.random.default_rng(20240601)
    cases: list[Case] = []
    for label, n in NS:
        x = rng.integers(0, n, size=total, dtype=np.int64)
        check_correctness(n, x)
        for size_label, size in sizes:
            for direction in DIRECTIONS:
                cases.append(Case(label, n, size_label, size, direction, x))
    ref_n = REFERENCE_N if not args.quick else 1 << 18
    ref_rates: list[float] = []
    ref_warm: list[float] = []

    for r in range(args.warmup + args.repeats):
        warm = r < args.warmup
        tag = "warm-up" if warm else f"round {r - args.warmup + 1}/{args.repeats}"
        t_round = time.perf_counter()
        for c in cases:
            wall, cpu_rate = c.run_once()
            if warm:
                c.warm_rates.append(wall)
            else:
                c.rates.append(wall)
                c.cpu_rates.append(cpu_rate)
        (ref_warm if warm else ref_rates).append(reference_run(ref_n))
        slowest = min(cases, key=lambda c: (c.warm_rates if warm else c.rates)[-1])
        print(
            f"[{tag}] {time.perf_counter() - t_round:.1f} s; slowest {slowest.key} "
            f"{(slowest.warm_rates if warm else slowest.rates)[-1] / 1e6:.1f} M/s; "
            f"reference {(ref_warm if warm else ref_rates)[-1] / 1e6:.1f} M/s",
            flush=True,
        )

    result = analyse(args, desc, cpu, cases, ref_rates, ref_n, total)
    common.finish(args, result, plot, started)
    return result


def analyse(args, desc, cpu, cases: list[Case], ref_rates, ref_n, total) -> dict[str, Any]:
    ref = summarize(ref_rates)
    rows, table = [], []
    for c in cases:
        s = summarize(c.rates)
        sc = summarize(c.cpu_rates)
        width = FeistelPermutation(c.n).width
        applies = c.n <= TARGET_MAX_N
        meets = (s["median"] >= TARGET_INDICES_PER_S) if applies else None
        rows.append(
            {
                "n": c.n,
                "n_label": c.label,
                "width": width,
                "walk_factor": 2**width / c.n,
                "array_size": c.size,
                "array_size_label": c.size_label,
                "direction": c.direction,
                "indices_per_run": int(c.x.size),
                "calls_per_run": len(c.slices),
                "indices_per_s": s,
                "indices_per_cpu_s": sc,
                "vs_reference": s["median"] / ref["median"] if ref["median"] else None,
                "target_applies": applies,
                "meets_target": meets,
            }
        )
        table.append(
            [
                c.label, width, f"{2**width / c.n:.2f}", c.size_label, c.direction, fmt(s, 1e-6, 1), fmt(sc, 1e-6, 1),
                f"{s['median'] / ref['median']:.2f}x", ("MET" if meets else "MISSED") if applies else "n/a",
            ]
        )
    table.append(["ref", "-", "-", f"{ref_n >> 20}M" if ref_n >= 1 << 20 else str(ref_n), "rng.permutation",
                  fmt(ref, 1e-6, 1), "-", "1.00x", "-"])
    print()
    print_table(
        ["n", "width", "walk", "array", "direction", "M indices/s (wall)", "M indices/CPU-s", "vs ref", "target 20M/s"],
        table,
        title=f"FeistelPermutation, one core (CPU {cpu}), median [min-max] of {args.repeats} runs",
    )
    covered = [r for r in rows if r["target_applies"]]
    worst = min(covered, key=lambda r: r["indices_per_s"]["median"]) if covered else None
    all_met = all(r["meets_target"] for r in covered) if covered else None
    if worst is not None:
        print(
            f"target {TARGET_INDICES_PER_S / 1e6:.0f} M indices/s at n <= 2^40: "
            f"{'MET' if all_met else 'MISSED'} (slowest covered figure: {worst['n_label']} "
            f"{worst['array_size_label']} {worst['direction']} {worst['indices_per_s']['median'] / 1e6:.1f} M/s)"
        )
    return {
        "benchmark": "permutation",
        "description": "FeistelPermutation indices per second on one core (pure numpy), forward and inverse",
        "machine": desc,
        "pinned_cpu": cpu,
        "config": {
            "repeats": args.repeats,
            "warmup_rounds": args.warmup,
            "quick": bool(args.quick),
            "indices_per_run": total,
            "array_sizes": {lbl: s for lbl, s in SIZES},
            "ns": {lbl: n for lbl, n in NS},
            "key": {"seed": 1234, "epoch": 5, "domain": "block-order", "stream": 0},
            "inputs": "random positions uniform in [0, n), int64, numpy default_rng(20240601)",
            "rounds_in_network": _rounds(),
        },
        "target": {
            "indices_per_s": TARGET_INDICES_PER_S,
            "applies_to": "n <= 2**40 (every array size and direction)",
            "met": all_met,
            "slowest_covered": None
            if worst is None
            else {
                "n_label": worst["n_label"],
                "array_size_label": worst["array_size_label"],
                "direction": worst["direction"],
                "median_indices_per_s": worst["indices_per_s"]["median"],
            },
        },
        "reference": {
            "what": f"np.random.default_rng(0).permutation({ref_n}) per element",
            "n": ref_n,
            "indices_per_s": ref,
        },
        "results": rows,
        "notes": NOTES,
    }


def _rounds() -> int:
    from shardset import permutation

    return int(permutation.ROUNDS)


def plot(args, res: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = res["results"]
    labels = [lbl for lbl, _ in NS]
    series = [(s, d) for s, _ in SIZES for d in DIRECTIONS]
    colors = {("64K", "forward"): "#9ecae1", ("4M", "forward"): "#1f77b4",
              ("64K", "inverse"): "#fdae6b", ("4M", "inverse"): "#e6550d"}  # fmt: skip
    fig, ax = plt.subplots(figsize=(11, 5.5))
    width = 0.8 / len(series)
    for j, (size_label, direction) in enumerate(series):
        vals, cpu_meds = [], []
        for lbl in labels:
            row = next(r for r in rows if r["n_label"] == lbl and r["array_size_label"] == size_label
                       and r["direction"] == direction)  # fmt: skip
            vals.append(common.errbar(row["indices_per_s"], 1e-6))
            cpu_meds.append(row["indices_per_cpu_s"]["median"] / 1e6)
        xs = [i + (j - (len(series) - 1) / 2) * width for i in range(len(labels))]
        ax.bar(xs, [v[0] for v in vals], width, yerr=[[v[1] for v in vals], [v[2] for v in vals]], capsize=2,
               color=colors.get((size_label, direction)), label=f"{direction}, {size_label} arrays")  # fmt: skip
        ax.plot(xs, cpu_meds, "D", color="k", mfc="w", ms=4, ls="none", label="per CPU-second (median)" if j == 0 else None)
    ax.axhline(TARGET_INDICES_PER_S / 1e6, color="k", ls="--", lw=1, label="target 20 M/s (n <= 2^40)")
    ref = res["reference"]["indices_per_s"]["median"]
    ax.axhline(ref / 1e6, color="#2ca02c", ls=":", lw=1.5,
               label=f"rng.permutation(2^{int(math.log2(res['reference']['n']))}) {ref / 1e6:.0f} M/s")  # fmt: skip
    ax.set_xticks(range(len(labels)))
    ax.set_xticklabels([f"n={lbl}\n(walk {2 ** FeistelPermutation(n).width / n:.2f})" for lbl, n in NS])
    ax.set_ylabel("M indices / wall s (median, bars min-max)")
    ax.legend(fontsize=8, loc="upper center", ncol=3)
    m = res["machine"]
    ax.set_title(
        f"FeistelPermutation, one core, pure numpy {m['versions'].get('numpy')}: {m['cpu_model']}, "
        f"{m['cpu_affinity_cores']} cores (run pinned to CPU {res['pinned_cpu']}), {m['date']}; median of {res['config']['repeats']} runs",
        fontsize=9,
    )
    top = max(max(r["indices_per_s"]["max"], r["indices_per_cpu_s"]["median"]) for r in rows) / 1e6
    ax.set_ylim(0, max(top, ref / 1e6, TARGET_INDICES_PER_S / 1e6) * 1.45)
    common.save_plot(fig, args.name)


if __name__ == "__main__":
    main()
