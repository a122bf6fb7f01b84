"""The ledger writer on the real kernel (single boot): its session and memfds are real LUO
objects; a document larger than a slot grows the ledger by a preserved memfd, and the
newest generation is what a reader sees. (Adoption after a kexec: test_device_kexec.py,
test_vfio_live_update.py and the two-live-updates scenario.)"""

from __future__ import annotations

import os

from pyvfio_lu import ledger
from pyvfio_lu.luo import LiveUpdate


def _blobs(writer: ledger.LedgerWriter) -> list[bytes]:
    out = []
    for memfd, _slot in writer._chunks:
        size = os.fstat(memfd.fileno()).st_size
        out.append(os.pread(memfd.fileno(), size, 0))
    return out


def test_writer_grows_and_the_newest_generation_wins(luo: LiveUpdate):
    writer = ledger.LedgerWriter.create(luo)
    try:
        assert writer.name.startswith(ledger.LEDGER_PREFIX)
        small = ledger.session_document({"s": {"files": {"0x1": {"kind": "memfd", "name": "r", "size": 1}}}}, {"pid": 1})
        writer.write(small)
        assert len(writer._chunks) == 1 and ledger.newest(_blobs(writer))["sessions"] == small["sessions"]
        big = ledger.session_document({f"s{i}": {"files": {"0x1": {"kind": "memfd", "name": "x" * 40, "size": i}}}
                                       for i in range(3000)}, {"pid": 1})
        writer.write(big)  # about 250 KB: a second, larger memfd is preserved for it
        assert len(writer._chunks) == 2 and writer.session.preserved.keys() == {1, 2}
        assert len(ledger.newest(_blobs(writer))["sessions"]) == 3000
        writer.write(small)
        assert ledger.newest(_blobs(writer))["sessions"] == small["sessions"]
        # a second ledger takes the next free name
        other = ledger.LedgerWriter.create(luo)
        assert other.name != writer.name
        other.close()
    finally:
        writer.close()
