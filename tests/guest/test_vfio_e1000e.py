"""VFIO on QEMU's e1000e (8086:10d3), for what edu lacks: a capability chain on a region
(MSI-X table BAR, msix-mappable), MSI-X vectors, a PM reset, and PCI power management
(the live-update D0 precondition on the real kernel)."""

from __future__ import annotations

import errno
import time

import pytest

from pyvfio_lu import errors
from pyvfio_lu._cffi import lib
from pyvfio_lu.luo import LiveUpdate
from pyvfio_lu.sysfs import PciDevice
from pyvfio_lu.vfio import VfioDevice

E1000E_BDF = "0000:00:08.0"
MSIX_BAR = 3


@pytest.fixture(scope="module")
def nic_bdf() -> str:
    pci = PciDevice(E1000E_BDF)
    assert (pci.vendor, pci.device) == (0x8086, 0x10D3)
    assert pci.driver in (None, "vfio-pci")  # its driver is blacklisted at boot
    pci.bind_vfio()
    return pci.bdf


@pytest.fixture(params=["iommufd", "vfio_type1v2_iommu"])
def nic(request, nic_bdf):
    with VfioDevice.open(nic_bdf, request.param) as d:
        yield d


def test_region_capability_chain(nic):
    info = nic.region_info(MSIX_BAR)
    assert info.mappable and info.size > 0
    assert info.msix_mappable  # read through the grow-and-retry capability protocol
    assert info.caps and info.caps[0].id == lib.VFIO_REGION_INFO_CAP_MSIX_MAPPABLE


def test_msix_vectors_to_eventfds(nic):
    count = nic.irq_info(lib.VFIO_PCI_MSIX_IRQ_INDEX).count
    assert count == 5
    fds = nic.enable_irq(lib.VFIO_PCI_MSIX_IRQ_INDEX, count)
    for i, fd in enumerate(fds):
        nic.trigger_irq(lib.VFIO_PCI_MSIX_IRQ_INDEX, i)
        assert fd.wait(timeout=10) == 1
        assert all(other.poll() == 0 for other in fds)  # only vector i fired
    nic.disable_irq(lib.VFIO_PCI_MSIX_IRQ_INDEX)
    assert nic.irqs_enabled == {}


def test_reset(nic):
    if nic.info().can_reset:
        nic.reset()
    else:
        with pytest.raises(errors.InvalidArgument):
            nic.reset()
    assert nic.config_read(0x00, 2) == 0x8086


def test_power_state_agrees_with_the_pm_capability(nic):
    assert nic.power_state() == "D0"
    sysfs_view = nic.bdf
    nic.bdf = None  # force the config-space path
    try:
        assert nic.power_state() == "D0"
    finally:
        nic.bdf = sysfs_view


@pytest.fixture
def runtime_pm_allowed(nic_bdf):
    """PCI devices start with runtime PM forbidden (power/control = on): vfio-pci's low-power
    entry then cannot suspend the device. Allow it for the test, restore it after."""
    control = f"/sys/bus/pci/devices/{nic_bdf}/power/control"
    with open(control) as fh:
        before = fh.read().strip()
    with open(control, "w") as fh:
        fh.write("auto")
    yield
    with open(control, "w") as fh:
        fh.write(before)


def _wait_for_power_state(dev, prefix: str, timeout: float = 10.0) -> str:
    deadline = time.monotonic() + timeout
    while not (state := dev.power_state()).startswith(prefix) and time.monotonic() < deadline:
        time.sleep(0.05)  # runtime suspend and resume run from a workqueue
    return state


def test_d0_precondition_on_the_real_kernel(nic_bdf, runtime_pm_allowed):
    with VfioDevice.open(nic_bdf, "iommufd") as dev, LiveUpdate() as lu, lu.create_session("vfio-d3") as s:
        assert dev.feature_probe(lib.VFIO_DEVICE_FEATURE_LOW_POWER_ENTRY, lib.VFIO_DEVICE_FEATURE_SET)
        dev.feature_set(lib.VFIO_DEVICE_FEATURE_LOW_POWER_ENTRY)
        try:
            state = _wait_for_power_state(dev, "D3")
            assert state.startswith("D3")
            with pytest.raises(errors.NotLiveUpdateReady, match=f"in {state}, not D0"):
                dev.preserve(s, 1)
            assert s.preserved == {}
        finally:
            dev.feature_set(lib.VFIO_DEVICE_FEATURE_LOW_POWER_EXIT)
        assert _wait_for_power_state(dev, "D0") == "D0"
        from pyvfio_lu.preservation import can_preserve_devices

        if can_preserve_devices():
            dev.preserve(s, 1)  # every precondition met: preserved (given back when the session closes)
        else:
            with pytest.raises(errors.VfioPreservationUnsupported):  # every precondition met: the kernel answers
                dev.preserve(s, 1)


def test_hot_reset_on_a_device_without_slot_or_bus_reset(nic):
    """Both hot-reset ioctls reach the kernel; on the root bus there is no slot or bus reset."""
    with pytest.raises(errors.PyvfioError) as info_exc:
        nic.hot_reset_info()
    assert info_exc.value.errno == errno.ENODEV
    with pytest.raises(errors.PyvfioError) as exc:
        nic.hot_reset()
    assert exc.value.errno in (errno.ENODEV, errno.EINVAL) and "VFIO_DEVICE_PCI_HOT_RESET" in str(exc.value)
    assert nic.config_read(0x00, 2) == 0x8086  # the device is untouched
