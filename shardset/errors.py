"""Exceptions raised for bad input or bad stores (the CLI prints them as one line).

Every class derives from :class:`ShardsetError` (a ``ValueError``); the ones about
files also derive from the matching ``OSError`` subclass, so ``except
FileNotFoundError`` or ``except PermissionError`` catch them too.

Example:
    >>> from shardset.errors import StoreNotFoundError
    >>> issubclass(StoreNotFoundError, FileNotFoundError), issubclass(StoreNotFoundError, ValueError)
    (True, True)
"""

from __future__ import annotations

__all__ = [
    "ShardsetError",
    "ArgumentError",
    "StoreFormatError",
    "StoreNotFoundError",
    "StoreAccessError",
    "IncompleteStoreError",
    "CorruptBlockError",
    "StoreLockedError",
    "StoreIOError",
    "StoreURLError",
]


class ShardsetError(ValueError):
    """Base class for every error shardset raises about user input or store contents."""


class ArgumentError(ShardsetError):
    """An argument is out of range, of the wrong type, or inconsistent with the others."""


class StoreFormatError(ShardsetError):
    """The path is not a shardset store, or its metadata is inconsistent or incompatible."""


class StoreNotFoundError(StoreFormatError, FileNotFoundError):
    """Nothing (no Zarr group) exists at the path."""


class StoreAccessError(ShardsetError, PermissionError):
    """The store (or the directory it goes in) may not be read or written by this user."""


class IncompleteStoreError(ShardsetError):
    """The store is still being written (or was interrupted): some blocks are missing."""


class CorruptBlockError(ShardsetError):
    """A block's chunk is missing, has the wrong size, or fails its checksum."""


class StoreLockedError(ShardsetError):
    """Another live process is writing the store (see :mod:`shardset.lock`)."""


class StoreIOError(ShardsetError, OSError):
    """Writing failed with an operating-system error (disk full, I/O error).

    The blocks finished before the error are kept and the store stays
    resumable: rerun the same command once the cause is fixed.  ``errno`` is
    the original error number.
    """


class StoreURLError(ShardsetError):
    """A store URL or its storage options are malformed or unsupported."""
