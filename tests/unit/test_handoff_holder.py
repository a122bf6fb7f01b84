"""Keeping fds alive across process boundaries: handoff (SCM_RIGHTS + manifest), the Holder
daemon, daemonize_and_hold, and systemd's fd store protocol (sdnotify). memfds stand in
for LUO session fds: nothing here needs /dev/liveupdate."""

from __future__ import annotations

import errno
import json
import os
import resource
import shutil
import signal
import socket
import tempfile
import time
import uuid

import pytest

from pyvfio_lu import handoff, sdnotify
from pyvfio_lu.errors import PermissionDenied
from pyvfio_lu.handoff import HandoffError
from pyvfio_lu.holder import Holder, HolderError, daemonize_and_hold
from pyvfio_lu.sdnotify import NotifyError


def memfd(name: str = "pvl-test", data: bytes = b"") -> int:
    fd = os.memfd_create(name, os.MFD_CLOEXEC)
    if data:
        os.pwrite(fd, data, 0)
    return fd


def inode(fd_or_path) -> tuple[int, int]:
    st = os.stat(fd_or_path) if isinstance(fd_or_path, str) else os.fstat(fd_or_path)
    return st.st_dev, st.st_ino


def open_fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.fixture
def sockdir():
    """A short directory for Unix socket paths (sun_path is at most 107 bytes)."""
    path = tempfile.mkdtemp(prefix="pvl-")
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def memfds():
    """memfd factory; every memfd made is closed afterwards."""
    made: list[int] = []

    def make(name="pvl-test", data=b""):
        made.append(memfd(name, data))
        return made[-1]

    yield make
    for fd in made:
        try:
            os.close(fd)
        except OSError:
            pass


# --- handoff --------------------------------------------------------------------------------------
def test_named_fds_arrive_with_their_names_and_contents(pair, memfds):
    a, b = pair
    fds = [memfds("one", b"first"), memfds("two", b"second")]
    handoff.send_message(a, {"op": "hold", "names": ["one", "two"], "manifest": {"one": {"k": 1}}}, fds)
    msg = handoff.recv_message(b)
    try:
        assert msg.header["op"] == "hold" and msg.header["manifest"] == {"one": {"k": 1}}
        assert list(msg.fds) == ["one", "two"]
        assert os.pread(msg.fds["one"].fileno(), 100, 0) == b"first"
        assert os.pread(msg.fds["two"].fileno(), 100, 0) == b"second"
        assert inode(msg.fds["two"].fileno()) == inode(fds[1])
    finally:
        msg.close()


def test_writes_through_the_received_fd_are_visible_to_the_sender(pair, memfds):
    a, b = pair
    fd = memfds("shared")
    handoff.send_message(a, {"op": "x", "names": ["s"]}, [fd])
    msg = handoff.recv_message(b)
    os.pwrite(msg.fds["s"].fileno(), b"written by the receiver", 0)
    msg.close()
    assert os.pread(fd, 100, 0) == b"written by the receiver"


def test_received_fds_are_close_on_exec(pair, memfds):
    a, b = pair
    inheritable = memfds()
    os.set_inheritable(inheritable, True)
    handoff.send_message(a, {"op": "x", "names": ["i"]}, [inheritable])
    msg = handoff.recv_message(b)
    try:
        assert os.get_inheritable(msg.fds["i"].fileno()) is False
    finally:
        msg.close()


def test_message_without_fds(pair):
    a, b = pair
    handoff.send_message(a, {"op": "list"})
    msg = handoff.recv_message(b)
    assert msg.header == {"op": "list", "names": [], "more": False} and msg.fds == {}


def test_peer_close_returns_none(pair):
    a, b = pair
    a.close()
    assert handoff.recv_message(b) is None


def test_names_and_fds_must_match_on_send(pair, memfds):
    with pytest.raises(ValueError, match="1 names for 2 fds"):
        handoff.send_message(pair[0], {"op": "x", "names": ["a"]}, [memfds(), memfds()])


@pytest.fixture
def many_fds_allowed():
    """Room for 600 fds sent + 600 received (+ pytest's own)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = 2048
    if soft < want:
        if hard != resource.RLIM_INFINITY and hard < want:
            pytest.skip(f"RLIMIT_NOFILE hard limit {hard} < {want}")
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    yield
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_600_fds_cross_in_one_message(pair, memfds, many_fds_allowed):
    a, b = pair
    fds = [memfds(f"m{i}") for i in range(600)]
    names = [f"m{i:03d}" for i in range(600)]
    handoff.send_message(a, {"op": "hold", "names": names, "tag": "big"}, fds)
    msg = handoff.recv_message(b)
    try:
        assert msg.header["tag"] == "big"
        assert list(msg.fds) == names == msg.header["names"]
        assert all(inode(msg.fds[n].fileno()) == inode(fd) for n, fd in zip(names, fds))
    finally:
        msg.close()


def test_600_fds_go_in_datagrams_of_at_most_250(pair, memfds, many_fds_allowed):
    a, b = pair
    fds = [memfds() for _ in range(600)]
    handoff.send_message(a, {"op": "hold", "names": [str(i) for i in range(600)]}, fds)
    seen = []
    for _ in range(3):
        data, got, _flags, _ = socket.recv_fds(b, handoff.MAX_MESSAGE, 300, socket.MSG_CMSG_CLOEXEC)
        assert data[:1] == handoff.PART  # each part fits one datagram here: no continuation
        body = json.loads(data[1:])
        seen.append((len(got), len(body["names"]), body["more"]))
        for fd in got:
            os.close(fd)
    assert seen == [(250, 250, True), (250, 250, True), (100, 100, False)]


def test_peer_credentials_are_this_process(pair):
    cred = handoff.check_peer(pair[0], os.getuid())
    assert (cred.pid, cred.uid, cred.gid) == (os.getpid(), os.getuid(), os.getgid())


def test_peer_with_another_uid_is_refused(pair):
    with pytest.raises(PermissionDenied) as info:
        handoff.check_peer(pair[0], os.getuid() + 1)
    assert f"peer runs as uid {os.getuid()}, only uid {os.getuid() + 1}" in str(info.value)
    assert info.value.errno == errno.EACCES


def test_any_peer_is_accepted_with_no_expected_uid(pair):
    assert handoff.check_peer(pair[0], None).pid == os.getpid()


def test_non_json_message_is_a_handoff_error(pair):
    a, b = pair
    a.send(b"\x00not json at all")
    with pytest.raises(HandoffError) as info:
        handoff.recv_message(b)
    assert info.value.errno == errno.EPROTO


def test_json_without_names_is_a_handoff_error(pair):
    a, b = pair
    a.send(json.dumps({"op": "hold"}).encode())
    with pytest.raises(HandoffError, match="not a hand-off message"):
        handoff.recv_message(b)


def test_fd_count_mismatch_is_a_handoff_error_and_leaks_nothing(pair, memfds):
    a, b = pair
    socket.send_fds(a, [json.dumps({"op": "hold", "names": []}).encode()], [memfds(), memfds()])
    before = open_fd_count()
    with pytest.raises(HandoffError, match="2 fds arrived for 0 names"):
        handoff.recv_message(b)
    assert open_fd_count() == before


def test_oversized_message_is_a_handoff_error(pair):
    a, b = pair
    a.send(b"x" * (handoff.MAX_MESSAGE + 100))
    with pytest.raises(HandoffError) as info:
        handoff.recv_message(b)
    assert info.value.errno == errno.EMSGSIZE


# --- Holder daemon --------------------------------------------------------------------------------
def _pids_serving(path: str) -> list[int]:
    """Holder daemons started with --socket PATH (found by their exact command line)."""
    needle = f"--socket\0{path}\0".encode()
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as fh:
                    if needle in fh.read():
                        pids.append(int(entry))
            except OSError:
                pass
    return pids


def _wait_gone(pid: int, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/stat") as fh:
                if fh.read().rsplit(")", 1)[1].split()[0] in ("Z", "X"):
                    return True
        except OSError:
            return True
        time.sleep(0.02)
    return False


@pytest.fixture
def holder(sockdir):
    path = os.path.join(sockdir, "holder.sock")
    h = Holder.spawn(path)
    yield h
    # Stopped in any case, even when the test failed half-way.
    try:
        h.stop()
    except OSError:
        pass
    for pid in _pids_serving(path):  # a test that failed half-way: the holder ignores SIGTERM
        os.kill(pid, signal.SIGKILL)
        _wait_gone(pid)
    try:
        os.waitpid(-1, os.WNOHANG)  # reap it if it was our direct child
    except ChildProcessError:
        pass


def test_holder_spawn_answers_with_an_empty_manifest(holder):
    assert holder.list() == {}
    assert len(_pids_serving(holder.path)) == 1


def test_holder_socket_is_private(holder):
    assert os.stat(holder.path).st_mode & 0o777 == 0o600


def test_holder_lists_what_it_holds_with_manifest(holder, memfds):
    holder.hold("ram", memfds("ram"), {"what": "guest RAM", "token": 1})
    holder.hold("state", memfds("state"))
    assert holder.list() == {"ram": {"what": "guest RAM", "token": 1}, "state": {}}


def test_holder_keeps_the_file_after_the_client_closes_it(holder):
    fd = memfd("kept", b"still here")
    ino = inode(fd)
    holder.hold("kept", fd)
    os.close(fd)
    with holder.fetch("kept") as back:
        assert inode(back.fileno()) == ino
        assert os.pread(back.fileno(), 100, 0) == b"still here"
        assert os.get_inheritable(back.fileno()) is False


def test_holder_daemon_itself_has_the_file_open(holder, memfds):
    fd = memfds("held")
    holder.hold("held", fd)
    (pid,) = _pids_serving(holder.path)
    links = [inode(f"/proc/{pid}/fd/{n}") for n in os.listdir(f"/proc/{pid}/fd")]
    assert inode(fd) in links


def test_holder_fetch_leaves_the_file_held(holder, memfds):
    holder.hold("x", memfds())
    holder.fetch("x").close()
    assert "x" in holder.list()


def test_holder_release_drops_the_file(holder, memfds):
    holder.hold("gone", memfds())
    holder.release("gone")
    assert holder.list() == {}
    with pytest.raises(HolderError, match="not held: gone"):
        holder.fetch("gone")


def test_holder_stop_ends_the_daemon_and_removes_the_socket(holder):
    (pid,) = _pids_serving(holder.path)
    holder.stop()
    assert _wait_gone(pid)
    assert not os.path.exists(holder.path)


def test_holder_refuses_an_unknown_op(holder):
    with pytest.raises(HolderError, match="unknown op 'dance'"):
        holder._request({"op": "dance"})


# --- daemonize_and_hold -----------------------------------------------------------------------------
def test_daemonize_and_hold_returns_a_live_daemon_holding_the_fd(memfds):
    fd = memfds("daemon-held", b"x")
    pid = daemonize_and_hold(fd)
    try:
        assert pid > 0 and pid != os.getpid()
        os.kill(pid, 0)
        with open(f"/proc/{pid}/stat") as fh:
            assert fh.read().rsplit(")", 1)[1].split()[0] in ("S", "R")
        assert os.readlink(f"/proc/{pid}/fd/{fd}") == "/memfd:daemon-held (deleted)"
        assert inode(f"/proc/{pid}/fd/{fd}") == inode(fd)
        assert os.getsid(pid) != os.getsid(0)  # a session of its own, detached from ours,
        assert os.getsid(pid) != pid  # and not its leader (double fork: no controlling tty again)
    finally:
        if pid > 0:
            os.kill(pid, signal.SIGTERM)
    assert _wait_gone(pid)


def test_daemonize_and_hold_keeps_only_the_given_fds(memfds):
    keep, other = memfds("keep"), memfds("other")
    pid = daemonize_and_hold(keep)
    try:
        fds = {int(n) for n in os.listdir(f"/proc/{pid}/fd")}
        assert fds == {0, 1, 2, keep}
        assert os.readlink(f"/proc/{pid}/fd/0") == "/dev/null"
        assert other not in fds
    finally:
        os.kill(pid, signal.SIGTERM)
    assert _wait_gone(pid)


# --- sdnotify ----------------------------------------------------------------------------------------
@pytest.fixture
def notify_receiver(sockdir):
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    path = os.path.join(sockdir, "notify")
    sock.bind(path)
    sock.settimeout(5)
    yield path, sock
    sock.close()


@pytest.fixture
def abstract_receiver():
    name = f"pyvfio-lu-test-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(b"\0" + name.encode())
    sock.settimeout(5)
    yield "@" + name, sock
    sock.close()


def receive(sock) -> tuple[bytes, list[int]]:
    data, fds, _, _ = socket.recv_fds(sock, 4096, 8)
    return data, fds


def test_store_fds_sends_fdstore_and_the_fd_to_a_path_socket(notify_receiver, memfds):
    path, sock = notify_receiver
    fd = memfds("stored")
    sdnotify.store_fds("vm-1-session", fd, notify_socket=path)
    data, fds = receive(sock)
    try:
        assert data == b"FDSTORE=1\nFDNAME=vm-1-session"
        assert len(fds) == 1 and inode(fds[0]) == inode(fd)
    finally:
        for f in fds:
            os.close(f)


def test_store_fds_to_an_abstract_socket(abstract_receiver, memfds):
    address, sock = abstract_receiver
    fd = memfds()
    sdnotify.store_fds("abstract", fd, notify_socket=address)
    data, fds = receive(sock)
    try:
        assert data == b"FDSTORE=1\nFDNAME=abstract"
        assert [inode(f) for f in fds] == [inode(fd)]
    finally:
        for f in fds:
            os.close(f)


def test_store_fds_sends_several_files_in_order(notify_receiver, memfds):
    path, sock = notify_receiver
    a, b = memfds("a"), memfds("b")
    sdnotify.store_fds("pair", a, b, notify_socket=path)
    _, fds = receive(sock)
    try:
        assert [inode(f) for f in fds] == [inode(a), inode(b)]
    finally:
        for f in fds:
            os.close(f)


def test_store_fds_uses_notify_socket_from_the_environment(notify_receiver, memfds, monkeypatch):
    path, sock = notify_receiver
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    sdnotify.store_fds("from-env", memfds())
    data, fds = receive(sock)
    for f in fds:
        os.close(f)
    assert data == b"FDSTORE=1\nFDNAME=from-env"


def test_remove_fds_sends_fdstoreremove_without_fds(notify_receiver):
    path, sock = notify_receiver
    sdnotify.remove_fds("old", notify_socket=path)
    assert receive(sock) == (b"FDSTOREREMOVE=1\nFDNAME=old", [])


@pytest.mark.parametrize("name", ["", "has:colon", "has space", "new\nline", "é", "x" * 256, "tab\t"])
def test_store_fds_rejects_bad_names_and_sends_nothing(notify_receiver, memfds, name):
    path, sock = notify_receiver
    with pytest.raises(NotifyError) as info:
        sdnotify.store_fds(name, memfds(), notify_socket=path)
    assert info.value.errno == errno.EINVAL
    sock.setblocking(False)
    with pytest.raises(BlockingIOError):
        sock.recv(4096)


def test_store_fds_accepts_a_255_character_name(notify_receiver, memfds):
    path, sock = notify_receiver
    sdnotify.store_fds("n" * 255, memfds(), notify_socket=path)
    _, fds = receive(sock)
    for f in fds:
        os.close(f)
    assert len(fds) == 1


def test_notify_socket_unset_is_a_notify_error(memfds, monkeypatch):
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    with pytest.raises(NotifyError, match="NOTIFY_SOCKET unset") as info:
        sdnotify.store_fds("x", memfds())
    assert info.value.errno == errno.ENOENT


def test_relative_notify_socket_is_a_notify_error(memfds):
    with pytest.raises(NotifyError, match="must be a path or start with '@'"):
        sdnotify.store_fds("x", memfds(), notify_socket="relative/path")


def test_notify_socket_with_no_listener_is_a_notify_error(sockdir, memfds):
    with pytest.raises(NotifyError) as info:
        sdnotify.store_fds("x", memfds(), notify_socket=os.path.join(sockdir, "nobody"))
    assert info.value.errno in (errno.ENOENT, errno.ECONNREFUSED)


# --- nothing lost: sizes and hostile peers ------------------------------------------------------
def test_a_header_larger_than_a_datagram_crosses_in_pieces(pair, memfds):
    a, b = pair
    manifest = {f"f{i}": {"files": {f"{t:#x}": "memfd " + "x" * 100 for t in range(1500)}} for i in range(3)}
    fds = [memfds() for _ in range(3)]  # about 500 KB of JSON with 3 fds: eight datagrams
    import threading  # more than the socket buffer holds: the sender waits for the reader

    sender = threading.Thread(target=handoff.send_message,
                              args=(a, {"op": "hold", "names": ["f0", "f1", "f2"], "manifest": manifest}, fds))
    sender.start()
    msg = handoff.recv_message(b)
    sender.join()
    try:
        assert list(msg.fds) == ["f0", "f1", "f2"] and msg.header["manifest"] == manifest
    finally:
        msg.close()


def test_a_peer_closing_in_the_middle_of_a_message_is_refused(pair):
    a, b = pair
    a.send(handoff.CONTINUED + b'{"op": "hold", "na')
    a.close()
    with pytest.raises(HandoffError, match="in the middle of a message"):
        handoff.recv_message(b)


def test_fds_on_a_continuation_are_refused_and_closed(pair, memfds):
    a, b = pair
    socket.send_fds(a, [handoff.CONTINUED + b"{"], [memfds()])
    before = open_fd_count()
    with pytest.raises(HandoffError, match="continuation"):
        handoff.recv_message(b)
    assert open_fd_count() == before


def _raw_request(path: str, datagrams: list[bytes], fds: list[int] = ()) -> dict | None:
    with handoff.connect(path) as sock:
        for i, d in enumerate(datagrams):
            socket.send_fds(sock, [d], list(fds) if i == len(datagrams) - 1 else [])
        reply = handoff.recv_message(sock)
    return reply.header if reply else None


def test_holder_survives_hostile_requests_and_keeps_what_it_holds(holder, memfds):
    keep = memfds()
    holder.hold("kept", keep, {"what": "the one that must survive"})
    path = holder.path
    bad = [
        [b"\x00garbage"],                                      # not JSON
        [json.dumps({"op": "hold"}).encode()],                  # no names
        [json.dumps({"op": "hold", "names": "x"}).encode()],    # names not a list
        [handoff.PART + json.dumps({"op": "hold", "names": ["a"], "manifest": []}).encode()],  # manifest not an object
        [json.dumps({"op": "fetch", "targets": "kept"}).encode()],
        [json.dumps({"op": "nonsense", "names": []}).encode()],
    ]
    for datagrams in bad:
        reply = _raw_request(path, datagrams)
        assert reply is None or reply.get("ok") is False, (datagrams, reply)
    # more fds than names: refused, and the fds the request brought are closed by the holder
    reply = _raw_request(path, [json.dumps({"op": "hold", "names": ["one"]}).encode()], [memfds(), memfds()])
    assert reply["ok"] is False
    # a name already held: refused, the first one stays
    with pytest.raises(HolderError, match="already held"):
        holder.hold("kept", memfds())
    # a "session:" name for something that is not a LUO session
    with pytest.raises(HolderError, match="not a LUO session fd"):
        holder.hold("session:vm-1", memfds())
    # a client that connects and goes away, or says nothing at all
    handoff.connect(path).close()
    with handoff.connect(path) as sock:
        sock.send(handoff.CONTINUED + b"{")
    assert set(holder.list()) == {"kept"}
    with holder.fetch("kept") as again:
        assert os.fstat(again.fileno()).st_ino == os.fstat(keep).st_ino


def test_holder_drops_a_stalled_client_and_serves_the_next(sockdir, memfds):
    path = os.path.join(sockdir, "stall.sock")
    h = Holder.spawn(path, request_timeout=0.5)
    try:
        stalled = handoff.connect(path)  # never sends anything
        t0 = time.monotonic()
        assert h.list() == {}
        assert time.monotonic() - t0 < 5
        stalled.close()
    finally:
        h.stop()


def test_holder_lists_thousands_of_entries(holder, memfds, many_fds_allowed):
    names = [f"file-{i:05d}-" + "n" * 40 for i in range(700)]
    fd = memfds()
    for start in range(0, len(names), 100):
        chunk = names[start:start + 100]
        holder._request({"op": "hold", "names": chunk, "manifest": {n: {"what": "m" * 60} for n in chunk}},
                        [fd] * len(chunk))
    listed = holder.list()  # the reply is about 100 KB of JSON: more than one datagram
    assert len(listed) == 700 and listed[names[-1]] == {"what": "m" * 60}


def test_holder_ignores_sigterm_while_it_holds(holder, memfds):
    holder.hold("x", memfds())
    pid = holder.pid
    os.kill(pid, signal.SIGTERM)
    os.kill(pid, signal.SIGHUP)
    time.sleep(0.2)
    assert set(holder.list()) == {"x"} and holder.pid == pid


def test_holder_spawn_leaves_no_resource_warning(sockdir):
    import warnings

    path = os.path.join(sockdir, "quiet.sock")
    with warnings.catch_warnings():
        warnings.simplefilter("error", ResourceWarning)
        h = Holder.spawn(path)
        import gc

        gc.collect()
    h.stop()
