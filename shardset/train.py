"""The training demo: fit y = X w + b with minibatch SGD streamed from a store.

Example:
    >>> import tempfile, os
    >>> from shardset import generate_regression, fit_linear_regression
    >>> path = os.path.join(tempfile.mkdtemp(), "reg.zarr")
    >>> _ = generate_regression(path, rows=20000, features=2, weights=[2.0, -3.4], block_rows=4096, workers=1)
    >>> fit = fit_linear_regression(path, epochs=2, batch_size=64, lr=0.03)
    >>> [round(v, 2) for v in fit.w.tolist()], round(fit.b, 2)
    ([2.0, -3.4], 4.2)
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import numpy as np
import torch
from torch.utils.data import DataLoader

from .errors import ArgumentError
from .dataset import ShardedDataset
from .format import check_int, check_positive
from .sparse import SPARSE_FIELDS, is_sparse, sparse_batch, sparse_true_parameters
from .store import BlockStore
from .synthetic import _one_thread, true_parameters
from .urls import worker_start_method

__all__ = ["FitResult", "EpochStats", "fit_linear_regression", "SparseLinear", "SparseFitResult", "fit_sparse_regression"]


@dataclass
class EpochStats:
    epoch: int
    loss: float
    rows: int
    seconds: float
    row_bytes: int = 0  # of the fields read

    @property
    def rows_per_s(self) -> float:
        return self.rows / self.seconds if self.seconds > 0 else float("inf")

    @property
    def mib_per_s(self) -> float:
        return self.rows_per_s * self.row_bytes / 2**20


@dataclass
class FitResult:
    w: np.ndarray
    b: float
    w_true: np.ndarray | None
    b_true: float | None
    epochs: list[EpochStats] = field(default_factory=list)
    row_bytes: int = 0  # of the fields read

    @property
    def w_error(self) -> float | None:
        """Largest absolute error of the recovered weights (None if the truth is unknown)."""
        return None if self.w_true is None else float(np.abs(self.w - self.w_true).max())

    @property
    def b_error(self) -> float | None:
        return None if self.b_true is None else abs(self.b - self.b_true)


def fit_linear_regression(
    path: str | os.PathLike,
    *,
    epochs: int = 1,
    batch_size: int = 1024,
    lr: float = 0.03,
    workers: int = 0,
    seed: int = 0,
    prefetch: int = 1,
    log: Callable[[EpochStats], None] | None = None,
    storage_options: Mapping[str, Any] | None = None,
) -> FitResult:
    """Train ``nn.Linear(d, 1)`` on the store's ``X``/``y`` with SGD and squared loss.

    ``path`` may be a URL (``s3://bucket/prefix``) with ``storage_options``.
    """
    check_int("epochs", epochs)
    check_positive("lr", lr)
    ds = ShardedDataset(path, batch_size, seed=seed, prefetch=prefetch, fields=["X", "y"],
                        storage_options=storage_options)
    features = ds.layout.fields["X"].shape
    if len(features) != 1 or ds.layout.fields["y"].shape != (1,):
        raise ArgumentError("linear regression needs X of shape (N, d) and y of shape (N, 1)")
    torch.manual_seed(seed)
    model = torch.nn.Linear(features[0], 1)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    loader = DataLoader(ds, batch_size=None, num_workers=workers, persistent_workers=workers > 0,
                        multiprocessing_context=worker_start_method(path) if workers else None)
    truth = true_parameters(BlockStore.open(path, storage_options=storage_options))
    result = FitResult(np.empty(0), 0.0, *(truth or (None, None)), row_bytes=ds.row_bytes)

    def step(batch, epoch: int) -> tuple[torch.Tensor, int]:
        X, y = (t.float() for t in batch)  # the model is float32, whatever the store's dtype
        loss = torch.nn.functional.mse_loss(model(X), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss.detach(), len(X)

    result.epochs = _run_epochs(ds, loader, epochs, step, log)
    result.w = model.weight.detach().numpy().reshape(-1).copy()
    result.b = float(model.bias.detach())
    return result


def _run_epochs(ds: ShardedDataset, loader, epochs: int, step, log) -> list[EpochStats]:
    """Call ``step(batch, epoch) -> (mean loss, rows)`` on every batch of ``epochs`` epochs."""
    out, row_bytes = [], ds.row_bytes
    for epoch in range(epochs):
        ds.set_epoch(epoch)
        total, rows, start = torch.zeros(()), 0, time.perf_counter()
        for batch in loader:
            loss, n = step(batch, epoch)
            total += loss * n
            rows += n
        out.append(EpochStats(epoch, float(total) / max(rows, 1), rows, time.perf_counter() - start, row_bytes))
        if log is not None:
            log(out[-1])
    return out


# -- wide sparse regression ------------------------------------------------------------------


class SparseLinear(torch.nn.Module):
    """``y = sum_j values_j * w[indices_j] + b``: ``nn.EmbeddingBag(features, 1, mode="sum")``
    holds ``w`` (zeros at the start) and a dense ``bias`` holds ``b``.

    With ``sparse=True`` the gradient of ``w`` is a sparse tensor with one row per
    index in the batch, so a step costs the same for 10^5 or 10^7 features.

    >>> model = SparseLinear(10)
    >>> model(torch.tensor([[1, 4]]), torch.tensor([[2.0, -1.0]])).shape
    torch.Size([1, 1])
    """

    def __init__(self, features: int, *, sparse: bool = True) -> None:
        super().__init__()
        self.bag = torch.nn.EmbeddingBag(features, 1, mode="sum", sparse=sparse)
        torch.nn.init.zeros_(self.bag.weight)
        self.bias = torch.nn.Parameter(torch.zeros(1))

    def forward(self, indices: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        return self.bag(indices, per_sample_weights=values) + self.bias


@dataclass
class SparseFitResult(FitResult):
    """A :class:`FitResult` whose weight errors count only the learnable features:
    those seen at least ``min_count`` times in an epoch (``counts``)."""

    counts: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    min_count: int = 20

    @property
    def learnable(self) -> np.ndarray:
        return self.counts >= self.min_count

    def _errors(self) -> np.ndarray | None:
        return None if self.w_true is None else (self.w - self.w_true)[self.learnable]

    @property
    def w_error(self) -> float | None:
        """Largest absolute error over the learnable features."""
        e = self._errors()
        return None if e is None or not e.size else float(np.abs(e).max())

    @property
    def w_rms(self) -> float | None:
        """Root mean square error over the learnable features."""
        e = self._errors()
        return None if e is None or not e.size else float(np.sqrt(np.mean(np.square(e, dtype=np.float64))))


DEFAULT_LR = {"adagrad": 1.0, "adam": 0.1}


def fit_sparse_regression(
    path: str | os.PathLike,
    *,
    epochs: int = 3,
    batch_size: int = 1024,
    lr: float | None = None,
    optimizer: str = "adagrad",
    min_count: int = 20,
    workers: int = 0,
    seed: int = 0,
    prefetch: int = 1,
    log: Callable[[EpochStats], None] | None = None,
    storage_options: Mapping[str, Any] | None = None,
) -> SparseFitResult:
    """Train :class:`SparseLinear` on a sparse store (``indices``, ``values``, ``y``).

    ``optimizer="adagrad"`` (default ``lr`` 1.0): ``torch.optim.Adagrad``, whose
    per-weight steps shrink as that weight's squared gradients add up (a sparse
    gradient updates only the rows it holds); ``"adam"`` (default ``lr`` 0.1):
    ``torch.optim.SparseAdam`` for ``w`` (moments updated only at the indices of
    each batch) and ``Adam`` for the bias, whose good ``lr`` depends on the batch
    size (docs/sparse.md).  The first epoch counts how often each feature
    occurs; the result compares ``w`` with the store's true ``w`` on the
    features seen at least ``min_count`` times.

    Example:
        >>> import tempfile, os
        >>> from shardset import generate_sparse_regression
        >>> path = os.path.join(tempfile.mkdtemp(), "sparse.zarr")
        >>> _ = generate_sparse_regression(path, rows=8000, features=200, nnz=4, block_rows=3000, workers=1)
        >>> fit = fit_sparse_regression(path, epochs=2, batch_size=64)
        >>> int(fit.learnable.sum()), fit.w_rms < 0.05, round(fit.b, 1)
        (200, True, 4.2)
    """
    if optimizer not in DEFAULT_LR:
        raise ArgumentError(f"optimizer must be one of {', '.join(DEFAULT_LR)}, got {optimizer!r}")
    lr = DEFAULT_LR[optimizer] if lr is None else lr
    check_int("epochs", epochs)
    check_positive("lr", lr)
    min_count = check_int("min_count", min_count, 0)
    store = BlockStore.open(path, storage_options=storage_options)
    if not is_sparse(store.layout):
        raise ArgumentError(f"{path} is not a sparse store: it needs fields indices and values (N, nnz) and y (N, 1)")
    truth = sparse_true_parameters(store)
    features = int(store.layout.generator.get("features") or _max_index(store) + 1)
    ds = ShardedDataset(path, batch_size, seed=seed, prefetch=prefetch, fields=list(SPARSE_FIELDS),
                        storage_options=storage_options)
    torch.manual_seed(seed)
    model = SparseLinear(features)
    if optimizer == "adam":
        opts = [torch.optim.SparseAdam(model.bag.parameters(), lr=lr), torch.optim.Adam([model.bias], lr=lr)]
    else:
        opts = [torch.optim.Adagrad(model.parameters(), lr=lr)]
    counts = torch.zeros(features, dtype=torch.int64)
    loader = DataLoader(ds, batch_size=None, num_workers=workers, persistent_workers=workers > 0,
                        multiprocessing_context=worker_start_method(path) if workers else None)

    def step(batch, epoch: int) -> tuple[torch.Tensor, int]:
        indices, values, y = sparse_batch(batch)
        values, y = values.float(), y.float()  # the model is float32, whatever the store's dtype
        if epoch == 0:
            counts.index_add_(0, indices.reshape(-1), torch.ones(indices.numel(), dtype=torch.int64))
        loss = torch.nn.functional.mse_loss(model(indices, values), y)
        for opt in opts:
            opt.zero_grad(set_to_none=True)
        loss.backward()
        for opt in opts:
            opt.step()
        return loss.detach(), len(y)

    result = SparseFitResult(
        np.empty(0), 0.0, *(None, None) if truth is None else (truth[0][:], truth[1]),
        row_bytes=ds.row_bytes, min_count=min_count,
    )
    # One torch thread: a step is too small to split (two threads ran 4x slower on two busy cores,
    # where the reader's thread needs the other one); invariants off explicitly, else torch warns.
    with _one_thread(), torch.sparse.check_sparse_tensor_invariants(enable=False):
        result.epochs = _run_epochs(ds, loader, epochs, step, log)
    result.w = model.bag.weight.detach().numpy().reshape(-1).copy()
    result.b = float(model.bias.detach())
    result.counts = counts.numpy()
    return result


def _max_index(store: BlockStore) -> int:
    """The largest feature index in a sparse store without generator metadata (one pass)."""
    return max(int(store.read_block("indices", b).max(initial=0)) for b in range(store.layout.num_blocks))
