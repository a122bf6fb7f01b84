"""A VFIO PCI device, whatever the IOMMU mode: opening it, binding, info, regions, config
space, reset and device features (BARs: bar.py; IRQs: irqs.py; live update: live_update.py).

From "I have a BDF" to "the device DMA'd my buffer"::

    from pyvfio_lu import VfioDevice, Iommu
    from pyvfio_lu.iommu import DmaBuffer

    with VfioDevice.open("0000:00:04.0", Iommu("iommufd")) as dev:   # cdev + bind + IOAS + attach
        dev.enable_bus_master()
        buf = DmaBuffer(4096); buf.write(b"hello")
        m = dev.iommu.map(buf, iova=0x100000)
        bar = dev.bar(0)                    # exact-width MMIO: bar.read32 / bar.write64 ...

Fd ownership: a device opened here owns its fd (and the Iommu if it created it). With
``from_fd(fd, owned=False)`` the caller keeps the fd; an ``Iommu`` passed in is never
closed by the device.
"""

from __future__ import annotations

import errno
import os
import time

from .. import _speedups
from .._cffi import ffi, lib
from ..errors import (
    BadArgumentType,
    DeviceNotBound,
    InvalidArgument,
    NotSupported,
    PyvfioError,
    TryAgain,
    check_bytes,
    check_int,
    error_for,
)
from ..fd import OwnedFd, fileno_of
from ..ioctl import FdKind, call, fd_kind, layout, template
from ..iommu import Iommu
from ..preservation import bdf_of_cdev, bdf_of_fd
from ..sysfs import PciDevice, parse_bdf
from .bar import Bar
from .irqs import EventFd, IrqsMixin
from .live_update import PCI_COMMAND, PCI_COMMAND_MASTER, PCI_COMMAND_MEMORY, LiveUpdateMixin, _open_error
from .records import DeviceInfo, HotResetDevice, IrqInfo, RegionInfo, _caps_of, _device_cap, _region_cap

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (type checkers treat it as True)

if TYPE_CHECKING:
    from collections.abc import Iterable
    from typing import Any

    from typing_extensions import Self  # typing.Self from 3.11; type checkers ship this stub

U32_MAX, U64_MAX = 2**32 - 1, 2**64 - 1
CDEV_DIR = "/dev/vfio/devices/"


def _check_cdev_path(path: str) -> None:
    """Only ``/dev/vfio/devices/vfioN`` itself: no ``..``, no other directory, no link."""
    import re

    if not re.fullmatch(r"/dev/vfio/devices/vfio\d+", path):
        raise InvalidArgument(errno.EINVAL, "VfioDevice.open", path,
                              "a cdev path is /dev/vfio/devices/vfioN exactly (no '..', no other directory)")


_DEVICE_INFO_SIZE = ffi.sizeof("struct vfio_device_info")
_DEVICE_FLAGS_CAPS = lib.VFIO_DEVICE_FLAGS_CAPS
_GET_INFO = lib.VFIO_DEVICE_GET_INFO
_GET_INFO_ARG = template("vfio_device_info")
# words 1-3 of struct vfio_device_info are flags, num_regions, num_irqs (checked at import)
assert layout("vfio_device_info", "argsz flags num_regions num_irqs cap_offset pad").format == "=IIIIII"
_ioctl_record = _speedups.ioctl_record
_NO_CAPS: tuple[tuple[()]] = ((),)  # the record's last field, caps: none


class VfioDevice(IrqsMixin, LiveUpdateMixin):
    """One VFIO device fd. Build with :meth:`open` (by BDF or cdev path) or :meth:`from_fd`."""

    def __init__(self, fd: int, *, iommu: Iommu | None, bdf: str | None, cdev: bool, bound: bool,
                 owned: bool = True, owns_iommu: bool = False, group_fd: OwnedFd | None = None,
                 path: str | None = None):
        self.bdf = bdf
        self.path = path
        self.iommu = iommu
        self.cdev = cdev
        self.bound = bound
        self.devid: int | None = None
        self.hwpt_id: int | None = None
        self._fd = OwnedFd(fd, f"VFIO device {bdf or path or fd}", owned=owned)
        self._owns_iommu = owns_iommu
        self._group = group_fd
        self._bars: dict[int, Bar] = {}
        self._regions: dict[int, RegionInfo] = {}
        self._irq_fds: dict[int, list[EventFd]] = {}
        self._irqs_enabled: dict[int, int] = {}
        self._info_arg = None

    # --- construction -----------------------------------------------------------------------
    @classmethod
    def open(cls, device: str | os.PathLike[str], iommu: Iommu | str | None = None, *,
             sysfs: str = "/sys") -> VfioDevice:
        """Open a device bound to vfio-pci, by BDF (or a ``/dev/vfio/devices/vfioN`` path),
        set up in ``iommu`` (an Iommu, a mode name, or None for a new ``iommufd`` one).

        iommufd: open the cdev, VFIO_DEVICE_BIND_IOMMUFD, attach to the IOAS. Legacy and
        compat modes: open the IOMMU group, check it is viable, put it into the container
        and get the device fd with VFIO_GROUP_GET_DEVICE_FD. DevicePreserved (EBUSY) when
        the device was preserved by a live update and is still in its incoming session.
        """
        if isinstance(device, os.PathLike):
            device = os.fspath(device)
        if not isinstance(device, str):
            raise BadArgumentType(errno.EINVAL, "VfioDevice.open", repr(device)[:80],
                                  f"a device is a PCI address or a /dev/vfio/devices/vfioN path, not {type(device).__name__}")
        if device.startswith("/"):
            _check_cdev_path(device)
        owns = not isinstance(iommu, Iommu)
        iommu = iommu if isinstance(iommu, Iommu) else Iommu(iommu or "iommufd")
        try:
            if device.startswith("/dev/vfio/devices/"):
                if not iommu.is_iommufd:
                    raise InvalidArgument(errno.EINVAL, "VfioDevice.open", device,
                                          f"a cdev path needs the iommufd mode, not {iommu.mode}")
                return cls._open_cdev(device, bdf_of_cdev(device), iommu, owns)
            bdf = parse_bdf(device)
            pci = PciDevice(bdf, sysfs)
            if iommu.is_iommufd:
                cdev = pci.vfio_cdev
                if cdev is None:
                    raise NotSupported(errno.ENODEV, "VfioDevice.open", bdf,
                                       f"{bdf} has no VFIO cdev (driver {pci.driver}; bind it to vfio-pci, "
                                       "and the kernel needs CONFIG_VFIO_DEVICE_CDEV)")
                return cls._open_cdev(cdev, bdf, iommu, owns)
            return cls._open_group(pci, iommu, owns)
        except BaseException:
            if owns:
                iommu.close()
            raise

    @classmethod
    def _open_cdev(cls, path: str, bdf: str | None, iommu: Iommu, owns: bool) -> VfioDevice:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW)
        except OSError as exc:
            raise _open_error(exc, "open VFIO device", bdf or path) from None
        import stat

        if not stat.S_ISCHR(os.fstat(fd).st_mode):
            os.close(fd)
            raise InvalidArgument(errno.ENOTTY, "VfioDevice.open", path, "not a character device")
        dev = cls(fd, iommu=iommu, bdf=bdf, cdev=True, bound=False, owns_iommu=owns, path=path)
        try:
            dev.bind(iommu)
            assert iommu.ioas_id is not None  # open() checked: the iommufd mode
            dev.attach(iommu.ioas_id)
            dev._call("VFIO_DEVICE_GET_INFO")  # a device frozen by an aborted kexec binds, then answers EIO
        except PyvfioError as exc:
            dev._owns_iommu = False
            dev.close()
            raise _open_error(exc, "VFIO_DEVICE_BIND_IOMMUFD", bdf or path) from None
        except BaseException:
            dev._owns_iommu = False
            dev.close()
            raise
        return dev

    @classmethod
    def _open_group(cls, pci: PciDevice, iommu: Iommu, owns: bool) -> VfioDevice:
        group = pci.iommu_group
        if group is None:
            raise NotSupported(errno.ENODEV, "VfioDevice.open", pci.bdf, "the device has no IOMMU group")
        path = f"/dev/vfio/{group}"
        try:
            gfd = OwnedFd(os.open(path, os.O_RDWR | os.O_CLOEXEC), path)
        except OSError as exc:
            raise error_for(exc.errno or 0, f"open {path}", pci.bdf) from None
        try:
            status = call(FdKind.VFIO_GROUP, gfd.fileno(), "VFIO_GROUP_GET_STATUS", target=path)
            if not status.flags & lib.VFIO_GROUP_FLAGS_VIABLE:
                pci.check_group_viable()  # names the blocking siblings
                raise error_for(errno.EBUSY, "VFIO_GROUP_GET_STATUS", path, "the IOMMU group is not viable")
            if not status.flags & lib.VFIO_GROUP_FLAGS_CONTAINER_SET:
                iommu.attach_group(gfd.fileno(), path)
            try:
                fd = call(FdKind.VFIO_GROUP, gfd.fileno(), "VFIO_GROUP_GET_DEVICE_FD", pci.bdf, target=pci.bdf)
            except PyvfioError as exc:
                raise _open_error(exc, "VFIO_GROUP_GET_DEVICE_FD", pci.bdf) from None
            try:
                call(FdKind.VFIO_DEVICE, fd, "VFIO_DEVICE_GET_INFO", target=pci.bdf)
            except PyvfioError as exc:
                os.close(fd)
                raise _open_error(exc, "VFIO_DEVICE_GET_INFO", pci.bdf) from None
        except BaseException:
            gfd.close()
            raise
        return cls(fd, iommu=iommu, bdf=pci.bdf, cdev=False, bound=True, owns_iommu=owns, group_fd=gfd, path=path)

    @classmethod
    def from_fd(cls, fd: int, *, iommu: Iommu | str | None = None, bdf: str | None = None, owned: bool = True,
                bound: bool = False, attach: bool = True) -> VfioDevice:
        """Wrap a VFIO device fd that was opened elsewhere (or retrieved from a LUO session).

        With ``iommu`` and ``bound=False`` the fd is bound to it (and attached to its IOAS
        when ``attach``): an :class:`Iommu` in iommufd mode (never closed by the device), or
        the mode name ``"iommufd"`` for a new one that the device owns and closes. The fd is
        closed on close() only if ``owned``.
        """
        kind, link = fd_kind(fd)
        if kind is not FdKind.VFIO_DEVICE:
            raise InvalidArgument(errno.EBADF, "VfioDevice.from_fd", f"fd {fd}", f"not a VFIO device fd ({link})")
        cdev = not link.startswith("anon_inode:[vfio-device]")
        bdf = parse_bdf(bdf) if bdf else bdf_of_fd(fd, link)
        owns_iommu = isinstance(iommu, str)
        if owns_iommu:
            if iommu != "iommufd":
                raise InvalidArgument(errno.EINVAL, "VfioDevice.from_fd", f"fd {fd}",
                                      f"a device fd binds to an iommufd: iommu='iommufd' or an Iommu, not {iommu!r}")
            iommu = Iommu("iommufd")
        assert not isinstance(iommu, str)  # narrowed above
        if iommu is not None and cdev and not bound and iommu.ioas_id is None:
            if owns_iommu:
                iommu.close()
            raise InvalidArgument(errno.EINVAL, "VfioDevice.from_fd", f"fd {fd}",
                                  f"a device fd binds to an iommufd with an IOAS, not to a {iommu.mode} container")
        dev = cls(fd, iommu=iommu, bdf=bdf, cdev=cdev, bound=bound or not cdev, owned=owned, path=link,
                  owns_iommu=owns_iommu)
        if iommu is not None and cdev and not bound:
            try:
                dev.bind(iommu)
                if attach and iommu.ioas_id is not None:
                    dev.attach(iommu.ioas_id)
            except BaseException:
                dev._fd.detach()  # a failed wrap leaves the caller's fd open, and theirs
                if owns_iommu:
                    iommu.close()
                raise
        return dev

    # --- plumbing ---------------------------------------------------------------------------
    @property
    def name(self) -> str:
        return self.bdf or self.path or f"fd {self._fd.fileno()}"

    def fileno(self) -> int:
        return self._fd.fileno()

    def _call(self, name: str, arg: Any = None, **kw: Any) -> Any:
        if self.cdev and not self.bound:
            raise DeviceNotBound(errno.EINVAL, name, self.name)
        return call(FdKind.VFIO_DEVICE, self.fileno(), name, arg, target=self._name, **kw)

    def _name(self) -> str:  # the error-message target, computed only on failure
        return self.name

    # --- cdev + iommufd ---------------------------------------------------------------------
    def bind(self, iommu: Iommu | int) -> int:
        """VFIO_DEVICE_BIND_IOMMUFD; returns the device id in that iommufd."""
        iommufd = iommu.fileno() if isinstance(iommu, Iommu) else iommu
        arg = call(FdKind.VFIO_DEVICE, self.fileno(), "VFIO_DEVICE_BIND_IOMMUFD", iommufd=iommufd, target=self.name)
        self.bound = True
        self.devid = arg.out_devid
        if isinstance(iommu, Iommu) and self.iommu is None:
            self.iommu = iommu
        return self.devid

    def attach(self, pt_id: int) -> int:
        """VFIO_DEVICE_ATTACH_IOMMUFD_PT to an IOAS or HWPT; returns the HWPT id in use."""
        arg = self._call("VFIO_DEVICE_ATTACH_IOMMUFD_PT", pt_id=pt_id)
        self.hwpt_id = arg.pt_id
        return self.hwpt_id

    def detach(self) -> None:
        self._call("VFIO_DEVICE_DETACH_IOMMUFD_PT")
        self.hwpt_id = None

    # --- info ------------------------------------------------------------------------------
    def info(self) -> DeviceInfo:
        """VFIO_DEVICE_GET_INFO: flags, number of regions and IRQs, capabilities."""
        if self.bound:  # the lean path: one builtin call makes the record (a closed fd reads -1: EBADF)
            got = _ioctl_record(self._fd._fd, _GET_INFO, _GET_INFO_ARG, DeviceInfo, 1, 3, _NO_CAPS)
            if type(got) is DeviceInfo and not got[0] & _DEVICE_FLAGS_CAPS:
                return got
        return self._info()  # capabilities, or a failure named (a query: asking again changes nothing)

    def _info(self) -> DeviceInfo:
        arg = self._call("VFIO_DEVICE_GET_INFO")
        flags = arg.flags
        if not flags & _DEVICE_FLAGS_CAPS:
            return DeviceInfo(flags, arg.num_regions, arg.num_irqs)
        if arg.argsz > _DEVICE_INFO_SIZE:
            arg = self._call("VFIO_DEVICE_GET_INFO", extra=arg.argsz - _DEVICE_INFO_SIZE)
        return DeviceInfo(arg.flags, arg.num_regions, arg.num_irqs, _caps_of(arg, arg.cap_offset, _device_cap))

    def region_info(self, index: int) -> RegionInfo:
        """Region ``index`` (grow-and-retry for capabilities)."""
        check_int(index, "region index", 0, U32_MAX, "VFIO_DEVICE_GET_REGION_INFO", self.name)
        arg = self._call("VFIO_DEVICE_GET_REGION_INFO", index=index)
        base = ffi.sizeof("struct vfio_region_info")
        if arg.flags & lib.VFIO_REGION_INFO_FLAG_CAPS and arg.argsz > base:
            arg = self._call("VFIO_DEVICE_GET_REGION_INFO", index=index, extra=arg.argsz - base)
        caps = _caps_of(arg, arg.cap_offset, _region_cap) if arg.flags & lib.VFIO_REGION_INFO_FLAG_CAPS else ()
        info = RegionInfo(index, arg.flags, arg.size, arg.offset, caps)
        self._regions[index] = info
        return info

    def irq_info(self, index: int) -> IrqInfo:
        check_int(index, "IRQ index", 0, U32_MAX, "VFIO_DEVICE_GET_IRQ_INFO", self.name)
        arg = self._call("VFIO_DEVICE_GET_IRQ_INFO", index=index)
        return IrqInfo(index, arg.flags, arg.count)

    def _region(self, index: int) -> RegionInfo:
        return self._regions.get(index) or self.region_info(index)

    # --- region access -----------------------------------------------------------------------
    def region_read(self, index: int, offset: int, size: int) -> bytes:
        """pread from a region (for regions that cannot be mapped, and config space)."""
        check_int(index, "region index", 0, U32_MAX, "read region", self.name)
        check_int(offset, "offset", 0, U64_MAX, f"read region {index}", self.name)
        check_int(size, "size", 0, 1 << 30, f"read region {index}", self.name)
        r = self._region(index)
        if offset < 0 or offset + size > r.size:
            raise InvalidArgument(errno.EINVAL, f"read region {index}", self.name,
                                  f"{offset:#x}+{size} outside the {r.size:#x}-byte region")
        if self.cdev and not self.bound:
            raise DeviceNotBound(errno.EINVAL, f"read region {index}", self.name)
        try:
            data = os.pread(self.fileno(), size, r.offset + offset)
        except OSError as exc:
            raise error_for(exc.errno or 0, f"read region {index} at {offset:#x}", self.name) from None
        if len(data) != size:
            raise PyvfioError(errno.EIO, f"read region {index} at {offset:#x}", self.name,
                              f"short read: {len(data)} of {size} bytes")
        return data

    def region_write(self, index: int, offset: int, data: bytes) -> None:
        check_int(offset, "offset", 0, U64_MAX, f"write region {index}", self.name)
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise BadArgumentType(errno.EINVAL, f"write region {index}", self.name,
                                  f"data must be bytes, not {type(data).__name__}")
        r = self._region(index)
        if offset < 0 or offset + len(data) > r.size:
            raise InvalidArgument(errno.EINVAL, f"write region {index}", self.name,
                                  f"{offset:#x}+{len(data)} outside the {r.size:#x}-byte region")
        try:
            n = os.pwrite(self.fileno(), data, r.offset + offset)
        except OSError as exc:
            raise error_for(exc.errno or 0, f"write region {index} at {offset:#x}", self.name) from None
        if n != len(data):
            raise PyvfioError(errno.EIO, f"write region {index} at {offset:#x}", self.name,
                              f"short write: {n} of {len(data)} bytes")

    def config_read(self, offset: int, width: int = 4) -> int:
        """Read 1, 2 or 4 bytes of PCI config space (little-endian)."""
        check_int(offset, "config offset", 0, 0xFFFF, "config read", self.name)
        if width not in (1, 2, 4) or offset % width:
            raise InvalidArgument(errno.EINVAL, "config read", self.name, f"width {width} at offset {offset:#x}")
        return int.from_bytes(self.region_read(lib.VFIO_PCI_CONFIG_REGION_INDEX, offset, width), "little")

    def config_write(self, offset: int, value: int, width: int = 4) -> None:
        check_int(offset, "config offset", 0, 0xFFFF, "config write", self.name)
        if width not in (1, 2, 4) or offset % width:
            raise InvalidArgument(errno.EINVAL, "config write", self.name, f"width {width} at offset {offset:#x}")
        check_int(value, f"{width * 8}-bit value", 0, (1 << (width * 8)) - 1, "config write", self.name)
        self.region_write(lib.VFIO_PCI_CONFIG_REGION_INDEX, offset, value.to_bytes(width, "little"))

    def enable_bus_master(self, enable: bool = True) -> None:
        """Set (or clear) Bus Master and Memory Space in the command register.
        vfio-pci leaves bus mastering off: no DMA and no MSI until this is set."""
        cmd = self.config_read(PCI_COMMAND, 2)
        bits = PCI_COMMAND_MASTER | PCI_COMMAND_MEMORY
        self.config_write(PCI_COMMAND, (cmd | bits) if enable else (cmd & ~PCI_COMMAND_MASTER), 2)

    def _mmap_region(self, info: RegionInfo, offset: int, size: int) -> Any:
        import mmap

        err = ffi.new("int *")
        ptr = lib.pvl_mmap(size, mmap.PROT_READ | mmap.PROT_WRITE, mmap.MAP_SHARED, self.fileno(),
                           info.offset + offset, err)
        if ptr == ffi.NULL:
            raise error_for(err[0], f"mmap region {info.index}", self.name)
        return ptr

    def bar(self, index: int, mmap: bool = True) -> Bar:
        """BAR ``index`` (0-5), mapped once and kept until close()."""
        check_int(index, "BAR index", 0, 5, "bar", self.name)
        if index not in self._bars:
            self._bars[index] = Bar(self, self.region_info(index), mmap=mmap)
        return self._bars[index]

    # --- reset -----------------------------------------------------------------------------
    def reset(self, retries: int = 20, delay: float = 0.01) -> None:
        """VFIO_DEVICE_RESET, retried on EAGAIN (the kernel uses a try-lock)."""
        for attempt in range(retries):
            try:
                self._call("VFIO_DEVICE_RESET")
                return
            except TryAgain:
                if attempt == retries - 1:
                    raise
                time.sleep(delay)

    def hot_reset_info(self) -> tuple[int, list[HotResetDevice]]:
        """(flags, devices affected by a bus/slot reset) — ENOSPC grow-and-retry."""
        n = 8
        while True:
            size = ffi.sizeof("struct vfio_pci_dependent_device")
            try:
                arg = self._call("VFIO_DEVICE_GET_PCI_HOT_RESET_INFO", extra=n * size)
            except PyvfioError as exc:
                if exc.errno == errno.ENOSPC:
                    n *= 2
                    continue
                raise
            devs = [HotResetDevice(arg.devices[i].devid, arg.devices[i].segment, arg.devices[i].bus,
                                   arg.devices[i].devfn) for i in range(arg.count)]
            return arg.flags, devs

    def hot_reset(self, group_fds: Iterable[int] = ()) -> None:
        """VFIO_DEVICE_PCI_HOT_RESET. cdev devices pass no fds (ownership comes from the
        iommufd); group-opened devices pass the fd of every affected group."""
        if not isinstance(group_fds, (list, tuple)):
            raise BadArgumentType(errno.EINVAL, "VFIO_DEVICE_PCI_HOT_RESET", self.name,
                                  f"group_fds must be a list of group fds, not {type(group_fds).__name__}")
        fds = [fileno_of(f) for f in group_fds] or ([] if self.cdev else [self._group.fileno()] if self._group else [])
        payload = b"".join(f.to_bytes(4, "little", signed=True) for f in fds)
        arg = _with_payload("VFIO_DEVICE_PCI_HOT_RESET", payload)
        arg.count = len(fds)
        self._call("VFIO_DEVICE_PCI_HOT_RESET", arg)

    # --- device features -------------------------------------------------------------------
    def feature_probe(self, feature: int, op: int = 0) -> bool:
        """Does the device support ``feature`` (for GET/SET as given in ``op``)?"""
        check_int(feature, "feature", 0, 0xFFFF, "VFIO_DEVICE_FEATURE", self.name)
        check_int(op, "op", 0, U32_MAX, "VFIO_DEVICE_FEATURE", self.name)
        try:
            self._call("VFIO_DEVICE_FEATURE", flags=feature | lib.VFIO_DEVICE_FEATURE_PROBE | op)
            return True
        except NotSupported:
            return False

    def feature_get(self, feature: int, size: int) -> bytes:
        check_int(feature, "feature", 0, 0xFFFF, "VFIO_DEVICE_FEATURE", self.name)
        check_int(size, "size", 0, 1 << 20, "VFIO_DEVICE_FEATURE", self.name)
        arg = self._call("VFIO_DEVICE_FEATURE", extra=size, flags=feature | lib.VFIO_DEVICE_FEATURE_GET)
        return bytes(ffi.buffer(arg.data, size))

    def feature_set(self, feature: int, payload: bytes = b"") -> None:
        check_int(feature, "feature", 0, 0xFFFF, "VFIO_DEVICE_FEATURE", self.name)
        check_bytes(payload, "payload", "VFIO_DEVICE_FEATURE", self.name)
        arg = _feature(feature | lib.VFIO_DEVICE_FEATURE_SET, payload)
        self._call("VFIO_DEVICE_FEATURE", arg)

    # --- lifetime --------------------------------------------------------------------------
    def close(self) -> None:
        """Disable IRQs routed here, unmap BARs, close the fd (if owned), the group fd, and
        the Iommu if this device created it."""
        if self._fd.closed:
            return
        try:
            for index in list(self._irqs_enabled):
                try:
                    self.disable_irq(index)
                except PyvfioError:
                    pass
            for bar in self._bars.values():
                bar.close()
            self._bars.clear()
        finally:
            self._fd.close()
            if self._group is not None:
                self._group.close()
            if self._owns_iommu and self.iommu is not None:
                self.iommu.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        if self._fd.closed:
            return f"<VfioDevice {self.name} closed>"
        path = self.path or ""
        mode = self.iommu.mode if self.iommu else "no iommu"
        state = "bound" if self.bound else "unbound"
        ioas = f" ioas={self.iommu.ioas_id}" if self.iommu and self.iommu.ioas_id is not None else ""
        return f"<VfioDevice {self.bdf or '?'} {path} {mode} {state}{ioas}>"


def _with_payload(name: str, payload: bytes) -> Any:
    """A zeroed argument for device request ``name`` with ``payload`` after the struct."""
    from ..ioctl import REQUESTS, new_arg

    req = REQUESTS[FdKind.VFIO_DEVICE][name]
    arg = new_arg(req, len(payload))
    if payload:
        ffi.memmove(ffi.cast("char *", arg) + ffi.sizeof(f"struct {req.arg}"), payload, len(payload))
    return arg


def _feature(flags: int, payload: bytes = b"") -> Any:
    arg = _with_payload("VFIO_DEVICE_FEATURE", payload)
    arg.flags = flags
    return arg
