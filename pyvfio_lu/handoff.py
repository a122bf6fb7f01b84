"""Hand named fds between processes over a Unix socket (SCM_RIGHTS), with a manifest.

A message is one ``SOCK_SEQPACKET`` datagram: a JSON header plus up to 250 fds in the
same ``sendmsg``; more fds go in further messages with ``"more": true``. Every fd
received is ``O_CLOEXEC`` (``MSG_CMSG_CLOEXEC``) and returned in an :class:`OwnedFd`.
The receiver checks the sender's uid with ``SO_PEERCRED`` before it takes anything.

The manifest says what each fd is, e.g. for a LUO session
``{"session": "vm-1", "files": {"1": "guest RAM memfd", "2": "VFIO 0000:00:04.0"}}``.
"""

from __future__ import annotations

import array
import errno
import json
import os
import socket
import struct
from dataclasses import dataclass, field
from typing import Any, Iterable

from .errors import PermissionDenied, PyvfioError
from .fd import OwnedFd

MAX_FDS_PER_MESSAGE = 250  # the kernel's SCM_MAX_FD is 253
MAX_MESSAGE = 1 << 16


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
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    sock.connect(path)
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
        if len(data) > MAX_MESSAGE:
            raise ValueError(f"hand-off header of {len(data)} bytes exceeds {MAX_MESSAGE}")
        socket.send_fds(sock, [data], chunk)


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


def recv_message(sock: socket.socket) -> Message | None:
    """The next message (all of its datagrams), or None when the peer closed the socket."""
    header: dict[str, Any] | None = None
    out = Message({})
    while True:
        data, fds, flags = _recv_fds(sock)
        owned = [OwnedFd(fd, "received fd") for fd in fds]
        if not data and not fds:
            out.close()
            return None
        if flags & (socket.MSG_CTRUNC | socket.MSG_TRUNC):
            for f in owned:
                f.close()
            out.close()
            raise HandoffError(errno.EMSGSIZE, "fd hand-off", "message", "message or fds truncated")
        try:
            body = json.loads(data)
            names = body["names"]
        except (ValueError, KeyError, TypeError):
            for f in owned:
                f.close()
            out.close()
            raise HandoffError(errno.EPROTO, "fd hand-off", "message", "not a hand-off message") from None
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
