"""Run shell commands in a QEMU guest on the test kernel, optionally across a kexec live update.

The guest's root is the host's root (9p, read-only) under a writable tmpfs overlay, so host
paths, tools and virtualenvs are usable as they are; a per-run results directory is mounted
at ``/shared``. Stage 1's command runs after the first boot; with a stage 2, ``run.sh`` then
live-updates into the same kernel and initramfs (:func:`kexec_commands`) and stage 2's command
runs after the kexec.

    python -m pyvfio_lu.vm.run [--iommu intel|virtio] [--timeout S] [--stage2 CMD] -- CMD
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from . import qemu
from .initramfs import build_initramfs
from .qemu import GuestError, GuestTimeout, Markers, QemuSpec

if TYPE_CHECKING:
    from collections.abc import Callable

__all__ = ["GuestError", "GuestResult", "GuestTimeout", "kexec_commands", "run_in_guest"]

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT = 600.0


@dataclass
class GuestResult:
    """What one guest run produced. Times are host-side seconds since QEMU started."""

    results_dir: Path
    console_log: Path
    stage_rc: dict[int, int | None]  # exit code of each requested stage's command
    kexec: bool  # the second kernel came up after the kexec reboot
    markers: Markers
    accel: str
    iommu: str
    qemu_rc: int | None
    seconds: float  # QEMU start to exit
    lines: list[tuple[float, str]] = field(default_factory=list, repr=False)

    @property
    def ok(self) -> bool:
        """Every requested stage ran and exited 0."""
        return bool(self.stage_rc) and all(rc == 0 for rc in self.stage_rc.values())

    @property
    def boot_seconds(self) -> float | None:
        return self.markers.boot_seconds

    @property
    def kexec_load_seconds(self) -> float | None:
        return self.markers.kexec_load_seconds

    @property
    def kexec_seconds(self) -> float | None:
        return self.markers.kexec_seconds

    def summary(self) -> str:
        def sec(v: float | None) -> str:
            return "-" if v is None else f"{v:.1f} s"

        rcs = ", ".join(f"stage {n} rc={'-' if rc is None else rc}"
                        for n, rc in self.stage_rc.items())
        lines = [
            (f"pyvfio-lu guest run: {'ok' if self.ok else 'FAILED'} "
             f"(accel {self.accel}, iommu {self.iommu})"),
            f"  boot (QEMU start -> stage 1 command): {sec(self.boot_seconds)}",
        ]
        if 2 in self.stage_rc:
            lines.append(f"  kexec: {'yes' if self.kexec else 'NO'}; kexec_file_load: "
                         f"{sec(self.kexec_load_seconds)}; reboot(RB_KEXEC) -> stage 2 command: "
                         f"{sec(self.kexec_seconds)}")
        lines.append(f"  {rcs}; total {sec(self.seconds)}")
        lines.append(f"  console log: {self.console_log}")
        return "\n".join(lines)

    def to_json(self) -> dict[str, object]:
        return {
            "ok": self.ok, "accel": self.accel, "iommu": self.iommu, "kexec": self.kexec,
            "stage_rc": {str(k): v for k, v in self.stage_rc.items()},
            "qemu_rc": self.qemu_rc, "seconds": round(self.seconds, 3),
            **{name: None if v is None else round(v, 3) for name, v in (
                ("boot_seconds", self.boot_seconds), ("kexec_load_seconds", self.kexec_load_seconds),
                ("kexec_seconds", self.kexec_seconds))},
            "markers": {k: round(v, 3) for k, v in self.markers.times.items()},
            "trouble": self.markers.trouble, "console_log": str(self.console_log),
        }


def kexec_commands(kernel: Path, initrd: Path, next_stage: int, python: str | None = None) -> str:
    """The shell lines that live-update the guest into ``next_stage``; they return only on failure.

    pyvfio_lu's own kexec (``python -m pyvfio_lu.kexec``): ``kexec_file_load`` (the only loader
    that hands the KHO data over) of the same kernel and initramfs with the running command
    line, its ``pyvfio_lu.stage=`` changed, then ``reboot(LINUX_REBOOT_CMD_KEXEC)``.
    Background processes, such as a daemon holding LUO session fds, are left running on purpose:
    closing those fds before the kexec would un-preserve everything.
    """
    py = shlex.quote(python or sys.executable)
    return f"""\
echo "pyvfio-lu: kexec load"
sync
{py} -m pyvfio_lu.kexec --kernel {shlex.quote(str(kernel))} --initrd {shlex.quote(str(initrd))} \\
    --set pyvfio_lu.stage={next_stage} --exec --announce "pyvfio-lu: kexec exec"
krc=$?
echo "pyvfio-lu: kexec failed rc=$krc"
"""


def run_script(stages: dict[int, str], kernel: Path, initrd: Path, cwd: Path) -> str:
    """``run.sh``: run stage N's command (``/shared/stage-N.sh``), record its exit code in
    ``/shared/stage-N.rc``, then live-update into stage N+1 when there is one."""
    out = [
        "#!/bin/sh",
        "# Written by pyvfio_lu.vm.run for one guest run. The initramfs's /init runs it, chrooted",
        "# into the guest root, as: /bin/sh /shared/run.sh <stage>",
        'stage="${1:-1}"',
        "# the kernel and initramfs this guest runs (tests load them to try a live update)",
        f"export PYVFIO_LU_GUEST_KERNEL={shlex.quote(str(kernel))} PYVFIO_LU_GUEST_INITRD={shlex.quote(str(initrd))}",
        f"cd {shlex.quote(str(cwd))} 2>/dev/null || cd /",
        'case "$stage" in',
    ]
    for n in sorted(stages):
        out += [
            f"{n})",
            f"    /bin/sh /shared/stage-{n}.sh </dev/null",
            "    rc=$?",
            f'    echo "$rc" > /shared/stage-{n}.rc',
            f'    echo "pyvfio-lu: stage {n} command rc=$rc"',
        ]
        if n + 1 in stages:
            out += ["    " + line if line else "" for line in
                    kexec_commands(kernel, initrd, n + 1).splitlines()]
        out += ['    exit "$rc"', "    ;;"]
    out += ["*)", '    echo "pyvfio-lu: no command for stage $stage"', "    exit 2", "    ;;",
            "esac"]
    return "\n".join(out) + "\n"


def _kernel_image() -> Path:
    """``$PYVFIO_LU_KERNEL``, else the cached test kernel (built first when there is none)."""
    explicit = os.environ.get("PYVFIO_LU_KERNEL")
    if explicit:
        return Path(explicit)
    from .kernel import build  # imported late: only needed when no kernel is named

    return build().bzimage


def _prepare_results(results_dir: Path | None) -> Path:
    if results_dir is None:
        return Path(tempfile.mkdtemp(prefix="pyvfio-lu-run-"))
    results_dir = results_dir.resolve()
    results_dir.mkdir(parents=True, exist_ok=True)
    for stale in [*results_dir.glob("stage-*.rc"), *results_dir.glob("stage-*.sh")]:
        stale.unlink()
    return results_dir


def _read_rc(results_dir: Path, stage: int, markers: Markers) -> int | None:
    try:
        return int((results_dir / f"stage-{stage}.rc").read_text().strip())
    except (OSError, ValueError):
        return markers.command_rc.get(stage)


def run_in_guest(stage1: str, stage2: str | None = None, *, iommu: str = "intel",
                 timeout: float = DEFAULT_TIMEOUT, results_dir: Path | None = None,
                 extra_append: str = "", memory: str = "2G", net: bool = True,
                 kernel: Path | None = None, accel: str | None = None,
                 cwd: Path | None = None,
                 on_line: Callable[[float, str], None] | None = None,
                 stage3: str | None = None) -> GuestResult:
    """Boot the test kernel, run ``stage1`` (a shell command) in the guest root, and with
    ``stage2`` live-update (kexec) into the same kernel and run ``stage2`` there.

    Commands run with ``/bin/sh`` in ``cwd`` (default: the caller's working directory, the
    same path in the guest), stdin ``/dev/null``, stdout/stderr on the console. A non-zero
    exit code is reported in ``GuestResult.stage_rc``, not raised. Raises
    :class:`GuestTimeout` when the guest runs past ``timeout`` seconds and :class:`GuestError`
    when it ends without reaching the last stage's end (panic, failed kexec, QEMU error).
    """
    stages = {1: stage1} if stage2 is None else {1: stage1, 2: stage2}
    if stage3 is not None:
        if stage2 is None:
            raise ValueError("stage3 needs a stage2")
        stages[3] = stage3  # a second live update, from stage 2 into stage 3
    kernel = (kernel or _kernel_image()).resolve()
    initrd = build_initramfs()
    results = _prepare_results(results_dir)
    for n, command in stages.items():
        (results / f"stage-{n}.sh").write_text(command.rstrip("\n") + "\n")
    workdir = Path(cwd or Path.cwd()).resolve()
    (results / "run.sh").write_text(run_script(stages, kernel, initrd, workdir))
    if accel is None:
        accel = qemu.choose_accel(lambda: qemu.probe_kvm(kernel, initrd),
                                  key=qemu.probe_key(kernel))
    spec = QemuSpec(kernel=kernel, initrd=initrd, results_dir=results, append=extra_append,
                    memory=memory, iommu=iommu, accel=accel, net=net)
    console_log = results / "console.log"
    log.info("guest run in %s (accel %s, iommu %s)", results, accel, iommu)
    run = qemu.run_console(qemu.qemu_argv(spec), log_path=console_log, timeout=timeout,
                           on_line=on_line, finished=qemu.POWEROFF)
    markers = qemu.parse_markers(run.lines)
    result = GuestResult(
        results_dir=results, console_log=console_log,
        stage_rc={n: _read_rc(results, n, markers) for n in stages},
        kexec=markers.kexec_happened, markers=markers, accel=accel, iommu=iommu,
        qemu_rc=run.returncode, seconds=run.seconds, lines=run.lines)
    (results / "result.json").write_text(json.dumps(result.to_json(), indent=1) + "\n")
    last = max(stages)
    if f"stage{last}.end" not in markers.times:
        why = f"the guest ended (QEMU rc={run.returncode}) before stage {last} finished"
        if markers.trouble:
            why += "; trouble seen:\n  " + "\n  ".join(markers.trouble[-10:])
        raise GuestError(why, [t for _, t in run.lines[-qemu.TAIL_LINES:]], console_log, result)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pyvfio_lu.vm.run",
        description="Run a shell command in a QEMU guest on the LUO/VFIO test kernel, and "
                    "with --stage2 a second one after a kexec live update. The guest root is "
                    "the host root (read-only 9p under a tmpfs overlay); the results directory "
                    "is at /shared. Environment: PYVFIO_LU_ACCEL=tcg|kvm, "
                    "PYVFIO_LU_KERNEL=bzImage, PYVFIO_LU_KERNEL_FLAVOUR=upstream|vfio-lu.",
        epilog="example: python -m pyvfio_lu.vm.run --stage2 'cat /proc/cmdline' -- "
               "'ls /dev/liveupdate'. "
               "Exit status: 0 when every stage exited 0, 1 when one did not, 2 when the guest "
               "did not run to its end (timeout, panic, failed kexec).")
    parser.add_argument("--iommu", choices=qemu.IOMMU_MODES, default="intel",
                        help="guest IOMMU: intel-iommu with interrupt remapping (default) or "
                             "virtio-iommu-pci")
    parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT, metavar="S",
                        help=f"kill the guest after S seconds (default {DEFAULT_TIMEOUT:.0f})")
    parser.add_argument("--stage2", metavar="CMD", help="command to run after the kexec")
    parser.add_argument("--memory", default="2G", help="guest memory (default 2G)")
    parser.add_argument("--append", default="", metavar="ARGS", help="extra kernel parameters")
    parser.add_argument("--results-dir", type=Path, metavar="DIR",
                        help="where console.log, stage-N.rc and result.json go (default: a new "
                             "directory under $TMPDIR)")
    parser.add_argument("--no-net", action="store_true", help="no virtio-net NIC")
    parser.add_argument("--kernel", type=Path,
                        help="bzImage to boot (default: the cached test kernel of --flavour)")
    parser.add_argument("--flavour", choices=["upstream", "vfio-lu"],
                        default=os.environ.get("PYVFIO_LU_KERNEL_FLAVOUR", "upstream"),
                        help="which cached kernel: upstream, or vfio-lu (device preservation; built with "
                             "python -m pyvfio_lu.vm.kernel --patches DIR); env PYVFIO_LU_KERNEL_FLAVOUR")
    parser.add_argument("-q", "--quiet", action="store_true", help="do not print the console")
    parser.add_argument("command", nargs="+", metavar="CMD",
                        help="stage-1 command (after --; several words are joined with spaces)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[vm] %(message)s")

    def echo(t: float, text: str) -> None:
        print(f"[{t:7.2f}] {text}", flush=True)

    if args.kernel is None and not os.environ.get("PYVFIO_LU_KERNEL"):
        from .kernel import KernelBuildError, build

        try:
            args.kernel = build(flavour=args.flavour).bzimage
        except KernelBuildError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
    try:
        result = run_in_guest(" ".join(args.command), args.stage2, iommu=args.iommu,
                              timeout=args.timeout, results_dir=args.results_dir,
                              extra_append=args.append, memory=args.memory, net=not args.no_net,
                              kernel=args.kernel, on_line=None if args.quiet else echo)
    except GuestError as exc:
        print(f"error: {exc}", file=sys.stderr)
        if isinstance(exc.result, GuestResult):
            print(exc.result.summary(), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; the guest was killed", file=sys.stderr)
        return 130
    print(result.summary())
    return 0 if result.ok else 1


if __name__ == "__main__":
    sys.exit(main())
