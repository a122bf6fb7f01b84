"""The live_update action's logic (preflight, load and kexec, probe, verify) against scripted module
results and a virtual clock: every way a live update can end, without a host."""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace
from unittest import mock

import pytest

pytest.importorskip("ansible", reason="ansible-core is the fleet extra (bash scripts/setup installs it)")

from ansible.errors import AnsibleConnectionFailure

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from ansible_collections.pyvfio_lu.live_update.plugins.action import live_update as action_mod  # noqa: E402

KERNEL = {"kernel": "/boot/vmlinuz-next", "initrd": "/boot/initrd-next", "sessions": ["vm-1"]}


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


def boot(boot_id: str, uptime: float = 5.0, report: dict | None = None) -> dict:
    out = {"ansible_facts": {"pyvfio_lu": {"boot_id": boot_id, "liveupdate_number": 1, "uptime": uptime}}}
    if report:
        out["exec_report"] = report
    return out


def run_action(monkeypatch: pytest.MonkeyPatch, script: dict, args: dict | None = None, check_mode: bool = False):
    """Run the action with each module's results taken in turn from ``script[module]`` (a result
    dict, or an exception to raise). Returns (result, the modules called in order)."""
    clock = Clock()
    monkeypatch.setattr(action_mod, "time", SimpleNamespace(monotonic=clock.monotonic, sleep=clock.sleep))
    task = mock.MagicMock(args=dict(KERNEL, **(args or {})), async_val=0, check_mode=check_mode,
                          action="pyvfio_lu.live_update.live_update")
    connection = mock.MagicMock(transport="ssh")
    connection._shell.tmpdir = "/tmp/x"
    action = action_mod.ActionModule(task, connection, mock.MagicMock(), None, None)
    calls: list[str] = []

    def execute(module_name: str, module_args: dict, task_vars: dict) -> dict:
        name = module_name.rsplit(".", 1)[-1]
        calls.append(name)
        queue = script[name]
        item = queue.pop(0) if len(queue) > 1 else queue[0]
        if isinstance(item, Exception):
            raise item
        return dict(item)

    action._execute_module = execute  # type: ignore[method-assign]
    return action.run(task_vars={}), calls


PRE_OK = {"boot_id": "b1", "liveupdate_number": 0, "checks": [], "failed_checks": []}
EXEC_OK = {"changed": True, "before": {"boot_id": "b1", "liveupdate_number": 0}, "load_seconds": 1.7,
           "cmdline": "kho=on liveupdate=on"}
VERIFY_OK = {"boot_id": "b2", "liveupdate_number": 1, "expected_number": 1, "sessions": {"vm-1": "finished"},
             "waited": 0.2, "uptime": 30.0, "msg": "live update 1 verified"}


def test_a_live_update_from_preflight_to_verify(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    r, calls = run_action(monkeypatch, {"preflight": [PRE_OK], "kexec": [EXEC_OK],
                                        "facts": [AnsibleConnectionFailure("gone"), boot("b2", uptime=2.5)],
                                        "verify": [VERIFY_OK]})
    assert calls == ["preflight", "kexec", "facts", "facts", "verify"]
    assert not r.get("failed") and r["changed"] and r["stage"] == "done" and r["liveupdate_number"] == 1
    assert set(r["timings"]) == {"preflight", "load_and_exec", "kexec", "reconnect", "verify", "total"}
    assert r["before"] == {"boot_id": "b1", "liveupdate_number": 0} and r["probes"] == 2
    # exec returned at t=0, probes at t=3 (down) and t=4 (up, 2.5 s after the new kernel started)
    assert r["timings"]["kexec"] == pytest.approx(1.5) and r["timings"]["reconnect"] == pytest.approx(2.5)


def test_a_failed_preflight_changes_nothing(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    r, calls = run_action(monkeypatch, {"preflight": [{"failed": True, "error": "SessionNotHeld",
                                                       "msg": "no process holds session 'vm-1'"}]})
    assert calls == ["preflight"] and r["failed"] and not r["changed"] and r["stage"] == "preflight"
    assert r["error"] == "SessionNotHeld" and "before" not in r


def test_check_mode_runs_the_preflight_only(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    r, calls = run_action(monkeypatch, {"preflight": [PRE_OK]}, args={"preflight": False}, check_mode=True)
    assert calls == ["preflight"] and r["changed"] and not r.get("failed")


def test_a_failed_load_reboots_nothing(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    r, calls = run_action(monkeypatch, {"preflight": [PRE_OK], "kexec": [{"failed": True, "error": "KexecImageTooLarge",
                                                                           "msg": "does not fit"}]})
    assert calls == ["preflight", "kexec"] and r["failed"] and r["stage"] == "load"
    assert r["error"] == "KexecImageTooLarge" and r["msg"].startswith("nothing was rebooted")


def test_a_lost_kexec_result_is_settled_by_the_probes(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    r, calls = run_action(monkeypatch, {"preflight": [PRE_OK], "kexec": [AnsibleConnectionFailure("cut")],
                                        "facts": [boot("b2")], "verify": [VERIFY_OK]})
    assert calls == ["preflight", "kexec", "facts", "verify"] and r["stage"] == "done" and r["exec_result_lost"]


def test_a_refused_kexec_is_named_and_the_host_runs_on(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    refused = {"ok": False, "error": "KexecRefused", "message": "reboot(RB_KEXEC): a preserved file failed to freeze"}
    r, calls = run_action(monkeypatch, {"preflight": [PRE_OK], "kexec": [EXEC_OK],
                                        "facts": [boot("b1"), boot("b1", report=refused)]})
    assert r["failed"] and r["stage"] == "kexec" and r["error"] == "KexecRefused" and "verify" not in calls
    assert "sessions still held" in r["msg"] and "failed to freeze" in r["msg"]


def test_an_old_kernel_that_stays_is_reported(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    r, _calls = run_action(monkeypatch, {"preflight": [PRE_OK], "kexec": [EXEC_OK], "facts": [boot("b1")]},
                          args={"old_kernel_grace": 10})
    assert r["failed"] and r["error"] == "LiveUpdateNotVerified" and "still runs its old kernel" in r["msg"]


def test_a_host_that_never_comes_back_times_out(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    r, _calls = run_action(monkeypatch, {"preflight": [PRE_OK], "kexec": [EXEC_OK],
                                        "facts": [AnsibleConnectionFailure("down")]}, args={"reboot_timeout": 30})
    assert r["failed"] and r["error"] == "LiveUpdateNotVerified" and "did not come back within 30 s" in r["msg"]


def test_verify_failure_names_the_error(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    r, _calls = run_action(monkeypatch, {"preflight": [PRE_OK], "kexec": [EXEC_OK], "facts": [boot("b2")],
                                        "verify": [{"failed": True, "error": "NoSuchSession", "msg": "'vm-1' not carried",
                                                    "boot_id": "b2", "liveupdate_number": 1}]})
    assert r["failed"] and r["stage"] == "verify" and r["error"] == "NoSuchSession" and r["changed"]


def test_a_local_connection_is_refused(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    clock = Clock()
    monkeypatch.setattr(action_mod, "time", SimpleNamespace(monotonic=clock.monotonic, sleep=clock.sleep))
    task = mock.MagicMock(args=dict(KERNEL), async_val=0, check_mode=False)
    connection = mock.MagicMock(transport="local")
    connection._shell.tmpdir = "/tmp/x"
    r = action_mod.ActionModule(task, connection, mock.MagicMock(), None, None).run(task_vars={})
    assert r["failed"] and "would kexec the controller" in r["msg"]
