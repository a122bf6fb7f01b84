"""memfds for live update: create with contents, seal before preserving, verify after.

What a preserved memfd carries across a kexec (kernel-contract.md §1.5): its contents
(holes become zero-filled pages), its size, its file position (as of the kexec) and its
seals *as of the preserve*. Not carried: the name, FD_CLOEXEC. After ``preserve`` the
size is frozen: :meth:`Memfd.resize` and writes past the end raise :class:`MemfdFrozen`.
"""

from __future__ import annotations

import errno
import fcntl
import os

from . import _speedups
from ._record import record
from .errors import (
    ArgumentOutOfRange,
    BadArgumentType,
    PermissionDenied,
    PyvfioError,
    check_bytes,
    check_int,
    check_sequence,
    error_for,
)
from .fd import OwnedFd, fileno_of

OFF_MAX = 2**63 - 1  # off_t

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (type checkers treat it as True)

if TYPE_CHECKING:
    from collections.abc import Sequence
    from typing import Any

    from .fd import FileLike

SEALS = {
    "seal": fcntl.F_SEAL_SEAL,
    "shrink": fcntl.F_SEAL_SHRINK,
    "grow": fcntl.F_SEAL_GROW,
    "write": fcntl.F_SEAL_WRITE,
    "future_write": getattr(fcntl, "F_SEAL_FUTURE_WRITE", 0x0010),
}


def _check_name(name: object) -> None:
    if not isinstance(name, str) or "\0" in name or len(name.encode(errors="surrogateescape")) > 249:
        raise BadArgumentType(errno.EINVAL, "memfd_create", repr(name)[:80],
                              "a memfd name is a str of at most 249 bytes with no NUL")


def _bytes_of(data: object, index: int, operation: str, target: str) -> bytes:
    """Item ``index`` of a batch as bytes (copied from a bytearray or memoryview)."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise BadArgumentType(errno.EINVAL, operation, target, f"item {index} must be bytes, not {type(data).__name__}")
    return bytes(data)


class ContentMismatch(PyvfioError, ValueError):
    """A retrieved memfd does not hold what was expected."""


if TYPE_CHECKING:  # the fields, typed (typing.NamedTuple would cost typing's import at run time)
    from typing import NamedTuple

    class _MemfdStateFields(NamedTuple):
        size: int
        position: int
        seals: int
        sha256: str
else:
    _MemfdStateFields = record("MemfdState", "size position seals sha256", module=__name__)


class MemfdState(_MemfdStateFields):
    """What :meth:`Memfd.state` captures: size, file position, seals and the SHA-256 of the
    contents (a record, a named tuple: ``dataclasses`` would cost the import several milliseconds)."""

    __slots__ = ()

    def to_json(self) -> dict[str, Any]:
        return {"size": self.size, "position": self.position, "seals": self.seals, "sha256": self.sha256}


class Memfd(OwnedFd):
    """An owned memfd (created here, or retrieved from a session)."""

    __slots__ = ("_name",)  # the name it was created with (unset when adopted: asked of the kernel)
    _name: str

    @classmethod
    def create(cls, name: str = "pyvfio-lu", data: bytes | bytearray | memoryview = b"", size: int | None = None,
               sealing: bool = True) -> Memfd:
        """A new memfd (``MFD_CLOEXEC``, ``MFD_ALLOW_SEALING``) holding ``data``, ``size`` bytes long.

        Wrong types and sizes are BadArgumentType / ArgumentOutOfRange, before anything is created."""
        _check_name(name)
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise BadArgumentType(errno.EINVAL, "memfd_create", repr(name),
                                  f"data must be bytes, not {type(data).__name__}")
        if size is not None:
            check_int(size, "size", 0, 2**63 - 1, "memfd_create", repr(name))
        flags = os.MFD_CLOEXEC | (os.MFD_ALLOW_SEALING if sealing else 0)
        try:
            fd = os.memfd_create(name, flags)
        except OSError as exc:
            raise error_for(exc.errno or 0, "memfd_create", repr(name)) from None
        self = cls(fd, f"memfd {name!r}")
        self._name = name
        try:
            if size is not None:
                try:
                    os.ftruncate(fd, size)
                except OSError as exc:
                    raise error_for(exc.errno or 0, "ftruncate", self.what, f"cannot size it to {size} bytes") from None
            if data:
                self.pwrite_all(data, 0)
        except BaseException:
            self.close()
            raise
        return self

    @classmethod
    def create_many(cls, contents: Sequence[bytes | bytearray | memoryview], *, name: str = "pyvfio-lu",
                    size: int | None = None, sealing: bool = True) -> list[Memfd]:
        """One memfd per item of ``contents``, each made as :meth:`create` makes one (``name``,
        ``size`` and ``sealing`` shared by all), the loop in C: one call for the lot.

        Everything is checked first (BadArgumentType naming the item). When the kernel
        refuses item ``i`` (EMFILE, ENOSPC...), every memfd this call made is closed again
        and the error, the one :meth:`create` would raise, carries ``index`` (i): nothing
        is left behind."""
        _check_name(name)
        items = check_sequence(contents, "contents", "memfd_create", repr(name))
        datas = [d if type(d) is bytes else _bytes_of(d, i, "memfd_create", repr(name)) for i, d in enumerate(items)]
        if size is not None:
            check_int(size, "size", 0, 2**63 - 1, "memfd_create", repr(name))
        flags = os.MFD_CLOEXEC | (os.MFD_ALLOW_SEALING if sealing else 0)
        got = _speedups.memfd_create_many(os.fsencode(name), flags, -1 if size is None else size, datas)
        if type(got) is tuple:
            err, i, step = got
            where = f"memfd {name!r} (item {i} of {len(datas)}; none of them was kept)"
            exc = error_for(-err, ("memfd_create", "ftruncate", "write")[step], where,
                            f"cannot size it to {size} bytes" if step == 1 else "")
            exc.index = i
            raise exc
        what, made = f"memfd {name!r}", []
        try:
            for fd in got:
                m = cls(fd, what)
                m._name = name
                made.append(m)
        except BaseException:  # no memfd of this call outlives it
            for m in made:
                m.close()
            for fd in got[len(made):]:
                os.close(fd)
            raise
        return made

    @staticmethod
    def verify_many(files: Sequence[FileLike], expected: Sequence[bytes | bytearray | memoryview]) -> None:
        """ContentMismatch unless every one of ``files`` (memfds, the OwnedFds that
        ``Session.retrieve_many`` returns, or fds) holds exactly the bytes at the same index
        of ``expected``: the reads and comparisons in C, one call. The error is the one
        :meth:`verify` raises for the first file that differs, with ``index`` set."""
        files = check_sequence(files, "files", "verify")
        want = check_sequence(expected, "expected", "verify")
        if len(files) != len(want):
            raise BadArgumentType(errno.EINVAL, "verify", f"{len(files)} files",
                                  f"expected holds {len(want)} contents, one per file is needed")
        fds = [fileno_of(f) for f in files]
        want = [w if type(w) is bytes else _bytes_of(w, i, "verify", "expected") for i, w in enumerate(want)]
        i = _speedups.first_mismatch(fds, want)
        if i < 0:
            return
        what = getattr(files[i], "what", None)
        borrowed = Memfd(fds[i], what if isinstance(what, str) else f"file {i}", owned=False)
        try:
            borrowed.verify(want[i])
            exc: PyvfioError = ContentMismatch(errno.EIO, "verify", borrowed.what,
                                               "contents differed, then matched (changed meanwhile)")
        except PyvfioError as raised:
            exc = raised
        exc.index = i
        raise exc

    def ledger_record(self) -> dict[str, Any]:
        """What the live-update ledger says of this memfd: its name, size and inode (the
        IOVAs it is mapped at are looked up by inode when the ledger is written)."""
        st = os.fstat(self._fd if self._fd >= 0 else self.fileno())  # fileno() names a closed memfd
        name: str | None = getattr(self, "_name", None)
        if name is None:  # adopted: the kernel knows the name it was created with
            try:
                link = os.readlink(f"/proc/self/fd/{self.fileno()}")
            except OSError:
                link = ""
            name = link[len("/memfd:"):].removesuffix(" (deleted)") if link.startswith("/memfd:") else self.what
        return {"kind": "memfd", "name": name, "size": st.st_size, "inode": [st.st_dev, st.st_ino]}

    @classmethod
    def adopt(cls, owned: OwnedFd) -> Memfd:
        """Take over the fd of an OwnedFd (e.g. from ``Session.retrieve``)."""
        what = owned.what
        return cls(owned.detach(), what)

    # --- contents ------------------------------------------------------------------------
    def pwrite_all(self, data: bytes | bytearray | memoryview, offset: int) -> None:
        """Write all of ``data`` (bytes-like) at ``offset``."""
        if type(data) is bytes and type(offset) is int and 0 <= offset <= OFF_MAX - len(data):
            try:  # the usual case: one write takes it all
                if os.pwrite(self._fd, data, offset) == len(data):
                    return
            except OSError as exc:
                self.fileno()  # a closed memfd is named as every verb names it
                raise error_for(exc.errno or 0, "write", self.what) from None
        check_bytes(data, "data", "write", self.what)
        check_int(offset, "offset", 0, OFF_MAX, "write", self.what)
        view = memoryview(data).cast("B")
        while view:
            try:
                n = os.pwrite(self.fileno(), view, offset)
            except OSError as exc:
                raise error_for(exc.errno or 0, "write", self.what) from None
            view, offset = view[n:], offset + n

    def read_all(self) -> bytes:
        size = self.size
        chunks, offset = [], 0
        while offset < size:
            chunk = os.pread(self.fileno(), min(size - offset, 1 << 24), offset)
            if not chunk:
                break
            chunks.append(chunk)
            offset += len(chunk)
        return b"".join(chunks)

    @property
    def size(self) -> int:
        return os.fstat(self.fileno()).st_size

    @property
    def position(self) -> int:
        return os.lseek(self.fileno(), 0, os.SEEK_CUR)

    def seek(self, position: int) -> None:
        check_int(position, "position", 0, OFF_MAX, "lseek", self.what)
        os.lseek(self.fileno(), position, os.SEEK_SET)

    def resize(self, size: int) -> None:
        """ftruncate; MemfdFrozen while the memfd is preserved."""
        check_int(size, "size", 0, OFF_MAX, "ftruncate", self.what)
        try:
            os.ftruncate(self.fileno(), size)
        except OSError as exc:
            sealed = exc.errno == errno.EPERM and self.seals & (SEALS["grow"] | SEALS["shrink"])
            if sealed:
                raise PermissionDenied(exc.errno, "ftruncate", self.what,
                                       "the memfd is sealed against resizing (F_SEAL_GROW/F_SEAL_SHRINK)") from None
            raise error_for(exc.errno or 0, "ftruncate", self.what) from None

    # --- seals ---------------------------------------------------------------------------
    @property
    def seals(self) -> int:
        return fcntl.fcntl(self.fileno(), fcntl.F_GET_SEALS)

    def seal(self, *names: str) -> None:
        """Add seals by name (``seal``, ``shrink``, ``grow``, ``write``, ``future_write``).

        Seal *before* preserving: seals added afterwards are not carried across the kexec.
        """
        bits = 0
        for name in names:
            if not isinstance(name, str) or name not in SEALS:
                raise ArgumentOutOfRange(errno.EINVAL, "F_ADD_SEALS", self.what,
                                         f"unknown seal {name!r}; known: {', '.join(SEALS)}")
            bits |= SEALS[name]
        try:
            fcntl.fcntl(self.fileno(), fcntl.F_ADD_SEALS, bits)
        except OSError as exc:
            raise error_for(exc.errno or 0, "F_ADD_SEALS", self.what) from None

    # --- verification --------------------------------------------------------------------
    def state(self) -> MemfdState:
        import hashlib  # only here: it costs the import a few milliseconds

        return MemfdState(self.size, self.position, self.seals, hashlib.sha256(self.read_all()).hexdigest())

    def verify(self, expected: MemfdState | dict[str, Any] | bytes | bytearray | memoryview) -> None:
        """ContentMismatch unless this memfd matches ``expected`` (a state, its JSON, or bytes)."""
        if type(expected) is bytes:  # the usual case: one read of one byte more than expected
            try:
                if os.pread(self._fd, len(expected) + 1, 0) == expected:
                    return
            except OSError:
                pass  # named below, by the general path
        if isinstance(expected, (bytes, bytearray, memoryview)):
            got = self.read_all()
            if got != bytes(expected):
                raise ContentMismatch(errno.EIO, "verify", self.what,
                                      f"contents differ: {len(got)} bytes, expected {len(expected)}")
            return
        if isinstance(expected, dict):
            try:
                expected = MemfdState(**expected)
            except TypeError as exc:
                raise BadArgumentType(errno.EINVAL, "verify", self.what,
                                      f"a state dict has exactly size, position, seals, sha256 ({exc})") from None
        if not isinstance(expected, MemfdState):
            raise BadArgumentType(errno.EINVAL, "verify", self.what,
                                  f"expected a MemfdState, its dict or bytes, not {type(expected).__name__}")
        got_state = self.state()
        diffs = [f"{field}: {getattr(got_state, field)!r} != expected {getattr(expected, field)!r}"
                 for field in ("size", "position", "seals", "sha256")
                 if getattr(got_state, field) != getattr(expected, field)]
        if diffs:
            raise ContentMismatch(errno.EIO, "verify", self.what, "; ".join(diffs))
