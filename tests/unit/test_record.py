"""pyvfio_lu._record: the records behave as the namedtuples they replace."""

from __future__ import annotations

import copy
import pickle
from collections import namedtuple

import pytest

from pyvfio_lu._record import record
from pyvfio_lu.ioctl import FD_KINDS, Arg, FdKind
from pyvfio_lu.vfio.records import DeviceInfo, RegionInfo

Point = record("Point", "x y z", defaults=(0,), module=__name__)
_Reference = namedtuple("_Reference", "x y z", defaults=(0,))


def test_construction_matches_namedtuple():
    for args, kwargs in [((1, 2, 3), {}), ((1, 2), {}), ((1,), {"y": 2}), ((), {"x": 1, "y": 2, "z": 3})]:
        assert tuple(Point(*args, **kwargs)) == tuple(_Reference(*args, **kwargs))
    p = Point(1, 2)
    assert (p.x, p.y, p.z) == (1, 2, 0) and p == (1, 2, 0) and hash(p) == hash((1, 2, 0))
    assert p[1] == 2 and list(p) == [1, 2, 0] and isinstance(p, tuple)
    assert Point._fields == ("x", "y", "z") and Point._field_defaults == {"z": 0}
    assert Point.__match_args__ == ("x", "y", "z")


@pytest.mark.parametrize(("args", "kwargs", "message"), [
    ((), {}, "missing required argument: 'x'"),
    ((1,), {}, "missing required argument: 'y'"),
    ((1, 2, 3, 4), {}, "takes 3 positional arguments but 4 were given"),
    ((1, 2), {"w": 5}, "unexpected keyword argument 'w'"),
    ((1, 2), {"x": 5}, "multiple values for argument 'x'"),
])
def test_bad_construction_is_a_type_error_naming_the_field(args, kwargs, message):
    with pytest.raises(TypeError, match=message):
        Point(*args, **kwargs)


def test_helpers_and_repr():
    p = Point(1, 2, 3)
    assert repr(p) == "Point(x=1, y=2, z=3)"
    assert p._asdict() == {"x": 1, "y": 2, "z": 3}
    assert p._replace(y=5) == (1, 5, 3) and type(p._replace(y=5)) is Point
    with pytest.raises(TypeError, match="unexpected field names"):
        p._replace(w=1)
    assert Point._make([4, 5, 6]) == (4, 5, 6) and type(Point._make([4, 5, 6])) is Point
    with pytest.raises(TypeError, match="expected 3 values, got 2"):
        Point._make([4, 5])
    with pytest.raises(AttributeError):
        p.x = 5  # type: ignore[misc]
    with pytest.raises(AttributeError):
        p.other = 5  # type: ignore[attr-defined]  # __slots__: no instance dict


def test_pickle_and_copy_keep_the_class():
    info = DeviceInfo(3, 9, 5)
    for clone in (pickle.loads(pickle.dumps(info)), copy.copy(info), copy.deepcopy(info)):
        assert clone == info and type(clone) is DeviceInfo and clone.caps == ()
    region = RegionInfo(0, 7, 4096, 0)
    assert region.index == 0 and region.size == 4096  # a field may shadow tuple.index, as in namedtuple
    assert pickle.loads(pickle.dumps(Point(1, 2))) == Point(1, 2)


@pytest.mark.parametrize("bad", ["x x", "x _y", "x 1y"])
def test_bad_field_names_refused(bad):
    with pytest.raises(ValueError, match="bad field names"):
        record("Bad", bad, module=__name__)


def test_fd_kinds_are_named_constants_compared_by_identity():
    assert FdKind.VFIO_DEVICE.name == "VFIO_DEVICE" and FdKind.VFIO_DEVICE.value == "VFIO device"
    assert repr(FdKind.IOMMUFD) == "<FdKind.IOMMUFD: 'iommufd'>"
    assert [k.name for k in FD_KINDS] == ["LUO_DEVICE", "LUO_SESSION", "VFIO_CONTAINER", "VFIO_GROUP",
                                          "VFIO_DEVICE", "IOMMUFD"]
    assert pickle.loads(pickle.dumps(FdKind.LUO_SESSION)) is FdKind.LUO_SESSION
    assert copy.deepcopy(Arg.STRING) is Arg.STRING
    assert FdKind.VFIO_DEVICE != FdKind.VFIO_GROUP and len(set(FD_KINDS)) == 6
