#!/usr/bin/env python3
"""Operator, before a live update: prepare everything the next kernel should find.

1. check that this kernel can live-update (LUO, KHO);
2. hand the device to vfio-pci (refused while it backs an active NIC or its IOMMU group
   is not viable) and open it through its VFIO cdev + iommufd;
3. create a LUO session, preserve a memfd (stand-in for guest RAM) and try to preserve
   the VFIO device too, reporting what the kernel says;
4. write a manifest (what is under which token, with checksums) to a file and, as
   token 0, into the session itself;
5. hand the session to a holder daemon (or to systemd's fd store when run as a service
   with NOTIFY_SOCKET set), so this script can exit and the session stays preserved;
6. load the next kernel with kexec_file_load (the only loader that carries LUO state);
   with --exec, reboot into it at once.

After the kexec, operator_post_kexec.py retrieves and verifies everything.
Exit status: 0 done, 1 failed (the message says whether the session is still held),
3 refused by a safety check (nothing changed).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time

from pyvfio_lu import kexec, sdnotify
from pyvfio_lu.errors import GroupNotViable, PyvfioError
from pyvfio_lu.holder import Holder
from pyvfio_lu.luo import LiveUpdate
from pyvfio_lu.memfd import Memfd
from pyvfio_lu.netsafety import InterfaceInUse, check_device
from pyvfio_lu.status import status
from pyvfio_lu.sysfs import PciDevice
from pyvfio_lu.vfio import VfioDevice

MANIFEST_TOKEN, PAYLOAD_TOKEN, DEVICE_TOKEN = 0, 1, 2
T0 = time.monotonic()
PROGRESS = sys.stdout  # stderr with --json, so stdout is only the JSON report


def step(text: str) -> None:
    print(f"operator-pre | {time.monotonic() - T0:6.3f}s  {text}", file=PROGRESS, flush=True)


def default_kernel() -> tuple[str, str | None]:
    release = os.uname().release
    initrd = f"/boot/initrd.img-{release}"
    return f"/boot/vmlinuz-{release}", initrd if os.path.exists(initrd) else None


def hand_over(session, socket_path: str, use_systemd: bool) -> dict:
    """Give the session fd to something that outlives this process; close ours."""
    if use_systemd:
        name = f"luo-{session.name}"
        sdnotify.store_fds(name, session)
        os.close(session.detach())
        return {"kind": "systemd fd store", "fdname": name}
    holder = Holder(socket_path)
    try:
        holder.list()  # one is already running: use it
    except OSError:
        holder = Holder.spawn(socket_path)
    holder.hold_session(session, {"held_for": "operator_pre_kexec.py"})
    return {"kind": "holder", "socket": socket_path, "pid": holder.pid}


def write_atomically(path: str, doc: dict) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp"
    with open(tmp, "w") as fh:
        json.dump(doc, fh, indent=1)
        fh.write("\n")
    os.replace(tmp, path)


def run(args) -> int:
    st = status()
    kho = {True: "on", False: "OFF", None: "unknown"}[st.kho_enabled]
    step(f"kernel {os.uname().release}: LUO {'on' if st.luo_enabled else 'OFF'}, KHO {kho}, live update number "
         f"{st.liveupdate_number if st.liveupdate_number is not None else '- (cold boot)'}, boot id {st.boot_id[:8]}")
    if not st.luo_enabled:
        print("error: this kernel has no /dev/liveupdate (CONFIG_LIVEUPDATE, boot with liveupdate=on kho=on)",
              file=sys.stderr)
        return 1

    pci = PciDevice(args.bdf)
    usage = check_device(pci, force=args.force)
    previous = pci.bind_vfio()
    step(f"{pci.bdf} ({pci.vendor:04x}:{pci.device:04x}, {pci.class_name}): bound to vfio-pci "
         f"(was {previous or 'no driver'}), IOMMU group {pci.iommu_group}, cdev {pci.vfio_cdev}"
         + (f"; forced past {', '.join(u.describe() for u in usage if u.active)}" if any(u.active for u in usage) else ""))

    payload = os.urandom(args.payload_mib << 20)
    ram = Memfd.create("guest-ram", payload)
    ram.seal("grow", "shrink")
    digest = hashlib.sha256(payload).hexdigest()
    step(f"payload: memfd 'guest-ram' of {args.payload_mib} MiB, sha256 {digest[:16]}...")

    device_result: dict = {"bdf": pci.bdf, "previous_driver": previous, "token": DEVICE_TOKEN, "preserved": False}
    session = None
    try:
        with VfioDevice.open(pci.bdf, "iommufd") as dev, LiveUpdate() as lu:
            info = dev.info()
            step(f"VFIO: cdev bound to iommufd (devid {dev.devid}), attached to IOAS {dev.iommu.ioas_id}; "
                 f"{info.num_regions} regions, {info.num_irqs} IRQ indexes")
            session = lu.create_session(args.session)
            session.preserve(ram, PAYLOAD_TOKEN)
            step(f"session {args.session!r}: payload preserved as token {PAYLOAD_TOKEN:#x}")
            try:
                dev.preserve(session, DEVICE_TOKEN)
                device_result["preserved"] = True
                step(f"VFIO device preserved as token {DEVICE_TOKEN:#x}")
            except PyvfioError as exc:
                device_result["kernel_said"] = str(exc)
                device_result["error"] = type(exc).__name__
                step(f"VFIO device NOT preserved; the kernel says: {exc}")
        if not device_result["preserved"]:
            step("VFIO device closed: after the kexec it is bound and set up again")

        manifest = {
            "version": 1, "session": args.session, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "boot_id": st.boot_id, "kernel": os.uname().release, "liveupdate_number": st.liveupdate_number,
            "files": {f"{PAYLOAD_TOKEN:#x}": {"kind": "memfd", "name": "guest-ram", "size": len(payload),
                                               "sha256": digest, "seals": ram.seals}},
            "device": device_result,
        }
        blob = json.dumps(manifest, indent=1).encode()
        with Memfd.create("manifest", blob) as m:
            m.seal("grow", "shrink", "write", "seal")
            session.preserve(m, MANIFEST_TOKEN)
        step(f"manifest preserved in the session as token {MANIFEST_TOKEN:#x} ({len(blob)} bytes)")
        ram.close()

        holder = hand_over(session, args.holder_socket,
                           use_systemd=bool(os.environ.get("NOTIFY_SOCKET")) and not args.no_systemd)
        session = None  # ours is closed; the holder's keeps the session preserved
        where = (f"holder pid {holder['pid']} at {holder['socket']}" if holder["kind"] == "holder"
                 else f"systemd's fd store as {holder['fdname']}")
        step(f"session handed to {where}")
    except BaseException:
        if session is not None:
            session.close()  # un-preserves: nothing half-prepared survives the kexec
            print("note: the session was closed, nothing is preserved", file=sys.stderr)
        raise

    write_atomically(args.manifest, {**manifest, "holder": holder})
    step(f"manifest written to {args.manifest}")

    kexec_report = {"loaded": False}
    if args.no_load:
        step("kexec: not loaded (--no-load); load a kernel with kexec_file_load before rebooting")
    else:
        kernel, initrd = args.kernel, args.initrd
        if kernel is None:
            kernel, initrd = default_kernel()
        cmdline = kexec.current_cmdline()
        for item in args.set:
            key, _, value = item.partition("=")
            cmdline = kexec.cmdline_with(cmdline, **{key.replace(".", "__"): value})
        try:
            kexec.load(kernel, initrd, cmdline)
        except PyvfioError:
            print(f"note: session {args.session!r} stays held by {where}; stop that holder to drop it",
                  file=sys.stderr)
            raise
        kexec_report = {"loaded": kexec.loaded(), "kernel": kernel, "initrd": initrd, "cmdline": cmdline}
        step(f"kexec: loaded {kernel}" + (f" + {initrd}" if initrd else "") + f" with kexec_file_load; "
             f"command line: {cmdline}")

    report = {"ok": True, "session": args.session, "manifest_file": args.manifest, "holder": holder,
              "files": manifest["files"], "device": device_result, "kexec": kexec_report}
    if args.json:
        json.dump(report, sys.stdout, indent=1)
        print()
    else:
        print("report:")
        print(f"  session        {args.session!r} held by {where}")
        print(f"  token {MANIFEST_TOKEN:#x}      manifest ({len(blob)} bytes)")
        print(f"  token {PAYLOAD_TOKEN:#x}      memfd 'guest-ram', {args.payload_mib} MiB, sha256 {digest}")
        print(f"  token {DEVICE_TOKEN:#x}      VFIO {pci.bdf}: "
              + ("preserved" if device_result["preserved"] else f"not preserved ({device_result.get('error')})"))
        print(f"  manifest file  {args.manifest}")
        print(f"  next kernel    {'loaded' if kexec_report['loaded'] else 'NOT loaded'}"
              + ("" if args.exec else "; reboot into it with --exec (or `kexec -e`)"))
    if args.exec:
        if not kexec_report["loaded"]:
            print("error: --exec needs a loaded kernel", file=sys.stderr)
            return 1
        step("rebooting into the new kernel (reboot(LINUX_REBOOT_CMD_KEXEC))")
        kexec.execute()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="example: operator_pre_kexec.py --bdf 0000:00:04.0 --kernel /boot/vmlinuz-new "
               "--initrd /boot/initrd.img-new --exec\n\n" + __doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bdf", default="0000:00:04.0", help="PCI device to hand to VFIO (default: %(default)s)")
    parser.add_argument("--session", default="operator-vm", help="LUO session name (default: %(default)s)")
    parser.add_argument("--payload-mib", type=int, default=16, help="size of the preserved memfd in MiB (default: 16)")
    parser.add_argument("--manifest", default="/var/lib/pyvfio-lu/operator-manifest.json",
                        help="where to write the manifest; it must survive the reboot (default: %(default)s)")
    parser.add_argument("--holder-socket", default="/run/pyvfio-lu-operator.sock",
                        help="socket of the holder daemon to start or reuse (default: %(default)s)")
    parser.add_argument("--no-systemd", action="store_true", help="use a holder even when NOTIFY_SOCKET is set")
    parser.add_argument("--force", action="store_true", help="bind even if the device backs an active NIC")
    parser.add_argument("--kernel", help="bzImage to load (default: /boot/vmlinuz-$(uname -r))")
    parser.add_argument("--initrd", help="initramfs to load with it (default: /boot/initrd.img-$(uname -r) if present)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="replace or add a parameter on the next kernel's command line (repeatable)")
    parser.add_argument("--no-load", action="store_true", help="do not load a kernel (someone else will)")
    parser.add_argument("--exec", action="store_true", help="reboot into the loaded kernel at the end")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    args = parser.parse_args(argv)
    global PROGRESS
    PROGRESS = sys.stderr if args.json else sys.stdout
    if args.exec and args.no_load:
        parser.error("--exec needs a kernel: drop --no-load")
    try:
        return run(args)
    except (InterfaceInUse, GroupNotViable) as exc:
        print(f"refused: {exc}", file=sys.stderr)
        return 3
    except PyvfioError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
