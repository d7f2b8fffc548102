"""Crash safety: ``shardset generate`` killed with SIGKILL again and again, then finished.

Each kill hits a real ``python -m shardset generate`` process group (the command
and its forked writer processes: a machine that dies takes them all).  Most kills
land at a random moment of the write; the targeted ones run the same command
under a profile hook that sends SIGKILL at an exact point: half way through a
chunk file, before a chunk's rename, with the attributes' temporary file written
but not renamed, between that rename and its fsync, and inside the lock file's
update.  After every kill the same command is run again; the final store must
equal, file for file, a store written without interruption, with no temporary
file or lock left and ``info`` reporting it complete.

The same file covers the other ways a write ends early: disk full and I/O
errors (injected at the OS call under the durable write, and a real full tmpfs
where one can be mounted), and a second writer while the first is alive.

``SHARDSET_CRASH_KILLS=20`` raises the number of kills (default 10: every run
pays for importing torch, seconds on a busy 2-core machine).
"""

import contextlib
import errno
import json
import multiprocessing
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

import pytest

import shardset
from shardset import BlockStore, IncompleteStoreError, ShardedDataset
from shardset.cli import main
from shardset.errors import StoreLockedError
from shardset.lock import LOCK_SUFFIX, Owner, WriterLock

ARGS = ["--rows", "48000", "--features", "4", "--block-rows", "400", "--seed", "3", "--workers", "2", "--quiet"]
KILLS = int(os.environ.get("SHARDSET_CRASH_KILLS", "10"))

# Runs the real CLI in-process after arming a profile hook that SIGKILLs the whole
# process group at the n-th matching event (in any thread, and in forked writers).
HOOK = r"""
import os, signal, sys, threading
point, nth = sys.argv[1], int(sys.argv[2])
from shardset.cli import main
seen = 0

def caller(frame, depth):
    for _ in range(depth):
        frame = frame.f_back if frame is not None else None
    return frame.f_code.co_name if frame is not None else ""

def matches(frame, event, arg):
    if point == "chunk-written":   # the chunk's bytes are in its .partial file, not yet fsynced
        return event == "c_return" and arg is os.writev
    if point == "chunk-rename":    # fsynced .partial, not yet renamed over the chunk
        return event == "c_call" and arg is os.replace and frame.f_code.co_name == "_write_file"
    if point == "attrs-written":   # zarr.json's temporary file written, not renamed
        return event == "c_call" and arg is os.replace and caller(frame, 1) == "_atomic_write"
    if point == "attrs-fsync":     # zarr.json renamed, not yet fsynced
        return event == "c_call" and arg is os.fsync and caller(frame, 1) == "_sync_metadata"
    if point == "lock-file":       # the lock file truncated, its owner list not yet written (use nth=1)
        return event == "c_call" and arg is os.pwrite
    raise SystemExit(f"unknown kill point {point}")

def hook(frame, event, arg):
    global seen
    if matches(frame, event, arg):
        seen += 1
        if seen == nth:
            os.killpg(0, signal.SIGKILL)

threading.setprofile(hook)
sys.setprofile(hook)
sys.exit(main(sys.argv[3:]))
"""
TARGETED = ["chunk-written", "chunk-rename", "attrs-written", "attrs-fsync", "lock-file"]


def _digest(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def _start(cmd: list[str]) -> subprocess.Popen:
    return subprocess.Popen(cmd, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _killed(proc: subprocess.Popen) -> bool:
    """SIGKILL the command's process group; False if it had already finished."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()
    return proc.returncode == -signal.SIGKILL


def _wait_for_lock(path: Path, proc: subprocess.Popen, timeout: float = 120) -> float:
    """Wait until ``proc`` holds the writer lock (it has imported everything and starts
    writing); returns when that was seen, or the time its wait ended."""
    lock, deadline = Path(str(path) + LOCK_SUFFIX), time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if any(o["pid"] == proc.pid for o in json.loads(lock.read_text())["owners"]):
                break
        except (OSError, ValueError, KeyError):
            pass
        time.sleep(0.002)
    return time.monotonic()


def _evidence(path: Path) -> tuple[int, int]:
    """(chunk temporaries, metadata temporaries) a kill left behind."""
    partials = list(path.rglob("*.partial")) if path.exists() else []
    meta = sum(1 for p in partials if p.name.startswith("zarr"))
    return len(partials) - meta, meta


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> tuple[Path, float]:
    """The store written without interruption (in-process), and how long the write took."""
    path = tmp_path_factory.mktemp("reference") / "ref.zarr"
    start = time.monotonic()
    assert main(["generate", str(path), *ARGS]) == 0
    return path, time.monotonic() - start


def test_sigkill_at_random_and_targeted_moments_then_rerun_is_bit_identical(tmp_path, reference):
    path, (ref, write_time) = tmp_path / "s.zarr", reference
    cli = [sys.executable, "-m", "shardset", "generate"]

    rng = random.Random(20261127)
    plan = [("targeted", p) for p in TARGETED] + [("random", None)] * max(0, KILLS - len(TARGETED))
    rng.shuffle(plan)
    kills, chunk_temps, meta_temps, refused = 0, 0, 0, 0
    for kind, point in plan:
        if kind == "targeted":
            nth = 1 if point == "lock-file" else rng.randint(1, 3)
            proc = _start([sys.executable, "-c", HOOK, point, str(nth), "generate", str(path), *ARGS])
            proc.wait(timeout=300)
            landed = proc.returncode == -signal.SIGKILL
        else:
            proc = _start([*cli, str(path), *ARGS])
            _wait_for_lock(path, proc)
            time.sleep(rng.uniform(0, write_time / KILLS))  # spread the kills over the write
            landed = _killed(proc)
        kills += landed
        c, m = _evidence(path)
        chunk_temps, meta_temps = chunk_temps + (c > 0), meta_temps + (m > 0)
        try:
            missing = BlockStore.open(path).missing_blocks()
        except Exception:  # killed before the store's metadata existed
            continue
        if missing:  # the reader refuses an unfinished store and names what is missing
            with pytest.raises(IncompleteStoreError, match=rf"{len(missing)} of \d+ blocks missing \({missing[0]}\b"):
                ShardedDataset(path, batch_size=64)
            refused += 1

    final = subprocess.run([*cli, str(path), *ARGS], capture_output=True, text=True, timeout=300)
    assert final.returncode == 0, final.stderr
    assert kills == len(plan), f"only {kills} of {len(plan)} kills landed before the command finished"
    assert not list(path.rglob("*.partial")) and not Path(str(path) + LOCK_SUFFIX).exists()
    info = json.loads(subprocess.run([*cli[:-1], "info", str(path), "--json"], capture_output=True, text=True).stdout)
    assert info["complete"] is True and info["missing_blocks"] == []
    assert _digest(path) == _digest(ref)
    print(f"\n{kills}/{len(plan)} SIGKILLs landed ({len(TARGETED)} targeted); temporaries left by "
          f"{chunk_temps} kills in chunk writes and {meta_temps} in metadata updates; the reader refused "
          f"{refused} incomplete stores; final store bit-identical to an uninterrupted run")


# -- disk full and I/O errors -----------------------------------------------------


def _failing(real, code: int, after: int):
    """``real``, but raising ``OSError(code)`` from its ``after + 1``-th call on (per process)."""
    calls = [0]

    def call(*args, **kwargs):
        calls[0] += 1
        if calls[0] > after:
            raise OSError(code, os.strerror(code))
        return real(*args, **kwargs)

    return call


@pytest.mark.parametrize("call,code,workers", [("writev", errno.ENOSPC, "2"), ("fsync", errno.EIO, "1")])
def test_disk_full_or_io_error_fails_in_one_line_and_the_rerun_finishes_identically(
    tmp_path, reference, monkeypatch, capsys, call, code, workers
):
    path = tmp_path / "s.zarr"
    args = ["generate", str(path), *ARGS[:-3], "--workers", workers, "--quiet"]
    with monkeypatch.context() as m:  # the OS call under the writer's durable write starts failing
        m.setattr(os, call, _failing(getattr(os, call), code, after=40))
        assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and os.strerror(code) in err[0] and "rerun to resume" in err[0], err
    store = BlockStore.open(path)
    assert 0 < len(store.missing_blocks()) < store.layout.num_blocks
    assert not list(path.rglob("*.partial"))
    assert main(args) == 0
    assert _digest(path) == _digest(reference[0])


def test_a_real_full_filesystem(tmp_path, reference):
    """A 600 KiB tmpfs in a private mount namespace fills up half way; after growing it the rerun completes."""
    if shutil.which("unshare") is None or subprocess.run(
        ["unshare", "-rm", "sh", "-c", f"mount -t tmpfs -o size=64k tmpfs {tmp_path}"], capture_output=True
    ).returncode:
        pytest.skip("cannot mount a tmpfs in a user namespace here")
    mnt, out = tmp_path / "mnt", tmp_path / "out"
    mnt.mkdir()
    gen = f"{sys.executable} -m shardset generate {mnt}/s.zarr {' '.join(ARGS)}"
    script = (f"mount -t tmpfs -o size=600k tmpfs {mnt} && {{ {gen} 2>{tmp_path}/err; echo $? > {tmp_path}/rc1; }} && "
              f"mount -o remount,size=64m {mnt} && {gen} && cp -a {mnt}/s.zarr {out}")
    proc = subprocess.run(["unshare", "-rm", "sh", "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    err = (tmp_path / "err").read_text().strip().splitlines()
    assert (tmp_path / "rc1").read_text().strip() == "2"
    assert len(err) == 1 and "No space left on device" in err[0] and "rerun to resume" in err[0], err
    assert _digest(out) == _digest(reference[0])


# -- concurrent writers -------------------------------------------------------------


def _hold(path, part, ready, done) -> None:
    with WriterLock(path, part):
        ready.set()
        done.wait(60)


@contextlib.contextmanager
def _held_elsewhere(path, part=None):
    """Another live process holds the writer lock of ``path`` (as ``part``)."""
    ctx = multiprocessing.get_context("fork")
    ready, done = ctx.Event(), ctx.Event()
    proc = ctx.Process(target=_hold, args=(str(path), part, ready, done))
    proc.start()
    assert ready.wait(60)
    try:
        yield proc
    finally:
        done.set()
        proc.join()


def test_a_second_writer_is_refused_while_the_first_lives(tmp_path, capsys):
    path = tmp_path / "s.zarr"
    with _held_elsewhere(path) as owner:
        with pytest.raises(StoreLockedError, match=rf"being written by process {owner.pid} on {socket.gethostname()}"):
            shardset.generate_regression(path, rows=100, features=2, block_rows=10, workers=1)
        assert main(["generate", str(path), "--rows", "100", "--features", "2", "--quiet"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and f"process {owner.pid}" in err[0] and ".lock if that process is gone" in err[0]
        assert not path.exists()  # refused before touching anything
    shardset.generate_regression(path, rows=100, features=2, block_rows=10, workers=1)
    assert not Path(str(path) + LOCK_SUFFIX).exists()


def test_a_stale_lock_is_recovered(tmp_path):
    path = tmp_path / "s.zarr"
    ctx = multiprocessing.get_context("fork")
    ready, never = ctx.Event(), ctx.Event()
    proc = ctx.Process(target=_hold, args=(str(path), None, ready, never))
    proc.start()
    assert ready.wait(60)
    os.kill(proc.pid, signal.SIGKILL)
    proc.join()
    assert Path(str(path) + LOCK_SUFFIX).exists()
    store = shardset.generate_regression(path, rows=100, features=2, block_rows=10, workers=1)
    assert store.missing_blocks() == [] and not Path(str(path) + LOCK_SUFFIX).exists()


def test_a_writer_through_a_symlink_meets_the_lock_of_the_real_path(tmp_path):
    path, link = tmp_path / "real.zarr", tmp_path / "link.zarr"
    path.mkdir()
    link.symlink_to(path)
    with _held_elsewhere(path), pytest.raises(StoreLockedError, match="is being written by"):
        shardset.generate_regression(link, rows=100, features=2, block_rows=10, workers=1, progress=False)


def test_an_owner_on_another_host_or_a_reused_pid(tmp_path):
    path = tmp_path / "s.zarr"
    lock = Path(str(path) + LOCK_SUFFIX)
    me = Owner.me(None)
    lock.write_text(json.dumps({"owners": [dict(asdict(me), host="elsewhere", pid=1)]}))
    with pytest.raises(StoreLockedError, match=rf"process 1 on elsewhere .*delete {lock}"):
        shardset.generate_regression(path, rows=100, features=2, block_rows=10, workers=1)
    lock.write_text(json.dumps({"owners": [dict(asdict(me), start=(me.start or 0) + 1)]}))  # our pid, not our process
    shardset.generate_regression(path, rows=100, features=2, block_rows=10, workers=1)
    assert not lock.exists()


def _write_part(path: str, part: tuple[int, int]) -> None:
    shardset.generate_regression(path, rows=48000, features=4, block_rows=400, seed=3, workers=1, part=part)


def test_two_processes_split_the_blocks_without_losing_records(tmp_path, reference, capsys):
    path = tmp_path / "s.zarr"
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_write_part, args=(str(path), (i, 2))) for i in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(300)
    assert [p.exitcode for p in procs] == [0, 0]
    assert BlockStore.open(path).missing_blocks() == []  # both parts' completion records merged
    assert _digest(path) == _digest(reference[0])


def test_parts_admit_only_their_partners(tmp_path, capsys):
    path = tmp_path / "s.zarr"
    kw = dict(rows=100, features=2, block_rows=10, workers=1)
    with _held_elsewhere(path, (0, 2)):
        for part in (None, (0, 2), (1, 3)):
            with pytest.raises(StoreLockedError, match="as part 0/2"):
                shardset.generate_regression(path, part=part, **kw)
        store = shardset.generate_regression(path, part=(1, 2), **kw)
        assert store.missing_blocks() == [0, 2, 4, 6, 8]
    assert main(["generate", str(path), "--rows", "100", "--features", "2", "--block-rows", "10", "--part", "0/2",
                 "--quiet"]) == 0
    assert BlockStore.open(path).missing_blocks() == []
    with pytest.raises(ValueError, match="overwrite cannot be combined with part"):
        shardset.generate_regression(path, part=(0, 2), overwrite=True, **kw)


def test_killed_before_the_first_metadata_file_the_directory_is_recreated(tmp_path, reference):
    """A kill between creating the store directory and renaming its first zarr.json
    leaves a directory holding only zarr's temporary file; the rerun starts over."""
    path = tmp_path / "s.zarr"
    path.mkdir()
    (path / "zarr.0123456789abcdef0123456789abcdef.partial").write_bytes(b'{"zarr_format": 3, "node_t')
    assert main(["generate", str(path), *ARGS]) == 0
    assert _digest(path) == _digest(reference[0])
