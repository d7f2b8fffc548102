"""The one-pass segment shuffle: a permutation of the input built from one segment of every stratum per block."""

from pathlib import Path

import numpy as np
import pytest

import shardset
from shardset import BlockStore, shuffle_store
from shardset.cli import main
from shardset.errors import ArgumentError, CorruptBlockError, IncompleteStoreError, StoreFormatError
from shardset.format import FieldSpec, Layout
from shardset.quality import within_block_correlation
from shardset.segment_shuffle import SegmentShuffle, default_segments

from conftest import id_arrays, mixed_arrays
from test_shuffle import chunk_bytes, columns


def test_the_output_is_the_planned_permutation_and_every_field_moves_with_its_row(tmp_path):
    rows, src = 5003, mixed_arrays(5003)
    path = shardset.write(tmp_path / "src.zarr", src, block_rows=700, progress=False).where
    out = shuffle_store(path, tmp_path / "dst.zarr", method="segments", segments=8, seed=5, workers=1, progress=False)
    got = columns(out.where)
    plan = SegmentShuffle(out.layout, 8, seed=5)
    assert np.array_equal(got["b"], np.concatenate([plan.source_rows(j) for j in range(plan.num_blocks)]))
    assert sorted(got["b"].tolist()) == list(range(rows)) and not np.array_equal(got["b"], src["b"])
    for name in "acd":
        assert np.array_equal(got[name], src[name][got["b"]])
    gen = out.layout.generator
    assert gen["segments"] == 8 and gen["seed"] == 5 and "strata" in gen["algorithm"]


@pytest.mark.parametrize("rows,block_rows,segments", [(5003, 700, 8), (4200, 700, 7), (1000, 999, 64), (10, 4, 3)])
def test_each_block_is_one_contiguous_segment_of_every_stratum(rows, block_rows, segments):
    plan = SegmentShuffle(Layout(rows, block_rows, {"x": FieldSpec("int64")}), segments, seed=1)
    ranges = [plan.ranges(j) for j in range(plan.num_blocks)]
    flat = sorted(r for rs in ranges for r in rs)
    assert flat[0][0] == 0 and flat[-1][1] == rows
    assert all(a[1] == b[0] for a, b in zip(flat, flat[1:]))  # the segments tile the input exactly
    for j, rs in enumerate(ranges):
        assert sum(b - a for a, b in rs) == plan.layout.block_len(j)
        assert sorted(plan.source_rows(j).tolist()) == [r for a, b in rs for r in range(a, b)]
        if plan.layout.block_len(j) >= segments:
            assert len(rs) == segments  # one from each stratum, in stratum order
            assert all(a[1] <= b[0] for a, b in zip(rs, rs[1:]))
    first = [rs[0] for rs in ranges if plan.layout.block_len(ranges.index(rs)) >= segments]
    assert len({a for a, _ in first}) == len(first)  # stratum 0 gives each block another segment


def test_every_block_holds_every_class_of_a_sorted_input(tmp_path):
    rows, br = 20000, 1000
    labels = np.repeat(np.arange(10), rows // 10)  # sorted by class: every block holds one class
    src = shardset.write(tmp_path / "s.zarr", {"label": labels}, block_rows=br, progress=False).where
    shuffle_store(src, tmp_path / "d.zarr", method="segments", segments=64, workers=1, progress=False)
    got = columns(tmp_path / "d.zarr")["label"]
    assert abs(within_block_correlation(got, br)) < 0.02
    counts = np.stack([np.bincount(got[i : i + br], minlength=10) for i in range(0, rows, br)])
    assert np.abs(counts - 100).max() <= 2 * 16  # stratified: off by at most the two segments at a class edge


def test_same_bytes_whatever_the_workers_other_seed_other_order_and_resumable(tmp_path):
    src = shardset.write(tmp_path / "src.zarr", id_arrays(6000), block_rows=500, progress=False).where
    kw = dict(method="segments", segments=10, progress=False)
    one = shuffle_store(src, tmp_path / "one.zarr", seed=4, workers=1, **kw).where
    two = shuffle_store(src, tmp_path / "two.zarr", seed=4, workers=2, **kw).where
    assert chunk_bytes(one) == chunk_bytes(two)
    other = shuffle_store(src, tmp_path / "other.zarr", seed=5, workers=1, **kw).where
    assert not np.array_equal(columns(one)["y"], columns(other)["y"])

    dst = tmp_path / "dst.zarr"
    chunk = Path(BlockStore.open(src).chunk_path("X", 7))
    good = chunk.read_bytes()
    chunk.write_bytes(good[:100] + bytes(50) + good[150:])  # a damaged slice: every output block reads it
    with pytest.raises(CorruptBlockError, match="slice"):
        shuffle_store(src, dst, seed=4, workers=1, **kw)
    with pytest.raises(IncompleteStoreError):  # what was left never passes for a complete store
        BlockStore.open(dst).require_complete()
    with pytest.raises(StoreFormatError, match="different dataset"):
        shuffle_store(src, dst, seed=5, workers=1, **kw)  # another seed would mix two shuffles
    with pytest.raises(StoreFormatError, match="different dataset"):
        shuffle_store(src, dst, seed=4, workers=1, progress=False)  # and so would the other method
    chunk.write_bytes(good)
    shuffle_store(src, dst, seed=4, workers=2, **kw)
    assert chunk_bytes(dst) == chunk_bytes(one)


def test_bad_requests_are_refused_before_anything_is_written(tmp_path):
    src = shardset.write(tmp_path / "src.zarr", id_arrays(3000), block_rows=1000, progress=False).where
    packed = shardset.write(tmp_path / "zstd.zarr", id_arrays(3000), block_rows=1000, compression="zstd",
                            progress=False).where
    with pytest.raises(StoreFormatError, match="method='rows'"):  # no slice checksums to verify segments with
        shuffle_store(packed, tmp_path / "a.zarr", method="segments", progress=False)
    coarse = shardset.write(tmp_path / "coarse.zarr", id_arrays(3000), block_rows=1031, progress=False)
    assert coarse.layout.slice_rows == 1031  # a prime block size over 1024 rows: one slice a block
    with pytest.raises(ArgumentError, match="shorter than the checksummed slices.*use at most 1 segments"):
        shuffle_store(coarse.where, tmp_path / "b.zarr", method="segments", segments=2, progress=False)
    with pytest.raises(ArgumentError, match="use output blocks of at least 1031 rows"):  # no segment count would do
        shuffle_store(coarse.where, tmp_path / "b.zarr", method="segments", block_rows=500, progress=False)
    for kw, match in ((dict(method="blocks"), "method must be"), (dict(segments=4), "method='segments' only"),
                      (dict(method="segments", tmp_dir=tmp_path), "method='rows' only")):
        with pytest.raises(ArgumentError, match=match):
            shuffle_store(src, tmp_path / "c.zarr", progress=False, **kw)
    assert not any((tmp_path / n).exists() for n in ("a.zarr", "b.zarr", "c.zarr"))


def test_default_segments_are_a_few_mib_and_at_least_64():
    x = {"x": FieldSpec("float32", (16,))}
    assert default_segments(Layout(10**9, 2**21, x)) == 64  # 128 MiB blocks: 2 MiB segments
    assert default_segments(Layout(10**9, 2**22, x)) == 128  # 256 MiB blocks
    assert default_segments(Layout(10**9, 2**19, x)) == 64  # 32 MiB blocks: 64 strata still
    assert default_segments(Layout(100, 10, x)) == 10  # never more than a block's rows


def test_cli_segment_shuffle_and_its_errors(tmp_path, capsys):
    src = shardset.write(tmp_path / "src.zarr", id_arrays(2000), block_rows=300, progress=False).where
    dst = str(tmp_path / "dst.zarr")
    assert main(["shuffle", src, dst, "--method", "segments", "--segments", "6", "--workers", "1"]) == 0
    assert "2,000 rows shuffled into 7 blocks" in capsys.readouterr().out
    assert sorted(columns(dst)["y"].tolist()) == list(range(2000))
    assert main(["shuffle", src, str(tmp_path / "x.zarr"), "--segments", "6"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "method='segments' only" in err[0]
