"""LUO's own limits, reached on the real kernel, each refused with its named error and
nothing lost.

- RLIMIT_NOFILE: CREATE_SESSION answers EMFILE (:class:`FdLimitReached`); quick, so it runs
  in every guest run.
- Outgoing sessions: 10,000 serialisation blocks of 51 sessions (4 KiB pages), 510,000 in
  all, then ENOSPC (:class:`SessionLimitReached`).
- Files in one session: 10,000 blocks of 63 files, 630,000, then ENOSPC (:class:`SessionFull`).

The last two need hours and gigabytes under TCG (LUO compares a new session's name with every
session's and a new token with every token of the session, so filling either is quadratic:
about 2.5 h and 1.6 h measured under TCG), so they run in the long run only
(``scripts/long-tests``, which boots the guest with 8 GiB and sets ``PYVFIO_LU_LONG=1``).
Each checks that the refused call changed nothing: the refused name or token is not recorded
(asking again gives the same refusal, not "exists"), everything before it is still there, and
exactly one slot frees when one entry goes.
"""

from __future__ import annotations

import os
import resource
import time

import pytest

from pyvfio_lu.errors import FdLimitReached, SessionExists, SessionFull, SessionLimitReached, TokenInUse
from pyvfio_lu.luo import kernel_limits
from pyvfio_lu.memfd import Memfd

LONG = os.environ.get("PYVFIO_LU_LONG") == "1"
long_run = pytest.mark.skipif(not LONG, reason="a long run (hours under TCG, 8 GiB guest): scripts/long-tests runs it")


def _open_fds() -> list[int]:
    return sorted(int(n) for n in os.listdir("/proc/self/fd"))


def _nofile(n: int) -> tuple[int, int]:
    old = resource.getrlimit(resource.RLIMIT_NOFILE)
    if old[0] < n:
        resource.setrlimit(resource.RLIMIT_NOFILE, (n, max(n, old[1])))
    return old


def test_fd_limit_is_a_named_error_and_creates_nothing(luo):
    old = resource.getrlimit(resource.RLIMIT_NOFILE)
    sessions = []
    try:
        listed = _open_fds()  # includes the fd the listing itself used (closed again)
        limit = max(listed) + 3
        # fd numbers are allocated lowest first, so every free number below the limit is a slot
        room = limit - (len(listed) - 1)
        resource.setrlimit(resource.RLIMIT_NOFILE, (limit, old[1]))
        with pytest.raises(FdLimitReached) as info:
            for i in range(room + 1):
                sessions.append(luo.create_session(f"fdlim-{i}"))
        assert len(sessions) == room
        assert "RLIMIT_NOFILE" in str(info.value)
        resource.setrlimit(resource.RLIMIT_NOFILE, old)
        # the refused session was not created: its name is free, the others are intact
        sessions.append(luo.create_session(f"fdlim-{room}"))
        with pytest.raises(SessionExists):
            luo.create_session("fdlim-0")
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, old)
        for s in sessions:
            s.close()


@long_run
def test_session_limit_is_a_named_error_and_loses_nothing(luo):
    max_sessions, _files = kernel_limits()
    old = _nofile(max_sessions + 1000)
    sessions = []
    start = time.monotonic()
    try:
        with pytest.raises(SessionLimitReached) as info:
            for i in range(max_sessions + 1):
                sessions.append(luo.create_session(f"lim-{i:06d}"))
        filled = time.monotonic() - start
        assert len(sessions) == max_sessions, "the kernel's limit is not the one kernel_limits() computes"
        assert info.value.errno == 28 and "510,000" in str(info.value)
        # nothing was recorded: the same name is refused for room again, not as taken
        with pytest.raises(SessionLimitReached):
            luo.create_session(f"lim-{max_sessions:06d}")
        # what exists is intact: the first name is taken, the last session preserves a file
        with pytest.raises(SessionExists):
            luo.create_session("lim-000000")
        with Memfd.create("lim-ram", b"kept") as m:
            sessions[-1].preserve(m, 1)
        # one session gone frees exactly one slot
        sessions.pop(0).close()
        sessions.append(luo.create_session(f"lim-{max_sessions:06d}"))
        with pytest.raises(SessionLimitReached):
            luo.create_session("lim-one-more")
        print(f"\n[limits] {max_sessions} sessions created in {filled:.1f} s, then SessionLimitReached")
    finally:
        for s in sessions:
            s.close()
        resource.setrlimit(resource.RLIMIT_NOFILE, old)


@long_run
def test_file_limit_is_a_named_error_and_loses_nothing(luo):
    _sessions, max_files = kernel_limits()
    start = time.monotonic()
    with luo.create_session("lim-files") as session:
        for token in range(1, max_files + 1):
            fd = os.memfd_create(f"f{token}", os.MFD_CLOEXEC)
            try:
                session.preserve(fd, token)
            finally:
                os.close(fd)  # LUO keeps its own reference
        filled = time.monotonic() - start
        with Memfd.create("one-more", b"not lost") as extra:
            with pytest.raises(SessionFull) as info:
                session.preserve(extra, max_files + 1)
            assert info.value.errno == 28 and "630,000" in str(info.value)
            # not recorded: the same token is refused for room again (the kernel checks a
            # taken token first), and a taken token is still taken
            with pytest.raises(SessionFull):
                session.preserve(extra, max_files + 1)
            with pytest.raises(TokenInUse):
                session.preserve(extra, 1)
            assert len(session.preserved) == max_files and max_files + 1 not in session.preserved
            # the refused memfd is not preserved anywhere: another session takes it
            with luo.create_session("lim-files-other") as other:
                other.preserve(extra, 1)
            assert extra.read_all() == b"not lost"
        print(f"\n[limits] {max_files} files preserved in one session in {filled:.1f} s, then SessionFull")
