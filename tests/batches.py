"""Comparing streams of batches in tests."""

import torch


def same_batches(a, b) -> bool:
    """Bitwise equality of two lists of batches (tuples, lists or dicts), in order."""
    if len(a) != len(b):
        return False
    for x, y in zip(a, b):
        if isinstance(x, dict) != isinstance(y, dict):
            return False
        if isinstance(x, dict):
            if list(x) != list(y):
                return False
            x, y = list(x.values()), list(y.values())
        if len(x) != len(y):
            return False
        for s, t in zip(x, y):
            if s.dtype != t.dtype or s.shape != t.shape or not torch.equal(s, t):
                return False
    return True
