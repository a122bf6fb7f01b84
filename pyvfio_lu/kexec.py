"""kexec from Python: the in-kernel file loader, and the reboot into the loaded kernel.

Only ``kexec_file_load`` is offered: the legacy ``kexec_load`` path never attaches the
KHO data, so the next kernel would find no live-update state at all.
"""

from __future__ import annotations

import os

from ._cffi import ffi, lib
from .errors import error_for

KEXEC_LOADED = "/sys/kernel/kexec_loaded"


def current_cmdline() -> str:
    with open("/proc/cmdline") as fh:
        return fh.read().strip()


def load(kernel: str, initrd: str | None = None, cmdline: str | None = None) -> None:
    """Load ``kernel`` (a bzImage) and ``initrd`` for the next kexec.

    ``cmdline`` defaults to the running kernel's (which carries ``kho=on liveupdate=on``,
    needed by the next kernel too). Errors: KexecNotPermitted (no CAP_SYS_BOOT),
    KexecImageTooLarge (EADDRNOTAVAIL: the images do not fit the KHO scratch area).
    """
    cmd = current_cmdline() if cmdline is None else cmdline
    kfd = os.open(kernel, os.O_RDONLY | os.O_CLOEXEC)
    try:
        ifd = os.open(initrd, os.O_RDONLY | os.O_CLOEXEC) if initrd else -1
        try:
            flags = 0 if initrd else lib.PVL_KEXEC_FILE_NO_INITRAMFS
            ret = lib.pvl_kexec_file_load(kfd, ifd, ffi.new("char[]", cmd.encode()), flags)
        finally:
            if ifd >= 0:
                os.close(ifd)
    finally:
        os.close(kfd)
    if ret < 0:
        raise error_for(-ret, "kexec_file_load", kernel)


def unload() -> None:
    ret = lib.pvl_kexec_file_load(-1, -1, ffi.new("char[]", b""), lib.PVL_KEXEC_FILE_UNLOAD)
    if ret < 0:
        raise error_for(-ret, "kexec_file_load", "unload")


def loaded() -> bool:
    """Is a kexec kernel loaded?"""
    try:
        with open(KEXEC_LOADED) as fh:
            return fh.read().strip() == "1"
    except OSError:
        return False


def execute() -> None:
    """Reboot into the loaded kernel now (``reboot(RB_KEXEC)``; no userspace shutdown).

    LUO serializes every outgoing session first; if a preserved file cannot be frozen
    (e.g. a VFIO device with IRQs enabled) the reboot is refused and KexecRefused is
    raised. Session fds must still be open (in this or a holder process) at this point.
    """
    ret = lib.pvl_reboot_kexec()
    if ret < 0:
        raise error_for(-ret, "reboot(RB_KEXEC)", "the loaded kexec kernel")
