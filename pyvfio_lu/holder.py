"""Keep LUO session fds alive until the kexec.

Closing the last fd of an outgoing session un-preserves everything in it, and process exit
closes fds, so *some* process must hold the session fds at ``reboot(RB_KEXEC)``. Two ways:

- :func:`daemonize_and_hold`: fork a detached child that inherits the fds and sleeps
  forever (what the kernel's LUO selftests do with ``daemonize_and_wait``);
- :class:`Holder`: a small daemon (``python -m pyvfio_lu.holder``) listening on a Unix
  socket; clients hand it named fds (SCM_RIGHTS, peer uid checked) and may fetch them
  back. It survives its clients, so a test run or an operator script can end before the
  kexec while the sessions stay preserved.

(The third way, systemd's fd store, is :mod:`pyvfio_lu.sdnotify`.)
"""

from __future__ import annotations

import argparse
import errno
import os
import signal
import subprocess
import sys
import time

from . import handoff
from .errors import ArgumentOutOfRange, BadArgumentType, PyvfioError, check_text
from .fd import FileLike, OwnedFd, fileno_of

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (type checkers treat it as True)

if TYPE_CHECKING:
    import socket
    from collections.abc import Iterable, Sequence
    from typing import Any, TypeGuard

    from .ledger import LedgerWriter
    from .luo import Session


class HolderError(PyvfioError):
    """The holder daemon could not be started or refused a request."""


def daemonize_and_hold(*files: FileLike) -> int:
    """Fork a detached daemon that keeps ``files`` open and sleeps until killed.

    Returns the daemon's pid. The caller's own copies are untouched: detach and close
    them (``Session.detach()``) once this returns so only the daemon holds the sessions.
    """
    writer = _ledger_for(files)
    keep = sorted({fileno_of(f) for f in files} | ({writer.fileno()} if writer else set()))
    r, w = os.pipe2(os.O_CLOEXEC)
    pid = os.fork()
    if pid == 0:  # first child
        try:
            os.setsid()
            grandchild = os.fork()
            if grandchild:
                os.write(w, str(grandchild).encode())
                os._exit(0)
            devnull = os.open(os.devnull, os.O_RDWR)
            for std in (0, 1, 2):
                os.dup2(devnull, std)
            _close_all_but([*keep, 0, 1, 2])
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            while True:
                signal.pause()
        finally:
            os._exit(0)
    os.close(w)
    os.waitpid(pid, 0)
    with os.fdopen(r, "rb") as fh:
        data = fh.read()
    daemon = int(data) if data else -1
    if writer is not None:
        doc = _ledger_doc(writer, {s.name: {"files": s.records()} for s in files if _has_records(s)},
                          daemon, "daemonize_and_hold")
        from . import ledger

        ledger.mirror_outgoing(writer.name, doc)
        os.close(writer.session.detach())  # the daemon holds the ledger session now
    return daemon


def _own_liveupdate_fd() -> int | None:
    """An fd of this process open on /dev/liveupdate, if any (it is single-open: a library
    call that needs it while the caller holds it borrows the caller's)."""
    try:
        fds = os.listdir("/proc/self/fd")
    except OSError:
        return None
    for name in fds:
        try:
            if os.readlink(f"/proc/self/fd/{name}") == "/dev/liveupdate":
                return int(name)
        except OSError:
            continue
    return None


def open_ledger(borrowed_fd: int | None = None) -> LedgerWriter | None:
    """A new :class:`~pyvfio_lu.ledger.LedgerWriter`, through ``borrowed_fd`` (an open
    /dev/liveupdate), this process's own /dev/liveupdate fd, or a fresh open; None when
    /dev/liveupdate cannot be had (the sessions are held all the same, just not described)."""
    from .ledger import LedgerWriter
    from .luo import LiveUpdate

    fd = borrowed_fd if borrowed_fd is not None else _own_liveupdate_fd()
    try:
        if fd is not None:
            return LedgerWriter.create(LiveUpdate.from_fd(fd, owned=False))
        with LiveUpdate(adopt_ledgers=False) as lu:
            return LedgerWriter.create(lu)
    except (PyvfioError, OSError):
        return None


def _has_records(file: object) -> TypeGuard[Session]:
    """Is ``file`` a session (duck-typed: anything with ``records()``)?"""
    return hasattr(file, "records")


def _ledger_for(files: Iterable[FileLike]) -> LedgerWriter | None:
    """A ledger written with the records of the sessions among ``files`` (None if there are none)."""
    sessions = [f for f in files if _has_records(f) and getattr(f, "direction", "") == "outgoing"]
    if not sessions:
        return None
    writer = open_ledger()
    if writer is None:
        return None
    try:
        writer.write(_ledger_doc(writer, {s.name: {"files": s.records()} for s in sessions},
                                 os.getpid(), "daemonize_and_hold"))
        writer.close_memfds()
    except (PyvfioError, OSError, ValueError):
        writer.close()
        return None
    return writer


def _ledger_doc(writer: LedgerWriter, sessions: dict[str, Any], pid: int, kind: str) -> dict[str, Any]:
    from .ledger import session_document

    return session_document(sessions, {"pid": pid, "kind": kind, "ledger": writer.name})


def raise_nofile_limit(wanted: int = 1 << 16) -> int:
    """Raise RLIMIT_NOFILE towards ``wanted`` (the hard limit too, where privileged); returns the soft limit."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    unlimited = hard == resource.RLIM_INFINITY
    for new_hard in ((hard if unlimited or hard >= wanted else wanted), hard):
        try:
            new_soft = wanted if new_hard == resource.RLIM_INFINITY else min(wanted, new_hard)
            resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, new_soft), new_hard))
            break
        except (ValueError, OSError):
            continue
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def _close_all_but(keep: list[int]) -> None:
    low = 0
    for fd in sorted(set(keep)):
        if low < fd:  # os.closerange(a, b) with b <= a closes *everything* on CPython 3.11
            os.closerange(low, fd)
        low = fd + 1
    os.closerange(low, os.sysconf("SC_OPEN_MAX"))


class Holder:
    """Client of a holder daemon at ``path``."""

    def __init__(self, path: str):
        self.path = check_text(path, "holder socket path", "Holder", path=True, max_len=107)

    @classmethod
    def spawn(cls, path: str, timeout: float = 10.0, request_timeout: float | None = None) -> Holder:
        """Start a detached holder daemon at ``path`` (replacing a stale socket) and wait for it."""
        path = cls(path).path  # checks the path
        for what, value in (("timeout", timeout), ("request_timeout", request_timeout)):
            if value is None and what == "request_timeout":
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 1e9:
                raise ArgumentOutOfRange(errno.EINVAL, "spawn holder", path,
                                         f"{what} must be a positive number of seconds, not {value!r}")
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        # --detach: the process started here forks the daemon and exits, so it is reaped here
        # (no "subprocess is still running" ResourceWarning) and the daemon is nobody's child
        subprocess.run(
            [sys.executable, "-m", "pyvfio_lu.holder", "--socket", path, "--uid", str(os.getuid()), "--detach",
             *(["--request-timeout", str(request_timeout)] if request_timeout is not None else [])],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True, close_fds=True, check=False, timeout=timeout,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if os.path.exists(path):
                try:
                    cls(path).list()
                    return cls(path)
                except OSError:
                    pass
            time.sleep(0.05)
        raise HolderError(errno.ETIMEDOUT, "spawn holder", path, f"no holder answered within {timeout} s")

    def _request(self, header: dict[str, Any], fds: Sequence[int] = ()) -> handoff.Message:
        try:
            sock = handoff.connect(self.path)
        except PyvfioError as exc:
            raise HolderError(exc.errno, f"holder {header.get('op')}", self.path,
                              f"no holder is listening there ({exc.strerror}); start one with Holder.spawn "
                              "or `pyvfio-lu holder`") from None
        with sock:
            handoff.check_peer(sock, os.getuid())
            handoff.send_message(sock, header, fds)
            reply = handoff.recv_message(sock)
        if reply is None:
            raise HolderError(errno.EPIPE, f"holder {header.get('op')}", self.path, "the holder closed the connection")
        if not reply.header.get("ok"):
            reply.close()
            raise HolderError(errno.EINVAL, f"holder {header.get('op')}", self.path,
                              reply.header.get("error", "request refused"))
        return reply

    def hold(self, name: str, file: FileLike, manifest: dict[str, Any] | None = None) -> None:
        """Give the holder its own reference to ``file`` under ``name``."""
        check_text(name, "name", "holder hold", self.path, max_len=1024)
        fileno_of(file)
        _check_manifest(manifest, self.path)
        self._request({"op": "hold", "names": [name], "manifest": {name: manifest or {}}}, [fileno_of(file)])

    def hold_session(self, session: Session, manifest: dict[str, Any] | None = None) -> None:
        """Hand a LUO session to the holder and give up this process's fd for it."""
        self.hold_sessions([session], manifest)

    def hold_sessions(self, sessions: Iterable[Session], manifest: dict[str, Any] | None = None) -> None:
        """Hand many LUO sessions over in one request; this process's fds for them are closed.

        Each is held under ``session:<name>`` with :func:`handoff.session_manifest` as its manifest.
        """
        from .luo import Session

        sessions = list(sessions)
        for s in sessions:
            if not isinstance(s, Session):
                raise BadArgumentType(errno.EINVAL, "holder hold", self.path,
                                      f"hold_session(s) takes LUO Session objects, not {type(s).__name__}")
        _check_manifest(manifest, self.path)
        names = [handoff.session_key(s.name) for s in sessions]
        info = {n: handoff.session_manifest(s, manifest) for n, s in zip(names, sessions)}
        fds = [s.fileno() for s in sessions]
        lu_fd = _own_liveupdate_fd()  # lent to the holder in case it must open its ledger
        header: dict[str, Any] = {"op": "hold", "names": list(names), "manifest": info}
        if lu_fd is not None:
            header["names"].append(LIVEUPDATE_KEY)
            fds.append(lu_fd)
        self._request(header, fds)
        for s in sessions:
            os.close(s.detach())

    def fetch_session(self, name: str) -> Session:
        """A :class:`~pyvfio_lu.luo.Session` for the session held as ``name`` (the holder
        keeps its own fd, so the session stays preserved when this one is closed)."""
        from .luo import Session

        fd = self.fetch(handoff.session_key(name))
        try:
            return Session.from_fd(fd.fileno())
        except BaseException:
            fd.close()
            raise
        finally:
            if not fd.closed:
                fd.detach()

    @property
    def pid(self) -> int:
        """The daemon's pid, as the kernel reports it for the socket (SO_PEERCRED)."""
        with handoff.connect(self.path) as sock:
            return handoff.peer_credentials(sock).pid

    def list(self) -> dict[str, dict[str, Any]]:
        """name -> manifest of everything held."""
        manifest: dict[str, dict[str, Any]] = self._request({"op": "list"}).header.get("manifest", {})
        return manifest

    def fetch(self, name: str) -> OwnedFd:
        """A new fd for what the holder keeps under ``name`` (it keeps its own)."""
        check_text(name, "name", "holder fetch", self.path, max_len=1024)
        reply = self._request({"op": "fetch", "targets": [name]})
        try:
            return reply.fds.pop(name)
        except KeyError:
            reply.close()
            raise HolderError(errno.ENOENT, "holder fetch", self.path, f"nothing held as {name!r}") from None

    def release(self, name: str) -> None:
        """The holder closes what it keeps under ``name`` (for a session: un-preserves it
        unless another fd for it is open elsewhere)."""
        check_text(name, "name", "holder release", self.path, max_len=1024)
        self._request({"op": "release", "targets": [name]})

    def stop(self) -> None:
        """Stop the daemon: it closes everything it holds."""
        self._request({"op": "stop"})


LIVEUPDATE_KEY = "liveupdate"  # a /dev/liveupdate fd lent with a hold request (never kept)


def _check_manifest(manifest: object, path: str) -> None:
    """A manifest is None or a dict that JSON can carry; BadArgumentType otherwise."""
    if manifest is None:
        return
    if not isinstance(manifest, dict):
        raise BadArgumentType(errno.EINVAL, "holder hold", path, f"a manifest is a dict, not {type(manifest).__name__}")
    import json

    try:
        json.dumps(manifest)
    except (TypeError, ValueError) as exc:
        raise BadArgumentType(errno.EINVAL, "holder hold", path, f"the manifest is not JSON-serialisable: {exc}") from None


class _Ledger:
    """The holder's ledger: every session it holds, described in LUO (see :mod:`pyvfio_lu.ledger`)."""

    def __init__(self, socket_path: str):
        self.socket_path = socket_path
        self.writer: LedgerWriter | None = None
        self._fragments: dict[str, str] = {}  # held key -> '"session name":{...}'

    def ensure(self, borrowed_fd: int | None = None) -> None:
        if self.writer is None:
            self.writer = open_ledger(borrowed_fd)

    def update(self, manifest: dict[str, dict[str, Any]]) -> bool:
        """Rewrite the ledger from the holder's manifest; False when there is no ledger.

        Each session's JSON is made once, when it arrives (a held entry never changes), so a
        rewrite costs a join of the held sessions' text, not a new encoding of all of them."""
        if self.writer is None:
            return False
        import json

        from . import ledger

        for key in [k for k in self._fragments if k not in manifest]:
            del self._fragments[key]
        for key, entry in manifest.items():
            if key.startswith(handoff.SESSION_PREFIX) and key not in self._fragments:
                body = {"files": entry.get("records") or {},
                        "manifest": {k: v for k, v in entry.items() if k not in ("records", "files")}}
                self._fragments[key] = (json.dumps(entry.get("session", key[len(handoff.SESSION_PREFIX):]))
                                        + ":" + json.dumps(body, separators=(",", ":")))
        head = ledger.session_document({}, {"pid": os.getpid(), "kind": "holder", "socket": self.socket_path,
                                            "ledger": self.writer.name})
        del head["sessions"]
        payload = (json.dumps(head, separators=(",", ":"))[:-1] + ',"sessions":{'
                   + ",".join(self._fragments.values()) + "}}").encode()
        try:
            self.writer.write_payload(payload)
        except (PyvfioError, OSError, ValueError):
            return False
        ledger.mirror_outgoing_payload(self.writer.name, payload)
        return True


REQUEST_TIMEOUT = 10.0  # seconds a client may take to send its request (a stalled peer is dropped)


class _HolderState:
    """What the daemon holds: name -> fd and manifest entry, and its ledger."""

    def __init__(self, path: str):
        self.held: dict[str, OwnedFd] = {}
        self.manifest: dict[str, dict[str, Any]] = {}
        self.book = _Ledger(path)

    def hold(self, msg: handoff.Message) -> dict[str, Any]:
        """All or nothing: every fd is checked before anything is held; a refusal leaves
        what was held as it was (and closes the fds of the refused request)."""
        lent = msg.fds.pop(LIVEUPDATE_KEY, None)
        if lent is not None:
            self.book.ensure(lent.fileno())
            lent.close()
        entries = msg.header.get("manifest") or {}
        problems = []
        for name, f in msg.fds.items():
            if name in self.held:
                problems.append(f"{name!r} is already held (release it first)")
            elif name.startswith(handoff.SESSION_PREFIX):
                problems += _check_session_fd(name, f.fileno())
            entry = entries.get(name, {})
            if not isinstance(entry, dict):
                problems.append(f"the manifest entry of {name!r} is not an object")
        if problems:
            msg.close()
            return {"ok": False, "error": "hold refused, nothing changed: " + "; ".join(problems[:20])
                    + (f"; and {len(problems) - 20} more" if len(problems) > 20 else "")}
        for name, f in msg.fds.items():
            self.held[name] = f
            self.manifest[name] = entries.get(name, {})
        msg.fds.clear()
        return {"ok": True, "ledger": self.book.update(self.manifest)}

    def fetch(self, targets: list[Any]) -> tuple[dict[str, Any], list[int]]:
        missing = [n for n in targets if n not in self.held]
        if missing:
            return {"ok": False, "error": f"not held: {', '.join(map(str, missing[:20]))}"}, []
        return {"ok": True, "names": targets}, [self.held[n].fileno() for n in targets]

    def release(self, targets: list[Any]) -> dict[str, Any]:
        for n in targets:
            if n in self.held:
                self.held.pop(n).close()
                self.manifest.pop(n, None)
        self.book.update(self.manifest)
        return {"ok": True}

    def close_all(self) -> None:
        for f in self.held.values():
            f.close()
        self.held.clear()
        if self.book.writer is not None:
            self.book.writer.close()


def _check_session_fd(name: str, fd: int) -> list[str]:
    """[] when ``fd`` is the LUO session ``name`` names; else why not."""
    from .ioctl import FdKind, fd_kind
    from .luo import get_name

    try:
        kind, link = fd_kind(fd)
        if kind is not FdKind.LUO_SESSION:
            return [f"{name!r} is not a LUO session fd ({link})"]
        real = get_name(fd)
    except PyvfioError as exc:
        return [f"{name!r}: {exc}"]
    if handoff.session_key(real) != name:
        return [f"{name!r} is session {real!r} according to the kernel"]
    return []


def serve(path: str, expected_uid: int | None, request_timeout: float = REQUEST_TIMEOUT) -> None:
    """The holder daemon's loop (``python -m pyvfio_lu.holder``).

    One request per connection, handled in turn. Whatever a client sends (a wrong uid, a
    truncated, oversized or malformed message, more fds than names, fds of the wrong kind, a
    name already held, nothing at all within REQUEST_TIMEOUT) is refused with a reason and
    changes nothing that is held; no request can end the daemon but ``stop``.
    """
    import logging

    log = logging.getLogger("pyvfio_lu.holder")
    state = _HolderState(path)
    state.book.ensure()
    server = handoff.listen(path, backlog=64)
    while True:
        try:
            conn, _ = server.accept()
        except OSError as exc:  # EMFILE under a flood: wait for fds to free up
            log.warning("accept failed: %s", exc)
            time.sleep(0.1)
            continue
        with conn:
            conn.settimeout(request_timeout)
            try:
                handoff.check_peer(conn, expected_uid)
                msg = handoff.recv_message(conn)
            except PyvfioError as exc:
                _reply(conn, {"ok": False, "error": str(exc)})
                continue
            except OSError:  # timeout, reset: the client is gone
                continue
            if msg is None:
                continue
            out_fds: list[int] = []
            try:
                op = msg.header.get("op")
                targets = msg.header.get("targets", [])
                if not isinstance(targets, list):
                    targets = []
                if op == "hold":
                    reply = state.hold(msg)
                elif op == "list":
                    reply = {"ok": True, "manifest": state.manifest}
                elif op == "fetch":
                    reply, out_fds = state.fetch(targets)
                elif op == "release":
                    reply = state.release(targets)
                elif op == "stop":
                    msg.close()
                    _reply(conn, {"ok": True})
                    state.close_all()
                    server.close()
                    os.unlink(path)
                    return
                else:
                    reply = {"ok": False, "error": f"unknown op {op!r}"}
            except Exception as exc:  # logged, not raised: a bad request must never end the daemon
                log.exception("request failed")
                reply = {"ok": False, "error": f"request failed in the holder: {type(exc).__name__}: {exc}"}
            msg.close()  # fds the request brought and the holder did not keep
            _reply(conn, reply, out_fds)


def _reply(conn: socket.socket, reply: dict[str, Any], fds: Sequence[int] = ()) -> None:
    try:
        handoff.send_message(conn, reply, fds)
    except OSError:
        pass  # the client went away; nothing held changes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pyvfio_lu.holder",
        description="Hold LUO session fds (and any other fds) until the kexec. Clients use pyvfio_lu.holder.Holder.")
    parser.add_argument("--socket", required=True, help="Unix socket path to listen on (created mode 0600)")
    parser.add_argument("--uid", type=int, default=os.getuid(), help="only this uid may talk to the holder (default: own uid)")
    parser.add_argument("--request-timeout", type=float, default=REQUEST_TIMEOUT, metavar="S",
                        help="drop a client that has not sent its whole request within S seconds "
                             f"(default {REQUEST_TIMEOUT:.0f})")
    parser.add_argument("--detach", action="store_true",
                        help="fork into the background (new session) and return at once")
    args = parser.parse_args(argv)
    import logging

    logging.basicConfig(level=logging.INFO, format="pyvfio-lu holder: %(message)s")
    if args.detach and os.fork():
        os._exit(0)  # the caller waits for this process only; the daemon goes on
    if args.detach:
        os.setsid()
    # Ending the holder un-preserves everything it holds, so only the `stop` request ends it:
    # SIGINT, SIGHUP and SIGTERM are ignored (and logged). SIGKILL cannot be: it loses every
    # session held here, silently to the kernel (see the README).
    for sig in (signal.SIGINT, signal.SIGHUP, signal.SIGTERM):
        signal.signal(sig, _ignored_signal)
    raise_nofile_limit()
    serve(args.socket, args.uid, args.request_timeout)
    return 0


def _ignored_signal(signum: int, _frame: object) -> None:
    import logging

    logging.getLogger("pyvfio_lu.holder").warning(
        "ignored %s: ending the holder would un-preserve every session it holds; send it the "
        "'stop' request (Holder(path).stop()) to end it", signal.Signals(signum).name)


if __name__ == "__main__":
    sys.exit(main())
