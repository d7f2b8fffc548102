"""Render the README's Performance tables from the committed ``benchmarks/results/*.json``.

    python -m benchmarks.render_readme            # rewrite README.md between the markers
    python -m benchmarks.render_readme --check    # exit 1 if README.md is out of date

Only the text between ``<!-- performance:begin -->`` and ``<!-- performance:end -->``
is replaced; a result file that does not exist leaves its table out.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from .common import REPO_ROOT, RESULTS_DIR

BEGIN, END = "<!-- performance:begin -->", "<!-- performance:end -->"


def _load(name: str) -> dict[str, Any] | None:
    path = RESULTS_DIR / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else None


def _m(s: dict[str, Any] | None, scale: float = 1.0, digits: int = 2) -> str:
    """``median [min-max]`` of a summary."""
    if not s or s.get("median") is None:
        return "—"
    f = f"{{:.{digits}f}}"
    return f"{f.format(s['median'] * scale)} [{f.format(s['min'] * scale)}–{f.format(s['max'] * scale)}]"


def _rate(s: dict[str, Any] | None) -> str:
    """rows/s with k/M units."""
    if not s or s.get("median") is None:
        return "—"
    v = s["median"]
    return f"{v / 1e6:.2f} M" if v >= 1e6 else f"{v / 1e3:.1f} k" if v >= 1e3 else f"{v:.0f}"


def _table(head: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head), *("| " + " | ".join(map(str, r)) + " |" for r in rows), ""]


def _verdict(t: dict[str, Any] | None) -> str:
    return "—" if not t else f"{t['value']:.2f}: {t['verdict'].lower()}" if t.get("value") is not None else t["verdict"]


def render() -> str:
    out: list[str] = []
    write, read, matrix, peers, scale = (_load(n) for n in ("write", "read", "matrix", "peers", "scale"))
    machine = next((r["machine"] for r in (write, read, matrix, peers, scale) if r), None)
    if machine:
        fs = machine.get("data_dir_filesystem", {})
        out += [f"Machine: {machine['cpu_model']}, {machine['cpu_affinity_cores']} cores, {machine['ram_total_gib']} GiB RAM, "
                f"{fs.get('fstype', '?')} on {fs.get('device', '?')}; torch {machine['versions'].get('torch')}. Figures are "
                "median [min–max] of the rounds in each JSON; ratios are per-round ratios of figures taken back to back.", ""]
    if write or read:
        rows = []
        if read and read.get("cold"):
            rows.append(["sequential read, O_DIRECT (cold)", _m(read["cold"]["o_direct_gb_per_s"], digits=3), "`read.json`"])
        if read:
            rows.append(["buffered read from the page cache (warm, one pass)", f"{read['setup']['warm_read']['gb_per_s']:.2f}", "`read.json`"])
        if write:
            L = write["limits_gb_per_s"]
            rows += [["sequential write + fsync per block (sustained)", _m(L["disk_sustained"], digits=3), "`write.json`"],
                     ["memory copy (np.copyto)", _m(L["memcpy"]), "`write.json`"],
                     ["N(0,1) float32 generation, fastest per core", _m(L["fastest_generator_per_core"], digits=3), "`write.json`"]]
        out += ["**Limits of the machine** (GB/s):", "", *_table(["limit", "GB/s", "source"], rows)]
    if write:
        g, T = write["generate_regression"], write["targets"]
        rows = [[f"workers={w}", _m(g[f"w{w}_gb_per_s"], digits=3), _m(write["limits_gb_per_s"]["fastest_generator_per_core"], w, 3),
                 _verdict(T.get(f"w{w}_over_min(gen x workers, disk)>=0.80"))] for w in (1, 2)]
        out += [f"**Writing** (`generate_regression`, d={g['features']}, {g['block_mb']} MB blocks, "
                f"{g['stored_bytes'] / 2**30:.1f} GiB, every block fsynced):", "",
                *_table(["", "GB/s", "generator x workers", "/ min(generator x workers, disk) (target 0.80)"], rows)]
        sw = write.get("sweeps_workers1") or {}
        if sw:
            rows = [["reference" if k == "ref" else k, f"{s['config']['features']}", f"{s['config']['block_mb']}", s["config"]["codec"],
                     _m(s["logical_gb_per_s"], digits=3), _m(s["ratio_to_ref_logical"])] for k, s in sw.items()]
            out += ["Write sweeps (workers=1; codec `crc32c` = checksum only, `none` = no checksum):", "",
                    *_table(["config", "d", "block MB", "codec", "logical GB/s", "vs reference"], rows)]
    if read:
        W, C, N = read["warm"], read.get("cold") or {}, read.get("naive") or {}
        rows = [[name, _rate(w["rows_per_s"]), _m(w["ratio_to_baseline"])] for name, w in W.items()]
        if C:
            rows.append(["cold: sd shuffle, buffered reads (rows/s; ratio to an O_DIRECT read of the files)",
                         _rate(C["sd_rows_per_s"]), _m(C["ratio_sd_over_o_direct"])])
            if "ratio_sd_direct_over_o_direct" in C:
                rows.append(["cold: sd shuffle, direct=True (GB/s of file bytes; ratio to the O_DIRECT read)",
                             _m(C["sd_direct_gb_per_s_file_bytes"], digits=3) + " GB/s", _m(C["ratio_sd_direct_over_o_direct"])])
        for mode in ("warm", "cold"):
            if mode in N:
                rows.append([f"{mode}: naive memmap + DataLoader(shuffle=True), epoch extrapolated (shardset speed-up)",
                             _rate(N[mode]["rows_per_s_epoch_extrapolated"]), _m(N[mode]["sd_speedup_epoch"], digits=0) + "x"])
        mem = next(iter(read["memory"].items()), None)
        out += [f"**Reading** (`read.json`: {read['setup']['logical_bytes'] / 2**30:.1f} GiB store, batch {read['args']['batch_size']}; "
                "ratios to the baseline = plain reads + `randperm` + one gather per block):", "",
                *_table(["reader", "rows/s", "ratio"], rows),
                "Targets: " + "; ".join(f"{k}: {_verdict(v)}" for k, v in read["targets"].items())
                + (f". Peak RSS, {mem[0]}: {_m(mem[1]['parent_peak_over_own_baseline_blocks'])} blocks over the imports." if mem else ""), ""]
    if matrix:
        rows = []
        for name in matrix["results"]["warm"]:
            w = matrix["results"]["warm"][name]
            c = matrix["results"].get("cold", {}).get(name)
            rows.append([name + (" (partial epoch)" if w["partial_epoch"] else ""), _rate(w["rows_per_s"]), _m(w["ratio_to_plain_read"]),
                         _rate(c["rows_per_s"]) if c else "—", _m(c["ratio_to_plain_read"]) if c else "—"])
        out += [f"**Block-shuffled reading vs plain sequential reads of the same files** (`matrix.json`, "
                f"{matrix['args']['gib']:g} GiB stores; target ≥ 0.90 warm and cold):", "",
                *_table(["configuration", "warm rows/s", "warm / plain read", "cold rows/s", "cold / O_DIRECT read"], rows),
                "Targets: " + "; ".join(f"{k}: {_verdict(v)}" for k, v in matrix["targets"].items()), ""]
    if peers:
        R = peers["results"]
        rows = []
        for name, w in R["warm"].items():
            c = R.get("cold", {}).get(name)
            if "error" in w:
                rows.append([name, "error", "", "", "", "", ""])
                continue
            rows.append([name, _rate(w["rows_per_s"]), _rate(c["rows_per_s"]) if c and "rows_per_s" in c else "—",
                         _m(w.get("peak_rss_mib"), digits=0), _m(w.get("first_batch_s")),
                         _m(w.get("shardset_speedup"), digits=1) if w.get("shardset_speedup") else "",
                         _m(c.get("shardset_speedup"), digits=1) if c and c.get("shardset_speedup") else ""])
        out += [f"**Against what users would pick instead** (`peers.json`: {peers['rows']:,} rows of {peers['row_bytes']} bytes, "
                f"batch {peers['args']['batch_size']}, each in a fresh process; shuffle settings in the JSON):", "",
                *_table(["contender", "warm rows/s", "cold rows/s", "peak RSS MiB (warm)", "first batch s (warm)",
                         "shardset speed-up warm", "cold"], rows)]
        if peers["skipped"]:
            out += ["Not measured: " + "; ".join(f"{k}: {v}" for k, v in peers["skipped"].items()), ""]
        out += ["Targets: " + "; ".join(f"{k}: {_verdict(v)}" for k, v in peers["targets"].items()), ""]
    if scale:
        rows = []
        for p in scale["points"]:
            if "skipped" in p:
                continue
            c, w = p["cold"], p["warm"]
            rows.append([f"{p['size_gb']:g}", p["rounds"], _rate(c["rows_per_s"]), _m(p["cold_over_o_direct"]), _m(c["first_batch_s"]),
                         _m(c["peak_rss_over_process_baseline_mib"], digits=0), _rate(w["rows_per_s"]) if w else "— (> RAM)"])
        out += ["**Scale** (`scale.json`: one shuffled epoch per round in a fresh process, batch 1024):", "",
                *_table(["GB", "rounds", "cold rows/s", "cold / O_DIRECT", "first batch s", "peak RSS over imports, MiB",
                         "warm rows/s"], rows)]
    cli = _load("cli_bench")
    if cli:
        rows = [[name, _m(f["gb_per_s"], digits=3), _rate(f["rows_per_s"]) if f.get("rows_per_s") else "—",
                 (_m(f["ratio"], digits=3) + f" of {f['vs'].removeprefix('disk: ')}") if f.get("ratio") else "—"]
                for name, f in cli["figures"].items()]
        out += [f"**`shardset bench {cli['path']} --size {cli['rows'] * 4 * (cli['features'] + 1) / 1e9:.0f}GB`** (`cli_bench.json`, "
                f"{cli['repeats']} runs; naive random read: {cli['figures']['naive random read, cold'].get('note', '')}):", "",
                *_table(["figure", "GB/s", "rows/s", "vs raw disk"], rows)]
    perm = _load("permutation")
    if perm:
        t = perm["target"]
        slow = t.get("slowest_covered") or {}
        out += [f"**Permutation** (`permutation.json`): target {t['indices_per_s'] / 1e6:g} M indices/s on one core for "
                f"{t['applies_to']}: {'met' if t['met'] else 'missed'}"
                + (f"; slowest case n = {slow['n_label']}, {slow['array_size_label']} indices, {slow['direction']}: "
                   f"{slow['median_indices_per_s'] / 1e6:.1f} M/s" if slow else "") + ".", ""]
    return "\n".join(out).rstrip() + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.render_readme", description=__doc__.split("\n\n")[0])
    p.add_argument("--check", action="store_true", help="exit 1 if README.md differs from the rendered tables")
    args = p.parse_args(argv)
    readme = REPO_ROOT / "README.md"
    text = readme.read_text()
    if BEGIN not in text or END not in text:
        print(f"README.md has no {BEGIN} ... {END} markers", file=sys.stderr)
        return 1
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    new = f"{head}{BEGIN}\n{render()}{END}{tail}"
    if args.check:
        return 0 if new == text else 1
    readme.write_text(new)
    print(f"README.md: performance tables rendered from {RESULTS_DIR}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
