"""pyvfio_lu.memfd: create with contents, seals, state, verification."""

from __future__ import annotations

import fcntl
import hashlib
import os

import pytest

from pyvfio_lu.errors import MemfdFrozen, PermissionDenied
from pyvfio_lu.fd import OwnedFd
from pyvfio_lu.memfd import SEALS, ContentMismatch, Memfd, MemfdState


@pytest.fixture
def make():
    made: list[Memfd] = []

    def _make(*args, **kwargs) -> Memfd:
        made.append(Memfd.create(*args, **kwargs))
        return made[-1]

    yield _make
    for m in made:
        m.close()


# --- create ---------------------------------------------------------------------------------------
def test_create_holds_the_data(make):
    m = make("t", data=b"hello world")
    assert m.read_all() == b"hello world"
    assert m.size == 11


def test_create_with_size_pads_with_zeros(make):
    m = make("t", data=b"abc", size=4096)
    assert m.size == 4096
    assert m.read_all() == b"abc" + bytes(4093)


def test_create_with_size_smaller_than_data_grows_to_the_data(make):
    assert make("t", data=b"0123456789", size=4).size == 10


def test_create_empty(make):
    m = make()
    assert m.size == 0 and m.read_all() == b""


def test_create_is_cloexec_and_named(make):
    m = make("guest-ram")
    assert os.get_inheritable(m.fileno()) is False
    assert os.readlink(f"/proc/self/fd/{m.fileno()}") == "/memfd:guest-ram (deleted)"


def test_memfd_is_an_owned_fd(make):
    m = make()
    fd = m.fileno()
    assert isinstance(m, OwnedFd)
    m.close()
    with pytest.raises(OSError):
        os.fstat(fd)


def test_adopt_takes_over_an_owned_fd(make):
    src = make("orig", data=b"x")
    owned = OwnedFd(os.dup(src.fileno()), "retrieved file 0x1")
    m = Memfd.adopt(owned)
    try:
        assert owned.closed and m.what == "retrieved file 0x1"
        assert m.read_all() == b"x"
    finally:
        m.close()


def test_pwrite_all_at_an_offset_extends(make):
    m = make(data=b"ab")
    m.pwrite_all(b"XY", 5)
    assert m.read_all() == b"ab\0\0\0XY"


def test_position_and_seek(make):
    m = make(data=b"0123456789")
    assert m.position == 0
    m.seek(7)
    assert m.position == 7
    assert m.read_all() == b"0123456789"  # pread: the position is untouched
    assert m.position == 7


def test_resize(make):
    m = make(data=b"0123456789")
    m.resize(4)
    assert m.read_all() == b"0123"


# --- read_all of large, sparse memfds ---------------------------------------------------------------
def test_read_all_of_a_large_sparse_memfd_crosses_chunks(make):
    size = 40 << 20  # three 16 MiB reads
    m = make("sparse", size=size)
    m.pwrite_all(b"head", 0)
    m.pwrite_all(b"middle", (16 << 20) - 3)  # straddles the first chunk boundary
    m.pwrite_all(b"tail", size - 4)
    data = m.read_all()
    assert len(data) == size
    assert data[:4] == b"head"
    assert data[(16 << 20) - 3:(16 << 20) + 3] == b"middle"
    assert data[-4:] == b"tail"
    assert data.count(0) == size - 14


# --- seals -------------------------------------------------------------------------------------------
def test_seal_names_map_to_the_fcntl_bits():
    assert SEALS == {
        "seal": fcntl.F_SEAL_SEAL,
        "shrink": fcntl.F_SEAL_SHRINK,
        "grow": fcntl.F_SEAL_GROW,
        "write": fcntl.F_SEAL_WRITE,
        "future_write": 0x0010,
    }


def test_seal_adds_the_named_seals(make):
    m = make(data=b"x")
    assert m.seals == 0
    m.seal("shrink", "grow")
    assert m.seals == fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW
    m.seal("future_write")
    assert m.seals == fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | 0x0010


def test_seal_grow_stops_growth(make):
    m = make(data=b"x")
    m.seal("grow")
    with pytest.raises(OSError) as info:
        m.resize(100)
    assert info.value.errno == 1  # EPERM
    assert m.size == 1


def test_resize_of_a_sealed_memfd_is_not_blamed_on_live_update(make):
    """EPERM from a seal is not the LUO size freeze: the message must not send the user
    looking for a preserved session that does not exist."""
    m = make(data=b"x")
    m.seal("grow", "shrink")
    with pytest.raises(OSError) as info:
        m.resize(4096)
    assert not isinstance(info.value, MemfdFrozen), str(info.value)
    assert "seal" in str(info.value)


@pytest.mark.parametrize("bad", ["Seal", "exec", "", "writes"])
def test_unknown_seal_name_is_rejected_and_nothing_is_sealed(make, bad):
    m = make()
    with pytest.raises(ValueError, match=f"unknown seal {bad!r}"):
        m.seal("shrink", bad)
    assert m.seals == 0


def test_sealing_a_memfd_created_without_sealing_fails(make):
    m = make(sealing=False)
    with pytest.raises(PermissionDenied) as info:
        m.seal("grow")
    assert "F_ADD_SEALS" in str(info.value)


def test_seal_seal_forbids_further_seals(make):
    m = make()
    m.seal("seal")
    with pytest.raises(PermissionDenied):
        m.seal("grow")


# --- state and verify ------------------------------------------------------------------------------
def test_state_captures_size_position_seals_and_hash(make):
    m = make(data=b"payload", size=16)
    m.seek(3)
    m.seal("grow")
    st = m.state()
    assert st == MemfdState(16, 3, fcntl.F_SEAL_GROW, hashlib.sha256(b"payload" + bytes(9)).hexdigest())
    assert st.to_json() == {"size": 16, "position": 3, "seals": fcntl.F_SEAL_GROW, "sha256": st.sha256}


def test_verify_accepts_its_own_state_its_json_and_its_bytes(make):
    m = make(data=b"same")
    m.verify(m.state())
    m.verify(m.state().to_json())
    m.verify(b"same")
    m.verify(bytearray(b"same"))


def test_verify_bytes_mismatch_is_content_mismatch(make):
    m = make(data=b"abc")
    with pytest.raises(ContentMismatch, match="contents differ: 3 bytes, expected 4"):
        m.verify(b"abcd")


@pytest.mark.parametrize("field,value", [("size", 99), ("position", 1), ("seals", 4), ("sha256", "0" * 64)])
def test_verify_names_the_field_that_differs(make, field, value):
    m = make(data=b"abc")
    expected = m.state().to_json()
    expected[field] = value
    with pytest.raises(ContentMismatch) as info:
        m.verify(expected)
    msg = str(info.value)
    assert msg.startswith(f"verify on {m.what}: {field}: ")
    assert f"expected {value!r}" in msg
    assert ";" not in msg  # only the differing field is listed


def test_verify_lists_every_differing_field(make):
    m = make(data=b"abc")
    with pytest.raises(ContentMismatch) as info:
        m.verify(MemfdState(1, 2, 3, "x"))
    assert all(f in str(info.value) for f in ("size:", "position:", "seals:", "sha256:"))


def test_content_mismatch_is_a_value_error_and_an_oserror():
    assert issubclass(ContentMismatch, ValueError) and issubclass(ContentMismatch, OSError)
