"""The ledger's pure parts: the blob format (slots, generations, a torn write), the per-boot
index (incoming, finished, a dead holder's outgoing mirror), and adoption with a stand-in for
/dev/liveupdate. The real thing crosses a kexec in the guest tests."""

from __future__ import annotations

import json
import os

import pytest

from pyvfio_lu import ledger
from pyvfio_lu.errors import NoSuchSession, NoSuchToken


def test_slot_round_trip_and_rejections():
    slot = ledger.encode_slot(3, b'{"a":1}', 128)
    assert len(slot) < 128 and ledger.decode_slot(slot.ljust(128, b"\0")) == (3, b'{"a":1}')
    with pytest.raises(ledger.LedgerError, match="do not fit"):
        ledger.encode_slot(1, b"x" * 200, 64)
    with pytest.raises(ledger.LedgerError, match="magic"):
        ledger.decode_slot(b"\0" * 64)
    with pytest.raises(ledger.LedgerError, match="shorter"):
        ledger.decode_slot(b"PV")
    torn = bytearray(slot)
    torn[-1] ^= 0xFF
    with pytest.raises(ledger.LedgerError, match="checksum"):
        ledger.decode_slot(bytes(torn))
    long = bytearray(slot)
    long[16:24] = (10**6).to_bytes(8, "little")
    with pytest.raises(ledger.LedgerError, match="runs past"):
        ledger.decode_slot(bytes(long))


def _blob(slots: list[tuple[int, dict] | None], size: int = 256) -> bytes:
    out = b""
    for entry in slots:
        out += (ledger.encode_slot(entry[0], json.dumps(entry[1]).encode(), size) if entry else b"").ljust(size, b"\0")
    return out


def test_newest_generation_wins_and_a_torn_slot_is_skipped():
    a = _blob([(1, {"v": "one"}), (2, {"v": "two"})])
    b = _blob([(5, {"v": "five"}), None], 512)
    assert ledger.newest([a]) == {"v": "two"}
    assert ledger.newest([a, b]) == {"v": "five"}  # a grown ledger: the newer memfd
    torn = bytearray(a)
    torn[256 + 40] ^= 1  # the newest slot was being written at the kexec
    assert ledger.newest([bytes(torn)]) == {"v": "one"}
    assert ledger.newest([b"\0" * 512, b""]) is None
    assert ledger.newest([_blob([(1, [1, 2]), None])]) is None  # not an object


class FakeSession:
    def __init__(self, name: str, blobs: list[bytes], tmp):
        self.name, self.blobs, self.tmp, self.finished = name, blobs, tmp, False

    def retrieve(self, token: int):
        from pyvfio_lu.fd import OwnedFd

        if token > len(self.blobs):
            raise NoSuchToken(2, "retrieve", self.name)
        path = self.tmp / f"{self.name}.{token}"
        path.write_bytes(self.blobs[token - 1])
        return OwnedFd(os.open(path, os.O_RDONLY | os.O_CLOEXEC), str(path))

    def finish(self):
        self.finished = True

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        pass


class FakeLu:
    def __init__(self, sessions):
        self.sessions, self.asked = sessions, []

    def retrieve_session(self, name):
        self.asked.append(name)
        if name not in self.sessions:
            raise NoSuchSession(2, "retrieve", name)
        return self.sessions[name]


def _run_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("PYVFIO_LU_RUN_DIR", str(tmp_path / "run"))
    monkeypatch.setattr(ledger, "_adopted_here", None)


def test_adopt_merges_ledgers_finishes_them_and_runs_once_per_boot(tmp_path, monkeypatch):
    _run_dir(tmp_path, monkeypatch)
    doc0 = ledger.session_document({"vm-1": {"files": {"0x2": {"kind": "vfio-device", "bdf": "0000:00:09.0"}}}},
                                   {"pid": 1, "kind": "holder"})
    doc2 = ledger.session_document({"vm-2": {"files": {"0x1": {"kind": "memfd", "name": "r", "size": 4096}}}},
                                   {"pid": 2, "kind": "daemonize_and_hold"})
    s0 = FakeSession("pyvfio-lu.ledger.0", [_blob([(1, doc0), None], 4096)], tmp_path)
    s2 = FakeSession("pyvfio-lu.ledger.2", [_blob([(7, doc2), None], 4096)], tmp_path)  # ledger 1's holder died
    lu = FakeLu({s0.name: s0, s2.name: s2})
    assert not ledger.adopted()
    got = ledger.adopt(lu)
    assert set(got) == {"vm-1", "vm-2"} and s0.finished and s2.finished
    assert got["vm-1"]["ledger"] == "pyvfio-lu.ledger.0" and got["vm-2"]["holder"]["kind"] == "daemonize_and_hold"
    assert ledger.adopted() and ledger.find_device("0000:00:09.0") == ("vm-1", 2)
    asked = len(lu.asked)
    assert ledger.adopt(lu) == got and len(lu.asked) == asked  # once per boot
    ledger.mark_finished("vm-1")
    assert set(ledger.incoming()) == {"vm-2"} and ledger.find_device("0000:00:09.0") is None


def test_a_cold_boot_adopts_nothing_quickly(tmp_path, monkeypatch):
    _run_dir(tmp_path, monkeypatch)
    lu = FakeLu({})
    assert ledger.adopt(lu) == {} and len(lu.asked) == 4 and ledger.incoming() == {}


def test_outgoing_mirror_hides_a_dead_holder(tmp_path, monkeypatch):
    _run_dir(tmp_path, monkeypatch)
    live = ledger.session_document({"a": {"files": {}}}, {"pid": os.getpid(), "kind": "holder"})
    dead = ledger.session_document({"b": {"files": {}}}, {"pid": 2**22 + 12345, "kind": "holder"})
    ledger.mirror_outgoing("pyvfio-lu.ledger.0", live)
    ledger.mirror_outgoing("pyvfio-lu.ledger.1", dead)
    assert set(ledger.outgoing()) == {"a"}


def test_names_that_are_not_utf8_are_keyed_exactly(tmp_path, monkeypatch):
    _run_dir(tmp_path, monkeypatch)
    s = FakeSession("pyvfio-lu.ledger.0", [_blob([(1, ledger.session_document(
        {name: {"files": {}} for name in ("x-\udcff", "x-\udcfe")}, {"pid": 1}))], 4096)], tmp_path)
    ledger.adopt(FakeLu({s.name: s}))
    ledger.mark_finished("x-\udcff")
    assert set(ledger.incoming()) == {"x-\udcfe"}


def test_holder_ledger_document_is_valid_json_built_from_cached_fragments(tmp_path, monkeypatch):
    """The holder builds its ledger from per-session JSON made once; the result must be the
    same document a plain encoding gives, before and after a release."""
    from pyvfio_lu import holder

    _run_dir(tmp_path, monkeypatch)
    written = []

    class Writer:
        name = "pyvfio-lu.ledger.0"

        def write_payload(self, payload):
            written.append(json.loads(payload))

    book = holder._Ledger("/run/x.sock")
    book.writer = Writer()
    manifest = {f"session:vm-{i}": {"session": f"vm-{i}", "direction": "outgoing", "test": "t",
                                    "records": {"0x1": {"kind": "memfd", "name": f"r{i}", "size": i}}}
                for i in range(3)}
    manifest["session:x-\udcff"] = {"session": "x-\udcff", "records": {}}
    manifest["other"] = {"what": "not a session"}
    assert book.update(manifest)
    doc = written[-1]
    assert set(doc["sessions"]) == {"vm-0", "vm-1", "vm-2", "x-\udcff"}
    assert doc["sessions"]["vm-1"] == {"files": {"0x1": {"kind": "memfd", "name": "r1", "size": 1}},
                                       "manifest": {"session": "vm-1", "direction": "outgoing", "test": "t"}}
    assert doc["holder"]["kind"] == "holder" and doc["format"] == ledger.FORMAT
    del manifest["session:vm-0"]
    book.update(manifest)
    assert set(written[-1]["sessions"]) == {"vm-1", "vm-2", "x-\udcff"}
    assert set(ledger.outgoing()) == {"vm-1", "vm-2", "x-\udcff"}  # the mirror: this process is alive
