"""The command line: the happy path end to end, and one-line errors for bad input."""

import json
import subprocess
import sys

import numpy as np
import pytest
import zarr

import shardset
from shardset.cli import main


def run(*args, check_rc=None):
    proc = subprocess.run([sys.executable, "-m", "shardset", *map(str, args)], capture_output=True, text=True, timeout=300)
    if check_rc is not None:
        assert proc.returncode == check_rc, proc.stderr
    return proc


def test_generate_info_read_train(tmp_path):
    path = tmp_path / "demo.zarr"
    run("generate", path, "--rows", 30000, "--features", 3, "--block-rows", 7000, "--seed", 4, "--quiet", check_rc=0)
    info = json.loads(run("info", path, "--json", check_rc=0).stdout)
    assert info["rows"] == 30000 and info["blocks"] == 5 and info["complete"] is True
    assert info["fields"]["X"] == {"dtype": "float32", "shape": [3]}
    assert info["codecs"]["X"] == ["bytes", "crc32c"] and info["generator"]["seed"] == 4
    text = run("info", path, check_rc=0).stdout
    assert "30,000" in text and "complete" in text
    out = run("read", path, "--epochs", 2, "--batch-size", 512, check_rc=0).stdout
    assert out.count("30,000 rows") == 2 and "MiB/s" in out
    out = run("train", path, "--epochs", 2, "--batch-size", 64, "--lr", 0.05, check_rc=0).stdout
    assert "epoch 1: loss" in out and "rows/s" in out
    err = [float(x) for x in out.split("max |w - w_true| = ")[1].replace(", |b - b_true| =", "").split()]
    assert max(err) < 1e-2


def test_generate_prints_a_summary_and_resumes_quietly(tmp_path, capsys):
    path = str(tmp_path / "s.zarr")
    assert main(["generate", path, "--rows", "1000", "--features", "2", "--block-rows", "100", "--workers", "1"]) == 0
    assert "1,000 rows x 2 features in 10 blocks" in capsys.readouterr().out
    assert main(["generate", path, "--rows", "1000", "--features", "2", "--block-rows", "100", "--quiet"]) == 0
    assert capsys.readouterr().out == ""


def cli(capsys, *args):
    """Run the CLI in-process: (exit code, stderr lines)."""
    try:
        rc = main([str(a) for a in args])
    except SystemExit as exc:  # argparse errors exit directly
        rc = exc.code
    return rc, capsys.readouterr().err.strip().splitlines()


@pytest.mark.parametrize(
    "args,needle",
    [
        (["generate", "{p}", "--rows", "0", "--features", "3"], "--rows"),
        (["generate", "{p}", "--rows", "-4", "--features", "3"], "--rows"),
        (["generate", "{p}", "--rows", "ten", "--features", "3"], "--rows"),
        (["generate", "{p}", "--rows", "10", "--features", "0"], "--features"),
        (["generate", "{p}", "--rows", "10", "--features", "2", "--block-mb", "8"], "block_mb"),
        (["generate", "{p}", "--rows", "10", "--features", "2", "--noise", "nan"], "--noise"),
        (["generate", "{p}", "--rows", "10"], "--features"),
        (["generate", "/proc/shardset-cannot-be-here", "--rows", "10", "--features", "2"], "cannot create"),
        (["generate", "{p}/a-file/s.zarr", "--rows", "10", "--features", "2"], "cannot create"),
        (["info", "{p}/missing"], "not a shardset store"),
        (["info", "{p}/a-file"], "not a shardset store"),
        (["read", "{p}/missing"], "not a shardset store"),
        (["train", "{p}/missing"], "not a shardset store"),
        (["read", "{p}", "--batch-size", "0"], "--batch-size"),
        (["frobnicate"], "invalid choice"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys, args, needle):
    (tmp_path / "a-file").write_text("not a store")
    rc, lines = cli(capsys, *[a.replace("{p}", str(tmp_path)) for a in args])
    assert rc == 2
    assert len(lines) == 1, lines
    assert needle in lines[0] and "Traceback" not in lines[0]


def test_errors_in_a_real_process_have_no_traceback(tmp_path):
    proc = run("info", tmp_path / "missing")
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr


def test_incompatible_store_is_refused_and_kept(tmp_path, capsys):
    path = tmp_path / "s.zarr"
    assert main(["generate", str(path), "--rows", "500", "--features", "2", "--block-rows", "100", "--quiet"]) == 0
    before = zarr.open_group(str(path), mode="r")["X"][:]
    rc, lines = cli(capsys, "generate", path, "--rows", 500, "--features", 2, "--block-rows", 100, "--seed", 9)
    assert rc == 2 and len(lines) == 1 and "--overwrite" in lines[0]
    np.testing.assert_array_equal(zarr.open_group(str(path), mode="r")["X"][:], before)
    assert cli(capsys, "generate", path, "--rows", 500, "--features", 2, "--block-rows", 100, "--seed", 9,
               "--overwrite", "--quiet")[0] == 0


def test_incomplete_store_is_reported_by_info_and_refused_by_read(tmp_path, capsys):
    path = tmp_path / "s.zarr"
    batches = iter([{"x": np.zeros((10, 2), np.float32)}])
    with pytest.raises(ValueError):
        shardset.write(path, batches, rows=40, block_rows=10)
    assert main(["info", str(path)]) == 0
    assert "INCOMPLETE: 3 of 4 blocks missing" in capsys.readouterr().out
    rc, lines = cli(capsys, "read", path)
    assert rc == 2 and len(lines) == 1 and "incomplete" in lines[0]
