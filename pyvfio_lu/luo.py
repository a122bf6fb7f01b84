"""The Live Update Orchestrator: ``/dev/liveupdate``, sessions, preserve / retrieve / finish.

A live update in four verbs (kernel-contract.md §1)::

    with LiveUpdate() as lu:                       # before the kexec
        s = lu.create_session("vm-1")
        s.preserve(guest_ram_memfd, token=1)
        hold(s)                                    # keep the session fd alive until kexec -e

    with LiveUpdate() as lu:                       # after the kexec
        s = lu.retrieve_session("vm-1")
        ram = s.retrieve(1)
        s.finish()

Which calls lose data:

- closing an *outgoing* session (or letting its last fd go, e.g. by process exit) before
  the kexec un-preserves every file in it;
- ``finish()`` (and closing an *incoming* session, which implies finish) discards every
  file that was not retrieved first.
"""

from __future__ import annotations

import errno
import os
import warnings

from . import _speedups
from ._cffi import ffi, lib
from .errors import (
    AlreadyPreserved,
    ArgumentOutOfRange,
    BadArgumentType,
    BadFileDescriptor,
    InvalidSessionName,
    InvalidToken,
    LiveUpdateBusy,
    NotPreservable,
    PyvfioError,
    SessionClosed,
    TokenInUse,
    WrongSessionDirection,
    check_sequence,
    check_text,
    error_for,
)
from .fd import FileLike, OwnedFd, fileno_of
from .ioctl import FdKind, call, fd_kind, template

_GET_NAME = lib.LIVEUPDATE_SESSION_GET_NAME
_GET_NAME_ARG = template("liveupdate_session_get_name")
_NAME_AT = ffi.offsetof("struct liveupdate_session_get_name", "name")
_NAME_SIZE = ffi.sizeof(ffi.typeof("struct liveupdate_session_get_name").fields[2][1].type)
_ioctl_text = _speedups.ioctl_text

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (type checkers treat it as True)

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator
    from typing import Any

    from typing_extensions import Self  # typing.Self from 3.11; type checkers ship this stub

    from . import procfs

DEVICE_PATH = "/dev/liveupdate"
NAME_MAX = 63  # LIVEUPDATE_SESSION_NAME_LENGTH - 1
TOKEN_MAX = 2**64 - 1

OUTGOING = "outgoing"
INCOMING = "incoming"


class PreservationLost(ResourceWarning):
    """A session holding preserved files was garbage collected: the files are no longer preserved."""


# Shown by default (plain ResourceWarnings are hidden unless -X dev): losing a
# preservation silently is exactly what this warning exists to prevent.
warnings.filterwarnings("default", category=PreservationLost)


def encode_name(name: str | bytes) -> bytes:
    """A session name as the kernel wants it: 1..63 bytes, no NUL; InvalidSessionName otherwise.

    Names are bytes to the kernel. A ``Session.name`` is their lossless text form: UTF-8, with
    any other byte kept as a surrogate escape (``b"x-\\xff"`` is ``"x-\\udcff"``), so two
    different byte names never share a ``.name`` and ``encode_name(s.name)`` gives the bytes back.
    """
    if not isinstance(name, (str, bytes, bytearray)):
        raise InvalidSessionName(errno.EINVAL, "session name", repr(name)[:80],
                                 f"a session name is str or bytes, not {type(name).__name__}")
    try:
        raw = name.encode(errors="surrogateescape") if isinstance(name, str) else bytes(name)
    except UnicodeEncodeError:
        raise InvalidSessionName(errno.EINVAL, "session name", repr(name)[:80],
                                 "the name cannot be encoded as bytes (a lone surrogate that is not an escaped byte)") from None
    if not 1 <= len(raw) <= NAME_MAX or b"\0" in raw:
        raise InvalidSessionName(
            errno.EINVAL, "session name", repr(name),
            f"session names are 1 to {NAME_MAX} bytes with no NUL; got {len(raw)} bytes"
            + (" containing a NUL" if b"\0" in raw else ""))
    return raw


def check_token(token: int) -> int:
    if isinstance(token, bool) or not isinstance(token, int) or not 0 <= token <= TOKEN_MAX:
        raise InvalidToken(errno.EINVAL, "token", repr(token), "tokens are integers from 0 to 2**64-1")
    return token


class LiveUpdate:
    """Owner of ``/dev/liveupdate`` (the kernel allows one open file at a time).

    Closing it does not affect sessions: they are files of their own.
    """

    def __init__(self, path: str = DEVICE_PATH, *, adopt_ledgers: bool = True):
        self.path = path = check_text(path, "path", "open /dev/liveupdate", path=True)
        try:
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except OSError as exc:
            raise self._open_error(exc) from None
        self._fd = OwnedFd(fd, path)
        if adopt_ledgers and path == DEVICE_PATH:
            self.adopt_ledgers()

    def adopt_ledgers(self) -> None:
        """After a live update, read the ledgers the previous kernel's holders left (once per
        boot; see :mod:`pyvfio_lu.ledger`), so :func:`pyvfio_lu.ledger.incoming` can say which
        sessions came in and what they hold. Never raises: the ledger is a description only."""
        from . import ledger

        if ledger.adopted():
            return
        try:
            ledger.adopt(self)
        except Exception as exc:  # noqa: BLE001 - a missing description must not stop a live update
            import logging

            logging.getLogger(__name__).warning("could not read the live-update ledger: %s", exc)

    def _open_error(self, exc: OSError) -> PyvfioError:
        err = exc.errno or 0
        if err == errno.EBUSY:
            from . import procfs  # on this failure only: not on the import path

            held = procfs.liveupdate_holders()
            who = ", ".join(f"pid {h.pid} ({h.comm})" for h in held) or "a process this user cannot see"
            return LiveUpdateBusy(err, "open /dev/liveupdate", self.path,
                                  f"/dev/liveupdate is single-open and is held by {who}",
                                  holders=tuple(h.pid for h in held))
        return error_for(err, "open /dev/liveupdate", self.path)

    @classmethod
    def from_fd(cls, fd: int, owned: bool = True) -> LiveUpdate:
        """Wrap an already-open ``/dev/liveupdate`` fd (closed on close() only if ``owned``)."""
        self = cls.__new__(cls)
        self.path = DEVICE_PATH
        self._fd = OwnedFd(fd, DEVICE_PATH, owned=owned)
        return self

    def fileno(self) -> int:
        return self._fd.fileno()

    def create_session(self, name: str | bytes) -> Session:
        """A new outgoing session. SessionExists if an outgoing session has this name."""
        raw = encode_name(name)
        arg = call(FdKind.LUO_DEVICE, self.fileno(), "LIVEUPDATE_IOCTL_CREATE_SESSION",
                   target=f"{self.path} (session {raw.decode(errors='replace')!r})", name=raw)
        return Session(arg.fd, raw.decode(errors="surrogateescape"), OUTGOING)

    def retrieve_session(self, name: str | bytes) -> Session:
        """An incoming session handed over by the previous kernel.

        NoSuchSession when there is none by that name (a cold boot, an unknown name, or
        one already finished); SessionAlreadyRetrieved while another fd for it is open.
        """
        raw = encode_name(name)
        arg = call(FdKind.LUO_DEVICE, self.fileno(), "LIVEUPDATE_IOCTL_RETRIEVE_SESSION",
                   target=f"{self.path} (session {raw.decode(errors='replace')!r})", name=raw)
        return Session(arg.fd, raw.decode(errors="surrogateescape"), INCOMING)

    def close(self) -> None:
        self._fd.close()

    @property
    def closed(self) -> bool:
        return self._fd.closed

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<LiveUpdate {self.path} {'closed' if self.closed else f'fd={self._fd.fileno()}'}>"


class Session:
    """One LUO session fd: *outgoing* (created, preserves files) or *incoming* (retrieved).

    Data-loss rules: closing an outgoing session un-preserves everything in it; finishing
    (or closing) an incoming one discards every file not yet retrieved.
    """

    def __init__(self, fd: int, name: str, direction: str, owned: bool = True):
        if direction not in (OUTGOING, INCOMING):
            raise ArgumentOutOfRange(errno.EINVAL, "Session", repr(name),
                                     f"direction must be {OUTGOING!r} or {INCOMING!r}, not {direction!r}")
        self._fd = OwnedFd(fd, f"LUO session {name!r}", owned=owned)
        self.name = name
        self.direction = direction
        self._preserved: dict[int, str] = {}  # token -> what the file is (outgoing only)
        self._records: dict[int, dict[str, Any]] = {}  # token -> ledger record (kind, bdf, memfd name/size)
        self._retrieved: set[int] = set()

    # --- construction from an fd ----------------------------------------------------------
    @classmethod
    def from_fd(cls, fd: int, owned: bool = True) -> Session:
        """Wrap a session fd (e.g. received from a holder); name and direction are asked
        from the kernel (GET_NAME, and a PRESERVE_FD of fd -1, which changes nothing)."""
        kind, link = fd_kind(fd)
        if kind is not FdKind.LUO_SESSION:
            raise BadFileDescriptor(errno.EBADF, "Session.from_fd", f"fd {fd}", f"not a LUO session fd ({link})")
        name = get_name(fd)
        try:
            call(FdKind.LUO_SESSION, fd, "LIVEUPDATE_SESSION_PRESERVE_FD", fd=-1, token=TOKEN_MAX,
                 target=f"session {name!r}")
            direction = OUTGOING  # unreachable in practice: fd -1 never preserves
        except OSError as exc:
            direction = INCOMING if exc.errno == errno.EINVAL else OUTGOING
        return cls(fd, name, direction, owned=owned)

    # --- plumbing ---------------------------------------------------------------------------
    @property
    def target(self) -> str:
        return f"session {self.name!r}"

    @property
    def closed(self) -> bool:
        return self._fd.closed

    def fileno(self) -> int:
        if self._fd.closed:
            raise SessionClosed(errno.EBADF, "session", self.target)
        return self._fd.fileno()

    def _need(self, direction: str, what: str) -> int:
        fd = self.fileno()
        if self.direction != direction:
            raise WrongSessionDirection(
                errno.EINVAL, what, self.target,
                f"{what} needs an {direction} session; {self.name!r} is {self.direction}"
                + (" (created in this boot)" if self.direction == OUTGOING else " (retrieved after a live update)"))
        return fd

    @property
    def preserved(self) -> dict[int, str]:
        """Tokens preserved through this object, with what each file is."""
        return dict(self._preserved)

    # --- the verbs ---------------------------------------------------------------------------
    def preserve(self, file: FileLike, token: int) -> None:
        """Preserve ``file`` (an fd or an object with ``fileno()``) under ``token``.

        The kernel keeps its own reference: ``file`` may be closed afterwards. A memfd's
        size is frozen from now on (ftruncate/fallocate/extending writes fail with EPERM)
        and its seals are captured now, so seal before preserving.
        Errors: TokenInUse, AlreadyPreserved, NotPreservable (VfioPreservationUnsupported
        for a VFIO device on a kernel without VFIO live update), BadFileDescriptor.
        """
        sfd = self._need(OUTGOING, "LIVEUPDATE_SESSION_PRESERVE_FD")
        check_token(token)
        fd = fileno_of(file)
        def target() -> str:
            return f"{self.target} (token {token:#x})"

        try:
            call(FdKind.LUO_SESSION, sfd, "LIVEUPDATE_SESSION_PRESERVE_FD", fd=fd, token=token, target=target)
        except (NotPreservable, AlreadyPreserved) as exc:
            raise _preserve_refused(exc, fd, file, target()) from None
        self._note_preserved(file, fd, token)

    def preserve_many(self, items: Any) -> None:
        """Preserve many ``(file, token)`` pairs in one call, the loop in C (one
        LIVEUPDATE_SESSION_PRESERVE_FD per file, the argument struct prepared once).

        Every pair is checked first as :meth:`preserve` checks one, and a token used twice
        in the batch, or already preserved through this object, is TokenInUse: nothing is
        preserved then. When the kernel refuses file ``i``, the files before it are
        preserved (and recorded, as by :meth:`preserve`), and the error is the one
        :meth:`preserve` would raise for that file, with ``index`` (i) set."""
        sfd = self._need(OUTGOING, "LIVEUPDATE_SESSION_PRESERVE_FD")
        items = check_sequence(items, "items", "LIVEUPDATE_SESSION_PRESERVE_FD", self.target)
        files, tokens, fds = [], [], []
        for i, item in enumerate(items):
            if not (isinstance(item, tuple) and len(item) == 2):
                raise BadArgumentType(errno.EINVAL, "LIVEUPDATE_SESSION_PRESERVE_FD", self.target,
                                      f"item {i} is not a (file, token) pair; nothing was preserved")
            files.append(item[0])
            tokens.append(check_token(item[1]))
            fds.append(fileno_of(item[0]))
        seen = set(self._preserved)
        for i, token in enumerate(tokens):
            if token in seen:
                raise TokenInUse(errno.EEXIST, "LIVEUPDATE_SESSION_PRESERVE_FD", f"{self.target} (token {token:#x})",
                                 f"token {token:#x} of item {i} is used twice (or already preserved); "
                                 "nothing was preserved")
            seen.add(token)
        n = len(tokens)
        err = ffi.new("int *")
        done = lib.pvl_luo_preserve_many(sfd, n, fds, tokens, err) if n else 0
        for file, fd, token in zip(files, fds, tokens[:done]):
            self._note_preserved(file, fd, token)
        if done < n:
            target = f"{self.target} (token {tokens[done]:#x}, item {done} of {n}; items before it are preserved)"
            exc = error_for(err[0], "LIVEUPDATE_SESSION_PRESERVE_FD", target)
            if isinstance(exc, (NotPreservable, AlreadyPreserved)):
                exc = _preserve_refused(exc, fds[done], files[done], target)
            exc.index = done
            raise exc

    def retrieve_many(self, tokens: Any) -> list[OwnedFd]:
        """The files preserved under ``tokens``, in one call, the loop in C; each a new fd
        owned by its returned object. Checked first as :meth:`retrieve` checks one. When
        the kernel refuses token ``i`` (NoSuchToken...), the fds retrieved before it are
        closed again (a retrieve can be repeated: they stay retrievable), and the error
        carries ``index``."""
        sfd = self._need(INCOMING, "LIVEUPDATE_SESSION_RETRIEVE_FD")
        tokens = [check_token(t) for t in check_sequence(tokens, "tokens", "LIVEUPDATE_SESSION_RETRIEVE_FD",
                                                         self.target)]
        n = len(tokens)
        out = ffi.new("int32_t[]", n or 1)
        err = ffi.new("int *")
        done = lib.pvl_luo_retrieve_many(sfd, n, tokens, out, err) if n else 0
        fds = ffi.unpack(out, done)
        if done < n:
            for fd in fds:
                os.close(fd)
            exc = error_for(err[0], "LIVEUPDATE_SESSION_RETRIEVE_FD",
                            f"{self.target} (token {tokens[done]:#x}, item {done} of {n}; nothing was kept)")
            exc.index = done
            raise exc
        self._retrieved.update(tokens)
        of_session = f" of session {self.name!r}"
        return [OwnedFd(fd, f"file {t:#x}{of_session}") for fd, t in zip(fds, tokens)]

    def _note_preserved(self, file: FileLike, fd: int, token: int) -> None:
        """Record what was preserved under ``token``, for the ledger and PreservationLost."""
        # what the file is, for the PreservationLost message: the object's own description
        # when it has one (Memfd, OwnedFd), else one readlink of /proc/self/fd
        what = getattr(file, "what", None)
        self._preserved[token] = what if isinstance(what, str) else _describe(fd)
        record = getattr(file, "ledger_record", None)
        rec = self._records[token] = record() if callable(record) else {"kind": "file", "what": self._preserved[token]}
        if rec.get("kind") == "vfio-device":
            from .preservation import note_local

            note_local(rec.get("bdf"), self.name, token)

    def records(self) -> dict[str, dict[str, Any]]:
        """What each token preserved through this object is, for the ledger: token (hex) ->
        {"kind": "memfd" | "vfio-device" | "file", ...}; a memfd's record lists the IOVAs
        it is mapped at through this process's :class:`~pyvfio_lu.iommu.Iommu` objects."""
        from .iommu import file_mappings

        out = {}
        for token, kept in self._records.items():
            rec = dict(kept)
            inode = rec.pop("inode", None)
            if inode is not None:
                rec["iovas"] = file_mappings(tuple(inode))
            out[f"{token:#x}"] = rec
        return out

    def retrieve(self, token: int) -> OwnedFd:
        """The file preserved under ``token``, as a new fd owned by the returned object.

        Retrieving the same token twice gives a second fd for the same file. A failed
        retrieve is sticky: later attempts fail the same way. NoSuchToken if unknown.
        """
        sfd = self._need(INCOMING, "LIVEUPDATE_SESSION_RETRIEVE_FD")
        check_token(token)
        arg = call(FdKind.LUO_SESSION, sfd, "LIVEUPDATE_SESSION_RETRIEVE_FD", token=token,
                   target=lambda: f"{self.target} (token {token:#x})")
        self._retrieved.add(token)
        return OwnedFd(arg.fd, f"file {token:#x} of session {self.name!r}")

    def finish(self) -> None:
        """End the incoming session: the kernel releases what it kept for it.

        LOSES DATA: files not retrieved before this call are discarded. FinishRefused
        (EBUSY) when a file is not ready (e.g. a VFIO device not yet bound to an iommufd);
        nothing is finished then. A second finish succeeds and does nothing.
        """
        sfd = self._need(INCOMING, "LIVEUPDATE_SESSION_FINISH")
        call(FdKind.LUO_SESSION, sfd, "LIVEUPDATE_SESSION_FINISH", target=self.target)
        from .ledger import mark_finished

        mark_finished(self.name)

    def get_name(self) -> str:
        """The session's name as the kernel reports it (LIVEUPDATE_SESSION_GET_NAME)."""
        # the lean path: one builtin call (a closed session's fd reads -1: EBADF, named below)
        got = _ioctl_text(self._fd._fd, _GET_NAME, _GET_NAME_ARG, _NAME_AT, _NAME_SIZE)
        if type(got) is str:
            return got
        return get_name(self.fileno(), self._target)  # SessionClosed, or the kernel's refusal named

    def _target(self) -> str:
        return self.target

    # --- lifetime ---------------------------------------------------------------------------
    def detach(self) -> int:
        """Give up ownership of the session fd (e.g. after handing it to a holder)."""
        self._forget_devices()
        return self._fd.detach()

    def _forget_devices(self) -> None:
        if any(r.get("kind") == "vfio-device" for r in self._records.values()):
            from .preservation import forget_local

            forget_local(self.name)
        self._preserved.clear()
        self._records.clear()

    def close(self) -> None:
        """Close this session fd.

        If it is the last fd for the session: an outgoing session un-preserves all its
        files; an incoming one is finished (discarding files not retrieved).
        """
        self._forget_devices()
        self._fd.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        fd = getattr(self, "_fd", None)
        if fd is None or fd.closed:
            return
        if self._preserved:
            lost = ", ".join(f"{t:#x} ({what})" for t, what in sorted(self._preserved.items()))
            msg = (f"LUO session {self.name!r} was garbage-collected while it held preserved files; "
                   f"they are no longer preserved: {lost}. Keep the session open (or hand it to a "
                   f"holder) until the kexec, and close it explicitly otherwise.")
            import logging  # only on this path: logging is costly to import

            logging.getLogger(__name__).error(msg)
            warnings.warn(msg, PreservationLost, stacklevel=2)
        self._forget_devices()
        fd.close()

    def __repr__(self) -> str:
        state = "closed" if self.closed else f"fd={self._fd.fileno()}"
        extra = f" preserved={len(self._preserved)}" if self._preserved else ""
        return f"<Session {self.name!r} {self.direction} {state}{extra}>"


def get_name(fd: int, target: str | Callable[[], str] = "") -> str:
    got = _ioctl_text(fd, _GET_NAME, _GET_NAME_ARG, _NAME_AT, _NAME_SIZE) if type(fd) is int else None
    if type(got) is str:
        return got
    arg = call(FdKind.LUO_SESSION, fd, "LIVEUPDATE_SESSION_GET_NAME", target=target or (lambda: f"session fd {fd}"))
    name: bytes = ffi.string(ffi.cast("char *", arg.name), 64)
    return name.decode(errors="surrogateescape")


def _describe(fd: int) -> str:
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return f"fd {fd}"


def sessions_held(proc: str = "/proc") -> Iterator[tuple[str, procfs.FdHolder]]:
    """(session name, holder) for every session fd open in any process visible here."""
    from . import procfs

    for name, hs in procfs.session_holders(proc).items():
        for h in hs:
            yield name, h


# LUO serialises sessions, and each session's files, into at most KHO_MAX_BLOCKS one-page
# blocks with a 16-byte header (kernel/liveupdate/kho_block.c); an outgoing session's entry
# is 80 bytes (name[64] + file-set pointer and count), a file's 64 (compatible[48] + data +
# token).
KHO_MAX_BLOCKS = 10_000
_BLOCK_HEADER, _SESSION_ENTRY, _FILE_ENTRY = 16, 80, 64


def _preserve_refused(exc: PyvfioError, fd: int, file: FileLike, target: str) -> PyvfioError:
    """PRESERVE_FD's NotPreservable / AlreadyPreserved, said for what the file is: a VFIO
    device gets the preservation checks' reasons, any other file its kind."""
    kind, link = fd_kind(fd)
    if kind is FdKind.VFIO_DEVICE:
        from .preservation import preserve_error

        return preserve_error(exc, fd, link, target, getattr(file, "bdf", None))
    if isinstance(exc, AlreadyPreserved):
        return exc
    return NotPreservable(exc.errno, exc.operation, target,
                          f"the kernel has no live-update handler for this kind of file ({link})")


def kernel_limits(page_size: int | None = None) -> tuple[int, int]:
    """(outgoing sessions, files per session) LUO can hold before it answers ENOSPC
    (:class:`~pyvfio_lu.errors.SessionLimitReached`, :class:`~pyvfio_lu.errors.SessionFull`):
    510,000 and 630,000 with 4 KiB pages. Memory and RLIMIT_NOFILE usually bind first."""
    page = page_size or os.sysconf("SC_PAGE_SIZE")
    per_page = page - _BLOCK_HEADER
    return KHO_MAX_BLOCKS * (per_page // _SESSION_ENTRY), KHO_MAX_BLOCKS * (per_page // _FILE_ENTRY)


__all__ = ["LiveUpdate", "Session", "PreservationLost", "OUTGOING", "INCOMING", "lib", "kernel_limits", "KHO_MAX_BLOCKS"]
