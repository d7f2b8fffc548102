"""CRC-32C of a run of equal pieces from the pieces' own CRC-32Cs.

A store keeps one crc32c per slice of a block (``docs/format.md``).  A reader
that fetches a run of slices checks them with one checksum pass over the whole
run, against the CRC the slices' stored values give for their concatenation,
instead of one call per slice: each call of the ``crc32c`` package over 32 KiB
releases and retakes the GIL (the measured gain: ``docs/design.md``).

The CRC of a concatenation ``A + B`` is ``Z(crc(A)) ^ crc(B)``, where ``Z`` is
the linear map that feeding ``len(B)`` zero bytes applies to the CRC register
(the pre- and post-inversion of CRC-32C cancel out); ``Z`` is tabulated once
per piece length from 32 checksums of zeros.

Example:
    >>> import crc32c
    >>> a, b, c = b"x" * 64, b"y" * 64, b"z" * 64
    >>> joined_crc([crc32c.crc32c(p) for p in (a, b, c)], 64) == crc32c.crc32c(a + b + c)
    True
"""

from __future__ import annotations

import functools
from typing import Sequence

import crc32c

__all__ = ["joined_crc"]


@functools.lru_cache(maxsize=16)
def _zeros_map(length: int) -> tuple[tuple[int, ...], ...]:
    """``Z`` for ``length`` zero bytes, as four 256-entry tables, one per byte of the CRC."""
    zeros = bytes(length)
    plain = crc32c.crc32c(zeros)
    # crc32c(zeros, value=v) continues a message whose CRC is v: Z(v) ^ crc(zeros)
    basis = [crc32c.crc32c(zeros, 1 << bit) ^ plain for bit in range(32)]
    tables = []
    for k in range(4):
        table = [0] * 256
        for byte in range(1, 256):
            low = byte & -byte  # Z is linear: build each entry from one with a bit fewer
            table[byte] = table[byte ^ low] ^ basis[8 * k + low.bit_length() - 1]
        tables.append(tuple(table))
    return tuple(tables)


def joined_crc(crcs: Sequence[int], length: int) -> int:
    """The CRC-32C of pieces of ``length`` bytes each, laid end to end, from their
    CRC-32Cs ``crcs`` (at least one)."""
    t0, t1, t2, t3 = _zeros_map(length)
    out = crcs[0]
    for crc in crcs[1:]:
        out = t0[out & 255] ^ t1[(out >> 8) & 255] ^ t2[(out >> 16) & 255] ^ t3[out >> 24] ^ crc
    return out
