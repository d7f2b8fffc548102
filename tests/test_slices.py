"""Slice checksums in the format, ``BlockStore.read_rows`` and sub-block mixing (``slice_mb``).

Stores come from ``conftest.py`` (``id`` stores: ``y[i] = i``, 20 bytes a row), so
every delivered row says which row it is.
"""

from __future__ import annotations

import numpy as np
import pytest
from test_dataset import BS, N, _chunk, _damage, assert_ranks_split_once, batch_key, check_id_rows, evict, load, stream_ids
from test_resume import state_after

from batches import same_batches
from conftest import id_arrays
from shardset import BlockStore, CorruptBlockError, ShardedDataset, StoreFormatError
from shardset.format import slice_rows_for

pytestmark = pytest.mark.filterwarnings("ignore:This DataLoader will create:UserWarning")

ROW_BYTES = 20  # X: 3 float32, y: int64


def rows_mb(rows: int) -> float:
    """``slice_mb`` for units of ``rows`` rows of an id store."""
    return rows * ROW_BYTES / 2**20


# -- the format and BlockStore.read_rows -------------------------------------------------------


def test_new_stores_record_slice_checksums(id_store):
    bs = BlockStore.open(id_store(N, 120))
    assert bs.layout.slice_rows == slice_rows_for(120) == 1
    table = bs.slice_checksums(2)
    assert table.shape == (2, 120) and table.dtype == np.uint32


@pytest.mark.parametrize("start, stop", [(0, N), (5, 6), (120, 240), (113, 131), (0, 1), (N - 7, N), (37, 37)])
def test_read_rows_matches_whole_blocks(id_store, start, stop):
    path = id_store(N, 120)
    bs = BlockStore.open(path)
    whole = np.concatenate([bs.read_block("X", b) for b in range(bs.layout.num_blocks)])
    np.testing.assert_array_equal(bs.read_rows("X", start, stop), whole[start:stop])
    np.testing.assert_array_equal(bs.read_rows("y", start, stop), np.arange(start, stop))


def test_read_rows_reads_unaligned_rows_of_coarse_slices(make_id_store):
    # 3000-row blocks have 3-row slices: reads that start or end inside a slice
    path = make_id_store(7000, 3000)
    bs = BlockStore.open(path)
    assert bs.layout.slice_rows == 3
    for start, stop in [(1, 2), (2, 3001), (2999, 6002), (6998, 7000)]:
        np.testing.assert_array_equal(bs.read_rows("y", start, stop), np.arange(start, stop))


@pytest.mark.parametrize("how", ["flip", "truncate"])
def test_read_rows_catches_a_damaged_slice(make_id_store, how):
    path = make_id_store(N, 120)
    _damage(_chunk(path, "X", 1, 2), how)
    bs = BlockStore.open(path)
    with pytest.raises(CorruptBlockError, match="block 1 of field 'X'"):
        bs.read_rows("X", 120, 240)
    np.testing.assert_array_equal(bs.read_rows("X", 0, 120)[:, 0], np.arange(120))  # other blocks are fine


def test_compressed_stores_have_no_slices(make_id_store):
    path = make_id_store(N, 120, compression="zstd")
    assert BlockStore.open(path).layout.slice_rows is None
    with pytest.raises(StoreFormatError, match="no slice checksums"):
        ShardedDataset(path, BS, slice_mb=rows_mb(10))


# -- the reader with slice units ---------------------------------------------------------------


@pytest.mark.parametrize("num_workers", [0, 2])
@pytest.mark.parametrize("world_size", [1, 2, 3])
@pytest.mark.parametrize("unit, window", [(10, 4), (13, 16), (50, 1)])
def test_slice_units_deliver_exactly_once_with_equal_batch_counts(id_store, unit, window, world_size, num_workers):
    path = id_store(N, 97)  # 13-row units straddle block ends; 97 is prime: 1-row slices
    kw = dict(seed=4, slice_mb=rows_mb(unit), window_mb=rows_mb(unit * window))
    ds = ShardedDataset(path, BS, **kw)
    assert (ds.unit_rows, ds.window) == (unit, window)
    assert_ranks_split_once(path, world_size, num_workers, **kw)


def test_slice_stream_follows_the_plan_and_changes_with_epoch(id_store):
    path = id_store(N, 97)
    ds = ShardedDataset(path, BS, seed=2, slice_mb=rows_mb(10), window_blocks=2)
    assert ds.window == round(2 * 97 / 10)  # window_blocks keeps meaning memory in blocks
    assert ShardedDataset(path, BS, slice_mb=rows_mb(10)).window == round(97 / 10)  # by default one block's worth
    got = stream_ids(list(ds))
    plan = ds.plan(0)
    np.testing.assert_array_equal(got, np.concatenate([plan.piece_index(p) for p in plan.pieces(0, plan.num_batches)]))
    assert not np.array_equal(got, stream_ids(list(ds)))  # epoch 1


def test_slices_mix_more_of_the_store_at_the_same_memory(id_store):
    """With labels sorted in storage (label = row id // 101: 10 classes), a window of
    4 blocks' memory in 10-row slices gives batches of nearly every class, where 4
    whole blocks give a few (the point of sub-block mixing)."""
    path = id_store(N, 97)

    def classes_per_batch(**kw) -> float:
        batches = list(ShardedDataset(path, 32, seed=1, **kw))
        return float(np.mean([len(np.unique(stream_ids([b]) // 101)) for b in batches]))

    blocks, slices = classes_per_batch(window_blocks=4), classes_per_batch(window_blocks=4, slice_mb=rows_mb(10))
    assert blocks < 6  # 4 blocks span at most 2 classes each
    assert slices > 8


@pytest.mark.parametrize("kw", [dict(), dict(rank=1, world_size=2)], ids=["ws1", "rank1of2"])
def test_slice_stream_resumes_at_every_batch(id_store, kw):
    path = id_store(641, 130)
    opts = dict(seed=7, slice_mb=rows_mb(20), window_mb=rows_mb(60), **kw)
    ref = list(ShardedDataset(path, BS, **opts))
    ds = ShardedDataset(path, BS, **opts)
    for k in range(0, len(ref) + 1, 2):
        state = state_after(ds, k)
        ds.set_epoch(0)
        fresh = ShardedDataset(path, BS, **opts)
        fresh.load_state_dict(state)
        assert same_batches(list(fresh), ref[k:]), k
    with pytest.raises(ValueError, match="unit_rows"):
        ShardedDataset(path, BS, **{**opts, "slice_mb": rows_mb(30)}).load_state_dict(state)


@pytest.mark.parametrize("direct", [False, True])
def test_a_damaged_slice_is_skipped_on_request(make_id_store, direct):
    path = make_id_store(N, 120)
    _damage(_chunk(path, "X", 2, 2), "flip")
    evict(path)
    with pytest.raises(CorruptBlockError):
        list(ShardedDataset(path, BS, slice_mb=rows_mb(30), direct=direct))
    evict(path)
    with pytest.warns(RuntimeWarning, match=r"skipping rows \[2\d\d, "):
        batches = list(ShardedDataset(path, BS, slice_mb=rows_mb(30), on_error="skip", direct=direct))
    assert sum(len(b[1]) for b in batches) == N
    for b in batches:
        check_id_rows(b)


def test_incomplete_store_streams_the_slices_of_complete_blocks(make_id_store):
    path = make_id_store(N, 120)
    bs = BlockStore.open(path, mode="r+")
    bs.mark_incomplete([3])
    ds = ShardedDataset(path, BS, slice_mb=rows_mb(50), allow_incomplete=True)
    ids = stream_ids(list(ds))
    # units of 50 rows: those touching block 3 (rows 360-479) are left out whole
    expect = [i for i in range(N) if not (350 <= i < 500)]
    np.testing.assert_array_equal(np.sort(ids), expect)


def test_cli_reads_and_measures_with_slices(id_store, capsys):
    from shardset.cli import main

    path = id_store(N, 120)
    assert main(["read", path, "--batch-size", "32", "--window-blocks", "2", "--slice-mb", str(rows_mb(30))]) == 0
    assert f"{N:,} rows" in capsys.readouterr().out
    assert main(["quality", path, "--label", "y", "--window-blocks", "2", "--slice-mb", str(rows_mb(30))]) == 0
    assert "(3 units of 75 rows)" in capsys.readouterr().out  # MiB of the fields read: y alone here
    assert main(["read", path, "--slice-mb", "-1"]) == 2
    assert "slice_mb must be positive" in capsys.readouterr().err


def test_verify_checks_the_slice_table_and_repair_rewrites_it(tmp_path):
    import zarr

    from shardset import generate_regression, verify

    path = str(tmp_path / "reg.zarr")
    generate_regression(path, rows=N, features=3, block_rows=120, workers=1, progress=False)
    table = zarr.open_group(path, mode="r+")["slice_checksums"]
    wrong = table[3]
    wrong[0, 5] ^= 1  # a table that disagrees with a chunk whose own crc32c is fine
    table[3] = wrong
    report = verify(path, workers=1)
    assert [(f.block, f.field) for f in report.faults] == [(3, "X")]
    assert "slice 5" in report.faults[0].problem
    with pytest.raises(CorruptBlockError, match="slice 5"):
        BlockStore.open(path).read_rows("X", 3 * 120, 4 * 120)
    assert verify(path, workers=1, repair=True).repaired == [3]
    assert verify(path, workers=1).ok


def test_slice_reads_fall_back_to_threads_without_aio(make_id_store, monkeypatch):
    """Where the kernel refuses an AIO context (a sandbox, ``fs.aio-max-nr`` used up),
    uncached slices are read with O_DIRECT on threads instead: the same stream."""
    import errno

    from shardset import direct_io

    path = make_id_store(N, 120)
    kw = dict(seed=3, slice_mb=rows_mb(30), window_blocks=2)
    ref = stream_ids(list(ShardedDataset(path, BS, direct=False, **kw)))

    def refuse(self, depth):
        raise OSError(errno.EAGAIN, "io_setup: Resource temporarily unavailable")

    monkeypatch.setattr(direct_io._Context, "__init__", refuse)
    evict(path)
    np.testing.assert_array_equal(stream_ids(list(ShardedDataset(path, BS, direct=True, **kw))), ref)


def test_direct_slice_reads_give_the_same_stream(make_id_store):
    """``direct=True`` reads uncached slices with O_DIRECT (many in flight from one
    thread with Linux AIO, see shardset.direct_io) through aligned buffers (slices are
    not 4 KiB-aligned): the stream is the same, also read from DataLoader workers."""
    path = make_id_store(N, 120)
    kw = dict(seed=3, slice_mb=rows_mb(30), window_blocks=2)
    ref = stream_ids(list(ShardedDataset(path, BS, direct=False, **kw)))
    evict(path)
    np.testing.assert_array_equal(stream_ids(list(ShardedDataset(path, BS, direct=True, **kw))), ref)
    evict(path)
    workers = load(ShardedDataset(path, BS, direct=True, **kw), 2)  # the same batches, interleaved
    assert sorted(map(batch_key, workers)) == sorted(map(batch_key, list(ShardedDataset(path, BS, direct=False, **kw))))
    bs = BlockStore.open(path)
    np.testing.assert_array_equal(bs.read_rows("y", 1, N, direct=True), np.arange(1, N))


# -- slice units of wide rows, read in place ------------------------------------------------------

WIDE = [(1024, 97, 20), (256, 500, 130)]  # features, block rows, unit rows: 4 KiB rows; 1 KiB rows, units across blocks


def wide_kw(features: int, unit: int, **kw) -> dict:
    return dict(seed=5, slice_mb=unit * (4 * features + 8) / 2**20, window_blocks=3, **kw)


@pytest.mark.parametrize("features, block_rows, unit", WIDE)
@pytest.mark.parametrize("direct", [False, True])
def test_wide_rows_are_read_in_place_into_the_same_stream(make_id_store, monkeypatch, features, block_rows, unit, direct):
    """Units of rows of 512 bytes and more go into their slots as stored (an O_DIRECT
    read lands there) and the gather puts them in their row order: the batches are
    those of units copied in their row order, every field of every row intact."""
    from shardset import dataset

    path = make_id_store(N, block_rows, features=features)
    kw = wide_kw(features, unit, direct=direct)
    ds = ShardedDataset(path, BS, **kw)
    assert ds.unit_rows == unit
    evict(path)
    got = [list(ds) for _ in range(2)]  # two epochs: slots reused across epochs
    assert ds._buffers.in_place
    monkeypatch.setattr(dataset, "IN_PLACE_ROW_BYTES", 1 << 30)
    ordered = ShardedDataset(path, BS, **kw)
    evict(path)
    ref = [list(ordered) for _ in range(2)]
    assert not ordered._buffers.in_place
    for mine, theirs in zip(got, ref):
        assert same_batches(mine, theirs)
        for b in mine:
            check_id_rows(b)
    assert not np.array_equal(stream_ids(got[0]), stream_ids(got[1]))


def test_wide_rows_in_place_deliver_exactly_once_across_ranks_and_workers(make_id_store):
    features, block_rows, unit = WIDE[1]
    path = make_id_store(N, block_rows, features=features)
    evict(path)
    assert_ranks_split_once(path, 2, 2, **wide_kw(features, unit, direct=True))


@pytest.mark.parametrize("direct", [False, True])
def test_a_damaged_slice_of_wide_rows_is_skipped_on_request(make_id_store, direct):
    features, block_rows, unit = WIDE[0]
    path = make_id_store(N, block_rows, features=features)
    _damage(_chunk(path, "X", 2, 2), "flip")
    evict(path)
    with pytest.raises(CorruptBlockError):
        list(ShardedDataset(path, BS, **wide_kw(features, unit, direct=direct)))
    evict(path)
    with pytest.warns(RuntimeWarning, match=r"skipping rows \["):
        batches = list(ShardedDataset(path, BS, on_error="skip", **wide_kw(features, unit, direct=direct)))
    assert sum(len(b[1]) for b in batches) == N
    for b in batches:
        check_id_rows(b)


@pytest.mark.parametrize("at_page, expect_in_place", [(True, True), (False, False)])
def test_read_rows_lands_in_the_buffer_where_the_pages_line_up(make_id_store, monkeypatch, at_page, expect_in_place):
    """``read_rows(..., at=)`` puts the rows at byte ``at`` of the buffer; an O_DIRECT
    read lands there itself when ``at`` lies where the file offset does in a 4 KiB
    page, else it is read aside and copied."""
    from shardset import store as store_module
    from shardset.memory import aligned_buffer

    path = make_id_store(N, 500, features=1024)  # rows of X: 4 KiB
    bs = BlockStore.open(path)
    targets = []
    real = store_module._direct_steps

    def spy(fd, offset, nbytes, into=None):
        targets.append(into)
        return (yield from real(fd, offset, nbytes, into))

    monkeypatch.setattr(store_module, "_direct_steps", spy)
    room = aligned_buffer(64 * 4096)
    at = 8 * 4096 + (0 if at_page else 1024)  # rows start on pages of the file
    evict(path)
    out = bs.read_rows("X", 3, 40, room, direct=True, at=at)
    assert out.ctypes.data == room.ctypes.data + at
    np.testing.assert_array_equal(out, id_arrays(40, 1024)["X"][3:])
    assert len(targets) == 1
    assert (targets[0] is not None and np.shares_memory(targets[0], room)) == expect_in_place
