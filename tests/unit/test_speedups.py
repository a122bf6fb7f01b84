"""The pure logic of pyvfio_lu._speedups over ordinary memory: bounds, alignment and width
checks, the fallbacks, a closed Window, the block loops, the overlap and sum helpers, and
ioctl_rw's argument checks. Register access on a real BAR and every ioctl path are proven
in the guest (tests/guest/test_batch.py); here the memory is a bytearray."""

from __future__ import annotations

import struct
import termios
from array import array

import pytest

from pyvfio_lu import _speedups
from pyvfio_lu._cffi import ffi
from pyvfio_lu._speedups import Block, Registers
from pyvfio_lu.ioctl import layout, template

SIZE = 64


@pytest.fixture
def window():
    memory = bytearray(range(SIZE))
    calls: list[tuple[object, ...]] = []

    def read_fallback(offset, width):
        calls.append(("read", offset, width))
        return "fallback"

    def write_fallback(offset, value, width):
        calls.append(("write", offset, value, width))

    address = int(ffi.cast("uintptr_t", ffi.from_buffer(memory)))
    w = _speedups.Window(address, SIZE, read_fallback, write_fallback)
    yield w, memory, calls


def test_reads_and_writes_of_each_width_hit_exactly_those_bytes(window):
    w, memory, calls = window
    assert w.read8(5) == 5
    assert w.read16(2) == struct.unpack_from("=H", memory, 2)[0]
    assert w.read32(4) == struct.unpack_from("=I", memory, 4)[0]
    assert w.read64(8) == struct.unpack_from("=Q", memory, 8)[0]
    w.write16(16, 0xBEEF)
    assert struct.unpack_from("=H", memory, 16)[0] == 0xBEEF and memory[18] == 18  # nothing past 2 bytes
    w.write64(SIZE - 8, 2**64 - 1)
    assert memory[SIZE - 8:] == b"\xff" * 8
    assert calls == []


@pytest.mark.parametrize("offset", [SIZE - 2, SIZE, 2, -4, 2**70, 1.0, "4", True, None])
def test_an_offset_the_fast_path_does_not_take_goes_to_the_fallback(window, offset):
    w, _memory, calls = window
    assert w.read32(offset) == "fallback"
    w.write32(offset, 1)
    assert calls == [("read", offset, 4), ("write", offset, 1, 4)]


@pytest.mark.parametrize("value", [2**32, -1, 1.5, "1", None])
def test_a_value_that_does_not_fit_goes_to_the_fallback_and_nothing_is_stored(window, value):
    w, memory, calls = window
    before = bytes(memory)
    w.write32(0, value)
    assert calls == [("write", 0, value, 4)] and bytes(memory) == before


def test_a_closed_window_touches_nothing(window):
    w, memory, calls = window
    w.close()
    assert w.size == -1 and w.base == 0
    assert w.read8(0) == "fallback"
    w.write8(0, 1)
    assert w.poll(0, 4, 0, 0, 0) is None
    assert calls == [("read", 0, 1), ("write", 0, 1, 1)] and memory[0] == 0


def test_poll_matches_at_once_times_out_and_refuses_a_bad_offset(window):
    w, memory, _calls = window
    assert w.poll(4, 4, 0xFF, 4, 10**9) == (True, struct.unpack_from("=I", memory, 4)[0], 1)
    matched, last, reads = w.poll(4, 4, 0xFF, 0x55, 10**6)  # 1 ms
    assert not matched and last == struct.unpack_from("=I", memory, 4)[0] and reads >= 1
    assert w.poll(SIZE, 4, 1, 1, 0) is None and w.poll(2, 4, 1, 1, 0) is None
    with pytest.raises(ValueError):
        w.poll(0, 3, 1, 1, 0)


def test_registers_read_and_write_by_subscript_at_exactly_their_width(window):
    w, memory, calls = window
    r8, r16, r32, r64 = (Registers(w, width) for width in (1, 2, 4, 8))
    assert (r8.width, r64.width) == (1, 8)
    assert r8[5] == 5 and r16[2] == struct.unpack_from("=H", memory, 2)[0]
    assert r32[4] == struct.unpack_from("=I", memory, 4)[0] and r64[8] == struct.unpack_from("=Q", memory, 8)[0]
    r16[16] = 0xBEEF
    assert struct.unpack_from("=H", memory, 16)[0] == 0xBEEF and memory[18] == 18  # nothing past 2 bytes
    r64[SIZE - 8] = 2**64 - 1
    assert memory[SIZE - 8:] == b"\xff" * 8 and calls == []
    before = bytes(memory)
    assert r32[2] == "fallback" and r32[SIZE] == "fallback"  # misaligned, outside: the fallback names it
    r32[0] = 2**32  # too wide for 32 bits: the fallback, nothing stored
    assert calls == [("read", 2, 4), ("read", SIZE, 4), ("write", 0, 2**32, 4)] and bytes(memory) == before
    with pytest.raises(TypeError, match="deleted"):
        del r32[0]
    with pytest.raises(TypeError, match="not iterable"):
        iter(r32)
    w.close()
    assert r32[0] == "fallback"  # a closed window touches nothing
    r32[0] = 1
    assert calls[-2:] == [("read", 0, 4), ("write", 0, 1, 4)] and bytes(memory) == before


def test_registers_want_a_window_and_a_width(window):
    w, _memory, _calls = window
    with pytest.raises(TypeError, match="Window"):
        Registers("not a window", 4)
    with pytest.raises(ValueError, match="width"):
        Registers(w, 3)


def test_block_reads_in_order_and_writes_only_values_that_fit(window):
    w, memory, _calls = window
    offsets, values, result = array("Q", [8, 0, 8]), array("Q", [0, 0, 0]), object()
    addr = lambda a: a.buffer_info()[0]  # noqa: E731
    filled, wide = [], []

    def closed():
        raise ConnectionAbortedError("closed")

    def fill(new):
        filled.append(new)
        values[0], values[1], values[2] = new

    block = Block(w, 4, 3, addr(offsets), addr(values), result, fill, closed, wide.append)
    assert block.read() is result
    at8, at0 = struct.unpack_from("=I", memory, 8)[0], struct.unpack_from("=I", memory, 0)[0]
    assert list(values) == [at8, at0, at8]
    values[0], values[1], values[2] = 1, 2, 3
    assert block.write() is None
    assert struct.unpack_from("=I", memory, 8)[0] == 3 and struct.unpack_from("=I", memory, 0)[0] == 2
    values[1] = 2**32
    block.write()
    assert wide == [1] and struct.unpack_from("=I", memory, 8)[0] == 3  # nothing written
    block.write((7, 8, 9))
    assert filled == [(7, 8, 9)] and struct.unpack_from("=I", memory, 0)[0] == 8
    with pytest.raises(TypeError):
        block.write(1, 2)
    w.close()
    with pytest.raises(ConnectionAbortedError):
        block.read()
    with pytest.raises(ConnectionAbortedError):
        block.write((1, 2, 3))
    assert filled == [(7, 8, 9)]  # nothing filled once closed
    quiet = Block(w, 4, 3, addr(offsets), addr(values), result, fill, lambda: None, wide.append)
    with pytest.raises(ValueError, match="closed"):  # a closed() that does not raise still stops the access
        quiet.read()


@pytest.mark.parametrize("args", [
    ("not a window", 4, 1, 8, 8),
    (None, 4, 1, 8, 8),
])
def test_block_wants_a_window_and_two_arrays(window, args):
    with pytest.raises(TypeError, match="Window"):
        Block(*args, None, None, None, None)


def test_block_checks_width_and_addresses(window):
    w, _memory, _calls = window
    with pytest.raises(ValueError, match="width"):
        Block(w, 3, 1, 8, 8, None, None, None, None)
    with pytest.raises(TypeError, match="Window"):
        Block(w, 4, 1, 0, 8, None, None, None, None)


def test_first_overlap_and_sum():
    iovas, sizes = array("Q", [0x1000, 0x3000, 0x8000]), array("Q", [0x1000, 0x2000, 0x1000])
    at = lambda a: a.buffer_info()[0]  # noqa: E731
    assert _speedups.first_overlap(at(iovas), at(sizes), 3, 0, 0x1000) == -1
    assert _speedups.first_overlap(at(iovas), at(sizes), 3, 0x1fff, 1) == 0
    assert _speedups.first_overlap(at(iovas), at(sizes), 3, 0x2000, 0x1001) == 1
    assert _speedups.first_overlap(at(iovas), at(sizes), 3, 0x5000, 0x3000) == -1
    assert _speedups.first_overlap(at(iovas), at(sizes), 3, 0x7000, 2**64 - 0x7000) == 2  # to the top, no wrap
    assert _speedups.first_overlap(at(iovas), at(sizes), 3, 0x1000, 0) == -1
    assert _speedups.sum_u64(at(sizes), 3) == 0x4000 and _speedups.sum_u64(at(sizes), 0) == 0


def test_ioctl_rw_returns_minus_errno_and_checks_its_argument():
    import os

    r, w = os.pipe()
    try:
        os.write(w, b"abc")
        got = _speedups.ioctl_rw(r, termios.FIONREAD, bytes(8), False)
        assert isinstance(got, bytes) and struct.unpack_from("=i", got)[0] == 3
        assert _speedups.ioctl_rw(r, termios.FIONREAD, bytes(8), True)[:4] == got[:4]  # with the GIL released
        assert _speedups.ioctl_rw(-1, termios.FIONREAD, bytes(8), False) < 0  # EBADF, as -errno
        assert _speedups.ioctl_rw(2**80, termios.FIONREAD, bytes(8), False) < 0  # not an fd: EBADF, no OverflowError
        for bad in (b"", bytes(513)):
            with pytest.raises(ValueError):
                _speedups.ioctl_rw(r, termios.FIONREAD, bad, False)
        with pytest.raises(TypeError):
            _speedups.ioctl_rw(r, termios.FIONREAD, "text", False)
    finally:
        os.close(r)
        os.close(w)


def test_layout_and_template_follow_cffi():
    packer = layout("iommu_ioas_map", "size flags ioas_id __reserved user_va length iova")
    assert packer.size == ffi.sizeof("struct iommu_ioas_map") and packer.format == "=IIIIQQQ"
    with pytest.raises(AssertionError):
        layout("iommu_ioas_map", "size flags")
    t = template("vfio_device_info")
    assert len(t) == ffi.sizeof("struct vfio_device_info") and struct.unpack_from("=I", t)[0] == len(t)


def test_ioctl_record_and_text_make_their_result_in_one_call():
    import os

    from pyvfio_lu.vfio.records import DeviceInfo

    r, w = os.pipe()
    try:
        os.write(w, b"abcdef")
        got = _speedups.ioctl_record(r, termios.FIONREAD, bytes(24), DeviceInfo, 0, 3, ((),))
        assert type(got) is DeviceInfo and got == (6, 0, 0, ()) and got.caps == ()
        assert _speedups.ioctl_record(-1, termios.FIONREAD, bytes(24), DeviceInfo, 0, 3, ((),)) < 0
        for cls in (int, tuple, "x"):  # only a namedtuple-like class (a heap tuple subclass)
            with pytest.raises(TypeError):
                _speedups.ioctl_record(r, termios.FIONREAD, bytes(24), cls, 0, 3, ())
        with pytest.raises(ValueError):
            _speedups.ioctl_record(r, termios.FIONREAD, bytes(24), DeviceInfo, 5, 3, ())
        # FIONREAD writes an int (6) at offset 0: the text is b"\x06", up to the first NUL
        assert _speedups.ioctl_text(r, termios.FIONREAD, b"\0\0\0\0xyz\xff" + bytes(8), 0, 16) == "\x06"
        assert _speedups.ioctl_text(r, termios.FIONREAD, b"\0\0\0\0xyz\xff" + bytes(8), 4, 4) == "xyz\udcff"
        assert _speedups.ioctl_text(-1, termios.FIONREAD, bytes(8), 0, 8) < 0
        with pytest.raises(ValueError):
            _speedups.ioctl_text(r, termios.FIONREAD, bytes(8), 4, 8)
    finally:
        os.close(r)
        os.close(w)
