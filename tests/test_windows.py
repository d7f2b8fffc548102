"""Shuffle windows (``window_blocks``), ``on_error="skip"`` and ``allow_incomplete``.

Stores come from ``conftest.py`` (``id`` stores: ``y[i] = i``), so every delivered
row says which row it is.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from batches import same_batches
from test_dataset import BS, N, _chunk, _damage, assert_ranks_split_once, check_id_rows, load, stream_ids
from test_resume import state_after

from shardset import BlockStore, ShardedDataset
from shardset.format import FieldSpec, Layout
from shardset.plan import EpochPlan, Piece

pytestmark = pytest.mark.filterwarnings("ignore:This DataLoader will create:UserWarning")


# -- the plan's stage arithmetic ----------------------------------------------------------


@pytest.mark.parametrize("rows, block_rows", [(1009, 97), (1009, 400), (1000, 100), (7, 3), (5, 100)])
@pytest.mark.parametrize("window", [1, 2, 3, 5, 64])
def test_stages_cover_every_row_once(rows, block_rows, window):
    plan = EpochPlan(rows=rows, block_rows=block_rows, batch_size=BS, seed=3, epoch=1, window_blocks=window)
    assert plan.window == min(window, plan.num_blocks)
    assert plan.offset(0) == 0 and plan.stream_rows == rows
    parts: dict[int, list[tuple[int, int]]] = {}
    for t in range(plan.num_stages):
        members = plan.members(t)
        assert plan.offset(t + 1) - plan.offset(t) == sum(hi - lo for _, _, lo, hi in members)
        assert len(members) <= plan.window
        for block, _, lo, hi in members:
            parts.setdefault(block, []).append((lo, hi))
    for block, runs in parts.items():  # each block's parts tile its rows in order
        assert runs[0][0] == 0 and runs[-1][1] == plan.block_size(block)
        assert all(a[1] == b[0] for a, b in zip(runs, runs[1:]))
    ids = np.concatenate([plan.piece_index(p) for p in plan.pieces(0, plan.num_batches)])
    assert np.array_equal(np.sort(ids), np.arange(rows))


def test_stage_of_inverts_offset():
    plan = EpochPlan(rows=1009, block_rows=97, batch_size=BS, seed=0, window_blocks=4)
    for t in range(plan.num_stages):
        for pos in (plan.offset(t), plan.offset(t + 1) - 1):
            if plan.offset(t + 1) > plan.offset(t):
                assert plan.stage_of(pos) == t


# -- the reader with windows ------------------------------------------------------------


@pytest.mark.parametrize("num_workers", [0, 2])
@pytest.mark.parametrize("world_size", [1, 2, 3])
@pytest.mark.parametrize("block_rows, window", [(97, 2), (97, 3), (400, 3), (400, 2)])
def test_windows_deliver_exactly_once_with_equal_batch_counts(id_store, block_rows, window, world_size, num_workers):
    # 400-row blocks: 3 blocks, so a window of 3 spans more blocks than a rank has.
    assert_ranks_split_once(id_store(N, block_rows), world_size, num_workers, seed=4, window_blocks=window)


@pytest.mark.parametrize("block_rows, window", [(97, 3), (10, 20)])  # 20 blocks: the reader's one-gather lookup
def test_window_stream_follows_the_plan(id_store, block_rows, window):
    path = id_store(N, block_rows)
    ds = ShardedDataset(path, BS, seed=2, window_blocks=window)
    got = stream_ids(list(ds))
    plan = ds.plan(0)
    want = np.concatenate([plan.piece_index(p) for p in plan.pieces(0, plan.num_batches)])
    np.testing.assert_array_equal(got, want)


def test_window_mixes_blocks_inside_batches(id_store):
    path = id_store(N, 97)

    def blocks_per_batch(window: int) -> float:
        batches = list(ShardedDataset(path, 32, seed=1, window_blocks=window))
        return float(np.mean([len(np.unique(stream_ids([b]) // 97)) for b in batches]))

    one, four = blocks_per_batch(1), blocks_per_batch(4)
    assert one < 1.5  # one block per batch, except where a batch crosses a block end
    assert four > 3.0  # a batch draws on (nearly) all four blocks of its stage


def test_window_is_deterministic_and_changes_with_epoch(id_store):
    path = id_store(N, 97)
    a = ShardedDataset(path, BS, seed=5, window_blocks=3)
    b = ShardedDataset(path, BS, seed=5, window_blocks=3)
    first = list(a)
    assert same_batches(first, list(b))
    assert not np.array_equal(stream_ids(first), stream_ids(list(a)))  # epoch 1


def test_window_mb_picks_the_window(id_store):
    path = id_store(N, 97)  # X (3 float32) + y (int64): 20 bytes a row, 1940 a block
    ds = ShardedDataset(path, BS, window_mb=4 * 1940 / 2**20)
    assert ds.window == 4
    assert ShardedDataset(path, BS, window_mb=1e-9).window == 1
    with pytest.raises(ValueError):
        ShardedDataset(path, BS, window_blocks=2, window_mb=1)
    with pytest.raises(ValueError):
        ShardedDataset(path, BS, window_blocks=0)


def test_without_shuffle_the_window_is_ignored(id_store):
    path = id_store(N, 97)
    ids = stream_ids(list(ShardedDataset(path, BS, shuffle=False, window_blocks=4)))
    np.testing.assert_array_equal(ids, np.arange(N))


@pytest.mark.parametrize("kw", [dict(), dict(rank=1, world_size=2)], ids=["ws1", "rank1of2"])
def test_window_resumes_at_every_batch(id_store, kw):
    path = id_store(641, 130)
    ref = list(ShardedDataset(path, BS, seed=7, window_blocks=3, **kw))
    ds = ShardedDataset(path, BS, seed=7, window_blocks=3, **kw)
    for k in range(0, len(ref) + 1, 3):
        state = state_after(ds, k)
        ds.set_epoch(0)
        fresh = ShardedDataset(path, BS, seed=7, window_blocks=3, **kw)
        fresh.load_state_dict(state)
        assert same_batches(list(fresh), ref[k:]), k
    with pytest.raises(ValueError, match="window="):
        ShardedDataset(path, BS, seed=7, window_blocks=2, **kw).load_state_dict(state)


# -- on_error="skip" ------------------------------------------------------------------------


@pytest.mark.parametrize("window", [1, 2])
def test_skip_replaces_a_bad_block_and_keeps_ranks_equal(make_id_store, window):
    path = make_id_store(N, 97)
    _damage(_chunk(path, "X", 4, 2), "flip")
    good = [len(ShardedDataset(path, BS, rank=r, world_size=2)) for r in range(2)]
    ids = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for rank in range(2):
            batches = list(ShardedDataset(path, BS, seed=1, rank=rank, world_size=2, on_error="skip",
                                          window_blocks=window))
            assert len(batches) == good[rank]
            for b in batches:
                check_id_rows(b)  # never garbage or fill values
            ids.append(stream_ids(batches))
    assert any("block 4" in str(w.message) for w in caught)
    ids = np.concatenate(ids)
    assert not np.isin(np.arange(4 * 97, 5 * 97), ids).any()  # the bad block's rows are gone
    assert len(ids) == N - 1 and len(np.unique(ids)) == N - 1 - 97  # replaced by 97 repeats


def test_skip_through_workers(make_id_store):
    path = make_id_store(N, 97)
    _damage(_chunk(path, "y", 2, 1), "truncate")
    batches = load(ShardedDataset(path, BS, seed=3, on_error="skip"), 2)
    assert sum(len(b[1]) for b in batches) == N
    assert not np.isin(np.arange(2 * 97, 3 * 97), stream_ids(batches)).any()


def test_on_error_is_checked(id_store):
    with pytest.raises(ValueError, match="on_error"):
        ShardedDataset(id_store(N, 97), BS, on_error="ignore")


# -- allow_incomplete ------------------------------------------------------------------------


def _partial_store(path, done: list[int]):
    layout = Layout(rows=100, block_rows=25, fields={"X": FieldSpec("float32", (3,)), "y": FieldSpec("int64", ())})
    store = BlockStore.create(path, layout)
    for b in done:
        s, e = layout.block_range(b)
        ids = np.arange(s, e)
        X = ids[:, None].astype(np.float32) * np.arange(1, 4, dtype=np.float32)
        store.write_block(b, {"X": X, "y": ids})
    store.mark_complete(done)
    return path


@pytest.mark.parametrize("window", [1, 2])
def test_allow_incomplete_streams_the_complete_blocks_only(tmp_path, window):
    path = _partial_store(tmp_path / "partial.zarr", [0, 2, 3])
    for rank in range(2):
        ds = ShardedDataset(path, 10, allow_incomplete=True, rank=rank, world_size=2, window_blocks=window)
        assert len(ds) == 4  # 75 rows: 37 per rank
    ids = np.concatenate([stream_ids(load(ShardedDataset(path, 10, allow_incomplete=True, rank=r, world_size=2,
                                                         window_blocks=window), 2)) for r in range(2)])
    want = np.concatenate([np.arange(0, 25), np.arange(50, 100)])
    assert len(ids) == 74 and len(np.unique(ids)) == 74 and np.isin(ids, want).all()


def test_allow_incomplete_on_a_complete_store_is_the_usual_stream(id_store):
    path = id_store(N, 97)
    assert same_batches(list(ShardedDataset(path, BS, seed=2, allow_incomplete=True)),
                        list(ShardedDataset(path, BS, seed=2)))


def test_resume_state_checks_the_window_and_block_set(tmp_path, id_store):
    path = _partial_store(tmp_path / "partial.zarr", [0, 2])
    state = state_after(ShardedDataset(path, 10, allow_incomplete=True), 2)
    with pytest.raises(ValueError, match="blocks"):
        ShardedDataset(id_store(100, 25), 10).load_state_dict({**state, "rows": 100})
    assert torch.is_tensor(next(iter(ShardedDataset(path, 10, allow_incomplete=True)))[0])


def test_global_row_ids_go_past_2_to_the_31():
    plan = EpochPlan(rows=2**32, block_rows=2**20, batch_size=BS, seed=0, shuffle=False)
    ids = plan.piece_index(Piece(stage=3000, start=5, stop=13))  # block 3000: rows from 3000 * 2**20
    assert ids.dtype == np.int64 and ids.tolist() == list(range(3000 * 2**20 + 5, 3000 * 2**20 + 13))
