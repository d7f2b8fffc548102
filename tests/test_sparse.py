"""Wide sparse regression sets: generator, EmbeddingBag batches, streaming and training."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from batches import same_batches
from torch.utils.data import DataLoader

import shardset
from shardset import BlockStore, ShardedDataset, embedding_bag_inputs, fit_sparse_regression, sparse_batch
from shardset.cli import main
from shardset.sparse import SPARSE_FIELDS, SparseRegressionBlocks, _fill_distinct_sorted, _index_dtype, _Zipf

StatefulDataLoader = pytest.importorskip("torchdata.stateful_dataloader").StatefulDataLoader

pytestmark = pytest.mark.filterwarnings("ignore:'set_vital' is deprecated:UserWarning")

# 3000 rows in blocks of 700 (the last one 200 rows), 300 features, 6 per row; w in chunks of 64.
KW = dict(rows=3000, features=300, nnz=6, block_rows=700, w_chunk=64, progress=False)


def digest(path: Path) -> dict[str, str]:
    """Hash of every file in a store, metadata included, by relative path."""
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(path.rglob("*")) if p.is_file()}


def arrays(path) -> dict[str, np.ndarray]:
    g = zarr.open_group(str(path), mode="r")
    return {k: g[k][:] for k in (*SPARSE_FIELDS, "params/w")}


@pytest.fixture(scope="module")
def sparse_store(tmp_path_factory) -> dict[str, Path]:
    """Uniform and Zipf stores of ``KW``, written with two processes (read only)."""
    root = tmp_path_factory.mktemp("sparse")
    out = {"uniform": root / "uniform", "zipf": root / "zipf"}
    shardset.generate_sparse_regression(out["uniform"], **KW, workers=2)
    shardset.generate_sparse_regression(out["zipf"], **KW, zipf=1.1, workers=2)
    return out


# -- the generator -----------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["uniform", "zipf"])
def test_bytes_do_not_depend_on_workers_and_seed_changes_them(sparse_store, tmp_path, kind):
    zipf = {"zipf": 1.1} if kind == "zipf" else {}
    shardset.generate_sparse_regression(tmp_path / "one", **KW, **zipf, workers=1)
    assert digest(tmp_path / "one") == digest(sparse_store[kind])
    shardset.generate_sparse_regression(tmp_path / "seed1", **KW, **zipf, seed=1, workers=1)
    a, b = arrays(tmp_path / "one"), arrays(tmp_path / "seed1")
    assert not any(np.array_equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("kind", ["uniform", "zipf"])
def test_indices_are_in_range_distinct_and_sorted_per_row(sparse_store, kind):
    a = arrays(sparse_store[kind])
    idx = a["indices"]
    assert idx.dtype == np.int32 and idx.shape == (3000, 6)
    assert idx.min() >= 0 and idx.max() < 300
    assert (np.diff(idx, axis=1) > 0).all()
    counts = np.bincount(idx.ravel(), minlength=300)
    if kind == "uniform":  # 60 expected per index: every index occurs, none far too often
        assert counts.min() > 20 and counts.max() < 110
    else:  # the head is frequent, the tail rare
        assert counts[0] > counts[9] > counts[99] and counts[0] > 1000 and counts[200:].mean() < 30


@pytest.mark.parametrize("kind", ["uniform", "zipf"])
def test_y_follows_the_stored_w(sparse_store, kind):
    a = arrays(sparse_store[kind])
    w = a["params/w"]
    assert w.shape == (300,) and abs(w.std() - 1) < 0.15
    residual = a["y"][:, 0] - (a["values"] * w[a["indices"]]).sum(axis=1) - 4.2
    assert abs(residual.mean()) < 2e-3 and 0.008 < residual.std() < 0.012  # the noise, 0.01


def test_noise_free_y_is_exact_and_w_chunks_give_the_same_blocks(tmp_path):
    path = tmp_path / "s"
    store = shardset.generate_sparse_regression(path, **KW, noise=0.0, workers=1)
    a = arrays(path)
    np.testing.assert_allclose(a["y"][:, 0], (a["values"] * a["params/w"][a["indices"]]).sum(axis=1) + 4.2, atol=1e-5)
    # The same blocks when w is read chunk by chunk for every block instead of kept whole.
    chunked = SparseRegressionBlocks(str(path), 3000, 700, 300, 6, 4.2, 0.0, 0, w_cache_floats=0)
    for b in range(store.layout.num_blocks):
        block = chunked(b)
        for name in SPARSE_FIELDS:
            np.testing.assert_array_equal(block[name], store.read_block(name, b))


def test_zipf_sampler_matches_the_law():
    rng = np.random.default_rng(3)
    n, s, draws = 50, 1.2, 400_000
    counts = np.bincount(_Zipf(n, s)(rng, draws), minlength=n)
    p = np.arange(1, n + 1) ** -s
    p /= p.sum()
    assert len(counts) == n
    assert np.abs(counts / draws - p).max() < 3e-3
    assert ((counts - draws * p) ** 2 / (draws * p)).sum() < 100  # chi-square, 49 degrees of freedom


def test_distinct_rows_when_nnz_equals_the_range_and_with_int64_indices():
    rng = np.random.default_rng(0)
    out = np.empty((500, 8), np.int32)
    _fill_distinct_sorted(out, lambda size: rng.integers(0, 8, size, dtype=np.int32))
    assert (out == np.arange(8)).all()  # every row must be a permutation of 0..7, sorted
    big = np.empty((200, 5), _index_dtype(2**40))
    _fill_distinct_sorted(big, lambda size: rng.integers(0, 2**40, size))
    assert big.dtype == np.int64 and (np.diff(big, axis=1) > 0).all() and big.max() >= 2**31
    assert _index_dtype(2**31 - 1) == np.int32


def test_interrupted_generation_resumes_to_identical_bytes(sparse_store, tmp_path):
    path = tmp_path / "r"
    shardset.generate_sparse_regression(path, **KW, workers=1)
    store = BlockStore.open(path, mode="r+")
    meta = dict(store.group.attrs["shardset"])
    meta["complete_blocks"], meta["complete"] = [[0, 2], [3, 5]], False  # block 2 not recorded
    store.group.attrs["shardset"] = meta
    torn = path / "indices" / "c" / "2" / "0"
    torn.write_bytes(torn.read_bytes()[:50])
    w = zarr.open_array(str(path / "params" / "w"), mode="r+")
    w.attrs["complete"] = False  # and w was being written
    w[:64] = 0.0
    shardset.generate_sparse_regression(path, **KW, workers=2)
    assert digest(path) == digest(sparse_store["uniform"])


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(nnz=301), "nnz must be at most"),
        (dict(zipf=0.0), "zipf must be"),
        (dict(zipf=float("nan")), "zipf must be"),
        (dict(nnz=40, zipf=5.0), "too steep"),
        (dict(noise=-1.0), "noise"),
    ],
)
def test_bad_parameters_are_refused(tmp_path, kw, match):
    with pytest.raises(ValueError, match=match):
        shardset.generate_sparse_regression(tmp_path / "bad", **{**KW, **kw})
    assert not (tmp_path / "bad").exists()


# -- batches ------------------------------------------------------------------------------------


def test_both_embedding_bag_forms_compute_the_sparse_dot(sparse_store):
    batch = next(iter(ShardedDataset(sparse_store["uniform"], 32, fields=SPARSE_FIELDS)))
    w = torch.from_numpy(arrays(sparse_store["uniform"])["params/w"])
    bag = torch.nn.EmbeddingBag(300, 1, mode="sum")
    with torch.no_grad():
        bag.weight[:, 0] = w
    indices, values, y = sparse_batch(batch)
    assert indices.dtype == torch.int64 and indices.shape == values.shape == (32, 6) and y.shape == (32, 1)
    want = (values * w[indices]).sum(dim=1, keepdim=True)
    flat, offsets, weights = embedding_bag_inputs(batch)
    assert flat.shape == weights.shape == (32 * 6,) and offsets.tolist() == list(range(0, 32 * 6, 6))
    torch.testing.assert_close(bag(indices, per_sample_weights=values), want)
    torch.testing.assert_close(bag(flat, offsets, per_sample_weights=weights), want)
    torch.testing.assert_close(want + 4.2, y, atol=0.05, rtol=0)


def _rows(batches) -> dict[str, np.ndarray]:
    return {k: torch.cat([b[k] for b in batches]).numpy() for k in SPARSE_FIELDS}


@pytest.mark.filterwarnings("ignore:This DataLoader will create:UserWarning")
def test_workers_deliver_every_row_exactly_once(sparse_store):
    ds = ShardedDataset(sparse_store["zipf"], 64, seed=4, fields=SPARSE_FIELDS)
    loader = DataLoader(ds, batch_size=None, num_workers=2, timeout=60)
    got, want = _rows(list(loader)), arrays(sparse_store["zipf"])
    assert len(np.unique(want["y"])) == 3000  # y tells the rows apart
    g, w = np.argsort(got["y"][:, 0]), np.argsort(want["y"][:, 0])
    for k in SPARSE_FIELDS:
        np.testing.assert_array_equal(got[k][g], want[k][w])
    assert not np.array_equal(got["y"], want["y"])  # and they were shuffled


@pytest.mark.filterwarnings("ignore:This DataLoader will create:UserWarning")
@pytest.mark.parametrize("cut", [7, 30])
def test_stateful_loader_with_workers_resumes_a_sparse_store(sparse_store, cut):
    def loader():
        ds = ShardedDataset(sparse_store["uniform"], 64, seed=2, fields=SPARSE_FIELDS)
        return StatefulDataLoader(ds, batch_size=None, num_workers=2, timeout=60)

    ref = list(loader())
    first = loader()
    it = iter(first)
    for _ in range(cut):
        next(it)
    state = first.state_dict()
    del it, first
    resumed = loader()
    resumed.load_state_dict(state)
    assert same_batches(list(resumed), ref[cut:])


# -- training -------------------------------------------------------------------------------------


@pytest.mark.parametrize("optimizer", ["adagrad", "adam"])
def test_training_recovers_w_on_frequent_features(tmp_path, optimizer):
    # 400 features, 6 per row, Zipf 0.8: counts from ~600 down to ~20 per epoch.
    path = tmp_path / "fit"
    shardset.generate_sparse_regression(path, rows=10000, features=400, nnz=6, zipf=0.8, block_rows=4000, workers=1,
                                        progress=False)
    fit = fit_sparse_regression(path, epochs=2, batch_size=64, optimizer=optimizer)
    assert fit.counts.sum() == 10000 * 6 and fit.counts[0] > fit.counts[-1]
    assert fit.learnable.sum() == (fit.counts >= 20).sum() > 350
    assert fit.w_rms < 0.05 and abs(fit.b - 4.2) < 0.05
    assert fit.epochs[-1].loss < fit.epochs[0].loss
    with pytest.raises(ValueError, match="optimizer"):
        fit_sparse_regression(path, optimizer="lbfgs")


def test_training_on_a_sparse_store_without_a_generator(tmp_path):
    rng = np.random.default_rng(0)
    idx = np.sort(rng.permuted(np.tile(np.arange(50), (2000, 1)), axis=1)[:, :4], axis=1)
    values = rng.standard_normal((2000, 4)).astype(np.float32)
    w = np.linspace(-1, 1, 50).astype(np.float32)
    y = ((values * w[idx]).sum(1, keepdims=True) + 1.0).astype(np.float32)
    shardset.write(tmp_path / "mine", {"indices": idx, "values": values, "y": y}, block_rows=500, progress=False)
    fit = fit_sparse_regression(tmp_path / "mine", epochs=3, batch_size=64)
    assert fit.w.shape == (50,) and fit.w_true is None and fit.w_rms is None
    assert np.abs(fit.w - w).max() < 0.05 and abs(fit.b - 1.0) < 0.05
    wide = {"indices": idx, "values": values.astype(np.float64), "y": y.astype(np.float64)}  # the model stays float32
    shardset.write(tmp_path / "f64", wide, block_rows=500, progress=False)
    fit = fit_sparse_regression(tmp_path / "f64", epochs=3, batch_size=64)
    assert np.abs(fit.w - w).max() < 0.05 and abs(fit.b - 1.0) < 0.05
    with pytest.raises(ValueError, match="lr must be positive"):
        fit_sparse_regression(tmp_path / "mine", lr=float("nan"))
    with pytest.raises(ValueError, match="not a sparse store"):
        fit_sparse_regression(shardset.write(tmp_path / "dense", {"X": values, "y": y}, progress=False).where)


# -- command line ---------------------------------------------------------------------------------


def test_cli_generates_and_trains_a_sparse_store(tmp_path, capsys):
    path = str(tmp_path / "cli")
    args = ["generate", path, "--rows", "6000", "--features", "200", "--nnz", "4", "--zipf", "0.5", "--block-rows", "2500"]
    assert main([*args, "--workers", "1", "--quiet"]) == 0
    gen = BlockStore.open(path).layout.generator
    assert (gen["nnz"], gen["zipf"], gen["features"]) == (4, 0.5, 200)
    assert main(["train", path, "--epochs", "2", "--batch-size", "64"]) == 0
    out = capsys.readouterr().out
    assert "epoch 1: loss" in out and "rows/s" in out
    assert "features seen >= 20 times in an epoch: 200 of 200" in out
    rms = float(out.split("RMS |w - w_true| = ")[1].split(",")[0])
    assert rms < 0.05


@pytest.mark.parametrize(
    "args, message",
    [
        (["--features", "10", "--zipf", "1.0"], "--zipf needs --nnz"),
        (["--features", "10", "--nnz", "11"], "nnz must be at most features"),
        (["--features", "100", "--nnz", "32", "--zipf", "4"], "too steep"),
    ],
)
def test_cli_refuses_bad_sparse_parameters_in_one_line(tmp_path, capsys, args, message):
    assert main(["generate", str(tmp_path / "x"), "--rows", "100", *args, "--quiet"]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err
