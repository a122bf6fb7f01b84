"""PCI devices through sysfs: identity, driver, IOMMU group, VFIO cdev, and binding to vfio-pci.

BDFs are parsed strictly (``DDDD:BB:DD.F`` or ``BB:DD.F``, hex) and rebuilt in canonical
form, so no input can name a path outside ``<sysfs>/bus/pci/devices``; driver names are
checked the same way before they become part of a path. ``sysfs`` may point at a tree
built under a temporary directory for unit tests.

Binding (kernel-contract.md §4): unbind from the current driver, write ``vfio-pci`` to
``driver_override``, write the BDF to ``drivers_probe``. :meth:`PciDevice.restore` undoes
it: unbind, clear ``driver_override``, probe again (the original driver, or none).
"""

from __future__ import annotations

import errno
import os
import time

from ._record import record
from .errors import GroupNotViable, NotFound, PyvfioError, error_for

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (type checkers treat it as True)

if TYPE_CHECKING:
    import re
    from typing import Any, NamedTuple

BDF_MAX_INPUT = 32  # longer input is rejected before any matching
_BDF = r"(?:([0-9a-fA-F]{4}):)?([0-9a-fA-F]{2}):([0-1][0-9a-fA-F])\.([0-7])"
_DRIVER = r"[A-Za-z0-9_][A-Za-z0-9_.+-]{0,63}"
VFIO_DRIVER = "vfio-pci"
#: Drivers that leave the device's DMA to the owner of the IOMMU group (the kernel's
#: ``driver_managed_dma``): a group whose other members sit on one of these (or on no
#: driver, or on a VFIO driver) is viable.
VIABLE_DRIVERS = frozenset({VFIO_DRIVER, "pci-stub", "pcieport"})

#: PCI base classes, for listings (the first byte of the ``class`` attribute).
BASE_CLASSES = {
    0x00: "unclassified", 0x01: "storage", 0x02: "network", 0x03: "display", 0x04: "multimedia",
    0x05: "memory", 0x06: "bridge", 0x07: "communication", 0x08: "system", 0x09: "input",
    0x0A: "docking", 0x0B: "processor", 0x0C: "serial bus", 0x0D: "wireless", 0x0E: "intelligent I/O",
    0x0F: "satellite", 0x10: "crypto", 0x11: "signal processing", 0x12: "accelerator",
    0x13: "instrumentation", 0xFF: "other",
}


class InvalidBdf(PyvfioError, ValueError):
    default_reason = "a PCI address is DDDD:BB:DD.F (domain optional), in hex, device < 0x20, function < 8"


class InvalidDriverName(PyvfioError, ValueError):
    default_reason = "a driver name is 1-64 characters from [A-Za-z0-9_.+-], not starting with '.' or '-'"


def _fullmatch(pattern: str, text: str) -> re.Match[str] | None:
    import re  # on first use: not on the import path of a VMM restarted after a kexec (re's cache keeps the compiled pattern)

    return re.fullmatch(pattern, text)


def parse_bdf(text: str) -> str:
    """The canonical ``dddd:bb:dd.f`` form of ``text``; InvalidBdf for anything else.

    Surrounding spaces, tabs and newlines are ignored (``$(cat file)`` style input); anything
    else that is not exactly a PCI address is refused: path separators, ``..``, NUL,
    non-ASCII digits, out-of-range device/function numbers, over-long strings.
    """
    if not isinstance(text, str):
        raise InvalidBdf(errno.EINVAL, "parse BDF", repr(text)[:40], "a PCI address must be a string")
    if len(text) > BDF_MAX_INPUT:
        raise InvalidBdf(errno.EINVAL, "parse BDF", repr(text[:BDF_MAX_INPUT]) + "...",
                         f"a PCI address is at most {BDF_MAX_INPUT} characters; got {len(text)}")
    m = _fullmatch(_BDF, text.strip(" \t\r\n"))
    if not m:
        raise InvalidBdf(errno.EINVAL, "parse BDF", repr(text))
    domain, bus, dev, fn = m.groups()
    return f"{(domain or '0000').lower()}:{bus.lower()}:{dev.lower()}.{fn}"


def check_driver_name(name: str) -> str:
    """``name`` if it is a plausible driver name (so it can be part of a sysfs path)."""
    if not isinstance(name, str) or not _fullmatch(_DRIVER, name):
        raise InvalidDriverName(errno.EINVAL, "driver name", repr(name)[:80])
    return name


def is_vfio_driver(driver: str | None) -> bool:
    """vfio-pci or one of its vendor variants (``mlx5_vfio_pci``, ``hisi_acc_vfio_pci``...)."""
    return driver is not None and (driver == VFIO_DRIVER or "vfio" in driver)


def _link_name(path: str) -> str | None:
    try:
        return os.path.basename(os.readlink(path))
    except OSError:
        return None


if TYPE_CHECKING:  # the same record, typed (a typing.NamedTuple costs typing's import at run time)
    class GroupMember(NamedTuple):
        """A device in an IOMMU group: its PCI address (or another bus's name) and driver (or None)."""

        bdf: str
        driver: str | None
else:
    GroupMember = record("GroupMember", "bdf driver", module=__name__)
    GroupMember.__doc__ = "A device in an IOMMU group: its PCI address (or another bus's name) and driver (or None)."


def list_devices(sysfs: str = "/sys") -> list[PciDevice]:
    """Every PCI function in ``<sysfs>/bus/pci/devices``, sorted by BDF (odd entries skipped)."""
    root = os.path.join(sysfs, "bus", "pci", "devices")
    out = []
    for name in sorted(os.listdir(root)):
        try:
            out.append(PciDevice(name, sysfs))
        except (InvalidBdf, NotFound):
            continue
    return out


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

    # --- identity -----------------------------------------------------------------------
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
    def class_name(self) -> str:
        return BASE_CLASSES.get(self.pci_class >> 16, f"class {self.pci_class >> 16:#04x}")

    @property
    def driver(self) -> str | None:
        return _link_name(os.path.join(self.path, "driver"))

    @property
    def driver_override(self) -> str | None:
        value = self._attr("driver_override")
        return None if value in (None, "(null)", "") else value

    @property
    def iommu_group(self) -> int | None:
        name = _link_name(os.path.join(self.path, "iommu_group"))
        return int(name) if name and name.isdigit() else None

    def group_members(self) -> list[GroupMember]:
        """Every device in this device's IOMMU group (itself included), with its driver."""
        group = self.iommu_group
        if group is None:
            return [GroupMember(self.bdf, self.driver)]
        devdir = os.path.join(self.sysfs, "kernel", "iommu_groups", str(group), "devices")
        try:
            names = sorted(os.listdir(devdir))
        except OSError:
            return [GroupMember(self.bdf, self.driver)]
        return [GroupMember(name, _link_name(os.path.join(devdir, name, "driver"))) for name in names]

    @property
    def vfio_cdev(self) -> str | None:
        """``/dev/vfio/devices/vfioN`` (``noiommu-vfioN`` in noiommu mode) when bound to a VFIO
        driver with cdev support."""
        d = os.path.join(self.path, "vfio-dev")
        try:
            names = sorted(n for n in os.listdir(d) if "vfio" in n and "/" not in n)
        except OSError:
            return None
        return f"/dev/vfio/devices/{names[0]}" if names else None

    @property
    def net_interfaces(self) -> list[str]:
        """Network interfaces this function backs, directly (``<dev>/net/eth0``) or through a
        child device (virtio-net: ``<dev>/virtio0/net/eth0``)."""
        found = set()
        try:
            found.update(os.listdir(os.path.join(self.path, "net")))
        except OSError:
            pass
        me = os.path.realpath(self.path) + os.sep
        class_net = os.path.join(self.sysfs, "class", "net")
        try:
            entries = os.listdir(class_net)
        except OSError:
            entries = []
        for name in entries:
            if os.path.realpath(os.path.join(class_net, name)).startswith(me):
                found.add(name)
        return sorted(found)

    def to_json(self) -> dict[str, Any]:
        return {
            "bdf": self.bdf, "vendor": f"{self.vendor:04x}", "device": f"{self.device:04x}",
            "class": f"{self.pci_class:06x}", "class_name": self.class_name, "driver": self.driver,
            "driver_override": self.driver_override, "iommu_group": self.iommu_group,
            "group": [{"bdf": m.bdf, "driver": m.driver} for m in self.group_members()],
            "vfio_cdev": self.vfio_cdev, "net": self.net_interfaces,
        }

    # --- binding ---------------------------------------------------------------------------
    def unbind(self) -> str | None:
        """Unbind from the current driver; returns its name (None if there was none)."""
        drv = self.driver
        if drv is not None:
            self._write(os.path.join(self.path, "driver", "unbind"), self.bdf)
        return drv

    def set_driver_override(self, driver: str | None) -> None:
        if driver is not None:
            check_driver_name(driver)
        self._write(os.path.join(self.path, "driver_override"), (driver or "") + "\n")

    def probe(self) -> None:
        self._write(os.path.join(self.sysfs, "bus", "pci", "drivers_probe"), self.bdf)

    def _wait_driver(self, driver: str | None, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while self.driver != driver and time.monotonic() < deadline:
            time.sleep(0.02)
        return self.driver == driver

    def _need_driver(self, driver: str, operation: str) -> None:
        if not os.path.isdir(os.path.join(self.sysfs, "bus", "pci", "drivers", driver)):
            raise NotFound(errno.ENODEV, operation, self.bdf,
                           f"no PCI driver {driver!r} is registered (load its module, e.g. modprobe {driver})")

    def bind(self, driver: str, timeout: float = 5.0) -> None:
        """Bind to ``driver`` through driver_override (the only way vfio-pci binds).

        If the device does not end up on ``driver``, the override is cleared and the
        device is probed again, so it goes back to the driver it had.
        """
        check_driver_name(driver)
        if self.driver == driver:
            return
        self._need_driver(driver, f"bind {self.bdf} to {driver}")
        previous = self.unbind()
        self.set_driver_override(driver)
        self.probe()
        if self._wait_driver(driver, timeout):
            return
        now = self.driver
        try:  # roll back: nothing is left half-done
            self.unbind()
            self.set_driver_override(None)
            if previous:
                self.probe()
        except PyvfioError:
            pass
        raise PyvfioError(errno.ENODEV, f"bind {self.bdf} to {driver}", self.bdf,
                          f"the device did not bind to {driver} (it is on {now or 'no driver'}); "
                          f"restored {previous or 'no driver'}")

    def check_group_viable(self) -> None:
        """GroupNotViable unless every other device in the IOMMU group is unbound, on a
        VFIO driver, or on a driver that leaves DMA to the group's owner (pci-stub, pcieport)."""
        blockers = [m for m in self.group_members()
                    if m.bdf != self.bdf and m.driver is not None
                    and m.driver not in VIABLE_DRIVERS and not is_vfio_driver(m.driver)]
        if blockers:
            names = ", ".join(f"{m.bdf} (driver {m.driver})" for m in blockers)
            raise GroupNotViable(errno.EBUSY, "bind to vfio-pci", self.bdf,
                                 f"IOMMU group {self.iommu_group} is not viable: {names} must be unbound "
                                 "or bound to vfio-pci first")

    def bind_vfio(self) -> str | None:
        """Hand the device to vfio-pci; returns the driver it had (for :meth:`restore`).

        GroupNotViable (nothing changed) when another member of its IOMMU group is on a
        kernel driver.
        """
        self.check_group_viable()
        previous = self.driver
        if previous != VFIO_DRIVER:
            self.bind(VFIO_DRIVER)
        return previous

    def restore(self, driver: str | None, timeout: float = 5.0) -> None:
        """Undo :meth:`bind_vfio`: unbind, clear driver_override, re-probe ``driver``
        (None: leave the device without a driver).

        The kernel probes whichever driver matches; when that is not ``driver``, the
        device is moved to ``driver`` through its ``bind`` file. PyvfioError (ENODEV)
        when the device does not end up on ``driver``.
        """
        if driver is not None:
            check_driver_name(driver)
            self._need_driver(driver, f"restore {self.bdf} to {driver}")
        self.unbind()
        self.set_driver_override(None)
        if not driver:
            return
        self.probe()
        refused = ""
        if not self._wait_driver(driver, min(timeout, 1.0)) and self.driver is None:
            try:
                self._write(os.path.join(self.sysfs, "bus", "pci", "drivers", driver, "bind"), self.bdf)
            except PyvfioError as exc:
                refused = f" ({driver} refused it: {exc.reason} [{exc.errno_name}])"
        if refused or not self._wait_driver(driver, timeout):
            raise PyvfioError(errno.ENODEV, f"restore {self.bdf} to {driver}", self.bdf,
                              f"the device is on {self.driver or 'no driver'}, not {driver}{refused}")

    def __repr__(self) -> str:
        return f"<PciDevice {self.bdf} {self.vendor:04x}:{self.device:04x} driver={self.driver}>"
