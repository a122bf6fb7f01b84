"""pyvfio_lu.procfs (who holds which fd) and pyvfio_lu.status (read-only LUO/KHO status).

Real /proc for this process, and crafted proc trees / KHO blobs under tmp_path for the
LUO-specific cases this host cannot produce."""

from __future__ import annotations

import os
import struct

import pytest

from pyvfio_lu import procfs, status


@pytest.fixture
def devnull():
    fd = os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC)
    yield fd
    os.close(fd)


def fake_proc(root, pid: int, comm: str, links: dict[int, str]):
    """``root/PID/fd/N -> link`` (dangling symlinks are fine: only readlink is used)."""
    fd_dir = root / str(pid) / "fd"
    fd_dir.mkdir(parents=True)
    (root / str(pid) / "comm").write_text(comm + "\n")
    for fd, link in links.items():
        os.symlink(link, fd_dir / str(fd))
    return root


# --- procfs -------------------------------------------------------------------------------------
@pytest.mark.parametrize("link,name", [
    ("anon_inode:[luo_session] vm-1", "vm-1"),
    ("anon_inode:[luo_session] name with spaces", "name with spaces"),
    ("anon_inode:[luo_session]", ""),
])
def test_session_name_from_link(link, name):
    assert procfs.session_name_from_link(link) == name


@pytest.mark.parametrize("link", ["/dev/liveupdate", "anon_inode:[eventfd]", "pipe:[123]", "/memfd:x (deleted)"])
def test_session_name_from_other_links_is_none(link):
    assert procfs.session_name_from_link(link) is None


def test_holders_finds_this_process_with_dev_null(devnull):
    mine = [h for h in procfs.holders(lambda link: link == "/dev/null") if h.pid == os.getpid()]
    assert any(h.fd == devnull for h in mine)
    h = next(h for h in mine if h.fd == devnull)
    assert h.link == "/dev/null"
    with open("/proc/self/comm") as fh:
        assert h.comm == fh.read().strip()


def test_holders_skips_processes_it_cannot_read(tmp_path):
    fake_proc(tmp_path, 10, "ok", {3: "/dev/null"})
    (tmp_path / "11").mkdir()  # no fd directory: vanished or not readable
    (tmp_path / "self").mkdir()  # not a pid
    assert [(h.pid, h.fd) for h in procfs.holders(lambda link: True, str(tmp_path))] == [(10, 3)]


def test_liveupdate_holders_in_a_crafted_proc(tmp_path):
    fake_proc(tmp_path, 42, "vmm", {7: "/dev/liveupdate", 8: "/dev/null"})
    fake_proc(tmp_path, 43, "other", {3: "/dev/liveupdate-not"})
    got = procfs.liveupdate_holders(str(tmp_path))
    assert [(h.pid, h.fd, h.link) for h in got] == [(42, 7, "/dev/liveupdate")]


def test_session_holders_group_by_session_name(tmp_path):
    fake_proc(tmp_path, 100, "vmm", {5: "anon_inode:[luo_session] vm-1", 6: "anon_inode:[luo_session] vm-2"})
    fake_proc(tmp_path, 200, "holder", {9: "anon_inode:[luo_session] vm-1", 3: "/dev/null"})
    got = procfs.session_holders(str(tmp_path))
    assert sorted(got) == ["vm-1", "vm-2"]
    assert sorted((h.pid, h.fd) for h in got["vm-1"]) == [(100, 5), (200, 9)]
    assert [(h.pid, h.fd) for h in got["vm-2"]] == [(100, 6)]


def test_holder_comm_is_read_from_the_same_proc_tree(tmp_path):
    fake_proc(tmp_path, 4242424, "crafted-comm", {5: "/dev/liveupdate"})
    (h,) = procfs.liveupdate_holders(str(tmp_path))
    assert h.comm == "crafted-comm"


# --- status.liveupdate_number -------------------------------------------------------------------------
def luo_blob(number: int, magic: bytes = b"luo-v5\0\0") -> bytes:
    return magic + struct.pack("<Q", number) + struct.pack("<Q", 0xFFFF8880_00000000)  # + sessions_pa...


@pytest.mark.parametrize("number", [0, 1, 7, 2**64 - 1])
def test_liveupdate_number_from_a_luo_ser_blob(tmp_path, number):
    path = tmp_path / "LUO"
    path.write_bytes(luo_blob(number))
    assert status.liveupdate_number(str(path)) == number


def test_liveupdate_number_missing_file_is_none(tmp_path):
    assert status.liveupdate_number(str(tmp_path / "absent")) is None


@pytest.mark.parametrize("magic", [b"kho-v4\0\0", b"\0" * 8, b"LUO-v5\0\0"])
def test_liveupdate_number_wrong_magic_is_none(tmp_path, magic):
    path = tmp_path / "LUO"
    path.write_bytes(luo_blob(3, magic))
    assert status.liveupdate_number(str(path)) is None


def test_liveupdate_number_short_blob_is_none(tmp_path):
    path = tmp_path / "LUO"
    path.write_bytes(b"luo-v5\0\0\x01\0\0")
    assert status.liveupdate_number(str(path)) is None


def test_liveupdate_number_default_path_is_the_kho_debugfs_entry():
    assert status.KHO_IN_LUO == "/sys/kernel/debug/kho/in/sub_fdts/LUO"
    assert status.liveupdate_number.__defaults__ == (status.KHO_IN_LUO, "/dev/kmsg")


def test_liveupdate_number_falls_back_to_the_boot_log(tmp_path):
    """The incoming debugfs blob can be gone (LUO frees it once sessions are finished); the
    number LUO logged at boot still answers."""
    kmsg = tmp_path / "kmsg"
    kmsg.write_text("6,1,0,-;KHO: found kexec handover data.\n"
                    "6,2,0,-;luo: Retrieved live update data, liveupdate number: 3\n")
    assert status.liveupdate_number(str(tmp_path / "missing"), str(kmsg)) == 3
    kmsg.write_text("6,1,0,-;Linux version 7.2.13\n")
    assert status.liveupdate_number(str(tmp_path / "missing"), str(kmsg)) is None


# --- status.kho_enabled ----------------------------------------------------------------------------------
@pytest.fixture
def no_kho_debugfs(tmp_path, monkeypatch):
    """Point the debugfs probe at an empty directory so only the command line decides."""
    monkeypatch.setattr(status, "DEBUGFS", str(tmp_path))


def test_kho_debugfs_directory_means_enabled(tmp_path, monkeypatch):
    (tmp_path / "kho").mkdir()
    monkeypatch.setattr(status, "DEBUGFS", str(tmp_path))
    assert status.kho_enabled("kho=off") is True


@pytest.mark.parametrize("cmdline", ["kho=on", "kho=1", "kho=y", "quiet kho=on liveupdate=on"])
def test_kho_enabled_on_the_command_line(no_kho_debugfs, cmdline):
    assert status.kho_enabled(cmdline) is True


@pytest.mark.parametrize("cmdline", ["kho=off", "kho=0", "ro kho=off"])
def test_kho_disabled_on_the_command_line(no_kho_debugfs, cmdline):
    assert status.kho_enabled(cmdline) is False


@pytest.mark.parametrize("cmdline", ["", "quiet", "kho_scratch=30%", "nokho=on", "kho=maybe"])
def test_kho_unknown_without_a_kho_parameter(no_kho_debugfs, cmdline):
    assert status.kho_enabled(cmdline) is None


@pytest.mark.parametrize("cmdline,expected", [
    ("kho=Y", True), ("kho=yes", True), ("kho=true", True), ("kho=ON", True), ("kho=enable", True),
    ("kho=n", False), ("kho=N", False), ("kho=no", False), ("kho=false", False), ("kho=disable", False),
])
def test_kho_parameter_is_read_like_the_kernels_kstrtobool(no_kho_debugfs, cmdline, expected):
    """kho= is parsed with kstrtobool (kernel/liveupdate/kexec_handover.c: kho_parse_enable):
    the first character decides (e/y/t/1 true, d/n/f/0 false, either case; o by the second: on/off)."""
    assert status.kho_enabled(cmdline) is expected


def test_kho_last_occurrence_wins_like_the_kernel(no_kho_debugfs):
    """Each kho= on the command line re-runs the early_param; the last one stands."""
    assert status.kho_enabled("kho=on kho=off") is False
    assert status.kho_enabled("kho=off kho=on") is True


# --- status() ------------------------------------------------------------------------------------------------
def test_status_collects_sessions_and_device_holders_as_json(tmp_path):
    fake_proc(tmp_path, 77, "vmm", {4: "anon_inode:[luo_session] vm-9", 5: "/dev/liveupdate"})
    data = status.status(str(tmp_path)).to_json()
    assert list(data["sessions"]) == ["vm-9"]
    assert [(h["pid"], h["fd"]) for h in data["sessions"]["vm-9"]] == [(77, 4)]
    assert [(h["pid"], h["fd"]) for h in data["holders_of_device"]] == [(77, 5)]
    assert set(data) == {"luo_enabled", "kho_enabled", "liveupdate_number", "boot_id", "kexec_loaded",
                         "cmdline", "sessions", "holders_of_device", "device_preservation", "incoming",
                         "preserved_devices"}


def test_status_reads_this_hosts_boot_facts(tmp_path):
    data = status.status(str(tmp_path)).to_json()
    with open("/proc/cmdline") as fh:
        assert data["cmdline"] == fh.read().strip()
    assert data["luo_enabled"] is (os.path.exists("/dev/liveupdate") or os.path.exists(status.LUO_SYSFS))
    assert len(data["boot_id"]) == 36
