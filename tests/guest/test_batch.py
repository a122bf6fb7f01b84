"""The batch verbs on the real kernel: map/unmap many IOVA ranges (every IOMMU mode), MMIO
block access and register polling on edu, preserve/retrieve many files across the kexec.
Each checks what the single-item verb checks, and that a refusal in the middle names the
element and leaves what came before it done, recorded and consistent with the kernel."""

from __future__ import annotations

import os
from array import array

import pytest

from pyvfio_lu import edu, errors
from pyvfio_lu.iommu import MODES, PAGE, DmaBuffer
from pyvfio_lu.memfd import ContentMismatch, Memfd
from pyvfio_lu.sysfs import PciDevice
from pyvfio_lu.vfio import VfioDevice

EDU_BDF = os.environ.get("PYVFIO_LU_EDU_BDF", "0000:00:04.0")
IOVA = 0x100000  # below edu's 28-bit DMA mask
PIECES = 64


@pytest.fixture(scope="module")
def edu_bdf() -> str:
    pci = PciDevice(EDU_BDF)
    pci.bind_vfio()
    return pci.bdf


@pytest.fixture(params=MODES)
def dev(request, edu_bdf):
    with VfioDevice.open(edu_bdf, request.param) as d:
        yield d


def _pieces(n: int, first_iova: int = IOVA) -> list[tuple[int, int, int]]:
    return [(i * PAGE, first_iova + i * PAGE, PAGE) for i in range(n)]


# --- DMA mapping ------------------------------------------------------------------------------
def test_map_many_pieces_carry_dma_and_unmap_many_forgets_them(dev):
    e = edu.Edu(dev)
    dev.enable_bus_master()
    iommu = dev.iommu
    with DmaBuffer(PIECES * PAGE) as buf:
        made = iommu.map_many(buf, _pieces(PIECES))
        assert [m.iova for m in made] == [IOVA + i * PAGE for i in range(PIECES)]
        assert set(iommu.mappings) == {m.iova for m in made}
        assert made[5].vaddr == buf.address + 5 * PAGE
        pattern = bytes((i * 13 + 1) & 0xFF for i in range(edu.DMA_MAX))
        buf.write(pattern, 3 * PAGE)
        e.dma_to_device(IOVA + 3 * PAGE, edu.DMA_MAX)  # through piece 3
        e.dma_from_device(IOVA + 40 * PAGE, edu.DMA_MAX)  # into piece 40
        assert buf.read(40 * PAGE, edu.DMA_MAX) == pattern
        with pytest.raises(errors.UnsafeOperation):
            buf.close()  # still mapped, in 64 pieces
        assert iommu.unmap_many(made[:10]) == 10 * PAGE
        with pytest.raises(errors.UnsafeOperation):
            buf.close()  # 54 pieces still map it
        assert iommu.unmap_many([(m.iova, m.size) for m in made[10:]]) == (PIECES - 10) * PAGE
        assert iommu.mappings == {} and not buf.mapped_by


def test_map_many_checks_every_piece_before_mapping_any(dev):
    iommu = dev.iommu
    with DmaBuffer(8 * PAGE) as buf:
        bad = _pieces(8)
        bad[5] = (5 * PAGE, IOVA + 5 * PAGE + 1, PAGE)  # IOVA not page-aligned
        with pytest.raises(errors.ArgumentOutOfRange, match="piece 5"):
            iommu.map_many(buf, bad)
        outside = [*_pieces(8), (8 * PAGE, IOVA + 8 * PAGE, PAGE)]  # past the end of the buffer
        with pytest.raises(errors.ArgumentOutOfRange, match="piece 8"):
            iommu.map_many(buf, outside)
        with pytest.raises(errors.BadArgumentType, match="piece 2"):
            iommu.map_many(buf, [(0, IOVA, PAGE), (PAGE, IOVA + PAGE, PAGE), (0, IOVA)])
        assert iommu.mappings == {} and not buf.mapped_by
        # nothing reached the kernel: the whole range maps cleanly now
        made = iommu.map_many(buf, _pieces(8))
        assert len(made) == 8
        assert iommu.unmap_many(made) == 8 * PAGE


def test_map_many_stops_at_the_refused_piece_and_keeps_the_ones_before(dev):
    iommu = dev.iommu
    with DmaBuffer(8 * PAGE) as buf, DmaBuffer(PAGE) as other:
        blocker = iommu.map(other, IOVA + 3 * PAGE)
        with pytest.raises(errors.MappingExists) as info:
            iommu.map_many(buf, _pieces(6))
        assert info.value.index == 3
        assert [m.iova for m in info.value.mappings] == [IOVA, IOVA + PAGE, IOVA + 2 * PAGE]
        assert "piece 3 of 6" in str(info.value)
        assert set(iommu.mappings) == {IOVA, IOVA + PAGE, IOVA + 2 * PAGE, IOVA + 3 * PAGE}
        # the three before it are really mapped: mapping over them is refused by the kernel
        with pytest.raises(errors.MappingExists):
            iommu.map(buf, IOVA + PAGE, size=PAGE)
        assert iommu.unmap_many([*info.value.mappings, blocker]) == 4 * PAGE
        assert iommu.mappings == {}


def test_unmap_many_stops_at_a_range_with_nothing_mapped(dev):
    iommu = dev.iommu
    with DmaBuffer(3 * PAGE) as buf:
        m0, m1, m2 = iommu.map_many(buf, _pieces(3))
        with pytest.raises(errors.NotFound) as info:
            iommu.unmap_many([m0, (IOVA + 100 * PAGE, PAGE), m1])
        assert info.value.index == 1
        assert set(iommu.mappings) == {m1.iova, m2.iova}  # m0 went, m1 was never reached
        assert iommu.unmap(m1) == PAGE  # and the kernel agrees: m1 is still mapped
        assert iommu.unmap_many([m2]) == PAGE
        assert iommu.mappings == {} and not buf.mapped_by


def test_map_run_keeps_pieces_as_arrays_and_unmap_run_frees_them(dev):
    e = edu.Edu(dev)
    dev.enable_bus_master()
    iommu = dev.iommu
    n = PIECES
    offsets = array("Q", range(0, n * PAGE, PAGE))
    iovas = array("Q", range(IOVA, IOVA + n * PAGE, PAGE))
    with DmaBuffer(n * PAGE) as buf:
        run = iommu.map_run(buf, offsets, iovas, array("Q", [PAGE]) * n)
        offsets[0] = 1  # the run copied its arrays: the caller's are theirs again
        assert len(run) == n and iommu.runs == [run] and iommu.mappings == {}
        assert run.iovas[:2] == [IOVA, IOVA + PAGE] and run.size == n * PAGE
        assert run.mappings()[5].vaddr == buf.address + 5 * PAGE
        pattern = bytes((i * 7 + 3) & 0xFF for i in range(edu.DMA_MAX))
        buf.write(pattern, 3 * PAGE)
        e.dma_to_device(IOVA + 3 * PAGE, edu.DMA_MAX)
        e.dma_from_device(IOVA + 40 * PAGE, edu.DMA_MAX)
        assert buf.read(40 * PAGE, edu.DMA_MAX) == pattern
        with pytest.raises(errors.UnsafeOperation):
            buf.close()  # the run keeps it pinned
        with pytest.raises(errors.InvalidArgument, match="mapping run"):
            iommu.unmap(IOVA + 2 * PAGE, PAGE)  # piecemeal: refused, nothing unmapped
        with pytest.raises(errors.InvalidArgument, match="mapping run"):
            iommu.unmap_many([(IOVA - PAGE, 2 * PAGE)])
        assert iommu.unmap_run(run) == n * PAGE
        assert iommu.runs == [] and len(run) == 0 and not buf.mapped_by
        with pytest.raises(errors.InvalidArgument):
            iommu.unmap_run(run)  # once only


def test_map_run_checks_first_and_keeps_what_the_kernel_mapped(dev):
    iommu = dev.iommu
    with DmaBuffer(8 * PAGE) as buf:
        with pytest.raises(errors.InvalidArgument, match="8 offsets, 7 iovas"):
            iommu.map_run(buf, range(0, 8 * PAGE, PAGE), range(IOVA, IOVA + 7 * PAGE, PAGE), [PAGE] * 8)
        with pytest.raises(errors.ArgumentOutOfRange, match="piece 3"):
            iommu.map_run(buf, [0, PAGE, 2 * PAGE, 3 * PAGE], [IOVA, IOVA + PAGE, IOVA + 2 * PAGE, IOVA + 1],
                          [PAGE] * 4)
        with pytest.raises(errors.PyvfioError, match="iovas item 1"):
            iommu.map_run(buf, [0, PAGE], [IOVA, -1], [PAGE, PAGE])
        assert iommu.runs == [] and not buf.mapped_by
        m = iommu.map(buf, IOVA + 5 * PAGE, size=PAGE)  # piece 5 of the run below is taken
        with pytest.raises(errors.PyvfioError) as info:
            iommu.map_run(buf, range(0, 8 * PAGE, PAGE), range(IOVA, IOVA + 8 * PAGE, PAGE), [PAGE] * 8)
        assert info.value.index == 5 and info.value.run is not None and len(info.value.run) == 5
        assert iommu.runs == [info.value.run]
        assert iommu.unmap_run(info.value.run) == 5 * PAGE
        iommu.unmap(m)
        assert iommu.mappings == {} and iommu.runs == [] and not buf.mapped_by
        run = iommu.map_run(buf, [0], [IOVA], [8 * PAGE])
        assert iommu.unmap_all() == 8 * PAGE and iommu.runs == [] and len(run) == 0 and not buf.mapped_by


# --- MMIO -------------------------------------------------------------------------------------
def test_read_block_and_write_block_are_exact_width_accesses(dev):
    bar = dev.bar(0)
    assert bar.read_block([edu.REG_ID] * 300) == [edu.ID] * 300
    bar.write_block([edu.REG_LIVENESS], [0x12345678])
    assert bar.read_block(range(edu.REG_LIVENESS, edu.REG_LIVENESS + 4, 4)) == [0xEDCBA987]
    bar.write_block([edu.REG_DMA_SRC], [0x1122334455667788], width=8)
    assert bar.read_block([edu.REG_DMA_SRC], width=8) == [0x1122334455667788]
    assert bar.read_block([edu.REG_DMA_SRC], width=8) == [bar.read64(edu.REG_DMA_SRC)]
    # edu answers only 4-byte accesses below 0x80: a narrow block read really is narrow
    assert bar.read_block([edu.REG_ID], width=1) != [0xED]
    # the lean path: offsets and results in native uint64 arrays, used in place
    offsets, out = array("Q", [edu.REG_ID, edu.REG_LIVENESS] * 128), array("Q", bytes(8 * 256))
    assert bar.read_block(offsets, out=out) is out
    assert list(out[:2]) == [edu.ID, 0xEDCBA987]
    bar.write_block(array("Q", [edu.REG_LIVENESS]), array("Q", [0x0F0F0F0F]))
    assert bar.read32(edu.REG_LIVENESS) == 0xF0F0F0F0
    with pytest.raises(errors.BadArgumentType):
        bar.read_block(offsets, out=array("Q", bytes(8 * 10)))  # too short: nothing read
    with pytest.raises(errors.ArgumentOutOfRange, match="item 1"):
        bar.write_block(array("Q", [edu.REG_LIVENESS] * 2), array("Q", [1, 1 << 32]))


def test_block_access_checks_every_offset_first(dev):
    bar = dev.bar(0)
    bar.write32(edu.REG_LIVENESS, 0x0F0F0F0F)
    for offsets in ([0, 4, bar.size], [0, 2], [0, -4]):
        with pytest.raises(errors.PyvfioError, match="item"):
            bar.write_block(offsets, [1] * len(offsets))
    with pytest.raises(errors.ArgumentOutOfRange, match="item 1"):
        bar.write_block([edu.REG_LIVENESS, edu.REG_LIVENESS], [1, 1 << 32])
    with pytest.raises(errors.InvalidArgument):
        bar.write_block([edu.REG_LIVENESS], [1, 2])
    assert bar.read32(edu.REG_LIVENESS) == ~0x0F0F0F0F & 0xFFFFFFFF  # nothing was written


def test_poll_waits_in_c_for_the_register_and_times_out_by_name(dev):
    bar = dev.bar(0)
    bar.write32(edu.REG_FACTORIAL, 10)
    status = bar.poll(edu.REG_STATUS, 0x1, 0, timeout=5)  # "computing" bit clear
    assert status & 0x1 == 0
    assert bar.read32(edu.REG_FACTORIAL) == 3628800
    with pytest.raises(errors.RegisterTimeout) as info:
        bar.poll(edu.REG_ID, 0xFFFFFFFF, 0, timeout=0.05)
    assert info.value.last == edu.ID and info.value.reads >= 1


def test_register_block_reads_and_writes_in_one_call_and_checks_first(dev):
    bar = dev.bar(0)
    block = bar.block([edu.REG_ID, edu.REG_LIVENESS, edu.REG_ID])
    bar.write32(edu.REG_LIVENESS, 0x0F0F0F0F)
    values = block.read()
    assert list(values) == [edu.ID, 0xF0F0F0F0, edu.ID] and len(block) == 3
    assert block.read() is values  # the block's own buffer, overwritten by each read
    wide = bar.block([edu.REG_DMA_SRC], width=8)
    wide.write([0x1122334455667788])
    assert bar.read64(edu.REG_DMA_SRC) == 0x1122334455667788 == wide.read()[0]
    live = bar.block([edu.REG_LIVENESS, edu.REG_LIVENESS])
    live.values[0], live.values[1] = 1, 1 << 32  # too wide for 4 bytes: nothing is written
    with pytest.raises(errors.ArgumentOutOfRange, match="item 1"):
        live.write()
    assert bar.read32(edu.REG_LIVENESS) == 0xF0F0F0F0
    with pytest.raises(errors.InvalidArgument, match="2 registers but 1"):
        live.write([5])
    for offsets in ([0, bar.size], [2], [-4]):  # outside, unaligned, negative: refused at creation
        with pytest.raises(errors.PyvfioError):
            bar.block(offsets)
    offsets = array("Q", [edu.REG_ID])
    mine = bar.block(offsets)
    offsets[0] = bar.size * 2  # the block checked and copied its offsets: the caller's array is not used
    assert list(mine.read()) == [edu.ID] and mine.offsets == (edu.REG_ID,)
    bar.close()
    with pytest.raises(errors.InvalidArgument, match="closed"):
        block.read()


def test_accessors_check_in_c_and_kept_after_close_never_touch_the_unmapped_bar(dev):
    bar = dev.bar(0)
    read32, write32 = bar.read32, bar.write32  # the Window's builtin methods
    assert read32(edu.REG_ID) == edu.ID
    for bad in (2, -4, bar.size, 1 << 70, "0", 1.0, True):  # the general path names each one
        with pytest.raises(errors.PyvfioError):
            read32(bad)
    with pytest.raises(errors.PyvfioError):
        write32(edu.REG_LIVENESS, 1 << 32)
    with pytest.raises(errors.PyvfioError):
        bar.poll(2, 1, 1, 0.1)
    with pytest.raises(errors.PyvfioError):
        bar.poll(edu.REG_ID, 1, 1, float("nan"))
    bar.close()
    # the mapping is gone: a kept accessor now takes the general path (pread/pwrite on the
    # device fd), never the unmapped memory
    assert read32(edu.REG_ID) == edu.ID
    write32(edu.REG_LIVENESS, 0x0F0F0F0F)
    assert bar.read32(edu.REG_LIVENESS) == 0xF0F0F0F0


def test_registers_by_subscript_are_the_same_exact_width_accesses(dev):
    bar = dev.bar(0)
    regs32, regs64 = bar.regs32, bar.regs64  # _speedups.Registers over the Window
    assert regs32[edu.REG_ID] == edu.ID == bar.read32(edu.REG_ID)
    regs32[edu.REG_LIVENESS] = 0x12345678  # edu answers the bitwise NOT of the last value written
    assert regs32[edu.REG_LIVENESS] == 0xEDCBA987
    regs64[edu.REG_DMA_SRC] = 0x1122334455667788  # a 64-bit register, one 64-bit store
    assert regs64[edu.REG_DMA_SRC] == 0x1122334455667788
    assert bar.regs16[edu.REG_ID] != edu.ID & 0xFFFF  # edu answers only 4-byte accesses here: really 16 bits
    for bad in (2, -4, bar.size, 1 << 70, "0", 1.0, True):  # the general path names each one
        with pytest.raises(errors.PyvfioError):
            regs32[bad]
        with pytest.raises(errors.PyvfioError):
            regs32[bad] = 1
    for value in (1 << 32, -1, "1", None):
        with pytest.raises(errors.PyvfioError):
            regs32[edu.REG_LIVENESS] = value
    assert regs32[edu.REG_LIVENESS] == 0xEDCBA987  # nothing was stored
    bar.close()
    # kept registers take the general path after close (pread/pwrite on the device fd)
    regs32[edu.REG_LIVENESS] = 0x0F0F0F0F
    assert regs32[edu.REG_LIVENESS] == 0xF0F0F0F0 == bar.regs32[edu.REG_LIVENESS]


def test_lean_map_unmap_and_queries_name_their_failures(dev):
    iommu = dev.iommu
    info = dev.info()
    assert info.num_regions >= 1 and info.is_pci and info.caps == ()
    with DmaBuffer(4 * PAGE) as buf:
        m = iommu.map(buf.address, IOVA, size=2 * PAGE, unsafe_address=True)
        assert iommu.mappings[IOVA] is m and m.vaddr == buf.address
        with pytest.raises(errors.PyvfioError) as refused:  # the same IOVA again
            iommu.map(buf.address + 2 * PAGE, IOVA, size=2 * PAGE, unsafe_address=True)
        assert refused.value.errno in (17, 22)  # EEXIST (iommufd), EEXIST/EINVAL (type1)
        assert list(iommu.mappings) == [IOVA]
        assert iommu.unmap(m) == 2 * PAGE and iommu.mappings == {}
        with pytest.raises(errors.PyvfioError):
            iommu.unmap(m)  # nothing mapped there now
        with pytest.raises(errors.UnsafeOperation):
            iommu.map(buf.address, IOVA, size=PAGE)  # a raw address still needs unsafe_address=True


# --- LUO: many files in one call, across the kexec ---------------------------------------------
class TestPreserveManyRetrieveMany:
    N = 300
    MADE = 1000  # the tokens of the memfds made by create_many (N + 5 stays unused)

    @pytest.mark.before_kexec
    def test_before(self, luo, carry):
        s = luo.create_session("batch-many")
        memfds = [Memfd.create(f"batch-{i}", f"batch-data-{i}".encode()) for i in range(self.N)]
        try:
            # a token used twice in the batch: refused before anything is preserved
            with pytest.raises(errors.TokenInUse, match="item 3"):
                s.preserve_many([(memfds[0], 1), (memfds[1], 2), (memfds[2], 3), (memfds[3], 1)])
            assert s.preserved == {}
            # a refusal in the middle (a pipe cannot be preserved): the ones before it stay
            r, w = os.pipe2(os.O_CLOEXEC)
            try:
                with pytest.raises(errors.NotPreservable) as info:
                    s.preserve_many([(memfds[0], 0), (memfds[1], 1), (r, 2), (memfds[2], 3)])
                assert info.value.index == 2
            finally:
                os.close(r)
                os.close(w)
            assert sorted(s.preserved) == [0, 1]
            s.preserve_many((m, t) for t, m in enumerate(memfds) if t >= 2)
            assert sorted(s.preserved) == list(range(self.N))
            # memfds made in one call are preserved and recorded as those made one by one
            made = Memfd.create_many([f"made-{i}".encode() for i in range(self.N)], name="batch-made",
                                          size=8192)
            try:
                s.preserve_many((m, self.MADE + t) for t, m in enumerate(made))
                rec = dict(made[1].ledger_record(), iovas=[])
                del rec["inode"]
                assert s.records()[f"{self.MADE + 1:#x}"] == rec == {"kind": "memfd", "name": "batch-made", "size": 8192,
                                                                  "iovas": []}
            finally:
                for m in made:
                    m.close()
        finally:
            for m in memfds:
                m.close()
        carry.hold(s)

    @pytest.mark.after_kexec
    def test_after(self, luo):
        with luo.retrieve_session("batch-many") as s:
            with pytest.raises(errors.NoSuchToken) as info:
                s.retrieve_many([0, 1, self.N + 5])
            assert info.value.index == 2
            fds = s.retrieve_many(range(self.N))
            try:
                for t, fd in enumerate(fds):
                    with Memfd.adopt(fd) as m:
                        assert m.read_all() == f"batch-data-{t}".encode()
            finally:
                for fd in fds:
                    fd.close()
            made = s.retrieve_many(range(self.MADE, self.MADE + self.N))  # size and contents carried across
            try:
                expected = [f"made-{i}".encode().ljust(8192, b"\0") for i in range(self.N)]
                Memfd.verify_many(made, expected)
                expected[7] = b"made-7"  # the size is part of the contents compared
                with pytest.raises(ContentMismatch, match=f"file {self.MADE + 7:#x} of session") as info:
                    Memfd.verify_many(made, expected)
                assert info.value.index == 7
            finally:
                for fd in made:
                    fd.close()
            s.finish()
