"""Steps generators and their two drivers (shardset.direct_io): ``run_steps`` on the
calling thread and ``AsyncDirectReads`` (Linux native AIO), on real files read with
``O_DIRECT`` where the file system allows it."""

from __future__ import annotations

import errno
import os
import threading
from concurrent.futures import CancelledError

import numpy as np
import pytest

from shardset.direct_io import AsyncDirectReads, DirectRead, ThreadedSteps, run_steps
from shardset.memory import DIRECT_ALIGN, aligned_buffer

needs_aio = pytest.mark.skipif(not AsyncDirectReads.available(), reason="no Linux native AIO here")
SIZE = 3 * 2**20 + 1000  # not a whole number of 4 KiB blocks: the last read is short


@pytest.fixture
def data_file(tmp_path):
    data = np.random.default_rng(0).integers(0, 256, SIZE, dtype=np.uint8)
    path = tmp_path / "data.bin"
    data.tofile(path)
    return path, data


def _open(path) -> int:
    fd = os.open(path, os.O_RDONLY)
    try:
        import fcntl

        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) | os.O_DIRECT)
    except OSError:  # no direct I/O on this file system: the same reads, through the cache
        pass
    return fd


def read_ranges(path, ranges, into=None):
    """Steps: the bytes of each aligned ``(offset, nbytes)`` range, one read at a time."""
    fd = _open(path)
    try:
        out = []
        for offset, nbytes in ranges:
            got = yield DirectRead(fd, offset, nbytes, into)
            out.append(got.tobytes())  # a driver's buffer lasts until the next read
        return out
    finally:
        os.close(fd)


def _ranges(seed: int, count: int = 5) -> list[tuple[int, int]]:
    rng = np.random.default_rng(seed)
    blocks = SIZE // DIRECT_ALIGN
    out = [(int(rng.integers(0, blocks)) * DIRECT_ALIGN, int(rng.integers(1, 64)) * DIRECT_ALIGN) for _ in range(count)]
    return out + [(blocks * DIRECT_ALIGN - DIRECT_ALIGN, 4 * DIRECT_ALIGN)]  # runs past the end of the file


def _expected(data, ranges):
    return [data[o : o + n].tobytes() for o, n in ranges]


def test_run_steps_reads_into_a_scratch_or_a_given_buffer(data_file):
    path, data = data_file
    ranges = _ranges(1)
    assert run_steps(read_ranges(path, ranges)) == _expected(data, ranges)
    into = aligned_buffer(64 * DIRECT_ALIGN)
    assert run_steps(read_ranges(path, ranges, into)) == _expected(data, ranges)
    assert run_steps(iter_value(7)) == 7


def iter_value(value):
    """Steps that read nothing."""
    return value
    yield  # noqa: unreachable; makes this a generator


@needs_aio
@pytest.mark.parametrize("depth", [1, 3, 16])
def test_async_reads_give_each_generator_its_bytes(data_file, depth):
    path, data = data_file
    reads = AsyncDirectReads(depth)
    try:
        jobs = [(_ranges(seed), reads.submit(read_ranges(path, _ranges(seed)))) for seed in range(24)]
        jobs.append(([], reads.submit(iter_value([]))))
        for ranges, future in jobs:
            assert future.result(timeout=60) == _expected(data, ranges)
    finally:
        reads.shutdown()


@needs_aio
def test_read_errors_are_raised_inside_the_generator(data_file, tmp_path):
    path, _ = data_file
    fd = os.open(tmp_path / "w.bin", os.O_WRONLY | os.O_CREAT)  # reading it fails with EBADF

    def caught():
        try:
            yield DirectRead(fd, 0, DIRECT_ALIGN)
        except OSError as exc:
            return exc.errno

    def uncaught():
        yield DirectRead(fd, 0, DIRECT_ALIGN)

    def broken():
        raise ValueError("before any read")
        yield  # noqa: unreachable

    reads = AsyncDirectReads(2)
    try:
        assert reads.submit(caught()).result(timeout=60) == errno.EBADF
        with pytest.raises(OSError) as info:
            reads.submit(uncaught()).result(timeout=60)
        assert info.value.errno == errno.EBADF
        with pytest.raises(ValueError, match="before any read"):
            reads.submit(broken()).result(timeout=60)
        assert reads.submit(read_ranges(path, [(0, DIRECT_ALIGN)])).result(timeout=60)  # still working
    finally:
        reads.shutdown()
        os.close(fd)


@needs_aio
def test_shutdown_cancels_what_has_not_started_and_closes_what_has(data_file):
    path, _ = data_file
    closed = []

    def slow(i):
        fd = _open(path)
        try:
            for k in range(50):
                yield DirectRead(fd, (k % 8) * DIRECT_ALIGN, DIRECT_ALIGN)
            return i
        finally:
            os.close(fd)
            closed.append(i)

    reads = AsyncDirectReads(2)
    futures = [reads.submit(slow(i)) for i in range(20)]
    reads.shutdown(wait=True, cancel_futures=True)
    assert all(f.done() for f in futures)
    started = [i for i, f in enumerate(futures) if not f.cancelled()]
    assert sorted(closed) == started  # every started generator ran its finally: no fd leaks
    assert any(f.cancelled() for f in futures)
    for i in started:  # finished, or closed at a read when the driver shut down
        exc = futures[i].exception()
        assert isinstance(exc, CancelledError) if exc is not None else futures[i].result() == i
    with pytest.raises(RuntimeError, match="after shutdown"):
        reads.submit(iter_value(1))


def test_threaded_steps_run_the_same_generators(data_file):
    path, data = data_file
    pool = ThreadedSteps(3)
    try:
        futures = {seed: pool.submit(read_ranges(path, _ranges(seed))) for seed in range(8)}
        for seed, future in futures.items():
            assert future.result(timeout=60) == _expected(data, _ranges(seed))
    finally:
        pool.shutdown()


@needs_aio
def test_generators_run_on_the_driver_thread(data_file):
    path, _ = data_file

    def where():
        fd = _open(path)
        try:
            yield DirectRead(fd, 0, DIRECT_ALIGN)
            return threading.current_thread().name
        finally:
            os.close(fd)

    reads = AsyncDirectReads(2)
    try:
        assert reads.submit(where()).result(timeout=60) == "shardset-aio"
    finally:
        reads.shutdown()
