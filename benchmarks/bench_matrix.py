"""Read matrix: block-shuffled ``ShardedDataset`` against plain sequential reads of the
same files, over block size, batch size, prefetch and DataLoader workers, warm and cold.

Run from the repository root::

    python -m benchmarks.bench_matrix            # 2 GiB stores of 64/128/256 MB blocks, ~6 minutes
    python -m benchmarks.bench_matrix --quick    # smoke run

One store per block size (d=16). Every configuration is one change from the
reference (128 MB blocks, batch 1024, prefetch 1, num_workers 0): block 64/256 MB,
batch 256/4096, prefetch 0/2, num_workers 1/2. Per round and cache state, the
plain read of the store's chunk files (buffered from the page cache when warm,
``O_DIRECT`` when cold: ``shardset.bench``) is measured right before the
configurations on that store, so each ratio compares figures taken back to back.
Configurations with workers run for ``--worker-seconds`` (a batch crossing
processes costs ~1 ms here, so a full epoch takes minutes); the others read full
epochs. ``--dataset-kw`` passes extra ``ShardedDataset`` options (JSON) to every run.
"""

from __future__ import annotations

import json
import time
from typing import Any

from . import common
from .common import GB, fmt, fmt_ratio, print_table, ratio_summary, summarize

REF = {"block_mb": 128, "batch_size": 1024, "prefetch": 1, "num_workers": 0}
CONFIGS: dict[str, dict[str, int]] = {
    "reference (128 MB, batch 1024, prefetch 1, workers 0)": REF,
    "block 64 MB": {**REF, "block_mb": 64},
    "block 256 MB": {**REF, "block_mb": 256},
    "batch 256": {**REF, "batch_size": 256},
    "batch 4096": {**REF, "batch_size": 4096},
    "prefetch 0": {**REF, "prefetch": 0},
    "prefetch 2": {**REF, "prefetch": 2},
    "num_workers 1": {**REF, "num_workers": 1},
    "num_workers 2": {**REF, "num_workers": 2},
}


def parse_args(argv=None):
    p = common.arg_parser("bench_matrix", __doc__)
    p.add_argument("--gib", type=float, default=None, help="size of each store (default 2; quick 0.3)")
    p.add_argument("--features", type=int, default=16)
    p.add_argument("--worker-seconds", type=float, default=None, help="time budget of the num_workers>0 runs (default 8; quick 2)")
    p.add_argument("--dataset-kw", default="{}", help="extra ShardedDataset keyword arguments, as JSON")
    p.add_argument("--no-cold", action="store_true")
    return common.parse_args(p, argv, {"gib": (2.0, 0.3), "worker_seconds": (8.0, 2.0)})


def main(argv=None) -> dict[str, Any]:
    args = parse_args(argv)
    if (res := common.replot(args, plot)) is not None:
        return res
    from shardset import generate_regression
    from shardset import bench as sbench

    started = time.perf_counter()
    extra = json.loads(args.dataset_kw)
    row_bytes = 4 * (args.features + 1)
    modes = ("warm",) if args.no_cold else ("warm", "cold")
    runs = {m: {k: [] for k in CONFIGS} for m in modes}
    plain = {m: {bm: [] for bm in sorted({c["block_mb"] for c in CONFIGS.values()})} for m in modes}
    with common.scratch_run(args, "matrix-") as (root, desc):
        stores: dict[int, tuple[str, list]] = {}
        for bm in plain["warm"]:
            rows = common.rows_for(args.gib, args.features, bm)
            path = str(root / f"b{bm}.zarr")
            st = generate_regression(path, rows=rows, features=args.features, block_mb=bm, workers=2, overwrite=True, progress=False)
            stores[bm] = (path, [st.chunk_path(f, b) for f in st.layout.fields for b in range(st.layout.num_blocks)])
        for r in range(args.repeats):
            for mode in modes:
                with common.CpuLoad() as load:
                    for bm, (path, files) in stores.items():
                        if mode == "cold":
                            sbench.evict(files)
                            plain[mode][bm].append(sbench.direct_read(files))
                        else:
                            sbench.buffered_read(files)
                            plain[mode][bm].append(sbench.buffered_read(files))
                        for name, c in CONFIGS.items():
                            if c["block_mb"] != bm:
                                continue
                            if mode == "cold":
                                sbench.evict(files)
                            budget = args.worker_seconds if c["num_workers"] else None
                            res = sbench.shardset_read(path, c["batch_size"], shuffle=True, seed=r, prefetch=c["prefetch"],
                                                       num_workers=c["num_workers"], max_seconds=budget, **extra)
                            runs[mode][name].append(res)
                line = ", ".join(f"{k} {v[-1]['rows'] / v[-1]['seconds'] / 1e6:.2f}" for k, v in runs[mode].items())
                print(f"[{mode} round {r + 1}/{args.repeats}] M rows/s: {line}; other load {load.result()['other_busy_cores']:.2f} cores",
                      flush=True)
    result = analyse(args, desc, runs, plain, row_bytes, extra)
    common.finish(args, result, plot, started)
    return result


def analyse(args, desc, runs, plain, row_bytes, extra) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for mode, by_name in runs.items():
        out[mode] = {}
        for name, rs in by_name.items():
            c = CONFIGS[name]
            gbs = [x["rows"] * row_bytes / x["seconds"] / GB for x in rs]
            ref = [p["gb_per_s"] for p in plain[mode][c["block_mb"]]]
            out[mode][name] = {
                "config": c, "rows_per_s": summarize([x["rows"] / x["seconds"] for x in rs]), "gb_per_s": summarize(gbs),
                "plain_read_gb_per_s": summarize(ref), "ratio_to_plain_read": ratio_summary(gbs, ref),
                "first_batch_s": summarize([x["first_batch_s"] for x in rs]), "partial_epoch": any(x["partial"] for x in rs),
            }
    ref_name = next(iter(CONFIGS))
    targets = {f"block-shuffled / plain sequential reads >= 0.90 ({mode})": {
        "value": out[mode][ref_name]["ratio_to_plain_read"]["median"],
        "verdict": common.verdict(out[mode][ref_name]["ratio_to_plain_read"]["median"], 0.90)} for mode in out}
    res = {"benchmark": "matrix", "args": vars(args), "machine": desc, "dataset_kw": extra, "results": out, "targets": targets,
           "notes": ["GB/s counts rows x row bytes delivered; the plain read counts the chunk files' bytes (4-byte crc32c "
                     "trailer per file, padding of the last block): slightly more bytes for the plain read.",
                     "Warm plain read: buffered sequential read of the cached chunk files; cold: O_DIRECT sequential read.",
                     f"num_workers > 0 runs stop after {args.worker_seconds:g} s (partial epoch; forking the workers included)."]}
    print_report(res)
    return res


def print_report(res: dict[str, Any]) -> None:
    for mode, figs in res["results"].items():
        print_table(["configuration", "M rows/s", "GB/s", "plain read GB/s", "ratio to plain read", "first batch s"],
                    [[n + (" (partial epoch)" if f["partial_epoch"] else ""), fmt(f["rows_per_s"], 1e-6), fmt(f["gb_per_s"], digits=3),
                      fmt(f["plain_read_gb_per_s"], digits=3), fmt_ratio(f["ratio_to_plain_read"]), fmt(f["first_batch_s"], digits=3)]
                     for n, f in figs.items()], title=f"{mode}: block-shuffled ShardedDataset against plain reads of the same files")
    print_table(["target", "value", "verdict"], [[k, f"{v['value']:.2f}", v["verdict"]] for k, v in res["targets"].items()])


def plot(args, res: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = list(res["results"])
    fig, axes = plt.subplots(1, len(modes), figsize=(7 * len(modes), 5), squeeze=False)
    for ax, mode in zip(axes[0], modes):
        figs = res["results"][mode]
        names = list(figs)
        vals = [common.errbar(figs[n]["ratio_to_plain_read"]) for n in names]
        ax.barh(names, [v[0] for v in vals], xerr=[[v[1] for v in vals], [v[2] for v in vals]], capsize=3, color="#1f77b4")
        ax.axvline(0.9, color="#d62728", ls="--", lw=1, label="target 0.90")
        ax.axvline(1.0, color="#999", lw=1)
        ax.invert_yaxis()
        ax.tick_params(axis="y", labelsize=8)
        ax.set_xlabel("block-shuffled GB/s / plain sequential read GB/s (same round)")
        ax.set_title(f"{mode} cache")
        ax.legend(fontsize=8)
    m = res["machine"]
    fig.suptitle(f"bench_matrix: {res['args']['gib']:g} GiB stores, d={res['args']['features']}; {m['cpu_model']}, "
                 f"{m['cpu_affinity_cores']} cores, {m['date']}; median of {res['args']['repeats']}, bars min-max", fontsize=9)
    common.save_plot(fig, args.name)


if __name__ == "__main__":
    main()
