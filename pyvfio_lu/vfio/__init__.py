"""VFIO: a PCI device in any IOMMU mode, split the way the kernel's interface is:

- :mod:`.device`: :class:`VfioDevice`: open (by BDF or cdev path), bind/attach, info,
  regions and config space, reset, device features, lifetime;
- :mod:`.bar`: :class:`Bar`, exact-width MMIO;
- :mod:`.irqs`: INTx/MSI/MSI-X to eventfds;
- :mod:`.live_update`: readiness, preserve, and the errors of a preserved or frozen device;
- :mod:`.records`: the decoded info records and capability chains.

Everything is importable from ``pyvfio_lu.vfio`` as before.
"""

from ..errors import VfioPreservationUnsupported
from ..iommu import Iommu
from .bar import Bar
from .device import VfioDevice, _check_cdev_path  # noqa: F401 (private names: for the tests)
from .irqs import EventFd
from .live_update import PCI_COMMAND, PCI_COMMAND_MASTER, PCI_COMMAND_MEMORY, _open_error  # noqa: F401
from .records import (  # noqa: F401
    Capability,
    DeviceInfo,
    HotResetDevice,
    IrqInfo,
    RegionInfo,
    SparseArea,
    _caps_of,
    _device_cap,
    _region_cap,
)

__all__ = ["VfioDevice", "Iommu", "Bar", "EventFd", "DeviceInfo", "RegionInfo", "IrqInfo", "Capability",
           "HotResetDevice", "SparseArea", "VfioPreservationUnsupported", "PCI_COMMAND", "PCI_COMMAND_MASTER",
           "PCI_COMMAND_MEMORY"]
