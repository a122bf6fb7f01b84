#!/usr/bin/env python3
"""Operator, after a live update: retrieve what operator_pre_kexec.py preserved, verify it, finish.

1. confirm this boot is a live update (the live update number LUO handed over);
2. retrieve the session; read the manifest preserved in it (token 0) and compare it with
   the manifest file written before the kexec;
3. retrieve every preserved file and check its size and sha256 against the manifest;
4. bind the device to vfio-pci again (nothing does it by itself after a kexec), and take
   it over: retrieve it from the session if the old kernel preserved it, else open it
   afresh; it is bound to a new iommufd either way;
5. finish the session (the kernel frees what it kept for it) and print a report.

Exit status: 0 everything verified, 1 something missing or different (the report says what).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time

from pyvfio_lu.errors import NoSuchSession, PyvfioError
from pyvfio_lu.iommu import Iommu
from pyvfio_lu.luo import LiveUpdate
from pyvfio_lu.memfd import Memfd
from pyvfio_lu.status import status
from pyvfio_lu.sysfs import PciDevice
from pyvfio_lu.vfio import VfioDevice

MANIFEST_TOKEN = 0
T0 = time.monotonic()
PROGRESS = sys.stdout  # stderr with --json, so stdout is only the JSON report


def step(text: str) -> None:
    print(f"operator-post | {time.monotonic() - T0:6.3f}s  {text}", file=PROGRESS, flush=True)


def load_file(path: str) -> dict | None:
    try:
        with open(path) as fh:
            return json.load(fh)
    except FileNotFoundError:
        return None


def take_device(session, device: dict) -> dict:
    """Re-bind the device to vfio-pci and set it up on a new iommufd (from the session when
    it was preserved); returns what was found."""
    pci = PciDevice(device["bdf"])
    was = pci.bind_vfio()
    step(f"{pci.bdf}: bound to vfio-pci (was {was or 'no driver'} after the kexec), cdev {pci.vfio_cdev}")
    result = {"bdf": pci.bdf, "cdev": pci.vfio_cdev, "from_session": bool(device.get("preserved"))}
    if device.get("preserved"):
        fd = session.retrieve(int(device["token"]))
        iommu = Iommu("iommufd")
        with VfioDevice.from_fd(fd.detach(), iommu=iommu, bdf=pci.bdf) as dev:
            info = dev.info()
            step(f"VFIO device retrieved from token {device['token']:#x}, bound to a new iommufd: "
                 f"{info.num_regions} regions, {info.num_irqs} IRQ indexes")
        iommu.close()
    else:
        step(f"VFIO device was not preserved before the kexec ({device.get('error', 'unknown reason')}); "
             "opening it afresh")
        with VfioDevice.open(pci.bdf, "iommufd") as dev:
            info = dev.info()
            step(f"VFIO: cdev bound to a new iommufd (devid {dev.devid}), attached to IOAS {dev.iommu.ioas_id}; "
                 f"{info.num_regions} regions, {info.num_irqs} IRQ indexes")
    result["regions"], result["irqs"] = info.num_regions, info.num_irqs
    return result


def run(args) -> int:
    st = status()
    step(f"kernel {os.uname().release}: boot id {st.boot_id[:8]}, live update number "
         f"{st.liveupdate_number if st.liveupdate_number is not None else '- (this was a cold boot)'}")
    on_disk = load_file(args.manifest)
    name = args.session or (on_disk or {}).get("session")
    if not name:
        print(f"error: no manifest at {args.manifest} and no --session given: nothing to look for", file=sys.stderr)
        return 1
    if on_disk is None:
        step(f"no manifest file at {args.manifest}: relying on the copy preserved in the session")
    problems: list[str] = []
    files: dict[str, dict] = {}
    device = None
    with LiveUpdate() as lu:
        try:
            session = lu.retrieve_session(name)
        except NoSuchSession:
            print(f"error: no incoming session {name!r}: this boot did not come from a live update that "
                  "preserved it (or it was finished already)", file=sys.stderr)
            return 1
        with session:
            with Memfd.adopt(session.retrieve(MANIFEST_TOKEN)) as m:
                preserved = json.loads(m.read_all())
            step(f"session {name!r} retrieved; manifest (token {MANIFEST_TOKEN:#x}) lists "
                 f"{len(preserved['files'])} file(s) and device {preserved['device']['bdf']}")
            if on_disk is not None:
                for key in ("session", "files", "device", "boot_id"):
                    if on_disk.get(key) != preserved.get(key):
                        problems.append(f"manifest file and preserved manifest differ in {key!r}")
            if preserved.get("boot_id") == st.boot_id:
                problems.append("the boot id did not change: this is the kernel that preserved the session")

            for token, want in sorted(preserved["files"].items()):
                with Memfd.adopt(session.retrieve(int(token, 16))) as f:
                    data = f.read_all()
                    got = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest(), "seals": f.seals}
                ok = got["size"] == want["size"] and got["sha256"] == want["sha256"]
                files[token] = {**want, "verified": ok, "got_sha256": got["sha256"]}
                step(f"token {token}: {want['kind']} {want['name']!r}, {got['size']} bytes, sha256 "
                     f"{got['sha256'][:16]}... {'matches' if ok else 'DIFFERS from ' + want['sha256'][:16] + '...'}")
                if not ok:
                    problems.append(f"token {token} ({want['name']}) does not match the manifest")

            if not args.skip_device:
                device = take_device(session, preserved["device"])
            session.finish()
            step(f"session {name!r} finished: the kernel released what it kept for it")

    if args.restore_driver:
        pci = PciDevice(preserved["device"]["bdf"])
        pci.restore(preserved["device"].get("previous_driver"))
        step(f"{pci.bdf} given back to {pci.driver or 'no driver'}")

    ok = not problems
    report = {"ok": ok, "session": name, "liveupdate_number": st.liveupdate_number, "files": files,
              "device": device, "problems": problems}
    if args.json:
        json.dump(report, sys.stdout, indent=1)
        print()
    else:
        print("report:")
        print(f"  live update    number {st.liveupdate_number}; session {name!r} retrieved and finished")
        for token, f in files.items():
            print(f"  token {token}      {f['kind']} {f['name']!r}: {'verified' if f['verified'] else 'MISMATCH'}")
        if device:
            print(f"  VFIO device    {device['bdf']} on vfio-pci, {device['cdev']}, "
                  f"{'taken from the session' if device['from_session'] else 'set up again'}")
        for p in problems:
            print(f"  PROBLEM        {p}")
        print(f"  result         {'everything verified' if ok else 'FAILED'}")
    return 0 if ok else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="example: operator_post_kexec.py --manifest /var/lib/pyvfio-lu/operator-manifest.json\n\n"
               + __doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--manifest", default="/var/lib/pyvfio-lu/operator-manifest.json",
                        help="the manifest operator_pre_kexec.py wrote (default: %(default)s)")
    parser.add_argument("--session", help="session name (default: the one in the manifest)")
    parser.add_argument("--skip-device", action="store_true", help="only verify the preserved files")
    parser.add_argument("--restore-driver", action="store_true",
                        help="afterwards give the device back to the driver it had before the pre script")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    args = parser.parse_args(argv)
    global PROGRESS
    PROGRESS = sys.stderr if args.json else sys.stdout
    try:
        return run(args)
    except PyvfioError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
