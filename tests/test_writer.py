"""The streaming writer and the parallel, deterministic, resumable generator."""

import hashlib
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import zarr

import shardset
import shardset.cli
from shardset import BlockStore, IncompleteStoreError, StoreFormatError


def _digest(path: Path) -> dict[str, str]:
    """Hash of every file in a store (metadata included), by relative path."""
    return {
        str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(path.rglob("*"))
        if p.is_file()
    }


def _chunks(path: Path) -> dict[str, str]:
    return {k: v for k, v in _digest(path).items() if not k.endswith("zarr.json")}


@pytest.mark.parametrize("batch", [1, 7, 100, 250, 1000])
def test_streaming_write_of_any_batch_size_round_trips(tmp_path, batch):
    rng = np.random.default_rng(batch)
    a = rng.standard_normal((1000, 3)).astype(np.float32)
    b = rng.integers(0, 10, (1000,)).astype(np.int64)
    batches = ({"a": a[i : i + batch], "b": b[i : i + batch]} for i in range(0, 1000, batch))
    shardset.write(tmp_path / "s", batches, rows=1000, block_rows=128)
    g = zarr.open_group(str(tmp_path / "s"), mode="r")
    np.testing.assert_array_equal(g["a"][:], a)
    np.testing.assert_array_equal(g["b"][:], b)
    assert BlockStore.open(tmp_path / "s").missing_blocks() == []


def test_too_few_rows_leave_the_store_incomplete(tmp_path):
    batches = ({"x": np.zeros((10, 2), np.float32)} for _ in range(3))
    with pytest.raises(ValueError, match="30 rows, fewer than the declared 45"):
        shardset.write(tmp_path / "s", batches, rows=45, block_rows=10)
    store = BlockStore.open(tmp_path / "s")
    assert store.missing_blocks() == [3, 4]
    with pytest.raises(IncompleteStoreError, match="2 of 5 blocks missing"):
        store.require_complete()


@pytest.mark.parametrize("extra", [(10, 10, 10), (10, 10, 5, 1), (25, 1)])
def test_too_many_rows_are_refused_and_leave_the_store_incomplete(tmp_path, extra):
    batches = ({"x": np.zeros((n, 2), np.float32)} for n in extra)
    with pytest.raises(ValueError, match="more than the declared 25"):
        shardset.write(tmp_path / "s", batches, rows=25, block_rows=10)
    store = BlockStore.open(tmp_path / "s")
    assert store.missing_blocks() == [2]  # the last block waits for the end of the input
    with pytest.raises(IncompleteStoreError):
        shardset.ShardedDataset(tmp_path / "s", 5)


@pytest.mark.parametrize(
    "batches,match",
    [
        ([{"x": np.zeros((4, 2)), "z": np.zeros((3, 2))}], "different lengths"),
        ([{"x": np.zeros((4, 2))}, {"y": np.zeros((4, 2))}], "fields"),
        ([{"x": np.zeros((4, 2))}, {"x": np.zeros((4, 3))}], "shape"),
    ],
)
def test_inconsistent_batches_are_refused(tmp_path, batches, match):
    with pytest.raises(ValueError, match=match):
        shardset.write(tmp_path / "s", iter(batches), rows=8, block_rows=4)


def test_rows_are_required_for_an_iterable(tmp_path):
    with pytest.raises(ValueError, match="rows="):
        shardset.write(tmp_path / "s", iter([{"x": np.zeros((4, 2))}]))


def test_interrupted_streaming_write_resumes(tmp_path):
    data = np.arange(200, dtype=np.float32).reshape(100, 2)

    def batches(fail_at=None):
        for i in range(0, 100, 10):
            if i == fail_at:
                raise RuntimeError("source went away")
            yield {"x": data[i : i + 10]}

    with pytest.raises(RuntimeError):
        shardset.write(tmp_path / "s", batches(fail_at=60), rows=100, block_rows=25)
    assert BlockStore.open(tmp_path / "s").missing_blocks() == [2, 3]
    shardset.write(tmp_path / "s", batches(), rows=100, block_rows=25)
    np.testing.assert_array_equal(zarr.open_group(str(tmp_path / "s"), mode="r")["x"][:], data)


def test_generated_data_follows_the_model(tmp_path):
    store = shardset.generate_regression(tmp_path / "r", rows=5000, features=4, noise=0.01, block_rows=1024, workers=1)
    g = zarr.open_group(str(tmp_path / "r"), mode="r")
    X, y, w = g["X"][:], g["y"][:], g["params/w"][:]
    assert X.dtype == np.float32 and y.shape == (5000, 1)
    resid = y[:, 0] - (X @ w + 4.2)
    assert abs(resid.std() - 0.01) < 0.001 and abs(resid.mean()) < 0.001
    assert abs(X.mean()) < 0.05 and abs(X.std() - 1) < 0.05
    gen = store.layout.generator
    assert (gen["seed"], gen["bias"], gen["noise"]) == (0, 4.2, 0.01)
    assert gen["torch"] and gen["numpy"] and "SeedSequence" in gen["algorithm"]
    w_true, b_true = shardset.true_parameters(BlockStore.open(tmp_path / "r"))
    np.testing.assert_array_equal(w_true, w)
    assert b_true == 4.2


def test_explicit_weights_are_used_and_stored(tmp_path):
    shardset.generate_regression(tmp_path / "r", rows=100, features=2, weights=[2, -3.4], block_rows=64, workers=1)
    np.testing.assert_allclose(zarr.open_group(str(tmp_path / "r"), mode="r")["params/w"][:], [2, -3.4])
    with pytest.raises(ValueError, match="2 entries"):
        shardset.generate_regression(tmp_path / "q", rows=100, features=2, weights=[1, 2, 3], block_rows=64)


def test_bytes_do_not_depend_on_the_number_of_workers(tmp_path):
    kw = dict(rows=10_007, features=5, seed=11, block_rows=1000)
    shardset.generate_regression(tmp_path / "one", workers=1, **kw)
    shardset.generate_regression(tmp_path / "three", workers=3, **kw)
    assert _digest(tmp_path / "one") == _digest(tmp_path / "three")


def test_seed_changes_the_data(tmp_path):
    shardset.generate_regression(tmp_path / "a", rows=100, features=3, seed=1, block_rows=50, workers=1)
    shardset.generate_regression(tmp_path / "b", rows=100, features=3, seed=2, block_rows=50, workers=1)
    assert _chunks(tmp_path / "a") != _chunks(tmp_path / "b")


def test_rerun_with_other_parameters_is_refused_unless_overwrite(tmp_path):
    shardset.generate_regression(tmp_path / "r", rows=100, features=3, seed=1, block_rows=50, workers=1)
    before = _digest(tmp_path / "r")
    for change in ({"seed": 2}, {"features": 4}, {"rows": 101}, {"noise": 0.5}, {"block_rows": 40}):
        kw = dict(rows=100, features=3, seed=1, block_rows=50) | change
        with pytest.raises(StoreFormatError, match="different dataset"):
            shardset.generate_regression(tmp_path / "r", workers=1, **kw)
    with pytest.raises(StoreFormatError, match="codecs"):
        shardset.generate_regression(tmp_path / "r", rows=100, features=3, seed=1, block_rows=50, compression="zstd")
    assert _digest(tmp_path / "r") == before  # nothing was lost
    shardset.generate_regression(tmp_path / "r", rows=100, features=3, seed=2, block_rows=50, workers=1, overwrite=True)
    assert BlockStore.open(tmp_path / "r").layout.generator["seed"] == 2


def test_writing_over_something_that_is_not_a_store_is_refused(tmp_path):
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "notes.txt").write_text("keep me")
    with pytest.raises(StoreFormatError):
        shardset.generate_regression(tmp_path / "r", rows=10, features=2, block_rows=5, workers=1)
    assert (tmp_path / "r" / "notes.txt").read_text() == "keep me"


@pytest.mark.parametrize("kw", [{"rows": 0}, {"rows": -5}, {"features": 0}, {"block_rows": 0}, {"seed": -1},
                                {"noise": -0.1}, {"block_mb": 32}, {"workers": 0}])
def test_bad_sizes_raise_value_error(tmp_path, kw):
    args = dict(rows=10, features=2, block_rows=5) | kw
    with pytest.raises(ValueError):
        shardset.generate_regression(tmp_path / "r", **args)


def test_resume_rewrites_only_missing_blocks_and_removes_partials(tmp_path):
    kw = dict(rows=1000, features=3, block_rows=100, workers=1)
    shardset.generate_regression(tmp_path / "ref", **kw)
    shardset.generate_regression(tmp_path / "r", **kw)
    store = BlockStore.open(tmp_path / "r", mode="r+")
    # Simulate a crash: blocks 3 and 7 not recorded, a stray temporary file, a torn chunk.
    meta = dict(store.group.attrs["shardset"])
    meta["complete_blocks"], meta["complete"] = [[0, 3], [4, 7], [8, 10]], False
    store.group.attrs["shardset"] = meta
    torn = tmp_path / "r" / "X" / "c" / "7" / "0"
    torn.write_bytes(torn.read_bytes()[:100])
    stray = tmp_path / "r" / "X" / "c" / "3" / "0.deadbeef.partial"
    stray.write_bytes(b"junk")
    mtime_block0 = os.stat(tmp_path / "r" / "X" / "c" / "0" / "0").st_mtime_ns
    shardset.generate_regression(tmp_path / "r", **kw)
    assert not stray.exists()
    assert os.stat(tmp_path / "r" / "X" / "c" / "0" / "0").st_mtime_ns == mtime_block0
    assert _digest(tmp_path / "r") == _digest(tmp_path / "ref")


def test_killed_generate_resumes_to_identical_bytes(tmp_path):
    args = ["generate", "--rows", "400000", "--features", "8", "--block-rows", "2000", "--seed", "5", "--quiet"]
    ref = tmp_path / "ref"
    shardset.cli.main([args[0], str(ref), *args[1:], "--workers", "2"])
    path = tmp_path / "killed"
    cmd = [sys.executable, "-m", "shardset", args[0], str(path), *args[1:], "--workers", "1"]
    proc = subprocess.Popen(cmd)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:  # kill once some blocks are recorded
        try:
            done = len(BlockStore.open(path).complete_blocks())
        except Exception:
            done = 0
        if done >= 3:
            break
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    store = BlockStore.open(path)
    assert 0 < len(store.complete_blocks()) < store.layout.num_blocks
    assert subprocess.run(cmd).returncode == 0
    assert not list(path.rglob("*.partial"))
    assert _digest(path) == _digest(ref)


def test_store_killed_while_being_created_is_recreated(tmp_path):
    kw = dict(rows=100, features=3, block_rows=50, workers=1)
    shardset.generate_regression(tmp_path / "ref", **kw)
    shardset.generate_regression(tmp_path / "r", **kw)
    # Only the group metadata made it to disk: the arrays were never created.
    for p in sorted((tmp_path / "r").iterdir()):
        if p.is_dir():
            shutil.rmtree(p)
    meta = zarr.open_group(str(tmp_path / "r"), mode="r+")
    attrs = dict(meta.attrs["shardset"])
    attrs["complete_blocks"], attrs["complete"] = [], False
    meta.attrs["shardset"] = attrs
    with pytest.raises(StoreFormatError):
        BlockStore.open(tmp_path / "r")
    shardset.generate_regression(tmp_path / "r", **kw)
    assert _digest(tmp_path / "r") == _digest(tmp_path / "ref")


def test_torn_true_weights_are_rewritten_on_rerun(tmp_path):
    path = tmp_path / "w.zarr"
    shardset.generate_regression(path, rows=1000, features=5, block_rows=300, workers=1, progress=False)
    want = shardset.true_parameters(shardset.BlockStore.open(path))[0]
    (chunk,) = (path / "params" / "w" / "c").iterdir()
    chunk.write_bytes(chunk.read_bytes()[:7])  # as a kill while params/w was written leaves it
    shardset.generate_regression(path, rows=1000, features=5, block_rows=300, workers=1, progress=False)
    np.testing.assert_array_equal(shardset.true_parameters(shardset.BlockStore.open(path))[0], want)


def test_overwrite_deletes_only_a_store_and_never_one_around_or_inside_the_source(tmp_path):
    src = tmp_path / "data" / "src.zarr"
    shardset.generate_regression(src, rows=100, features=2, block_rows=10, workers=1, progress=False)
    with pytest.raises(StoreFormatError, match="not a Zarr store"):  # the folder that holds the source
        shardset.shuffle_store(src, tmp_path / "data", overwrite=True, progress=False)
    with pytest.raises(StoreFormatError, match="inside the shardset store"):  # one of the source's own arrays
        shardset.shuffle_store(src, src / "X", overwrite=True, progress=False)
    with pytest.raises(StoreFormatError, match="inside the shardset store"):  # a new folder inside the source
        shardset.shuffle_store(src, src / "sub" / "out.zarr", progress=False)
    assert not (src / "sub").exists()  # not even its lock's directory was made there
    assert shardset.verify(src, workers=1).ok
    outer = tmp_path / "project.zarr"  # a plain Zarr group that holds a shardset store
    zarr.open_group(outer, mode="w")
    inner = outer / "train.zarr"
    shardset.generate_regression(inner, rows=100, features=2, block_rows=10, workers=1, progress=False)
    with pytest.raises(StoreFormatError, match="holds the shardset store .*train.zarr, which overwrite would delete"):
        shardset.shuffle_store(inner, outer, overwrite=True, progress=False)
    with pytest.raises(StoreFormatError, match="holds the shardset store"):
        shardset.write(outer, {"x": np.zeros(4)}, overwrite=True, progress=False)
    assert shardset.verify(inner, workers=1).ok
    shardset.shuffle_store(src, tmp_path / "out.zarr", progress=False)
    shardset.shuffle_store(src, tmp_path / "out.zarr", overwrite=True, seed=1, progress=False)  # a store: replaced
    assert BlockStore.open(tmp_path / "out.zarr").layout.rows == 100


def test_later_batches_of_a_wider_dtype_are_kept_when_their_values_fit(tmp_path):
    """The first batch sets a field's dtype; a later, wider one is cast if nothing wraps
    or overflows (docs/errors.md: batch-values-wrap, batch-values-overflow)."""
    store = shardset.write(tmp_path / "s.zarr", iter([{"i": np.array([1, 2], np.int8), "f": np.zeros(2, np.float32)},
                                                      {"i": np.array([-128, 127]), "f": np.array([0.1, 1e30])}]),
                           rows=4, block_rows=2, progress=False)
    assert store.read_block("i", 1).tolist() == [-128, 127]
    assert store.read_block("f", 1).tolist() == np.array([0.1, 1e30], np.float32).tolist()
