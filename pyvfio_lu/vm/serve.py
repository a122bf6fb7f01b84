"""Guests that serve SSH: a fleet of test hosts for remote live updates (Ansible).

A served guest boots the test kernel like any other run (the host's root read-only under a
tmpfs overlay, the results directory at ``/shared``), then at *every* boot, the first and each
one after a live update:

1. starts an SSH server (Debian's ``dropbear``, from the host's root) on port 22, reached from
   the host only through QEMU's forward ``127.0.0.1:PORT -> guest:22`` (the NIC keeps
   ``restrict=on``: the guest reaches nothing outside). Its host key and the one key allowed to
   log in as root are made per run in ``<results>/ssh/`` and are the same after every kexec, so
   a client's ``known_hosts`` stays valid across live updates;
2. runs the boot command (``/shared/boot.sh``; ``$PYVFIO_LU_STAGE`` says which boot it is),
   whose exit code goes to ``/shared/stage-N.rc``;
3. waits (``pyvfio-lu: serving stage=N``) until ``/shared/poweroff`` appears.

Nothing in the guest kexecs by itself: whoever logs in does (``pyvfio_lu.kexec.load`` of the
same kernel and initramfs with ``pyvfio_lu.stage=N+1`` on the command line, then
``execute``), and the next kernel boots the same initramfs into the same script, at stage N+1.

    with GuestServer("python3 -m my_workload", name="fleet-a", results_dir=d) as guest:
        guest.wait_serving(1)                      # boot command done, SSH up
        ... ssh -i guest.keys.client_key -p guest.port root@127.0.0.1 ...
    # powered off; guest.result says how each boot went
"""

from __future__ import annotations

import logging
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from . import qemu
from .initramfs import build_initramfs
from .qemu import GuestError, Line, QemuSpec

if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any

    from typing_extensions import Self  # typing.Self from 3.11; type checkers ship this stub

__all__ = ["GuestServer", "SshKeys", "free_port", "serve_script"]

log = logging.getLogger(__name__)

SSHD_CANDIDATES = ("/usr/sbin/dropbear", "/usr/bin/dropbear")
HOST_KEY = "host_ed25519"  # dropbear's own key format
CLIENT_KEY = "id_ed25519"  # OpenSSH format, for the host's ssh client (Ansible)


def find_sshd() -> str:
    """The SSH server the guest runs (it sees the host's root): Debian's dropbear-bin."""
    for path in SSHD_CANDIDATES:
        if os.access(path, os.X_OK):
            return path
    raise GuestError("no SSH server for the guest: install Debian's dropbear-bin on the host "
                     "(bash scripts/setup does; it ships no service, so nothing listens on the host)")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nobody listens on right now (QEMU binds it just after)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass(frozen=True)
class SshKeys:
    """Throwaway keys of one run: a host key per guest, one client key for logging in."""

    directory: Path
    host_key: Path  # dropbear format, read by the guest's server
    host_public: str  # "ssh-ed25519 AAAA..."
    client_key: Path  # private key for ssh -i
    client_public: str

    @classmethod
    def create(cls, directory: Path, client_key: Path | None = None) -> SshKeys:
        """Make ``directory`` (mode 0700) with a new host key and, unless ``client_key`` (an
        OpenSSH private key with its ``.pub`` beside it) is given, a new client key."""
        directory.mkdir(parents=True, exist_ok=True)
        directory.chmod(0o700)
        host = directory / HOST_KEY
        if not host.exists():
            _run(["dropbearkey", "-t", "ed25519", "-f", str(host)])
        out = _run(["dropbearkey", "-y", "-f", str(host)])
        public = next((line.strip() for line in out.splitlines() if line.startswith("ssh-")), "")
        if not public:
            raise GuestError(f"dropbearkey printed no public key for {host}:\n{out}")
        public = " ".join(public.split()[:2])
        if client_key is None:
            client_key = directory / CLIENT_KEY
            if not client_key.exists():
                _run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "pyvfio-lu-fleet",
                      "-f", str(client_key)])
        client_public = Path(f"{client_key}.pub").read_text().strip()
        (directory / "authorized_keys").write_text(client_public + "\n")
        return cls(directory, host, public, client_key, client_public)

    def known_hosts_line(self, port: int, host: str = "127.0.0.1") -> str:
        return f"[{host}]:{port} {self.host_public}"


def _run(argv: list[str]) -> str:
    tool = shutil.which(argv[0], path=os.environ.get("PATH", "") + ":/usr/sbin:/usr/bin:/sbin:/bin")
    if tool is None:
        raise GuestError(f"{argv[0]} not found: install Debian's "
                         f"{'dropbear-bin' if argv[0].startswith('dropbear') else 'openssh-client'}")
    proc = subprocess.run([tool, *argv[1:]], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise GuestError(f"{shlex.join(argv)} failed (rc {proc.returncode}): {proc.stderr.strip()}")
    return proc.stdout + proc.stderr


def serve_script(kernel: Path, initrd: Path, cwd: Path, sshd: str) -> str:
    """``run.sh`` for a served guest (see the module docstring); the same at every boot."""
    q = shlex.quote
    return f"""#!/bin/sh
# Written by pyvfio_lu.vm.serve for one served guest. The initramfs's /init runs it, chrooted
# into the guest root, at every boot: /bin/sh /shared/run.sh <stage>
stage="${{1:-1}}"
export PYVFIO_LU_STAGE="$stage"
# the kernel and initramfs this guest runs (a live update loads them again)
export PYVFIO_LU_GUEST_KERNEL={q(str(kernel))} PYVFIO_LU_GUEST_INITRD={q(str(initrd))}
cd {q(str(cwd))} 2>/dev/null || cd /
# root logs in with the run's key only (this is the guest's own /root: a tmpfs over the host's)
mkdir -p /root/.ssh && chmod 700 /root/.ssh
cat /shared/ssh/authorized_keys > /root/.ssh/authorized_keys && chmod 600 /root/.ssh/authorized_keys
# bash runs ~/.bashrc for every command sent over SSH: the host's (pyenv, toolchains...) takes
# seconds under TCG and is not the guest's business, so the guest's copy is empty
: > /root/.bashrc
{q(sshd)} -F -E -s -m -p 22 -r /shared/ssh/{HOST_KEY} -P /run/pyvfio-lu-sshd.pid \\
    >>"/shared/sshd-stage-$stage.log" 2>&1 </dev/null &
echo "pyvfio-lu: sshd started stage=$stage"
/bin/sh /shared/boot.sh </dev/null
rc=$?
echo "$rc" > "/shared/stage-$stage.rc"
echo "pyvfio-lu: stage $stage command rc=$rc"
echo "pyvfio-lu: serving stage=$stage"
while [ ! -e /shared/poweroff ]; do sleep 1; done
exit "$rc"
"""


@dataclass
class ServeResult:
    """How a served guest went. Times are host seconds since QEMU started."""

    results_dir: Path
    console_log: Path
    markers: qemu.Markers
    stage_rc: dict[int, int]  # the boot command's exit code at each boot that got that far
    qemu_rc: int | None
    seconds: float
    lines: list[Line] = field(default_factory=list, repr=False)

    def to_json(self) -> dict[str, Any]:
        """The figures a report keeps (as :meth:`GuestResult.to_json` gives them for a run)."""
        return {"results_dir": str(self.results_dir), "console_log": str(self.console_log),
                "stage_rc": self.stage_rc, "qemu_rc": self.qemu_rc, "seconds": self.seconds}

    @property
    def ok(self) -> bool:
        """Every boot's command exited 0, the guest powered off when asked, nothing crashed."""
        return (bool(self.stage_rc) and all(rc == 0 for rc in self.stage_rc.values())
                and "poweroff" in self.markers.times and not self.markers.trouble)


class GuestServer:
    """One served guest, run by QEMU in a background thread (see the module docstring).

    ``command`` is a shell command run at every boot (``$PYVFIO_LU_STAGE`` = the boot's stage);
    ``keys`` defaults to new keys in ``<results_dir>/ssh`` (pass a shared client key to log in
    to a fleet with one key). Use as a context manager, or call :meth:`start` and :meth:`stop`.
    """

    def __init__(self, command: str, *, name: str, results_dir: Path, port: int | None = None,
                 kernel: Path | None = None, iommu: str = "intel", memory: str = "2G",
                 extra_append: str = "", timeout: float = 3600.0, cwd: Path | None = None,
                 client_key: Path | None = None, accel: str | None = None,
                 on_line: Callable[[str, float, str], None] | None = None) -> None:
        self.command = command
        self.name = name
        self.results_dir = Path(results_dir).resolve()
        self.port = port or free_port()
        self.kernel = kernel
        self.iommu = iommu
        self.memory = memory
        self.extra_append = extra_append
        self.timeout = timeout
        self.cwd = Path(cwd or Path.cwd()).resolve()
        self.accel = accel
        self.on_line = on_line
        self._client_key = client_key
        self.keys: SshKeys | None = None
        self.initrd: Path | None = None
        self.result: ServeResult | None = None
        self.error: BaseException | None = None
        self._lines: list[Line] = []
        self._changed = threading.Condition()
        self._abort = threading.Event()
        self._thread: threading.Thread | None = None

    # --- lifecycle ------------------------------------------------------------------------
    def start(self) -> Self:
        from .run import _kernel_image

        sshd = find_sshd()
        kernel = self.kernel = (self.kernel or _kernel_image()).resolve()
        initrd = self.initrd = build_initramfs()
        self.results_dir.mkdir(parents=True, exist_ok=True)
        for stale in [*self.results_dir.glob("stage-*.rc"), self.results_dir / "poweroff"]:
            stale.unlink(missing_ok=True)
        self.keys = SshKeys.create(self.results_dir / "ssh", self._client_key)
        (self.results_dir / "boot.sh").write_text(self.command.rstrip("\n") + "\n")
        (self.results_dir / "run.sh").write_text(serve_script(self.kernel, self.initrd, self.cwd, sshd))
        accel = self.accel or qemu.choose_accel(lambda: qemu.probe_kvm(kernel, initrd),
                                                key=qemu.probe_key(kernel))
        spec = QemuSpec(kernel=self.kernel, initrd=self.initrd, results_dir=self.results_dir,
                        append=self.extra_append, memory=self.memory, iommu=self.iommu, accel=accel,
                        ssh_port=self.port)
        argv = qemu.qemu_argv(spec)
        argv[argv.index("-name") + 1] = f"pyvfio-lu-{self.name}"
        self._thread = threading.Thread(target=self._run, args=(argv,), name=f"guest-{self.name}",
                                        daemon=True)
        self._thread.start()
        log.info("guest %s: QEMU started (ssh 127.0.0.1:%d, results %s)", self.name, self.port,
                 self.results_dir)
        return self

    def _run(self, argv: list[str]) -> None:
        console = self.results_dir / "console.log"
        run = None
        try:
            run = qemu.run_console(argv, log_path=console, timeout=self.timeout, on_line=self._line,
                                   finished=qemu.POWEROFF, abort=self._abort)
        except BaseException as exc:  # noqa: BLE001 - reported by wait_serving/stop
            self.error = exc
        lines = run.lines if run is not None else list(self._lines)
        markers = qemu.parse_markers(lines)
        rcs = {}
        for path in self.results_dir.glob("stage-*.rc"):
            try:
                rcs[int(path.stem.split("-", 1)[1])] = int(path.read_text().strip())
            except ValueError:
                continue
        self.result = ServeResult(self.results_dir, console, markers, dict(sorted(rcs.items())),
                                  run.returncode if run else None, run.seconds if run else 0.0, lines)
        with self._changed:
            self._changed.notify_all()

    def _line(self, t: float, text: str) -> None:
        with self._changed:
            self._lines.append((t, text))
            self._changed.notify_all()
        if self.on_line is not None:
            self.on_line(self.name, t, text)

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def wait_serving(self, stage: int, timeout: float = 600.0) -> float:
        """Wait until boot ``stage``'s command has run and the guest serves SSH; returns host
        seconds since QEMU started. GuestError when the guest ends, crashes or times out first,
        or when the boot command failed."""
        pattern = re.compile(rf"pyvfio-lu: serving stage={stage}\b")
        rc_pattern = re.compile(rf"pyvfio-lu: stage {stage} command rc=(\d+)")
        deadline = time.monotonic() + timeout
        seen = 0
        with self._changed:
            while True:
                for t, text in self._lines[seen:]:  # noqa: B007 - t, the line's time, is returned
                    m = rc_pattern.search(text)
                    if m and m[1] != "0":
                        raise self._failure(f"the boot command of stage {stage} exited {m[1]}")
                    if pattern.search(text):
                        break
                    if qemu._TROUBLE.search(text) and "qemu-system" in text:
                        raise self._failure(f"QEMU: {text}")
                else:
                    seen = len(self._lines)
                    if not self.running and self._thread is not None:
                        raise self._failure(f"the guest ended before serving stage {stage}")
                    left = deadline - time.monotonic()
                    if left <= 0:
                        raise self._failure(f"stage {stage} was not serving within {timeout:.0f} s")
                    self._changed.wait(min(left, 1.0))
                    continue
                break
        self.wait_ssh(max(5.0, deadline - time.monotonic()))
        return t

    def wait_ssh(self, timeout: float = 60.0) -> None:
        """Wait until the forwarded port answers with an SSH banner."""
        deadline = time.monotonic() + timeout
        last = ""
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=5) as s:
                    s.settimeout(5)
                    banner = s.recv(64)
                if banner.startswith(b"SSH-"):
                    return
                last = f"no SSH banner ({banner[:20]!r})"
            except OSError as exc:
                last = str(exc)
            time.sleep(0.3)
        raise self._failure(f"127.0.0.1:{self.port} gave no SSH banner within {timeout:.0f} s ({last})")

    def _failure(self, why: str) -> GuestError:
        tail = [text for _, text in self._lines[-qemu.TAIL_LINES:]]
        return GuestError(f"guest {self.name}: {why}", tail, self.results_dir / "console.log", self.result)

    def stop(self, timeout: float = 120.0) -> ServeResult | None:
        """Ask the guest to power off (``/shared/poweroff``) and wait; QEMU is killed after
        ``timeout`` seconds. Returns the result."""
        if self._thread is None:
            return None
        (self.results_dir / "poweroff").touch()
        self._thread.join(timeout)
        if self._thread.is_alive():
            log.warning("guest %s did not power off within %.0f s: killing QEMU", self.name, timeout)
            self._abort.set()
            self._thread.join(60)
        return self.result

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def lines(self) -> list[Line]:
        with self._changed:
            return list(self._lines)

    def __repr__(self) -> str:
        return (f"<GuestServer {self.name} 127.0.0.1:{self.port} "
                f"{'running' if self.running else 'stopped'} {self.results_dir}>")


def main(argv: list[str] | None = None) -> int:
    """``python -m pyvfio_lu.vm.serve [--port P] -- CMD``: one served guest, until Ctrl-C."""
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m pyvfio_lu.vm.serve",
        description="Boot the test kernel in QEMU with an SSH server reachable on 127.0.0.1:PORT "
                    "only (root, with a key made for the run), run CMD at every boot (also after a "
                    "live update done from inside), and keep the guest up until Ctrl-C.")
    parser.add_argument("--port", type=int, help="host port forwarded to the guest's port 22 (default: a free one)")
    parser.add_argument("--results-dir", type=Path, help="where keys, logs and the console go")
    parser.add_argument("--flavour", choices=["upstream", "vfio-lu"],
                        default=os.environ.get("PYVFIO_LU_KERNEL_FLAVOUR", "upstream"))
    parser.add_argument("--memory", default="2G")
    parser.add_argument("command", nargs="+", metavar="CMD")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[vm] %(message)s")
    import tempfile

    from .kernel import build

    results = args.results_dir or Path(tempfile.mkdtemp(prefix="pyvfio-lu-serve-"))
    guest = GuestServer(" ".join(args.command), name="serve", results_dir=results, port=args.port,
                        kernel=build(flavour=args.flavour).bzimage, memory=args.memory,
                        on_line=lambda _n, t, text: print(f"[{t:7.2f}] {text}", flush=True))
    guest.start()
    try:
        guest.wait_serving(1)
        assert guest.keys is not None
        print(f"serving: ssh -i {guest.keys.client_key} -p {guest.port} -o UserKnownHostsFile="
              f"{results / 'known_hosts'} root@127.0.0.1", flush=True)
        (results / "known_hosts").write_text(guest.keys.known_hosts_line(guest.port) + "\n")
        while guest.running:
            time.sleep(1)
    except KeyboardInterrupt:
        pass
    except GuestError as exc:
        print(f"error: {exc}", file=sys.stderr)
        guest.stop()
        return 2
    result = guest.stop()
    return 0 if result is not None and result.ok else 1


if __name__ == "__main__":
    sys.exit(main())
