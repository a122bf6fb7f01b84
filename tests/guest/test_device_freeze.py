"""The kexec refused at freeze time, and what it leaves behind (runs before any other test
preserves a device: a refused kexec freezes whatever was preserved before the refusing file).

One session holds guest RAM, a device ready for the kexec, and a device whose MSI was enabled
*after* it was preserved. ``reboot(RB_KEXEC)`` is refused (KexecRefused) and nothing reboots;
the RAM is intact; a device the kernel froze before it reached the refusing one answers EIO
(DeviceFrozen) while its session holds it; ``recover_frozen`` (unbind + bind) is refused while
anything holds the device and works once nothing does.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from pyvfio_lu import edu, errors, kexec, preservation
from pyvfio_lu._cffi import lib
from pyvfio_lu.luo import LiveUpdate
from pyvfio_lu.memfd import Memfd
from pyvfio_lu.vfio import VfioDevice

pytestmark = pytest.mark.usefixtures("dp_kernel")


def test_irq_enabled_after_preserve_refuses_the_kexec_and_loses_nothing(edu_for):
    frozen_bdf, irq_bdf = edu_for("frozen"), edu_for("irq")
    pattern = os.urandom(8192)
    kexec.load(os.environ["PYVFIO_LU_GUEST_KERNEL"], os.environ["PYVFIO_LU_GUEST_INITRD"])
    try:
        with LiveUpdate() as lu:
            s = lu.create_session("dp-freeze")
        ram = Memfd.create("freeze-ram", pattern)
        s.preserve(ram, 1)
        ready = VfioDevice.open(frozen_bdf, "iommufd")
        ready.preserve(s, 2)
        late = VfioDevice.open(irq_bdf, "iommufd")
        late.preserve(s, 3)  # ready now...
        late.enable_irq(lib.VFIO_PCI_MSI_IRQ_INDEX)  # ...and not any more
        assert preservation.irqs_enabled(irq_bdf) == {"msi": 1}
        with pytest.raises(errors.KexecRefused) as exc:
            kexec.execute()
        assert "nothing was rebooted" in str(exc.value) or exc.value.errno
        # still this boot, the session intact, the RAM unchanged
        assert s.preserved.keys() == {1, 2, 3}
        assert os.pread(ram.fileno(), len(pattern), 0) == pattern
        # the device with the IRQ was refused before anything happened to it
        assert edu.Edu(late).identify() == edu.ID
        late.disable_irq(lib.VFIO_PCI_MSI_IRQ_INDEX)
        # the other one: frozen if the kernel reached it first (a fact recorded, not assumed)
        try:
            ready.info()
            ready_frozen = False
        except errors.DeviceFrozen as frozen:
            ready_frozen = True
            assert "unbound from vfio-pci and bound again" in str(frozen)
        print(f"device preserved before the refusing one frozen: {ready_frozen}")
        if ready_frozen:
            with pytest.raises(errors.DevicePreserved):  # the session still holds it: refused
                preservation.recover_frozen(frozen_bdf)
        ready.close()
        late.close()
        ram.close()
        s.close()  # un-preserves all three
        # Closing every fd and the session may be enough (the kernel un-preserves the device);
        # where a new open still answers EIO, unbind + bind recovers it. Which one: recorded.
        try:
            dev = VfioDevice.open(frozen_bdf, "iommufd")
            print("after closing the session and every fd, a new open works")
        except errors.DeviceFrozen:
            print("after closing the session and every fd, a new open still answers EIO: rebinding")
            preservation.recover_frozen(frozen_bdf)
            dev = VfioDevice.open(frozen_bdf, "iommufd")
        with dev:
            assert edu.Edu(dev).identify() == edu.ID
        # once nothing holds it, recovery is always allowed (here through the CLI)
        out = subprocess.run([sys.executable, "-m", "pyvfio_lu", "recover", frozen_bdf], capture_output=True,
                             text=True, check=True).stdout
        assert "bound to vfio-pci again" in out
        with VfioDevice.open(frozen_bdf, "iommufd") as dev:
            assert edu.Edu(dev).identify() == edu.ID
    finally:
        kexec.unload()
