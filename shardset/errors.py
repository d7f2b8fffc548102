"""Exceptions raised for bad input or bad stores (the CLI prints them as one line)."""

from __future__ import annotations

__all__ = ["ShardsetError", "StoreFormatError", "IncompleteStoreError", "CorruptBlockError"]


class ShardsetError(ValueError):
    """Base class for every error shardset raises about user input or store contents."""


class StoreFormatError(ShardsetError):
    """The path is not a shardset store, or its metadata is inconsistent or incompatible."""


class IncompleteStoreError(ShardsetError):
    """The store is still being written (or was interrupted): some blocks are missing."""


class CorruptBlockError(ShardsetError):
    """A block's chunk is missing, has the wrong size, or fails its checksum."""
