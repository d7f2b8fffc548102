"""The seed lesson's in-memory streams: fresh data every pass vs the same data every pass."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader

from shardset import FixedRegressionStream, FreshRegressionStream

W = [2.0, -3.4]
BIAS = 4.2


def shapes(batches) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
    return [(tuple(X.shape), tuple(y.shape)) for X, y in batches]


def key(batch) -> bytes:
    X, y = batch
    return X.numpy().tobytes() + y.numpy().tobytes()


def same(a, b) -> bool:
    return len(a) == len(b) and all(torch.equal(x[0], z[0]) and torch.equal(x[1], z[1]) for x, z in zip(a, b))


def load(ds, num_workers: int) -> list:
    kw = dict(timeout=60) if num_workers else {}
    return [tuple(b) for b in DataLoader(ds, batch_size=None, num_workers=num_workers, **kw)]


def assert_linear(batches, noise: float, w=W, bias=BIAS) -> None:
    """``y = X w + b + noise * e``: exact for ``noise=0``, else residuals of about ``noise``."""
    X = torch.cat([b[0] for b in batches])
    y = torch.cat([b[1] for b in batches])
    assert X.dtype == torch.float32 and y.dtype == torch.float32
    resid = y - (X @ torch.tensor(w, dtype=torch.float32)[:, None] + bias)
    if noise == 0:
        assert torch.allclose(resid, torch.zeros_like(resid), atol=1e-5)
    else:
        assert abs(resid.std().item() - noise) < 0.15 * noise
        assert abs(resid.mean().item()) < 0.15 * noise
    if X.numel() >= 10000:  # X ~ N(0, 1)
        assert abs(X.mean().item()) < 0.05 and abs(X.std().item() - 1) < 0.05


CLASSES = [FreshRegressionStream, FixedRegressionStream]


@pytest.mark.parametrize("cls", CLASSES)
@pytest.mark.parametrize(
    "rows, batch_size, drop_last, want",
    [
        (10, 4, False, [4, 4, 2]),
        (10, 4, True, [4, 4]),
        (8, 4, False, [4, 4]),
        (8, 4, True, [4, 4]),
        (3, 4, False, [3]),
        (3, 4, True, []),
    ],
)
def test_batch_shapes_and_drop_last(cls, rows, batch_size, drop_last, want):
    ds = cls(W, rows=rows, batch_size=batch_size, drop_last=drop_last)
    assert len(ds) == len(want)
    for num_workers in (0, 2):
        batches = load(ds, num_workers)
        assert sorted(shapes(batches)) == sorted(((n, 2), (n, 1)) for n in want)


@pytest.mark.parametrize("cls", CLASSES)
def test_bad_sizes_raise(cls):
    with pytest.raises(ValueError):
        cls(W, rows=0, batch_size=4)
    with pytest.raises(ValueError):
        cls(W, rows=10, batch_size=0)


@pytest.mark.parametrize("cls", CLASSES)
def test_data_follow_the_linear_model(cls):
    assert_linear(list(cls(W, BIAS, 0.0, rows=64, batch_size=16)), 0.0)
    assert_linear(list(cls(W, BIAS, 0.5, rows=20000, batch_size=1000)), 0.5)
    w3 = [1.0, 0.0, -2.0]
    assert_linear(list(cls(w3, -1.0, 0.0, rows=50, batch_size=7)), 0.0, w3, -1.0)


def test_fresh_stream_gives_new_data_every_pass():
    ds = FreshRegressionStream(W, rows=40, batch_size=8)
    passes = [list(ds) for _ in range(3)]
    keys = [key(b) for p in passes for b in p]
    assert len(set(keys)) == len(keys) == 15  # no batch ever repeats, within or across passes
    for p in passes:
        assert shapes(p) == [((8, 2), (8, 1))] * 5


def test_fresh_stream_with_workers():
    ds = FreshRegressionStream(W, BIAS, 0.0, rows=50, batch_size=8)
    loader = DataLoader(ds, batch_size=None, num_workers=2, timeout=60)
    passes = [[tuple(b) for b in loader] for _ in range(2)]
    for p in passes:
        assert sorted(len(b[0]) for b in p) == [2, 8, 8, 8, 8, 8, 8]
        assert_linear(p, 0.0)
    keys = [key(b) for p in passes for b in p]
    assert len(set(keys)) == len(keys)  # workers do not duplicate data, epochs differ


def test_fixed_stream_is_the_same_every_pass_whatever_the_global_rng():
    ds = FixedRegressionStream(W, rows=50, batch_size=8, seed=7)
    torch.manual_seed(1)
    a = list(ds)
    torch.manual_seed(2)
    torch.rand(5)
    b = list(ds)
    assert same(a, b)
    again = FixedRegressionStream(W, rows=50, batch_size=8, seed=7)
    torch.manual_seed(3)
    assert same(list(again), a)
    # Iterating neither reads nor moves the global generator.
    state = torch.get_rng_state()
    list(ds)
    assert torch.equal(torch.get_rng_state(), state)
    # Batches inside a pass differ, and another seed gives other data.
    assert len({key(x) for x in a}) == len(a)
    other = list(FixedRegressionStream(W, rows=50, batch_size=8, seed=8))
    assert not any(torch.equal(x[0], z[0]) for x, z in zip(a, other))


@pytest.mark.parametrize("drop_last", [False, True])
def test_fixed_stream_with_workers_matches_single_process(drop_last):
    ds = FixedRegressionStream(W, BIAS, 0.0, rows=50, batch_size=8, seed=3, drop_last=drop_last)
    single = load(ds, 0)
    assert len(single) == len(ds) == (6 if drop_last else 7)
    for global_seed in (0, 1):
        torch.manual_seed(global_seed)  # also changes the workers' base seeds
        multi = load(ds, 2)
        assert sorted(map(key, multi)) == sorted(map(key, single))
    assert_linear(single, 0.0)
