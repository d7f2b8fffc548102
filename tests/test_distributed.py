"""A real ``torch.distributed`` run: ranks come from the process group, not from arguments.

Each rank is a separate Python process (gloo backend on 127.0.0.1) that builds a
``ShardedDataset`` with no ``rank=`` / ``world_size=``, reads two epochs through a
``DataLoader`` with one worker, all-gathers what it read, and rank 0 writes the
gathered result to a JSON file that the test checks.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from shardset import ShardedDataset

N = 1009
BLOCK_ROWS = 97
BS = 16
SEED = 21
EPOCHS = 2
RUN_TIMEOUT = 120  # seconds for one whole multi-process run

WORKER = textwrap.dedent(
    """
    import json, sys
    from datetime import timedelta

    import torch
    import torch.distributed as dist
    from torch.utils.data import DataLoader

    from shardset import ShardedDataset

    store, out, port, rank, world, epochs, bs, seed = sys.argv[1:]
    rank, world, epochs, bs, seed = int(rank), int(world), int(epochs), int(bs), int(seed)
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
        timeout=timedelta(seconds=60),
    )
    try:
        ds = ShardedDataset(store, bs, seed=seed)  # rank and world size from torch.distributed
        loader = DataLoader(ds, batch_size=None, num_workers=1, timeout=60)
        mine = {"rank": ds.rank, "world_size": ds.world_size, "len": len(ds), "epochs": []}
        for _ in range(epochs):
            epoch = ds.epoch
            batches = [[int(i) for i in y] for _, y in loader]
            mine["epochs"].append({"epoch": epoch, "batches": batches})
        mine["epoch_after"] = ds.epoch
        gathered = [None] * world
        dist.all_gather_object(gathered, mine)
        if rank == 0:
            with open(out, "w") as f:
                json.dump(gathered, f)
        dist.barrier()
    finally:
        dist.destroy_process_group()
    """
)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(tmp_path: Path, store: str, world: int, script: str = WORKER, *extra: str) -> list[dict]:
    """Run ``world`` rank processes of ``script`` to completion; returns what rank 0 gathered."""
    for attempt in range(2):  # the free port can be taken before rank 0 binds it: retry once
        try:
            return _run_ranks(tmp_path, store, world, script, extra)
        except AssertionError as exc:
            if attempt or "address already in use" not in str(exc).lower():
                raise
    raise AssertionError("unreachable")


def _run_ranks(tmp_path: Path, store: str, world: int, source: str, extra: tuple[str, ...]) -> list[dict]:
    script = tmp_path / "rank_main.py"
    script.write_text(source)
    out = tmp_path / f"gathered-{world}.json"
    out.unlink(missing_ok=True)
    port = free_port()
    repo = str(Path(__file__).resolve().parents[1])
    path = os.pathsep.join([repo] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else []))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", PYTHONPATH=path)
    logs = [open(tmp_path / f"rank{r}.log", "w+") for r in range(world)]
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), store, str(out), str(port), str(r), str(world), str(EPOCHS), str(BS), str(SEED),
             *extra],
            stdout=logs[r], stderr=subprocess.STDOUT, env=env, cwd=str(tmp_path),
        )
        for r in range(world)
    ]
    deadline = time.monotonic() + RUN_TIMEOUT
    try:
        for p in procs:
            p.wait(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        pass
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    text = []
    for r, log in enumerate(logs):
        log.seek(0)
        text.append(f"--- rank {r} (exit {procs[r].returncode}) ---\n{log.read()[-3000:]}")
        log.close()
    report = "\n".join(text)
    assert all(p.returncode == 0 for p in procs), f"a rank failed or timed out:\n{report}"
    assert out.is_file(), report
    return json.loads(out.read_text())


@pytest.mark.parametrize("world", [2, 3])
def test_distributed_ranks_split_each_epoch_exactly_once(tmp_path, id_store, world):
    store = id_store(N, BLOCK_ROWS)
    gathered = run_ranks(tmp_path, store, world)
    assert [g["rank"] for g in gathered] == list(range(world))
    assert all(g["world_size"] == world for g in gathered)
    rank_rows = N // world
    nb = -(-rank_rows // BS)
    blocks_per_epoch = []
    for e in range(EPOCHS):
        ids = []
        blocks = []
        for g in gathered:
            ep = g["epochs"][e]
            assert ep["epoch"] == e  # epochs advance by themselves through the worker
            assert len(ep["batches"]) == g["len"] == nb  # the same batch count on every rank
            rank_ids = [i for b in ep["batches"] for i in b]
            assert len(rank_ids) == rank_rows
            ids += rank_ids
            blocks.append(frozenset(i // BLOCK_ROWS for i in rank_ids))
            # What the rank read is what its plan says, as a single process computes it.
            ref = ShardedDataset(store, BS, seed=SEED, rank=g["rank"], world_size=world)
            ref.set_epoch(e)
            want = [y.tolist() for _, y in ref]
            assert sorted(map(tuple, ep["batches"])) == sorted(map(tuple, want))
        arr = np.asarray(ids)
        assert len(np.unique(arr)) == len(arr) == N - N % world  # exactly once, at most world-1 dropped
        assert arr.min() >= 0 and arr.max() < N
        blocks_per_epoch.append(blocks)
    assert all(g["epoch_after"] == EPOCHS for g in gathered)
    # The block order changes between epochs, so ranks read different blocks.
    assert blocks_per_epoch[0] != blocks_per_epoch[1]


ELASTIC = textwrap.dedent(
    """
    import json, sys
    from datetime import timedelta

    import torch
    import torch.distributed as dist

    from shardset import ShardedDataset

    store, out, port, rank, world, _, bs, seed, states = sys.argv[1:]
    rank, world, bs, seed = int(rank), int(world), int(bs), int(seed)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
        timeout=timedelta(seconds=60),
    )
    try:
        ds = ShardedDataset(store, bs, seed=seed)
        if states == "-":  # the interrupted run: each rank takes a few batches, then checkpoints
            it = iter(ds)
            ids = [int(i) for _ in range(3 + 2 * rank) for i in next(it)[1]]
        else:  # the run that continues the epoch with another world size
            ds.load_state_dict(json.load(open(states)))
            ids = [int(i) for _, y in ds for i in y]
        mine = {"ids": ids, "states": ds.global_state_dict()}
        gathered = [None] * world
        dist.all_gather_object(gathered, mine)
        if rank == 0:
            with open(out, "w") as f:
                json.dump(gathered, f)
    finally:
        dist.destroy_process_group()
    """
)


def test_elastic_resume_across_real_process_groups(tmp_path, id_store):
    old, new = 2, 3
    store = id_store(N, BLOCK_ROWS)
    first = run_ranks(tmp_path, store, old, ELASTIC, "-")
    states = tmp_path / "states.json"
    states.write_text(json.dumps(first[0]["states"]))  # every rank's state, gathered over gloo
    second = run_ranks(tmp_path, store, new, ELASTIC, str(states))
    before = [i for g in first for i in g["ids"]]
    after = [g["ids"] for g in second]
    assert len({len(a) for a in after}) == 1  # every new rank took the same number of rows
    rows = np.asarray(before + [i for a in after for i in a])
    assert len(np.unique(rows)) == len(rows)  # no row twice
    assert N - len(rows) <= (old - 1) + (new - 1)  # only the ranks' remainders dropped
