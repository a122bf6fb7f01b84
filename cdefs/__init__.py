"""C declarations of the kernel uAPI pyvfio-lu uses, one module per kernel header.

Each module holds ``HEADER``: our own C text for the part of the header we use, written
from the uAPI facts with the kernel's names for structs, fields and constants. It is
compiled as-is into the extension, and ``build.py`` derives the cffi ``cdef`` from it by
replacing every ``#define NAME value`` with ``#define NAME ...``, so every number the
Python side sees (ioctl numbers included) is computed by the C compiler. The ABI test
(tests/unit/test_abi_conformance.py) checks all of it against the kernel's own headers.

The text does not include any kernel header, so the build does not depend on the
machine's linux-libc-dev (Debian bookworm's is 6.1: no liveupdate.h).
"""
