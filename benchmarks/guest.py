"""The measurements, run inside the QEMU guest: each through pyvfio_lu and through bench.c.

    python -m benchmarks.guest --stage 1 --out /shared/bench-stage-1.json [--smoke] [--only ...]
    python -m benchmarks.guest --stage 2 --out /shared/bench-stage-2.json [--smoke] [--only ...]

(started by ``python -m benchmarks`` on the host). Stage 1 (first boot): cold imports; C
build; calibration; ioctl round trips; MMIO; DMA map/unmap; profiles; then the live-update
samples are preserved (sessions ``bench-py-K`` through pyvfio_lu, ``bench-c-K`` by C,
``bench-floor-K`` by plain Python, in rotating order, after untimed warm-up sessions) and
held for the kexec. Stage 2 (after the kexec): every sample is retrieved, verified and
finished, in the same rotating order.

Python loops are written out plainly (``for _ in range(n): dev.info()``): the loop's own
cost is part of the figure, as it is in any caller; ``python_loop`` measures it alone.
"""

from __future__ import annotations

import argparse
import cProfile
import functools
import json
import os
import pstats
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (type checkers treat it as True)

if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any

    from pyvfio_lu.iommu import Iommu, Mapping
    from pyvfio_lu.luo import Session
    from pyvfio_lu.vfio import Bar, VfioDevice

EDU_BDF = os.environ.get("PYVFIO_LU_EDU_BDF", "0000:00:04.0")
IOVA_BASE = 1 << 32  # above the 32-bit MSI window, inside the vIOMMU's 39-bit space
PYTHONPATH_ENV = "PYVFIO_LU_BENCH_PYTHONPATH"  # benchmark another pyvfio_lu tree (speed-up experiments)
ns = time.perf_counter_ns


@dataclass(frozen=True)
class Config:
    ioctl_iters: int = 2000
    mmio_iters: int = 20000
    repeats: int = 7
    alternations: int = 2  # Python block, C block, repeated: the repeats of both are pooled
    dma_big_total: int = 1 << 30
    dma_big_piece: int = 2 << 20
    dma_big_rounds: int = 5
    dma_small_total: int = 16 << 20  # 4 KiB pieces: a fixed 16 MiB subset of the 1 GiB (see RESULTS.md)
    dma_small_piece: int = 4096
    dma_small_rounds: int = 3
    dma_full_total: int = 1 << 30  # 4 KiB pieces through the batch verbs: 262,144 mappings
    dma_full_rounds: int = 1
    lu_files: int = 500
    lu_samples: int = 5
    import_n: int = 7
    blackout_samples: int = 5  # per side: each needs an edu device of its own (11 spare ones)
    blackout_ram: int = 64 << 20
    profile_iters: int = 500
    profile_dma_pieces: int = 1024
    profile_lu_files: int = 200
    rss_sessions: int = 2000
    rss_samples: int = 3


FULL = Config()
SMOKE = Config(ioctl_iters=50, mmio_iters=200, repeats=2, alternations=1,
               dma_big_total=4 << 20, dma_big_rounds=1, dma_small_total=64 << 10, dma_small_rounds=1,
               dma_full_total=1 << 20,
               lu_files=20, lu_samples=1, import_n=1, profile_iters=20, profile_dma_pieces=8,
               blackout_samples=1, blackout_ram=1 << 20,
               profile_lu_files=8, rss_sessions=20, rss_samples=1)


def _setup_path() -> None:
    extra = os.environ.get(PYTHONPATH_ENV)
    if extra and extra not in sys.path:
        sys.path.insert(0, extra)


def _sample(iters: int, times: list[int]) -> dict[str, Any]:
    return {"iters": iters, "ns": times}


def _time(loop: Callable[..., None], n: int, repeats: int, *args: Any) -> dict[str, Any]:
    times = []
    for _ in range(repeats):
        t0 = ns()
        loop(*args, n)
        times.append(ns() - t0)
    return _sample(n, times)


# --- the Python loops -------------------------------------------------------------------------
def _loop_empty(n: int) -> None:
    for _ in range(n):
        pass


def _loop_info(dev: VfioDevice, n: int) -> None:
    for _ in range(n):
        dev.info()


def _loop_info_raw(fd: int, n: int) -> None:
    from pyvfio_lu.ioctl import FdKind, call

    for _ in range(n):
        call(FdKind.VFIO_DEVICE, fd, "VFIO_DEVICE_GET_INFO")


def _loop_ioctl_floor(fd: int, number: int, arg: Any, n: int) -> None:
    from pyvfio_lu._cffi import lib

    ioctl = lib.pvl_ioctl
    for _ in range(n):
        ioctl(fd, number, arg)


def _loop_read32(bar: Bar, n: int) -> None:
    for _ in range(n):
        bar.read32(0)


def _loop_write32(bar: Bar, n: int) -> None:
    for i in range(n):
        bar.write32(4, i)


def _loop_read32_floor(ptr: Any, n: int) -> None:
    from pyvfio_lu._cffi import lib

    read32 = lib.pvl_mmio_read32
    for _ in range(n):
        read32(ptr, 0)


BLOCK = 256  # accesses per block call
BIG_BLOCK = 4096  # a larger block: the per-call cost spread over more accesses


def _loop_read_block(bar: Bar, offsets: Any, out: Any, n: int) -> None:
    for _ in range(n // BLOCK):
        bar.read_block(offsets, out=out)


def _loop_write_block(bar: Bar, offsets: Any, values: Any, n: int) -> None:
    for _ in range(n // BLOCK):
        bar.write_block(offsets, values)


def _loop_block_read(block: Any, n: int) -> None:
    for _ in range(n // len(block)):
        block.read()


def _loop_block_write(block: Any, n: int) -> None:
    for _ in range(n // len(block)):
        block.write()


def _loop_read32_memoryview(view: memoryview, n: int) -> None:
    for _ in range(n):
        view[0]


def _loop_read32_regs(regs: Any, n: int) -> None:
    for _ in range(n):
        regs[0]


def _loop_poll(bar: Bar, want: int, n: int) -> None:
    for _ in range(n):
        bar.poll(0, 0xFFFFFFFF, want, 1.0)


def _loop_get_name(session: Session, n: int) -> None:
    for _ in range(n):
        session.get_name()


def _loop_get_name_raw(fd: int, n: int) -> None:
    from pyvfio_lu.ioctl import FdKind, call

    for _ in range(n):
        call(FdKind.LUO_SESSION, fd, "LIVEUPDATE_SESSION_GET_NAME")


def py_calibration(cfg: Config) -> dict[str, dict[str, Any]]:
    """The cffi floor on an ioctl any machine has (FIONREAD on a pipe): run on the host
    too, it shows how TCG changes the Python/C ratio of one call."""
    import termios

    from pyvfio_lu._cffi import ffi

    r, w = os.pipe()
    try:
        avail = ffi.new("int *")
        return {"calib_fionread": _time(_loop_ioctl_floor, cfg.ioctl_iters, cfg.repeats, r, termios.FIONREAD, avail)}
    finally:
        os.close(r)
        os.close(w)


def calibration(cfg: Config, binary: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(Python, C) samples of the FIONREAD calibration, alternating."""
    from . import cprog

    py: dict[str, Any]
    c: dict[str, Any]
    py, c = {}, {}
    for _ in range(cfg.alternations):
        _pool(py, py_calibration(cfg))
        _pool(c, cprog.run(binary, "pipe-ioctl", cfg.ioctl_iters, cfg.repeats))
    return py, c


# --- ioctl round trips and MMIO -------------------------------------------------------------
def bind_edu() -> str | None:
    """Bind the edu device to vfio-pci; its cdev path."""
    from pyvfio_lu import edu
    from pyvfio_lu.sysfs import PciDevice

    pci = PciDevice(EDU_BDF)
    if (pci.vendor, pci.device) != (edu.VENDOR, edu.DEVICE):
        raise RuntimeError(f"{EDU_BDF} is {pci.vendor:04x}:{pci.device:04x}, not QEMU's edu")
    pci.bind_vfio()
    return pci.vfio_cdev


def py_device(cfg: Config) -> dict[str, dict[str, Any]]:
    from pyvfio_lu import edu
    from pyvfio_lu._cffi import ffi, lib
    from pyvfio_lu.vfio import VfioDevice

    out = {}
    with VfioDevice.open(EDU_BDF, "iommufd") as dev:
        fd, r, n = dev.fileno(), cfg.repeats, cfg.ioctl_iters
        assert dev.info().is_pci
        out["ioctl_get_info"] = _time(_loop_info, n, r, dev)
        out["ioctl_get_info_raw"] = _time(_loop_info_raw, n, r, fd)
        arg = ffi.new("struct vfio_device_info *")
        arg.argsz = ffi.sizeof("struct vfio_device_info")
        out["ioctl_get_info_floor"] = _time(_loop_ioctl_floor, n, r, fd, lib.VFIO_DEVICE_GET_INFO, arg)
        bar = dev.bar(0)
        if bar.read32(edu.REG_ID) != edu.ID:
            raise RuntimeError("edu BAR0 does not read back its id")
        n = cfg.mmio_iters
        out["mmio_read32"] = _time(_loop_read32, n, r, bar)
        out["mmio_write32"] = _time(_loop_write32, n, r, bar)
        out["mmio_read32_floor"] = _time(_loop_read32_floor, n, r, bar._ptr)
        # n // BLOCK block calls of BLOCK accesses each: per-access figures, like C's loop; the
        # lean form, offsets and results in array('Q') prepared once (a VMM's register map)
        from array import array

        n_block = max(BLOCK, n - n % BLOCK)
        out["mmio_read_block"] = _time(_loop_read_block, n_block, r, bar, array("Q", [edu.REG_ID] * BLOCK),
                                       array("Q", bytes(8 * BLOCK)))
        out["mmio_write_block"] = _time(_loop_write_block, n_block, r, bar, array("Q", [edu.REG_LIVENESS] * BLOCK),
                                        array("Q", range(BLOCK)))
        # a RegisterBlock: offsets checked once, each read/write of the block one builtin call
        for size, tag in ((BLOCK, ""), (BIG_BLOCK, f"_{BIG_BLOCK}")):
            n_blk = max(size, n - n % size)
            out[f"mmio_block_read{tag}"] = _time(_loop_block_read, n_blk, r, bar.block([edu.REG_ID] * size))
            wblock = bar.block([edu.REG_LIVENESS] * size)
            wblock.write(list(range(size)))
            out[f"mmio_block_write{tag}"] = _time(_loop_block_write, n_blk, r, wblock)
        # the idiom some Python userspace drivers use: a memoryview cast of the mapped BAR
        # (no exact-width guarantee: CPython happens to load 4 bytes for an "I" item)
        view = memoryview(ffi.buffer(bar._ptr, bar.size)).cast("I")
        out["mmio_read32_memoryview"] = _time(_loop_read32_memoryview, n, r, view)
        # the library's subscript form, taken once as the view is: exact width, no call
        out["mmio_read32_regs"] = _time(_loop_read32_regs, n, r, bar.regs32)
        view.release()
        out["mmio_poll"] = _time(_loop_poll, cfg.ioctl_iters, r, bar, edu.ID)
        out["python_loop"] = _time(_loop_empty, n, r)
    return out


def py_getname(cfg: Config) -> dict[str, dict[str, Any]]:
    from pyvfio_lu._cffi import ffi, lib
    from pyvfio_lu.luo import LiveUpdate

    name = f"bench-getname-py-{os.getpid()}"
    with LiveUpdate() as lu:
        session = lu.create_session(name)
    out = {}
    with session:
        if session.get_name() != name:
            raise RuntimeError("LIVEUPDATE_SESSION_GET_NAME returned another name")
        fd, n, r = session.fileno(), cfg.ioctl_iters, cfg.repeats
        out["ioctl_get_name"] = _time(_loop_get_name, n, r, session)
        out["ioctl_get_name_raw"] = _time(_loop_get_name_raw, n, r, fd)
        arg = ffi.new("struct liveupdate_session_get_name *")
        arg.size = ffi.sizeof("struct liveupdate_session_get_name")
        out["ioctl_get_name_floor"] = _time(_loop_ioctl_floor, n, r, fd, lib.LIVEUPDATE_SESSION_GET_NAME, arg)
    return out


# --- DMA mapping -----------------------------------------------------------------------------
def _map_pieces(iommu: Iommu, base: int, piece: int, count: int) -> list[Mapping]:
    return [iommu.map(base + i * piece, IOVA_BASE + i * piece, size=piece, unsafe_address=True)
            for i in range(count)]


def _unmap_all(iommu: Iommu, maps: list[Mapping]) -> None:
    for m in maps:
        iommu.unmap(m)


def py_dma(total: int, piece: int, rounds: int, single: bool = True, tag: str = "") -> dict[str, dict[str, Any]]:
    """IOMMU_IOAS_MAP of ``total`` bytes of a DmaBuffer in ``piece``-sized pieces, then
    IOMMU_IOAS_UNMAP of each, ``rounds`` times; map and unmap phases timed apart: one
    ``Iommu.map``/``unmap`` per piece (``single``), the plain-Python floor, and the batch
    verbs (``map_many``/``unmap_many``: one call each, the pieces listed beforehand, as a VMM
    keeps its memory layout). Keys end in ``tag`` or the piece size."""
    from pyvfio_lu.iommu import PAGE, DmaBuffer
    from pyvfio_lu.vfio import VfioDevice

    count = total // piece
    map_ns, unmap_ns = [], []
    with VfioDevice.open(EDU_BDF, "iommufd") as dev, DmaBuffer(total) as buf:
        buf.view()[::PAGE] = b"\1" * (total // PAGE)  # fault every page in before timing (C does the same)
        iommu, base = dev.iommu, buf.address
        assert iommu is not None and iommu.ioas_id is not None  # open() made an iommufd one
        key = tag or str(piece)
        out: dict[str, dict[str, Any]] = {}
        if single:
            for _ in range(rounds):
                t0 = ns()
                maps = _map_pieces(iommu, base, piece, count)
                t1 = ns()
                _unmap_all(iommu, maps)
                t2 = ns()
                map_ns.append(t1 - t0)
                unmap_ns.append(t2 - t1)
            if iommu.mappings:
                raise RuntimeError("mappings left after unmapping every piece")
            floor = _dma_floor(iommu.fileno(), iommu.ioas_id, base, piece, count, rounds)
            out.update({f"dma_map_{key}": _sample(count, map_ns), f"dma_unmap_{key}": _sample(count, unmap_ns),
                        f"dma_map_floor_{key}": _sample(count, floor[0]),
                        f"dma_unmap_floor_{key}": _sample(count, floor[1])})
        pieces = [(i * piece, IOVA_BASE + i * piece, piece) for i in range(count)]
        bmap_ns, bunmap_ns = [], []
        for _ in range(rounds):
            t0 = ns()
            maps = iommu.map_many(buf, pieces)
            t1 = ns()
            iommu.unmap_many(maps)
            t2 = ns()
            bmap_ns.append(t1 - t0)
            bunmap_ns.append(t2 - t1)
            del maps
        if iommu.mappings:
            raise RuntimeError("mappings left after unmap_many")
        out.update({f"dma_map_batch_{key}": _sample(count, bmap_ns),
                    f"dma_unmap_batch_{key}": _sample(count, bunmap_ns)})
        # map_run: the same pieces as three array('Q') columns (a VMM's memory layout kept
        # as arrays), one MappingRun out: no Python object per piece
        from array import array

        offsets = array("Q", range(0, count * piece, piece))
        iovas = array("Q", range(IOVA_BASE, IOVA_BASE + count * piece, piece))
        sizes = array("Q", [piece]) * count
        rmap_ns, runmap_ns = [], []
        for _ in range(rounds):
            t0 = ns()
            run = iommu.map_run(buf, offsets, iovas, sizes)
            t1 = ns()
            iommu.unmap_run(run)
            t2 = ns()
            rmap_ns.append(t1 - t0)
            runmap_ns.append(t2 - t1)
        if iommu.runs or iommu.mappings:
            raise RuntimeError("mappings left after unmap_run")
        out.update({f"dma_map_run_{key}": _sample(count, rmap_ns), f"dma_unmap_run_{key}": _sample(count, runmap_ns)})
    return out


def _dma_floor(iommufd: int, ioas: int, base: int, piece: int, count: int, rounds: int) -> tuple[list[int], list[int]]:
    """The same ioctls from the plainest Python: one struct per call, lib.pvl_ioctl, a result test."""
    from pyvfio_lu._cffi import ffi, lib

    ioctl, new = lib.pvl_ioctl, ffi.new
    map_t, unmap_t = ffi.typeof("struct iommu_ioas_map *"), ffi.typeof("struct iommu_ioas_unmap *")
    map_nr, unmap_nr = lib.IOMMU_IOAS_MAP, lib.IOMMU_IOAS_UNMAP
    map_size, unmap_size = ffi.sizeof("struct iommu_ioas_map"), ffi.sizeof("struct iommu_ioas_unmap")
    flags = lib.IOMMU_IOAS_MAP_FIXED_IOVA | lib.IOMMU_IOAS_MAP_READABLE | lib.IOMMU_IOAS_MAP_WRITEABLE
    map_ns, unmap_ns = [], []
    for _ in range(rounds):
        t0 = ns()
        for i in range(count):
            off = i * piece
            if ioctl(iommufd, map_nr, new(map_t, [map_size, flags, ioas, 0, base + off, piece, IOVA_BASE + off])) < 0:
                raise OSError("IOMMU_IOAS_MAP failed")
        t1 = ns()
        for i in range(count):
            if ioctl(iommufd, unmap_nr, new(unmap_t, [unmap_size, ioas, IOVA_BASE + i * piece, piece])) < 0:
                raise OSError("IOMMU_IOAS_UNMAP failed")
        t2 = ns()
        map_ns.append(t1 - t0)
        unmap_ns.append(t2 - t1)
    return map_ns, unmap_ns


# --- live update of N memfds ---------------------------------------------------------------------
def memfd_data(i: int) -> bytes:
    return f"file-data-{i}".encode()


@functools.lru_cache(maxsize=4)
def _expected(files: int) -> tuple[bytes, ...]:
    """What each retrieved memfd must hold (built outside the timed and profiled parts)."""
    return tuple(memfd_data(i).ljust(4096, b"\0") for i in range(files))


def py_lu_preserve(session_name: str, files: int) -> tuple[int, Session]:
    """Create ``session_name`` and preserve ``files`` memfds; (elapsed ns, the session)."""
    from pyvfio_lu.luo import LiveUpdate
    from pyvfio_lu.memfd import Memfd

    t0 = ns()
    with LiveUpdate() as lu:
        session = lu.create_session(session_name)
        for i in range(files):
            with Memfd.create("bench", memfd_data(i), size=4096) as m:
                session.preserve(m, i)
    return ns() - t0, session


def py_lu_retrieve(session_name: str, files: int) -> int:
    """Retrieve ``session_name``, every memfd (verified), finish; elapsed ns."""
    from pyvfio_lu.luo import LiveUpdate
    from pyvfio_lu.memfd import Memfd

    expected = _expected(files)
    t0 = ns()
    with LiveUpdate() as lu:
        session = lu.retrieve_session(session_name)
    with session:
        for i in range(files):
            with Memfd.adopt(session.retrieve(i)) as m:
                m.verify(expected[i])
        session.finish()
    return ns() - t0


def py_lu_preserve_batch(session_name: str, files: int) -> tuple[int, Session]:
    """py_lu_preserve in batches: the memfds made by ``Memfd.create_many``, preserved by
    ``Session.preserve_many`` (one call each)."""
    from pyvfio_lu.luo import LiveUpdate
    from pyvfio_lu.memfd import Memfd

    t0 = ns()
    with LiveUpdate() as lu:
        session = lu.create_session(session_name)
        memfds = Memfd.create_many([memfd_data(i) for i in range(files)], name="bench", size=4096)
        try:
            session.preserve_many([(m, i) for i, m in enumerate(memfds)])
        finally:
            for m in memfds:
                m.close()
    return ns() - t0, session


def py_lu_retrieve_batch(session_name: str, files: int) -> int:
    """py_lu_retrieve in batches: ``Session.retrieve_many``, then ``Memfd.verify_many`` (one call each)."""
    from pyvfio_lu.luo import LiveUpdate
    from pyvfio_lu.memfd import Memfd

    expected = _expected(files)
    t0 = ns()
    with LiveUpdate() as lu:
        session = lu.retrieve_session(session_name)
    with session:
        fds = session.retrieve_many(range(files))
        try:
            Memfd.verify_many(fds, expected)
        finally:
            for fd in fds:
                fd.close()
        session.finish()
    return ns() - t0


def py_lu_preserve_floor(session_name: str, files: int) -> tuple[int, int]:
    """The same syscalls as py_lu_preserve from the plainest Python (os.*, lib.pvl_ioctl):
    the bound for any Python code under these conditions; (elapsed ns, session fd)."""
    from pyvfio_lu._cffi import ffi, lib

    ioctl, new = lib.pvl_ioctl, ffi.new
    pres_t, pres_size = ffi.typeof("struct liveupdate_session_preserve_fd *"), ffi.sizeof(
        "struct liveupdate_session_preserve_fd")
    pres_nr, flags = lib.LIVEUPDATE_SESSION_PRESERVE_FD, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING
    t0 = ns()
    luo = os.open("/dev/liveupdate", os.O_RDWR | os.O_CLOEXEC)
    create = new("struct liveupdate_ioctl_create_session *")
    create.size = ffi.sizeof(create[0])
    create.name = session_name.encode()
    if ioctl(luo, lib.LIVEUPDATE_IOCTL_CREATE_SESSION, create) < 0:
        raise OSError("LIVEUPDATE_IOCTL_CREATE_SESSION failed")
    sfd = create.fd
    for i in range(files):
        mfd = os.memfd_create("bench", flags)
        os.ftruncate(mfd, 4096)
        os.pwrite(mfd, memfd_data(i), 0)
        if ioctl(sfd, pres_nr, new(pres_t, [pres_size, mfd, i])) < 0:
            raise OSError("LIVEUPDATE_SESSION_PRESERVE_FD failed")
        os.close(mfd)
    os.close(luo)
    return ns() - t0, sfd


def py_lu_retrieve_floor(session_name: str, files: int) -> int:
    from pyvfio_lu._cffi import ffi, lib

    ioctl, new = lib.pvl_ioctl, ffi.new
    ret_t, ret_size = ffi.typeof("struct liveupdate_session_retrieve_fd *"), ffi.sizeof(
        "struct liveupdate_session_retrieve_fd")
    ret_nr = lib.LIVEUPDATE_SESSION_RETRIEVE_FD
    expected = _expected(files)
    t0 = ns()
    luo = os.open("/dev/liveupdate", os.O_RDWR | os.O_CLOEXEC)
    arg = new("struct liveupdate_ioctl_retrieve_session *")
    arg.size = ffi.sizeof(arg[0])
    arg.name = session_name.encode()
    if ioctl(luo, lib.LIVEUPDATE_IOCTL_RETRIEVE_SESSION, arg) < 0:
        raise OSError("LIVEUPDATE_IOCTL_RETRIEVE_SESSION failed")
    sfd = arg.fd
    for i in range(files):
        r = new(ret_t, [ret_size, 0, i])
        if ioctl(sfd, ret_nr, r) < 0:
            raise OSError("LIVEUPDATE_SESSION_RETRIEVE_FD failed")
        fd = r.fd
        size = os.fstat(fd).st_size
        if os.pread(fd, size, 0) != expected[i]:
            raise RuntimeError(f"memfd {i} of {session_name} does not hold its data")
        os.close(fd)
    fin = new("struct liveupdate_session_finish *")
    fin.size = ffi.sizeof(fin[0])
    if ioctl(sfd, lib.LIVEUPDATE_SESSION_FINISH, fin) < 0:
        raise OSError("LIVEUPDATE_SESSION_FINISH failed")
    os.close(sfd)
    os.close(luo)
    return ns() - t0


def hold(sessions: list[Session | int]) -> int:
    """Keep the outgoing sessions open until the kexec (a detached child); its pid."""
    from pyvfio_lu.holder import daemonize_and_hold

    pid = daemonize_and_hold(*sessions)
    for s in sessions:
        os.close(s if isinstance(s, int) else s.detach())
    return pid


# --- the blackout after the kexec ---------------------------------------------------------------
BLACKOUT_IOVA = 0x100000  # below edu's 28-bit DMA mask
BLACKOUT_SIDES = ("python", "c")


def _blackout_bdfs() -> list[str]:
    from pyvfio_lu.vm.qemu import EDU_BDFS

    return [b for b in sorted(EDU_BDFS.values()) if b != EDU_BDF]


def blackout_prepare(cfg: Config) -> tuple[dict[str, Any], list[Session]]:
    """Stage 1: per sample and side, a session ``blackout-<side>-<k>`` holding guest RAM (a
    memfd, token 1) and, where this kernel preserves devices, an edu device bound to an
    iommufd (token 2), set up as a VMM leaves them for the kexec."""
    from pyvfio_lu.luo import LiveUpdate
    from pyvfio_lu.memfd import Memfd
    from pyvfio_lu.preservation import can_preserve_devices
    from pyvfio_lu.sysfs import PciDevice
    from pyvfio_lu.vfio import VfioDevice

    device = can_preserve_devices()
    bdfs = _blackout_bdfs()
    samples = min(cfg.blackout_samples, len(bdfs) // len(BLACKOUT_SIDES)) if device else cfg.blackout_samples
    plan, sessions = [], []
    with LiveUpdate() as lu:
        for k in range(samples):
            for i, side in enumerate(BLACKOUT_SIDES):
                name = f"blackout-{side}-{k}"
                s = lu.create_session(name)
                with Memfd.create(name, b"guest RAM page".ljust(4096, b"."), size=cfg.blackout_ram) as ram:
                    s.preserve(ram, 1)
                bdf = bdfs[k * len(BLACKOUT_SIDES) + i] if device else None
                if bdf is not None:
                    PciDevice(bdf).bind_vfio()
                    with VfioDevice.open(bdf, "iommufd") as dev:
                        dev.preserve(s, 2)
                plan.append({"side": side, "k": k, "session": name, "bdf": bdf})
                sessions.append(s)
    return {"device": device, "ram": cfg.blackout_ram, "iova": BLACKOUT_IOVA, "plan": plan}, sessions


def _spawn_timed(argv: list[str], env: dict[str, str]) -> tuple[int, int, str]:
    """(ns when the child was started, ns when it had exited, its stdout), CLOCK_MONOTONIC."""
    import subprocess

    t0 = time.clock_gettime_ns(time.CLOCK_MONOTONIC)
    proc = subprocess.run(argv, env=env, capture_output=True, text=True, check=False)
    t1 = time.clock_gettime_ns(time.CLOCK_MONOTONIC)
    if proc.returncode != 0:
        raise RuntimeError(f"{argv[0]} {' '.join(argv[1:3])}: exit {proc.returncode}: {proc.stderr[-2000:]}")
    return t0, t1, proc.stdout


def blackout_run(prep: dict[str, Any], binary: Path) -> dict[str, Any]:
    """Stage 2: each sample's fresh process, Python (``python -S blackout.py``, the package
    and cffi on PYTHONPATH) and C, in alternating order, then the floors (``python -S -c
    pass`` and ``/bin/true``). The devices are bound to vfio-pci first, untimed: after a
    kexec the host does that at boot, before any VMM starts."""
    from pyvfio_lu.sysfs import PciDevice

    from . import imports

    for p in prep["plan"]:
        if p["bdf"]:
            PciDevice(p["bdf"]).bind_vfio()
    env = dict(os.environ, PYTHONPATH=imports.search_path(os.environ.get(PYTHONPATH_ENV)))
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    # untimed: the bytecode caches written, as an installed package has them
    _spawn_timed([sys.executable, "-S", "-c", "import pyvfio_lu.luo, pyvfio_lu.vfio"], env)
    script = str(Path(__file__).resolve().parent / "blackout.py")
    out: dict[str, Any] = {"python": [], "c": [], "python_floor": [], "c_floor": [], "device": prep["device"]}
    plan = sorted(prep["plan"], key=lambda p: (p["k"], p["side"] != BLACKOUT_SIDES[p["k"] % 2]))
    for p in plan:
        args = [p["session"], str(prep["ram"]), hex(prep["iova"])] + ([p["bdf"]] if p["bdf"] else [])
        if p["side"] == "python":
            t0, t1, text = _spawn_timed([sys.executable, "-S", script, *args], env)
        else:
            t0, t1, text = _spawn_timed([str(binary), "blackout", *args[:3]] + (["device"] if p["bdf"] else []), env)
        steps = json.loads(text.strip().splitlines()[-1])
        out[p["side"]].append({"start": t0, "exit": t1, **steps})
    for _ in range(len(prep["plan"]) // len(BLACKOUT_SIDES) or 1):
        t0, t1, _text = _spawn_timed([sys.executable, "-S", "-c", "pass"], env)
        out["python_floor"].append(t1 - t0)
        t0, t1, _text = _spawn_timed(["/bin/true"], env)
        out["c_floor"].append(t1 - t0)
    return out


# --- profiles --------------------------------------------------------------------------------
def _profile(fn: Callable[..., object], *args: Any, iters: int = 1, top: int = 10) -> dict[str, Any]:
    prof = cProfile.Profile()
    prof.enable()
    fn(*args)
    prof.disable()
    st = pstats.Stats(prof)
    rows = []
    # Stats.stats and .total_tt are what pstats itself reads; typeshed does not declare them
    for (path, line, func), (_cc, nc, tt, ct, _callers) in st.stats.items():  # type: ignore[attr-defined]
        short = path
        for marker in ("/pyvfio_lu/", "/benchmarks/", "/lib/python3"):
            if marker in path:
                short = path[path.index(marker) + 1:]
                break
        rows.append({"function": f"{short}:{line}({func})" if line else func, "calls_per_iter": nc / iters,
                     "own_ns_per_iter": tt * 1e9 / iters, "cum_ns_per_iter": ct * 1e9 / iters})
    rows.sort(key=lambda r: -r["own_ns_per_iter"])
    total_tt: float = st.total_tt  # type: ignore[attr-defined]
    return {"iters": iters, "total_ns_per_iter": total_tt * 1e9 / iters, "top": rows[:top]}


def profiles_single_boot(cfg: Config) -> dict[str, dict[str, Any]]:
    """cProfile of each Python loop (cProfile inflates Python-level calls: read the shares)."""
    from pyvfio_lu.iommu import DmaBuffer
    from pyvfio_lu.luo import LiveUpdate
    from pyvfio_lu.vfio import VfioDevice

    out: dict[str, dict[str, Any]]
    out, n = {}, cfg.profile_iters
    with VfioDevice.open(EDU_BDF, "iommufd") as dev:
        out["ioctl_get_info"] = _profile(_loop_info, dev, n, iters=n)
        out["ioctl_get_info_raw"] = _profile(_loop_info_raw, dev.fileno(), n, iters=n)
        bar = dev.bar(0)
        out["mmio_read32"] = _profile(_loop_read32, bar, n * 10, iters=n * 10)
        out["mmio_write32"] = _profile(_loop_write32, bar, n * 10, iters=n * 10)
        pieces = cfg.profile_dma_pieces
        with DmaBuffer(pieces * 4096) as buf:

            def dma() -> None:
                assert dev.iommu is not None  # open() made one
                _unmap_all(dev.iommu, _map_pieces(dev.iommu, buf.address, 4096, pieces))

            out["dma_4096"] = _profile(dma, iters=pieces)
    with LiveUpdate() as lu:
        session = lu.create_session(f"bench-prof-getname-{os.getpid()}")
    with session:
        out["ioctl_get_name"] = _profile(_loop_get_name, session, n, iters=n)
    return out


# --- stages ------------------------------------------------------------------------------------
def _log(msg: str) -> None:
    print(msg, flush=True)


def single_boot(cfg: Config, workdir: Path, log: Callable[[str], None] = _log,
                only: set[str] | None = None) -> dict[str, Any]:
    """Everything that needs no kexec: imports, C build, ioctl, MMIO, DMA, profiles."""
    from . import cprog, imports

    def want(group: str) -> bool:
        return only is None or group in only

    res: dict[str, Any] = {"python": {}, "c": {}, "imports": {}, "profiles": {}, "facts": {}}
    py, c = res["python"], res["c"]
    t_start = time.monotonic()
    if want("import"):
        log(f"bench: import times ({cfg.import_n} fresh processes each)")
        res["imports"] = imports.measure_all(cfg.import_n, pythonpath=os.environ.get(PYTHONPATH_ENV),
                                             pycache_prefix=tempfile.mkdtemp(prefix="pyvfio-lu-bench-pycache-"))
    log("bench: compiling bench.c")
    binary, res["facts"]["c_build"] = cprog.build(workdir / "c")
    if want("ioctl") or want("mmio") or want("dma"):
        cdev = bind_edu()
    res["facts"].update(python=sys.version.split()[0], kernel=os.uname().release,
                        cpu=_cpu_model(), pyvfio_lu=_pyvfio_lu_path())
    if want("ioctl") or want("mmio"):
        for k in range(cfg.alternations):
            log(f"bench: ioctl + MMIO, pass {k + 1}/{cfg.alternations}: Python, then C")
            _pool(py, py_device(cfg))
            _pool(c, cprog.run(binary, "device", cdev, cfg.ioctl_iters, cfg.mmio_iters, cfg.repeats))
    if want("ioctl"):
        log("bench: calibration: FIONREAD on a pipe, cffi floor and C")
        calib_py, calib_c = calibration(cfg, binary)
        _pool(py, calib_py)
        _pool(c, calib_c)
        for k in range(cfg.alternations):
            log(f"bench: LIVEUPDATE_SESSION_GET_NAME, pass {k + 1}/{cfg.alternations}")
            _pool(py, py_getname(cfg))
            _pool(c, cprog.run(binary, "getname", cfg.ioctl_iters, cfg.repeats))
    if want("dma"):
        for total, piece, rounds in ((cfg.dma_big_total, cfg.dma_big_piece, cfg.dma_big_rounds),
                                     (cfg.dma_small_total, cfg.dma_small_piece, cfg.dma_small_rounds)):
            log(f"bench: DMA map/unmap of {total >> 20} MiB in {piece >> 10} KiB pieces, {rounds} rounds: Python")
            _pool(py, py_dma(total, piece, rounds))
            log("bench: ... and C")
            _pool(c, cprog.run(binary, "dma", cdev, total, piece, rounds, IOVA_BASE))
            res["facts"][f"dma_total_{piece}"] = total
        total, piece, rounds = cfg.dma_full_total, 4096, cfg.dma_full_rounds
        log(f"bench: DMA map/unmap of {total >> 20} MiB in 4 KiB pieces ({total // piece} mappings), batch verbs: "
            "Python, then C")
        _pool(py, py_dma(total, piece, rounds, single=False, tag="full"))
        full_c = cprog.run(binary, "dma", cdev, total, piece, rounds, IOVA_BASE)
        _pool(c, {k.replace(f"_{piece}", "_full"): v for k, v in full_c.items()})
        res["facts"]["dma_total_full"] = total
    if want("rss"):
        log(f"bench: peak RSS, {cfg.rss_sessions} sessions of one memfd each, against an empty interpreter")
        res["rss"] = rss(cfg.rss_sessions, cfg.rss_samples)
    if want("profile"):
        log("bench: cProfile of the Python loops")
        res["profiles"] = profiles_single_boot(cfg)
    res["facts"]["seconds"] = round(time.monotonic() - t_start, 2)
    return res


RSS_SCRIPT = """
import resource, sys
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)  # a session fd each: more than 1024
resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
if sys.argv[1] == "sessions":
    from pyvfio_lu.luo import LiveUpdate
    from pyvfio_lu.memfd import Memfd
    n = int(sys.argv[2])
    with LiveUpdate() as lu:
        sessions = []
        for i in range(n):
            s = lu.create_session(f"rss-{i}")
            m = Memfd.create(f"rss-{i}", size=4096)
            s.preserve(m, 1)
            m.close()
            sessions.append(s)
        assert all(s.get_name() == f"rss-{i}" for i, s in enumerate(sessions))
        for s in sessions:
            s.close()
# VmHWM: this address space's peak (ru_maxrss would carry the parent's over fork and exec)
print(next(line.split()[1] for line in open("/proc/self/status") if line.startswith("VmHWM:")))
"""


def rss(sessions: int, samples: int) -> dict[str, Any]:
    """Peak RSS (VmHWM, KiB) of a fresh Python process that creates ``sessions`` LUO
    sessions and preserves a 4 KiB memfd in each (all held at once, as before a kexec),
    and of an empty interpreter running the same script's first and last lines."""
    env = dict(os.environ)
    out: dict[str, Any] = {"sessions": sessions, "empty_kib": [], "sessions_kib": []}
    for _ in range(samples):
        for what, key in (("empty", "empty_kib"), ("sessions", "sessions_kib")):
            got = subprocess.run([sys.executable, "-c", RSS_SCRIPT, what, str(sessions)], env=env, check=False,
                                 capture_output=True, text=True, timeout=900)
            if got.returncode:
                raise RuntimeError(f"the RSS process ({what}) failed: {got.stderr.strip()[-2000:]}")
            out[key].append(int(got.stdout.split()[-1]))
    return out


def _pool(into: dict[str, Any], new: dict[str, Any]) -> None:
    from .stats import merge

    for name, sample in new.items():
        into[name] = merge(into.get(name), sample)


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "?"


def _pyvfio_lu_path() -> str:
    import pyvfio_lu

    return os.path.dirname(pyvfio_lu.__file__)


def _lu_order(k: int) -> tuple[str, ...]:
    """Sample k's order of pyvfio_lu, C and the plain-Python floor: rotated, so no side always goes first."""
    sides = ("python", "c", "floor", "batch")
    return sides[k % 4:] + sides[:k % 4]


def stage1(cfg: Config, out: Path, only: set[str] | None) -> int:
    from . import cprog

    workdir = out.parent / "build"  # /shared/build: stage 2 reuses the binary
    res = single_boot(cfg, workdir, only=only)
    res["lu"] = {"preserve_python": [], "preserve_c": [], "preserve_floor": [], "preserve_batch": [],
                 "files": cfg.lu_files,
                 "samples": cfg.lu_samples}
    sessions: list[Session | int] = []
    if only is None or "blackout" in only:
        print(f"bench: blackout: {cfg.blackout_samples} sessions per side of guest RAM (and a device where the "
              "kernel preserves devices), for fresh processes after the kexec", flush=True)
        res["blackout_prep"], held = blackout_prepare(cfg)
        sessions += held
    if only is None or "lu" in only:
        binary = workdir / "c" / "bench"
        print(f"bench: live update warm-up: sessions bench-warm-py/-c of {cfg.lu_files} memfds (untimed)", flush=True)
        sessions.append(py_lu_preserve("bench-warm-py", cfg.lu_files)[1])
        cprog.run(binary, "lu-preserve", "bench-warm-c", cfg.lu_files)
        for k in range(cfg.lu_samples):
            order = _lu_order(k)
            print(f"bench: live update sample {k + 1}/{cfg.lu_samples}: preserve {cfg.lu_files} memfds "
                  f"({order[0]} first)", flush=True)
            s: Session | int | None
            for side in order:
                if side == "python":
                    elapsed, s = py_lu_preserve(f"bench-py-{k}", cfg.lu_files)
                elif side == "floor":
                    elapsed, s = py_lu_preserve_floor(f"bench-floor-{k}", cfg.lu_files)
                elif side == "batch":
                    elapsed, s = py_lu_preserve_batch(f"bench-batch-{k}", cfg.lu_files)
                else:
                    elapsed, s = cprog.run(binary, "lu-preserve", f"bench-c-{k}", cfg.lu_files)["lu_preserve"]["ns"][0], None
                if s is not None:
                    sessions.append(s)
                res["lu"][f"preserve_{side}"].append(elapsed)
        if only is None or "profile" in only:
            prof: dict[str, Session] = {}

            def preserve() -> None:
                prof["s"] = py_lu_preserve("bench-prof", cfg.profile_lu_files)[1]

            res["profiles"]["lu_preserve"] = _profile(preserve, iters=cfg.profile_lu_files)
            sessions.append(prof["s"])
    if sessions:
        res["lu"]["holder_pid"] = hold(sessions)
    out.write_text(json.dumps(res, indent=1) + "\n")
    print(f"bench: stage 1 results in {out}", flush=True)
    return 0


def stage2(cfg: Config, out: Path, only: set[str] | None) -> int:
    from . import cprog

    binary = out.parent / "build" / "c" / "bench"
    if not binary.exists():
        binary, _facts = cprog.build(Path(tempfile.mkdtemp(prefix="pyvfio-lu-bench-")) / "c")
    res: dict[str, Any] = {"lu": {"retrieve_python": [], "retrieve_c": [], "retrieve_floor": [],
                                  "retrieve_batch": []}, "profiles": {}}
    if only is None or "blackout" in only:
        # first, as after a real live update: the VMM's restart is the first thing that runs
        prep = json.loads((out.parent / "bench-stage-1.json").read_text()).get("blackout_prep")
        if prep:
            print(f"bench: blackout: {len(prep['plan'])} fresh processes (Python and C alternating), then the floors",
                  flush=True)
            res["blackout"] = blackout_run(prep, binary)
    if only is not None and "lu" not in only:
        out.write_text(json.dumps(res, indent=1) + "\n")
        print(f"bench: stage 2 results in {out}", flush=True)
        return 0
    _expected(cfg.lu_files), _expected(cfg.profile_lu_files)
    # The first retrievals after a kexec are several times slower for both sides (cold kernel
    # and page-cache state right after boot): the warm-up sessions absorb that, untimed.
    print("bench: live update warm-up: retrieve bench-warm-py/-c (untimed)", flush=True)
    res["lu"]["warmup_python"] = py_lu_retrieve("bench-warm-py", cfg.lu_files)
    res["lu"]["warmup_c"] = cprog.run(binary, "lu-retrieve", "bench-warm-c", cfg.lu_files)["lu_retrieve"]["ns"][0]
    for k in range(cfg.lu_samples):
        order = _lu_order(k)
        print(f"bench: live update sample {k + 1}/{cfg.lu_samples}: retrieve {cfg.lu_files} memfds and finish "
              f"({order[0]} first)", flush=True)
        for side in order:
            if side == "python":
                elapsed = py_lu_retrieve(f"bench-py-{k}", cfg.lu_files)
            elif side == "floor":
                elapsed = py_lu_retrieve_floor(f"bench-floor-{k}", cfg.lu_files)
            elif side == "batch":
                elapsed = py_lu_retrieve_batch(f"bench-batch-{k}", cfg.lu_files)
            else:
                elapsed = cprog.run(binary, "lu-retrieve", f"bench-c-{k}", cfg.lu_files)["lu_retrieve"]["ns"][0]
            res["lu"][f"retrieve_{side}"].append(elapsed)
    if only is None or "profile" in only:
        res["profiles"]["lu_retrieve"] = _profile(py_lu_retrieve, "bench-prof", cfg.profile_lu_files,
                                                  iters=cfg.profile_lu_files)
    out.write_text(json.dumps(res, indent=1) + "\n")
    print(f"bench: stage 2 results in {out}", flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.guest", description=__doc__.split("\n\n")[0])
    parser.add_argument("--stage", type=int, choices=[1, 2], required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--only", help="comma-separated groups: import,ioctl,mmio,dma,lu,profile")
    args = parser.parse_args(argv)
    _setup_path()
    cfg = SMOKE if args.smoke else FULL
    only = set(args.only.split(",")) if args.only else None
    (args.out.parent / "config.json").write_text(json.dumps(asdict(cfg), indent=1) + "\n")
    return (stage1 if args.stage == 1 else stage2)(cfg, args.out, only)


if __name__ == "__main__":
    sys.exit(main())
