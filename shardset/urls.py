"""Where a store lives: a local directory, or an object-store URL opened with obstore.

Every API and command that takes a store path also takes a URL:

=============================  ==================================================
``PATH`` or ``file:///PATH``   a local directory (the fast ``readinto`` path)
``s3://bucket/prefix``         Amazon S3 or any S3-compatible server
``gs://bucket/prefix``         Google Cloud Storage
``az://container/prefix``      Azure Blob Storage (account from the options/env)
``memory://name``              an in-memory store of this process (tests, demos)
=============================  ==================================================

Object stores are zarr's :class:`zarr.storage.ObjectStore` over an obstore
store (chosen over s3fs by measurement, see ``docs/scaling.md``).
``storage_options`` are obstore's configuration keys (``endpoint``, ``region``,
``access_key_id``, ``secret_access_key``, ``session_token``, ...) and client
options (``allow_http``, ``timeout``, ...), as strings or values, and
``max_retries`` / ``retry_timeout`` (seconds) for obstore's retries of failed
requests (default 10 retries within 180 s).  Anything not
given comes from the usual environment (``AWS_ACCESS_KEY_ID``, ``AWS_REGION``,
``AWS_ENDPOINT_URL``, ...), then from the AWS profile files
(``~/.aws/config`` and ``~/.aws/credentials``, ``AWS_PROFILE``).  An ``http://``
endpoint turns ``allow_http`` on.

obstore runs its I/O on a tokio runtime, which does not survive ``fork``: a
process forked after its parent used an object store hangs on its first
request, even with a new store.  :func:`open_store` therefore refuses to run in
such a child, with an error that says to start workers with ``spawn`` or
``forkserver``.

A request that fails for good (connection refused, timed out, a server error
after the retries) raises :class:`~shardset.errors.StoreIOError`, a refused
one :class:`~shardset.errors.StoreAccessError`, each one line naming the store
and the cause (:func:`remote_error`), never obstore's own exception.

Example:
    >>> parse_url("s3://bucket/data/reg.zarr")
    StoreURL(scheme='s3', bucket='bucket', prefix='data/reg.zarr')
    >>> parse_url("/tmp/reg.zarr").is_local, parse_url("file:///tmp/reg.zarr").local_path
    (True, '/tmp/reg.zarr')
    >>> parse_storage_options(["endpoint=http://127.0.0.1:9000", "region=eu-west-1"])
    {'endpoint': 'http://127.0.0.1:9000', 'region': 'eu-west-1'}
"""

from __future__ import annotations

import configparser
import contextlib
import datetime
import os
import re
import urllib.parse
from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Mapping

from .errors import StoreAccessError, StoreIOError, StoreURLError

__all__ = [
    "StoreURL", "parse_url", "open_store", "parse_storage_options", "store_exists", "worker_start_method",
    "remote_error", "remote_errors",
]

REMOTE_SCHEMES = ("s3", "gs", "az")
_URL = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://(.*)$")
_BUCKET = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
# obstore's client options (everything else is store configuration).
_CLIENT_OPTIONS = frozenset(
    "allow_http allow_invalid_certificates connect_timeout default_content_type default_headers http1_only "
    "http2_keep_alive_interval http2_keep_alive_timeout http2_keep_alive_while_idle http2_only "
    "pool_idle_timeout pool_max_idle_per_host proxy_url proxy_ca_certificate proxy_excludes "
    "root_certificate randomize_addresses read_timeout timeout user_agent".split()
)
_RETRY_OPTIONS = ("max_retries", "retry_timeout")
_ENDPOINT_ENV = ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL", "AWS_ENDPOINT")
_MEMORY: dict[tuple[str, str], Any] = {}  # memory://bucket/prefix -> obstore MemoryStore, for this process only
_RUNTIME_PID: int | None = None  # the process whose obstore runtime may be running


@dataclass(frozen=True)
class StoreURL:
    """A parsed store location: ``scheme`` is ``file``, ``s3``, ``gs``, ``az`` or ``memory``."""

    scheme: str
    bucket: str  # bucket or container; the name for memory://; "" for local paths
    prefix: str  # key prefix inside the bucket; the directory for local paths

    @property
    def is_local(self) -> bool:
        return self.scheme == "file"

    @property
    def local_path(self) -> str | None:
        return self.prefix if self.is_local else None

    @property
    def shared(self) -> bool:
        """Whether other processes see the same data (false only for ``memory://``)."""
        return self.scheme != "memory"

    def __str__(self) -> str:
        if self.is_local:
            return self.prefix
        return f"{self.scheme}://{self.bucket}" + (f"/{self.prefix}" if self.prefix else "")


def parse_url(location: str | os.PathLike) -> StoreURL:
    """Parse a local path or a ``file://``, ``s3://``, ``gs://``, ``az://`` or ``memory://`` URL."""
    text = os.fspath(location)
    if not isinstance(text, str):
        raise StoreURLError(f"store location must be a path or URL string, got {text!r}")
    m = _URL.match(text)
    if m is None:
        if "://" in text:
            raise StoreURLError(f"malformed store URL {text!r}: expected SCHEME://BUCKET/PREFIX")
        return StoreURL("file", "", text)
    scheme, rest = m.group(1).lower(), m.group(2)
    if scheme == "file":
        host, slash, path = rest.partition("/")
        if host not in ("", "localhost") or not slash:
            raise StoreURLError(f"malformed file URL {text!r}: use file:///absolute/path")
        return StoreURL("file", "", urllib.parse.unquote("/" + path))  # file:///my%20data -> /my data
    if scheme not in (*REMOTE_SCHEMES, "memory"):
        known = ", ".join(f"{s}://" for s in ("file", *REMOTE_SCHEMES, "memory"))
        raise StoreURLError(f"unsupported store URL scheme {scheme}:// in {text!r}; use a local path or {known}")
    bucket, _, prefix = rest.partition("/")
    if not bucket or not _BUCKET.match(bucket):
        raise StoreURLError(f"malformed store URL {text!r}: expected {scheme}://BUCKET/PREFIX with a bucket name")
    prefix = prefix.strip("/")
    if prefix and any(part in ("", ".", "..") for part in prefix.split("/")):
        raise StoreURLError(f"malformed store URL {text!r}: empty, '.' or '..' path segment")
    return StoreURL(scheme, bucket, prefix)


def parse_storage_options(pairs: Iterable[str]) -> dict[str, str]:
    """``["key=value", ...]`` (the CLI's repeated ``--storage-option``) as a dict."""
    out: dict[str, str] = {}
    for pair in pairs:
        key, eq, value = pair.partition("=")
        if not eq or not key.strip():
            raise StoreURLError(f"storage option {pair!r} is not KEY=VALUE")
        out[key.strip()] = value
    return out


def open_store(
    location: str | os.PathLike | StoreURL, storage_options: Mapping[str, Any] | None = None, *, read_only: bool = False
) -> Any:
    """What to hand ``zarr.open_group``: the path for local stores, else a zarr ``ObjectStore``."""
    url = location if isinstance(location, StoreURL) else parse_url(location)
    if url.is_local:
        if storage_options:
            raise StoreURLError(f"storage options {sorted(storage_options)} apply to object stores, not to {url}")
        return url.local_path
    try:
        from obstore.store import AzureStore, GCSStore, MemoryStore, S3Store
    except ImportError:
        raise StoreURLError(f"{url.scheme}:// stores need obstore: pip install 'shardset[s3]'") from None
    from zarr.storage import ObjectStore

    _check_not_forked(url)
    global _RUNTIME_PID
    _RUNTIME_PID = os.getpid()
    if url.scheme == "memory":
        if storage_options:
            raise StoreURLError(f"memory:// stores take no storage options, got {sorted(storage_options)}")
        # One store per bucket and prefix: obstore's MemoryStore takes no prefix, and every
        # store under a URL is rooted there, as S3Store(prefix=...) is.
        return ObjectStore(_MEMORY.setdefault((url.bucket, url.prefix), MemoryStore()), read_only=read_only)
    options = dict(storage_options or {})
    if url.scheme == "s3":
        options = {**_aws_profile_defaults(options), **options}
    client = {k: options.pop(k) for k in list(options) if k in _CLIENT_OPTIONS}
    retry = _retry_config({k: options.pop(k) for k in _RETRY_OPTIONS if k in options})
    endpoints = [v for k, v in options.items() if "endpoint" in k] + [os.environ.get(k, "") for k in _ENDPOINT_ENV]
    if any(str(e).startswith("http://") for e in endpoints):
        client.setdefault("allow_http", True)
    cls = {"s3": S3Store, "gs": GCSStore, "az": AzureStore}[url.scheme]
    try:
        store = cls(url.bucket, prefix=url.prefix or None, config=options or None, client_options=client or None,
                    retry_config=retry)
    except Exception as exc:  # obstore raises its own types for unknown keys and bad values
        raise StoreURLError(f"cannot open {url}: {' '.join(str(exc).split('Debug source')[0].split())}") from None
    return ObjectStore(store, read_only=read_only)


def store_exists(location: str | os.PathLike | StoreURL, storage_options: Mapping[str, Any] | None = None) -> bool:
    """Whether anything is stored at ``location`` (a directory, or a group's ``zarr.json``)."""
    url = location if isinstance(location, StoreURL) else parse_url(location)
    if url.is_local:
        return os.path.exists(url.local_path)
    from zarr.core.sync import sync

    store = open_store(url, storage_options, read_only=True)
    with remote_errors(url, "reading"):
        return bool(sync(store.exists("zarr.json")))


@contextlib.contextmanager
def remote_errors(where: str | StoreURL, doing: str) -> Iterator[None]:
    """Raise obstore's failures inside the block as :func:`remote_error` gives them."""
    try:
        yield
    except Exception as exc:
        mapped = remote_error(exc, where, doing)
        if mapped is exc:
            raise
        raise mapped from None


def remote_error(exc: BaseException, where: str | StoreURL, doing: str) -> BaseException:
    """The typed, one-line error for an object-store failure ``exc`` while ``doing``
    something to ``where``; ``exc`` itself when it is not obstore's.

    Refused credentials give :class:`StoreAccessError`; anything else obstore
    gives up on (connection refused, timed out, server errors after the retries)
    :class:`StoreIOError`, with ``errno`` when the system gave one.

    >>> remote_error(KeyError("k"), "s3://b/x", "reading")
    KeyError('k')
    """
    try:
        from obstore.exceptions import BaseError, PermissionDeniedError, UnauthenticatedError
    except ImportError:
        return exc
    if not isinstance(exc, BaseError):
        return exc
    text = str(exc)
    summary = " ".join(text.split("Debug source")[0].split())
    if isinstance(exc, (PermissionDeniedError, UnauthenticatedError)):
        return StoreAccessError(f"{doing} {where} was refused: {summary}")
    os_error = re.search(r'code: (\d+),\s*kind: \w+,\s*message: "([^"]+)"', text)
    if os_error:
        cause = os_error.group(2).lower()
    elif re.search(r"kind: Timeout|TimedOut|timed out", text):
        cause = "timed out"
    elif "IncompleteMessage" in text:  # a kept-alive connection that the server closed under the request
        cause = "the server closed the connection"
    else:
        cause = "the request failed"
    err = StoreIOError(f"{doing} {where} failed: {cause} ({summary})")
    err.errno = int(os_error.group(1)) if os_error else None
    return err


def worker_start_method(location: str | os.PathLike) -> str | None:
    """The start method for worker processes reading ``location``: ``None`` (the
    default, fork) for local stores, ``"forkserver"`` (``"spawn"`` where there is
    none) for object stores.

    >>> worker_start_method("s3://bucket/reg.zarr"), worker_start_method("/data/reg.zarr")
    ('forkserver', None)
    """
    if parse_url(location).is_local:
        return None
    import multiprocessing

    return "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn"


def _check_not_forked(url: StoreURL) -> None:
    if _RUNTIME_PID is not None and _RUNTIME_PID != os.getpid():
        raise StoreURLError(
            f"cannot open {url} in a process forked after its parent used an object store (obstore's runtime "
            "hangs after fork); start worker processes with 'spawn' or 'forkserver', e.g. "
            "DataLoader(..., multiprocessing_context='forkserver')"
        )


def _retry_config(options: Mapping[str, Any]) -> dict[str, Any] | None:
    """obstore's ``retry_config`` from the ``max_retries`` / ``retry_timeout`` (seconds) options."""
    if not options:
        return None
    try:
        config: dict[str, Any] = {}
        if "max_retries" in options:
            config["max_retries"] = int(options["max_retries"])
            if config["max_retries"] < 0:
                raise ValueError
        if "retry_timeout" in options:
            seconds = float(options["retry_timeout"])
            if not 0 < seconds < float("inf"):
                raise ValueError
            config["retry_timeout"] = datetime.timedelta(seconds=seconds)
    except (TypeError, ValueError):
        raise StoreURLError(
            f"max_retries must be an integer >= 0 and retry_timeout a number of seconds > 0, got {dict(options)}"
        ) from None
    return config


def _aws_profile_defaults(options: Mapping[str, Any]) -> dict[str, str]:
    """Region, endpoint and credentials from the AWS profile files, for what neither
    ``options`` nor the environment sets (obstore reads the environment itself)."""
    profile = os.environ.get("AWS_PROFILE") or os.environ.get("AWS_DEFAULT_PROFILE") or "default"
    config = _read_ini(os.environ.get("AWS_CONFIG_FILE", "~/.aws/config"), "default" if profile == "default" else f"profile {profile}")
    creds = _read_ini(os.environ.get("AWS_SHARED_CREDENTIALS_FILE", "~/.aws/credentials"), profile)
    out: dict[str, str] = {}
    if "region" in config and not {"region", "default_region"} & set(options) and not (
        os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    ):
        out["region"] = config["region"]
    if "endpoint_url" in config and not any("endpoint" in k for k in options) and not any(map(os.environ.get, _ENDPOINT_ENV)):
        out["endpoint"] = config["endpoint_url"]
    keys = {**config, **creds}  # keys may sit in either file; the credentials file wins
    if "aws_access_key_id" in keys and "access_key_id" not in options and not os.environ.get("AWS_ACCESS_KEY_ID"):
        out["access_key_id"] = keys["aws_access_key_id"]
        out["secret_access_key"] = keys.get("aws_secret_access_key", "")
        if "aws_session_token" in keys:
            out["session_token"] = keys["aws_session_token"]
    return out


def _read_ini(path: str, section: str) -> dict[str, str]:
    parser = configparser.RawConfigParser()
    try:
        parser.read(os.path.expanduser(path))
    except configparser.Error:
        return {}
    return dict(parser[section]) if parser.has_section(section) else {}
