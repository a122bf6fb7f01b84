"""A VFIO device and live update: readiness from what the kernel shows, preserving the fd,
and the errors of opening a device a live-update session holds (or a kexec froze)."""

from __future__ import annotations

import errno

from ..errors import (
    DeviceFrozen,
    DevicePreserved,
    NotLiveUpdateReady,
    PyvfioError,
    VfioPreservationUnsupported,
    error_for,
)

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (type checkers treat it as True)

if TYPE_CHECKING:
    from typing import Any

    from ..luo import Session

# PCI configuration space
PCI_COMMAND = 0x04
PCI_COMMAND_MEMORY = 0x2
PCI_COMMAND_MASTER = 0x4
PCI_STATUS = 0x06
PCI_STATUS_CAP_LIST = 0x10
PCI_CAPABILITY_LIST = 0x34
PCI_CAP_ID_PM = 0x01
PCI_PM_CTRL = 4


class LiveUpdateMixin:
    """The live-update verbs of :class:`~pyvfio_lu.vfio.VfioDevice`."""

    bdf: str | None
    path: str | None
    bound: bool
    _irqs_enabled: dict[int, int]

    if TYPE_CHECKING:  # what the mixin uses of VfioDevice
        @property
        def name(self) -> str: ...
        def fileno(self) -> int: ...
        def config_read(self, offset: int, width: int = 4) -> int: ...

    def power_state(self) -> str:
        """"D0".."D3hot" from sysfs, else from the PCI PM capability; "D0" if neither says."""
        if self.bdf:
            try:
                with open(f"/sys/bus/pci/devices/{self.bdf}/power_state") as fh:
                    return fh.read().strip()
            except OSError:
                pass
        if not self.config_read(PCI_STATUS, 2) & PCI_STATUS_CAP_LIST:
            return "D0"
        ptr, seen = self.config_read(PCI_CAPABILITY_LIST, 1) & ~3, set()
        while ptr and ptr not in seen:
            seen.add(ptr)
            if self.config_read(ptr, 1) == PCI_CAP_ID_PM:
                return f"D{self.config_read(ptr + PCI_PM_CTRL, 2) & 3}".replace("D3", "D3hot")
            ptr = self.config_read(ptr + 1, 1) & ~3
        return "D0"

    def live_update_problems(self) -> list[str]:
        """Every reason this fd cannot be preserved now (or the kexec would be refused after
        preserving it), in words, from what the kernel shows: its configuration, the fd's
        origin, its binding, ``/proc/interrupts`` and the power state; plus IRQs enabled
        through this object. [] when the fd is ready. Changes nothing."""
        from ..preservation import why_not

        problems = why_not(self.fileno(), self.bdf, self.path if self.path and self.path.startswith(
            ("/dev/vfio/devices/", "anon_inode:")) else None, bound=self.bound)
        if self._irqs_enabled and not any(p.startswith("IRQs are enabled") for p in problems):
            problems.append("IRQs are enabled through this object (index: vectors " + ", ".join(
                f"{i}: {n}" for i, n in sorted(self._irqs_enabled.items())) + "); disable them: the kexec would be refused")
        return problems

    def check_live_update_ready(self) -> None:
        """NotLiveUpdateReady (naming each unmet condition) unless this fd can be preserved:
        a kernel that preserves devices, a cdev fd, bound to an iommufd, no IRQ enabled (by
        anyone: ``/proc/interrupts``), in D0. VfioPreservationUnsupported when the kernel cannot."""
        problems = self.live_update_problems()
        if problems and problems[0].startswith("this kernel cannot preserve"):
            raise VfioPreservationUnsupported(errno.ENOENT, "preserve VFIO device", self.name, "; ".join(problems))
        if problems:
            raise NotLiveUpdateReady(errno.EINVAL, "preserve VFIO device", self.name, "; ".join(problems))

    def preserve(self, session: Session, token: int) -> None:
        """Check :meth:`check_live_update_ready`, then preserve this device fd in ``session``
        under ``token``. Nothing changes when a check fails. From then on the device belongs to
        the session: keep the session open (hand it to a holder) until the kexec; closing the
        session gives the device back."""
        self.check_live_update_ready()
        session.preserve(self, token)

    def ledger_record(self) -> dict[str, Any]:
        """What the live-update ledger says of this device: its BDF and cdev path."""
        from ..preservation import record_for

        return record_for(self.fileno(), self.bdf, self.path)


def _open_error(exc: OSError, operation: str, name: str) -> PyvfioError:
    """The error for a failed open of device ``name`` (a BDF or cdev path): a device that a
    live-update session holds is DevicePreserved naming the session and token (from the
    ledgers), one frozen by an aborted kexec is DeviceFrozen."""
    from ..preservation import bdf_of_cdev, holder_of, incoming_device

    err = exc.errno or 0
    bdf = name if not name.startswith("/dev/") else (bdf_of_cdev(name) or name)
    if err == errno.EIO:
        return DeviceFrozen(err, operation, name)
    if err in (errno.EBUSY, errno.EINVAL):
        incoming = incoming_device(bdf)
        held = incoming or holder_of(bdf)
        if err == errno.EBUSY or held:
            if incoming:
                hint = (f"it came through the live update in session {incoming[0]!r} as token "
                        f"{incoming[1]:#x}: retrieve it from there (Session.retrieve, then "
                        "VfioDevice.from_fd with a new Iommu), then finish the session")
            elif held:
                hint = (f"it is preserved for the next live update in session {held[0]!r} (token "
                        f"{held[1]:#x}); close that session to give the device back")
            else:
                hint = ("the device is preserved by a live update (or open elsewhere): retrieve it "
                        "from its LUO session, then finish the session")
            return DevicePreserved(err, "open VFIO device", name, hint)
    if isinstance(exc, PyvfioError):
        return exc
    return error_for(err, operation, name)
