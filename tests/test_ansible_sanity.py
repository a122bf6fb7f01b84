"""ansible-test sanity on the collection (scripts/ansible-sanity), each sanity test reported by name.

ansible-test fills a venv per sanity test with pinned linters from the package index on first
use (cached under ~/.ansible/test afterwards) and checks the files git knows. Set
PYVFIO_LU_SKIP_ANSIBLE_SANITY=1 to skip.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
COLLECTION = ROOT / "ansible_collections" / "pyvfio_lu" / "live_update"
ANSIBLE_TEST = Path(sys.executable).parent / "ansible-test"
SKIP = os.environ.get("PYVFIO_LU_SKIP_ANSIBLE_SANITY")


def _sanity_tests() -> list[str]:
    if SKIP or not ANSIBLE_TEST.exists():
        return ["all"]
    proc = subprocess.run([str(ANSIBLE_TEST), "sanity", "--list-tests"], cwd=COLLECTION, capture_output=True,
                          text=True, timeout=120)
    names = [line.strip() for line in proc.stdout.splitlines() if re.fullmatch(r"[a-z0-9-]+", line.strip())]
    return names or ["all"]


TESTS = _sanity_tests()
_RUN: dict[str, object] = {}


def _run() -> dict:
    if not _RUN:
        proc = subprocess.run(["bash", str(ROOT / "scripts" / "ansible-sanity")], cwd=ROOT, capture_output=True,
                              text=True, timeout=3600)
        out = proc.stdout + proc.stderr
        failed: set[str] = set()
        m = re.search(r"FATAL: The \d+ sanity test\(s\) listed below \(out of \d+\) failed.*?\n((?:[a-z0-9-]+\n?)+)", out)
        if m:
            failed = set(m.group(1).split())
        ran = set(re.findall(r'Running sanity test "([a-z0-9-]+)"', out))
        _RUN.update(rc=proc.returncode, out=out, failed=failed, ran=ran,
                    errors=[line for line in out.splitlines() if line.startswith(("ERROR:", "FATAL:"))])
    return _RUN


@pytest.mark.parametrize("sanity_test", TESTS)
def test_ansible_sanity(sanity_test: str) -> None:
    if SKIP:
        pytest.skip("PYVFIO_LU_SKIP_ANSIBLE_SANITY is set")
    if not ANSIBLE_TEST.exists():
        pytest.fail(f"no {ANSIBLE_TEST}: install the fleet extra (bash scripts/setup)", pytrace=False)
    run = _run()
    errors = "\n".join(run["errors"][-40:])  # type: ignore[index]
    if sanity_test == "all":
        if run["rc"] != 0:
            pytest.fail(f"ansible-test sanity failed (rc {run['rc']}):\n{errors}", pytrace=False)
        return
    if sanity_test in run["failed"]:  # type: ignore[operator]
        pytest.fail(f"{sanity_test}:\n" + "\n".join(e for e in run["errors"] if sanity_test in e or "plugins/" in e),  # type: ignore[attr-defined]
                    pytrace=False)
    if sanity_test not in run["ran"]:  # type: ignore[operator]
        pytest.fail(f"ansible-test did not run {sanity_test} (rc {run['rc']}):\n{errors}", pytrace=False)
