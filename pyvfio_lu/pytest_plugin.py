"""pytest support for tests that run on a real kernel across a live update.

Load with ``-p pyvfio_lu.pytest_plugin`` (or ``pytest_plugins = [...]`` in a conftest).
It is inert unless ``PYVFIO_LU_GUEST_STAGE`` is set (the guest runner sets it to ``1``
before the kexec and ``2`` after).

A live-update test is a class with a part for each side of the kexec, like the kernel's
two-stage LUO selftests::

    class TestMemfdSurvives:
        @pytest.mark.before_kexec
        def test_before(self, luo, carry):
            s = luo.create_session("t-memfd")
            m = Memfd.create(data=b"hello")
            s.preserve(m, 1)
            carry["state"] = m.state().to_json()   # JSON data travels to stage 2
            carry.hold(s)                          # the session outlives this process

        @pytest.mark.after_kexec
        def test_after(self, luo, carry):
            s = luo.retrieve_session("t-memfd")
            ...

Stage 1 runs every test not marked ``after_kexec``; stage 2 runs only ``after_kexec``
tests (skipped when their class's ``before_kexec`` part did not pass). ``carry`` data
travels in a LUO *state session* (one sealed memfd of JSON) and the sessions handed to
``carry.hold`` are kept open by a :class:`~pyvfio_lu.holder.Holder` daemon, so the
stage-1 pytest process may exit before the kexec. The stage is checked against LUO
itself: stage 2 must find the state session, stage 1 must not.

Each test's outcome is written to ``$PYVFIO_LU_RESULTS/stage-N.json`` so the host can
report every guest test by name.
"""

from __future__ import annotations

import json
import os
import time
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from collections.abc import Generator, Iterator

    from .luo import LiveUpdate, Session

STAGE_ENV = "PYVFIO_LU_GUEST_STAGE"
RESULTS_ENV = "PYVFIO_LU_RESULTS"
STATE_SESSION = "pyvfio-lu-test-state"
STATE_TOKEN = 0
HOLDER_SOCKET = "/run/pyvfio-lu-test-holder.sock"


def stage() -> int | None:
    value = os.environ.get(STAGE_ENV)
    return int(value) if value in ("1", "2") else None


class Carry(dict[str, Any]):
    """JSON data a live-update test hands from its before_kexec part to its after_kexec part."""

    def __init__(self, key: str, data: dict[str, Any], holder_socket: str | None):
        super().__init__(data)
        self.key = key
        self._holder_socket = holder_socket

    def hold(self, *sessions: Session, **manifest: Any) -> None:
        """Keep ``sessions`` preserved across the kexec (handed to the holder daemon)."""
        if self._holder_socket is None:
            raise RuntimeError("carry.hold() is only available before the kexec")
        from .holder import Holder

        Holder(self._holder_socket).hold_sessions(sessions, {"test": self.key, **manifest})
        self.setdefault("_held", []).extend(s.name for s in sessions)


def _key(item: pytest.Item) -> str:
    cls = item.getparent(pytest.Class)
    return cls.nodeid if cls is not None else item.nodeid


class _GuestState:
    def __init__(self, n: int, results_dir: str | None):
        self.stage = n
        self.results_dir = results_dir
        self.carried: dict[str, dict[str, Any]] = {}  # key -> data from stage 1
        self.passed_before: set[str] = set()
        self.results: dict[str, dict[str, Any]] = {}
        self.holder_socket: str | None = None
        self.started = time.time()


_state: _GuestState | None = None


def pytest_configure(config: pytest.Config) -> None:
    global _state
    config.addinivalue_line("markers", "before_kexec: the part of a live-update test that runs before the kexec")
    config.addinivalue_line("markers", "after_kexec: the part of a live-update test that runs after the kexec")
    n = stage()
    if n is None or hasattr(config, "workerinput"):
        return
    _state = _GuestState(n, os.environ.get(RESULTS_ENV))
    if n == 1:
        _check_cold_boot()
        from .holder import Holder

        Holder.spawn(HOLDER_SOCKET)
        _state.holder_socket = HOLDER_SOCKET
    else:
        _state.carried, _state.passed_before = _load_state()


def _check_cold_boot() -> None:
    from .errors import NoSuchSession
    from .luo import LiveUpdate

    with LiveUpdate() as lu:
        try:
            s = lu.retrieve_session(STATE_SESSION)
        except NoSuchSession:
            return
        s.close()
    raise pytest.UsageError(
        f"{STAGE_ENV}=1 but LUO has an incoming {STATE_SESSION!r} session: this boot came from a live update")


def _load_state() -> tuple[dict[str, dict[str, Any]], set[str]]:
    from .errors import NoSuchSession
    from .luo import LiveUpdate
    from .memfd import Memfd

    try:
        with LiveUpdate() as lu, lu.retrieve_session(STATE_SESSION) as s:
            with Memfd.adopt(s.retrieve(STATE_TOKEN)) as m:
                doc = json.loads(m.read_all())
            s.finish()
    except NoSuchSession:
        raise pytest.UsageError(
            f"{STAGE_ENV}=2 but LUO has no incoming {STATE_SESSION!r} session: the kexec did not "
            "carry the live-update state (cold boot, or the legacy kexec loader was used)") from None
    return doc["carry"], set(doc["passed_before"])


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if _state is None:
        return
    keep: list[pytest.Item]
    drop: list[pytest.Item]
    keep, drop = [], []
    for item in items:
        after = item.get_closest_marker("after_kexec") is not None
        (keep if after == (_state.stage == 2) else drop).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


@pytest.fixture
def carry(request: pytest.FixtureRequest) -> Carry:
    """Data (and held sessions) shared by the two parts of a live-update test class."""
    if _state is None:
        pytest.skip(f"live-update tests run only in the guest ({STAGE_ENV} unset)")
    key = _key(request.node)
    if _state.stage == 2:
        if key not in _state.passed_before:
            pytest.skip(f"the before_kexec part of {key} did not pass, so there is nothing to check after the kexec")
        return Carry(key, _state.carried.get(key, {}), None)
    data = _state.carried.setdefault(key, {})
    c = Carry(key, data, _state.holder_socket)

    def save() -> None:
        assert _state is not None  # the fixture ran because it is set
        _state.carried[key] = dict(c)

    request.addfinalizer(save)
    return c


@pytest.fixture
def luo() -> Iterator[LiveUpdate]:
    """``/dev/liveupdate`` opened for this test and closed after it."""
    from .luo import DEVICE_PATH, LiveUpdate

    if not os.path.exists(DEVICE_PATH):
        pytest.skip("no /dev/liveupdate on this kernel")
    with LiveUpdate() as lu:
        yield lu


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Generator[None, Any, None]:
    outcome = yield
    if _state is None:
        return
    rep = outcome.get_result()
    entry = _state.results.setdefault(item.nodeid, {"outcome": "passed", "duration": 0.0, "longrepr": ""})
    entry["duration"] += rep.duration
    if rep.failed:
        entry["outcome"] = "failed" if rep.when == "call" or entry["outcome"] == "failed" else "error"
        entry["longrepr"] += f"[{rep.when}] {rep.longreprtext}\n"
    elif rep.skipped and entry["outcome"] == "passed":
        entry["outcome"] = "skipped"
        entry["longrepr"] = _skip_reason(rep)
    if rep.when == "teardown" and item.get_closest_marker("before_kexec") and entry["outcome"] == "passed":
        _state.passed_before.add(_key(item))


def _skip_reason(rep: pytest.TestReport) -> str:
    longrepr = rep.longrepr
    if isinstance(longrepr, tuple) and len(longrepr) == 3:
        return str(longrepr[2])
    return str(longrepr)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if _state is None:
        return
    if _state.stage == 1:
        _save_state()
    if _state.results_dir:
        path = os.path.join(_state.results_dir, f"stage-{_state.stage}.json")
        with open(path, "w") as fh:
            json.dump({"stage": _state.stage, "exitstatus": int(exitstatus),
                       "seconds": round(time.time() - _state.started, 2), "tests": _state.results}, fh, indent=1)


def _save_state() -> None:
    from .holder import Holder
    from .luo import LiveUpdate
    from .memfd import Memfd

    assert _state is not None and _state.holder_socket is not None  # stage 1 (pytest_sessionfinish)
    doc = json.dumps({"carry": _state.carried, "passed_before": sorted(_state.passed_before)}).encode()
    with LiveUpdate() as lu:
        s = lu.create_session(STATE_SESSION)
        with Memfd.create("pyvfio-lu-test-state", doc) as m:
            m.seal("grow", "shrink", "seal")
            s.preserve(m, STATE_TOKEN)
        Holder(_state.holder_socket).hold_session(s, {"test": "pyvfio-lu test state"})
