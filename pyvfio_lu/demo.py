"""The main demo: a live update in the QEMU guest that carries "guest RAM" (a memfd) and
the VFIO device itself where the kernel can preserve devices, every step printed with its time.

On the host, ``python -m pyvfio_lu.demo`` (or ``pyvfio-lu demo``) builds or reuses the
kernel, boots the guest and runs stage 1 there; the guest kexecs itself (our own
``kexec_file_load``) and runs stage 2. Inside the guest the same module runs with
``--guest-stage N``. The kernel: the device-preservation (vfio-lu) kernel when one is in the
cache, else the upstream one (``--flavour`` to choose); on the upstream kernel the device is
closed before the kexec and set up again after it, and the demo says so.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import time
from pathlib import Path

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (type checkers treat it as True)

if TYPE_CHECKING:
    from .edu import Edu
    from .memfd import Memfd
    from .vfio import VfioDevice

EDU_BDF = "0000:00:04.0"
SESSION = "demo-vm"
RAM_TOKEN = 1
DEVICE_TOKEN = 2
RAM_SIZE = 16 << 20
IOVA = 0x1000000
PREFIX = "demo |"


def since_process_start() -> float:
    """Seconds since this process started, from the kernel's own record (/proc/self/stat
    start time against /proc/uptime): interpreter start-up and imports included."""
    with open("/proc/self/stat") as fh:
        start_ticks = int(fh.read().rsplit(")", 1)[1].split()[19])
    with open("/proc/uptime") as fh:
        uptime = float(fh.read().split()[0])
    return uptime - start_ticks / os.sysconf("SC_CLK_TCK")


class Steps:
    def __init__(self) -> None:
        self.t0 = time.monotonic()
        self.last = self.t0

    def __call__(self, text: str) -> None:
        now = time.monotonic()
        print(f"{PREFIX} {now - self.t0:7.3f}s (+{(now - self.last) * 1000:7.1f} ms)  {text}", flush=True)
        self.last = now


def _ram_pattern() -> bytes:
    block = hashlib.sha256(b"pyvfio-lu demo guest RAM").digest() * 128  # 4 KiB
    return block * (RAM_SIZE // len(block))


def _dma_check(dev: VfioDevice, e: Edu, ram: Memfd, offset: int) -> bool:
    """edu copies guest RAM at IOVA+offset into its buffer and back out to a scratch
    page; the scratch page must then hold the same bytes as the RAM."""
    from . import edu
    from .iommu import DmaBuffer

    assert dev.iommu is not None  # opened (or retrieved) with an iommufd Iommu
    scratch_iova = IOVA + RAM_SIZE
    with DmaBuffer(4096) as scratch:
        m = dev.iommu.map(scratch, scratch_iova)
        e.dma_to_device(IOVA + offset, edu.DMA_MAX)
        e.dma_from_device(scratch_iova, edu.DMA_MAX)
        same = scratch.read(0, edu.DMA_MAX) == os.pread(ram.fileno(), edu.DMA_MAX, offset)
        dev.iommu.unmap(m)
    return same


def guest_stage1(step: Steps) -> int:
    from . import edu
    from .errors import PyvfioError
    from .holder import Holder
    from .luo import LiveUpdate
    from .memfd import Memfd
    from .preservation import device_preservation
    from .status import status
    from .sysfs import PciDevice
    from .vfio import VfioDevice

    st = status()
    step(f"kernel {os.uname().release}: LUO enabled={st.luo_enabled}, KHO enabled={st.kho_enabled}, "
         f"boot id {st.boot_id[:8]}, live update number {st.liveupdate_number}")
    pci = PciDevice(EDU_BDF)
    prev = pci.bind_vfio()
    step(f"edu {pci.bdf} ({pci.vendor:04x}:{pci.device:04x}) bound to vfio-pci (was {prev or 'no driver'}), "
         f"cdev {pci.vfio_cdev}")
    ram = Memfd.create("guest-ram", _ram_pattern())
    ram.seal("grow", "shrink")
    step(f"guest RAM: memfd of {RAM_SIZE >> 20} MiB, sha256 {hashlib.sha256(ram.read_all()).hexdigest()[:16]}…")
    with VfioDevice.open(EDU_BDF, "iommufd") as dev:
        assert dev.iommu is not None  # open() made one
        info = dev.info()
        step(f"VFIO cdev + iommufd: bound (devid {dev.devid}), attached to IOAS {dev.iommu.ioas_id} "
             f"(hwpt {dev.hwpt_id}); {info.num_regions} regions, {info.num_irqs} IRQ indexes")
        e = edu.Edu(dev)
        step(f"BAR0 id {e.identify():#010x}, liveness(0x12345678) -> {e.liveness(0x12345678):#010x}, "
             f"10! = {e.factorial(10)}")
        dev.enable_bus_master()
        dev.iommu.map_file(ram, IOVA, size=RAM_SIZE, writeable=False)
        ok = _dma_check(dev, e, ram, 0)
        step(f"guest RAM mapped at IOVA {IOVA:#x} (IOMMU_IOAS_MAP_FILE); edu DMA'd a page of it out and back: "
             f"{'bytes identical' if ok else 'MISMATCH'}")
        if not ok:
            return 1
        support = device_preservation()
        step(f"can this kernel preserve VFIO devices? {'yes' if support.supported else 'NO'} ({support.detail})")
        holder = Holder.spawn("/run/pyvfio-lu-demo-holder.sock")
        with LiveUpdate() as lu:
            session = lu.create_session(SESSION)
            session.preserve(ram, RAM_TOKEN)
            step(f"session {SESSION!r}: guest RAM preserved as token {RAM_TOKEN}")
            try:
                dev.preserve(session, DEVICE_TOKEN)
                carried = True
                step(f"VFIO device {pci.bdf} preserved as token {DEVICE_TOKEN}: it stays the session's until "
                     "the kexec")
            except PyvfioError as exc:
                carried = False
                step(f"VFIO device NOT preserved: {exc}")
            holder.hold_session(session)  # with the ledger: tokens, BDF, RAM's IOVA travel in LUO
        if not carried:
            dev.iommu.unmap_all()
    step("this process's device fd closed; " + ("LUO keeps the preserved file" if carried
                                                 else "the device is set up again after the kexec"))
    ram.close()
    step(f"session handed to a holder daemon; held: {sorted(holder.list())}")
    step("stage 1 done: the guest now loads this kernel with kexec_file_load and reboots into it")
    return 0


def guest_stage2(step: Steps) -> int:
    started = since_process_start() - (time.monotonic() - step.t0)  # process start -> Steps()
    from . import edu
    from .iommu import Iommu
    from .ledger import incoming
    from .luo import LiveUpdate
    from .memfd import Memfd
    from .sysfs import PciDevice
    from .vfio import VfioDevice

    step(f"after the kexec (process started {started * 1000:.0f} ms before this line)")
    with LiveUpdate() as lu:  # adopts the ledgers: what came in, described by LUO itself
        files = incoming()[SESSION]["files"]
        device = files.get(f"{DEVICE_TOKEN:#x}")
        ram_iovas = files[f"{RAM_TOKEN:#x}"]["iovas"]
        step(f"the ledger says session {SESSION!r} holds: "
             + ", ".join(f"token {t} {r['kind']} {r.get('bdf') or r.get('name')}" for t, r in sorted(files.items()))
             + f"; guest RAM was mapped at {', '.join(hex(i) for i, _s, _o in ram_iovas)}")
        session = lu.retrieve_session(SESSION)
    with session:
        ram = Memfd.adopt(session.retrieve(RAM_TOKEN))
        pci = PciDevice(EDU_BDF)
        pci.bind_vfio()  # nothing binds a preserved device after the kexec
        if device:
            dev = VfioDevice.from_fd(session.retrieve(DEVICE_TOKEN).detach(), iommu=Iommu("iommufd"))
            dev._owns_iommu = True
            how = f"retrieved from token {DEVICE_TOKEN} ({os.readlink(f'/proc/self/fd/{dev.fileno()}')})"
        else:
            dev = VfioDevice.open(EDU_BDF, "iommufd")
            how = "opened afresh (the previous kernel could not preserve it)"
        with dev:
            assert dev.iommu is not None  # from_fd() or open() was given one
            for iova, size, offset in ram_iovas:
                dev.iommu.map_file(ram, iova, size=size, offset=offset, writeable=False)
            dev.enable_bus_master()
            e = edu.Edu(dev)
            ok = _dma_check(dev, e, ram, 4096)
            ready = since_process_start()
            step(f"edu {how}, bound to a new iommufd (IOAS {dev.iommu.ioas_id}), guest RAM re-mapped at the "
                 f"same IOVA, DMA out and back: {'bytes identical' if ok else 'MISMATCH'}")
            step(f"device DMA-ready again {ready * 1000:.0f} ms after this process started")
            ok = ok and ram.read_all() == _ram_pattern()
            step(f"guest RAM: {ram.size >> 20} MiB, contents {'intact' if ok else 'CORRUPTED'}")
            if not ok:
                return 1
            session.finish()
            step("session finished: the kernel released what it kept for it")
            dev.iommu.unmap_all()
        ram.close()
    with VfioDevice.open(EDU_BDF, "iommufd") as dev:
        step(f"a normal open works again: edu id {edu.Edu(dev).identify():#010x}")
    step("live update complete")
    return 0


def host(iommu: str, timeout: float, flavour: str = "auto") -> int:
    from .vm.kernel import UPSTREAM, VFIO_LU, build, find_cached
    from .vm.run import run_in_guest

    t0 = time.monotonic()
    if flavour == "auto":
        flavour = VFIO_LU if find_cached(VFIO_LU) is not None or os.environ.get("PYVFIO_LU_KERNEL_PATCHES") \
            else UPSTREAM
    image = build(flavour=flavour)
    how = "built" if image.build_seconds else "cached"
    print(f"kernel: {image.bzimage} ({image.flavour}, {how}, Debian linux-source {image.version})", flush=True)
    if image.flavour == UPSTREAM:
        print("note: the upstream kernel cannot preserve VFIO devices; the device is set up again after the "
              "kexec. Build the vfio-lu kernel (README: a kernel that preserves devices) to carry it.", flush=True)
    python = sys.executable
    root = Path(__file__).resolve().parent.parent

    def echo(t: float, line: str) -> None:
        if line.startswith((PREFIX, "pyvfio-lu:")) or "Traceback" in line or "Error" in line:
            print(f"[{t:6.1f}s] {line}", flush=True)

    result = run_in_guest(f"{python} -m pyvfio_lu.demo --guest-stage 1",
                          f"{python} -m pyvfio_lu.demo --guest-stage 2",
                          iommu=iommu, timeout=timeout, cwd=root, on_line=echo, kernel=image.bzimage,
                          results_dir=root / "results" / "demo" / time.strftime("%Y%m%d-%H%M%S"))
    print(result.summary(), flush=True)
    print(f"demo wall time: {time.monotonic() - t0:.1f} s", flush=True)
    return 0 if result.ok and result.kexec else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pyvfio_lu.demo", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iommu", choices=["intel", "virtio"], default="intel", help="vIOMMU of the guest")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds before the guest is stopped")
    parser.add_argument("--flavour", choices=["auto", "upstream", "vfio-lu"], default="auto",
                        help="kernel: vfio-lu (device preservation) when cached, else upstream (default: auto)")
    parser.add_argument("--guest-stage", type=int, choices=[1, 2], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.guest_stage:
        step = Steps()
        return (guest_stage1 if args.guest_stage == 1 else guest_stage2)(step)
    from .vm.qemu import GuestError

    try:
        return host(args.iommu, args.timeout, args.flavour)
    except GuestError as exc:
        print(f"demo failed: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
