"""VFIO capability chains (vfio.h: ``struct vfio_info_cap_header``; offsets relative to the
start of the info buffer, ``next == 0`` ends the chain)."""

from __future__ import annotations

import errno
TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (type checkers treat it as True)

if TYPE_CHECKING:
    from typing import Any, Iterator

from ._cffi import ffi
from .errors import PyvfioError

HEADER = ffi.sizeof("struct vfio_info_cap_header")


def walk_caps(info: Any, first: int) -> Iterator[tuple[int, int, Any]]:
    """(id, version, pointer to the capability) for each capability of an info struct whose
    ``argsz`` covers the chain; guarded against loops and offsets outside the buffer."""
    base = ffi.cast("char *", info)
    size = info.argsz
    offset, seen = first, set()
    while offset:
        if offset in seen or offset < 0 or offset + HEADER > size:
            raise PyvfioError(errno.EPROTO, "walk VFIO capability chain", f"offset {offset}",
                              f"capability chain is malformed (offset {offset}, buffer {size} bytes)")
        seen.add(offset)
        hdr = ffi.cast("struct vfio_info_cap_header *", base + offset)
        yield hdr.id, hdr.version, base + offset
        offset = hdr.next
