"""The VFIO live-update flow across a real kexec, as far as the running kernel allows.

Guest RAM (a memfd) is always preserved. Where the kernel preserves devices, the device goes
with it (kept open and preserved, retrieved after the kexec and bound to a new iommufd);
where it cannot, the device is closed before the kexec and set up again after it: re-bind to
vfio-pci, open, bind to a new iommufd, attach. Either way the RAM is re-mapped at the same
IOVA (read from the ledger LUO carried) and the device DMAs it.
"""

from __future__ import annotations

import os

import pytest

from pyvfio_lu import edu, errors, ledger
from pyvfio_lu.iommu import PAGE
from pyvfio_lu.memfd import Memfd
from pyvfio_lu.preservation import can_preserve_devices
from pyvfio_lu.sysfs import PciDevice
from pyvfio_lu.vfio import VfioDevice
from pyvfio_lu.vm.qemu import EDU_BDFS

EDU_BDF = os.environ.get("PYVFIO_LU_EDU_BDF", EDU_BDFS["ram"])
IOVA = 0x200000
RAM_SIZE = 4 * PAGE


class TestDeviceAndRamAcrossKexec:
    @pytest.mark.before_kexec
    def test_before(self, luo, carry):
        PciDevice(EDU_BDF).bind_vfio()
        pattern = os.urandom(edu.DMA_MAX)
        ram = Memfd.create("guest-ram", pattern, size=RAM_SIZE)
        dev = VfioDevice.open(EDU_BDF, "iommufd")
        e = edu.Edu(dev)
        dev.enable_bus_master()
        dev.iommu.map_file(ram, IOVA, size=RAM_SIZE)
        e.dma_to_device(IOVA, edu.DMA_MAX)
        e.dma_from_device(IOVA + PAGE, edu.DMA_MAX)  # the device wrote guest RAM
        s = luo.create_session("vm-1")
        s.preserve(ram, 1)
        carry["device_preserved"] = can_preserve_devices()
        if carry["device_preserved"]:
            dev.preserve(s, 2)
        else:
            with pytest.raises(errors.VfioPreservationUnsupported):
                dev.preserve(s, 2)
        carry["sha_page1"] = pattern.hex()
        carry.hold(s)
        dev.close()
        ram.close()

    @pytest.mark.after_kexec
    def test_after(self, luo, carry):
        pci = PciDevice(EDU_BDF)
        pci.bind_vfio()  # nothing binds vfio-pci by itself after the kexec
        iovas = ledger.incoming()["vm-1"]["files"]["0x1"]["iovas"]
        assert iovas == [[IOVA, RAM_SIZE, 0]]
        with luo.retrieve_session("vm-1") as s:
            ram = Memfd.adopt(s.retrieve(1))
            expected = bytes.fromhex(carry["sha_page1"])
            assert os.pread(ram.fileno(), edu.DMA_MAX, PAGE) == expected  # written by DMA before the kexec
            if carry["device_preserved"]:
                dev = VfioDevice.from_fd(s.retrieve(2).detach(), iommu="iommufd", owned=True)  # a new iommufd
            else:
                dev = VfioDevice.open(EDU_BDF, "iommufd")  # a new iommufd, bind, attach
            with dev:
                e = edu.Edu(dev)
                assert e.identify() == edu.ID
                dev.enable_bus_master()
                for iova, size, offset in iovas:  # the same IOVA as before
                    dev.iommu.map_file(ram, iova, size=size, offset=offset)
                e.dma_to_device(IOVA + PAGE, edu.DMA_MAX)
                e.dma_from_device(IOVA + 2 * PAGE, edu.DMA_MAX)
                assert os.pread(ram.fileno(), edu.DMA_MAX, 2 * PAGE) == expected
                s.finish()
                dev.iommu.unmap_all()
            ram.close()
