"""Soak: stream many epochs through DataLoader workers; memory must not grow and every
epoch must hand out every row exactly once.

Run from the repository root::

    python -m benchmarks.soak            # 3 soaks of 20 epochs, 500K rows (~5 minutes on 2 quiet cores)
    python -m benchmarks.soak --quick    # 3 soaks of 20 epochs, 100K rows

One soak: a store of ``--rows`` rows (an ``id`` field numbering the rows and 16
float32 features, ``--blocks`` blocks) is read by ``ShardedDataset`` through
``DataLoader(num_workers=2, persistent_workers=True)`` for ``--epochs`` epochs,
the epoch advancing by itself.  After every epoch the script checks that the ids
seen are exactly ``0 .. N-1`` once each and that the order differs from the
previous epoch, and samples the RSS of the whole process tree (main process plus
workers).  Growth is the RSS after the last epoch over the RSS after the
``--warmup`` epochs (default 3: the workers' RSS steps up by a few MiB over the
first epochs as their allocator settles, then stays flat), in percent; its
median, min and max over ``--repeats`` soaks are reported (target: under 1%),
next to the growth counted from the first epoch and a least-squares slope over
the epochs after the warm-up.

Results: ``benchmarks/results/<name>.json`` and ``benchmarks/plots/<name>.png``
(default name ``soak``).
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from . import common
from .common import fmt, print_table, summarize, verdict

TARGET_GROWTH_PCT = 1.0


def _tree_rss(psutil) -> int:
    me = psutil.Process()
    total = me.memory_info().rss
    for child in me.children(recursive=True):
        try:
            total += child.memory_info().rss
        except psutil.Error:
            pass
    return total


def soak(path: str, rows: int, epochs: int, batch_size: int, workers: int, warmup: int) -> dict[str, Any]:
    import psutil
    import torch

    from shardset import ShardedDataset

    ds = ShardedDataset(path, batch_size, seed=1, fields=["id", "x"])
    loader = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=workers, persistent_workers=True)
    rss, seconds, exactly_once, first_ids = [], [], [], None
    for epoch in range(epochs):
        start = time.perf_counter()
        counts = np.zeros(rows, dtype=np.int64)
        head = None
        for batch in loader:
            ids = batch["id"].numpy()
            counts += np.bincount(ids, minlength=rows)
            head = ids[:16].copy() if head is None else head
        seconds.append(time.perf_counter() - start)
        exactly_once.append(bool((counts == 1).all()) and ds.epoch == epoch + 1)
        if first_ids is not None and np.array_equal(first_ids, head):
            exactly_once[-1] = False  # the same order twice: the epoch did not advance
        first_ids = head
        rss.append(_tree_rss(psutil))
    del loader  # stops the persistent workers
    base = rss[min(warmup, len(rss)) - 1]
    steady = rss[warmup - 1 :]
    slope = float(np.polyfit(np.arange(len(steady)), steady, 1)[0]) if len(steady) > 1 else 0.0
    return {"rss_after_epoch": rss, "epoch_seconds": seconds, "exactly_once": exactly_once,
            "growth_pct": 100 * (rss[-1] - base) / base, "growth_from_first_pct": 100 * (rss[-1] - rss[0]) / rss[0],
            "slope_bytes_per_epoch": slope}


def make_store(root, rows: int, blocks: int) -> str:
    import shardset

    path = str(root / "soak.zarr")
    ids = np.arange(rows, dtype=np.int64)
    x = np.random.default_rng(0).standard_normal((rows, 16), dtype=np.float32)
    shardset.write(path, {"id": ids, "x": x}, block_rows=-(-rows // blocks), progress=False)
    return path


def plot(args, result: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for i, run in enumerate(result["runs"]):
        mib = np.array(run["rss_after_epoch"]) / 2**20
        ax.plot(np.arange(1, len(mib) + 1), mib, marker="o", ms=3, label=f"soak {i + 1}: {run['growth_pct']:+.2f}% "
                f"after epoch {result['args']['warmup']}")
    ax.set_xlabel("epoch")
    ax.set_ylabel("RSS of main process + workers after the epoch (MiB)")
    ax.set_title(f"{result['args']['rows']:,} rows, {result['args']['workers']} DataLoader workers")
    ax.legend()
    common.save_plot(fig, args.name, dpi=120)


def main(argv=None) -> dict[str, Any]:
    p = common.arg_parser("soak", __doc__)
    p.add_argument("--rows", type=int, default=None, help="rows in the store (default 500K; 100K with --quick)")
    p.add_argument("--blocks", type=int, default=16)
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=1024)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--warmup", type=int, default=3, help="epochs before the RSS baseline")
    args = common.parse_args(p, argv, {"rows": (500_000, 100_000)})
    if not 1 <= args.warmup < args.epochs:
        p.error("--warmup must be at least 1 and less than --epochs")
    if (res := common.replot(args, plot)) is not None:
        return res
    started = time.perf_counter()
    runs = []
    with common.scratch_run(args, "soak-") as (root, machine):
        path = make_store(root, args.rows, args.blocks)
        for i in range(args.repeats):
            runs.append(soak(path, args.rows, args.epochs, args.batch_size, args.workers, args.warmup))
            print(f"soak {i + 1}: growth {runs[-1]['growth_pct']:+.3f}% after the warm-up "
                  f"({runs[-1]['growth_from_first_pct']:+.3f}% from epoch 1), exactly once in "
                  f"{sum(runs[-1]['exactly_once'])}/{args.epochs} epochs", flush=True)
    growth = summarize([r["growth_pct"] for r in runs])
    from_first = summarize([r["growth_from_first_pct"] for r in runs])
    slope = summarize([r["slope_bytes_per_epoch"] / 2**10 for r in runs])
    epoch_s = summarize([float(np.median(r["epoch_seconds"])) for r in runs])
    all_once = all(all(r["exactly_once"]) for r in runs)
    print_table(
        ["figure", "median [min-max]", "target"],
        [
            [f"RSS growth, epoch {args.warmup} -> {args.epochs} (%)", fmt(growth, digits=3), f"< {TARGET_GROWTH_PCT}: "
             + verdict(growth["median"], TARGET_GROWTH_PCT, higher_is_better=False)],
            [f"RSS growth, epoch 1 -> {args.epochs} (%)", fmt(from_first, digits=3), "-"],
            [f"RSS slope after epoch {args.warmup} (KiB per epoch)", fmt(slope, digits=1), "-"],
            ["seconds per epoch", fmt(epoch_s), "-"],
            ["epochs exactly once", f"{sum(sum(r['exactly_once']) for r in runs)}/{args.epochs * len(runs)}",
             "all: " + ("met" if all_once else "MISSED")],
        ],
        title=f"soak: {args.epochs} epochs x {args.repeats}, {args.rows:,} rows, {args.workers} workers",
    )
    result = {"args": vars(args), "machine": machine, "runs": runs, "growth_pct": growth,
              "growth_from_first_pct": from_first,
              "slope_kib_per_epoch": slope, "epoch_seconds": epoch_s, "all_exactly_once": all_once,
              "target_growth_pct": TARGET_GROWTH_PCT}
    return common.finish(args, result, plot, started)


if __name__ == "__main__":
    main()
