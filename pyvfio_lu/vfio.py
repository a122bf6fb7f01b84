"""A VFIO PCI device, whatever the IOMMU mode: info, regions, config space, BARs, IRQs,
reset, device features, and the VFIO live-update flow.

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
import select
import time
from collections import namedtuple
TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (type checkers treat it as True)

if TYPE_CHECKING:
    from typing import Any

from ._cffi import ffi, lib
from .caps import cap_fits, cap_items, walk_caps_sized
from .errors import (
    BadArgumentType,
    DeviceFrozen,
    DeviceNotBound,
    DevicePreserved,
    InvalidArgument,
    NotLiveUpdateReady,
    NotSupported,
    PyvfioError,
    TryAgain,
    VfioPreservationUnsupported,
    check_int,
    error_for,
)
from .fd import OwnedFd
from .iommu import Iommu
from .ioctl import FdKind, call, fd_kind
from .preservation import bdf_of_cdev, bdf_of_fd
from .sysfs import PciDevice, parse_bdf

U32_MAX, U64_MAX = 2**32 - 1, 2**64 - 1
CDEV_DIR = "/dev/vfio/devices/"


def _check_cdev_path(path: str) -> None:
    """Only ``/dev/vfio/devices/vfioN`` itself: no ``..``, no other directory, no link."""
    import re

    if not re.fullmatch(r"/dev/vfio/devices/vfio\d+", path):
        raise InvalidArgument(errno.EINVAL, "VfioDevice.open", path,
                              "a cdev path is /dev/vfio/devices/vfioN exactly (no '..', no other directory)")


# PCI configuration space
PCI_COMMAND = 0x04
PCI_COMMAND_MEMORY = 0x2
PCI_COMMAND_MASTER = 0x4
PCI_STATUS = 0x06
PCI_STATUS_CAP_LIST = 0x10
PCI_CAPABILITY_LIST = 0x34
PCI_CAP_ID_PM = 0x01
PCI_PM_CTRL = 4


class Capability(namedtuple("Capability", "id version data")):
    """One entry of a VFIO capability chain, decoded into ``data`` where the type is known."""

    __slots__ = ()


class DeviceInfo(namedtuple("DeviceInfo", "flags num_regions num_irqs caps", defaults=((),))):
    """VFIO_DEVICE_GET_INFO, decoded."""

    __slots__ = ()

    @property
    def is_pci(self) -> bool:
        return bool(self.flags & lib.VFIO_DEVICE_FLAGS_PCI)

    @property
    def can_reset(self) -> bool:
        return bool(self.flags & lib.VFIO_DEVICE_FLAGS_RESET)


SparseArea = namedtuple("SparseArea", "offset size")


class RegionInfo(namedtuple("RegionInfo", "index flags size offset caps", defaults=((),))):
    """VFIO_DEVICE_GET_REGION_INFO, decoded (``offset`` is where the region lives in the device fd)."""

    __slots__ = ()

    @property
    def readable(self) -> bool:
        return bool(self.flags & lib.VFIO_REGION_INFO_FLAG_READ)

    @property
    def writable(self) -> bool:
        return bool(self.flags & lib.VFIO_REGION_INFO_FLAG_WRITE)

    @property
    def mappable(self) -> bool:
        return bool(self.flags & lib.VFIO_REGION_INFO_FLAG_MMAP)

    @property
    def sparse_areas(self) -> tuple[SparseArea, ...] | None:
        for c in self.caps:
            if c.id == lib.VFIO_REGION_INFO_CAP_SPARSE_MMAP:
                return tuple(SparseArea(o, s) for o, s in c.data["areas"])
        return None

    @property
    def msix_mappable(self) -> bool:
        return any(c.id == lib.VFIO_REGION_INFO_CAP_MSIX_MAPPABLE for c in self.caps)

    @property
    def type(self) -> tuple[int, int] | None:
        for c in self.caps:
            if c.id == lib.VFIO_REGION_INFO_CAP_TYPE:
                return c.data["type"], c.data["subtype"]
        return None


class IrqInfo(namedtuple("IrqInfo", "index flags count")):
    """VFIO_DEVICE_GET_IRQ_INFO, decoded."""

    __slots__ = ()

    @property
    def maskable(self) -> bool:
        return bool(self.flags & lib.VFIO_IRQ_INFO_MASKABLE)

    @property
    def automasked(self) -> bool:
        return bool(self.flags & lib.VFIO_IRQ_INFO_AUTOMASKED)

    @property
    def noresize(self) -> bool:
        return bool(self.flags & lib.VFIO_IRQ_INFO_NORESIZE)


class HotResetDevice(namedtuple("HotResetDevice", "id segment bus devfn")):
    """A device a hot reset affects; ``id`` is its group id, or its device id (cdev) with DEV_ID."""

    __slots__ = ()

    @property
    def bdf(self) -> str:
        return f"{self.segment:04x}:{self.bus:02x}:{self.devfn >> 3:02x}.{self.devfn & 7}"


class EventFd(OwnedFd):
    """An eventfd an IRQ is routed to."""

    __slots__ = ()

    @classmethod
    def create(cls, what: str = "eventfd") -> "EventFd":
        return cls(os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK), what)

    def wait(self, timeout: float | None = None) -> int:
        """Block until the eventfd fires (or ``timeout`` s pass: TimeoutError); returns the count."""
        r, _, _ = select.select([self.fileno()], [], [], timeout)
        if not r:
            raise TimeoutError(f"{self.what}: no interrupt within {timeout} s")
        return os.eventfd_read(self.fileno())

    def poll(self) -> int:
        """The count so far without blocking (0 if none)."""
        try:
            return os.eventfd_read(self.fileno())
        except BlockingIOError:
            return 0


class Bar:
    """A PCI BAR region: exact-width MMIO through the mapping where the region is mappable
    (one volatile load or store of exactly 8/16/32/64 bits), ``pread``/``pwrite`` elsewhere."""

    def __init__(self, device: "VfioDevice", info: RegionInfo, mmap: bool = True):
        self.device = device
        self.info = info
        self.size = info.size
        self._maps: list[tuple[int, int, Any]] = []  # (start, size, pointer)
        if mmap and info.mappable and info.size:
            areas = info.sparse_areas or (SparseArea(0, info.size),)
            try:
                for a in areas:
                    self._maps.append((a.offset, a.size, device._mmap_region(info, a.offset, a.size)))
            except BaseException:
                self.close()
                raise
        self._ptr = self._maps[0][2] if len(self._maps) == 1 and self._maps[0][0] == 0 else None
        if self._ptr is not None:  # per-instance fast paths, see _fast_read32
            self.read32 = _fast_read32(self._ptr, self.size, self.read)
            self.write32 = _fast_write32(self._ptr, self.size, self.write)

    @property
    def mapped(self) -> bool:
        return bool(self._maps)

    def _check(self, offset: int, width: int) -> None:
        if width not in _READ:
            raise InvalidArgument(errno.EINVAL, f"BAR{self.info.index} access", self.device.name,
                                  f"width {width!r} is not 1, 2, 4 or 8 bytes")
        check_int(offset, "offset", 0, U64_MAX, f"BAR{self.info.index} access", self.device.name)
        if offset < 0 or offset + width > self.size:
            raise InvalidArgument(errno.EINVAL, f"BAR{self.info.index} access", self.device.name,
                                  f"offset {offset:#x}+{width} outside the {self.size:#x}-byte BAR")
        if offset % width:
            raise InvalidArgument(errno.EINVAL, f"BAR{self.info.index} access", self.device.name,
                                  f"offset {offset:#x} is not {width}-byte aligned")

    def _ptr_for(self, offset: int, width: int):
        if self._ptr is not None:
            return self._ptr, offset
        for start, size, ptr in self._maps:
            if start <= offset and offset + width <= start + size:
                return ptr, offset - start
        return None, offset

    def read(self, offset: int, width: int) -> int:
        self._check(offset, width)
        ptr, off = self._ptr_for(offset, width)
        if ptr is not None:
            return _READ[width](ptr, off)
        return int.from_bytes(self.device.region_read(self.info.index, offset, width), "little")

    def write(self, offset: int, value: int, width: int) -> None:
        self._check(offset, width)
        check_int(value, f"{width * 8}-bit value", 0, (1 << (width * 8)) - 1, f"BAR{self.info.index} write",
                  self.device.name)
        ptr, off = self._ptr_for(offset, width)
        if ptr is not None:
            _WRITE[width](ptr, off, value)
        else:
            self.device.region_write(self.info.index, offset, value.to_bytes(width, "little"))

    def read8(self, offset: int) -> int: return self.read(offset, 1)
    def read16(self, offset: int) -> int: return self.read(offset, 2)
    def read64(self, offset: int) -> int: return self.read(offset, 8)
    def write8(self, offset: int, value: int) -> None: self.write(offset, value, 1)
    def write16(self, offset: int, value: int) -> None: self.write(offset, value, 2)
    def write64(self, offset: int, value: int) -> None: self.write(offset, value, 8)

    def read32(self, offset: int) -> int:
        # the hot path, kept flat: bounds, alignment, one volatile 32-bit load
        ptr = self._ptr
        if ptr is not None and 0 <= offset <= self.size - 4 and not offset & 3:
            return lib.pvl_mmio_read32(ptr, offset)
        return self.read(offset, 4)

    def write32(self, offset: int, value: int) -> None:
        ptr = self._ptr
        if ptr is not None and 0 <= offset <= self.size - 4 and not offset & 3:
            lib.pvl_mmio_write32(ptr, offset, value)
        else:
            self.write(offset, value, 4)

    def close(self) -> None:
        for _start, size, ptr in self._maps:
            lib.pvl_munmap(ptr, size)
        self._maps = []
        self._ptr = None
        self.__dict__.pop("read32", None)
        self.__dict__.pop("write32", None)


_DEVICE_INFO_SIZE = ffi.sizeof("struct vfio_device_info")
_DEVICE_FLAGS_CAPS = lib.VFIO_DEVICE_FLAGS_CAPS


def _fast_read32(ptr, size: int, slow):
    """Bar.read32 for a BAR mapped in one piece: the bounds live in closure cells, one cffi
    call; any other offset goes to the general path (which raises for a bad one)."""
    load, limit = lib.pvl_mmio_read32, size - 4

    def read32(offset: int) -> int:
        if 0 <= offset <= limit and not offset & 3:
            return load(ptr, offset)
        return slow(offset, 4)

    return read32


def _fast_write32(ptr, size: int, slow):
    store, limit = lib.pvl_mmio_write32, size - 4

    def write32(offset: int, value: int) -> None:
        if 0 <= offset <= limit and not offset & 3:
            store(ptr, offset, value)
        else:
            slow(offset, value, 4)

    return write32


_READ = {1: lib.pvl_mmio_read8, 2: lib.pvl_mmio_read16, 4: lib.pvl_mmio_read32, 8: lib.pvl_mmio_read64}
_WRITE = {1: lib.pvl_mmio_write8, 2: lib.pvl_mmio_write16, 4: lib.pvl_mmio_write32, 8: lib.pvl_mmio_write64}


def _caps_of(arg: Any, first: int, decode) -> tuple[Capability, ...]:
    return tuple(Capability(cid, ver, decode(cid, ptr, room)) for cid, ver, ptr, room in walk_caps_sized(arg, first))


def _region_cap(cid: int, ptr: Any, room: int) -> dict:
    if cid == lib.VFIO_REGION_INFO_CAP_SPARSE_MMAP:
        cap_fits(room, "vfio_region_info_cap_sparse_mmap")
        cap = ffi.cast("struct vfio_region_info_cap_sparse_mmap *", ptr)
        n = cap_items(room, "vfio_region_info_cap_sparse_mmap", cap.nr_areas, "vfio_region_sparse_mmap_area")
        return {"areas": [(cap.areas[i].offset, cap.areas[i].size) for i in range(n)]}
    if cid == lib.VFIO_REGION_INFO_CAP_TYPE:
        cap_fits(room, "vfio_region_info_cap_type")
        cap = ffi.cast("struct vfio_region_info_cap_type *", ptr)
        return {"type": cap.type, "subtype": cap.subtype}
    return {}


def _device_cap(cid: int, ptr: Any, room: int) -> dict:
    if cid == lib.VFIO_DEVICE_INFO_CAP_PCI_ATOMIC_COMP:
        cap_fits(room, "vfio_device_info_cap_pci_atomic_comp")
        return {"flags": ffi.cast("struct vfio_device_info_cap_pci_atomic_comp *", ptr).flags}
    return {}


class VfioDevice:
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
    def open(cls, device: str, iommu: Iommu | str | None = None, *, sysfs: str = "/sys") -> "VfioDevice":
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
    def _open_cdev(cls, path: str, bdf: str | None, iommu: Iommu, owns: bool) -> "VfioDevice":
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
    def _open_group(cls, pci: PciDevice, iommu: Iommu, owns: bool) -> "VfioDevice":
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
    def from_fd(cls, fd: int, *, iommu: Iommu | None = None, bdf: str | None = None, owned: bool = True,
                bound: bool = False, attach: bool = True) -> "VfioDevice":
        """Wrap a VFIO device fd that was opened elsewhere (or retrieved from a LUO session).

        With ``iommu`` (iommufd mode) and ``bound=False`` the fd is bound to it (and
        attached to its IOAS when ``attach``). The fd is closed on close() only if
        ``owned``; the Iommu is never closed by the device.
        """
        kind, link = fd_kind(fd)
        if kind is not FdKind.VFIO_DEVICE:
            raise InvalidArgument(errno.EBADF, "VfioDevice.from_fd", f"fd {fd}", f"not a VFIO device fd ({link})")
        cdev = not link.startswith("anon_inode:[vfio-device]")
        bdf = parse_bdf(bdf) if bdf else bdf_of_fd(fd, link)
        dev = cls(fd, iommu=iommu, bdf=bdf, cdev=cdev, bound=bound or not cdev, owned=owned, path=link)
        if iommu is not None and cdev and not bound:
            dev.bind(iommu)
            if attach:
                dev.attach(iommu.ioas_id)
        return dev

    # --- plumbing ---------------------------------------------------------------------------
    @property
    def name(self) -> str:
        return self.bdf or self.path or f"fd {self._fd.fileno()}"

    def fileno(self) -> int:
        return self._fd.fileno()

    def _call(self, name: str, arg: Any = None, **kw) -> Any:
        if self.cdev and not self.bound:
            raise DeviceNotBound(errno.EINVAL, name, self.name)
        try:
            return call(FdKind.VFIO_DEVICE, self.fileno(), name, arg, target=self._name, **kw)
        except PyvfioError as exc:
            if exc.errno == errno.EIO:
                raise DeviceFrozen(errno.EIO, name, self.name) from None
            raise

    def _name(self) -> str:  # the error-message target, computed only on failure
        return self.name

    # --- cdev + iommufd ---------------------------------------------------------------------
    def bind(self, iommu: Iommu | int) -> int:
        """VFIO_DEVICE_BIND_IOMMUFD; returns the device id in that iommufd."""
        iommufd = iommu.fileno() if isinstance(iommu, Iommu) else iommu
        try:
            arg = call(FdKind.VFIO_DEVICE, self.fileno(), "VFIO_DEVICE_BIND_IOMMUFD", iommufd=iommufd,
                       target=self.name)
        except PyvfioError as exc:
            if exc.errno == errno.EIO:
                raise DeviceFrozen(errno.EIO, "VFIO_DEVICE_BIND_IOMMUFD", self.name) from None
            raise
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
        if not 0 <= index <= 5:
            raise InvalidArgument(errno.EINVAL, "bar", self.name, f"BAR index {index} is not 0-5")
        if index not in self._bars:
            self._bars[index] = Bar(self, self.region_info(index), mmap=mmap)
        return self._bars[index]

    # --- interrupts ------------------------------------------------------------------------
    def enable_irq(self, index: int, count: int = 1) -> list[EventFd]:
        """Route vectors 0..count-1 of IRQ ``index`` (INTx=0, MSI=1, MSI-X=2, ERR=3, REQ=4) to new eventfds."""
        check_int(count, "vector count", 1, U32_MAX, "enable IRQ", self.name)
        info = self.irq_info(index)
        if not 1 <= count <= info.count:
            raise InvalidArgument(errno.EINVAL, "enable IRQ", self.name,
                                  f"IRQ index {index} has {info.count} vectors, asked for {count}")
        fds = [EventFd.create(f"eventfd for IRQ {index}.{i} of {self.name}") for i in range(count)]
        payload = b"".join(f.fileno().to_bytes(4, "little", signed=True) for f in fds)
        try:
            self._call("VFIO_DEVICE_SET_IRQS",
                       _irq_set(index, 0, count, lib.VFIO_IRQ_SET_DATA_EVENTFD | lib.VFIO_IRQ_SET_ACTION_TRIGGER,
                                payload))
        except BaseException:
            for f in fds:
                f.close()
            raise
        for f in self._irq_fds.pop(index, []):
            f.close()
        self._irq_fds[index] = fds
        self._irqs_enabled[index] = count
        return fds

    def disable_irq(self, index: int) -> None:
        """Tear down every vector of IRQ ``index`` (DATA_NONE|ACTION_TRIGGER, count 0)."""
        self._call("VFIO_DEVICE_SET_IRQS",
                   _irq_set(index, 0, 0, lib.VFIO_IRQ_SET_DATA_NONE | lib.VFIO_IRQ_SET_ACTION_TRIGGER))
        for f in self._irq_fds.pop(index, []):
            f.close()
        self._irqs_enabled.pop(index, None)

    def disable_all_irqs(self) -> None:
        for index in list(self._irqs_enabled):
            self.disable_irq(index)

    def trigger_irq(self, index: int, vector: int = 0) -> None:
        """Fire vector ``vector`` of ``index`` from software (loopback test of the eventfd path)."""
        self._call("VFIO_DEVICE_SET_IRQS",
                   _irq_set(index, vector, 1, lib.VFIO_IRQ_SET_DATA_NONE | lib.VFIO_IRQ_SET_ACTION_TRIGGER))

    def unmask_irq(self, index: int = 0, vector: int = 0) -> None:
        """Unmask an (auto-masked) INTx after handling it."""
        self._call("VFIO_DEVICE_SET_IRQS",
                   _irq_set(index, vector, 1, lib.VFIO_IRQ_SET_DATA_NONE | lib.VFIO_IRQ_SET_ACTION_UNMASK))

    @property
    def irqs_enabled(self) -> dict[int, int]:
        """IRQ index -> vectors enabled through this object."""
        return dict(self._irqs_enabled)

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

    def hot_reset(self, group_fds: list[int] = ()) -> None:
        """VFIO_DEVICE_PCI_HOT_RESET. cdev devices pass no fds (ownership comes from the
        iommufd); group-opened devices pass the fd of every affected group."""
        fds = list(group_fds) or ([] if self.cdev else [self._group.fileno()] if self._group else [])
        payload = b"".join(f.to_bytes(4, "little", signed=True) for f in fds)
        arg = _with_payload("VFIO_DEVICE_PCI_HOT_RESET", payload)
        arg.count = len(fds)
        self._call("VFIO_DEVICE_PCI_HOT_RESET", arg)

    # --- device features -------------------------------------------------------------------
    def feature_probe(self, feature: int, op: int = 0) -> bool:
        """Does the device support ``feature`` (for GET/SET as given in ``op``)?"""
        try:
            self._call("VFIO_DEVICE_FEATURE", flags=feature | lib.VFIO_DEVICE_FEATURE_PROBE | op)
            return True
        except NotSupported:
            return False

    def feature_get(self, feature: int, size: int) -> bytes:
        arg = self._call("VFIO_DEVICE_FEATURE", extra=size, flags=feature | lib.VFIO_DEVICE_FEATURE_GET)
        return bytes(ffi.buffer(arg.data, size))

    def feature_set(self, feature: int, payload: bytes = b"") -> None:
        arg = _feature(feature | lib.VFIO_DEVICE_FEATURE_SET, payload)
        self._call("VFIO_DEVICE_FEATURE", arg)

    # --- live update -----------------------------------------------------------------------
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
        from .preservation import why_not

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

    def preserve(self, session, token: int) -> None:
        """Check :meth:`check_live_update_ready`, then preserve this device fd in ``session``
        under ``token``. Nothing changes when a check fails. From then on the device belongs to
        the session: keep the session open (hand it to a holder) until the kexec; closing the
        session gives the device back."""
        self.check_live_update_ready()
        session.preserve(self, token)

    def ledger_record(self) -> dict:
        """What the live-update ledger says of this device: its BDF and cdev path."""
        from .preservation import record_for

        return record_for(self.fileno(), self.bdf, self.path)

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

    def __enter__(self) -> "VfioDevice":
        return self

    def __exit__(self, *exc) -> None:
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
    from .ioctl import REQUESTS, new_arg

    req = REQUESTS[FdKind.VFIO_DEVICE][name]
    arg = new_arg(req, len(payload))
    if payload:
        ffi.memmove(ffi.cast("char *", arg) + ffi.sizeof(f"struct {req.arg}"), payload, len(payload))
    return arg


def _irq_set(index: int, start: int, count: int, flags: int, payload: bytes = b"") -> Any:
    arg = _with_payload("VFIO_DEVICE_SET_IRQS", payload)
    arg.index, arg.start, arg.count, arg.flags = index, start, count, flags
    return arg


def _feature(flags: int, payload: bytes = b"") -> Any:
    arg = _with_payload("VFIO_DEVICE_FEATURE", payload)
    arg.flags = flags
    return arg


def _open_error(exc: OSError, operation: str, name: str) -> PyvfioError:
    """The error for a failed open of device ``name`` (a BDF or cdev path): a device that a
    live-update session holds is DevicePreserved naming the session and token (from the
    ledgers), one frozen by an aborted kexec is DeviceFrozen."""
    from .preservation import bdf_of_cdev, holder_of, incoming_device

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


__all__ = ["VfioDevice", "Iommu", "Bar", "EventFd", "DeviceInfo", "RegionInfo", "IrqInfo",
           "VfioPreservationUnsupported"]
