"""Memfd.create_many and Memfd.verify_many: the batch forms of create and verify (their
loops in C), with the same checks, errors and ownership as the single calls."""

from __future__ import annotations

import fcntl
import os
import subprocess
import sys

import pytest

from pyvfio_lu.errors import BadArgumentType, PyvfioError
from pyvfio_lu.fd import OwnedFd
from pyvfio_lu.memfd import SEALS, ContentMismatch, Memfd


def _open_fds() -> set[int]:
    return {int(n) for n in os.listdir("/proc/self/fd")}


def test_create_many_makes_one_memfd_per_content_as_create_does():
    contents = [b"", b"a", b"file-data-2", bytearray(b"ba"), memoryview(b"mv")]
    made = Memfd.create_many(contents, name="batch", size=64)
    try:
        assert [type(m) for m in made] == [Memfd] * 5
        for m, data in zip(made, contents):
            assert m.size == 64 and m.read_all() == bytes(data) + bytes(64 - len(data))
            assert fcntl.fcntl(m.fileno(), fcntl.F_GETFD) & fcntl.FD_CLOEXEC
            assert os.readlink(f"/proc/self/fd/{m.fileno()}") == "/memfd:batch (deleted)"
            assert m.ledger_record()["name"] == "batch" and m.what == "memfd 'batch'"
            m.seal("grow")  # MFD_ALLOW_SEALING, as create
            assert m.seals & SEALS["grow"]
    finally:
        for m in made:
            m.close()


def test_create_many_without_size_or_sealing_and_of_nothing():
    made = Memfd.create_many((b"x" * n for n in (1, 5000)), sealing=False)
    try:
        assert [m.size for m in made] == [1, 5000]
        assert made[0].seals & SEALS["seal"]  # without MFD_ALLOW_SEALING the kernel sets F_SEAL_SEAL
    finally:
        for m in made:
            m.close()
    assert Memfd.create_many([]) == []


def test_create_many_larger_than_a_gil_free_write():
    big = os.urandom(3 << 20)
    (m,) = Memfd.create_many([big], name="big")
    with m:
        assert m.read_all() == big
        Memfd.verify_many([m], [big])  # read and compared without the GIL
        with pytest.raises(ContentMismatch) as info:
            Memfd.verify_many([m], [big[:-1] + bytes([big[-1] ^ 1])])
        assert info.value.index == 0


@pytest.mark.parametrize(("args", "kwargs", "message"), [
    (([b"a", "text"],), {}, "item 1 must be bytes, not str"),
    ((b"abc",), {}, "contents must be a sequence"),
    (([b"a"],), {"name": "x\0y"}, "a memfd name is a str"),
    (([b"a"],), {"name": "n" * 300}, "a memfd name is a str"),
    (([b"a"],), {"size": -1}, "size"),
    (([b"a"],), {"size": 2**64}, "size"),
])
def test_create_many_checks_everything_first_and_makes_nothing(args, kwargs, message):
    before = _open_fds()
    with pytest.raises(PyvfioError, match=message):
        Memfd.create_many(*args, **kwargs)
    assert _open_fds() == before


def test_create_many_refused_midway_closes_what_it_made_and_names_the_item():
    code = """if True:
    import os, resource
    from pyvfio_lu.memfd import Memfd
    from pyvfio_lu.errors import PyvfioError
    before = set(os.listdir('/proc/self/fd'))
    resource.setrlimit(resource.RLIMIT_NOFILE, (len(before) + 40, len(before) + 40))
    try:
        Memfd.create_many([b'x'] * 100, name='limited')
    except PyvfioError as exc:
        print(type(exc).__name__, exc.errno, exc.index, set(os.listdir('/proc/self/fd')) == before)
        print(exc)
    """
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    first, message = out.splitlines()
    name, err, index, nothing_left = first.split()
    assert name == "FdLimitReached" and int(err) == 24, out  # EMFILE, named as create names it
    assert 30 <= int(index) <= 41 and nothing_left == "True", out
    assert "memfd_create" in message and f"item {index} of 100; none of them was kept" in message


def test_verify_many_accepts_matching_files_of_any_kind():
    made = Memfd.create_many([b"one", b"two", b"three"], name="v")
    try:
        owned = OwnedFd(os.dup(made[1].fileno()), "a dup")
        with owned:
            Memfd.verify_many([made[0], owned, made[2].fileno()], [b"one", bytearray(b"two"), memoryview(b"three")])
        Memfd.verify_many([], [])
    finally:
        for m in made:
            m.close()


@pytest.mark.parametrize(("contents", "expected", "index"), [
    ([b"one", b"two"], [b"one", b"twx"], 1),
    ([b"one", b"two"], [b"one", b"tw"], 1),  # longer than expected
    ([b"one", b"two"], [b"one", b"two!"], 1),  # shorter than expected
    ([b"one", b"two"], [b"on", b"two"], 0),
])
def test_verify_many_names_the_first_file_that_differs(contents, expected, index):
    made = Memfd.create_many(contents, name="v")
    try:
        with pytest.raises(ContentMismatch, match=r"memfd 'v'.*contents differ") as info:
            Memfd.verify_many(made, expected)
        assert info.value.index == index
    finally:
        for m in made:
            m.close()


def test_verify_many_refuses_bad_input_by_name():
    (m,) = Memfd.create_many([b"x"])
    with m:
        with pytest.raises(BadArgumentType, match="expected holds 2 contents"):
            Memfd.verify_many([m], [b"x", b"y"])
        with pytest.raises(BadArgumentType, match="item 0 must be bytes, not int"):
            Memfd.verify_many([m], [5])
        with pytest.raises(BadArgumentType, match="fileno"):
            Memfd.verify_many(["not a file"], [b"x"])
    with pytest.raises(ValueError, match="closed"):
        Memfd.verify_many([m], [b"x"])
