"""shardset: out-of-core sharded datasets for PyTorch.

Write a dataset once into a Zarr store in large blocks, reorder the blocks every
epoch with a keyed Feistel permutation, and stream them back as torch batches.
"""

from .dataset import ShardedDataset
from .errors import CorruptBlockError, IncompleteStoreError, ShardsetError, StoreFormatError
from .format import FieldSpec, Layout
from .permutation import FeistelPermutation
from .store import BlockStore
from .synthetic import (
    FixedRegressionStream,
    FreshRegressionStream,
    RegressionBlocks,
    generate_regression,
    true_parameters,
)
from .train import FitResult, fit_linear_regression
from .writer import write, write_blocks

__all__ = [
    "BlockStore",
    "CorruptBlockError",
    "FeistelPermutation",
    "FieldSpec",
    "IncompleteStoreError",
    "Layout",
    "ShardsetError",
    "StoreFormatError",
    "ShardedDataset",
    "FixedRegressionStream",
    "FreshRegressionStream",
    "RegressionBlocks",
    "generate_regression",
    "true_parameters",
    "FitResult",
    "fit_linear_regression",
    "write",
    "write_blocks",
]
