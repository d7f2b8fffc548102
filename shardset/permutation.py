"""Keyed pseudorandom permutations of ``[0, n)`` that store no table.

A :class:`FeistelPermutation` maps an index to its shuffled position with a
Feistel network over the bit width that covers ``n`` and walks the cycle back
into range when a value lands in ``[n, 2**width)`` (Black and Rogaway 2002;
the construction behind Naor and Reingold 1999).  Only a handful of 64-bit
round keys are kept, so a permutation of 2**62 items costs the same memory as
one of 10.

The round count (8) and round function (the 64-bit murmur3 finalizer of the
right half XOR a round key) were chosen by the statistical battery in
``tests/test_permutation_quality.py``; 3-4 rounds, or a single multiply per
round, fail parts of it.

Example:
    >>> from shardset import FeistelPermutation
    >>> p = FeistelPermutation(10, seed=1, epoch=0)
    >>> sorted(p(range(10)).tolist()) == list(range(10))
    True
    >>> p.inverse(p(7)) == 7
    True
"""

from __future__ import annotations

import hashlib
import operator
from typing import Iterable, overload

import numpy as np

from .errors import ArgumentError

__all__ = ["FeistelPermutation", "mix64"]

ROUNDS = 8
MIN_WIDTH = 8  # tiny domains are padded so that they still mix well
MAX_N = 1 << 62
CHUNK = 1 << 15  # indices per vectorized pass: the temporaries stay in cache

_M64 = (1 << 64) - 1
_C1 = 0xFF51AFD7ED558CCD
_C2 = 0xC4CEB9FE1A85EC53


def mix64(x: int) -> int:
    """The murmur3 64-bit finalizer on a Python int (used to derive keys)."""
    x &= _M64
    x ^= x >> 33
    x = (x * _C1) & _M64
    x ^= x >> 33
    x = (x * _C2) & _M64
    x ^= x >> 33
    return x


def _tag(domain: str) -> int:
    return int.from_bytes(hashlib.blake2b(domain.encode(), digest_size=8).digest(), "little")


class FeistelPermutation:
    """A bijection on ``[0, n)`` keyed by ``(seed, epoch, domain, stream)``.

    Args:
        n: domain size, ``1 <= n <= 2**62``.
        seed: user seed.
        epoch: epoch number; seed and epoch are hashed separately, so
            ``(seed, epoch + 1)`` and ``(seed + 1, epoch)`` are unrelated.
        domain: a name that separates independent uses of one seed (the
            reader's block order uses ``"block-order"``).
        stream: an extra integer key inside a domain (e.g. the block id).

    Calling the object maps positions to values; :meth:`inverse` maps back.
    Both accept a Python int or any integer array-like and are vectorized.
    """

    __slots__ = ("n", "seed", "epoch", "domain", "stream", "width", "_splits", "_keys", "_swap")

    def __init__(
        self, n: int, seed: int = 0, epoch: int = 0, *, domain: str = "block-order", stream: int = 0
    ) -> None:
        n, seed, epoch, stream = (operator.index(v) for v in (n, seed, epoch, stream))
        if not 1 <= n <= MAX_N:
            raise ArgumentError(f"permutation size must be in [1, 2**62], got {n}")
        self.n, self.seed, self.epoch, self.domain, self.stream = n, seed, epoch, domain, stream
        # Exact width from integer arithmetic: values 0..n-1 need (n-1).bit_length() bits.
        self.width = max((n - 1).bit_length(), MIN_WIDTH)
        hi = self.width // 2
        lo = self.width - hi
        # Round r splits x into (left: a bits | right: b bits); the output puts the old
        # right half on top, so consecutive rounds alternate the (a, b) split.
        self._splits = [(hi, lo) if r % 2 == 0 else (lo, hi) for r in range(ROUNDS)]
        base = mix64(mix64(_tag(domain) ^ mix64(self.seed)) ^ mix64(self.epoch ^ 0x9E3779B97F4A7C15))
        base = mix64(base ^ mix64(self.stream + 0x632BE59BD9B4E019))
        self._keys = [mix64(base + r + 1) for r in range(ROUNDS + 1)]
        # Feistel rounds over halves of 2+ bits are even permutations; a keyed final
        # transposition of values 0 and 1 makes odd permutations as likely as even ones.
        self._swap = n >= 2 and bool(self._keys[ROUNDS] & 1)

    def __repr__(self) -> str:
        return (
            f"FeistelPermutation(n={self.n}, seed={self.seed}, epoch={self.epoch}, "
            f"domain={self.domain!r}, stream={self.stream})"
        )

    def __len__(self) -> int:
        return self.n

    @overload
    def __call__(self, index: int) -> int: ...
    @overload
    def __call__(self, index: Iterable[int] | np.ndarray) -> np.ndarray: ...
    def __call__(self, index):
        """Value at position ``index`` (an int, or an array of positions)."""
        return self._apply(index, inverse=False)

    def inverse(self, value):
        """Position of ``value``: ``p.inverse(p(i)) == i``."""
        return self._apply(value, inverse=True)

    def __iter__(self):
        for start in range(0, self.n, CHUNK):
            yield from self(np.arange(start, min(start + CHUNK, self.n), dtype=np.uint64)).tolist()

    def range(self, start: int, stop: int) -> np.ndarray:
        """Values at positions ``start .. stop-1`` as an int64 array."""
        return self(np.arange(start, stop, dtype=np.int64))

    # -- internals -------------------------------------------------------------------

    def _apply(self, index, inverse: bool):
        scalar = isinstance(index, (int, np.integer))
        x = np.asarray(index)
        if x.dtype.kind not in "iu" and x.size:
            raise TypeError(f"permutation indices must be integers, got {x.dtype}")
        x = x.astype(np.int64, copy=False).reshape(-1)
        if x.size and (int(x.min()) < 0 or int(x.max()) >= self.n):
            raise IndexError(f"index out of range for a permutation of {self.n}")
        v = x.astype(np.uint64)
        if self._swap and inverse:
            v = self._transpose(v)
        v = self._walk(v, inverse)
        if self._swap and not inverse:
            v = self._transpose(v)
        out = v.view(np.int64)
        return int(out[0]) if scalar else out.reshape(np.shape(index))

    @staticmethod
    def _transpose(v: np.ndarray) -> np.ndarray:
        return v ^ (v < 2).astype(np.uint64)  # swaps 0 <-> 1, leaves the rest

    def _walk(self, v: np.ndarray, inverse: bool) -> np.ndarray:
        """Cycle-walk: re-apply the network only to values still outside [0, n)."""
        scratch = [np.empty(min(v.size, CHUNK), dtype=np.uint64) for _ in range(3)]
        v = self._network(v, inverse, scratch)
        n = np.uint64(self.n)
        todo = np.flatnonzero(v >= n)
        while todo.size:
            w = self._network(v[todo], inverse, scratch)
            v[todo] = w
            todo = todo[w >= n]
        return v

    def _network(self, v: np.ndarray, inverse: bool, scratch: list[np.ndarray]) -> np.ndarray:
        """One pass of the network over ``v`` in place, CHUNK values at a time."""
        rounds = self._backward if inverse else self._forward
        for s in range(0, v.size, CHUNK):
            part = v[s : s + CHUNK]
            rounds(part, [buf[: part.size] for buf in scratch])
        return v

    def _forward(self, x: np.ndarray, scratch: list[np.ndarray]) -> np.ndarray:
        """The network in place on ``x``: each round maps L(a bits)|R(b bits) to R|(L ^ F(R))."""
        right, f, tmp = scratch
        for (a, b), key in zip(self._splits, self._keys):
            np.bitwise_and(x, np.uint64((1 << b) - 1), out=right)
            _round_function(right, key, f, tmp)
            x >>= np.uint64(b)
            x ^= f
            x &= np.uint64((1 << a) - 1)
            right <<= np.uint64(a)
            x |= right
        return x

    def _backward(self, x: np.ndarray, scratch: list[np.ndarray]) -> np.ndarray:
        """Undo :meth:`_forward`: R(b bits)|T(a bits) with T = L ^ F(R) maps back to L|R."""
        right, f, tmp = scratch
        for (a, b), key in zip(reversed(self._splits), reversed(self._keys[:ROUNDS])):
            np.right_shift(x, np.uint64(a), out=right)
            _round_function(right, key, f, tmp)
            x ^= f
            x &= np.uint64((1 << a) - 1)
            x <<= np.uint64(b)
            x |= right
        return x


def _round_function(right: np.ndarray, key: int, out: np.ndarray, tmp: np.ndarray) -> None:
    """out = fmix64(right ^ key), the murmur3 finalizer, with no allocation."""
    np.bitwise_xor(right, np.uint64(key), out=out)
    for mult in (_C1, _C2, None):
        np.right_shift(out, np.uint64(33), out=tmp)
        out ^= tmp
        if mult is not None:
            out *= np.uint64(mult)
