"""PCI devices through sysfs: identity, driver, IOMMU group, VFIO cdev, and binding to vfio-pci.

BDFs are parsed strictly (``DDDD:BB:DD.F`` or ``BB:DD.F``, hex), so no input can name a
path outside ``<sysfs>/bus/pci/devices``. ``sysfs`` may point at a tree built under a
temporary directory for unit tests.
"""

from __future__ import annotations

import errno
import os
import re
import time
from dataclasses import dataclass

from .errors import GroupNotViable, NotFound, PyvfioError, error_for

_BDF = re.compile(r"^(?:([0-9a-fA-F]{4}):)?([0-9a-fA-F]{2}):([0-1][0-9a-fA-F])\.([0-7])$")
VFIO_DRIVER = "vfio-pci"


class InvalidBdf(PyvfioError, ValueError):
    default_reason = "a PCI address is DDDD:BB:DD.F (domain optional), in hex, device < 0x20, function < 8"


def parse_bdf(text: str) -> str:
    """The canonical ``dddd:bb:dd.f`` form of ``text``; InvalidBdf for anything else."""
    if not isinstance(text, str):
        raise InvalidBdf(errno.EINVAL, "parse BDF", repr(text), "a PCI address must be a string")
    m = _BDF.match(text.strip())
    if not m:
        raise InvalidBdf(errno.EINVAL, "parse BDF", repr(text))
    domain, bus, dev, fn = m.groups()
    return f"{(domain or '0000').lower()}:{bus.lower()}:{dev.lower()}.{fn}"


@dataclass(frozen=True)
class GroupMember:
    bdf: str
    driver: str | None


class PciDevice:
    """One PCI function as sysfs shows it."""

    def __init__(self, bdf: str, sysfs: str = "/sys"):
        self.bdf = parse_bdf(bdf)
        self.sysfs = sysfs
        self.path = os.path.join(sysfs, "bus", "pci", "devices", self.bdf)
        if not os.path.isdir(self.path):
            raise NotFound(errno.ENOENT, "PCI device", self.bdf, f"no PCI device {self.bdf} in {sysfs}")

    def _attr(self, name: str) -> str | None:
        try:
            with open(os.path.join(self.path, name)) as fh:
                return fh.read().strip()
        except OSError:
            return None

    def _write(self, path: str, value: str) -> None:
        try:
            with open(path, "w") as fh:
                fh.write(value)
        except OSError as exc:
            raise error_for(exc.errno or 0, f"write {value.strip()!r} to {path}", self.bdf) from None

    @property
    def vendor(self) -> int:
        return int(self._attr("vendor") or "0", 16)

    @property
    def device(self) -> int:
        return int(self._attr("device") or "0", 16)

    @property
    def pci_class(self) -> int:
        return int(self._attr("class") or "0", 16)

    @property
    def driver(self) -> str | None:
        link = os.path.join(self.path, "driver")
        return os.path.basename(os.readlink(link)) if os.path.islink(link) else None

    @property
    def driver_override(self) -> str | None:
        value = self._attr("driver_override")
        return None if value in (None, "(null)", "") else value

    @property
    def iommu_group(self) -> int | None:
        link = os.path.join(self.path, "iommu_group")
        return int(os.path.basename(os.readlink(link))) if os.path.islink(link) else None

    def group_members(self) -> list[GroupMember]:
        """Every device in this device's IOMMU group (itself included), with its driver."""
        group = self.iommu_group
        if group is None:
            return [GroupMember(self.bdf, self.driver)]
        devdir = os.path.join(self.sysfs, "kernel", "iommu_groups", str(group), "devices")
        members = []
        for bdf in sorted(os.listdir(devdir)):
            try:
                members.append(GroupMember(bdf, PciDevice(bdf, self.sysfs).driver))
            except (PyvfioError, OSError):
                members.append(GroupMember(bdf, None))
        return members

    @property
    def vfio_cdev(self) -> str | None:
        """``/dev/vfio/devices/vfioN`` when bound to a VFIO driver with cdev support."""
        d = os.path.join(self.path, "vfio-dev")
        try:
            names = sorted(os.listdir(d))
        except OSError:
            return None
        return f"/dev/vfio/devices/{names[0]}" if names else None

    @property
    def net_interfaces(self) -> list[str]:
        try:
            return sorted(os.listdir(os.path.join(self.path, "net")))
        except OSError:
            return []

    # --- binding ---------------------------------------------------------------------------
    def unbind(self) -> str | None:
        """Unbind from the current driver; returns its name (None if there was none)."""
        drv = self.driver
        if drv is not None:
            self._write(os.path.join(self.path, "driver", "unbind"), self.bdf)
        return drv

    def set_driver_override(self, driver: str | None) -> None:
        self._write(os.path.join(self.path, "driver_override"), (driver or "") + "\n")

    def probe(self) -> None:
        self._write(os.path.join(self.sysfs, "bus", "pci", "drivers_probe"), self.bdf)

    def bind(self, driver: str, timeout: float = 5.0) -> None:
        """Bind to ``driver`` through driver_override (the only way vfio-pci binds)."""
        if self.driver == driver:
            return
        self.unbind()
        self.set_driver_override(driver)
        self.probe()
        deadline = time.monotonic() + timeout
        while self.driver != driver and time.monotonic() < deadline:
            time.sleep(0.02)
        if self.driver != driver:
            raise PyvfioError(errno.ENODEV, f"bind {self.bdf} to {driver}", self.bdf,
                              f"the device did not bind to {driver} (is the driver loaded?)")

    def check_group_viable(self) -> None:
        """GroupNotViable unless every other device in the IOMMU group is unbound or on vfio-pci."""
        blockers = [m for m in self.group_members()
                    if m.bdf != self.bdf and m.driver not in (None, VFIO_DRIVER, "pcieport")]
        if blockers:
            names = ", ".join(f"{m.bdf} (driver {m.driver})" for m in blockers)
            raise GroupNotViable(errno.EBUSY, "bind to vfio-pci", self.bdf,
                                 f"IOMMU group {self.iommu_group} is not viable: {names} must be unbound "
                                 "or bound to vfio-pci first")

    def bind_vfio(self) -> str | None:
        """Hand the device to vfio-pci; returns the driver it had (for :meth:`restore`)."""
        self.check_group_viable()
        previous = self.driver
        if previous != VFIO_DRIVER:
            self.bind(VFIO_DRIVER)
        return previous

    def restore(self, driver: str | None) -> None:
        """Undo :meth:`bind_vfio`: unbind, clear driver_override, re-probe the old driver."""
        self.unbind()
        self.set_driver_override(None)
        if driver:
            self.probe()

    def __repr__(self) -> str:
        return f"<PciDevice {self.bdf} {self.vendor:04x}:{self.device:04x} driver={self.driver}>"
