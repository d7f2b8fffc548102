"""shardset: out-of-core sharded datasets for PyTorch.

Write a dataset once into a Zarr store in large blocks, reorder the blocks every
epoch with a keyed Feistel permutation, and stream them back as torch batches.
"""

from .dataset import ShardedDataset
from .errors import (
    ArgumentError,
    CorruptBlockError,
    IncompleteStoreError,
    ShardsetError,
    StoreAccessError,
    StoreFormatError,
    StoreIOError,
    StoreLockedError,
    StoreNotFoundError,
)
from .format import FieldSpec, Layout
from .permutation import FeistelPermutation
from .quality import OrderQuality, order_quality, store_quality
from .segment_shuffle import SegmentShuffle
from .shuffle import shuffle_store
from .sparse import SparseRegressionBlocks, embedding_bag_inputs, generate_sparse_regression, sparse_batch
from .store import BlockStore
from .synthetic import (
    FixedRegressionStream,
    FreshRegressionStream,
    RegressionBlocks,
    generate_regression,
    true_parameters,
)
from .train import FitResult, SparseFitResult, SparseLinear, fit_linear_regression, fit_sparse_regression
from .verify import VerifyReport, verify
from .writer import write, write_blocks

__all__ = [
    "ArgumentError",
    "BlockStore",
    "CorruptBlockError",
    "FeistelPermutation",
    "FieldSpec",
    "IncompleteStoreError",
    "Layout",
    "ShardsetError",
    "StoreFormatError",
    "StoreNotFoundError",
    "StoreAccessError",
    "StoreLockedError",
    "StoreIOError",
    "verify",
    "VerifyReport",
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
    "SparseRegressionBlocks",
    "generate_sparse_regression",
    "sparse_batch",
    "embedding_bag_inputs",
    "SparseFitResult",
    "SparseLinear",
    "fit_sparse_regression",
    "shuffle_store",
    "SegmentShuffle",
    "OrderQuality",
    "order_quality",
    "store_quality",
]
