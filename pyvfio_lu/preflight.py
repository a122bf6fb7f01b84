"""Before a live update: is every precondition met on this host? (Read-only: nothing changes.)

:func:`preflight` asks the kernel and the library, never a guess from an earlier run:

- ``luo``, ``kho``: ``/dev/liveupdate`` exists and KHO is on (:mod:`pyvfio_lu.status`);
- ``kexec_image``: the next kernel and initramfs are readable, the bzImage is one x86's
  ``kexec_file_load`` takes, with a command line that fits and keeps ``kho=on liveupdate=on``,
  kexec is not disabled, and every segment fits the KHO scratch areas
  (:func:`pyvfio_lu.kexec.check_image`);
- ``sessions``: each named session is held by a live process (``/proc/*/fd``), is not an
  unfinished incoming one (a kexec would drop that), and a ledger describes it (else the next
  kernel will not know what it holds: a warning);
- ``unfinished_incoming``: no session that came through the last live update is left
  unfinished (the kexec would drop it, whatever its name);
- ``devices``: for each VFIO device to carry (named, or preserved in a held session as the
  ledgers say): the kernel can preserve devices, the device is on vfio-pci with a cdev, some
  process has the cdev open and bound to an iommufd (asked of the kernel through a copy of that
  fd, ``pidfd_getfd``), no IRQ is enabled (``/proc/interrupts``), it is in D0, and it is
  preserved in a held session (or, with ``require_preserved=False``, only ready to be).

Each check says what it found; a failed one names the library's error class for it.
"""

from __future__ import annotations

import ctypes
import errno
import os

from . import kexec, ledger, procfs, status
from .preservation import HOW_TO_GET, device_fd_holders, device_preservation, fd_bound, irqs_enabled, power_state

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (type checkers treat it as True)

if TYPE_CHECKING:
    from collections.abc import Sequence
    from typing import Any

SYS_PIDFD_GETFD = 438  # the same number on every architecture


def _check(name: str, ok: bool, detail: str, error: str | None = None, **extra: object) -> dict[str, Any]:
    out = {"name": name, "ok": bool(ok), "detail": detail, "error": None if ok else error}
    out.update(extra)
    return out


def _pidfd_getfd(pid: int, fd: int) -> int:
    """A copy of process ``pid``'s fd ``fd`` in this process (needs ptrace rights over it)."""
    pidfd = os.pidfd_open(pid)
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        got = libc.syscall(SYS_PIDFD_GETFD, pidfd, fd, 0)
        if got < 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))
        return int(got)
    finally:
        os.close(pidfd)


def cdev_bound(bdf: str, proc: str = "/proc", sysfs: str = "/sys") -> tuple[bool | None, str]:
    """Does some process hold device ``bdf``'s VFIO fd bound to an iommufd? (True/False, or
    None when no process has it open), and in words. Each fd is looked at through a copy
    (``pidfd_getfd``) that is closed again: the kernel answers VFIO_DEVICE_GET_INFO only on a
    bound fd."""
    holders = device_fd_holders(bdf, proc, sysfs)
    if not holders:
        return None, "no process has the device's VFIO fd open"
    seen = []
    for pid, fd, link in holders:
        try:
            copy = _pidfd_getfd(pid, fd)
        except OSError as exc:
            seen.append(f"pid {pid} fd {fd} ({link}): cannot look ({exc.strerror})")
            continue
        try:
            if fd_bound(copy):
                return True, f"pid {pid} fd {fd} ({link}) is bound to an iommufd"
            seen.append(f"pid {pid} fd {fd} ({link}) is not bound to an iommufd")
        finally:
            os.close(copy)
    return False, "; ".join(seen)


def check_devices(bdfs: list[str], require_preserved: bool = True, *, sysfs: str = "/sys",
                  proc: str = "/proc") -> list[dict[str, Any]]:
    """One check per device (see the module docstring)."""
    from .sysfs import PciDevice, is_vfio_driver, parse_bdf

    out = []
    support = device_preservation()
    preserved = {d["bdf"]: d for d in status.preserved_devices() if d["direction"] == "outgoing"}
    for raw in bdfs:
        bdf = parse_bdf(raw)
        problems: list[tuple[str, str]] = []  # (error class, text)
        if support.supported is not True:
            problems.append(("VfioPreservationUnsupported",
                             f"this kernel cannot preserve VFIO devices ({support.detail}); {HOW_TO_GET}"))
        pci = PciDevice(bdf, sysfs)
        driver = pci.driver
        if not is_vfio_driver(driver):
            problems.append(("DeviceNotBound", f"on driver {driver or 'none'}, not vfio-pci"))
        cdev = pci.vfio_cdev
        if driver and is_vfio_driver(driver) and not cdev:
            problems.append(("DeviceNotPreservable",
                             "no VFIO cdev (/dev/vfio/devices/vfioN): the kernel preserves only cdev fds"))
        held = preserved.get(bdf)
        bound, how = (True, (f"preserved in session {held['session']!r}, which the kernel allows only for "
                             "a cdev fd bound to an iommufd")) if held else cdev_bound(bdf, proc, sysfs)
        if not bound:
            problems.append(("NotLiveUpdateReady", how))
        irqs = irqs_enabled(bdf, f"{proc}/interrupts")
        if irqs:
            problems.append(("NotLiveUpdateReady", "IRQs enabled (" + ", ".join(
                f"{k}: {n}" for k, n in sorted(irqs.items())) + " in /proc/interrupts): the kexec would be refused"))
        state = power_state(bdf, sysfs)
        if state and state != "D0":
            problems.append(("NotLiveUpdateReady", f"in {state}, not D0: the kexec would be refused"))
        if require_preserved and not held:
            problems.append(("NotLiveUpdateReady", "not preserved in any held session (no ledger names it)"))
        detail = ("; ".join(t for _e, t in problems) if problems else
                  f"vfio-pci, {cdev}, {how}, no IRQs, {state or 'D0'}")
        out.append(_check(f"device {bdf}", not problems, detail, problems[0][0] if problems else None,
                          bdf=bdf, driver=driver, cdev=cdev, irqs=irqs, power_state=state,
                          preserved=held))
    return out


def check_sessions(names: list[str], proc: str = "/proc") -> tuple[list[dict[str, Any]], list[str]]:
    """One check per named session (held, outgoing, described), and warnings."""
    holders = procfs.session_holders(proc)
    outgoing = ledger.outgoing()
    unfinished = ledger.incoming()
    out, warnings = [], []
    for name in names:
        hs = holders.get(name, [])
        who = ", ".join(f"pid {h.pid} ({h.comm}) fd {h.fd}" for h in hs)
        if name in unfinished:
            out.append(_check(f"session {name}", False, f"{name!r} came through the last live update and is "
                              f"not finished{' (open in ' + who + ')' if who else ''}: a kexec now would drop it",
                              "SessionNotFinished", holders=[h.pid for h in hs]))
        elif not hs:
            out.append(_check(f"session {name}", False, f"no process holds session {name!r}: a live update "
                              "now would not carry it", "SessionNotHeld", holders=[]))
        else:
            described = name in outgoing
            if not described:
                warnings.append(f"session {name!r} is held ({who}) but no ledger describes it: the next kernel "
                                "carries it, but `pyvfio-lu status` there cannot say what it holds")
            files = len((outgoing.get(name) or {}).get("files") or {}) if described else None
            out.append(_check(f"session {name}", True, f"{name!r} held by {who}"
                              + (f"; its ledger lists {files} file(s)" if described else ""),
                              holders=[h.pid for h in hs], described=described, files=files))
    return out, warnings


def preflight(kernel: str, initrd: str | None = None, cmdline: str | None = None, *,
              sessions: Sequence[str] = (), devices: list[str] | None = None,
              require_preserved: bool = True, sysfs: str = "/sys", proc: str = "/proc") -> dict[str, Any]:
    """Check every precondition of a live update into ``kernel`` (+ ``initrd``, with ``cmdline``,
    default the running one) carrying ``sessions``; nothing is changed. ``devices`` defaults to
    every device the held sessions' ledgers list. Returns ``{"ok", "checks": [...], "failed":
    [check names], "error": the first failed check's error class or None, "message",
    "warnings", "boot_id", "liveupdate_number"}``."""
    status.adopt_ledgers()  # after a live update: so unfinished incoming sessions are known
    st = status.status(proc)
    checks = [
        _check("luo", st.luo_enabled, "/dev/liveupdate exists" if st.luo_enabled else
               "no /dev/liveupdate: this kernel has no Live Update Orchestrator enabled", "LiveUpdateNotEnabled"),
        _check("kho", st.kho_enabled is True, {True: "KHO is on", False: "KHO is off (kho=on on the command line)",
                                              None: "cannot tell whether KHO is on (no debugfs, no kho= on the "
                                                    "command line)"}[st.kho_enabled], "LiveUpdateNotEnabled"),
    ]
    image = kexec.check_image(kernel, initrd, cmdline)
    checks.append(_check("kexec_image", image["ok"], "; ".join(image["problems"]) or (
        f"{kernel} ({image['kernel_bytes']} bytes)" + (f" + {initrd} ({image['initrd_bytes']} bytes)" if initrd else "")
        + (f": fits the KHO scratch areas ({image['needed_bytes'] >> 20} of "
           f"{sum(n for _a, n in image['scratch']) >> 20} MiB)" if image["fits"] else
           ": loadable; the KHO scratch areas are not visible (no debugfs), so the fit is unchecked")),
        image["error"], image=image))
    warnings = []
    if image["ok"] and image["fits"] is None:
        warnings.append("KHO scratch areas not visible (mount debugfs): kexec_file_load will tell")
    unfinished = ledger.incoming()
    checks.append(_check("unfinished_incoming", not unfinished,
                         "no session of the last live update is left unfinished" if not unfinished else
                         "sessions of the last live update not finished (a kexec now drops them): "
                         + ", ".join(sorted(unfinished)), "SessionNotFinished", sessions=sorted(unfinished)))
    session_checks, session_warnings = check_sessions(list(sessions), proc)
    checks += session_checks
    warnings += session_warnings
    if devices is None:
        devices = sorted({d["bdf"] for d in status.preserved_devices()
                          if d["direction"] == "outgoing" and d.get("bdf")})
    checks += check_devices(list(devices), require_preserved, sysfs=sysfs, proc=proc)
    failed = [c for c in checks if not c["ok"]]
    return {
        "ok": not failed, "checks": checks, "failed": [c["name"] for c in failed],
        "error": failed[0]["error"] if failed else None,
        "message": "; ".join(f"{c['name']}: {c['detail']}" for c in failed) or "every precondition is met",
        "warnings": warnings, "boot_id": st.boot_id, "liveupdate_number": st.liveupdate_number,
        "devices": list(devices),
    }


def raise_for(report: dict[str, Any]) -> None:
    """PreflightFailed (naming every failed check) unless ``report`` is ok."""
    from .errors import PreflightFailed

    if not report["ok"]:
        raise PreflightFailed(errno.EAGAIN, "live-update preflight", ", ".join(report["failed"]), report["message"])
