"""send_session / receive_session without /dev/liveupdate: the uid checks on both sides (and
the refusal the receiver is told about), the manifest, Session objects built from the
received fds, and no fd leaked on any refusal. memfds stand in for session fds; where a
real session fd is needed, Session.from_fd is replaced by one that trusts the manifest
(the real exchange is tested in the guest, tests/guest/test_handoff.py)."""

from __future__ import annotations

import os

import pytest

from pyvfio_lu import handoff, luo
from pyvfio_lu.errors import BadFileDescriptor, PermissionDenied
from pyvfio_lu.handoff import HandoffError


class FakeSession:
    def __init__(self, name, fd, preserved=None, direction=luo.OUTGOING):
        self.name, self._fd, self.direction = name, fd, direction
        self.preserved = preserved or {}

    def fileno(self):
        return self._fd


@pytest.fixture
def memfd():
    fd = os.memfd_create("pvl-session-stand-in", os.MFD_CLOEXEC)
    yield fd
    os.close(fd)


@pytest.fixture
def trusting_from_fd(monkeypatch):
    """Session.from_fd that names each fd after the next entry of ``names`` (default 'vm-1')."""
    names = []

    def from_fd(fd, owned=True):
        return luo.Session(fd, names.pop(0) if names else "vm-1", luo.OUTGOING, owned=owned)

    monkeypatch.setattr(luo.Session, "from_fd", staticmethod(from_fd))
    return names


def fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_session_and_manifest_arrive(pair, memfd, trusting_from_fd):
    a, b = pair
    cred = handoff.send_session(a, FakeSession("vm-1", memfd, {1: "memfd:guest-ram"}), {"vm": "vm-1", "owner": "t"})
    assert cred.pid == os.getpid() and cred.uid == os.getuid()
    session, manifest = handoff.receive_session(b)
    try:
        assert session.name == "vm-1" and session.direction == luo.OUTGOING
        assert manifest == {"session": "vm-1", "direction": "outgoing", "files": {"0x1": "memfd:guest-ram"},
                            "records": {}, "vm": "vm-1", "owner": "t"}
        assert session.preserved == {1: "memfd:guest-ram"}  # dropping it unclosed would warn
        assert os.fstat(session.fileno()).st_ino == os.fstat(memfd).st_ino
        assert os.get_inheritable(session.fileno()) is False
    finally:
        session.close()


def test_several_sessions_in_one_message(pair, trusting_from_fd):
    a, b = pair
    fds = [os.memfd_create(f"s{i}", os.MFD_CLOEXEC) for i in range(3)]
    try:
        handoff.send_sessions(a, [FakeSession(f"s{i}", fd) for i, fd in enumerate(fds)])
        trusting_from_fd.extend(["s0", "s1", "s2"])
        got = handoff.receive_sessions(b)
        assert [(s.name, m["session"]) for s, m in got] == [("s0", "s0"), ("s1", "s1"), ("s2", "s2")]
        for s, _ in got:
            s.close()
    finally:
        for fd in fds:
            os.close(fd)


def test_wrong_receiver_uid_is_refused_and_told_why(pair, memfd):
    a, b = pair
    before = fd_count()
    with pytest.raises(PermissionDenied, match=f"peer runs as uid {os.getuid()}, only uid {os.getuid() + 1}"):
        handoff.send_session(a, FakeSession("vm-1", memfd), expected_uid=os.getuid() + 1)
    with pytest.raises(PermissionDenied, match="the sender refused this process: peer runs as uid"):
        handoff.receive_session(b, expected_uid=None)
    assert fd_count() == before  # no fd crossed


def test_wrong_sender_uid_is_refused_before_reading(pair, memfd):
    a, b = pair
    handoff.send_session(a, FakeSession("vm-1", memfd), expected_uid=None)
    before = fd_count()
    with pytest.raises(PermissionDenied, match=f"only uid {os.getuid() + 1}"):
        handoff.receive_session(b, expected_uid=os.getuid() + 1)
    assert fd_count() == before  # the message (and its fd) is still unread in the socket


def test_non_session_fd_is_refused_without_leaking(pair, memfd):
    a, b = pair
    handoff.send_session(a, FakeSession("vm-1", memfd))
    before = fd_count()
    with pytest.raises(BadFileDescriptor, match="not a LUO session fd"):
        handoff.receive_session(b)
    assert fd_count() == before


def test_manifest_must_match_the_kernels_name(pair, memfd, trusting_from_fd):
    a, b = pair
    trusting_from_fd.append("someone-else")
    handoff.send_session(a, FakeSession("vm-1", memfd, {1: "x"}))
    before = fd_count()
    with pytest.raises(HandoffError, match="is session 'someone-else' according to the kernel"):
        handoff.receive_session(b)
    assert fd_count() == before


def test_other_messages_are_not_sessions(pair):
    a, b = pair
    handoff.send_message(a, {"op": "hold"})
    with pytest.raises(HandoffError, match="expected a session hand-off, got op 'hold'"):
        handoff.receive_session(b)


def test_peer_gone(pair):
    a, b = pair
    a.close()
    with pytest.raises(HandoffError, match="closed the connection without sending a session"):
        handoff.receive_session(b)


def test_exactly_one_for_receive_session(pair, trusting_from_fd):
    a, b = pair
    fds = [os.memfd_create("x", os.MFD_CLOEXEC) for _ in range(2)]
    try:
        handoff.send_sessions(a, [FakeSession("s0", fds[0]), FakeSession("s1", fds[1])])
        trusting_from_fd.extend(["s0", "s1"])
        before = fd_count()
        with pytest.raises(HandoffError, match="expected one session, got 2"):
            handoff.receive_session(b)
        assert fd_count() == before
    finally:
        for fd in fds:
            os.close(fd)


def test_duplicate_names_refused(pair, memfd):
    with pytest.raises(ValueError, match="same name"):
        handoff.send_sessions(pair[0], [FakeSession("x", memfd), FakeSession("x", memfd)])
