"""``O_DIRECT`` reads written once, run either on the calling thread or many at a
time from a single thread.

A read that bypasses the page cache is written as a *steps* generator: plain
code (open the file, check checksums, copy rows) that yields a
:class:`DirectRead` wherever it needs bytes from the disk and receives them
back.  Two drivers run the same generator:

* :func:`run_steps` performs each read at once on the calling thread (into
  that thread's scratch buffer);
* :class:`AsyncDirectReads` keeps the reads of many generators in flight
  together from one thread with Linux native AIO (``io_submit`` and
  ``io_getevents`` through ``ctypes``), and resumes each generator when its
  bytes arrive.

Why the second one: slices of a few MiB at random offsets keep a disk busy
only with about ten reads in flight.  As ten threads, each read also meant
ten Python threads trading the GIL for their checksum and copy work: about
10,500 context switches per GB, and more CPU for the same work than on one
thread (``docs/design.md`` has the measurements).

Example:
    >>> import os, tempfile
    >>> from shardset.direct_io import DirectRead, run_steps
    >>> path = os.path.join(tempfile.mkdtemp(), "f")
    >>> with open(path, "wb") as f:
    ...     _ = f.write(b"x" * 5000)
    >>> def first_bytes(fd):
    ...     got = yield DirectRead(fd, 0, 8192)  # fewer bytes at the end of the file
    ...     return len(got)
    >>> fd = os.open(path, os.O_RDONLY)
    >>> run_steps(first_bytes(fd))
    5000
    >>> os.close(fd)
"""

from __future__ import annotations

import collections
import ctypes
import errno
import functools
import os
import platform
import threading
from concurrent.futures import CancelledError, Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Generator, TypeVar

import numpy as np

from .memory import DIRECT_ALIGN, aligned_buffer

__all__ = ["AsyncDirectReads", "DirectRead", "Steps", "ThreadedSteps", "run_steps", "scratch_buffer"]

T = TypeVar("T")


@dataclass(frozen=True)
class DirectRead:
    """Read ``nbytes`` from ``offset`` of the file on ``fd`` (both multiples of
    :data:`~shardset.memory.DIRECT_ALIGN` for a file opened with ``O_DIRECT``) into
    ``into`` when given (aligned, at least ``nbytes``), else into a buffer of the
    driver's.  The generator receives the bytes read as a ``uint8`` array, fewer
    at the end of the file; a driver's own buffer stays valid until the generator
    yields again or returns.  A failed read is raised inside the generator."""

    fd: int
    offset: int
    nbytes: int
    into: np.ndarray | None = None


Steps = Generator[DirectRead, np.ndarray, T]


def _fill(fd: int, view: memoryview, offset: int) -> int:
    """Fill ``view`` from ``offset`` of the file on ``fd``; returns the bytes read
    (fewer at the end of the file: a read that returns nothing, or a length that is
    not a whole number of ``DIRECT_ALIGN`` blocks)."""
    got = 0
    while got < len(view):
        step = os.preadv(fd, [view[got:]], offset + got)
        got += step
        if step == 0 or got % DIRECT_ALIGN:
            break
    return got


def run_steps(steps: Steps[T]) -> T:
    """Run ``steps`` to its end on this thread, each read at once; returns its value."""
    try:
        request = next(steps)
        while True:
            try:
                buf = request.into if request.into is not None else scratch_buffer(request.nbytes)
                got = _fill(request.fd, memoryview(buf)[: request.nbytes], request.offset)
            except OSError as exc:
                request = steps.throw(exc)
            else:
                request = steps.send(buf[:got])
    except StopIteration as done:
        return done.value


def scratch_buffer(nbytes: int) -> np.ndarray:
    """This thread's reusable buffer of at least ``nbytes`` bytes, on huge pages: an
    ``O_DIRECT`` read into 4 KiB pages goes to the disk as requests of at most
    ``max_segments`` pages (about 1 MiB), into 2 MiB pages as requests of up to the
    disk's limit (see :func:`shardset.bench.direct_read`)."""
    scratch = getattr(_scratch, "buffer", None)
    if scratch is None or scratch.nbytes < nbytes:
        scratch = _scratch.buffer = aligned_buffer(nbytes)
    return scratch


_scratch = threading.local()


# -- Linux native AIO --------------------------------------------------------------------

_SYSCALLS = {"x86_64": (206, 207, 208, 209), "aarch64": (0, 1, 4, 2)}  # setup, destroy, getevents, submit
_IOCB_CMD_PREAD = 0


class _Iocb(ctypes.Structure):  # struct iocb of linux/aio_abi.h (little-endian 64-bit layout)
    _fields_ = [("data", ctypes.c_uint64), ("key", ctypes.c_uint32), ("rw_flags", ctypes.c_int32),
                ("opcode", ctypes.c_uint16), ("reqprio", ctypes.c_int16), ("fildes", ctypes.c_uint32),
                ("buf", ctypes.c_uint64), ("nbytes", ctypes.c_uint64), ("offset", ctypes.c_int64),
                ("reserved2", ctypes.c_uint64), ("flags", ctypes.c_uint32), ("resfd", ctypes.c_uint32)]


class _Event(ctypes.Structure):  # struct io_event
    _fields_ = [("data", ctypes.c_uint64), ("obj", ctypes.c_uint64), ("res", ctypes.c_int64),
                ("res2", ctypes.c_int64)]


@functools.lru_cache(maxsize=None)
def _syscall() -> Callable[..., int] | None:
    if platform.machine() not in _SYSCALLS or platform.system() != "Linux":
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None
    libc.syscall.restype = ctypes.c_long
    return libc.syscall


class _Context:
    """An AIO context of ``depth`` requests (``io_setup``); raises ``OSError`` where
    the kernel refuses one (no AIO in a sandbox, ``fs.aio-max-nr`` used up)."""

    def __init__(self, depth: int) -> None:
        self._syscall = _syscall()
        if self._syscall is None:
            raise OSError(errno.ENOSYS, "Linux native AIO is not available on this platform")
        self._setup, self._destroy, self._getevents, self._submit = _SYSCALLS[platform.machine()]
        self.handle = ctypes.c_ulong(0)
        self._call("io_setup", self._setup, depth, ctypes.byref(self.handle))
        self._events = (_Event * depth)()

    def _call(self, name: str, number: int, *args: Any) -> int:
        """The system call's result, retried when a signal interrupts it; ``OSError`` on failure."""
        while True:
            rc = self._syscall(number, *args)
            if rc >= 0:
                return rc
            err = ctypes.get_errno()
            if err != errno.EINTR:
                raise OSError(err, f"{name}: {os.strerror(err)}")

    def submit(self, iocb: _Iocb) -> None:
        self._call("io_submit", self._submit, self.handle, 1, (ctypes.POINTER(_Iocb) * 1)(ctypes.pointer(iocb)))

    def wait(self) -> list[tuple[int, int]]:
        """Block until at least one request completes: ``[(its data, its result)]``."""
        done = self._call("io_getevents", self._getevents, self.handle, 1, len(self._events), self._events, None)
        return [(e.data, e.res) for e in self._events[:done]]

    def close(self) -> None:
        self._syscall(self._destroy, self.handle)


@dataclass
class _Slot:
    """One generator in flight: its read, and the buffer of the driver's it reads into."""

    steps: Steps[Any]
    future: Future
    request: DirectRead | None = None
    got: int = 0  # bytes of it read so far
    held: np.ndarray | None = None  # the driver's buffer it reads into (or last read into)

    @property
    def buffer(self) -> np.ndarray:
        """Where the current read goes."""
        return self.request.into if self.request.into is not None else self.held


class AsyncDirectReads:
    """Run steps generators (see the module docstring) from one thread, with the reads
    of up to ``depth`` of them in flight at once through Linux native AIO.

    :meth:`submit` returns a ``Future`` of a generator's value; generators start in
    the order they were submitted, and all their code runs on this driver's thread
    (``shardset-aio``).  Raises ``OSError`` where the kernel has no AIO for this
    process (see :meth:`available`).  ``shutdown``
    waits for the reads in flight, whose buffers the kernel writes until they
    complete, and with ``cancel_futures`` closes the generators instead of
    resuming them.  Each generator reads one request at a time.
    """

    def __init__(self, depth: int) -> None:
        # One slot more than reads in flight: a read that completes frees its place for the
        # next generator before its own generator resumes and works on the bytes.
        self._depth = depth
        self._context = _Context(depth + 1)
        self._slots: list[_Slot | None] = [None] * (depth + 1)
        self._spare: list[np.ndarray] = []  # the driver's buffers no generator holds, for reads without ``into``
        self._iocbs = [_Iocb() for _ in range(depth + 1)]
        self._queue: collections.deque[tuple[Steps[Any], Future]] = collections.deque()
        self._cond = threading.Condition()
        self._closed = self._cancel = False
        self._thread = threading.Thread(target=self._run, name="shardset-aio", daemon=True)
        self._thread.start()

    @staticmethod
    @functools.cache
    def available() -> bool:
        """Whether this process can use Linux native AIO (tried once)."""
        try:
            _Context(1).close()
        except OSError:
            return False
        return True

    def submit(self, steps: Steps[T]) -> "Future[T]":
        future: Future = Future()
        with self._cond:
            if self._closed:
                raise RuntimeError("cannot submit to an AsyncDirectReads after shutdown")
            self._queue.append((steps, future))
            self._cond.notify()
        return future

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        with self._cond:
            self._closed = True
            if cancel_futures:
                self._cancel = True
                while self._queue:
                    steps, future = self._queue.popleft()
                    future.cancel()
                    steps.close()
            self._cond.notify()
        if wait:
            self._thread.join()

    # -- the driver's thread --------------------------------------------------------------

    def _run(self) -> None:
        try:
            while self._start_queued(wait=True, most=self._depth):
                if any(s is not None for s in self._slots):
                    for index, result in self._context.wait():
                        self._start_queued(wait=False, most=self._depth + 1)  # read on before working on these bytes
                        self._completed(index, result)
        except BaseException as exc:  # fail every generator rather than leave its future waiting
            with self._cond:
                self._closed = True
                pending = [f for _, f in self._queue] + [s.future for s in self._slots if s is not None]
                self._queue.clear()
            for future in pending:
                if not future.done():
                    future.set_exception(exc)
            raise
        finally:
            self._context.close()

    def _start_queued(self, wait: bool, most: int) -> bool:
        """Start queued generators on free slots, up to ``most`` running (first waiting, if
        ``wait``, for one to be submitted while none runs); False once shut down with
        nothing left."""
        with self._cond:
            while wait and not self._queue and not self._closed and all(s is None for s in self._slots):
                self._cond.wait()
            starts, running = [], sum(s is not None for s in self._slots)
            for index, slot in enumerate(self._slots):
                if slot is None and self._queue and not self._cancel and running < most:
                    starts.append((index, *self._queue.popleft()))
                    running += 1
            idle = self._closed and not self._queue and all(s is None for s in self._slots) and not starts
        for index, steps, future in starts:
            if future.set_running_or_notify_cancel():
                self._slots[index] = _Slot(steps, future)
                self._resume(index, None, None)
            else:
                steps.close()
        return not idle

    def _resume(self, index: int, value: np.ndarray | None, error: BaseException | None) -> None:
        """Resume slot ``index``'s generator until it has a read in flight or ends."""
        slot = self._slots[index]
        while True:
            try:
                request = slot.steps.throw(error) if error is not None else slot.steps.send(value)
            except StopIteration as done:
                self._release(index)
                slot.future.set_result(done.value)
                return
            except BaseException as exc:
                self._release(index)
                slot.future.set_exception(exc)
                return
            self._give_back(slot)  # the generator is done with its last read's bytes
            if request.into is None:
                self._take(slot, request.nbytes)
            slot.request, slot.got = request, 0
            try:
                self._submit(index, slot)
                return
            except OSError as exc:
                value, error = None, exc

    def _take(self, slot: _Slot, nbytes: int) -> None:
        """Give ``slot`` the smallest spare buffer of at least ``nbytes`` (a new one if none is)."""
        fits = [i for i, b in enumerate(self._spare) if b.nbytes >= nbytes]
        if fits:
            buffer = self._spare.pop(min(fits, key=lambda i: self._spare[i].nbytes))
        else:
            buffer = aligned_buffer(nbytes)
        slot.held = buffer

    def _give_back(self, slot: _Slot) -> None:
        if slot.held is not None:
            self._spare.append(slot.held)
            slot.held = None

    def _release(self, index: int) -> None:
        """Free slot ``index`` (its generator has ended or been closed)."""
        self._give_back(self._slots[index])
        self._slots[index] = None

    def _submit(self, index: int, slot: _Slot) -> None:
        request = slot.request
        iocb = self._iocbs[index]
        iocb.data, iocb.opcode, iocb.fildes = index, _IOCB_CMD_PREAD, request.fd
        iocb.buf = slot.buffer.ctypes.data + slot.got
        iocb.nbytes, iocb.offset = request.nbytes - slot.got, request.offset + slot.got
        self._context.submit(iocb)

    def _completed(self, index: int, result: int) -> None:
        slot = self._slots[index]
        if self._cancel:
            slot.steps.close()
            self._release(index)
            slot.future.cancel() or slot.future.set_exception(CancelledError())
            return
        if result < 0:
            self._resume(index, None, OSError(-result, os.strerror(-result)))
            return
        slot.got += result
        if result and slot.got < slot.request.nbytes and not slot.got % DIRECT_ALIGN:
            try:  # a short read short of the end of the file: read the rest
                self._submit(index, slot)
                return
            except OSError as exc:
                self._resume(index, None, exc)
                return
        self._resume(index, slot.buffer[: slot.got], None)


class ThreadedSteps:
    """Run steps generators on a pool of threads, each read at once (:func:`run_steps`):
    the interface of :class:`AsyncDirectReads`, for reads that have no use for it
    (whole blocks, remote stores, no AIO)."""

    def __init__(self, workers: int, **pool: Any) -> None:
        self._pool = ThreadPoolExecutor(workers, **pool)

    def submit(self, steps: Steps[T]) -> "Future[T]":
        return self._pool.submit(run_steps, steps)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        self._pool.shutdown(wait=wait, cancel_futures=cancel_futures)
