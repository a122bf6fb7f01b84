"""Host runs collect tests/unit and tests/test_guest.py (which boots the guest and reports
each guest test by name); inside the guest, tests/guest runs for real."""

import os

import pytest

pytest_plugins = ["pyvfio_lu.pytest_plugin"]

# The guest tests need the real kernel: on the host they are collected through
# tests/test_guest.py, never directly.
collect_ignore = [] if os.environ.get("PYVFIO_LU_GUEST_STAGE") else ["guest"]


def _open_fds() -> dict[int, str]:
    out = {}
    for name in os.listdir("/proc/self/fd"):
        try:
            out[int(name)] = os.readlink(f"/proc/self/fd/{name}")
        except OSError:
            pass  # the directory fd of this very listing
    return out


@pytest.fixture(autouse=True)
def no_fd_leaks(request):
    """Fail any unit or guest test that leaves an fd open, unless it is marked ``keeps_fds`` (a
    two-stage class whose parts share open objects). Function-scoped fixtures have closed theirs
    by the time this checks; session-scoped ones were opened before the first snapshot."""
    path = str(request.node.path)
    if request.node.get_closest_marker("keeps_fds") or not ("/tests/unit/" in path or "/tests/guest/" in path):
        yield
        return
    before = _open_fds()
    yield
    import gc

    leaked = {fd: link for fd, link in _open_fds().items() if before.get(fd) != link}
    if leaked:
        gc.collect()  # an object dropped without close(): its finalizer closes the fd, but late
        leaked = {fd: link for fd, link in _open_fds().items() if before.get(fd) != link}
    if leaked:
        pytest.fail("the test left fds open: " + ", ".join(f"{fd} -> {link}" for fd, link in sorted(leaked.items())))


def pytest_terminal_summary(terminalreporter):
    """One line per ``record_property("timing", ...)`` of a test that ran (tests/test_wheel.py)."""
    lines = [f"{report.nodeid.rsplit('::', 1)[-1]}: {value}"
             for reports in terminalreporter.stats.values() for report in reports
             if getattr(report, "when", None) == "call"
             for key, value in getattr(report, "user_properties", ()) if key == "timing"]
    for line in lines:
        terminalreporter.write_line(f"timing: {line}")
