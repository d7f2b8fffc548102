"""Write blocks as tasks on a ``dask.distributed`` cluster: one task per block.

:func:`shardset.write_blocks` (and :func:`shardset.generate_regression`,
``shardset generate --dask ADDRESS``) with ``scheduler="dask"`` lands here.
Each task opens the store by its path or URL in its worker process, makes block
``b`` with the picklable ``make_block`` and writes it; this process (the
client) records each block as complete once its task has returned, so the
metadata has a single writer and never lists a block whose chunk is not
stored.  Because a block is a pure function of its id, the bytes are the same
as a local run, whatever the number of workers or the task order, and a rerun
writes only the missing blocks.  Each task writes outside the worker's thread
pool, so a worker makes its next block meanwhile.  The workers must reach the store: an object
store, or a filesystem they share with the client.  The progress bar is
Dask's own ``TextProgressBar`` (the dashboard shows the same tasks).

Example:
    >>> import tempfile, os
    >>> from distributed import Client, LocalCluster
    >>> from shardset import generate_regression
    >>> path = os.path.join(tempfile.mkdtemp(), "reg.zarr")
    >>> with LocalCluster(n_workers=1, processes=False, dashboard_address=None) as cluster, Client(cluster) as client:
    ...     store = generate_regression(path, rows=1000, features=2, block_rows=300, scheduler="dask", client=client)
    >>> store.missing_blocks()
    []
"""

from __future__ import annotations

import os
import threading
from typing import Any, Callable, Mapping

import numpy as np

from .errors import ShardsetError
from .format import Layout
from .store import BlockStore
from .urls import parse_url
from .writer import _Progress, block_arrays, filled

__all__ = ["run_dask"]

_OPEN: dict[tuple, BlockStore] = {}  # per worker process: (where, options, pid) -> open store


def run_dask(
    store: BlockStore, make_block: Callable[[int], Mapping[str, np.ndarray]], todo: list[int], client: Any, progress: bool | None
) -> None:
    """Write blocks ``todo`` of ``store`` as Dask tasks on ``client`` (default: the current client)."""
    from distributed import as_completed, get_client

    if not parse_url(store.where).shared:
        raise ShardsetError(f"{store.where} lives in this process only; Dask workers cannot write it")
    client = get_client() if client is None else client
    records = _Progress(store, len(todo), progress=False)
    futures = client.map(
        _write_block, todo, where=store.where, storage_options=store.storage_options, make_block=make_block,
        layout=store.layout.fingerprint(), pure=False,
    )
    if progress:
        _show_progress(futures, client)
    try:
        for fut in as_completed(futures):
            if fut.status != "finished":
                fut.result()  # raises the task's error
            records(fut.result())
    except Exception as exc:
        client.cancel(futures)
        reason = str(exc) if isinstance(exc, ShardsetError) else f"{type(exc).__name__}: {exc}"
        raise ShardsetError(f"writing {store.where} on Dask failed: {reason}; rerun to resume") from exc
    finally:
        records.close()


def _write_block(block: int, *, where: str, storage_options: Mapping[str, Any], make_block, layout: int) -> int:
    """One task: make and write ``block`` in a worker process; returns the block id.

    ``layout`` is the fingerprint of the store's layout: a worker that outlives a
    run keeps its open store, and reopens it when the store was overwritten with
    another layout (the old handle would write blocks of the old geometry).

    The write leaves the worker's thread pool (``distributed.secede``), so the worker
    makes its next block while this one goes to the store, as a process of the local
    pool does with its writer thread; a task whose write would exceed one per worker
    thread waits first, so a worker holds at most two blocks per thread.
    """
    from distributed import get_worker, secede

    key = (where, tuple(sorted((k, str(v)) for k, v in storage_options.items())), os.getpid())
    store = _OPEN.get(key)
    if store is None or store.layout.fingerprint() != layout:
        store = _OPEN[key] = BlockStore.open(where, mode="r+", storage_options=storage_options)
    arrays, spare = _made(make_block, store.layout, block)
    with _LOCK:
        writes = _WRITES.setdefault(os.getpid(), threading.BoundedSemaphore(get_worker().state.nthreads))
    writes.acquire()
    try:
        secede()
        store.write_block(block, arrays)
    finally:
        writes.release()
        if spare is not None:
            with _LOCK:
                _SPARE.append(spare)
    return block


_LOCK = threading.Lock()
_WRITES: dict[int, threading.BoundedSemaphore] = {}  # per worker process: blocks being written at once
_SPARE: list[tuple[Layout, dict[str, np.ndarray]]] = []  # per worker process: block arrays free for reuse


def _made(make_block, layout: Layout, block: int) -> tuple[Mapping[str, np.ndarray], tuple | None]:
    """Block ``block`` from ``make_block`` and the reusable arrays it fills, if any (to
    go back to ``_SPARE`` once written): fresh memory for every 64 MB block costs page
    faults, and on some VMs they cost as much as generating the block."""
    fill = getattr(make_block, "fill", None)
    if fill is None:
        return make_block(block), None
    with _LOCK:
        mine = [i for i, (lay, _) in enumerate(_SPARE) if lay == layout]
        spare = _SPARE.pop(mine[-1]) if mine else (layout, block_arrays(layout))
        _SPARE[:] = [s for s in _SPARE if s[0] == layout]  # another store's arrays are not reused
    return filled(fill, layout, block, spare[1]), spare


def _show_progress(futures: list, client: Any) -> None:
    """Dask's text progress bar for ``futures``, drawn by a background thread."""
    from distributed.diagnostics.progressbar import TextProgressBar

    threading.Thread(
        target=TextProgressBar, args=(futures,), kwargs={"scheduler": client.scheduler.address}, daemon=True,
        name="shardset-dask-progress",
    ).start()
