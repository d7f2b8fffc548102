"""Shared helpers for the benchmark scripts.

* :func:`machine_description` - what the numbers were measured on (CPU, cores, RAM,
  filesystem of the data directory, kernel, library versions, date).
* :func:`summarize` / :func:`fmt` - every figure is a median of several runs with
  its min and max; ratios are computed per run (pairs measured back to back) and
  from the medians.
* :class:`RssSampler` - peak RSS of a process tree, sampled on a thread.
* :func:`baseline_rss` - RSS (and import time) of a fresh interpreter that has
  imported torch, numpy, zarr and shardset: the floor every process pays.
* :func:`evict_verified` / :func:`resident_bytes` / :func:`warm` - page-cache control
  (``shardset.bench.evict``: ``posix_fadvise(DONTNEED)``) and a ``mincore(2)`` check of
  what is still cached.
* :func:`arg_parser` / :func:`parse_args` / :func:`replot` - the options every benchmark takes.
* :func:`data_root` - a scratch directory (never inside the repository) that is
  removed at the end.
* :func:`save_json`, :func:`plot_path`, :func:`print_table`.

The raw disk and reader measurements themselves live in :mod:`shardset.bench`
(also behind ``shardset bench``), so each figure is made by one piece of code;
this module imports shardset only inside the functions that use it, so the peer
benchmark's subprocesses can use it in environments without shardset.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = REPO_ROOT / "benchmarks" / "results"
PLOTS_DIR = REPO_ROOT / "benchmarks" / "plots"
DEFAULT_DATA_PARENT = Path(tempfile.gettempdir()) / "shardset-bench"

GiB = 1 << 30
MiB = 1 << 20
GB = 1e9


# -- machine description -------------------------------------------------------------


def filesystem_of(path: str | os.PathLike) -> dict[str, str]:
    """Mount point, filesystem type, device and options of ``path`` (from /proc/mounts)."""
    target = os.path.realpath(path)
    best: dict[str, str] = {}
    try:
        with open("/proc/mounts") as f:
            for line in f:
                parts = line.split()
                if len(parts) < 4:
                    continue
                dev, mnt, fstype, opts = parts[:4]
                mnt = mnt.replace("\\040", " ")
                inside = target == mnt or target.startswith(mnt.rstrip("/") + "/")
                if inside and len(mnt) >= len(best.get("mount_point", "")):
                    best = {"mount_point": mnt, "fstype": fstype, "device": dev, "options": opts}
    except OSError:
        pass
    return best or {"mount_point": "?", "fstype": "unknown", "device": "?", "options": ""}


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _cpu_flag(flag: str) -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return flag in line.split()
    except OSError:
        pass
    return False


def _version(module: str) -> str | None:
    try:
        mod = __import__(module)
    except Exception:
        return None
    return str(getattr(mod, "__version__", "?"))


def _git_state() -> dict[str, Any]:
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10
        )
        changed = [line[3:] for line in dirty.stdout.splitlines() if line.strip()]
        return {"commit": head.stdout.strip() or None, "uncommitted_changes": bool(changed), "changed_files": changed}
    except Exception:
        return {"commit": None, "uncommitted_changes": None}


def machine_description(data_dir: str | os.PathLike | None = None) -> dict[str, Any]:
    """A JSON-able description of the machine and software the benchmark ran on."""
    import psutil

    vm = psutil.virtual_memory()
    try:
        affinity = len(os.sched_getaffinity(0))
    except AttributeError:
        affinity = os.cpu_count()
    desc: dict[str, Any] = {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "cpu_model": _cpu_model(),
        "cpu_logical_cores": os.cpu_count(),
        "cpu_physical_cores": psutil.cpu_count(logical=False),
        "cpu_affinity_cores": affinity,
        "virtualized": _cpu_flag("hypervisor"),
        "ram_total_bytes": int(vm.total),
        "ram_total_gib": round(vm.total / GiB, 2),
        "ram_available_gib_at_start": round(vm.available / GiB, 2),
        "loadavg_at_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "kernel": platform.release(),
        "os": platform.platform(),
        "python": sys.version.split()[0],
        "python_implementation": platform.python_implementation(),
        "versions": {m: _version(m) for m in ("torch", "numpy", "zarr", "numcodecs", "crc32c", "psutil", "shardset")},
        "git": _git_state(),
    }
    try:
        import torch

        desc["torch_num_threads"] = torch.get_num_threads()
    except Exception:
        pass
    if data_dir is not None:
        fs = filesystem_of(data_dir)
        usage = shutil.disk_usage(data_dir)
        desc["data_dir"] = str(data_dir)
        desc["data_dir_filesystem"] = fs
        desc["data_dir_free_gib_at_start"] = round(usage.free / GiB, 1)
    return desc


def describe_machine_line(desc: dict[str, Any]) -> str:
    fs = desc.get("data_dir_filesystem", {})
    return (
        f"{desc['cpu_model']}, {desc['cpu_affinity_cores']} cores, {desc['ram_total_gib']} GiB RAM, "
        f"data on {fs.get('fstype', '?')} ({fs.get('device', '?')}), kernel {desc['kernel']}, "
        f"python {desc['python']}, torch {desc['versions'].get('torch')}, numpy {desc['versions'].get('numpy')}, "
        f"zarr {desc['versions'].get('zarr')}, {desc['date']}"
    )


# -- statistics and printing ---------------------------------------------------------


def summarize(values: Iterable[float]) -> dict[str, Any]:
    """``{"median", "min", "max", "n", "runs"}`` of the measured values."""
    vals = [float(v) for v in values]
    if not vals:
        return {"median": None, "min": None, "max": None, "n": 0, "runs": []}
    return {"median": statistics.median(vals), "min": min(vals), "max": max(vals), "n": len(vals), "runs": vals}


def ratio_summary(num: Sequence[float], den: Sequence[float]) -> dict[str, Any]:
    """Ratio of two figures measured in the same run: the ratio of the medians, and
    the median/min/max of the per-round ratios (each pair measured back to back)."""
    pairs = [a / b for a, b in zip(num, den) if b]
    out = summarize(pairs)
    mn, md = statistics.median(num) if num else None, statistics.median(den) if den else None
    out["of_medians"] = (mn / md) if (mn is not None and md) else None
    return out


def fmt(s: dict[str, Any] | None, scale: float = 1.0, digits: int = 2) -> str:
    """``median [min-max]`` of a :func:`summarize` result, times ``scale``."""
    if not s or s.get("median") is None:
        return "-"
    f = f"{{:.{digits}f}}"
    return f"{f.format(s['median'] * scale)} [{f.format(s['min'] * scale)}-{f.format(s['max'] * scale)}]"


def fmt_ratio(s: dict[str, Any] | None, digits: int = 2) -> str:
    """A ratio from :func:`ratio_summary`: the median of the per-round ratios [their
    min-max] (and, in parentheses, the ratio of the medians)."""
    if not s or s.get("median") is None:
        return "-"
    f = f"{{:.{digits}f}}"
    out = f"{f.format(s['median'])} [{f.format(s['min'])}-{f.format(s['max'])}]"
    if s.get("of_medians") is not None:
        out += f" ({f.format(s['of_medians'])})"
    return out


def print_table(headers: Sequence[str], rows: Sequence[Sequence[Any]], title: str | None = None) -> str:
    """Print (and return) a plain-text table."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = []
    if title:
        lines.append(title)
    lines.append("  ".join(h.ljust(w) for h, w in zip(cells[0], widths)))
    lines.append("  ".join("-" * w for w in widths))
    for r in cells[1:]:
        lines.append("  ".join(c.ljust(w) for c, w in zip(r, widths)))
    text = "\n".join(lines)
    print(text, flush=True)
    print(flush=True)
    return text


def verdict(value: float | None, target: float, higher_is_better: bool = True) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    ok = value >= target if higher_is_better else value <= target
    return "MET" if ok else "MISSED"


# -- results ---------------------------------------------------------------------------


def save_json(name: str, payload: dict[str, Any]) -> Path:
    """Write ``benchmarks/results/<name>.json`` atomically; returns the path."""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"{name}.json"
    tmp = path.with_suffix(".json.tmp")
    with open(tmp, "w") as f:
        json.dump(payload, f, indent=2, sort_keys=False, default=_json_default)
        f.write("\n")
    os.replace(tmp, path)
    return path


def _json_default(o: Any) -> Any:
    try:
        import numpy as np

        if isinstance(o, np.generic):
            return o.item()
        if isinstance(o, np.ndarray):
            return o.tolist()
    except ImportError:
        pass
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serializable: {type(o).__name__}")


def plot_path(name: str) -> Path:
    PLOTS_DIR.mkdir(parents=True, exist_ok=True)
    return PLOTS_DIR / f"{name}.png"


def save_plot(fig, name: str, dpi: int = 110) -> Path:
    """Lay out ``fig``, save it as ``plots/<name>.png`` and close it."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path = plot_path(name)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path


def log_axis(ax, axis: str = "x") -> None:
    """Plain-number major labels and no minor labels on a log axis (they overlap otherwise)."""
    from matplotlib.ticker import FuncFormatter, NullFormatter

    target = ax.xaxis if axis == "x" else ax.yaxis
    lo, hi = ax.get_xlim() if axis == "x" else ax.get_ylim()
    ticks = [m * 10.0**e for e in range(-6, 7) for m in (1, 2, 5) if lo <= m * 10.0**e <= hi]
    if ticks:
        (ax.set_xticks if axis == "x" else ax.set_yticks)(ticks)
        (ax.set_xlim if axis == "x" else ax.set_ylim)(lo, hi)
    target.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    target.set_minor_formatter(NullFormatter())


def errbar(s: dict[str, Any], scale: float = 1.0) -> tuple[float, float, float]:
    """(median, lower error, upper error) for matplotlib from a summary."""
    m = s["median"] * scale
    return m, m - s["min"] * scale, s["max"] * scale - m


# -- scratch data directory -------------------------------------------------------------


def exit_on_sigterm() -> None:
    """Turn SIGTERM into SystemExit so that ``finally`` blocks (scratch-directory
    removal, helper-process shutdown) run when a benchmark is killed."""
    import signal

    def _raise(signum, frame):
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, _raise)


@contextlib.contextmanager
def data_root(parent: str | os.PathLike | None, prefix: str) -> Iterator[Path]:
    """A fresh directory under ``parent`` (default /tmp/shardset-bench), removed at exit.

    Refuses a location inside the repository (benchmark data must never end up there).
    """
    parent = Path(parent) if parent is not None else DEFAULT_DATA_PARENT
    parent = parent.expanduser().resolve()
    repo = REPO_ROOT.resolve()
    if parent == repo or repo in parent.parents:
        raise SystemExit(f"--data-dir {parent} is inside the repository {repo}; choose a directory elsewhere (e.g. /tmp)")
    created_parent = not parent.exists()
    parent.mkdir(parents=True, exist_ok=True)
    path = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
        if created_parent:
            with contextlib.suppress(OSError):
                parent.rmdir()


@contextlib.contextmanager
def scratch_run(args: argparse.Namespace, prefix: str) -> Iterator[tuple[Path, dict[str, Any]]]:
    """A benchmark run's fresh scratch directory (:func:`data_root`, from ``--data-dir``)
    and the description of the machine, both printed first; SIGTERM ends the run
    through the directory's removal (:func:`exit_on_sigterm`)."""
    exit_on_sigterm()
    with data_root(args.data_dir, prefix) as root:
        desc = machine_description(root)
        print(f"machine: {describe_machine_line(desc)}")
        print(f"scratch: {root}  (removed at the end)", flush=True)
        yield root, desc


def tree_files(root: str | os.PathLike) -> list[Path]:
    return sorted(p for p in Path(root).rglob("*") if p.is_file())


# -- other load on the machine ----------------------------------------------------------------


def _own_tree_cpu() -> float:
    import psutil

    me = psutil.Process()
    total = 0.0
    for p in [me] + me.children(recursive=True):
        try:
            t = p.cpu_times()
        except psutil.Error:
            continue
        total += t.user + t.system + t.children_user + t.children_system
    return total


class CpuLoad:
    """How busy the machine was while the block ran, and how much of that was not us.

    ``other_busy_cores`` = (all CPU time used on the machine - CPU time of this process
    tree) / wall time: the load of other programs (a shared machine is noisy);
    ``steal_cores`` is time the hypervisor gave to other guests.
    """

    def __enter__(self) -> "CpuLoad":
        import psutil

        self._ps = psutil
        self.t0 = time.monotonic()
        self.sys0 = psutil.cpu_times()
        self.own0 = _own_tree_cpu()
        return self

    def __exit__(self, *exc) -> None:
        self.wall = time.monotonic() - self.t0
        self.sys1 = self._ps.cpu_times()
        self.own1 = _own_tree_cpu()

    def result(self) -> dict[str, float]:
        a, b = self.sys0, self.sys1
        busy = lambda t: sum(t) - t.idle - getattr(t, "iowait", 0.0) - getattr(t, "steal", 0.0) - getattr(t, "guest", 0.0) - getattr(t, "guest_nice", 0.0)  # noqa: E731
        wall = max(self.wall, 1e-9)
        system = (busy(b) - busy(a)) / wall
        own = (self.own1 - self.own0) / wall
        return {
            "wall_s": self.wall,
            "system_busy_cores": system,
            "own_busy_cores": own,
            "other_busy_cores": max(0.0, system - own),
            "steal_cores": (getattr(b, "steal", 0.0) - getattr(a, "steal", 0.0)) / wall,
            "iowait_cores": (getattr(b, "iowait", 0.0) - getattr(a, "iowait", 0.0)) / wall,
        }


# -- memory ---------------------------------------------------------------------------------


def _role(proc, root_pid: int) -> str:
    if proc.pid == root_pid:
        return "parent"
    try:
        cmd = " ".join(proc.cmdline())
    except Exception:
        cmd = ""
    if "resource_tracker" in cmd or "forkserver" in cmd:
        return "helper"
    return "worker"


def anon_rss(pid: int | str = "self") -> int | None:
    """Anonymous resident memory of a process (``RssAnon`` in /proc/PID/status: its data,
    not the libraries it maps), or None off Linux.  A forked child counts the pages it
    inherited, so its anonymous RSS over a fresh interpreter's is what it allocated."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


class RssSampler:
    """Sample the RSS of a process and all its descendants every ``interval`` seconds.

    Use as a context manager; afterwards :meth:`result` gives the peak RSS of each
    process seen (``role`` is ``parent``, ``worker`` or ``helper`` - e.g. the
    multiprocessing resource tracker), and its peak anonymous RSS (:func:`anon_rss`).
    Peaks shorter than the interval can be missed.
    """

    def __init__(self, pid: int | None = None, interval: float = 0.05) -> None:
        import psutil

        self._psutil = psutil
        self.root_pid = os.getpid() if pid is None else pid
        self.interval = interval
        self.peaks: dict[int, dict[str, Any]] = {}
        self.samples = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _sample_once(self) -> None:
        ps = self._psutil
        try:
            root = ps.Process(self.root_pid)
            procs = [root] + root.children(recursive=True)
        except ps.Error:
            return
        for p in procs:
            try:
                rss = p.memory_info().rss
            except ps.Error:
                continue
            rec = self.peaks.get(p.pid)
            if rec is None:
                rec = self.peaks[p.pid] = {"pid": p.pid, "role": _role(p, self.root_pid), "max_rss": 0, "max_anon": None,
                                           "samples": 0}
            rec["max_rss"] = max(rec["max_rss"], rss)
            anon = anon_rss(p.pid)
            if anon is not None:
                rec["max_anon"] = max(rec["max_anon"] or 0, anon)
            rec["samples"] += 1
        self.samples += 1

    def _run(self) -> None:
        while not self._stop.is_set():
            self._sample_once()
            self._stop.wait(self.interval)

    def __enter__(self) -> "RssSampler":
        self._sample_once()
        self._thread = threading.Thread(target=self._run, daemon=True, name="rss-sampler")
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self._sample_once()

    def result(self) -> dict[str, Any]:
        procs = sorted(self.peaks.values(), key=lambda r: (r["role"] != "parent", r["pid"]))
        workers = [r["max_rss"] for r in procs if r["role"] == "worker"]
        parent = [r["max_rss"] for r in procs if r["role"] == "parent"]
        return {
            "interval_s": self.interval,
            "samples": self.samples,
            "parent_max_rss": parent[0] if parent else None,
            "worker_max_rss": workers,
            "max_worker_rss": max(workers) if workers else None,
            "max_anon": max((r["max_anon"] for r in procs if r["role"] != "helper" and r["max_anon"] is not None), default=None),
            "processes": procs,
        }


_BASELINE_CODE = r"""
import json, os, sys, time
t0 = time.perf_counter()
import numpy, torch, zarr, crc32c
import shardset
torch.set_num_threads(1)
t1 = time.perf_counter()
import psutil
anon = None
if os.path.exists("/proc/self/status"):  # RssAnon, as benchmarks.common.anon_rss reads it
    anon = next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("RssAnon:"))
print(json.dumps({"rss": psutil.Process().memory_info().rss, "anon": anon, "import_s": t1 - t0}))
"""


def baseline_rss(repeats: int = 3) -> dict[str, Any]:
    """RSS of a fresh interpreter after ``import numpy, torch, zarr, shardset``
    (what every writer or DataLoader worker process pays before touching data),
    and how long those imports take (a spawned worker's start-up cost)."""
    rss, anon, imp = [], [], []
    for _ in range(repeats):
        out = subprocess.run(
            [sys.executable, "-c", _BASELINE_CODE], cwd=REPO_ROOT, capture_output=True, text=True, check=True, timeout=300
        )
        rec = json.loads(out.stdout.strip().splitlines()[-1])
        rss.append(rec["rss"])
        if rec["anon"] is not None:
            anon.append(rec["anon"])
        imp.append(rec["import_s"])
    return {"rss_bytes": summarize(rss), "anon_rss_bytes": summarize(anon), "import_seconds": summarize(imp)}


# -- page cache --------------------------------------------------------------------------------

def resident_bytes(paths: Iterable[str | os.PathLike]) -> dict[str, Any]:
    """Page-cache residency of a set of files: bytes cached, total, and the fraction."""
    from shardset import page_cache

    res = tot = 0
    for p in paths:
        r, s = page_cache.resident_bytes(p)
        res += r
        tot += s
    return {"resident_bytes": res, "total_bytes": tot, "fraction": (res / tot) if tot else 0.0}


def fincore_text(paths: Sequence[str | os.PathLike], limit: int = 2) -> str | None:
    """Output of util-linux ``fincore`` for the first ``limit`` files (extra evidence), if installed."""
    exe = shutil.which("fincore")
    if not exe or not paths:
        return None
    try:
        out = subprocess.run(
            [exe, "--bytes", "--output", "RES,SIZE,FILE", *map(str, paths[:limit])], capture_output=True, text=True, timeout=30
        )
        return out.stdout.strip() or out.stderr.strip()
    except Exception as exc:
        return f"fincore failed: {exc}"


def evict_verified(paths: Sequence[str | os.PathLike], tries: int = 3) -> dict[str, Any]:
    """:func:`evict` and check with mincore that (almost) nothing stayed cached."""
    from shardset.bench import evict

    before = resident_bytes(paths)
    after = before
    for _ in range(tries):
        evict(paths)
        after = resident_bytes(paths)
        if after["fraction"] < 0.01:
            break
    return {"resident_before": before["fraction"], "resident_after": after["fraction"], "resident_bytes_after": after["resident_bytes"]}


def warm(paths: Iterable[str | os.PathLike]) -> dict[str, Any]:
    """Read the files through the page cache (so the next reads are warm); returns
    the buffered read rate (:func:`shardset.bench.buffered_read`) and the residency afterwards."""
    from shardset.bench import buffered_read

    paths = list(paths)
    return {**buffered_read(paths), **resident_bytes(paths)}


def fsync_write_bandwidth(
    directory: str | os.PathLike, total: int, fsync_every: int | None = None, file_bytes: int | None = None
) -> dict[str, Any]:
    """Durable sequential write bandwidth: :func:`shardset.bench.fsync_write` of ``total`` bytes.

    With ``file_bytes``, the write pattern of a store's blocks instead: ``total`` bytes as
    consecutive new files of ``file_bytes`` each, every file written and fsynced before the
    next one starts (``gb_per_s`` counts writes and fsyncs, ``files`` says how many)."""
    from shardset.bench import fsync_write

    if file_bytes is None:
        return fsync_write(directory, total, fsync_every=fsync_every)
    runs = [fsync_write(directory, min(file_bytes, total - at)) for at in range(0, total, file_bytes)]
    seconds = sum(r["seconds"] for r in runs)
    return {"bytes": total, "seconds": seconds, "fsync_s": sum(r["fsync_s"] for r in runs), "files": len(runs),
            "file_bytes": file_bytes, "gb_per_s": total / seconds / GB}


def mixed_io_rate(read_paths: Sequence[str | os.PathLike], directory: str | os.PathLike,
                  file_bytes: int | None = None) -> dict[str, Any]:
    """The disk reading and writing at once: a sequential ``O_DIRECT`` read of ``read_paths``
    (:func:`shardset.bench.direct_read`) on one thread while another writes as many bytes
    durably into ``directory`` (:func:`fsync_write_bandwidth`, ``file_bytes`` per file).
    ``gb_per_s`` is both directions' bytes over the time until both finished (what a job that
    keeps the disk reading and writing can move); ``read_gb_per_s`` and ``write_gb_per_s`` are
    each direction over its own time."""
    from concurrent.futures import ThreadPoolExecutor

    from shardset.bench import direct_read

    paths = list(read_paths)
    total = sum(os.path.getsize(p) for p in paths)
    t0 = time.perf_counter()
    with ThreadPoolExecutor(2) as pool:
        read = pool.submit(direct_read, paths)
        write = pool.submit(fsync_write_bandwidth, directory, total, file_bytes=file_bytes)
        r, w = read.result(), write.result()
    seconds = time.perf_counter() - t0
    return {"bytes_read": r["bytes"], "bytes_written": w["bytes"], "seconds": seconds,
            "read_gb_per_s": r["gb_per_s"], "write_gb_per_s": w["gb_per_s"],
            "gb_per_s": (r["bytes"] + w["bytes"]) / seconds / GB}


def epoch_rows_per_s(ds: Iterable[Any], quick: bool = False) -> float:
    """Rows per second of an epoch of ``ds`` (an iterable of batches whose first tensor
    has a row per sample) run right after another (:func:`epoch_rates`)."""
    return epoch_rates(ds, quick=quick)[0]


# Idle time after a timed epoch: reads that its pass started for the next epoch end
# within it (at most the window's slots: about 1 GiB, a quarter of a second here).
# A --quick smoke run, whose figures mean nothing, waits a tenth of it.
SETTLE_S = 1.0


def settle(quick: bool = False) -> None:
    """Idle :data:`SETTLE_S` after an epoch (a tenth of it for a ``quick`` smoke run),
    so that what its pass read on for the next epoch ends before the next measurement."""
    time.sleep(SETTLE_S / 10 if quick else SETTLE_S)


def epoch_rates(ds: Iterable[Any], middle: tuple[float, float] = (0.25, 0.75),
                quick: bool = False) -> tuple[float, float]:
    """Rows per second of an epoch of ``ds`` run right after another, as a training loop
    that keeps ``ds`` and runs epochs back to back sees it: over the whole epoch, and
    over the batches between fractions ``middle`` of its rows (the steady state of a
    reader whose shuffle window fills at the start of an epoch and drains at its end).

    A ``ShardedDataset`` pass that runs to its end reads on into the next epoch while
    its window drains, so an epoch clocked from its own start would get for free what
    was read before it.  One epoch therefore runs untimed first, the clock starts at
    its end, and the timed epoch is followed by :func:`settle`.
    """
    for _ in ds:
        pass
    marks = [(0, time.perf_counter())]
    for batch in ds:
        marks.append((marks[-1][0] + len(batch[0]), time.perf_counter()))
    settle(quick)
    rows = marks[-1][0]
    inside = [m for m in marks if middle[0] * rows <= m[0] <= middle[1] * rows]
    (r0, t0), (r1, t1) = (inside[0], inside[-1]) if len(inside) > 1 else (marks[0], marks[-1])
    return rows / (marks[-1][1] - marks[0][1]), (r1 - r0) / (t1 - t0)


def rows_for(gib: float, features: int, block_mb: int) -> int:
    """Rows of X (d floats) + y filling about ``gib`` GiB in whole blocks of ``block_mb``,
    or fewer rows than one block (a single short block) for a smaller ``gib``."""
    from shardset.format import FieldSpec, block_rows_for

    fields = {"X": FieldSpec("float32", (features,)), "y": FieldSpec("float32", (1,))}
    block_rows = block_rows_for(fields, block_mb)
    rows = int(gib * GiB) // (4 * (features + 1))
    return max(1, rows) if rows < block_rows else round(rows / block_rows) * block_rows


# -- command line -----------------------------------------------------------------------------


def arg_parser(prog: str, doc: str | None, *, repeats: int = 3, data_dir: bool = True) -> argparse.ArgumentParser:
    """The options every benchmark takes: --quick, --repeats, --name, --no-plot, --replot
    (and --data-dir unless ``data_dir=False``). Finish with :func:`parse_args`."""
    p = argparse.ArgumentParser(prog=f"python -m benchmarks.{prog}", description=(doc or "").split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="small sizes: a smoke run (results go to <name>_quick)")
    p.add_argument("--repeats", type=int, default=repeats, help=f"measured rounds (>= 3; default {repeats})")
    p.add_argument("--name", default=None, help=f"result name: results/NAME.json, plots/NAME.png (default '{prog.removeprefix('bench_')}')")
    p.add_argument("--no-plot", action="store_true", help="skip the PNG")
    p.add_argument("--replot", action="store_true", help="only redraw the PNG from benchmarks/results/<name>.json")
    if data_dir:
        p.add_argument("--data-dir", default=None,
                       help=f"parent of the scratch directory (default {DEFAULT_DATA_PARENT}); removed at the end")
    p.set_defaults(_prog=prog)
    return p


def parse_args(p: argparse.ArgumentParser, argv=None, defaults: dict[str, tuple[Any, Any]] | None = None) -> argparse.Namespace:
    """Parse, then fill every option left at None from ``defaults[option] = (full, quick)``
    and the result name (``<name>`` or ``<name>_quick``); refuses fewer than 3 repeats."""
    a = p.parse_args(argv)
    for key, (full, quick) in (defaults or {}).items():
        if getattr(a, key) is None:
            setattr(a, key, quick if a.quick else full)
    base = a._prog.removeprefix("bench_")
    a.name = a.name or (f"{base}_quick" if a.quick else base)
    del a._prog
    if a.repeats < 3:
        p.error("--repeats must be at least 3 (every figure is a median of >= 3 runs)")
    return a


def replot(args: argparse.Namespace, plot) -> dict[str, Any] | None:
    """With --replot: redraw the PNG from the saved JSON and return the result, else None."""
    if not args.replot:
        return None
    res = json.loads((RESULTS_DIR / f"{args.name}.json").read_text())
    plot(argparse.Namespace(**res["args"]), res)
    print(f"plot: {plot_path(args.name)}")
    return res


def finish(args, result: dict[str, Any], plot, started: float) -> dict[str, Any]:
    """Record the total time, save the JSON, draw the PNG unless --no-plot, and say where."""
    result["total_seconds"] = time.perf_counter() - started
    path = save_json(args.name, result)
    print(f"results: {path}")
    if not args.no_plot:
        plot(args, result)
        print(f"plot:    {plot_path(args.name)}")
    print(f"total time {result['total_seconds']:.0f} s")
    return result
