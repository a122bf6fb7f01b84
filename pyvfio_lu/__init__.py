"""pyvfio_lu: Python bindings for Linux VFIO and the Live Update Orchestrator (LUO).

The public API, imported lazily so ``import pyvfio_lu`` stays cheap:

- :class:`LiveUpdate`, :class:`Session` (``pyvfio_lu.luo``): /dev/liveupdate and sessions;
- :class:`Memfd` (``pyvfio_lu.memfd``): memfds to preserve, with verification;
- :class:`Holder` (``pyvfio_lu.holder``): keep session fds alive until the kexec;
- ``pyvfio_lu.kexec``: load a kernel with ``kexec_file_load`` and reboot into it;
- :class:`VfioDevice`, :class:`Iommu` (``pyvfio_lu.vfio``): the VFIO device in any IOMMU mode;
- ``pyvfio_lu.errors``: every exception (all ``OSError`` subclasses carrying ``errno``).
"""

from __future__ import annotations

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (type checkers treat it as True)

if TYPE_CHECKING:  # what the lazy names are, for type checkers (nothing is imported at run time)
    from . import errors, kexec, status
    from .holder import Holder, daemonize_and_hold
    from .luo import LiveUpdate, PreservationLost, Session
    from .memfd import Memfd
    from .vfio import Iommu, VfioDevice

__version__ = "0.2.0"

_LAZY = {
    "LiveUpdate": "pyvfio_lu.luo",
    "Session": "pyvfio_lu.luo",
    "PreservationLost": "pyvfio_lu.luo",
    "Memfd": "pyvfio_lu.memfd",
    "Holder": "pyvfio_lu.holder",
    "daemonize_and_hold": "pyvfio_lu.holder",
    "VfioDevice": "pyvfio_lu.vfio",
    "Iommu": "pyvfio_lu.vfio",
    "status": "pyvfio_lu.status",
    "kexec": "pyvfio_lu.kexec",
    "errors": "pyvfio_lu.errors",
}

__all__ = [  # sorted(_LAZY), spelled out for type checkers
    "Holder", "Iommu", "LiveUpdate", "Memfd", "PreservationLost", "Session", "VfioDevice",
    "daemonize_and_hold", "errors", "kexec", "status",
]


def __getattr__(name: str) -> object:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'pyvfio_lu' has no attribute {name!r}")
    mod = __import__(module, fromlist=["_"])  # the submodule itself (importlib's import costs more than it saves)
    value = mod if module.rsplit(".", 1)[1] == name else getattr(mod, name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
