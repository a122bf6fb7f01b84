"""Explicit ownership of one file descriptor.

An :class:`OwnedFd` closes its fd exactly once: on ``close()``, on leaving a ``with``
block, or (with a ``ResourceWarning``, like Python's own files) when garbage collected.
``detach()`` hands the fd to the caller and gives up ownership. Objects built from a
caller's fd with ``owned=False`` never close it.
"""

from __future__ import annotations

import os
import warnings

from .errors import ArgumentOutOfRange, BadArgumentType

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (type checkers treat it as True)

if TYPE_CHECKING:  # typing's runtime objects cost import time; annotations need none of them
    from typing import Protocol

    from typing_extensions import Self  # typing.Self from 3.11; type checkers ship this stub

    class HasFileno(Protocol):
        def fileno(self) -> int: ...

    FileLike = int | HasFileno
else:
    FileLike = HasFileno = object  # only used in (unevaluated) annotations


def fileno_of(file: FileLike) -> int:
    """The fd number of an int or of any object with ``fileno()``; TypeError otherwise."""
    if isinstance(file, bool):
        raise BadArgumentType(22, "fileno", "bool", "expected a file descriptor or an object with fileno(), got a bool")
    if isinstance(file, int):
        fd = file
    elif hasattr(file, "fileno"):
        fd = file.fileno()
    else:
        raise BadArgumentType(22, "fileno", type(file).__name__,
                              f"expected a file descriptor or an object with fileno(), got {type(file).__name__}")
    if not isinstance(fd, int) or isinstance(fd, bool):
        raise BadArgumentType(22, "fileno", repr(fd)[:40], f"fileno() returned {type(fd).__name__}, not an int")
    if not 0 <= fd < 2**31:
        raise ArgumentOutOfRange(22, "fileno", repr(fd), f"invalid file descriptor {fd!r}")
    return fd


class OwnedFd:
    """One fd and the duty to close it."""

    __slots__ = ("_fd", "_owned", "what", "__weakref__")

    def __init__(self, fd: int, what: str = "", owned: bool = True):
        if type(fd) is not int or not 0 <= fd < 2**31:  # type() also refuses bool
            self._fd = -1
            fileno_of(fd)  # raises the named error
            raise AssertionError("unreachable")
        self._fd = fd
        self._owned = owned
        self.what = what or f"fd {fd}"

    @property
    def closed(self) -> bool:
        return self._fd < 0

    def fileno(self) -> int:
        if self._fd < 0:
            raise ValueError(f"I/O operation on closed {self.what}")
        return self._fd

    def detach(self) -> int:
        """Give the fd to the caller; this object no longer closes it."""
        fd = self.fileno()
        self._fd = -1
        return fd

    def close(self) -> None:
        fd, self._fd = self._fd, -1
        if fd >= 0 and self._owned:
            os.close(fd)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        if getattr(self, "_fd", -1) >= 0 and self._owned:
            warnings.warn(f"unclosed {self.what} (fd {self._fd})", ResourceWarning, stacklevel=2)
            self.close()

    def __repr__(self) -> str:
        state = "closed" if self._fd < 0 else f"fd={self._fd}"
        return f"<{type(self).__name__} {self.what} {state}{'' if self._owned else ' borrowed'}>"


def open_cloexec(path: str, flags: int = os.O_RDWR) -> int:
    """``os.open`` with ``O_CLOEXEC`` always added."""
    return os.open(path, flags | os.O_CLOEXEC)
