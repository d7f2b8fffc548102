"""One writer per store: a lock file naming its owners, with stale-lock recovery.

A writer registers itself in ``<store>.lock``, a JSON file next to the store
(not inside it, so it exists before the store does and survives ``overwrite``):
process id, host, boot id, the process's start time and the ``part`` it writes.  A second writer is refused with a message naming the live
owner, unless both were told to split the blocks (``part=(i, k)`` with the same
``k`` and different ``i``).  An owner on this host whose process is gone (or
whose pid now belongs to another process, or which ran before the last reboot)
is stale and is dropped; an owner on another host cannot be checked, so the
refusal says which file to delete once that writer is known to be gone.

Every read-modify-write of the lock file happens under ``flock`` on it, and
:meth:`WriterLock.mutex` offers the same ``flock`` to cooperating writers for
their own short critical sections (creating the store, merging completion
records), so two part writers never lose each other's updates.

An object store (``s3://``, ``gs://``, ``az://``) has no ``flock``: there the
lock is the object ``<store>.lock`` beside the store, holding the same owner
record, and it is taken with a conditional PUT that fails when the object
exists (:class:`RemoteLock`), so of two writers exactly one gets it.  A stale
owner (same tests as above) is replaced with a PUT conditional on the ETag the
stale record was read with, so two writers that both find it stale cannot both
take it over.  ``part`` needs a local store; ``memory://`` stores (one process)
take no lock.

Example:
    >>> import tempfile, os
    >>> store = os.path.join(tempfile.mkdtemp(), "s.zarr")
    >>> with WriterLock(store) as lock:
    ...     os.path.exists(store + ".lock"), [o.pid == os.getpid() for o in lock.owners()]
    (True, [True])
    >>> os.path.exists(store + ".lock")
    False
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import json
import os
import socket
import threading
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable, Iterator, Mapping, TypeVar

from .errors import ArgumentError, StoreAccessError, StoreFormatError, StoreLockedError
from .store import refuse_inside_a_store
from .urls import StoreURL, open_store, parse_url, remote_errors

__all__ = [
    "WriterLock", "RemoteLock", "Owner", "writer_lock", "locked", "held", "metadata_mutex", "sole_writer", "check_part",
    "LOCK_SUFFIX",
]

LOCK_SUFFIX = ".lock"
Part = tuple[int, int]

_held: dict[tuple[str, int], tuple["WriterLock", int]] = {}  # (lock path, thread) -> (lock, depth)


def check_part(part: Part | None, overwrite: bool = False) -> Part | None:
    """``part`` as ``(i, k)`` with ``0 <= i < k``, or ``None`` (write every block).

    ``overwrite`` is refused with a part: it would delete what other parts wrote.

    >>> check_part((1, 2)), check_part(None)
    ((1, 2), None)
    """
    if part is None:
        return None
    if overwrite:
        raise ArgumentError("overwrite cannot be combined with part: another part may already be writing the store")
    try:
        i, k = (int(x) for x in part)
    except (TypeError, ValueError):
        raise ArgumentError(f"part must be a pair (i, k), got {part!r}") from None
    if k < 1 or not 0 <= i < k or tuple(part) != (i, k):
        raise ArgumentError(f"part must be (i, k) with 0 <= i < k, got {part!r}")
    return i, k


def _boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return ""


def _proc_start(pid: int) -> tuple[str, int] | None:
    """(state, start time in clock ticks since boot) of ``pid`` from /proc, if available."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return fields[0], int(fields[19])


@dataclass(frozen=True)
class Owner:
    """A process registered in a lock file."""

    pid: int
    host: str
    boot: str
    start: int | None  # /proc start time, to tell a reused pid from the owner
    since: float
    part: Part | None = None

    @classmethod
    def me(cls, part: Part | None) -> "Owner":
        proc = _proc_start(os.getpid())
        return cls(os.getpid(), socket.gethostname(), _boot_id(), proc and proc[1], time.time(), part)

    @classmethod
    def from_json(cls, d: dict) -> "Owner":
        part = d.get("part")
        return cls(int(d["pid"]), str(d["host"]), str(d.get("boot", "")), d.get("start"), float(d.get("since", 0)),
                   None if part is None else (int(part[0]), int(part[1])))

    def is_stale(self) -> bool:
        """True when the owner certainly no longer runs (checked on this host only)."""
        if self.host != socket.gethostname():
            return False
        if self.boot and self.boot != _boot_id():
            return True
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:  # alive, owned by another user
            pass
        proc = _proc_start(self.pid)
        return proc is not None and (proc[0] in ("Z", "X") or (self.start is not None and proc[1] != self.start))

    def describe(self) -> str:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.since))
        what = "" if self.part is None else f" as part {self.part[0]}/{self.part[1]}"
        return f"process {self.pid} on {self.host}{what} (since {when})"


def _compatible(a: Part | None, b: Part | None) -> bool:
    return a is not None and b is not None and a[1] == b[1] and a[0] != b[0]


class _Held:
    """``with lock:`` acquires and releases (both lock kinds)."""

    def __enter__(self):
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


class WriterLock(_Held):
    """Register this process as a writer of ``store`` (see the module docstring)."""

    def __init__(self, store: str | os.PathLike, part: Part | None = None) -> None:
        self.store = os.fspath(store)
        self.part = check_part(part)
        self.local = _local(store)
        self.path = self.local + LOCK_SUFFIX
        self.owner: Owner | None = None
        self._mutex_fd: int | None = None  # set while this object holds the flock (re-entrant)

    def acquire(self) -> None:
        """Register, or raise :class:`StoreLockedError` naming a live, conflicting owner."""
        me = Owner.me(self.part)
        with self.mutex() as fd:
            live = [o for o in _read(fd) if not o.is_stale()]
            for o in live:
                if not _compatible(o.part, self.part):
                    mine = "" if self.part is None else f" (asked for part {self.part[0]}/{self.part[1]})"
                    raise StoreLockedError(
                        f"{self.store} is being written by {o.describe()}{mine}; wait for it to finish, "
                        f"or delete {self.path} if that process is gone"
                    )
            _write(fd, [*live, me])
        self.owner = me

    def release(self) -> None:
        if self.owner is None:
            return
        with self.mutex() as fd:
            rest = [o for o in _read(fd) if o != self.owner]
            if rest:
                _write(fd, rest)
            else:
                os.unlink(self.path)  # under the flock: a waiter sees the inode change and retries
        self.owner = None

    def owners(self) -> list[Owner]:
        """Everyone registered now (stale owners included).  Someone who holds no part
        only reads the file, so a reader who may not write beside the store can ask."""
        if self.owner is not None:
            with self.mutex() as fd:
                return _read(fd)
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except FileNotFoundError:
            return []
        except OSError as exc:
            raise self._os_error(exc) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_SH)  # not in the middle of an owner's update
            return _read(fd)
        finally:
            os.close(fd)

    @contextlib.contextmanager
    def mutex(self) -> Iterator[int]:
        """Exclusive ``flock`` on the lock file (a file descriptor to it) for a short critical section."""
        if self._mutex_fd is not None:
            yield self._mutex_fd
            return
        while True:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as exc:
                raise self._os_error(exc) from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                if os.fstat(fd).st_ino == os.stat(self.path).st_ino:
                    break
            except FileNotFoundError:  # unlinked by a releasing owner while we waited
                pass
            except BaseException:
                os.close(fd)
                raise
            os.close(fd)
        self._mutex_fd = fd
        try:
            yield fd
        finally:
            self._mutex_fd = None
            os.close(fd)  # closing drops the flock

    def _os_error(self, exc: OSError) -> Exception:
        verb = "write to" if os.path.exists(self.local) else "create a store at"
        if isinstance(exc, (FileExistsError, NotADirectoryError)):  # a file where a folder of the path should be
            return StoreFormatError(f"cannot {verb} {self.store}: Not a directory ({exc.filename} is in the way)")
        cls = StoreAccessError if isinstance(exc, PermissionError) else StoreFormatError
        return cls(f"cannot {verb} {self.store}: {exc.strerror or exc} ({self.path})")


class RemoteLock(_Held):
    """The writer lock of an object-store ``store``: the object ``<store>.lock`` beside it
    (``shardset.lock`` for a store at a bucket's root).

    Same owner record and stale-owner tests as :class:`WriterLock`, one owner at a
    time (no parts).  ``storage_options`` are the store's.
    """

    part = None

    def __init__(self, store: str | os.PathLike, storage_options: Mapping[str, Any] | None = None) -> None:
        url = parse_url(store)
        parent, _, name = url.prefix.rpartition("/")
        self.store = str(url)
        self.url = f"{url}{LOCK_SUFFIX}" if url.prefix else f"{url}/shardset{LOCK_SUFFIX}"
        self.key = f"{name or 'shardset'}{LOCK_SUFFIX}"
        self.objects = open_store(StoreURL(url.scheme, url.bucket, parent), storage_options).store
        self.owner: Owner | None = None

    def acquire(self) -> None:
        """Create the lock object, replace a stale one, or raise :class:`StoreLockedError`."""
        import obstore as obs
        from obstore.exceptions import AlreadyExistsError, PreconditionError

        me = Owner.me(None)
        body = _encode([me])
        with remote_errors(self.store, "locking"):
            for _ in range(8):  # each pass loses only to another writer that changed the lock meanwhile
                try:
                    obs.put(self.objects, self.key, body, mode="create")
                    self.owner = me
                    return
                except AlreadyExistsError:
                    pass
                try:
                    got = obs.get(self.objects, self.key)
                except FileNotFoundError:  # released meanwhile
                    continue
                live = [o for o in _decode(bytes(got.bytes())) if not o.is_stale()]
                if live:
                    raise StoreLockedError(
                        f"{self.store} is being written by {live[0].describe()}; wait for it to finish, "
                        f"or delete {self.url} if that process is gone"
                    )
                try:  # stale: take it over, unless another writer did first
                    obs.put(self.objects, self.key, body, mode={"e_tag": got.meta["e_tag"]})
                    self.owner = me
                    return
                except (PreconditionError, AlreadyExistsError):
                    continue
        raise StoreLockedError(f"{self.store}: other writers keep changing its lock {self.url}; try again")

    def release(self) -> None:
        """Delete the lock object if it still names this process."""
        import obstore as obs

        if self.owner is None:
            return
        with remote_errors(self.store, "unlocking"):
            if self.owner in self.owners():
                obs.delete(self.objects, self.key)
        self.owner = None

    def owners(self) -> list[Owner]:
        """Everyone recorded in the lock object now (stale owners included)."""
        import obstore as obs

        with remote_errors(self.store, "reading the lock of"):
            try:
                return _decode(bytes(obs.get(self.objects, self.key).bytes()))
            except FileNotFoundError:
                return []

    @contextlib.contextmanager
    def mutex(self) -> Iterator[None]:
        """Nothing to do: the lock admits one writer, so nobody else updates the metadata."""
        yield


def _decode(data: bytes) -> list[Owner]:
    try:
        return [Owner.from_json(d) for d in json.loads(data)["owners"]] if data.strip() else []
    except (ValueError, KeyError, TypeError):  # a file torn by a power cut (a PUT is atomic) names nobody
        return []


def _encode(owners: list[Owner]) -> bytes:
    return json.dumps({"owners": [asdict(o) for o in owners]}, indent=1).encode()


def _read(fd: int) -> list[Owner]:
    return _decode(os.pread(fd, 1 << 20, 0))


def _write(fd: int, owners: list[Owner]) -> None:
    data = _encode(owners)
    os.ftruncate(fd, 0)
    os.pwrite(fd, data, 0)
    os.fsync(fd)


@contextlib.contextmanager
def writer_lock(
    store: str | os.PathLike, part: Part | None = None, storage_options: Mapping[str, Any] | None = None
) -> Iterator[WriterLock | RemoteLock | None]:
    """Hold the writer lock of ``store`` (re-entrant within a thread): a :class:`WriterLock`
    for a local store, a :class:`RemoteLock` for an object store, ``None`` for ``memory://``."""
    url = parse_url(store)
    if not url.is_local and part is not None:
        raise ArgumentError("part= needs a local store: cooperating writers coordinate through a lock file")
    if not url.shared:
        yield None
        return
    key = _key(store)
    if key in _held:
        lock, depth = _held[key]
        if lock.part != check_part(part):
            raise StoreLockedError(f"{store} is already being written by this thread as another part")
        _held[key] = (lock, depth + 1)
        try:
            yield lock
        finally:
            _held[key] = (lock, _held[key][1] - 1)
        return
    if url.is_local:
        lock = WriterLock(store, part)
        refuse_inside_a_store(lock.local, os.fspath(store))  # before its directory is made there
        try:
            os.makedirs(os.path.dirname(lock.local), exist_ok=True)
        except OSError as exc:
            raise lock._os_error(exc) from None
    else:
        lock = RemoteLock(store, storage_options)
    lock.acquire()
    _held[key] = (lock, 1)
    try:
        yield lock
    except BaseException:
        del _held[key]
        with contextlib.suppress(OSError):  # the original error matters; a lock left behind is stale once we exit
            lock.release()
        raise
    del _held[key]
    lock.release()


def _local(store: str | os.PathLike) -> str:
    return os.path.realpath(parse_url(store).local_path.rstrip("/"))  # one lock whatever the spelling (symlinks)


def _key(store: str | os.PathLike) -> tuple[str, int]:
    return _local(store) if parse_url(store).is_local else str(parse_url(store)), threading.get_ident()


def held(store: str | os.PathLike) -> WriterLock | RemoteLock | None:
    """The writer lock this thread holds on ``store``, if any."""
    entry = _held.get(_key(store))
    return entry[0] if entry else None


@contextlib.contextmanager
def metadata_mutex(store: str | os.PathLike) -> Iterator[None]:
    """The held lock's :meth:`WriterLock.mutex`; nothing when no lock is held or it is a :class:`RemoteLock`."""
    lock = held(store)
    if lock is None:
        yield
        return
    with lock.mutex():
        yield


def sole_writer(store: str | os.PathLike) -> bool:
    """False while another live part writer shares ``store`` (its temporary files are in use)."""
    lock = held(store)
    return lock is None or all(o == lock.owner or o.is_stale() for o in lock.owners())


F = TypeVar("F", bound=Callable)


def locked(fn: F) -> F:
    """Run ``fn(path, ..., part=None, storage_options=None)`` holding :func:`writer_lock` on ``path``."""

    @functools.wraps(fn)
    def wrapper(path, *args, **kwargs):
        with writer_lock(path, kwargs.get("part"), kwargs.get("storage_options")):
            return fn(path, *args, **kwargs)

    return wrapper  # type: ignore[return-value]
