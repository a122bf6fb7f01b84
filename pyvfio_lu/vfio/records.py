"""What VFIO_DEVICE_GET_INFO, GET_REGION_INFO and GET_IRQ_INFO return, decoded: the info
records and their capability chains (each capability checked to fit its buffer)."""

from __future__ import annotations

from .._cffi import ffi, lib
from .._record import record
from ..caps import cap_fits, cap_items, walk_caps_sized

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (type checkers treat it as True)

if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any, NamedTuple

if TYPE_CHECKING:  # the records' fields, typed (typing.NamedTuple would cost typing's import at run time)
    class _CapabilityFields(NamedTuple):
        id: int
        version: int
        data: dict[str, Any]

    class _DeviceInfoFields(NamedTuple):
        flags: int
        num_regions: int
        num_irqs: int
        caps: tuple[Capability, ...] = ()

    class SparseArea(NamedTuple):
        offset: int
        size: int

    # ``index`` and ``count`` shadow tuple's methods: fine for collections.namedtuple, which
    # these are at run time, but a typing.NamedTuple field of that name needs the ignore
    class _RegionInfoFields(NamedTuple):
        index: int  # type: ignore[assignment]
        flags: int
        size: int
        offset: int
        caps: tuple[Capability, ...] = ()

    class _IrqInfoFields(NamedTuple):
        index: int  # type: ignore[assignment]
        flags: int
        count: int  # type: ignore[assignment]

    class _HotResetDeviceFields(NamedTuple):
        id: int
        segment: int
        bus: int
        devfn: int
else:
    _CapabilityFields = record("Capability", "id version data", module=__name__)
    _DeviceInfoFields = record("DeviceInfo", "flags num_regions num_irqs caps", defaults=((),), module=__name__)
    SparseArea = record("SparseArea", "offset size", module=__name__)
    _RegionInfoFields = record("RegionInfo", "index flags size offset caps", defaults=((),), module=__name__)
    _IrqInfoFields = record("IrqInfo", "index flags count", module=__name__)
    _HotResetDeviceFields = record("HotResetDevice", "id segment bus devfn", module=__name__)


class Capability(_CapabilityFields):
    """One entry of a VFIO capability chain, decoded into ``data`` where the type is known."""

    __slots__ = ()


class DeviceInfo(_DeviceInfoFields):
    """VFIO_DEVICE_GET_INFO, decoded."""

    __slots__ = ()

    @property
    def is_pci(self) -> bool:
        return bool(self.flags & lib.VFIO_DEVICE_FLAGS_PCI)

    @property
    def can_reset(self) -> bool:
        return bool(self.flags & lib.VFIO_DEVICE_FLAGS_RESET)


class RegionInfo(_RegionInfoFields):
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


class IrqInfo(_IrqInfoFields):
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


class HotResetDevice(_HotResetDeviceFields):
    """A device a hot reset affects; ``id`` is its group id, or its device id (cdev) with DEV_ID."""

    __slots__ = ()

    @property
    def bdf(self) -> str:
        return f"{self.segment:04x}:{self.bus:02x}:{self.devfn >> 3:02x}.{self.devfn & 7}"


def _caps_of(arg: Any, first: int, decode: Callable[[int, Any, int], dict[str, Any]]) -> tuple[Capability, ...]:
    return tuple(Capability(cid, ver, decode(cid, ptr, room)) for cid, ver, ptr, room in walk_caps_sized(arg, first))


def _region_cap(cid: int, ptr: Any, room: int) -> dict[str, Any]:
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


def _device_cap(cid: int, ptr: Any, room: int) -> dict[str, Any]:
    if cid == lib.VFIO_DEVICE_INFO_CAP_PCI_ATOMIC_COMP:
        cap_fits(room, "vfio_device_info_cap_pci_atomic_comp")
        return {"flags": ffi.cast("struct vfio_device_info_cap_pci_atomic_comp *", ptr).flags}
    return {}
