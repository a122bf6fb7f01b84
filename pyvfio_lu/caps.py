"""VFIO capability chains (vfio.h: ``struct vfio_info_cap_header``; offsets relative to the
start of the info buffer, ``next == 0`` ends the chain)."""

from __future__ import annotations

import errno

from ._cffi import ffi
from .errors import PyvfioError

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (type checkers treat it as True)

if TYPE_CHECKING:
    from collections.abc import Iterator
    from typing import Any

HEADER = ffi.sizeof("struct vfio_info_cap_header")


def walk_caps(info: Any, first: int) -> Iterator[tuple[int, int, Any]]:
    """(id, version, pointer to the capability) for each capability of an info struct whose
    ``argsz`` covers the chain; guarded against loops and offsets outside the buffer."""
    for cid, version, ptr, _room in walk_caps_sized(info, first):
        yield cid, version, ptr


def walk_caps_sized(info: Any, first: int) -> Iterator[tuple[int, int, Any, int]]:
    """:func:`walk_caps` with the bytes from each capability to the end of the buffer, so a
    decoder can check that what the capability claims to hold fits (see :func:`cap_items`)."""
    base = ffi.cast("char *", info)
    size = info.argsz
    offset, seen = first, set()
    while offset:
        if offset in seen or offset < 0 or offset + HEADER > size:
            raise PyvfioError(errno.EPROTO, "walk VFIO capability chain", f"offset {offset}",
                              f"capability chain is malformed (offset {offset}, buffer {size} bytes)")
        seen.add(offset)
        hdr = ffi.cast("struct vfio_info_cap_header *", base + offset)
        yield hdr.id, hdr.version, base + offset, size - offset
        offset = hdr.next


def cap_items(room: int, struct: str, count: int, item: str) -> int:
    """``count`` if ``struct`` followed by ``count`` ``item``s fits in ``room`` bytes, else a
    PyvfioError (EPROTO): a capability that claims more than its buffer holds is malformed."""
    need = ffi.sizeof(f"struct {struct}") + count * ffi.sizeof(f"struct {item}")
    if need > room:
        raise PyvfioError(errno.EPROTO, "decode VFIO capability", f"struct {struct}",
                          f"claims {count} entries ({need} bytes) but only {room} bytes are left in the buffer")
    return count


def cap_fits(room: int, struct: str) -> None:
    cap_items(room, struct, 0, "vfio_info_cap_header")
