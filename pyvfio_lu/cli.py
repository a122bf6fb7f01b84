"""The ``pyvfio-lu`` command: devices, binding, live-update status, the guest demo.

Exit codes: 0 success, 1 the operation failed (the message says why), 2 bad usage
(including a malformed PCI address or driver name), 3 refused by a safety check (an
active network interface, a non-viable IOMMU group; ``--force`` overrides the network
check only). Errors go to stderr as one line ``pyvfio-lu COMMAND: ...``; with ``--json``
an object ``{"ok": false, "exit": N, "error": ..., "errno": ...}`` is also printed on stdout.
"""

from __future__ import annotations

import argparse
import json
import sys

from . import __version__

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (type checkers treat it as True)

if TYPE_CHECKING:
    from typing import Any

EXAMPLES = """\
examples:
  pyvfio-lu devices                      PCI devices: driver, IOMMU group (and who shares it), VFIO cdev, NICs
  pyvfio-lu devices --json 0000:00:04.0  one device as JSON, for scripts
  pyvfio-lu bind 0000:00:04.0            hand a device to vfio-pci (refused if its NIC is in use
                                         or its IOMMU group is not viable)
  pyvfio-lu unbind 0000:00:04.0          take it from vfio-pci and leave it without a driver
  pyvfio-lu unbind 0000:00:05.0 --driver virtio-pci   ... or give it back to its driver
  pyvfio-lu status                       LUO/KHO state, live update number, who holds which session
  pyvfio-lu status --json | jq .sessions
  pyvfio-lu status --json | jq .incoming     after a live update: what came in (from the ledgers LUO carried)
  pyvfio-lu recover 0000:00:04.0         a device frozen by a refused kexec: unbind + bind vfio-pci
  pyvfio-lu demo                         boot the test kernel in QEMU and run a live update

exit codes: 0 ok, 1 failed, 2 bad usage, 3 refused by a safety check (see --force)
"""

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_REFUSED = 0, 1, 2, 3


def _print_json(obj: object) -> None:
    json.dump(obj, sys.stdout, indent=1, default=str)
    sys.stdout.write("\n")


# --- devices ----------------------------------------------------------------------------------
def cmd_devices(args: argparse.Namespace) -> int:
    from .status import adopt_ledgers, devices

    adopt_ledgers()
    rows = devices(args.sysfs, args.bdf, args.all)
    if args.json:
        _print_json(rows)
        return EXIT_OK
    print(f"{'BDF':<13} {'ID':<10} {'CLASS':<22} {'DRIVER':<12} {'GROUP':<6} {'VFIO CDEV':<24} NET")
    for r in rows:
        group = "-" if r["iommu_group"] is None else str(r["iommu_group"])
        cls = f"{r['class_name']} ({r['class']})"
        print(f"{r['bdf']:<13} {r['vendor']}:{r['device']:<5} {cls:<22} {r['driver'] or '-':<12} "
              f"{group:<6} {r['vfio_cdev'] or '-':<24} {','.join(r['net']) or '-'}")
        if r["preserved"]:
            p = r["preserved"]
            print(" " * 14 + f"preserved by a live update: {p['direction']} session {p['session']!r} token {p['token']}")
        others = [m for m in r["group"] if m["bdf"] != r["bdf"]]
        if others:
            print(" " * 14 + f"group {group} also holds: "
                  + ", ".join(f"{m['bdf']} ({m['driver'] or 'no driver'})" for m in others))
    return EXIT_OK


# --- bind / unbind ----------------------------------------------------------------------------
def cmd_bind(args: argparse.Namespace) -> int:
    from .netsafety import check_device
    from .sysfs import PciDevice

    pci = PciDevice(args.bdf, args.sysfs)
    pci.check_group_viable()  # refuse before anything changes, and before the slower netlink check
    usage = check_device(pci, force=args.force)
    previous = pci.bind_vfio()
    result = {"ok": True, "bdf": pci.bdf, "driver": pci.driver, "previous_driver": previous,
              "vfio_cdev": pci.vfio_cdev, "iommu_group": pci.iommu_group,
              "forced_past": [u.to_json() for u in usage if u.active]}
    if args.json:
        _print_json(result)
        return EXIT_OK
    print(f"{pci.bdf}: bound to vfio-pci (was: {previous or 'no driver'}); "
          f"IOMMU group {pci.iommu_group if pci.iommu_group is not None else '-'}; cdev {pci.vfio_cdev or '-'}")
    for u in usage:
        if u.active:
            print(f"  forced past: {u.describe()}")
    if previous and previous != "vfio-pci":
        print(f"  undo with: pyvfio-lu unbind {pci.bdf} --driver {previous}")
    return EXIT_OK


def cmd_unbind(args: argparse.Namespace) -> int:
    from .netsafety import check_device
    from .sysfs import PciDevice, check_driver_name, is_vfio_driver

    if args.driver is not None:
        check_driver_name(args.driver)
    pci = PciDevice(args.bdf, args.sysfs)
    before = pci.driver
    if not is_vfio_driver(before):
        check_device(pci, force=args.force)  # it is a kernel driver's device: is it in use?
    pci.restore(args.driver)
    result: dict[str, Any] = {"ok": True, "bdf": pci.bdf, "previous_driver": before, "driver": pci.driver,
                              "net": pci.net_interfaces}
    if args.json:
        _print_json(result)
    else:
        net = f"; interfaces {', '.join(result['net'])}" if result["net"] else ""
        print(f"{pci.bdf}: unbound from {before or 'no driver'}; driver now {pci.driver or 'none'}{net}")
    return EXIT_OK


def cmd_recover(args: argparse.Namespace) -> int:
    from .preservation import recover_frozen
    from .sysfs import PciDevice

    recover_frozen(args.bdf, args.sysfs)
    pci = PciDevice(args.bdf, args.sysfs)
    result = {"ok": True, "bdf": pci.bdf, "driver": pci.driver, "vfio_cdev": pci.vfio_cdev}
    if args.json:
        _print_json(result)
    else:
        print(f"{pci.bdf}: unbound and bound to {pci.driver} again; cdev {pci.vfio_cdev or '-'}")
    return EXIT_OK


# --- status ------------------------------------------------------------------------------------
def _cmdline(pid: int) -> str:
    from .status import _cmdline_of

    return _cmdline_of(pid)


def _adopt_ledgers() -> None:
    """After a live update, read the ledgers once (what the first /dev/liveupdate open does)."""
    from .status import adopt_ledgers

    adopt_ledgers()


def cmd_status(args: argparse.Namespace) -> int:
    from .status import status

    _adopt_ledgers()
    st = status()
    doc = st.to_json()
    for holders in [*doc["sessions"].values(), doc["holders_of_device"]]:
        for h in holders:
            h["cmdline"] = _cmdline(h["pid"])
    if args.json:
        _print_json(doc)
        return EXIT_OK
    yes = {True: "yes", False: "no", None: "unknown"}
    print(f"LUO enabled:          {yes[st.luo_enabled]}")
    print(f"KHO enabled:          {yes[st.kho_enabled]}")
    print(f"live update number:   {st.liveupdate_number if st.liveupdate_number is not None else '- (cold boot)'}")
    print(f"boot id:              {st.boot_id}")
    print(f"kexec kernel loaded:  {yes[st.kexec_loaded]}")
    holders = ", ".join(f"pid {h['pid']} ({h['cmdline'] or h['comm']})" for h in doc["holders_of_device"]) or "nobody"
    print(f"/dev/liveupdate open: {holders}")
    if doc["sessions"]:
        print("sessions (outgoing, or retrieved and not closed), by holder:")
        for name, hs in sorted(doc["sessions"].items()):
            for h in hs:
                print(f"  {name:<24} pid {h['pid']:<6} fd {h['fd']:<4} {h['cmdline'] or h['comm']}")
    else:
        print("sessions:             none open in any visible process")
    dp = st.device_preservation
    print(f"device preservation:  {yes[dp.get('supported')]} ({dp.get('detail')})")
    if st.incoming:
        print(f"incoming sessions (from the previous kernel's ledgers, not finished yet): {len(st.incoming)}")
        shown = sorted(st.incoming.items())
        if len(shown) > args.limit and not args.all_sessions:
            print(f"  (the first {args.limit}; --all-sessions for every one, --json for scripts)")
            shown = shown[:args.limit]
        for name, entry in shown:
            files = entry.get("files") or {}
            print(f"  {name:<24} {len(files)} file(s)")
            listed = sorted(files.items())
            if len(listed) > args.limit and not args.all_sessions:
                devices = [(t, r) for t, r in listed if isinstance(r, dict) and r.get("kind") == "vfio-device"]
                print(f"    ({len(listed)} files; the devices and the first {args.limit})")
                listed = devices + [tr for tr in listed[:args.limit] if tr not in devices]
            for token, rec in listed:
                what = (f"VFIO device {rec.get('bdf')}" if rec.get("kind") == "vfio-device" else
                        f"memfd {rec.get('name')!r} {rec.get('size')} bytes"
                        + (" at IOVA " + ", ".join(hex(i[0]) for i in rec["iovas"]) if rec.get("iovas") else "")
                        if rec.get("kind") == "memfd" else f"{rec.get('kind')} {rec.get('what', '')}")
                print(f"    token {token:<8} {what}")
    for d in st.preserved_devices:
        print(f"preserved device:     {d['bdf']} in {d['direction']} session {d['session']!r} token {d['token']}")
    return EXIT_OK


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import main as demo_main

    return demo_main(["--iommu", args.iommu, "--timeout", str(args.timeout), "--flavour", args.flavour])


# --- parser -------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pyvfio-lu",
        description="VFIO devices and Linux live update (LUO) from the command line.",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sysfs", default="/sys", help=argparse.SUPPRESS)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    def add(name: str, help: str, description: str, example: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=help, description=description, epilog=example,
                              formatter_class=argparse.RawDescriptionHelpFormatter)

    p = add("devices", "list PCI devices with driver, IOMMU group and VFIO cdev",
            "List PCI functions: vendor:device, class, driver, IOMMU group (and the other members of "
            "the group with their drivers), VFIO cdev, network interfaces. Bridges are hidden unless --all.",
            "example: pyvfio-lu devices --json | jq '.[] | select(.driver == \"vfio-pci\") | .vfio_cdev'")
    p.add_argument("bdf", nargs="*", help="only these PCI addresses")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--all", action="store_true", help="include bridges")
    p.set_defaults(func=cmd_devices)

    p = add("bind", "bind a device to vfio-pci (refuses an active NIC or a non-viable group)",
            "Bind a PCI device to vfio-pci through driver_override. Refused (exit 3, nothing changed) "
            "when its IOMMU group has members on other kernel drivers, or when it backs a network "
            "interface that is up, has addresses or carries routes (--force skips the network check).",
            "example: pyvfio-lu bind 0000:00:04.0 --json")
    p.add_argument("bdf", help="PCI address, e.g. 0000:00:04.0")
    p.add_argument("--force", action="store_true", help="skip the network-interface check")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_bind)

    p = add("unbind", "take a device from its driver (vfio-pci) and optionally give it to another",
            "Unbind a device, clear its driver_override and, with --driver, probe that driver. A device "
            "on a kernel driver that backs an active network interface is refused (exit 3) unless --force.",
            "example: pyvfio-lu unbind 0000:00:05.0 --driver virtio-pci")
    p.add_argument("bdf", help="PCI address, e.g. 0000:00:04.0")
    p.add_argument("--driver", help="driver to bind afterwards (the one `bind` reported); default: none")
    p.add_argument("--force", action="store_true", help="skip the network-interface check")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_unbind)

    p = add("status", "LUO/KHO state, live update number, sessions, incoming sessions, preserved devices",
            "Is live update enabled, the live update number handed over by the previous kernel, "
            "whether a kexec kernel is loaded, who has /dev/liveupdate open, which process holds an fd "
            "of which LUO session (from /proc/*/fd; run as root to see every process), whether this "
            "kernel can preserve VFIO devices, and after a live update the incoming sessions and what "
            "each holds (from the ledgers the previous kernel's holders left in LUO; the first call "
            "after a live update reads them, which finishes the ledger sessions only), and every "
            "preserved device.",
            "example: pyvfio-lu status --json | jq '.incoming'")
    p.add_argument("--json", action="store_true", help="machine-readable output (everything, no limits)")
    p.add_argument("--limit", type=int, default=20, metavar="N",
                   help="text output: at most N incoming sessions and N files per session (default 20)")
    p.add_argument("--all-sessions", action="store_true", help="text output: no limit")
    p.set_defaults(func=cmd_status)

    p = add("recover", "give back a device frozen by a kexec that did not happen (unbind + bind vfio-pci)",
            "After a refused kexec, a device that was already frozen answers EIO (DeviceFrozen), and so "
            "does a new open. This unbinds it from vfio-pci and binds it again. Refused, changing nothing, "
            "while a live-update session still preserves it or any process has it open (an unbind would "
            "wait for them): close those first.",
            "example: pyvfio-lu recover 0000:00:04.0")
    p.add_argument("bdf", help="PCI address of the frozen device")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("--sysfs", default="/sys", help=argparse.SUPPRESS)
    p.set_defaults(func=cmd_recover)
    p = add("demo", "run the live-update demo in the QEMU guest (builds the kernel first)",
            "Build (or reuse) the test kernel, boot it in QEMU, carry guest RAM and the edu device "
            "through a real kexec live update, printing each step. The device itself crosses the kexec "
            "on the device-preservation (vfio-lu) kernel, used when it is in the cache; on the upstream "
            "kernel it is set up again after the kexec.",
            "example: pyvfio-lu demo --iommu virtio --flavour vfio-lu")
    p.add_argument("--iommu", choices=["intel", "virtio"], default="intel")
    p.add_argument("--flavour", choices=["auto", "upstream", "vfio-lu"], default="auto",
                   help="kernel flavour (default auto: vfio-lu when cached, else upstream)")
    p.add_argument("--timeout", type=float, default=900.0, help="seconds before the guest is stopped")
    p.set_defaults(func=cmd_demo)
    return parser


def exit_code_for(exc: BaseException) -> int:
    from .errors import GroupNotViable
    from .netsafety import InterfaceInUse
    from .sysfs import InvalidBdf, InvalidDriverName

    if isinstance(exc, (InvalidBdf, InvalidDriverName)):
        return EXIT_USAGE
    if isinstance(exc, (InterfaceInUse, GroupNotViable)):
        return EXIT_REFUSED
    return EXIT_FAILED


def main(argv: list[str] | None = None) -> int:
    from .errors import PyvfioError

    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help (0) or a usage error (2, message already printed)
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    if not getattr(args, "func", None):
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    try:
        code: int = args.func(args)
        return code
    except PyvfioError as exc:
        code = exit_code_for(exc)
        print(f"pyvfio-lu {args.command}: {exc}", file=sys.stderr)
        if getattr(args, "json", False):
            _print_json({"ok": False, "exit": code, "error": str(exc), "errno": exc.errno_name,
                         "operation": exc.operation, "target": exc.target, "reason": exc.reason,
                         "kind": type(exc).__name__})
        return code
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
