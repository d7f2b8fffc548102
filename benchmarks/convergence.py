"""Convergence experiment: SGD on linear regression fed in different orders, against a full shuffle.

Run from the repository root::

    python -m benchmarks.convergence            # ~3 minutes on 2 cores
    python -m benchmarks.convergence --quick    # smoke run

The one experiment here with a known answer.  Data: ``X ~ N(0, I_d)``,
``y = X w + b + noise * N(0, 1)`` with a known ``w``, ``b``; for ``X ~ N(0, I)``
the excess loss of an estimate over the noise floor ``noise**2`` is exactly
``||w_hat - w||^2 + (b_hat - b)^2``, so no test set is needed.

Three stores of the same rows, all written with :func:`shardset.write` (fields
``X``, ``y``, ``label`` = decile of y, ``row`` = position in the sorted order):

* ``iid``: in generation order (already random);
* ``sorted``: sorted by y (the adversarial order: every block holds one narrow
  slice of y, so each stretch of the epoch pulls the fit one way);
* ``... write-shuffled``: each of them written with ``shuffle=True`` (the row shuffle);
* ``... segment-shuffled``: each of them copied by ``shuffle_store(method="segments")``
  (the one-pass shuffle: every block is one segment of each of 64 strata).

Orders compared, same SGD, same epochs, same learning-rate schedule:

* ``full shuffle``: all rows in memory, ``torch.randperm`` per epoch (the reference);
* ``no shuffle``: ``ShardedDataset(shuffle=False)``;
* ``W = 1, 2, 4, 8``: ``ShardedDataset(window_blocks=W)`` (block order and rows mixed over W blocks);
* ``write shuffle + W = 1``: the write-shuffled store read with ``W = 1``;
* ``segment shuffle + W = 1``: the segment-shuffled store read with ``W = 1``.

Each configuration runs for ``--seeds`` seeds (the shuffle seed; the start is
always ``w = 0, b = 0``); tables give the mean with its standard error and the
median [min-max] over seeds, and the ratio of mean excess losses to the full
shuffle's.  The SGD is plain minibatch SGD on the squared loss with a learning
rate decaying linearly from ``--lr`` to 0 over the run, so the final iterate
converges (to the least-squares fit of the same rows, also reported) rather
than wandering in a noise ball; ``--schedule constant`` keeps it at ``--lr``
(``convergence_constant``), where the order's effect on the gradient noise
shows in the size of that ball.  Blocks are small (``--block-rows``, stated in
the results) because the effect depends on rows per block and per batch, not
on bytes.

Results: ``benchmarks/results/<name>.json`` and ``benchmarks/plots/<name>.png``
(default name ``convergence``).  Target: on the sorted store, write shuffle +
W = 1 ends within 5 % of the full shuffle's excess loss (checked for both
write-time shuffles).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch

import shardset
from shardset import ShardedDataset
from shardset.quality import delivered, quantile_labels

from . import common
from .common import fmt, print_table, summarize

Batches = Callable[[int], Iterator[tuple[torch.Tensor, torch.Tensor]]]
WINDOWS = (1, 2, 4, 8)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=1 << 17)
    p.add_argument("--features", type=int, default=16)
    p.add_argument("--noise", type=float, default=1.0)
    p.add_argument("--block-rows", type=int, default=1 << 11)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--seeds", type=int, default=10)
    p.add_argument("--schedule", choices=("linear", "constant"), default="linear",
                   help="learning rate: linear decay to 0 over the run (default), or constant")
    p.add_argument("--quick", action="store_true", help="small sizes, 2 seeds")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--name", default=None)
    p.add_argument("--no-plot", action="store_true")
    args = p.parse_args(argv)
    if args.quick:
        args.rows, args.block_rows, args.seeds, args.epochs = 1 << 15, 1 << 9, 2, 2
    args.name = args.name or ("convergence" + ("_constant" if args.schedule == "constant" else "") + ("_quick" if args.quick else ""))
    return args


def make_data(rows: int, features: int, noise: float, seed: int = 0) -> dict[str, Any]:
    rng = np.random.default_rng(seed)
    w = rng.standard_normal(features).astype(np.float32)
    b = 4.2
    X = rng.standard_normal((rows, features), dtype=np.float32)
    y = (X @ w + b + noise * rng.standard_normal(rows, dtype=np.float32)).astype(np.float32)
    return {"X": X, "y": y[:, None], "w": w, "b": b}


def write_stores(root: Path, data: dict[str, Any], block_rows: int) -> dict[str, str]:
    X, y = data["X"], data["y"]
    label = quantile_labels(y[:, 0], 10)[0].astype(np.int8)
    order = np.argsort(y[:, 0], kind="stable")
    rank = np.empty(len(y), np.int64)
    rank[order] = np.arange(len(y))
    iid = {"X": X, "y": y, "label": label, "row": rank}
    srt = {k: v[order] for k, v in iid.items()}
    paths = {}
    for name, arrays in (("iid", iid), ("sorted", srt)):
        paths[name] = str(root / f"{name}.zarr")
        paths[f"{name} write-shuffled"] = str(root / f"{name}-shuffled.zarr")
        shardset.write(paths[name], arrays, block_rows=block_rows, progress=False)
        shardset.write(paths[f"{name} write-shuffled"], arrays, block_rows=block_rows, shuffle=True, seed=12345,
                       progress=False)
        paths[f"{name} segment-shuffled"] = str(root / f"{name}-segments.zarr")
        shardset.shuffle_store(paths[name], paths[f"{name} segment-shuffled"], method="segments", seed=12345,
                               progress=False)
    return paths


def full_shuffle(X: torch.Tensor, y: torch.Tensor, batch_size: int, seed: int) -> Batches:
    def epoch(e: int):
        gen = torch.Generator().manual_seed(seed * 1000 + e)
        perm = torch.randperm(len(X), generator=gen)
        for i in range(0, len(X), batch_size):
            idx = perm[i : i + batch_size]
            yield X[idx], y[idx]

    return epoch


def reader(path: str, batch_size: int, seed: int, shuffle: bool = True, window: int = 1) -> Batches:
    ds = ShardedDataset(path, batch_size, seed=seed, shuffle=shuffle, fields=["X", "y"], window_blocks=window)

    def epoch(e: int):
        ds.set_epoch(e)
        return iter(ds)

    return epoch


def sgd(batches: Batches, features: int, epochs: int, steps_per_epoch: int, lr: float, decay: bool = True) -> tuple[np.ndarray, float]:
    """Minibatch SGD on the mean squared error; the learning rate decays linearly to 0 if ``decay``."""
    w, b = torch.zeros(features, dtype=torch.float64), torch.zeros((), dtype=torch.float64)
    total, t = epochs * steps_per_epoch, 0
    for e in range(epochs):
        for X, y in batches(e):
            X, y = X.double(), y.double().reshape(-1)
            r = X @ w + b - y
            rate = lr * (1 - t / total) if decay else lr
            w -= rate * (2 / len(y)) * (X.T @ r)
            b -= rate * 2 * r.mean()
            t += 1
    return w.numpy(), float(b)


def configurations(stores: dict[str, str]) -> list[tuple[str, str, str, dict | None]]:
    """(store, order, path, reader kwargs); the full shuffle has kwargs None."""
    out = []
    for store in ("iid", "sorted"):
        path = stores[store]
        out.append((store, "full shuffle", path, None))
        out.append((store, "no shuffle", path, {"shuffle": False}))
        out += [(store, f"W = {w}", path, {"window": w}) for w in WINDOWS]
        out.append((store, "write shuffle + W = 1", stores[f"{store} write-shuffled"], {"window": 1}))
        out.append((store, "segment shuffle + W = 1", stores[f"{store} segment-shuffled"], {"window": 1}))
    return out


def main(argv=None) -> dict[str, Any]:
    args = parse_args(argv)
    started = time.perf_counter()
    torch.set_num_threads(1)
    with common.scratch_run(args, "convergence-") as (root, desc):
        data = make_data(args.rows, args.features, args.noise)
        stores = write_stores(root, data, args.block_rows)
        steps = -(-args.rows // args.batch_size)
        runs: dict[str, dict[str, Any]] = {}
        for store, order, path, kw in configurations(stores):
            if kw is None:  # the whole store in memory, in storage order
                cols = delivered(ShardedDataset(path, 1 << 16, shuffle=False, fields=["X", "y"]))
                X, y = torch.from_numpy(cols["X"]), torch.from_numpy(cols["y"])
            errs, excess, secs = [], [], []
            for seed in range(args.seeds):
                batches = full_shuffle(X, y, args.batch_size, seed) if kw is None else reader(path, args.batch_size, seed, **kw)
                t0 = time.perf_counter()
                w_hat, b_hat = sgd(batches, args.features, args.epochs, steps, args.lr, args.schedule == "linear")
                secs.append(time.perf_counter() - t0)
                dw = w_hat - data["w"]
                errs.append(float(np.linalg.norm(dw)))
                excess.append(float(dw @ dw + (b_hat - data["b"]) ** 2))
            runs[f"{store}/{order}"] = {
                "store": store, "order": order, "excess_loss": summarize(excess), "w_error": summarize(errs),
                "excess_mean": float(np.mean(excess)), "excess_sem": float(np.std(excess, ddof=1) / np.sqrt(len(excess))),
                "seconds": summarize(secs),
            }
            print(f"{store:7} {order:22} excess {fmt(summarize(excess), digits=6)}  ||w_hat-w|| "
                  f"{fmt(summarize(errs), digits=4)}  ({sum(secs):.1f} s)", flush=True)
    design = np.hstack([data["X"].astype(np.float64), np.ones((args.rows, 1))])
    coef = np.linalg.lstsq(design, data["y"][:, 0].astype(np.float64), rcond=None)[0]
    erm = float(((coef[:-1] - data["w"]) ** 2).sum() + (coef[-1] - data["b"]) ** 2)
    result = {
        "machine": desc,
        "least_squares_excess": erm,
        "settings": {k: getattr(args, k) for k in ("rows", "features", "noise", "block_rows", "batch_size", "epochs",
                                                     "lr", "seeds", "schedule")},
        "noise_floor": args.noise**2,
        "runs": runs,
    }
    for r in runs.values():  # ratio of the mean excess to the full shuffle's, with its standard error
        full = runs[f"{r['store']}/full shuffle"]
        ratio = r["excess_mean"] / full["excess_mean"]
        r["excess_vs_full_shuffle"] = ratio
        r["excess_vs_full_shuffle_se"] = ratio * float(np.hypot(r["excess_sem"] / r["excess_mean"],
                                                                full["excess_sem"] / full["excess_mean"]))
    result["target"] = {}
    for order in ("write shuffle + W = 1", "segment shuffle + W = 1"):
        r = runs[f"sorted/{order}"]
        result["target"][f"sorted: {order} mean excess / full shuffle mean excess"] = {
            "value": r["excess_vs_full_shuffle"], "standard_error": r["excess_vs_full_shuffle_se"],
            "within_5_percent": abs(r["excess_vs_full_shuffle"] - 1) <= 0.05}
    table = [
        (r["store"], r["order"], f"{r['excess_mean']:.3e} +- {r['excess_sem']:.1e}", fmt(r["excess_loss"], 1e6, digits=0),
         f"{r['excess_vs_full_shuffle']:.2f} +- {r['excess_vs_full_shuffle_se']:.2f}", fmt(r["w_error"], digits=4))
        for r in runs.values()
    ]
    result["table"] = print_table(
        ["store", "order", "excess loss mean +- s.e.", "median [min-max] x1e-6", "vs full shuffle (means)", "||w_hat - w||"], table,
        title=f"SGD ({args.schedule} learning rate from {args.lr}), {args.epochs} epochs, batch {args.batch_size}, {args.rows:,} rows x {args.features}, "
              f"{args.rows // args.block_rows} blocks of {args.block_rows:,} rows, noise {args.noise}, {args.seeds} seeds",
    )
    print(f"least-squares fit on the same rows (what SGD converges to): excess {erm:.6f}")
    for name, t in result["target"].items():
        print(f"target ({name}, within 5%): {t['value']:.3f} +- {t['standard_error']:.3f} -> "
              f"{'MET' if t['within_5_percent'] else 'MISSED'}")
    return common.finish(args, result, plot, started)


def plot(args, result: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    for ax, store in zip(axes, ("iid", "sorted")):
        rows = [r for r in result["runs"].values() if r["store"] == store]
        names = [r["order"] for r in rows]
        med, lo, hi = zip(*(common.errbar(r["excess_loss"]) for r in rows))
        ax.bar(range(len(rows)), med, yerr=[lo, hi], capsize=3,
               color=["tab:green" if n == "full shuffle" else "tab:blue" for n in names])
        ax.axhline(result["least_squares_excess"], color="gray", ls=":", label="least-squares fit of the same rows")
        ax.set_xticks(range(len(rows)), names, rotation=35, ha="right")
        ax.set_yscale("log")
        ax.set_title(f"{store} store")
        ax.legend(fontsize=8)
    axes[0].set_ylabel("excess loss over the noise floor")
    s = result["settings"]
    fig.suptitle(f"SGD on linear regression ({s['schedule']} lr), {s['epochs']} epochs, batch {s['batch_size']}, "
                 f"{s['rows'] // s['block_rows']} blocks; median and min-max over {s['seeds']} seeds")
    common.save_plot(fig, args.name, dpi=120)


if __name__ == "__main__":
    main()
