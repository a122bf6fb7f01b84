"""VFIO on QEMU's edu device behind the vIOMMU, in every IOMMU mode of the kernel's VFIO
selftests; plus the cdev negative cases and the live-update preconditions."""

from __future__ import annotations

import errno
import os

import pytest

from pyvfio_lu import edu, errors
from pyvfio_lu._cffi import lib
from pyvfio_lu.ioctl import FdKind, call
from pyvfio_lu.iommu import MODES, PAGE, DmaBuffer, Iommu
from pyvfio_lu.luo import LiveUpdate
from pyvfio_lu.memfd import Memfd
from pyvfio_lu.sysfs import PciDevice
from pyvfio_lu.vfio import VfioDevice

EDU_BDF = os.environ.get("PYVFIO_LU_EDU_BDF", "0000:00:04.0")
IOVA = 0x100000  # below edu's 28-bit DMA mask


@pytest.fixture(scope="session")
def edu_bdf() -> str:
    pci = PciDevice(EDU_BDF)
    assert (pci.vendor, pci.device) == (edu.VENDOR, edu.DEVICE)
    pci.bind_vfio()
    assert pci.driver == "vfio-pci"
    return pci.bdf


@pytest.fixture(params=MODES)
def dev(request, edu_bdf):
    with VfioDevice.open(edu_bdf, request.param) as d:
        yield d


@pytest.fixture
def cdev(edu_bdf):
    with VfioDevice.open(edu_bdf, "iommufd") as d:
        yield d


# --- device, regions, config space -----------------------------------------------------------
def test_device_info(dev):
    info = dev.info()
    assert info.is_pci and info.num_regions >= 9 and info.num_irqs == 5
    bar0 = dev.region_info(lib.VFIO_PCI_BAR0_REGION_INDEX)
    assert bar0.size == 1 << 20 and bar0.mappable and bar0.readable and bar0.writable
    config = dev.region_info(lib.VFIO_PCI_CONFIG_REGION_INDEX)
    assert config.readable and not config.mappable
    assert dev.irq_info(lib.VFIO_PCI_MSI_IRQ_INDEX).count == 1
    assert dev.irq_info(lib.VFIO_PCI_INTX_IRQ_INDEX).maskable


def test_config_space(dev):
    assert dev.config_read(0x00, 2) == edu.VENDOR
    assert dev.config_read(0x02, 2) == edu.DEVICE
    pci = PciDevice(dev.bdf)
    assert dev.config_read(0x00, 4) == (pci.device << 16) | pci.vendor
    cmd = dev.config_read(0x04, 2)
    dev.config_write(0x04, cmd ^ 0x4, 2)  # toggle bus master
    assert dev.config_read(0x04, 2) & 0x4 == (cmd ^ 0x4) & 0x4
    dev.config_write(0x04, cmd, 2)
    with pytest.raises(errors.InvalidArgument):
        dev.config_read(0x01, 2)  # unaligned


def test_bar0_registers_exact_width(dev):
    e = edu.Edu(dev)
    assert e.identify() == 0x010000ED
    # edu accepts only 4-byte accesses below 0x80 (QEMU refuses narrower ones), so a
    # narrow read that really is narrow cannot see the id's low byte 0xed; a 32-bit read
    # with the low byte masked off (what slicing an mmap may do) would.
    assert dev.bar(0).read8(0) != 0xED
    assert dev.bar(0).read16(0) != 0x00ED
    assert e.liveness(0x12345678) == 0xEDCBA987
    assert e.factorial(10) == 3628800
    with pytest.raises(errors.InvalidArgument):
        dev.bar(0).read32(2)  # unaligned
    with pytest.raises(errors.InvalidArgument):
        dev.bar(0).read32(1 << 20)  # past the end


def test_bar_pread_fallback_matches_mmap(dev):
    bar = dev.bar(0)
    assert bar.mapped
    assert int.from_bytes(dev.region_read(0, 0, 4), "little") == bar.read32(0) == edu.ID


def test_msi_delivered_to_eventfd(dev):
    e = edu.Edu(dev)
    dev.enable_bus_master()
    (efd,) = dev.enable_irq(lib.VFIO_PCI_MSI_IRQ_INDEX, 1)
    assert efd.poll() == 0
    e.raise_irq(1)
    assert efd.wait(timeout=10) >= 1
    e.ack_irq()
    dev.trigger_irq(lib.VFIO_PCI_MSI_IRQ_INDEX)  # software loopback of the same eventfd
    assert efd.wait(timeout=10) == 1
    dev.disable_irq(lib.VFIO_PCI_MSI_IRQ_INDEX)
    assert dev.irqs_enabled == {}


def test_dma_round_trip(dev):
    e = edu.Edu(dev)
    dev.enable_bus_master()
    pattern = bytes((i * 7 + 3) & 0xFF for i in range(edu.DMA_MAX))
    with DmaBuffer(2 * PAGE) as buf:
        m = dev.iommu.map(buf, IOVA)
        buf.write(pattern)
        e.dma_to_device(IOVA, edu.DMA_MAX)  # RAM -> device
        e.dma_from_device(IOVA + PAGE, edu.DMA_MAX)  # device -> RAM, next page
        assert buf.read(PAGE, edu.DMA_MAX) == pattern
        assert dev.iommu.unmap(m) == 2 * PAGE


def test_dma_to_unmapped_iova_corrupts_nothing(dev):
    e = edu.Edu(dev)
    dev.enable_bus_master()
    with DmaBuffer(PAGE) as buf:
        buf.write(b"\xAA" * PAGE)
        dev.iommu.map(buf, IOVA)
        e.dma_to_device(IOVA, 64)
        e.dma_from_device(IOVA + 16 * PAGE, 64)  # nothing mapped there: the IOMMU blocks it
        assert buf.read() == b"\xAA" * PAGE
        dev.iommu.unmap_all()
    assert e.identify() == edu.ID  # the device still answers


def test_dma_from_memfd_mapping(dev):
    e = edu.Edu(dev)
    dev.enable_bus_master()
    with Memfd.create("guest-ram", b"guest memory page".ljust(PAGE, b"."), size=2 * PAGE) as ram:
        buf = DmaBuffer(2 * PAGE, ram)
        dev.iommu.map(buf, IOVA)
        e.dma_to_device(IOVA, 64)
        e.dma_from_device(IOVA + PAGE, 64)
        dev.iommu.unmap_all()
        buf.close()
        assert os.pread(ram.fileno(), 64, PAGE) == b"guest memory page".ljust(64, b".")


def test_iova_ranges_and_limits(dev):
    ranges = dev.iommu.iova_ranges()
    assert ranges and all(r.start <= r.last for r in ranges)
    last = ranges[-1]
    with DmaBuffer(2 * PAGE) as buf:
        m = dev.iommu.map(buf, iova=last.last - PAGE + 1, size=PAGE)  # the last page of the IOVA space
        assert dev.iommu.unmap(m) == PAGE
        with pytest.raises(errors.Overflow):
            dev.iommu.map(buf, iova=2**64 - PAGE)  # iova + size wraps
    with pytest.raises(errors.Overflow):
        dev.iommu.unmap(2**64 - PAGE, 2 * PAGE)


def test_reset(dev):
    if dev.info().can_reset:
        dev.reset()
    else:
        with pytest.raises(errors.InvalidArgument):
            dev.reset()
    assert edu.Edu(dev).identify() == edu.ID


def test_hot_reset_info(dev):
    try:
        _flags, devices = dev.hot_reset_info()
    except errors.PyvfioError as exc:
        assert exc.errno == errno.ENODEV  # no slot or bus reset possible for this device
        return
    assert any(d.bdf == dev.bdf for d in devices)


def test_device_feature_probe(dev):
    # edu under vfio-pci has no migration; low-power entry is a vfio-pci feature
    assert dev.feature_probe(lib.VFIO_DEVICE_FEATURE_MIGRATION, lib.VFIO_DEVICE_FEATURE_GET) is False
    assert isinstance(dev.feature_probe(lib.VFIO_DEVICE_FEATURE_LOW_POWER_ENTRY, lib.VFIO_DEVICE_FEATURE_SET), bool)


# --- cdev + iommufd negative cases (vfio_iommufd_setup_test) --------------------------------
def _raw_cdev(bdf: str) -> int:
    return os.open(PciDevice(bdf).vfio_cdev, os.O_RDWR | os.O_CLOEXEC)


def test_calls_before_bind_fail(edu_bdf):
    with VfioDevice.from_fd(_raw_cdev(edu_bdf), bdf=edu_bdf) as d:
        with pytest.raises(errors.DeviceNotBound):
            d.info()
        with pytest.raises(errors.InvalidArgument):  # and the kernel agrees
            call(FdKind.VFIO_DEVICE, d.fileno(), "VFIO_DEVICE_GET_INFO")


def test_bind_bad_iommufd_fails(edu_bdf):
    with VfioDevice.from_fd(_raw_cdev(edu_bdf), bdf=edu_bdf) as d:
        with pytest.raises(errors.PyvfioError):
            d.bind(-2)
        with open("/dev/null", "rb") as null, pytest.raises(errors.PyvfioError):
            d.bind(null.fileno())


def test_repeated_bind_fails(edu_bdf):
    with Iommu("iommufd") as iommu, VfioDevice.from_fd(_raw_cdev(edu_bdf), bdf=edu_bdf) as d:
        d.bind(iommu)
        with pytest.raises(errors.InvalidArgument):
            d.bind(iommu)


def test_attach_detach_and_invalid_pt(edu_bdf):
    with Iommu("iommufd") as iommu, VfioDevice.from_fd(_raw_cdev(edu_bdf), bdf=edu_bdf, iommu=iommu,
                                                       attach=False) as d:
        with pytest.raises(errors.PyvfioError):
            d.attach(0xFFFFFFFF)
        hwpt = d.attach(iommu.ioas_id)
        assert hwpt and hwpt != iommu.ioas_id  # an automatic HWPT was made for the IOAS
        d.detach()
        d.attach(iommu.ioas_id)


def test_map_file_iommufd(cdev):
    e = edu.Edu(cdev)
    cdev.enable_bus_master()
    with Memfd.create("ram", b"mapped by file".ljust(PAGE, b"\0"), size=2 * PAGE) as ram:
        cdev.iommu.map_file(ram, IOVA, size=2 * PAGE)
        e.dma_to_device(IOVA, 32)
        e.dma_from_device(IOVA + PAGE, 32)
        cdev.iommu.unmap_all()
        assert os.pread(ram.fileno(), 32, PAGE) == b"mapped by file".ljust(32, b"\0")


# --- live update: the refusals before anything changes (on either kernel) ---------------------
def test_preserve_preconditions_refused_before_anything_changes(edu_bdf):
    with LiveUpdate() as lu, lu.create_session("vfio-preconditions") as s:
        with VfioDevice.open(edu_bdf, "vfio_type1v2_iommu") as legacy:
            with pytest.raises(errors.NotLiveUpdateReady, match="only a cdev fd"):
                legacy.preserve(s, 1)
        with VfioDevice.from_fd(_raw_cdev(edu_bdf), bdf=edu_bdf) as unbound:
            with pytest.raises(errors.NotLiveUpdateReady, match="not bound to an iommufd"):
                unbound.preserve(s, 2)
        with VfioDevice.open(edu_bdf, "iommufd") as d:
            d.enable_bus_master()
            d.enable_irq(lib.VFIO_PCI_MSI_IRQ_INDEX)
            with pytest.raises(errors.NotLiveUpdateReady, match="IRQs are enabled"):
                d.preserve(s, 3)
            assert d.irqs_enabled == {lib.VFIO_PCI_MSI_IRQ_INDEX: 1}  # untouched
            assert s.preserved == {}
        assert s.preserved == {}


def test_preserve_answer_matches_what_the_kernel_can_do(cdev):
    """The library asks the kernel what it can preserve: on a kernel without device
    preservation the refusal names it (and changes nothing); on one with it, it preserves."""
    from pyvfio_lu.preservation import can_preserve_devices

    with LiveUpdate() as lu, lu.create_session("vfio-unsupported") as s:
        with Memfd.create("ram", b"x") as ram:
            s.preserve(ram, 1)
        if can_preserve_devices():
            cdev.preserve(s, 2)
            assert s.preserved.keys() == {1, 2}
        else:
            with pytest.raises(errors.VfioPreservationUnsupported) as exc:
                cdev.preserve(s, 2)
            assert exc.value.errno == errno.ENOENT
            assert "CONFIG_VFIO_PCI_LIVEUPDATE" in str(exc.value) and "vfio-lu" in str(exc.value)
            assert s.preserved.keys() == {1}  # the session lost nothing
            # past the library's check the kernel's own ENOENT gets the same name
            with pytest.raises(errors.VfioPreservationUnsupported):
                s.preserve(cdev, 2)
    assert edu.Edu(cdev).identify() == edu.ID  # the device still works (the session was closed)


def test_intx_delivered_and_unmasked(dev):
    e = edu.Edu(dev)
    info = dev.irq_info(lib.VFIO_PCI_INTX_IRQ_INDEX)
    assert info.count == 1 and info.automasked
    (efd,) = dev.enable_irq(lib.VFIO_PCI_INTX_IRQ_INDEX)
    for _ in range(2):  # the second round proves the unmask re-armed the line
        e.raise_irq(1)
        assert efd.wait(timeout=10) >= 1
        e.ack_irq()
        dev.unmask_irq(lib.VFIO_PCI_INTX_IRQ_INDEX)
    dev.disable_irq(lib.VFIO_PCI_INTX_IRQ_INDEX)


def test_bar_through_pread_when_not_mapped(dev):
    from pyvfio_lu.vfio import Bar

    bar = Bar(dev, dev.region_info(0), mmap=False)
    assert not bar.mapped
    assert bar.read32(edu.REG_ID) == edu.ID
    bar.write32(edu.REG_LIVENESS, 0x0F0F0F0F)
    assert bar.read32(edu.REG_LIVENESS) == 0xF0F0F0F0


def test_from_fd_of_an_already_bound_cdev(edu_bdf):
    with Iommu("iommufd") as iommu:
        first = VfioDevice.from_fd(_raw_cdev(edu_bdf), bdf=edu_bdf, iommu=iommu)  # binds + attaches
        again = VfioDevice.from_fd(first.fileno(), bdf=edu_bdf, bound=True, owned=False)
        assert again.info().num_irqs == 5
        again.close()
        assert first.info().num_irqs == 5  # the borrowed wrapper did not close the fd
        first.close()



def test_device_feature_get_of_an_unsupported_feature(dev):
    with pytest.raises(errors.NotSupported) as exc:
        dev.feature_get(lib.VFIO_DEVICE_FEATURE_MIGRATION, 8)
    assert exc.value.errno == errno.ENOTTY and "VFIO_DEVICE_FEATURE" in str(exc.value)
