"""Tests of :class:`shardset.ShardedDataset`, the streaming reader.

Stores come from ``conftest.py``: in an ``id`` store ``y[i] = i`` and
``X[i, j] = i * (j + 1)``, so every delivered row says which row it is.
Distributed ranks are simulated in one process with ``rank=`` / ``world_size=``
(``test_distributed.py`` runs real process groups).
"""

from __future__ import annotations

import gc
import itertools
import re
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from batches import same_batches
from torch.utils.data import DataLoader

import shardset
from shardset import (
    BlockStore,
    CorruptBlockError,
    FeistelPermutation,
    IncompleteStoreError,
    ShardedDataset,
    StoreFormatError,
)
from shardset import bench
from shardset.format import FieldSpec, Layout
from shardset.plan import BLOCK_DOMAIN

pytestmark = pytest.mark.filterwarnings("ignore:This DataLoader will create:UserWarning")

N = 1009  # prime: not divisible by any batch size, block size or world size used here
BS = 16


# -- helpers -----------------------------------------------------------------------


def ids_of(batch) -> np.ndarray:
    """Row ids of a batch of an ``id`` store (tuple) or a ``mixed`` store (dict).

    (A ``DataLoader`` hands tuples over as lists: its ``default_convert`` does that.)
    """
    if isinstance(batch, (tuple, list)):
        return batch[1].numpy()
    if "y" in batch:
        return batch["y"].numpy()
    if "b" in batch:
        return batch["b"].numpy()
    return batch["a"][:, 0, 0].numpy().astype(np.int64)


def stream_ids(batches) -> np.ndarray:
    return np.concatenate([ids_of(b) for b in batches]) if batches else np.zeros(0, np.int64)


def check_id_rows(batch) -> None:
    """Every field of every row of an ``id`` batch agrees with the row id."""
    X, y = batch
    assert X.dtype == torch.float32 and y.dtype == torch.int64
    assert X.ndim == 2 and y.ndim == 1 and X.shape[0] == y.shape[0]
    expect = y.to(torch.float32)[:, None] * torch.arange(1, X.shape[1] + 1, dtype=torch.float32)
    assert torch.equal(X, expect)


def evict(path) -> None:
    """Drop a store's chunks from the page cache: reads with ``direct=True`` then use O_DIRECT."""
    bench.evict(Path(path).rglob("c/*/*"))


def load(ds, num_workers: int, **kw) -> list:
    """One pass through a ``DataLoader`` (``batch_size=None``: the dataset batches)."""
    if num_workers:
        kw.setdefault("timeout", 60)
    return list(DataLoader(ds, batch_size=None, num_workers=num_workers, **kw))


def batch_key(batch) -> tuple[int, ...]:
    return tuple(ids_of(batch).tolist())


def assert_exactly_once(ids: np.ndarray, rows: int, world_size: int = 1) -> None:
    """Each row at most once, all in range, and at most ``world_size - 1`` rows missing."""
    assert ids.dtype == np.int64
    assert len(np.unique(ids)) == len(ids), "a row was delivered twice"
    assert ids.min() >= 0 and ids.max() < rows
    assert len(ids) == rows - rows % world_size


def assert_ranks_split_once(path, world_size: int, num_workers: int, **kw) -> None:
    """Every rank of ``world_size`` (through a DataLoader with ``num_workers``) yields
    consistent id rows, as many batches as ``len(ds)`` and as the other ranks, and
    together they deliver every row once (at most ``world_size - 1`` dropped)."""
    counts, ids = [], []
    for rank in range(world_size):
        ds = ShardedDataset(path, BS, rank=rank, world_size=world_size, **kw)
        batches = load(ds, num_workers)
        for b in batches:
            check_id_rows(b)
        counts.append(len(batches))
        ids.append(stream_ids(batches))
        assert len(batches) == len(ds)
    assert len(set(counts)) == 1
    assert_exactly_once(np.concatenate(ids), N, world_size)


def visit_order(ids: np.ndarray, block_rows: int) -> list[int]:
    """Blocks in the order the stream enters them (runs of equal block ids collapsed)."""
    blocks = ids // block_rows
    return [int(b) for b, _ in itertools.groupby(blocks.tolist())]


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    ra = np.argsort(np.argsort(a, kind="stable"), kind="stable").astype(np.float64)
    rb = np.argsort(np.argsort(b, kind="stable"), kind="stable").astype(np.float64)
    return float(np.corrcoef(ra, rb)[0, 1])


def positions(ids: np.ndarray) -> np.ndarray:
    """``pos[i]`` = where row ``i`` appears in the stream (``ids`` is a permutation)."""
    pos = np.empty(len(ids), np.int64)
    pos[ids] = np.arange(len(ids))
    return pos


# -- exactly once, equal batch counts -------------------------------------------------


@pytest.mark.parametrize("num_workers", [0, 1, 2, 3])
@pytest.mark.parametrize("world_size", [1, 2, 3])
@pytest.mark.parametrize("block_rows", [97, 400])
def test_exactly_once_and_equal_batch_counts(id_store, block_rows, world_size, num_workers):
    # 11 or 3 blocks for 1 to 9 consumers (ranks x workers).
    path = id_store(N, block_rows)
    rank_rows = N // world_size
    want_batches = -(-rank_rows // BS)
    per_rank = []
    for rank in range(world_size):
        ds = ShardedDataset(path, BS, seed=11, rank=rank, world_size=world_size)
        assert len(ds) == want_batches
        batches = load(ds, num_workers)
        assert len(batches) == want_batches, f"rank {rank} yielded {len(batches)} batches, len(ds)={len(ds)}"
        sizes = [len(ids_of(b)) for b in batches]
        assert sum(sizes) == rank_rows
        assert all(0 < s <= BS for s in sizes)
        assert sum(s != BS for s in sizes) <= 1, f"more than one partial batch: {sizes}"
        for b in batches:
            check_id_rows(b)
        if num_workers:
            # The same batches as the single-process stream of this rank (order aside).
            ref = list(ShardedDataset(path, BS, seed=11, rank=rank, world_size=world_size))
            assert sorted(map(batch_key, batches)) == sorted(map(batch_key, ref))
        per_rank.append(stream_ids(batches))
    assert_exactly_once(np.concatenate(per_rank), N, world_size)


def test_more_consumers_than_batches_and_blocks(make_id_store):
    # 50 rows in 8 blocks, 3 ranks of 16 rows = one batch each, 3 workers per rank:
    # two workers of every rank have nothing to do, and epochs must still advance.
    path = make_id_store(50, 7)
    epochs = []
    for rank in range(3):
        ds = ShardedDataset(path, BS, seed=2, rank=rank, world_size=3)
        assert len(ds) == 1
        loader = DataLoader(ds, batch_size=None, num_workers=3, persistent_workers=True, timeout=60)
        got = [list(loader) for _ in range(3)]
        assert [len(g) for g in got] == [1, 1, 1]
        assert ds.epoch == 3
        epochs.append([stream_ids(g) for g in got])
    for e in range(3):
        assert_exactly_once(np.concatenate([epochs[r][e] for r in range(3)]), 50, 3)
    orders = [tuple(np.concatenate([epochs[r][e] for r in range(3)]).tolist()) for e in range(3)]
    assert len(set(orders)) == 3


@pytest.mark.parametrize("rows, block_rows, world_size", [(1, 1, 1), (2, 1, 2), (5, 2, 3), (3, 5, 1), (7, 3, 7)])
def test_tiny_stores(make_id_store, rows, block_rows, world_size):
    path = make_id_store(rows, block_rows)
    dss = [ShardedDataset(path, 4, seed=1, rank=r, world_size=world_size) for r in range(world_size)]
    for _ in range(2):
        got = [list(ds) for ds in dss]
        assert len({len(g) for g in got}) == 1 and len(got[0]) == len(dss[0])
        for g in got:
            for b in g:
                check_id_rows(b)
        assert_exactly_once(np.concatenate([stream_ids(g) for g in got]), rows, world_size)


@pytest.mark.parametrize("num_workers", [0, 2])
@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_drop_last(id_store, world_size, num_workers):
    path = id_store(N, 97)
    rank_rows = N // world_size
    full = rank_rows // BS
    delivered = []
    for rank in range(world_size):
        ds = ShardedDataset(path, BS, seed=4, drop_last=True, rank=rank, world_size=world_size)
        assert len(ds) == full
        batches = load(ds, num_workers)
        assert len(batches) == full
        assert all(len(ids_of(b)) == BS for b in batches)
        # drop_last only drops the final partial batch of the rank's stream.
        keep = list(ShardedDataset(path, BS, seed=4, rank=rank, world_size=world_size))[:full]
        if num_workers == 0:
            assert same_batches(batches, keep)
        else:
            assert sorted(map(batch_key, batches)) == sorted(map(batch_key, keep))
        delivered.append(stream_ids(batches))
    ids = np.concatenate(delivered)
    assert len(np.unique(ids)) == len(ids) == world_size * full * BS


def test_drop_last_with_fewer_rows_than_a_batch(make_id_store):
    path = make_id_store(10, 3)
    ds = ShardedDataset(path, BS, drop_last=True)
    assert len(ds) == 0 and list(ds) == []
    ds = ShardedDataset(path, BS, drop_last=False)
    (batch,) = list(ds)
    assert sorted(ids_of(batch).tolist()) == list(range(10))


# -- order ------------------------------------------------------------------------------


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_no_shuffle_is_storage_order(id_store, world_size):
    path = id_store(N, 97)
    rank_rows = N // world_size
    for rank in range(world_size):
        ds = ShardedDataset(path, BS, shuffle=False, rank=rank, world_size=world_size)
        want = np.arange(rank * rank_rows, (rank + 1) * rank_rows)
        for _ in range(2):  # the epoch does not matter without shuffling
            np.testing.assert_array_equal(stream_ids(list(ds)), want)
        # With workers every batch is still a contiguous run of storage order.
        batches = load(ds, 2)
        batches.sort(key=lambda b: int(ids_of(b)[0]))
        np.testing.assert_array_equal(stream_ids(batches), want)


def test_same_seed_and_epoch_give_the_same_stream(id_store):
    path = id_store(N, 97)
    a = ShardedDataset(path, BS, seed=5)
    b = ShardedDataset(path, BS, seed=5)
    for _ in range(3):
        assert same_batches(list(a), list(b))
    c = ShardedDataset(path, BS, seed=5)
    c.set_epoch(2)
    d = ShardedDataset(path, BS, seed=5)
    d.set_epoch(2)
    assert same_batches(list(c), list(d))


def test_seed_changes_the_order(id_store):
    path = id_store(N, 97)
    streams = [stream_ids(list(ShardedDataset(path, BS, seed=s))) for s in (0, 1, 2)]
    for s in streams:
        assert_exactly_once(s, N)
    for x, y in itertools.combinations(streams, 2):
        assert not np.array_equal(x, y)
    assert len({tuple(visit_order(s, 97)) for s in streams}) == 3


def test_blocks_are_visited_in_feistel_order(id_store):
    block_rows = 97
    path = id_store(N, block_rows)
    nblocks = -(-N // block_rows)
    ds = ShardedDataset(path, BS, seed=9)
    for epoch in range(3):
        ids = stream_ids(list(ds))
        perm = FeistelPermutation(nblocks, 9, epoch, domain=BLOCK_DOMAIN)
        want = [int(perm(k)) for k in range(nblocks)]
        assert visit_order(ids, block_rows) == want
        plan = ds.plan(epoch)
        assert [plan.block_at(k) for k in range(nblocks)] == want
        # Each block is read whole and contiguously, its rows in the plan's record order.
        pos = 0
        for block in want:
            n = min(block_rows, N - block * block_rows)
            np.testing.assert_array_equal(ids[pos : pos + n], block * block_rows + plan.block_order(block))
            pos += n
    assert ds.epoch == 3


def test_epochs_decorrelate(id_store):
    # 128 blocks of 256 rows (a power of two keeps the record permutations cheap),
    # the last one short.  Block-level statistics have an sd of about 1/sqrt(128) = 0.09,
    # row-level ones inside blocks about 1/sqrt(32731) = 0.006.
    rows, block_rows = 128 * 256 - 37, 256
    path = id_store(rows, block_rows, features=1)
    ds = ShardedDataset(path, 500, seed=3)
    streams = [stream_ids(list(ds)) for _ in range(4)]
    ids = np.arange(rows)
    block = ids // block_rows
    pos = [positions(s) for s in streams]
    # Where each row lands inside its block's visit, and when each block is visited.
    local, block_pos = [], []
    for p in pos:
        start = np.full(-(-rows // block_rows), rows, np.int64)
        np.minimum.at(start, block, p)
        local.append(p - start[block])
        block_pos.append(np.argsort(np.argsort(start)))
    for s in streams:
        assert_exactly_once(s, rows)
        assert abs(spearman(positions(s), ids)) < 0.3  # far from storage order
    pairs = list(itertools.combinations(range(4), 2))
    for a, b in pairs:
        assert not np.array_equal(streams[a], streams[b])
        assert abs(spearman(pos[a], pos[b])) < 0.3, (a, b)
        assert abs(spearman(block_pos[a], block_pos[b])) < 0.3, (a, b)
        assert abs(spearman(local[a], local[b])) < 0.03, (a, b)
    assert abs(np.mean([spearman(pos[a], pos[b]) for a, b in pairs])) < 0.2
    for lp in local:
        assert abs(spearman(lp, ids % block_rows)) < 0.03


# -- epochs -------------------------------------------------------------------------------


def reference_epochs(path, epochs, **kw) -> list[list]:
    out = []
    for e in range(epochs):
        ds = ShardedDataset(path, BS, **kw)
        ds.set_epoch(e)
        out.append(list(ds))
    return out


@pytest.mark.parametrize("rank, world_size", [(0, 1), (1, 2)])
def test_persistent_workers_advance_epochs(id_store, rank, world_size):
    path = id_store(N, 97)
    kw = dict(seed=8, rank=rank, world_size=world_size)
    ref = reference_epochs(path, 3, **kw)
    ds = ShardedDataset(path, BS, **kw)
    loader = DataLoader(ds, batch_size=None, num_workers=2, persistent_workers=True, timeout=60)
    got = []
    for e in range(3):
        assert ds.epoch == e
        batches = list(loader)
        assert len(batches) == len(ds)
        assert sorted(map(batch_key, batches)) == sorted(map(batch_key, ref[e]))
        got.append(stream_ids(batches))
    assert ds.epoch == 3
    for ids in got:
        assert len(np.unique(ids)) == len(ids) == N // world_size
    assert len({tuple(x.tolist()) for x in got}) == 3


def test_spawned_workers_share_the_epoch_counter(id_store):
    # The counter must survive pickling into workers that are not forked (the
    # default start method is forkserver from Python 3.14 on).
    path = id_store(N, 97)
    ref = reference_epochs(path, 2, seed=8)
    ds = ShardedDataset(path, BS, seed=8)
    loader = DataLoader(
        ds, batch_size=None, num_workers=2, persistent_workers=True, multiprocessing_context="spawn", timeout=120
    )
    for e in range(2):
        batches = list(loader)
        assert sorted(map(batch_key, batches)) == sorted(map(batch_key, ref[e])), e
        assert ds.epoch == e + 1


def test_workers_without_persistence_advance_epochs(id_store):
    path = id_store(N, 97)
    ref = reference_epochs(path, 2, seed=8)
    ds = ShardedDataset(path, BS, seed=8)
    for e in range(2):
        batches = load(ds, 2)
        assert sorted(map(batch_key, batches)) == sorted(map(batch_key, ref[e]))
    assert ds.epoch == 2


def test_main_process_passes_advance_epochs(id_store):
    path = id_store(N, 97)
    ref = reference_epochs(path, 3, seed=8)
    ds = ShardedDataset(path, BS, seed=8)
    for e in range(3):
        assert ds.epoch == e
        assert same_batches(load(ds, 0), ref[e])
    assert len({tuple(stream_ids(r).tolist()) for r in ref}) == 3


# -- reading on into the next epoch --------------------------------------------------------

READ_ON = {"blocks": dict(), "window": dict(window_blocks=3),
           "slices": dict(window_blocks=2, slice_mb=40 * 20 / 2**20, direct=True)}  # 40-row units of 20-byte rows


@pytest.mark.parametrize("kw", READ_ON.values(), ids=READ_ON.keys())
def test_a_complete_pass_reads_on_into_the_next_epoch(id_store, kw):
    """The slots that a window's last stages free take the next epoch's first units."""
    path = id_store(N, 120)
    ref = reference_epochs(path, 3, seed=4, **kw)
    ds = ShardedDataset(path, BS, seed=4, **kw)
    got = [list(ds)]
    following = ds._ahead[1]
    assert following.plan == ds.plan(1) and following.loads  # its loads are started
    got += [list(ds), list(ds)]
    for e in range(3):
        assert same_batches(got[e], ref[e]), e


def test_a_pass_read_on_for_another_epoch_is_dropped(id_store):
    path = id_store(N, 97)
    ref = reference_epochs(path, 6, seed=4, window_blocks=2)
    ds = ShardedDataset(path, BS, seed=4, window_blocks=2)
    assert same_batches(list(ds), ref[0])
    following = ds._ahead[1]
    ds.set_epoch(5)
    assert same_batches(list(ds), ref[5])
    assert following.cpu._shutdown  # its threads were stopped before the buffers were used again
    ds.set_epoch(0)
    it = iter(ds)
    assert same_batches([next(it) for _ in range(4)], ref[0][:4])
    it.close()  # a pass left early reads nothing on
    assert ds._ahead is None
    assert same_batches(list(ds), ref[0])


def test_the_pass_read_on_stops_with_its_dataset(id_store):
    ds = ShardedDataset(id_store(N, 97), BS, seed=4, window_blocks=2)
    list(ds)
    assert any(t.name.startswith("shardset-") for t in threading.enumerate())
    del ds
    gc.collect()
    assert not shardset_threads()


def test_workers_forked_after_a_pass_in_the_main_process(id_store):
    """Forked workers inherit the main process's pass read on without its threads: they
    read their own, and the main process's next pass still gets its epoch right."""
    path = id_store(N, 97)
    ref = reference_epochs(path, 3, seed=4, window_blocks=2)
    ds = ShardedDataset(path, BS, seed=4, window_blocks=2)
    assert same_batches(list(ds), ref[0])
    assert sorted(map(batch_key, load(ds, 2))) == sorted(map(batch_key, ref[1]))
    assert same_batches(list(ds), ref[2])


def test_an_abandoned_pass_does_not_advance_the_epoch(id_store):
    path = id_store(N, 97)
    ds = ShardedDataset(path, BS, seed=8)
    it = iter(ds)
    for _ in range(3):
        next(it)
    del it
    assert ds.epoch == 0


def test_set_epoch_reproduces_an_earlier_epoch(id_store):
    path = id_store(N, 97)
    ds = ShardedDataset(path, BS, seed=6)
    ref = [list(ds) for _ in range(3)]
    ds.set_epoch(1)
    assert ds.epoch == 1
    assert same_batches(list(ds), ref[1])
    assert same_batches(list(ds), ref[2])  # then advances again
    for _ in range(2):  # pinning: the same epoch every time it is set
        ds.set_epoch(0)
        assert same_batches(list(ds), ref[0])
    fresh = ShardedDataset(path, BS, seed=6)
    fresh.set_epoch(2)
    assert same_batches(list(fresh), ref[2])


def test_set_epoch_reaches_persistent_workers(id_store):
    path = id_store(N, 97)
    ref = reference_epochs(path, 3, seed=6)
    ds = ShardedDataset(path, BS, seed=6)
    loader = DataLoader(ds, batch_size=None, num_workers=2, persistent_workers=True, timeout=60)
    for e in (2, 0, 2, 1):
        ds.set_epoch(e)
        batches = list(loader)
        assert sorted(map(batch_key, batches)) == sorted(map(batch_key, ref[e])), e


# -- fields, dtypes, shapes, copies ------------------------------------------------------------


def test_id_store_batches_are_tuples_of_the_right_dtypes(id_store):
    path = id_store(N, 97)
    ds = ShardedDataset(path, BS)
    batches = list(ds)
    assert all(isinstance(b, tuple) and len(b) == 2 for b in batches)
    X, y = batches[0]
    assert X.dtype == torch.float32 and tuple(X.shape) == (BS, 3)
    assert y.dtype == torch.int64 and tuple(y.shape) == (BS,)
    assert tuple(batches[-1][0].shape) == (N % BS, 3)
    tuple_ds = ShardedDataset(path, BS, fields=["X", "y"])
    assert same_batches(list(tuple_ds), batches)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_mixed_store_dict_batches(mixed_store, num_workers):
    rows = 503
    path = mixed_store(rows, 50)
    ds = ShardedDataset(path, BS, seed=1)
    batches = load(ds, num_workers)
    assert len(batches) == len(ds) == -(-rows // BS)
    for batch in batches:
        assert isinstance(batch, dict)
        assert sorted(batch) == ["a", "b", "c", "d"]
        a, b, c, d = batch["a"], batch["b"], batch["c"], batch["d"]
        n = len(b)
        assert a.dtype == torch.float32 and tuple(a.shape) == (n, 3, 2)
        assert b.dtype == torch.int64 and tuple(b.shape) == (n,)
        assert c.dtype == torch.int16 and tuple(c.shape) == (n, 2)
        assert d.dtype == torch.uint8 and tuple(d.shape) == (n,)
        frac = torch.arange(6, dtype=torch.float32).reshape(3, 2) / 8
        assert torch.equal(a, b.to(torch.float32)[:, None, None] + frac)
        assert torch.equal(c[:, 0].to(torch.int64), b % 30000)
        assert torch.equal(c[:, 1].to(torch.int64), -(b % 30000))
        assert torch.equal(d.to(torch.int64), b % 251)
    assert_exactly_once(stream_ids(batches), rows)


def test_workers_hand_over_fields_of_every_alignment(tmp_path):
    """A worker packs a batch's fields into one storage: a complex128 field after one of
    3 bytes a batch must still start on a multiple of 16 bytes."""
    rows = 30
    z = np.arange(rows) + 1j * np.arange(rows)
    path = shardset.write(tmp_path / "s.zarr", {"a": np.arange(rows, dtype=np.int8), "z": z}, block_rows=7,
                          progress=False).where
    batches = load(ShardedDataset(path, 3, seed=2), 2)
    assert sorted(np.concatenate([b["a"].numpy() for b in batches]).tolist()) == list(range(rows))
    for batch in batches:
        a = batch["a"].to(torch.float64)
        assert torch.equal(batch["z"].real, a) and torch.equal(batch["z"].imag, a)


def test_fields_select_and_order_dict_batches(mixed_store):
    rows = 503
    path = mixed_store(rows, 50)
    everything = list(ShardedDataset(path, BS, seed=1))
    some = list(ShardedDataset(path, BS, seed=1, fields=["c", "a"]))
    assert len(some) == len(everything)
    for s, e in zip(some, everything):
        assert isinstance(s, dict) and list(s) == ["c", "a"]
        assert torch.equal(s["c"], e["c"]) and torch.equal(s["a"], e["a"])  # the field choice keeps the order
    one = list(ShardedDataset(path, BS, seed=1, fields=["b"]))
    assert all(list(b) == ["b"] for b in one)
    assert_exactly_once(stream_ids(one), rows)


def test_fields_on_an_xy_store(id_store):
    path = id_store(N, 97)
    full = list(ShardedDataset(path, BS, seed=3))
    only_x = list(ShardedDataset(path, BS, seed=3, fields=["X"]))
    assert all(isinstance(b, dict) and list(b) == ["X"] for b in only_x)
    assert all(torch.equal(b["X"], f[0]) for b, f in zip(only_x, full))
    only_y = list(ShardedDataset(path, BS, seed=3, fields=["y"]))
    assert all(isinstance(b, dict) and list(b) == ["y"] for b in only_y)
    assert all(torch.equal(b["y"], f[1]) for b, f in zip(only_y, full))


@pytest.mark.parametrize("prefetch", [0, 1])
def test_batches_are_independent_copies(id_store, mixed_store, prefetch):
    for path in (id_store(N, 97), mixed_store(503, 50)):
        ref = list(ShardedDataset(path, BS, seed=2, prefetch=prefetch))
        ds = ShardedDataset(path, BS, seed=2, prefetch=prefetch)
        seen = []
        for batch in ds:  # scribble on every batch as soon as it arrives
            tensors = list(batch.values()) if isinstance(batch, dict) else list(batch)
            seen.append(type(batch)(zip(batch, [t.clone() for t in tensors])) if isinstance(batch, dict) else tuple(t.clone() for t in tensors))
            for t in tensors:
                t.fill_(7)
        assert same_batches(seen, ref)
        # Batches kept around share no memory: changing one leaves the others alone.
        kept = list(ShardedDataset(path, BS, seed=2, prefetch=prefetch))
        assert same_batches(kept, ref)
        first = kept[0]
        for t in first.values() if isinstance(first, dict) else first:
            t.fill_(3)
        assert same_batches(kept[1:], ref[1:])


def test_kept_batches_survive_the_reuse_of_gather_arrays(id_store):
    """Rows are gathered into arrays that are reused once no batch views them: batches
    a consumer keeps are never overwritten by later rows, and a consumer that drops
    its batches streams through a few arrays."""
    path = id_store(96 * 30, 96)  # blocks of 6 whole batches: each block is one chunk
    ref = list(ShardedDataset(path, BS, seed=2))
    kept, later = [], set()
    for i, batch in enumerate(ShardedDataset(path, BS, seed=2)):
        if i < 12:  # the first two blocks' batches, kept to the end
            kept.append(batch)
        else:
            later.add(batch[0].untyped_storage().data_ptr())
        check_id_rows(batch)
    assert same_batches(kept, ref[:12])
    assert len(later) <= 6  # of 28 chunks


def test_worker_batches_are_packed_into_one_shared_storage():
    """A worker's batch is made in shared memory, so sending it copies nothing more."""
    from shardset.dataset import _packed

    tensors = [torch.arange(5, dtype=torch.int8), torch.arange(6, dtype=torch.float64).reshape(3, 2) * (1 + 2j)]
    packed = _packed(tensors)
    assert all(p.is_shared() for p in packed)
    assert packed[0].untyped_storage().data_ptr() == packed[1].untyped_storage().data_ptr()
    assert all(torch.equal(p, t) for p, t in zip(packed, tensors))
    assert packed[1].data_ptr() % 16 == 0


def shardset_threads(wait: float = 10) -> list[str]:
    """Names of the reader threads still alive once none is left or ``wait`` seconds
    have passed (a dataset's finalizer stops its threads on a thread of its own)."""
    deadline = time.monotonic() + wait
    while (names := [t.name for t in threading.enumerate() if t.name.startswith("shardset-")]) and \
            time.monotonic() < deadline:
        time.sleep(0.01)
    return names


def test_an_abandoned_iterator_stops_its_threads(id_store):
    path = id_store(N, 97)
    ref = list(ShardedDataset(path, BS, seed=3, window_blocks=2))
    ds = ShardedDataset(path, BS, seed=3, window_blocks=2)
    it = iter(ds)
    head = [next(it) for _ in range(5)]
    assert any(t.name.startswith("shardset-") for t in threading.enumerate())
    it.close()  # as a training loop's break does, once the iterator is dropped
    assert not shardset_threads()
    assert same_batches(head, ref[:5])
    ds.set_epoch(0)  # the buffers are free again: the next pass gives the whole epoch
    assert same_batches(list(ds), ref)


@pytest.mark.parametrize("rank, world_size", [(0, 1), (1, 2)])
def test_prefetch_does_not_change_the_stream(id_store, rank, world_size):
    path = id_store(N, 97)
    streams = {}
    for prefetch in (0, 1, 3, 2**40):  # the last: no more read ahead than the stream's 11 blocks
        ds = ShardedDataset(path, BS, seed=12, prefetch=prefetch, rank=rank, world_size=world_size)
        streams[prefetch] = [list(ds) for _ in range(2)]
        assert ds.prefetch == min(prefetch, 11)
    for prefetch in (0, 3, 2**40):
        for e in range(2):
            assert same_batches(streams[prefetch][e], streams[1][e])


def test_prefetch_with_workers(id_store):
    path = id_store(N, 97)
    ref = load(ShardedDataset(path, BS, seed=12, prefetch=1), 2)
    for prefetch in (0, 3):
        assert same_batches(load(ShardedDataset(path, BS, seed=12, prefetch=prefetch), 2), ref)


# -- bad arguments and bad stores ---------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(batch_size=0),
        dict(batch_size=-4),
        dict(prefetch=-1),
        dict(fields=["nope"]),
        dict(fields=["X", "nope"]),
        dict(fields=[]),
        dict(rank=2, world_size=2),
        dict(rank=5, world_size=3),
        dict(rank=-1, world_size=2),
        dict(rank=0, world_size=0),
    ],
    ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items()),
)
def test_bad_arguments_raise_value_error(id_store, kwargs):
    path = id_store(N, 97)
    kwargs = {"batch_size": BS, **kwargs}
    with pytest.raises(ValueError):
        ShardedDataset(path, **kwargs)


def test_not_a_store_raises_store_format_error(tmp_path):
    import zarr

    (tmp_path / "empty").mkdir()
    (tmp_path / "file.txt").write_text("not a store")
    zarr.create_array(tmp_path / "array.zarr", shape=(10,), chunks=(5,), dtype="float32")
    zarr.open_group(tmp_path / "group.zarr", mode="w")  # a group with no arrays
    for name in ("empty", "file.txt", "array.zarr", "group.zarr", "does-not-exist"):
        with pytest.raises(StoreFormatError):
            ShardedDataset(tmp_path / name, BS)


def numbers_in(message: str, path) -> set[int]:
    """Integers named in an error message, ignoring those in the store's path."""
    return {int(x) for x in re.findall(r"\d+", message.replace(str(path), ""))}


def test_incomplete_store_raises_naming_missing_blocks(tmp_path):
    path = tmp_path / "partial.zarr"
    layout = Layout(rows=100, block_rows=25, fields={"X": FieldSpec("float32", (3,)), "y": FieldSpec("int64", ())})
    store = BlockStore.create(path, layout)
    for b in (0, 2):
        s, e = layout.block_range(b)
        store.write_block(b, {"X": np.zeros((e - s, 3), np.float32), "y": np.arange(s, e)})
    store.mark_complete([0, 2])
    with pytest.raises(IncompleteStoreError) as err:
        ShardedDataset(path, BS)
    assert {1, 3} <= numbers_in(str(err.value), path)


def test_interrupted_write_raises_incomplete_then_resumes(tmp_path):
    path = tmp_path / "interrupted.zarr"
    arrays = {"X": np.arange(N * 2, dtype=np.float32).reshape(N, 2), "y": np.arange(N, dtype=np.int64)}

    def batches():
        for start in range(0, 200, 40):  # 200 of 1009 rows, then the writer "dies"
            yield {k: v[start : start + 40] for k, v in arrays.items()}
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        shardset.write(path, batches(), rows=N, block_rows=97, progress=False)
    missing = BlockStore.open(path).missing_blocks()
    assert missing and 0 not in missing
    with pytest.raises(IncompleteStoreError) as err:
        ShardedDataset(path, BS)
    assert missing[0] in numbers_in(str(err.value), path)
    # Finishing the write makes it readable.
    shardset.write(path, arrays, block_rows=97, progress=False)
    assert_exactly_once(stream_ids(list(ShardedDataset(path, BS))), N)


def _chunk(path, field: str, block: int, ndim: int) -> Path:
    return Path(path, field, "c", str(block), *["0"] * (ndim - 1))


def _damage(chunk: Path, how: str) -> None:
    data = bytearray(chunk.read_bytes())
    if how == "flip":
        data[len(data) // 3] ^= 0x40
    elif how == "flip-last-byte":
        data[-1] ^= 0x01
    elif how == "truncate":
        data = data[: len(data) - 7]
    elif how == "append":
        data += b"\0"
    elif how == "delete":
        chunk.unlink()
        return
    chunk.write_bytes(bytes(data))


def _names_block(message: str, field: str, chunk_key: str, block: int) -> bool:
    return re.search(rf"\bblock {block}\b", message) is not None or chunk_key in message


@pytest.mark.parametrize("how", ["flip", "flip-last-byte", "truncate", "append", "delete"])
@pytest.mark.parametrize("field, ndim, block", [("X", 2, 3), ("X", 2, 10), ("y", 1, 5)])
def test_damaged_chunk_raises_corrupt_block_error(make_id_store, how, field, ndim, block):
    path = make_id_store(N, 97)  # 11 blocks, block 10 is the short one
    chunk = _chunk(path, field, block, ndim)
    assert chunk.is_file()
    _damage(chunk, how)
    key = "/".join([field, "c", str(block), *["0"] * (ndim - 1)])
    for prefetch in (0, 3):  # raised every time, whatever the read-ahead, and the reader does not hang
        with pytest.raises(CorruptBlockError) as err:
            list(ShardedDataset(path, BS, seed=1, prefetch=prefetch))
        assert _names_block(str(err.value), field, key, block), str(err.value)


def test_damaged_chunk_raises_through_a_worker(make_id_store):
    # (After a worker fails, DataLoader takes ~5 s to shut it down: one case only.)
    path = make_id_store(N, 97)
    _damage(_chunk(path, "X", 4, 2), "flip")
    with pytest.raises(CorruptBlockError) as err:
        load(ShardedDataset(path, BS, seed=1), 1)
    assert _names_block(str(err.value), "X", "X/c/4/0", 4), str(err.value)
    del err
    gc.collect()  # shut the failed loader down here, not in a later test


def test_damaged_chunk_only_hits_the_rank_that_reads_it(make_id_store):
    path = make_id_store(N, 97)
    plan = ShardedDataset(path, BS, seed=1, rank=0, world_size=2).plan(0)
    first = plan.block_at(0)  # wholly inside rank 0's half of the stream
    _damage(_chunk(path, "X", first, 2), "flip")
    with pytest.raises(CorruptBlockError):
        list(ShardedDataset(path, BS, seed=1, rank=0, world_size=2))
    other = list(ShardedDataset(path, BS, seed=1, rank=1, world_size=2))
    assert first not in set((stream_ids(other) // 97).tolist())


def test_direct_reads_give_the_same_stream(make_id_store):
    """``direct=True`` reads uncached chunks with O_DIRECT (or falls back where the file
    system has none): the stream is the same, with workers too."""
    path = make_id_store(N, 97)
    ref = list(ShardedDataset(path, BS, seed=3, direct=False))
    evict(path)
    assert same_batches(list(ShardedDataset(path, BS, seed=3, direct=True)), ref)
    workers = load(ShardedDataset(path, BS, seed=3, direct=True), 2)  # the same batches, interleaved
    assert sorted(map(batch_key, workers)) == sorted(map(batch_key, ref))
    with pytest.raises(ValueError, match="direct"):
        ShardedDataset(path, BS, direct="yes")


def test_tuples_are_x_then_y_whatever_the_order_of_the_fields(tmp_path):
    rows = 40
    path = tmp_path / "yx.zarr"
    shardset.write(path, {"y": np.arange(rows, dtype=np.float32), "X": np.arange(2 * rows, dtype=np.float32).reshape(rows, 2)},
                   block_rows=10, progress=False)
    for fields in (None, ["y", "X"]):
        X, y = next(iter(ShardedDataset(path, 8, shuffle=False, fields=fields)))
        assert X.shape == (8, 2) and y.shape == (8,)
        np.testing.assert_array_equal(X[:, 0].numpy(), 2 * y.numpy())


def test_training_casts_a_float64_store_for_the_float32_model(tmp_path):
    rng = np.random.default_rng(0)
    X, w = rng.standard_normal((4000, 3)), np.array([1.0, -2.0, 0.5])
    shardset.write(tmp_path / "f64", {"X": X, "y": (X @ w + 3.0)[:, None]}, block_rows=1000, progress=False)
    fit = shardset.fit_linear_regression(tmp_path / "f64", epochs=5, batch_size=32, lr=0.05)
    assert np.abs(fit.w - w).max() < 0.05 and abs(fit.b - 3.0) < 0.05
