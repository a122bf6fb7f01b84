"""Every guest test, reported on the host by name.

One guest run (boot, stage 1, a real kexec, stage 2) executes all of tests/guest inside
QEMU on the project's kernel; each guest test then becomes one result here, e.g.
``test_in_guest[tests/guest/test_luo_kexec.py::TestKexecSimple::test_after]``.
Set PYVFIO_LU_SKIP_GUEST=1 to skip them (unit tests only).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
GUEST_DIR = Path(__file__).resolve().parent / "guest"
CONSOLE_TAIL = 40


def _guest_nodeids() -> list[str]:
    """The guest tests, listed without a kernel (pytest --collect-only, plugin inert)."""
    env = dict(os.environ, PYVFIO_LU_GUEST_STAGE="collect")
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", str(GUEST_DIR)],
        cwd=ROOT, env=env, capture_output=True, text=True)
    ids = [line.strip() for line in proc.stdout.splitlines() if "::" in line]
    if proc.returncode != 0 or not ids:
        raise RuntimeError(f"cannot list the guest tests:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return ids


GUEST_TESTS = [] if os.environ.get("PYVFIO_LU_SKIP_GUEST") else _guest_nodeids()
# Every guest test runs once per vIOMMU: QEMU's intel-iommu (interrupt remapping) and
# virtio-iommu (no interrupt remapping: the runner adds the allow_unsafe_interrupts options).
IOMMUS = [m for m in os.environ.get("PYVFIO_LU_GUEST_IOMMUS", "intel,virtio").split(",") if m]


def _pytest_command(stage: int, results: str) -> str:
    return (f"PYVFIO_LU_GUEST_STAGE={stage} PYVFIO_LU_RESULTS={results} "
            f"{sys.executable} -m pytest -p no:cacheprovider -q -rfEs tests/guest")


_RUNS: dict[str, dict] = {}


@pytest.fixture(scope="session")
def guest_results():
    """{iommu: results of one boot-kexec-boot run of all guest tests}, each run made on first use."""

    def get(iommu: str) -> dict:
        if iommu not in _RUNS:
            _RUNS[iommu] = _run_guest(iommu)
        return _RUNS[iommu]

    return get


def _run_guest(iommu: str) -> dict:
    from pyvfio_lu.vm.qemu import GuestError
    from pyvfio_lu.vm.run import run_in_guest

    results_dir = ROOT / "results" / "guest" / f"{time.strftime('%Y%m%d-%H%M%S')}-{iommu}"
    timeout = float(os.environ.get("PYVFIO_LU_GUEST_TIMEOUT", "1800"))
    error = None
    try:
        run = run_in_guest(_pytest_command(1, "/shared"), _pytest_command(2, "/shared"),
                           iommu=iommu, results_dir=results_dir, timeout=timeout, cwd=ROOT)
        console, summary = run.console_log, run.summary()
    except GuestError as exc:
        error, console, summary = exc, results_dir / "console.log", str(exc)
    print("\n" + summary, file=sys.stderr)
    tests: dict[str, dict] = {}
    for stage in (1, 2):
        path = results_dir / f"stage-{stage}.json"
        if path.exists():
            for nodeid, res in json.loads(path.read_text())["tests"].items():
                tests[nodeid] = dict(res, stage=stage)
    tail = ""
    if console.exists():
        tail = "\n".join(console.read_text(errors="replace").splitlines()[-CONSOLE_TAIL:])
    return {"tests": tests, "error": error, "console": console, "tail": tail}


@pytest.mark.parametrize("nodeid", GUEST_TESTS)
@pytest.mark.parametrize("iommu", IOMMUS)
def test_in_guest(iommu: str, nodeid: str, guest_results) -> None:
    guest_results = guest_results(iommu)
    res = guest_results["tests"].get(nodeid)
    if res is None:
        why = f"guest run failed: {guest_results['error']}" if guest_results["error"] else "it did not run in the guest"
        pytest.fail(f"{nodeid}: {why}\nconsole log: {guest_results['console']}\n--- last console lines ---\n"
                    f"{guest_results['tail']}", pytrace=False)
    where = f"(guest stage {res['stage']}, {res['duration']:.2f} s)"
    if res["outcome"] == "skipped":
        pytest.skip(f"{where} {res['longrepr']}")
    if res["outcome"] != "passed":
        pytest.fail(f"{res['outcome']} in the guest {where}:\n{res['longrepr']}", pytrace=False)
