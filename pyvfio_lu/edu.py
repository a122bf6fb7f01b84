"""A driver for QEMU's ``edu`` PCI device (1234:11e8), the project's test device.

Registers (BAR0, 4-byte accesses below 0x80, 4 or 8 above; hw/misc/edu.c): 0x00 id
0x010000ed, 0x04 liveness (reads back the inverse), 0x08 factorial, 0x20 status
(bit 0 computing, bit 7 raise an IRQ when done), 0x24 IRQ status, 0x60 raise IRQ,
0x64 ack IRQ, 0x80/0x88/0x90/0x98 DMA source/destination/count/command. The DMA
engine moves up to 4096 bytes between an IOVA and its buffer at device address
0x40000, 100 ms of virtual time after the command is written; it masks IOVAs to
28 bits (``DMA_LIMIT``).

QEMU up to 8.x checks a transfer's range with an off-by-one (a transfer that ends exactly
at the end of the 4 KiB buffer is "out of bounds") and then calls ``hw_error``, which
aborts the whole VM. So one transfer moves at most ``DMA_MAX`` = 4095 bytes, and never
reaches the buffer's last byte.
"""

from __future__ import annotations

import errno
import time

from .errors import PyvfioError

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (type checkers treat it as True)

if TYPE_CHECKING:
    from .vfio import Bar, VfioDevice

VENDOR, DEVICE = 0x1234, 0x11E8
ID = 0x010000ED
REG_ID, REG_LIVENESS, REG_FACTORIAL, REG_STATUS, REG_IRQ_STATUS = 0x00, 0x04, 0x08, 0x20, 0x24
REG_IRQ_RAISE, REG_IRQ_ACK = 0x60, 0x64
REG_DMA_SRC, REG_DMA_DST, REG_DMA_COUNT, REG_DMA_CMD = 0x80, 0x88, 0x90, 0x98
DMA_RUN, DMA_TO_RAM, DMA_IRQ = 0x1, 0x2, 0x4
DEVICE_BUFFER = 0x40000
BUFFER_SIZE = 4096
DMA_MAX = BUFFER_SIZE - 1  # see the module doc: QEMU's edu aborts the VM otherwise
DMA_LIMIT = (1 << 28) - 1


class EduTimeout(PyvfioError, TimeoutError):
    default_reason = "the edu device did not finish in time"


class Edu:
    def __init__(self, device: VfioDevice):
        self.device = device
        self.bar: Bar = device.bar(0)

    def identify(self) -> int:
        return self.bar.read32(REG_ID)

    def liveness(self, value: int) -> int:
        self.bar.write32(REG_LIVENESS, value)
        return self.bar.read32(REG_LIVENESS)

    def _wait(self, reg: int, bit: int, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while self.bar.read32(reg) & bit:
            if time.monotonic() > deadline:
                raise EduTimeout(errno.ETIMEDOUT, what, self.device.name)
            time.sleep(0.001)

    def factorial(self, n: int, timeout: float = 5.0) -> int:
        self.bar.write32(REG_FACTORIAL, n)
        self._wait(REG_STATUS, 0x1, timeout, "factorial")
        return self.bar.read32(REG_FACTORIAL)

    def raise_irq(self, value: int = 1) -> None:
        self.bar.write32(REG_IRQ_RAISE, value)

    def ack_irq(self, value: int = 0xFFFFFFFF) -> None:
        self.bar.write32(REG_IRQ_ACK, value)

    def _dma(self, src: int, dst: int, count: int, cmd: int, timeout: float, offset: int) -> None:
        if count <= 0 or offset < 0 or offset + count > DMA_MAX:
            raise ValueError(f"edu DMA covers bytes 0..{DMA_MAX - 1} of its buffer; "
                             f"offset {offset} + count {count} does not fit")
        self.bar.write64(REG_DMA_SRC, src)
        self.bar.write64(REG_DMA_DST, dst)
        self.bar.write64(REG_DMA_COUNT, count)
        self.bar.write64(REG_DMA_CMD, cmd | DMA_RUN)
        self._wait(REG_DMA_CMD, DMA_RUN, timeout, "DMA")

    def dma_to_device(self, iova: int, count: int, offset: int = 0, timeout: float = 10.0, irq: bool = False) -> None:
        """Copy ``count`` bytes from ``iova`` into the device buffer (at ``offset``)."""
        self._dma(iova, DEVICE_BUFFER + offset, count, DMA_IRQ if irq else 0, timeout, offset)

    def dma_from_device(self, iova: int, count: int, offset: int = 0, timeout: float = 10.0, irq: bool = False) -> None:
        """Copy ``count`` bytes of the device buffer (from ``offset``) to ``iova``."""
        self._dma(DEVICE_BUFFER + offset, iova, count, DMA_TO_RAM | (DMA_IRQ if irq else 0), timeout, offset)
