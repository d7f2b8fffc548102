"""The on-disk format: geometry, attributes, codecs, and reading without shardset."""

import json
import os
import time

import numpy as np
import pytest
import zarr

import shardset
from shardset import BlockStore, CorruptBlockError, FieldSpec, Layout, StoreFormatError
from shardset.bench import evict
from shardset.format import SLICES_PER_BLOCK, blocks_to_ranges, block_rows_for, ranges_to_blocks
from shardset.page_cache import resident_bytes


def _fields(d=16):
    return {"X": FieldSpec("float32", (d,)), "y": FieldSpec("float32", (1,))}


@pytest.mark.parametrize("mb", [63.9, 257, 0, -1])
def test_block_mb_outside_range_is_rejected(mb):
    with pytest.raises(ValueError, match="block_mb"):
        block_rows_for(_fields(), mb)


@pytest.mark.parametrize("mb", [64, 128, 256])
def test_block_rows_make_blocks_of_about_block_mb(mb):
    rows = block_rows_for(_fields(), mb)
    block_bytes = rows * 17 * 4
    assert mb * 2**20 * (1 - 1 / 16) < block_bytes <= mb * 2**20
    assert rows % SLICES_PER_BLOCK == 0  # whole slices: a slice of a block is never a ragged read


def test_default_block_size_is_128_mib():
    assert block_rows_for(_fields()) == block_rows_for(_fields(), 128)


def test_ranges_round_trip():
    blocks = {0, 1, 2, 5, 7, 8}
    assert blocks_to_ranges(blocks) == [[0, 3], [5, 6], [7, 9]]
    assert ranges_to_blocks(blocks_to_ranges(blocks)) == blocks


def test_layout_geometry_and_attrs_round_trip():
    lay = Layout(rows=10, block_rows=4, fields=_fields(3), generator={"seed": 1})
    assert lay.num_blocks == 3
    assert [lay.block_range(b) for b in range(3)] == [(0, 4), (4, 8), (8, 10)]
    attrs = lay.to_attrs([0, 2])
    assert attrs["complete_blocks"] == [[0, 1], [2, 3]] and attrs["complete"] is False
    back = Layout.from_attrs({"shardset": json.loads(json.dumps(attrs))})
    assert back.same_shape(lay) and back.generator == {"seed": 1}
    with pytest.raises(IndexError):
        lay.block_range(3)


def test_format_attributes_and_codecs(tmp_path):
    path = tmp_path / "s.zarr"
    X = np.random.default_rng(0).standard_normal((1000, 5)).astype(np.float32)
    shardset.write(path, {"X": X, "y": X[:, :1] * 2}, block_rows=300)
    group = zarr.open_group(path, mode="r")
    meta = group.attrs["shardset"]
    assert meta["format"] == "shardset" and meta["version"] == 1
    assert (meta["rows"], meta["block_rows"], meta["num_blocks"]) == (1000, 300, 4)
    assert meta["fields"] == {"X": {"dtype": "float32", "shape": [5]}, "y": {"dtype": "float32", "shape": [1]}}
    assert meta["complete"] is True and meta["complete_blocks"] == [[0, 4]]
    arr = group["X"]
    assert arr.chunks == (300, 5) and arr.metadata.zarr_format == 3
    codecs = [c.to_dict() for c in arr.metadata.codecs]
    assert codecs == [{"name": "bytes", "configuration": {"endian": "little"}}, {"name": "crc32c"}]
    assert np.isnan(arr.metadata.fill_value)
    # a chunk is the whole block plus a 4-byte checksum; the last one is padded as zarr pads it
    for b in range(4):
        assert os.path.getsize(path / "X" / "c" / str(b) / "0") == 300 * 5 * 4 + 4


def test_plain_zarr_reads_the_store_without_shardset(tmp_path):
    path = tmp_path / "s.zarr"
    X = np.arange(35, dtype=np.float32).reshape(7, 5)
    shardset.write(path, {"X": X, "y": X[:, :1]}, block_rows=3)
    group = zarr.open_group(str(path), mode="r")
    np.testing.assert_array_equal(group["X"][:], X)
    np.testing.assert_array_equal(group["y"][5:7], X[5:7, :1])


def test_fast_path_and_zarr_path_agree(tmp_path):
    path = tmp_path / "s.zarr"
    data = {"a": np.arange(50, dtype=np.int64).reshape(25, 2), "b": np.linspace(0, 1, 25).astype(np.float64)}
    shardset.write(path, data, block_rows=10)
    bs = BlockStore.open(path)
    for b in range(3):
        lo, hi = bs.layout.block_range(b)
        fast = bs.read_block("a", b, bs.new_buffer("a"))
        np.testing.assert_array_equal(fast, data["a"][lo:hi])
        np.testing.assert_array_equal(bs.read_block("b", b), data["b"][lo:hi])


@pytest.mark.parametrize("compression,checksum", [("lz4", True), ("zstd", True), (None, False), ("zstd", False)])
def test_codec_options_round_trip(tmp_path, compression, checksum):
    path = tmp_path / "s.zarr"
    X = np.random.default_rng(1).standard_normal((500, 4)).astype(np.float32)
    shardset.write(path, {"X": X}, block_rows=128, compression=compression, checksum=checksum)
    bs = BlockStore.open(path)
    names = bs.codec_names("X")
    assert ("crc32c" in names) == checksum
    got = np.concatenate([bs.read_block("X", b) for b in range(bs.layout.num_blocks)])
    np.testing.assert_array_equal(got, X)
    np.testing.assert_array_equal(zarr.open_group(str(path), mode="r")["X"][:], X)


def test_unknown_compression_creates_nothing(tmp_path):
    with pytest.raises(ValueError, match="compression"):
        shardset.write(tmp_path / "s.zarr", {"X": np.zeros((4, 2), np.float32)}, block_rows=2, compression="brotli")
    assert not (tmp_path / "s.zarr").exists()


@pytest.mark.parametrize("where, compression", [("local", None), ("local", "zstd"), ("memory", None)])
def test_block_of_fill_values_is_still_written(tmp_path, where, compression):
    """zarr's default write_empty_chunks=False would skip an all-NaN (float) or all-zero
    (int) block, on every path through zarr (compressed chunks, object stores): the
    block must be stored, or the store would be complete with a block missing."""
    import uuid

    path = tmp_path / "s.zarr" if where == "local" else f"memory://{uuid.uuid4().hex}/s.zarr"
    X = np.full((6, 2), np.nan, np.float32)
    X[:3] = 1.0
    k = np.zeros(6, np.int32)
    k[:3] = 7
    shardset.write(path, {"X": X, "k": k}, block_rows=3, compression=compression, progress=False)
    store = BlockStore.open(path)
    assert store.missing_blocks() == []
    assert np.isnan(store.read_block("X", 1)).all() and (store.read_block("k", 1) == 0).all()
    if where == "local":
        assert (path / "X" / "c" / "1" / "0").exists()


def test_missing_block_is_an_error_not_fill_values(tmp_path):
    path = tmp_path / "s.zarr"
    shardset.write(path, {"X": np.ones((6, 2), np.float32)}, block_rows=3)
    (path / "X" / "c" / "1" / "0").unlink()
    with pytest.raises(CorruptBlockError, match="block 1 of field 'X'.*missing"):
        BlockStore.open(path).read_block("X", 1)


def test_missing_block_in_compressed_store_is_an_error(tmp_path):
    path = tmp_path / "s.zarr"
    shardset.write(path, {"X": np.ones((6, 2), np.float32)}, block_rows=3, compression="zstd")
    (path / "X" / "c" / "0" / "0").unlink()
    with pytest.raises(CorruptBlockError, match="missing"):
        BlockStore.open(path).read_block("X", 0)


def test_flipped_bit_fails_the_checksum(tmp_path):
    path = tmp_path / "s.zarr"
    shardset.write(path, {"X": np.ones((6, 2), np.float32)}, block_rows=3)
    chunk = path / "X" / "c" / "0" / "0"
    raw = bytearray(chunk.read_bytes())
    raw[5] ^= 0x10
    chunk.write_bytes(bytes(raw))
    with pytest.raises(CorruptBlockError, match="checksum"):
        BlockStore.open(path).read_block("X", 0)


def test_truncated_chunk_is_reported(tmp_path):
    path = tmp_path / "s.zarr"
    shardset.write(path, {"X": np.ones((6, 2), np.float32)}, block_rows=3)
    chunk = path / "X" / "c" / "1" / "0"
    chunk.write_bytes(chunk.read_bytes()[:-7])
    with pytest.raises(CorruptBlockError, match="bytes, expected"):
        BlockStore.open(path).read_block("X", 1)


def test_foreign_zarr_group_with_row_chunks_opens(tmp_path):
    path = str(tmp_path / "plain.zarr")
    g = zarr.open_group(path, mode="w")
    g.create_array("feat", data=np.arange(40, dtype=np.float32).reshape(20, 2), chunks=(8, 2))
    g.create_array("label", data=np.arange(20, dtype=np.int64), chunks=(8,))
    bs = BlockStore.open(path)
    assert bs.foreign and bs.layout.rows == 20 and bs.layout.block_rows == 8
    assert bs.missing_blocks() == []
    np.testing.assert_array_equal(bs.read_block("label", 2), np.arange(16, 20))


def test_not_a_store_is_a_clear_error(tmp_path):
    with pytest.raises(StoreFormatError, match="not a shardset store"):
        BlockStore.open(tmp_path / "nothing-here")
    (tmp_path / "file.txt").write_text("hi")
    with pytest.raises(StoreFormatError):
        BlockStore.open(tmp_path / "file.txt")


def test_group_with_mismatched_arrays_is_rejected(tmp_path):
    path = str(tmp_path / "bad.zarr")
    g = zarr.open_group(path, mode="w")
    g.create_array("a", shape=(10, 2), chunks=(5, 2), dtype="f4")
    g.create_array("b", shape=(11,), chunks=(5,), dtype="f4")
    with pytest.raises(StoreFormatError, match="leading dimension"):
        BlockStore.open(path)


def test_newer_format_version_is_refused(tmp_path):
    path = tmp_path / "s.zarr"
    shardset.write(path, {"X": np.ones((4, 2), np.float32)}, block_rows=2)
    g = zarr.open_group(str(path), mode="r+")
    meta = dict(g.attrs["shardset"])
    meta["version"] = 99
    g.attrs["shardset"] = meta
    with pytest.raises(StoreFormatError, match="version 99"):
        BlockStore.open(path)


def test_will_need_has_the_whole_chunk_read_not_one_readahead_window(tmp_path):
    """Linux reads at most the device's readahead window per POSIX_FADV_WILLNEED call
    (8 MiB here): the hint for a 24 MiB chunk must bring in all of it."""
    store = shardset.write(tmp_path / "s.zarr", {"x": np.zeros((3 << 20, 2), np.float32)}, block_rows=3 << 20,
                           progress=False)
    path = store.chunk_path("x", 0)
    evict([path])
    if resident_bytes(path)[0]:
        pytest.skip("this file system keeps files in memory: nothing to read ahead")
    store.will_need("x", 0)
    deadline = time.monotonic() + 20
    while resident_bytes(path)[0] < path.stat().st_size and time.monotonic() < deadline:
        time.sleep(0.01)
    assert resident_bytes(path)[0] == path.stat().st_size


@pytest.mark.parametrize("change,match", [
    (dict(fields=["X", "y"]), "malformed shardset attributes"),
    (dict(fields={"X": {"dtype": "foo", "shape": [2]}}), "malformed shardset attributes: data type 'foo'"),
    (dict(fields={"X": {"dtype": "<U3", "shape": [2]}}), "malformed shardset attributes: a field's dtype must be"),
    (dict(complete_blocks=[[0]]), "malformed shardset attributes: not enough values"),
    (dict(complete_blocks=[[0, 99]]), r"complete_blocks holds runs outside blocks \[0, 10\)"),
])
def test_malformed_attributes_are_a_format_error(tmp_path, change, match):
    path = tmp_path / "s.zarr"
    shardset.generate_regression(path, rows=100, features=2, block_rows=10, workers=1, progress=False)
    group = zarr.open_group(path, mode="r+")
    group.attrs["shardset"] = {**group.attrs["shardset"], **change}
    with pytest.raises(StoreFormatError, match=match):
        BlockStore.open(path)


def test_a_full_disk_while_the_arrays_are_created_is_a_one_line_error(tmp_path, monkeypatch):
    import errno

    from shardset.errors import StoreIOError

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(zarr.Group, "create_array", full)
    with pytest.raises(StoreIOError, match="creating .*s.zarr failed: No space left on device; .*overwrite") as err:
        shardset.write(tmp_path / "s.zarr", {"x": np.zeros(4)}, progress=False)
    assert err.value.errno == errno.ENOSPC


@pytest.mark.parametrize("direct", [False, True])
def test_a_block_read_unverified_is_checked_by_check_block(make_id_store, direct):
    """``read_block(..., verify=False)`` hands over the bytes and leaves their CRC-32C
    to ``check_block``: the bytes of a damaged chunk come back, and the check fails."""
    from test_dataset import _chunk, _damage

    path = make_id_store(100, 32)
    store = BlockStore.open(path)
    good = store.new_buffer("X")
    np.testing.assert_array_equal(store.read_block("X", 0, good, direct=direct, verify=False)[:, 0], np.arange(32))
    store.check_block("X", 0, good)
    _damage(_chunk(path, "X", 1, 2), "flip")
    evict([_chunk(path, "X", 1, 2)])
    bad = store.new_buffer("X")
    assert store.read_block("X", 1, bad, direct=direct, verify=False).shape == (32, 3)
    with pytest.raises(CorruptBlockError, match="crc32c"):
        store.check_block("X", 1, bad)
    with pytest.raises(CorruptBlockError, match="crc32c"):
        store.read_block("X", 1, store.new_buffer("X"), direct=direct)
