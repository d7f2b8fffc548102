"""The command line: the happy path end to end, and one-line errors for bad input."""

import json
import re
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


def test_an_error_in_a_dataloader_worker_is_its_own_message(tmp_path):
    path = tmp_path / "s.zarr"
    run("generate", path, "--rows", 5000, "--features", 4, "--block-rows", 1000, "--workers", 1, "--quiet", check_rc=0)
    chunk = path / "X" / "c" / "2" / "0"
    data = bytearray(chunk.read_bytes())
    data[len(data) // 3] ^= 0x40
    chunk.write_bytes(data)
    proc = run("read", path, "--workers", 2)
    assert proc.returncode == 2
    assert proc.stderr == f"shardset: error: block 2 of field 'X' ({chunk}) fails its crc32c checksum\n"


def test_lz4_stores_print_no_zarr_warning(tmp_path):
    path = tmp_path / "s.zarr"
    assert run("generate", path, "--rows", 2000, "--features", 2, "--block-rows", 500, "--compression", "lz4",
               "--workers", 1, "--quiet", check_rc=0).stderr == ""
    assert run("info", path, check_rc=0).stderr == ""
    assert run("info", tmp_path / "missing").stderr.count("\n") == 1


def test_train_reports_the_throughput_of_the_fields_it_reads(tmp_path):
    rows = 20_000
    path = shardset.write(tmp_path / "s.zarr", {
        "X": np.ones((rows, 4), np.float32), "y": np.ones((rows, 1), np.float32),
        "wide": np.zeros((rows, 256), np.float32),  # 1 KiB a row that train never reads
    }, block_rows=5000, progress=False).where
    line = run("train", path, "--epochs", 1, check_rc=0).stdout.splitlines()[0]
    figures = re.search(r"([\d,]+) rows/s \(([\d,]+) MiB/s\)", line).groups()
    rows_per_s, mib_per_s = (float(x.replace(",", "")) for x in figures)
    assert mib_per_s == pytest.approx(rows_per_s * 20 / 2**20, abs=1)  # X and y: 20 bytes a row


def test_generate_and_shuffle_report_what_this_run_wrote(tmp_path, capsys):
    path, dst = str(tmp_path / "s.zarr"), str(tmp_path / "d.zarr")
    shape = ["--rows", "1000", "--features", "2", "--block-rows", "100", "--workers", "1"]
    assert main(["generate", path, *shape, "--part", "0/4"]) == 0
    assert ", 3 written: 0.00 GiB in " in capsys.readouterr().out  # blocks 0, 4, 8
    assert main(["generate", path, *shape, "--part", "0/4"]) == 0
    assert capsys.readouterr().out.endswith("in 10 blocks, part 0/4 already complete\n")
    assert main(["generate", path, *shape]) == 0
    assert ", 7 written: " in capsys.readouterr().out
    assert main(["generate", path, *shape]) == 0
    assert capsys.readouterr().out.endswith("in 10 blocks, already complete\n")
    assert main(["shuffle", path, dst, "--workers", "1"]) == 0
    assert "1,000 rows shuffled into 10 blocks, 10 written: " in capsys.readouterr().out
    assert main(["shuffle", path, dst, "--workers", "1"]) == 0
    assert capsys.readouterr().out.endswith("shuffled into 10 blocks, already complete\n")


def test_bench_checks_its_outputs_first_and_saves_the_json_before_the_plot(tmp_path, capsys):
    rc, lines = cli(capsys, "bench", tmp_path, "--quick", "--size", "1MB", "--png", tmp_path / "nodir" / "b.png",
                    "--json", tmp_path / "b.json")
    assert rc == 2 and lines == [f"shardset: error: cannot save {tmp_path}/nodir/b.png: no directory {tmp_path}/nodir"]
    assert not (tmp_path / "b.json").exists()
    (tmp_path / "a-dir.png").mkdir()  # passes the check, then the plot cannot be saved over it
    rc, lines = cli(capsys, "bench", tmp_path, "--quick", "--size", "1MB", "--png", tmp_path / "a-dir.png",
                    "--json", tmp_path / "b.json")
    assert rc == 2 and len(lines) == 1
    assert json.loads((tmp_path / "b.json").read_text())["figures"]


@pytest.mark.parametrize("command", ["generate", "shuffle"])
def test_quiet_help_says_it_drops_the_summary(capsys, command):
    with pytest.raises(SystemExit):
        main([command, "--help"])
    assert "--quiet no progress bar and no summary line" in " ".join(capsys.readouterr().out.split())
