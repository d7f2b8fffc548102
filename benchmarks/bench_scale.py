"""Scale benchmark: throughput, peak RSS and time to first batch as the store grows past RAM.

Run from the repository root::

    python -m benchmarks.bench_scale                 # 1, 4, 16, 32 GB (the last beyond 24 GiB of RAM)
    python -m benchmarks.bench_scale --quick         # 0.05, 0.2 GB smoke run
    python -m benchmarks.bench_scale --sizes 1,4 --big-repeats 3

For each size a d=16 store (128 MB blocks) is written with ``generate_regression``
(workers=2; write GB/s recorded), then, per round: the chunk files are evicted and
a fresh process reads one full shuffled epoch (``ShardedDataset(shuffle=True,
prefetch=1)``, batch 1024, ``shardset.bench.shardset_read``) while its RSS is
sampled; a sequential ``O_DIRECT`` read of the same files follows (the cold ratio);
and when the store fits in RAM, the files are read into the page cache and a warm
epoch is measured the same way. The store is deleted before the next size.

Sizes of ``--big-gb`` and more (default 16) run ``--big-repeats`` rounds (default 1:
their epochs take minutes on this machine); the JSON and the table say how many
rounds each figure has.
"""

from __future__ import annotations

import shutil
import time
from typing import Any

from . import common
from .bench_read import rss_run
from .common import GB, MiB, fmt, fmt_ratio, print_table, ratio_summary, summarize


def parse_args(argv=None):
    p = common.arg_parser("bench_scale", __doc__)
    p.add_argument("--sizes", default=None, help="store sizes in GB (default 1,4,16,32; quick 0.05,0.2)")
    p.add_argument("--features", type=int, default=16)
    p.add_argument("--block-mb", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=1024)
    p.add_argument("--big-gb", type=float, default=16.0, help="sizes from this many GB on run --big-repeats rounds")
    p.add_argument("--big-repeats", type=int, default=1, help="rounds for the big sizes (default 1)")
    return common.parse_args(p, argv, {"sizes": ("1,4,16,32", "0.05,0.2")})


def main(argv=None) -> dict[str, Any]:
    args = parse_args(argv)
    if (res := common.replot(args, plot)) is not None:
        return res
    from shardset import generate_regression
    from shardset import bench as sbench

    started = time.perf_counter()
    sizes = [float(x) for x in args.sizes.split(",")]
    row_bytes = 4 * (args.features + 1)
    points: list[dict[str, Any]] = []
    with common.scratch_run(args, "scale-") as (root, desc):
        base = common.baseline_rss(3)
        for size in sizes:
            rows = int(size * GB) // row_bytes
            if rows * row_bytes * 1.05 > desc["data_dir_free_gib_at_start"] * common.GiB:
                print(f"{size:g} GB: SKIPPED, not enough free disk", flush=True)
                points.append({"size_gb": size, "skipped": "not enough free disk"})
                continue
            path = str(root / "store.zarr")
            t0 = time.perf_counter()
            store = generate_regression(path, rows=rows, features=args.features, block_mb=args.block_mb, workers=2,
                                        overwrite=True, progress=False)
            write_s = time.perf_counter() - t0
            lay = store.layout
            files = [store.chunk_path(f, b) for f in lay.fields for b in range(lay.num_blocks)]
            fits = rows * row_bytes < 0.6 * desc["ram_total_bytes"]
            repeats = args.big_repeats if size >= args.big_gb else args.repeats
            rec: dict[str, Any] = {"size_gb": size, "rows": rows, "num_blocks": lay.num_blocks, "write_s": write_s,
                                   "write_gb_per_s": store.nbytes_stored() / write_s / GB, "rounds": repeats,
                                   "cold": [], "o_direct": [], "warm": []}
            for r in range(repeats):
                sbench.evict(files)
                rec["cold"].append(rss_run(path, args.batch_size, 1, 0, None))
                sbench.evict(files)
                rec["o_direct"].append(sbench.direct_read(files))
                if fits:
                    sbench.buffered_read(files)
                    rec["warm"].append(rss_run(path, args.batch_size, 1, 0, None))
                c = rec["cold"][-1]["epoch"]
                print(f"[{size:g} GB, round {r + 1}/{repeats}] cold {c['rows'] / c['seconds'] / 1e6:.2f} M rows/s "
                      f"(O_DIRECT {rec['o_direct'][-1]['gb_per_s']:.3f} GB/s), first batch {c['construct_s'] + c['first_batch_s']:.2f} s"
                      + (f"; warm {rec['warm'][-1]['epoch']['rows'] / rec['warm'][-1]['epoch']['seconds'] / 1e6:.2f} M rows/s" if fits else
                         "; warm: skipped (the store does not fit in the page cache)"), flush=True)
            shutil.rmtree(path, ignore_errors=True)
            points.append(rec)
    result = analyse(args, desc, base, points, row_bytes)
    common.finish(args, result, plot, started)
    return result


def analyse(args, desc, base, points, row_bytes) -> dict[str, Any]:
    out = []
    for p in points:
        if "skipped" in p:
            out.append(p)
            continue
        fig: dict[str, Any] = {k: p[k] for k in ("size_gb", "rows", "num_blocks", "write_s", "write_gb_per_s", "rounds")}
        for mode in ("cold", "warm"):
            runs = p[mode]
            if not runs:
                fig[mode] = None
                continue
            rate = [x["epoch"]["rows"] / x["epoch"]["seconds"] for x in runs]
            over = [x["rss"]["parent_max_rss"] - x["baseline_rss"] for x in runs]
            fig[mode] = {
                "rows_per_s": summarize(rate), "gb_per_s": summarize([v * row_bytes / GB for v in rate]),
                "epoch_s": summarize([x["epoch"]["seconds"] for x in runs]),
                "first_batch_s": summarize([x["epoch"]["construct_s"] + x["epoch"]["first_batch_s"] for x in runs]),
                "peak_rss_mib": summarize([x["rss"]["parent_max_rss"] / MiB for x in runs]),
                "peak_rss_over_process_baseline_mib": summarize([v / MiB for v in over]),
            }
        direct = [x["gb_per_s"] for x in p["o_direct"]]
        fig["o_direct_gb_per_s"] = summarize(direct)
        fig["cold_over_o_direct"] = ratio_summary([x["epoch"]["rows"] * row_bytes / x["epoch"]["seconds"] / GB for x in p["cold"]], direct)
        out.append(fig)
    res = {"benchmark": "scale", "args": vars(args), "machine": desc, "baseline_interpreter": base, "points": out,
           "notes": ["Each epoch runs in a fresh process (bench_read.rss_run); peak RSS is that process's, sampled every 50 ms; "
                     "'over baseline' subtracts its RSS after importing numpy, torch, zarr and shardset.",
                     "Cold GB/s counts rows x row bytes; O_DIRECT counts the chunk files' bytes (crc32c trailers and the "
                     "padding of the last block included).",
                     "Warm epochs run only for stores under 60% of RAM (larger ones cannot stay in the page cache).",
                     f"Sizes >= {args.big_gb:g} GB ran {args.big_repeats} round(s) (their epochs take minutes); the others {args.repeats}."]}
    print_report(res)
    return res


def print_report(res: dict[str, Any]) -> None:
    rows = []
    for p in res["points"]:
        if "skipped" in p:
            rows.append([f"{p['size_gb']:g}", "skipped: " + p["skipped"]] + [""] * 8)
            continue
        c, w = p["cold"], p["warm"]
        rows.append([f"{p['size_gb']:g}", p["rounds"], f"{p['write_gb_per_s']:.3f}", fmt(c["rows_per_s"], 1e-6), fmt_ratio(p["cold_over_o_direct"]),
                     fmt(c["first_batch_s"], 1, 2), fmt(c["peak_rss_over_process_baseline_mib"], 1, 0),
                     fmt(w["rows_per_s"], 1e-6) if w else "-", fmt(w["first_batch_s"], 1, 2) if w else "-",
                     fmt(w["peak_rss_over_process_baseline_mib"], 1, 0) if w else "-"])
    print_table(["GB", "rounds", "write GB/s", "cold M rows/s", "cold / O_DIRECT", "cold first batch s", "cold peak RSS MiB over base",
                 "warm M rows/s", "warm first batch s", "warm peak RSS MiB over base"], rows,
                title="Scale: one shuffled epoch per round in a fresh process (median [min-max])")


def plot(args, res: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = [p for p in res["points"] if "skipped" not in p]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    xs = [p["size_gb"] for p in pts]
    for mode, color in (("cold", "#1f77b4"), ("warm", "#ff7f0e")):
        sel = [(p["size_gb"], p[mode]) for p in pts if p[mode]]
        if not sel:
            continue
        for ax, key, scale in ((axes[0], "rows_per_s", 1e-6), (axes[1], "peak_rss_over_process_baseline_mib", 1), (axes[2], "first_batch_s", 1)):
            v = [common.errbar(s[key], scale) for _, s in sel]
            ax.errorbar([x for x, _ in sel], [a[0] for a in v], yerr=[[a[1] for a in v], [a[2] for a in v]], marker="o", capsize=3,
                        color=color, label=mode)
    ram = res["machine"]["ram_total_bytes"] / GB
    for ax, label in zip(axes, ("M rows/s (shuffled epoch)", "peak RSS over the process baseline, MiB", "time to first batch, s")):
        ax.axvline(ram, color="#999", ls="--", lw=1)
        ax.set_xscale("log")
        ax.set_xticks(xs)
        ax.set_xticklabels([f"{x:g}" for x in xs])
        ax.set_xlabel(f"store size, GB (dashed: RAM {ram:.0f} GB)")
        ax.set_ylabel(label)
        ax.set_ylim(0, ax.get_ylim()[1] * 1.15)
        ax.legend()
    m = res["machine"]
    fig.suptitle(f"bench_scale: d={res['args']['features']}, {res['args']['block_mb']} MB blocks, batch {res['args']['batch_size']}; "
                 f"{m['cpu_model']}, {m['cpu_affinity_cores']} cores, {m['date']}", fontsize=9)
    common.save_plot(fig, args.name)


if __name__ == "__main__":
    main()
