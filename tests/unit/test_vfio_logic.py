"""Pure logic of the VFIO layer that needs no device: the IOVA allocator, the live-update
readiness checks, the "preserved device" message, capability-chain walking, argument checks."""

from __future__ import annotations

import errno
import os

import pytest

from pyvfio_lu import errors, ledger, preservation
from pyvfio_lu._cffi import ffi, lib
from pyvfio_lu.caps import walk_caps
from pyvfio_lu.iommu import PAGE, DmaBuffer, Iommu, IovaAllocator, IovaRange
from pyvfio_lu.vfio import VfioDevice, _open_error


def test_iova_allocator_aligns_and_respects_limit():
    a = IovaAllocator([IovaRange(0, 0xFEDFFFFF), IovaRange(0xFEF00000, 2**48 - 1)], limit=(1 << 28) - 1)
    first = a.alloc(PAGE)
    assert first == PAGE  # page 0 is never handed out
    big = a.alloc(2 << 20)
    assert big % (2 << 20) == 0 and big + (2 << 20) - 1 <= (1 << 28) - 1
    with pytest.raises(errors.PyvfioError) as exc:
        a.alloc(1 << 28)
    assert exc.value.errno == errno.ENOSPC


def test_iova_ranges_sort():
    assert sorted([IovaRange(5, 6), IovaRange(1, 2)])[0] == IovaRange(1, 2)


def test_dma_buffer_rejects_bad_sizes_and_close_while_mapped():
    with pytest.raises(errors.InvalidArgument):
        DmaBuffer(100)
    buf = DmaBuffer(PAGE)
    buf.write(b"abc")
    assert buf.read(0, 3) == b"abc" and buf.address % PAGE == 0
    buf.mapped_by.add(1)
    with pytest.raises(errors.UnsafeOperation):
        buf.close()
    buf.mapped_by.clear()
    buf.close()
    buf.close()  # idempotent


def test_unknown_iommu_mode():
    with pytest.raises(errors.InvalidArgument, match="unknown IOMMU mode"):
        Iommu("vfio_type2")


def _fake_device(monkeypatch, *, cdev=True, bound=True, irqs=None, kernel_says=()) -> VfioDevice:
    """A VfioDevice around a pipe: the kernel-side checks are replaced by ``kernel_says``."""
    r, w = os.pipe()
    os.close(w)
    dev = VfioDevice(r, iommu=None, bdf="0000:00:04.0", cdev=cdev, bound=bound)
    dev._irqs_enabled = dict(irqs or {})
    monkeypatch.setattr(preservation, "why_not", lambda fd, bdf=None, link=None, bound=None: list(kernel_says))
    return dev


def test_live_update_readiness_names_every_unmet_condition(monkeypatch):
    dev = _fake_device(monkeypatch, kernel_says=["IRQs are enabled (msi: 1 in /proc/interrupts)",
                                                 "the device is in D3hot, not D0"])
    with pytest.raises(errors.NotLiveUpdateReady) as exc:
        dev.check_live_update_ready()
    msg = str(exc.value)
    assert "IRQs are enabled" in msg and "D3hot" in msg and "0000:00:04.0" in msg
    dev.close()
    dev = _fake_device(monkeypatch, irqs={1: 1})  # IRQs this object enabled count too
    with pytest.raises(errors.NotLiveUpdateReady, match="IRQs are enabled through this object"):
        dev.check_live_update_ready()
    dev.close()
    dev = _fake_device(monkeypatch, kernel_says=["this kernel cannot preserve VFIO devices (x)"])
    with pytest.raises(errors.VfioPreservationUnsupported, match="cannot preserve"):
        dev.check_live_update_ready()
    dev.close()
    dev = _fake_device(monkeypatch)
    dev.check_live_update_ready()  # all conditions met: no error
    dev.close()


def test_preserve_checks_before_touching_the_session(monkeypatch):
    class Session:
        name = "s"
        calls = 0

        def preserve(self, *a):
            self.calls += 1

    dev = _fake_device(monkeypatch, kernel_says=["the device is in D3cold, not D0"])
    s = Session()
    with pytest.raises(errors.NotLiveUpdateReady):
        dev.preserve(s, 1)
    assert s.calls == 0
    dev.close()


def test_fd_origin_and_irq_lines(tmp_path):
    assert preservation.fd_origin("/dev/vfio/devices/vfio0") == "cdev"
    assert preservation.fd_origin("anon_inode:[vfio-device]") == "group"
    assert preservation.fd_origin("anon_inode:[vfio-device-liveupdate]") == "retrieved"
    assert preservation.fd_origin("pipe:[1]") == "other"
    irqs = tmp_path / "interrupts"
    irqs.write_text(
        "           CPU0\n"
        " 24:          0  PCI-MSI-0000:00:04.0   0-edge      vfio-msi[0](0000:00:04.0)\n"
        " 25:          3  PCI-MSIX-0000:00:08.0  0-edge      vfio-msix[0](0000:00:08.0)\n"
        " 26:          3  PCI-MSIX-0000:00:08.0  1-edge      vfio-msix[1](0000:00:08.0)\n"
        " 11:          1  IO-APIC  11-fasteoi   vfio-intx(0000:00:05.0)\n")
    assert preservation.irqs_enabled("0000:00:04.0", str(irqs)) == {"msi": 1}
    assert preservation.irqs_enabled("0000:00:08.0", str(irqs)) == {"msix": 2}
    assert preservation.irqs_enabled("0000:00:05.0", str(irqs)) == {"intx": 1}
    assert preservation.irqs_enabled("0000:00:06.0", str(irqs)) == {}
    assert preservation.irqs_enabled("0000:00:04.0", str(tmp_path / "none")) == {}


def test_kernel_support_from_config_or_kallsyms(tmp_path):
    import gzip

    proc, boot = tmp_path / "proc", tmp_path / "boot"
    proc.mkdir(), boot.mkdir()
    assert preservation.device_preservation(str(proc), str(boot)).supported is None
    (proc / "kallsyms").write_text("ffff T vfio_pci_core_init\nffff t vfio_pci_liveupdate_freeze\n")
    got = preservation.device_preservation(str(proc), str(boot))
    assert got.supported is True and "kallsyms" in got.source
    with gzip.open(proc / "config.gz", "wt") as fh:
        fh.write("CONFIG_VFIO_PCI=y\n# CONFIG_VFIO_PCI_LIVEUPDATE is not set\n")
    got = preservation.device_preservation(str(proc), str(boot))  # the configuration wins
    assert got.supported is False and "is not set" in got.detail
    with gzip.open(proc / "config.gz", "wt") as fh:
        fh.write("CONFIG_VFIO_PCI=y\nCONFIG_VFIO_PCI_LIVEUPDATE=y\n")
    assert preservation.device_preservation(str(proc), str(boot)).supported is True
    (proc / "config.gz").write_bytes(b"not gzip")
    (boot / f"config-{os.uname().release}").write_text("CONFIG_VFIO_PCI=y\n")
    got = preservation.device_preservation(str(proc), str(boot))
    assert got.supported is False and str(boot) in got.source


def _index(tmp_path, monkeypatch, sessions):
    monkeypatch.setenv("PYVFIO_LU_RUN_DIR", str(tmp_path))
    monkeypatch.setattr(ledger, "_adopted_here", None)
    os.makedirs(os.path.join(ledger.run_dir(), "finished"), exist_ok=True)
    with open(os.path.join(ledger.run_dir(), "incoming.json"), "w") as fh:
        import json

        json.dump({"sessions": sessions}, fh)


def test_preserved_device_open_error_names_the_session(tmp_path, monkeypatch):
    _index(tmp_path, monkeypatch, {"vm-7": {"files": {"0x2": {"kind": "vfio-device", "bdf": "0000:00:04.0"},
                                                       "0x1": {"kind": "memfd", "name": "ram", "size": 4096}}}})
    exc = _open_error(OSError(errno.EBUSY, "busy"), "open VFIO device", "0000:00:04.0")
    assert isinstance(exc, errors.DevicePreserved) and exc.errno == errno.EBUSY
    assert "session 'vm-7' as token 0x2" in str(exc)
    other = _open_error(OSError(errno.EBUSY, "busy"), "open VFIO device", "0000:00:05.0")
    assert isinstance(other, errors.DevicePreserved) and "its LUO session" in str(other)
    assert isinstance(_open_error(OSError(errno.ENOENT, "x"), "open VFIO device", "p"), errors.NotFound)
    assert isinstance(_open_error(OSError(errno.EIO, "x"), "open VFIO device", "p"), errors.DeviceFrozen)
    ledger.mark_finished("vm-7")  # finished: no longer named
    again = _open_error(OSError(errno.EBUSY, "busy"), "open VFIO device", "0000:00:04.0")
    assert "vm-7" not in str(again)


def _info_with_caps(caps: list[tuple[int, bytes]]):
    base = ffi.sizeof("struct vfio_region_info")
    blob = bytearray(base + sum(8 + len(body) for _, body in caps))
    arg = ffi.from_buffer("struct vfio_region_info *", blob)
    arg.argsz = len(blob)
    off = base
    for i, (cid, body) in enumerate(caps):
        nxt = off + 8 + len(body) if i < len(caps) - 1 else 0
        blob[off:off + 8] = cid.to_bytes(2, "little") + (1).to_bytes(2, "little") + nxt.to_bytes(4, "little")
        blob[off + 8:off + 8 + len(body)] = body
        off += 8 + len(body)
    return arg, blob


def test_walk_caps_follows_the_chain():
    arg, _keep = _info_with_caps([(lib.VFIO_REGION_INFO_CAP_TYPE, (7).to_bytes(4, "little") * 2),
                                  (lib.VFIO_REGION_INFO_CAP_MSIX_MAPPABLE, b"")])
    ids = [cid for cid, _v, _p in walk_caps(arg, ffi.sizeof("struct vfio_region_info"))]
    assert ids == [lib.VFIO_REGION_INFO_CAP_TYPE, lib.VFIO_REGION_INFO_CAP_MSIX_MAPPABLE]


def test_walk_caps_refuses_loops_and_out_of_bounds():
    arg, blob = _info_with_caps([(1, b"")])
    base = ffi.sizeof("struct vfio_region_info")
    blob[base + 4:base + 8] = base.to_bytes(4, "little")  # next points at itself
    with pytest.raises(errors.PyvfioError, match="malformed"):
        list(walk_caps(arg, base))
    with pytest.raises(errors.PyvfioError, match="malformed"):
        list(walk_caps(arg, len(blob) + 64))


def test_missing_iommu_device_nodes_say_what_is_missing(monkeypatch):
    from pyvfio_lu import iommu

    def enoent(path, flags):
        raise FileNotFoundError(errno.ENOENT, "No such file or directory")

    monkeypatch.setattr(iommu.os, "open", enoent)
    with pytest.raises(errors.NotFound, match=r"no iommufd.*CONFIG_IOMMUFD"):
        Iommu("iommufd")
    with pytest.raises(errors.NotFound, match=r"no VFIO container.*CONFIG_VFIO_CONTAINER"):
        Iommu("vfio_type1v2_iommu")
