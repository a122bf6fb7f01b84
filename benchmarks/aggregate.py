"""Several runs of ``python -m benchmarks`` as one table: per row, the median run's Python/C
ratio and the spread of the ratio across runs. A target counts as met only when it holds in
the median run. The blackout and the cold imports are given the same way.

    python -m benchmarks.aggregate RUN_DIR RUN_DIR RUN_DIR [--out benchmarks/RESULTS.md]

Each RUN_DIR is a run's results directory (``results/bench/<stamp>``, with results.json). The
output starts with the combined tables and then carries the median run's own report (its
method, the blackout and the analysis of where the Python time goes), under that run's name.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

from .report import markdown
from .stats import fmt_ns

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (type checkers treat it as True)

if TYPE_CHECKING:
    from typing import Any


def _median_index(values: list[float]) -> int:
    """The index of the median value (the lower middle one for an even count)."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    return order[(len(order) - 1) // 2]


def combine(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Per row key: the median run's row, every run's ratio, the spread; blackout; imports."""
    rows: list[dict[str, Any]] = []
    for first in runs[0]["rows"]:
        key = first["key"]
        per_run = [next((r for r in run["rows"] if r["key"] == key), None) for run in runs]
        present = [r for r in per_run if r is not None]
        ratios = [r["ratio"] for r in present]
        mid = present[_median_index(ratios)]
        rows.append({**mid, "ratios": ratios, "spread": max(ratios) / min(ratios) if min(ratios) else float("inf"),
                     "met": None if mid["target"] is None else mid["ratio"] <= mid["target"]})
    blackouts: list[dict[str, Any]] = [run["blackout_summary"] for run in runs if run.get("blackout_summary")]
    blackout = None
    if blackouts:
        totals = [b["python_total_ns"] for b in blackouts]
        mid_b = blackouts[_median_index(totals)]
        blackout = {**mid_b, "runs_python_ns": totals, "runs_c_ns": [b["c_total_ns"] for b in blackouts],
                    "met": mid_b["python_total_ns"] <= mid_b["target_ns"]}
    imports: dict[str, list[float]] = {}
    for run in runs:
        for r in run.get("import_rows") or []:
            imports.setdefault(r["module"], []).append(r["guest_best_ns"])
    rss = [run["rss_summary"] for run in runs if run.get("rss_summary")]
    return {"rows": rows, "blackout": blackout, "imports": imports, "n": len(runs), "rss": rss}


def _plain(row: dict[str, Any]) -> str:
    return str(row["label"]).replace("**", "")


def _widest(rows: list[dict[str, Any]]) -> str:
    """The three rows that moved most between runs (spread over 1.25), named."""
    widest = sorted((r for r in rows if r["spread"] > 1.25), key=lambda r: -r["spread"])[:3]
    if not widest:
        return ""
    return " The widest: " + ", ".join(f"{_plain(r)} {r['spread']:.2f}" for r in widest) + "."


def swing(rows: list[dict[str, Any]]) -> tuple[float, float]:
    """Median spread (max/min ratio across runs) of the pyvfio_lu rows and of the reference
    (floor and calibration) rows: how much more the Python-heavy figures move."""
    ref = [r["spread"] for r in rows if "reference" in r["label"] or r["group"] == "calib"]
    lib = [r["spread"] for r in rows if not ("reference" in r["label"] or r["group"] == "calib")]
    return (statistics.median(lib) if lib else 1.0, statistics.median(ref) if ref else 1.0)


def table(c: dict[str, Any], names: list[str]) -> str:
    header = ("| Benchmark | Python (median run) | C (median run) | Python/C, median run | ratio in each run "
              f"({', '.join(names)}) | Target |")
    lines = [header, "|---|---|---|---|---|---|"]
    for r in c["rows"]:
        unit = "/call" if r["per"] == "op" else ("/round" if r["group"] == "dma" else "")
        target = "—" if r["met"] is None else f"≤{r['target']:g}x: **{'met' if r['met'] else 'missed'}**"
        lines.append(f"| {r['label']} | {fmt_ns(r['python_median_ns'])}{unit} | {fmt_ns(r['c_median_ns'])}{unit} "
                     f"| **{r['ratio']:.2f}x** | {', '.join(f'{x:.2f}x' for x in r['ratios'])} "
                     f"(spread {r['spread']:.2f}) | {target} |")
    return "\n".join(lines)


def render(runs: list[dict[str, Any]], names: list[str]) -> str:
    c = combine(runs)
    met = [r for r in c["rows"] if r["met"]]
    missed = [r for r in c["rows"] if r["met"] is False]
    lib_swing, ref_swing = swing(c["rows"])
    out = ["# pyvfio-lu benchmarks: Python vs C, over several guest runs", "",
           (f"{c['n']} runs of `python -m benchmarks` on the same commit ({runs[0]['meta'].get('git', '?')}), each "
            "its own guest boot and kexec. Each row gives the median run's figures and ratio, and the ratio in "
            "every run; a target is met only when the median run meets it. **Measured under TCG**: see the "
            "median run's report below for what that does to the ratios."), "",
           table(c, names), "",
           f"Targets met: {len(met)}; missed: {len(missed)}"
           + (" (" + "; ".join(r["label"].replace("*", "") for r in missed) + ")" if missed else "") + ".", "",
           (f"Run-to-run swing (max/min ratio across runs, median over rows): pyvfio_lu rows {lib_swing:.2f}, "
            f"reference rows (cffi floors, plain-Python floors, calibration) {ref_swing:.2f}."
            + _widest(c["rows"])
            + " Why the Python-heavy rows move more: not contention (on a quiet machine the floors move by a few "
              "percent), "
              "not the cyclic GC (a guest test with the collector off, and with 300,000 live objects, moved "
              "`call()` by no more than its own run-to-run noise); the rows that move most allocate Python objects "
              "on every call (raw `call()`: a cffi struct and a keyword dict), while the lean paths (one builtin "
              "call, one result object) move about as little as the floors. Under TCG memory-heavy interpreter work "
              "is what the software TLB makes dear, and how dear changes with where each process's heap lands; the "
              "library's share of that is its allocations per call, which the lean paths cut."), ""]
    b = c["blackout"]
    if b:
        verdict = "met" if b["met"] else "missed"
        carried = "guest RAM and the edu device" if b["device"] else "guest RAM only"
        out += ["## The blackout, over the runs", "",
                (f"Process start to first DMA after the kexec ({carried}), "
                 f"median of each run's samples: Python {', '.join(fmt_ns(x) for x in b['runs_python_ns'])}; "
                 f"C {', '.join(fmt_ns(x) for x in b['runs_c_ns'])}. Median run: Python "
                 f"{fmt_ns(b['python_total_ns'])} against the {fmt_ns(b['target_ns'])} target: **{verdict}**."), ""]
    if c["rss"]:
        above = [r["above_kib"] for r in c["rss"]]
        mid_r = c["rss"][_median_index(above)]
        verdict = "met" if mid_r["met"] else "missed"
        out += ["## Peak RSS with 2000 sessions, over the runs", "",
                (f"Peak RSS above an empty interpreter with {mid_r['sessions']} sessions held (one memfd each): "
                 f"{', '.join(f'{a / 1024:.1f} MiB' for a in above)}; median run {mid_r['above_kib'] / 1024:.1f} MiB "
                 f"({mid_r['held_kib'] / 1024:.1f} MiB against {mid_r['empty_kib'] / 1024:.1f} MiB) against the "
                 f"{mid_r['target_kib'] / 1024:.0f} MiB target: **{verdict}**."), ""]
    if c["imports"]:
        out += ["## Cold imports in the guest, over the runs", "", "| module | best of each run | target |",
                "|---|---|---|"]
        for module, vals in c["imports"].items():
            best = sorted(vals)[(len(vals) - 1) // 2]
            out.append(f"| `import {module}` | {', '.join(fmt_ns(v) for v in vals)} | ≤25 ms: "
                       f"**{'met' if best <= 25e6 else 'missed'}** (median run) |")
        out.append("")
    mid = runs[_median_index([statistics.fmean(r["ratio"] for r in run["rows"]) for run in runs])]
    out += [f"# The median run's own report ({mid['meta']['timestamp']})", "",
            markdown(mid).split("\n", 1)[1].replace("](chart.png)", "](chart.png)")]
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.aggregate", description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, help="run directories (each with results.json)")
    parser.add_argument("--out", type=Path, help="write the markdown here (default: print it)")
    args = parser.parse_args(argv)
    runs = [json.loads((d / "results.json" if d.is_dir() else d).read_text()) for d in args.runs]
    text = render(runs, [d.name for d in args.runs])
    if args.out:
        args.out.write_text(text)
        print(f"bench: {len(runs)} runs combined into {args.out}")
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
