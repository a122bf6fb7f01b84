"""The VFIO live-update flow on this kernel, across a real kexec: guest RAM (a memfd) is
preserved; the device cannot be (upstream 7.2 has no CONFIG_VFIO_PCI_LIVEUPDATE), so it is
closed before the kexec and set up again after it: re-bind to vfio-pci, open, bind to a
new iommufd, attach, re-map the retrieved RAM at the same IOVA, DMA, finish."""

from __future__ import annotations

import os

import pytest

from pyvfio_lu import edu, errors
from pyvfio_lu.iommu import PAGE
from pyvfio_lu.memfd import Memfd
from pyvfio_lu.sysfs import PciDevice
from pyvfio_lu.vfio import VfioDevice

EDU_BDF = os.environ.get("PYVFIO_LU_EDU_BDF", "0000:00:04.0")
IOVA = 0x200000
RAM_SIZE = 4 * PAGE


class TestDeviceAndRamAcrossKexec:
    @pytest.mark.before_kexec
    def test_before(self, luo, carry):
        PciDevice(EDU_BDF).bind_vfio()
        pattern = os.urandom(edu.DMA_MAX)
        ram = Memfd.create("guest-ram", pattern, size=RAM_SIZE)
        with VfioDevice.open(EDU_BDF, "iommufd") as dev:
            e = edu.Edu(dev)
            dev.enable_bus_master()
            dev.iommu.map_file(ram, IOVA, size=RAM_SIZE)
            e.dma_to_device(IOVA, edu.DMA_MAX)
            e.dma_from_device(IOVA + PAGE, edu.DMA_MAX)  # the device wrote guest RAM
            s = luo.create_session("vm-1")
            s.preserve(ram, 1)
            with pytest.raises(errors.VfioPreservationUnsupported):
                dev.preserve(s, 2)
        carry["sha_page1"] = pattern.hex()
        carry.hold(s)
        ram.close()

    @pytest.mark.after_kexec
    def test_after(self, luo, carry):
        pci = PciDevice(EDU_BDF)
        pci.bind_vfio()  # nothing binds vfio-pci by itself after the kexec
        with luo.retrieve_session("vm-1") as s:
            ram = Memfd.adopt(s.retrieve(1))
            expected = bytes.fromhex(carry["sha_page1"])
            assert os.pread(ram.fileno(), edu.DMA_MAX, PAGE) == expected  # written by DMA before the kexec
            with VfioDevice.open(EDU_BDF, "iommufd") as dev:  # a new iommufd, bind, attach
                e = edu.Edu(dev)
                assert e.identify() == edu.ID
                dev.enable_bus_master()
                dev.iommu.map_file(ram, IOVA, size=RAM_SIZE)  # the same IOVA as before
                e.dma_to_device(IOVA + PAGE, edu.DMA_MAX)
                e.dma_from_device(IOVA + 2 * PAGE, edu.DMA_MAX)
                assert os.pread(ram.fileno(), edu.DMA_MAX, 2 * PAGE) == expected
                dev.iommu.unmap_all()
            s.finish()
            ram.close()
