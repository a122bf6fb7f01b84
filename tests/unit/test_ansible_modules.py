"""The collection's modules (ansible_collections/pyvfio_lu/live_update) run in-process against the
fake sysfs and stand-ins for the library's checks: results, check mode, diff, idempotence, and
the library's named error in every failure. No kernel, no SSH."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("ansible", reason="ansible-core is the fleet extra (bash scripts/setup installs it)")

from fake_sysfs import guest_like
from test_netsafety import guest_eth0

from pyvfio_lu import kexec, netsafety, status, sysfs
from pyvfio_lu.errors import KexecImageTooLarge

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))  # ansible_collections/ is importable from the repository root

from ansible_collections.pyvfio_lu.live_update.plugins.module_utils import common  # noqa: E402
from ansible_collections.pyvfio_lu.live_update.plugins.modules import (  # noqa: E402
    device,
    facts,
    preflight,
)
from ansible_collections.pyvfio_lu.live_update.plugins.modules import kexec as kexec_module  # noqa: E402
from ansible_collections.pyvfio_lu.live_update.plugins.modules import verify as verify_module  # noqa: E402


def run_module(module: Any, args: dict, capsys: pytest.CaptureFixture[str]) -> tuple[int, dict]:
    """Run ``module.main()`` with ``args`` (``_ansible_check_mode`` etc. allowed); (exit code, result)."""
    try:
        from ansible.module_utils.testing import patch_module_args
    except ImportError:  # ansible-core < 2.19
        import contextlib

        from ansible.module_utils import basic

        @contextlib.contextmanager
        def patch_module_args(a: dict):  # type: ignore[no-untyped-def]
            old = basic._ANSIBLE_ARGS
            basic._ANSIBLE_ARGS = json.dumps({"ANSIBLE_MODULE_ARGS": a}).encode()
            try:
                yield
            finally:
                basic._ANSIBLE_ARGS = old

    with patch_module_args(args):
        with pytest.raises(SystemExit) as info:
            module.main()
    return int(info.value.code or 0), json.loads(capsys.readouterr().out)


@pytest.fixture
def fs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    fake = guest_like(tmp_path / "sys")
    fake.emulate(monkeypatch)
    real = sysfs.PciDevice

    class OnFake(real):  # type: ignore[misc, valid-type]
        def __init__(self, bdf: str, root: str = str(fake)) -> None:
            super().__init__(bdf, root)

    monkeypatch.setattr(sysfs, "PciDevice", OnFake)
    monkeypatch.setattr(netsafety, "open_netlink", guest_eth0)
    return fake


# --- device --------------------------------------------------------------------------------------
def test_device_binds_once_then_is_idempotent(fs, capsys) -> None:  # type: ignore[no-untyped-def]
    rc, r = run_module(device, {"bdf": "0000:00:04.0", "_ansible_diff": True}, capsys)
    assert rc == 0 and r["changed"] and r["driver"] == "vfio-pci" and r["previous_driver"] is None
    assert r["vfio_cdev"] == "/dev/vfio/devices/vfio0" and r["iommu_group"] == 1
    assert r["diff"] == {"before": {"driver": None}, "after": {"driver": "vfio-pci"}}
    rc, r = run_module(device, {"bdf": "0000:00:04.0"}, capsys)
    assert rc == 0 and not r["changed"] and r["driver"] == "vfio-pci"


def test_device_check_mode_changes_nothing(fs, capsys) -> None:  # type: ignore[no-untyped-def]
    rc, r = run_module(device, {"bdf": "0000:00:04.0", "_ansible_check_mode": True}, capsys)
    assert rc == 0 and r["changed"] and r["driver"] == "vfio-pci"
    assert fs.devices["0000:00:04.0"].driver is None


@pytest.mark.parametrize("bdf,error", [("0000:00:1f.2", "GroupNotViable"), ("0000:00:05.0", "InterfaceInUse")])
def test_device_refusals_are_the_clis_and_change_nothing(fs, capsys, bdf, error) -> None:  # type: ignore[no-untyped-def]
    before = fs.devices[bdf].driver
    rc, r = run_module(device, {"bdf": bdf}, capsys)
    assert rc == 1 and r["failed"] and r["error"] == error and not r["changed"] and bdf in r["msg"]
    assert fs.devices[bdf].driver == before


def test_device_force_goes_past_an_active_nic_only(fs, capsys) -> None:  # type: ignore[no-untyped-def]
    rc, r = run_module(device, {"bdf": "0000:00:05.0", "force": True}, capsys)
    assert rc == 0 and r["changed"] and r["driver"] == "vfio-pci"
    assert [u["name"] for u in r["forced_past"]] == ["eth0"]
    rc, r = run_module(device, {"bdf": "0000:00:1f.2", "force": True}, capsys)
    assert rc == 1 and r["error"] == "GroupNotViable"


def test_device_unbound_and_given_back(fs, capsys) -> None:  # type: ignore[no-untyped-def]
    run_module(device, {"bdf": "0000:00:04.0"}, capsys)
    rc, r = run_module(device, {"bdf": "0000:00:04.0", "state": "unbound"}, capsys)
    assert rc == 0 and r["changed"] and r["driver"] is None and r["previous_driver"] == "vfio-pci"
    rc, r = run_module(device, {"bdf": "0000:00:04.0", "state": "unbound"}, capsys)
    assert rc == 0 and not r["changed"]


def test_device_bad_address_is_named(fs, capsys) -> None:  # type: ignore[no-untyped-def]
    rc, r = run_module(device, {"bdf": "../../etc"}, capsys)
    assert rc == 1 and r["error"] == "InvalidBdf"


# --- preflight -----------------------------------------------------------------------------------
def report(ok: bool) -> dict:
    checks = [{"name": "kho", "ok": True, "detail": "KHO is on", "error": None},
              {"name": "kexec_image", "ok": ok, "detail": "the initramfs does not fit",
               "error": None if ok else "KexecImageTooLarge"}]
    return {"ok": ok, "checks": checks, "failed": [] if ok else ["kexec_image"], "error": None if ok else "KexecImageTooLarge",
            "message": "kexec_image: the initramfs does not fit", "warnings": ["a warning"], "boot_id": "b1",
            "liveupdate_number": 1, "devices": []}


@pytest.mark.parametrize("ok", [True, False])
def test_preflight_module(monkeypatch, capsys, ok) -> None:  # type: ignore[no-untyped-def]
    seen = {}

    def fake(kernel, initrd, cmdline, **kw):  # type: ignore[no-untyped-def]
        seen.update(kernel=kernel, initrd=initrd, cmdline=cmdline, **kw)
        return report(ok)

    import pyvfio_lu.preflight

    monkeypatch.setattr(pyvfio_lu.preflight, "preflight", fake)
    rc, r = run_module(preflight, {"kernel": "/k", "cmdline": "kho=on liveupdate=on a=1",
                                   "cmdline_set": {"pyvfio_lu.stage": 3, "a": "2"}, "sessions": ["vm-1"]}, capsys)
    assert seen["cmdline"] == "kho=on liveupdate=on pyvfio_lu.stage=3 a=2" and seen["sessions"] == ["vm-1"]
    assert seen["devices"] is None and seen["require_preserved"] is True
    assert not r["changed"] and r["boot_id"] == "b1" and r["warnings_found"] == ["a warning"]
    if ok:
        assert rc == 0 and r["failed_checks"] == []
    else:
        assert rc == 1 and r["error"] == "KexecImageTooLarge" and r["failed_checks"] == ["kexec_image"]
        assert "the initramfs does not fit" in r["msg"]


# --- kexec ---------------------------------------------------------------------------------------
@pytest.fixture
def host(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict:
    state: dict = {"loaded": False, "loads": [], "unloads": 0, "executed": []}
    monkeypatch.setattr(kexec, "loaded", lambda: state["loaded"])

    def load(k, i, c):  # type: ignore[no-untyped-def]
        if state.get("refuse"):
            raise KexecImageTooLarge(99, "kexec_file_load", k)
        state["loads"].append((k, i, c))
        state["loaded"] = True

    def unload() -> None:
        state["unloads"] += 1
        state["loaded"] = False

    monkeypatch.setattr(kexec, "load", load)
    monkeypatch.setattr(kexec, "unload", unload)
    monkeypatch.setattr(kexec, "execute_later", lambda d, r, after_exit_of=None: state["executed"].append((d, r)) or 4242)
    monkeypatch.setattr(kexec, "check_image", lambda k, i, c: {"ok": True, "problems": [], "error": None})
    monkeypatch.setattr(kexec_module, "RECORD", str(tmp_path / "record.json"))
    monkeypatch.setattr(status, "status", lambda proc="/proc": status.Status(True, True, 1, "b1", False, "kho=on liveupdate=on"))
    monkeypatch.setattr(kexec, "current_cmdline", lambda: "kho=on liveupdate=on pyvfio_lu.stage=1")
    (tmp_path / "bz").write_bytes(b"k")
    state["kernel"] = str(tmp_path / "bz")
    state["report"] = str(tmp_path / "exec.json")
    return state


def test_kexec_loaded_is_idempotent_against_its_record(host, capsys) -> None:  # type: ignore[no-untyped-def]
    args = {"kernel": host["kernel"], "cmdline_set": {"pyvfio_lu.stage": 2}}
    rc, r = run_module(kexec_module, args, capsys)
    assert rc == 0 and r["changed"] and r["cmdline"] == "kho=on liveupdate=on pyvfio_lu.stage=2"
    assert r["before"] == {"boot_id": "b1", "liveupdate_number": 1} and len(host["loads"]) == 1
    rc, r = run_module(kexec_module, args, capsys)
    assert rc == 0 and not r["changed"] and len(host["loads"]) == 1
    rc, r = run_module(kexec_module, dict(args, cmdline_set={"pyvfio_lu.stage": 3}), capsys)
    assert r["changed"] and len(host["loads"]) == 2  # another command line: loaded again
    host["loaded"] = False  # someone unloaded it behind the module's back
    rc, r = run_module(kexec_module, dict(args, cmdline_set={"pyvfio_lu.stage": 3}), capsys)
    assert r["changed"] and len(host["loads"]) == 3


def test_kexec_executed_loads_and_detaches_the_reboot(host, capsys) -> None:  # type: ignore[no-untyped-def]
    rc, r = run_module(kexec_module, {"state": "executed", "kernel": host["kernel"], "exec_report": host["report"]}, capsys)
    assert rc == 0 and r["changed"] and r["exec_pid"] == 4242 and host["executed"] == [(2.0, host["report"])]
    assert r["exec_report"] == host["report"] and "load_seconds" in r


def test_kexec_check_mode_loads_nothing(host, capsys) -> None:  # type: ignore[no-untyped-def]
    rc, r = run_module(kexec_module, {"state": "executed", "kernel": host["kernel"], "_ansible_check_mode": True,
                                      "_ansible_diff": True}, capsys)
    assert rc == 0 and r["changed"] and host["loads"] == [] and host["executed"] == [] and r["image"]["ok"]
    assert r["diff"]["before"]["loaded"] is False and r["diff"]["after"]["loaded"] is True


def test_kexec_load_failure_is_named_and_nothing_reboots(host, capsys) -> None:  # type: ignore[no-untyped-def]
    host["refuse"] = True
    rc, r = run_module(kexec_module, {"state": "executed", "kernel": host["kernel"]}, capsys)
    assert rc == 1 and r["error"] == "KexecImageTooLarge" and host["executed"] == []
    assert r["operation"] == "kexec_file_load" and r["errno"] == "EADDRNOTAVAIL"


def test_kexec_unloaded(host, capsys) -> None:  # type: ignore[no-untyped-def]
    rc, r = run_module(kexec_module, {"state": "unloaded"}, capsys)
    assert rc == 0 and not r["changed"] and host["unloads"] == 0
    host["loaded"] = True
    rc, r = run_module(kexec_module, {"state": "unloaded"}, capsys)
    assert rc == 0 and r["changed"] and host["unloads"] == 1


def test_kexec_missing_kernel_is_a_usage_error(host, capsys) -> None:  # type: ignore[no-untyped-def]
    rc, r = run_module(kexec_module, {"state": "executed"}, capsys)
    assert rc == 1 and "kernel" in r["msg"]


# --- verify and facts ----------------------------------------------------------------------------
def test_verify_module_names_the_error(monkeypatch, capsys) -> None:  # type: ignore[no-untyped-def]
    import pyvfio_lu.verify

    out = {"ok": False, "error": "NoSuchSession", "message": "'vm-2' not carried", "boot_id": "b2",
           "previous_boot_id": "b1", "liveupdate_number": 2, "expected_number": 2, "sessions": {"vm-2": "missing"},
           "waited": 0.0, "uptime": 9.5}
    monkeypatch.setattr(pyvfio_lu.verify, "verify", lambda *a, **k: dict(out))
    rc, r = run_module(verify_module, {"previous_boot_id": "b1", "previous_liveupdate_number": 1,
                                       "sessions": ["vm-2"]}, capsys)
    assert rc == 1 and r["error"] == "NoSuchSession" and r["sessions"] == {"vm-2": "missing"}
    monkeypatch.setattr(pyvfio_lu.verify, "verify", lambda *a, **k: dict(out, ok=True, error=None, message="ok"))
    rc, r = run_module(verify_module, {"previous_boot_id": "b1"}, capsys)
    assert rc == 0 and not r["changed"] and r["msg"] == "ok" and "error" not in r


def test_facts_boot_subset_and_exec_report(tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    (tmp_path / "exec.json").write_text('{"ok": false, "error": "KexecRefused"}')
    rc, r = run_module(facts, {"gather_subset": ["boot"], "exec_report": str(tmp_path / "exec.json")}, capsys)
    f = r["ansible_facts"]["pyvfio_lu"]
    assert rc == 0 and not r["changed"] and set(f) == set(facts.BOOT_KEYS)
    assert f["boot_id"] == Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    assert r["exec_report"]["error"] == "KexecRefused"


def test_next_cmdline_and_error_fields() -> None:
    assert common.next_cmdline("a=1 b", {"a": 2, "c.d": "x"}) == "b a=2 c.d=x"
    fields = common.error_fields(KexecImageTooLarge(99, "kexec_file_load", "/k"))
    assert fields == {"error": "KexecImageTooLarge", "errno": "EADDRNOTAVAIL", "operation": "kexec_file_load",
                      "target": "/k", "reason": KexecImageTooLarge.default_reason}
