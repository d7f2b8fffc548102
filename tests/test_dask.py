"""Generation as Dask tasks on a real ``LocalCluster`` of two worker processes."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import cloudpickle
import numpy as np
import pytest
from distributed import Client, LocalCluster

import shardset
from shardset import BlockStore
from shardset.cli import main
from shardset.writer import layout_for, write_blocks

from conftest import id_arrays

ROWS, FEATURES, BLOCK_ROWS = 6000, 3, 700
pytestmark = pytest.mark.slow
# The worker processes cannot import this test module: ship its classes by value.
cloudpickle.register_pickle_by_value(sys.modules[__name__])


@pytest.fixture(scope="module")
def client():
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
        with Client(cluster) as c:
            yield c


def _chunk_files(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("c/*/*")) if p.is_file()}


def test_dask_generation_writes_the_same_bytes_as_a_local_run(tmp_path, client, regression_store):
    local = Path(regression_store(ROWS, FEATURES, BLOCK_ROWS))
    path = tmp_path / "dask.zarr"
    store = shardset.generate_regression(path, ROWS, FEATURES, block_rows=BLOCK_ROWS, scheduler="dask", client=client,
                                         progress=False)
    assert store.missing_blocks() == []
    assert os.getpid() not in client.run(os.getpid).values()  # the blocks were written by the worker processes
    files = _chunk_files(path)
    assert len(files) == 2 * store.layout.num_blocks and files == _chunk_files(local)
    assert BlockStore.open(path).layout.generator == BlockStore.open(local).layout.generator


class _Blocks:
    """Picklable ``block -> arrays`` of an id store; fails at ``fail`` (an interrupted run)."""

    def __init__(self, fail: int | None = None) -> None:
        self.arrays, self.fail = id_arrays(ROWS, FEATURES), fail

    def __call__(self, b: int):
        if b == self.fail:
            raise RuntimeError(f"worker lost while making block {b}")
        return {k: v[b * BLOCK_ROWS : (b + 1) * BLOCK_ROWS] for k, v in self.arrays.items()}


def test_failed_dask_run_resumes_writing_only_the_missing_blocks(tmp_path, client):
    arrays = id_arrays(ROWS, FEATURES)
    layout = layout_for(ROWS, {k: shardset.FieldSpec.of(v) for k, v in arrays.items()}, block_rows=BLOCK_ROWS)
    path = tmp_path / "resumed.zarr"
    with pytest.raises(shardset.ShardsetError, match="worker lost while making block 4.*rerun to resume"):
        write_blocks(path, layout, _Blocks(fail=4), scheduler="dask", client=client, progress=False)
    done = BlockStore.open(path).complete_blocks()
    assert 4 not in done
    before = {b: (path / "X" / "c" / str(b) / "0").stat().st_mtime_ns for b in done}
    write_blocks(path, layout, _Blocks(), scheduler="dask", client=client, progress=False)
    store = BlockStore.open(path)
    store.require_complete()
    assert {b: (path / "X" / "c" / str(b) / "0").stat().st_mtime_ns for b in done} == before  # not rewritten
    np.testing.assert_array_equal(np.concatenate([store.read_block("y", b) for b in range(layout.num_blocks)]),
                                  arrays["y"])


def test_cli_generate_on_a_dask_scheduler(tmp_path, client, regression_store, capsys):
    path = tmp_path / "cli.zarr"
    args = [str(path), "--rows", str(ROWS), "--features", str(FEATURES), "--block-rows", str(BLOCK_ROWS)]
    assert main(["generate", *args, "--dask", client.scheduler.address]) == 0  # with Dask's progress bar
    assert "rows x 3 features in 9 blocks" in capsys.readouterr().out
    assert _chunk_files(path) == _chunk_files(Path(regression_store(ROWS, FEATURES, BLOCK_ROWS)))


def test_workers_that_outlive_a_run_follow_an_overwrite_with_another_layout(tmp_path, client):
    """The cluster's worker processes keep their open stores between runs: an
    overwrite with other blocks must not be written with the old geometry."""
    path = tmp_path / "again.zarr"
    kw = dict(rows=2000, features=2, scheduler="dask", client=client, progress=False)
    shardset.generate_regression(path, block_rows=300, **kw)
    store = shardset.generate_regression(path, block_rows=250, overwrite=True, **kw)
    assert store.layout.block_rows == 250 and store.missing_blocks() == []
    assert shardset.verify(path, deep=True, workers=1).ok
