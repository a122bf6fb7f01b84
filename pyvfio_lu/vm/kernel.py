"""Build (or reuse) the test kernels: Debian's linux-source plus LUO, KHO, VFIO and iommufd.

Two flavours:

- ``upstream``: Debian's source as it is. LUO and memfd preservation work; VFIO device
  files cannot be preserved (no kernel handler for them).
- ``vfio-lu``: the same source with a patch series applied that adds device preservation
  (the PCI live-update and VFIO live-update series under review upstream), plus the
  ``vfio-lu.config`` fragment. The patches are an *input*: a directory of ``*.patch`` /
  ``*.diff`` / ``*.mbox`` files applied in file-name order (``--patches DIR`` or
  ``$PYVFIO_LU_KERNEL_PATCHES``), or an already patched kernel tree (``--tree DIR`` or
  ``$PYVFIO_LU_KERNEL_TREE``). None of their text is part of this project.

Images are cached outside any checkout under ``cache_root()/kernel/<version>-<key>`` (the
upstream flavour) or ``<version>-vfio-lu-<key>``, where the key hashes the configuration
fragments, this file's build recipe, and for ``vfio-lu`` the patches' text (or the tree's
identity), so a changed input builds a new kernel and an unchanged one is reused. A cached
``vfio-lu`` image is found again without its patches (``find_cached("vfio-lu")``), so a test
run on a machine that built one uses it.

Run ``python -m pyvfio_lu.vm.kernel [--flavour vfio-lu --patches DIR]`` to build and print
the image's path.
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

UPSTREAM = "upstream"
VFIO_LU = "vfio-lu"
FLAVOURS = (UPSTREAM, VFIO_LU)
FLAVOUR_FRAGMENTS = {UPSTREAM: FRAGMENTS, VFIO_LU: (*FRAGMENTS, "vfio-lu.config")}
PATCHES_ENV = "PYVFIO_LU_KERNEL_PATCHES"
TREE_ENV = "PYVFIO_LU_KERNEL_TREE"
PATCH_SUFFIXES = (".patch", ".diff", ".mbox", ".eml")


class KernelBuildError(RuntimeError):
    """The test kernel could not be fetched, patched, configured or built."""


@dataclass(frozen=True)
class KernelImage:
    bzimage: Path
    config: Path
    version: str  # Debian package version of the source
    build_seconds: float | None  # None when the image came from the cache
    flavour: str = UPSTREAM
    release: str = ""  # `uname -r` of the image, where known

    def __str__(self) -> str:
        return str(self.bzimage)


def fragment_hash(flavour: str = UPSTREAM) -> str:
    h = hashlib.sha256(RECIPE_VERSION.encode())
    for name in FLAVOUR_FRAGMENTS[flavour]:
        h.update(name.encode() + b"\0" + (CONFIG_DIR / name).read_bytes())
    return h.hexdigest()[:12]


def patch_files(patches: Path) -> list[Path]:
    """The patches of ``patches`` (a directory) in the order they are applied: by file name."""
    if not patches.is_dir():
        raise KernelBuildError(f"patch directory {patches} does not exist (or is not a directory)")
    files = sorted(p for p in patches.iterdir() if p.is_file() and p.name.endswith(PATCH_SUFFIXES))
    if not files:
        raise KernelBuildError(f"{patches} holds no patch (files ending in {', '.join(PATCH_SUFFIXES)})")
    return files


def _tree_identity(tree: Path) -> str:
    """What names a given state of a kernel tree: its git HEAD (and whether it is dirty), else its path."""
    try:
        head = subprocess.run(["git", "-C", str(tree), "rev-parse", "HEAD"], capture_output=True,
                              text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(tree), "status", "--porcelain", "-uno"],
                               capture_output=True, text=True, check=False).stdout.strip()
        return f"git:{head}{'-dirty:' + hashlib.sha256(dirty.encode()).hexdigest()[:8] if dirty else ''}"
    except (OSError, subprocess.CalledProcessError):
        return f"path:{tree.resolve()}"


def input_key(flavour: str, patches: Path | None = None, tree: Path | None = None) -> str:
    """The cache key of a build: fragments and recipe, plus the patches' text or the tree's identity."""
    if flavour == UPSTREAM:
        return fragment_hash(UPSTREAM)  # unchanged from earlier releases: warm caches stay valid
    h = hashlib.sha256(fragment_hash(flavour).encode())
    if patches is not None:
        for p in patch_files(patches):
            h.update(b"patch\0" + p.name.encode() + b"\0" + p.read_bytes())
    if tree is not None:
        h.update(b"tree\0" + _tree_identity(tree).encode())
    return h.hexdigest()[:12]


def wanted_symbols(flavour: str = UPSTREAM) -> dict[str, str]:
    """Every symbol the fragments set, as ``{"CONFIG_X": "y" | "n"}`` (trims are "n")."""
    wanted: dict[str, str] = {}
    for name in FLAVOUR_FRAGMENTS[flavour]:
        for line in (CONFIG_DIR / name).read_text().splitlines():
            m = re.match(r"(CONFIG_\w+)=(\S+)", line) or re.match(r"# (CONFIG_\w+) is not set", line)
            if m:
                wanted[m.group(1)] = m.group(2) if m.lastindex == 2 else "n"
    return wanted


def check_config(config_text: str, flavour: str = UPSTREAM) -> list[str]:
    """Symbols whose final value differs from what the fragments asked for."""
    have: dict[str, str] = {}
    for line in config_text.splitlines():
        m = re.match(r"(CONFIG_\w+)=(\S+)", line)
        if m:
            have[m.group(1)] = m.group(2)
    problems = []
    for sym, want in wanted_symbols(flavour).items():
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
    # LOCALVERSION= (set, empty): no "+" or -g<hash> suffix from a git tree, a clean `uname -r`
    cmd = ["make", "-C", str(src), f"O={out}", f"-j{jobs or os.cpu_count() or 1}", "LOCALVERSION=", *targets]
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


def touched_files(patch_text: str) -> list[str]:
    """The files a patch changes (``+++ b/path`` lines), relative to the tree's top."""
    out = []
    for line in patch_text.splitlines():
        if line.startswith("+++ ") and not line.startswith("+++ /dev/null"):
            path = line[4:].split("\t")[0].strip()
            out.append(path.split("/", 1)[1] if "/" in path else path)
    return out


def apply_patches(tree: Path, files: list[Path], log: Path) -> list[str]:
    """Apply ``files`` in order to ``tree`` with ``patch -p1 --fuzz=3``; returns one line per
    patch saying how it applied. KernelBuildError names the patch and the failing hunk."""
    report = []
    for n, pfile in enumerate(files, 1):
        text = pfile.read_text(errors="surrogateescape")
        if "\n+++ " not in text and not text.startswith("+++ "):
            raise KernelBuildError(f"patch {n}/{len(files)} {pfile.name} holds no diff (no '+++' line)")
        for rel in touched_files(text):  # break hard links to the pristine tree before patching
            f = tree / rel
            if f.is_file() and f.stat().st_nlink > 1:
                tmp = f.with_name(f.name + ".pvl-tmp")
                shutil.copy2(f, tmp)
                os.replace(tmp, f)
        cmd = ["patch", "-p1", "--fuzz=3", "--forward", "--batch", "--no-backup-if-mismatch",
               "-i", str(pfile)]
        proc = subprocess.run(cmd, cwd=tree, capture_output=True, text=True, check=False)
        with open(log, "a") as fh:
            fh.write(f"$ {' '.join(cmd)}\n{proc.stdout}{proc.stderr}")
        if proc.returncode != 0:
            failed = [ln for ln in proc.stdout.splitlines() if "FAILED" in ln or "malformed" in ln
                      or "Reversed" in ln or "can't find file" in ln]
            raise KernelBuildError(
                f"patch {n}/{len(files)} {pfile.name} does not apply to {tree}:\n  "
                + "\n  ".join(failed or proc.stdout.splitlines()[-10:] or [proc.stderr.strip()]))
        notes = [ln.strip() for ln in proc.stdout.splitlines() if "fuzz" in ln or "offset" in ln]
        report.append(f"{pfile.name}: " + ("clean" if not notes else "; ".join(notes)))
    return report


def _patched_tree(cache: Path, pristine: Path, key: str, patches: Path, log: Path) -> Path:
    """A copy of ``pristine`` (hard links, broken per patched file) with ``patches`` applied,
    kept under ``cache/src-patched/<key>`` and reused while the patches are the same."""
    root = cache / "src-patched" / key
    done = root / ".applied"
    if done.exists():
        return root / "tree"
    if root.exists():
        shutil.rmtree(root)  # an earlier attempt stopped half-way
    root.mkdir(parents=True)
    _log(f"copying the source tree for patching into {root}")
    subprocess.run(["cp", "-al", str(pristine.resolve()), str(root / "tree")], check=True)
    files = patch_files(patches)
    _log(f"applying {len(files)} patches from {patches}")
    try:
        report = apply_patches(root / "tree", files, log)
    except BaseException:
        shutil.rmtree(root, ignore_errors=True)
        raise
    for line in report:
        _log(f"  {line}")
    done.write_text("\n".join(report) + "\n")
    return root / "tree"


def configure(src: Path, out: Path, log: Path, flavour: str = UPSTREAM) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    _make(src, out, "x86_64_defconfig", log=log)
    _make(src, out, "kvm_guest.config", log=log)
    merge = src / "scripts" / "kconfig" / "merge_config.sh"
    cmd = ["bash", str(merge), "-m", "-O", str(out), str(out / ".config"),
           *(str(CONFIG_DIR / f) for f in FLAVOUR_FRAGMENTS[flavour])]
    with open(log, "a") as fh:
        rc = subprocess.call(cmd, cwd=src, stdout=fh, stderr=subprocess.STDOUT)
    if rc != 0:
        raise KernelBuildError(f"merge_config.sh failed ({rc}); see {log}")
    _make(src, out, "olddefconfig", log=log)
    problems = check_config((out / ".config").read_text(), flavour)
    if problems:
        hint = ""
        if flavour == VFIO_LU and any("LIVEUPDATE" in p for p in problems):
            hint = ("\n(the source lacks the device-preservation series, or a dependency such as "
                    "!CARDBUS is unmet: check the patches and the fragment)")
        raise KernelBuildError("the kernel configuration lacks what the tests need:\n  "
                               + "\n  ".join(problems) + hint)
    return out / ".config"


def _kernelrelease(src: Path, out: Path) -> str:
    proc = subprocess.run(["make", "-s", "-C", str(src), f"O={out}", "kernelrelease"],
                          capture_output=True, text=True, check=False)
    return proc.stdout.strip().splitlines()[-1] if proc.returncode == 0 and proc.stdout.strip() else ""


def _image_from(entry: Path) -> KernelImage:
    info = json.loads((entry / "build-info.json").read_text())
    return KernelImage(entry / "bzImage", entry / "config", info["version"], None,
                       info.get("flavour", UPSTREAM), info.get("release", ""))


def find_cached(flavour: str = UPSTREAM) -> KernelImage | None:
    """The newest finished image of ``flavour`` built with today's fragments and recipe, or None.

    For ``vfio-lu`` any patch set counts: the image is found again without its patches."""
    cache = cache_root()
    frag = fragment_hash(flavour)
    found = []
    for info_path in (cache / "kernel").glob("*/build-info.json"):
        entry = info_path.parent
        try:
            info = json.loads(info_path.read_text())
        except (OSError, ValueError):
            continue
        if (entry / "bzImage").exists() and info.get("flavour", UPSTREAM) == flavour \
                and info.get("fragments") == frag:
            found.append((info_path.stat().st_mtime, entry))
    return _image_from(max(found)[1]) if found else None


def build(refresh: bool = False, jobs: int | None = None, *, flavour: str = UPSTREAM,
          patches: Path | None = None, tree: Path | None = None) -> KernelImage:
    """Return the cached test kernel of ``flavour``, building it first when there is none.

    ``vfio-lu`` needs ``patches`` (a directory, applied in file-name order onto Debian's
    source) and/or ``tree`` (a kernel tree, patches applied on top of it if both are given);
    without either it uses a cached vfio-lu image or says how to get one.
    """
    if flavour not in FLAVOURS:
        raise KernelBuildError(f"unknown kernel flavour {flavour!r} (choose from {', '.join(FLAVOURS)})")
    if flavour == UPSTREAM and (patches or tree):
        raise KernelBuildError("patches and trees are for the vfio-lu flavour; the upstream one is Debian's source as is")
    if flavour == VFIO_LU and patches is None and tree is None:
        patches = Path(os.environ[PATCHES_ENV]) if os.environ.get(PATCHES_ENV) else None
        tree = Path(os.environ[TREE_ENV]) if os.environ.get(TREE_ENV) else None
        if patches is None and tree is None:
            cached = find_cached(VFIO_LU)
            if cached is not None:
                return cached
            raise KernelBuildError(
                "no device-preservation (vfio-lu) kernel is cached and none can be built without its "
                f"patches: give a directory of the PCI and VFIO live-update patches (--patches DIR or "
                f"${PATCHES_ENV}) or a kernel tree that has them (--tree DIR or ${TREE_ENV})")
    cache = cache_root()
    with locked(cache / "kernel.lock"):
        key_suffix = input_key(flavour, patches, tree)
        tag = "" if flavour == UPSTREAM else f"{flavour}-"
        # Reuse any finished image for this key without asking the archive.
        if not refresh:
            for done in sorted((cache / "kernel").glob(f"*-{tag}{key_suffix}/bzImage")):
                return _image_from(done.parent)
        # the base: a given tree, else Debian's source; patches (if any) go on top of either
        src, version = (tree.resolve(), "tree") if tree is not None else _source_tree(cache, refresh=True)
        entry = cache / "kernel" / f"{version}-{tag}{key_suffix}"
        if (entry / "bzImage").exists():
            return _image_from(entry)
        entry.mkdir(parents=True, exist_ok=True)
        log = entry / "build.log"
        log.write_text("")
        t0 = time.monotonic()
        if patches is not None:
            src = _patched_tree(cache, src, key_suffix, patches, log)
        # the object tree is kept: a changed fragment rebuilds incrementally
        out = cache / "build" / (version if flavour == UPSTREAM else f"{version}-{flavour}-{key_suffix}")
        _log(f"configuring {flavour} kernel from {src} in {out}")
        configure(src, out, log, flavour)
        _log(f"compiling bzImage with {jobs or os.cpu_count()} jobs (log: {log})")
        stop = threading.Event()
        ticker = threading.Thread(target=_progress, args=(log, stop, t0), daemon=True)
        ticker.start()
        try:
            _make(src, out, "bzImage", log=log, jobs=jobs)
        finally:
            stop.set()
        seconds = time.monotonic() - t0
        release = _kernelrelease(src, out)
        shutil.copy2(out / ".config", entry / "config")
        tmp = entry / "bzImage.tmp"
        shutil.copy2(out / "arch" / "x86" / "boot" / "bzImage", tmp)
        info = {"package": PACKAGE, "version": version, "flavour": flavour,
                "fragments": fragment_hash(flavour), "key": key_suffix, "release": release,
                "build_seconds": round(seconds, 1), "jobs": jobs or os.cpu_count()}
        if patches is not None:
            info["patches"] = [p.name for p in patch_files(patches)]
            info["patch_dir"] = str(patches.resolve())
        if tree is not None:
            info["tree"] = _tree_identity(tree)
        (entry / "build-info.json").write_text(json.dumps(info, indent=1) + "\n")
        os.replace(tmp, entry / "bzImage")
        _log(f"built {flavour} kernel {release} in {seconds:.0f} s: {entry / 'bzImage'}")
        return KernelImage(entry / "bzImage", entry / "config", version, seconds, flavour, release)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pyvfio_lu.vm.kernel",
        description="Build (or reuse from the cache) a LUO+VFIO test kernel and print its path. "
                    "The upstream flavour is Debian's linux-source as is; the vfio-lu flavour adds "
                    "VFIO device preservation from a patch series you provide.",
        epilog="examples:\n"
               "  python -m pyvfio_lu.vm.kernel                      # upstream kernel\n"
               "  python -m pyvfio_lu.vm.kernel --flavour vfio-lu --patches ~/vfio-lu-patches\n"
               "  python -m pyvfio_lu.vm.kernel --flavour vfio-lu --tree ~/src/linux-vfio-lu\n"
               "  python -m pyvfio_lu.vm.kernel --flavour vfio-lu --cached   # path, or exit 3\n"
               f"Environment: {PATCHES_ENV}, {TREE_ENV}, PYVFIO_LU_CACHE.",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--flavour", choices=FLAVOURS, default=UPSTREAM,
                        help="upstream (default) or vfio-lu (device preservation; needs --patches or --tree once)")
    parser.add_argument("--patches", type=Path, metavar="DIR",
                        help="directory of patches (*.patch, *.diff, *.mbox) applied in file-name order with "
                             "patch -p1 --fuzz=3 onto Debian's source (implies --flavour vfio-lu)")
    parser.add_argument("--tree", type=Path, metavar="DIR",
                        help="a kernel source tree to build instead of Debian's (implies --flavour vfio-lu)")
    parser.add_argument("--cached", action="store_true",
                        help="only look in the cache: print the image or exit 3 when there is none")
    parser.add_argument("--refresh", action="store_true",
                        help="ask the archive for a newer source package even when an image is cached")
    parser.add_argument("-j", "--jobs", type=int, default=None, help="parallel make jobs (default: all cores)")
    parser.add_argument("--json", action="store_true", help="print the image's build information as JSON")
    args = parser.parse_args(argv)
    flavour = VFIO_LU if (args.patches or args.tree) else args.flavour
    try:
        if args.cached:
            image = find_cached(flavour)
            if image is None:
                print(f"no {flavour} kernel in the cache ({cache_root() / 'kernel'})", file=sys.stderr)
                return 3
        else:
            image = build(refresh=args.refresh, jobs=args.jobs, flavour=flavour,
                          patches=args.patches, tree=args.tree)
    except (KernelBuildError, debian.DebianFetchError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps({"bzimage": str(image.bzimage), "flavour": image.flavour, "release": image.release,
                          "version": image.version, "config": str(image.config)}))
    else:
        print(image.bzimage)
    return 0


if __name__ == "__main__":
    sys.exit(main())
