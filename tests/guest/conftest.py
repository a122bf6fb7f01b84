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
