"""Who holds what: a scan of ``/proc/*/fd`` links (needs the rights to read other processes' fds)."""

from __future__ import annotations

import os

from ._record import record

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (type checkers treat it as True)

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator
    from typing import NamedTuple

LUO_SESSION_PREFIX = "anon_inode:[luo_session]"


if TYPE_CHECKING:  # the same record, typed (a typing.NamedTuple costs typing's import at run time)
    class FdHolder(NamedTuple):
        """One open fd of one process: pid, fd number, its /proc link text, the process name."""

        pid: int
        fd: int
        link: str
        comm: str
else:
    FdHolder = record("FdHolder", "pid fd link comm", module=__name__)
    FdHolder.__doc__ = "One open fd of one process: pid, fd number, its /proc link text, the process name."


def _comm(pid: int, proc: str = "/proc") -> str:
    try:
        with open(f"{proc}/{pid}/comm") as fh:
            return fh.read().strip()
    except OSError:
        return "?"


def holders(match: Callable[[str], bool], proc: str = "/proc") -> Iterator[FdHolder]:
    """Every (pid, fd) whose ``/proc/PID/fd/FD`` link text satisfies ``match``."""
    for entry in os.listdir(proc):
        if not entry.isdigit():
            continue
        fd_dir = f"{proc}/{entry}/fd"
        try:
            fds = os.listdir(fd_dir)
        except OSError:
            continue
        for fd in fds:
            try:
                link = os.readlink(f"{fd_dir}/{fd}")
            except OSError:
                continue
            if match(link):
                yield FdHolder(int(entry), int(fd), link, _comm(int(entry), proc))


def liveupdate_holders(proc: str = "/proc") -> list[FdHolder]:
    """Processes with ``/dev/liveupdate`` open."""
    return list(holders(lambda link: link == "/dev/liveupdate", proc))


def session_name_from_link(link: str) -> str | None:
    """``anon_inode:[luo_session] NAME`` -> NAME; None for any other link."""
    if not link.startswith(LUO_SESSION_PREFIX):
        return None
    return link[len(LUO_SESSION_PREFIX):].strip()


def session_holders(proc: str = "/proc") -> dict[str, list[FdHolder]]:
    """LUO session name -> the processes holding an fd for it."""
    out: dict[str, list[FdHolder]] = {}
    for h in holders(lambda link: link.startswith(LUO_SESSION_PREFIX), proc):
        out.setdefault(session_name_from_link(h.link) or "", []).append(h)
    return out
