"""Fixtures shared by the guest tests: which kernel this is, and the edu devices by role."""

from __future__ import annotations

import pytest

from pyvfio_lu.preservation import HOW_TO_GET, device_preservation
from pyvfio_lu.vm.qemu import EDU_BDFS


def needs_device_preservation() -> None:
    """Skip (with the reason and how to get such a kernel) unless this kernel preserves devices."""
    support = device_preservation()
    if support.supported is not True:
        pytest.skip(f"this kernel cannot preserve VFIO devices ({support.detail}); to run this test, "
                    f"{HOW_TO_GET} (the test suite then runs on it too)")


@pytest.fixture
def dp_kernel() -> None:
    needs_device_preservation()


@pytest.fixture
def edu_for():
    """The BDF of the edu device reserved for a role (see pyvfio_lu.vm.qemu.EDU_SLOTS), bound to vfio-pci."""
    from pyvfio_lu.sysfs import PciDevice

    def get(role: str) -> str:
        bdf = EDU_BDFS[role]
        PciDevice(bdf).bind_vfio()
        return bdf

    return get


@pytest.fixture(autouse=True)
def no_device_left_preserved():
    """Fail a test that leaves a VFIO device preserved by a session of this process (it would
    stay the session's until the kexec and break every later test that opens it). Sessions
    handed to a holder (carry.hold) are not this process's any more."""
    yield
    from pyvfio_lu import preservation

    left = preservation.preserved_here()
    if left:
        for session in {s for s, _t in left.values()}:
            preservation.forget_local(session)
        pytest.fail("the test left VFIO devices preserved by open sessions of this process: "
                    + ", ".join(f"{bdf} in session {s!r} token {t:#x}" for bdf, (s, t) in left.items())
                    + "; close the session (or hand it to a holder) before the test ends")
