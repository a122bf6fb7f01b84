"""pyvfio_lu.luo and pyvfio_lu.fd logic that needs no /dev/liveupdate.

Sessions are built on plain fds (pipes): every check that must happen before the kernel
is asked is observable, because a real ioctl on a pipe fails with ENOTTY.
"""

from __future__ import annotations

import gc
import os
import subprocess
import sys
import textwrap
import warnings

import pytest

from pyvfio_lu import luo
from pyvfio_lu.errors import (
    InvalidSessionName,
    InvalidToken,
    NotSupported,
    SessionClosed,
    WrongSessionDirection,
)
from pyvfio_lu.fd import OwnedFd, fileno_of
from pyvfio_lu.luo import INCOMING, OUTGOING, LiveUpdate, PreservationLost, Session


def fd_is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
        return True
    except OSError:
        return False


@pytest.fixture
def pipe():
    """(r, w) pipe fds; whichever the test did not close is closed afterwards."""
    r, w = os.pipe2(os.O_CLOEXEC)
    yield r, w
    for fd in (r, w):
        try:
            os.close(fd)
        except OSError:
            pass


@pytest.fixture
def no_ioctl(monkeypatch):
    """Fail the test if Session issues any ioctl."""
    calls = []
    monkeypatch.setattr(luo, "call", lambda *a, **k: calls.append(a) or pytest.fail(f"ioctl issued: {a}"))
    return calls


# --- encode_name ------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["a", "vm-1", "x" * 63, b"raw-bytes", bytearray(b"ba")])
def test_encode_name_accepts_1_to_63_bytes(name):
    raw = luo.encode_name(name)
    assert raw == (name.encode() if isinstance(name, str) else bytes(name))


@pytest.mark.parametrize("name", ["", b"", "x" * 64, b"y" * 100])
def test_encode_name_rejects_empty_and_over_63_bytes(name):
    with pytest.raises(InvalidSessionName) as info:
        luo.encode_name(name)
    assert isinstance(info.value, ValueError)
    assert f"got {len(name)} bytes" in str(info.value)


@pytest.mark.parametrize("name", ["a\0b", b"\0", "trailing\0"])
def test_encode_name_rejects_nul(name):
    with pytest.raises(InvalidSessionName, match="containing a NUL"):
        luo.encode_name(name)


def test_encode_name_counts_utf8_bytes_not_characters():
    assert luo.encode_name("é" * 31) == "é".encode() * 31  # 62 bytes
    assert len(luo.encode_name("€" * 21)) == 63
    with pytest.raises(InvalidSessionName, match="got 64 bytes"):
        luo.encode_name("é" * 32)  # 32 characters, 64 bytes


def test_name_max_leaves_room_for_the_kernel_terminator():
    assert luo.NAME_MAX == luo.lib.LIVEUPDATE_SESSION_NAME_LENGTH - 1


# --- check_token ------------------------------------------------------------------------------
@pytest.mark.parametrize("token", [0, 1, 2**63, 2**64 - 1])
def test_check_token_accepts_u64(token):
    assert luo.check_token(token) == token


@pytest.mark.parametrize("token", [-1, 2**64, 2**80])
def test_check_token_rejects_out_of_u64(token):
    with pytest.raises(InvalidToken):
        luo.check_token(token)


@pytest.mark.parametrize("token", [True, False, 1.0, "1", None, b"\x01"])
def test_check_token_rejects_non_integers_and_bools(token):
    with pytest.raises(InvalidToken) as info:
        luo.check_token(token)
    assert isinstance(info.value, ValueError)


# --- fileno_of --------------------------------------------------------------------------------
def test_fileno_of_int_and_object_with_fileno(pipe):
    r, _ = pipe
    assert fileno_of(r) == r
    assert fileno_of(OwnedFd(r, owned=False)) == r


@pytest.mark.parametrize("bad", [True, False, "3", 3.0, None])
def test_fileno_of_rejects_bools_and_non_fds_with_type_error(bad):
    with pytest.raises(TypeError):
        fileno_of(bad)


def test_fileno_of_rejects_negative_fd():
    with pytest.raises(ValueError):
        fileno_of(-1)


# --- OwnedFd ------------------------------------------------------------------------------------
def test_owned_fd_close_closes_once_and_is_idempotent(pipe):
    fd = os.dup(pipe[0])
    f = OwnedFd(fd, "pipe")
    f.close()
    assert f.closed and not fd_is_open(fd)
    reused = os.dup(pipe[1])  # most likely gets the number just freed
    try:
        f.close()  # no error, and whatever holds the number now stays open
        assert fd_is_open(reused)
    finally:
        os.close(reused)


def test_owned_fd_fileno_after_close_raises(pipe):
    f = OwnedFd(os.dup(pipe[0]), "dup")
    f.close()
    with pytest.raises(ValueError, match="closed dup"):
        f.fileno()


def test_owned_fd_detach_hands_over_without_closing(pipe):
    fd = os.dup(pipe[0])
    f = OwnedFd(fd)
    assert f.detach() == fd
    assert f.closed
    f.close()
    assert fd_is_open(fd)
    os.close(fd)


def test_owned_fd_context_manager_closes(pipe):
    fd = os.dup(pipe[0])
    with OwnedFd(fd) as f:
        assert f.fileno() == fd
    assert not fd_is_open(fd)


def test_owned_fd_garbage_collected_open_warns_and_closes(pipe):
    fd = os.dup(pipe[0])
    f = OwnedFd(fd, "leaky")
    with pytest.warns(ResourceWarning, match=r"unclosed leaky \(fd \d+\)"):
        del f
        gc.collect()
    assert not fd_is_open(fd)


def test_borrowed_fd_is_never_closed_nor_warned_about(pipe):
    r, _ = pipe
    f = OwnedFd(r, owned=False)
    f.close()
    assert fd_is_open(r)
    g = OwnedFd(r, owned=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        del g
        gc.collect()
    assert fd_is_open(r)


# --- Session on a plain fd: checks before any ioctl --------------------------------------------
def test_session_rejects_unknown_direction(pipe):
    with pytest.raises(ValueError):
        Session(pipe[0], "s", "sideways", owned=False)


@pytest.mark.parametrize("verb,args", [("finish", ()), ("retrieve", (1,))])
def test_incoming_only_verbs_on_outgoing_session_fail_before_ioctl(pipe, no_ioctl, verb, args):
    s = Session(pipe[0], "out", OUTGOING, owned=False)
    with pytest.raises(WrongSessionDirection) as info:
        getattr(s, verb)(*args)
    assert "needs an incoming session" in str(info.value) and "'out' is outgoing" in str(info.value)
    assert no_ioctl == []


def test_preserve_on_incoming_session_fails_before_ioctl(pipe, no_ioctl):
    s = Session(pipe[0], "in", INCOMING, owned=False)
    with pytest.raises(WrongSessionDirection, match="needs an outgoing session"):
        s.preserve(pipe[1], 1)
    assert no_ioctl == []


def test_direction_is_checked_even_against_the_real_kernel(pipe):
    """Without the stand-in: a pipe would answer ENOTTY, so this error can only come first."""
    s = Session(pipe[0], "out", OUTGOING, owned=False)
    with pytest.raises(WrongSessionDirection):
        s.finish()


def test_bad_token_is_rejected_before_ioctl(pipe, no_ioctl):
    s = Session(pipe[0], "out", OUTGOING, owned=False)
    with pytest.raises(InvalidToken):
        s.preserve(pipe[1], -1)
    with pytest.raises(InvalidToken):
        Session(pipe[0], "in", INCOMING, owned=False).retrieve(True)


@pytest.mark.parametrize("verb,args", [("finish", ()), ("retrieve", (1,)), ("preserve", (0, 1)),
                                       ("get_name", ()), ("fileno", ())])
def test_every_verb_after_close_raises_session_closed(pipe, no_ioctl, verb, args):
    s = Session(os.dup(pipe[0]), "gone", OUTGOING)
    s.close()
    with pytest.raises(SessionClosed):
        getattr(s, verb)(*args)


def test_session_close_closes_an_owned_fd_and_keeps_a_borrowed_one(pipe):
    fd = os.dup(pipe[0])
    Session(fd, "owned", OUTGOING).close()
    assert not fd_is_open(fd)
    Session(pipe[0], "borrowed", OUTGOING, owned=False).close()
    assert fd_is_open(pipe[0])


def test_session_detach_returns_fd_and_forgets_preserved(pipe):
    fd = os.dup(pipe[0])
    s = Session(fd, "d", OUTGOING)
    s._preserved[1] = "memfd"
    assert s.detach() == fd
    assert s.preserved == {} and s.closed
    assert fd_is_open(fd)
    os.close(fd)


def test_preserve_on_a_non_session_fd_reaches_the_kernel(pipe):
    """Past the Python-side checks, PRESERVE_FD is issued: a pipe answers ENOTTY."""
    s = Session(pipe[0], "out", OUTGOING, owned=False)
    with pytest.raises(NotSupported) as info:
        s.preserve(pipe[1], 7)
    assert "LIVEUPDATE_SESSION_PRESERVE_FD" in str(info.value) and "ENOTTY" in str(info.value)
    assert s.preserved == {}


def test_create_session_on_a_non_luo_fd_reaches_the_kernel(pipe):
    lu = LiveUpdate.from_fd(pipe[0], owned=False)
    with pytest.raises(NotSupported) as info:
        lu.create_session("vm-1")
    assert "LIVEUPDATE_IOCTL_CREATE_SESSION" in str(info.value) and "'vm-1'" in str(info.value)


def test_create_session_validates_the_name_before_ioctl(pipe, no_ioctl):
    lu = LiveUpdate.from_fd(pipe[0], owned=False)
    with pytest.raises(InvalidSessionName):
        lu.create_session("")
    with pytest.raises(InvalidSessionName):
        lu.retrieve_session("x" * 64)


def test_from_fd_rejects_a_non_session_fd_before_ioctl(pipe, no_ioctl):
    with pytest.raises(OSError, match="not a LUO session fd"):
        Session.from_fd(pipe[0], owned=False)


# --- PreservationLost ----------------------------------------------------------------------------
def test_gc_of_session_with_preserved_files_warns_preservation_lost(pipe):
    fd = os.dup(pipe[0])
    s = Session(fd, "lost", OUTGOING)
    s._preserved[0x10] = "/memfd:ram (deleted)"
    with pytest.warns(PreservationLost, match=r"'lost'.*0x10 \(/memfd:ram \(deleted\)\)"):
        del s
        gc.collect()
    assert not fd_is_open(fd)


def test_gc_of_session_without_preserved_files_is_silent(pipe):
    s = Session(os.dup(pipe[0]), "quiet", OUTGOING)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        del s
        gc.collect()


def test_preservation_lost_is_a_resource_warning():
    assert issubclass(PreservationLost, ResourceWarning)


def test_preservation_lost_is_shown_under_default_warning_filters():
    """Plain ResourceWarnings are hidden by default; this one must not be."""
    code = textwrap.dedent("""
        import gc, os
        from pyvfio_lu.luo import Session, OUTGOING
        r, w = os.pipe()
        s = Session(r, "shown", OUTGOING)
        s._preserved[1] = "memfd"
        del s
        gc.collect()
    """)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "PreservationLost: LUO session 'shown' was garbage-collected" in proc.stderr


@pytest.mark.parametrize(("page", "sessions", "files"), [
    (4096, 510_000, 630_000),      # (4096 - 16) // 80 = 51 and // 64 = 63 entries per block
    (16384, 2_040_000, 2_550_000),
    (65536, 8_190_000, 10_230_000),
])
def test_kernel_limits_follow_the_block_layout(page, sessions, files):
    assert luo.kernel_limits(page) == (sessions, files)


def test_kernel_limits_default_to_this_machines_page_size():
    assert luo.kernel_limits() == luo.kernel_limits(os.sysconf("SC_PAGE_SIZE"))
