"""pyvfio_lu.ioctl, the raw layer: request lookup by fd kind, argument building, errors.

No kernel feature is needed: a real ioctl on /dev/null returns ENOTTY, and argument
building is observed through a stand-in for the compiled ``lib`` that records what
``call`` would hand the kernel.
"""

from __future__ import annotations

import os

import pytest

from pyvfio_lu import ioctl
from pyvfio_lu._cffi import ffi, lib
from pyvfio_lu.errors import InvalidArgument, NotSupported, WrongFdKind
from pyvfio_lu.ioctl import REQUESTS, Arg, FdKind

STRUCT_REQUESTS = sorted(
    {(kind, name) for kind, table in REQUESTS.items() for name, req in table.items() if isinstance(req.arg, str)},
    key=lambda kn: (kn[0].name, kn[1]),
)


def _id(kind_name):
    return f"{kind_name[0].name}-{kind_name[1]}"


def raw_bytes(arg, length: int) -> bytes:
    return bytes(ffi.buffer(ffi.cast("char *", arg), length))


class RecordingLib:
    """Stands in for the compiled lib inside pyvfio_lu.ioctl: records each ioctl, returns ``ret``.

    Struct arguments are recorded as the cdata itself (the test knows how long it must be;
    reading by the size field could run past a short allocation).
    """

    def __init__(self, ret: int = 0):
        self.ret = ret
        self.calls: list[tuple] = []

    def pvl_ioctl(self, fd, number, arg):
        self.calls.append((fd, number, None if arg == ffi.NULL else arg))
        return self.ret

    def pvl_ioctl_val(self, fd, number, value):
        self.calls.append((fd, number, value))
        return self.ret

    def sent(self, length: int) -> bytes:
        """The first ``length`` bytes of the last struct argument."""
        return raw_bytes(self.calls[-1][2], length)


@pytest.fixture
def recording(monkeypatch) -> RecordingLib:
    rec = RecordingLib()
    monkeypatch.setattr(ioctl, "lib", rec)
    return rec


@pytest.fixture
def devnull():
    fd = os.open("/dev/null", os.O_RDWR | os.O_CLOEXEC)
    yield fd
    os.close(fd)


# --- the table ----------------------------------------------------------------------------
def test_every_request_number_is_the_compiled_constant():
    for table in REQUESTS.values():
        for name, req in table.items():
            assert req.name == name
            assert req.number == getattr(lib, name)


@pytest.mark.parametrize("kind_name", STRUCT_REQUESTS, ids=_id)
def test_size_field_is_the_first_u32_of_the_struct(kind_name):
    req = REQUESTS[kind_name[0]][kind_name[1]]
    ctype = ffi.typeof(f"struct {req.arg}")
    fields = dict(ctype.fields)
    assert req.size_field in ("argsz", "size")
    assert req.size_field in fields
    assert ffi.offsetof(ctype, req.size_field) == 0
    assert fields[req.size_field].type is ffi.typeof("uint32_t")


def test_requests_without_struct_have_no_size_field():
    for table in REQUESTS.values():
        for req in table.values():
            assert (req.size_field is None) == isinstance(req.arg, Arg)


# --- new_arg --------------------------------------------------------------------------------
@pytest.mark.parametrize("kind_name", STRUCT_REQUESTS, ids=_id)
def test_new_arg_is_zeroed_with_size_field_set_to_sizeof(kind_name):
    req = REQUESTS[kind_name[0]][kind_name[1]]
    n = ffi.sizeof(f"struct {req.arg}")
    arg = ioctl.new_arg(req)
    assert ffi.typeof(arg) is ffi.typeof(f"struct {req.arg} *")
    assert getattr(arg, req.size_field) == n
    assert raw_bytes(arg, n)[4:] == bytes(n - 4)


@pytest.mark.parametrize("kind_name", STRUCT_REQUESTS, ids=_id)
def test_new_arg_with_extra_counts_it_in_the_size_and_zeroes_it(kind_name):
    req = REQUESTS[kind_name[0]][kind_name[1]]
    n = ffi.sizeof(f"struct {req.arg}")
    arg = ioctl.new_arg(req, extra=40)
    assert getattr(arg, req.size_field) == n + 40
    assert raw_bytes(arg, n + 40)[4:] == bytes(n + 36)


@pytest.mark.parametrize("kind_name", STRUCT_REQUESTS, ids=_id)
def test_new_arg_size_override_sets_only_the_size_field(kind_name):
    req = REQUESTS[kind_name[0]][kind_name[1]]
    n = ffi.sizeof(f"struct {req.arg}")
    arg = ioctl.new_arg(req, extra=8, size=3)
    assert getattr(arg, req.size_field) == 3
    assert raw_bytes(arg, n + 8)[4:] == bytes(n + 4)


def test_new_arg_fields_are_assignable():
    arg = ioctl.new_arg(ioctl.request(FdKind.IOMMUFD, "IOMMU_IOAS_MAP"))
    arg.flags, arg.ioas_id, arg.user_va, arg.length, arg.iova = 6, 3, 0x7F0000001000, 1 << 21, 1 << 30
    assert (arg.size, arg.flags, arg.ioas_id, arg.user_va, arg.length, arg.iova) == (
        40, 6, 3, 0x7F0000001000, 1 << 21, 1 << 30)


# --- call(): what reaches the kernel ---------------------------------------------------------
def test_call_passes_number_size_and_fields(recording):
    ret = ioctl.call(FdKind.IOMMUFD, 7, "IOMMU_IOAS_UNMAP", ioas_id=5, iova=0x1000, length=0x2000)
    fd, number, _ = recording.calls[-1]
    data = recording.sent(24)
    assert (fd, number) == (7, 0x3B86)
    expect = ffi.new("struct iommu_ioas_unmap *", {"size": 24, "ioas_id": 5, "iova": 0x1000, "length": 0x2000})
    assert data == raw_bytes(expect, 24)
    assert ret.ioas_id == 5  # the argument struct comes back


def test_call_tail_bytes_land_right_after_the_struct(recording):
    tail = bytes(range(1, 13))
    ioctl.call(FdKind.VFIO_DEVICE, 3, "VFIO_DEVICE_SET_IRQS", tail=tail, flags=0x24, index=2, start=0, count=3)
    n = ffi.sizeof("struct vfio_irq_set")
    _, number, _ = recording.calls[-1]
    data = recording.sent(n + len(tail))
    assert number == lib.VFIO_DEVICE_SET_IRQS
    assert len(data) == n + len(tail)
    assert data[:4] == (n + len(tail)).to_bytes(4, "little")
    assert data[n:] == tail


def test_call_tail_and_extra_add_up(recording):
    ioctl.call(FdKind.VFIO_DEVICE, 3, "VFIO_DEVICE_FEATURE", tail=b"\xaa\xbb", extra=6, flags=1 << 16)
    data = recording.sent(16)
    assert data == (16).to_bytes(4, "little") + (1 << 16).to_bytes(4, "little") + b"\xaa\xbb" + bytes(6)


def test_call_with_a_prepared_argument_uses_it_as_is(recording):
    req = ioctl.request(FdKind.LUO_SESSION, "LIVEUPDATE_SESSION_FINISH")
    arg = ioctl.new_arg(req, size=4)  # e.g. a deliberately short size, for the kernel's EINVAL
    got = ioctl.call(FdKind.LUO_SESSION, 3, "LIVEUPDATE_SESSION_FINISH", arg)
    assert got is arg
    assert recording.sent(4) == (4).to_bytes(4, "little")


# Struct fields that share a name with a parameter of call(): kind, fd, name, arg and the
# keywords. luo.py sets ``name=`` (CREATE/RETRIEVE_SESSION) and ``fd=`` (PRESERVE_FD);
# iommu.py sets ``size=`` (the type1 MAP_DMA / UNMAP_DMA length).
@pytest.mark.parametrize("kind,request_name,field,value", [
    (FdKind.LUO_DEVICE, "LIVEUPDATE_IOCTL_CREATE_SESSION", "name", b"vm-1"),
    (FdKind.LUO_DEVICE, "LIVEUPDATE_IOCTL_RETRIEVE_SESSION", "name", b"vm-1"),
    (FdKind.LUO_SESSION, "LIVEUPDATE_SESSION_PRESERVE_FD", "fd", 42),
    (FdKind.VFIO_CONTAINER, "VFIO_IOMMU_MAP_DMA", "size", 1 << 21),
    (FdKind.VFIO_CONTAINER, "VFIO_IOMMU_UNMAP_DMA", "size", 1 << 21),
], ids=lambda v: f"{v}" if isinstance(v, str) else None)
def test_call_sets_a_field_named_like_a_call_parameter(recording, kind, request_name, field, value):
    ioctl.call(kind, 3, request_name, **{field: value})
    req = ioctl.request(kind, request_name)
    n = ffi.sizeof(f"struct {req.arg}")
    _, number, sent = recording.calls[-1]
    assert number == req.number
    assert getattr(sent, req.size_field) == n, "the size field must stay sizeof(struct)"
    got = getattr(sent, field)
    assert (bytes(got)[:len(value)] if isinstance(value, bytes) else got) == value


def test_call_value_request_passes_the_integer(recording):
    ioctl.call(FdKind.VFIO_CONTAINER, 9, "VFIO_CHECK_EXTENSION", 3)
    assert recording.calls[-1] == (9, lib.VFIO_CHECK_EXTENSION, 3)


def test_call_no_arg_request_passes_null(recording):
    ioctl.call(FdKind.VFIO_DEVICE, 9, "VFIO_DEVICE_RESET")
    assert recording.calls[-1] == (9, lib.VFIO_DEVICE_RESET, None)


def test_call_returns_the_kernel_value_for_non_struct_requests(recording):
    recording.ret = 17
    assert ioctl.call(FdKind.VFIO_GROUP, 9, "VFIO_GROUP_GET_DEVICE_FD", "0000:00:04.0") == 17


def test_call_negative_return_becomes_the_errno_exception(recording):
    recording.ret = -22
    with pytest.raises(InvalidArgument) as info:
        ioctl.call(FdKind.IOMMUFD, 9, "IOMMU_DESTROY", target="iommufd", id=1)
    assert info.value.errno == 22 and info.value.operation == "IOMMU_DESTROY" and info.value.target == "iommufd"


# --- request(): dispatch by fd kind ------------------------------------------------------------
def test_request_on_wrong_kind_names_the_right_kind():
    with pytest.raises(WrongFdKind) as info:
        ioctl.request(FdKind.VFIO_DEVICE, "VFIO_IOMMU_GET_INFO")
    msg = str(info.value)
    assert "VFIO_IOMMU_GET_INFO" in msg
    assert "issued on a VFIO container fd, not on a VFIO device fd" in msg
    assert isinstance(info.value, TypeError)


def test_session_request_on_the_device_names_the_session_kind():
    with pytest.raises(WrongFdKind, match=r"issued on a LUO session fd, not on a /dev/liveupdate fd"):
        ioctl.request(FdKind.LUO_DEVICE, "LIVEUPDATE_SESSION_FINISH")


def test_device_request_on_a_session_names_the_device_kind():
    with pytest.raises(WrongFdKind, match=r"issued on a /dev/liveupdate fd, not on a LUO session fd"):
        ioctl.request(FdKind.LUO_SESSION, "LIVEUPDATE_IOCTL_CREATE_SESSION")


def test_unknown_request_name_is_rejected():
    with pytest.raises(WrongFdKind, match="unknown request 'VFIO_NO_SUCH_THING'"):
        ioctl.request(FdKind.VFIO_DEVICE, "VFIO_NO_SUCH_THING")


def test_wrong_kind_is_rejected_before_any_ioctl(recording):
    with pytest.raises(WrongFdKind):
        ioctl.call(FdKind.VFIO_DEVICE, 3, "VFIO_IOMMU_MAP_DMA")
    assert recording.calls == []


@pytest.mark.parametrize("number,container,device", [
    (0x3B70, "VFIO_IOMMU_GET_INFO", "VFIO_DEVICE_GET_PCI_HOT_RESET_INFO"),
    (0x3B71, "VFIO_IOMMU_MAP_DMA", "VFIO_DEVICE_PCI_HOT_RESET"),
    (0x3B75, "VFIO_IOMMU_DIRTY_PAGES", "VFIO_DEVICE_FEATURE"),
])
def test_colliding_numbers_resolve_per_fd_kind(number, container, device):
    on_container = [r for r in REQUESTS[FdKind.VFIO_CONTAINER].values() if r.number == number]
    on_device = [r for r in REQUESTS[FdKind.VFIO_DEVICE].values() if r.number == number]
    assert [r.name for r in on_container] == [container]
    assert [r.name for r in on_device] == [device]
    assert on_container[0].arg != on_device[0].arg


def test_0x3b72_is_unmap_on_a_container_and_never_on_a_device():
    assert lib.VFIO_IOMMU_UNMAP_DMA == lib.VFIO_DEVICE_QUERY_GFX_PLANE == 0x3B72
    assert [r.name for r in REQUESTS[FdKind.VFIO_CONTAINER].values() if r.number == 0x3B72] == ["VFIO_IOMMU_UNMAP_DMA"]
    assert [r.name for r in REQUESTS[FdKind.VFIO_DEVICE].values() if r.number == 0x3B72] == []
    with pytest.raises(WrongFdKind):
        ioctl.request(FdKind.VFIO_DEVICE, "VFIO_IOMMU_UNMAP_DMA")


def test_each_number_is_unique_within_a_kind():
    for kind, table in REQUESTS.items():
        numbers = [r.number for r in table.values()]
        assert len(numbers) == len(set(numbers)), kind


# --- real ioctls on /dev/null -----------------------------------------------------------------
def _assert_enotty(exc: NotSupported, name: str):
    msg = str(exc)
    assert exc.errno == 25
    assert name in msg and "/dev/null" in msg and "ENOTTY" in msg


def test_struct_request_on_dev_null_raises_not_supported(devnull):
    with pytest.raises(NotSupported) as info:
        ioctl.call(FdKind.VFIO_DEVICE, devnull, "VFIO_DEVICE_GET_INFO", target="/dev/null")
    _assert_enotty(info.value, "VFIO_DEVICE_GET_INFO")


def test_luo_struct_request_on_dev_null_raises_not_supported(devnull):
    with pytest.raises(NotSupported) as info:
        ioctl.call(FdKind.LUO_SESSION, devnull, "LIVEUPDATE_SESSION_GET_NAME", target="/dev/null")
    _assert_enotty(info.value, "LIVEUPDATE_SESSION_GET_NAME")


def test_value_request_on_dev_null_raises_not_supported(devnull):
    with pytest.raises(NotSupported) as info:
        ioctl.call(FdKind.VFIO_CONTAINER, devnull, "VFIO_CHECK_EXTENSION", 3, target="/dev/null")
    _assert_enotty(info.value, "VFIO_CHECK_EXTENSION")


def test_no_arg_request_on_dev_null_raises_not_supported(devnull):
    with pytest.raises(NotSupported) as info:
        ioctl.call(FdKind.VFIO_CONTAINER, devnull, "VFIO_GET_API_VERSION", target="/dev/null")
    _assert_enotty(info.value, "VFIO_GET_API_VERSION")


def test_int_pointer_and_string_requests_on_dev_null_raise_not_supported(devnull):
    with pytest.raises(NotSupported) as info:
        ioctl.call(FdKind.VFIO_GROUP, devnull, "VFIO_GROUP_SET_CONTAINER", devnull, target="/dev/null")
    _assert_enotty(info.value, "VFIO_GROUP_SET_CONTAINER")
    with pytest.raises(NotSupported) as info:
        ioctl.call(FdKind.VFIO_GROUP, devnull, "VFIO_GROUP_GET_DEVICE_FD", "0000:00:04.0", target="/dev/null")
    _assert_enotty(info.value, "VFIO_GROUP_GET_DEVICE_FD")


# --- fd_kind ------------------------------------------------------------------------------------
def test_fd_kind_of_a_memfd_is_none_with_its_link():
    fd = os.memfd_create("pvl-kind", os.MFD_CLOEXEC)
    try:
        assert ioctl.fd_kind(fd) == (None, "/memfd:pvl-kind (deleted)")
    finally:
        os.close(fd)


def test_fd_kind_of_a_pipe_is_none_with_its_link():
    r, w = os.pipe2(os.O_CLOEXEC)
    try:
        kind, link = ioctl.fd_kind(r)
        assert kind is None and link.startswith("pipe:[")
    finally:
        os.close(r)
        os.close(w)


def test_fd_kind_of_dev_null_is_none_with_its_link(devnull):
    assert ioctl.fd_kind(devnull) == (None, "/dev/null")


def test_fd_kind_of_a_closed_fd_raises_bad_file_descriptor():
    r, w = os.pipe2(os.O_CLOEXEC)
    os.close(r)
    os.close(w)
    with pytest.raises(OSError) as info:
        ioctl.fd_kind(r)
    assert info.value.errno == 2 and "readlink" in str(info.value)  # ENOENT from /proc/self/fd
