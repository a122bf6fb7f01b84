"""Bad input at the public VFIO entry points gets a named error and changes nothing; the
kernel's own quirks are normalised (an unmap that unmapped nothing is NotFound in every mode,
bookkeeping follows what the kernel did, EEXIST on map is MappingExists). Every IOMMU mode."""

from __future__ import annotations

import os

import pytest

from pyvfio_lu import edu, errors
from pyvfio_lu.iommu import MODES, PAGE, DmaBuffer
from pyvfio_lu.sysfs import PciDevice
from pyvfio_lu.vfio import VfioDevice

EDU_BDF = os.environ.get("PYVFIO_LU_EDU_BDF", "0000:00:04.0")
IOVA = 0x100000


@pytest.fixture(params=MODES)
def dev(request):
    PciDevice(EDU_BDF).bind_vfio()
    with VfioDevice.open(EDU_BDF, request.param) as d:
        yield d


@pytest.mark.parametrize("device", [4, None, b"0000:00:04.0", 4.0])
def test_open_wrong_type(device):
    with pytest.raises(errors.BadArgumentType, match="PCI address or a /dev/vfio/devices/vfioN path"):
        VfioDevice.open(device)


@pytest.mark.parametrize("path", ["/dev/vfio/devices/../../null", "/dev/vfio/devices/vfio0/..", "/dev/null",
                                  "/dev/vfio/devices/./vfio0", "/dev/vfio/devices/vfio0x"])
def test_open_path_tricks_open_nothing(path):
    before = set(os.listdir("/proc/self/fd"))
    with pytest.raises(errors.InvalidArgument, match="exactly"):
        VfioDevice.open(path)
    assert set(os.listdir("/proc/self/fd")) == before  # nothing was opened, not even for a moment


BAD_CALLS = {
    "region_info(-1)": lambda d: d.region_info(-1), "region_info(2**32)": lambda d: d.region_info(2**32),
    "irq_info(-1)": lambda d: d.irq_info(-1), "irq_info(2**40)": lambda d: d.irq_info(2**40),
    "region_info('0')": lambda d: d.region_info("0"), "config_read(-4)": lambda d: d.config_read(-4),
    "config_write(0x40, 2**32)": lambda d: d.config_write(0x40, 2**32),
    "region_read(0, -1, 4)": lambda d: d.region_read(0, -1, 4), "enable_irq(1, 0)": lambda d: d.enable_irq(1, 0),
}


@pytest.mark.parametrize("call", list(BAD_CALLS.values()), ids=[k.replace("*", "^") for k in BAD_CALLS])
def test_out_of_range_and_wrong_types_are_named(dev, call):
    with pytest.raises(errors.InvalidArgument) as exc:
        call(dev)
    assert isinstance(exc.value, (errors.ArgumentOutOfRange, errors.BadArgumentType))
    assert edu.Edu(dev).identify() == edu.ID  # nothing changed


def test_bar_widths_and_values(dev):
    bar = edu.Edu(dev).bar
    with pytest.raises(errors.InvalidArgument, match="width 3"):
        bar.read(0, 3)
    with pytest.raises(errors.ArgumentOutOfRange):
        bar.write(0x04, 2**32, 4)
    with pytest.raises(errors.BadArgumentType):
        bar.read("4", 4)
    assert bar.read32(0) == edu.ID


def test_unmap_of_nothing_is_not_found_in_every_mode(dev):
    with pytest.raises(errors.NotFound):
        dev.iommu.unmap(IOVA, PAGE)
    with DmaBuffer(2 * PAGE) as buf:
        dev.iommu.map(buf, IOVA)
        with pytest.raises(errors.MappingExists):  # overlapping: a named class, nothing changed
            dev.iommu.map(buf, IOVA + PAGE, size=PAGE)
        assert list(dev.iommu.mappings) == [IOVA]
        dev.iommu.unmap(IOVA, 2 * PAGE)
        assert dev.iommu.mappings == {}


def test_partial_unmap_bookkeeping_follows_the_kernel(dev):
    with DmaBuffer(2 * PAGE) as buf:
        dev.iommu.map(buf, IOVA)
        try:
            done = dev.iommu.unmap(IOVA, PAGE)  # the first half of a mapping
        except errors.PyvfioError as exc:  # type1 v2, iommufd: refused, nothing changed
            assert exc.errno in (22, 2), exc
            assert list(dev.iommu.mappings) == [IOVA]
            dev.iommu.unmap(IOVA, 2 * PAGE)
        else:
            if done == 2 * PAGE:  # type1 v1: the kernel unmapped the whole mapping
                assert dev.iommu.mappings == {}
            else:  # iommufd's type1 v1 compatibility: exactly the first page; the second stays mapped
                assert done == PAGE and list(dev.iommu.mappings) == [IOVA + PAGE]
                assert dev.iommu.mappings[IOVA + PAGE].size == PAGE
                with pytest.raises(errors.UnsafeOperation):
                    buf.close()  # the device can still reach its second page
                dev.iommu.unmap(IOVA + PAGE, PAGE)
            print(f"{dev.iommu.mode}: a half unmap unmapped {done:#x} bytes")
        assert not buf.mapped_by  # the buffer can be closed: nothing maps it any more
