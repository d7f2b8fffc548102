"""Mid-epoch resumption of :class:`shardset.ShardedDataset`.

A run is cut after ``k`` batches, its state saved, and a *fresh* dataset (and
loader) restored from that state: what it yields next must be bit for bit what
the uninterrupted run yielded after batch ``k``, and the epochs after that must
follow as before.  In the main process the dataset's own ``state_dict()`` is
used; with DataLoader workers, torchdata's ``StatefulDataLoader``.
"""

from __future__ import annotations

import itertools
import types
import unittest.mock

import pickle

import numpy as np
import pytest
import torch
from batches import same_batches

from shardset import ShardedDataset

StatefulDataLoader = pytest.importorskip("torchdata.stateful_dataloader").StatefulDataLoader

pytestmark = pytest.mark.filterwarnings("ignore:'set_vital' is deprecated:UserWarning")

N = 1009
BS = 16


def state_after(ds: ShardedDataset, k: int) -> dict:
    """Start a pass, take ``k`` batches, and return the dataset's state."""
    it = iter(ds)
    for _ in range(k):
        next(it)
    return ds.state_dict()


def block_boundary_cuts(ds: ShardedDataset) -> list[int]:
    """Batch counts ``k`` (0 < k < len) after which this rank's stream is exactly at a block boundary."""
    plan = ds.plan()
    base = plan.rank * plan.rank_rows
    offsets = {plan.offset(t) - base for t in range(plan.num_stages + 1)}
    return [k for k in range(1, plan.num_batches) if k * BS in offsets]


# -- main process: the dataset's own state_dict ----------------------------------------


@pytest.mark.parametrize("kw", [dict(), dict(rank=1, world_size=2)], ids=["ws1", "rank1of2"])
def test_resume_at_every_batch(id_store, kw):
    # 641 rows in blocks of 130 (the last one 121 rows), batch 16: most blocks end
    # inside a batch.
    path = id_store(641, 130)
    ref = list(ShardedDataset(path, BS, seed=7, **kw))
    ds = ShardedDataset(path, BS, seed=7, **kw)
    for k in range(len(ref) + 1):
        state = state_after(ds, k)
        ds.set_epoch(0)
        fresh = ShardedDataset(path, BS, seed=7, **kw)
        fresh.load_state_dict(state)
        assert same_batches(list(fresh), ref[k:]), k


def test_a_pass_that_delivered_every_batch_ends_its_epoch(id_store):
    """``islice(ds, len(ds))`` never asks for the batch after the last: the next pass
    still starts the next epoch (as a pass run to exhaustion does)."""
    path = id_store(641, 130)
    ds = ShardedDataset(path, BS, seed=7)
    passes = [list(itertools.islice(ds, len(ds))) for _ in range(3)]
    assert ds.state_dict()["epoch"] == 2
    for epoch, got in enumerate(passes):
        want = ShardedDataset(path, BS, seed=7)
        want.set_epoch(epoch)
        assert same_batches(got, list(want)), epoch


def test_set_epoch_of_the_resumed_epoch_keeps_its_place(id_store):
    """The DistributedSampler-style loop: load a checkpoint, then set_epoch(epoch)
    at the top of each epoch; the resumed epoch still starts where it stopped."""
    path = id_store(641, 130)
    ds = ShardedDataset(path, BS, seed=7)
    ds.set_epoch(2)
    ref = list(ds)
    ds.set_epoch(2)
    state = state_after(ds, 10)
    fresh = ShardedDataset(path, BS, seed=7)
    fresh.load_state_dict(state)
    fresh.set_epoch(2)
    assert same_batches(list(fresh), ref[10:])
    fresh.set_epoch(2)  # a second pass of the epoch starts over
    assert same_batches(list(fresh), ref)
CUTS = ["start", "first-batch", "mid-block", "block-boundary", "last-batch", "all-yielded", "whole-epoch", "into-next-epoch"]


@pytest.mark.parametrize("cut", CUTS)
@pytest.mark.parametrize(
    "kw",
    [dict(), dict(rank=1, world_size=3), dict(drop_last=True), dict(rank=2, world_size=3, drop_last=True, prefetch=0)],
    ids=["ws1", "rank1of3", "drop_last", "rank2of3-drop_last"],
)
def test_resume_at_cut_points(id_store, cut, kw):
    path = id_store(N, 64)  # 4 batches a block: cuts can fall exactly between blocks
    # A seed whose epoch 0 has a block boundary between two batches of this rank
    # (the short last block, once visited, shifts later boundaries off the batch grid).
    seed = next(s for s in range(3, 100) if block_boundary_cuts(ShardedDataset(path, BS, seed=s, **kw)))
    ref_ds = ShardedDataset(path, BS, seed=seed, **kw)
    ref = [list(ref_ds) for _ in range(3)]  # epochs 0, 1, 2
    nb = len(ref[0])
    ds = ShardedDataset(path, BS, seed=seed, **kw)
    boundaries = block_boundary_cuts(ds)
    if cut == "whole-epoch":
        list(ds)
        state, rest, after = ds.state_dict(), ref[1], ref[2]
    elif cut == "into-next-epoch":
        list(ds)
        state, rest, after = state_after(ds, 5), ref[1][5:], ref[2]
    else:
        k = {
            "start": 0,
            "first-batch": 1,
            "mid-block": 2,  # 32 of the first block's 64 rows
            "block-boundary": boundaries[len(boundaries) // 2] if boundaries else None,
            "last-batch": nb - 1,
            "all-yielded": nb,  # every batch out, the pass not finished yet
        }[cut]
        assert k is not None, "no block boundary falls between batches"
        state, rest, after = state_after(ds, k), ref[0][k:], ref[1]
    fresh = ShardedDataset(path, BS, seed=seed, **kw)
    fresh.load_state_dict(state)
    assert same_batches(list(fresh), rest)
    assert same_batches(list(fresh), after)  # and the epochs go on as before


def test_state_before_any_pass_and_after_set_epoch(id_store):
    path = id_store(N, 97)
    ds = ShardedDataset(path, BS, seed=1)
    fresh = ShardedDataset(path, BS, seed=1)
    fresh.load_state_dict(ds.state_dict())
    assert same_batches(list(fresh), list(ShardedDataset(path, BS, seed=1)))
    ds.set_epoch(4)
    fresh = ShardedDataset(path, BS, seed=1)
    fresh.load_state_dict(ds.state_dict())
    want = ShardedDataset(path, BS, seed=1)
    want.set_epoch(4)
    assert same_batches(list(fresh), list(want))


def test_state_dict_is_small(id_store):
    small = ShardedDataset(id_store(N, 97), BS, seed=1)
    big = ShardedDataset(id_store(128 * 256 - 37, 256, features=1), BS, seed=1)
    states = [small.state_dict(), state_after(small, 7), big.state_dict(), state_after(big, 1500)]
    for state in states:
        assert len(state) <= 16
        assert all(type(v) in (int, bool, type(None)) for v in state.values()), state
        assert len(pickle.dumps(state)) < 300
    assert {tuple(s) for s in states} == {tuple(states[0])}  # the same few keys whatever the size
    assert states[1] != states[0] and states[3] != states[2]


@pytest.mark.parametrize("change", [{"batch_size": BS + 1}, {"drop_last": True}, {"shuffle": False}])
def test_loading_a_state_of_another_stream_raises(id_store, change):
    path = id_store(N, 97)
    state = state_after(ShardedDataset(path, BS, seed=1), 3)
    other = ShardedDataset(path, change.pop("batch_size", BS), seed=1, **change)
    with pytest.raises(ValueError, match="another stream"):
        other.load_state_dict(state)


def test_loading_a_state_of_another_seed_raises(id_store):
    path = id_store(N, 97)
    state = state_after(ShardedDataset(path, BS, seed=1), 3)
    other = ShardedDataset(path, BS, seed=2)
    with pytest.raises(ValueError):
        other.load_state_dict(state)


# -- StatefulDataLoader ----------------------------------------------------------------------


def make_loader(path, num_workers, persistent=False, **kw):
    ds = ShardedDataset(path, BS, seed=5, **kw)
    extra = dict(timeout=60, persistent_workers=persistent) if num_workers else {}
    return StatefulDataLoader(ds, batch_size=None, num_workers=num_workers, **extra)


_REFERENCE: dict = {}


def reference(path, num_workers, **kw) -> list[list]:
    """Three uninterrupted epochs through one loader (cached per configuration)."""
    key = (path, num_workers, tuple(sorted(kw.items())))
    if key not in _REFERENCE:
        loader = make_loader(path, num_workers, **kw)
        _REFERENCE[key] = [list(loader) for _ in range(3)]
    return _REFERENCE[key]


@pytest.mark.filterwarnings("ignore:This DataLoader will create:UserWarning")
@pytest.mark.parametrize(
    "num_workers, persistent, cut, kw",
    [
        (2, False, 0, {}),
        (2, False, 5, {}),
        (2, False, 33, {}),
        (2, False, "last", {}),
        (2, False, "all-yielded", {}),
        (2, False, "whole-epoch", {}),
        (2, False, "into-next-epoch", {}),
        (2, True, 7, {}),
        (2, True, "whole-epoch", {}),
        (2, False, 9, dict(rank=1, world_size=2)),
        (3, False, 10, dict(rank=0, world_size=3, drop_last=True)),
        (0, False, 5, {}),
        (0, False, "whole-epoch", {}),
    ],
)
def test_stateful_dataloader_resume(id_store, num_workers, persistent, cut, kw):
    path = id_store(N, 97)
    ref = reference(path, num_workers, **kw)
    nb = len(ref[0])
    loader = make_loader(path, num_workers, persistent, **kw)
    if cut in ("whole-epoch", "into-next-epoch"):
        assert same_batches(list(loader), ref[0])
        k = 0 if cut == "whole-epoch" else 4
        it = iter(loader)
        for _ in range(k):
            next(it)
        rest, after = ref[1][k:], ref[2]
    else:
        k = {"last": nb - 1, "all-yielded": nb}.get(cut, cut)
        it = iter(loader)
        for _ in range(k):
            next(it)
        rest, after = ref[0][k:], ref[1]
    state = loader.state_dict()
    del it, loader
    resumed = make_loader(path, num_workers, persistent, **kw)
    resumed.load_state_dict(state)
    assert same_batches(list(resumed), rest)
    assert same_batches(list(resumed), after)


@pytest.mark.filterwarnings("ignore:This DataLoader will create:UserWarning")
def test_a_checkpoint_taken_at_an_epochs_end_continues_with_the_next_epoch(id_store):
    """Every worker's state then says its whole share was delivered. torchdata restores it
    into workers of an iterator it drops at once (the saved one had finished), beside
    those of the next epoch: they must not move the epoch back, which repeated epoch 0
    (or half of it) at random."""
    path = id_store(101, 7)  # small: the dropped iterator's workers finish at once
    ref = reference(path, 2)
    for _ in range(5):
        loader = make_loader(path, 2)
        assert same_batches(list(loader), ref[0])
        state = loader.state_dict()
        del loader
        resumed = make_loader(path, 2)
        resumed.load_state_dict(state)
        resumed.dataset.set_epoch(1)  # the training loop's next epoch
        assert same_batches(list(resumed), ref[1])


def test_a_loaded_state_is_saved_again_as_it_was_until_continued(id_store):
    path = id_store(N, 97)
    state = {**ShardedDataset(path, BS, seed=7).state_dict(), "epoch": 2, "batches": 3, "worker": 1, "workers": 2}
    ds = ShardedDataset(path, BS, seed=7)
    ds.load_state_dict(state)
    assert ds.state_dict() == state


def test_len_counts_an_epoch_resumed_from_one_state_whole(id_store):
    """As DataLoader and torchdata count a resumed epoch's batches from its start
    (torchdata restores its ``_num_yielded``), ``len`` stays the whole epoch."""
    path = id_store(N, 97)
    whole = len(ShardedDataset(path, BS, seed=7))
    ds = ShardedDataset(path, BS, seed=7)
    ds.load_state_dict(state_after(ShardedDataset(path, BS, seed=7), 5))
    assert len(ds) == whole
    assert len(list(ds)) == whole - 5
    assert len(ds) == whole  # the next epoch


# -- elastic: continue an epoch with another world size -------------------------------------


def _partial_run(path, world: int, taken: list[int], **kw) -> tuple[list[dict], np.ndarray]:
    """Each rank of a ``world``-rank run takes ``taken[rank]`` batches; returns the
    states of every rank and the rows delivered."""
    states, ids = [], []
    for rank in range(world):
        ds = ShardedDataset(path, BS, seed=3, rank=rank, world_size=world, **kw)
        it = iter(ds)
        ids += [next(it)[1].numpy() for _ in range(taken[rank])]
        states.append(ds.state_dict())
    return states, np.concatenate(ids) if ids else np.zeros(0, np.int64)


def _finish(path, states, world: int, batch_size: int = BS, **kw) -> list[np.ndarray]:
    """Continue from ``states`` with ``world`` ranks; the rows each rank delivers."""
    out = []
    for rank in range(world):
        ds = ShardedDataset(path, batch_size, seed=3, rank=rank, world_size=world, **kw)
        ds.load_state_dict(states)
        expected = len(ds)  # this epoch's remaining batches (the next epoch is whole again)
        batches = list(ds)
        assert len(batches) == expected and len(ds) == len(ShardedDataset(path, batch_size, rank=rank, world_size=world))
        out.append(np.concatenate([y.numpy() for _, y in batches]) if batches else np.zeros(0, np.int64))
    return out


@pytest.mark.parametrize("old, new, batch_size, window", [(2, 3, BS, 1), (3, 1, 10, 1), (2, 2, 7, 3), (1, 3, BS, 2)])
def test_elastic_resume_delivers_the_rest_once(id_store, old, new, batch_size, window):
    path = id_store(1009, 97)
    states, before = _partial_run(path, old, [5 + 7 * r for r in range(old)], window_blocks=window)
    after = _finish(path, states, new, batch_size, window_blocks=window)
    assert len({len(a) for a in after}) == 1  # every new rank takes the same rows (so batches)
    rows = np.concatenate([before, *after])
    assert len(np.unique(rows)) == len(rows)  # nothing twice
    assert 1009 - len(rows) <= (old - 1) + (new - 1)  # only the ranks' remainders are dropped
    assert set(after[0].tolist()).isdisjoint(before.tolist())


def test_elastic_resume_chains(id_store):
    path = id_store(1009, 97)
    states, first = _partial_run(path, 2, [9, 4])
    # a 3-rank run continues, takes a few batches each, and is interrupted again
    second, states2 = [], []
    for rank in range(3):
        ds = ShardedDataset(path, BS, seed=3, rank=rank, world_size=3)
        ds.load_state_dict(states)
        it = iter(ds)
        second += [next(it)[1].numpy() for _ in range(3 + rank)]
        states2.append(ds.state_dict())
    assert all(s["remaining"] for s in states2)
    third = _finish(path, states2, 2)
    rows = np.concatenate([first, *second, *third])
    assert len(np.unique(rows)) == len(rows) and 1009 - len(rows) <= 1 + 2 + 1


def test_elastic_resume_needs_every_consumer(id_store):
    path = id_store(1009, 97)
    states, _ = _partial_run(path, 3, [1, 2, 3])
    ds = ShardedDataset(path, BS, seed=3, rank=0, world_size=2)
    with pytest.raises(ValueError, match="consumers"):
        ds.load_state_dict(states[:2])
    with pytest.raises(ValueError, match="another stream"):
        ds.load_state_dict(states[0])  # one rank's state cannot continue a 2-rank run
    with pytest.raises(ValueError, match="seed"):
        ShardedDataset(path, BS, seed=4).load_state_dict(states)


@pytest.mark.filterwarnings("ignore:This DataLoader will create:UserWarning")
def test_a_state_continues_only_the_consumer_that_took_it(id_store):
    """A main-process state says nothing of how two workers split the rest: refused,
    rather than each worker skipping the same count (which lost rows)."""
    path = id_store(N, 97)
    ds = ShardedDataset(path, BS, seed=7)
    state = state_after(ds, 10)
    fresh = ShardedDataset(path, BS, seed=7)
    fresh.load_state_dict(state)
    with pytest.raises(ValueError, match="continues DataLoader worker 0 of 1, not worker"):
        list(torch.utils.data.DataLoader(fresh, batch_size=None, num_workers=2))
    with pytest.raises(ValueError, match="continues DataLoader worker 0 of 1, not worker 0 of 2"):
        info = types.SimpleNamespace(id=0, num_workers=2)  # as inside worker 0 of 2
        with unittest.mock.patch("shardset.dataset.get_worker_info", return_value=info):
            iter(fresh)
    assert same_batches(list(fresh), list(ShardedDataset(path, BS, seed=7))[10:])  # the refusal kept the state


def test_the_newest_pass_alone_moves_the_state(id_store):
    """Of two live iterators, or of a pass that set_epoch or load_state_dict reset, only
    the newest counts in state_dict; the older one goes on delivering (its rows are still
    its epoch's) and ends without touching the state (it crashed with a TypeError, or
    counted its batches into the new pass's)."""
    path = id_store(N, 97)
    ds = ShardedDataset(path, BS, seed=7)
    old = iter(ds)
    for _ in range(3):
        next(old)
    new = iter(ds)
    for _ in range(2):
        next(new)
    next(old)
    assert (ds.state_dict()["epoch"], ds.state_dict()["batches"]) == (0, 2)
    ds.set_epoch(3)
    next(new)
    assert (ds.state_dict()["epoch"], ds.state_dict()["batches"]) == (3, 0)
    list(old)
    assert (ds.state_dict()["epoch"], ds.state_dict()["batches"], ds.epoch) == (3, 0, 3)


def test_a_finished_pass_loaded_where_the_next_epoch_is_set_leaves_it_set(id_store):
    """A state whose consumer had delivered its whole share of epoch 0, loaded where epoch 1
    is already set, neither moves the epoch back nor keeps set_epoch(1) from starting it."""
    path = id_store(N, 97)
    ref = ShardedDataset(path, BS, seed=7)
    first, second = list(ref), list(ref)
    done = ShardedDataset(path, BS, seed=7)
    assert same_batches(list(itertools.islice(done, len(done))), first)
    state = done.state_dict()
    for again in (True, False):
        ds = ShardedDataset(path, BS, seed=7)
        ds.set_epoch(1)
        ds.load_state_dict(state)
        assert ds.epoch == 1
        if again:  # the training loop's set_epoch starts epoch 1
            ds.set_epoch(1)
        else:  # the loaded pass ends at once, and the next one is epoch 1
            assert list(ds) == []
        assert same_batches(list(ds), second)
