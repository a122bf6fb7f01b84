"""Two live updates in a row, in one guest run (stage 1, kexec, stage 2, kexec, stage 3).

Stage 1 preserves guest RAM (and, where the kernel can, an edu device) in session "twice-a".
Stage 2 takes everything back, checks it, finishes "twice-a", and preserves it again in
"twice-b" (the device re-preserved from its retrieved fd). Stage 3 checks that the ledger
describes exactly "twice-b" (nothing stale from the first live update), that "twice-a" is gone,
and that everything arrived again. Run by tests/test_guest_scenarios.py; prints "CHECK name"
for every check that passed and exits non-zero at the first that does not.

    python tests/scenarios/two_live_updates.py --stage N
"""

from __future__ import annotations

import argparse
import os
import sys

from pyvfio_lu import edu, ledger
from pyvfio_lu.errors import DevicePreserved, NoSuchSession
from pyvfio_lu.holder import Holder
from pyvfio_lu.iommu import PAGE, Iommu
from pyvfio_lu.luo import LiveUpdate
from pyvfio_lu.memfd import Memfd
from pyvfio_lu.preservation import can_preserve_devices
from pyvfio_lu.status import liveupdate_number
from pyvfio_lu.sysfs import PciDevice
from pyvfio_lu.vfio import VfioDevice
from pyvfio_lu.vm.qemu import EDU_BDFS

BDF = EDU_BDFS["twice"]
IOVA = 0x400000
PATTERN = bytes(range(256)) * 16
HOLDER = "/run/pyvfio-lu-twice.sock"


def check(name: str, ok: bool, detail: str = "") -> None:
    if not ok:
        print(f"FAILED {name}: {detail}", flush=True)
        sys.exit(1)
    print(f"CHECK {name}", flush=True)


def preserve(lu: LiveUpdate, name: str, ram: Memfd, dev: VfioDevice | None) -> None:
    s = lu.create_session(name)
    s.preserve(ram, 1)
    if dev is not None:
        dev.preserve(s, 2)
    Holder.spawn(HOLDER).hold_session(s)


def take_back(lu: LiveUpdate, name: str, with_device: bool) -> tuple[Memfd, VfioDevice | None, object]:
    s = lu.retrieve_session(name)
    ram = Memfd.adopt(s.retrieve(1))
    check(f"{name}-ram-intact", os.pread(ram.fileno(), len(PATTERN), 0) == PATTERN)
    dev = None
    if with_device:
        PciDevice(BDF).bind_vfio()
        try:
            VfioDevice.open(BDF, "iommufd").close()
            check(f"{name}-open-refused", False, "a preserved device opened before its session finished")
        except DevicePreserved as exc:
            check(f"{name}-open-refused-names-session", f"session {name!r} as token 0x2" in str(exc), str(exc))
        dev = VfioDevice.from_fd(s.retrieve(2).detach(), iommu=Iommu("iommufd"))
        dev._owns_iommu = True
        dev.iommu.map_file(ram, IOVA, size=4 * PAGE)
        dev.enable_bus_master()
        e = edu.Edu(dev)
        e.dma_to_device(IOVA, edu.DMA_MAX)
        e.dma_from_device(IOVA + PAGE, edu.DMA_MAX)
        check(f"{name}-device-dma", os.pread(ram.fileno(), edu.DMA_MAX, PAGE) == PATTERN[:edu.DMA_MAX])
    return ram, dev, s


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--stage", type=int, choices=[1, 2, 3], required=True)
    stage = parser.parse_args().stage
    device = can_preserve_devices()
    print(f"stage {stage}: live update number {liveupdate_number()}, device preservation {device}", flush=True)
    with LiveUpdate() as lu:
        if stage == 1:
            PciDevice(BDF).bind_vfio()
            ram = Memfd.create("twice-ram", PATTERN, size=4 * PAGE)
            dev = VfioDevice.open(BDF, "iommufd") if device else None
            if dev is not None:
                dev.iommu.map_file(ram, IOVA, size=4 * PAGE)
            preserve(lu, "twice-a", ram, dev)
            check("stage1-preserved", True)
            return 0
        incoming = ledger.incoming()
        expected = "twice-a" if stage == 2 else "twice-b"
        check(f"stage{stage}-ledger-names-only-this-update", set(incoming) == {expected}, str(sorted(incoming)))
        check(f"stage{stage}-ledger-device", (incoming[expected]["files"].get("0x2", {}).get("bdf") == BDF) == device)
        ram, dev, s = take_back(lu, expected, device)
        if stage == 3:
            try:
                lu.retrieve_session("twice-a").close()
                check("stage3-first-session-gone", False, "twice-a came through a second time")
            except NoSuchSession:
                check("stage3-first-session-gone", True)
        if dev is not None:
            dev.iommu.unmap_all()
        s.finish()
        check(f"stage{stage}-finished", expected not in ledger.incoming())
        s.close()
        if stage == 2:
            preserve(lu, "twice-b", ram, dev)  # the retrieved device fd, preserved again
            check("stage2-preserved-again", True)
        else:
            if dev is not None:
                dev.close()
                with VfioDevice.open(BDF, "iommufd") as again:
                    check("stage3-normal-open", edu.Edu(again).identify() == edu.ID)
            check("stage3-live-update-number", liveupdate_number() == 2, str(liveupdate_number()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
