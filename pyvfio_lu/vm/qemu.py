"""QEMU for the guest runner: the command line, the accelerator, and the serial console.

The console is QEMU's stdout (``-serial stdio``), read line by line on the host so each line
gets a host timestamp (seconds since QEMU was started); the lines go to a log file that is
kept after the run. Lines starting with ``pyvfio-lu: `` are markers printed by the
initramfs's ``/init`` (``init.sh``) and by the per-run ``run.sh`` (``run.py``);
:func:`parse_markers` turns them into timings.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import logging
import os
import re
import selectors
import shlex
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from .cache import cache_root, locked

if TYPE_CHECKING:
    import threading
    from collections.abc import Callable, Iterable, Mapping, Sequence

    from .run import GuestResult
    from .serve import ServeResult

log = logging.getLogger(__name__)

IOMMU_MODES = ("intel", "virtio")
ACCELS = ("tcg", "kvm")
EDU_BDF = "0000:00:04.0"  # the edu device's fixed address (see qemu_argv)
BASE_APPEND = "console=ttyS0 panic=-1 kho=on liveupdate=on initcall_blacklist=e1000_init_module"
E1000E_BDF = "0000:00:08.0"  # the e1000e test device (see qemu_argv)
#: More edu devices, one per device-preservation test that carries a device across the kexec
#: (a preserved device stays the session's until the kexec, so no two such tests share one).
EDU_SLOTS = {
    "flow": 0x09, "pair-a": 0x0A, "pair-b": 0x0B, "memfds": 0x0C, "busy": 0x0D,
    "operator": 0x0E, "vmm": 0x0F, "ram": 0x10, "frozen": 0x11, "irq": 0x12, "twice": 0x13,
}
EDU_BDFS = {role: f"0000:00:{slot:02x}.0" for role, slot in EDU_SLOTS.items()}
#: virtio-iommu has no interrupt remapping: without these VFIO refuses the device (EPERM).
VIRTIO_IOMMU_APPEND = "vfio_iommu_type1.allow_unsafe_interrupts=1 iommufd.allow_unsafe_interrupts=1"
TAIL_LINES = 40

Line = tuple[float, str]  # (seconds since QEMU started, console text without the newline)


class GuestError(RuntimeError):
    """The guest did not run to its expected end. ``tail`` holds its last console lines."""

    def __init__(self, message: str, tail: Sequence[str] = (), log_path: Path | None = None,
                 result: GuestResult | ServeResult | None = None) -> None:
        text = message
        if log_path is not None:
            text += f"\nconsole log: {log_path}"
        if tail:
            text += f"\n--- last {len(tail)} console lines ---\n" + "\n".join(tail)
        super().__init__(text)
        self.tail = list(tail)
        self.log_path = log_path
        self.result = result  # a partial GuestResult when the runner got that far


class GuestTimeout(GuestError):
    """The guest was still running at the timeout and was killed."""


# ---------------------------------------------------------------------------------------------
# Command line


@dataclass(frozen=True)
class QemuSpec:
    """Everything the QEMU command line depends on."""

    kernel: Path
    initrd: Path
    results_dir: Path  # shared writable with the guest, mounted at /shared
    stage: int = 1
    append: str = ""  # extra kernel parameters
    memory: str = "2G"
    smp: int = 2
    iommu: str = "intel"  # "intel" (intel-iommu, intremap) or "virtio" (virtio-iommu-pci)
    accel: str = "tcg"  # "tcg" or "kvm"
    # TCG with one host thread for all vCPUs. Multi-threaded TCG (QEMU 7.2) crashed about one
    # boot in 15 with "Oops: int3" where the kernel patches its own code (static keys).
    tcg_thread: str = "single"  # or "multi"
    net: bool = True  # a virtio-net NIC on QEMU user networking with restrict=on
    # With a port: the guest's TCP port 22 is forwarded from 127.0.0.1:ssh_port on the host (and
    # from nowhere else); restrict=on stays, so the guest still reaches nothing outside.
    ssh_port: int | None = None
    qemu: str = "qemu-system-x86_64"
    host_root: Path = Path("/")  # shared read-only with the guest, its root's lower layer

    def __post_init__(self) -> None:
        if self.iommu not in IOMMU_MODES:
            raise ValueError(f"iommu must be one of {IOMMU_MODES}, not {self.iommu!r}")
        if self.accel not in ACCELS:
            raise ValueError(f"accel must be one of {ACCELS}, not {self.accel!r}")
        if self.ssh_port is not None:
            if isinstance(self.ssh_port, bool) or not isinstance(self.ssh_port, int) \
                    or not 1 <= self.ssh_port <= 65535:
                raise ValueError(f"ssh_port must be a TCP port number, not {self.ssh_port!r}")
            if not self.net:
                raise ValueError("ssh_port needs the guest NIC (net=True)")


def kernel_cmdline(spec: QemuSpec) -> str:
    """The guest kernel's command line (the kexec in run.sh reuses it with the stage changed)."""
    parts = [BASE_APPEND, f"pyvfio_lu.stage={spec.stage}"]
    if spec.iommu == "virtio":
        parts.append(VIRTIO_IOMMU_APPEND)
    if spec.append.strip():
        parts.append(spec.append.strip())
    return " ".join(parts)


def _qemu_path(path: Path) -> str:
    """A path as a QEMU option value: commas are doubled."""
    return str(path).replace(",", ",,")


def qemu_argv(spec: QemuSpec) -> list[str]:
    """The QEMU command line. Devices sit at fixed PCI slots so their BDFs never move."""
    if spec.accel == "kvm":
        accel, machine, cpu = "kvm", "q35,kernel-irqchip=split", "host"
    else:
        accel, machine, cpu = f"tcg,thread={spec.tcg_thread}", "q35", "max"
    argv = [
        spec.qemu, "-name", "pyvfio-lu", "-nodefaults", "-no-user-config",
        "-display", "none", "-no-reboot", "-accel", accel,
        "-machine", machine, "-cpu", cpu, "-smp", str(spec.smp), "-m", spec.memory,
    ]
    if spec.iommu == "intel":
        argv += ["-device", "intel-iommu,intremap=on,caching-mode=on"]
    else:
        argv += ["-device", "virtio-iommu-pci,addr=0x3"]
    argv += ["-device", "edu,addr=0x4"]
    for slot in EDU_SLOTS.values():
        argv += ["-device", f"edu,addr={slot:#x}"]
    # A second VFIO test device with what edu lacks: a PCI PM capability (D0/D3hot), MSI-X
    # (BAR 3, msix-mappable) and a PM reset. Its guest driver is kept from binding at boot
    # (initcall_blacklist in BASE_APPEND), so interface names do not change.
    argv += ["-netdev", "user,id=net1,restrict=on", "-device", "e1000e,netdev=net1,addr=0x8,romfile="]
    if spec.net:
        forward = "" if spec.ssh_port is None else f",hostfwd=tcp:127.0.0.1:{spec.ssh_port}-:22"
        argv += ["-netdev", f"user,id=net0,restrict=on{forward}",
                 "-device", "virtio-net-pci,netdev=net0,addr=0x5"]
    argv += [
        "-fsdev", (f"local,id=hostroot,path={_qemu_path(spec.host_root)},security_model=none,"
                   "readonly=on,multidevs=remap"),
        "-device", "virtio-9p-pci,fsdev=hostroot,mount_tag=hostroot,addr=0x6",
        "-fsdev", (f"local,id=shared,path={_qemu_path(spec.results_dir)},security_model=none,"
                   "multidevs=remap"),
        "-device", "virtio-9p-pci,fsdev=shared,mount_tag=shared,addr=0x7",
        "-kernel", str(spec.kernel), "-initrd", str(spec.initrd),
        "-append", kernel_cmdline(spec),
        "-serial", "stdio",
    ]
    return argv


# ---------------------------------------------------------------------------------------------
# Markers


MARKER_PREFIX = "pyvfio-lu: "
_MARKERS: tuple[tuple[re.Pattern[str], Callable[[re.Match[str]], str]], ...] = (
    (re.compile(r"pyvfio-lu: init stage=(\d+)"), lambda m: f"init{m[1]}"),
    (re.compile(r"pyvfio-lu: stage (\d+) begin"), lambda m: f"stage{m[1]}.begin"),
    (re.compile(r"pyvfio-lu: stage (\d+) command rc=(\d+)"), lambda m: f"stage{m[1]}.rc"),
    (re.compile(r"pyvfio-lu: stage (\d+) end rc=(\d+)"), lambda m: f"stage{m[1]}.end"),
    (re.compile(r"pyvfio-lu: kexec load"), lambda m: "kexec.load"),
    (re.compile(r"pyvfio-lu: kexec exec"), lambda m: "kexec.exec"),
    (re.compile(r"pyvfio-lu: kexec failed"), lambda m: "kexec.failed"),
    (re.compile(r"pyvfio-lu: init failed"), lambda m: "init.failed"),
    (re.compile(r"pyvfio-lu: poweroff"), lambda m: "poweroff"),
    (re.compile(r"pyvfio-lu: sshd started stage=(\d+)"), lambda m: f"sshd{m[1]}"),
    (re.compile(r"pyvfio-lu: serving stage=(\d+)"), lambda m: f"serving{m[1]}"),
)
_RC = re.compile(r"pyvfio-lu: stage (\d+) (command|end) rc=(\d+)")
_KERNEL_START = re.compile(r"Linux version \S+")
_TROUBLE = re.compile(r"Kernel panic|BUG:|Oops|general protection fault|"
                      r"pyvfio-lu: (init|kexec) failed|qemu-system-\w+: ")
POWEROFF = re.compile(r"pyvfio-lu: poweroff")
INIT_REACHED = re.compile(r"pyvfio-lu: init stage=")


@dataclass
class Markers:
    """What the console said, with host times (seconds since QEMU started).

    ``times`` keys: ``kernel1``/``kernel2`` ("Linux version"), ``init1``/``init2``,
    ``stageN.begin``, ``stageN.rc`` (the command returned), ``stageN.end`` (run.sh returned),
    ``kexec.load``, ``kexec.exec``, ``kexec.failed``, ``init.failed``, ``poweroff``; for a
    guest that serves SSH (:mod:`pyvfio_lu.vm.serve`) ``sshdN`` (the server started in stage N)
    and ``servingN`` (stage N's boot command returned, the guest waits for logins).
    """

    times: dict[str, float] = field(default_factory=dict)
    command_rc: dict[int, int] = field(default_factory=dict)  # from "stage N command rc=X"
    end_rc: dict[int, int] = field(default_factory=dict)  # from "stage N end rc=X"
    trouble: list[str] = field(default_factory=list)  # panic, BUG, Oops, init/kexec failures

    def between(self, start: str, end: str) -> float | None:
        if start in self.times and end in self.times:
            return self.times[end] - self.times[start]
        return None

    @property
    def kexec_happened(self) -> bool:
        """The second kernel came up after the reboot into the loaded kernel."""
        return "kexec.exec" in self.times and ("kernel2" in self.times or "init2" in self.times)

    @property
    def boot_seconds(self) -> float | None:
        """QEMU start to the stage-1 command starting."""
        return self.times.get("stage1.begin")

    @property
    def kexec_load_seconds(self) -> float | None:
        """``kexec_file_load`` in the guest (pyvfio_lu.kexec, a fresh Python process)."""
        return self.between("kexec.load", "kexec.exec")

    @property
    def kexec_seconds(self) -> float | None:
        """``reboot(RB_KEXEC)`` to the stage-2 command starting."""
        return self.between("kexec.exec", "stage2.begin")


def parse_markers(lines: Iterable[Line]) -> Markers:
    """Collect marker times (first occurrence each), exit codes and trouble lines."""
    found = Markers()
    kernels = 0
    for t, text in lines:
        if _KERNEL_START.search(text):
            kernels += 1
            found.times.setdefault(f"kernel{kernels}", t)
        if _TROUBLE.search(text):
            found.trouble.append(text)
        if MARKER_PREFIX not in text:
            continue
        for pattern, name in _MARKERS:
            m = pattern.search(text)
            if m:
                found.times.setdefault(name(m), t)
        m = _RC.search(text)
        if m:
            target = found.command_rc if m[2] == "command" else found.end_rc
            target.setdefault(int(m[1]), int(m[3]))
    return found


# ---------------------------------------------------------------------------------------------
# Running QEMU with its console read line by line


@dataclass
class ConsoleRun:
    lines: list[Line]
    returncode: int | None  # None when the runner killed QEMU
    seconds: float  # QEMU start to exit
    stopped: bool  # ended early because ``stop`` matched


def _die_with_parent_hook() -> Callable[[], None]:
    """A preexec_fn that has the kernel SIGKILL the child when this process dies."""
    prctl = ctypes.CDLL(None, use_errno=True).prctl  # looked up before the fork
    PR_SET_PDEATHSIG = 1

    def hook() -> None:  # pragma: no cover - runs in the child between fork and exec
        prctl(PR_SET_PDEATHSIG, signal.SIGKILL)

    return hook


def _kill(proc: subprocess.Popen[bytes]) -> None:
    """End QEMU (its own process group): SIGTERM, then SIGKILL after 5 s."""
    if proc.poll() is not None:
        return
    for sig, wait in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 30.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def run_console(argv: Sequence[str], *, log_path: Path, timeout: float,
                on_line: Callable[[float, str], None] | None = None,
                finished: re.Pattern[str] | None = None,
                stop: re.Pattern[str] | None = None,
                grace: float = 20.0, abort: threading.Event | None = None) -> ConsoleRun:
    """Run ``argv`` (QEMU, or a stand-in in tests), its stdout+stderr being the console.

    Each line is timestamped, written to ``log_path`` as ``<seconds> | <text>`` and passed to
    ``on_line``. After a line matching ``finished`` the process gets ``grace`` seconds to exit
    on its own; after a line matching ``stop`` it is killed at once (``stopped=True``), and so it
    is when another thread sets ``abort``. A
    process still running at ``timeout`` is killed and :class:`GuestTimeout` raised. The
    process is killed on every other way out too, KeyboardInterrupt included.
    """
    log_path.parent.mkdir(parents=True, exist_ok=True)
    lines: list[Line] = []
    stopped = finished_seen = eof = False
    t0 = time.monotonic()
    deadline = t0 + timeout

    def tail() -> list[str]:
        return [text for _, text in lines[-TAIL_LINES:]]

    with open(log_path, "w", encoding="utf-8", errors="replace") as logf:
        logf.write(f"# {shlex.join(argv)}\n")
        proc = subprocess.Popen(list(argv), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, start_new_session=True,
                                preexec_fn=_die_with_parent_hook())  # noqa: PLW1509 - one prctl, no threads yet
        try:
            assert proc.stdout is not None
            fd = proc.stdout.fileno()
            pending = b""

            def emit(raw: bytes) -> None:
                nonlocal deadline, stopped, finished_seen
                t = time.monotonic() - t0
                text = raw.decode("utf-8", "replace").replace("\r", "")
                lines.append((t, text))
                logf.write(f"{t:9.3f} | {text}\n")
                logf.flush()
                if on_line is not None:
                    on_line(t, text)
                if stop is not None and stop.search(text):
                    stopped = True
                elif finished is not None and finished.search(text):
                    finished_seen = True
                    deadline = min(deadline, time.monotonic() + grace)

            with selectors.DefaultSelector() as sel:
                sel.register(fd, selectors.EVENT_READ)
                while not eof and not stopped:
                    if abort is not None and abort.is_set():
                        stopped = True
                        break
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        break
                    if not sel.select(timeout=min(remaining, 1.0)):
                        continue
                    chunk = os.read(fd, 65536)
                    if not chunk:
                        eof = True
                        chunk = b"\n" if pending else b""
                    pending += chunk
                    *complete, pending = pending.split(b"\n")
                    if len(pending) > 65536:  # a runaway line without a newline
                        complete.append(pending)
                        pending = b""
                    for raw in complete:
                        emit(raw)
                        if stopped:
                            break
            rc: int | None = None
            if stopped or (finished_seen and not eof):
                _kill(proc)  # early stop, or QEMU lingering after the guest's poweroff
            elif eof:
                try:
                    rc = proc.wait(timeout=max(1.0, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:  # B904: left as the GuestTimeout's context, as it was
                    _kill(proc)
                    raise GuestTimeout("the guest closed its console but did not exit within "  # noqa: B904
                                       f"{timeout:.0f} s and was killed", tail(), log_path)
            else:
                _kill(proc)
                raise GuestTimeout(f"the guest was still running after {timeout:.0f} s and was "
                                   "killed", tail(), log_path)
            seconds = time.monotonic() - t0
            logf.write(f"# exit {rc} after {seconds:.3f} s\n")
        finally:
            _kill(proc)
            if proc.stdout is not None:
                proc.stdout.close()
    return ConsoleRun(lines, rc, seconds, stopped)


# ---------------------------------------------------------------------------------------------
# Accelerator


def cpu_has_virt(cpuinfo: str) -> bool:
    """Whether the CPU flags list hardware virtualisation (``vmx`` or ``svm``).

    The presence of ``/dev/kvm`` alone is no proof: it can be a software implementation.
    """
    for line in cpuinfo.splitlines():
        if line.startswith("flags"):
            flags = line.partition(":")[2].split()
            return "vmx" in flags or "svm" in flags
    return False


def choose_accel(probe: Callable[[], bool], *, env: Mapping[str, str] | None = None,
                 cpuinfo: str | None = None, cache_file: Path | None = None,
                 key: str = "", kvm_device: Path = Path("/dev/kvm")) -> str:
    """``PYVFIO_LU_ACCEL`` if set; else "kvm" only when the CPU has vmx/svm, ``/dev/kvm`` is
    usable and ``probe()`` (a short boot under KVM) succeeded; else "tcg".

    The probe's result is cached in ``cache_file`` under ``key``.
    """
    env = os.environ if env is None else env
    override = env.get("PYVFIO_LU_ACCEL", "").strip().lower()
    if override:
        if override not in ACCELS:
            raise ValueError(f"PYVFIO_LU_ACCEL must be one of {ACCELS}, not {override!r}")
        return override
    if cpuinfo is None:
        cpuinfo = Path("/proc/cpuinfo").read_text()
    if not cpu_has_virt(cpuinfo) or not os.access(kvm_device, os.R_OK | os.W_OK):
        return "tcg"
    cache_file = cache_file or cache_root() / "accel-probe.json"
    with locked(cache_file.with_name(cache_file.name + ".lock")):
        try:
            known = json.loads(cache_file.read_text())
        except (OSError, ValueError):
            known = {}
        if key not in known:
            known[key] = bool(probe())
            tmp = cache_file.with_name(cache_file.name + ".tmp")
            tmp.write_text(json.dumps(known, indent=1) + "\n")
            os.replace(tmp, cache_file)
    return "kvm" if known[key] else "tcg"


def probe_key(kernel: Path, qemu: str = "qemu-system-x86_64") -> str:
    """Identifies what a KVM probe result depends on: the kernel image and the QEMU binary."""
    parts = []
    for path in (kernel, Path(qemu) if os.sep in qemu else None):
        if path is not None:
            st = path.stat()
            parts.append(f"{path}:{st.st_size}:{st.st_mtime_ns}")
    parts.append(os.uname().release)
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]


def probe_kvm(kernel: Path, initrd: Path, timeout: float = 60.0) -> bool:
    """Boot under KVM until ``/init`` prints its first marker; False on any failure."""
    with tempfile.TemporaryDirectory(prefix="pyvfio-lu-kvm-probe-") as tmp:
        spec = QemuSpec(kernel=kernel, initrd=initrd, results_dir=Path(tmp), accel="kvm",
                        net=False, memory="1G")
        try:
            run = run_console(qemu_argv(spec), log_path=Path(tmp) / "console.log",
                              timeout=timeout, stop=INIT_REACHED)
        except (GuestError, OSError) as exc:
            log.info("KVM probe failed: %s", str(exc).splitlines()[0])
            return False
    log.info("KVM probe %s", "reached /init" if run.stopped else "did not reach /init")
    return run.stopped
