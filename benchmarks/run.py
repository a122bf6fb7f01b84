"""Run every benchmark: host imports, then one guest boot (stage 1), a kexec, stage 2.

    python -m benchmarks            # full run, ~5 min under TCG; updates benchmarks/RESULTS.md
    python -m benchmarks --smoke    # tiny counts: checks that every benchmark runs and yields numbers

Writes results/bench/<timestamp>/{results.json,results.md,chart.png} (plus the guest's
console.log, stage JSONs and the C build) and, for a full run, copies results.md to
benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import sys
import tempfile
import time
from pathlib import Path

from . import imports, report
from .guest import FULL, PYTHONPATH_ENV, SMOKE

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (type checkers treat it as True)

if TYPE_CHECKING:
    from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
GROUPS = ("import", "ioctl", "mmio", "dma", "lu", "blackout", "rss", "profile")
GUEST_MEMORY = "4G"  # 1 GiB is DMA-mapped (and pinned) at a time


def _stage_command(stage: int, smoke: bool, only: list[str] | None, pythonpath: str | None) -> str:
    argv = [sys.executable, "-m", "benchmarks.guest", "--stage", str(stage), "--out",
            f"/shared/bench-stage-{stage}.json"]
    if smoke:
        argv.append("--smoke")
    if only:
        argv += ["--only", ",".join(only)]
    env = f"{PYTHONPATH_ENV}={shlex.quote(pythonpath)} " if pythonpath else ""
    return env + " ".join(shlex.quote(a) for a in argv)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true",
                        help="tiny iteration counts; asserts only that every benchmark produced numbers")
    parser.add_argument("--only", help=f"comma-separated subset of {','.join(GROUPS)} (no RESULTS.md update)")
    parser.add_argument("--pythonpath", metavar="DIR",
                        help="benchmark the pyvfio_lu package found in DIR instead of this checkout's "
                             "(to measure a proposed speed-up; no RESULTS.md update)")
    parser.add_argument("--baseline", type=Path, metavar="RUN",
                        help="a previous run's directory (or results.json): results.md gains a before/after section")
    parser.add_argument("--iommu", choices=["intel", "virtio"], default="intel")
    parser.add_argument("--flavour", choices=["upstream", "vfio-lu"],
                        help="the kernel to boot (default: the device-preservation kernel when it is cached, so "
                             "the blackout includes the device; else upstream, where it is guest RAM only)")
    parser.add_argument("--timeout", type=float, default=1800.0, help="guest time limit in seconds")
    parser.add_argument("--results-dir", type=Path, help="default: results/bench/<timestamp>")
    parser.add_argument("-q", "--quiet", action="store_true", help="do not echo the benchmark's progress lines")
    args = parser.parse_args(argv)
    only = [g.strip() for g in args.only.split(",")] if args.only else None
    if only and set(only) - set(GROUPS):
        parser.error(f"unknown group(s) {', '.join(sorted(set(only) - set(GROUPS)))}; groups: {', '.join(GROUPS)}")
    cfg = SMOKE if args.smoke else FULL
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out = (args.results_dir or ROOT / "results" / "bench" / (stamp + ("-smoke" if args.smoke else ""))).resolve()
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()

    from pyvfio_lu.vm.qemu import GuestError
    from pyvfio_lu.vm.run import run_in_guest

    host_imports = {}
    if only is None or "import" in only:
        print(f"bench: host import times ({cfg.import_n} fresh processes each)", flush=True)
        with tempfile.TemporaryDirectory(prefix="pyvfio-lu-bench-pycache-") as pyc:
            host_imports = imports.measure_all(cfg.import_n, pythonpath=args.pythonpath, pycache_prefix=pyc)

    def echo(t: float, line: str) -> None:
        if not args.quiet and (line.startswith(("bench:", "pyvfio-lu: stage", "pyvfio-lu: kexec"))
                               or "Traceback" in line or "Error" in line):
            print(f"[{t:7.1f}s] {line}", flush=True)

    host_py, host_c = {}, {}
    if only is None or "ioctl" in only:
        print("bench: host calibration: FIONREAD on a pipe, cffi floor and C, natively", flush=True)
        from . import cprog
        from .guest import calibration

        with tempfile.TemporaryDirectory(prefix="pyvfio-lu-bench-c-") as build:
            binary, _facts = cprog.build(Path(build))
            calib_py, calib_c = calibration(cfg, binary)
        host_py = {f"host_{k}": v for k, v in calib_py.items()}
        host_c = {f"host_{k}": v for k, v in calib_c.items()}

    with_lu = only is None or "lu" in only or "blackout" in only  # both need the kexec
    stage1 = _stage_command(1, args.smoke, only, args.pythonpath)
    stage2 = _stage_command(2, args.smoke, only, args.pythonpath) if with_lu else None
    guest_error = None
    try:
        from pyvfio_lu.vm.kernel import VFIO_LU, find_cached
        from pyvfio_lu.vm.kernel import build as build_kernel

        flavour = args.flavour or ("vfio-lu" if find_cached(VFIO_LU) is not None else "upstream")
        print(f"bench: guest kernel: {flavour}", flush=True)
        run = run_in_guest(stage1, stage2, results_dir=out, cwd=ROOT, memory=GUEST_MEMORY, iommu=args.iommu,
                           timeout=args.timeout, on_line=echo, kernel=build_kernel(flavour=flavour).bzimage)
        guest = run.to_json()
        if not run.ok:
            guest_error = f"a guest stage failed: {guest['stage_rc']} (console: {run.console_log})"
    except GuestError as exc:
        guest, guest_error = (exc.result.to_json() if exc.result is not None else {}), str(exc)

    s1 = _load(out / "bench-stage-1.json")
    s2 = _load(out / "bench-stage-2.json")
    lu = dict(s1.get("lu", {}))
    lu.update(s2.get("lu", {}))
    command = "python -m benchmarks" + (" --smoke" if args.smoke else "") + (
        f" --only {args.only}" if args.only else "") + (f" --pythonpath {args.pythonpath}" if args.pythonpath else "")
    results = {
        "meta": {"timestamp": stamp, "git": _git_state(), "smoke": args.smoke, "command": command, "memory": GUEST_MEMORY,
                 "pythonpath": args.pythonpath, "host_seconds": None, "guest_error": guest_error},
        "config": _load(out / "config.json"),
        "facts": s1.get("facts", {}),
        "guest": guest,
        "python": {**s1.get("python", {}), **host_py},
        "c": {**s1.get("c", {}), **host_c},
        "lu": lu,
        "blackout": s2.get("blackout", {}),
        "rss": s1.get("rss", {}),
        "imports": {"host": host_imports, "guest": s1.get("imports", {})},
        "profiles": {**s1.get("profiles", {}), **s2.get("profiles", {})},
    }
    report.build(results)
    results["meta"]["host_seconds"] = round(time.monotonic() - t0, 1)
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    md = report.markdown(results)
    if args.baseline:
        base_path = args.baseline / "results.json" if args.baseline.is_dir() else args.baseline
        baseline = json.loads(base_path.read_text())
        section = report.against(results, baseline)
        results["meta"]["baseline"] = str(base_path)
        (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
        md += "\n" + section
        print("\n" + section, flush=True)
    (out / "results.md").write_text(md)
    report.chart(results, out / "chart.png")
    print(f"\n{report.table(results)}\n", flush=True)
    print(f"bench: results in {out} (results.json, results.md, chart.png); {results['meta']['host_seconds']} s",
          flush=True)
    if guest_error:
        print(f"bench: FAILED: {guest_error}", file=sys.stderr)
        return 1
    if args.smoke or only:
        gone = [] if only else report.missing(results)
        if gone:
            print(f"bench: FAILED: no numbers for {', '.join(gone)}", file=sys.stderr)
            return 1
        print("bench: smoke run complete: every benchmark ran and produced numbers" if args.smoke else
              "bench: partial run (--only): RESULTS.md left as it is", flush=True)
        return 0
    if args.pythonpath:
        print("bench: --pythonpath run: RESULTS.md left as it is", flush=True)
        return 0
    shutil.copyfile(out / "results.md", HERE / "RESULTS.md")
    shutil.copyfile(out / "chart.png", HERE / "chart.png")
    print(f"bench: copied to {HERE / 'RESULTS.md'}", flush=True)
    return 0


def _git_state() -> str:
    """HEAD, and whether pyvfio_lu/ differs from it (the figures are for the working tree)."""
    import subprocess

    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, check=True, capture_output=True,
                              text=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "pyvfio_lu", "cdefs"], cwd=ROOT, check=True,
                               capture_output=True, text=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + (" + uncommitted changes in pyvfio_lu/ or cdefs/" if dirty else "")


def _load(path: Path) -> dict[str, Any]:
    try:
        doc: dict[str, Any] = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return doc


if __name__ == "__main__":
    sys.exit(main())
