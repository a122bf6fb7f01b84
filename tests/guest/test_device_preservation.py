"""Preserving a VFIO device in one boot: every refusal before anything changes, success, and
a closed session giving the device back. Written from the VFIO live-update series' contract
and the cases of its uapi selftest; on a kernel without device preservation each test skips,
saying how to get one (the refusal on such a kernel is checked in test_vfio_edu.py)."""

from __future__ import annotations

import errno
import os

import pytest

from pyvfio_lu import edu, errors, ledger, preservation
from pyvfio_lu._cffi import lib
from pyvfio_lu.holder import Holder
from pyvfio_lu.luo import LiveUpdate
from pyvfio_lu.memfd import Memfd
from pyvfio_lu.sysfs import PciDevice
from pyvfio_lu.vfio import VfioDevice

EDU = "0000:00:04.0"
pytestmark = pytest.mark.usefixtures("dp_kernel")


@pytest.fixture
def edu_bdf():
    PciDevice(EDU).bind_vfio()
    return EDU


def test_kernel_says_it_preserves_devices():
    support = preservation.device_preservation()
    assert support.supported is True and "CONFIG_VFIO_PCI_LIVEUPDATE=y" in support.detail


def test_legacy_group_fd_refused_before_anything_changes(edu_bdf):
    with VfioDevice.open(edu_bdf, "vfio_type1v2_iommu") as dev, LiveUpdate() as lu, \
            lu.create_session("dp-group") as s:
        with pytest.raises(errors.NotLiveUpdateReady, match="legacy VFIO group path"):
            dev.preserve(s, 1)
        assert s.preserved == {}
        # past the library's check, the kernel itself refuses (ENOENT) and the error says why
        with pytest.raises(errors.DeviceNotPreservable, match="legacy VFIO group path") as exc:
            s.preserve(dev, 1)
        assert exc.value.errno == errno.ENOENT and s.preserved == {}
        assert edu.Edu(dev).identify() == edu.ID


def test_unbound_cdev_fd_refused(edu_bdf):
    path = PciDevice(edu_bdf).vfio_cdev
    fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    with VfioDevice.from_fd(fd) as dev, LiveUpdate() as lu, lu.create_session("dp-unbound") as s:
        assert dev.bdf == edu_bdf  # found from the cdev's sysfs entry
        with pytest.raises(errors.NotLiveUpdateReady, match="not bound to an iommufd"):
            dev.preserve(s, 1)
        with pytest.raises(errors.DeviceNotPreservable, match="not bound to an iommufd") as exc:
            s.preserve(fd, 1)
        assert exc.value.errno == errno.ENOENT and s.preserved == {}


def test_irq_enabled_through_another_wrapper_is_seen(edu_bdf):
    with VfioDevice.open(edu_bdf, "iommufd") as dev, LiveUpdate() as lu, lu.create_session("dp-irq") as s:
        other = VfioDevice.from_fd(dev.fileno(), owned=False, bound=True)
        other.enable_irq(lib.VFIO_PCI_MSI_IRQ_INDEX)
        try:
            assert dev.irqs_enabled == {}  # this object enabled nothing...
            assert preservation.irqs_enabled(edu_bdf) == {"msi": 1}  # ...but the kernel shows it
            with pytest.raises(errors.NotLiveUpdateReady, match=r"IRQs are enabled \(msi: 1 in /proc/interrupts\)"):
                dev.preserve(s, 1)
            assert s.preserved == {}
        finally:
            other.disable_irq(lib.VFIO_PCI_MSI_IRQ_INDEX)
        assert preservation.irqs_enabled(edu_bdf) == {}
        assert dev.live_update_problems() == []


def test_preserve_succeeds_and_names_the_device(edu_bdf):
    with VfioDevice.open(edu_bdf, "iommufd") as dev, LiveUpdate() as lu, lu.create_session("dp-ok") as s:
        dev.preserve(s, 7)
        assert s.records()["0x7"] == {"kind": "vfio-device", "bdf": edu_bdf, "path": dev.path}
        assert preservation.holder_of(edu_bdf) == ("dp-ok", 7)
        assert edu.Edu(dev).identify() == edu.ID  # the fd keeps working until the kexec
    assert preservation.holder_of(edu_bdf) is None


def test_closed_session_gives_the_device_back(edu_bdf):
    with LiveUpdate() as lu:
        s = lu.create_session("dp-give-back")
        with VfioDevice.open(edu_bdf, "iommufd") as dev:
            dev.preserve(s, 1)
        # the session still holds the device's file: a new open cannot bind it, and says why
        with pytest.raises(errors.DevicePreserved, match="session 'dp-give-back' \\(token 0x1\\)"):
            VfioDevice.open(edu_bdf, "iommufd")
        s.close()
    with VfioDevice.open(edu_bdf, "iommufd") as dev:  # closing the session gave it back
        assert edu.Edu(dev).identify() == edu.ID


def test_already_preserved_names_the_other_session(edu_bdf):
    with VfioDevice.open(edu_bdf, "iommufd") as dev, LiveUpdate() as lu, \
            lu.create_session("dp-first") as s1, lu.create_session("dp-second") as s2:
        dev.preserve(s1, 1)
        with pytest.raises(errors.AlreadyPreserved, match="session 'dp-first' \\(token 0x1\\)") as exc:
            dev.preserve(s2, 1)
        assert exc.value.errno == errno.EBUSY and s2.preserved == {} and s1.preserved.keys() == {1}


def test_token_in_use_leaves_the_device_free(edu_bdf):
    with VfioDevice.open(edu_bdf, "iommufd") as dev, LiveUpdate() as lu, lu.create_session("dp-token") as s:
        with Memfd.create("ram", b"x") as ram:
            s.preserve(ram, 1)
        with pytest.raises(errors.TokenInUse):
            dev.preserve(s, 1)
        assert s.preserved.keys() == {1}
        dev.preserve(s, 2)  # nothing was half-done: the device preserves under a free token
        assert s.preserved.keys() == {1, 2}


def test_holder_ledger_names_the_device_on_open(edu_bdf):
    holder = Holder.spawn("/run/pyvfio-lu-dp-holder.sock")
    try:
        with LiveUpdate() as lu:
            s = lu.create_session("dp-held")
            with VfioDevice.open(edu_bdf, "iommufd") as dev:
                dev.preserve(s, 3)
            holder.hold_session(s)  # the holder writes its ledger in LUO and mirrors it here
        held = ledger.outgoing()["dp-held"]
        assert held["files"]["0x3"]["bdf"] == edu_bdf and held["holder"]["kind"] == "holder"
        from pyvfio_lu.status import preserved_devices

        assert {"bdf": edu_bdf, "session": "dp-held", "token": "0x3", "direction": "outgoing"} in preserved_devices()
        with pytest.raises(errors.DevicePreserved, match="session 'dp-held' \\(token 0x3\\)"):
            VfioDevice.open(edu_bdf, "iommufd")
        holder.release("session:dp-held")
        assert "dp-held" not in ledger.outgoing()
        with VfioDevice.open(edu_bdf, "iommufd") as dev:
            assert edu.Edu(dev).identify() == edu.ID
    finally:
        holder.stop()
