"""LUO in one boot: the 15 cases of the kernel's liveupdate.c selftest, and the cases its
code implies (kernel-contract.md §1.8), through pyvfio_lu on the real kernel."""

from __future__ import annotations

import errno
import gc
import os
import resource

import pytest

from pyvfio_lu import errors
from pyvfio_lu.ioctl import FdKind, call
from pyvfio_lu.luo import LiveUpdate, PreservationLost, Session
from pyvfio_lu.memfd import Memfd


def memfd(data: bytes = b"", name: str = "t") -> Memfd:
    return Memfd.create(name, data)


# --- the kernel selftest's single-boot cases -------------------------------------------------
def test_basic_open_close():
    lu = LiveUpdate()
    assert lu.fileno() >= 0
    assert os.get_inheritable(lu.fileno()) is False  # O_CLOEXEC
    lu.close()
    lu.close()  # idempotent
    assert lu.closed


def test_exclusive_open(luo):
    with pytest.raises(errors.LiveUpdateBusy) as exc:
        LiveUpdate()
    assert exc.value.errno == errno.EBUSY
    assert os.getpid() in exc.value.holders
    assert f"pid {os.getpid()}" in str(exc.value)


def test_create_duplicate_session(luo):
    with luo.create_session("dup-session"):
        with pytest.raises(errors.SessionExists) as exc:
            luo.create_session("dup-session")
        assert exc.value.errno == errno.EEXIST
        assert "dup-session" in str(exc.value) and "EEXIST" in str(exc.value)


def test_create_distinct_sessions(luo):
    with luo.create_session("distinct-a") as a, luo.create_session("distinct-b") as b:
        assert a.fileno() != b.fileno()
        assert os.get_inheritable(a.fileno()) is False


def test_preserve_memfd(luo):
    m, raw = memfd(b"preserved data"), memfd(b"raw fd")
    with luo.create_session("preserve-memfd") as s:
        s.preserve(m, 0x1234)  # an object that describes itself
        s.preserve(raw.fileno(), 0x1235)  # a bare fd: described by its /proc link
        assert s.preserved == {0x1234: "memfd 't'", 0x1235: os.readlink(f"/proc/self/fd/{raw.fileno()}")}
    assert m.read_all() == b"preserved data"  # closing the session un-preserves, data intact
    m.close(), raw.close()


def test_preserve_multiple_memfds(luo):
    a, b = memfd(b"first"), memfd(b"second")
    with luo.create_session("multi-memfd") as s:
        s.preserve(a, 1)
        s.preserve(b, 2)
    assert (a.read_all(), b.read_all()) == (b"first", b"second")
    a.close(), b.close()


def test_preserve_complex_scenario(luo):
    files = []
    with luo.create_session("complex-a") as sa, luo.create_session("complex-b") as sb:
        for i, s in enumerate((sa, sb)):
            data, empty = memfd(f"data-{i}".encode()), memfd()
            s.preserve(data, 10)
            s.preserve(empty, 11)
            files += [(data, f"data-{i}".encode()), (empty, b"")]
    for m, expected in files:
        assert m.read_all() == expected
        m.close()


def test_preserve_unsupported_fd(luo):
    with luo.create_session("unsupported") as s, open("/dev/null", "rb") as null:
        with pytest.raises(errors.NotPreservable) as exc:
            s.preserve(null, 1)
        assert exc.value.errno == errno.ENOENT
        assert "/dev/null" in str(exc.value)
        assert s.preserved == {}


def test_prevent_double_preservation(luo):
    m = memfd(b"once")
    with luo.create_session("double-a") as a, luo.create_session("double-b") as b:
        a.preserve(m, 1)
        with pytest.raises(errors.AlreadyPreserved):
            b.preserve(m, 1)
        with pytest.raises(errors.AlreadyPreserved):
            a.preserve(m, 2)
        # another open file of the same memfd inode is the same object to LUO
        with open(f"/proc/self/fd/{m.fileno()}", "rb") as again:
            with pytest.raises(errors.AlreadyPreserved):
                b.preserve(again, 3)
        assert a.preserved.keys() == {1} and b.preserved == {}
    m.close()


def test_create_session_no_null_termination(luo):
    with pytest.raises(errors.InvalidSessionName):
        luo.create_session("X" * 64)
    # the kernel itself refuses it too (through the raw layer, no Python check)
    with pytest.raises(errors.InvalidArgument):
        call(FdKind.LUO_DEVICE, luo.fileno(), "LIVEUPDATE_IOCTL_CREATE_SESSION", name=b"X" * 64)


def test_create_session_empty_name(luo):
    with pytest.raises(errors.InvalidSessionName):
        luo.create_session("")
    with pytest.raises(errors.InvalidArgument):
        call(FdKind.LUO_DEVICE, luo.fileno(), "LIVEUPDATE_IOCTL_CREATE_SESSION", name=b"")


def test_get_session_name(luo):
    with luo.create_session("get-name-test") as s:
        assert s.get_name() == "get-name-test"


def test_get_session_name_max_length(luo):
    name = "N" * 63
    with luo.create_session(name) as s:
        assert s.get_name() == name


def _raise_nofile(n: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= n:
        return
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (n, max(hard, n)))
    except (ValueError, OSError) as exc:
        pytest.skip(f"cannot raise RLIMIT_NOFILE to {n}: {exc}")


def test_preserve_many_sessions(luo):
    _raise_nofile(2000 + 100)
    sessions = [luo.create_session(f"many-{i}") for i in range(2000)]
    try:
        assert len({s.fileno() for s in sessions}) == 2000
    finally:
        for s in sessions:
            s.close()


def test_preserve_many_files(luo):
    _raise_nofile(500 + 100)
    files = [memfd(f"file-data-{i}".encode()) for i in range(500)]
    with luo.create_session("many-files") as s:
        for i, m in enumerate(files):
            s.preserve(m, i)
        assert len(s.preserved) == 500
    for m in files:
        m.close()


# --- cases the kernel code implies ------------------------------------------------------------
def test_duplicate_token(luo):
    a, b = memfd(b"a"), memfd(b"b")
    with luo.create_session("dup-token") as s:
        s.preserve(a, 7)
        with pytest.raises(errors.TokenInUse) as exc:
            s.preserve(b, 7)
        assert exc.value.errno == errno.EEXIST and "0x7" in str(exc.value)
        s.preserve(b, 8)  # the failure lost nothing: the session still works
        assert s.preserved.keys() == {7, 8}
    # the same token in a different session is fine
    with luo.create_session("dup-token-2") as s2:
        s2.preserve(a, 7)
    a.close(), b.close()


def test_bad_fd_and_bad_input(luo):
    with luo.create_session("bad-input") as s:
        r, w = os.pipe()
        os.close(r), os.close(w)
        with pytest.raises(errors.BadFileDescriptor):
            s.preserve(r, 1)  # a closed fd
        with pytest.raises(errors.InvalidToken):
            s.preserve(memfd(), -1)
        with pytest.raises(errors.InvalidToken):
            s.preserve(memfd(), 2**64)
        with pytest.raises(TypeError):
            s.preserve("not a file", 1)
        assert s.preserved == {}
    with pytest.raises(errors.SessionClosed):
        s.preserve(memfd(), 1)


def test_wrong_direction(luo):
    with luo.create_session("direction") as s:
        with pytest.raises(errors.WrongSessionDirection):
            s.finish()
        with pytest.raises(errors.WrongSessionDirection):
            s.retrieve(1)
        # and the kernel's own answer, through the raw layer
        for name, fields in (("LIVEUPDATE_SESSION_FINISH", {}), ("LIVEUPDATE_SESSION_RETRIEVE_FD", {"token": 1})):
            with pytest.raises(errors.InvalidArgument):
                call(FdKind.LUO_SESSION, s.fileno(), name, **fields)


def test_short_size_and_nonzero_tail(luo):
    with pytest.raises(errors.InvalidArgument):  # size < struct
        call(FdKind.LUO_DEVICE, luo.fileno(), "LIVEUPDATE_IOCTL_CREATE_SESSION", arg_size=8, name=b"short")
    with pytest.raises(errors.ArgumentTooLarge) as exc:  # size > struct with a non-zero tail
        call(FdKind.LUO_DEVICE, luo.fileno(), "LIVEUPDATE_IOCTL_CREATE_SESSION", tail=b"\1", name=b"tail")
    assert exc.value.errno == errno.E2BIG
    # a zero tail is accepted
    arg = call(FdKind.LUO_DEVICE, luo.fileno(), "LIVEUPDATE_IOCTL_CREATE_SESSION", tail=b"\0" * 8, name=b"zero-tail")
    Session(arg.fd, "zero-tail", "outgoing").close()


def test_nonzero_reserved(luo):
    with luo.create_session("reserved") as s:
        with pytest.raises(errors.InvalidArgument):
            call(FdKind.LUO_SESSION, s.fileno(), "LIVEUPDATE_SESSION_GET_NAME", reserved=1)
        assert s.get_name() == "reserved"


def test_size_frozen_after_preserve(luo):
    m = memfd(b"x" * 8192)
    with luo.create_session("frozen") as s:
        s.preserve(m, 1)
        with pytest.raises(errors.MemfdFrozen) as exc:
            m.resize(4096)
        assert exc.value.errno == errno.EPERM
        with pytest.raises(errors.MemfdFrozen):
            m.pwrite_all(b"past the end", 8192)
        with pytest.raises(PermissionError):
            os.posix_fallocate(m.fileno(), 0, 4096)
        m.pwrite_all(b"in place", 0)  # writes within the size are allowed
        m.resize(8192)  # the same size is not a change
    m.resize(4096)  # un-preserved by the close: unfrozen
    assert m.read_all() == b"in place" + b"x" * (4096 - 8)
    m.close()


def test_hugetlb_memfd_not_preservable(luo):
    try:
        fd = os.memfd_create("huge", os.MFD_CLOEXEC | os.MFD_HUGETLB)
    except OSError as exc:
        pytest.skip(f"no hugetlb memfd here: {exc}")
    with luo.create_session("hugetlb") as s:
        with pytest.raises(errors.NotPreservable):
            s.preserve(fd, 1)
    os.close(fd)


def test_retrieve_session_cold_boot(luo):
    with pytest.raises(errors.NoSuchSession) as exc:
        luo.retrieve_session("never-preserved")
    assert exc.value.errno == errno.ENOENT and "never-preserved" in str(exc.value)


def test_session_from_fd(luo):
    with luo.create_session("from-fd") as s:
        dup = os.dup(s.fileno())
        t = Session.from_fd(dup)
        assert (t.name, t.direction) == ("from-fd", "outgoing")
        t.close()


def test_gc_of_session_with_preserved_files_warns(luo):
    m = memfd(b"important")
    s = luo.create_session("gc-warning")
    s.preserve(m, 0xABC)
    with pytest.warns(PreservationLost, match=r"gc-warning.*0xabc"):
        del s
        gc.collect()
    m.resize(1)  # the preservation really is gone: the memfd is no longer frozen
    m.close()


def test_kexec_load_without_cap_sys_boot():
    from pyvfio_lu import kexec

    pid = os.fork()
    if pid == 0:  # the child drops root and tries to load a kernel
        code = 1
        try:
            os.setgid(65534)
            os.setuid(65534)
            try:
                kexec.load("/proc/self/exe", None, "console=ttyS0")
            except errors.KexecNotPermitted as exc:
                code = 0 if exc.errno == errno.EPERM and "CAP_SYS_BOOT" in str(exc) else 2
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


def test_kexec_load_of_a_non_kernel_is_a_named_error(tmp_path):
    from pyvfio_lu import kexec

    junk = tmp_path / "not-a-kernel"
    junk.write_bytes(b"\0" * 4096)
    with pytest.raises(errors.KexecError) as exc:
        kexec.load(str(junk), None, "console=ttyS0")
    assert "kexec_file_load" in str(exc.value) and str(junk) in str(exc.value)
    assert not kexec.loaded()


def test_status_names_session_holders(luo):
    from pyvfio_lu import status
    from pyvfio_lu.holder import Holder

    holder = Holder.spawn("/run/pyvfio-lu-status-test.sock")
    try:
        s = luo.create_session("status-held")
        holder.hold_session(s)
        st = status.status()
        assert st.luo_enabled and st.kho_enabled
        assert os.getpid() in [h["pid"] for h in st.holders_of_device]  # the `luo` fixture's open
        held = st.sessions["status-held"]
        assert len(held) == 1 and held[0]["pid"] != os.getpid() and held[0]["comm"].startswith("python")
    finally:
        holder.stop()  # closes the session: nothing stays preserved
    assert "status-held" not in status.status().sessions


def test_kexec_image_larger_than_kho_scratch(tmp_path):
    """kexec_file_load refuses images that do not fit the KHO scratch area (EADDRNOTAVAIL)."""
    import glob

    from pyvfio_lu import kexec

    try:
        with open("/sys/kernel/debug/kho/out/scratch_len") as fh:
            scratch = sum(int(v, 0) for v in fh.read().split())  # one length per scratch area
    except OSError as exc:
        pytest.skip(f"no KHO scratch size in debugfs: {exc}")
    kernels = glob.glob(os.path.expanduser("~/.cache/pyvfio-lu/kernel/*/bzImage")) + \
        glob.glob(os.environ.get("PYVFIO_LU_CACHE", "/nonexistent") + "/kernel/*/bzImage")
    if not kernels:
        pytest.skip("the test kernel image is not visible in the guest")
    initrd = tmp_path / "huge-initrd"
    with open(initrd, "wb") as fh:  # sparse: costs no memory until the kernel reads it
        fh.truncate(scratch + (64 << 20))
    with pytest.raises(errors.KexecImageTooLarge) as exc:
        kexec.load(kernels[0], str(initrd), "console=ttyS0")
    assert exc.value.errno == errno.EADDRNOTAVAIL and "kho_scratch" in str(exc.value)
    assert not kexec.loaded()


def test_kexec_execute_without_a_loaded_kernel():
    from pyvfio_lu import kexec

    assert not kexec.loaded()
    with pytest.raises(errors.KexecError, match="no kexec kernel is loaded"):
        kexec.execute()
