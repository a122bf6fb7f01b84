"""IOMMU contexts for VFIO devices, in the five modes of the kernel's VFIO selftests.

==========================  ===================  =============================================
mode                        opened               DMA mapping through
==========================  ===================  =============================================
``iommufd``                 /dev/iommu + IOAS    IOMMU_IOAS_MAP / MAP_FILE (device: cdev + bind)
``vfio_type1_iommu``        /dev/vfio/vfio       VFIO_IOMMU_MAP_DMA (device: group fd)
``vfio_type1v2_iommu``      /dev/vfio/vfio       VFIO_IOMMU_MAP_DMA
``iommufd_compat_type1``    /dev/iommu           VFIO_IOMMU_MAP_DMA (iommufd's VFIO compat)
``iommufd_compat_type1v2``  /dev/iommu           VFIO_IOMMU_MAP_DMA
==========================  ===================  =============================================

**DMA mapping of process memory is unsafe**: the device may read and write the mapped
pages at any time until they are unmapped. Freeing (or unmapping from the process) memory
that is still DMA-mapped lets the device scribble over whatever reuses it. This module
keeps a reference to every buffer it maps until it is unmapped, and unmaps everything on
``close()``; a raw address can only be mapped with ``unsafe_address=True``.
"""

from __future__ import annotations

import errno
import os
from _operator import is_, itemgetter
from itertools import repeat

from . import _speedups
from ._cffi import ffi, lib
from ._record import record
from .errors import (
    ArgumentOutOfRange,
    BadArgumentType,
    InvalidArgument,
    NotFound,
    NotSupported,
    PyvfioError,
    UnsafeOperation,
    check_bytes,
    check_int,
    check_sequence,
    error_for,
)
from .fd import FileLike, OwnedFd, fileno_of
from .ioctl import FdKind, call, layout, rw

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (type checkers treat it as True)

if TYPE_CHECKING:
    from collections import deque
    from functools import partial
    from typing import Any, NamedTuple, TypedDict

    from typing_extensions import Buffer, Self  # typing.Self from 3.11, Buffer from 3.12; type checkers ship this stub
else:  # functools.partial and collections.deque themselves, without those modules' own imports
    from _collections import deque
    from _functools import partial

MODES = ("iommufd", "vfio_type1_iommu", "vfio_type1v2_iommu", "iommufd_compat_type1", "iommufd_compat_type1v2")
PAGE = os.sysconf("SC_PAGE_SIZE")  # mmap.PAGESIZE, without importing mmap on the way to a first DMA
U64_MAX = 2**64 - 1
_PAGE_MASK = PAGE - 1
_TYPE = {"vfio_type1_iommu": "VFIO_TYPE1_IOMMU", "vfio_type1v2_iommu": "VFIO_TYPE1v2_IOMMU",
         "iommufd_compat_type1": "VFIO_TYPE1_IOMMU", "iommufd_compat_type1v2": "VFIO_TYPE1v2_IOMMU"}


if TYPE_CHECKING:
    class _IovaRangeFields(NamedTuple):
        start: int
        last: int
else:
    _IovaRangeFields = record("IovaRange", "start last", module=__name__)


class IovaRange(_IovaRangeFields):
    """An allowed IOVA range; ``last`` is inclusive (as the kernel reports it)."""

    __slots__ = ()

    @property
    def size(self) -> int:
        return self.last - self.start + 1


class DmaBuffer:
    """Page-aligned memory for device DMA: anonymous, or a shared mapping of a memfd.

    Supports the buffer protocol (``memoryview(buf)``) and keeps its mapping until
    ``close()``, which refuses while an Iommu still has it mapped.
    """

    def __init__(self, size: int, file: FileLike | None = None, offset: int = 0):
        check_int(size, "size", 1, 1 << 47, "DmaBuffer", "")
        check_int(offset, "offset", 0, 2**63 - 1, "DmaBuffer", "")
        if size <= 0 or size % PAGE:
            raise InvalidArgument(errno.EINVAL, "DmaBuffer", f"{size} bytes", f"size must be a positive multiple of {PAGE}")
        import mmap as _mmap

        flags = _mmap.MAP_SHARED | (0 if file is not None else _mmap.MAP_ANONYMOUS)
        err = ffi.new("int *")
        fd = fileno_of(file) if file is not None else -1
        ptr = lib.pvl_mmap(size, _mmap.PROT_READ | _mmap.PROT_WRITE, flags, fd, offset, err)
        if ptr == ffi.NULL:
            raise error_for(err[0], "mmap", f"DMA buffer of {size} bytes")
        self._ptr = ptr
        self.size = size
        self.mapped_by = _Pins()  # id() of each Iommu that maps (a piece of) it, counted

    @property
    def address(self) -> int:
        if self._ptr is None:
            raise ValueError("DMA buffer is closed")
        return int(ffi.cast("uintptr_t", self._ptr))

    def __buffer__(self, flags: int) -> memoryview:  # Python 3.12+
        return memoryview(ffi.buffer(self._ptr, self.size))

    def view(self) -> memoryview:
        if self._ptr is None:
            raise ValueError("DMA buffer is closed")
        return memoryview(ffi.buffer(self._ptr, self.size))

    def read(self, offset: int = 0, length: int | None = None) -> bytes:
        """``length`` bytes from ``offset`` (to the end when None); out of the buffer: ArgumentOutOfRange."""
        check_int(offset, "offset", 0, self.size, "DmaBuffer.read")
        if length is None:
            length = self.size - offset
        check_int(length, "length", 0, self.size - offset, "DmaBuffer.read", f"{self.size}-byte buffer at {offset}")
        return bytes(self.view()[offset: offset + length])

    def write(self, data: bytes, offset: int = 0) -> None:
        """Copy ``data`` (bytes-like) in at ``offset``; it must fit: ArgumentOutOfRange otherwise."""
        check_bytes(data, "data", "DmaBuffer.write")
        octets = memoryview(data).cast("B")
        check_int(offset, "offset", 0, self.size - len(octets), "DmaBuffer.write",
                  f"{len(octets)} bytes into a {self.size}-byte buffer")
        self.view()[offset: offset + len(octets)] = octets

    def close(self) -> None:
        if self._ptr is None:
            return
        if self.mapped_by:
            raise UnsafeOperation(errno.EBUSY, "DmaBuffer.close", f"buffer at {self.address:#x}",
                                  "the buffer is still DMA-mapped; unmap it first")
        lib.pvl_munmap(self._ptr, self.size)
        self._ptr = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _Pins(dict[int, int]):
    """A counted set: ``add`` one more mapping by an owner, ``discard`` one less; an owner is
    present while any of its mappings is (a buffer mapped in many pieces stays pinned until
    the last piece is unmapped)."""

    def add(self, owner: int, n: int = 1) -> None:
        self[owner] = self.get(owner, 0) + n

    def discard(self, owner: int, n: int = 1) -> None:
        left = self.get(owner, 0) - n
        if left > 0:
            self[owner] = left
        else:
            self.pop(owner, None)


if TYPE_CHECKING:
    class _MappingFields(NamedTuple):
        iova: int
        size: int
        vaddr: int | None
        keepalive: Any = None
else:
    _MappingFields = record("Mapping", "iova size vaddr keepalive", defaults=(None,), module=__name__)


class Mapping(_MappingFields):
    """One DMA mapping: ``vaddr`` is None for IOMMU_IOAS_MAP_FILE mappings; ``keepalive``
    holds the buffer (and its export) so it cannot go away while mapped. A tuple (the batch
    paths make one without a Python call per mapping) compared, like any object, by
    identity: two mappings of the same range at different times are different mappings."""

    __slots__ = ()

    def __repr__(self) -> str:
        where = "file" if self.vaddr is None else f"vaddr={self.vaddr:#x}"
        return f"<Mapping iova={self.iova:#x} size={self.size:#x} {where}>"

    __eq__ = object.__eq__
    __ne__ = object.__ne__
    __hash__ = object.__hash__  # keepalive may be unhashable


_new_mapping = partial(tuple.__new__, Mapping)  # Mapping from an (iova, size, vaddr, keepalive) tuple, in C
_iova_of, _size_of, _keep_of = itemgetter(0), itemgetter(1), itemgetter(3)

# the lean single map/unmap: the argument packed and the ioctl issued in one builtin call
_IOAS_MAP = layout("iommu_ioas_map", "size flags ioas_id __reserved user_va length iova")
_IOAS_UNMAP = layout("iommu_ioas_unmap", "size ioas_id iova length")
_T1_MAP = layout("vfio_iommu_type1_dma_map", "argsz flags vaddr iova size")
_T1_UNMAP = layout("vfio_iommu_type1_dma_unmap", "argsz flags iova size data")
_HOLD_GIL_MAX = 1 << 20  # a map or unmap of more than this releases the GIL (pinning pages takes time)
_IOAS_MAP_REQ, _IOAS_UNMAP_REQ = lib.IOMMU_IOAS_MAP, lib.IOMMU_IOAS_UNMAP
_T1_MAP_REQ, _T1_UNMAP_REQ = lib.VFIO_IOMMU_MAP_DMA, lib.VFIO_IOMMU_UNMAP_DMA
_IOAS_MAP_FIXED, _IOAS_MAP_R, _IOAS_MAP_W = (lib.IOMMU_IOAS_MAP_FIXED_IOVA, lib.IOMMU_IOAS_MAP_READABLE,
                                            lib.IOMMU_IOAS_MAP_WRITEABLE)
_T1_MAP_R, _T1_MAP_W = lib.VFIO_DMA_MAP_FLAG_READ, lib.VFIO_DMA_MAP_FLAG_WRITE


class MappingRun:
    """Many pieces of one buffer mapped by one :meth:`Iommu.map_run`, kept as C arrays:
    no Python object per piece, so a VMM can map guest RAM in thousands of pieces at the
    cost of the ioctls. Listed in :attr:`Iommu.runs` (not in :attr:`Iommu.mappings`) until
    :meth:`Iommu.unmap_run`; it keeps the buffer alive (and a DmaBuffer pinned) meanwhile.
    ``iovas``, ``sizes`` and ``mappings()`` make Python objects on demand."""

    __slots__ = ("iommu", "base", "keepalive", "_n", "_offsets", "_iovas", "_sizes")

    def __init__(self, iommu: Iommu, base: int, keepalive: Any, arrays: list[Any], n: int):
        self.iommu, self.base, self.keepalive, self._n = iommu, base, keepalive, n
        self._offsets, self._iovas, self._sizes = arrays

    def __len__(self) -> int:
        return self._n

    @property
    def iovas(self) -> list[int]:
        got: list[int] = ffi.unpack(self._iovas, self._n)
        return got

    @property
    def sizes(self) -> list[int]:
        got: list[int] = ffi.unpack(self._sizes, self._n)
        return got

    @property
    def size(self) -> int:
        """Bytes mapped by the pieces still listed."""
        return sum(self.sizes)

    def mappings(self) -> list[Mapping]:
        """The pieces as Mapping records (for reading: they are not listed in the Iommu)."""
        base = self.base
        return [Mapping(i, s, base + o, self.keepalive) for o, i, s in
                zip(ffi.unpack(self._offsets, self._n), self.iovas, self.sizes)]

    def _drop_first(self, k: int) -> None:
        """Forget the first ``k`` pieces (unmapped): the rest move to the front."""
        left = self._n - k
        for arr in (self._offsets, self._iovas, self._sizes):
            ffi.memmove(arr, arr + k, 8 * left)
        self._n = left

    def __repr__(self) -> str:
        return f"<MappingRun of {self._n} pieces{'' if self._n else ' (unmapped)'}>"


class IovaAllocator:
    """Hands out IOVA ranges from the allowed ranges: page-aligned, and aligned to the size's
    largest power of two (up to 1 GiB) so large mappings can use large IOMMU pages.
    ``limit`` keeps every IOVA below a device's DMA mask."""

    def __init__(self, ranges: list[IovaRange], limit: int = U64_MAX, start: int = PAGE):
        self.ranges = [IovaRange(max(r.start, start), min(r.last, limit)) for r in ranges
                       if min(r.last, limit) >= max(r.start, start)]
        self._next = [r.start for r in self.ranges]

    def alloc(self, size: int) -> int:
        check_int(size, "size", 1, U64_MAX, "IOVA allocation")
        size = -(-size // PAGE) * PAGE
        align = min(1 << (size.bit_length() - 1), 1 << 30)
        for i, r in enumerate(self.ranges):
            iova = -(-self._next[i] // align) * align
            if iova + size - 1 <= r.last:
                self._next[i] = iova + size
                return iova
        raise PyvfioError(errno.ENOSPC, "IOVA allocation", f"{size} bytes", "no room left in the allowed IOVA ranges")


def _piece_columns(pieces: Any, operation: str, target: str) -> tuple[list[int], list[int], list[int]]:
    """(offsets, iovas, sizes) of a sequence of (offset, iova, size) triples."""
    try:
        columns = tuple(zip(*pieces, strict=True))
    except (TypeError, ValueError):
        columns = ()
    if len(columns) != 3 and pieces:
        bad = next((i for i, p in enumerate(pieces) if not (isinstance(p, (tuple, list)) and len(p) == 3)), 0)
        raise BadArgumentType(errno.EINVAL, operation, target,
                              f"piece {bad} is not an (offset, iova, size) triple; nothing was mapped")
    if not columns:
        return [], [], []
    return list(columns[0]), list(columns[1]), list(columns[2])


def _u64s(values: list[int], what: str, operation: str, target: str) -> Any:
    """``values`` as a C ``uint64_t[]``; the first bad element named (index and value) otherwise."""
    try:
        return ffi.new("uint64_t[]", values) if values else ffi.new("uint64_t[]", 1)
    except (TypeError, OverflowError):
        for i, v in enumerate(values):
            check_int(v, f"{what} of piece {i}", 0, U64_MAX, operation, target)
        raise


def _u64_copy(values: Any, what: str, operation: str, target: str) -> tuple[Any, int]:
    """(our own ``uint64_t[]`` copy of ``values``, its length): a buffer of native uint64
    (``array('Q')``) is copied in one memmove; a sequence of ints is converted, the first
    bad element named."""
    if not isinstance(values, (list, tuple, range, str, bytes)):
        try:
            view = memoryview(values)
        except TypeError:
            view = None
        if view is not None:
            with view:
                if not (view.itemsize == 8 and view.format in ("Q", "L") and view.c_contiguous):
                    raise BadArgumentType(errno.EINVAL, operation, target,
                                          f"{what} must be ints or an array('Q') (native uint64), not {view.format!r} items")
                n = view.nbytes // 8
                arr = ffi.new("uint64_t[]", n or 1)
                ffi.memmove(arr, view, 8 * n)
                return arr, n
    seq = check_sequence(values, what, operation, target)
    try:
        return (ffi.new("uint64_t[]", seq) if seq else ffi.new("uint64_t[]", 1)), len(seq)
    except (TypeError, OverflowError):
        for i, v in enumerate(seq):
            check_int(v, f"{what} item {i}", 0, U64_MAX, operation, target)
        raise


def _address(cdata: Any) -> int:
    return int(ffi.cast("uintptr_t", cdata))


def _address_of(buffer: Any) -> tuple[int, int, Any]:
    """(address, length, export): ``export`` pins the buffer (an mmap cannot be closed
    while it is alive), so it is kept with the mapping."""
    if isinstance(buffer, DmaBuffer):
        return buffer.address, buffer.size, None
    try:
        view = memoryview(buffer)
    except TypeError:
        raise BadArgumentType(errno.EINVAL, "DMA map", type(buffer).__name__,
                              "the buffer must be a DmaBuffer, an mmap or another writable buffer "
                              "(or an int address with unsafe_address=True)") from None
    if view.readonly:
        raise InvalidArgument(errno.EINVAL, "DMA map", type(buffer).__name__, "the buffer must be writable")
    if not view.contiguous:
        raise InvalidArgument(errno.EINVAL, "DMA map", type(buffer).__name__, "the buffer must be contiguous")
    view.release()
    ptr = ffi.from_buffer(buffer, require_writable=True)
    return int(ffi.cast("uintptr_t", ptr)), len(ptr), ptr


if TYPE_CHECKING:
    class _Type1Info(TypedDict):
        iova_pgsizes: int
        iova_ranges: list[IovaRange]


class Iommu:
    """An IOMMU context devices attach to, in one of :data:`MODES`.

    ``iommufd``/``ioas_id`` may be supplied by the caller (fd-first use, e.g. an iommufd
    received from a privileged helper); then they are *not* closed or destroyed on
    ``close()`` unless ``owned=True``.
    """

    def __init__(self, mode: str = "iommufd", *, iommufd: int | None = None, ioas_id: int | None = None,
                 owned: bool | None = None):
        if mode not in MODES:
            raise InvalidArgument(errno.EINVAL, "Iommu", repr(mode), f"unknown IOMMU mode; modes: {', '.join(MODES)}")
        self.mode = mode
        self.mappings: dict[int, Mapping] = {}
        self.runs: list[MappingRun] = []  # map_run's, each many pieces kept as C arrays
        self._iommu_set = False
        self.allocator: IovaAllocator | None = None
        if mode == "iommufd":
            if iommufd is None:
                self.fd = OwnedFd(_open("/dev/iommu"), "/dev/iommu")
            else:
                self.fd = OwnedFd(iommufd, "/dev/iommu (caller's)", owned=bool(owned))
            self._owns_ioas = ioas_id is None or bool(owned)
            self.ioas_id: int | None = ioas_id if ioas_id is not None else self._ioas_alloc()
            self.kind = FdKind.IOMMUFD
        else:
            path = "/dev/vfio/vfio" if mode.startswith("vfio_") else "/dev/iommu"
            self.fd = OwnedFd(_open(path), path)
            self.ioas_id = None
            self._owns_ioas = False
            self.kind = FdKind.VFIO_CONTAINER
            version = call(self.kind, self.fd.fileno(), "VFIO_GET_API_VERSION", target=path)
            if version != lib.VFIO_API_VERSION:
                self.fd.close()
                raise NotSupported(errno.EINVAL, "VFIO_GET_API_VERSION", path, f"unknown VFIO API version {version}")

    @property
    def is_iommufd(self) -> bool:
        return self.mode == "iommufd"

    @property
    def target(self) -> str:
        return f"{self.fd.what} ({self.mode}{'' if self.ioas_id is None else f', ioas {self.ioas_id}'})"

    def fileno(self) -> int:
        return self.fd.fileno()

    # --- iommufd objects -----------------------------------------------------------------
    def _ioas_alloc(self) -> int:
        ioas_id: int = call(FdKind.IOMMUFD, self.fd.fileno(), "IOMMU_IOAS_ALLOC", target="/dev/iommu").out_ioas_id
        return ioas_id

    def ioas_alloc(self) -> int:
        """A new IOAS in this iommufd (caller destroys it with :meth:`destroy`)."""
        self._need_iommufd("IOMMU_IOAS_ALLOC")
        return self._ioas_alloc()

    def destroy(self, object_id: int) -> None:
        self._need_iommufd("IOMMU_DESTROY")
        call(FdKind.IOMMUFD, self.fileno(), "IOMMU_DESTROY", id=object_id, target=f"{self.target} object {object_id}")

    def _need_iommufd(self, what: str) -> None:
        if not self.is_iommufd:
            raise NotSupported(errno.ENOTTY, what, self.target, f"{what} needs the iommufd mode, this is {self.mode}")

    # --- legacy container ----------------------------------------------------------------
    def attach_group(self, group_fd: int, group: str) -> None:
        """Put a VFIO group into this container and, the first time, choose the IOMMU type."""
        call(FdKind.VFIO_GROUP, group_fd, "VFIO_GROUP_SET_CONTAINER", self.fileno(), target=group)
        if not self._iommu_set:
            t = getattr(lib, _TYPE[self.mode])
            if call(self.kind, self.fileno(), "VFIO_CHECK_EXTENSION", t, target=self.target) <= 0:
                raise NotSupported(errno.ENOTSUP, "VFIO_CHECK_EXTENSION", self.target,
                                   f"the container does not support {_TYPE[self.mode]}")
            call(self.kind, self.fileno(), "VFIO_SET_IOMMU", t, target=self.target)
            self._iommu_set = True

    # --- IOVA ranges -----------------------------------------------------------------------
    def iova_ranges(self) -> list[IovaRange]:
        """The IOVA ranges the devices attached now can use (re-query after attach/detach)."""
        if self.is_iommufd:
            n = 4
            while True:
                buf = ffi.new("struct iommu_iova_range[]", n)
                try:
                    arg = call(FdKind.IOMMUFD, self.fileno(), "IOMMU_IOAS_IOVA_RANGES", ioas_id=self.ioas_id,
                               num_iovas=n, allowed_iovas=int(ffi.cast("uintptr_t", buf)), target=self.target)
                except PyvfioError as exc:
                    if exc.errno == errno.EMSGSIZE:
                        n *= 2
                        continue
                    raise
                return sorted(IovaRange(buf[i].start, buf[i].last) for i in range(arg.num_iovas))
        info = self._type1_info()
        return info["iova_ranges"]

    def _type1_info(self) -> _Type1Info:
        arg = call(self.kind, self.fileno(), "VFIO_IOMMU_GET_INFO", target=self.target)
        if arg.flags & lib.VFIO_IOMMU_INFO_CAPS and arg.argsz > ffi.sizeof("struct vfio_iommu_type1_info"):
            extra = arg.argsz - ffi.sizeof("struct vfio_iommu_type1_info")
            arg = call(self.kind, self.fileno(), "VFIO_IOMMU_GET_INFO", extra=extra, target=self.target)
        ranges = _iova_ranges_of(arg, arg.cap_offset if arg.flags & lib.VFIO_IOMMU_INFO_CAPS else 0)
        if not ranges:
            ranges = [IovaRange(0, U64_MAX)]
        return {"iova_pgsizes": arg.iova_pgsizes, "iova_ranges": sorted(ranges)}

    def page_sizes(self) -> int | None:
        """Bitmap of IOMMU page sizes (type1 modes); None for iommufd."""
        return None if self.is_iommufd else self._type1_info()["iova_pgsizes"]

    def iova_allocator(self, limit: int = U64_MAX) -> IovaAllocator:
        self.allocator = IovaAllocator(self.iova_ranges(), limit)
        return self.allocator

    # --- map / unmap -----------------------------------------------------------------------
    def map(self, buffer: DmaBuffer | Buffer | int, iova: int | None = None, *, size: int | None = None,
            readable: bool = True, writeable: bool = True, unsafe_address: bool = False) -> Mapping:
        """DMA-map ``buffer`` (a DmaBuffer, mmap, bytearray, or any writable contiguous
        buffer; or a raw address with ``unsafe_address=True``) at ``iova`` (allocated when
        None). The buffer is kept alive until it is unmapped. UNSAFE: see the module doc."""
        if (type(buffer) is int and unsafe_address is True and type(iova) is int and type(size) is int
                and 0 <= buffer <= U64_MAX and 0 <= iova <= U64_MAX and 0 < size <= U64_MAX
                and not (buffer | iova | size) & _PAGE_MASK):
            return self._map_address(buffer, iova, size, readable, writeable)
        if isinstance(buffer, int):
            if not unsafe_address:
                raise UnsafeOperation(errno.EINVAL, "DMA map", f"address {buffer:#x}",
                                      "mapping a raw address needs unsafe_address=True (nothing keeps that memory alive)")
            if size is None:
                raise InvalidArgument(errno.EINVAL, "DMA map", f"address {buffer:#x}", "size is required with a raw address")
            vaddr, length, export = buffer, size, None
        else:
            vaddr, length, export = _address_of(buffer)
            if size is not None:
                check_int(size, "size", 1, U64_MAX, "DMA map", self.target)
                if size > length:
                    raise InvalidArgument(errno.EINVAL, "DMA map", f"{length}-byte buffer", f"size {size} exceeds the buffer")
                length = size
        if iova is not None:
            check_int(iova, "iova", 0, U64_MAX, "DMA map", self.target)
        check_int(length, "size", 1, U64_MAX, "DMA map", self.target)
        if vaddr % PAGE or length % PAGE or length == 0:
            raise InvalidArgument(errno.EINVAL, "DMA map", f"vaddr {vaddr:#x} size {length:#x}",
                                  f"address and size must be non-zero multiples of the page size ({PAGE})")
        if iova is None:
            iova = (self.allocator or self.iova_allocator()).alloc(length)
        elif iova % PAGE:
            raise InvalidArgument(errno.EINVAL, "DMA map", f"iova {iova:#x}", "iova must be page-aligned")
        def target() -> str:  # only formatted on failure
            return f"{self.target} iova {iova:#x} size {length:#x}"

        if self.is_iommufd:
            flags = lib.IOMMU_IOAS_MAP_FIXED_IOVA | (lib.IOMMU_IOAS_MAP_READABLE if readable else 0) \
                | (lib.IOMMU_IOAS_MAP_WRITEABLE if writeable else 0)
            call(FdKind.IOMMUFD, self.fileno(), "IOMMU_IOAS_MAP", flags=flags, ioas_id=self.ioas_id,
                 user_va=vaddr, length=length, iova=iova, target=target)
        else:
            flags = (lib.VFIO_DMA_MAP_FLAG_READ if readable else 0) | (lib.VFIO_DMA_MAP_FLAG_WRITE if writeable else 0)
            call(self.kind, self.fileno(), "VFIO_IOMMU_MAP_DMA", flags=flags, vaddr=vaddr, iova=iova, size=length,
                 target=target)
        m = Mapping(iova, length, vaddr, None if isinstance(buffer, int) else (buffer, export))
        if isinstance(buffer, DmaBuffer):
            buffer.mapped_by.add(id(self))
        self.mappings[iova] = m
        return m

    def _map_address(self, vaddr: int, iova: int, size: int, readable: bool, writeable: bool) -> Mapping:
        """map() of a checked raw address: the argument packed and the ioctl issued in one
        builtin call (the GIL released only for more than a MiB)."""
        if self.ioas_id is not None and self.mode == "iommufd":
            flags = _IOAS_MAP_FIXED | (_IOAS_MAP_R if readable else 0) | (_IOAS_MAP_W if writeable else 0)
            got = rw(self.fd._fd, _IOAS_MAP_REQ,
                     _IOAS_MAP.pack(_IOAS_MAP.size, flags, self.ioas_id, 0, vaddr, size, iova), size > _HOLD_GIL_MAX)
            operation = "IOMMU_IOAS_MAP"
        else:
            flags = (_T1_MAP_R if readable else 0) | (_T1_MAP_W if writeable else 0)
            got = rw(self.fd._fd, _T1_MAP_REQ, _T1_MAP.pack(_T1_MAP.size, flags, vaddr, iova, size),
                     size > _HOLD_GIL_MAX)
            operation = "VFIO_IOMMU_MAP_DMA"
        if not isinstance(got, bytes):
            self.fileno()  # a closed Iommu is named as every verb names it
            raise error_for(-got, operation, f"{self.target} iova {iova:#x} size {size:#x}")
        m: Mapping = _new_mapping((iova, size, vaddr, None))
        self.mappings[iova] = m
        return m

    def _many_base(self, buffer: Any, unsafe_address: bool) -> tuple[int, int, Any]:
        """(address, length, keepalive) of what map_many/map_run map pieces of."""
        if isinstance(buffer, int) and not isinstance(buffer, bool):
            if not unsafe_address:
                raise UnsafeOperation(errno.EINVAL, "DMA map", f"address {buffer:#x}",
                                      "mapping a raw address needs unsafe_address=True (nothing keeps that memory alive)")
            check_int(buffer, "address", 0, U64_MAX, "DMA map", self.target)
            return buffer, U64_MAX - buffer, None
        base, buflen, export = _address_of(buffer)
        return base, buflen, (buffer, export)

    def _map_in_c(self, base: int, buflen: int, cols: Any, n: int, readable: bool,
                  writeable: bool) -> tuple[int, int, str]:
        """Check every piece (ArgumentOutOfRange naming the first bad one, nothing mapped),
        then map them in C: (pieces mapped, errno of the one refused, the ioctl's name)."""
        bad = lib.pvl_check_pieces(base, buflen, PAGE, n, *cols)
        if bad < n:
            raise ArgumentOutOfRange(errno.EINVAL, "DMA map", self.target,
                                     f"piece {bad} (offset {cols[0][bad]:#x}, iova {cols[1][bad]:#x}, size "
                                     f"{cols[2][bad]:#x}) is empty, not {PAGE}-byte aligned or outside the "
                                     f"{buflen:#x}-byte buffer; nothing was mapped")
        err = ffi.new("int *")
        if self.is_iommufd:
            flags = lib.IOMMU_IOAS_MAP_FIXED_IOVA | (lib.IOMMU_IOAS_MAP_READABLE if readable else 0) \
                | (lib.IOMMU_IOAS_MAP_WRITEABLE if writeable else 0)
            ioas = self.ioas_id
            assert ioas is not None  # iommufd mode always has one
            done = lib.pvl_ioas_map_many(self.fileno(), ioas, flags, n, base, cols[0], cols[1], cols[2], err)
            return done, err[0], "IOMMU_IOAS_MAP"
        flags = (lib.VFIO_DMA_MAP_FLAG_READ if readable else 0) | (lib.VFIO_DMA_MAP_FLAG_WRITE if writeable else 0)
        done = lib.pvl_type1_map_many(self.fileno(), flags, n, base, cols[0], cols[1], cols[2], err)
        return done, err[0], "VFIO_IOMMU_MAP_DMA"

    def _unmap_in_c(self, n: int, iovas: Any, sizes: Any, out: Any) -> tuple[int, int, str]:
        """Unmap n ranges in C, each range's bytes into ``out``: (ranges unmapped, errno of
        the one refused, the ioctl's name)."""
        err = ffi.new("int *")
        if self.is_iommufd:
            ioas = self.ioas_id
            assert ioas is not None  # iommufd mode always has one
            done = lib.pvl_ioas_unmap_many(self.fileno(), ioas, n, iovas, sizes, out, err)
            return done, err[0], "IOMMU_IOAS_UNMAP"
        done = lib.pvl_type1_unmap_many(self.fileno(), n, iovas, sizes, out, err)
        return done, err[0], "VFIO_IOMMU_UNMAP_DMA"

    def map_many(self, buffer: Any, pieces: Any, *, readable: bool = True, writeable: bool = True,
                 unsafe_address: bool = False) -> list[Mapping]:
        """Map many pieces of one buffer in one call, the loop in C (one IOMMU_IOAS_MAP or
        VFIO_IOMMU_MAP_DMA per piece, the argument struct prepared once).

        ``pieces``: ``(offset in the buffer, iova, size)`` triples. Every piece is checked as
        :meth:`map` checks one (integers, page-aligned, non-empty, inside the buffer) before
        the first is mapped; a bad one raises ArgumentOutOfRange / BadArgumentType naming
        its index, and nothing is mapped. When the kernel refuses piece ``i`` (an overlap:
        MappingExists; no room: NoSpace...), the pieces before it stay mapped and listed,
        and the error carries ``index`` (i) and ``mappings`` (the Mappings made before it).
        Returns the Mappings, in order."""
        base, buflen, keep = self._many_base(buffer, unsafe_address)
        pieces = check_sequence(pieces, "pieces", "DMA map", self.target)
        offsets, iovas, sizes = _piece_columns(pieces, "DMA map", self.target)
        n = len(offsets)
        arrays = [_u64s(col, name, "DMA map", self.target) for col, name in
                  ((offsets, "offset"), (iovas, "iova"), (sizes, "size"))]
        done, err, operation = self._map_in_c(base, buflen, arrays, n, readable, writeable)
        # the Mappings made in C (no Python call per piece): (iova, size, base + offset, keep)
        made = list(map(_new_mapping, zip(iovas[:done], sizes[:done], map(base.__add__, offsets[:done]), repeat(keep))))
        self.mappings.update(zip(iovas[:done], made))
        if isinstance(buffer, DmaBuffer) and done:
            buffer.mapped_by.add(id(self), done)
        if done < n:
            exc = error_for(err, operation, f"{self.target} piece {done} of {n} (iova {iovas[done]:#x} size "
                                               f"{sizes[done]:#x}); pieces 0-{done - 1} are mapped" if done else
                            f"{self.target} piece 0 of {n} (iova {iovas[0]:#x} size {sizes[0]:#x}); nothing was mapped")
            exc.index, exc.mappings = done, made
            raise exc
        return made

    def unmap_many(self, ranges: Any) -> int:
        """Unmap many Mappings (or ``(iova, size)`` pairs) in one call, the loop in C.

        Checked first like :meth:`unmap` (a pair's size is required). The loop stops at the
        first range the kernel refuses or that unmapped nothing (NotFound, in every mode);
        the ranges before it are unmapped and forgotten, and the error carries ``index``.
        Bookkeeping follows what the kernel reports for each range. Returns the bytes unmapped."""
        ranges = check_sequence(ranges, "ranges", "DMA unmap", self.target)
        if all(map(isinstance, ranges, repeat(Mapping))):  # the usual case: no Python loop
            iovas, sizes = list(map(_iova_of, ranges)), list(map(_size_of, ranges))
        else:
            iovas, sizes = self._unmap_columns(ranges)
        if self.runs:
            for i, (iova, size) in enumerate(zip(iovas, sizes)):
                self._refuse_run_overlap(iova, size, f"range {i} (iova {iova:#x} size {size:#x}); nothing was unmapped")
        n = len(iovas)
        out = ffi.new("uint64_t[]", n or 1)
        done, err, operation = self._unmap_in_c(n, iovas, sizes, out)
        lengths = ffi.unpack(out, done)
        if not self._forget_many(ranges, iovas[:done], sizes[:done], lengths):
            for iova, size, got in zip(iovas, sizes, lengths):
                self._forget_done(iova, size, got)
        if done < n:
            exc = error_for(err, operation, f"{self.target} range {done} of {n} (iova {iovas[done]:#x} size "
                                            f"{sizes[done]:#x}); ranges before it are unmapped",
                            "nothing is mapped in that IOVA range" if err == errno.ENOENT else "")
            exc.index = done
            raise exc
        return sum(lengths)

    def _forget_many(self, ranges: Any, iovas: list[int], sizes: list[int], lengths: list[int]) -> bool:
        """The bookkeeping of unmap_many in the usual case, with no Python call per range:
        every range a listed Mapping, unmapped whole, all of one buffer. False (and nothing
        changed) otherwise: the caller then goes range by range."""
        if lengths != sizes:
            return False
        mappings = self.mappings
        listed: list[Any] = list(map(mappings.get, iovas))
        if not all(map(is_, listed, ranges)):
            return False
        keeps = list(map(_keep_of, listed))
        if keeps and keeps.count(keeps[0]) != len(keeps):  # several buffers: one by one
            return False
        deque(map(mappings.__delitem__, iovas), maxlen=0)  # each forgotten, no Python loop
        keep = keeps[0] if keeps else None
        if keep and isinstance(keep[0], DmaBuffer):
            keep[0].mapped_by.discard(id(self), len(keeps))
        elif keep:
            for m in listed:
                self._release(m)
        return True

    def _unmap_columns(self, ranges: Any) -> tuple[list[int], list[int]]:
        iovas, sizes = [], []
        for i, r in enumerate(ranges):
            if isinstance(r, Mapping):
                iovas.append(r.iova)
                sizes.append(r.size)
            elif isinstance(r, tuple) and len(r) == 2:
                iovas.append(check_int(r[0], f"range {i} iova", 0, U64_MAX, "DMA unmap", self.target))
                sizes.append(check_int(r[1], f"range {i} size", 1, U64_MAX, "DMA unmap", self.target))
            else:
                raise BadArgumentType(errno.EINVAL, "DMA unmap", self.target,
                                      f"range {i} is a Mapping or an (iova, size) pair, not {type(r).__name__}")
        return iovas, sizes

    def map_run(self, buffer: Any, offsets: Any, iovas: Any, sizes: Any, *, readable: bool = True,
                writeable: bool = True, unsafe_address: bool = False) -> MappingRun:
        """Map many pieces of one buffer in one call, the loop in C, and keep them as one
        :class:`MappingRun` (C arrays, no Python object per piece): the lean form of
        :meth:`map_many` for guest RAM in thousands of pieces.

        ``offsets`` (in the buffer), ``iovas`` and ``sizes``: equally long sequences of ints,
        or buffers of native uint64 such as ``array('Q')`` (copied; the run owns its arrays).
        Checked as :meth:`map_many` checks its pieces before the first is mapped. When the
        kernel refuses piece ``i``, the pieces before it stay mapped as a run (the error's
        ``run``, listed in :attr:`runs`; None when ``i`` is 0) and the error carries ``index``.
        Unmap with :meth:`unmap_run` (or :meth:`unmap_all`); :meth:`unmap` and
        :meth:`unmap_many` refuse a range that reaches into a run."""
        base, buflen, keep = self._many_base(buffer, unsafe_address)
        arrays = [_u64_copy(col, name, "DMA map", self.target)
                  for col, name in ((offsets, "offsets"), (iovas, "iovas"), (sizes, "sizes"))]
        n = arrays[0][1]
        if not arrays[1][1] == arrays[2][1] == n:
            raise InvalidArgument(errno.EINVAL, "DMA map", self.target,
                                  f"{n} offsets, {arrays[1][1]} iovas and {arrays[2][1]} sizes; nothing was mapped")
        cols = [a for a, _n in arrays]
        done, err, operation = self._map_in_c(base, buflen, cols, n, readable, writeable)
        run = MappingRun(self, base, keep, cols, done)
        if done:
            self.runs.append(run)
            if isinstance(buffer, DmaBuffer):
                buffer.mapped_by.add(id(self))
        if done < n:
            exc = error_for(err, operation, f"{self.target} piece {done} of {n} (iova {cols[1][done]:#x} size "
                                               f"{cols[2][done]:#x}); "
                                               + (f"pieces 0-{done - 1} are mapped, as the error's run" if done
                                                  else "nothing was mapped"))
            exc.index, exc.run = done, run if done else None
            raise exc
        return run

    def unmap_run(self, run: MappingRun) -> int:
        """Unmap every piece of ``run`` (the loop in C); returns the bytes unmapped. When the
        kernel refuses piece ``i`` (or unmaps nothing there), the pieces before it are
        unmapped and dropped from the run, which stays listed with the rest; the error
        carries ``index``."""
        if not isinstance(run, MappingRun) or not any(r is run for r in self.runs):
            raise InvalidArgument(errno.EINVAL, "DMA unmap", self.target,
                                  f"{run!r} is not a mapping run of this Iommu (or is unmapped already)")
        n = len(run)
        out = ffi.new("uint64_t[]", n or 1)
        done, err, operation = self._unmap_in_c(n, run._iovas, run._sizes, out)
        total = _speedups.sum_u64(_address(out), done)  # no Python int per piece
        if done == n:
            run._n = 0
            self._drop_run(run)
            return total
        first = (run.iovas[done], run.sizes[done])
        run._drop_first(done)
        exc = error_for(err, operation, f"{self.target} run piece {done} of {n} (iova {first[0]:#x} size "
                                        f"{first[1]:#x}); the pieces before it are unmapped",
                        "nothing is mapped in that IOVA range" if err == errno.ENOENT else "")
        exc.index = done
        raise exc

    def _drop_run(self, run: MappingRun) -> None:
        self.runs = [r for r in self.runs if r is not run]
        keep = run.keepalive
        if keep and isinstance(keep[0], DmaBuffer):
            keep[0].mapped_by.discard(id(self))

    def _refuse_run_overlap(self, iova: int, size: int, what: str) -> None:
        """InvalidArgument when [iova, iova + size) reaches into a piece of a mapping run:
        unmapping it piecemeal would leave the run's bookkeeping wrong."""
        for run in self.runs:
            i = _speedups.first_overlap(_address(run._iovas), _address(run._sizes), len(run), iova, size)
            if i >= 0:
                raise InvalidArgument(errno.EINVAL, "DMA unmap", f"{self.target} {what}",
                                      f"it reaches into piece {i} of a mapping run; unmap the run (unmap_run)")

    def map_file(self, file: FileLike, iova: int | None = None, *, offset: int = 0, size: int,
                 readable: bool = True, writeable: bool = True) -> Mapping:
        """IOMMU_IOAS_MAP_FILE: map ``size`` bytes of a memfd at ``offset`` (iommufd mode only).
        The mapping pins the file's pages; it does not depend on any process address."""
        self._need_iommufd("IOMMU_IOAS_MAP_FILE")
        fileno_of(file)
        check_int(size, "size", 1, U64_MAX, "IOMMU_IOAS_MAP_FILE", self.target)
        check_int(offset, "offset", 0, U64_MAX, "IOMMU_IOAS_MAP_FILE", self.target)
        if iova is not None:
            check_int(iova, "iova", 0, U64_MAX, "IOMMU_IOAS_MAP_FILE", self.target)
        else:
            iova = (self.allocator or self.iova_allocator()).alloc(size)
        flags = lib.IOMMU_IOAS_MAP_FIXED_IOVA | (lib.IOMMU_IOAS_MAP_READABLE if readable else 0) \
            | (lib.IOMMU_IOAS_MAP_WRITEABLE if writeable else 0)
        call(FdKind.IOMMUFD, self.fileno(), "IOMMU_IOAS_MAP_FILE", flags=flags, ioas_id=self.ioas_id,
             fd=fileno_of(file), start=offset, length=size, iova=iova,
             target=f"{self.target} iova {iova:#x} size {size:#x}")
        st = os.fstat(fileno_of(file))
        inode = (st.st_dev, st.st_ino)
        m = Mapping(iova, size, None, (_FILE, inode, offset))
        self.mappings[iova] = m
        _FILE_MAPS.setdefault(inode, {})[(id(self), iova)] = (iova, size, offset)
        return m

    def unmap(self, mapping: Mapping | int, size: int | None = None) -> int:
        """Unmap a Mapping (or ``iova``, ``size``); returns the bytes unmapped."""
        if type(mapping) is Mapping and size is None and self.mappings.get(mapping[0]) is mapping:
            return self._unmap_listed(mapping)
        if isinstance(mapping, Mapping):
            iova, size = mapping.iova, mapping.size
        else:
            iova = check_int(mapping, "iova", 0, U64_MAX, "DMA unmap", self.target)
            if size is not None:
                check_int(size, "size", 1, U64_MAX, "DMA unmap", self.target)
            else:
                known = self.mappings.get(iova)
                if known is None:
                    raise InvalidArgument(errno.EINVAL, "DMA unmap", f"iova {iova:#x}", "size is required")
                size = known.size
        if self.runs:
            self._refuse_run_overlap(iova, size, f"iova {iova:#x} size {size:#x}")

        def target() -> str:
            return f"{self.target} iova {iova:#x} size {size:#x}"

        done: int
        if self.is_iommufd:
            done = call(FdKind.IOMMUFD, self.fileno(), "IOMMU_IOAS_UNMAP", ioas_id=self.ioas_id, iova=iova,
                        length=size, target=target).length
        else:
            done = call(self.kind, self.fileno(), "VFIO_IOMMU_UNMAP_DMA", iova=iova, size=size, target=target).size
        if done == 0:  # type1 answers 0 bytes for a range with nothing mapped; iommufd says ENOENT
            raise NotFound(errno.ENOENT, "DMA unmap", target(), "nothing is mapped in that IOVA range")
        self._forget_done(iova, size, done)
        return done

    def _unmap_listed(self, mapping: Mapping) -> int:
        """unmap() of a Mapping made here: the argument packed and the ioctl issued in one
        builtin call (the GIL released only for more than a MiB)."""
        iova, size = mapping[0], mapping[1]
        if self.ioas_id is not None and self.mode == "iommufd":
            got = rw(self.fd._fd, _IOAS_UNMAP_REQ, _IOAS_UNMAP.pack(_IOAS_UNMAP.size, self.ioas_id, iova, size),
                     size > _HOLD_GIL_MAX)
            operation, done = "IOMMU_IOAS_UNMAP", _IOAS_UNMAP.unpack(got)[3] if type(got) is bytes else 0
        else:
            got = rw(self.fd._fd, _T1_UNMAP_REQ, _T1_UNMAP.pack(_T1_UNMAP.size, 0, iova, size), size > _HOLD_GIL_MAX)
            operation, done = "VFIO_IOMMU_UNMAP_DMA", _T1_UNMAP.unpack(got)[3] if type(got) is bytes else 0
        if not isinstance(got, bytes):
            self.fileno()  # a closed Iommu is named as every verb names it
            raise error_for(-got, operation, f"{self.target} iova {iova:#x} size {size:#x}")
        if done == 0:  # type1 answers 0 bytes for a range with nothing mapped; iommufd says ENOENT
            raise NotFound(errno.ENOENT, "DMA unmap", f"{self.target} iova {iova:#x} size {size:#x}",
                           "nothing is mapped in that IOVA range")
        self._forget_done(iova, size, done)
        return int(done)

    def _forget_done(self, iova: int, size: int, done: int) -> None:
        """Bookkeeping after an unmap, following what the kernel did (``done`` bytes):

        - type1 v2 and iommufd refuse a request that cuts a mapping, so whole mappings went;
        - type1 v1 unmaps whole every mapping whose first IOVA the request covers (the total
          is then their size);
        - iommufd's type1 v1 compatibility cuts mappings to exactly the request (the total is
          then the requested size): the parts outside it stay mapped, and stay listed.
        When the total fits neither, every overlapping mapping is kept listed (so no buffer
        can be freed while the device may still reach it) and a warning is logged.
        """
        m = self.mappings.get(iova)
        if m is not None and m.size == size == done:  # the usual case
            del self.mappings[iova]
            self._release(m)
            return
        end = iova + size - 1
        starting = [s for s in self.mappings if iova <= s <= end]
        overlapping = [s for s, mp in self.mappings.items() if s <= end and s + mp.size - 1 >= iova]
        whole = sum(self.mappings[s].size for s in starting)
        cuts = set(overlapping) != set(starting) or any(s + self.mappings[s].size - 1 > end for s in starting)
        if cuts and done == size:  # cut to exactly the request
            for s0 in overlapping:
                self._cut(self.mappings.pop(s0), iova, end)
        elif done == whole:  # whole mappings went
            for s0 in starting:
                self._release(self.mappings.pop(s0))
        else:
            import logging

            logging.getLogger(__name__).warning(
                "%s: the kernel unmapped %#x bytes for [%#x, %#x]; keeping every overlapping mapping listed",
                self.target, done, iova, end)

    def _cut(self, m: Mapping, lo: int, hi: int) -> None:
        """Re-list what is left of ``m`` once [lo, hi] is unmapped from it (0, 1 or 2 parts)."""
        parts = []
        if m.iova < lo:
            parts.append((m.iova, lo - m.iova))
        if m.iova + m.size - 1 > hi:
            parts.append((hi + 1, m.iova + m.size - 1 - hi))
        keep = m.keepalive
        file_entry = keep is not None and keep[0] is _FILE
        if file_entry:
            maps = _FILE_MAPS.get(keep[1], {})
            maps.pop((id(self), m.iova), None)
        for start, length in parts:
            delta = start - m.iova
            vaddr = None if m.vaddr is None else m.vaddr + delta
            k = (_FILE, keep[1], keep[2] + delta) if file_entry else keep
            self.mappings[start] = Mapping(start, length, vaddr, k)
            if file_entry:
                _FILE_MAPS.setdefault(keep[1], {})[(id(self), start)] = (start, length, keep[2] + delta)
        if not parts:
            self._release(m)
        elif file_entry and not _FILE_MAPS.get(keep[1]):
            _FILE_MAPS.pop(keep[1], None)

    def unmap_all(self) -> int:
        """Unmap everything; returns the bytes unmapped."""
        done: int
        if self.is_iommufd:
            try:
                done = call(FdKind.IOMMUFD, self.fileno(), "IOMMU_IOAS_UNMAP", ioas_id=self.ioas_id, iova=0,
                            length=U64_MAX, target=self.target).length
            except NotFound:
                done = 0
        elif not self._iommu_set:
            done = 0
        else:
            done = call(self.kind, self.fileno(), "VFIO_IOMMU_UNMAP_DMA", flags=lib.VFIO_DMA_UNMAP_FLAG_ALL,
                        target=self.target).size
        self._forget(0, U64_MAX)
        for run in self.runs:
            run._n = 0
            self._drop_run(run)
        return done

    def _forget(self, iova: int, size: int) -> None:
        m = self.mappings.get(iova)
        if m is not None and m.size == size:  # the usual case: one mapping, found by its IOVA
            del self.mappings[iova]
            self._release(m)
            return
        for start in [s for s in self.mappings if iova <= s and s + self.mappings[s].size - 1 <= iova + size - 1]:
            self._release(self.mappings.pop(start))

    def _release(self, m: Mapping) -> None:
        keep = m.keepalive
        if not keep:
            return
        if isinstance(keep[0], DmaBuffer):
            keep[0].mapped_by.discard(id(self))
        elif keep[0] is _FILE:
            maps = _FILE_MAPS.get(keep[1])
            if maps is not None:
                maps.pop((id(self), m.iova), None)
                if not maps:
                    del _FILE_MAPS[keep[1]]

    # --- lifetime --------------------------------------------------------------------------
    def close(self) -> None:
        """Unmap everything mapped through this object, destroy an IOAS it allocated, close the fd."""
        if self.fd.closed:
            return
        try:
            if self.mappings or self.runs:
                self.unmap_all()
            if self.is_iommufd and self._owns_ioas and self.ioas_id is not None:
                try:
                    self.destroy(self.ioas_id)
                except PyvfioError:
                    pass  # still attached to a device: it goes with the fd
        finally:
            self.fd.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<Iommu {self.target} mappings={len(self.mappings)}>"


_MISSING = {
    "/dev/iommu": "this kernel has no iommufd (CONFIG_IOMMUFD=y, or load the iommufd module); "
                  "the legacy modes vfio_type1_iommu / vfio_type1v2_iommu use /dev/vfio/vfio instead",
    "/dev/vfio/vfio": "this kernel has no VFIO container (CONFIG_VFIO_CONTAINER=y, or load the vfio module); "
                      "the iommufd modes use /dev/iommu instead",
}


def _iova_ranges_of(arg: Any, first: int) -> list[IovaRange]:
    """The IOVA ranges of a VFIO_IOMMU_GET_INFO answer's capability chain (bounds-checked)."""
    from .caps import cap_fits, cap_items, walk_caps_sized

    ranges: list[IovaRange] = []
    for cap_id, _version, ptr, room in walk_caps_sized(arg, first):
        if cap_id == lib.VFIO_IOMMU_TYPE1_INFO_CAP_IOVA_RANGE:
            cap_fits(room, "vfio_iommu_type1_info_cap_iova_range")
            cap = ffi.cast("struct vfio_iommu_type1_info_cap_iova_range *", ptr)
            n = cap_items(room, "vfio_iommu_type1_info_cap_iova_range", cap.nr_iovas, "vfio_iova_range")
            ranges += [IovaRange(cap.iova_ranges[i].start, cap.iova_ranges[i].end) for i in range(n)]
    return ranges


_FILE = "file"  # Mapping.keepalive[0] of a file mapping: (_FILE, (st_dev, st_ino), offset)
# (st_dev, st_ino) of a mapped file -> {(id(Iommu), iova): (iova, size, offset)}, for the ledger
_FILE_MAPS: dict[tuple[int, int], dict[tuple[int, int], tuple[int, int, int]]] = {}


def file_mappings(inode: tuple[int, int]) -> list[list[int]]:
    """[iova, size, file offset] of every live IOMMU_IOAS_MAP_FILE mapping of the file with
    this (st_dev, st_ino), through any Iommu of this process, sorted by IOVA."""
    return sorted([list(v) for v in _FILE_MAPS.get(tuple(inode), {}).values()])  # type: ignore[arg-type]


def _open(path: str) -> int:
    try:
        return os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except OSError as exc:
        reason = _MISSING.get(path, "") if exc.errno == errno.ENOENT else ""
        raise error_for(exc.errno or 0, f"open {path}", path, reason) from None
