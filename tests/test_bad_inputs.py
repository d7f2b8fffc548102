"""The bad-input matrix of docs/errors.md: every row through the Python API and, where the
command line can express it, through the CLI (one line on stderr, exit status 2).

Each row names the input, the call that receives it, the exception class expected
and a phrase of its message.  ``test_docs_list_every_row`` keeps docs/errors.md and
this table in step.  Rows about file permissions run in a forked child that drops
root privileges first (root may read and write anything).
"""

from __future__ import annotations

import contextlib
import io
import os
import pickle
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import zarr

import shardset
from shardset import (
    BlockStore,
    FeistelPermutation,
    IncompleteStoreError,
    ShardedDataset,
    StoreFormatError,
    generate_regression,
)
from shardset.cli import main
from shardset.errors import StoreAccessError, StoreNotFoundError, StoreURLError
from shardset.format import FieldSpec, Layout
from shardset.verify import verify

DOC = Path(__file__).resolve().parent.parent / "docs" / "errors.md"
NOBODY = 65534


@dataclass
class Env:
    """Paths of the stores and files the rows use (made once per module)."""

    root: Path
    store: str = ""
    ids: str = ""
    other: str = ""
    fifty: str = ""
    incomplete: str = ""
    file: str = ""
    plain: str = ""
    empty: str = ""
    v2: str = ""
    ro: str = ""
    secret: str = ""
    folder: str = ""
    damaged: str = ""
    noweights: str = ""
    big: str = ""
    link: str = ""
    fieldsecret: str = ""

    def new(self) -> str:
        return tempfile.mkdtemp(dir=self.root) + "/s.zarr"


@dataclass
class Row:
    id: str
    api: Callable[[Env], object]
    error: type[BaseException]
    match: str
    cli: list[str] | None = None
    needle: str = ""
    unprivileged: bool = False
    marks: list = field(default_factory=list)


def gen(env: Env, path: str | None = None, **kw):
    args = dict(rows=100, features=2, block_rows=10, workers=1, progress=False) | kw
    return generate_regression(path or env.new(), **args)


def ds(env: Env, path: str | None = None, **kw):
    return ShardedDataset(path or env.store, **({"batch_size": 8} | kw))


def state_of(env: Env, path: str, **kw):
    return ds(env).load_state_dict(ds(env, path, **kw).state_dict())


G = ["generate", "{new}", "--rows", "100", "--features", "2"]


def _with(args: list[str], **flags) -> list[str]:
    out = list(args)
    for k, v in flags.items():
        flag = "--" + k.replace("_", "-")
        if flag in out:
            out[out.index(flag) + 1] = v
        else:
            out += [flag, v]
    return out


ROWS = [
    # sizes
    Row("rows-zero", lambda e: gen(e, rows=0), ValueError, "rows must be a positive integer",
        _with(G, rows="0"), "--rows"),
    Row("rows-negative", lambda e: gen(e, rows=-5), ValueError, "rows must be a positive integer",
        _with(G, rows="-5"), "--rows"),
    Row("rows-not-integer", lambda e: gen(e, rows=10.5), ValueError, "rows must be a positive integer",
        _with(G, rows="ten"), "--rows"),
    Row("rows-huge", lambda e: gen(e, rows=2**62, features=4), ValueError, "exceed the 8 EiB",
        _with(G, rows=str(2**62), features="4"), "8 EiB"),
    Row("features-zero", lambda e: gen(e, features=0), ValueError, "features must be a positive integer",
        _with(G, features="0"), "--features"),
    Row("features-negative", lambda e: gen(e, features=-3), ValueError, "features must be a positive integer",
        _with(G, features="-3"), "--features"),
    Row("features-huge", lambda e: gen(e, features=10**9), ValueError, "more than a block",
        _with(G, features=str(10**9)), "more than a block"),
    Row("row-larger-than-a-block",
        lambda e: shardset.write(e.new(), {"x": np.broadcast_to(np.float32(0), (2, 40_000_000))}),
        ValueError, "one row is 160,000,000 bytes, more than a block"),
    Row("block-mb-too-small", lambda e: gen(e, block_mb=32, block_rows=None), ValueError, "block_mb must be between 64 and 256",
        _with(G, block_mb="32"), "block_mb"),
    Row("block-mb-too-large", lambda e: gen(e, block_mb=512), ValueError, "block_mb must be between 64 and 256",
        _with(G, block_mb="512"), "block_mb"),
    Row("block-mb-not-finite", lambda e: gen(e, block_mb=float("nan")), ValueError, "block_mb must be between",
        _with(G, block_mb="nan"), "--block-mb"),
    Row("block-rows-zero", lambda e: gen(e, block_rows=0), ValueError, "block_rows must be a positive integer",
        _with(G, block_rows="0"), "--block-rows"),
    Row("too-many-blocks", lambda e: gen(e, rows=2**25, block_rows=1), ValueError,
        "33,554,432 blocks, more than the 16,777,216 a store may have", _with(G, rows=str(2**25), block_rows="1"),
        "use larger blocks"),
    Row("field-name-reserved", lambda e: shardset.write(e.new(), {"slice_checksums": np.zeros(4, np.float32)}),
        ValueError, r"field names \['slice_checksums'\] are not allowed"),
    Row("field-name-temporary", lambda e: shardset.write(e.new(), {"x.partial": np.zeros(4, np.float32)}),
        ValueError, r"field names \['x.partial'\] are not allowed"),
    Row("field-name-not-a-string", lambda e: shardset.write(e.new(), {3: np.zeros(4, np.float32)}),
        ValueError, r"field names \[3\] are not allowed: a name is a non-empty string"),
    Row("field-dtype-not-numeric", lambda e: shardset.write(e.new(), {"s": np.array(["ab"] * 4)}), ValueError,
        "dtype must be a boolean or numeric type"),
    Row("rows-not-the-arrays-length", lambda e: shardset.write(e.new(), {"x": np.zeros(10, np.float32)}, rows=5),
        ValueError, "rows=5, but the arrays hold 10 rows"),
    Row("batch-dtype-changes",
        lambda e: shardset.write(e.new(), iter([{"x": np.zeros(2, np.int64)}, {"x": np.full(2, 0.5)}]), rows=4),
        ValueError, "field 'x' is float64, which the store's int64"),
    Row("batch-values-wrap",
        lambda e: shardset.write(e.new(), iter([{"x": np.zeros(2, np.int8)}, {"x": np.array([300, -1000])}]), rows=4),
        ValueError, "field 'x' is int64, which the store's int8"),
    Row("batch-values-overflow",
        lambda e: shardset.write(e.new(), iter([{"x": np.zeros(2, np.float16)}, {"x": np.array([1e6, 3.14])}]), rows=4),
        ValueError, "field 'x' is float64, which the store's float16"),
    Row("batch-size-zero", lambda e: ds(e, batch_size=0), ValueError, "batch_size must be a positive integer",
        ["read", "{store}", "--batch-size", "0"], "--batch-size"),
    Row("batch-size-negative", lambda e: ds(e, batch_size=-8), ValueError, "batch_size must be a positive integer",
        ["train", "{store}", "--batch-size", "-8"], "--batch-size"),
    Row("prefetch-negative", lambda e: ds(e, prefetch=-1), ValueError, "prefetch must be an integer >= 0",
        ["read", "{store}", "--prefetch", "-1"], "--prefetch"),
    Row("buffers-beyond-ram", lambda e: ds(e, path=e.big), ValueError,
        r"a window and read-ahead of 2 x 4,194,304 MiB .blocks. need 8,192.0 GiB of buffers, more than the .* GiB of RAM",
        ["read", "{big}"], "GiB of buffers"),
    Row("workers-zero", lambda e: gen(e, workers=0), ValueError, "workers must be a positive integer",
        _with(G, workers="0"), "--workers"),
    Row("seed-negative", lambda e: gen(e, seed=-1), ValueError, "seed must be an integer >= 0",
        _with(G, seed="-1"), "--seed"),
    # generator parameters
    Row("noise-not-finite", lambda e: gen(e, noise=float("nan")), ValueError, "noise a finite value >= 0",
        _with(G, noise="nan"), "--noise"),
    Row("noise-infinite", lambda e: gen(e, noise=float("inf")), ValueError, "noise a finite value >= 0",
        _with(G, noise="inf"), "--noise"),
    Row("noise-negative", lambda e: gen(e, noise=-0.1), ValueError, "noise a finite value >= 0",
        _with(G, noise="-0.1"), "noise"),
    Row("bias-not-finite", lambda e: gen(e, bias=float("inf")), ValueError, "bias must be finite",
        _with(G, bias="inf"), "--bias"),
    Row("weights-wrong-length", lambda e: gen(e, weights=[1.0, 2.0, 3.0]), ValueError, "weights must have 2 entries"),
    Row("compression-unknown", lambda e: gen(e, compression="gzip"), ValueError, "unknown compression 'gzip'",
        _with(G, compression="gzip"), "--compression"),
    Row("part-out-of-range", lambda e: gen(e, part=(2, 2)), ValueError, r"part must be \(i, k\) with 0 <= i < k",
        _with(G, part="2/2"), "--part"),
    Row("part-malformed", lambda e: gen(e, part="0/2"), ValueError, "part must be",
        _with(G, part="zero/two"), "--part"),
    Row("part-with-overwrite", lambda e: gen(e, part=(0, 2), overwrite=True), ValueError,
        "overwrite cannot be combined with part", _with(G, part="0/2") + ["--overwrite"], "overwrite"),
    # paths and stores
    Row("path-missing", lambda e: ds(e, e.root / "missing.zarr"), StoreNotFoundError, "is not a shardset store",
        ["info", "{root}/missing.zarr"], "not a shardset store"),
    Row("path-is-a-file", lambda e: ds(e, e.file), StoreFormatError, "is not a shardset store",
        ["read", "{file}"], "not a shardset store"),
    Row("generate-onto-a-file", lambda e: gen(e, e.file), StoreFormatError, "is not a shardset store",
        _with(G)[:1] + ["{file}"] + G[2:], "not a shardset store"),
    Row("overwrite-a-file", lambda e: gen(e, e.file, overwrite=True), StoreFormatError, "is a file, not a store",
        ["generate", "{file}", *G[2:], "--overwrite"], "is a file"),
    Row("parent-is-a-file", lambda e: gen(e, e.file + "/s.zarr"), StoreFormatError,
        "cannot create a store at .*: Not a directory", ["generate", "{file}/s.zarr", *G[2:]], "Not a directory"),
    Row("overwrite-a-folder", lambda e: gen(e, e.folder, overwrite=True), StoreFormatError,
        "is a directory that is not a Zarr store", ["generate", "{folder}", *G[2:], "--overwrite"], "not a Zarr store"),
    Row("store-inside-a-store", lambda e: gen(e, e.store + "/inner.zarr"), StoreFormatError,
        "is inside the shardset store", ["generate", "{store}/inner.zarr", *G[2:]], "inside the shardset store"),
    Row("damaged-metadata", lambda e: ds(e, e.damaged), StoreFormatError, "has a damaged zarr.json",
        ["info", "{damaged}"], "damaged zarr.json"),
    Row("weights-unreadable", lambda e: verify(e.noweights, deep=True, workers=1), StoreFormatError,
        "its weights params/w cannot be read", ["verify", "{noweights}", "--deep"], "cannot be read"),
    Row("directory-not-writable", lambda e: gen(e, e.ro + "/s.zarr"), StoreAccessError, "Permission denied",
        ["generate", "{ro}/s.zarr", *G[2:]], "Permission denied", unprivileged=True),
    Row("overwrite-a-link", lambda e: gen(e, e.link, overwrite=True), StoreFormatError,
        "is a symbolic link; overwrite replaces a store only", ["generate", "{link}", *G[2:], "--overwrite"], "symbolic link"),
    Row("field-not-readable", lambda e: ds(e, e.fieldsecret), StoreAccessError, "cannot read .*Permission denied.*X",
        ["info", "{fieldsecret}"], "Permission denied", unprivileged=True),
    Row("store-not-readable", lambda e: ds(e, e.secret), StoreAccessError, "cannot read .*Permission denied",
        ["info", "{secret}"], "Permission denied", unprivileged=True),
    Row("not-a-shardset-group", lambda e: ds(e, e.plain), StoreFormatError, "chunked along more than rows",
        ["read", "{plain}"], "chunked along more than rows"),
    Row("empty-zarr-group", lambda e: ds(e, e.empty), StoreFormatError, "no arrays in the group",
        ["info", "{empty}"], "no arrays"),
    Row("generate-onto-another-group", lambda e: gen(e, e.plain), StoreFormatError, "pass overwrite=True",
        ["generate", "{plain}", *G[2:]], "--overwrite"),
    Row("generate-onto-another-dataset", lambda e: gen(e, e.store, seed=9), StoreFormatError,
        "holds a different dataset", ["generate", "{store}", *G[2:], "--block-rows", "10", "--seed", "9"],
        "different dataset"),
    Row("newer-format-version", lambda e: ds(e, e.v2), StoreFormatError, "format version 2; this shardset reads 1",
        ["read", "{v2}"], "format version 2"),
    Row("incomplete-store", lambda e: ds(e, e.incomplete), IncompleteStoreError, r"8 of 10 blocks missing \(2, 3,",
        ["train", "{incomplete}"], "incomplete"),
    Row("deep-verify-without-generator", lambda e: verify(e.ids, deep=True), StoreFormatError, "cannot be regenerated",
        ["verify", "{ids}", "--deep"], "cannot be regenerated"),
    Row("url-without-bucket", lambda e: ds(e, "s3://"), StoreURLError, "malformed store URL",
        ["read", "s3://"], "malformed store URL"),
    Row("url-bad-bucket", lambda e: ds(e, "s3://no spaces/x"), StoreURLError, "malformed store URL",
        ["info", "s3://no spaces/x"], "malformed store URL"),
    Row("url-unknown-scheme", lambda e: ds(e, "ftp://host/x.zarr"), StoreURLError, "unsupported store URL scheme ftp",
        ["info", "ftp://host/x.zarr"], "unsupported store URL scheme"),
    # distributed settings and checkpoints
    Row("rank-out-of-range", lambda e: ds(e, rank=2, world_size=2), ValueError, "need 0 <= rank < world_size"),
    Row("rank-negative", lambda e: ds(e, rank=-1, world_size=2), ValueError, "need 0 <= rank < world_size"),
    Row("world-size-zero", lambda e: ds(e, rank=0, world_size=0), ValueError, "need 0 <= rank < world_size"),
    Row("more-ranks-than-rows", lambda e: ds(e, rank=0, world_size=101), ValueError, "cannot be split across 101 ranks"),
    Row("world-size-without-rank", lambda e: ds(e, world_size=2), ValueError, "world_size=2 needs rank= as well"),
    Row("rank-not-integer", lambda e: ds(e, rank=0.5, world_size=2), ValueError, "rank must be an integer, got 0.5"),
    Row("reader-seed-negative", lambda e: ds(e, seed=-1), ValueError, "seed must be an integer >= 0"),
    Row("epoch-negative", lambda e: ds(e).set_epoch(-1), ValueError, "epoch must be an integer >= 0"),
    Row("window-mb-infinite", lambda e: ds(e, window_mb=float("inf")), ValueError,
        "window_mb must be positive .a finite number., got inf"),
    Row("fields-a-string", lambda e: ds(e, fields="Xy"), ValueError, "fields must be a list of field names"),
    Row("unknown-field", lambda e: ds(e, fields=["z"]), ValueError, r"unknown fields \['z'\]"),
    Row("state-from-another-seed", lambda e: state_of(e, e.store, seed=7), ValueError, "seed=7 .this dataset: 0."),
    Row("state-batches-negative", lambda e: ds(e).load_state_dict({**ds(e).state_dict(), "batches": -3}), ValueError,
        "batches must be an integer >= 0, got -3"),
    Row("state-batches-beyond-share", lambda e: ds(e).load_state_dict({**ds(e).state_dict(), "batches": 10**6}),
        ValueError, "state says 1000000 batches were consumed, but that consumer's share of the epoch is 13"),
    Row("state-from-another-dataset", lambda e: state_of(e, e.fifty), ValueError, "rows=50"),
    Row("state-from-a-same-shape-dataset", lambda e: state_of(e, e.other), ValueError, "another"),
    Row("state-malformed", lambda e: ds(e).load_state_dict({"seed": 0}), ValueError, "epoch"),
    Row("permutation-size-zero", lambda e: FeistelPermutation(0, 0, 0), ValueError, r"size must be in \[1, 2\*\*62\]"),
    Row("permutation-size-huge", lambda e: FeistelPermutation(2**62 + 1, 0, 0), ValueError, "size must be in"),
]


@pytest.fixture(scope="module")
def env() -> Env:
    root = Path(tempfile.mkdtemp(prefix="shardset-bad-inputs-"))
    os.chmod(root, 0o755)  # the unprivileged rows must reach the paths inside
    e = Env(root)
    e.store = str(root / "store.zarr")
    gen(e, e.store)
    e.other = str(root / "other.zarr")
    gen(e, e.other, bias=1.0)  # same rows and blocks, other data
    e.fifty = str(root / "fifty.zarr")
    gen(e, e.fifty, rows=50)
    e.ids = str(root / "ids.zarr")
    shardset.write(e.ids, {"x": np.arange(40, dtype=np.float32)}, block_rows=10, progress=False)
    e.incomplete = str(root / "incomplete.zarr")
    with contextlib.suppress(ValueError):
        shardset.write(e.incomplete, iter([{"x": np.zeros((20, 2), np.float32)}]), rows=100, block_rows=10,
                       progress=False)
    e.file = str(root / "a-file")
    Path(e.file).write_text("not a store")
    e.plain = str(root / "plain.zarr")
    zarr.open_group(e.plain, mode="w").create_array("a", shape=(10, 4), chunks=(5, 2), dtype="f4")
    e.empty = str(root / "empty.zarr")
    zarr.open_group(e.empty, mode="w")
    e.v2 = str(root / "v2.zarr")
    shutil.copytree(e.store, e.v2)
    g = zarr.open_group(e.v2, mode="r+")
    g.attrs["shardset"] = dict(g.attrs["shardset"], version=2)
    e.ro = str(root / "read-only")
    os.mkdir(e.ro, 0o555)
    e.secret = str(root / "secret.zarr")
    gen(e, e.secret)
    os.chmod(e.secret, 0o700)
    e.folder = str(root / "folder")
    os.mkdir(e.folder)
    Path(e.folder, "notes.txt").write_text("not part of any store")
    e.damaged = str(root / "damaged.zarr")
    shutil.copytree(e.store, e.damaged)
    meta = Path(e.damaged, "zarr.json")
    meta.write_bytes(meta.read_bytes()[:100])  # cut short
    e.big = str(root / "big.zarr")  # blocks of 4 TiB, marked complete and never written
    big = BlockStore.create(e.big, Layout(rows=2**32, block_rows=2**30, fields={"x": FieldSpec("float32", (1024,))}))
    big.mark_complete(range(4))
    e.link = str(root / "link.zarr")  # a symbolic link to a copy of the store
    shutil.copytree(e.store, root / "linked.zarr")
    os.symlink(root / "linked.zarr", e.link)
    e.fieldsecret = str(root / "fieldsecret.zarr")  # one field's directory only root may read
    shutil.copytree(e.store, e.fieldsecret)
    os.chmod(Path(e.fieldsecret, "X"), 0o700)
    e.noweights = str(root / "noweights.zarr")
    shutil.copytree(e.store, e.noweights)
    shutil.rmtree(Path(e.noweights, "params", "w"))
    yield e
    shutil.rmtree(root, ignore_errors=True)


def _unprivileged(fn: Callable[[], object]):
    """Run ``fn`` in a forked child without root's privileges: (exception class names, message) or its result."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            if os.geteuid() == 0:
                os.setgid(NOBODY)
                os.setuid(NOBODY)
            try:
                out = ("ok", fn())
            except BaseException as exc:
                out = ("raised", [c.__name__ for c in type(exc).__mro__], str(exc))
            os.write(w, pickle.dumps(out))
        finally:
            os._exit(0)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        data = f.read()
    os.waitpid(pid, 0)
    return pickle.loads(data)


def _cli(argv: list[str]) -> tuple[int, list[str]]:
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            rc = main(argv)
        except SystemExit as exc:  # argparse errors
            rc = exc.code
    return rc, err.getvalue().strip().splitlines()


def _params(rows):
    return [pytest.param(r, id=r.id, marks=r.marks) for r in rows]


@pytest.mark.parametrize("row", _params(ROWS))
def test_python_api(env, row):
    if row.unprivileged:
        out = _unprivileged(lambda: row.api(env))
        assert out[0] == "raised", f"no error: {out}"
        assert row.error.__name__ in out[1] and re.search(row.match, out[2]), out
        return
    with pytest.raises(row.error, match=row.match) as err:
        row.api(env)
    assert isinstance(err.value, ValueError)  # ShardsetError is one too


@pytest.mark.parametrize("row", _params([r for r in ROWS if r.cli]))
def test_cli(env, row):
    argv = [a.format(new=env.new(), **{k: v for k, v in vars(env).items()}) for a in row.cli]
    rc, lines = _unprivileged(lambda: _cli(argv))[1] if row.unprivileged else _cli(argv)
    assert rc == 2 and len(lines) == 1, lines
    assert row.needle in lines[0] and "Traceback" not in lines[0], lines


def test_verify_needs_no_write_access_beside_the_store(env):
    lock = Path(env.store + ".lock")
    lock.write_text("")  # a lock file a writer left behind, which only root may write
    try:
        assert _unprivileged(lambda: verify(env.store, workers=1).ok) == ("ok", True)
    finally:
        lock.unlink()


def test_docs_list_every_row():
    documented = set(re.findall(r"^\| `([a-z0-9-]+)` \|", DOC.read_text(), re.M))
    assert documented == {r.id for r in ROWS}
