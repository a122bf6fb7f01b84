"""The blackout after a kexec, the Python side: what a VMM restarted in the new kernel does
before its guest can run again, in a fresh process, timed at each step.

    python -S benchmarks/blackout.py SESSION RAM_BYTES IOVA [BDF]

run as a script (not ``-m``: runpy's imports are no part of a VMM's start) with ``-S`` and
PYTHONPATH naming the package and cffi (a deployed VMM has no editable-install finder to
import at start). Steps: retrieve SESSION; take its guest RAM (token 1) and, with BDF, its
device (token 2); bind the device to a new iommufd and attach it; map the RAM at IOVA
(IOMMU_IOAS_MAP_FILE); turn bus mastering back on and let the device DMA from the RAM
(edu's DMA engine, polled to completion); finish the session. Without BDF (a kernel that
cannot preserve devices) the RAM is mapped into this process instead. Prints one JSON line:
CLOCK_MONOTONIC nanoseconds at each step (the parent noted the time it started us).
"""

import time

_now = time.clock_gettime_ns
_MONO = time.CLOCK_MONOTONIC
T_MAIN = _now(_MONO)  # the interpreter is up and this script's first line runs

import sys  # noqa: E402 - after the first timestamp on purpose

from pyvfio_lu.luo import LiveUpdate  # noqa: E402

T_IMPORT_LUO = _now(_MONO)

REG_DMA_SRC, REG_DMA_DST, REG_DMA_COUNT, REG_DMA_CMD = 0x80, 0x88, 0x90, 0x98
DMA_RUN, EDU_BUFFER = 0x1, 0x40000  # edu: start bit; its internal buffer's address


def main(argv: list[str]) -> int:
    name, ram_bytes, iova = argv[0], int(argv[1]), int(argv[2], 0)
    bdf = argv[3] if len(argv) > 3 else None
    t = {"main": T_MAIN, "import_luo": T_IMPORT_LUO}
    with LiveUpdate(adopt_ledgers=False) as lu:
        session = lu.retrieve_session(name)
    t["session"] = _now(_MONO)
    ram = session.retrieve(1)
    if bdf is None:
        import mmap

        m = mmap.mmap(ram.fileno(), ram_bytes)
        m[:1]  # first touch of guest RAM
        t["imported"] = t["bound"] = _now(_MONO)
        t["mapped"] = t["dma"] = _now(_MONO)
        m.close()
    else:
        from pyvfio_lu.vfio import VfioDevice

        t["imported"] = _now(_MONO)
        dev = VfioDevice.from_fd(session.retrieve(2).detach(), iommu="iommufd", owned=True)  # a new iommufd
        t["bound"] = _now(_MONO)
        iommu = dev.iommu
        assert iommu is not None
        iommu.map_file(ram, iova, size=ram_bytes)
        t["mapped"] = _now(_MONO)
        dev.enable_bus_master()
        bar = dev.bar(0)
        bar.write_block([REG_DMA_SRC, REG_DMA_DST, REG_DMA_COUNT, REG_DMA_CMD],
                        [iova, EDU_BUFFER, 4095, DMA_RUN], width=8)  # RAM -> device
        bar.poll(REG_DMA_CMD, DMA_RUN, 0, timeout=10.0, width=8)
        t["dma"] = _now(_MONO)
    session.finish()
    t["finished"] = _now(_MONO)
    if bdf is not None:
        dev.close()  # unmaps, closes the iommufd it owns (after the timed part: a VMM keeps them)
    ram.close()
    session.close()
    print("{" + ", ".join(f'"{k}": {v}' for k, v in t.items()) + "}", flush=True)  # json costs an import
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
