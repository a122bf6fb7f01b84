"""Hand named fds between processes over a Unix socket (SCM_RIGHTS), with a manifest.

A message is a JSON header and any number of named fds, sent as ``SOCK_SEQPACKET``
datagrams: up to 250 fds go with one part of the header (each part carrying the manifest
entries of its own fds, ``"more": true`` until the last part), and a part whose JSON is
larger than one datagram is split into continuation datagrams (a first byte ``C``; the part's
final datagram starts with ``J`` and carries the fds). So neither the number of fds nor the
size of a manifest is limited by the datagram size; :data:`MAX_HEADER` bounds what a
receiver accepts. Every fd received is ``O_CLOEXEC`` (``MSG_CMSG_CLOEXEC``) and returned in
an :class:`OwnedFd`. The receiver checks the sender's uid with ``SO_PEERCRED`` before it
takes anything.

The manifest says what each fd is, e.g. for a LUO session
``{"session": "vm-1", "files": {"0x1": "guest RAM memfd", "0x2": "VFIO 0000:00:04.0"}}``.

For LUO sessions, :func:`send_session` / :func:`receive_session` do the whole exchange:
the sender checks the receiver's uid (``SO_PEERCRED``) before any fd leaves the process
and tells a refused peer why; the receiver checks the sender the same way and gets
:class:`~pyvfio_lu.luo.Session` objects (``Session.from_fd``) with their manifest::

    # sender (e.g. the process that created the session)
    conn, _ = handoff.listen("/run/vmm.sock").accept()
    handoff.send_session(conn, session, {"vm": "vm-1"})        # receiver must be our uid

    # receiver (e.g. the VMM)
    session, manifest = handoff.receive_session(handoff.connect("/run/vmm.sock"))
"""

from __future__ import annotations

import array
import errno
import json
import os
import socket
import struct
from dataclasses import dataclass, field

from .errors import PermissionDenied, PyvfioError, check_text, error_for
from .fd import OwnedFd

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (type checkers treat it as True)

if TYPE_CHECKING:  # luo loads the compiled module, which plain fd passing does not need
    from collections.abc import Iterable
    from typing import Any

    from .luo import Session

MAX_FDS_PER_MESSAGE = 250  # the kernel's SCM_MAX_FD is 253
MAX_MESSAGE = 1 << 16  # one datagram
MAX_HEADER = 64 << 20  # one message's JSON, all parts together: more is refused (HandoffError)
MAX_PARTS = 1 << 16  # fd groups in one message (16 million fds)
PART, CONTINUED = b"J", b"C"  # first byte of a datagram: the end of a JSON part, or a piece of one


class HandoffError(PyvfioError):
    """The peer sent something that is not a well-formed hand-off message."""


@dataclass(frozen=True)
class PeerCredentials:
    pid: int
    uid: int
    gid: int


def peer_credentials(sock: socket.socket) -> PeerCredentials:
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return PeerCredentials(*struct.unpack("3i", raw))


def check_peer(sock: socket.socket, expected_uid: int | None) -> PeerCredentials:
    """PermissionDenied unless the peer runs as ``expected_uid`` (None: anyone)."""
    cred = peer_credentials(sock)
    if expected_uid is not None and cred.uid != expected_uid:
        raise PermissionDenied(errno.EACCES, "fd hand-off", f"peer pid {cred.pid}",
                               f"peer runs as uid {cred.uid}, only uid {expected_uid} may exchange fds")
    return cred


def socketpair() -> tuple[socket.socket, socket.socket]:
    return socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)


def listen(path: str, backlog: int = 8) -> socket.socket:
    """A listening SOCK_SEQPACKET socket at ``path`` (mode 0600; a stale socket is replaced)."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    old = os.umask(0o177)
    try:
        sock.bind(path)
    finally:
        os.umask(old)
    sock.listen(backlog)
    return sock


def connect(path: str) -> socket.socket:
    """A SEQPACKET connection to the socket at ``path``; a named error when nobody listens."""
    path = check_text(path, "socket path", "connect", path=True, max_len=107)  # sun_path
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        sock.connect(path)
    except OSError as exc:
        sock.close()  # nobody listens there: the socket would otherwise leak until GC
        raise error_for(exc.errno or 0, "connect", path, exc.strerror or "") from None
    except BaseException:
        sock.close()
        raise
    return sock


def send_message(sock: socket.socket, header: dict[str, Any], fds: Iterable[int] = ()) -> None:
    """Send ``header`` and ``fds`` (each at most MAX_FDS_PER_MESSAGE per datagram)."""
    fds = list(fds)
    names = list(header.get("names", [None] * len(fds)))
    if len(names) != len(fds):
        raise ValueError(f"{len(names)} names for {len(fds)} fds")
    chunks = [(fds[i:i + MAX_FDS_PER_MESSAGE], names[i:i + MAX_FDS_PER_MESSAGE])
              for i in range(0, len(fds), MAX_FDS_PER_MESSAGE)] or [([], [])]
    manifest = header.get("manifest") or {}
    for n, (chunk, chunk_names) in enumerate(chunks):
        body = {k: v for k, v in header.items() if k != "manifest"} if n == 0 else {"op": header.get("op")}
        body["names"] = chunk_names
        if manifest:  # each datagram carries the manifest entries of its own fds
            body["manifest"] = {k: v for k, v in manifest.items() if k in chunk_names or not chunk_names}
        body["more"] = n < len(chunks) - 1
        data = json.dumps(body).encode()
        room = MAX_MESSAGE - 1
        pieces = [data[i:i + room] for i in range(0, len(data), room)] or [b""]
        for piece in pieces[:-1]:
            sock.send(CONTINUED + piece)  # SOCK_SEQPACKET: one datagram, whole or not at all
        socket.send_fds(sock, [PART + pieces[-1]], chunk)


def _recv_fds(sock: socket.socket) -> tuple[bytes, list[int], int]:
    """One datagram and its fds, received O_CLOEXEC. (``socket.recv_fds`` cannot do this:
    CPython up to 3.12 ignores its ``flags`` argument, so MSG_CMSG_CLOEXEC never arrives.)"""
    fds = array.array("i")
    data, ancdata, flags, _ = sock.recvmsg(
        MAX_MESSAGE, socket.CMSG_SPACE((MAX_FDS_PER_MESSAGE + 3) * fds.itemsize), socket.MSG_CMSG_CLOEXEC)
    for level, kind, payload in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(payload[: len(payload) - len(payload) % fds.itemsize])
    return data, list(fds), flags


@dataclass
class Message:
    header: dict[str, Any]
    fds: dict[str, OwnedFd] = field(default_factory=dict)

    def close(self) -> None:
        for f in self.fds.values():
            f.close()


def _refuse(owned: list[OwnedFd], out: Message, err: int, reason: str) -> HandoffError:
    for f in owned:
        f.close()
    out.close()
    return HandoffError(err, "fd hand-off", "message", reason)


def recv_message(sock: socket.socket) -> Message | None:
    """The next message (all of its datagrams), or None when the peer closed the socket.

    HandoffError (and every fd received so far closed) for a truncated, oversized or
    malformed message, or one with a different number of fds than names."""
    out = Message({})
    try:
        return _recv_message(sock, out)
    except BaseException:
        out.close()  # a timeout or reset in the middle: nothing received stays open
        raise


def _recv_message(sock: socket.socket, out: Message) -> Message | None:
    header: dict[str, Any] | None = None
    pending = bytearray()
    total = parts = 0
    while True:
        data, fds, flags = _recv_fds(sock)
        owned = [OwnedFd(fd, "received fd") for fd in fds]
        if not data and not fds:
            if header is not None or pending:
                raise _refuse(owned, out, errno.EPIPE, "the peer closed the connection in the middle of a message")
            out.close()
            return None
        if flags & (socket.MSG_CTRUNC | socket.MSG_TRUNC):
            raise _refuse(owned, out, errno.EMSGSIZE, "message or fds truncated")
        total += len(data)
        if total > MAX_HEADER:
            raise _refuse(owned, out, errno.EMSGSIZE, f"message larger than {MAX_HEADER} bytes")
        kind, rest = data[:1], data[1:]
        if kind == CONTINUED:
            if owned:
                raise _refuse(owned, out, errno.EPROTO, "fds arrived with a continuation datagram")
            pending += rest
            continue
        text = bytes(pending) + rest if kind == PART else data  # a bare "{...}": an older sender
        pending.clear()
        parts += 1
        if parts > MAX_PARTS:
            raise _refuse(owned, out, errno.EMSGSIZE, f"more than {MAX_PARTS} parts in one message")
        try:
            body = json.loads(text)
            names = body["names"]
            if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
                raise TypeError
            if not isinstance(body.get("manifest", {}), dict):
                raise TypeError
        except (ValueError, KeyError, TypeError):
            raise _refuse(owned, out, errno.EPROTO, "not a hand-off message") from None
        if len(names) != len(owned):
            for f in owned:
                f.close()
            out.close()
            raise HandoffError(errno.EPROTO, "fd hand-off", "message",
                               f"{len(owned)} fds arrived for {len(names)} names")
        if header is None:
            header = body
        elif body.get("manifest"):
            header.setdefault("manifest", {}).update(body["manifest"])
        for name, f in zip(names, owned):
            f.what = f"received fd {name!r}"
            if name in out.fds:
                out.fds[name].close()
            out.fds[name] = f
        if not body.get("more"):
            header["names"] = list(out.fds)
            out.header = header
            return out


# --- LUO sessions -------------------------------------------------------------------------------
SESSION_PREFIX = "session:"  # fd names of sessions in a message: "session:<session name>"
OWN_UID = -1  # expected_uid default: the uid of this process


def session_key(name: str) -> str:
    """The key a session is held under by a holder: ``session:<name>``."""
    return SESSION_PREFIX + check_text(name, "session name", "session key")


def session_manifest(session: Session, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """What travels with a session fd: its name, direction, the tokens preserved through this
    process (token -> what the file is), and ``extra``."""
    return {"session": session.name, "direction": session.direction,
            "files": {f"{t:#x}": what for t, what in session.preserved.items()},
            "records": session.records() if hasattr(session, "records") else {}, **(extra or {})}


def _expected(uid: int | None) -> int | None:
    return os.getuid() if uid == OWN_UID else uid


def send_sessions(sock: socket.socket, sessions: Iterable[Session], manifest: dict[str, Any] | None = None, *,
                  expected_uid: int | None = OWN_UID) -> PeerCredentials:
    """Send LUO sessions (their fds, one manifest entry each, ``manifest`` merged into every
    entry) to the peer of ``sock``.

    The peer must run as ``expected_uid`` (default: this process's uid; None: anyone), as
    ``SO_PEERCRED`` reports it. Otherwise nothing is sent but a refusal naming the reason,
    and PermissionDenied is raised. The caller keeps its own session fds: close or
    ``detach()`` them if the receiver is to be the only holder.
    """
    try:
        cred = check_peer(sock, _expected(expected_uid))
    except PermissionDenied as exc:
        try:
            send_message(sock, {"op": "refused", "error": exc.reason})
        except OSError:
            pass
        raise
    sessions = list(sessions)
    names = [session_key(s.name) for s in sessions]
    if len(set(names)) != len(names):
        raise ValueError("two sessions with the same name in one hand-off")
    info = {n: session_manifest(s, manifest) for n, s in zip(names, sessions)}
    send_message(sock, {"op": "sessions", "names": names, "manifest": info}, [s.fileno() for s in sessions])
    return cred


def send_session(sock: socket.socket, session: Session, manifest: dict[str, Any] | None = None, *,
                 expected_uid: int | None = OWN_UID) -> PeerCredentials:
    """:func:`send_sessions` for one session; returns the receiver's credentials."""
    return send_sessions(sock, [session], manifest, expected_uid=expected_uid)


def receive_sessions(sock: socket.socket, *,
                     expected_uid: int | None = OWN_UID) -> list[tuple[Session, dict[str, Any]]]:
    """The sessions the peer sends, as ``(Session, manifest entry)`` pairs.

    The sender must run as ``expected_uid`` (default: this process's uid; None: anyone).
    PermissionDenied when it does not, or when the sender refused this process; HandoffError
    when the message is not a session hand-off or a manifest does not match the session
    the kernel reports for the fd.
    """
    from .luo import OUTGOING, Session

    cred = check_peer(sock, _expected(expected_uid))
    msg = recv_message(sock)
    if msg is None:
        raise HandoffError(errno.EPIPE, "receive session", f"peer pid {cred.pid}",
                           "the peer closed the connection without sending a session")
    if msg.header.get("op") == "refused":
        msg.close()
        raise PermissionDenied(errno.EACCES, "receive session", f"peer pid {cred.pid}",
                               f"the sender refused this process: {msg.header.get('error', 'no reason given')}")
    if msg.header.get("op") != "sessions":
        msg.close()
        raise HandoffError(errno.EPROTO, "receive session", f"peer pid {cred.pid}",
                           f"expected a session hand-off, got op {msg.header.get('op')!r}")
    manifest = msg.header.get("manifest") or {}
    out: list[tuple[Session, dict[str, Any]]] = []
    try:
        for key in list(msg.fds):
            entry = manifest.get(key, {})
            owned = msg.fds.pop(key)
            try:
                session = Session.from_fd(owned.fileno())
            except BaseException:
                owned.close()
                raise
            owned.detach()  # the Session owns the fd now
            out.append((session, entry))
            if key != session_key(session.name) or entry.get("session") != session.name:
                raise HandoffError(errno.EPROTO, "receive session", f"peer pid {cred.pid}",
                                   f"fd named {key!r} (manifest {entry.get('session')!r}) is session "
                                   f"{session.name!r} according to the kernel")
            if session.direction == OUTGOING:  # so dropping it unclosed warns about the lost files
                for token, what in (entry.get("files") or {}).items():
                    session._preserved[int(token, 16)] = what
    except BaseException:
        msg.close()
        for s, _ in out:
            s._preserved.clear()
            s.close()
        raise
    return out


def receive_session(sock: socket.socket, *, expected_uid: int | None = OWN_UID) -> tuple[Session, dict[str, Any]]:
    """The one session the peer sends and its manifest entry (see :func:`receive_sessions`)."""
    got = receive_sessions(sock, expected_uid=expected_uid)
    if len(got) != 1:
        for s, _ in got:
            s._preserved.clear()
            s.close()
        raise HandoffError(errno.EPROTO, "receive session", "message", f"expected one session, got {len(got)}")
    return got[0]
