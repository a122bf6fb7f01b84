"""The guest's initramfs: busybox plus the ``/init`` script (``init.sh``), as a gzip'd newc cpio.

The archive is written by a small pure-Python cpio writer (no ``cpio`` binary needed) and
cached under ``cache_root()/initramfs/<hash>.cpio.gz``, where the hash covers the init
script, the busybox binary, the applet list and the writer's format version, so changing
any of them builds a new archive.

Run ``python -m pyvfio_lu.vm.initramfs`` to build and print the archive's path.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import stat
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from .cache import cache_root, locked

if TYPE_CHECKING:
    from collections.abc import Iterable

INIT_SCRIPT = Path(__file__).with_name("init.sh")
DEFAULT_BUSYBOX = "/bin/busybox"  # from busybox-static; ``$PYVFIO_LU_BUSYBOX`` overrides
FORMAT_VERSION = "1"  # bump when the archive's layout changes

#: Applets ``init.sh`` runs; each becomes a ``/bin/<name> -> busybox`` symlink.
APPLETS = (
    "sh", "cat", "chroot", "echo", "env", "ip", "ls", "mkdir", "mount", "poweroff",
    "reboot", "sleep", "sync", "umount",
)
#: Empty directories ``init.sh`` mounts onto.
MOUNT_POINTS = ("dev", "proc", "sys", "lower", "rw", "newroot")

NEWC_MAGIC = b"070701"
TRAILER = "TRAILER!!!"


@dataclass(frozen=True)
class CpioEntry:
    """One archive member. ``mode`` carries the file type bits (``stat.S_IFREG | 0o755`` ...)."""

    name: str
    mode: int
    data: bytes = b""  # file contents, or the target of a symlink
    rdev: tuple[int, int] = (0, 0)  # (major, minor) of a device node

    @classmethod
    def directory(cls, name: str, perm: int = 0o755) -> CpioEntry:
        return cls(name, stat.S_IFDIR | perm)

    @classmethod
    def file(cls, name: str, data: bytes, perm: int = 0o644) -> CpioEntry:
        return cls(name, stat.S_IFREG | perm, data)

    @classmethod
    def symlink(cls, name: str, target: str) -> CpioEntry:
        return cls(name, stat.S_IFLNK | 0o777, target.encode())

    @classmethod
    def char_device(cls, name: str, major: int, minor: int, perm: int = 0o600) -> CpioEntry:
        return cls(name, stat.S_IFCHR | perm, b"", (major, minor))


def _pad4(n: int) -> bytes:
    return b"\0" * (-n % 4)


def _newc_member(ino: int, name: str, mode: int, data: bytes, rdev: tuple[int, int]) -> bytes:
    encoded = name.encode() + b"\0"
    fields = (
        ino, mode, 0, 0,  # ino, mode, uid, gid
        2 if stat.S_ISDIR(mode) else 1,  # nlink
        0, len(data),  # mtime (0: reproducible), filesize
        0, 0, rdev[0], rdev[1],  # devmajor, devminor, rdevmajor, rdevminor
        len(encoded), 0,  # namesize (with the NUL), check
    )
    header = NEWC_MAGIC + b"".join(b"%08X" % f for f in fields)
    return header + encoded + _pad4(len(header) + len(encoded)) + data + _pad4(len(data))


def newc_archive(entries: Iterable[CpioEntry]) -> bytes:
    """An uncompressed SVR4 "newc" cpio archive of ``entries``, in order, plus the trailer.

    Owner is root, mtimes are 0, inode numbers are sequential: the same entries always give
    the same bytes. Parents must come before their children (the kernel does not create them).
    """
    out = bytearray()
    ino = 0
    for ino, entry in enumerate(entries, start=1):
        name = entry.name.lstrip("/")
        if not name:
            raise ValueError("a cpio entry needs a name")
        out += _newc_member(ino, name, entry.mode, entry.data, entry.rdev)
    out += _newc_member(ino + 1, TRAILER, 0, b"", (0, 0))
    return bytes(out)


def initramfs_entries(init_script: bytes, busybox: bytes) -> list[CpioEntry]:
    """What the guest's initramfs holds: /init, /bin/busybox and its applets, mount points."""
    entries = [CpioEntry.directory("bin")]
    entries.append(CpioEntry.file("bin/busybox", busybox, 0o755))
    entries += [CpioEntry.symlink(f"bin/{applet}", "busybox") for applet in APPLETS]
    entries += [CpioEntry.directory(d) for d in MOUNT_POINTS]
    # The kernel opens /dev/console for init's stdio before /init runs, so it must exist here.
    entries.append(CpioEntry.char_device("dev/console", 5, 1))
    entries.append(CpioEntry.file("init", init_script, 0o755))
    return entries


def inputs_hash(init_script: bytes, busybox: bytes) -> str:
    """A short hash of everything the archive is made from."""
    h = hashlib.sha256(FORMAT_VERSION.encode())
    for part in (init_script, busybox, " ".join(APPLETS).encode(), " ".join(MOUNT_POINTS).encode()):
        h.update(len(part).to_bytes(8, "little") + part)
    return h.hexdigest()[:16]


def build_initramfs(init_script: Path | None = None, busybox: Path | None = None,
                    cache: Path | None = None) -> Path:
    """Return the cached initramfs for these inputs, writing it first when there is none.

    Defaults: ``init.sh`` next to this module, ``$PYVFIO_LU_BUSYBOX`` or ``/bin/busybox`` (it
    must be statically linked), ``cache_root()``.
    """
    init_script = init_script or INIT_SCRIPT
    busybox = busybox or Path(os.environ.get("PYVFIO_LU_BUSYBOX", DEFAULT_BUSYBOX))
    script_bytes = init_script.read_bytes()
    busybox_bytes = busybox.read_bytes()
    directory = (cache or cache_root()) / "initramfs"
    target = directory / f"{inputs_hash(script_bytes, busybox_bytes)}.cpio.gz"
    if target.exists():
        return target
    with locked(directory / ".lock"):
        if target.exists():
            return target
        archive = newc_archive(initramfs_entries(script_bytes, busybox_bytes))
        tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        try:
            # no file name and mtime 0 in the gzip header: same inputs, same bytes
            with open(tmp, "wb") as raw, gzip.GzipFile(filename="", fileobj=raw, mode="wb", mtime=0) as gz:
                gz.write(archive)
            os.replace(tmp, target)
        finally:
            tmp.unlink(missing_ok=True)
    return target


def main() -> int:
    print(build_initramfs())
    return 0


if __name__ == "__main__":
    sys.exit(main())
