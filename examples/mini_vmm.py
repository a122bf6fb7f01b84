#!/usr/bin/env python3
"""A tiny Python "VMM" whose guest RAM and device survive a host kernel live update.

``suspend`` (old kernel):
  allocate guest RAM as a memfd; hand QEMU's edu device to vfio-pci and DMA-map the RAM
  for it at a fixed IOVA (IOMMU_IOAS_MAP_FILE); run a small workload (the CPU writes
  "disk blocks" into RAM, the edu DMA engine copies each into an "rx ring" elsewhere in
  RAM, edu computes factorials that land in the RAM header); quiesce; preserve the RAM
  (and the VMM's own state) in a LUO session, try to preserve the device as well, hand
  the session to a holder (or systemd's fd store), optionally load and exec the next kernel.

``resume`` (new kernel):
  retrieve the session, check the RAM is bit-for-bit what it was, take the device back
  (from the session if the old kernel could preserve it, else bind it to vfio-pci again
  and open it), map the RAM at the same IOVA, check DMA through the device still sees the
  guest's data, run one more workload step, finish the session.

Exit status: 0 ok, 1 failed (the message says where), 3 refused by a safety check.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time

from pyvfio_lu import edu, kexec, sdnotify
from pyvfio_lu.errors import GroupNotViable, NoSuchSession, PyvfioError
from pyvfio_lu.holder import Holder
from pyvfio_lu.iommu import PAGE, Iommu
from pyvfio_lu.luo import LiveUpdate
from pyvfio_lu.memfd import Memfd
from pyvfio_lu.netsafety import InterfaceInUse
from pyvfio_lu.status import status
from pyvfio_lu.sysfs import PciDevice
from pyvfio_lu.vfio import VfioDevice

STATE_TOKEN, RAM_TOKEN, DEVICE_TOKEN = 0, 1, 2
HEADER, DISK, RX, SCRATCH = 0, 16, 64, 96  # RAM layout, in pages
MAGIC = "mini-vmm guest RAM v1"
T0 = time.monotonic()


def step(text: str) -> None:
    print(f"mini-vmm | {time.monotonic() - T0:6.3f}s  {text}", flush=True)


class Failed(Exception):
    """A check of the VMM itself failed (RAM or DMA not as expected)."""


def block(i: int) -> bytes:
    return hashlib.sha256(f"disk block {i}".encode()).digest() * (PAGE // 32)


class GuestRam:
    """Guest RAM: one memfd, accessed by the CPU with pread/pwrite and by the device via its IOVA."""

    def __init__(self, memfd: Memfd):
        self.memfd = memfd

    def read(self, page: int, length: int = PAGE) -> bytes:
        return os.pread(self.memfd.fileno(), length, page * PAGE)

    def write(self, page: int, data: bytes) -> None:
        self.memfd.pwrite_all(data, page * PAGE)

    def header(self) -> dict:
        return json.loads(self.read(HEADER).rstrip(b"\0"))

    def set_header(self, doc: dict) -> None:
        raw = json.dumps(doc).encode()
        if len(raw) > PAGE:
            raise ValueError("header page overflow")
        self.write(HEADER, raw.ljust(PAGE, b"\0"))

    def sha256(self) -> str:
        return hashlib.sha256(self.memfd.read_all()).hexdigest()


def dma_copy(e: edu.Edu, iova: int, src_page: int, dst_page: int) -> None:
    """The device copies (the first DMA_MAX bytes of) one page of guest RAM to another."""
    e.dma_to_device(iova + src_page * PAGE, edu.DMA_MAX)
    e.dma_from_device(iova + dst_page * PAGE, edu.DMA_MAX)


def attach_device(bdf: str, force: bool) -> PciDevice:
    from pyvfio_lu.netsafety import check_device

    pci = PciDevice(bdf)
    check_device(pci, force=force)
    was = pci.bind_vfio()
    step(f"device {pci.bdf} ({pci.vendor:04x}:{pci.device:04x}) on vfio-pci (was {was or 'no driver'}), "
         f"IOMMU group {pci.iommu_group}, cdev {pci.vfio_cdev}")
    return pci


def hand_over(session, socket_path: str, use_systemd: bool) -> str:
    if use_systemd:
        sdnotify.store_fds(f"luo-{session.name}", session)
        os.close(session.detach())
        return f"systemd's fd store (FDNAME=luo-{session.name})"
    holder = Holder(socket_path)
    try:
        holder.list()
    except OSError:
        holder = Holder.spawn(socket_path)
    holder.hold_session(session, {"held_for": "mini_vmm.py"})
    return f"holder pid {holder.pid} at {socket_path}"


# --- suspend -----------------------------------------------------------------------------------------
def describe_host():
    st = status()
    number = st.liveupdate_number if st.liveupdate_number is not None else "- (cold boot)"
    step(f"host kernel {os.uname().release}, boot id {st.boot_id[:8]}, live update number {number}")
    return st


def suspend(args) -> int:
    st = describe_host()
    if args.ram_mib * (1 << 20) < (SCRATCH + 1) * PAGE or args.iova + (args.ram_mib << 20) > edu.DMA_LIMIT:
        raise SystemExit(f"RAM of {args.ram_mib} MiB at IOVA {args.iova:#x} does not fit edu's 28-bit DMA window")
    size = args.ram_mib << 20
    ram = GuestRam(Memfd.create("mini-vmm-ram", size=size))
    ram.memfd.seal("grow", "shrink")
    ram.set_header({"magic": MAGIC, "boots": 1, "log": ["booted"]})
    for i in range(args.blocks):
        ram.write(DISK + i, block(i))
    step(f"guest RAM: memfd of {args.ram_mib} MiB; {args.blocks} disk blocks written by the CPU")

    pci = attach_device(args.bdf, args.force)
    with VfioDevice.open(pci.bdf, "iommufd") as dev:
        e = edu.Edu(dev)
        if e.identify() != edu.ID:
            raise Failed(f"{pci.bdf} is not an edu device (id {e.identify():#x})")
        dev.enable_bus_master()
        dev.iommu.map_file(ram.memfd, args.iova, size=size)
        step(f"RAM DMA-mapped at IOVA {args.iova:#x} (IOMMU_IOAS_MAP_FILE, IOAS {dev.iommu.ioas_id})")

        t = time.monotonic()
        for i in range(args.blocks):
            dma_copy(e, args.iova, DISK + i, RX + i)
        bad = [i for i in range(args.blocks) if ram.read(RX + i, edu.DMA_MAX) != block(i)[:edu.DMA_MAX]]
        if bad:
            raise Failed(f"edu DMA copies of blocks {bad} differ from the disk blocks")
        facts = [e.factorial(n) for n in range(1, 11)]
        ram.set_header({**ram.header(), "factorials": facts, "log": ["booted", f"{args.blocks} blocks DMA'd to rx"]})
        step(f"workload: edu copied {args.blocks} blocks of guest RAM into the rx ring by DMA "
             f"({(time.monotonic() - t) * 1000:.0f} ms), all identical; 10! = {facts[-1]}")

        dev.enable_bus_master(False)  # quiesce: the device stops touching RAM
        digest = ram.sha256()
        step(f"quiesced; guest RAM sha256 {digest[:16]}...")

        state = {"magic": MAGIC, "bdf": pci.bdf, "iova": args.iova, "ram_size": size, "blocks": args.blocks,
                 "sha256": digest, "device_token": DEVICE_TOKEN, "device_preserved": False,
                 "boot_id": st.boot_id}
        with LiveUpdate() as lu:
            session = lu.create_session(args.session)
            try:
                session.preserve(ram.memfd, RAM_TOKEN)
                step(f"session {args.session!r}: guest RAM preserved as token {RAM_TOKEN:#x}")
                try:
                    dev.preserve(session, DEVICE_TOKEN)
                    state["device_preserved"] = True
                    step(f"device preserved as token {DEVICE_TOKEN:#x}")
                except PyvfioError as exc:
                    state["device_error"] = type(exc).__name__
                    step(f"device NOT preserved; the kernel says: {exc}")
                with Memfd.create("mini-vmm-state", json.dumps(state).encode()) as m:
                    m.seal("grow", "shrink", "write", "seal")
                    session.preserve(m, STATE_TOKEN)
                step(f"VMM state (IOVA, size, checksum) preserved as token {STATE_TOKEN:#x}")
            except BaseException:
                session.close()
                raise
        dev.iommu.unmap_all()
    step("device closed" + ("" if state["device_preserved"] else "; it is bound and set up again after the kexec"))
    ram.memfd.close()

    where = hand_over(session, args.holder_socket, bool(os.environ.get("NOTIFY_SOCKET")) and not args.no_systemd)
    step(f"session handed to {where}; the VMM process may exit")
    if args.no_load:
        step("next kernel not loaded (--no-load)")
    else:
        kernel, initrd = args.kernel, args.initrd
        if kernel is None:
            release = os.uname().release
            kernel = f"/boot/vmlinuz-{release}"
            initrd = f"/boot/initrd.img-{release}" if os.path.exists(f"/boot/initrd.img-{release}") else None
        kexec.load(kernel, initrd)
        step(f"next kernel loaded with kexec_file_load: {kernel}")
        if args.exec:
            step("rebooting into it")
            kexec.execute()
    step("suspended")
    return 0


# --- resume -------------------------------------------------------------------------------------------
def resume(args) -> int:
    st = describe_host()
    with LiveUpdate() as lu:
        try:
            session = lu.retrieve_session(args.session)
        except NoSuchSession:
            raise Failed(f"no incoming session {args.session!r}: nothing to resume (cold boot?)") from None
        with session:
            with Memfd.adopt(session.retrieve(STATE_TOKEN)) as m:
                state = json.loads(m.read_all())
            if state.get("magic") != MAGIC:
                raise Failed(f"session {args.session!r} does not hold a mini-vmm state")
            ram = GuestRam(Memfd.adopt(session.retrieve(RAM_TOKEN)))
            digest = ram.sha256()
            intact = digest == state["sha256"] and ram.memfd.size == state["ram_size"]
            step(f"session retrieved; guest RAM {ram.memfd.size >> 20} MiB, sha256 {digest[:16]}... "
                 f"{'identical to before the kexec' if intact else 'DIFFERENT from ' + state['sha256'][:16]}")
            if not intact:
                raise Failed("guest RAM changed across the live update")
            if state["boot_id"] == st.boot_id:
                raise Failed("same boot id as at suspend: this is not a new kernel")

            pci = attach_device(state["bdf"], force=False)  # nothing binds vfio-pci by itself after a kexec
            iova = state["iova"]
            if state["device_preserved"]:
                iommu = Iommu("iommufd")
                dev = VfioDevice.from_fd(session.retrieve(state["device_token"]).detach(), iommu=iommu, bdf=pci.bdf)
                step(f"device retrieved from token {state['device_token']:#x}, bound to a new iommufd")
            else:
                dev = VfioDevice.open(pci.bdf, "iommufd")
                step(f"device opened afresh (the old kernel could not preserve it: {state.get('device_error')})")
            with dev:
                e = edu.Edu(dev)
                dev.enable_bus_master()
                dev.iommu.map_file(ram.memfd, iova, size=state["ram_size"])
                step(f"guest RAM mapped again at the same IOVA {iova:#x} (IOAS {dev.iommu.ioas_id})")
                dma_copy(e, iova, RX, SCRATCH)  # what the device wrote before the kexec, copied by the device now
                ok = ram.read(SCRATCH, edu.DMA_MAX) == block(0)[:edu.DMA_MAX]
                step(f"edu DMA'd rx block 0 (written by DMA before the kexec) to a scratch page: "
                     f"{'identical to disk block 0' if ok else 'MISMATCH'}")
                if not ok:
                    raise Failed("DMA through the re-attached device does not see the guest's data")
                head = ram.header()
                fact = e.factorial(10)
                if head["factorials"][-1] != fact:
                    raise Failed(f"10! from the device ({fact}) differs from the one in RAM ({head['factorials'][-1]})")
                head["boots"] += 1
                head["log"].append(f"resumed after live update {st.liveupdate_number}")
                ram.set_header(head)
                dev.iommu.unmap_all()
            step(f"guest resumed: boot {head['boots']}; its log: {' / '.join(head['log'])}")
            session.finish()
            step(f"session {args.session!r} finished")
            ram.memfd.close()
    step("resumed")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1]
        + "\nexample: mini_vmm.py suspend --exec   ...   (after the reboot) mini_vmm.py resume",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bdf", default="0000:00:04.0", help="the edu device (default: %(default)s)")
    parser.add_argument("--session", default="mini-vmm", help="LUO session name (default: %(default)s)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    p = sub.add_parser("suspend", help="run the guest workload, preserve RAM (+ device), hand over, load the kernel")
    p.add_argument("--ram-mib", type=int, default=16, help="guest RAM size (default: 16)")
    p.add_argument("--iova", type=lambda s: int(s, 0), default=0x1000000, help="IOVA of guest RAM (default: 0x1000000)")
    p.add_argument("--blocks", type=int, default=4, help="disk blocks the device copies (default: 4)")
    p.add_argument("--holder-socket", default="/run/mini-vmm-holder.sock", help="holder daemon socket")
    p.add_argument("--no-systemd", action="store_true", help="use a holder even when NOTIFY_SOCKET is set")
    p.add_argument("--force", action="store_true", help="bind even if the device backs an active NIC")
    p.add_argument("--kernel", help="bzImage to load (default: /boot/vmlinuz-$(uname -r))")
    p.add_argument("--initrd", help="initramfs to load with it")
    p.add_argument("--no-load", action="store_true", help="do not load a kernel (someone else will)")
    p.add_argument("--exec", action="store_true", help="reboot into the loaded kernel at the end")
    p.set_defaults(func=suspend)
    p = sub.add_parser("resume", help="after the kexec: retrieve, verify RAM, re-attach the device, continue")
    p.set_defaults(func=resume)
    args = parser.parse_args(argv)
    if getattr(args, "exec", False) and args.no_load:
        parser.error("--exec needs a kernel: drop --no-load")
    try:
        return args.func(args)
    except (InterfaceInUse, GroupNotViable) as exc:
        print(f"refused: {exc}", file=sys.stderr)
        return 3
    except (PyvfioError, Failed) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
