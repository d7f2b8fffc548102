"""Stores on S3, against a real S3 server (``moto_server``) on 127.0.0.1.

One server serves the whole session; each test writes under its own key prefix.
The credentials and endpoint are in the environment, as on a real machine, and
some tests pass them as ``storage_options`` / ``--storage-option`` instead.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import threading
import uuid

import numpy as np
import obstore
import pytest
import torch
from zarr.core.buffer import default_buffer_prototype
from zarr.core.sync import sync

import shardset
from shardset import BlockStore, ShardedDataset
from shardset.cli import main
from shardset.errors import CorruptBlockError, StoreIOError, StoreLockedError, StoreURLError
from shardset.lock import RemoteLock, writer_lock
from shardset.s3server import local_s3_server
from shardset.urls import StoreURL, parse_storage_options, parse_url
from shardset.writer import layout_for, write_blocks

from conftest import id_arrays

BUCKET = "shardset-test"


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """``http://127.0.0.1:PORT`` of a moto S3 server with bucket ``BUCKET``; the
    credentials and endpoint are put in the environment for the session."""
    with local_s3_server(BUCKET, log=tmp_path_factory.mktemp("moto") / "moto.log") as endpoint:
        env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_REGION": "us-east-1",
               "AWS_ENDPOINT_URL": endpoint}
        saved = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        try:
            yield endpoint
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v


@pytest.fixture
def s3_url(s3_server) -> str:
    """A fresh ``s3://`` prefix for one test."""
    return f"s3://{BUCKET}/{uuid.uuid4().hex[:12]}/data.zarr"


def _same_blocks(a: BlockStore, b: BlockStore) -> None:
    """The same rows and the same record of how they were made (but for where a shuffle's input was)."""

    def made(layout) -> dict:
        source = {k: v for k, v in layout.generator.get("source", {}).items() if k != "input"}
        return {**layout.generator, "source": source} if "source" in layout.generator else layout.generator

    assert a.layout.same_shape(b.layout) and made(a.layout) == made(b.layout)
    for name in a.layout.fields:
        for block in range(a.layout.num_blocks):
            np.testing.assert_array_equal(a.read_block(name, block), b.read_block(name, block))


# -- URLs --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, want",
    [
        ("data/reg.zarr", StoreURL("file", "", "data/reg.zarr")),
        ("file:///data/reg.zarr", StoreURL("file", "", "/data/reg.zarr")),
        ("file:///my%20data/reg.zarr", StoreURL("file", "", "/my data/reg.zarr")),  # percent-decoded, as in RFC 8089
        ("s3://bucket", StoreURL("s3", "bucket", "")),
        ("s3://bucket/a/b.zarr/", StoreURL("s3", "bucket", "a/b.zarr")),
        ("gs://bucket/x", StoreURL("gs", "bucket", "x")),
        ("az://container/x", StoreURL("az", "container", "x")),
        ("memory://scratch", StoreURL("memory", "scratch", "")),
    ],
)
def test_urls_parse(text, want):
    assert parse_url(text) == want


@pytest.mark.parametrize(
    "text", ["s3://", "s3:///prefix", "ftp://host/x", "s3://bucket/a//b", "s3://bucket/../x", "file://host/x", "://x"]
)
def test_malformed_urls_are_refused_clearly(text):
    with pytest.raises(StoreURLError, match="store URL|URL scheme|file URL"):
        parse_url(text)


def test_cli_refuses_a_malformed_url_or_option_in_one_line(capsys):
    assert main(["info", "ftp://host/x"]) == 2
    assert main(["info", "s3://b/x", "--storage-option", "endpoint"]) == 2
    assert main(["info", "/tmp/x", "--storage-option", "region=eu-west-1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3 and all(line.startswith("shardset: error:") for line in err)
    assert "unsupported store URL scheme" in err[0] and "KEY=VALUE" in err[1] and "object stores" in err[2]


def test_unknown_storage_option_is_a_clear_error(s3_url):
    with pytest.raises(StoreURLError, match="bogus"):
        BlockStore.open(s3_url, storage_options={"bogus": "1"})
    assert parse_storage_options(["a=1", "b=x=y"]) == {"a": "1", "b": "x=y"}


# -- generate, info, read, train, verify through s3:// ------------------------------


def test_cli_generate_info_read_train_verify_through_s3(s3_server, s3_url, tmp_path, capsys):
    opts = ["--storage-option", f"endpoint={s3_server}", "--storage-option", "region=us-east-1"]
    args = ["--rows", "20000", "--features", "2", "--block-rows", "3000", "--quiet"]
    assert main(["generate", s3_url, *args, "--workers", "1", *opts]) == 0
    local = tmp_path / "local.zarr"
    assert main(["generate", str(local), *args, "--workers", "1"]) == 0
    _same_blocks(BlockStore.open(s3_url), BlockStore.open(local))  # the same bytes as a local run

    capsys.readouterr()
    assert main(["info", s3_url, "--json", *opts]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["complete"] and info["blocks"] == 7 and info["path"] == s3_url and info["stored_bytes"] > 0

    assert main(["read", s3_url, "--epochs", "1", "--batch-size", "1000"]) == 0
    assert "epoch 0: 20,000 rows" in capsys.readouterr().out
    assert main(["train", s3_url, "--epochs", "2", "--batch-size", "64"]) == 0
    out = capsys.readouterr().out
    err = float(out.split("max |w - w_true| = ")[1].split(",")[0])
    assert err < 0.05, out

    assert main(["verify", s3_url, "--quiet", "--workers", "1", *opts]) == 0


def test_ranged_reads_assemble_each_block_exactly(s3_url, monkeypatch):
    arrays = id_arrays(1000, features=5)
    shardset.write(s3_url, arrays, block_rows=300, progress=False)
    plain = BlockStore.open(s3_url)
    whole = {b: plain.read_block("X", b).copy() for b in range(4)}
    monkeypatch.setattr(BlockStore, "read_part_bytes", 1000)  # 6 ranges of a 6004-byte chunk
    split = BlockStore.open(s3_url)
    buf = split.new_buffer("X")
    for b in range(4):
        got = split.read_block("X", b, buf)
        np.testing.assert_array_equal(got, whole[b])
        np.testing.assert_array_equal(got, arrays["X"][b * 300 : (b + 1) * 300])


@pytest.mark.parametrize("part", [500, None], ids=["ranges", "streamed"])
@pytest.mark.parametrize("fault, match", [("delete", "is missing"), ("truncate", "has 1203 bytes, expected 1204"),
                                          ("extend", "has 1205 bytes"), ("flip", "crc32c")])
def test_damaged_objects_are_named(s3_url, monkeypatch, fault, match, part):
    _damage_block_1(s3_url, fault)
    if part is not None:
        monkeypatch.setattr(BlockStore, "read_part_bytes", part)
    with pytest.raises(CorruptBlockError, match=match):
        BlockStore.open(s3_url).read_block("X", 1)


@pytest.mark.parametrize("fault, match", [("delete", "is missing"), ("truncate", "has 1203 bytes, expected 1204"),
                                          ("extend", "has 1205 bytes"), ("flip", "crc32c of its slice 0")])
def test_damaged_objects_are_named_by_slice_reads(s3_url, fault, match):
    _damage_block_1(s3_url, fault)
    store = BlockStore.open(s3_url)
    with pytest.raises(CorruptBlockError, match=match):
        store.read_rows("X", 300, 320)
    with pytest.raises(CorruptBlockError, match=match):  # into a caller's buffer, as the reader does
        store.read_rows("X", 300, 320, np.empty(20 * 4, np.uint8), order=np.arange(20)[::-1])


def _damage_block_1(s3_url: str, fault: str) -> None:
    """Write 1000 rows in blocks of 300 and damage the object of block 1 of ``X``."""
    shardset.write(s3_url, id_arrays(1000, features=1), block_rows=300, progress=False)
    store = BlockStore.open(s3_url, mode="r+")
    kv, key = store.group.store, store.chunk_key("X", 1)
    raw = sync(kv.get(key, default_buffer_prototype())).to_bytes()
    if fault == "delete":
        sync(kv.delete(key))
    else:
        bad = {"truncate": raw[:-1], "extend": raw + b"\0", "flip": bytes([raw[0] ^ 1]) + raw[1:]}[fault]
        sync(kv.set(key, default_buffer_prototype().buffer.from_bytes(bad)))


def test_streamed_chunk_is_checked_across_its_pieces(s3_url):
    arrays = id_arrays(150_000, features=5)  # 3 MB chunks: several pieces of a streamed GET
    shardset.write(s3_url, arrays, block_rows=150_000, progress=False)
    store = BlockStore.open(s3_url, mode="r+")
    assert store.block_nbytes("X") > 2 * shardset.store.STREAM_PIECE
    np.testing.assert_array_equal(store.read_block("X", 0, store.new_buffer("X")), arrays["X"])
    kv, key = store.group.store, store.chunk_key("X", 0)
    raw = bytearray(sync(kv.get(key, default_buffer_prototype())).to_bytes())
    raw[2_000_001] ^= 1  # in a later piece than the first
    sync(kv.set(key, default_buffer_prototype().buffer.from_bytes(bytes(raw))))
    with pytest.raises(CorruptBlockError, match="fails its crc32c"):
        store.read_block("X", 0)


# -- resume --------------------------------------------------------------------------


class _FailAt:
    """``block -> arrays`` of an id store that fails at one block (an interrupted run)."""

    def __init__(self, arrays, block_rows: int, fail: int | None) -> None:
        self.arrays, self.block_rows, self.fail = arrays, block_rows, fail

    def __call__(self, b: int):
        if b == self.fail:
            raise RuntimeError("interrupted")
        return {k: v[b * self.block_rows : (b + 1) * self.block_rows] for k, v in self.arrays.items()}


def test_interrupted_generate_resumes_through_s3(s3_url):
    arrays = id_arrays(1000)
    layout = layout_for(1000, {k: shardset.FieldSpec.of(v) for k, v in arrays.items()}, block_rows=100)
    with pytest.raises(RuntimeError, match="interrupted"):
        write_blocks(s3_url, layout, _FailAt(arrays, 100, fail=6), workers=1, progress=False)
    assert BlockStore.open(s3_url).missing_blocks() == [6, 7, 8, 9]
    written = []

    def record(b):
        written.append(b)
        return _FailAt(arrays, 100, None)(b)

    write_blocks(s3_url, layout, record, workers=1, progress=False)
    assert written == [6, 7, 8, 9]
    store = BlockStore.open(s3_url)
    store.require_complete()
    np.testing.assert_array_equal(np.concatenate([store.read_block("y", b) for b in range(10)]), arrays["y"])


def test_reader_resumes_mid_epoch_through_s3(s3_url):
    shardset.write(s3_url, id_arrays(1000), block_rows=128, progress=False)
    full = [y.tolist() for _, y in ShardedDataset(s3_url, 50, seed=3)]
    ds = ShardedDataset(s3_url, 50, seed=3)
    it = iter(ds)
    first = [next(it)[1].tolist() for _ in range(7)]
    state = ds.state_dict()
    resumed = ShardedDataset(s3_url, 50, seed=3)
    resumed.load_state_dict(state)
    assert first + [y.tolist() for _, y in resumed] == full


def test_slices_stream_through_s3_as_they_do_locally(s3_url, tmp_path):
    """Sub-block mixing over ranged GETs: the slice checksums travel with the store,
    and the stream is the local one."""
    local = str(tmp_path / "local.zarr")
    for where in (s3_url, local):
        shardset.write(where, id_arrays(1000), block_rows=128, progress=False)
    kw = dict(seed=3, slice_mb=20 * 20 / 2**20, window_blocks=2)  # 20-row slices of 20-byte rows
    remote = [y.tolist() for _, y in ShardedDataset(s3_url, 50, **kw)]
    assert remote == [y.tolist() for _, y in ShardedDataset(local, 50, **kw)]
    assert sorted(sum(remote, [])) == list(range(1000))


# -- worker processes ----------------------------------------------------------------


@pytest.mark.slow
def test_dataloader_workers_open_their_own_store(s3_url):
    """Two spawned-by-forkserver workers each open the store themselves (a store
    handle never crosses a process boundary) and split the rows exactly once."""
    shardset.write(s3_url, id_arrays(1000), block_rows=128, progress=False)
    ds = ShardedDataset(s3_url, 64, seed=5)
    next(iter(ds))  # the parent has done I/O through obstore before the workers start
    loader = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=2, multiprocessing_context="forkserver",
                                         timeout=120)
    ids = np.concatenate([y.numpy() for _, y in loader])
    assert np.array_equal(np.sort(ids), np.arange(1000))


def test_forked_worker_gets_a_clear_error_instead_of_hanging(s3_url):
    shardset.write(s3_url, id_arrays(200), block_rows=64, progress=False)
    ds = ShardedDataset(s3_url, 64)
    loader = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=1, multiprocessing_context="fork", timeout=60)
    with pytest.raises(StoreURLError, match="forkserver"):
        list(loader)


# -- where the options come from -------------------------------------------------------


def test_endpoint_and_keys_from_the_aws_profile_files(s3_server, s3_url, tmp_path, monkeypatch):
    shardset.write(s3_url, id_arrays(300), block_rows=100, progress=False)
    (tmp_path / "config").write_text(f"[profile lab]\nregion = us-east-1\nendpoint_url = {s3_server}\n")
    (tmp_path / "credentials").write_text("[lab]\naws_access_key_id = fromfile\naws_secret_access_key = fromfile\n")
    for var in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_REGION"):
        monkeypatch.delenv(var)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "credentials"))
    monkeypatch.setenv("AWS_PROFILE", "lab")
    store = BlockStore.open(s3_url)  # nothing in the environment but the profile: the files must be used
    assert store.read_block("y", 2).tolist() == list(range(200, 300))


def test_memory_store_round_trips_in_process():
    url = f"memory://{uuid.uuid4().hex}/reg.zarr"
    store = shardset.generate_regression(url, rows=1000, features=2, block_rows=300, workers=2, progress=False)
    assert store.missing_blocks() == []
    assert len(list(ShardedDataset(url, 100))) == 10


def test_memory_stores_in_one_bucket_are_apart():
    """memory://BUCKET/A and memory://BUCKET/B are two stores, as on S3: writing B did
    resume A's blocks, and overwriting a third store wiped A."""
    bucket = f"memory://{uuid.uuid4().hex}"
    shardset.write(f"{bucket}/a.zarr", {"y": np.arange(4)}, block_rows=2, progress=False)
    shardset.write(f"{bucket}/b.zarr", {"y": np.arange(4) * 100}, block_rows=2, progress=False)
    shardset.write(f"{bucket}/c.zarr", {"z": np.zeros(3)}, block_rows=2, progress=False, overwrite=True)
    assert BlockStore.open(f"{bucket}/a.zarr").read_block("y", 1).tolist() == [2, 3]
    assert BlockStore.open(f"{bucket}/b.zarr").read_block("y", 1).tolist() == [200, 300]
    assert list(BlockStore.open(f"{bucket}/c.zarr").layout.fields) == ["z"]


# -- network failures ------------------------------------------------------------------

FAST_FAIL = {"max_retries": "0", "access_key_id": "k", "secret_access_key": "s", "region": "us-east-1"}


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nothing listens there once the socket is closed


def test_unreachable_endpoint_is_a_typed_one_line_error(capsys):
    endpoint = f"http://127.0.0.1:{_closed_port()}"
    url = f"s3://{BUCKET}/x.zarr"
    with pytest.raises(StoreIOError, match=r"opening s3://shardset-test/x.zarr failed: connection refused") as exc:
        BlockStore.open(url, storage_options={**FAST_FAIL, "endpoint": endpoint})
    assert exc.value.errno == 111
    opts = [f"--storage-option={k}={v}" for k, v in {**FAST_FAIL, "endpoint": endpoint}.items()]
    for argv in (["info", url], ["generate", url, "--rows", "10", "--features", "1", "--quiet"],
                 ["shuffle", url, url + "2", "--quiet"], ["quality", url]):
        assert main([*argv, *opts]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "connection refused" in err[0], err


def test_unanswered_requests_time_out_as_a_typed_error():
    with socket.socket() as silent:  # accepts connections (the kernel does) but never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        opts = {**FAST_FAIL, "endpoint": f"http://127.0.0.1:{silent.getsockname()[1]}", "timeout": "300ms"}
        with pytest.raises(StoreIOError, match="failed: timed out"):
            BlockStore.open(f"s3://{BUCKET}/x.zarr", storage_options=opts)


def test_block_reads_from_a_stopped_server_are_a_typed_error(tmp_path):
    with local_s3_server("going-away", log=tmp_path / "moto.log") as endpoint:
        opts = {**FAST_FAIL, "endpoint": endpoint}
        url = "s3://going-away/ids.zarr"
        shardset.write(url, id_arrays(300), block_rows=100, progress=False, storage_options=opts)
        store = BlockStore.open(url, storage_options=opts)
        assert store.read_block("y", 1).tolist() == list(range(100, 200))
    with pytest.raises(StoreIOError, match=r"reading block 2 of field 'y' .* failed: connection refused"):
        store.read_block("y", 2)


def test_retry_options_are_checked():
    with pytest.raises(StoreURLError, match="max_retries must be an integer"):
        BlockStore.open("s3://b/x.zarr", storage_options={"max_retries": "-1"})


# -- shuffle and quality through s3:// ----------------------------------------------------


def test_cli_shuffle_and_quality_through_s3(s3_server, s3_url, tmp_path, capsys):
    opts = ["--storage-option", f"endpoint={s3_server}"]
    local = str(tmp_path / "ids.zarr")
    shardset.write(local, id_arrays(400), block_rows=64, progress=False)
    shardset.write(s3_url, id_arrays(400), block_rows=64, progress=False)
    dst = s3_url.replace("data.zarr", "shuffled.zarr")
    common = ["--seed", "4", "--workers", "1", "--quiet"]
    assert main(["shuffle", s3_url, dst, *common, *opts, "--tmp-dir", str(tmp_path / "buckets")]) == 0
    assert main(["shuffle", local, str(tmp_path / "shuffled.zarr"), *common]) == 0
    _same_blocks(BlockStore.open(dst), BlockStore.open(tmp_path / "shuffled.zarr"))  # the same bytes as locally
    assert not (tmp_path / "buckets").exists() or not any((tmp_path / "buckets").iterdir())
    assert main(["shuffle", local, dst.replace("shuffled", "from-local"), *common, *opts]) == 0  # a local SRC
    # the one-pass method reads its segments with ranged GETs: the same bytes as from a local SRC
    seg = ["--method", "segments", "--segments", "8"]
    assert main(["shuffle", s3_url, dst.replace("shuffled", "segments"), *common, *seg, *opts]) == 0
    assert main(["shuffle", local, str(tmp_path / "segments.zarr"), *common, *seg]) == 0
    _same_blocks(BlockStore.open(dst.replace("shuffled", "segments"), storage_options={"endpoint": s3_server}),
                 BlockStore.open(tmp_path / "segments.zarr"))

    capsys.readouterr()
    assert main(["quality", dst, "--batch-size", "50", "--id-field", "y", "--json", *opts]) == 0
    remote = json.loads(capsys.readouterr().out)
    assert main(["quality", str(tmp_path / "shuffled.zarr"), "--batch-size", "50", "--id-field", "y", "--json"]) == 0
    here = json.loads(capsys.readouterr().out)
    assert remote["path"] == dst and remote["rows"] == 400
    assert {k: v for k, v in remote.items() if k != "path"} == {k: v for k, v in here.items() if k != "path"}


def test_shuffle_refuses_storage_options_for_local_stores(tmp_path):
    with pytest.raises(StoreURLError, match="apply to object stores"):
        shardset.shuffle_store(tmp_path / "a.zarr", tmp_path / "b.zarr", storage_options={"region": "x"})


def test_write_shuffled_takes_storage_options(s3_server, s3_url, tmp_path):
    opts = {"endpoint": s3_server}
    data = id_arrays(300)
    shardset.write(tmp_path / "here.zarr", data, block_rows=64, shuffle=True, seed=3, progress=False)
    here = BlockStore.open(tmp_path / "here.zarr")
    shardset.write(s3_url, data, block_rows=64, shuffle=True, seed=3, progress=False, storage_options=opts)
    _same_blocks(BlockStore.open(s3_url, storage_options=opts), here)
    batches = ({k: v[a : a + 70] for k, v in data.items()} for a in range(0, 300, 70))
    url = s3_url.replace("data.zarr", "batches.zarr")
    shardset.write(url, batches, rows=300, block_rows=64, shuffle=True, seed=3, progress=False, storage_options=opts)
    _same_blocks(BlockStore.open(url, storage_options=opts), here)


def test_writes_to_a_server_that_goes_away_are_a_typed_error(tmp_path):
    with contextlib.ExitStack() as server:
        endpoint = server.enter_context(local_s3_server("going-away", log=tmp_path / "moto.log"))
        data = id_arrays(400)

        def batches():
            for a in range(0, 400, 100):
                if a == 200:
                    server.close()  # the server goes away after two blocks
                yield {k: v[a : a + 100] for k, v in data.items()}

        # a new connection is refused; one kept alive from before is reset or closed under its request
        causes = {"connection refused": 111, "connection reset by peer": 104, "the server closed the connection": None}
        with pytest.raises(StoreIOError, match=rf"^writing s3://going-away/ids.zarr failed: ({'|'.join(causes)}) "
                                               r"\(.*the finished blocks are kept: fix the cause and rerun to resume$") as exc:
            shardset.write("s3://going-away/ids.zarr", batches(), rows=400, block_rows=100, progress=False,
                           storage_options={**FAST_FAIL, "endpoint": endpoint})
    assert exc.value.errno == causes[str(exc.value).split("failed: ")[1].split(" (")[0]]


# -- one writer per object-store store --------------------------------------------------


def _in_thread(fn):
    """``fn()``'s result or exception, run on another thread (another writer of this process)."""
    out = {}

    def run():
        try:
            out["result"] = fn()
        except Exception as exc:  # handed to the test
            out["error"] = exc

    t = threading.Thread(target=run)
    t.start()
    t.join()
    return out


def test_second_writer_of_an_s3_store_is_refused(s3_url, capsys):
    lock_url = s3_url + ".lock"
    with writer_lock(s3_url) as lock:
        assert isinstance(lock, RemoteLock) and [o.pid for o in lock.owners()] == [os.getpid()]
        got = _in_thread(lambda: shardset.generate_regression(s3_url, rows=100, features=2, workers=1, progress=False))
        assert isinstance(got["error"], StoreLockedError)
        assert f"is being written by process {os.getpid()}" in str(got["error"]) and lock_url in str(got["error"])
        code = _in_thread(lambda: main(["generate", s3_url, "--rows", "100", "--features", "2", "--quiet"]))
        assert code["result"] == 2 and "is being written by process" in capsys.readouterr().err
    assert RemoteLock(s3_url).owners() == []  # released
    store = shardset.generate_regression(s3_url, rows=100, features=2, workers=1, progress=False)
    assert store.missing_blocks() == [] and RemoteLock(s3_url).owners() == []


def _plant_lock(url: str, owner: dict) -> None:
    lock = RemoteLock(url)
    obstore.put(lock.objects, lock.key, json.dumps({"owners": [owner]}).encode())


def test_stale_s3_lock_is_taken_over_and_a_foreign_one_is_not(s3_url):
    dead = subprocess.Popen(["true"])
    dead.wait()  # a pid of this host that no longer runs
    _plant_lock(s3_url, {"pid": dead.pid, "host": socket.gethostname(), "boot": "", "start": None, "since": 0.0})
    shardset.write(s3_url, id_arrays(100), block_rows=50, progress=False)  # stale: taken over, then released
    assert RemoteLock(s3_url).owners() == []
    _plant_lock(s3_url, {"pid": 1, "host": "elsewhere", "boot": "", "start": None, "since": 0.0})
    with pytest.raises(StoreLockedError, match=r"process 1 on elsewhere .* delete s3://.*data\.zarr\.lock"):
        shardset.write(s3_url, id_arrays(100), block_rows=50, progress=False, overwrite=True)
