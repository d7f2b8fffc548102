"""Peer benchmark: shardset against what a user would pick instead, on the same rows.

Run from the repository root (``scripts/bench-peers-setup.sh`` first builds the peers'
environments; a peer that is missing is recorded with the reason, not dropped)::

    python -m benchmarks.bench_peers            # 2**21 rows (d=16), ~10 minutes
    python -m benchmarks.bench_peers --quick    # a smoke run

One store of d=16 float32 regression rows (``X`` 16 + ``y`` 1 floats, 68 bytes a row)
is written, and the same rows are fed, at the same batch size, to every contender:

* ``shardset``: ``ShardedDataset(shuffle=True)`` block shuffle, and ``shuffle=False``;
* plain sequential file reads of the store's chunk files (the ceiling: buffered
  reads warm, ``O_DIRECT`` cold), as rows/s of the same bytes;
* the lesson's ways, in memory: ``TensorDataset`` + ``DataLoader(shuffle=True)``, and
  its hand-rolled index generator (``random.shuffle`` of a list of indices,
  ``X[torch.tensor(batch_indices)]``);
* ``numpy.memmap`` + map-style ``Dataset`` + ``DataLoader(shuffle=True)``
  (``shardset.bench.naive_read``);
* plain zarr random row access: per batch, ``oindex`` of the batch's sorted random
  row ids on the store's arrays (zarr decodes every chunk a batch touches);
* WebDataset (one tar member of 68 raw bytes per row; shard shuffle + a sample
  shuffle buffer), MosaicML Streaming (MDS shards, one sample per row, local,
  ``shuffle=True`` with its default ``py1e`` algorithm) and LitData (one sample per
  row, ``shuffle=True``). Streaming and LitData run in their own environment
  (``--peers-python``, default ``.venv-peers/bin/python``) as subprocesses of this run.

Every contender runs in a fresh process (so its peak RSS is its own) for a time
budget (``--seconds``, epoch after epoch), warm (files read once before) and cold
(files evicted with ``posix_fadvise``; one epoch at most, as a second would find them
cached); rows/s counts the rows after the first batch, "first batch" includes the
construction of the dataset and loader. Every
figure is the median of ``--repeats`` rounds; the speed-ups of shardset are per-round
ratios of figures measured back to back.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from . import common
from .common import GB, MiB, fmt, fmt_ratio, print_table, ratio_summary, summarize

PEERS_PYTHON = common.REPO_ROOT / ".venv-peers" / "bin" / "python"
IN_MEMORY = ("tensordataset", "lesson generator")
# contender -> (environment, files it reads: the store's chunk files or its own format's directory)
CONTENDERS: dict[str, tuple[str, str]] = {
    "shardset block-shuffled": ("main", "store"),
    "shardset sequential (shuffle=False)": ("main", "store"),
    "tensordataset": ("main", "memory"),
    "lesson generator": ("main", "memory"),
    "memmap + DataLoader(shuffle=True)": ("main", "store"),
    "zarr random rows": ("main", "store"),
    "webdataset": ("main", "webdataset"),
    "webdataset, batch-sized samples": ("main", "webdataset-chunks"),
    "mosaicml streaming": ("peers", "mds"),
    "litdata": ("peers", "litdata"),
}
SHUFFLE = {
    "shardset block-shuffled": "Feistel order of blocks per epoch + full permutation of the rows inside each block",
    "shardset sequential (shuffle=False)": "none",
    "tensordataset": "full random permutation of all rows (RandomSampler)",
    "lesson generator": "full random permutation of all rows (random.shuffle)",
    "memmap + DataLoader(shuffle=True)": "full random permutation of all rows (RandomSampler)",
    "zarr random rows": "full random permutation of all rows",
    "webdataset": "shard order shuffled + sample shuffle buffer of {wds_buffer} rows (on the first {wds_rows:,} rows only)",
    "webdataset, batch-sized samples": ("shard order shuffled + shuffle buffer of 64 samples of {batch_size} consecutive rows "
                                        "(rows of a batch stay together: a weaker shuffle)"),
    "mosaicml streaming": "shuffle=True, shuffle_algo='py1e', default shuffle_block_size",
    "litdata": "shuffle=True (chunk order shuffled, then samples within the loaded chunks)",
}


# -- the child process: prepare a format, or read one for a time budget ---------------------------


def _store_arrays(store_path: str):
    import numpy as np

    from shardset import BlockStore

    store = BlockStore.open(store_path)
    lay = store.layout
    X = np.empty((lay.rows, *lay.fields["X"].shape), np.float32)
    y = np.empty((lay.rows, *lay.fields["y"].shape), np.float32)
    for b in range(lay.num_blocks):
        s, e = lay.block_range(b)
        X[s:e] = store.read_block("X", b)
        y[s:e] = store.read_block("y", b)
    return X, y


def _rows_bytes(store_path: str):
    import numpy as np

    X, y = _store_arrays(store_path)
    return np.ascontiguousarray(np.concatenate([X, y], axis=1)).view(np.uint8)


def _prepare(kind: str, store_path: str, out: str, cfg: dict[str, Any]) -> dict[str, Any]:
    rows = _rows_bytes(store_path)
    n = len(rows)
    t0 = time.perf_counter()
    if kind in ("webdataset", "webdataset-chunks"):
        import webdataset as wds

        os.makedirs(out, exist_ok=True)
        # Python's tarfile costs ~0.1 ms per member here: one row per sample only for a subset
        step = 1 if kind == "webdataset" else cfg["batch_size"]
        n = min(n, cfg["wds_rows"]) if kind == "webdataset" else n
        with wds.ShardWriter(os.path.join(out, "shard-%06d.tar"), maxcount=max(1, n // step // 8), verbose=0) as sink:
            for i in range(0, n, step):
                sink.write({"__key__": f"{i:010d}", "xy": rows[i : i + step].tobytes()})
    elif kind == "mds":
        from streaming import MDSWriter

        with MDSWriter(out=out, columns={"xy": "bytes"}, size_limit=1 << 26) as w:
            for i in range(n):
                w.write({"xy": rows[i].tobytes()})
    elif kind == "litdata":
        from litdata.streaming.writer import BinaryWriter

        w = BinaryWriter(out, chunk_bytes="64MB")
        for i in range(n):
            w[i] = rows[i].view("float32")
        w.done()
        w.merge()
    else:
        raise ValueError(kind)
    return {"seconds": time.perf_counter() - t0, "rows": n,
            "bytes": sum(p.stat().st_size for p in Path(out).rglob("*") if p.is_file())}


def _split(batch, d: int):
    """(X, y) from a batch of rows of d + 1 float32 (a tensor, or a list of 68-byte samples)."""
    import numpy as np
    import torch

    if isinstance(batch, (list, tuple)):
        batch = torch.from_numpy(np.frombuffer(b"".join(batch), np.float32).reshape(-1, d + 1).copy())
    return batch[:, :d], batch[:, d:]


def _epochs(kind: str, cfg: dict[str, Any]):
    """(X, y) batches of contender ``kind``, epoch after epoch (the loader is built once)."""
    make = _loader(kind, cfg)
    for epoch in range(1 if cfg.get("one_epoch") else 1 << 30):
        yield from make(epoch)


def _loader(kind: str, cfg: dict[str, Any]):
    """A function of the epoch returning an iterable of (X, y) batches for contender ``kind``."""
    import numpy as np
    import torch

    bs, seed, d = cfg["batch_size"], cfg["seed"], cfg["features"]
    store = cfg["store"]
    if kind == "shardset block-shuffled" or kind == "shardset sequential (shuffle=False)":
        from shardset import ShardedDataset

        ds = ShardedDataset(store, bs, shuffle=kind == "shardset block-shuffled", seed=seed, **cfg.get("shardset_kw", {}))
        loader = torch.utils.data.DataLoader(ds, batch_size=None)
        return lambda epoch: loader
    if kind == "memmap + DataLoader(shuffle=True)":
        from shardset.bench import MemmapRows

        loader = torch.utils.data.DataLoader(MemmapRows(store), batch_size=bs, shuffle=True, generator=torch.Generator().manual_seed(seed))
        return lambda epoch: loader
    if kind in IN_MEMORY:
        X, y = (torch.from_numpy(a) for a in _store_arrays(store))
        cfg["load_s"] = time.perf_counter() - cfg["t0"]
        if kind == "tensordataset":
            loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(X, y), bs, shuffle=True,
                                                 generator=torch.Generator().manual_seed(seed))
            return lambda epoch: loader

        def data_iter(epoch):  # the lesson's get_dataloader(train=True), verbatim apart from names
            import random

            random.seed(seed * 1000 + epoch)
            indices = list(range(len(X)))
            random.shuffle(indices)
            for i in range(0, len(indices), bs):
                batch_indices = torch.tensor(indices[i : i + bs])
                yield X[batch_indices], y[batch_indices]

        return data_iter
    if kind == "zarr random rows":
        import zarr

        g = zarr.open_group(store, mode="r")
        Xa, ya = g["X"], g["y"]

        def batches(epoch):
            perm = np.random.default_rng([seed, epoch]).permutation(Xa.shape[0])
            for i in range(0, len(perm), bs):
                idx = np.sort(perm[i : i + bs])
                yield torch.from_numpy(Xa.oindex[idx]), torch.from_numpy(ya.oindex[idx])

        return batches
    if kind == "webdataset":
        import webdataset as wds

        urls = sorted(str(p) for p in Path(cfg["dir"]).glob("*.tar"))
        ds = (wds.WebDataset(urls, shardshuffle=len(urls), seed=seed, empty_check=False).shuffle(cfg["wds_buffer"])
              .to_tuple("xy").map(lambda s: s[0]).batched(bs, collation_fn=lambda b: _split(list(b), d)))
        loader = torch.utils.data.DataLoader(ds, batch_size=None)
        return lambda epoch: loader
    if kind == "webdataset, batch-sized samples":
        import webdataset as wds

        urls = sorted(str(p) for p in Path(cfg["dir"]).glob("*.tar"))
        ds = (wds.WebDataset(urls, shardshuffle=len(urls), seed=seed, empty_check=False).shuffle(64)
              .to_tuple("xy").map(lambda s: _split([s[0]], d)))
        loader = torch.utils.data.DataLoader(ds, batch_size=None)
        return lambda epoch: loader
    if kind == "mosaicml streaming":
        from streaming import StreamingDataset

        ds = StreamingDataset(local=cfg["dir"], shuffle=True, shuffle_seed=seed, batch_size=bs)
        loader = torch.utils.data.DataLoader(ds, batch_size=bs, collate_fn=lambda b: _split([s["xy"] for s in b], d))
        return lambda epoch: loader
    if kind == "litdata":
        from litdata import StreamingDataLoader, StreamingDataset

        ds = StreamingDataset(cfg["dir"], shuffle=True, seed=seed)
        loader = StreamingDataLoader(ds, batch_size=bs, num_workers=0,
                                     collate_fn=lambda b: _split(torch.stack([torch.as_tensor(x) for x in b]), d))
        return lambda epoch: loader
    raise ValueError(f"unknown contender {kind!r}")


def _read(kind: str, cfg: dict[str, Any]) -> dict[str, Any]:
    import psutil
    import torch

    from shardset.bench import consume

    torch.set_num_threads(cfg.get("threads", torch.get_num_threads()))
    base = psutil.Process().memory_info().rss
    with common.RssSampler(interval=0.05) as s:
        cfg["t0"] = time.perf_counter()
        batches = _epochs(kind, cfg)
        res = consume(batches, max_seconds=cfg["seconds"])
        batches.close()
    rss = s.result()
    peak = max(p["max_rss"] for p in rss["processes"])
    return {**res, "epochs": res["rows"] / cfg["rows"], "load_s": cfg.get("load_s"), "baseline_rss": base, "peak_rss": peak,
            "rss_tree": sum(p["max_rss"] for p in rss["processes"] if p["role"] != "helper")}


def child_main(argv: list[str]) -> None:
    cfg = json.loads(argv[0])
    out = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)  # libraries' prints go to stderr, never into the result line
    try:
        res = _prepare(cfg["kind"], cfg["store"], cfg["dir"], cfg) if cfg["op"] == "prepare" else _read(cfg["kind"], cfg)
    except Exception as exc:  # reported, not fatal: the parent records why
        res = {"error": f"{type(exc).__name__}: {exc}"}
    res.pop("checksum", None)
    out.write(json.dumps(res, default=str) + "\n")
    out.flush()


def run_child(python: str, cfg: dict[str, Any], timeout: float = 3600) -> dict[str, Any]:
    out = subprocess.run([python, "-m", "benchmarks.bench_peers", "--child", json.dumps(cfg)], cwd=common.REPO_ROOT,
                         capture_output=True, text=True, timeout=timeout)
    lines = out.stdout.strip().splitlines()
    if out.returncode != 0 or not lines:
        return {"error": f"exit {out.returncode}: {out.stderr.strip().splitlines()[-1] if out.stderr.strip() else 'no output'}"}
    return json.loads(lines[-1])


# -- availability ---------------------------------------------------------------------------------


def availability(peers_python: str) -> dict[str, str | None]:
    """None for each contender that can run here, else the reason it cannot."""
    def probe(python: str, module: str) -> str | None:
        if not os.path.exists(python):
            return f"{python} does not exist (run scripts/bench-peers-setup.sh)"
        r = subprocess.run([python, "-c", f"import {module}, shardset.bench"], cwd=common.REPO_ROOT, capture_output=True, text=True)
        return None if r.returncode == 0 else f"import {module} fails in {python}: {(r.stderr.strip().splitlines() or ['?'])[-1]}"

    out: dict[str, str | None] = {k: None for k in CONTENDERS}
    out["webdataset"] = out["webdataset, batch-sized samples"] = probe(sys.executable, "webdataset")
    out["mosaicml streaming"] = probe(peers_python, "streaming")
    out["litdata"] = probe(peers_python, "litdata")
    return out


# -- main --------------------------------------------------------------------------------------------


def parse_args(argv=None):
    p = common.arg_parser("bench_peers", __doc__)
    p.add_argument("--rows", type=int, default=None, help="rows fed to every contender (default 2**21; quick 2**15)")
    p.add_argument("--features", type=int, default=16)
    p.add_argument("--batch-size", type=int, default=1024)
    p.add_argument("--block-mb", type=int, default=64, help="shardset block size")
    p.add_argument("--seconds", type=float, default=None, help="time budget of each read run (default 8; quick 1)")
    p.add_argument("--wds-buffer", type=int, default=10_000, help="WebDataset sample shuffle buffer (rows)")
    p.add_argument("--wds-rows", type=int, default=None, help="rows written as one-row WebDataset samples (default 2**16; quick 2**13)")
    p.add_argument("--peers-python", default=str(PEERS_PYTHON), help="interpreter with mosaicml-streaming and litdata")
    p.add_argument("--only", default=None, help="comma-separated contenders to run (default: all)")
    p.add_argument("--no-cold", action="store_true")
    args = common.parse_args(p, argv, {"rows": (1 << 21, 1 << 15), "seconds": (8.0, 1.0), "wds_rows": (1 << 16, 1 << 13)})
    unknown = [n for n in (args.only or "").split(",") if n and n not in CONTENDERS]
    if unknown or args.only == "":
        p.error(f"--only takes contenders among {', '.join(repr(n) for n in CONTENDERS)}; got {args.only!r}")
    return args


def main(argv=None) -> dict[str, Any]:
    if argv is None and len(sys.argv) > 2 and sys.argv[1] == "--child":
        child_main(sys.argv[2:])
        return {}
    args = parse_args(argv)
    if (res := common.replot(args, plot)) is not None:
        return res
    from shardset import BlockStore, generate_regression
    from shardset import bench as sbench

    started = time.perf_counter()
    avail = availability(args.peers_python)
    names = [n for n in CONTENDERS if args.only is None or n in args.only.split(",")]
    with common.scratch_run(args, "peers-") as (root, desc):
        store = str(root / "store.zarr")
        generate_regression(store, rows=args.rows, features=args.features, block_mb=args.block_mb, overwrite=True, progress=False)
        bs = BlockStore.open(store)
        row_bytes = bs.layout.row_bytes
        files = {"store": [bs.chunk_path(f, b) for f in bs.layout.fields for b in range(bs.layout.num_blocks)], "memory": []}
        prepared: dict[str, Any] = {}
        for fmt_name, kind, env in (("webdataset", "webdataset", "main"), ("webdataset-chunks", "webdataset, batch-sized samples", "main"),
                                    ("mds", "mosaicml streaming", "peers"), ("litdata", "litdata", "peers")):
            if kind not in names or avail[kind]:
                continue
            out = root / fmt_name
            python = sys.executable if env == "main" else args.peers_python
            r = run_child(python, {"op": "prepare", "kind": fmt_name, "store": store, "dir": str(out),
                                   "batch_size": args.batch_size, "wds_rows": args.wds_rows})
            if "error" in r:
                avail[kind] = f"writing its format failed: {r['error']}"
                continue
            prepared[fmt_name] = r
            files[fmt_name] = common.tree_files(out)
            print(f"{fmt_name}: wrote {r['bytes'] / MiB:.0f} MiB in {r['seconds']:.1f} s", flush=True)
        for name, why in avail.items():
            if why and name in names:
                print(f"{name}: SKIPPED: {why}", flush=True)
        runnable = [n for n in names if not avail[n]]
        modes = ("warm",) if args.no_cold else ("warm", "cold")
        runs: dict[str, dict[str, list]] = {m: {n: [] for n in runnable} for m in modes}
        ceiling: dict[str, list] = {m: [] for m in modes}
        for r in range(args.repeats):
            for mode in modes:
                if mode == "cold":
                    sbench.evict(files["store"])
                    ceiling[mode].append(sbench.direct_read(files["store"]))
                else:
                    sbench.buffered_read(files["store"])
                    ceiling[mode].append(sbench.buffered_read(files["store"]))
                order = runnable[r % len(runnable):] + runnable[: r % len(runnable)]
                for name in order:
                    env, what = CONTENDERS[name]
                    if mode == "cold" and what == "memory":
                        continue
                    fl = files[what] if what != "memory" else files["store"]
                    (sbench.evict if mode == "cold" else sbench.buffered_read)(fl)
                    cfg = {"op": "read", "kind": name, "store": store, "dir": str(root / what), "batch_size": args.batch_size,
                           "seed": r, "features": args.features, "seconds": args.seconds,
                           "rows": prepared.get(what, {}).get("rows", bs.layout.rows),
                           "one_epoch": mode == "cold", "wds_buffer": args.wds_buffer}
                    res = run_child(sys.executable if env == "main" else args.peers_python, cfg)
                    runs[mode][name].append(res)
                line = ", ".join(f"{n} " + (f"{_rate(x[-1]):,.0f}" if "error" not in x[-1] else "ERROR") for n, x in runs[mode].items() if x)
                print(f"[{mode} round {r + 1}/{args.repeats}] rows/s: {line}", flush=True)
        result = analyse(args, desc, runs, ceiling, avail, prepared, row_bytes, bs.layout.rows, names)
        common.finish(args, result, plot, started)
        return result


def _rate(x: dict[str, Any]) -> float:
    return x["steady_rows_per_s"] or x["rows_per_s"]


def analyse(args, desc, runs, ceiling, avail, prepared, row_bytes, rows, names) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for mode, by_name in runs.items():
        ceil_rows = [c["gb_per_s"] * GB / row_bytes for c in ceiling[mode]]
        out[mode] = {"plain file reads (ceiling)": {
            "rows_per_s": summarize(ceil_rows), "mb_per_s": summarize([c["gb_per_s"] * 1e3 for c in ceiling[mode]]),
            "how": "O_DIRECT sequential read of the chunk files" if mode == "cold" else "buffered sequential read of the cached chunk files"}}
        ref = [_rate(x) for x in by_name.get("shardset block-shuffled", []) if "error" not in x]
        for name, xs in by_name.items():
            ok = [x for x in xs if "error" not in x]
            if not ok:
                if xs:
                    out[mode][name] = {"error": xs[0]["error"]}
                continue
            rate = [_rate(x) for x in ok]
            fig = {
                "rows_per_s": summarize(rate), "mb_per_s": summarize([v * row_bytes / 1e6 for v in rate]),
                "first_batch_s": summarize([x["first_batch_s"] for x in ok if x["first_batch_s"] is not None]),
                "epochs_read_per_run": summarize([x["epochs"] for x in ok]),
                "peak_rss_mib": summarize([x["rss_tree"] / MiB for x in ok]),
                "rows_read_per_run": summarize([x["rows"] for x in ok]),
                "shuffle": SHUFFLE[name].format(wds_buffer=args.wds_buffer, wds_rows=args.wds_rows, batch_size=args.batch_size),
            }
            if ok[0].get("load_s") is not None:
                fig["load_into_memory_s"] = summarize([x["load_s"] for x in ok])
            if ref and name != "shardset block-shuffled" and len(ref) == len(rate):
                fig["shardset_speedup"] = ratio_summary(ref, rate)
            out[mode][name] = fig
        if ref:
            out[mode]["shardset block-shuffled"]["ratio_to_ceiling"] = ratio_summary(ref, ceil_rows)
    targets = {}
    for peer in ("webdataset", "mosaicml streaming"):
        for mode in runs:
            sp = out[mode].get(peer, {}).get("shardset_speedup")
            targets[f"faster than {peer} ({mode})"] = (
                {"value": sp["median"], "verdict": common.verdict(sp["median"], 1.0)} if sp else
                {"value": None, "verdict": "not measured", "why": avail.get(peer) or out[mode].get(peer, {}).get("error")})
        for mode, target in (("cold", 1000.0), ("warm", 100.0)):
            sp = out.get(mode, {}).get("memmap + DataLoader(shuffle=True)", {}).get("shardset_speedup")
            if sp:
                targets[f"shardset >= {target:g}x memmap + DataLoader(shuffle=True) ({mode})"] = {
                    "value": sp["median"], "verdict": common.verdict(sp["median"], target)}
    res = {"benchmark": "peers", "args": vars(args), "machine": desc, "rows": rows, "row_bytes": row_bytes,
           "skipped": {k: v for k, v in avail.items() if v and k in names}, "prepare": prepared, "results": out,
           "targets": targets,
           "notes": ["rows/s counts the rows after the first batch over the time budget (--seconds), epoch after epoch; "
                     "'first batch' includes constructing the dataset and loader (in-memory contenders: loading the rows too).",
                     "Every contender runs in a fresh process; peak RSS is of that process tree (sampled every 50 ms).",
                     "WebDataset, Streaming and LitData store one sample per row (68 raw bytes of X and y); their batches are "
                     "assembled by a collate function that splits X and y."]}
    print_report(res)
    return res


def print_report(res: dict[str, Any]) -> None:
    for mode, figs in res["results"].items():
        rows = []
        for name, f in figs.items():
            if "error" in f:
                rows.append([name, "error: " + f["error"][:80], "", "", "", "", ""])
                continue
            rows.append([name, fmt(f["rows_per_s"], 1e-3, 1), fmt(f["mb_per_s"], 1, 1), fmt(f.get("first_batch_s"), 1, 2),
                         fmt(f.get("peak_rss_mib"), 1, 0), fmt_ratio(f.get("shardset_speedup"), 1) if f.get("shardset_speedup") else "",
                         f.get("shuffle", f.get("how", ""))])
        print_table(["contender", "k rows/s", "MB/s", "first batch s", "peak RSS MiB", "shardset speed-up", "shuffle"], rows,
                    title=f"{mode}: {res['rows']:,} rows x {res['row_bytes']} bytes, batch {res['args']['batch_size']}")
    for k, v in res["skipped"].items():
        print(f"skipped {k}: {v}")
    print_table(["target", "value", "verdict"], [[k, f"{v['value']:.2f}" if v["value"] is not None else "-", v["verdict"]]
                                                 for k, v in res["targets"].items()], title="Targets")


def plot(args, res: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    modes = list(res["results"])
    fig, axes = plt.subplots(1, len(modes), figsize=(7 * len(modes), 5.5), squeeze=False)
    for ax, mode in zip(axes[0], modes):
        figs = {k: v for k, v in res["results"][mode].items() if "rows_per_s" in v}
        names = list(figs)
        vals = [common.errbar(figs[n]["rows_per_s"], 1e-3) for n in names]
        ax.barh(names, [v[0] for v in vals], xerr=[[v[1] for v in vals], [v[2] for v in vals]], capsize=3,
                color=["#1f77b4" if n.startswith("shardset") else ("#999" if "ceiling" in n else "#ff7f0e") for n in names])
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))  # decades only: 1-2-5 labels overlap here
        ax.invert_yaxis()
        ax.tick_params(axis="y", labelsize=8)
        ax.set_xlabel("k rows/s (log; median, min-max)")
        ax.set_title(f"{mode} cache, batch {res['args']['batch_size']}, {res['rows']:,} rows")
    m = res["machine"]
    fig.suptitle(f"bench_peers: {m['cpu_model']}, {m['cpu_affinity_cores']} cores, {m['date']}; skipped: "
                 f"{', '.join(res['skipped']) or 'none'}", fontsize=9)
    common.save_plot(fig, args.name)


if __name__ == "__main__":
    main()
