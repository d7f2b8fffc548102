"""Write-time shuffling: a permutation of the input rows, deterministic, mixed across blocks, resumable."""

import os
import threading
import time
from pathlib import Path

import numpy as np
import pytest

import shardset
from shardset import BlockStore
from shardset.bench import evict
from shardset.cli import main
from shardset.errors import ArgumentError, CorruptBlockError, IncompleteStoreError, ShardsetError, StoreFormatError
from shardset.format import ATTRS_KEY
from shardset.page_cache import resident_bytes
from shardset.quality import within_block_correlation
from shardset.shuffle import (
    SHUFFLE_NAME,
    _bucket_dir,
    _Buckets,
    _read_ahead,
    shuffle_store,
    shuffled_position,
    write_shuffled,
)

from conftest import id_arrays, mixed_arrays


def columns(path) -> dict[str, np.ndarray]:
    """Every field of a store, whole, in storage order."""
    store = BlockStore.open(path)
    return {
        name: np.concatenate([store.read_block(name, b) for b in range(store.layout.num_blocks)])
        for name in store.layout.fields
    }


def chunk_bytes(path) -> dict[str, bytes]:
    root = Path(path)
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("c/*/*")) if p.is_file()}


def test_write_shuffle_is_the_keyed_permutation_of_the_input(tmp_path):
    rows = 5003
    src = id_arrays(rows)
    store = shardset.write(tmp_path / "s.zarr", src, block_rows=700, shuffle=True, seed=5, progress=False)
    got = columns(tmp_path / "s.zarr")
    dest = shuffled_position(rows, 5)(np.arange(rows))
    assert np.array_equal(got["y"][dest], src["y"])  # input row i is output row dest[i]
    assert np.array_equal(got["X"][dest], src["X"])
    assert sorted(got["y"].tolist()) == list(range(rows)) and not np.array_equal(got["y"], src["y"])
    assert store.layout.generator["name"] == SHUFFLE_NAME and store.layout.generator["seed"] == 5
    assert not _bucket_dir(tmp_path / "s.zarr", None).exists()  # buckets removed once complete
    assert not list(tmp_path.glob("*.shuffle-tmp"))


def test_same_seed_same_bytes_any_input_batching_other_seed_other_order(tmp_path):
    rows, br = 4000, 512
    src = mixed_arrays(rows)
    shardset.write(tmp_path / "a.zarr", src, block_rows=br, shuffle=True, seed=1, progress=False)
    batches = ({k: v[i : i + 333] for k, v in src.items()} for i in range(0, rows, 333))
    shardset.write(tmp_path / "b.zarr", batches, rows=rows, block_rows=br, shuffle=True, seed=1, progress=False)
    assert chunk_bytes(tmp_path / "a.zarr") == chunk_bytes(tmp_path / "b.zarr")
    shardset.write(tmp_path / "c.zarr", src, block_rows=br, shuffle=True, seed=2, progress=False)
    a, c = columns(tmp_path / "a.zarr"), columns(tmp_path / "c.zarr")
    assert not np.array_equal(a["b"], c["b"]) and sorted(c["b"].tolist()) == list(range(rows))
    for got in (a, c):  # every field moved with its row
        order = got["b"]
        for name in "acd":
            assert np.array_equal(got[name], src[name][order])


def test_every_block_is_a_sample_of_the_whole_set(tmp_path):
    rows, br = 20000, 1000
    labels = np.repeat(np.arange(10), rows // 10)  # sorted by class: every block holds one class
    shardset.write(tmp_path / "s.zarr", {"label": labels}, block_rows=br, shuffle=True, progress=False)
    got = columns(tmp_path / "s.zarr")["label"]
    assert within_block_correlation(labels, br) > 0.99
    assert abs(within_block_correlation(got, br)) < 0.01
    counts = np.stack([np.bincount(got[i : i + br], minlength=10) for i in range(0, rows, br)])
    assert counts.min() > 60 and counts.max() < 140  # expected 100 of each class per block, sd ~9.5


def test_shuffle_store_copies_fields_changes_geometry_and_is_worker_independent(tmp_path):
    src = shardset.write(tmp_path / "src.zarr", mixed_arrays(3000), block_rows=400, progress=False).where
    one = shuffle_store(src, tmp_path / "one.zarr", seed=9, block_rows=1000, workers=1, progress=False)
    two = shuffle_store(src, tmp_path / "two.zarr", seed=9, block_rows=1000, workers=2, progress=False)
    assert one.layout.num_blocks == 3 and one.layout.fields == BlockStore.open(src).layout.fields
    assert chunk_bytes(one.where) == chunk_bytes(two.where)
    got = columns(one.where)
    assert np.array_equal(got["b"][shuffled_position(3000, 9)(np.arange(3000))], np.arange(3000))
    # written by shardset.write: no generator to record, only where the input was
    assert one.layout.generator["source"] == {"input": os.path.realpath(src)}
    same = shuffle_store(src, tmp_path / "same.zarr", seed=9, workers=1, progress=False)
    assert same.layout.block_rows == 400  # the source's block size by default


def test_an_interrupted_shuffle_resumes_to_the_same_bytes(tmp_path):
    src = shardset.write(tmp_path / "src.zarr", id_arrays(6000), block_rows=500, progress=False).where
    ref = shuffle_store(src, tmp_path / "ref.zarr", seed=4, workers=1, progress=False).where
    dst = tmp_path / "dst.zarr"
    chunk = Path(BlockStore.open(src).chunk_path("X", 7))
    good = chunk.read_bytes()
    chunk.write_bytes(good[:-9] + bytes(9))  # a torn block in the source: the scatter fails
    with pytest.raises(CorruptBlockError):
        shuffle_store(src, dst, seed=4, workers=1, progress=False)
    with pytest.raises(IncompleteStoreError):  # what was left never passes for a complete store
        BlockStore.open(dst).require_complete()
    with pytest.raises(StoreFormatError, match="different dataset"):
        shuffle_store(src, dst, seed=5, workers=1, progress=False)  # another seed would mix two shuffles
    chunk.write_bytes(good)
    shuffle_store(src, dst, seed=4, workers=1, progress=False)
    assert chunk_bytes(dst) == chunk_bytes(ref)

    # lose two finished blocks: a rerun rewrites exactly those
    store = BlockStore.open(dst, mode="r+")
    store.group.attrs[ATTRS_KEY] = store.layout.to_attrs(set(range(12)) - {3, 8})
    Path(store.chunk_path("y", 3)).unlink()
    assert BlockStore.open(dst).missing_blocks() == [3, 8]
    shuffle_store(src, dst, seed=4, workers=1, progress=False)
    assert chunk_bytes(dst) == chunk_bytes(ref)


def test_an_interrupted_gather_reuses_the_finished_scatter(tmp_path):
    rows, br = 1500, 300
    src, dst, buckets = id_arrays(rows), tmp_path / "dst.zarr", tmp_path / "buckets"
    ref = shardset.write(tmp_path / "ref.zarr", src, block_rows=br, shuffle=True, seed=2, progress=False)

    def chunks_then_an_obstacle():
        yield from ({k: v[i : i + br] for k, v in src.items()} for i in range(0, rows, br))
        # the output store exists by now: a directory where block 0's chunk goes makes the gather fail
        Path(BlockStore.open(dst).chunk_path("X", 0)).mkdir(parents=True)

    buckets.mkdir()
    (buckets / "unrelated").write_text("a user's file in --tmp-dir")
    with pytest.raises((OSError, ShardsetError)):
        write_shuffled(dst, ref.layout, chunks_then_an_obstacle(), seed=2, tmp_dir=buckets, progress=False)
    assert (_bucket_dir(dst, buckets) / "scattered.json").exists() and BlockStore.open(dst).missing_blocks()
    Path(BlockStore.open(dst).chunk_path("X", 0)).rmdir()
    # no input at all: only the finished scatter on disk can complete the store
    write_shuffled(dst, ref.layout, iter(()), seed=2, tmp_dir=buckets, progress=False)
    assert chunk_bytes(dst) == chunk_bytes(ref.where)
    assert os.listdir(buckets) == ["unrelated"]  # our bucket directory is gone, nothing else


def test_a_bucket_lost_in_a_crash_is_found_and_the_scatter_redone(tmp_path):
    rows, br = 1500, 300
    src, buckets = id_arrays(rows), tmp_path / "buckets"
    ref = shardset.write(tmp_path / "ref.zarr", src, block_rows=br, shuffle=True, seed=2, progress=False)

    def chunks(dst, obstacle: bool):
        yield from ({k: v[i : i + br] for k, v in src.items()} for i in range(0, rows, br))
        if obstacle:  # the gather of block 0 fails: the scatter stays on disk, unfsynced
            Path(BlockStore.open(dst).chunk_path("X", 0)).mkdir(parents=True)

    def scattered_not_gathered(dst) -> Path:
        with pytest.raises((OSError, ShardsetError)):
            write_shuffled(dst, ref.layout, chunks(dst, True), seed=2, tmp_dir=buckets, progress=False)
        Path(BlockStore.open(dst).chunk_path("X", 0)).rmdir()
        return _bucket_dir(dst, buckets)

    # what a crash leaves of files that never reached the disk: a tail missing, or zeros of the right size
    root = scattered_not_gathered(tmp_path / "a.zarr")
    (root / "3.0").write_bytes((root / "3.0").read_bytes()[:-4])
    with pytest.raises(ArgumentError, match="held 0 rows"):  # detected; redoing the scatter needs the input
        write_shuffled(tmp_path / "a.zarr", ref.layout, iter(()), seed=2, tmp_dir=buckets, progress=False)
    assert not (root / "scattered.json").exists() and 3 in BlockStore.open(tmp_path / "a.zarr").missing_blocks()
    write_shuffled(tmp_path / "a.zarr", ref.layout, chunks(None, False), seed=2, tmp_dir=buckets, progress=False)
    assert chunk_bytes(tmp_path / "a.zarr") == chunk_bytes(ref.where) and not root.exists()

    root = scattered_not_gathered(tmp_path / "b.zarr")
    (root / "3.0").write_bytes(bytes((root / "3.0").stat().st_size))
    # given the input, the same call redoes the scatter and finishes: never a block from a bad bucket
    write_shuffled(tmp_path / "b.zarr", ref.layout, chunks(None, False), seed=2, tmp_dir=buckets, progress=False)
    assert chunk_bytes(tmp_path / "b.zarr") == chunk_bytes(ref.where) and not root.exists()


def test_cli_shuffle_and_its_errors(tmp_path, capsys):
    src = shardset.write(tmp_path / "src.zarr", id_arrays(2000), block_rows=300, progress=False).where
    dst = str(tmp_path / "dst.zarr")
    assert main(["shuffle", src, dst, "--seed", "3", "--workers", "1"]) == 0
    assert "2,000 rows shuffled into 7 blocks" in capsys.readouterr().out
    assert sorted(columns(dst)["y"].tolist()) == list(range(2000))
    assert main(["shuffle", src, src]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "onto itself" in err[0]
    store = BlockStore.open(src, mode="r+")
    store.group.attrs[ATTRS_KEY] = store.layout.to_attrs(range(5))
    assert main(["shuffle", src, str(tmp_path / "other.zarr"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "incomplete" in err[0]


def test_the_scatter_reads_the_next_block_into_the_same_buffer_while_it_works():
    n = 5
    started = [threading.Event() for _ in range(n + 1)]
    finished: set[int] = set()
    apart, overlapped, got = [], [], []

    def read(i: int) -> int:
        started[i].set()
        apart.append(i == 0 or i - 1 in finished)  # one buffer: the caller is done with read(i - 1)
        if i == 3:
            raise CorruptBlockError("block 3 is torn")
        return i

    with pytest.raises(CorruptBlockError, match="block 3"):
        for get, done in _read_ahead(read, range(n)):
            x = get()
            got.append(x)
            finished.add(x)
            done()
            overlapped.append(started[x + 1].wait(5))  # the next read runs while the caller works on
    assert got == [0, 1, 2] and overlapped == [True] * 3 and all(apart)  # the error comes in its turn
    # a caller that never says done gets every item all the same
    assert [get() for get, _ in _read_ahead(lambda i: i * i, range(4))] == [0, 1, 4, 9]
    assert list(_read_ahead(read, [])) == []


def test_a_torn_last_block_read_ahead_by_a_scatter_process_fails_the_shuffle_then_resumes(tmp_path):
    src = shardset.write(tmp_path / "src.zarr", id_arrays(6000), block_rows=500, progress=False).where
    ref = shuffle_store(src, tmp_path / "ref.zarr", seed=4, workers=2, progress=False).where
    chunk = Path(BlockStore.open(src).chunk_path("y", 11))  # part 1 reads it while it scatters block 9
    good = chunk.read_bytes()
    chunk.write_bytes(good[:-9] + bytes(9))
    with pytest.raises(CorruptBlockError):
        shuffle_store(src, tmp_path / "dst.zarr", seed=4, workers=2, progress=False)
    chunk.write_bytes(good)
    shuffle_store(src, tmp_path / "dst.zarr", seed=4, workers=2, progress=False)
    assert chunk_bytes(tmp_path / "dst.zarr") == chunk_bytes(ref)


def test_the_gather_has_the_next_bucket_read_ahead_and_still_checks_it(tmp_path):
    rows, br = 6000, 1000
    src, dst, buckets = id_arrays(rows, features=64), tmp_path / "dst.zarr", tmp_path / "buckets"
    ref = shardset.write(tmp_path / "ref.zarr", src, block_rows=br, shuffle=True, seed=2, progress=False)

    def chunks_then_an_obstacle():  # the scatter finishes, the gather fails at once
        yield from ({k: v[i : i + br] for k, v in src.items()} for i in range(0, rows, br))
        Path(BlockStore.open(dst).chunk_path("X", 0)).mkdir(parents=True)

    with pytest.raises((OSError, ShardsetError)):
        write_shuffled(dst, ref.layout, chunks_then_an_obstacle(), seed=2, tmp_dir=buckets, progress=False)
    root = _bucket_dir(dst, buckets)
    gather = _Buckets(root, BlockStore.open(dst).layout, dst)
    assert gather.ready()
    files = sorted(root.glob("[0-9]*.0"))
    evict(files)
    if any(resident_bytes(f)[0] for f in files):
        pytest.skip("this file system keeps files in memory: nothing to read ahead")
    stored = BlockStore.open(ref.where)
    for b in (0, 1):  # blocks 0 and 1 in turn: the next, block 2, is read ahead
        assert np.array_equal(gather(b)["y"], stored.read_block("y", b))
    deadline = time.monotonic() + 10
    while resident_bytes(root / "2.0")[0] < (root / "2.0").stat().st_size and time.monotonic() < deadline:
        time.sleep(0.01)
    assert resident_bytes(root / "2.0")[0] == (root / "2.0").stat().st_size
    assert resident_bytes(root / "4.0")[0] == 0
    (root / "2.0").write_bytes((root / "2.0").read_bytes()[:-4])  # torn after it was read ahead
    with pytest.raises(StoreFormatError, match="not what the scatter wrote"):
        gather(2)
    assert not (root / "scattered.json").exists()


def test_a_scatter_process_that_sends_no_row_to_a_block_is_no_torn_bucket(tmp_path):
    rows, parts = 10, 2
    src = shardset.write(tmp_path / "src.zarr", id_arrays(rows), block_rows=2, progress=False).where
    dest_block = shuffled_position(rows, 0)(np.arange(rows)) // 4  # 3 output blocks of 4, 4 and 2 rows
    part_of_row = np.arange(rows) // 2 % parts  # input block b goes to scatter process b % 2
    assert any(set(dest_block[part_of_row == p]) != {0, 1, 2} for p in range(parts))  # an empty bucket
    one = shuffle_store(src, tmp_path / "one.zarr", seed=0, block_rows=4, workers=1, progress=False)
    two = shuffle_store(src, tmp_path / "two.zarr", seed=0, block_rows=4, workers=parts, progress=False)
    assert chunk_bytes(two.where) == chunk_bytes(one.where)


def test_another_input_or_output_never_takes_over_a_shuffle_left_unfinished(tmp_path):
    """Buckets are per output (two outputs of one name in one --tmp-dir kept apart), and the
    output records its input: a rerun from another input with the same layout is refused,
    where it used to complete the output with the first input's rows."""
    tmp = tmp_path / "tmp"
    a = shardset.write(tmp_path / "a" / "train.zarr", {"v": np.arange(400)}, block_rows=100, progress=False).where
    b = shardset.write(tmp_path / "b" / "train.zarr", {"v": np.arange(400) + 1000}, block_rows=100, progress=False).where
    assert _bucket_dir(tmp_path / "a" / "out.zarr", tmp) != _bucket_dir(tmp_path / "b" / "out.zarr", tmp)
    shuffle_store(a, tmp_path / "a" / "out.zarr", tmp_dir=tmp, workers=1, progress=False)
    got = shuffle_store(b, tmp_path / "b" / "out.zarr", tmp_dir=tmp, workers=1, progress=False)
    assert sorted(columns(got.where)["v"].tolist()) == list(range(1000, 1400))
    with pytest.raises(StoreFormatError, match="different"):
        shuffle_store(b, tmp_path / "a" / "out.zarr", workers=1, progress=False)


def test_a_full_disk_during_the_scatter_fails_in_one_line_and_the_rerun_finishes(tmp_path, monkeypatch, capsys):
    import errno

    from test_crash import _failing

    from shardset.store import _writev_all

    src = shardset.write(tmp_path / "src.zarr", {"v": np.arange(4000)}, block_rows=500, progress=False).where
    args = ["shuffle", src, str(tmp_path / "out.zarr"), "--workers", "1", "--quiet"]
    with monkeypatch.context() as m:  # the buckets' writes (the scatter's) hit a full disk
        m.setattr("shardset.shuffle._writev_all", _failing(_writev_all, errno.ENOSPC, after=3))
        assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "No space left on device" in err[0] and "rerun to resume" in err[0], err
    assert main(args) == 0
    assert sorted(columns(tmp_path / "out.zarr")["v"].tolist()) == list(range(4000))
