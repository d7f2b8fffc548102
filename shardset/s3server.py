"""A local S3 server for tests, benchmarks and demos: ``moto_server`` on 127.0.0.1.

``moto[server]`` (in shardset's ``dev`` extra) serves the S3 API from one
Python process; both obstore and s3fs talk to it.  :func:`local_s3_server`
starts it on a free port, creates a bucket, yields the endpoint URL and stops
the server on exit.  Pass the endpoint as ``storage_options={"endpoint": ...}``
or put it in ``AWS_ENDPOINT_URL``; any access key works.

:func:`pin_server` and :func:`pin_threads` restrict the server and a client
to separate cores, so that a benchmark models a remote server: the client's own
work then overlaps the transfer instead of taking CPU from the server.

Example:
    >>> import shardset
    >>> with local_s3_server("demo") as endpoint:
    ...     opts = {"endpoint": endpoint, "access_key_id": "k", "secret_access_key": "s", "region": "us-east-1"}
    ...     store = shardset.generate_regression("s3://demo/reg.zarr", rows=100, features=2, block_rows=40,
    ...                                          workers=1, storage_options=opts)
    ...     shardset.BlockStore.open("s3://demo/reg.zarr", storage_options=opts).missing_blocks()
    []
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Iterable, Iterator

__all__ = ["local_s3_server", "pin_server", "pin_threads"]

_SERVERS: dict[str, subprocess.Popen] = {}  # endpoint -> its running moto_server


@contextlib.contextmanager
def local_s3_server(bucket: str, *, timeout: float = 60.0, log: str | os.PathLike | None = None) -> Iterator[str]:
    """Run ``moto_server`` on 127.0.0.1 with ``bucket`` created; yields ``http://127.0.0.1:PORT``."""
    exe = Path(sys.executable).with_name("moto_server")
    exe = str(exe) if exe.exists() else shutil.which("moto_server")
    if exe is None:
        raise RuntimeError("moto_server is not installed: pip install 'moto[server]' (in shardset's dev extra)")
    with open(log or os.devnull, "w") as out:
        for _ in range(3):  # the free port may be taken before the server binds it
            port = _free_port()
            proc = subprocess.Popen([exe, "-H", "127.0.0.1", "-p", str(port)], stdout=out, stderr=subprocess.STDOUT)
            endpoint = f"http://127.0.0.1:{port}"
            try:
                if _make_bucket(proc, endpoint, bucket, timeout):
                    _SERVERS[endpoint] = proc
                    yield endpoint
                    return
            finally:
                _SERVERS.pop(endpoint, None)
                proc.terminate()
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
    raise RuntimeError(f"moto_server did not start within {timeout:.0f} s")


def pin_server(endpoint: str, cpus: Iterable[int] | None) -> None:
    """Run the server of :func:`local_s3_server` at ``endpoint`` on ``cpus`` only (``None``: on every core)."""
    pin_threads(_SERVERS[endpoint].pid, cpus)


def pin_threads(pid: int, cpus: Iterable[int] | None) -> None:
    """Restrict every thread of process ``pid`` (0: this one) to ``cpus`` (``None``: every
    core); threads it starts later inherit the setting.

    >>> before = os.sched_getaffinity(0)
    >>> pin_threads(0, [min(before)]); os.sched_getaffinity(0) == {min(before)}
    True
    >>> pin_threads(0, before); os.sched_getaffinity(0) == before
    True
    """
    pid = pid or os.getpid()
    cpus = set(range(os.cpu_count() or 1)) if cpus is None else set(cpus)
    for tid in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(ProcessLookupError, FileNotFoundError):  # a thread that just ended
            os.sched_setaffinity(int(tid), cpus)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _make_bucket(proc: subprocess.Popen, endpoint: str, bucket: str, timeout: float) -> bool:
    """Create ``bucket`` once the server answers (moto accepts an unsigned CreateBucket)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            urllib.request.urlopen(urllib.request.Request(f"{endpoint}/{bucket}", method="PUT"), timeout=5)
            return True
        except urllib.error.HTTPError as exc:  # the server answered: the bucket name is refused
            raise RuntimeError(f"moto_server refused to create bucket {bucket!r}: HTTP {exc.code}") from None
        except (urllib.error.URLError, ConnectionError):
            time.sleep(0.1)
    return False
