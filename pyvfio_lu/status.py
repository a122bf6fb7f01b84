"""Is live update possible here, and what state is it in? (Read-only; nothing is opened.)"""

from __future__ import annotations

import os
import struct
from dataclasses import asdict, dataclass, field

from . import procfs

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (type checkers treat it as True)

if TYPE_CHECKING:
    from typing import Any

LUO_SYSFS = "/sys/class/misc/liveupdate"
DEBUGFS = "/sys/kernel/debug"
KHO_IN_LUO = f"{DEBUGFS}/kho/in/sub_fdts/LUO"


@dataclass
class Status:
    luo_enabled: bool
    kho_enabled: bool | None  # None: unknown (debugfs not mounted and no hint on the cmdline)
    liveupdate_number: int | None  # from the previous kernel's LUO data; None on a cold boot
    boot_id: str
    kexec_loaded: bool
    cmdline: str
    sessions: dict[str, list[dict[str, Any]]] = field(default_factory=dict)  # name -> [{pid, comm, fd}]
    holders_of_device: list[dict[str, Any]] = field(default_factory=list)
    device_preservation: dict[str, Any] = field(default_factory=dict)  # {"supported", "detail"}
    # after a live update: sessions the previous kernel's ledgers describe and nobody finished
    incoming: dict[str, dict[str, Any]] = field(default_factory=dict)  # name -> {"files": {token: record}}
    preserved_devices: list[dict[str, Any]] = field(default_factory=list)  # [{bdf, session, token, direction}]

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _read(path: str) -> str | None:
    try:
        with open(path) as fh:
            return fh.read().strip()
    except OSError:
        return None


KMSG_MARKER = "Retrieved live update data, liveupdate number: "


def liveupdate_number(path: str = KHO_IN_LUO, kmsg: str = "/dev/kmsg") -> int | None:
    """The live update number handed over by the previous kernel, or None on a cold boot.

    Read from the incoming LUO blob in debugfs (``struct luo_ser``: ``char compatible[8];
    u64 liveupdate_num; ...``) while it exists, else from the line LUO logs at boot
    (``luo: Retrieved live update data, liveupdate number: N``).
    """
    try:
        with open(path, "rb") as fh:
            blob = fh.read(16)
        if len(blob) == 16 and blob.startswith(b"luo-"):
            number: int = struct.unpack_from("<Q", blob, 8)[0]
            return number
    except OSError:
        pass
    return _number_from_kmsg(kmsg)


def _number_from_kmsg(kmsg: str) -> int | None:
    try:
        fd = os.open(kmsg, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        while True:
            try:
                record = os.read(fd, 8192).decode(errors="replace")
            except BlockingIOError:
                return None
            except OSError:  # EPIPE: a record was overwritten while reading; go on
                continue
            if not record:
                return None
            at = record.find(KMSG_MARKER)
            if at >= 0:
                digits = record[at + len(KMSG_MARKER):].split()[0]
                return int(digits) if digits.isdigit() else None
    finally:
        os.close(fd)


def kho_enabled(cmdline: str) -> bool | None:
    if os.path.isdir(f"{DEBUGFS}/kho"):
        return True
    value = None
    for word in cmdline.split():
        if word.startswith("kho="):
            parsed = kstrtobool(word[4:])
            if parsed is not None:
                value = parsed  # the kernel applies each occurrence: the last one wins
    return value


def kstrtobool(text: str) -> bool | None:
    """The kernel's kstrtobool (lib/kstrtox.c): y/t/e/1/on -> True, n/f/d/0/off -> False."""
    t = text.lower()
    if t[:1] in ("y", "1", "t", "e"):
        return True
    if t[:1] in ("n", "0", "f", "d"):
        return False
    if t.startswith("on"):
        return True
    if t.startswith("of"):
        return False
    return None


def preserved_devices() -> list[dict[str, Any]]:
    """Every VFIO device a live update holds, as the ledgers tell: ``outgoing`` (preserved in
    this boot, kept by a live holder, or by a session of this process) and ``incoming`` (came
    through the last live update, its session not finished yet)."""
    from . import ledger
    from .preservation import preserved_here

    out = []
    for direction, sessions in (("outgoing", ledger.outgoing()), ("incoming", ledger.incoming())):
        for name, entry in sorted(sessions.items()):
            for token, rec in sorted((entry.get("files") or {}).items()):
                if isinstance(rec, dict) and rec.get("kind") == "vfio-device":
                    out.append({"bdf": rec.get("bdf"), "session": name, "token": token, "direction": direction})
    for bdf, (name, token) in sorted(preserved_here().items()):
        if not any(d["bdf"] == bdf for d in out):
            out.append({"bdf": bdf, "session": name, "token": f"{token:#x}", "direction": "outgoing"})
    return out


def adopt_ledgers() -> bool:
    """After a live update, have the ledgers read once (what the first /dev/liveupdate open does:
    see :mod:`pyvfio_lu.ledger`); True when they are adopted now. A busy /dev/liveupdate is left
    alone: whoever holds it adopted them, or will."""
    from . import ledger
    from .errors import PyvfioError
    from .luo import DEVICE_PATH, LiveUpdate

    if not ledger.adopted() and os.path.exists(DEVICE_PATH):
        try:
            LiveUpdate().close()
        except PyvfioError:
            pass
    return ledger.adopted()


def devices(sysfs: str = "/sys", bdfs: list[str] | None = None, all_classes: bool = False) -> list[dict[str, Any]]:
    """PCI functions as ``pyvfio-lu devices`` lists them (bridges only with ``all_classes``), each
    with ``preserved``: the live-update session that holds it (outgoing or incoming), or None."""
    from .sysfs import PciDevice, list_devices

    if bdfs:
        found = [PciDevice(b, sysfs) for b in bdfs]
    else:
        found = [d for d in list_devices(sysfs) if all_classes or d.pci_class >> 16 != 0x06]
    held = {d["bdf"]: d for d in preserved_devices()}
    return [dict(d.to_json(), preserved=held.get(d.bdf)) for d in found]


def _uptime() -> float | None:
    text = _read("/proc/uptime")
    try:
        return float(text.split()[0]) if text else None
    except ValueError:
        return None


def facts(proc: str = "/proc", sysfs: str = "/sys") -> dict[str, Any]:
    """Everything a fleet tool wants to know of this host's live-update state, as JSON:
    :func:`status` plus the kernel release, uptime, the KHO scratch areas (where the next kernel
    must fit), every PCI device with its driver, IOMMU group, VFIO cdev and preserved state, the
    sessions with each holder's command line, and this boot's incoming sessions finished or not.
    Read-only, except that after a live update the ledgers are adopted (:func:`adopt_ledgers`)."""
    from . import kexec, ledger

    adopt_ledgers()
    doc = status(proc).to_json()
    for holders in [*doc["sessions"].values(), doc["holders_of_device"]]:
        for h in holders:
            h["cmdline"] = _cmdline_of(h["pid"], proc)
    areas = kexec.scratch_areas()
    doc.update(
        kernel_release=os.uname().release,
        uptime=_uptime(),
        kho_scratch=None if areas is None else [{"address": a, "size": n} for a, n in areas],
        devices=devices(sysfs),
        outgoing=ledger.outgoing(),
        came_in=ledger.came_in(),
    )
    return doc


def _cmdline_of(pid: int, proc: str = "/proc") -> str:
    """A process's command line as one string ("python -m ..." rather than the venv's path)."""
    try:
        with open(f"{proc}/{pid}/cmdline", "rb") as fh:
            words = fh.read().rstrip(b"\0").split(b"\0")
    except OSError:
        return ""
    if words and b"python" in words[0].rsplit(b"/", 1)[-1]:
        words[0] = words[0].rsplit(b"/", 1)[-1]
    return " ".join(w.decode(errors="replace") for w in words)


def status(proc: str = "/proc") -> Status:
    from . import ledger
    from .preservation import device_preservation

    cmdline = _read("/proc/cmdline") or ""
    sessions = {
        name: [{"pid": h.pid, "comm": h.comm, "fd": h.fd} for h in hs]
        for name, hs in procfs.session_holders(proc).items()
    }
    return Status(
        luo_enabled=os.path.exists(LUO_SYSFS) or os.path.exists("/dev/liveupdate"),
        kho_enabled=kho_enabled(cmdline),
        liveupdate_number=liveupdate_number(),
        boot_id=_read("/proc/sys/kernel/random/boot_id") or "",
        kexec_loaded=_read("/sys/kernel/kexec_loaded") == "1",
        cmdline=cmdline,
        sessions=sessions,
        holders_of_device=[{"pid": h.pid, "comm": h.comm, "fd": h.fd} for h in procfs.liveupdate_holders(proc)],
        device_preservation=device_preservation()._asdict(),
        incoming=ledger.incoming(),
        preserved_devices=preserved_devices(),
    )
