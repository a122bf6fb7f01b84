"""The fleet test's stand-in for a VMM: what each guest host runs at every boot.

A hypervisor host's VMM keeps guest RAM in a memfd (and, where the kernel can preserve
devices, a VFIO device) and, when a live update comes, has it carried across the kexec; after
the kexec its resume job takes everything back. This script is both halves, with the library
doing the work (LiveUpdate, Session, Memfd, VfioDevice, Holder):

- on a cold boot: make the guest RAM (random bytes), preserve it in session NAME with a
  manifest (token 0: its size and sha256), preserve the edu device too when this kernel can
  (token 2), and hand the session to the holder daemon (pyvfio_lu.holder) that keeps it until
  the kexec;
- after a live update (the host's own post-kexec job): retrieve session NAME, check the RAM
  against the manifest (and take the device back: bound to a new iommufd, DMA through it),
  finish the session, then preserve the same RAM (and device) again in a new session NAME,
  held for the next live update, as a VMM that resumed would.

Each boot writes ``<state>/vmm-stage-N.json`` (what it found and did) and the cold boot writes
``<state>/expected.json`` (the RAM's sha256), for the host-side test to compare.
Exit status 0, or 1 when anything did not come through.

With a device, the VMM then goes on running in the background holding it (as one that runs its
guest would), and obeys ``<state>/vmm-control``: ``N irq-on`` enables the device's INTx (a VMM
that left an interrupt on: the kernel would refuse the kexec, and the preflight says so),
``N irq-off`` disables it; each command is acknowledged in ``<state>/vmm-control.done``.

    python tests/fleet/vmm.py --name vm-a --state /shared
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from pathlib import Path

from pyvfio_lu.errors import LiveUpdateBusy, NoSuchSession, PyvfioError
from pyvfio_lu.holder import Holder
from pyvfio_lu.luo import LiveUpdate
from pyvfio_lu.memfd import Memfd
from pyvfio_lu.preservation import can_preserve_devices
from pyvfio_lu.status import liveupdate_number

HOLDER = "/run/pyvfio-lu-fleet-holder.sock"
MANIFEST, RAM, DEVICE = 0, 1, 2
EDU = "0000:00:04.0"
IOVA = 0x1000000
T0 = time.monotonic()


def say(text: str) -> None:
    print(f"vmm | {time.monotonic() - T0:6.3f}s  {text}", flush=True)


def open_liveupdate(timeout: float = 60.0) -> LiveUpdate:
    """/dev/liveupdate is single-open: wait while someone else (a status probe) has it."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return LiveUpdate()
        except LiveUpdateBusy:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def write_json(path: str, doc: dict) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w") as fh:
        json.dump(doc, fh, indent=1)
    os.replace(tmp, path)


def open_device(ram: Memfd):
    from pyvfio_lu.sysfs import PciDevice
    from pyvfio_lu.vfio import VfioDevice

    PciDevice(EDU).bind_vfio()
    dev = VfioDevice.open(EDU, "iommufd")
    dev.iommu.map_file(ram, IOVA, size=ram.size)
    return dev


def take_device(session, ram: Memfd):
    """The edu device back from the session: bound to a new iommufd, guest RAM mapped at the
    same IOVA, a DMA round trip through it."""
    from pyvfio_lu import edu
    from pyvfio_lu.iommu import PAGE, Iommu
    from pyvfio_lu.sysfs import PciDevice
    from pyvfio_lu.vfio import VfioDevice

    PciDevice(EDU).bind_vfio()
    dev = VfioDevice.from_fd(session.retrieve(DEVICE).detach(), iommu=Iommu("iommufd"), bdf=EDU)
    dev._owns_iommu = True
    dev.iommu.map_file(ram, IOVA, size=ram.size)
    dev.enable_bus_master()
    source = os.pread(ram.fileno(), edu.DMA_MAX, 0)
    saved = os.pread(ram.fileno(), edu.DMA_MAX, PAGE)  # the page the round trip writes into
    e = edu.Edu(dev)
    e.dma_to_device(IOVA, edu.DMA_MAX)
    e.dma_from_device(IOVA + PAGE, edu.DMA_MAX)
    ok = os.pread(ram.fileno(), edu.DMA_MAX, PAGE) == source
    os.pwrite(ram.fileno(), saved, PAGE)  # the guest's RAM as it was
    return dev, ok


def preserve(lu: LiveUpdate, name: str, ram: Memfd, digest: str, generation: int, dev) -> dict:
    s = lu.create_session(name)
    manifest = {"sha256": digest, "size": ram.size, "generation": generation, "device": dev is not None}
    with Memfd.create("vmm-manifest", json.dumps(manifest).encode()) as m:
        m.seal("grow", "shrink", "write", "seal")
        s.preserve(m, MANIFEST)
    s.preserve(ram, RAM)
    if dev is not None:
        dev.preserve(s, DEVICE)
    # three TCG guests share two host cores: starting the holder's interpreter can take well
    # over the default 10 s (a CI run saw it time out), so allow a minute
    Holder.spawn(HOLDER, timeout=60.0).hold_session(s, {"vmm": name})
    return manifest


def keep_running(state: str, dev) -> None:
    """Become a background VMM holding ``dev`` and obeying ``<state>/vmm-control`` (never returns)."""
    control, done = os.path.join(state, "vmm-control"), os.path.join(state, "vmm-control.done")

    def read() -> str:
        try:
            with open(control) as fh:
                return fh.read().strip()
        except OSError:
            return ""

    last = read()  # a command from before this boot was meant for the VMM of that boot
    while True:
        command = read()
        if command and command != last:
            last = command
            what = command.split()[-1]
            try:
                if what == "irq-on":
                    dev.enable_irq(0)  # INTx, routed to an eventfd nobody reads
                elif what == "irq-off":
                    dev.disable_irq(0)
                result = "ok"
            except PyvfioError as exc:
                result = f"{type(exc).__name__}: {exc}"
            say(f"control {command!r}: {result}")
            write_json(done, {"command": command, "result": result})
        time.sleep(0.5)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--name", required=True, help="the VM's LUO session name")
    parser.add_argument("--state", default="/shared", help="where the reports go")
    parser.add_argument("--mib", type=int, default=16, help="guest RAM size in MiB")
    args = parser.parse_args()
    stage = int(os.environ.get("PYVFIO_LU_STAGE", "1"))
    number = liveupdate_number()
    devices = can_preserve_devices()
    report: dict = {"name": args.name, "stage": stage, "liveupdate_number": number,
                    "boot_id": Path("/proc/sys/kernel/random/boot_id").read_text().strip(),
                    "device_preservation": devices, "came_in": False, "verified": False, "finished": False,
                    "preserved": False, "device": None, "problems": []}
    path = os.path.join(args.state, f"vmm-stage-{stage}.json")
    say(f"stage {stage}: live update number {number}, device preservation {devices}")
    try:
        with open_liveupdate() as lu:
            try:
                s = lu.retrieve_session(args.name)
            except NoSuchSession:
                s = None
            dev = None
            if s is None:
                if number is not None:
                    report["problems"].append(f"session {args.name!r} did not come through live update {number}")
                    return 1
                data = os.urandom(args.mib << 20)
                digest = hashlib.sha256(data).hexdigest()
                ram = Memfd.create("guest-ram", data)
                ram.seal("grow", "shrink")
                del data
                write_json(os.path.join(args.state, "expected.json"), {"name": args.name, "sha256": digest})
                generation = 1
                say(f"cold boot: guest RAM {args.mib} MiB, sha256 {digest[:16]}")
                if devices:
                    dev = open_device(ram)
                    say(f"edu {EDU} open through its cdev, RAM mapped at {IOVA:#x}")
            else:
                report["came_in"] = True
                with s:
                    with Memfd.adopt(s.retrieve(MANIFEST)) as m:
                        manifest = json.loads(m.read_all())
                    ram = Memfd.adopt(s.retrieve(RAM))
                    digest = hashlib.sha256(ram.read_all()).hexdigest()
                    report["verified"] = digest == manifest["sha256"] and ram.size == manifest["size"]
                    say(f"session {args.name!r} retrieved: RAM {ram.size >> 20} MiB, sha256 {digest[:16]} "
                        f"{'matches' if report['verified'] else 'DIFFERS from ' + manifest['sha256'][:16]}")
                    if not report["verified"]:
                        report["problems"].append("guest RAM differs from its manifest")
                    if manifest.get("device"):
                        dev, dma_ok = take_device(s, ram)
                        report["device"] = {"bdf": EDU, "retrieved": True, "dma": dma_ok}
                        say(f"edu {EDU} retrieved, bound to a new iommufd, DMA {'ok' if dma_ok else 'WRONG'}")
                        if not dma_ok:
                            report["problems"].append("DMA through the retrieved device went wrong")
                        dev.iommu.unmap_all()
                        dev.iommu.map_file(ram, IOVA, size=ram.size)
                    s.finish()
                    report["finished"] = True
                    say(f"session {args.name!r} finished")
                generation = manifest["generation"] + 1
            report["sha256"] = digest
            preserve(lu, args.name, ram, digest, generation, dev)
            report["preserved"] = True
            report["generation"] = generation
            say(f"session {args.name!r} preserved (generation {generation}"
                f"{', with the device' if dev is not None else ''}) and held by the holder at {HOLDER}")
            if dev is not None:
                report["serving"] = True  # the device stays open in the background VMM below
            else:
                ram.close()
    except PyvfioError as exc:
        report["problems"].append(f"{type(exc).__name__}: {exc}")
        say(f"FAILED: {type(exc).__name__}: {exc}")
    finally:
        report["seconds"] = round(time.monotonic() - T0, 3)
        write_json(path, report)
    rc = 0 if not report["problems"] else 1
    if report.get("serving"):
        sys.stdout.flush()
        if os.fork() == 0:  # the background VMM: keeps the device (and RAM) open, never closes them
            os.setsid()
            try:
                keep_running(args.state, dev)
            finally:
                os._exit(0)
        os._exit(rc)  # no finalizers: closing the device here would unmap the guest RAM under the VMM
    return rc


if __name__ == "__main__":
    sys.exit(main())
