"""Fuzzing as tests (Hypothesis): every parser and decoder that reads bytes or text it did not
write gets arbitrary input and must either return a well-formed value or raise a named error
(a PyvfioError subclass, or a standard exception the function documents), never anything
else, never hang, never leak an fd.

CI runs the "ci" profile (PYVFIO_LU_FUZZ_EXAMPLES, default 200 examples a property); the long
run is ``HYPOTHESIS_PROFILE=long .venv/bin/python -m pytest tests/unit/test_fuzz.py`` (20,000
examples a property).
"""

from __future__ import annotations

import gzip
import json
import os
import socket

import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from pyvfio_lu import errors, handoff, kexec, ledger, preservation, procfs, status  # noqa: E402
from pyvfio_lu._cffi import ffi  # noqa: E402
from pyvfio_lu.errors import PyvfioError  # noqa: E402
from pyvfio_lu.sysfs import InvalidBdf, parse_bdf  # noqa: E402

settings.register_profile("ci", max_examples=int(os.environ.get("PYVFIO_LU_FUZZ_EXAMPLES", "200")), deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("long", max_examples=20000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

text = st.text(st.characters(codec="utf-8"), max_size=300) | st.text(max_size=40)


# --- VFIO capability chains -----------------------------------------------------------------
def _info(struct: str, blob: bytes):
    base = ffi.sizeof(f"struct {struct}")
    buf = bytearray(base) + bytearray(blob)
    arg = ffi.from_buffer(f"struct {struct} *", buf)
    arg.argsz = len(buf)
    return arg, buf, base


@given(st.binary(max_size=512), st.integers(-8, 600))
def test_region_info_caps(blob, first):
    from pyvfio_lu.vfio import _caps_of, _region_cap

    arg, _keep, _base = _info("vfio_region_info", blob)
    try:
        caps = _caps_of(arg, first, _region_cap)
    except PyvfioError as exc:
        assert exc.errno is not None
        return
    for c in caps:  # whatever was decoded lies inside the buffer
        assert len(c.data.get("areas", ())) * 16 <= len(_keep)


@given(st.binary(max_size=256), st.integers(-8, 300))
def test_device_info_caps(blob, first):
    from pyvfio_lu.vfio import _caps_of, _device_cap

    arg, _keep, _base = _info("vfio_device_info", blob)
    try:
        _caps_of(arg, first, _device_cap)
    except PyvfioError:
        pass


@given(st.binary(max_size=512), st.integers(-8, 600))
def test_iommu_info_caps(blob, first):
    from pyvfio_lu.iommu import _iova_ranges_of

    arg, keep, _base = _info("vfio_iommu_type1_info", blob)
    try:
        ranges = _iova_ranges_of(arg, first)
    except PyvfioError:
        return
    assert len(ranges) * 16 <= len(keep)


@given(st.lists(st.tuples(st.integers(0, 0xFFFF), st.binary(max_size=40)), max_size=6))
def test_well_formed_chains_decode(caps):
    """A chain built the way the kernel builds it always walks to its end."""
    from pyvfio_lu.caps import walk_caps

    body = bytearray()
    base = ffi.sizeof("struct vfio_region_info")
    offsets = []
    for _cid, payload in caps:
        offsets.append(base + len(body))
        body += bytes(8) + payload + bytes((-len(payload)) % 8)
    for i, off in enumerate(offsets):
        nxt = offsets[i + 1] if i + 1 < len(offsets) else 0
        rel = off - base
        body[rel:rel + 8] = caps[i][0].to_bytes(2, "little") + (1).to_bytes(2, "little") + nxt.to_bytes(4, "little")
    arg, _keep, _ = _info("vfio_region_info", bytes(body))
    got = [cid for cid, _v, _p in walk_caps(arg, offsets[0] if offsets else 0)]
    assert got == [c[0] for c in caps]


# --- names, addresses, paths ----------------------------------------------------------------
@given(text)
def test_parse_bdf(value):
    try:
        out = parse_bdf(value)
    except PyvfioError:
        return
    assert parse_bdf(out) == out and len(out) == 12


@given(st.one_of(text, st.binary(max_size=80), st.integers(), st.none()))
def test_encode_name(value):
    from pyvfio_lu.luo import encode_name

    try:
        raw = encode_name(value)
    except errors.InvalidSessionName:
        return
    assert 1 <= len(raw) <= 63 and b"\0" not in raw
    assert encode_name(raw.decode(errors="surrogateescape")) == raw  # the text form is lossless


@given(text)
def test_cdev_path_check(path):
    from pyvfio_lu.vfio import _check_cdev_path

    try:
        _check_cdev_path(path)
    except errors.InvalidArgument:
        return
    assert path.startswith("/dev/vfio/devices/vfio") and ".." not in path and path[len("/dev/vfio/devices/vfio"):].isdigit()


@given(text)
def test_session_link(link):
    name = procfs.session_name_from_link(link)
    assert name is None or link.startswith(procfs.LUO_SESSION_PREFIX)


# --- /proc and sysfs texts -----------------------------------------------------------------
@given(text)
def test_cmdline_and_kstrtobool(cmdline):
    assert status.kho_enabled(cmdline) in (True, False, None)
    assert status.kstrtobool(cmdline) in (True, False, None)


@given(text, st.dictionaries(st.from_regex(r"[a-z][a-z0-9.-]{0,20}", fullmatch=True),  # "__" stands for "." in keys
                              st.from_regex(r"[A-Za-z0-9=,._-]{0,20}", fullmatch=True), max_size=4))
def test_kexec_cmdline_rewrite(cmdline, params):
    out = kexec.cmdline_with(cmdline, **{k.replace(".", "__"): v for k, v in params.items()})
    for k, v in params.items():
        assert f"{k}={v}" in out.split()


@given(text)
def test_kernel_config_text(cfg):
    parsed = preservation.parse_config(cfg)
    assert all(k.startswith("CONFIG_") for k in parsed)


@given(st.binary(max_size=2000))
def test_kernel_config_gz_and_kallsyms(tmp_path_factory, blob):
    d = tmp_path_factory.mktemp("proc")
    (d / "config.gz").write_bytes(gzip.compress(blob) if blob[:1] == b"C" else blob)
    (d / "kallsyms").write_bytes(blob)
    got = preservation.device_preservation(str(d), str(d))
    assert got.supported in (True, False, None) and isinstance(got.detail, str)


@given(st.text(max_size=3000), st.one_of(text, st.from_regex(r"0000:0[0-9]:0[0-9]\.[0-7]", fullmatch=True)))
def test_proc_interrupts(tmp_path_factory, content, bdf):
    d = tmp_path_factory.mktemp("irq")
    (d / "interrupts").write_text(content, errors="surrogateescape")
    try:
        got = preservation.irqs_enabled(bdf, str(d / "interrupts"))
    except InvalidBdf:  # the BDF is checked first: only a PCI address reaches the parser
        return
    assert all(k in ("intx", "msi", "msix") and n > 0 for k, n in got.items())


@given(st.binary(max_size=64))
def test_luo_blob_in_debugfs(tmp_path_factory, blob):
    d = tmp_path_factory.mktemp("kho")
    (d / "LUO").write_bytes(blob)
    n = status.liveupdate_number(str(d / "LUO"), kmsg=str(d / "no-kmsg"))
    assert n is None or 0 <= n < 2**64


# --- the ledger -----------------------------------------------------------------------------
@given(st.lists(st.binary(max_size=600), max_size=4))
def test_ledger_blobs(blobs):
    doc = ledger.newest(blobs)
    assert doc is None or isinstance(doc, dict)


@given(st.binary(max_size=300))
def test_ledger_slot(blob):
    try:
        gen, payload = ledger.decode_slot(blob)
    except ledger.LedgerError:
        return
    assert ledger.encode_slot(gen, payload, len(blob)) == blob[:ledger.HEADER.size + len(payload)]


# --- the hand-off protocol -----------------------------------------------------------------
def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@settings(suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(st.lists(st.binary(max_size=300), min_size=1, max_size=4), st.integers(0, 3), st.booleans())
def test_handoff_messages(datagrams, nfds, close_early):
    before = _fds()
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        for i, d in enumerate(datagrams):
            fds = [os.memfd_create("f", os.MFD_CLOEXEC) for _ in range(nfds)] if i == len(datagrams) - 1 else []
            try:
                socket.send_fds(a, [d], fds)
            finally:
                for fd in fds:
                    os.close(fd)
        if close_early:
            a.close()
        b.settimeout(0.5)
        try:
            msg = handoff.recv_message(b)
        except handoff.HandoffError:
            msg = None
        except TimeoutError:  # a message that never ended: the holder drops such a client
            msg = None
        if msg is not None:
            assert isinstance(msg.header, dict) and all(isinstance(n, str) for n in msg.fds)
            msg.close()
    finally:
        a.close()
        b.close()
    assert _fds() == before  # nothing leaked


@given(st.dictionaries(text, st.recursive(st.none() | st.booleans() | st.integers() | text,
                                           lambda c: st.lists(c, max_size=3) | st.dictionaries(text, c, max_size=3),
                                           max_leaves=20), max_size=5))
def test_handoff_round_trip(manifest):
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        names = list(manifest)[:3]
        fds = [os.memfd_create("f", os.MFD_CLOEXEC) for _ in names]
        try:
            handoff.send_message(a, {"op": "hold", "names": names, "manifest": manifest}, fds)
        finally:
            for fd in fds:
                os.close(fd)
        msg = handoff.recv_message(b)
        try:
            assert list(msg.fds) == names
            assert dict(msg.header.get("manifest", {}).items()) == \
                json.loads(json.dumps({k: v for k, v in manifest.items() if k in names or not names}))
        finally:
            msg.close()
    finally:
        a.close()
        b.close()
