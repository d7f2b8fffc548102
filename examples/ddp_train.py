"""Train the regression with DistributedDataParallel, one process per rank, through ShardedDataset.

Run it with torchrun, on one machine or many (gloo on CPUs; nccl works the same on GPUs),
or on this machine alone with ``--nproc N`` (forked ranks, no launcher):

    shardset generate data/reg.zarr --rows 1000000 --features 16
    torchrun --standalone --nproc_per_node 2 examples/ddp_train.py data/reg.zarr --epochs 2
    python examples/ddp_train.py data/reg.zarr --nproc 2
    # K machines, the same command on each (c10d rendezvous; torchrun's default static
    # rendezvous would make every machine node rank 0):
    torchrun --nnodes K --nproc_per_node 8 --rdzv_backend c10d --rdzv_endpoint HOST:29400 --rdzv_id JOB examples/ddp_train.py s3://bucket/reg.zarr

Every rank builds the same ``ShardedDataset``; its rank and world size come from
the process group, so each epoch's rows are split exactly once across ranks and
every rank takes the same number of steps (DDP needs that: a rank with one step
more would wait forever in its all-reduce).  ``--record DIR`` saves the rows
each rank saw in each epoch (``rank{r}-epoch{e}.npy``) and a JSON summary, so a
test can check the split independently.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import socket
import traceback
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from shardset import BlockStore, ShardedDataset, true_parameters


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("path", help="store path or URL (s3://...: credentials from the environment)")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=64, help="rows per step on each rank")
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--record", default=None, help="directory for the rows each rank saw and a summary")
    p.add_argument("--nproc", type=int, default=None, help="start this many ranks here (default: run under torchrun)")
    args = p.parse_args()
    if args.nproc is None:
        dist.init_process_group("gloo", timeout=timedelta(seconds=120))  # rank, world, address from torchrun's env
        train(args)
    else:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        method = "fork" if "fork" in torch.multiprocessing.get_all_start_methods() else "spawn"
        importlib.import_module("torch._dynamo")  # DDP imports it lazily (seconds): once here, not in every rank
        torch.multiprocessing.start_processes(_rank_main, (args, port), nprocs=args.nproc, start_method=method)


def _rank_main(rank: int, args: argparse.Namespace, port: int) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=args.nproc,
                            timeout=timedelta(seconds=120))
    train(args)


def train(args: argparse.Namespace) -> None:
    """Train on this rank in the initialized process group, then destroy the group."""
    torch.set_num_threads(1)
    try:
        _train(args)
    except BaseException as err:
        traceback.clear_frames(err.__traceback__)  # they hold the model: let it go before the group
        raise
    finally:
        _destroy_group()


def _destroy_group() -> None:
    """Destroy the default group so that its last reference goes without holding the GIL.

    The DDP model's reducer holds the group too.  Were the reducer the last to let
    go, gloo's destructor would join its worker threads while holding the GIL, and a
    worker still freeing the tensors of a finished collective (``all_gather_object``'s)
    needs the GIL for that: deadlock (pytorch/pytorch#56297).  So the model is gone
    by now, and the last reference is our Python handle, whose release drops the GIL.
    """
    group = dist.group.WORLD
    dist.destroy_process_group()
    del group


def _train(args: argparse.Namespace) -> None:
    """The training loop of one rank; the model lives only while this runs."""
    rank, world = dist.get_rank(), dist.get_world_size()
    ds = ShardedDataset(args.path, args.batch_size, seed=args.seed, fields=["X", "y"])
    loader = torch.utils.data.DataLoader(ds, batch_size=None)
    torch.manual_seed(args.seed)
    model = DistributedDataParallel(torch.nn.Linear(ds.layout.fields["X"].shape[0], 1))
    opt = torch.optim.SGD(model.parameters(), lr=args.lr)
    steps = []
    for epoch in range(args.epochs):
        ds.set_epoch(epoch)
        seen, n = [], 0
        for X, y in loader:
            loss = torch.nn.functional.mse_loss(model(X), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()  # DDP averages the gradients of all ranks here
            opt.step()
            n += 1
            if args.record:
                seen.append(X.numpy())
        steps.append(n)
        if args.record:
            np.save(os.path.join(args.record, f"rank{rank}-epoch{epoch}.npy"), np.concatenate(seen))
        if rank == 0:
            print(f"epoch {epoch}: {n} steps per rank on {world} ranks, last loss {loss.item():.6f}", flush=True)
    all_steps = [None] * world
    dist.all_gather_object(all_steps, steps)
    if rank == 0:
        w = model.module.weight.detach().numpy().reshape(-1)
        b = float(model.module.bias.detach())
        truth = true_parameters(BlockStore.open(args.path))
        print(f"recovered w {np.round(w, 4)}, b {b:.4f}" + ("" if truth is None else
              f"; true w {np.round(truth[0], 4)}, b {truth[1]:.4f}"), flush=True)
        if args.record:
            with open(os.path.join(args.record, "summary.json"), "w") as f:
                json.dump({"world_size": world, "steps": all_steps, "w": w.tolist(), "b": b}, f)


if __name__ == "__main__":
    main()
