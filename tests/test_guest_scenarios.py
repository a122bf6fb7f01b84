"""Guest scenarios that need more than the suite's one kexec: two live updates in a row.

The scenario runs in its own guest (stage 1, kexec, stage 2, kexec, stage 3) on every kernel
flavour the guest suite runs on (intel vIOMMU); each check it prints is reported here by name.
"""

from __future__ import annotations

import os
import re
import sys
import time

import pytest
from test_guest import ROOT, RUNS

CHECKS = [
    "stage1-preserved",
    "stage2-ledger-names-only-this-update", "stage2-ledger-device", "twice-a-ram-intact",
    "stage2-finished", "stage2-preserved-again",
    "stage3-ledger-names-only-this-update", "stage3-ledger-device", "twice-b-ram-intact",
    "stage3-first-session-gone", "stage3-finished", "stage3-live-update-number",
]
DEVICE_CHECKS = ["twice-a-open-refused-names-session", "twice-a-device-dma",
                 "twice-b-open-refused-names-session", "twice-b-device-dma", "stage3-normal-open"]
FLAVOURS = sorted({f for f, _i in RUNS})
_RUNS: dict[str, dict] = {}


def _run(flavour: str) -> dict:
    if flavour not in _RUNS:
        from pyvfio_lu.vm.kernel import build
        from pyvfio_lu.vm.qemu import GuestError
        from pyvfio_lu.vm.run import run_in_guest

        script = f"{sys.executable} tests/scenarios/two_live_updates.py --stage"
        results = ROOT / "results" / "scenarios" / f"{time.strftime('%Y%m%d-%H%M%S')}-{flavour}-twice"
        try:
            res = run_in_guest(f"{script} 1", f"{script} 2", stage3=f"{script} 3", iommu="intel",
                               results_dir=results, timeout=float(os.environ.get("PYVFIO_LU_GUEST_TIMEOUT", "900")),
                               cwd=ROOT, kernel=build(flavour=flavour).bzimage)
            text, error = res.console_log.read_text(errors="replace"), None
            rcs = res.stage_rc
        except GuestError as exc:
            log = results / "console.log"
            text, error, rcs = (log.read_text(errors="replace") if log.exists() else ""), exc, {}
        _RUNS[flavour] = {"checks": set(re.findall(r"\| CHECK (\S+)", text)),
                          "failed": re.findall(r"\| (FAILED \S+: .*)", text), "error": error, "rcs": rcs,
                          "device": "device preservation True" in text, "log": results / "console.log"}
    return _RUNS[flavour]


@pytest.mark.parametrize("check", CHECKS + DEVICE_CHECKS)
@pytest.mark.parametrize("flavour", FLAVOURS)
def test_two_live_updates_in_a_row(flavour: str, check: str) -> None:
    run = _run(flavour)
    if check in DEVICE_CHECKS and not run["device"] and not run["failed"]:
        pytest.skip("this kernel cannot preserve VFIO devices: the scenario carries guest RAM only")
    if check not in run["checks"]:
        pytest.fail(f"{check} did not pass on the {flavour} kernel: {run['failed'] or run['error'] or run['rcs']}\n"
                    f"console log: {run['log']}", pytrace=False)
