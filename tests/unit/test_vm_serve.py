"""Served guests (pyvfio_lu.vm.serve): the forwarded SSH port, the boot script, and a fake QEMU."""

from __future__ import annotations

import shutil
import socket
import subprocess
import threading
from pathlib import Path

import pytest

from pyvfio_lu.vm import qemu, serve
from pyvfio_lu.vm.qemu import GuestError, QemuSpec


def spec(tmp_path: Path, **kw: object) -> QemuSpec:
    return QemuSpec(kernel=Path("/k/bzImage"), initrd=Path("/k/initrd.gz"), results_dir=tmp_path, **kw)  # type: ignore[arg-type]


def netdevs(argv: list[str]) -> list[str]:
    return [argv[i + 1] for i, a in enumerate(argv) if a == "-netdev"]


def test_ssh_port_forwards_from_loopback_only_and_keeps_restrict(tmp_path: Path) -> None:
    assert netdevs(qemu.qemu_argv(spec(tmp_path, ssh_port=2222))) == [
        "user,id=net1,restrict=on", "user,id=net0,restrict=on,hostfwd=tcp:127.0.0.1:2222-:22"]


def test_no_ssh_port_leaves_the_command_line_as_it_was(tmp_path: Path) -> None:
    assert qemu.qemu_argv(spec(tmp_path)) == qemu.qemu_argv(spec(tmp_path, ssh_port=None))
    assert not any("hostfwd" in a for a in qemu.qemu_argv(spec(tmp_path)))


@pytest.mark.parametrize("bad", [0, 65536, -1, True, "22", 2.5])
def test_ssh_port_is_checked(tmp_path: Path, bad: object) -> None:
    with pytest.raises(ValueError):
        spec(tmp_path, ssh_port=bad)


def test_ssh_port_needs_the_nic(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="needs the guest NIC"):
        spec(tmp_path, ssh_port=2222, net=False)


def test_serve_markers_are_parsed() -> None:
    m = qemu.parse_markers([(1.0, "pyvfio-lu: sshd started stage=3"), (2.0, "pyvfio-lu: serving stage=3")])
    assert m.times == {"sshd3": 1.0, "serving3": 2.0}


def test_serve_script_is_valid_sh_and_runs_each_boot_the_same(tmp_path: Path) -> None:
    text = serve.serve_script(Path("/k/bz Image"), Path("/k/initrd"), Path("/src"), "/usr/sbin/dropbear")
    (tmp_path / "run.sh").write_text(text)
    assert subprocess.run(["sh", "-n", str(tmp_path / "run.sh")]).returncode == 0
    assert "'/k/bz Image'" in text  # quoted
    assert "-r /shared/ssh/host_ed25519" in text and "-s" in text.split()  # key only, no passwords
    assert 'echo "pyvfio-lu: serving stage=$stage"' in text
    assert "kexec" not in text.replace("PYVFIO_LU_GUEST_KERNEL", "").replace("(a live update loads them again)", "")


def test_free_port_is_free() -> None:
    port = serve.free_port()
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))


needs_tools = pytest.mark.skipif(not (shutil.which("dropbearkey") and shutil.which("ssh-keygen")),
                                 reason="dropbear-bin and openssh-client are installed by scripts/setup")


@needs_tools
def test_keys_are_made_once_and_known_hosts_matches(tmp_path: Path) -> None:
    keys = serve.SshKeys.create(tmp_path / "ssh")
    again = serve.SshKeys.create(tmp_path / "ssh")
    assert keys == again  # the same host key every boot: known_hosts stays valid
    assert keys.host_public.startswith("ssh-ed25519 ") and len(keys.host_public.split()) == 2
    assert keys.known_hosts_line(2200) == f"[127.0.0.1]:2200 {keys.host_public}"
    assert (tmp_path / "ssh" / "authorized_keys").read_text() == keys.client_public + "\n"
    assert (tmp_path / "ssh").stat().st_mode & 0o777 == 0o700
    shared = serve.SshKeys.create(tmp_path / "other", client_key=keys.client_key)
    assert shared.client_public == keys.client_public and shared.host_public != keys.host_public


FAKE_SERVED = """\
echo 'Linux version 7.2.13'
echo 'pyvfio-lu: init stage=1'; echo 'pyvfio-lu: stage 1 begin'
echo 'pyvfio-lu: sshd started stage=1'
echo 0 > "$R/stage-1.rc"; echo 'pyvfio-lu: stage 1 command rc=0'; echo 'pyvfio-lu: serving stage=1'
while [ ! -e "$R/poweroff" ]; do sleep 0.1; done
echo 'pyvfio-lu: stage 1 end rc=0'; echo 'pyvfio-lu: poweroff'
"""


def _banner_server(port: int, stop: threading.Event) -> None:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", port))
        s.listen()
        s.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = s.accept()
            except OSError:
                continue
            with conn:
                conn.sendall(b"SSH-2.0-fake\r\n")


@needs_tools
@pytest.mark.parametrize("script,ok", [(FAKE_SERVED, True),
                                       (FAKE_SERVED.replace("echo 0 >", "echo 4 >")
                                        .replace("rc=0'; echo 'pyvfio-lu: serving", "rc=4'; echo 'pyvfio-lu: serving"),
                                        False)])
def test_guest_server_with_fake_qemu(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, script: str, ok: bool) -> None:
    monkeypatch.setenv("PYVFIO_LU_CACHE", str(tmp_path / "cache"))
    (tmp_path / "busybox").write_bytes(b"fake busybox")
    monkeypatch.setenv("PYVFIO_LU_BUSYBOX", str(tmp_path / "busybox"))
    monkeypatch.setattr(serve, "find_sshd", lambda: "/usr/sbin/dropbear")
    kernel = tmp_path / "bzImage"
    kernel.write_bytes(b"kernel")
    seen: list[QemuSpec] = []

    def argv(s: QemuSpec) -> list[str]:
        seen.append(s)
        return ["sh", "-c", f"R={s.results_dir}\n" + script, "-name", "x"]

    monkeypatch.setattr(qemu, "qemu_argv", argv)
    stop = threading.Event()
    guest = serve.GuestServer("true", name="t", results_dir=tmp_path / "g", kernel=kernel, accel="tcg", timeout=30)
    server = threading.Thread(target=_banner_server, args=(guest.port, stop), daemon=True)
    server.start()
    try:
        guest.start()
        assert seen[0].ssh_port == guest.port
        if ok:
            assert guest.wait_serving(1, timeout=20) >= 0
        else:
            with pytest.raises(GuestError, match="exited 4"):
                guest.wait_serving(1, timeout=20)
        result = guest.stop(timeout=20)
    finally:
        stop.set()
        server.join()
    assert result is not None and result.ok is ok and result.stage_rc == {1: 0 if ok else 4}
    assert (tmp_path / "g" / "boot.sh").read_text() == "true\n"
    assert (tmp_path / "g" / "poweroff").exists() and not guest.running
