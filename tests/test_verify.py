"""Corruption is always detected: on read, by ``verify``, and ``verify --repair`` fixes it.

Injected faults, on real chunk files: a flipped bit, a truncated chunk, a
deleted chunk, a chunk with bytes appended (wrong size), and two chunks swapped
(each still passes its own checksum: only the deep audit can tell).  The last
tests check the reader's two ways around a bad or unfinished store:
``on_error="skip"`` and ``allow_incomplete=True``.
"""

import json
import random
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import shardset
from shardset import BlockStore, CorruptBlockError, ShardedDataset, StoreFormatError
from shardset.cli import main
from shardset.verify import verify

ROWS, FEATURES, BLOCK_ROWS = 6000, 3, 200  # 30 blocks
KINDS = ["flip", "truncate", "delete", "extend"]


def _chunk(path: Path, field: str, block: int) -> Path:
    return path / field / "c" / str(block) / "0"


def corrupt(path: Path, field: str, block: int, kind: str, rng: random.Random) -> None:
    f = _chunk(path, field, block)
    data = bytearray(f.read_bytes())
    if kind == "flip":
        bit = rng.randrange(len(data) * 8)
        data[bit // 8] ^= 1 << (bit % 8)
        f.write_bytes(bytes(data))
    elif kind == "truncate":
        f.write_bytes(bytes(data[: rng.randrange(len(data))]))
    elif kind == "delete":
        f.unlink()
    elif kind == "extend":
        f.write_bytes(bytes(data) + b"\0" * rng.randint(1, 64))
    else:
        raise ValueError(kind)


def _files(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    """Synthetic stores per codec chain (copied by each test before corrupting)."""
    root = tmp_path_factory.mktemp("pristine")
    made = {}
    for name, kw in {"crc": {}, "zstd": {"compression": "zstd"}, "plain": {"checksum": False}}.items():
        made[name] = root / f"{name}.zarr"
        shardset.generate_regression(made[name], rows=ROWS, features=FEATURES, block_rows=BLOCK_ROWS, seed=2,
                                     workers=1, progress=False, **kw)
    return made


def _copy(pristine, name, tmp_path) -> Path:
    dst = tmp_path / f"{name}.zarr"
    shutil.copytree(pristine[name], dst)
    return dst


@pytest.mark.parametrize("codecs", ["crc", "zstd"])
def test_every_injected_fault_is_detected_on_read_and_by_verify_then_repaired(pristine, tmp_path, codecs):
    path = _copy(pristine, codecs, tmp_path)
    rng = random.Random(codecs)
    blocks = rng.sample(range(ROWS // BLOCK_ROWS), 5 * len(KINDS))
    injected = {}
    for i, block in enumerate(blocks):  # every kind 5 times, on X and y
        kind, field = KINDS[i % len(KINDS)], "Xy"[i // len(KINDS) % 2]
        corrupt(path, field, block, kind, rng)
        injected[block] = (field, kind)

    store = BlockStore.open(path)
    for block, (field, kind) in injected.items():
        with pytest.raises(CorruptBlockError) as err:
            store.read_block(field, block)
        msg = str(err.value)
        assert f"block {block} of field '{field}'" in msg and f"{field}/c/{block}/0" in msg, msg
    with pytest.raises(CorruptBlockError):  # the reader stops; it never yields a corrupt block's rows
        for _ in ShardedDataset(path, batch_size=500, shuffle=False):
            pass

    report = verify(path, workers=2)
    assert {(f.block, f.field) for f in report.faults} == {(b, fk[0]) for b, fk in injected.items()}
    assert not report.ok and report.checksummed
    fixed = verify(path, repair=True, workers=2)
    assert fixed.repaired == sorted(injected) and fixed.ok
    assert verify(path, deep=True, workers=1).ok
    assert _files(path) == _files(pristine[codecs])


def test_without_checksums_sizes_are_still_checked_and_the_deep_audit_finds_flips(pristine, tmp_path):
    path = _copy(pristine, "plain", tmp_path)
    rng = random.Random(5)
    for block, kind in zip((3, 9, 17, 22), KINDS):
        corrupt(path, "X", block, kind, rng)
    shallow = verify(path, workers=1)
    assert {f.block for f in shallow.faults} == {9, 17, 22} and not shallow.checksummed
    assert "only presence and size" in shallow.summary()
    deep = verify(path, deep=True, workers=2)
    assert {f.block for f in deep.faults} == {3, 9, 17, 22}
    assert "differs from its regeneration in 1 of 200 rows" in next(f.problem for f in deep.faults if f.block == 3)
    assert verify(path, repair=True, deep=True, workers=1).ok
    assert _files(path) == _files(pristine["plain"])


def test_swapped_chunks_pass_their_own_checksums_but_not_the_slice_tables_or_the_deep_audit(pristine, tmp_path):
    path = _copy(pristine, "crc", tmp_path)
    a, b = _chunk(path, "y", 4), _chunk(path, "y", 11)
    da, db = a.read_bytes(), b.read_bytes()
    a.write_bytes(db)
    b.write_bytes(da)
    BlockStore.open(path).read_block("y", 4)  # each chunk's own crc32c still holds
    plain = verify(path, workers=1)  # but the slice checksums belong to the block
    assert [(f.block, f.field) for f in plain.faults] == [(4, "y"), (11, "y")]
    assert all("slice 0" in f.problem for f in plain.faults)
    deep = verify(path, deep=True, workers=1)
    assert [(f.block, f.field) for f in deep.faults] == [(4, "y"), (11, "y")]


def test_unrecorded_blocks_are_faults_and_repair_finishes_them(pristine, tmp_path):
    path = _copy(pristine, "crc", tmp_path)
    store = BlockStore.open(path, mode="r+")
    store.mark_incomplete([0, 29])
    _chunk(path, "X", 29).unlink()
    report = verify(path, workers=1)
    assert [f.block for f in report.faults] == [0, 29]
    assert "not recorded complete" in report.faults[0].problem
    assert verify(path, repair=True, workers=1).repaired == [0, 29]
    assert BlockStore.open(path).missing_blocks() == []
    assert _files(path) == _files(pristine["crc"])


def test_repair_clears_a_directory_where_a_chunk_should_be(pristine, tmp_path):
    """A directory in a chunk's place is a fault like any other: the repair removes it
    (the rewrite failed with "Is a directory" and left the block unrecorded)."""
    path = _copy(pristine, "crc", tmp_path)
    _chunk(path, "X", 3).unlink()
    (_chunk(path, "X", 3) / "junk").mkdir(parents=True)
    assert [f.block for f in verify(path, workers=1).faults] == [3]
    assert verify(path, repair=True, workers=1).repaired == [3]
    assert _files(path) == _files(pristine["crc"])


def test_deep_and_repair_need_a_generator(make_id_store):
    path = make_id_store(500, 100)
    assert verify(path, workers=1).ok
    for kw in ({"deep": True}, {"repair": True}):
        with pytest.raises(StoreFormatError, match="cannot be regenerated"):
            verify(path, **kw)


def test_a_changed_weights_array_is_refused_for_regeneration(pristine, tmp_path):
    path = _copy(pristine, "crc", tmp_path)
    import zarr

    zarr.open_group(str(path), mode="r+")["params/w"][0] = 123.0
    with pytest.raises(StoreFormatError, match="params/w does not match its recorded crc32c"):
        verify(path, deep=True)


def test_cli_verify_exit_codes_summary_and_json(pristine, tmp_path, capsys):
    path = _copy(pristine, "crc", tmp_path)
    assert main(["verify", str(path), "--quiet"]) == 0
    assert "OK: every block is present with the right size and checksum" in capsys.readouterr().out
    corrupt(path, "X", 7, "flip", random.Random(1))
    assert main(["verify", str(path), "--quiet", "--json", "--workers", "1"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] is False and [f["block"] for f in report["faults"]] == [7]
    assert main(["verify", str(path), "--deep", "--repair", "--quiet", "--workers", "1"]) == 0
    out = capsys.readouterr().out
    assert "fails its crc32c checksum" in out and "repaired 1 blocks: 7" in out and out.rstrip().endswith(
        "equal to its regeneration from (seed, block)")
    assert main(["verify", str(tmp_path / "nothing-here")]) == 2
    assert "not a shardset store" in capsys.readouterr().err


def test_verify_command_in_a_real_process_exits_1_on_a_fault(pristine, tmp_path):
    path = _copy(pristine, "crc", tmp_path)
    corrupt(path, "y", 2, "delete", random.Random(0))
    proc = subprocess.run([sys.executable, "-m", "shardset", "verify", str(path)], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 1 and "is missing" in proc.stdout and "FAULTY: 1 blocks still bad" in proc.stdout


def test_corrupt_blocks_never_read_as_fill_values_through_zarr(pristine, tmp_path):
    path = _copy(pristine, "zstd", tmp_path)
    _chunk(path, "X", 5).unlink()
    store = BlockStore.open(path)
    with pytest.raises(CorruptBlockError, match=r"block 5 of field 'X' .* is missing"):
        store.read_block("X", 5)
    good = store.read_block("X", 6)
    assert np.isfinite(good).all()


def test_on_error_skip_warns_and_keeps_batch_counts_equal_on_every_rank(pristine, tmp_path):
    path = _copy(pristine, "crc", tmp_path)
    corrupt(path, "X", 4, "flip", random.Random(3))
    seen = []
    with pytest.warns(RuntimeWarning, match="skipping block 4"):
        for rank in range(2):
            ds = ShardedDataset(path, 128, rank=rank, world_size=2, on_error="skip")
            batches = list(ds)
            assert len(batches) == len(ds)
            seen.append(sum(len(X) for X, _ in batches))
            assert all(torch.isfinite(X).all() for X, _ in batches)
    assert seen[0] == seen[1] == ROWS // 2


def test_allow_incomplete_streams_only_the_finished_blocks(make_id_store):
    path = make_id_store(1000, 100)
    BlockStore.open(path, mode="r+").mark_incomplete([3, 7])
    with pytest.raises(shardset.IncompleteStoreError, match=r"2 of 10 blocks missing \(3, 7\)"):
        ShardedDataset(path, 64)
    ids = np.concatenate([y.numpy() for _, y in ShardedDataset(path, 64, allow_incomplete=True)])
    want = np.setdiff1d(np.arange(1000), np.r_[300:400, 700:800])
    assert np.array_equal(np.sort(ids), want)
