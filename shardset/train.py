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
from typing import Callable

import numpy as np
import torch
from torch.utils.data import DataLoader

from .dataset import ShardedDataset
from .store import BlockStore
from .synthetic import true_parameters

__all__ = ["FitResult", "EpochStats", "fit_linear_regression"]


@dataclass
class EpochStats:
    epoch: int
    loss: float
    rows: int
    seconds: float

    @property
    def rows_per_s(self) -> float:
        return self.rows / self.seconds if self.seconds > 0 else float("inf")


@dataclass
class FitResult:
    w: np.ndarray
    b: float
    w_true: np.ndarray | None
    b_true: float | None
    epochs: list[EpochStats] = field(default_factory=list)
    row_bytes: int = 0

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
) -> FitResult:
    """Train ``nn.Linear(d, 1)`` on the store's ``X``/``y`` with SGD and squared loss."""
    if epochs < 1 or lr <= 0:
        raise ValueError(f"epochs must be >= 1 and lr > 0, got epochs={epochs}, lr={lr}")
    ds = ShardedDataset(path, batch_size, seed=seed, prefetch=prefetch, fields=["X", "y"])
    features = ds.layout.fields["X"].shape
    if len(features) != 1 or ds.layout.fields["y"].shape != (1,):
        raise ValueError("linear regression needs X of shape (N, d) and y of shape (N, 1)")
    torch.manual_seed(seed)
    model = torch.nn.Linear(features[0], 1)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    loader = DataLoader(ds, batch_size=None, num_workers=workers, persistent_workers=workers > 0)
    truth = true_parameters(BlockStore.open(path))
    result = FitResult(np.empty(0), 0.0, *(truth or (None, None)), row_bytes=ds.layout.row_bytes)
    for epoch in range(epochs):
        ds.set_epoch(epoch)
        total, rows, start = torch.zeros(()), 0, time.perf_counter()
        for X, y in loader:
            loss = torch.nn.functional.mse_loss(model(X), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.detach() * len(X)
            rows += len(X)
        stats = EpochStats(epoch, float(total) / max(rows, 1), rows, time.perf_counter() - start)
        result.epochs.append(stats)
        if log is not None:
            log(stats)
    result.w = model.weight.detach().numpy().reshape(-1).copy()
    result.b = float(model.bias.detach())
    return result
