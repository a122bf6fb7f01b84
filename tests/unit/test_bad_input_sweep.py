"""Every public entry point, every argument, a row of values it cannot take: each call gives a
named error (a :class:`PyvfioError`: the type ones are also ``TypeError``, the range ones
``ValueError``) and leaves nothing behind (the suite's fd check), never a crash from deep
inside (cffi's ``OverflowError``/``TypeError``, ``KeyError``, ``IndexError``,
``AttributeError``, an unhashable-type error, a bare ``OSError``).

Objects that need a kernel device are built on ``/dev/null``: the argument checks come
before the kernel is asked, and where a value passes them the ioctl's ENOTTY must come back
named too. What the calls do with *good* values is proven in the guest."""

from __future__ import annotations

import os
from array import array

import pytest

from pyvfio_lu import errors, handoff, kexec, preservation, sysfs
from pyvfio_lu.holder import Holder
from pyvfio_lu.iommu import DmaBuffer, Iommu, IovaAllocator, IovaRange
from pyvfio_lu.luo import INCOMING, OUTGOING, LiveUpdate, Session
from pyvfio_lu.memfd import Memfd
from pyvfio_lu.vfio import Bar, VfioDevice
from pyvfio_lu.vfio.records import RegionInfo

# values no integer parameter (fd, offset, size, index, token, IOVA, width) may take
NOT_INTS = [None, "1", 1.5, b"\x01", [], {}, object()]
OUT_OF_RANGE = [-1, 2**64, 2**200]
BAD_INTS = NOT_INTS + OUT_OF_RANGE
# values no text parameter (name, path, BDF, driver) may take
BAD_TEXTS = [None, 5, 1.5, [], {}, object(), "", "\0", "x" * 5000]

DENIED = (OverflowError, KeyError, IndexError, AttributeError, ZeroDivisionError)


def _devnull() -> int:
    return os.open("/dev/null", os.O_RDWR | os.O_CLOEXEC)


@pytest.fixture
def objects(tmp_path):
    """The objects whose methods are swept, on /dev/null or real memfds; all closed after."""
    made: dict[str, object] = {}
    made["device"] = dev = VfioDevice(_devnull(), iommu=None, bdf="0000:00:04.0", cdev=True, bound=True)
    info = RegionInfo(0, 0x7, 4096, 0)  # READ | WRITE | MMAP, 4 KiB at offset 0
    made["bar"] = Bar(dev, info, mmap=False)
    made["iommu"] = Iommu("iommufd", iommufd=_devnull(), ioas_id=1, owned=True)
    made["luo"] = LiveUpdate.from_fd(_devnull())
    made["session"] = Session(_devnull(), "sweep", OUTGOING)
    made["incoming"] = Session(_devnull(), "sweep-in", INCOMING)
    made["memfd"] = Memfd.create("sweep", b"data")
    made["buffer"] = DmaBuffer(4096)
    made["allocator"] = IovaAllocator([IovaRange(0, 2**48 - 1)])
    made["holder"] = Holder(str(tmp_path / "no-holder.sock"))
    yield made
    for name in ("bar", "device", "iommu", "session", "incoming", "luo", "memfd", "buffer"):
        made[name].close()


# (label, call(objects, value), values): each value in the row must be refused by name
def _rows():
    rows = [
        # VFIO device
        ("VfioDevice.open(device)", lambda o, v: VfioDevice.open(v), BAD_TEXTS),
        ("VfioDevice.open(iommu)", lambda o, v: VfioDevice.open("0000:00:04.0", v), [5, 1.5, [], "nope"]),
        ("VfioDevice.from_fd(fd)", lambda o, v: VfioDevice.from_fd(v, attach=False), BAD_INTS),
        ("VfioDevice.region_info(index)", lambda o, v: o["device"].region_info(v), BAD_INTS),
        ("VfioDevice.irq_info(index)", lambda o, v: o["device"].irq_info(v), BAD_INTS),
        ("VfioDevice.region_read(index)", lambda o, v: o["device"].region_read(v, 0, 4), BAD_INTS),
        ("VfioDevice.region_read(offset)", lambda o, v: o["device"].region_read(0, v, 4), BAD_INTS),
        ("VfioDevice.region_read(size)", lambda o, v: o["device"].region_read(0, 0, v), BAD_INTS),
        ("VfioDevice.region_write(data)", lambda o, v: o["device"].region_write(0, 0, v), [None, 5, "text", [1]]),
        ("VfioDevice.config_read(offset)", lambda o, v: o["device"].config_read(v), BAD_INTS),
        ("VfioDevice.config_read(width)", lambda o, v: o["device"].config_read(0, v), [*BAD_INTS, 3, 0]),
        ("VfioDevice.config_write(value)", lambda o, v: o["device"].config_write(0, v), BAD_INTS),
        ("VfioDevice.bar(index)", lambda o, v: o["device"].bar(v), BAD_INTS),
        ("VfioDevice.bind(iommu)", lambda o, v: o["device"].bind(v), [None, "x", 1.5, [], -1, 2**64]),
        ("VfioDevice.attach(pt_id)", lambda o, v: o["device"].attach(v), BAD_INTS),
        ("VfioDevice.feature_probe(feature)", lambda o, v: o["device"].feature_probe(v), BAD_INTS),
        ("VfioDevice.feature_get(size)", lambda o, v: o["device"].feature_get(1, v), BAD_INTS),
        ("VfioDevice.feature_set(payload)", lambda o, v: o["device"].feature_set(1, v), [None, 5, "text"]),
        ("VfioDevice.hot_reset(group_fds)", lambda o, v: o["device"].hot_reset(v), [None, 5, ["x"], [-1], [2**64]]),
        ("VfioDevice.enable_irq(index)", lambda o, v: o["device"].enable_irq(v), BAD_INTS),
        ("VfioDevice.enable_irq(count)", lambda o, v: o["device"].enable_irq(0, v), [*BAD_INTS, 0]),
        ("VfioDevice.disable_irq(index)", lambda o, v: o["device"].disable_irq(v), BAD_INTS),
        ("VfioDevice.trigger_irq(vector)", lambda o, v: o["device"].trigger_irq(0, v), BAD_INTS),
        ("VfioDevice.unmask_irq(index)", lambda o, v: o["device"].unmask_irq(v), BAD_INTS),
        ("VfioDevice.preserve(token)", lambda o, v: o["device"].preserve(o["session"], v), BAD_INTS),
        ("VfioDevice.preserve(session)", lambda o, v: o["device"].preserve(v, 1), [None, 5, "x"]),
        # BAR
        ("Bar.read(offset)", lambda o, v: o["bar"].read(v, 4), [*BAD_INTS, 4096, 4094, 2]),
        ("Bar.read(width)", lambda o, v: o["bar"].read(0, v), [*BAD_INTS, 3, 0, 16]),
        ("Bar.write(value)", lambda o, v: o["bar"].write(0, v, 4), [*BAD_INTS, 2 ** 32]),
        ("Bar.read32(offset)", lambda o, v: o["bar"].read32(v), [*BAD_INTS, 4096]),
        ("Bar.write8(value)", lambda o, v: o["bar"].write8(0, v), [*BAD_INTS, 256]),
        # IOMMU
        ("Iommu(mode)", lambda o, v: Iommu(v), [None, 5, [], "nope"]),
        ("Iommu(iommufd)", lambda o, v: Iommu("iommufd", iommufd=v, ioas_id=1), NOT_INTS[1:] + OUT_OF_RANGE),
        ("Iommu.map(iova)", lambda o, v: o["iommu"].map(o["buffer"], v), NOT_INTS[1:] + OUT_OF_RANGE + [4095]),
        ("Iommu.map(buffer)", lambda o, v: o["iommu"].map(v, 0), [None, 5, "text", b"", []]),
        ("Iommu.map(size)", lambda o, v: o["iommu"].map(o["buffer"], 0, size=v), NOT_INTS[1:] + OUT_OF_RANGE + [0, 8192]),
        ("Iommu.map_file(file)", lambda o, v: o["iommu"].map_file(v, 0, size=4096), [None, "x", 1.5, -1, 2**64]),
        ("Iommu.map_file(offset)", lambda o, v: o["iommu"].map_file(o["memfd"], 0, offset=v, size=4096), BAD_INTS),
        ("Iommu.map_file(size)", lambda o, v: o["iommu"].map_file(o["memfd"], 0, size=v), [*BAD_INTS, 0]),
        ("Iommu.unmap(mapping)", lambda o, v: o["iommu"].unmap(v), [None, "1", 1.5, [], -1, 2**64]),
        ("Iommu.unmap(size)", lambda o, v: o["iommu"].unmap(0, v), NOT_INTS[1:] + OUT_OF_RANGE),
        ("Iommu.destroy(object_id)", lambda o, v: o["iommu"].destroy(v), BAD_INTS),
        ("Iommu.attach_group(group_fd)", lambda o, v: o["iommu"].attach_group(v, "1"), BAD_INTS),
        ("Iommu.iova_allocator(limit)", lambda o, v: o["iommu"].iova_allocator(v), BAD_INTS),
        ("IovaAllocator.alloc(size)", lambda o, v: o["allocator"].alloc(v), [*BAD_INTS, 0]),
        ("DmaBuffer(file)", lambda o, v: DmaBuffer(4096, v), ["x", 1.5, [], -1, 2**64]),
        ("DmaBuffer.read(offset)", lambda o, v: o["buffer"].read(v), [*BAD_INTS[1:], 4097]),
        ("DmaBuffer.read(length)", lambda o, v: o["buffer"].read(0, v), NOT_INTS[1:] + OUT_OF_RANGE + [4097]),
        ("DmaBuffer.write(data)", lambda o, v: o["buffer"].write(v), [None, 5, "text", b"x" * 4097]),
        ("DmaBuffer.write(offset)", lambda o, v: o["buffer"].write(b"x", v), [*BAD_INTS, 4096]),
        # batch verbs
        ("Iommu.map_many(pieces)", lambda o, v: o["iommu"].map_many(o["buffer"], v),
         [None, 5, [None], [(0, 0)], [(0, 0, "4096")], [(0, 4096 + 1, 4096)], [(0, 0, 8192)], [(-4096, 0, 4096)],
          [(0, 0, 0)], [(0, 2**64 - 4096, 8192)], [(0, 0, 2**64)]]),
        ("Iommu.map_many(buffer)", lambda o, v: o["iommu"].map_many(v, [(0, 0, 4096)]), [None, "x", 4096]),
        ("Iommu.map_run(offsets)", lambda o, v: o["iommu"].map_run(o["buffer"], v, [0], [4096]),
         [None, 5, ["0"], [-4096], [2**64], [4096], [1], [0, 0], array("I", [0]), array("d", [0.0]), "x"]),
        ("Iommu.map_run(iovas)", lambda o, v: o["iommu"].map_run(o["buffer"], [0], v, [4096]),
         [None, 5, ["0"], [-1], [2**64], [1], [], array("b", [0])]),
        ("Iommu.map_run(sizes)", lambda o, v: o["iommu"].map_run(o["buffer"], [0], [0], v),
         [None, ["4096"], [0], [8192], [2**64], [4095], array("Q", [0])]),
        ("Iommu.map_run(buffer)", lambda o, v: o["iommu"].map_run(v, [0], [0], [4096]), [None, "x", 4096]),
        ("Iommu.unmap_run(run)", lambda o, v: o["iommu"].unmap_run(v), [None, 5, "x", [], (0, 4096)]),
        ("Bar.block(offsets)", lambda o, v: o["bar"].block(v), [None, 5, [0], ["0"], [-4]]),
        ("Iommu.unmap_many(ranges)", lambda o, v: o["iommu"].unmap_many(v),
         [None, 5, [None], [(0,)], [("0", 4096)], [(0, 0)], [(-1, 4096)], [(0, 2**64)]]),
        ("Session.preserve_many(items)", lambda o, v: o["session"].preserve_many(v),
         [None, 5, [None], [(o_memfd_marker, 1)], [(0, -1)], [(0, 2**64)], [(0, 1, 2)], [(0, 1), (1, 1)]]),
        ("Session.retrieve_many(tokens)", lambda o, v: o["incoming"].retrieve_many(v),
         [None, 5, ["1"], [-1], [2**64], [1.5]]),
        ("Session.preserve_many(direction)", lambda o, v: o["incoming"].preserve_many(v), [[(0, 1)]]),
        ("Session.retrieve_many(direction)", lambda o, v: o["session"].retrieve_many(v), [[1]]),
        ("Bar.read_block(offsets)", lambda o, v: o["bar"].read_block(v),
         [None, 5, ["0"], [-4], [4096], [2], [0, 4094], [2**64]]),
        ("Bar.read_block(width)", lambda o, v: o["bar"].read_block([0], v), [*BAD_INTS, 3, 0, 16]),
        ("Bar.read_block(out)", lambda o, v: o["bar"].read_block([0, 4], out=v),
         [5, [0, 0], bytearray(16), array("I", [0, 0]), array("Q", [0]), bytes(16)]),
        ("Bar.write_block(values)", lambda o, v: o["bar"].write_block([0], v),
         [None, 5, ["1"], [-1], [2**32], [1, 2], []]),
        ("Bar.poll(offset)", lambda o, v: o["bar"].poll(v, 1, 1, 0), [*BAD_INTS, 4096, 2]),
        ("Bar.poll(mask)", lambda o, v: o["bar"].poll(0, v, 0, 0), [*BAD_INTS, 2 ** 32]),
        ("Bar.poll(value)", lambda o, v: o["bar"].poll(0, 1, v, 0), [*BAD_INTS, 2 ** 32]),
        ("Bar.poll(timeout)", lambda o, v: o["bar"].poll(0, 1, 1, v), [None, "1", -1, float("nan"), 1e9, []]),
        # LUO
        ("LiveUpdate(path)", lambda o, v: LiveUpdate(v), BAD_TEXTS),
        ("LiveUpdate.from_fd(fd)", lambda o, v: LiveUpdate.from_fd(v), BAD_INTS),
        ("LiveUpdate.create_session(name)", lambda o, v: o["luo"].create_session(v), [*BAD_TEXTS, b"", b"x" * 64]),
        ("LiveUpdate.retrieve_session(name)", lambda o, v: o["luo"].retrieve_session(v), [*BAD_TEXTS, b"x" * 64]),
        ("Session(fd)", lambda o, v: Session(v, "s", OUTGOING), BAD_INTS),
        ("Session(direction)", lambda o, v: Session(0, "s", v, owned=False), [None, 5, "sideways"]),
        ("Session.from_fd(fd)", lambda o, v: Session.from_fd(v), BAD_INTS),
        ("Session.preserve(file)", lambda o, v: o["session"].preserve(v, 1), [None, "x", 1.5, [], -1, 2**64]),
        ("Session.preserve(token)", lambda o, v: o["session"].preserve(o["memfd"], v), [*BAD_INTS, True]),
        ("Session.retrieve(token)", lambda o, v: o["session"].retrieve(v), [*BAD_INTS, True]),
        # memfd
        ("Memfd.create(name)", lambda o, v: Memfd.create(v), [None, 5, [], "\0", "x" * 300]),
        ("Memfd.create(size)", lambda o, v: Memfd.create("x", size=v), NOT_INTS[1:] + OUT_OF_RANGE),
        ("Memfd.create_many(contents)", lambda o, v: Memfd.create_many(v), [None, 5, b"x", "text", [None], [b"x", 5]]),
        ("Memfd.create_many(name)", lambda o, v: Memfd.create_many([b"x"], name=v), [None, 5, [], "\0", "x" * 300]),
        ("Memfd.create_many(size)", lambda o, v: Memfd.create_many([b"x"], size=v), NOT_INTS[1:] + OUT_OF_RANGE),
        ("Memfd.verify_many(files)", lambda o, v: Memfd.verify_many(v, [b"data"]),
         [None, 5, "x", [None], [-1], [2**64], [1.5], []]),
        ("Memfd.verify_many(expected)", lambda o, v: Memfd.verify_many([o["memfd"]], v),
         [None, 5, "x", [None], [5], [], [b"data", b"data"]]),
        ("Memfd.pwrite_all(data)", lambda o, v: o["memfd"].pwrite_all(v, 0), [None, 5, "text"]),
        ("Memfd.pwrite_all(offset)", lambda o, v: o["memfd"].pwrite_all(b"x", v), BAD_INTS),
        ("Memfd.seek(position)", lambda o, v: o["memfd"].seek(v), BAD_INTS),
        ("Memfd.resize(size)", lambda o, v: o["memfd"].resize(v), BAD_INTS),
        ("Memfd.seal(names)", lambda o, v: o["memfd"].seal(v), [None, 5, "nope", []]),
        ("Memfd.verify(expected)", lambda o, v: o["memfd"].verify(v), [None, 5, "text", {}, {"size": "x"}]),
        # holder (no holder listening: names are checked before connecting)
        ("Holder(path)", lambda o, v: Holder(v), BAD_TEXTS),
        ("Holder.hold(name)", lambda o, v: o["holder"].hold(v, o["memfd"]), BAD_TEXTS),
        ("Holder.hold(file)", lambda o, v: o["holder"].hold("x", v), [None, "x", 1.5, -1, 2**64]),
        ("Holder.hold(manifest)", lambda o, v: o["holder"].hold("x", o["memfd"], v), [5, "x", [], {1: object()}]),
        ("Holder.hold_session(session)", lambda o, v: o["holder"].hold_session(v), [None, 5, "x", o_memfd_marker]),
        ("Holder.fetch(name)", lambda o, v: o["holder"].fetch(v), BAD_TEXTS),
        ("Holder.fetch_session(name)", lambda o, v: o["holder"].fetch_session(v), BAD_TEXTS),
        ("Holder.release(name)", lambda o, v: o["holder"].release(v), BAD_TEXTS),
        ("Holder.spawn(timeout)", lambda o, v: Holder.spawn("/nonexistent/x.sock", timeout=v), [None, "1", -1, float("nan")]),
        # kexec (only values refused before the kernel is asked)
        ("kexec.load(kernel)", lambda o, v: kexec.load(v), [*BAD_TEXTS, "/nonexistent/vmlinuz", "/dev/null"]),
        ("kexec.load(initrd)", lambda o, v: kexec.load("/nonexistent/vmlinuz", v), [5, 1.5, [], "\0"]),
        ("kexec.load(cmdline)", lambda o, v: kexec.load("/nonexistent/vmlinuz", None, v), [5, [], "\0", "x" * 70000]),
        ("kexec.cmdline_with(cmdline)", lambda o, v: kexec.cmdline_with(v, a="1"), [None, 5, []]),
        ("kexec.cmdline_with(value)", lambda o, v: kexec.cmdline_with("a=1", b=v), [None, 1.5, [], "has space", "a\"b", "\0"]),
        # sysfs, preservation, handoff
        ("sysfs.parse_bdf(text)", lambda o, v: sysfs.parse_bdf(v), [*BAD_TEXTS, "0000:00:04.9", "../../x"]),
        ("sysfs.PciDevice(bdf)", lambda o, v: sysfs.PciDevice(v), [*BAD_TEXTS, "../../../etc", "0000:00:04.0/../x"]),
        ("sysfs.check_driver_name(name)", lambda o, v: sysfs.check_driver_name(v), [*BAD_TEXTS, "../x", "a/b"]),
        ("preservation.why_not(fd)", lambda o, v: preservation.why_not(v), BAD_INTS),
        ("preservation.bdf_of_fd(fd)", lambda o, v: preservation.bdf_of_fd(v), BAD_INTS),
        ("preservation.irqs_enabled(bdf)", lambda o, v: preservation.irqs_enabled(v), [*BAD_TEXTS, "../x"]),
        ("preservation.power_state(bdf)", lambda o, v: preservation.power_state(v), [*BAD_TEXTS, "../x"]),
        ("preservation.bdf_of_cdev(path)", lambda o, v: preservation.bdf_of_cdev(v), BAD_TEXTS[:6]),
        ("handoff.connect(path)", lambda o, v: handoff.connect(v), [*BAD_TEXTS, "x" * 200]),
        ("handoff.session_key(name)", lambda o, v: handoff.session_key(v), [None, 5, 1.5, []]),
    ]
    return rows


o_memfd_marker = object()  # a non-session object for hold_session
ROWS = [(f"{label}={value!r:.40}", call, value) for label, call, values in _rows() for value in values]


@pytest.mark.parametrize(("label", "call", "value"), ROWS, ids=[r[0] for r in ROWS])
def test_refused_by_name(objects, label, call, value):
    try:
        call(objects, value)
    except errors.PyvfioError as exc:
        assert str(exc), f"{label}: an empty message"
        return
    except DENIED as exc:
        pytest.fail(f"{label}: {type(exc).__name__} from deep inside: {exc}")
    except OSError as exc:
        pytest.fail(f"{label}: a bare {type(exc).__name__}: {exc}")
    except (TypeError, ValueError) as exc:
        pytest.fail(f"{label}: an unnamed {type(exc).__name__}: {exc}")
    pytest.fail(f"{label}: accepted {value!r}")


@pytest.mark.parametrize("path", ["", "\0", "/dev/vfio/devices/../../null", "/dev/null", "../vfio0x", "x" * 5000])
def test_bdf_of_cdev_answers_none_for_anything_but_a_cdev_path(path):
    try:
        assert preservation.bdf_of_cdev(path, sysfs="/nonexistent") is None
    except errors.ArgumentOutOfRange:
        pass  # empty, NUL, too long: refused by name


def test_power_state_and_irqs_refuse_path_tricks_in_the_bdf(tmp_path):
    secret = tmp_path / "bus/pci/devices/x"
    secret.mkdir(parents=True)
    (secret / "power_state").write_text("D0\n")
    with pytest.raises(errors.PyvfioError):
        preservation.power_state("../x", sysfs=str(tmp_path))
