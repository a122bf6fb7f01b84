"""kexec from Python: the in-kernel file loader, and the reboot into the loaded kernel.

Only ``kexec_file_load`` is offered: the legacy ``kexec_load`` path never attaches the
KHO data, so the next kernel would find no live-update state at all.
"""

from __future__ import annotations

import errno
import os

from ._cffi import ffi, lib
from .errors import KexecError, error_for

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (type checkers treat it as True)

if TYPE_CHECKING:
    from typing import Any

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


# --- will it load? (read-only) ------------------------------------------------------------
# The x86 boot protocol's setup header (Documentation/arch/x86/boot.rst): offsets in the bzImage.
_HDR = {"setup_sects": (0x1F1, "B"), "boot_flag": (0x1FE, "H"), "header": (0x202, "4s"),
        "version": (0x206, "H"), "loadflags": (0x211, "B"), "kernel_alignment": (0x230, "I"),
        "xloadflags": (0x236, "H"), "cmdline_size": (0x238, "I"), "pref_address": (0x258, "Q"),
        "init_size": (0x260, "I")}
LOADED_HIGH = 0x01
XLF_KERNEL_64, XLF_CAN_BE_LOADED_ABOVE_4G = 0x01, 0x02
PAGE = 4096
MIN_KERNEL_LOAD_ADDR = 0x100000
MIN_INITRD_LOAD_ADDR = 0x1000000
ELFCOREHDR_ROOM = 30  # the loader keeps this much of the command line free for elfcorehdr=
KHO_OUT = "/sys/kernel/debug/kho/out"


def setup_header(kernel: str) -> dict[str, int | bytes]:
    """The setup-header fields of bzImage ``kernel`` that kexec_file_load's x86 loader reads."""
    import struct

    try:
        with open(kernel, "rb") as fh:
            head = fh.read(0x268)
    except OSError as exc:
        raise KexecError(exc.errno, "read bzImage header", kernel, os.strerror(exc.errno or 0)) from None
    if len(head) < 0x268:
        raise KexecError(errno.ENOEXEC, "read bzImage header", kernel, f"only {len(head)} bytes: not a bzImage")
    return {name: struct.unpack_from("<" + fmt, head, off)[0] for name, (off, fmt) in _HDR.items()}


def image_problems(header: dict[str, Any], cmdline: str) -> list[str]:
    """Why x86's kexec_file_load would refuse this bzImage (its header) with this command line."""
    problems = []
    if header["header"] != b"HdrS" or header["boot_flag"] != 0xAA55:
        return ["not a bzImage (no HdrS signature or boot sector flag)"]
    if header["version"] < 0x020C:
        problems.append(f"boot protocol {header['version'] >> 8}.{header['version'] & 0xff} is older than 2.12")
    if not header["loadflags"] & LOADED_HIGH:
        problems.append("a zImage, not a bzImage (LOADED_HIGH unset)")
    if not header["xloadflags"] & XLF_KERNEL_64:
        problems.append("not a 64-bit kernel (XLF_KERNEL_64 unset)")
    if not header["xloadflags"] & XLF_CAN_BE_LOADED_ABOVE_4G:
        problems.append("cannot be loaded above 4 GiB (XLF_CAN_BE_LOADED_ABOVE_4G unset)")
    room = header["cmdline_size"] - ELFCOREHDR_ROOM
    if len(cmdline.encode()) + 1 > room:
        problems.append(f"the command line ({len(cmdline.encode())} bytes) is longer than the kernel takes "
                        f"({room - 1} bytes)")
    return problems


def scratch_areas(kho_out: str = KHO_OUT) -> list[tuple[int, int]] | None:
    """The KHO scratch areas ``[(address, size)]`` of this boot, where kexec_file_load must place
    every segment of the next kernel (debugfs); None when debugfs does not show them."""
    try:
        with open(f"{kho_out}/scratch_phys") as fh:
            phys = [int(w, 16) for w in fh.read().split()]
        with open(f"{kho_out}/scratch_len") as fh:
            lens = [int(w, 16) for w in fh.read().split()]
    except (OSError, ValueError):
        return None
    return [(a, n) for a, n in zip(phys, lens) if n]


def _align(n: int, a: int) -> int:
    return (n + a - 1) // a * a


def segments(header: dict[str, Any], initrd_size: int | None, cmdline: str) -> list[tuple[str, int, int, int]]:
    """What x86's kexec_file_load adds, in order: ``(what, size, alignment, lowest address)``.
    Sizes of the small segments (KHO's scratch table, purgatory, boot parameters) are upper
    estimates; the kernel and initramfs are exact."""
    out = [("KHO scratch table", PAGE, 0x10000, 0), ("purgatory", 0x8000, PAGE, 0x3000),
           ("boot parameters and command line", _align(2 * PAGE + len(cmdline) + 1 + 1024, PAGE), PAGE, 0x3000),
           ("kernel", _align(header["init_size"], PAGE), max(PAGE, header["kernel_alignment"]),
            max(MIN_KERNEL_LOAD_ADDR, header["pref_address"]))]
    if initrd_size is not None:
        out.append(("initramfs", _align(initrd_size, PAGE), PAGE, MIN_INITRD_LOAD_ADDR))
    return out


def place(segs: list[tuple[str, int, int, int]], areas: list[tuple[int, int]]) -> dict[str, int] | str:
    """Place ``segs`` top-down in the first area with room, as kexec_file_load does with KHO on:
    ``{what: address}``, or the name of the first segment that fits nowhere."""
    placed: list[tuple[int, int]] = []
    where: dict[str, int] = {}
    for what, size, align, low in segs:
        found = None
        for start, length in areas:
            hi = start + length  # exclusive
            lo = max(start, low)
            cand = (hi - size) // align * align
            while cand >= lo and found is None:
                clash = [(a, b) for a, b in placed if a < cand + size and cand < b]
                if not clash:
                    found = cand
                else:
                    cand = (min(a for a, _ in clash) - size) // align * align
            if found is not None:
                break
        if found is None:
            return what
        placed.append((found, found + size))
        where[what] = found
    return where


def check_image(kernel: str, initrd: str | None = None, cmdline: str | None = None,
                kho_out: str = KHO_OUT) -> dict[str, Any]:
    """Would ``load(kernel, initrd, cmdline)`` work here? Read-only: nothing is loaded.

    Checks the files, the bzImage header and command line as x86's loader does, that the next
    kernel's command line keeps ``kho=on liveupdate=on``, that kexec is not disabled, and that
    every segment fits the KHO scratch areas (placed as the kernel places them; the small
    segments' sizes are estimates). Returns ``{"ok", "problems": [...], "error": class name of
    the first problem or None, "kernel_bytes", "initrd_bytes", "needed_bytes", "scratch":
    [[addr, size]] or None, "fits": True/False/None}``.
    """
    from .status import kstrtobool

    cmd = current_cmdline() if cmdline is None else cmdline
    report: dict[str, Any] = {"ok": False, "kernel": kernel, "initrd": initrd, "cmdline": cmd, "problems": [],
                    "error": None, "kernel_bytes": None, "initrd_bytes": None, "needed_bytes": None,
                    "scratch": None, "fits": None}

    def problem(error: str, text: str) -> None:
        report["problems"].append(text)
        report["error"] = report["error"] or error

    header = None
    try:
        report["kernel_bytes"] = os.stat(kernel).st_size
        header = setup_header(kernel)
    except OSError as exc:
        problem("KexecError", f"kernel {kernel}: {exc.strerror if isinstance(exc, KexecError) else os.strerror(exc.errno or 0)}")
    if initrd:
        try:
            report["initrd_bytes"] = os.stat(initrd).st_size
            if not os.access(initrd, os.R_OK):
                problem("KexecError", f"initramfs {initrd} is not readable")
        except OSError as exc:
            problem("KexecError", f"initramfs {initrd}: {os.strerror(exc.errno or 0)}")
    words = {w.split("=", 1)[0]: w.split("=", 1)[1] if "=" in w else "" for w in cmd.split()}
    for key in ("kho", "liveupdate"):
        if kstrtobool(words.get(key, "")) is not True:
            problem("LiveUpdateNotEnabled", f"the next kernel's command line lacks {key}=on: it would "
                    "boot without live-update state")
    for path, bad, text in (("/proc/sys/kernel/kexec_load_disabled", "1",
                             "kexec is disabled (kernel.kexec_load_disabled=1, until reboot)"),
                            ("/proc/sys/kernel/kexec_load_limit_reboot", "0",
                             "no kexec load left (kernel.kexec_load_limit_reboot=0)")):
        try:
            with open(path) as fh:
                if fh.read().strip() == bad:
                    problem("KexecNotPermitted", text)
        except OSError:
            pass
    if os.geteuid() != 0:
        problem("KexecNotPermitted", "not running as root (kexec_file_load needs CAP_SYS_BOOT)")
    if header is None:
        return report
    faults = image_problems(header, cmd)
    for text in faults:
        problem("KexecError", f"kernel {kernel}: {text}")
    if faults:
        return report
    segs = segments(header, report["initrd_bytes"] if initrd else None, cmd)
    report["needed_bytes"] = sum(size for _w, size, _a, _l in segs)
    areas = scratch_areas(kho_out)
    if areas is not None:
        report["scratch"] = [[a, n] for a, n in areas]
        where = place(segs, areas)
        report["fits"] = isinstance(where, dict)
        if isinstance(where, str):
            problem("KexecImageTooLarge",
                    f"the {where} does not fit the KHO scratch areas (" + ", ".join(
                        f"{n >> 20} MiB" for _a, n in areas) + f"; this kernel and initramfs need "
                    f"{report['needed_bytes'] >> 20} MiB in all): kexec_file_load would fail with "
                    "EADDRNOTAVAIL; boot with a larger kho_scratch= or load a smaller image")
    report["ok"] = not report["problems"]
    return report


def execute_later(delay: float = 1.0, report: str | None = None, after_exit_of: int | None = None,
                  wait_limit: float = 60.0) -> int:
    """Reboot into the loaded kernel from a detached process, and return its pid at once (for a
    remote caller whose connection the reboot would cut): ``delay`` seconds after process
    ``after_exit_of`` (typically the caller itself) has exited, or after ``wait_limit`` seconds
    if it has not; without ``after_exit_of``, ``delay`` seconds from now.

    The process leaves the caller's session and closes every fd it inherited (so the caller's
    connection can end); if the kexec is refused it writes ``{"ok": false, "error": class name,
    "message", "errno"}`` as JSON to ``report`` (if given) and exits.
    """
    import json

    if not loaded():
        raise KexecError(errno.ENOENT, "reboot(RB_KEXEC)", "kexec",
                         "no kexec kernel is loaded (call load() first); nothing was rebooted")
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child
        try:
            os.setsid()
            if os.fork():
                os._exit(0)
            os.write(w, str(os.getpid()).encode())
            devnull = os.open(os.devnull, os.O_RDWR)
            for std in (0, 1, 2):
                os.dup2(devnull, std)
            os.closerange(3, os.sysconf("SC_OPEN_MAX"))
            import time

            if after_exit_of is not None:
                give_up = time.monotonic() + wait_limit
                while os.path.exists(f"/proc/{after_exit_of}") and time.monotonic() < give_up:
                    time.sleep(0.05)
            time.sleep(delay)
            os.sync()
            try:
                execute()
                doc = {"ok": False, "error": "KexecError", "message": "reboot(RB_KEXEC) returned", "errno": None}
            except OSError as exc:
                doc = {"ok": False, "error": type(exc).__name__, "message": str(exc), "errno": exc.errno}
            if report:
                tmp = f"{report}.{os.getpid()}.tmp"
                with open(tmp, "w") as fh:
                    json.dump(dict(doc, time=time.time()), fh)
                os.replace(tmp, report)
        finally:
            os._exit(0)
    os.close(w)
    os.waitpid(pid, 0)
    with os.fdopen(r, "rb") as fh:
        data = fh.read()
    return int(data) if data else -1


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
