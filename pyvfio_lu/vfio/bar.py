"""A PCI BAR region: exact-width MMIO through its mapping, pread/pwrite where it cannot be mapped."""

from __future__ import annotations

import errno

from .._cffi import lib
from ..errors import InvalidArgument, check_int
from .records import RegionInfo, SparseArea

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (type checkers treat it as True)

if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any

U64_MAX = 2**64 - 1

if TYPE_CHECKING:
    from .device import VfioDevice

class Bar:
    """A PCI BAR region: exact-width MMIO through the mapping where the region is mappable
    (one volatile load or store of exactly 8/16/32/64 bits), ``pread``/``pwrite`` elsewhere."""

    def __init__(self, device: VfioDevice, info: RegionInfo, mmap: bool = True):
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
        if self._ptr is not None:  # per-instance fast paths, see _fast_read32 (close() drops them)
            self.__dict__["read32"] = _fast_read32(self._ptr, self.size, self.read)
            self.__dict__["write32"] = _fast_write32(self._ptr, self.size, self.write)

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

    def _ptr_for(self, offset: int, width: int) -> tuple[Any, int]:
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




def _fast_read32(ptr: Any, size: int, slow: Callable[[int, int], int]) -> Callable[[int], int]:
    """Bar.read32 for a BAR mapped in one piece: the bounds live in closure cells, one cffi
    call; any other offset goes to the general path (which raises for a bad one)."""
    load, limit = lib.pvl_mmio_read32, size - 4

    def read32(offset: int) -> int:
        if 0 <= offset <= limit and not offset & 3:
            return load(ptr, offset)
        return slow(offset, 4)

    return read32


def _fast_write32(ptr: Any, size: int, slow: Callable[[int, int, int], None]) -> Callable[[int, int], None]:
    store, limit = lib.pvl_mmio_write32, size - 4

    def write32(offset: int, value: int) -> None:
        if 0 <= offset <= limit and not offset & 3:
            store(ptr, offset, value)
        else:
            slow(offset, value, 4)

    return write32


_READ = {1: lib.pvl_mmio_read8, 2: lib.pvl_mmio_read16, 4: lib.pvl_mmio_read32, 8: lib.pvl_mmio_read64}
_WRITE = {1: lib.pvl_mmio_write8, 2: lib.pvl_mmio_write16, 4: lib.pvl_mmio_write32, 8: lib.pvl_mmio_write64}
