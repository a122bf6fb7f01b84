"""Is live update possible here, and what state is it in? (Read-only; nothing is opened.)"""

from __future__ import annotations

import os
import struct
from dataclasses import asdict, dataclass, field

from . import procfs

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
    sessions: dict[str, list[dict]] = field(default_factory=dict)  # name -> [{pid, comm, fd}]
    holders_of_device: list[dict] = field(default_factory=list)

    def to_json(self) -> dict:
        return asdict(self)


def _read(path: str) -> str | None:
    try:
        with open(path) as fh:
            return fh.read().strip()
    except OSError:
        return None


def liveupdate_number(path: str = KHO_IN_LUO) -> int | None:
    """The live update number handed over by the previous kernel (``struct luo_ser``:
    ``char compatible[8]; u64 liveupdate_num; ...``), or None if this was a cold boot."""
    try:
        with open(path, "rb") as fh:
            blob = fh.read(16)
    except OSError:
        return None
    if len(blob) < 16 or not blob.startswith(b"luo-"):
        return None
    return struct.unpack_from("<Q", blob, 8)[0]


def kho_enabled(cmdline: str) -> bool | None:
    if os.path.isdir(f"{DEBUGFS}/kho"):
        return True
    words = cmdline.split()
    if "kho=on" in words or "kho=1" in words or "kho=y" in words:
        return True
    if "kho=off" in words or "kho=0" in words:
        return False
    return None


def status(proc: str = "/proc") -> Status:
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
    )
