"""The one raw ioctl layer every kernel call passes through.

``call(kind, fd, "VFIO_DEVICE_GET_INFO", target=...)`` looks the request up by *fd kind
and name* (VFIO numbers collide across fd kinds: 0x3B70 is IOMMU_GET_INFO on a container
and GET_PCI_HOT_RESET_INFO on a device), builds a zeroed argument with its
``argsz``/``size`` set to the struct's own size, sets the given fields, calls the kernel
and turns a failure into the named exception from :mod:`pyvfio_lu.errors`.
"""

from __future__ import annotations

import errno
import os
import struct
import sys

from . import _speedups
from ._cffi import ffi, lib
from ._record import record
from .errors import ArgumentOutOfRange, BadArgumentType, PyvfioError, WrongFdKind, error_for

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (type checkers treat it as True)

if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any, NamedTuple


class _Constant:
    """One of a few named constants (like an ``enum.Enum`` member, compared by identity;
    not one, because enum's import costs a VMM restarted after a kexec tens of ms under
    an emulated CPU): ``name`` is its attribute name, ``value`` how messages say it."""

    __slots__ = ("name", "value")

    def __init__(self, name: str, value: str):
        self.name, self.value = name, value

    def __repr__(self) -> str:
        return f"<{type(self).__name__}.{self.name}: {self.value!r}>"

    def __reduce__(self) -> tuple[object, ...]:  # pickled as a reference to the one member
        return getattr, (type(self), self.name)

    @classmethod
    def _define(cls, **members: str) -> tuple[Any, ...]:
        made = tuple(cls(name, value) for name, value in members.items())
        for member in made:
            setattr(cls, member.name, member)
        return made


class FdKind(_Constant):
    """What an fd is, as far as ioctls go: each request is valid on one kind."""

    __slots__ = ()
    LUO_DEVICE: FdKind
    LUO_SESSION: FdKind
    VFIO_CONTAINER: FdKind
    VFIO_GROUP: FdKind
    VFIO_DEVICE: FdKind
    IOMMUFD: FdKind


FD_KINDS: tuple[FdKind, ...] = FdKind._define(
    LUO_DEVICE="/dev/liveupdate", LUO_SESSION="LUO session", VFIO_CONTAINER="VFIO container",
    VFIO_GROUP="VFIO group", VFIO_DEVICE="VFIO device", IOMMUFD="iommufd")


class Arg(_Constant):
    """An ioctl argument that is not a struct."""

    __slots__ = ()
    NONE: Arg
    VALUE: Arg
    INT_PTR: Arg
    STRING: Arg


Arg._define(NONE="no argument", VALUE="integer value", INT_PTR="pointer to int",
            STRING="pointer to a NUL-terminated string")


if TYPE_CHECKING:
    class _RequestFields(NamedTuple):
        name: str
        number: int
        arg: str | Arg
        size_field: str | None
else:
    _RequestFields = record("Request", "name number arg size_field", module=__name__)


class Request(_RequestFields):
    """One ioctl: its kernel name, number (from the C compiler), argument (a struct name
    without ``struct``, or an :class:`Arg`) and the struct's size field (``size``/``argsz``)."""

    __slots__ = ()


_LUO_DEV = (FdKind.LUO_DEVICE,)
_LUO_SES = (FdKind.LUO_SESSION,)
_CONT = (FdKind.VFIO_CONTAINER,)
_GROUP = (FdKind.VFIO_GROUP,)
_DEV = (FdKind.VFIO_DEVICE,)
_IOMMU = (FdKind.IOMMUFD,)

# name, kinds it is valid on, argument (struct name without "struct " or an Arg)
_TABLE: list[tuple[str, tuple[FdKind, ...], str | Arg]] = [
    ("LIVEUPDATE_IOCTL_CREATE_SESSION", _LUO_DEV, "liveupdate_ioctl_create_session"),
    ("LIVEUPDATE_IOCTL_RETRIEVE_SESSION", _LUO_DEV, "liveupdate_ioctl_retrieve_session"),
    ("LIVEUPDATE_SESSION_PRESERVE_FD", _LUO_SES, "liveupdate_session_preserve_fd"),
    ("LIVEUPDATE_SESSION_RETRIEVE_FD", _LUO_SES, "liveupdate_session_retrieve_fd"),
    ("LIVEUPDATE_SESSION_FINISH", _LUO_SES, "liveupdate_session_finish"),
    ("LIVEUPDATE_SESSION_GET_NAME", _LUO_SES, "liveupdate_session_get_name"),
    ("VFIO_GET_API_VERSION", _CONT, Arg.NONE),
    ("VFIO_CHECK_EXTENSION", _CONT, Arg.VALUE),
    ("VFIO_SET_IOMMU", _CONT, Arg.VALUE),
    ("VFIO_IOMMU_GET_INFO", _CONT, "vfio_iommu_type1_info"),
    ("VFIO_IOMMU_MAP_DMA", _CONT, "vfio_iommu_type1_dma_map"),
    ("VFIO_IOMMU_UNMAP_DMA", _CONT, "vfio_iommu_type1_dma_unmap"),
    ("VFIO_IOMMU_DIRTY_PAGES", _CONT, "vfio_iommu_type1_dirty_bitmap"),
    ("VFIO_GROUP_GET_STATUS", _GROUP, "vfio_group_status"),
    ("VFIO_GROUP_SET_CONTAINER", _GROUP, Arg.INT_PTR),
    ("VFIO_GROUP_UNSET_CONTAINER", _GROUP, Arg.NONE),
    ("VFIO_GROUP_GET_DEVICE_FD", _GROUP, Arg.STRING),
    ("VFIO_DEVICE_GET_INFO", _DEV, "vfio_device_info"),
    ("VFIO_DEVICE_GET_REGION_INFO", _DEV, "vfio_region_info"),
    ("VFIO_DEVICE_GET_IRQ_INFO", _DEV, "vfio_irq_info"),
    ("VFIO_DEVICE_SET_IRQS", _DEV, "vfio_irq_set"),
    ("VFIO_DEVICE_RESET", _DEV, Arg.NONE),
    ("VFIO_DEVICE_GET_PCI_HOT_RESET_INFO", _DEV, "vfio_pci_hot_reset_info"),
    ("VFIO_DEVICE_PCI_HOT_RESET", _DEV, "vfio_pci_hot_reset"),
    ("VFIO_DEVICE_IOEVENTFD", _DEV, "vfio_device_ioeventfd"),
    ("VFIO_DEVICE_FEATURE", _DEV, "vfio_device_feature"),
    ("VFIO_DEVICE_BIND_IOMMUFD", _DEV, "vfio_device_bind_iommufd"),
    ("VFIO_DEVICE_ATTACH_IOMMUFD_PT", _DEV, "vfio_device_attach_iommufd_pt"),
    ("VFIO_DEVICE_DETACH_IOMMUFD_PT", _DEV, "vfio_device_detach_iommufd_pt"),
    ("IOMMU_DESTROY", _IOMMU, "iommu_destroy"),
    ("IOMMU_IOAS_ALLOC", _IOMMU, "iommu_ioas_alloc"),
    ("IOMMU_IOAS_ALLOW_IOVAS", _IOMMU, "iommu_ioas_allow_iovas"),
    ("IOMMU_IOAS_COPY", _IOMMU, "iommu_ioas_copy"),
    ("IOMMU_IOAS_IOVA_RANGES", _IOMMU, "iommu_ioas_iova_ranges"),
    ("IOMMU_IOAS_MAP", _IOMMU, "iommu_ioas_map"),
    ("IOMMU_IOAS_MAP_FILE", _IOMMU, "iommu_ioas_map_file"),
    ("IOMMU_IOAS_UNMAP", _IOMMU, "iommu_ioas_unmap"),
    ("IOMMU_OPTION", _IOMMU, "iommu_option"),
    ("IOMMU_VFIO_IOAS", _IOMMU, "iommu_vfio_ioas"),
    ("IOMMU_HWPT_ALLOC", _IOMMU, "iommu_hwpt_alloc"),
    ("IOMMU_GET_HW_INFO", _IOMMU, "iommu_hw_info"),
]


def _size_field(struct: str) -> str:
    fields = dict(ffi.typeof(f"struct {struct}").fields)
    return "argsz" if "argsz" in fields else "size"


REQUESTS: dict[FdKind, dict[str, Request]] = {kind: {} for kind in FD_KINDS}
for _name, _kinds, _arg in _TABLE:
    _req = Request(
        _name,
        getattr(lib, _name),
        _arg,
        _size_field(_arg) if isinstance(_arg, str) else None,
    )
    for _kind in _kinds:
        REQUESTS[_kind][_name] = _req
del _name, _kinds, _arg, _req, _kind


def request(kind: FdKind, name: str) -> Request:
    """The request ``name`` as issued on an fd of ``kind``; WrongFdKind if it is not valid there."""
    try:
        return REQUESTS[kind][name]
    except KeyError:
        valid = [k.value for k, table in REQUESTS.items() if name in table]
        if not valid:
            raise WrongFdKind(None, name, kind.value, f"unknown request {name!r}") from None
        raise WrongFdKind(
            None, name, kind.value, f"{name} is issued on a {' or '.join(valid)} fd, not on a {kind.value} fd"
        ) from None


if TYPE_CHECKING:  # kind, Request, ctype, size, template
    _Prepared = tuple[FdKind, Request, Any, int, Any]

_PREPARED: dict[str, _Prepared] = {}  # name -> (kind, Request, ctype, size, template); filled on first use


def _prepare(kind: FdKind, name: str) -> _Prepared:
    """Resolve ``name`` on ``kind`` once: the cffi pointer type, struct size and a template
    struct with its size field set (``ffi.new(ctype, template)`` copies it)."""
    req = request(kind, name)
    if isinstance(req.arg, Arg):
        entry = (kind, req, None, 0, None)
    else:
        ctype = ffi.typeof(f"struct {req.arg} *")
        size = ffi.sizeof(ctype.item)
        t = ffi.new(ctype)
        assert req.size_field is not None  # a struct request has one
        setattr(t, req.size_field, size)
        try:
            template = t[0]
            ffi.new(ctype, template)
        except (SystemError, TypeError):  # cffi cannot copy a struct ending in a flexible array
            template = None
        entry = (kind, req, ctype, size, template)
    _PREPARED[name] = entry
    return entry


def new_arg(req: Request, extra: int = 0, size: int | None = None) -> Any:
    """A zeroed argument for ``req`` with ``extra`` bytes after the struct.

    ``argsz``/``size`` is set to the whole allocation unless ``size`` overrides it (the
    raw tests use that to show the kernel's EINVAL for a short size).
    """
    ctype = f"struct {req.arg} *"
    base = ffi.sizeof(ctype[:-2])
    arg = ffi.from_buffer(ctype, bytearray(base + extra)) if extra else ffi.new(ctype)
    assert req.size_field is not None  # ffi.sizeof above failed for a request without a struct
    setattr(arg, req.size_field, base + extra if size is None else size)
    return arg


def call(kind: FdKind, fd: int, name: str, arg: Any = None, /, *, target: str | Callable[[], str] = "", extra: int = 0,
         tail: bytes = b"", arg_size: int | None = None, **fields: Any) -> Any:
    """Issue ``name`` on ``fd`` (an fd of ``kind``) and return the argument struct, or the
    kernel's return value for requests that take no struct.

    ``arg``: a prepared argument (struct pointer, integer value, string, int) used as is;
    otherwise a zeroed struct is made, ``extra`` bytes longer, with ``tail`` written right
    after the struct, its size field set (to ``arg_size`` if given), and then ``fields``
    assigned. ``kind``, ``fd``, ``name`` and ``arg`` are positional-only, so struct fields
    with those names (``fd``, ``name``, ``size``) can be passed as keywords. ``target`` (what
    the error message names) may be a callable, evaluated only when the call fails.

    Each request is resolved once (pointer type, size, a template struct with its size
    field set) and reused, so the common call is one ``ffi.new`` copy and one ioctl.
    """
    entry = _PREPARED.get(name)
    if entry is None or entry[0] is not kind:
        entry = _prepare(kind, name)
    _kind, req, ctype, size, template = entry
    if ctype is None:
        if not isinstance(fd, int) or isinstance(fd, bool) or not 0 <= fd < 1 << 31:
            raise bad_field(name, "fd", fd, OverflowError("not a valid fd number"), target)
        if req.arg is Arg.NONE:
            ret = lib.pvl_ioctl(fd, req.number, ffi.NULL)
        elif req.arg is Arg.VALUE:
            try:
                ret = lib.pvl_ioctl_val(fd, req.number, arg)
            except (TypeError, OverflowError) as exc:
                raise bad_field(name, "argument", arg, exc, target) from None
        elif req.arg is Arg.INT_PTR:
            try:
                ret = lib.pvl_ioctl(fd, req.number, ffi.new("int *", arg))
            except (TypeError, OverflowError) as exc:
                raise bad_field(name, "argument", arg, exc, target) from None
        else:
            ret = lib.pvl_ioctl(fd, req.number, ffi.new("char[]", os.fsencode(arg)))
        if ret < 0:
            raise error_for(-ret, name, target() if callable(target) else target)
        return ret
    if arg is None:
        if extra or tail or arg_size is not None:
            arg = new_arg(req, extra + len(tail), arg_size)
            if tail:
                ffi.memmove(ffi.cast("char *", arg) + size, tail, len(tail))
        elif template is not None:
            arg = ffi.new(ctype, template)
        else:
            arg = ffi.new(ctype)
            assert req.size_field is not None  # ctype is set: a struct request
            setattr(arg, req.size_field, size)
        try:
            for field, value in fields.items():
                setattr(arg, field, value)
        except (TypeError, OverflowError) as exc:
            raise bad_field(name, field, value, exc, target) from None
    try:
        ret = lib.pvl_ioctl(fd, req.number, arg)
    except (TypeError, OverflowError) as exc:  # only a bad fd gets here: the argument is ours
        raise bad_field(name, "fd", fd, exc, target) from None
    if ret < 0:
        raise error_for(-ret, name, target() if callable(target) else target)
    return arg


rw = _speedups.ioctl_rw  # the lean paths' one call: see template()


def template(struct: str) -> bytes:
    """A zeroed ``struct`` with its leading ``size``/``argsz`` field set to its size: the
    argument the lean paths hand to :func:`rw` (``_speedups.ioctl_rw``: one builtin call that
    copies it, issues the ioctl with the GIL held and returns the struct the kernel left,
    or ``-errno``). Every uAPI struct here starts with that ``__u32`` field."""
    size: int = ffi.sizeof(f"struct {struct}")
    assert ffi.offsetof(f"struct {struct}", _size_field(struct)) == 0
    return size.to_bytes(4, sys.byteorder) + bytes(size - 4)


def layout(struct_name: str, fields: str) -> struct.Struct:
    """``struct <struct_name>`` as a ``struct.Struct`` in native byte order, built from cffi's
    own view of it (every field at the offset and size the C compiler gave, padding
    included), for the lean paths that pack an argument or unpack a result in one call.
    ``fields`` names the struct's fields in order: a changed uAPI struct fails here, at
    import, not in a kernel call."""
    ctype = ffi.typeof(f"struct {struct_name}")
    names = tuple(name for name, _field in ctype.fields)
    if names != tuple(fields.split()):
        raise AssertionError(f"struct {struct_name} has fields {names}, not {fields}")
    fmt, at = "=", 0
    for _name, field in ctype.fields:
        ftype = field.type
        if ftype.kind == "array" and ftype.length is None:  # a flexible array: not in sizeof
            break
        size = ffi.sizeof(ftype)
        if field.offset > at:
            fmt += f"{field.offset - at}x"
        if ftype.kind == "primitive":
            code = {1: "b", 2: "h", 4: "i", 8: "q"}[size]
            fmt += code if ftype.cname.startswith("int") else code.upper()
        elif ftype.kind == "array" and ftype.item.kind == "primitive" and size == ftype.length:
            fmt += f"{size}s"
        else:
            raise TypeError(f"layout: field {_name} of struct {struct_name} is a {ftype.cname}")
        at = field.offset + size
    fmt += f"{ffi.sizeof(ctype) - at}x" if ffi.sizeof(ctype) > at else ""
    packer = struct.Struct(fmt)
    assert packer.size == ffi.sizeof(ctype), (struct_name, fmt)
    return packer


def bad_field(name: str, field: str, value: object, exc: Exception, target: Any = "") -> PyvfioError:
    """The named error for a value cffi would not put into ``field`` of ``name``'s argument:
    ArgumentOutOfRange for an integer that does not fit, BadArgumentType for anything else."""
    where = target() if callable(target) else target
    if isinstance(value, int) and not isinstance(value, bool):
        return ArgumentOutOfRange(errno.EINVAL, name, where, f"{field} {value} does not fit the kernel's field ({exc})")
    return BadArgumentType(errno.EINVAL, name, where, f"{field} must be an integer, not {type(value).__name__}")


def fd_kind(fd: int) -> tuple[FdKind | None, str]:
    """What ``fd`` refers to, from its ``/proc/self/fd`` link: (kind or None, link text)."""
    from .fd import fileno_of

    fd = fileno_of(fd)
    try:
        link = os.readlink(f"/proc/self/fd/{fd}")
    except OSError as exc:
        raise error_for(exc.errno or 0, "readlink", f"fd {fd}") from None
    if link == "/dev/liveupdate":
        return FdKind.LUO_DEVICE, link
    if link.startswith("anon_inode:[luo_session]"):
        return FdKind.LUO_SESSION, link
    if link == "/dev/vfio/vfio":
        return FdKind.VFIO_CONTAINER, link
    if link == "/dev/iommu":
        return FdKind.IOMMUFD, link
    if link.startswith(("/dev/vfio/devices/", "anon_inode:[vfio-device")):
        return FdKind.VFIO_DEVICE, link
    if link.startswith("/dev/vfio/"):
        return FdKind.VFIO_GROUP, link
    return None, link
