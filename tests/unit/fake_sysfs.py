"""A sysfs tree under a temporary directory, laid out like the kernel's, and a fake kernel
that reacts to the binding writes (unbind, driver_override, drivers_probe, drivers/X/bind).

Layout (symlinks as in the real /sys)::

    devices/pci0000:00/<bdf>/{vendor,device,class,driver_override}
    devices/pci0000:00/<bdf>/driver      -> ../../../bus/pci/drivers/<driver>
    devices/pci0000:00/<bdf>/iommu_group -> ../../../kernel/iommu_groups/<n>
    devices/pci0000:00/<bdf>/vfio-dev/vfio<k>/dev            (bound to vfio-pci)
    devices/pci0000:00/<bdf>/virtio0/net/<ifname>            (a virtio NIC)
    devices/pci0000:00/<bdf>/net/<ifname>                    (a plain NIC)
    bus/pci/devices/<bdf>                -> ../../../devices/pci0000:00/<bdf>
    bus/pci/drivers/<driver>/{bind,unbind}, bus/pci/drivers_probe
    kernel/iommu_groups/<n>/devices/<bdf> -> ../../../../devices/pci0000:00/<bdf>
    class/net/<ifname>                   -> ../../devices/pci0000:00/<bdf>/.../net/<ifname>
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from pyvfio_lu import sysfs


@dataclass
class FakeDevice:
    bdf: str
    vendor: int = 0x1234
    device: int = 0x11E8
    pci_class: int = 0x00FF00
    driver: str | None = None
    group: int | None = None
    net: str | None = None  # interface name
    virtio: bool = False  # the interface hangs off a virtio0 child device
    matches: list[str] = field(default_factory=list)  # drivers whose id table matches


class FakeSysfs:
    def __init__(self, root: Path, drivers=("vfio-pci", "virtio-pci", "i801_smbus", "pcieport", "e1000e")):
        self.root = Path(root)
        self.devices: dict[str, FakeDevice] = {}
        self._cdevs = 0
        for d in ("devices/pci0000:00", "bus/pci/devices", "bus/pci/drivers", "kernel/iommu_groups", "class/net"):
            (self.root / d).mkdir(parents=True, exist_ok=True)
        (self.root / "bus/pci/drivers_probe").write_text("")
        for drv in drivers:
            self.add_driver(drv)

    def __str__(self) -> str:
        return str(self.root)

    def add_driver(self, name: str) -> None:
        d = self.root / "bus/pci/drivers" / name
        d.mkdir(exist_ok=True)
        (d / "bind").write_text("")
        (d / "unbind").write_text("")

    def dev_dir(self, bdf: str) -> Path:
        return self.root / "devices/pci0000:00" / bdf

    def add(self, bdf: str, **kw) -> FakeDevice:
        dev = FakeDevice(bdf, **kw)
        if dev.driver and dev.driver not in dev.matches and dev.driver != "vfio-pci":
            dev.matches.append(dev.driver)
        self.devices[bdf] = dev
        d = self.dev_dir(bdf)
        d.mkdir()
        (d / "vendor").write_text(f"0x{dev.vendor:04x}\n")
        (d / "device").write_text(f"0x{dev.device:04x}\n")
        (d / "class").write_text(f"0x{dev.pci_class:06x}\n")
        (d / "driver_override").write_text("(null)\n")
        os.symlink(f"../../../devices/pci0000:00/{bdf}", self.root / "bus/pci/devices" / bdf)
        if dev.group is not None:
            g = self.root / "kernel/iommu_groups" / str(dev.group) / "devices"
            g.mkdir(parents=True, exist_ok=True)
            os.symlink(f"../../../../devices/pci0000:00/{bdf}", g / bdf)
            os.symlink(f"../../../kernel/iommu_groups/{dev.group}", d / "iommu_group")
        self._attach(bdf, dev.driver)
        return dev

    # --- what the kernel does ----------------------------------------------------------------
    def _attach(self, bdf: str, driver: str | None) -> None:
        dev, d = self.devices[bdf], self.dev_dir(bdf)
        dev.driver = driver
        if driver is None:
            return
        os.symlink(f"../../../bus/pci/drivers/{driver}", d / "driver")
        if driver == "vfio-pci":
            cdev = d / "vfio-dev" / f"vfio{self._cdevs}"
            cdev.mkdir(parents=True)
            (cdev / "dev").write_text(f"511:{self._cdevs}\n")
            self._cdevs += 1
        elif dev.net:
            netdir = (d / "virtio0" / "net" / dev.net) if dev.virtio else (d / "net" / dev.net)
            netdir.mkdir(parents=True)
            rel = netdir.relative_to(self.root)
            os.symlink(f"../../{rel}", self.root / "class/net" / dev.net)

    def _detach(self, bdf: str) -> None:
        dev, d = self.devices[bdf], self.dev_dir(bdf)
        if dev.driver is None:
            raise OSError(19, "No such device")
        os.unlink(d / "driver")
        for sub in ("vfio-dev", "virtio0", "net"):
            if (d / sub).exists():
                for p in sorted((d / sub).rglob("*"), reverse=True):
                    p.rmdir() if p.is_dir() else p.unlink()
                (d / sub).rmdir()
        if dev.net and os.path.islink(self.root / "class/net" / dev.net):
            os.unlink(self.root / "class/net" / dev.net)
        dev.driver = None

    def override(self, bdf: str) -> str | None:
        text = (self.dev_dir(bdf) / "driver_override").read_text().strip()
        return None if text in ("", "(null)") else text

    def _probe(self, bdf: str) -> None:
        dev = self.devices[bdf]
        if dev.driver is not None:
            return
        override = self.override(bdf)
        candidates = [override] if override else dev.matches
        for drv in candidates:
            if (self.root / "bus/pci/drivers" / drv).is_dir():
                self._attach(bdf, drv)
                return

    def write(self, path: str, value: str) -> None:
        """What a write to ``path`` does in the real sysfs."""
        rel = Path(path).resolve().relative_to(self.root.resolve())
        parts = rel.parts
        value = value.strip()
        if parts[-1] == "driver_override":
            (self.root / rel).write_text((value or "(null)") + "\n")
        elif parts[-1] == "drivers_probe":
            self._probe(value)
        elif parts[:3] == ("bus", "pci", "drivers") and parts[-1] == "unbind":
            if self.devices[value].driver != parts[3]:
                raise OSError(19, "No such device")
            self._detach(value)
        elif parts[:3] == ("bus", "pci", "drivers") and parts[-1] == "bind":
            if self.devices[value].driver is not None:
                raise OSError(16, "Device or resource busy")
            override = self.override(value)
            if override not in (None, parts[3]) or (override is None and parts[3] not in self.devices[value].matches):
                raise OSError(19, "No such device")
            self._attach(value, parts[3])
        else:
            raise OSError(13, f"fake sysfs: no write handler for {rel}")

    def emulate(self, monkeypatch) -> None:
        """Route PciDevice's sysfs writes through this fake kernel."""
        fake = self

        def _write(self, path, value):
            try:
                fake.write(path, value)
            except OSError as exc:
                raise sysfs.error_for(exc.errno or 0, f"write {value.strip()!r} to {path}", self.bdf) from None

        monkeypatch.setattr(sysfs.PciDevice, "_write", _write)


def guest_like(root: Path) -> FakeSysfs:
    """The test guest's PCI layout: edu alone in group 1, virtio-net (eth0) in group 2, the
    ICH9 functions sharing group 5 (SATA without a driver, SMBus on i801_smbus), a host bridge."""
    fs = FakeSysfs(root)
    fs.add("0000:00:00.0", vendor=0x8086, device=0x29C0, pci_class=0x060000, group=0)
    fs.add("0000:00:04.0", group=1)
    fs.add("0000:00:05.0", vendor=0x1AF4, device=0x1000, pci_class=0x020000, driver="virtio-pci", group=2,
           net="eth0", virtio=True)
    fs.add("0000:00:1f.0", vendor=0x8086, device=0x2918, pci_class=0x060100, group=5)
    fs.add("0000:00:1f.2", vendor=0x8086, device=0x2922, pci_class=0x010601, group=5)
    fs.add("0000:00:1f.3", vendor=0x8086, device=0x2930, pci_class=0x0C0500, driver="i801_smbus", group=5)
    return fs
