"""Every failure pyvfio_lu reports: one base class, a named subclass per documented meaning.

All of them subclass ``OSError`` (so ``e.errno`` works and ``except OSError`` still
catches them), and where a builtin subclass fits (``FileExistsError`` for a taken session
name, ``FileNotFoundError`` for an unknown token, ...) they subclass that too. Each
message names the operation, the object it was done to and the errno's symbolic name::

    LIVEUPDATE_IOCTL_CREATE_SESSION on /dev/liveupdate (session 'vm-1'):
    a session with this name already exists [EEXIST]
"""

from __future__ import annotations

import errno as _errno
import os

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (type checkers treat it as True)

if TYPE_CHECKING:
    from collections.abc import Iterable
    from typing import Any


class PyvfioError(OSError):
    """Base class of every error raised by pyvfio_lu.

    Attributes: ``errno`` (int or None), ``operation`` (the ioctl or call that failed),
    ``target`` (what it was done to: a path, BDF, session name or token), ``reason``.
    """

    default_reason = ""
    #: set by the batch verbs (map_many, unmap_many, preserve_many, retrieve_many): the index
    #: of the element that failed; those before it were done
    index: int | None = None
    #: map_many: the Mappings made before the failing piece (they stay mapped and listed)
    mappings: list[Any] | None = None
    #: map_run: the MappingRun of the pieces mapped before the failing one (listed in Iommu.runs)
    run: Any = None

    def __init__(self, err: int | None, operation: str, target: str = "", reason: str = ""):
        self.operation = operation
        self.target = target
        self.reason = reason or self.default_reason or (os.strerror(err) if err else "failed")
        super().__init__(err, self.reason)
        # OSError's own constructor may turn (errno, msg) into other attributes; pin ours.
        self.errno = err
        self.strerror = self.reason

    @property
    def errno_name(self) -> str:
        return _errno.errorcode.get(self.errno, str(self.errno)) if self.errno else "no errno"

    def __str__(self) -> str:
        where = f" on {self.target}" if self.target else ""
        return f"{self.operation}{where}: {self.reason} [{self.errno_name}]"

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild, (type(self), self.errno, self.operation, self.target, self.reason))


def _rebuild(cls: type[PyvfioError], err: int | None, operation: str, target: str, reason: str) -> PyvfioError:
    return cls(err, operation, target, reason)


# --- generic meanings, by errno --------------------------------------------------------
class InvalidArgument(PyvfioError):
    """EINVAL: the kernel rejected an argument (or the call is not valid in this state)."""


class BadArgumentType(InvalidArgument, TypeError):
    """An argument of the wrong type, caught before anything reached the kernel."""


class ArgumentOutOfRange(InvalidArgument, ValueError):
    """An integer argument outside what the kernel's field can hold, caught before the call."""


class ArgumentTooLarge(PyvfioError):
    """E2BIG: the argument struct is larger than the kernel knows and its tail is not zero."""

    default_reason = "argument larger than the kernel's struct with non-zero trailing bytes"


class NotSupported(PyvfioError):
    """ENOTTY / EOPNOTSUPP: this kernel, driver or file does not implement the request."""


class PermissionDenied(PyvfioError, PermissionError):
    """EPERM / EACCES."""


class BadFileDescriptor(PyvfioError):
    """EBADF: the fd is closed or not usable for this call."""


class NotFound(PyvfioError, FileNotFoundError):
    """ENOENT: the named object (id, IOVA, session, token) does not exist."""


class Busy(PyvfioError):
    """EBUSY: the object is in use."""


class Overflow(PyvfioError):
    """EOVERFLOW: an address or length range wraps or exceeds what the kernel accepts."""


class TryAgain(PyvfioError, BlockingIOError):
    """EAGAIN: transient; the call may succeed if repeated."""


class BadAddress(PyvfioError):
    """EFAULT: a buffer pointer handed to the kernel is not valid."""


class NoSpace(PyvfioError):
    """ENOSPC / ENOMEM: the kernel ran out of room for this object."""


# --- Live Update Orchestrator ------------------------------------------------------------
class LiveUpdateError(PyvfioError):
    """Base of the LUO-specific errors."""


class LiveUpdateNotEnabled(LiveUpdateError, FileNotFoundError):
    default_reason = (
        "/dev/liveupdate does not exist: this kernel has no Live Update Orchestrator enabled "
        "(build with CONFIG_LIVEUPDATE=y and CONFIG_KEXEC_HANDOVER=y, boot with 'kho=on liveupdate=on')"
    )


class LiveUpdateBusy(LiveUpdateError):
    """/dev/liveupdate is single-open and another open file holds it (``holders`` lists pids)."""

    def __init__(self, err: int | None, operation: str, target: str = "", reason: str = "",
                 holders: Iterable[int] = ()):
        self.holders = tuple(holders)
        super().__init__(err, operation, target, reason)

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild, (type(self), self.errno, self.operation, self.target, self.reason),
                {"holders": self.holders})


class IncomingStateFailed(LiveUpdateError):
    default_reason = (
        "the state handed over by the previous kernel failed to restore; /dev/liveupdate stays "
        "unusable for this boot and only a reboot clears it"
    )


class SessionExists(LiveUpdateError, FileExistsError):
    default_reason = "a session with this name already exists"


class NoSuchSession(LiveUpdateError, FileNotFoundError):
    default_reason = (
        "no incoming session with this name (this boot did not come from a live update, "
        "the name is unknown, or the session was already finished or closed)"
    )


class SessionAlreadyRetrieved(LiveUpdateError):
    default_reason = "the session was already retrieved and its fd is still open (or its finish failed)"


class InvalidSessionName(LiveUpdateError, ValueError):
    default_reason = "session names are 1 to 63 bytes with no NUL"


class InvalidToken(LiveUpdateError, ValueError):
    default_reason = "tokens are unsigned 64-bit integers"


class WrongSessionDirection(LiveUpdateError):
    default_reason = "this call needs the other kind of session (outgoing: created; incoming: retrieved)"


class TokenInUse(LiveUpdateError, FileExistsError):
    default_reason = "this token is already used in this session"


class NoSuchToken(LiveUpdateError, FileNotFoundError):
    default_reason = "no preserved file with this token in the session (unknown, or the session was finished)"


class AlreadyPreserved(LiveUpdateError):
    default_reason = "this file is already preserved (in this or another session; finish its incoming session first)"


class NotPreservable(LiveUpdateError):
    default_reason = "the kernel has no live-update handler for this kind of file"


class MemfdFrozen(LiveUpdateError, PermissionError):
    default_reason = "the memfd is preserved for a live update: its size is frozen until the session is closed or finished"


class SessionLimitReached(LiveUpdateError, NoSpace):
    """CREATE_SESSION's ENOSPC: LUO's table of outgoing sessions is full.

    The kernel serialises sessions into at most 10,000 one-page blocks (``KHO_MAX_BLOCKS``)
    of 80-byte entries: (PAGE_SIZE - 16) // 80 per page, 51 with 4 KiB pages, so 510,000
    outgoing sessions in all. Nothing was created; closing (un-preserving) a session frees
    its slot."""

    default_reason = ("the kernel's limit on outgoing LUO sessions is reached (10,000 serialisation "
                      "blocks of 51 sessions with 4 KiB pages: 510,000); nothing was created")


class SessionFull(LiveUpdateError, NoSpace):
    """PRESERVE_FD's ENOSPC: this session holds as many files as LUO can serialise.

    Files are serialised into at most 10,000 one-page blocks per session of 64-byte entries:
    (PAGE_SIZE - 16) // 64 per page, 63 with 4 KiB pages, so 630,000 files per session.
    Nothing was preserved; the files already in the session stay preserved. Use another
    session for more files."""

    default_reason = ("the kernel's limit on files in one LUO session is reached (10,000 serialisation "
                      "blocks of 63 files with 4 KiB pages: 630,000); this file was not preserved, "
                      "the ones before it still are")


class FdLimitReached(PyvfioError):
    """EMFILE / ENFILE: no fd number is free for the new fd (RLIMIT_NOFILE or fs.file-max).

    Every outgoing LUO session must stay open until the kexec, so a process creating many
    sessions needs ``RLIMIT_NOFILE`` above their number (``resource.setrlimit``, or
    ``LimitNOFILE=`` in a systemd unit). Nothing was created."""

    default_reason = ("no free fd: raise RLIMIT_NOFILE (resource.setrlimit, ulimit -n, LimitNOFILE=) "
                      "above the number of fds this process keeps open; nothing was created")


class FinishRefused(LiveUpdateError):
    default_reason = "a preserved file is not ready to finish (not retrieved, or a VFIO device not yet bound to an iommufd)"


class SessionClosed(LiveUpdateError, ValueError):
    default_reason = "the session object is closed"


class SessionNotHeld(LiveUpdateError):
    default_reason = ("no process holds this session: a live update now would not carry it (hand it to a "
                      "holder before the kexec)")


class SessionNotFinished(LiveUpdateError):
    default_reason = ("a session that came through the last live update is not finished: a kexec now would "
                      "drop it (retrieve what it holds and finish it first)")


class PreflightFailed(LiveUpdateError):
    """A live update's preconditions are not met on this host (nothing was changed)."""


class LiveUpdateNotVerified(LiveUpdateError):
    """After a live update, the host is not in the state it should be (boot id, number, sessions)."""


class KexecError(PyvfioError):
    """Base of the errors loading or executing a kexec kernel."""


class KexecImageTooLarge(KexecError):
    default_reason = (
        "kernel and initrd do not fit the KHO scratch area (boot with a larger kho_scratch=)"
    )


class KexecNotPermitted(KexecError, PermissionError):
    default_reason = "needs CAP_SYS_BOOT (and kexec not disabled by kernel.kexec_load_disabled)"


class KexecRefused(KexecError):
    default_reason = "the kernel refused the kexec reboot (a preserved file failed to freeze; nothing was rebooted)"


class LegacyKexecRefused(KexecError, ValueError):
    default_reason = "the legacy kexec_load path drops all live-update state; only kexec_file_load is used"


# --- VFIO / iommufd ------------------------------------------------------------------------
class VfioError(PyvfioError):
    """Base of the VFIO- and iommufd-specific errors."""


class DevicePreserved(VfioError, Busy):
    """The device was preserved by a live update and must be retrieved from its session."""

    default_reason = "the device is preserved by a live update: retrieve it from its LUO session"


class DeviceNotBound(VfioError):
    default_reason = "the device fd is not bound to an iommufd yet (VFIO_DEVICE_BIND_IOMMUFD first)"


class DeviceFrozen(VfioError):
    """EIO from a device fd: the device was frozen for a kexec that did not happen."""

    default_reason = (
        "the device was frozen for a live update whose kexec did not happen: its fd answers EIO "
        "to everything. Close the session that preserves it and every fd of it; if a new open still "
        "answers EIO, have it unbound from vfio-pci and bound again (pyvfio-lu recover BDF, or "
        "pyvfio_lu.preservation.recover_frozen(bdf))"
    )


class DeviceNotPreservable(NotPreservable, VfioError):
    """The kernel can preserve VFIO devices, but not this fd (the reason names why)."""

    default_reason = "the kernel's VFIO live-update handler refused this device fd"


class GroupNotViable(VfioError):
    default_reason = "the IOMMU group is not viable: every device in it must be bound to vfio-pci or have no driver"


class NotLiveUpdateReady(VfioError):
    """A precondition for preserving a VFIO device is not met (checked before anything changes)."""


class VfioPreservationUnsupported(NotPreservable, NotLiveUpdateReady):
    """The running kernel has no VFIO device preservation (its configuration says so); the
    message also names any other unmet precondition of the fd."""

    default_reason = (
        "this kernel cannot preserve VFIO devices across a live update: it lacks "
        "CONFIG_VFIO_PCI_LIVEUPDATE (the VFIO live-update series is not merged upstream)"
    )


class MappingExists(VfioError, FileExistsError):
    """EEXIST on a DMA map: the IOVA range overlaps a mapping that is already there."""

    default_reason = "the IOVA range overlaps an existing mapping (unmap it first, or choose another IOVA)"


class RegisterTimeout(VfioError, TimeoutError):
    """A polled device register did not reach the wanted value before the deadline."""

    default_reason = "the register did not reach the wanted value in time"
    #: the last value read and how many reads the poll made
    last: int | None = None
    reads: int = 0


class UnsafeOperation(VfioError, ValueError):
    """A request that would let a device DMA into memory the caller does not own."""


class WrongFdKind(PyvfioError, TypeError):
    default_reason = "this ioctl is not valid on this kind of file descriptor"


def check_int(value: object, what: str, low: int, high: int, operation: str, target: str = "") -> int:
    """``value`` as an int in [low, high]; BadArgumentType / ArgumentOutOfRange naming ``what``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise BadArgumentType(_errno.EINVAL, operation, target,
                              f"{what} must be an integer, not {type(value).__name__}")
    if not low <= value <= high:
        raise ArgumentOutOfRange(_errno.EINVAL, operation, target, f"{what} {value} is outside {low}..{high}")
    return value


def check_bytes(value: object, what: str, operation: str, target: str = "") -> bytes | bytearray | memoryview:
    """``value`` if it is bytes-like (bytes, bytearray, memoryview); BadArgumentType otherwise."""
    if not isinstance(value, (bytes, bytearray, memoryview)):
        raise BadArgumentType(_errno.EINVAL, operation, target,
                              f"{what} must be bytes-like (bytes, bytearray, memoryview), not {type(value).__name__}")
    return value


def check_sequence(value: Any, what: str, operation: str, target: str = "") -> list[Any] | tuple[Any, ...]:
    """``value`` as a list or tuple (any other iterable is listed); BadArgumentType otherwise."""
    if isinstance(value, (list, tuple)):
        return value
    if isinstance(value, (str, bytes, dict)) or not hasattr(value, "__iter__"):
        raise BadArgumentType(_errno.EINVAL, operation, target,
                              f"{what} must be a sequence (list, tuple, range, generator), not {type(value).__name__}")
    return list(value)


def check_text(value: object, what: str, operation: str, target: str = "", *, max_len: int = 4095,
               path: bool = False) -> str:
    """``value`` as a non-empty str without NUL, at most ``max_len`` characters (``path``:
    also an ``os.PathLike``); BadArgumentType / ArgumentOutOfRange naming ``what``."""
    if path and not isinstance(value, (str, bytes)) and hasattr(value, "__fspath__"):
        value = value.__fspath__()
    if not isinstance(value, str):
        raise BadArgumentType(_errno.EINVAL, operation, target,
                              f"{what} must be a str{' or a path' if path else ''}, not {type(value).__name__}")
    if not value or "\0" in value or len(value) > max_len:
        problem = "is empty" if not value else "contains a NUL" if "\0" in value else f"is longer than {max_len}"
        raise ArgumentOutOfRange(_errno.EINVAL, operation, target or repr(value)[:60], f"{what} {problem}")
    return value


# errno -> generic class, used when no operation-specific class applies
BY_ERRNO: dict[int, type[PyvfioError]] = {
    _errno.EINVAL: InvalidArgument,
    _errno.E2BIG: ArgumentTooLarge,
    _errno.ENOTTY: NotSupported,
    _errno.EOPNOTSUPP: NotSupported,
    _errno.EPERM: PermissionDenied,
    _errno.EACCES: PermissionDenied,
    _errno.EBADF: BadFileDescriptor,
    _errno.ENOENT: NotFound,
    _errno.EBUSY: Busy,
    _errno.EOVERFLOW: Overflow,
    _errno.EAGAIN: TryAgain,
    _errno.EFAULT: BadAddress,
    _errno.ENOSPC: NoSpace,
    _errno.ENOMEM: NoSpace,
    _errno.EMFILE: FdLimitReached,
    _errno.ENFILE: FdLimitReached,
}

# (operation, errno) -> class, the documented meanings (kernel-contract.md §1-3)
BY_OPERATION: dict[tuple[str, int], type[PyvfioError]] = {
    ("open /dev/liveupdate", _errno.ENOENT): LiveUpdateNotEnabled,
    ("open /dev/liveupdate", _errno.EBUSY): LiveUpdateBusy,
    ("open /dev/liveupdate", _errno.EIO): IncomingStateFailed,
    ("LIVEUPDATE_IOCTL_CREATE_SESSION", _errno.EEXIST): SessionExists,
    ("LIVEUPDATE_IOCTL_RETRIEVE_SESSION", _errno.ENOENT): NoSuchSession,
    ("LIVEUPDATE_IOCTL_RETRIEVE_SESSION", _errno.EINVAL): SessionAlreadyRetrieved,
    ("LIVEUPDATE_IOCTL_CREATE_SESSION", _errno.ENOSPC): SessionLimitReached,
    ("LIVEUPDATE_SESSION_PRESERVE_FD", _errno.ENOSPC): SessionFull,
    ("LIVEUPDATE_SESSION_PRESERVE_FD", _errno.EEXIST): TokenInUse,
    ("LIVEUPDATE_SESSION_PRESERVE_FD", _errno.EBUSY): AlreadyPreserved,
    ("LIVEUPDATE_SESSION_PRESERVE_FD", _errno.ENOENT): NotPreservable,
    ("LIVEUPDATE_SESSION_RETRIEVE_FD", _errno.ENOENT): NoSuchToken,
    ("LIVEUPDATE_SESSION_FINISH", _errno.EBUSY): FinishRefused,
    ("ftruncate", _errno.EPERM): MemfdFrozen,
    ("fallocate", _errno.EPERM): MemfdFrozen,
    ("write", _errno.EPERM): MemfdFrozen,
    ("kexec_file_load", _errno.EADDRNOTAVAIL): KexecImageTooLarge,
    ("kexec_file_load", _errno.EPERM): KexecNotPermitted,
    ("reboot(RB_KEXEC)", _errno.EPERM): KexecNotPermitted,
    ("open VFIO device", _errno.EBUSY): DevicePreserved,
    ("IOMMU_IOAS_MAP", _errno.EEXIST): MappingExists,
    ("IOMMU_IOAS_MAP_FILE", _errno.EEXIST): MappingExists,
    ("VFIO_IOMMU_MAP_DMA", _errno.EEXIST): MappingExists,
    ("VFIO_GROUP_GET_DEVICE_FD", _errno.EBUSY): DevicePreserved,
}


# operations on a VFIO device fd (ioctls, region reads and writes, BAR mmaps)
_DEVICE_FD_OPERATIONS = ("VFIO_DEVICE_", "read region", "write region", "mmap region")


def error_for(err: int, operation: str, target: str = "", reason: str = "", **extra: Any) -> PyvfioError:
    """The exception for ``errno`` failing ``operation`` on ``target``."""
    cls = BY_OPERATION.get((operation, err)) or BY_ERRNO.get(err) or PyvfioError
    if err == _errno.EIO and operation.startswith(_DEVICE_FD_OPERATIONS):
        cls = DeviceFrozen  # every access to a device fd frozen by a refused kexec answers EIO
    elif operation == "reboot(RB_KEXEC)" and cls is not KexecNotPermitted:
        cls = KexecRefused
    elif operation == "kexec_file_load" and not issubclass(cls, KexecError):
        cls = KexecError
    if extra:
        return cls(err, operation, target, reason, **extra)
    return cls(err, operation, target, reason)
