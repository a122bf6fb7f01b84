"""Shared fixtures of the unit tests, and the ABI report line in the terminal summary."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
CDEFS = REPO / "cdefs"

# What test_abi_conformance.py found, per header module, for the terminal summary.
_ABI_REPORT = pytest.StashKey[dict]()


def load_by_path(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def pair():
    """A connected SOCK_SEQPACKET pair for the fd hand-off tests (10 s timeouts)."""
    from pyvfio_lu import handoff

    a, b = handoff.socketpair()
    a.settimeout(10)
    b.settimeout(10)
    yield a, b
    a.close()
    b.close()


@pytest.fixture(scope="session")
def cdefs_build():
    """cdefs/build.py, loaded by path the way setup.py runs it (it is not a package module)."""
    return load_by_path(CDEFS / "build.py", "_pyvfio_lu_test_cdefs_build")


@pytest.fixture(scope="session")
def abi_report(request) -> dict:
    """module name -> counts / differences, filled by the ABI tests, printed at session end."""
    return request.config.stash.setdefault(_ABI_REPORT, {})


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    report = config.stash.get(_ABI_REPORT, None)
    if not report:
        return
    modules = {k: v for k, v in report.items() if not k.startswith("_")}
    if not modules:
        return
    source = report.get("_source", "the kernel uAPI headers")
    total = {key: sum(m[key] for m in modules.values())
             for key in ("structs", "fields", "offsets", "constants", "ioctls", "differences")}
    names = "+".join(sorted(modules))
    if total["differences"]:
        line = (f"ABI ({names}): {total['differences']} difference(s) from {source} "
                f"(see the failing test_abi_conformance test)")
        terminalreporter.write_line(line, red=True, bold=True)
    else:
        line = (f"ABI ({names}): {total['structs']} structs, {total['offsets']} field offsets "
                f"(+ field sizes, signedness, struct types), {total['constants']} constants "
                f"(incl. {total['ioctls']} ioctl numbers) identical to {source}")
        terminalreporter.write_line(line, green=True)



def pytest_collection_modifyitems(config, items):
    """Unit tests run with ResourceWarning (an fd or socket dropped without close) as an error."""
    for item in items:
        if "/tests/unit/" in str(item.path):
            item.add_marker(pytest.mark.filterwarnings("error::ResourceWarning"))
            item.add_marker(pytest.mark.filterwarnings("error::pytest.PytestUnraisableExceptionWarning"))
