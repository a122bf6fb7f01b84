"""The ``pyvfio-lu`` command: devices, binding, live-update status, the guest demo.

Exit codes: 0 success, 1 the operation failed (the message says why), 2 bad usage,
3 refused by a safety check (use --force to override).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

EXAMPLES = """\
examples:
  pyvfio-lu devices                      list PCI devices, drivers, IOMMU groups, VFIO cdevs
  pyvfio-lu devices --json               the same as JSON, for scripts
  pyvfio-lu bind 0000:00:04.0            hand a device to vfio-pci (safety-checked)
  pyvfio-lu unbind 0000:00:04.0 --driver e1000e   give it back to its driver
  pyvfio-lu status                       LUO/KHO state, live update number, session holders
  pyvfio-lu demo                         boot the test kernel in QEMU and run a live update
"""

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_REFUSED = 0, 1, 2, 3


def _print_json(obj) -> None:
    json.dump(obj, sys.stdout, indent=1, default=str)
    sys.stdout.write("\n")


def cmd_devices(args) -> int:
    from .sysfs import PciDevice

    root = os.path.join(args.sysfs, "bus", "pci", "devices")
    rows = []
    for bdf in sorted(os.listdir(root)):
        d = PciDevice(bdf, args.sysfs)
        if not args.all and d.pci_class >> 16 == 0x06:  # bridges: hidden unless --all
            continue
        rows.append({
            "bdf": d.bdf, "vendor": f"{d.vendor:04x}", "device": f"{d.device:04x}",
            "class": f"{d.pci_class:06x}", "driver": d.driver, "iommu_group": d.iommu_group,
            "group": [{"bdf": m.bdf, "driver": m.driver} for m in d.group_members()],
            "vfio_cdev": d.vfio_cdev, "net": d.net_interfaces,
        })
    if args.json:
        _print_json(rows)
        return EXIT_OK
    print(f"{'BDF':<13} {'ID':<10} {'CLASS':<7} {'DRIVER':<12} {'GROUP':<6} {'VFIO CDEV':<22} NET")
    for r in rows:
        group = "-" if r["iommu_group"] is None else str(r["iommu_group"])
        print(f"{r['bdf']:<13} {r['vendor']}:{r['device']:<5} {r['class']:<7} {r['driver'] or '-':<12} "
              f"{group:<6} {r['vfio_cdev'] or '-':<22} {','.join(r['net']) or '-'}")
        others = [m for m in r["group"] if m["bdf"] != r["bdf"]]
        if others:
            print(" " * 14 + "group shared with: " + ", ".join(f"{m['bdf']} ({m['driver'] or 'no driver'})" for m in others))
    return EXIT_OK


def cmd_bind(args) -> int:
    from .netsafety import check_device
    from .sysfs import PciDevice

    pci = PciDevice(args.bdf, args.sysfs)
    check_device(pci, force=args.force)
    previous = pci.bind_vfio()
    result = {"bdf": pci.bdf, "driver": pci.driver, "previous_driver": previous, "vfio_cdev": pci.vfio_cdev}
    if args.json:
        _print_json(result)
    else:
        print(f"{pci.bdf}: bound to vfio-pci (was: {previous or 'no driver'}); cdev {pci.vfio_cdev or '-'}")
        if previous and previous != "vfio-pci":
            print(f"  undo with: pyvfio-lu unbind {pci.bdf} --driver {previous}")
    return EXIT_OK


def cmd_unbind(args) -> int:
    from .netsafety import check_device
    from .sysfs import PciDevice

    pci = PciDevice(args.bdf, args.sysfs)
    if pci.driver != "vfio-pci":
        check_device(pci, force=args.force)
    pci.restore(args.driver)
    if args.json:
        _print_json({"bdf": pci.bdf, "driver": pci.driver})
    else:
        print(f"{pci.bdf}: unbound; driver now {pci.driver or 'none'}")
    return EXIT_OK


def cmd_status(args) -> int:
    from .status import status

    st = status()
    if args.json:
        _print_json(st.to_json())
        return EXIT_OK
    yes = {True: "yes", False: "no", None: "unknown"}
    print(f"LUO enabled:          {yes[st.luo_enabled]}")
    print(f"KHO enabled:          {yes[st.kho_enabled]}")
    print(f"live update number:   {st.liveupdate_number if st.liveupdate_number is not None else '- (cold boot)'}")
    print(f"boot id:              {st.boot_id}")
    print(f"kexec kernel loaded:  {yes[st.kexec_loaded]}")
    holders = ", ".join(f"pid {h['pid']} ({h['comm']})" for h in st.holders_of_device) or "nobody"
    print(f"/dev/liveupdate held: {holders}")
    if st.sessions:
        print("sessions:")
        for name, hs in sorted(st.sessions.items()):
            print(f"  {name:<32} " + ", ".join(f"pid {h['pid']} ({h['comm']}) fd {h['fd']}" for h in hs))
    else:
        print("sessions:             none open in any visible process")
    return EXIT_OK


def cmd_demo(args) -> int:
    from .demo import main as demo_main

    return demo_main(["--iommu", args.iommu, "--timeout", str(args.timeout)])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pyvfio-lu",
        description="VFIO devices and Linux live update (LUO) from the command line.",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sysfs", default="/sys", help=argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("devices", help="list PCI devices with driver, IOMMU group and VFIO cdev")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--all", action="store_true", help="include bridges")
    p.set_defaults(func=cmd_devices)

    p = sub.add_parser("bind", help="bind a device to vfio-pci (refuses an active NIC or a non-viable group)",
                       description="Bind a PCI device to vfio-pci through driver_override. Refused (exit 3) "
                                   "when the device backs a network interface that is up, addressed or routed, "
                                   "or when its IOMMU group has siblings on other drivers.")
    p.add_argument("bdf", help="PCI address, e.g. 0000:00:04.0")
    p.add_argument("--force", action="store_true", help="skip the network-interface check")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_bind)

    p = sub.add_parser("unbind", help="unbind a device from vfio-pci and give it back to a driver")
    p.add_argument("bdf")
    p.add_argument("--driver", help="driver to re-probe afterwards (the one `bind` reported)")
    p.add_argument("--force", action="store_true", help="skip the network-interface check")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_unbind)

    p = sub.add_parser("status", help="LUO/KHO state, live update number, which processes hold which sessions")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("demo", help="run the live-update demo in the QEMU guest (builds the kernel first)")
    p.add_argument("--iommu", choices=["intel", "virtio"], default="intel")
    p.add_argument("--timeout", type=float, default=900.0, help="seconds before the guest is stopped")
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    from .errors import PyvfioError

    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return EXIT_USAGE
    try:
        return args.func(args)
    except PyvfioError as exc:
        from .errors import GroupNotViable
        from .netsafety import InterfaceInUse

        print(f"pyvfio-lu {args.command}: {exc}", file=sys.stderr)
        return EXIT_REFUSED if isinstance(exc, (InterfaceInUse, GroupNotViable)) else EXIT_FAILED
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
