"""Sparse benchmark: generating, streaming and training wide sparse regression sets.

Run from the repository root::

    python -m benchmarks.bench_sparse            # ~10 minutes
    python -m benchmarks.bench_sparse --quick    # ~3 minutes

Measured in one invocation, in interleaved rounds:

* generation: ``generate_regression`` (d = 16) and ``generate_sparse_regression``
  (nnz = 32; 10^5 and 10^7 features), workers = 1, each writing ``--gib`` GiB in
  128 MiB blocks: MB/s of stored bytes over the wall time of the call (w, the
  store's creation and every fsync included); the sparse/dense ratio per round;
* streaming: one epoch of ``ShardedDataset`` over the 10^7-feature sparse store
  and over the dense store (batch 1024, in-process), rows/s and MB/s, the sparse
  one also with ``sparse_batch`` (indices to int64) on every batch;
* training steps, batch 1024, nnz 32, features 10^5, 10^6, 10^7, on random
  in-memory batches (the model and optimizer alone), each configuration in a
  fresh process on one torch thread, peak RSS from ``VmHWM``:
  ``SparseLinear`` (``EmbeddingBag(sparse=True)``) with Adagrad and with
  SparseAdam; the same model with a dense gradient (``sparse=False``) and
  Adagrad; and ``nn.Linear(features, 1)`` fed by ``torch.sparse.mm`` of the batch
  as a sparse COO matrix (a dense X of 1024 x 10^7 float32 would be 41 GB), with
  Adagrad;
* recovery: ``fit_sparse_regression`` on a generated store (noise 0.01); the RMS
  error of ``w`` on the features seen at least 20 times, and the training rows/s
  next to the streaming rows/s (which of data or optimizer limits training).
  Deterministic (fixed seeds), so it runs once.

Results go to ``benchmarks/results/<name>.json`` and ``benchmarks/plots/<name>.png``.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from typing import Any

from . import common
from .common import GiB, fmt, fmt_ratio, print_table, ratio_summary, summarize

NNZ = 32
BATCH = 1024
STEP_FEATURES = (10**5, 10**6, 10**7)
MODES = {
    "sparse-adagrad": "EmbeddingBag(sparse=True) + Adagrad",
    "sparse-adam": "EmbeddingBag(sparse=True) + SparseAdam",
    "dense-grad-adagrad": "EmbeddingBag(sparse=False) + Adagrad",
    "linear-adagrad": "nn.Linear via torch.sparse.mm + Adagrad",
}
GEN_TARGET = 0.5  # sparse stored MB/s over dense, nnz = 32
STEP_TARGET = 3.0  # sparse step time at 10^7 features over 10^5
RMS_TARGET = 0.05

NOTES = [
    "Generation MB/s counts stored bytes (chunk files incl. crc32c trailers) over the wall time of the call, "
    "which includes writing params/w and an fsync per block; each run starts from a deleted store.",
    "A sparse block reads the entries of w its indices touch: for w up to 2^25 floats the whole w is read once per "
    "writer process and kept; larger w is read chunk by chunk for every block (see docs/sparse.md).",
    "Training steps run on random in-memory batches in a fresh process per configuration, one torch thread, "
    "3 warm-up steps; peak RSS is the process's VmHWM (the interpreter with torch included).",
    "The dense-gradient rows pay for the whole w on every step: the gradient is a dense (features, 1) tensor "
    "and the optimizer updates every entry. The sparse rows touch only the batch's B * nnz rows.",
    "The machine is shared: 'other_busy_cores' in the JSON says how much CPU other programs used meanwhile.",
]


# -- training steps (one fresh process per configuration) -----------------------------------


def _step_main() -> None:
    """Time training steps for the configuration given as JSON in argv[1]; print one JSON line."""
    import torch

    from shardset import SparseLinear

    cfg = json.loads(sys.argv[1])
    torch.set_num_threads(1)
    torch.manual_seed(0)
    mode, features, steps = cfg["mode"], cfg["features"], cfg["steps"]
    batches = [
        (torch.randint(0, features, (BATCH, NNZ)), torch.randn(BATCH, NNZ), torch.randn(BATCH, 1)) for _ in range(8)
    ]
    if mode == "linear-adagrad":
        lin = torch.nn.Linear(features, 1)
        rows = torch.arange(BATCH).repeat_interleave(NNZ)
        params = list(lin.parameters())

        def forward(idx, val):
            X = torch.sparse_coo_tensor(torch.stack([rows, idx.reshape(-1)]), val.reshape(-1), (BATCH, features))
            return torch.sparse.mm(X, lin.weight.t()) + lin.bias
    else:
        model = SparseLinear(features, sparse=mode.startswith("sparse"))
        params, forward = list(model.parameters()), model
    if mode == "sparse-adam":
        opts = [torch.optim.SparseAdam([model.bag.weight], lr=0.1), torch.optim.Adam([model.bias], lr=0.1)]
    else:
        opts = [torch.optim.Adagrad(params, lr=1.0)]

    def step(i: int) -> None:
        idx, val, y = batches[i % len(batches)]
        loss = torch.nn.functional.mse_loss(forward(idx, val), y)
        for o in opts:
            o.zero_grad(set_to_none=True)
        loss.backward()
        for o in opts:
            o.step()

    with torch.sparse.check_sparse_tensor_invariants(enable=False):
        for i in range(3):
            step(i)
        times = []
        for r in range(cfg["repeats"]):
            t0 = time.perf_counter()
            for i in range(steps):
                step(i)
            times.append((time.perf_counter() - t0) / steps)
    print(json.dumps({"step_s": times, "max_rss": _peak_rss()}))


def _peak_rss() -> int:
    # VmHWM, not ru_maxrss: Linux carries ru_maxrss across execve, so a child started
    # from a big parent would report the parent's peak.
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))


def run_steps(mode: str, features: int, steps: int, repeats: int) -> dict[str, Any]:
    cfg = json.dumps({"mode": mode, "features": features, "steps": steps, "repeats": repeats})
    out = subprocess.run(
        [sys.executable, "-c", "from benchmarks.bench_sparse import _step_main; _step_main()", cfg],
        cwd=common.REPO_ROOT, capture_output=True, text=True, timeout=1800,
    )
    if out.returncode:
        raise RuntimeError(f"step benchmark {mode} {features} failed: {out.stderr.strip()[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# -- generation and streaming -----------------------------------------------------------------


def generate(kind: str, path, gib: float, block_mb: int, features: int | None = None) -> dict[str, Any]:
    import shardset

    shutil.rmtree(path, ignore_errors=True)
    t0 = time.perf_counter()
    if kind == "dense":
        rows = int(gib * GiB) // (17 * 4)
        store = shardset.generate_regression(path, rows, 16, block_mb=block_mb, workers=1, progress=False)
    else:
        rows = int(gib * GiB) // (NNZ * 8 + 4)
        store = shardset.generate_sparse_regression(path, rows, features, NNZ, block_mb=block_mb, workers=1,
                                                    progress=False)
    secs = time.perf_counter() - t0
    stored = store.nbytes_stored()
    return {"seconds": secs, "stored_bytes": stored, "mb_per_s": stored / secs / 1e6, "rows": rows}


def stream(path, fields, convert: bool) -> dict[str, Any]:
    from shardset import ShardedDataset, sparse_batch

    ds = ShardedDataset(path, BATCH, seed=1, fields=fields)
    row_bytes = sum(ds.layout.fields[f].row_bytes for f in fields)
    rows, t0 = 0, time.perf_counter()
    for batch in ds:
        if convert:
            batch = sparse_batch(batch)
        rows += len(batch[-1] if isinstance(batch, tuple) else batch["y"])
    secs = time.perf_counter() - t0
    return {"rows_per_s": rows / secs, "mb_per_s": rows * row_bytes / secs / 1e6}


def recovery(path, rows: int, features: int, zipf: float | None, epochs: int, optimizer: str) -> dict[str, Any]:
    import shardset

    shardset.generate_sparse_regression(path, rows, features, NNZ, zipf=zipf, noise=0.01, block_mb=64, workers=1,
                                        progress=False, overwrite=True)
    fit = shardset.fit_sparse_regression(path, epochs=epochs, batch_size=BATCH, optimizer=optimizer)
    return {
        "rows": rows, "features": features, "zipf": zipf, "epochs": epochs, "optimizer": optimizer,
        "learnable": int(fit.learnable.sum()), "w_rms": fit.w_rms, "w_max_error": fit.w_error,
        "b_error": fit.b_error, "train_rows_per_s": [e.rows_per_s for e in fit.epochs],
        "loss": [e.loss for e in fit.epochs],
    }


# -- main -------------------------------------------------------------------------------------------


def parse_args(argv=None):
    ap = common.arg_parser("bench_sparse", __doc__)
    ap.add_argument("--gib", type=float, default=None, help="GiB written by each generation run (1; quick 0.25)")
    ap.add_argument("--steps", type=int, default=None, help="training steps per timed repeat (30; quick 10)")
    return common.parse_args(ap, argv, {"gib": (1.0, 0.25), "steps": (30, 10)})


def main(argv=None) -> dict[str, Any]:
    args = parse_args(argv)
    if (res := common.replot(args, plot)) is not None:
        return res
    started = time.perf_counter()
    block_mb = 64 if args.quick else 128
    with common.scratch_run(args, "sparse-") as (root, desc):
        print()
        result: dict[str, Any] = {"args": vars(args), "machine": desc, "notes": NOTES}

        gen_keys = ["dense d=16", "sparse 1e5", "sparse 1e7"]
        gen: dict[str, list] = {k: [] for k in gen_keys}
        reads: dict[str, list] = {k: [] for k in ("dense", "sparse", "sparse + sparse_batch")}
        with common.CpuLoad() as load:
            for r in range(args.repeats):
                gen["dense d=16"].append(generate("dense", root / "dense", args.gib, block_mb))
                gen["sparse 1e5"].append(generate("sparse", root / "s5", args.gib, block_mb, 10**5))
                gen["sparse 1e7"].append(generate("sparse", root / "s7", args.gib, block_mb, 10**7))
                reads["dense"].append(stream(root / "dense", ["X", "y"], False))
                reads["sparse"].append(stream(root / "s7", ["indices", "values", "y"], False))
                reads["sparse + sparse_batch"].append(stream(root / "s7", ["indices", "values", "y"], True))
                print(f"[round {r + 1}/{args.repeats}] generation MB/s "
                      + ", ".join(f"{k} {v[-1]['mb_per_s']:.0f}" for k, v in gen.items())
                      + "; streaming rows/s " + ", ".join(f"{k} {v[-1]['rows_per_s'] / 1e6:.2f} M" for k, v in reads.items()),
                      flush=True)
        result["generation"] = {k: {"mb_per_s": summarize([x["mb_per_s"] for x in v]), "runs": v} for k, v in gen.items()}
        dense_rates = [x["mb_per_s"] for x in gen["dense d=16"]]
        result["generation_ratio"] = {
            k: ratio_summary([x["mb_per_s"] for x in gen[k]], dense_rates) for k in gen_keys[1:]
        }
        result["generation_load"] = load.result()
        result["streaming"] = {k: {m: summarize([x[m] for x in v]) for m in ("rows_per_s", "mb_per_s")} for k, v in reads.items()}

        steps: dict[str, dict[int, Any]] = {m: {} for m in MODES}
        with common.CpuLoad() as load:
            for features in STEP_FEATURES:
                for mode in MODES:
                    n = args.steps if mode.startswith("sparse") or features < 10**7 else max(3, args.steps // 5)
                    res = run_steps(mode, features, n, args.repeats)
                    steps[mode][features] = {"step_s": summarize(res["step_s"]), "max_rss": res["max_rss"], "steps": n}
                    print(f"[steps] {mode:20s} features {features:>10,}: {fmt(steps[mode][features]['step_s'], 1e3)} ms, "
                          f"peak RSS {res['max_rss'] / 2**20:.0f} MiB", flush=True)
        result["steps"] = {m: {str(f): v for f, v in d.items()} for m, d in steps.items()}
        result["steps_load"] = load.result()
        result["step_ratio_1e7_over_1e5"] = {
            m: ratio_summary(steps[m][10**7]["step_s"]["runs"], steps[m][10**5]["step_s"]["runs"]) for m in MODES
        }

        rec_rows, rec_features = (100_000, 10**4) if args.quick else (10**6, 10**5)  # 320 per feature, uniform
        result["recovery"] = [
            recovery(root / "fit", rec_rows, rec_features, None, 2, "adagrad"),
            recovery(root / "fit", rec_rows, rec_features, None, 2, "adam"),
            recovery(root / "fit", rec_rows, rec_features, 1.0, 2, "adagrad"),
        ]
        for r in result["recovery"]:
            print(f"[recovery] {r['optimizer']} zipf={r['zipf']}: RMS {r['w_rms']:.4f} on {r['learnable']:,} features, "
                  f"{r['train_rows_per_s'][-1]:,.0f} rows/s", flush=True)
    report(result)
    return common.finish(args, result, plot, started)


def report(result: dict[str, Any]) -> None:
    gen, ratio = result["generation"], result["generation_ratio"]
    rows = [["dense d=16", fmt(gen["dense d=16"]["mb_per_s"], digits=0), "1.00", ""]]
    for k in ("sparse 1e5", "sparse 1e7"):
        med = ratio[k]["median"]
        rows.append([f"{k} features, nnz {NNZ}", fmt(gen[k]["mb_per_s"], digits=0), fmt_ratio(ratio[k]),
                     f"target {GEN_TARGET}: {common.verdict(med, GEN_TARGET)}"])
    print_table(["generation, workers=1", "stored MB/s", "vs dense", ""], rows)
    print_table(["streaming, batch 1024", "rows/s (M)", "MB/s"],
                [[k, fmt(v["rows_per_s"], 1e-6), fmt(v["mb_per_s"], digits=0)] for k, v in result["streaming"].items()])
    rows = []
    for m, label in MODES.items():
        d = result["steps"][m]
        r = result["step_ratio_1e7_over_1e5"][m]
        verdict = f"target {STEP_TARGET}: {common.verdict(r['median'], STEP_TARGET, higher_is_better=False)}" if m.startswith("sparse") else ""
        rows.append([label, *(f"{fmt(d[str(f)]['step_s'], 1e3)} ({d[str(f)]['max_rss'] / 2**20:.0f} MiB)" for f in STEP_FEATURES),
                     fmt_ratio(r), verdict])
    print_table(["step ms (peak RSS), batch 1024, nnz 32", *(f"{f:.0e} features" for f in STEP_FEATURES), "1e7 / 1e5", ""], rows)
    print_table(
        ["recovery (noise 0.01)", "rows", "features", "learnable (>= 20 seen)", "RMS error", "", "train rows/s"],
        [[f"{r['optimizer']}, zipf {r['zipf']}, {r['epochs']} epochs", f"{r['rows']:,}", f"{r['features']:,}",
          f"{r['learnable']:,}", f"{r['w_rms']:.4f}", f"target {RMS_TARGET}: {common.verdict(r['w_rms'], RMS_TARGET, False)}",
          f"{r['train_rows_per_s'][-1]:,.0f}"] for r in result["recovery"]],
    )


def plot(args, result: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.5))
    for m, label in MODES.items():
        d = result["steps"][m]
        meds = [common.errbar(d[str(f)]["step_s"], 1e3) for f in STEP_FEATURES]
        a.errorbar(STEP_FEATURES, [x[0] for x in meds], yerr=[[x[1] for x in meds], [x[2] for x in meds]],
                   marker="o", capsize=3, label=label)
    a.set_xscale("log")
    a.set_yscale("log")
    a.set_xlabel("features")
    a.set_ylabel("ms per step (batch 1024, nnz 32)")
    a.set_title("training step time: sparse vs dense gradients")
    a.legend(fontsize=8)
    gen = result["generation"]
    names = list(gen)
    vals = [common.errbar(gen[k]["mb_per_s"]) for k in names]
    b.bar(names, [v[0] for v in vals], yerr=[[v[1] for v in vals], [v[2] for v in vals]], capsize=4)
    b.axhline(GEN_TARGET * gen["dense d=16"]["mb_per_s"]["median"], color="grey", ls="--", label="50% of dense")
    b.set_ylabel("stored MB/s (workers=1)")
    b.set_title(f"generation, {args.gib} GiB per run")
    b.legend()
    common.save_plot(fig, args.name)


if __name__ == "__main__":
    main()
