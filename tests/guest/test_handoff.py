"""LUO sessions handed between processes on the real kernel: send_session / receive_session
over a Unix socket (SCM_RIGHTS) with the SO_PEERCRED uid check on both sides, the manifest
travelling with the fd, and Session objects rebuilt from the received fds.

The other process is a forked child; for the refusals it drops to uid 65534 (nobody)
before it connects, since SO_PEERCRED reports the credentials of connect() time."""

from __future__ import annotations

import json
import os
import socket

import pytest

from pyvfio_lu import handoff, procfs
from pyvfio_lu.errors import PermissionDenied, TokenInUse
from pyvfio_lu.holder import Holder
from pyvfio_lu.luo import OUTGOING
from pyvfio_lu.memfd import Memfd

SOCKET = "/run/pyvfio-lu-handoff-test.sock"
NOBODY = 65534


def _close_inherited(keep) -> None:
    low = 0
    for fd in sorted(keep):
        if low < fd:
            os.closerange(low, fd)
        low = fd + 1
    os.closerange(low, os.sysconf("SC_OPEN_MAX"))


class Child:
    """A forked process that connects to SOCKET (as ``uid``) and runs ``action(sock)``; its
    JSON result comes back on a pipe, and it waits for release() before exiting, so the
    parent can look at its fds meanwhile."""

    def __init__(self, action, uid: int | None = None):
        self._result_r, result_w = os.pipe()
        go_r, self._go_w = os.pipe()
        self.pid = os.fork()
        if self.pid == 0:
            os.close(self._result_r)
            os.close(self._go_w)
            code = 0
            try:
                _close_inherited(keep=(0, 1, 2, result_w, go_r))  # e.g. the parent's own session fds
                if uid is not None:
                    os.setgroups([])
                    os.setgid(uid)
                    os.setuid(uid)
                sock = handoff.connect(SOCKET)
                sock.settimeout(30)
                out = {"ok": True, **action(sock)}
            except BaseException as exc:  # noqa: BLE001 - everything is reported to the parent
                out = {"ok": False, "kind": type(exc).__name__, "error": str(exc)}
            try:
                os.write(result_w, json.dumps(out).encode())
                os.close(result_w)
                os.read(go_r, 1)
            finally:
                os._exit(code)
        os.close(result_w)
        os.close(go_r)

    def result(self) -> dict:
        chunks = []
        while chunk := os.read(self._result_r, 65536):
            chunks.append(chunk)
        os.close(self._result_r)
        return json.loads(b"".join(chunks))

    def release(self) -> None:
        os.write(self._go_w, b"x")
        os.close(self._go_w)
        _, status = os.waitpid(self.pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0


@pytest.fixture
def server():
    sock = handoff.listen(SOCKET)
    os.chmod(SOCKET, 0o666)  # let the uid-65534 child reach the socket: SO_PEERCRED must refuse it, not the mode
    sock.settimeout(30)
    yield sock
    sock.close()
    os.unlink(SOCKET)


def _receive_and_use(sock: socket.socket) -> dict:
    session, manifest = handoff.receive_session(sock, expected_uid=0)
    with Memfd.create("from-the-receiver", b"preserved by the receiving process") as m:
        session.preserve(m, 2)  # the received fd is a working outgoing session
    out = {"name": session.name, "kernel_name": session.get_name(), "direction": session.direction,
           "manifest": manifest, "preserved": sorted(session.preserved)}
    session.detach()  # stays open in this process until it exits (the parent looks meanwhile)
    return out


def test_session_crosses_to_another_process(luo, server):
    s = luo.create_session("handoff-ok")
    with Memfd.create("from-the-sender", b"x") as m:
        s.preserve(m, 1)
    child = Child(_receive_and_use)
    conn, _ = server.accept()
    with conn:
        cred = handoff.send_session(conn, s, {"vm": "vm-7"})
    res = child.result()
    try:
        assert cred.pid == child.pid and cred.uid == 0
        assert res["ok"], res
        assert res["name"] == res["kernel_name"] == "handoff-ok" and res["direction"] == OUTGOING
        assert res["manifest"]["session"] == "handoff-ok" and res["manifest"]["vm"] == "vm-7"
        assert list(res["manifest"]["files"]) == ["0x1"]
        assert res["preserved"] == [1, 2]  # the manifest's token, and the one the child added
        holders = {h.pid for h in procfs.session_holders()["handoff-ok"]}
        assert holders == {os.getpid(), child.pid}  # one session, open in both processes
        with pytest.raises(TokenInUse), Memfd.create("dup") as m:
            s.preserve(m, 2)  # the child's preserve went into this same session
    finally:
        child.release()
        s.close()


def test_receiver_with_another_uid_is_refused(luo, server):
    s = luo.create_session("handoff-refused")
    child = Child(lambda sock: {"got": repr(handoff.receive_session(sock, expected_uid=0))}, uid=NOBODY)
    conn, _ = server.accept()
    try:
        with conn, pytest.raises(PermissionDenied) as exc:
            handoff.send_session(conn, s)  # expected_uid: this process's (root)
        assert f"peer runs as uid {NOBODY}, only uid 0" in str(exc.value)
        res = child.result()
        assert not res["ok"] and res["kind"] == "PermissionDenied"
        assert "the sender refused this process" in res["error"] and f"uid {NOBODY}" in res["error"]
        assert child.pid not in {h.pid for h in procfs.session_holders().get("handoff-refused", [])}
    finally:
        child.release()
        s.close()


def test_sender_with_another_uid_is_refused(server):
    child = Child(lambda sock: {"waited": sock.recv(1) == b""}, uid=NOBODY)
    conn, _ = server.accept()
    try:
        with conn, pytest.raises(PermissionDenied, match=f"peer runs as uid {NOBODY}"):
            handoff.receive_session(conn)  # nothing is read from a peer of the wrong uid
    finally:
        assert child.result() == {"ok": True, "waited": True}
        child.release()


def test_any_uid_when_asked(luo, server):
    """expected_uid=None lets any peer receive (e.g. a VMM deliberately run as another user)."""
    s = luo.create_session("handoff-any-uid")

    def receive(sock):
        session, _ = handoff.receive_session(sock, expected_uid=None)
        return {"name": session.name, "uid": os.getuid()}

    child = Child(receive, uid=NOBODY)
    conn, _ = server.accept()
    try:
        with conn:
            assert handoff.send_session(conn, s, expected_uid=None).uid == NOBODY
        assert child.result() == {"ok": True, "name": "handoff-any-uid", "uid": NOBODY}
    finally:
        child.release()
        s.close()


def test_holder_gives_a_session_back(luo):
    holder = Holder.spawn("/run/pyvfio-lu-handoff-holder.sock")
    try:
        s = luo.create_session("handoff-held")
        with Memfd.create("held", b"1") as m:
            s.preserve(m, 1)
        holder.hold_session(s)
        back = holder.fetch_session("handoff-held")
        assert back.name == "handoff-held" and back.direction == OUTGOING
        with Memfd.create("added", b"2") as m:
            back.preserve(m, 2)
        back.close()  # the holder keeps its fd: the session stays
        assert holder.pid in {h.pid for h in procfs.session_holders()["handoff-held"]}
        assert list(holder.list()["session:handoff-held"]["files"]) == ["0x1"]
    finally:
        holder.stop()
    assert "handoff-held" not in procfs.session_holders()
