"""Smoke tests of the benchmark code (``shardset bench``, ``shardset.bench`` and the
``benchmarks`` scripts) on tiny stores, so it cannot rot. No speed is asserted:
the checks are that every measurement runs, reads the rows it should and reports
its figures. Peers whose environment is not installed are skipped with the reason
(``scripts/bench-peers-setup.sh`` installs them)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import shardset
from shardset import bench
from shardset.cli import main as cli

from benchmarks import bench_matrix, bench_peers, common


@pytest.fixture(scope="module")
def tiny_store(tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("bench") / "tiny.zarr")
    shardset.generate_regression(path, rows=20_000, features=16, block_rows=6_000, workers=1, progress=False)
    return path


@pytest.fixture
def results_in_tmp(tmp_path, monkeypatch):
    """Benchmark scripts save their JSON and PNG under tmp_path, not in the repository."""
    monkeypatch.setattr(common, "RESULTS_DIR", tmp_path / "results")
    monkeypatch.setattr(common, "PLOTS_DIR", tmp_path / "plots")
    return tmp_path


def test_shardset_bench_cli_quick(tmp_path, capsys):
    png, out = tmp_path / "b.png", tmp_path / "b.json"
    assert cli(["bench", str(tmp_path), "--quick", "--size", "2MB", "--png", str(png), "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    res = json.loads(out.read_text())
    assert png.stat().st_size > 0
    rows = 2_000_000 // 68
    for name in ("sequential read, cold", "block-shuffled read, warm", "naive random read, cold", "write: generate_regression"):
        assert name in printed
        fig = res["figures"][name]
        assert fig["gb_per_s"]["median"] > 0 and fig["ratio"]["median"] > 0 and fig["rows"] == rows
    assert res["figures"]["disk: O_DIRECT read (cold)"]["gb_per_s"]["median"] > 0
    assert not [p for p in tmp_path.iterdir() if p.name.startswith("shardset-bench-")]  # scratch removed


def test_shardset_bench_cli_refuses_bad_input(tmp_path, capsys):
    assert cli(["bench", str(tmp_path / "missing"), "--quick"]) == 2
    assert "is not a directory" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        cli(["bench", str(tmp_path), "--size", "lots"])
    assert exc.value.code == 2


def test_measurements_on_a_tiny_store(tiny_store, tmp_path):
    store = shardset.BlockStore.open(tiny_store)
    files = [store.chunk_path(f, b) for f in ("X", "y") for b in range(store.layout.num_blocks)]
    size = sum(os.path.getsize(p) for p in files)
    assert bench.fsync_write(tmp_path, 3 << 20, piece=1 << 20, fsync_every=1 << 20)["bytes"] == 3 << 20
    assert not list(tmp_path.iterdir())  # the probe file is removed
    bench.evict(files)
    try:
        assert bench.direct_read(files)["bytes"] == size
    except OSError as exc:  # a filesystem without O_DIRECT (tmpfs)
        pytest.skip(f"O_DIRECT not supported here: {exc}")
    assert bench.buffered_read(files)["bytes"] == size
    for shuffle in (False, True):
        r = bench.shardset_read(tiny_store, 1000, shuffle=shuffle)
        assert (r["rows"], r["batches"], r["partial"]) == (20_000, 20, False)
    r = bench.shardset_read(tiny_store, 1000, max_batches=3, num_workers=1)
    assert (r["rows"], r["partial"]) == (3000, True)
    n = bench.naive_read(tiny_store, 1000, seconds=0.2)
    assert n["extrapolated"] and 0 < n["rows"] <= 20_000 and n["epoch_s_extrapolated"] > 0


def test_memmap_rows_are_the_store_rows(tiny_store):
    ds = bench.MemmapRows(tiny_store)
    store = shardset.BlockStore.open(tiny_store)
    X, y = ds[13_001]
    assert X.tolist() == store.read_block("X", 2)[1001].tolist() and y.tolist() == store.read_block("y", 2)[1001].tolist()


@pytest.mark.parametrize("only", ["shardset", "", "tensordataset,nope"])
def test_peers_only_names_a_contender(only, capsys):
    with pytest.raises(SystemExit) as exc:
        bench_peers.parse_args(["--only", only])
    assert exc.value.code == 2 and "--only takes contenders among 'shardset block-shuffled'" in capsys.readouterr().err


def test_peers_only_keeps_the_named_contenders():
    assert bench_peers.parse_args(["--only", "tensordataset,litdata"]).only == "tensordataset,litdata"


@pytest.mark.parametrize("kind", [k for k, (env, _) in bench_peers.CONTENDERS.items() if env == "main"])
def test_peer_contender_in_this_environment(kind, tiny_store, tmp_path):
    what = bench_peers.CONTENDERS[kind][1]
    cfg = {"store": tiny_store, "dir": str(tmp_path / what), "batch_size": 1000, "seed": 0, "features": 16, "seconds": 0.2,
           "rows": 20_000, "wds_buffer": 100, "wds_rows": 3000, "one_epoch": True}
    if what.startswith("webdataset"):
        why = bench_peers.availability(sys.executable)[kind]
        if why:
            pytest.skip(why)
        cfg["rows"] = bench_peers._prepare(what, tiny_store, cfg["dir"], cfg)["rows"]
    r = bench_peers._read(kind, cfg)
    assert r["rows"] > 0 and r["peak_rss"] > 0 and r["first_batch_s"] > 0
    if not r["partial"]:
        assert r["rows"] == cfg["rows"]


@pytest.mark.parametrize("kind,fmt", [("mosaicml streaming", "mds"), ("litdata", "litdata")])
def test_peer_contender_in_the_peers_environment(kind, fmt, tiny_store, tmp_path):
    python = str(bench_peers.PEERS_PYTHON)
    why = bench_peers.availability(python)[kind]
    if why:
        pytest.skip(why)
    cfg = {"store": tiny_store, "dir": str(tmp_path / fmt), "batch_size": 1000, "seed": 0, "features": 16, "seconds": 0.2,
           "rows": 20_000, "one_epoch": True}
    prep = bench_peers.run_child(python, {**cfg, "op": "prepare", "kind": fmt})
    assert "error" not in prep, prep
    r = bench_peers.run_child(python, {**cfg, "op": "read", "kind": kind}, timeout=300)
    assert "error" not in r and r["rows"] > 0, r


def test_matrix_script_end_to_end(results_in_tmp, tmp_path):
    res = bench_matrix.main(["--quick", "--gib", "0.002", "--worker-seconds", "0.2", "--no-cold", "--data-dir", str(tmp_path / "d")])
    assert (results_in_tmp / "results" / "matrix_quick.json").exists() and (results_in_tmp / "plots" / "matrix_quick.png").exists()
    assert set(res["results"]["warm"]) == set(bench_matrix.CONFIGS)
    assert all(len(f["gb_per_s"]["runs"]) == 3 for f in res["results"]["warm"].values())


def test_common_options_and_rows_for():
    p = common.arg_parser("bench_x", "doc")
    p.add_argument("--gib", type=float, default=None)
    a = common.parse_args(p, ["--quick"], {"gib": (4.0, 0.25)})
    assert (a.gib, a.name, a.repeats) == (0.25, "x_quick", 3)
    with pytest.raises(SystemExit):
        common.parse_args(p, ["--repeats", "2"])
    assert common.rows_for(0.001, 16, 128) == (1 << 30) // 1000 // 68
    assert common.rows_for(1.0, 16, 128) % shardset.format.block_rows_for(
        {"X": shardset.FieldSpec("float32", (16,)), "y": shardset.FieldSpec("float32", (1,))}, 128) == 0


# Every script end to end on a tiny store, the figures going to tmp_path (bench_matrix above; the
# peers through their contenders above). Sizes are the smallest each script accepts.
SCRIPTS = {
    "bench_read": ["--quick", "--rows", "30000", "--naive-seconds", "0.2", "--variant-seconds", "0.2",
                   "--warmup-blocks", "1", "--no-profile"],
    "bench_write": ["--quick", "--gib", "0.01", "--sweep-gib", "0.005", "--disk-gib", "0.01", "--gen-mib", "4",
                    "--gen-passes", "1", "--block-mbs", "64", "--ds", "2", "--codecs", "none"],
    "bench_scale": ["--quick", "--sizes", "0.005", "--big-gb", "100"],
    "bench_slices": ["--quick", "--rows", "8192", "--block-rows", "512", "--read-gib", "0.01"],
    "bench_permutation": ["--quick"],
    "bench_s3": ["--quick", "--s3-mib", "4", "--block-mib", "1", "--prefetch", "1", "--parts", "1", "--dask-mib", "4"],
    "soak": ["--quick", "--rows", "20000", "--blocks", "4", "--epochs", "3", "--workers", "2", "--warmup", "1"],
    "convergence": ["--quick", "--rows", "4096", "--block-rows", "512", "--seeds", "1", "--epochs", "1"],
    "shuffle_quality": ["--quick", "--rows", "8192", "--block-rows", "512", "--read-mib", "4", "--read-block-mib", "1",
                        "--shuffle-mib", "4", "--shuffle-block-mib", "1", "--repeats", "1"],
}


@pytest.mark.slow
@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_script_end_to_end(script, results_in_tmp, tmp_path):
    import importlib

    module = importlib.import_module(f"benchmarks.{script}")
    data = [] if script == "bench_permutation" else ["--data-dir", str(tmp_path / "d")]
    cores = os.sched_getaffinity(0)
    res = module.main([*SCRIPTS[script], *data, "--name", "smoke"])
    assert os.sched_getaffinity(0) == cores  # a script that pins itself gives the cores back
    assert isinstance(res, dict) and res
    assert (results_in_tmp / "results" / "smoke.json").exists()
    assert (results_in_tmp / "plots" / "smoke.png").exists()
    if script == "bench_read":  # every warm contender ran, the worker diagnostic too
        assert {k: v["rows"] > 0 for k, v in res["warm"].items()} == {k: True for k, _ in module.WARM_CONFIGS}


def test_importing_the_scripts_leaves_the_environment_alone():
    """Subprocesses of whoever imports a benchmark (the test suite's DataLoader workers,
    torchrun) inherit its environment: no script may set thread counts there."""
    imports = "; ".join(f"import benchmarks.{script}" for script in sorted(SCRIPTS))
    code = f"import os; before = dict(os.environ); {imports}; assert dict(os.environ) == before, 'changed'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[1])


def test_ready_batches_split_over_workers():
    from torch.utils.data import DataLoader

    from benchmarks.bench_read import ReadyBatches

    batches = list(DataLoader(ReadyBatches(5, 8, 3), batch_size=None, num_workers=2))
    assert len(batches) == 5
    for X, y in batches:
        assert X.shape == (8, 3) and y.shape == (8, 1)
        assert X.untyped_storage().data_ptr() == y.untyped_storage().data_ptr()  # one segment a batch


@pytest.mark.parametrize("text", ["inf", "1e400", "nan", "-1", "ten"])
def test_bench_sizes_are_finite_positive_byte_counts(text):
    with pytest.raises(ValueError, match="size"):
        bench.parse_size(text)


def test_the_slice_target_takes_the_fastest_reader_that_mixes_enough():
    from benchmarks.bench_slices import budget_target

    def q(*batches):
        return {k: {"reader": {"effective_batch": {"median": v}}} for k, v in zip("abc", batches)}

    def r(*ratios):
        return {k: {"median": v} for k, v in zip("abc", ratios)}

    got = budget_target(q(200, 100, 250), r(0.7, 0.9, 0.6), 256)  # b: fastest, but b/VIF under b/2
    assert (got["value"], got["verdict"]) == ("a: b/VIF 200 at 0.70 of O_DIRECT", "MISSED")
    assert budget_target(q(200, 100, 250), r(0.7, 0.9, 0.85), 256)["verdict"] == "MET"
    got = budget_target(q(20, 100, 50), r(0.7, 0.9, 0.85), 256)  # none mixes enough: the fastest, missed
    assert (got["value"], got["verdict"]) == ("b: b/VIF 100 at 0.90 of O_DIRECT", "MISSED")
