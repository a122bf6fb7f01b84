"""A PCI BAR region: exact-width MMIO through its mapping, pread/pwrite where it cannot be mapped."""

from __future__ import annotations

import errno

from .. import _speedups
from .._cffi import ffi, lib
from ..errors import ArgumentOutOfRange, BadArgumentType, InvalidArgument, RegisterTimeout, check_int, check_sequence
from .records import RegionInfo, SparseArea

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (type checkers treat it as True)

if TYPE_CHECKING:
    from collections.abc import Callable
    from functools import partial
    from typing import Any
else:  # functools.partial itself, without functools' own imports (collections and more)
    from _functools import partial

U64_MAX = 2**64 - 1

if TYPE_CHECKING:
    from .device import VfioDevice

class Bar:
    """A PCI BAR region: exact-width MMIO through the mapping where the region is mappable
    (one volatile load or store of exactly 8/16/32/64 bits), ``pread``/``pwrite`` elsewhere.

    ``read8``/``read16``/``read32``/``read64(offset)`` and ``write8``...``write64(offset,
    value)`` are per-instance callables: for a BAR mapped in one piece, builtin methods of
    its ``_speedups.Window`` (one call: bounds, alignment and the value's width checked in
    C, then the volatile access); otherwise, and after :meth:`close`, :meth:`read` /
    :meth:`write` with that width. Any offset or value the fast path does not take goes to
    :meth:`read` / :meth:`write`, which raise the named error.

    ``regs8``/``regs16``/``regs32``/``regs64`` are the same accesses by subscript, offsets in
    bytes: ``bar.regs32[0x80]`` reads, ``bar.regs32[0x80] = value`` writes, exactly 32 bits
    each (for a BAR mapped in one piece a ``_speedups.Registers`` over the Window, the
    quickest form from Python: a subscript is no call, as with a ``memoryview`` of the BAR,
    which guarantees no access width)."""

    read8: Callable[[int], int]
    read16: Callable[[int], int]
    read32: Callable[[int], int]
    read64: Callable[[int], int]
    write8: Callable[[int, int], None]
    write16: Callable[[int, int], None]
    write32: Callable[[int, int], None]
    write64: Callable[[int, int], None]
    regs8: Registers
    regs16: Registers
    regs32: Registers
    regs64: Registers

    def __init__(self, device: VfioDevice, info: RegionInfo, mmap: bool = True):
        self.device = device
        self.info = info
        self.size = info.size
        self._maps: list[tuple[int, int, Any]] = []  # (start, size, pointer)
        self._window: _speedups.Window | None = None
        self._ptr: Any = None
        self._install_general_accessors()
        if mmap and info.mappable and info.size:
            areas = info.sparse_areas or (SparseArea(0, info.size),)
            try:
                for a in areas:
                    self._maps.append((a.offset, a.size, device._mmap_region(info, a.offset, a.size)))
            except BaseException:
                self.close()
                raise
        self._ptr = self._maps[0][2] if len(self._maps) == 1 and self._maps[0][0] == 0 else None
        # a BAR mapped in one piece: its accessors are the Window's builtin methods (close()
        # closes the Window first, so an accessor kept elsewhere then takes the general path)
        if self._ptr is not None:
            self._window = _speedups.Window(_address(self._ptr), self.size, self.read, self.write)
            for width in _WIDTHS:
                setattr(self, f"read{width * 8}", getattr(self._window, f"read{width * 8}"))
                setattr(self, f"write{width * 8}", getattr(self._window, f"write{width * 8}"))
                setattr(self, f"regs{width * 8}", _speedups.Registers(self._window, width))

    def _install_general_accessors(self) -> None:
        for width in _WIDTHS:
            setattr(self, f"read{width * 8}", partial(self.read, width=width))
            setattr(self, f"write{width * 8}", partial(self.write, width=width))
            setattr(self, f"regs{width * 8}", _GeneralRegisters(self, width))

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
        if self._window is None:  # not mapped in one piece: the general path, one by one
            got = [self.read(int(o), width) for o in ffi.unpack(arr, n)]
            if dest is None:
                return got
            for i, v in enumerate(got):
                dest[i] = v
            return out
        base = self._window.base
        if dest is not None:
            _speedups.read_block(base, width, n, _address(arr), _address(dest))
            return out
        buf = ffi.new("uint64_t[]", n or 1)
        _speedups.read_block(base, width, n, _address(arr), _address(buf))
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
        if self._window is not None:  # the values are checked in C, before the first store
            i = _speedups.write_block(self._window.base, width, n, _address(arr), _address(vals))
        else:
            i = lib.pvl_values_fit(width, n, vals)
        if i < n:
            raise ArgumentOutOfRange(errno.EINVAL, what, self.device.name,
                                     f"value {values[i]:#x} (item {i}) does not fit {width} bytes; nothing was written")
        if self._window is None:  # not mapped in one piece: the general path, one by one
            for o, v in zip(ffi.unpack(arr, n), values):
                self.write(int(o), v, width)

    def poll(self, offset: int, mask: int, value: int, timeout: float, width: int = 4) -> int:
        """Read the register at ``offset`` until ``register & mask == value`` or ``timeout``
        seconds pass; the loop (reads and clock) runs in C, with the GIL released once it
        has to wait (a register that already matches costs one builtin call). Returns the
        matching register value; RegisterTimeout (with ``last``, the last value read, and
        ``reads``) when the deadline passes. A BAR not mapped in one piece is polled from
        Python, at most every millisecond."""
        window = self._window
        if (window is not None and type(width) is int and width in _TOP and type(mask) is int
                and type(value) is int and type(timeout) in (float, int)
                and 0 <= mask <= _TOP[width] and 0 <= value <= _TOP[width] and 0 <= timeout <= 1e6):
            got = window.poll(offset, width, mask, value, int(timeout * 1e9))  # None: a bad offset
            if got is not None:
                if got[0]:
                    return int(got[1])
                raise self._timeout(offset, mask, value, timeout, got[1], got[2])
        what = f"BAR{self.info.index} poll"
        self._check(offset, width)
        top = (1 << (8 * width)) - 1
        check_int(mask, "mask", 0, top, what, self.device.name)
        check_int(value, "value", 0, top, what, self.device.name)
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not 0 <= timeout <= 1e6:
            raise ArgumentOutOfRange(errno.EINVAL, what, self.device.name,
                                     f"timeout must be 0 to 1e6 seconds, not {timeout!r}")
        return self._poll_slow(offset, mask, value, timeout, width)

    def _timeout(self, offset: int, mask: int, value: int, timeout: float, last: int, reads: int) -> RegisterTimeout:
        exc = RegisterTimeout(errno.ETIMEDOUT, f"BAR{self.info.index} poll", self.device.name,
                              f"register {offset:#x} & {mask:#x} never equalled {value:#x} in {timeout} s "
                              f"({reads} reads; last {last:#x})")
        exc.last, exc.reads = int(last), int(reads)
        return exc

    def _poll_slow(self, offset: int, mask: int, value: int, timeout: float, width: int) -> int:
        import time

        deadline, reads = time.monotonic() + timeout, 0
        while True:
            got = self.read(offset, width)
            reads += 1
            if got & mask == value:
                return got
            if time.monotonic() >= deadline:
                raise self._timeout(offset, mask, value, timeout, got, reads)
            time.sleep(0.001)

    def block(self, offsets: Any, width: int = 4) -> RegisterBlock:
        """A :class:`RegisterBlock`: the registers of ``width`` bytes at ``offsets``, checked
        once (in the BAR, aligned; ArgumentOutOfRange naming the first bad one), so each
        read or write of the whole block afterwards is one builtin call, the loop in C."""
        return RegisterBlock(self, offsets, width)

    def close(self) -> None:
        if self._window is not None:  # first: accessors and blocks kept elsewhere stop here
            self._window.close()
            self._window = None
        for _start, size, ptr in self._maps:
            lib.pvl_munmap(ptr, size)
        self._maps = []
        self._ptr = None
        self._install_general_accessors()


class _GeneralRegisters:
    """``regs[offset]`` / ``regs[offset] = value`` through :meth:`Bar.read` / :meth:`Bar.write`
    (a BAR not mapped in one piece, or closed): the same interface as ``_speedups.Registers``."""

    __slots__ = ("_bar", "width")

    def __init__(self, bar: Bar, width: int):
        self._bar, self.width = bar, width

    def __getitem__(self, offset: int) -> int:
        return self._bar.read(offset, self.width)

    def __setitem__(self, offset: int, value: int) -> None:
        self._bar.write(offset, value, self.width)

    def __iter__(self) -> None:
        raise TypeError("registers are not iterable: subscript them by offset, or read a block")


if TYPE_CHECKING:
    Registers = _speedups.Registers | _GeneralRegisters


class RegisterBlock:
    """Registers of one width at fixed offsets of a BAR mapped in one piece, checked once.

    ``read()`` reads every register, in order, one volatile access each, into :attr:`values`
    (a ``memoryview`` of native uint64 owned by the block, overwritten by the next read: copy
    what you keep) and returns it. ``write(values=None)`` writes ``values`` (a sequence of as
    many ints, copied into :attr:`values` first) or :attr:`values` as it is, in order; every
    value is checked to fit ``width`` bytes before the first store, and nothing is written
    when one does not (ArgumentOutOfRange names it). Both are builtin methods of the
    block's ``_speedups.Block``: one call each, the loop in C, no Python object per register.
    Once the BAR is closed both raise InvalidArgument."""

    __slots__ = ("bar", "width", "_n", "_offsets", "_values", "values", "read", "write")

    read: Callable[[], memoryview]
    write: Callable[..., None]

    def __init__(self, bar: Bar, offsets: Any, width: int = 4):
        what = f"BAR{bar.info.index} block"
        window = bar._window
        if window is None:
            raise InvalidArgument(errno.EINVAL, what, bar.device.name,
                                  "a register block needs a BAR mapped in one piece (use read_block/write_block)")
        n, checked = bar._offsets(offsets, width, what)
        self.bar, self.width, self._n = bar, width, n
        self._offsets = ffi.new("uint64_t[]", n or 1)  # our own copy: the caller's cannot change under us
        ffi.memmove(self._offsets, checked, 8 * n)
        self._values = ffi.new("uint64_t[]", n or 1)
        self.values = memoryview(ffi.buffer(self._values, 8 * n)).cast("B").cast("Q")
        at_offsets, at_values = _address(self._offsets), _address(self._values)
        loops = _speedups.Block(window, width, n, at_offsets, at_values, self.values, self._fill, self._closed,
                                self._too_wide)
        self.read, self.write = loops.read, loops.write

    def __len__(self) -> int:
        return self._n

    @property
    def offsets(self) -> tuple[int, ...]:
        return tuple(ffi.unpack(self._offsets, self._n))

    def _fill(self, values: Any) -> None:
        what, target = f"BAR{self.bar.info.index} block write", self.bar.device.name
        if not isinstance(values, (list, tuple)):
            values = _list_of(values, "values", what, target)
        if len(values) != self._n:
            raise InvalidArgument(errno.EINVAL, what, target, f"{self._n} registers but {len(values)} values")
        arr = _u64_array(values, "value", what, target)
        ffi.memmove(self._values, arr, 8 * self._n)

    def _too_wide(self, index: int) -> None:
        raise ArgumentOutOfRange(errno.EINVAL, f"BAR{self.bar.info.index} block write", self.bar.device.name,
                                 f"value {self.values[index]:#x} (item {index}) does not fit {self.width} bytes; "
                                 "nothing was written")

    def _closed(self) -> None:
        raise InvalidArgument(errno.EBADF, f"BAR{self.bar.info.index} block", self.bar.device.name,
                              "the BAR is closed")


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


def _address(cdata: Any) -> int:
    return int(ffi.cast("uintptr_t", cdata))


_WIDTHS = (1, 2, 4, 8)
_TOP = {1: 0xFF, 2: 0xFFFF, 4: 0xFFFFFFFF, 8: U64_MAX}  # the largest value of each width
_READ = {1: lib.pvl_mmio_read8, 2: lib.pvl_mmio_read16, 4: lib.pvl_mmio_read32, 8: lib.pvl_mmio_read64}
_WRITE = {1: lib.pvl_mmio_write8, 2: lib.pvl_mmio_write16, 4: lib.pvl_mmio_write32, 8: lib.pvl_mmio_write64}
