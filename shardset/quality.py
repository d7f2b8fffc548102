"""How well shuffled is an order?  Metrics computed from the order a reader actually delivers.

Everything here takes the *delivered* sequence: ``labels[k]`` is the class of
the ``k``-th row handed out in an epoch and ``ids[k]`` its position in storage
(or in whatever original order the id field numbers).  Batches are the
consecutive runs of ``batch_size`` rows; only full batches count for the batch
metrics.  Compare every figure with the same metric on a uniform shuffle
(:func:`uniform_quality`), not with zero: a uniform shuffle has sampling noise.

* **batch TV**: mean total-variation distance between a batch's label histogram
  and the global one.
* **VIF**: variance inflation of the batch label proportions, the mean squared
  deviation of the proportions from the global ones over its value under a
  uniform shuffle (``p (1 - p) / b`` with the finite-population correction).
  ``b / VIF`` is the *effective batch size*.  With homogeneous blocks of
  within-block label correlation ``rho``, a reader that mixes windows of ``W``
  blocks gives ``VIF ~ 1 + rho (b - 1) / W`` (:func:`predicted_vif`).
* **drift**: mean TV distance between the label histogram of each consecutive
  1 % stretch of the epoch and the global one (slow drifts that batch metrics
  average away).
* **rank correlation** (Spearman) between storage position and delivery position.
* **adjacency**: the probability that two rows adjacent in storage land in the
  same batch, against its value under a uniform shuffle.
* **TV by position**: mean batch TV in equal parts of the epoch (windows are
  cut at the epoch's end, so the tail can be worse).

Example:
    >>> import numpy as np
    >>> from shardset.quality import order_quality
    >>> labels = np.repeat(np.arange(4), 250)             # sorted by class, never shuffled
    >>> q = order_quality(labels, 50, ids=np.arange(1000))
    >>> round(q.batch_tv, 2), round(q.effective_batch, 1), q.rank_correlation
    (0.75, 1.0, 1.0)
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Mapping

import numpy as np

from .errors import ArgumentError
from .format import check_int

__all__ = [
    "OrderQuality",
    "order_quality",
    "uniform_quality",
    "batch_tv",
    "label_vif",
    "drift_tv",
    "rank_correlation",
    "adjacent_same_batch",
    "within_block_correlation",
    "predicted_vif",
    "quantile_labels",
    "delivered",
    "store_quality",
]


@dataclass
class OrderQuality:
    """The metrics of one delivered order (see the module docstring)."""

    rows: int
    batch_size: int
    batches: int
    classes: int
    batch_tv: float
    vif: float
    effective_batch: float
    drift_tv: float
    rank_correlation: float | None
    adjacent_same_batch: float | None
    adjacent_same_batch_uniform: float
    tv_by_position: list[float]

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _integers(labels: np.ndarray) -> np.ndarray:
    if labels.dtype.kind not in "iu":
        raise ArgumentError(f"labels must be integers, got {labels.dtype}")
    return labels


def _classes(labels: np.ndarray, classes: int | None) -> tuple[np.ndarray, int]:
    """``(ids, k)``: the labels as int64 class ids ``0..k-1``.

    Without ``classes`` every distinct integer is a class, whatever its value
    (timestamps, uint64); with it the labels must already be the ids ``0..classes-1``.
    """
    _integers(labels)
    if classes is None:
        values, ids = np.unique(labels, return_inverse=True)
        return ids.astype(np.int64, copy=False), len(values)
    if labels.size and (labels.min() < 0 or labels.max() >= classes):
        raise ArgumentError(f"labels must lie in 0..{classes - 1} for {classes} classes, "
                            f"got {labels.min()}..{labels.max()}")
    return labels.astype(np.int64), int(classes)


def _proportions(labels: np.ndarray, groups: np.ndarray, ngroups: int, classes: int) -> np.ndarray:
    """Label proportions ``(ngroups, classes)`` of each group (rows of ``groups`` label the group)."""
    counts = np.bincount(groups * classes + labels, minlength=ngroups * classes).reshape(ngroups, classes)
    return counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)


def _global(labels: np.ndarray, classes: int) -> np.ndarray:
    return np.bincount(labels, minlength=classes) / max(len(labels), 1)


def _full_batches(labels: np.ndarray, batch_size: int, classes: int) -> np.ndarray:
    nb = len(labels) // batch_size
    groups = np.arange(nb * batch_size) // batch_size
    return _proportions(labels[: nb * batch_size], groups, nb, classes)


def batch_tv(labels: np.ndarray, batch_size: int, classes: int | None = None) -> np.ndarray:
    """TV distance between each full batch's label histogram and the global one.

    >>> batch_tv(np.array([0, 0, 1, 1]), 2).tolist()
    [0.5, 0.5]
    """
    labels, c = _classes(np.asarray(labels), classes)
    return 0.5 * np.abs(_full_batches(labels, batch_size, c) - _global(labels, c)).sum(axis=1)


def label_vif(labels: np.ndarray, batch_size: int, classes: int | None = None) -> float:
    """Variance inflation of batch label proportions against a uniform shuffle (1 = uniform)."""
    labels, c = _classes(np.asarray(labels), classes)
    n, b = len(labels), batch_size
    if n < 2 * b:
        raise ArgumentError(f"need at least two full batches, got {n} rows for batch size {b}")
    p = _global(labels, c)
    observed = ((_full_batches(labels, b, c) - p) ** 2).mean(axis=0).sum()
    uniform = (p * (1 - p)).sum() / b * (n - b) / (n - 1)
    return float(observed / uniform) if uniform > 0 else 1.0


def drift_tv(labels: np.ndarray, classes: int | None = None, stretches: int = 100) -> np.ndarray:
    """TV distance to the global histogram of each of ``stretches`` consecutive equal parts."""
    labels, c = _classes(np.asarray(labels), classes)
    n = len(labels)
    parts = min(stretches, n)
    groups = np.arange(n) * parts // max(n, 1)
    return 0.5 * np.abs(_proportions(labels, groups, parts, c) - _global(labels, c)).sum(axis=1)


def _ranks(ids: np.ndarray) -> np.ndarray:
    r = np.empty(len(ids), np.int64)
    r[np.argsort(ids, kind="stable")] = np.arange(len(ids))
    return r


def rank_correlation(ids: np.ndarray) -> float:
    """Spearman correlation between storage position (``ids``) and delivery position.

    >>> rank_correlation(np.arange(5)), rank_correlation(np.arange(5)[::-1])
    (1.0, -1.0)
    """
    ids = np.asarray(ids)
    n = len(ids)
    if n < 2:
        return 1.0
    d = (_ranks(ids) - np.arange(n)).astype(np.float64)
    return float(1 - 6 * (d * d).sum() / (n * (n * n - 1.0)))


def _uniform_same_batch(n: int, batch_size: int) -> float:
    """P(two given delivered rows share a batch) when the order is uniform."""
    full, rest = divmod(n, batch_size)
    pairs = full * batch_size * (batch_size - 1) + rest * (rest - 1)
    return pairs / (n * (n - 1)) if n > 1 else 1.0


def adjacent_same_batch(ids: np.ndarray, batch_size: int) -> tuple[float, float]:
    """``(observed, uniform)`` probability that storage neighbours ``i, i+1`` (both
    delivered) share a batch.

    >>> adjacent_same_batch(np.arange(8), 4)
    (0.8571428571428571, 0.42857142857142855)
    """
    ids = np.asarray(ids)
    n = len(ids)
    order = np.argsort(ids, kind="stable")
    sid, batch = ids[order], order // batch_size
    pair = np.diff(sid) == 1
    same = (batch[1:] == batch[:-1])[pair]
    observed = float(same.mean()) if same.size else float("nan")
    return observed, _uniform_same_batch(n, batch_size)


def within_block_correlation(labels: np.ndarray, block_rows: int, classes: int | None = None) -> float:
    """Within-block label correlation ``rho`` of the VIF formula (labels in *storage* order).

    The share of the label variance that lies between blocks, ``eta2``, less
    what sampling alone puts there: ``rho = (eta2 - 1/m) / (1 - 1/m)`` for blocks
    of ``m = block_rows`` rows.  1 for blocks of a single class, about 0 for a
    random order.
    """
    labels, c = _classes(np.asarray(labels), classes)
    n = len(labels)
    nblocks = -(-n // block_rows)
    groups = np.arange(n) // block_rows
    q = _proportions(labels, groups, nblocks, c)
    weights = np.bincount(groups, minlength=nblocks) / n
    p = _global(labels, c)
    total = (p * (1 - p)).sum()
    if total == 0 or block_rows == 1:
        return 0.0
    eta2 = (weights[:, None] * (q - p) ** 2).sum() / total
    return float((eta2 - 1 / block_rows) / (1 - 1 / block_rows))


def predicted_vif(rho: float, batch_size: int, window_blocks: int = 1) -> float:
    """``1 + rho (b - 1) / W``: the VIF of batches drawn from a window of W mixed blocks.

    >>> predicted_vif(1.0, 257, 8)
    33.0
    """
    return 1.0 + rho * (batch_size - 1) / window_blocks


def quantile_labels(
    values: np.ndarray, bins: int = 10, edges: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """``(labels, edges)``: class ``k`` for values in the ``k``-th of ``bins`` quantile bins.

    >>> quantile_labels(np.arange(10.0), bins=2)[0].tolist()
    [0, 0, 0, 0, 0, 1, 1, 1, 1, 1]
    """
    values = np.asarray(values, dtype=np.float64).reshape(-1)
    if edges is None:
        edges = np.quantile(values, np.arange(1, bins) / bins)
    return np.searchsorted(edges, values, side="right").astype(np.int64), edges


def order_quality(
    labels: np.ndarray,
    batch_size: int,
    *,
    ids: np.ndarray | None = None,
    classes: int | None = None,
    stretches: int = 100,
    bins: int = 20,
) -> OrderQuality:
    """Every metric of the delivered order ``labels`` (and ``ids``, for the displacement ones)."""
    b = check_int("batch_size", batch_size)
    labels, c = _classes(np.asarray(labels), classes)
    tv = batch_tv(labels, b, c)
    vif = label_vif(labels, b, c)
    parts = np.array_split(tv, min(bins, len(tv)))
    adj, adj_uniform = adjacent_same_batch(ids, b) if ids is not None else (None, _uniform_same_batch(len(labels), b))
    return OrderQuality(
        rows=len(labels), batch_size=b, batches=len(tv), classes=c,
        batch_tv=float(tv.mean()), vif=vif, effective_batch=b / vif if vif > 0 else math.inf,  # VIF 0: every batch has the global mix
        drift_tv=float(drift_tv(labels, c, stretches).mean()),
        rank_correlation=None if ids is None else rank_correlation(ids),
        adjacent_same_batch=adj, adjacent_same_batch_uniform=adj_uniform,
        tv_by_position=[float(p.mean()) for p in parts],
    )


def uniform_quality(
    labels: np.ndarray, batch_size: int, *, ids: np.ndarray | None = None, seed: int = 0, **kw: Any
) -> OrderQuality:
    """:func:`order_quality` of a uniform random permutation of the same rows (the reference)."""
    perm = np.random.default_rng(seed).permutation(len(labels))
    return order_quality(np.asarray(labels)[perm], batch_size, ids=None if ids is None else np.asarray(ids)[perm], **kw)


def delivered(dataset) -> dict[str, np.ndarray]:
    """Iterate ``dataset`` (a :class:`~shardset.ShardedDataset`) once; each field's rows in delivery order."""
    parts: dict[str, list[np.ndarray]] = {f: [] for f in dataset.fields}
    for batch in dataset:
        items = batch.items() if isinstance(batch, Mapping) else zip(dataset.fields, batch)
        for name, t in items:
            parts[name].append(t.numpy())
    return {k: np.concatenate(v) if v else np.empty(0) for k, v in parts.items()}


def store_quality(
    path,
    batch_size: int,
    *,
    label: str | None = None,
    id_field: str | None = None,
    window_blocks: int = 1,
    slice_mb: float | None = None,
    seed: int = 0,
    epoch: int = 0,
    bins: int = 10,
    shuffle: bool = True,
    storage_options: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Measure the order one epoch of ``ShardedDataset(path, ...)`` delivers.

    ``label`` names the class field (default ``"label"`` if the store has one,
    else ``"y"``); a floating-point field is cut into ``bins`` quantile classes.
    ``id_field`` (optional) numbers the rows in their original order and enables
    the displacement metrics.  Holds the label (and id) column in memory.
    ``window_blocks`` and ``slice_mb`` configure the reader as in ``ShardedDataset``
    (with slices, rho and the formula's W are those of the slices).
    ``path`` may be a URL (``s3://bucket/prefix``) with ``storage_options``.
    Returns ``{"reader", "uniform", "rho", "predicted_vif", ...}``.
    """
    from .dataset import ShardedDataset
    from .store import BlockStore

    store = BlockStore.open(path, storage_options=storage_options)
    fields = store.layout.fields
    label = label or ("label" if "label" in fields else "y")
    for name in (label, id_field):
        if name is not None and name not in fields:
            raise ArgumentError(f"{path} has no field {name!r}; it has {sorted(fields)}")
    for kind, name in (("label", label), ("id", id_field)):
        if name is not None and int(np.prod(fields[name].shape)) != 1:
            raise ArgumentError(f"{kind} field {name!r} must hold one value per row, not shape {fields[name].shape}")
    stored = np.concatenate([store.read_block(label, b).reshape(-1) for b in range(store.layout.num_blocks)])
    edges = None
    if stored.dtype.kind == "f":
        stored, edges = quantile_labels(stored, bins)
    values = np.unique(_integers(stored))  # refuses unusable labels before the epoch is read
    fields_read = [label] + ([id_field] if id_field else [])
    ds = ShardedDataset(path, batch_size, seed=seed, shuffle=shuffle, fields=fields_read, window_blocks=window_blocks,
                        slice_mb=slice_mb, storage_options=storage_options)
    ds.set_epoch(epoch)
    got = delivered(ds)
    labels = got[label].reshape(-1)
    if edges is not None:
        labels = quantile_labels(labels, edges=edges)[0]
    stored, labels, classes = np.searchsorted(values, stored), np.searchsorted(values, labels), len(values)
    ids = got[id_field].reshape(-1) if id_field else None
    unit_rows = ds.unit_rows or store.layout.block_rows
    rho = within_block_correlation(stored, unit_rows, classes)
    return {
        "path": str(path), "rows": store.layout.rows, "block_rows": store.layout.block_rows,
        "blocks": store.layout.num_blocks, "batch_size": batch_size, "window_blocks": window_blocks,
        "unit_rows": unit_rows, "window_units": ds.plan(epoch).window,
        "seed": seed, "epoch": epoch, "label": label, "id_field": id_field, "classes": classes,
        "rho": rho, "predicted_vif": predicted_vif(rho, batch_size, ds.plan(epoch).window),
        "reader": order_quality(labels, batch_size, ids=ids, classes=classes).as_dict(),
        "uniform": uniform_quality(labels, batch_size, ids=ids, seed=seed, classes=classes).as_dict(),
    }
