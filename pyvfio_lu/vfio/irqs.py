"""Device interrupts: INTx, MSI and MSI-X routed to eventfds (VFIO_DEVICE_SET_IRQS)."""

from __future__ import annotations

import errno
import os

from .._cffi import lib
from ..errors import InvalidArgument, check_int
from ..fd import OwnedFd

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (type checkers treat it as True)

if TYPE_CHECKING:
    from typing import Any

    from .records import IrqInfo

U32_MAX = 2**32 - 1


class EventFd(OwnedFd):
    """An eventfd an IRQ is routed to."""

    __slots__ = ()

    @classmethod
    def create(cls, what: str = "eventfd") -> EventFd:
        return cls(os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK), what)

    def wait(self, timeout: float | None = None) -> int:
        """Block until the eventfd fires (or ``timeout`` s pass: TimeoutError); returns the count."""
        import select

        r, _, _ = select.select([self.fileno()], [], [], timeout)
        if not r:
            raise TimeoutError(f"{self.what}: no interrupt within {timeout} s")
        return os.eventfd_read(self.fileno())

    def poll(self) -> int:
        """The count so far without blocking (0 if none)."""
        try:
            return os.eventfd_read(self.fileno())
        except BlockingIOError:
            return 0


class IrqsMixin:
    """The IRQ verbs of :class:`~pyvfio_lu.vfio.VfioDevice`."""

    _irq_fds: dict[int, list[EventFd]]
    _irqs_enabled: dict[int, int]

    if TYPE_CHECKING:  # what the mixin uses of VfioDevice
        @property
        def name(self) -> str: ...
        def irq_info(self, index: int) -> IrqInfo: ...
        def _call(self, name: str, arg: Any = None, **kw: Any) -> Any: ...

    def enable_irq(self, index: int, count: int = 1) -> list[EventFd]:
        """Route vectors 0..count-1 of IRQ ``index`` (INTx=0, MSI=1, MSI-X=2, ERR=3, REQ=4) to new eventfds."""
        check_int(count, "vector count", 1, U32_MAX, "enable IRQ", self.name)
        info = self.irq_info(index)
        if not 1 <= count <= info.count:
            raise InvalidArgument(errno.EINVAL, "enable IRQ", self.name,
                                  f"IRQ index {index} has {info.count} vectors, asked for {count}")
        fds = [EventFd.create(f"eventfd for IRQ {index}.{i} of {self.name}") for i in range(count)]
        payload = b"".join(f.fileno().to_bytes(4, "little", signed=True) for f in fds)
        try:
            self._call("VFIO_DEVICE_SET_IRQS",
                       _irq_set(index, 0, count, lib.VFIO_IRQ_SET_DATA_EVENTFD | lib.VFIO_IRQ_SET_ACTION_TRIGGER,
                                payload))
        except BaseException:
            for f in fds:
                f.close()
            raise
        for f in self._irq_fds.pop(index, []):
            f.close()
        self._irq_fds[index] = fds
        self._irqs_enabled[index] = count
        return fds

    def disable_irq(self, index: int) -> None:
        """Tear down every vector of IRQ ``index`` (DATA_NONE|ACTION_TRIGGER, count 0)."""
        self._call("VFIO_DEVICE_SET_IRQS",
                   _irq_set(index, 0, 0, lib.VFIO_IRQ_SET_DATA_NONE | lib.VFIO_IRQ_SET_ACTION_TRIGGER))
        for f in self._irq_fds.pop(index, []):
            f.close()
        self._irqs_enabled.pop(index, None)

    def disable_all_irqs(self) -> None:
        for index in list(self._irqs_enabled):
            self.disable_irq(index)

    def trigger_irq(self, index: int, vector: int = 0) -> None:
        """Fire vector ``vector`` of ``index`` from software (loopback test of the eventfd path)."""
        self._call("VFIO_DEVICE_SET_IRQS",
                   _irq_set(index, vector, 1, lib.VFIO_IRQ_SET_DATA_NONE | lib.VFIO_IRQ_SET_ACTION_TRIGGER))

    def unmask_irq(self, index: int = 0, vector: int = 0) -> None:
        """Unmask an (auto-masked) INTx after handling it."""
        self._call("VFIO_DEVICE_SET_IRQS",
                   _irq_set(index, vector, 1, lib.VFIO_IRQ_SET_DATA_NONE | lib.VFIO_IRQ_SET_ACTION_UNMASK))

    @property
    def irqs_enabled(self) -> dict[int, int]:
        """IRQ index -> vectors enabled through this object."""
        return dict(self._irqs_enabled)


def _irq_set(index: int, start: int, count: int, flags: int, payload: bytes = b"") -> Any:
    from .device import _with_payload

    check_int(index, "IRQ index", 0, U32_MAX, "VFIO_DEVICE_SET_IRQS")
    check_int(start, "vector", 0, U32_MAX, "VFIO_DEVICE_SET_IRQS")
    arg = _with_payload("VFIO_DEVICE_SET_IRQS", payload)
    arg.index, arg.start, arg.count, arg.flags = index, start, count, flags
    return arg
