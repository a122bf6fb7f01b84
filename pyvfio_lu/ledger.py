"""What a live update carries, described by the live update itself.

The kernel hands sessions over by name and cannot list them, nor say what a session holds.
So whoever keeps preserved sessions alive until the kexec (the holder daemon,
:func:`~pyvfio_lu.holder.daemonize_and_hold`) also keeps a **ledger**: a LUO session of its
own, ``pyvfio-lu.ledger.<n>``, holding a memfd that describes every session it keeps (each
file's token and kind, device BDFs, memfd names and sizes, the IOVAs a memfd was mapped at).
LUO carries the ledger across the kexec together with the sessions it describes; nothing
depends on a file system the kexec wipes.

After the kexec, the first :class:`~pyvfio_lu.luo.LiveUpdate` opened *adopts* the ledgers
(retrieves, reads and finishes them: they are the library's own sessions) into a per-boot
index under ``/run/pyvfio-lu/<boot id>/`` (``$PYVFIO_LU_RUN_DIR``). :func:`incoming` lists it;
finishing a session through the library marks it finished there, so a later live update
never shows a stale record (the index is keyed by boot id, and each boot's ledgers describe
only that boot's sessions).

Blob layout of a ledger memfd (its size is frozen once preserved, so it is written in place):
two slots of ``slot_size`` bytes, each ``magic[8] generation:u64 length:u64 crc32:u32 pad:u32``
then ``length`` bytes of JSON. A write goes to the slot not holding the newest generation,
so a kexec in the middle of a write leaves the previous generation intact; the reader takes
the valid slot (magic, bounds, CRC) with the highest generation across all the ledger's memfds.
"""

from __future__ import annotations

import errno
import json
import os
import struct
import time
import zlib

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

    from .luo import LiveUpdate, Session

LEDGER_PREFIX = "pyvfio-lu.ledger."
MAX_LEDGERS = 64  # ledger session names tried: pyvfio-lu.ledger.0 .. .63
MAX_CHUNKS = 32  # memfds per ledger (tokens 1..32), each slot twice the previous
MAGIC = b"PVLEDGR1"
HEADER = struct.Struct("<8sQQI4x")
FIRST_SLOT = 64 * 1024
RUN_DIR_ENV = "PYVFIO_LU_RUN_DIR"
DEFAULT_RUN_DIR = "/run/pyvfio-lu"
FORMAT = 1


class LedgerError(ValueError):
    """A ledger blob is malformed (wrong magic, bounds, checksum or JSON)."""


# --- the blob --------------------------------------------------------------------------------
def encode_slot(generation: int, payload: bytes, slot_size: int) -> bytes:
    """One slot: header + payload; LedgerError when it does not fit ``slot_size``."""
    if HEADER.size + len(payload) > slot_size:
        raise LedgerError(f"{len(payload)} bytes do not fit a {slot_size}-byte ledger slot")
    return HEADER.pack(MAGIC, generation, len(payload), zlib.crc32(payload)) + payload


def decode_slot(blob: bytes) -> tuple[int, bytes]:
    """(generation, payload) of a slot; LedgerError if it is not a valid one."""
    if len(blob) < HEADER.size:
        raise LedgerError(f"slot of {len(blob)} bytes is shorter than its {HEADER.size}-byte header")
    magic, generation, length, crc = HEADER.unpack_from(blob)
    if magic != MAGIC:
        raise LedgerError("no ledger magic")
    if length > len(blob) - HEADER.size:
        raise LedgerError(f"payload length {length} runs past the {len(blob)}-byte slot")
    payload = bytes(blob[HEADER.size:HEADER.size + length])
    if zlib.crc32(payload) != crc:
        raise LedgerError("payload checksum mismatch")
    return generation, payload


def newest(blobs: list[bytes]) -> dict[str, Any] | None:
    """The JSON document of the highest valid generation among the slots of ``blobs`` (each
    blob a whole memfd: two equal slots), or None when no slot is valid."""
    best: tuple[int, bytes] | None = None
    for blob in blobs:
        half = len(blob) // 2
        for slot in (blob[:half], blob[half:]) if half else ():
            try:
                gen, payload = decode_slot(slot)
            except LedgerError:
                continue
            if best is None or gen > best[0]:
                best = (gen, payload)
    if best is None:
        return None
    try:
        doc = json.loads(best[1])
    except ValueError:
        return None
    return doc if isinstance(doc, dict) else None


# --- writing (before the kexec) ----------------------------------------------------------
class LedgerWriter:
    """Owns an outgoing ledger session and rewrites its document in place.

    Create with :meth:`create` while ``/dev/liveupdate`` is open (any :class:`LiveUpdate`).
    Keep it (its session fd) until the kexec, like the sessions it describes.
    """

    def __init__(self, session: Session):
        self.session = session
        self.generation = 0
        self._chunks: list[tuple[Any, int]] = []  # (memfd, slot size)

    @classmethod
    def create(cls, lu: LiveUpdate) -> LedgerWriter:
        from .errors import SessionExists

        for n in range(MAX_LEDGERS):
            try:
                session = lu.create_session(f"{LEDGER_PREFIX}{n}")
            except SessionExists:
                continue
            return cls(session)
        from .errors import NoSpace

        raise NoSpace(errno.ENOSPC, "create ledger", f"{LEDGER_PREFIX}*",
                      f"all {MAX_LEDGERS} ledger session names are in use")

    @property
    def name(self) -> str:
        return self.session.name

    def fileno(self) -> int:
        return self.session.fileno()

    def _grow(self, needed: int) -> None:
        from .memfd import Memfd

        slot = self._chunks[-1][1] * 2 if self._chunks else FIRST_SLOT
        while slot < needed:
            slot *= 2
        if len(self._chunks) >= MAX_CHUNKS:
            raise LedgerError(f"ledger {self.name!r} cannot grow past {MAX_CHUNKS} memfds")
        m = Memfd.create(f"{self.name}.{len(self._chunks) + 1}", size=2 * slot)
        try:
            self.session.preserve(m, len(self._chunks) + 1)
        except BaseException:
            m.close()
            raise
        self._chunks.append((m, slot))

    def write(self, doc: dict[str, Any]) -> None:
        """Make ``doc`` the ledger's newest generation."""
        self.write_payload(json.dumps(doc, separators=(",", ":")).encode())

    def write_payload(self, payload: bytes) -> None:
        """Make ``payload`` (a JSON document, already encoded) the ledger's newest generation."""
        needed = HEADER.size + len(payload)
        if not self._chunks or self._chunks[-1][1] < needed:
            self._grow(needed)
        memfd, slot = self._chunks[-1]
        self.generation += 1
        data = encode_slot(self.generation, payload, slot)
        memfd.pwrite_all(data, (self.generation % 2) * slot)

    def close(self) -> None:
        """Close the memfds and the ledger session (un-preserving it: only before giving up)."""
        for m, _ in self._chunks:
            m.close()
        self._chunks = []
        self.session.close()

    def close_memfds(self) -> None:
        """Close this process's memfd fds (LUO keeps its own reference); no more writes."""
        for m, _ in self._chunks:
            m.close()


def session_document(sessions: dict[str, dict[str, Any]], holder: dict[str, Any]) -> dict[str, Any]:
    """The ledger document for ``sessions`` (name -> {"files": {token hex: record}, ...})."""
    return {"format": FORMAT, "boot_id": boot_id(), "written": time.time(), "holder": holder,
            "sessions": sessions}


def read_ledger(session: Session) -> dict[str, Any] | None:
    """The newest document of an incoming ledger session (its memfds retrieved and read)."""
    from .errors import NoSuchToken, PyvfioError

    blobs = []
    for token in range(1, MAX_CHUNKS + 1):
        try:
            fd = session.retrieve(token)
        except NoSuchToken:
            break
        except PyvfioError:
            continue
        with fd:
            size = os.fstat(fd.fileno()).st_size
            blobs.append(os.pread(fd.fileno(), size, 0) if size else b"")
    return newest(blobs)


# --- after the kexec: the per-boot index ---------------------------------------------------
def boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id") as fh:
            return fh.read().strip()
    except OSError:
        return "unknown"


def run_dir() -> str:
    return os.path.join(os.environ.get(RUN_DIR_ENV, DEFAULT_RUN_DIR), boot_id())


def _incoming_path() -> str:
    return os.path.join(run_dir(), "incoming.json")


def _finished_dir() -> str:
    return os.path.join(run_dir(), "finished")


def _key(name: str) -> str:
    return name.encode(errors="surrogateescape").hex()


_adopted_here: dict[str, dict[str, Any]] | None = None  # when the run dir is not writable


def adopted() -> bool:
    """Has this boot's incoming ledger been adopted already (by any process)?"""
    return _adopted_here is not None or os.path.exists(_incoming_path())


def adopt(lu: LiveUpdate) -> dict[str, dict[str, Any]]:
    """Retrieve, read and finish every incoming ledger session; store their union as this
    boot's index (once per boot: later calls read the index). Returns name -> entry."""
    global _adopted_here
    if adopted():
        return _load_index()
    from .errors import NoSuchSession, PyvfioError

    sessions: dict[str, dict[str, Any]] = {}
    ledgers = []
    misses = 0
    for n in range(MAX_LEDGERS):
        try:
            s = lu.retrieve_session(f"{LEDGER_PREFIX}{n}")
        except NoSuchSession:
            misses += 1
            if misses >= 4:  # names are taken lowest-first; a gap means a holder ended early
                break
            continue
        except PyvfioError:
            continue
        misses = 0
        with s:
            doc = read_ledger(s)
            try:
                s.finish()
            except PyvfioError:
                pass
        if doc:
            ledgers.append(s.name)
            for name, entry in (doc.get("sessions") or {}).items():
                if isinstance(entry, dict):
                    sessions[name] = dict(entry, ledger=s.name, previous_boot=doc.get("boot_id"),
                                          holder=doc.get("holder"))
    index = {"format": FORMAT, "boot_id": boot_id(), "adopted": time.time(), "ledgers": ledgers,
             "sessions": sessions}
    try:
        os.makedirs(_finished_dir(), exist_ok=True)
        tmp = _incoming_path() + f".{os.getpid()}.tmp"
        with open(tmp, "w") as fh:
            json.dump(index, fh)
        os.replace(tmp, _incoming_path())
    except OSError:
        _adopted_here = sessions
    return sessions


def _load_index() -> dict[str, dict[str, Any]]:
    if _adopted_here is not None:
        return _adopted_here
    try:
        with open(_incoming_path()) as fh:
            doc = json.load(fh)
        sessions = doc.get("sessions", {})
        return sessions if isinstance(sessions, dict) else {}
    except (OSError, ValueError):
        return {}


def mark_finished(name: str) -> None:
    """Note that incoming session ``name`` was finished (it leaves :func:`incoming`)."""
    if _adopted_here is not None:
        _adopted_here.pop(name, None)
        return
    try:
        fd = os.open(os.path.join(_finished_dir(), _key(name)),
                     os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o644)
        os.close(fd)
    except OSError:
        pass  # no index this boot: nothing to mark


def incoming() -> dict[str, dict[str, Any]]:
    """This boot's incoming sessions the ledgers described and nobody has finished yet:
    name -> {"files": {token hex: record}, "ledger", "holder", ...}. Empty on a cold boot or
    before any :class:`LiveUpdate` was opened (which adopts the ledgers)."""
    sessions = _load_index()
    try:
        finished = set(os.listdir(_finished_dir()))
    except OSError:
        finished = set()
    return {n: e for n, e in sessions.items() if _key(n) not in finished}


def came_in() -> dict[str, dict[str, Any]]:
    """Every session this boot's ledgers describe, finished or not: name -> entry with
    ``"finished": bool``. Empty on a cold boot or before the ledgers were adopted."""
    sessions = _load_index()
    try:
        finished = set(os.listdir(_finished_dir()))
    except OSError:
        finished = set()
    return {n: dict(e, finished=_key(n) in finished) for n, e in sessions.items()}


def find_device(bdf: str, sessions: dict[str, dict[str, Any]] | None = None) -> tuple[str, int] | None:
    """(session name, token) of the preserved VFIO device ``bdf`` among ``sessions``
    (default: :func:`incoming`), or None."""
    for name, entry in (incoming() if sessions is None else sessions).items():
        for token, rec in (entry.get("files") or {}).items():
            if isinstance(rec, dict) and rec.get("kind") == "vfio-device" and rec.get("bdf") == bdf:
                try:
                    return name, int(token, 16)
                except ValueError:
                    continue
    return None


# --- this boot's outgoing ledgers, mirrored for readers in this boot -------------------------
def _outgoing_dir() -> str:
    return os.path.join(run_dir(), "outgoing")


def mirror_outgoing(ledger_name: str, doc: dict[str, Any]) -> None:
    """Write this boot's copy of an outgoing ledger document (for status, devices and open)."""
    mirror_outgoing_payload(ledger_name, json.dumps(doc).encode())


def mirror_outgoing_payload(ledger_name: str, payload: bytes) -> None:
    """:func:`mirror_outgoing` of an already encoded document."""
    try:
        os.makedirs(_outgoing_dir(), exist_ok=True)
        path = os.path.join(_outgoing_dir(), ledger_name + ".json")
        tmp = path + f".{os.getpid()}.tmp"
        with open(tmp, "wb") as fh:
            fh.write(payload)
        os.replace(tmp, path)
    except OSError:
        pass


def outgoing() -> dict[str, dict[str, Any]]:
    """Sessions preserved in this boot and kept by a live holder that keeps a ledger:
    name -> entry (with "holder": {"pid", ...})."""
    out: dict[str, dict[str, Any]] = {}
    try:
        names = sorted(os.listdir(_outgoing_dir()))
    except OSError:
        return out
    for fname in names:
        if not fname.endswith(".json"):
            continue
        try:
            with open(os.path.join(_outgoing_dir(), fname)) as fh:
                doc = json.load(fh)
        except (OSError, ValueError):
            continue
        holder = doc.get("holder") or {}
        pid = holder.get("pid")
        if not isinstance(pid, int) or not os.path.exists(f"/proc/{pid}"):
            continue  # the holder is gone, and with it every session it kept
        for name, entry in (doc.get("sessions") or {}).items():
            if isinstance(entry, dict):
                out[name] = dict(entry, ledger=fname[:-5], holder=holder)
    return out
