"""A PCI BAR region: exact-width MMIO through its mapping, pread/pwrite where it cannot be mapped."""

from __future__ import annotations

import errno

from .._cffi import ffi, lib
from ..errors import ArgumentOutOfRange, BadArgumentType, InvalidArgument, RegisterTimeout, check_int, check_sequence
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
        if type(width) is not int or width not in _READ:
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
        try:
            if ptr is not None and 0 <= offset <= self.size - 4 and not offset & 3:
                return lib.pvl_mmio_read32(ptr, offset)
        except TypeError:
            pass
        return self.read(offset, 4)

    def write32(self, offset: int, value: int) -> None:
        ptr = self._ptr
        try:
            if ptr is not None and 0 <= offset <= self.size - 4 and not offset & 3:
                lib.pvl_mmio_write32(ptr, offset, value)
                return
        except (TypeError, OverflowError):
            pass
        self.write(offset, value, 4)

    # --- many registers at once: the loop in C ---------------------------------------------
    def _offsets(self, offsets: Any, width: int, what: str) -> tuple[int, Any]:
        """(n, uint64_t[] of offsets), every offset checked against the BAR first."""
        if type(width) is not int or width not in _READ:
            raise InvalidArgument(errno.EINVAL, what, self.device.name, f"width {width!r} is not 1, 2, 4 or 8 bytes")
        arr = _u64_buffer(offsets)
        if arr is None:
            if not isinstance(offsets, (list, tuple)):
                offsets = _list_of(offsets, "offsets", what, self.device.name)
            arr = _u64_array(offsets, "offset", what, self.device.name)
        n = len(offsets)
        bad = lib.pvl_mmio_check_block(self.size, width, n, arr)
        if bad < n:
            raise ArgumentOutOfRange(errno.EINVAL, what, self.device.name,
                                     f"offset {offsets[bad]:#x} (item {bad}) is outside the {self.size:#x}-byte "
                                     f"BAR or not {width}-byte aligned; nothing was accessed")
        return n, arr

    def read_block(self, offsets: Any, width: int = 4, out: Any = None) -> Any:
        """The register of ``width`` bytes at each of ``offsets``, read in that order with one
        volatile access each, the loop in C; a list of ints. Every offset is checked first
        (in the BAR, aligned): ArgumentOutOfRange naming the first bad one, and nothing is
        read.

        ``offsets`` is a list, tuple or range, or, for the lean path, an ``array('Q')`` (any
        buffer of native uint64), used in place. With ``out`` (such a buffer, writable, at
        least as long) the values are written there and ``out`` is returned: no Python
        object per register, so a block prepared once costs a few calls, not one per access."""
        what = f"BAR{self.info.index} block read"
        n, arr = self._offsets(offsets, width, what)
        dest = None
        if out is not None:
            dest = _u64_buffer(out, writable=True)
            if dest is None or len(out) < n:
                raise BadArgumentType(errno.EINVAL, what, self.device.name,
                                      f"out must be a writable array('Q') (native uint64) of at least {n} items")
        if self._ptr is None:  # not mapped in one piece: the general path, one by one
            got = [self.read(int(o), width) for o in ffi.unpack(arr, n)]
            if dest is None:
                return got
            for i, v in enumerate(got):
                dest[i] = v
            return out
        if dest is not None:
            lib.pvl_mmio_read_block(self._ptr, width, n, arr, dest)
            return out
        buf = ffi.new("uint64_t[]", n or 1)
        lib.pvl_mmio_read_block(self._ptr, width, n, arr, buf)
        values: list[int] = ffi.unpack(buf, n)
        return values

    def write_block(self, offsets: Any, values: Any, width: int = 4) -> None:
        """Write ``values[i]`` to the register of ``width`` bytes at ``offsets[i]``, in order,
        one volatile store each, the loop in C. Offsets and values are all checked first
        (same count, in the BAR, aligned, each value fits ``width`` bytes); nothing is
        written when one is bad."""
        what = f"BAR{self.info.index} block write"
        n, arr = self._offsets(offsets, width, what)
        vals = _u64_buffer(values)
        if vals is None:
            if not isinstance(values, (list, tuple)):
                values = _list_of(values, "values", what, self.device.name)
            if len(values) != n:
                raise InvalidArgument(errno.EINVAL, what, self.device.name, f"{n} offsets but {len(values)} values")
            vals = _u64_array(values, "value", what, self.device.name)
        elif len(values) != n:
            raise InvalidArgument(errno.EINVAL, what, self.device.name, f"{n} offsets but {len(values)} values")
        i = lib.pvl_values_fit(width, n, vals)
        if i < n:
            raise ArgumentOutOfRange(errno.EINVAL, what, self.device.name,
                                     f"value {values[i]:#x} (item {i}) does not fit {width} bytes; nothing was written")
        if self._ptr is None:
            for o, v in zip(ffi.unpack(arr, n), values):
                self.write(int(o), v, width)
            return
        lib.pvl_mmio_write_block(self._ptr, width, n, arr, vals)

    def poll(self, offset: int, mask: int, value: int, timeout: float, width: int = 4) -> int:
        """Read the register at ``offset`` until ``register & mask == value`` or ``timeout``
        seconds pass; the loop (reads and clock) runs in C with the GIL released. Returns
        the matching register value; RegisterTimeout (with ``last``, the last value read, and
        ``reads``) when the deadline passes. A BAR not mapped in one piece is polled from
        Python, at most every millisecond."""
        what = f"BAR{self.info.index} poll"
        self._check(offset, width)
        top = (1 << (8 * width)) - 1
        check_int(mask, "mask", 0, top, what, self.device.name)
        check_int(value, "value", 0, top, what, self.device.name)
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not 0 <= timeout <= 1e6:
            raise ArgumentOutOfRange(errno.EINVAL, what, self.device.name,
                                     f"timeout must be 0 to 1e6 seconds, not {timeout!r}")
        if self._ptr is None:
            return self._poll_slow(offset, mask, value, timeout, width, what)
        last, reads = ffi.new("uint64_t *"), ffi.new("uint64_t *")
        if lib.pvl_mmio_poll(self._ptr, width, offset, mask, value, int(timeout * 1e9), last, reads) == 0:
            return int(last[0])
        exc = RegisterTimeout(errno.ETIMEDOUT, what, self.device.name,
                              f"register {offset:#x} & {mask:#x} never equalled {value:#x} in {timeout} s "
                              f"({reads[0]} reads; last {last[0]:#x})")
        exc.last, exc.reads = int(last[0]), int(reads[0])
        raise exc

    def _poll_slow(self, offset: int, mask: int, value: int, timeout: float, width: int, what: str) -> int:
        import time

        deadline, reads = time.monotonic() + timeout, 0
        while True:
            got = self.read(offset, width)
            reads += 1
            if got & mask == value:
                return got
            if time.monotonic() >= deadline:
                exc = RegisterTimeout(errno.ETIMEDOUT, what, self.device.name,
                                      f"register {offset:#x} & {mask:#x} never equalled {value:#x} in {timeout} s "
                                      f"({reads} reads; last {got:#x})")
                exc.last, exc.reads = got, reads
                raise exc
            time.sleep(0.001)

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
        try:
            if 0 <= offset <= limit and not offset & 3:
                return load(ptr, offset)
        except TypeError:  # not an int: the general path names it
            pass
        return slow(offset, 4)

    return read32


def _fast_write32(ptr: Any, size: int, slow: Callable[[int, int, int], None]) -> Callable[[int, int], None]:
    store, limit = lib.pvl_mmio_write32, size - 4

    def write32(offset: int, value: int) -> None:
        try:
            if 0 <= offset <= limit and not offset & 3:
                store(ptr, offset, value)
                return
        except (TypeError, OverflowError):  # a value that does not fit: the general path names it
            pass
        slow(offset, value, 4)

    return write32


def _list_of(values: Any, what: str, operation: str, target: str) -> list[Any] | tuple[Any, ...]:
    return check_sequence(values, what, operation, target)


def _u64_buffer(values: Any, writable: bool = False) -> Any:
    """``values`` as a ``uint64_t[]`` over its own memory when it is a buffer of native
    uint64 (``array('Q')``, a memoryview of format ``Q``); None for anything else."""
    if isinstance(values, (list, tuple, range, str, bytes)):
        return None
    try:
        view = memoryview(values)
    except TypeError:
        return None
    with view:
        ok = (view.itemsize == 8 and view.format in ("Q", "L") and view.c_contiguous
              and not (writable and view.readonly))
    return ffi.from_buffer("uint64_t[]", values, require_writable=writable) if ok else None


def _u64_array(values: Any, what: str, operation: str, target: str) -> Any:
    """``values`` as a C ``uint64_t[]``, the first bad element named otherwise."""
    try:
        return ffi.new("uint64_t[]", values) if values else ffi.new("uint64_t[]", 1)
    except (TypeError, OverflowError):
        for i, v in enumerate(values):
            check_int(v, f"{what} of item {i}", 0, U64_MAX, operation, target)
        raise


_READ = {1: lib.pvl_mmio_read8, 2: lib.pvl_mmio_read16, 4: lib.pvl_mmio_read32, 8: lib.pvl_mmio_read64}
_WRITE = {1: lib.pvl_mmio_write8, 2: lib.pvl_mmio_write16, 4: lib.pvl_mmio_write32, 8: lib.pvl_mmio_write64}
