"""kexec from Python: the in-kernel file loader, and the reboot into the loaded kernel.

Only ``kexec_file_load`` is offered: the legacy ``kexec_load`` path never attaches the
KHO data, so the next kernel would find no live-update state at all.
"""

from __future__ import annotations

import errno
import os

from ._cffi import ffi, lib
from .errors import KexecError, error_for

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
    kfd = _open_image(kernel, "kernel")
    try:
        ifd = _open_image(initrd, "initramfs") if initrd else -1
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


def _open_image(path: str, what: str) -> int:
    """An image file opened for kexec_file_load; a missing or unreadable one is a KexecError."""
    try:
        return os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise KexecError(exc.errno, "kexec_file_load", path,
                         f"cannot open the {what} image: {os.strerror(exc.errno or 0)}") from None
    except (TypeError, ValueError) as exc:
        raise KexecError(22, "kexec_file_load", repr(path)[:80], f"not a {what} image path: {exc}") from None


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
    if not loaded():
        raise KexecError(errno.ENOENT, "reboot(RB_KEXEC)", "kexec",
                         "no kexec kernel is loaded (call load() first); nothing was rebooted")
    ret = lib.pvl_reboot_kexec()
    if ret < 0:
        raise error_for(-ret, "reboot(RB_KEXEC)", "the loaded kexec kernel")


def cmdline_with(cmdline: str, **params: str) -> str:
    """``cmdline`` with each ``key=value`` in ``params`` replaced or appended (dots in keys
    are written as ``__``: ``pyvfio_lu__stage="2"``). A value is a str or an int with no
    whitespace, quote or NUL (the kernel would split it): ArgumentOutOfRange otherwise."""
    from .errors import ArgumentOutOfRange, BadArgumentType

    if not isinstance(cmdline, str):
        raise BadArgumentType(22, "kernel command line", repr(cmdline)[:60],
                              f"a command line is a str, not {type(cmdline).__name__}")
    words = cmdline.split()
    for arg, value in params.items():
        if isinstance(value, bool) or not isinstance(value, (str, int)):
            raise BadArgumentType(22, "kernel command line", arg,
                                  f"the value of {arg} is a str or int, not {type(value).__name__}")
        text = str(value)
        if any(c.isspace() or c in "\"'\0" for c in text):
            raise ArgumentOutOfRange(22, "kernel command line", arg,
                                     f"the value {text!r} of {arg} has whitespace, a quote or a NUL")
        key = arg.replace("__", ".")
        words = [w for w in words if w.split("=", 1)[0] != key] + [f"{key}={text}"]
    return " ".join(words)


def main(argv: list[str] | None = None) -> int:
    import argparse
    import sys

    from .errors import PyvfioError

    parser = argparse.ArgumentParser(
        prog="python -m pyvfio_lu.kexec",
        description="Load a kernel with kexec_file_load (the only loader that carries live-update "
                    "state) and optionally reboot into it at once.",
        epilog="example: python -m pyvfio_lu.kexec --kernel /boot/vmlinuz --initrd /boot/initrd.img "
               "--set pyvfio_lu.stage=2 --exec")
    parser.add_argument("--kernel", required=True, help="bzImage to load")
    parser.add_argument("--initrd", help="initramfs to load with it")
    parser.add_argument("--cmdline", help="command line (default: the running kernel's)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="replace or add a command-line parameter (repeatable)")
    parser.add_argument("--exec", action="store_true", help="reboot into the loaded kernel now")
    parser.add_argument("--announce", metavar="TEXT", help="print TEXT (e.g. a log marker) just before rebooting")
    args = parser.parse_args(argv)
    cmd = args.cmdline if args.cmdline is not None else current_cmdline()
    for item in args.set:
        key, _, value = item.partition("=")
        cmd = cmdline_with(cmd, **{key.replace(".", "__"): value})
    try:
        load(args.kernel, args.initrd, cmd)
        print(f"loaded {args.kernel} with command line: {cmd}", flush=True)
        if args.exec:
            if args.announce:
                print(args.announce, flush=True)
            execute()
    except PyvfioError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main())
