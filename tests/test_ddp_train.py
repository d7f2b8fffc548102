"""DistributedDataParallel training through ShardedDataset: 2 and 3 real processes.

``examples/ddp_train.py --nproc W`` forks W ranks (gloo on 127.0.0.1; the
same script runs under ``torchrun``, which the 2-rank case uses) for 2 epochs;
the test checks from the rows each rank recorded that
every epoch delivered every row exactly once across ranks (at most
``world - 1`` dropped), that every rank took the same number of steps, and that
the model recovered the store's true w and b.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from shardset import BlockStore, true_parameters

ROOT = Path(__file__).resolve().parents[1]
ROWS, FEATURES, BLOCK_ROWS, BATCH, EPOCHS = 12_000, 2, 1_700, 64, 2


def _rows(X: np.ndarray) -> np.ndarray:
    """Rows as opaque byte strings, so rows can be compared as a multiset."""
    X = np.ascontiguousarray(X, dtype=np.float32)
    return X.view(np.dtype((np.void, X.shape[1] * 4))).reshape(-1)


@pytest.mark.slow
@pytest.mark.parametrize("world, launcher", [(2, "torchrun"), (3, "fork")])
def test_ddp_training_splits_every_epoch_exactly_once(tmp_path, regression_store, world, launcher):
    store = regression_store(ROWS, FEATURES, BLOCK_ROWS)
    record = tmp_path / "record"
    record.mkdir()
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    script = [str(ROOT / "examples" / "ddp_train.py"), store, "--epochs", str(EPOCHS), "--batch-size", str(BATCH),
              "--record", str(record)]
    if launcher == "torchrun":
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(world), *script]
    else:
        cmd = [sys.executable, *script, "--nproc", str(world)]
    run = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=240)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-5000:]

    summary = json.loads((record / "summary.json").read_text())
    per_rank = ROWS // world
    assert summary["world_size"] == world
    assert summary["steps"] == [[math.ceil(per_rank / BATCH)] * EPOCHS] * world  # equal steps on every rank

    bs = BlockStore.open(store)
    stored = _rows(np.concatenate([bs.read_block("X", b) for b in range(bs.layout.num_blocks)]))
    assert len(np.unique(stored)) == ROWS  # rows are distinguishable
    orders = []
    for epoch in range(EPOCHS):
        parts = [np.load(record / f"rank{r}-epoch{epoch}.npy") for r in range(world)]
        assert [len(p) for p in parts] == [per_rank] * world
        seen = _rows(np.concatenate(parts))
        assert len(np.unique(seen)) == len(seen) == ROWS - ROWS % world  # each row at most once, <= world-1 dropped
        assert np.isin(seen, stored).all()
        orders.append(seen)
    assert not np.array_equal(orders[0], orders[1])  # a new order every epoch

    w_true, b_true = true_parameters(bs)
    np.testing.assert_allclose(summary["w"], w_true, atol=0.02)
    assert abs(summary["b"] - b_true) < 0.02
