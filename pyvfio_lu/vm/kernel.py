"""Build (or reuse) the test kernel: Debian's linux-source plus LUO, KHO, VFIO and iommufd.

The image is cached outside any checkout under ``cache_root()/kernel/<version>-<hash>``,
where the hash covers the configuration fragments and this file's build recipe, so a
changed fragment builds a new kernel and an unchanged one is reused.

Run ``python -m pyvfio_lu.vm.kernel`` to build and print the image's path.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from . import debian
from .cache import cache_root, locked

PACKAGE = os.environ.get("PYVFIO_LU_KERNEL_PACKAGE", "linux-source-7.2")
CONFIG_DIR = Path(__file__).with_name("config")
FRAGMENTS = ("luo-vfio.config", "trim.config")
RECIPE_VERSION = "1"  # bump when the steps below change what is built


class KernelBuildError(RuntimeError):
    """The test kernel could not be fetched, configured or built."""


@dataclass(frozen=True)
class KernelImage:
    bzimage: Path
    config: Path
    version: str  # Debian package version of the source
    build_seconds: float | None  # None when the image came from the cache

    def __str__(self) -> str:
        return str(self.bzimage)


def fragment_hash() -> str:
    h = hashlib.sha256(RECIPE_VERSION.encode())
    for name in FRAGMENTS:
        h.update(name.encode() + b"\0" + (CONFIG_DIR / name).read_bytes())
    return h.hexdigest()[:12]


def wanted_symbols() -> dict[str, str]:
    """Every symbol the fragments set, as ``{"CONFIG_X": "y" | "n"}`` (trims are "n")."""
    wanted: dict[str, str] = {}
    for name in FRAGMENTS:
        for line in (CONFIG_DIR / name).read_text().splitlines():
            m = re.match(r"(CONFIG_\w+)=(\S+)", line) or re.match(r"# (CONFIG_\w+) is not set", line)
            if m:
                wanted[m.group(1)] = m.group(2) if m.lastindex == 2 else "n"
    return wanted


def check_config(config_text: str) -> list[str]:
    """Symbols whose final value differs from what the fragments asked for."""
    have: dict[str, str] = {}
    for line in config_text.splitlines():
        m = re.match(r"(CONFIG_\w+)=(\S+)", line)
        if m:
            have[m.group(1)] = m.group(2)
    problems = []
    for sym, want in wanted_symbols().items():
        got = have.get(sym, "n")
        if want == "n" and got not in ("n",):
            # a trim that something else selects is harmless; only report it
            continue
        if want != "n" and got != want:
            problems.append(f"{sym}: wanted {want}, got {got}")
    return problems


def _log(msg: str) -> None:
    print(f"[kernel] {msg}", file=sys.stderr, flush=True)


def _source_tree(cache: Path, refresh: bool) -> tuple[Path, str]:
    deb = debian.download(cache / "debian", PACKAGE, refresh=refresh)
    version = deb.name.split("_")[1].replace("%3a", ":")
    src_root = cache / "src" / version
    tree_marker = src_root / ".unpacked"
    if not tree_marker.exists():
        _log(f"unpacking {deb.name}")
        pkg_dir = debian.extract(deb, src_root / "deb")
        tarballs = sorted((pkg_dir / "usr" / "src").glob("linux-source-*.tar.*"))
        if not tarballs:
            raise KernelBuildError(f"{deb.name} holds no linux-source tarball")
        subprocess.run(["tar", "-xf", str(tarballs[0]), "-C", str(src_root)], check=True)
        top = tarballs[0].name.split(".tar")[0]
        (src_root / "tree").unlink(missing_ok=True)
        (src_root / "tree").symlink_to(top)
        tree_marker.write_text(top + "\n")
    return src_root / "tree", version


def _make(src: Path, out: Path, *targets: str, log: Path, jobs: int | None = None) -> None:
    cmd = ["make", "-C", str(src), f"O={out}", f"-j{jobs or os.cpu_count() or 1}", *targets]
    with open(log, "a") as fh:
        fh.write(f"$ {' '.join(cmd)}\n")
        fh.flush()
        rc = subprocess.call(cmd, stdout=fh, stderr=subprocess.STDOUT)
    if rc != 0:
        tail = log.read_text(errors="replace").splitlines()[-30:]
        raise KernelBuildError(f"make {' '.join(targets)} failed ({rc}); see {log}:\n" + "\n".join(tail))


def _progress(log: Path, stop: threading.Event, start: float, every: float = 30.0) -> None:
    while not stop.wait(every):
        try:
            text = log.read_text(errors="replace")
        except OSError:
            continue
        objects = len(re.findall(r"^\s+CC\s", text, re.M))
        _log(f"building: {objects} objects compiled, {time.monotonic() - start:.0f} s")


def configure(src: Path, out: Path, log: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    _make(src, out, "x86_64_defconfig", log=log)
    _make(src, out, "kvm_guest.config", log=log)
    merge = src / "scripts" / "kconfig" / "merge_config.sh"
    cmd = ["bash", str(merge), "-m", "-O", str(out), str(out / ".config"),
           *(str(CONFIG_DIR / f) for f in FRAGMENTS)]
    with open(log, "a") as fh:
        rc = subprocess.call(cmd, cwd=src, stdout=fh, stderr=subprocess.STDOUT)
    if rc != 0:
        raise KernelBuildError(f"merge_config.sh failed ({rc}); see {log}")
    _make(src, out, "olddefconfig", log=log)
    problems = check_config((out / ".config").read_text())
    if problems:
        raise KernelBuildError("the kernel configuration lacks what the tests need:\n  " + "\n  ".join(problems))
    return out / ".config"


def build(refresh: bool = False, jobs: int | None = None) -> KernelImage:
    """Return the cached test kernel, building it first when there is none."""
    cache = cache_root()
    with locked(cache / "kernel.lock"):
        # Reuse any finished image for this fragment hash without asking the archive.
        key_suffix = fragment_hash()
        if not refresh:
            for done in sorted((cache / "kernel").glob(f"*-{key_suffix}/bzImage")):
                info = json.loads((done.parent / "build-info.json").read_text())
                return KernelImage(done, done.parent / "config", info["version"], None)
        src, version = _source_tree(cache, refresh=True)
        entry = cache / "kernel" / f"{version}-{key_suffix}"
        if (entry / "bzImage").exists():
            return KernelImage(entry / "bzImage", entry / "config", version, None)
        out = cache / "build" / version  # object tree kept: a changed fragment rebuilds incrementally
        entry.mkdir(parents=True, exist_ok=True)
        log = entry / "build.log"
        log.write_text("")
        _log(f"configuring {PACKAGE} {version} in {out}")
        t0 = time.monotonic()
        configure(src, out, log)
        _log(f"compiling bzImage with {jobs or os.cpu_count()} jobs (log: {log})")
        stop = threading.Event()
        ticker = threading.Thread(target=_progress, args=(log, stop, t0), daemon=True)
        ticker.start()
        try:
            _make(src, out, "bzImage", log=log, jobs=jobs)
        finally:
            stop.set()
        seconds = time.monotonic() - t0
        shutil.copy2(out / ".config", entry / "config")
        tmp = entry / "bzImage.tmp"
        shutil.copy2(out / "arch" / "x86" / "boot" / "bzImage", tmp)
        (entry / "build-info.json").write_text(json.dumps(
            {"package": PACKAGE, "version": version, "fragments": key_suffix,
             "build_seconds": round(seconds, 1), "jobs": jobs or os.cpu_count()}, indent=1) + "\n")
        os.replace(tmp, entry / "bzImage")
        _log(f"built in {seconds:.0f} s: {entry / 'bzImage'}")
        return KernelImage(entry / "bzImage", entry / "config", version, seconds)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pyvfio_lu.vm.kernel",
        description="Build (or reuse from the cache) the LUO+VFIO test kernel and print its path.")
    parser.add_argument("--refresh", action="store_true",
                        help="ask the archive for a newer source package even when an image is cached")
    parser.add_argument("-j", "--jobs", type=int, default=None, help="parallel make jobs (default: all cores)")
    args = parser.parse_args(argv)
    try:
        image = build(refresh=args.refresh, jobs=args.jobs)
    except (KernelBuildError, debian.DebianFetchError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(image.bzimage)
    return 0


if __name__ == "__main__":
    sys.exit(main())
