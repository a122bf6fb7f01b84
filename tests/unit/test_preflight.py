"""The checks before and after a live update (pyvfio_lu.kexec.check_image, pyvfio_lu.preflight,
pyvfio_lu.verify) on crafted images, /proc, sysfs and ledgers: no kernel needed."""

from __future__ import annotations

import os
import struct
from pathlib import Path

import pytest
from fake_sysfs import FakeSysfs

from pyvfio_lu import kexec, ledger, preflight, status, verify
from pyvfio_lu.errors import ArgumentOutOfRange, PreflightFailed
from pyvfio_lu.status import Status

MiB = 1 << 20
GOOD_CMDLINE = "console=ttyS0 kho=on liveupdate=on pyvfio_lu.stage=2"


def bzimage(path: Path, *, init_size: int = 26 * MiB, version: int = 0x020F, xloadflags: int = 0x63,
            loadflags: int = 1, signature: bytes = b"HdrS", cmdline_size: int = 2047, size: int = 8 * MiB) -> Path:
    """A file with an x86 setup header as the boot protocol lays it out (the rest is zeros)."""
    head = bytearray(0x268)
    struct.pack_into("<B", head, 0x1F1, 31)
    struct.pack_into("<H", head, 0x1FE, 0xAA55)
    head[0x202:0x206] = signature
    struct.pack_into("<H", head, 0x206, version)
    struct.pack_into("<B", head, 0x211, loadflags)
    struct.pack_into("<I", head, 0x230, 2 * MiB)
    struct.pack_into("<H", head, 0x236, xloadflags)
    struct.pack_into("<I", head, 0x238, cmdline_size)
    struct.pack_into("<Q", head, 0x258, 16 * MiB)
    struct.pack_into("<I", head, 0x260, init_size)
    with open(path, "wb") as fh:
        fh.write(head)
        fh.truncate(size)
    return path


def kho_out(path: Path, areas: list[tuple[int, int]]) -> str:
    path.mkdir(parents=True, exist_ok=True)
    (path / "scratch_phys").write_text("".join(f"0x{a:x}\n" for a, _ in areas))
    (path / "scratch_len").write_text("".join(f"0x{n:x}\n" for _, n in areas))
    return str(path)


AREAS = [(0x1000000, 64 * MiB), (0x7C000000, 100 * MiB)]  # lowmem and global, as on a 1 GiB guest


# --- the image ---------------------------------------------------------------------------------
def test_header_fields_are_read_at_the_boot_protocol_offsets(tmp_path: Path) -> None:
    h = kexec.setup_header(str(bzimage(tmp_path / "bz", init_size=0x1963000)))
    assert h["header"] == b"HdrS" and h["version"] == 0x020F and h["init_size"] == 0x1963000
    assert h["kernel_alignment"] == 2 * MiB and h["pref_address"] == 16 * MiB and h["cmdline_size"] == 2047
    assert kexec.image_problems(h, GOOD_CMDLINE) == []


@pytest.mark.parametrize("kw,words", [
    ({"signature": b"MZ\0\0"}, "not a bzImage"),
    ({"version": 0x020B}, "older than 2.12"),
    ({"loadflags": 0}, "LOADED_HIGH"),
    ({"xloadflags": 0x62}, "XLF_KERNEL_64"),
    ({"xloadflags": 0x61}, "ABOVE_4G"),
    ({"cmdline_size": 40}, "command line"),
])
def test_what_the_x86_loader_refuses(tmp_path: Path, kw: dict, words: str) -> None:
    h = kexec.setup_header(str(bzimage(tmp_path / "bz", **kw)))
    assert any(words in p for p in kexec.image_problems(h, GOOD_CMDLINE))


def test_a_short_file_is_not_a_bzimage(tmp_path: Path) -> None:
    (tmp_path / "short").write_bytes(b"x" * 100)
    with pytest.raises(kexec.KexecError, match="not a bzImage"):
        kexec.setup_header(str(tmp_path / "short"))


def test_segments_are_placed_top_down_in_the_first_area_with_room() -> None:
    segs = [("a", 4 * MiB, 2 * MiB, 0), ("b", 4 * MiB, 4096, 0)]
    where = kexec.place(segs, [(0x1000000, 16 * MiB)])
    assert where == {"a": 0x1C00000, "b": 0x1800000}  # b goes below a: no overlap
    assert kexec.place(segs, [(0x1000000, 6 * MiB)]) == "b"
    assert kexec.place([("k", 2 * MiB, 2 * MiB, 0x4000000)], [(0x1000000, 16 * MiB)]) == "k"  # above buf_min only
    assert kexec.place([("k", 2 * MiB, 2 * MiB, 0)], [(0x1000000, 1 * MiB), (0x8000000, 4 * MiB)]) == {"k": 0x8200000}


def test_check_image_fits(tmp_path: Path) -> None:
    k = bzimage(tmp_path / "bz")
    (tmp_path / "initrd").write_bytes(b"\0" * 4096)
    r = kexec.check_image(str(k), str(tmp_path / "initrd"), GOOD_CMDLINE, kho_out(tmp_path / "kho", AREAS))
    if os.geteuid() != 0:
        pytest.skip("check_image also wants root (CAP_SYS_BOOT)")
    assert r["ok"] and r["fits"] is True and r["error"] is None and r["problems"] == []
    assert r["scratch"] == [list(a) for a in AREAS] and r["needed_bytes"] > 26 * MiB


def test_check_image_too_large_for_the_scratch_areas(tmp_path: Path) -> None:
    k = bzimage(tmp_path / "bz")
    with open(tmp_path / "initrd", "wb") as fh:
        fh.truncate(512 * MiB)  # sparse: costs nothing, counts in full
    r = kexec.check_image(str(k), str(tmp_path / "initrd"), GOOD_CMDLINE, kho_out(tmp_path / "kho", AREAS))
    assert not r["ok"] and r["fits"] is False and r["error"] == "KexecImageTooLarge"
    assert any("initramfs does not fit the KHO scratch areas" in p for p in r["problems"])


def test_check_image_without_debugfs_cannot_tell_the_fit(tmp_path: Path) -> None:
    r = kexec.check_image(str(bzimage(tmp_path / "bz")), None, GOOD_CMDLINE, str(tmp_path / "none"))
    assert r["fits"] is None and r["scratch"] is None and r["initrd_bytes"] is None


@pytest.mark.parametrize("cmdline,missing", [("console=ttyS0 liveupdate=on", "kho=on"),
                                             ("kho=on liveupdate=0", "liveupdate=on"),
                                             ("kho=on liveupdate=on kho=off", "kho=on")])
def test_the_next_kernel_must_keep_live_update_on(tmp_path: Path, cmdline: str, missing: str) -> None:
    r = kexec.check_image(str(bzimage(tmp_path / "bz")), None, cmdline, kho_out(tmp_path / "kho", AREAS))
    assert r["error"] == "LiveUpdateNotEnabled" and any(missing in p for p in r["problems"])


def test_missing_files_are_named(tmp_path: Path) -> None:
    r = kexec.check_image(str(tmp_path / "nope"), str(tmp_path / "nor"), GOOD_CMDLINE)
    assert r["error"] == "KexecError" and len([p for p in r["problems"] if "No such file" in p]) == 2


# --- preflight ---------------------------------------------------------------------------------
def fake_status(**kw: object) -> Status:
    base: dict[str, object] = {"luo_enabled": True, "kho_enabled": True, "liveupdate_number": None,
                               "boot_id": "boot-1", "kexec_loaded": False, "cmdline": GOOD_CMDLINE}
    base.update(kw)
    return Status(**base)  # type: ignore[arg-type]


@pytest.fixture
def host(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A host whose status, ledgers and image check are set by the test."""
    state = {"status": fake_status(), "outgoing": {}, "incoming": {}, "image": {"ok": True, "fits": True,
             "problems": [], "error": None, "kernel_bytes": 1, "initrd_bytes": 1, "needed_bytes": MiB,
             "scratch": [[0, 64 * MiB]]}, "preserved": []}
    monkeypatch.setattr(status, "adopt_ledgers", lambda: True)
    monkeypatch.setattr(status, "status", lambda proc="/proc": state["status"])
    monkeypatch.setattr(status, "preserved_devices", lambda: state["preserved"])
    monkeypatch.setattr(ledger, "outgoing", lambda: state["outgoing"])
    monkeypatch.setattr(ledger, "incoming", lambda: state["incoming"])
    monkeypatch.setattr(kexec, "check_image", lambda *a, **k: dict(state["image"]))
    proc = tmp_path / "proc"
    proc.mkdir()
    (proc / "interrupts").write_text("")
    state["proc"] = proc
    return state


def holder_proc(proc: Path, pid: int, sessions: list[str]) -> None:
    fd = proc / str(pid) / "fd"
    fd.mkdir(parents=True)
    (proc / str(pid) / "comm").write_text("python\n")
    for n, name in enumerate(sessions, start=3):
        os.symlink(f"anon_inode:[luo_session] {name}", fd / str(n))


def names(report: dict) -> dict[str, tuple[bool, str | None]]:
    return {c["name"]: (c["ok"], c["error"]) for c in report["checks"]}


def test_every_precondition_met(host) -> None:  # type: ignore[no-untyped-def]
    holder_proc(host["proc"], 70, ["vm-a", "pyvfio-lu.ledger.0"])
    host["outgoing"] = {"vm-a": {"files": {"0x1": {"kind": "memfd"}}, "holder": {"pid": 70}}}
    r = preflight.preflight("/k", "/i", GOOD_CMDLINE, sessions=["vm-a"], proc=str(host["proc"]))
    assert r["ok"] and r["error"] is None and r["failed"] == [] and r["warnings"] == []
    assert names(r) == {"luo": (True, None), "kho": (True, None), "kexec_image": (True, None),
                        "unfinished_incoming": (True, None), "session vm-a": (True, None)}
    assert "its ledger lists 1 file(s)" in r["checks"][-1]["detail"]
    preflight.raise_for(r)  # nothing to raise


def test_failures_name_the_library_error_and_everything_else_is_still_checked(host) -> None:  # type: ignore[no-untyped-def]
    host["status"] = fake_status(luo_enabled=False, kho_enabled=None)
    host["image"].update(ok=False, error="KexecImageTooLarge", problems=["the initramfs does not fit"])
    host["incoming"] = {"vm-old": {"files": {}}}
    r = preflight.preflight("/k", "/i", GOOD_CMDLINE, sessions=["vm-a", "vm-old"], proc=str(host["proc"]))
    assert not r["ok"] and r["error"] == "LiveUpdateNotEnabled"
    assert names(r) == {"luo": (False, "LiveUpdateNotEnabled"), "kho": (False, "LiveUpdateNotEnabled"),
                        "kexec_image": (False, "KexecImageTooLarge"),
                        "unfinished_incoming": (False, "SessionNotFinished"),
                        "session vm-a": (False, "SessionNotHeld"), "session vm-old": (False, "SessionNotFinished")}
    assert "the initramfs does not fit" in r["message"]
    with pytest.raises(PreflightFailed, match="kexec_image"):
        preflight.raise_for(r)


def test_a_held_session_no_ledger_describes_is_a_warning(host) -> None:  # type: ignore[no-untyped-def]
    holder_proc(host["proc"], 71, ["vm-b"])
    r = preflight.preflight("/k", None, GOOD_CMDLINE, sessions=["vm-b"], proc=str(host["proc"]))
    assert r["ok"] and "no ledger describes it" in r["warnings"][0]


def test_devices_default_to_those_the_held_sessions_preserve(host, tmp_path: Path,  # type: ignore[no-untyped-def]
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    fs = FakeSysfs(tmp_path / "sys")
    fs.add("0000:00:04.0", group=1, driver="vfio-pci")
    (fs.dev_dir("0000:00:04.0") / "power_state").write_text("D0\n")
    host["preserved"] = [{"bdf": "0000:00:04.0", "session": "vm-a", "token": "0x2", "direction": "outgoing"}]
    monkeypatch.setattr(preflight, "device_preservation", lambda: _support(True))
    r = preflight.preflight("/k", None, GOOD_CMDLINE, proc=str(host["proc"]), sysfs=str(fs))
    assert r["devices"] == ["0000:00:04.0"] and r["ok"], r["message"]
    dev = r["checks"][-1]
    assert dev["name"] == "device 0000:00:04.0" and dev["cdev"] == "/dev/vfio/devices/vfio0"
    assert "preserved in session 'vm-a'" in dev["detail"]
    (host["proc"] / "interrupts").write_text(" 24:  5  0  IR-PCI-MSI  vfio-msi[0](0000:00:04.0)\n")
    (fs.dev_dir("0000:00:04.0") / "power_state").write_text("D3hot\n")
    r = preflight.preflight("/k", None, GOOD_CMDLINE, proc=str(host["proc"]), sysfs=str(fs))
    assert not r["ok"] and r["error"] == "NotLiveUpdateReady"
    assert "IRQs enabled (msi: 1" in r["message"] and "D3hot, not D0" in r["message"]
    monkeypatch.setattr(preflight, "device_preservation", lambda: _support(False))
    r = preflight.preflight("/k", None, GOOD_CMDLINE, proc=str(host["proc"]), sysfs=str(fs))
    assert r["error"] == "VfioPreservationUnsupported"


def _support(yes: bool):  # type: ignore[no-untyped-def]
    from pyvfio_lu.preservation import Support

    return Support(yes, "test", "CONFIG_VFIO_PCI_LIVEUPDATE=y" if yes else "not set")


def test_a_named_device_nobody_holds_is_not_ready(host, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    fs = FakeSysfs(tmp_path / "sys")
    fs.add("0000:00:04.0", group=1, driver="vfio-pci")
    fs.add("0000:00:09.0", group=2)
    monkeypatch.setattr(preflight, "device_preservation", lambda: _support(True))
    checks = preflight.check_devices(["0000:00:04.0", "0000:00:09.0"], sysfs=str(fs), proc=str(host["proc"]))
    assert [c["error"] for c in checks] == ["NotLiveUpdateReady", "DeviceNotBound"]
    assert "no process has the device's VFIO fd open" in checks[0]["detail"]
    assert "not preserved in any held session" in checks[0]["detail"]
    ready = preflight.check_devices(["0000:00:04.0"], require_preserved=False, sysfs=str(fs), proc=str(host["proc"]))
    assert ready[0]["error"] == "NotLiveUpdateReady"  # nobody has it open and bound


# --- after the kexec -----------------------------------------------------------------------------
@pytest.fixture
def after(monkeypatch: pytest.MonkeyPatch):
    state = {"status": fake_status(boot_id="boot-2", liveupdate_number=1), "came": {}, "adopted": True}
    monkeypatch.setattr(status, "status", lambda proc="/proc": state["status"])
    monkeypatch.setattr(status, "adopt_ledgers", lambda: state["adopted"])
    monkeypatch.setattr(ledger, "adopted", lambda: state["adopted"])
    monkeypatch.setattr(ledger, "came_in", lambda: state["came"])
    return state


def test_verified(after) -> None:  # type: ignore[no-untyped-def]
    after["came"] = {"vm-a": {"finished": True}}
    r = verify.verify("boot-1", None, ["vm-a"], timeout=1)
    assert r["ok"] and r["sessions"] == {"vm-a": "finished"} and r["expected_number"] == 1


def test_same_boot_id_means_no_kexec(after) -> None:  # type: ignore[no-untyped-def]
    r = verify.verify("boot-2", None, [], timeout=1)
    assert not r["ok"] and r["error"] == "LiveUpdateNotVerified" and "did not happen" in r["message"]


@pytest.mark.parametrize("number,before", [(None, None), (1, 1), (3, 1)])
def test_the_live_update_number_must_be_one_more(after, number, before) -> None:  # type: ignore[no-untyped-def]
    after["status"] = fake_status(boot_id="boot-2", liveupdate_number=number)
    r = verify.verify("boot-1", before, [], timeout=1)
    assert r["error"] == "LiveUpdateNotVerified" and "expected" in r["message"]


def test_a_session_the_ledgers_do_not_name_did_not_come_through(after) -> None:  # type: ignore[no-untyped-def]
    after["came"] = {"vm-a": {"finished": True}}
    r = verify.verify("boot-1", None, ["vm-a", "vm-b"], timeout=5)
    assert r["error"] == "NoSuchSession" and "'vm-b'" in r["message"] and r["waited"] < 1


def test_waiting_for_the_post_kexec_job(after) -> None:  # type: ignore[no-untyped-def]
    after["came"] = {"vm-a": {"finished": False}}
    r = verify.verify("boot-1", None, ["vm-a"], timeout=0.3, poll=0.05)
    assert r["error"] == "SessionNotFinished" and r["sessions"] == {"vm-a": "incoming"} and r["waited"] >= 0.3
    assert verify.verify("boot-1", None, ["vm-a"], wanted="incoming", timeout=1)["ok"]
    assert verify.verify("boot-1", None, ["vm-a"], wanted="present", timeout=1)["ok"]
    after["came"] = {"vm-a": {"finished": True}}
    r = verify.verify("boot-1", None, ["vm-a"], wanted="incoming", timeout=1)
    assert r["error"] == "LiveUpdateNotVerified" and "finished already" in r["message"]


def test_wanted_is_checked(after) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ArgumentOutOfRange):
        verify.verify("boot-1", None, [], wanted="gone")


def test_came_in_marks_finished_sessions(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ledger.RUN_DIR_ENV, str(tmp_path))
    monkeypatch.setattr(ledger, "_adopted_here", None)
    os.makedirs(ledger._finished_dir())
    with open(ledger._incoming_path(), "w") as fh:
        fh.write('{"sessions": {"vm-a": {"files": {}}, "vm-b": {"files": {}}}}')
    ledger.mark_finished("vm-a")
    assert ledger.came_in() == {"vm-a": {"files": {}, "finished": True}, "vm-b": {"files": {}, "finished": False}}
    assert set(ledger.incoming()) == {"vm-b"}


# --- the detached reboot -------------------------------------------------------------------------
def test_execute_later_needs_a_loaded_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(kexec, "loaded", lambda: False)
    with pytest.raises(kexec.KexecError, match="no kexec kernel is loaded"):
        kexec.execute_later(0.0)


def test_execute_later_waits_for_the_caller_then_reports_a_refusal(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    import subprocess
    import time

    from pyvfio_lu.errors import KexecRefused

    calls = tmp_path / "calls"

    def refused() -> None:  # runs in the detached process, in place of reboot(RB_KEXEC)
        calls.write_text(str(time.monotonic()))
        raise KexecRefused(16, "reboot(RB_KEXEC)", "the loaded kexec kernel")

    monkeypatch.setattr(kexec, "loaded", lambda: True)
    monkeypatch.setattr(kexec, "execute", refused)
    caller = subprocess.Popen(["sleep", "0.5"])
    report = tmp_path / "report.json"
    t0 = time.monotonic()
    pid = kexec.execute_later(0.2, str(report), after_exit_of=caller.pid)
    assert pid > 0 and pid != os.getpid()
    caller.wait()
    deadline = time.monotonic() + 10
    while not report.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    import json

    doc = json.loads(report.read_text())
    assert doc["error"] == "KexecRefused" and doc["errno"] == 16 and not doc["ok"]
    assert float(calls.read_text()) - t0 >= 0.5  # not before the caller had gone and the delay passed
