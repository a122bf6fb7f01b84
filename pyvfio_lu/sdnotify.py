"""Push fds into systemd's per-service fd store (the ``sd_notify`` protocol).

``FDSTORE=1`` + ``FDNAME=<name>`` in one datagram to ``$NOTIFY_SOCKET`` with the fds
attached by SCM_RIGHTS. With ``FileDescriptorStorePreserve=`` (systemd v261+) session
fds kept there survive a kexec through LUO.
"""

from __future__ import annotations

import errno
import os
import re
import socket

from .errors import PyvfioError
from .fd import FileLike, fileno_of

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (type checkers treat it as True)

if TYPE_CHECKING:
    from collections.abc import Iterable

_NAME = re.compile(r"^[\x21-\x39\x3b-\x7e]{1,255}$")  # printable ASCII, no ':' (sd_notify(3))


class NotifyError(PyvfioError):
    """The notification could not be sent (no $NOTIFY_SOCKET, bad name, socket error)."""


def _address(notify_socket: str) -> str | bytes:
    if notify_socket.startswith("@"):
        return b"\0" + notify_socket[1:].encode()
    if notify_socket.startswith("/"):
        return notify_socket
    raise NotifyError(errno.EINVAL, "sd_notify", notify_socket, "NOTIFY_SOCKET must be a path or start with '@'")


def notify(state: str, fds: Iterable[int] = (), notify_socket: str | None = None) -> None:
    """Send one ``sd_notify`` datagram ``state`` (``KEY=VALUE`` lines) with ``fds``."""
    target = notify_socket or os.environ.get("NOTIFY_SOCKET")
    if not target:
        raise NotifyError(errno.ENOENT, "sd_notify", "$NOTIFY_SOCKET", "not running under systemd (NOTIFY_SOCKET unset)")
    address = _address(target)
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        try:
            sock.connect(address)
            socket.send_fds(sock, [state.encode()], list(fds))
        except OSError as exc:
            raise NotifyError(exc.errno, "sd_notify", target) from None


def store_fds(name: str, *files: FileLike, notify_socket: str | None = None) -> None:
    """Keep ``files`` in the service's fd store under ``name`` (``FDSTORE=1``)."""
    if not _NAME.match(name):
        raise NotifyError(errno.EINVAL, "sd_notify FDSTORE", repr(name),
                          "FDNAME must be 1-255 printable ASCII characters without ':'")
    notify(f"FDSTORE=1\nFDNAME={name}", [fileno_of(f) for f in files], notify_socket)


def remove_fds(name: str, notify_socket: str | None = None) -> None:
    """Drop the fds stored under ``name`` (``FDSTOREREMOVE=1``)."""
    notify(f"FDSTOREREMOVE=1\nFDNAME={name}", [], notify_socket)
