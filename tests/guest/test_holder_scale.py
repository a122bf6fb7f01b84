"""The holder at the scale of a real host: 5,000 one-memfd sessions and one session of 10,000
memfds handed over in one request, listed, described in the ledger, and carried across the
kexec intact. (LUO's own limits are far above this: 63 files per serialization block and
10,000 blocks per session, about 630,000 files; sessions are bounded by memory.)"""

from __future__ import annotations

import resource

import pytest

from pyvfio_lu import ledger
from pyvfio_lu.holder import Holder
from pyvfio_lu.memfd import Memfd
from pyvfio_lu.pytest_plugin import HOLDER_SOCKET

SESSIONS = 5000
FILES = 10000


def _nofile(n: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < n:
        resource.setrlimit(resource.RLIMIT_NOFILE, (max(n, soft), max(n, hard)))


class TestHolderAtScale:
    @pytest.mark.before_kexec
    def test_before(self, luo, carry):
        _nofile(SESSIONS + 500)
        sessions = []
        try:
            for i in range(SESSIONS):
                s = luo.create_session(f"scale-{i:05d}")
                sessions.append(s)
                with Memfd.create(f"scale-ram-{i}", i.to_bytes(4, "little")) as m:
                    s.preserve(m, 1)
            big = luo.create_session("scale-files")
            sessions.append(big)
            for t in range(1, FILES + 1):
                with Memfd.create(f"f{t}", t.to_bytes(4, "little")) as m:
                    big.preserve(m, t)
            carry.hold(*sessions)  # one request: 5,001 fds, a manifest of about 1.3 MB
        finally:
            for s in sessions:
                s.close()  # a no-op for the ones the holder took
        listed = Holder(HOLDER_SOCKET).list()
        assert all(f"session:scale-{i:05d}" in listed for i in range(SESSIONS))
        assert len(listed["session:scale-files"]["records"]) == FILES
        mirrored = ledger.outgoing()
        assert len(mirrored["scale-files"]["files"]) == FILES and "scale-04999" in mirrored

    @pytest.mark.after_kexec
    def test_after(self, luo, carry):
        _nofile(FILES + 500)
        incoming = ledger.incoming()
        assert all(f"scale-{i:05d}" in incoming for i in range(SESSIONS))
        assert incoming["scale-files"]["files"]["0x2710"] == {"kind": "memfd", "name": "f10000", "size": 4, "iovas": []}
        for i in range(SESSIONS):
            with luo.retrieve_session(f"scale-{i:05d}") as s:
                with Memfd.adopt(s.retrieve(1)) as m:
                    assert m.read_all() == i.to_bytes(4, "little")
                s.finish()
        with luo.retrieve_session("scale-files") as s:
            for t in range(1, FILES + 1):
                with Memfd.adopt(s.retrieve(t)) as m:
                    assert m.read_all() == t.to_bytes(4, "little")
            s.finish()
