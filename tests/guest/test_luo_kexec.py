"""LUO across a real kexec: the kernel selftests' kexec cases, the implied cases, and a check
that failed calls before the kexec lost nothing. Each class has a before_kexec part and an
after_kexec part (see pyvfio_lu.pytest_plugin)."""

from __future__ import annotations

import errno
import os
import resource

import pytest

from pyvfio_lu import errors, status
from pyvfio_lu.ioctl import FdKind, call
from pyvfio_lu.memfd import Memfd


class TestLiveUpdateHappened:
    """The boot after the kexec is a live update: new boot id, a live update number."""

    @pytest.mark.before_kexec
    def test_before(self, carry):
        st = status.status()
        assert st.luo_enabled and st.kho_enabled
        carry["boot_id"] = st.boot_id
        carry["number"] = st.liveupdate_number

    @pytest.mark.after_kexec
    def test_after(self, carry):
        st = status.status()
        assert st.boot_id and st.boot_id != carry["boot_id"]
        assert st.liveupdate_number is not None
        if carry["number"] is not None:
            assert st.liveupdate_number > carry["number"]


class TestKexecSimple:
    """luo_kexec_simple: session "test-session", token 0x1A, "hello kexec world"."""

    @pytest.mark.before_kexec
    def test_before(self, luo, carry):
        s = luo.create_session("test-session")
        with Memfd.create("simple", b"hello kexec world") as m:
            s.preserve(m, 0x1A)
        carry.hold(s)

    @pytest.mark.after_kexec
    def test_after(self, luo):
        with luo.retrieve_session("test-session") as s:
            with Memfd.adopt(s.retrieve(0x1A)) as m:
                assert m.read_all() == b"hello kexec world"
                s.finish()
                m.resize(4096)  # finished: the memfd is an ordinary, writable memfd again
                assert os.get_inheritable(m.fileno()) is False


class TestMultiSession:
    """luo_multi_session: 2 empty sessions, one with 1 memfd, one with 2."""

    LAYOUT = {"multi-empty-1": 0, "multi-empty-2": 0, "multi-one": 1, "multi-two": 2}

    @pytest.mark.before_kexec
    def test_before(self, luo, carry):
        held = []
        for name, n in self.LAYOUT.items():
            s = luo.create_session(name)
            for t in range(n):
                with Memfd.create(name, f"{name}-{t}".encode()) as m:
                    s.preserve(m, t)
            held.append(s)
        carry.hold(*held)

    @pytest.mark.after_kexec
    def test_after(self, luo):
        for name, n in self.LAYOUT.items():
            with luo.retrieve_session(name) as s:
                for t in range(n):
                    with Memfd.adopt(s.retrieve(t)) as m:
                        assert m.read_all() == f"{name}-{t}".encode()
                s.finish()


def _nofile(n: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < n:
        resource.setrlimit(resource.RLIMIT_NOFILE, (n, max(hard, n)))


class TestStressFiles:
    """luo_stress_files: 500 memfds (tokens 0..499, "file-data-%d") in one session."""

    @pytest.mark.before_kexec
    def test_before(self, luo, carry):
        s = luo.create_session("stress-files")
        for i in range(500):
            with Memfd.create("stress", f"file-data-{i}".encode()) as m:
                s.preserve(m, i)
        carry.hold(s)

    @pytest.mark.after_kexec
    def test_after(self, luo):
        _nofile(700)
        with luo.retrieve_session("stress-files") as s:
            for i in range(500):
                with Memfd.adopt(s.retrieve(i)) as m:
                    assert m.read_all() == f"file-data-{i}".encode()
            s.finish()


class TestStressSessions:
    """luo_stress_sessions: 2000 empty sessions "many-test-%d"."""

    N = 2000

    @pytest.mark.before_kexec
    def test_before(self, luo, carry):
        _nofile(self.N + 200)
        sessions = []
        try:
            sessions += [luo.create_session(f"many-test-{i}") for i in range(self.N)]
            carry.hold(*sessions)
        finally:
            for s in sessions:
                s.close()  # no-op for the ones handed to the holder

    @pytest.mark.after_kexec
    def test_after(self, luo):
        for i in range(self.N):
            with luo.retrieve_session(f"many-test-{i}") as s:
                s.finish()


class TestMemfdStateCarried:
    """Contents (incl. holes), size, file position and seals (as of the preserve) survive."""

    @pytest.mark.before_kexec
    def test_before(self, luo, carry):
        s = luo.create_session("memfd-state")
        dense = Memfd.create("dense", os.urandom(1 << 20))
        dense.seek(4096)
        dense.seal("grow", "shrink")
        sparse = Memfd.create("sparse", size=8 << 20)
        sparse.pwrite_all(b"end", (8 << 20) - 3)
        s.preserve(dense, 1)
        s.preserve(sparse, 2)
        with pytest.raises(errors.Busy):
            dense.seal("write")  # LUO pins the pages: a write seal cannot be added any more
        dense.seal("seal")  # added after the preserve: NOT carried
        dense.seek(8192)  # the position is re-captured at the kexec: carried
        carry["dense"] = {**dense.state().to_json(), "seals": dense.seals & ~0x1}  # F_SEAL_SEAL
        carry["sparse"] = sparse.state().to_json()
        carry.hold(s)
        dense.close(), sparse.close()

    @pytest.mark.after_kexec
    def test_after(self, luo, carry):
        with luo.retrieve_session("memfd-state") as s:
            with Memfd.adopt(s.retrieve(1)) as dense, Memfd.adopt(s.retrieve(2)) as sparse:
                dense.verify(carry["dense"])
                sparse.verify(carry["sparse"])
                assert dense.position == 8192
            s.finish()


class TestRetrieveSemantics:
    """Retrieve twice, unknown token, RETRIEVE_SESSION twice, non-zero reserved on FINISH,
    wrong-direction PRESERVE, FINISH discards unretrieved files, a second FINISH, and
    re-preserving a retrieved memfd (EBUSY before FINISH, fine after)."""

    @pytest.mark.before_kexec
    def test_before(self, luo, carry):
        s = luo.create_session("semantics")
        for t in (1, 2):
            with Memfd.create("sem", f"file {t}".encode()) as m:
                s.preserve(m, t)
        carry.hold(s)

    @pytest.mark.after_kexec
    def test_after(self, luo):
        s = luo.retrieve_session("semantics")
        with pytest.raises(errors.SessionAlreadyRetrieved):
            luo.retrieve_session("semantics")
        with pytest.raises(errors.NoSuchToken) as exc:
            s.retrieve(0xDEAD)
        assert exc.value.errno == errno.ENOENT and "0xdead" in str(exc.value)
        with pytest.raises(errors.WrongSessionDirection):
            s.preserve(Memfd.create("x"), 9)
        with pytest.raises(errors.InvalidArgument):
            call(FdKind.LUO_SESSION, s.fileno(), "LIVEUPDATE_SESSION_PRESERVE_FD", fd=0, token=9)
        one, again = Memfd.adopt(s.retrieve(1)), Memfd.adopt(s.retrieve(1))
        assert os.fstat(one.fileno()).st_ino == os.fstat(again.fileno()).st_ino  # the same file
        assert one.read_all() == b"file 1"
        with luo.create_session("re-preserve") as out:
            with pytest.raises(errors.AlreadyPreserved):
                out.preserve(one, 1)  # still registered with the incoming session
            with pytest.raises(errors.InvalidArgument):
                call(FdKind.LUO_SESSION, s.fileno(), "LIVEUPDATE_SESSION_FINISH", reserved=1)
            s.finish()  # token 2 was never retrieved: discarded
            with pytest.raises(errors.NoSuchToken):
                s.retrieve(2)
            s.finish()  # a second finish succeeds and does nothing
            out.preserve(one, 1)  # after finish it may be preserved again
        assert one.read_all() == b"file 1"  # retrieved fds stay valid after finish
        one.close(), again.close()
        s.close()
        with pytest.raises(errors.NoSuchSession):
            luo.retrieve_session("semantics")


class TestClosedSessionDoesNotSurvive:
    @pytest.mark.before_kexec
    def test_before(self, luo):
        with luo.create_session("closed-before-kexec") as s, Memfd.create("c", b"gone") as m:
            s.preserve(m, 1)

    @pytest.mark.after_kexec
    def test_after(self, luo):
        with pytest.raises(errors.NoSuchSession):
            luo.retrieve_session("closed-before-kexec")


class TestFailedCallsLoseNothing:
    """Every failing call against a session before the kexec leaves it and its files intact."""

    @pytest.mark.before_kexec
    def test_before(self, luo, carry):
        s = luo.create_session("robust")
        keep = Memfd.create("keep", b"must survive")
        s.preserve(keep, 1)
        other = luo.create_session("robust-other")
        null = os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC)
        failures = [
            (errors.TokenInUse, lambda: s.preserve(Memfd.create("dup"), 1)),
            (errors.AlreadyPreserved, lambda: s.preserve(keep, 2)),
            (errors.AlreadyPreserved, lambda: other.preserve(keep, 1)),
            (errors.NotPreservable, lambda: s.preserve(null, 3)),
            (errors.BadFileDescriptor, lambda: s.preserve(999_999, 4)),
            (errors.InvalidToken, lambda: s.preserve(keep, -5)),
            (errors.WrongSessionDirection, lambda: s.finish()),
            (errors.WrongSessionDirection, lambda: s.retrieve(1)),
            (errors.SessionExists, lambda: luo.create_session("robust")),
            (errors.InvalidSessionName, lambda: luo.create_session("")),
            (errors.NoSuchSession, lambda: luo.retrieve_session("robust")),
            (errors.MemfdFrozen, lambda: keep.resize(1)),
            (errors.ArgumentTooLarge, lambda: call(FdKind.LUO_SESSION, s.fileno(), "LIVEUPDATE_SESSION_PRESERVE_FD",
                                                   fd=keep.fileno(), token=6, tail=b"\1")),
        ]
        for expected, bad_call in failures:
            with pytest.raises(expected):
                bad_call()
            assert s.preserved.keys() == {1}, f"after {expected.__name__}"
            assert s.get_name() == "robust"
        os.close(null)
        later = Memfd.create("later", b"added after the failures")
        s.preserve(later, 2)  # the session still accepts files
        other.close()
        carry.hold(s)
        keep.close(), later.close()

    @pytest.mark.after_kexec
    def test_after(self, luo):
        with luo.retrieve_session("robust") as s:
            with Memfd.adopt(s.retrieve(1)) as a, Memfd.adopt(s.retrieve(2)) as b:
                assert a.read_all() == b"must survive"
                assert b.read_all() == b"added after the failures"
            with pytest.raises(errors.NoSuchToken):
                s.retrieve(3)
            s.finish()


class TestDaemonizedHolder:
    """The kernel selftests' way: fork a detached child that inherits the session fds and
    sleeps, then close them here; the sessions survive the kexec in the child."""

    @pytest.mark.before_kexec
    def test_before(self, luo):
        from pyvfio_lu.holder import daemonize_and_hold

        s = luo.create_session("daemon-held")
        with Memfd.create("daemon", b"kept by a forked daemon") as m:
            s.preserve(m, 7)
        pid = daemonize_and_hold(s)
        assert pid > 0 and os.path.exists(f"/proc/{pid}")
        links = [os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")]
        assert "anon_inode:[luo_session] daemon-held" in links
        os.close(s.detach())  # only the daemon holds it now

    @pytest.mark.after_kexec
    def test_after(self, luo):
        with luo.retrieve_session("daemon-held") as s:
            with Memfd.adopt(s.retrieve(7)) as m:
                assert m.read_all() == b"kept by a forked daemon"
            s.finish()
