"""Can this kernel preserve a VFIO device, and why can a given device fd not be preserved?

Answers come from what the kernel shows, not from the object's own bookkeeping:

- the kernel's capability from its configuration (``/proc/config.gz``, else
  ``/boot/config-$(uname -r)``: ``CONFIG_VFIO_PCI_LIVEUPDATE``), else from its symbol table
  (``/proc/kallsyms`` lists the vfio-pci live-update handler's functions);
- the fd's origin from its ``/proc/self/fd`` link (a cdev ``/dev/vfio/devices/vfioN``, a
  retrieved ``anon_inode:[vfio-device-liveupdate]``, or ``anon_inode:[vfio-device]`` from the
  legacy group path, which the kernel never preserves);
- whether a cdev fd is bound to an iommufd, from the kernel's answer to VFIO_DEVICE_GET_INFO
  (EINVAL until VFIO_DEVICE_BIND_IOMMUFD);
- IRQs from ``/proc/interrupts`` (vfio-pci names its lines ``vfio-intx(BDF)``,
  ``vfio-msi[N](BDF)``, ``vfio-msix[N](BDF)``), whoever enabled them;
- the power state from sysfs ``power_state``;
- "already preserved" from the kernel's EBUSY, named from this boot's ledgers.
"""

from __future__ import annotations

import errno
import os

from ._record import record
from .errors import check_text, error_for
from .fd import fileno_of

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, NamedTuple

    from .errors import PyvfioError

CONFIG_SYMBOL = "CONFIG_VFIO_PCI_LIVEUPDATE"
KALLSYMS_MARK = "vfio_pci_liveupdate"
HOW_TO_GET = ("build the vfio-lu kernel flavour from the PCI and VFIO live-update patch series: "
              "python -m pyvfio_lu.vm.kernel --flavour vfio-lu --patches DIR")

if TYPE_CHECKING:  # the same record, typed (a typing.NamedTuple costs typing's import at run time)
    class Support(NamedTuple):
        """Whether the running kernel can preserve VFIO device files: ``supported`` True,
        False or None (unknown), ``source`` where that came from, ``detail`` in words."""

        supported: bool | None
        source: str
        detail: str
else:
    Support = record("Support", "supported source detail", module=__name__)
    Support.__doc__ = ("Whether the running kernel can preserve VFIO device files: ``supported`` True, "
                       "False or None (unknown), ``source`` where that came from, ``detail`` in words.")

_cached: Support | None = None


def parse_config(text: str) -> dict[str, str]:
    """``CONFIG_X=value`` lines of a kernel .config; "is not set" lines as "n"."""
    import re

    out: dict[str, str] = {}
    for line in text.splitlines():
        m = re.match(r"(CONFIG_\w+)=(.*)$", line)
        if m:
            out[m.group(1)] = m.group(2)
            continue
        m = re.match(r"# (CONFIG_\w+) is not set", line)
        if m:
            out[m.group(1)] = "n"
    return out


def _read_config(proc: str = "/proc", boot: str = "/boot") -> tuple[dict[str, str], str] | None:
    import gzip

    try:
        with gzip.open(f"{proc}/config.gz", "rt", errors="replace") as fh:
            return parse_config(fh.read()), f"{proc}/config.gz"
    except (OSError, EOFError, gzip.BadGzipFile):
        pass
    path = f"{boot}/config-{os.uname().release}"
    try:
        with open(path, errors="replace") as fh:
            return parse_config(fh.read()), path
    except OSError:
        return None


def _kallsyms_has(mark: str, proc: str = "/proc") -> bool | None:
    try:
        with open(f"{proc}/kallsyms", errors="replace") as fh:
            for line in fh:
                if mark in line:
                    return True
    except OSError:
        return None
    return False


def device_preservation(proc: str = "/proc", boot: str = "/boot", refresh: bool = False) -> Support:
    """Can the running kernel preserve VFIO device files across a live update?"""
    global _cached
    if _cached is not None and not refresh and proc == "/proc" and boot == "/boot":
        return _cached
    cfg = _read_config(proc, boot)
    if cfg is not None and (CONFIG_SYMBOL in cfg[0] or "CONFIG_VFIO_PCI" in cfg[0]):
        value = cfg[0].get(CONFIG_SYMBOL, "n")
        result = Support(value == "y", cfg[1],
                         f"{CONFIG_SYMBOL}={value} in {cfg[1]}" if value != "n" else
                         f"{CONFIG_SYMBOL} is not set in {cfg[1]}")
    else:
        has = _kallsyms_has(KALLSYMS_MARK, proc)
        if has is None:
            result = Support(None, "", "no kernel configuration and no /proc/kallsyms to tell from")
        else:
            result = Support(has, f"{proc}/kallsyms",
                             f"{proc}/kallsyms {'lists' if has else 'has no'} {KALLSYMS_MARK}* symbols")
    if proc == "/proc" and boot == "/boot":
        _cached = result
    return result


def can_preserve_devices() -> bool:
    """True when the running kernel is known to preserve VFIO device files."""
    return device_preservation().supported is True


# --- one fd ----------------------------------------------------------------------------------
LEGACY_LINK = "anon_inode:[vfio-device]"
RETRIEVED_LINK = "anon_inode:[vfio-device-liveupdate]"


def fd_origin(link: str) -> str:
    """"cdev", "retrieved", "group" (legacy VFIO_GROUP_GET_DEVICE_FD) or "other", from an fd link."""
    if link.startswith("/dev/vfio/devices/"):
        return "cdev"
    if link.startswith(RETRIEVED_LINK):
        return "retrieved"
    if link.startswith(LEGACY_LINK):
        return "group"
    return "other"


def fd_bound(fd: int) -> bool:
    """Is this cdev (or retrieved) device fd bound to an iommufd? Asked of the kernel: every
    device ioctl but BIND_IOMMUFD answers EINVAL until it is."""
    from .errors import InvalidArgument, PyvfioError
    from .ioctl import FdKind, call

    try:
        call(FdKind.VFIO_DEVICE, fd, "VFIO_DEVICE_GET_INFO")
        return True
    except InvalidArgument:
        return False
    except PyvfioError:
        return True  # some other answer (EIO: frozen): it got past the access check


def bdf_of_fd(fd: int, link: str | None = None) -> str | None:
    """The PCI address of a VFIO device fd: from ``fdinfo`` (vfio-device-syspath) where the
    kernel shows it, else from a cdev path's sysfs entry."""
    fd = fileno_of(fd)
    try:
        with open(f"/proc/self/fdinfo/{fd}") as fh:
            for line in fh:
                if line.startswith("vfio-device-syspath:"):
                    return os.path.basename(line.split(":", 1)[1].strip())
    except OSError:
        pass
    if link is None:
        try:
            link = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            return None
    if link.startswith("/dev/vfio/devices/"):
        return bdf_of_cdev(link)
    return None


def bdf_of_cdev(path: str, sysfs: str = "/sys") -> str | None:
    """``/dev/vfio/devices/vfioN`` -> its device's BDF, from ``/sys/class/vfio-dev/vfioN/device``;
    None for any other path."""
    name = os.path.basename(check_text(path, "cdev path", "bdf_of_cdev", path=True))
    if not (name.startswith("vfio") and name[4:].isdigit() and name[4:].isascii()):
        return None
    try:
        return os.path.basename(os.readlink(f"{sysfs}/class/vfio-dev/{name}/device"))
    except OSError:
        return None


_IRQ_NAME = r"vfio-(intx|msix?)(?:\[(\d+)\])?\(([0-9a-fA-F:.]+)\)"


def irqs_enabled(bdf: str, interrupts: str = "/proc/interrupts") -> dict[str, int]:
    """{"intx"|"msi"|"msix": lines} vfio-pci has requested for ``bdf``, as the kernel lists them."""
    from .sysfs import parse_bdf

    bdf = parse_bdf(bdf)
    out: dict[str, int] = {}
    try:
        with open(interrupts, errors="replace") as fh:
            text = fh.read()
    except OSError:
        return out
    import re

    for m in re.finditer(_IRQ_NAME, text):
        if m.group(3) == bdf:
            out[m.group(1)] = out.get(m.group(1), 0) + 1
    return out


def power_state(bdf: str, sysfs: str = "/sys") -> str | None:
    """The device's PCI power state (``D0``, ``D3hot``...), None when sysfs does not say."""
    from .sysfs import parse_bdf

    bdf = parse_bdf(bdf)
    try:
        with open(f"{sysfs}/bus/pci/devices/{bdf}/power_state") as fh:
            return fh.read().strip()
    except OSError:
        return None


def why_not(fd: int, bdf: str | None = None, link: str | None = None, bound: bool | None = None) -> list[str]:
    """Every reason the kernel would refuse to preserve device fd ``fd`` (or refuse the kexec
    after preserving it), in words; [] when none is known. Changes nothing: the binding is
    asked of the kernel (a device ioctl, which resumes a runtime-suspended device) only when
    ``bound`` is not known, and after the power state was read."""
    fd = fileno_of(fd)
    if link is None:
        try:
            link = os.readlink(f"/proc/self/fd/{fd}")
        except OSError as exc:
            raise error_for(exc.errno or 0, "why_not", f"fd {fd}") from None
    support = device_preservation()
    reasons = []
    if support.supported is False:
        reasons.append(f"this kernel cannot preserve VFIO devices ({support.detail}); {HOW_TO_GET}")
    bdf = bdf or bdf_of_fd(fd, link)
    state = power_state(bdf) if bdf else None
    origin = fd_origin(link)
    if origin == "group":
        reasons.append("the fd came from the legacy VFIO group path (VFIO_GROUP_GET_DEVICE_FD); only a cdev "
                       "fd (/dev/vfio/devices/vfioN, iommufd mode) can be preserved")
    elif origin in ("cdev", "retrieved") and not (fd_bound(fd) if bound is None else bound):
        reasons.append("the cdev fd is not bound to an iommufd (VFIO_DEVICE_BIND_IOMMUFD first)")
    if bdf:
        irqs = irqs_enabled(bdf)
        if irqs:
            reasons.append("IRQs are enabled (" + ", ".join(f"{k}: {n}" for k, n in sorted(irqs.items()))
                           + " in /proc/interrupts); disable them (VFIO_DEVICE_SET_IRQS count 0), or the "
                           "kexec is refused")
        if state and state != "D0":
            reasons.append(f"the device is in {state}, not D0; the kexec would be refused")
    return reasons


def preserve_error(exc: PyvfioError, fd: int, link: str, target: str, bdf: str | None = None) -> PyvfioError:
    """The named error for a failed LIVEUPDATE_SESSION_PRESERVE_FD of VFIO device fd ``fd``."""
    from .errors import AlreadyPreserved, DeviceNotPreservable, VfioPreservationUnsupported

    bdf = bdf or bdf_of_fd(fd, link)
    if exc.errno == errno.EBUSY:
        where = holder_of(bdf) if bdf else None
        return AlreadyPreserved(exc.errno, exc.operation, target,
                                f"device {bdf or link} is already preserved"
                                + (f" in session {where[0]!r} (token {where[1]:#x})" if where else "")
                                + "; close that session (before the kexec) or finish it (after) first")
    support = device_preservation()
    if support.supported is False:
        return VfioPreservationUnsupported(
            exc.errno, exc.operation, target,
            f"this kernel cannot preserve VFIO devices across a live update ({support.detail}); {HOW_TO_GET}")
    reasons = [r for r in why_not(fd, bdf, link) if "cannot preserve VFIO" not in r]
    return DeviceNotPreservable(exc.errno, exc.operation, target,
                                "; ".join(reasons) or "the kernel's VFIO live-update handler refused this device "
                                "(a VF, an IGD, or a variant driver instead of vfio-pci)")


# BDF -> (session, token) of devices preserved through open Session objects of this process
_LOCAL: dict[str, tuple[str, int]] = {}


def preserved_here() -> dict[str, tuple[str, int]]:
    """BDF -> (session, token) of devices preserved through open Session objects of this process."""
    return dict(_LOCAL)


def note_local(bdf: str | None, session: str, token: int) -> None:
    if bdf:
        _LOCAL[bdf] = (session, token)


def forget_local(session: str) -> None:
    for bdf in [b for b, (s, _t) in _LOCAL.items() if s == session]:
        del _LOCAL[bdf]


def holder_of(bdf: str) -> tuple[str, int] | None:
    """(session, token) preserving device ``bdf`` in this boot (a session of this process, or
    one a live holder's ledger lists) or, after a live update, the incoming session it came
    in; None if unknown."""
    from . import ledger

    return _LOCAL.get(bdf) or ledger.find_device(bdf, ledger.outgoing()) or ledger.find_device(bdf)


def incoming_device(bdf: str) -> tuple[str, int] | None:
    from . import ledger

    return ledger.find_device(bdf)


def record_for(fd: int, bdf: str | None, path: str | None) -> dict[str, Any]:
    return {"kind": "vfio-device", "bdf": bdf or bdf_of_fd(fd), "path": path}


# --- after an aborted kexec: a frozen device ----------------------------------------------
def device_fd_holders(bdf: str, proc: str = "/proc", sysfs: str = "/sys") -> list[tuple[int, int, str]]:
    """(pid, fd, link) of every open VFIO fd of device ``bdf`` visible here: its cdev, or an
    anonymous device fd whose fdinfo names the device."""
    from .procfs import holders
    from .sysfs import PciDevice

    cdev = PciDevice(bdf, sysfs).vfio_cdev
    out = []
    for h in holders(lambda link: link == cdev or link.startswith("anon_inode:[vfio-device"), proc):
        if h.link != cdev:
            try:
                with open(f"{proc}/{h.pid}/fdinfo/{h.fd}") as fh:
                    if not any(line.startswith("vfio-device-syspath:") and line.rstrip().endswith("/" + bdf)
                               for line in fh):
                        continue
            except OSError:
                continue
        out.append((h.pid, h.fd, h.link))
    return out


def recover_frozen(bdf: str, sysfs: str = "/sys") -> None:
    """Give a device frozen by an aborted kexec back to service: unbind it from vfio-pci and
    bind it again (the only recovery on the current series). Refused, changing nothing, while
    any fd of the device is open (an unbind would block until they close) or while a live
    update session holds it."""
    from .errors import Busy, DevicePreserved
    from .sysfs import VFIO_DRIVER, PciDevice, parse_bdf

    bdf = parse_bdf(bdf)
    held = holder_of(bdf)
    if held:
        raise DevicePreserved(errno.EBUSY, "recover frozen device", bdf,
                              f"session {held[0]!r} (token {held[1]:#x}) still preserves it: close that "
                              "session first (its holder: Holder.release, or stop the holder)")
    fds = device_fd_holders(bdf, sysfs=sysfs)
    if fds:
        raise Busy(errno.EBUSY, "recover frozen device", bdf,
                   "fds of the device are still open (" + ", ".join(f"pid {p} fd {f}" for p, f, _ in fds)
                   + "); close them first: unbinding waits for every fd")
    pci = PciDevice(bdf, sysfs)
    pci.unbind()
    pci.bind(VFIO_DRIVER)
