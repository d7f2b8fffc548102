"""Correctness tests for :class:`shardset.permutation.FeistelPermutation`.

Fast by design (the whole file runs in well under 20 s on two cores): every
check that touches a whole domain is vectorized, and the huge domains
(up to 2**62) are checked on random samples.  The statistical quality of the
shuffles is tested separately in ``test_permutation_quality.py``.
"""

from __future__ import annotations

import numpy as np
import pytest

from shardset.permutation import MAX_N, FeistelPermutation

# Domains far too large to enumerate, checked on random samples.
HUGE_NS = [2**62, 2**62 - 1, 2**40 + 1, 2**40, 3 * 2**38, 2**32, 10**12 + 39]


def assert_bijection(values: np.ndarray, n: int) -> None:
    """``values`` is a permutation of ``range(n)`` (every value hit exactly once)."""
    assert values.shape == (n,)
    assert values.dtype == np.int64
    if n <= 4096:
        np.testing.assert_array_equal(np.sort(values), np.arange(n))
        return
    # Same check without the O(n log n) sort: all in range and no value twice.
    assert int(values.min()) >= 0 and int(values.max()) < n
    assert np.count_nonzero(np.bincount(values, minlength=n)) == n


def sample_indices(n: int, size: int, seed: int) -> np.ndarray:
    """Random positions in ``[0, n)`` plus both ends of the domain."""
    rng = np.random.default_rng(seed)
    x = rng.integers(0, n, size=size, dtype=np.int64)
    edges = np.array([0, n - 1, n // 2, max(n - 2, 0), min(1, n - 1)], dtype=np.int64)
    return np.concatenate([edges, x])


# -- bijection ---------------------------------------------------------------------


def test_bijection_every_small_n():
    for n in range(1, 3001):
        p = FeistelPermutation(n, seed=n * 7 + 1, epoch=n % 5)
        assert_bijection(p(np.arange(n)), n)


def test_inverse_full_domain_small_n():
    for n in list(range(1, 9)) + list(range(9, 257, 13)) + list(range(257, 3001, 37)):
        p = FeistelPermutation(n, seed=n, epoch=3, domain="record-order", stream=n // 3)
        x = np.arange(n)
        y = p(x)
        np.testing.assert_array_equal(p.inverse(y), x)
        np.testing.assert_array_equal(p(p.inverse(x)), x)


@pytest.mark.parametrize("k", range(1, 23))
def test_bijection_around_powers_of_two(k):
    for n in (2**k - 1, 2**k, 2**k + 1):
        if n < 1:
            continue
        p = FeistelPermutation(n, seed=k, epoch=1)
        x = np.arange(n, dtype=np.int64)
        y = p(x)
        assert_bijection(y, n)
        if k <= 16:  # the inverse on whole domains: cheap up to 2**16
            np.testing.assert_array_equal(p.inverse(y), x)
        else:
            s = sample_indices(n, 20_000, seed=k)
            np.testing.assert_array_equal(p.inverse(y[s]), s)


def test_range_matches_call_and_iter():
    p = FeistelPermutation(5000, seed=3, epoch=2)
    full = p(np.arange(5000))
    np.testing.assert_array_equal(p.range(0, 5000), full)
    np.testing.assert_array_equal(p.range(123, 4567), full[123:4567])
    assert p.range(10, 10).shape == (0,)
    assert p.range(10, 10).dtype == np.int64
    assert list(p) == full.tolist()
    assert len(p) == 5000


# -- inverse round trips -----------------------------------------------------------


@pytest.mark.parametrize("n", HUGE_NS)
def test_inverse_round_trip_huge_domains_arrays(n):
    p = FeistelPermutation(n, seed=12345, epoch=6, domain="block-order", stream=2)
    x = sample_indices(n, 50_000, seed=n % 1000)
    y = p(x)
    assert y.dtype == np.int64
    assert int(y.min()) >= 0 and int(y.max()) < n
    np.testing.assert_array_equal(p.inverse(y), x)
    np.testing.assert_array_equal(p(p.inverse(x)), x)
    # Injective on the sample (distinct positions give distinct values).
    ux = np.unique(x)
    assert np.unique(p(ux)).size == ux.size


@pytest.mark.parametrize("n", HUGE_NS + [1, 2, 3, 255, 256, 257, 1000])
def test_inverse_round_trip_python_ints(n):
    p = FeistelPermutation(n, seed=99, epoch=1)
    for i in {0, n - 1, n // 2, n // 3, (n * 7) // 11}:
        v = p(i)
        assert type(v) is int
        assert 0 <= v < n
        back = p.inverse(v)
        assert type(back) is int
        assert back == i
        assert p(p.inverse(i)) == i


def test_identity_and_two_element_domains():
    assert FeistelPermutation(1, seed=5)(0) == 0
    assert FeistelPermutation(1, seed=5).inverse(0) == 0
    seen = set()
    for seed in range(16):
        seen.add(tuple(FeistelPermutation(2, seed=seed)(np.arange(2)).tolist()))
    assert seen == {(0, 1), (1, 0)}  # both permutations of two items occur


# -- scalars, arrays and types -----------------------------------------------------


@pytest.mark.parametrize("n", [1, 7, 1000, 4097, 2**40 + 1, 2**62])
def test_scalar_and_array_agree(n):
    p = FeistelPermutation(n, seed=8, epoch=2)
    x = sample_indices(n, 40, seed=1)
    if n < 50:  # tiny domains walk long cycles: keep the scalar loop short
        x = np.resize(np.unique(x), 45)
    arr = p(x)
    inv = p.inverse(x)
    for j, i in enumerate(x[:3].tolist() if n < 50 else x.tolist()):
        assert p(i) == arr[j]
        assert p(np.int64(i)) == arr[j]
        assert p(np.uint64(i)) == arr[j]
        assert p([i]).tolist() == [arr[j]]
        assert p.inverse(i) == inv[j]
    # Other integer dtypes, lists, strided and multi-dimensional input.
    np.testing.assert_array_equal(p(x.astype(np.uint64)), arr)
    np.testing.assert_array_equal(p(x.tolist()), arr)
    np.testing.assert_array_equal(p(np.repeat(x, 2)[::2]), arr)
    if n < 2**31:
        np.testing.assert_array_equal(p(x.astype(np.int32)), arr)
    two_d = np.stack([x[:20], x[20:40]])
    out = p(two_d)
    assert out.shape == (2, 20)
    np.testing.assert_array_equal(out.reshape(-1), arr[:40])


def test_return_types():
    p = FeistelPermutation(100, seed=1)
    assert type(p(5)) is int
    assert type(p(np.int32(5))) is int
    assert type(p.inverse(5)) is int
    out = p(np.arange(10, dtype=np.int32))
    assert isinstance(out, np.ndarray) and out.dtype == np.int64
    assert isinstance(p([1, 2, 3]), np.ndarray)
    empty = p(np.array([], dtype=np.int64))
    assert empty.shape == (0,) and empty.dtype == np.int64
    assert p.inverse(np.array([], dtype=np.int64)).shape == (0,)


def test_input_array_not_modified():
    p = FeistelPermutation(2**40 + 1, seed=4)
    x = np.arange(100_000, dtype=np.int64) * 7919
    before = x.copy()
    p(x)
    p.inverse(x)
    np.testing.assert_array_equal(x, before)


# -- errors ------------------------------------------------------------------------


@pytest.mark.parametrize("n", [0, -1, -(2**62), 2**62 + 1, 2**64])
def test_bad_size_raises_value_error(n):
    with pytest.raises(ValueError):
        FeistelPermutation(n)


def test_largest_size_accepted():
    p = FeistelPermutation(MAX_N)
    assert MAX_N == 2**62
    assert p.n == 2**62 and len(p) == 2**62
    assert p.width == 62


@pytest.mark.parametrize("n", [1, 10, 256, 257, 2**40 + 1, 2**62])
def test_out_of_range_raises_index_error(n):
    p = FeistelPermutation(n, seed=2)
    for bad in (-1, n, n + 1, -(2**40)):
        with pytest.raises(IndexError):
            p(bad)
        with pytest.raises(IndexError):
            p.inverse(bad)
    with pytest.raises(IndexError):
        p(np.array([0, n], dtype=np.int64))
    with pytest.raises(IndexError):
        p.inverse(np.array([-1, 0], dtype=np.int64))
    with pytest.raises(IndexError):
        p.range(n - 1, n + 1)
    with pytest.raises(IndexError):
        p(np.uint64(2**63))  # would wrap to a negative int64


def test_float_input_raises_type_error():
    p = FeistelPermutation(100)
    for bad in (1.0, 2.5, np.float64(3.0), np.array([1.0, 2.0]), [0.5]):
        with pytest.raises(TypeError):
            p(bad)
        with pytest.raises(TypeError):
            p.inverse(bad)


# -- keys --------------------------------------------------------------------------


def _perm(n, **key):
    return FeistelPermutation(n, **key)(np.arange(n))


def test_same_key_same_permutation():
    a = _perm(1000, seed=5, epoch=2, domain="record-order", stream=9)
    b = _perm(1000, seed=5, epoch=2, domain="record-order", stream=9)
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("n", [10, 1000, 4096, 100_003])
def test_each_key_component_changes_the_permutation(n):
    base = dict(seed=1, epoch=1, domain="block-order", stream=0)
    ref = _perm(n, **base)
    variants = [
        dict(base, seed=2),
        dict(base, seed=0),
        dict(base, epoch=2),
        dict(base, epoch=0),
        dict(base, domain="record-order"),
        dict(base, domain="block-order "),
        dict(base, stream=1),
        dict(base, stream=2),
    ]
    for v in variants:
        assert not np.array_equal(_perm(n, **v), ref), v


def test_seed_epoch_grid_all_distinct():
    # Regression for the Grain bug: seed and epoch must not be merged additively,
    # i.e. (seed, epoch + 1) and (seed + 1, epoch) must be unrelated.
    n = 1000
    perms = {}
    for seed in range(12):
        for epoch in range(12):
            perms[(seed, epoch)] = _perm(n, seed=seed, epoch=epoch)
    for seed in range(11):
        for epoch in range(11):
            a, b = perms[(seed, epoch + 1)], perms[(seed + 1, epoch)]
            assert not np.array_equal(a, b), (seed, epoch)
            # Not merely different: they should agree about as often as two
            # independent permutations do (about once per 1000 positions).
            assert np.count_nonzero(a == b) < 12, (seed, epoch)
    distinct = {p.tobytes() for p in perms.values()}
    assert len(distinct) == len(perms)


def test_stream_and_domain_grid_all_distinct():
    n = 500
    seen = set()
    for domain in ("block-order", "record-order", "x"):
        for stream in range(20):
            seen.add(_perm(n, seed=3, epoch=0, domain=domain, stream=stream).tobytes())
    assert len(seen) == 60


# -- width -------------------------------------------------------------------------


def test_width_small_domains_padded():
    for n in (1, 2, 3, 100, 255, 256):
        assert FeistelPermutation(n).width == 8
    assert FeistelPermutation(257).width == 9


@pytest.mark.parametrize("k", range(8, 62))
def test_width_exact_at_powers_of_two_plus_one(k):
    n = 2**k + 1
    p = FeistelPermutation(n, seed=k)
    assert p.width == k + 1
    assert FeistelPermutation(2**k).width == max(k, 8)
    if k >= 9:
        assert FeistelPermutation(2**k - 1).width == k
    x = sample_indices(n, 2000, seed=k)
    y = p(x)
    assert int(y.min()) >= 0 and int(y.max()) < n
    np.testing.assert_array_equal(p.inverse(y), x)
    # The last position and value (2**k) are reachable both ways.
    assert 0 <= p(2**k) < n
    assert 0 <= p.inverse(2**k) < n
    assert p(p.inverse(2**k)) == 2**k
