"""VFIO devices carried across a real kexec (two-stage tests; the kernel's own kexec selftest
cases, written from the series' contract). Each class has its own edu device: a preserved
device belongs to its session until the kexec. On a kernel without device preservation every
part skips, saying how to get one.

After the kexec the device is bound to no driver; opening it is refused (EBUSY) while its
session is unfinished, and the library names the session and token from the ledger LUO
carried; FINISH is refused until every device was retrieved and bound to an iommufd; the
retrieved fd is a full device fd once bound to a new iommufd.
"""

from __future__ import annotations

import os

import pytest

from pyvfio_lu import edu, errors, ledger
from pyvfio_lu.iommu import PAGE, Iommu
from pyvfio_lu.memfd import Memfd
from pyvfio_lu.sysfs import PciDevice
from pyvfio_lu.vfio import PCI_COMMAND, VfioDevice
from pyvfio_lu.vm.qemu import EDU_BDFS

pytestmark = pytest.mark.usefixtures("dp_kernel")
IOVA = 0x200000
RAM = 4 * PAGE
REGS = (edu.REG_DMA_SRC, edu.REG_DMA_DST, edu.REG_DMA_COUNT, edu.REG_FACTORIAL)
_stage2: dict = {}  # state shared by the ordered after_kexec parts of one class
_kept: list = []  # objects stage 1 keeps open until the process exits (no unmap before the kexec)


@pytest.mark.keeps_fds  # the after_kexec steps share the session, the device and the RAM
class TestDeviceFlow:
    """One device and its guest RAM through the whole flow, one step per test after the kexec."""

    @pytest.mark.before_kexec
    def test_before(self, luo, carry, edu_for):
        bdf = edu_for("flow")
        pattern = os.urandom(edu.DMA_MAX)
        ram = Memfd.create("flow-ram", pattern, size=RAM)
        dev = VfioDevice.open(bdf, "iommufd")
        e = edu.Edu(dev)
        dev.enable_bus_master()
        dev.iommu.map_file(ram, IOVA, size=RAM)
        e.dma_to_device(IOVA, edu.DMA_MAX)  # the device's buffer now holds the pattern
        e.dma_from_device(IOVA + PAGE, edu.DMA_MAX)
        assert os.pread(ram.fileno(), edu.DMA_MAX, PAGE) == pattern
        e.factorial(5)
        carry["regs"] = {f"{r:#x}": e.bar.read32(r) for r in REGS}
        carry["pattern"] = pattern.hex()
        s = luo.create_session("lu-flow")
        s.preserve(ram, 1)
        dev.preserve(s, 2)
        assert s.records()["0x1"]["iovas"] == [[IOVA, RAM, 0]]  # the IOVA travels in the ledger
        carry.hold(s)
        dev.close()
        ram.close()

    @pytest.mark.after_kexec
    def test_after_ledger_lists_the_session(self, luo, carry):
        entry = ledger.incoming()["lu-flow"]
        files = entry["files"]
        assert files["0x2"]["kind"] == "vfio-device" and files["0x2"]["bdf"] == EDU_BDFS["flow"]
        assert files["0x1"] == {"kind": "memfd", "name": "flow-ram", "size": RAM, "iovas": [[IOVA, RAM, 0]]}

    @pytest.mark.after_kexec
    def test_after_status_and_devices_show_it(self, luo, carry):
        import json
        import subprocess
        import sys

        bdf = EDU_BDFS["flow"]
        cli = [sys.executable, "-m", "pyvfio_lu"]
        st = json.loads(subprocess.run([*cli, "status", "--json"], capture_output=True, text=True, check=True).stdout)
        assert st["device_preservation"]["supported"] is True
        assert st["incoming"]["lu-flow"]["files"]["0x2"]["bdf"] == bdf
        assert {"bdf": bdf, "session": "lu-flow", "token": "0x2", "direction": "incoming"} in st["preserved_devices"]
        text = subprocess.run([*cli, "status"], capture_output=True, text=True, check=True).stdout
        assert "incoming sessions" in text and f"VFIO device {bdf}" in text and "memfd 'flow-ram'" in text
        (row,) = json.loads(subprocess.run([*cli, "devices", "--json", bdf], capture_output=True, text=True,
                                           check=True).stdout)
        assert row["preserved"] == {"bdf": bdf, "session": "lu-flow", "token": "0x2", "direction": "incoming"}

    @pytest.mark.after_kexec
    def test_after_device_has_no_driver(self, luo, carry):
        assert PciDevice(EDU_BDFS["flow"]).driver is None  # nothing binds it by itself
        PciDevice(EDU_BDFS["flow"]).bind_vfio()

    @pytest.mark.after_kexec
    def test_after_open_refused_naming_session_and_token(self, luo, carry):
        bdf = EDU_BDFS["flow"]
        for target in (bdf, PciDevice(bdf).vfio_cdev):
            with pytest.raises(errors.DevicePreserved, match="session 'lu-flow' as token 0x2") as exc:
                VfioDevice.open(target, "iommufd")
            assert exc.value.errno == 16  # EBUSY
        with pytest.raises(errors.DevicePreserved, match="lu-flow"):
            VfioDevice.open(bdf, "vfio_type1v2_iommu")  # the group path is refused too

    @pytest.mark.after_kexec
    def test_after_finish_refused_before_the_device_is_retrieved(self, luo, carry):
        s = _stage2["flow"] = luo.retrieve_session("lu-flow")
        _stage2["ram"] = Memfd.adopt(s.retrieve(1))
        with pytest.raises(errors.FinishRefused):
            s.finish()

    @pytest.mark.after_kexec
    def test_after_finish_refused_until_bound(self, luo, carry):
        s = _stage2["flow"]
        fd = _stage2["fd"] = s.retrieve(2)
        assert os.readlink(f"/proc/self/fd/{fd.fileno()}") == "anon_inode:[vfio-device-liveupdate]"
        with pytest.raises(errors.FinishRefused):
            s.finish()

    @pytest.mark.after_kexec
    def test_after_from_fd_on_a_new_iommufd(self, luo, carry):
        fd = _stage2.pop("fd")
        dev = _stage2["dev"] = VfioDevice.from_fd(fd.detach(), iommu=Iommu("iommufd"))
        assert dev.bound and dev.bdf == EDU_BDFS["flow"]
        assert dev.info().is_pci and edu.Edu(dev).identify() == edu.ID

    @pytest.mark.after_kexec
    def test_after_register_state_is_a_recorded_fact(self, luo, carry):
        dev = _stage2["dev"]
        regs = {f"{r:#x}": edu.Edu(dev).bar.read32(r) for r in REGS}
        print(f"edu registers before the kexec {carry['regs']}, after {regs}")
        assert regs == carry["regs"]  # edu has no reset: the series leaves its registers alone
        assert not dev.config_read(PCI_COMMAND, 2) & 0x4  # but bus mastering was turned off

    @pytest.mark.after_kexec
    def test_after_remap_at_the_same_iova_and_dma(self, luo, carry):
        dev, ram = _stage2["dev"], _stage2["ram"]
        iovas = ledger.incoming()["lu-flow"]["files"]["0x1"]["iovas"]
        for iova, size, offset in iovas:
            dev.iommu.map_file(ram, iova, size=size, offset=offset)
        pattern = bytes.fromhex(carry["pattern"])
        assert os.pread(ram.fileno(), edu.DMA_MAX, 0) == pattern
        e = edu.Edu(dev)
        dev.enable_bus_master()
        e.dma_from_device(IOVA + 2 * PAGE, edu.DMA_MAX)  # its buffer kept the pattern
        assert os.pread(ram.fileno(), edu.DMA_MAX, 2 * PAGE) == pattern
        e.dma_to_device(IOVA + PAGE, edu.DMA_MAX)
        e.dma_from_device(IOVA + 3 * PAGE, edu.DMA_MAX)
        assert os.pread(ram.fileno(), edu.DMA_MAX, 3 * PAGE) == pattern

    @pytest.mark.after_kexec
    def test_after_finish_then_a_normal_open(self, luo, carry):
        s, dev, ram = _stage2.pop("flow"), _stage2.pop("dev"), _stage2.pop("ram")
        s.finish()
        assert "lu-flow" not in ledger.incoming()
        dev.close()
        ram.close()
        s.close()
        with VfioDevice.open(EDU_BDFS["flow"], "iommufd") as again:
            assert edu.Edu(again).identify() == edu.ID


class TestTwoDevicesOneSession:
    @pytest.mark.before_kexec
    def test_before(self, luo, carry, edu_for):
        s = luo.create_session("lu-pair")
        for token, role in ((1, "pair-a"), (2, "pair-b")):
            with VfioDevice.open(edu_for(role), "iommufd") as dev:
                edu.Edu(dev).liveness(token)
                dev.preserve(s, token)
        carry.hold(s)

    @pytest.mark.after_kexec
    def test_after_retrieved_in_reverse_order(self, luo, carry):
        for role in ("pair-a", "pair-b"):
            PciDevice(EDU_BDFS[role]).bind_vfio()
        with luo.retrieve_session("lu-pair") as s, Iommu("iommufd") as iommu:
            b = VfioDevice.from_fd(s.retrieve(2).detach(), iommu=iommu)
            with pytest.raises(errors.FinishRefused):
                s.finish()  # device 1 is still in the session
            a = VfioDevice.from_fd(s.retrieve(1).detach(), iommu=iommu)
            assert (a.bdf, b.bdf) == (EDU_BDFS["pair-a"], EDU_BDFS["pair-b"])
            assert edu.Edu(a).identify() == edu.Edu(b).identify() == edu.ID
            s.finish()
            a.close()
            b.close()


class TestDeviceWith500Memfds:
    COUNT = 500

    @pytest.mark.before_kexec
    def test_before(self, luo, carry, edu_for):
        s = luo.create_session("lu-500")
        with VfioDevice.open(edu_for("memfds"), "iommufd") as dev:
            dev.preserve(s, 0)
        for token in range(1, self.COUNT + 1):
            with Memfd.create(f"m{token}", token.to_bytes(4, "little") * 1024) as m:
                s.preserve(m, token)
        carry.hold(s)

    @pytest.mark.after_kexec
    def test_after(self, luo, carry):
        assert len(ledger.incoming()["lu-500"]["files"]) == self.COUNT + 1
        PciDevice(EDU_BDFS["memfds"]).bind_vfio()
        with luo.retrieve_session("lu-500") as s:
            for token in range(1, self.COUNT + 1):
                with Memfd.adopt(s.retrieve(token)) as m:
                    assert m.read_all() == token.to_bytes(4, "little") * 1024
            with VfioDevice.from_fd(s.retrieve(0).detach(), iommu=Iommu("iommufd")) as dev:
                s.finish()
                assert edu.Edu(dev).identify() == edu.ID


@pytest.mark.keeps_fds  # stage 1 keeps the device and RAM open under the running DMA
class TestDeviceBusyWithDmaAtKexec:
    """A child process keeps the device doing DMA into preserved RAM until the kexec freezes it
    (its BAR mapping is revoked then: the child dies of it, the kexec goes on)."""

    @pytest.mark.before_kexec
    def test_before(self, luo, carry, edu_for):
        ram = Memfd.create("busy-ram", os.urandom(edu.DMA_MAX), size=RAM)
        dev = VfioDevice.open(edu_for("busy"), "iommufd")
        dev.enable_bus_master()
        dev.iommu.map_file(ram, IOVA, size=RAM)
        e = edu.Edu(dev)
        s = luo.create_session("lu-busy")
        s.preserve(ram, 1)
        dev.preserve(s, 2)
        pid = os.fork()
        if pid == 0:  # the DMA loop: runs until the kexec
            try:
                os.setsid()
                from pyvfio_lu.holder import _close_all_but

                _close_all_but([0, 1, 2, dev.fileno()])  # not /dev/liveupdate or the sessions
                while True:
                    e.dma_to_device(IOVA, edu.DMA_MAX, timeout=30)
                    e.dma_from_device(IOVA + PAGE, edu.DMA_MAX, timeout=30)
            finally:
                os._exit(0)
        carry["child"] = pid
        carry.hold(s)
        os.kill(pid, 0)  # still running when this process lets go
        _kept.extend((dev, ram))  # closing them here would unmap the RAM under the running DMA

    @pytest.mark.after_kexec
    def test_after(self, luo, carry):
        PciDevice(EDU_BDFS["busy"]).bind_vfio()
        with luo.retrieve_session("lu-busy") as s:
            ram = Memfd.adopt(s.retrieve(1))
            with VfioDevice.from_fd(s.retrieve(2).detach(), iommu=Iommu("iommufd")) as dev:
                s.finish()
                dev.iommu.map_file(ram, IOVA, size=RAM)
                dev.enable_bus_master()
                e = edu.Edu(dev)
                e.dma_to_device(IOVA, edu.DMA_MAX)
                e.dma_from_device(IOVA + 2 * PAGE, edu.DMA_MAX)
                assert os.pread(ram.fileno(), edu.DMA_MAX, 2 * PAGE) == os.pread(ram.fileno(), edu.DMA_MAX, 0)
            ram.close()
