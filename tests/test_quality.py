"""Shuffle-quality metrics: known values on identity, reversed and uniform orders; the VIF
formula on windowed block orders; the delivered order of a real reader; the CLI."""

import json

import numpy as np
import pytest

import shardset
from shardset import ShardedDataset
from shardset.cli import main
from shardset.quality import (
    adjacent_same_batch,
    batch_tv,
    delivered,
    drift_tv,
    label_vif,
    order_quality,
    predicted_vif,
    quantile_labels,
    rank_correlation,
    store_quality,
    uniform_quality,
    within_block_correlation,
)

N, B, C = 100_000, 100, 10
SORTED = np.repeat(np.arange(C), N // C)  # storage order: sorted by class


def test_identity_and_reversed_orders_of_sorted_labels():
    for ids in (np.arange(N), np.arange(N)[::-1]):
        q = order_quality(SORTED[ids], B, ids=ids)
        assert q.batches == N // B and q.classes == C
        assert q.batch_tv == pytest.approx(1 - 1 / C)  # every batch holds one class
        assert q.vif == pytest.approx(B * (N - 1) / (N - B))  # proportions are 0 or 1
        assert q.effective_batch == pytest.approx(1, rel=1e-3)
        assert q.drift_tv == pytest.approx(1 - 1 / C)
        assert q.adjacent_same_batch == pytest.approx((N // B) * (B - 1) / (N - 1))
        assert q.adjacent_same_batch_uniform == pytest.approx((B - 1) / (N - 1))
        assert q.tv_by_position == pytest.approx([1 - 1 / C] * 20)
    assert rank_correlation(np.arange(N)) == 1.0 and rank_correlation(np.arange(N)[::-1]) == -1.0


def test_a_uniform_order_scores_as_uniform():
    perm = np.random.default_rng(1).permutation(N)
    q = order_quality(SORTED[perm], B, ids=perm)
    assert q.vif == pytest.approx(1, abs=0.1)  # sd of the estimate ~ 0.015 with 1000 batches
    # E[TV] of a multinomial batch: sum_c sqrt(p(1-p)/b) * sqrt(2/pi) / 2 (normal approximation)
    expected_tv = C * np.sqrt(0.1 * 0.9 / B) * np.sqrt(2 / np.pi) / 2
    assert q.batch_tv == pytest.approx(expected_tv, rel=0.1)
    assert abs(q.rank_correlation) < 0.02  # sd 1/sqrt(N) ~ 0.003
    assert q.adjacent_same_batch == pytest.approx(q.adjacent_same_batch_uniform, rel=0.5)  # ~99 pairs expected
    ref = uniform_quality(SORTED, B, ids=np.arange(N), seed=7)
    assert ref.batch_tv == pytest.approx(q.batch_tv, rel=0.1) and ref.drift_tv == pytest.approx(q.drift_tv, rel=0.25)
    assert q.drift_tv < 0.1


def windowed_order(labels_rows: int, block_rows: int, window: int, batch: int, seed: int) -> np.ndarray:
    """Blocks in random order, rows of each run of ``window`` blocks permuted together."""
    rng = np.random.default_rng(seed)
    blocks = rng.permutation(labels_rows // block_rows)
    rows = (blocks[:, None] * block_rows + np.arange(block_rows)).reshape(-1, window * block_rows)
    return rng.permuted(rows, axis=1).reshape(-1)


@pytest.mark.parametrize("window", [1, 2, 4, 8])
def test_vif_follows_the_formula_for_windows_of_homogeneous_blocks(window):
    block_rows, batch = 1250, 125  # 80 blocks, 8 per class
    rho = within_block_correlation(SORTED, block_rows)
    assert rho == pytest.approx(1.0)
    vifs = [label_vif(SORTED[windowed_order(N, block_rows, window, batch, s)], batch) for s in range(3)]
    assert np.mean(vifs) == pytest.approx(predicted_vif(rho, batch, window), rel=0.1)


def test_within_block_correlation_of_a_random_order_is_about_zero():
    labels = np.random.default_rng(2).integers(0, C, N)
    assert abs(within_block_correlation(labels, 1000)) < 0.01


def test_metric_helpers_and_bad_input():
    assert batch_tv(np.array([0, 1, 0, 1]), 2).tolist() == [0.0, 0.0]
    assert drift_tv(SORTED, stretches=10) == pytest.approx([0.9] * 10)
    labels, edges = quantile_labels(np.random.default_rng(0).normal(size=10_000))
    assert len(edges) == 9 and np.bincount(labels).tolist() == [1000] * 10
    assert adjacent_same_batch(np.array([3, 0, 1, 2]), 2) == (pytest.approx(1 / 3), pytest.approx(1 / 3))
    with pytest.raises(ValueError, match="integers"):
        batch_tv(np.array([0.5, 1.0]), 1)
    with pytest.raises(ValueError, match=r"labels must lie in 0\.\.1 for 2 classes, got -1\.\.1"):
        batch_tv(np.array([-1, 1]), 1, classes=2)
    with pytest.raises(ValueError, match="two full batches"):
        label_vif(np.arange(10), 8)


@pytest.fixture(scope="module")
def sorted_store(tmp_path_factory):
    """12,000 rows sorted by a 6-class label, 30 blocks of 400 rows (5 per class); ``row`` is the
    row id and ``v`` the row id as a float."""
    path = tmp_path_factory.mktemp("quality") / "sorted.zarr"
    rows = 12_000
    shardset.write(path, {"label": np.repeat(np.arange(6, dtype=np.int8), rows // 6), "row": np.arange(rows),
                           "v": np.arange(rows, dtype=np.float32)},
                   block_rows=400, progress=False)
    return str(path)


def test_delivered_order_of_the_reader(sorted_store):
    plain = delivered(ShardedDataset(sorted_store, 64, shuffle=False, fields=["row"]))["row"]
    assert np.array_equal(plain, np.arange(12_000))
    for window in (1, 3):
        ds = ShardedDataset(sorted_store, 64, seed=3, fields=["label", "row"], window_blocks=window)
        got = delivered(ds)
        assert sorted(got["row"].tolist()) == list(range(12_000))  # exactly once
        assert np.array_equal(got["label"], np.repeat(np.arange(6), 2000)[got["row"]])


def test_store_quality_improves_with_the_window_and_matches_the_formula(sorted_store):
    r1, r4 = (store_quality(sorted_store, 40, id_field="row", window_blocks=w, seed=1) for w in (1, 4))
    assert r1["rho"] == pytest.approx(1.0) and r1["classes"] == 6
    assert r4["reader"]["vif"] < r1["reader"]["vif"] / 2
    assert r4["reader"]["adjacent_same_batch"] < r1["reader"]["adjacent_same_batch"]
    assert r4["reader"]["vif"] == pytest.approx(r4["predicted_vif"], rel=0.25)  # only 300 batches here
    assert r1["uniform"]["vif"] == pytest.approx(1, abs=0.3)


def test_cli_quality(sorted_store, capsys):
    assert main(["quality", sorted_store, "--window-blocks", "2", "--batch-size", "50", "--id-field", "row"]) == 0
    out = capsys.readouterr().out
    assert "window 2 blocks" in out and "effective batch size" in out and "predicted VIF" in out
    assert main(["quality", sorted_store, "--json", "--label", "v", "--bins", "4", "--no-shuffle"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["classes"] == 4 and r["reader"]["rank_correlation"] is None and r["reader"]["batch_tv"] > 0.7
    assert main(["quality", sorted_store, "--label", "nope"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no field 'nope'" in err[0]


def test_an_order_with_every_batch_at_the_global_mix_has_an_unbounded_effective_batch():
    q = order_quality(np.tile([0, 1], 100), 10)
    assert q.vif == 0 and q.effective_batch == float("inf")


def test_label_and_id_fields_hold_one_value_a_row(tmp_path):
    rows = np.arange(40)
    path = shardset.write(tmp_path / "pairs.zarr", {"y": rows % 4, "pair": np.stack([rows, rows], 1)}, block_rows=10,
                          progress=False).where
    with pytest.raises(ValueError, match=r"id field 'pair' must hold one value per row, not shape \(2,\)"):
        store_quality(path, batch_size=8, label="y", id_field="pair")
    with pytest.raises(ValueError, match="label field 'pair' must hold one value per row"):
        store_quality(path, batch_size=8, label="pair")


def test_any_integer_labels_are_classes():
    """uint64, negative and sparse huge labels (timestamps) score as the same classes numbered 0..k-1."""
    perm = np.random.default_rng(3).permutation(N)
    dense = SORTED[perm]
    values = [np.uint64(2**63) + np.arange(C, dtype=np.uint64) * np.uint64(2**40),
              1_700_000_000_000 + np.arange(C, dtype=np.int64) * 10**9, np.arange(C) - C // 2]
    expected = order_quality(dense, B, ids=perm).as_dict()
    for v in values:
        assert order_quality(v[dense], B, ids=perm).as_dict() == expected
        assert within_block_correlation(v[SORTED], 1000) == within_block_correlation(SORTED, 1000)


def test_store_quality_of_uint64_and_huge_integer_labels(tmp_path):
    rows = 6000
    dense = np.repeat(np.arange(6), rows // 6)
    path = shardset.write(tmp_path / "labels.zarr", {
        "label": dense, "u": np.uint64(2**63) + dense.astype(np.uint64) * np.uint64(2**40),
        "ts": 1_700_000_000_000 + dense * 10**9,
    }, block_rows=500, progress=False).where
    expected = store_quality(path, 50, window_blocks=2, seed=1)
    assert expected["classes"] == 6
    for label in ("u", "ts"):
        assert store_quality(path, 50, label=label, window_blocks=2, seed=1) == {**expected, "label": label}
