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
# Every guest test runs once per vIOMMU on the upstream kernel: QEMU's intel-iommu (interrupt
# remapping) and virtio-iommu (no interrupt remapping: the runner adds the
# allow_unsafe_interrupts options).
IOMMUS = [m for m in os.environ.get("PYVFIO_LU_GUEST_IOMMUS", "intel,virtio").split(",") if m]


def _runs() -> list[tuple[str, str]]:
    """(kernel flavour, vIOMMU) of each guest run.

    ``PYVFIO_LU_GUEST_RUNS="upstream:intel,vfio-lu:intel"`` names them; by default the upstream
    kernel under every vIOMMU of ``PYVFIO_LU_GUEST_IOMMUS`` and, when a device-preservation
    (vfio-lu) kernel is in the cache or its patches are named in $PYVFIO_LU_KERNEL_PATCHES,
    that kernel under intel-iommu too (``PYVFIO_LU_GUEST_VFIO_LU_IOMMUS`` to change).
    """
    spec = os.environ.get("PYVFIO_LU_GUEST_RUNS")
    if spec:
        return [tuple(item.split(":", 1)) for item in spec.split(",") if ":" in item]  # type: ignore[misc]
    runs = [("upstream", m) for m in IOMMUS]
    if os.environ.get("PYVFIO_LU_KERNEL_PATCHES") or os.environ.get("PYVFIO_LU_KERNEL_TREE"):
        have_lu = True
    else:
        from pyvfio_lu.vm.kernel import VFIO_LU, find_cached

        have_lu = find_cached(VFIO_LU) is not None
    if have_lu:
        runs += [("vfio-lu", m) for m in os.environ.get("PYVFIO_LU_GUEST_VFIO_LU_IOMMUS", "intel").split(",") if m]
    return runs


RUNS = [] if os.environ.get("PYVFIO_LU_SKIP_GUEST") else _runs()


def _pytest_command(stage: int, results: str) -> str:
    # PYVFIO_LU_GUEST_ONLY: a space-separated selection of guest test files or node ids (debugging)
    only = os.environ.get("PYVFIO_LU_GUEST_ONLY", "tests/guest")
    return (f"PYVFIO_LU_GUEST_STAGE={stage} PYVFIO_LU_RESULTS={results} "
            f"{sys.executable} -m pytest -p no:cacheprovider -q -rfEs {only}")


_RUNS: dict[str, dict] = {}


@pytest.fixture(scope="session")
def guest_results():
    """{iommu: results of one boot-kexec-boot run of all guest tests}, each run made on first use."""

    def get(flavour: str, iommu: str) -> dict:
        if (flavour, iommu) not in _RUNS:
            _RUNS[(flavour, iommu)] = _run_guest(flavour, iommu)
        return _RUNS[(flavour, iommu)]

    return get


def _run_guest(flavour: str, iommu: str) -> dict:
    from pyvfio_lu.vm.kernel import build
    from pyvfio_lu.vm.qemu import GuestError
    from pyvfio_lu.vm.run import run_in_guest

    results_dir = ROOT / "results" / "guest" / f"{time.strftime('%Y%m%d-%H%M%S')}-{flavour}-{iommu}"
    timeout = float(os.environ.get("PYVFIO_LU_GUEST_TIMEOUT", "1800"))
    error = None
    try:
        kernel = build(flavour=flavour).bzimage
        run = run_in_guest(_pytest_command(1, "/shared"), _pytest_command(2, "/shared"),
                           iommu=iommu, results_dir=results_dir, timeout=timeout, cwd=ROOT, kernel=kernel)
        console, summary = run.console_log, run.summary()
    except Exception as exc:  # GuestError, or the kernel could not be built
        if not isinstance(exc, GuestError) and not type(exc).__name__.endswith(("BuildError", "FetchError")):
            raise
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


@pytest.mark.parametrize("nodeid", GUEST_TESTS, ids=GUEST_TESTS)  # explicit: pytest shortens long ids to "nodeidN"
@pytest.mark.parametrize("flavour,iommu", RUNS, ids=[f"{f}-{i}" for f, i in RUNS])
def test_in_guest(flavour: str, iommu: str, nodeid: str, guest_results) -> None:
    guest_results = guest_results(flavour, iommu)
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
