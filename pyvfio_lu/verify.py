"""After a live update: did it happen, and did the named sessions come through?

:func:`verify` compares this boot with what was recorded before the kexec (its boot id and
live update number) and waits, up to a timeout, for each named session to reach the wanted
state in this boot's ledger index (:mod:`pyvfio_lu.ledger`):

- ``finished``: it came in and the host's own post-kexec job (a VMM resuming, a service)
  retrieved what it needed and finished it through the library;
- ``incoming``: it came in and is still there for that job to take (nothing finished it yet);
- ``present``: it came in, finished or not.

A session the ledgers of the previous kernel do not name did not come through (or was never
described): that fails at once, it will not appear later.
"""

from __future__ import annotations

import errno
import os
import time

from . import ledger, status

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (type checkers treat it as True)

if TYPE_CHECKING:
    from collections.abc import Sequence
    from typing import Any

STATES = ("finished", "incoming", "present")


def _state_of(name: str, came: dict[str, dict[str, Any]]) -> str:
    if name not in came:
        return "missing"
    return "finished" if came[name].get("finished") else "incoming"


def verify(before_boot_id: str, before_number: int | None, sessions: Sequence[str] = (), *,
           wanted: str = "finished", timeout: float = 120.0, poll: float = 0.5) -> dict[str, Any]:
    """Check this boot against the one before the kexec (see the module docstring). Returns
    ``{"ok", "error": class name or None, "message", "boot_id", "liveupdate_number",
    "expected_number", "sessions": {name: state}, "waited", "uptime"}``."""
    if wanted not in STATES:
        from .errors import ArgumentOutOfRange

        raise ArgumentOutOfRange(errno.EINVAL, "verify live update", wanted, f"wanted is one of {STATES}")
    t0 = time.monotonic()
    st = status.status()
    expected = (before_number or 0) + 1
    out: dict[str, Any] = {"ok": False, "error": None, "message": "", "boot_id": st.boot_id,
                 "previous_boot_id": before_boot_id, "liveupdate_number": st.liveupdate_number,
                 "expected_number": expected, "sessions": {}, "waited": 0.0, "uptime": status._uptime()}
    if st.boot_id == before_boot_id:
        out.update(error="LiveUpdateNotVerified", message=f"the boot id is still {st.boot_id}: the kexec did not happen")
        return out
    if st.liveupdate_number != expected:
        out.update(error="LiveUpdateNotVerified",
                   message=f"live update number {st.liveupdate_number}, expected {expected}: this boot did not "
                           "come from a live update of the previous one" if st.liveupdate_number is None else
                           f"live update number {st.liveupdate_number}, expected {expected} "
                           f"(previous: {before_number})")
        return out
    deadline = t0 + timeout
    names = list(sessions)
    while True:
        if wanted == "finished":
            adopted = ledger.adopted()  # the job's own first open adopts them; do not race it
            if not adopted and time.monotonic() > t0 + min(timeout, 10.0):
                adopted = status.adopt_ledgers()
        else:
            adopted = status.adopt_ledgers()
        came = ledger.came_in() if adopted else {}
        states = {n: (_state_of(n, came) if adopted else "not yet adopted") for n in names}
        out["sessions"] = states
        missing = [n for n, s in states.items() if s == "missing"]
        if missing:
            out.update(error="NoSuchSession", message="the previous kernel's ledgers do not name "
                       + ", ".join(repr(n) for n in missing) + ": not carried by this live update")
            break
        good = all(s == wanted or (wanted == "present" and s in ("finished", "incoming")) for s in states.values())
        if good:
            out.update(ok=True, message=f"live update {expected} verified: new boot id, "
                       + (f"sessions {wanted}: {', '.join(names)}" if names else "no sessions named"))
            break
        if wanted == "incoming" and any(s == "finished" for s in states.values()):
            out.update(error="LiveUpdateNotVerified", message="finished already, expected left for the post-kexec "
                       "job: " + ", ".join(n for n, s in states.items() if s == "finished"))
            break
        if time.monotonic() >= deadline:
            out.update(error="SessionNotFinished" if wanted == "finished" else "LiveUpdateNotVerified",
                       message=f"after {timeout:.0f} s: " + ", ".join(f"{n} {s}" for n, s in states.items())
                       + f" (wanted {wanted})")
            break
        time.sleep(poll)
    out["waited"] = round(time.monotonic() - t0, 3)
    return out


def last_exec_report(path: str) -> dict[str, Any] | None:
    """What :func:`pyvfio_lu.kexec.execute_later` wrote when the kexec was refused, if anything."""
    import json

    try:
        with open(path) as fh:
            doc = json.load(fh)
        return doc if isinstance(doc, dict) else None
    except (OSError, ValueError):
        return None


EXEC_REPORT_DIR = "/run/pyvfio-lu"


def exec_report_path(token: str) -> str:
    """Where a detached kexec of this boot reports a refusal (``/run``: gone after a kexec)."""
    os.makedirs(EXEC_REPORT_DIR, exist_ok=True)
    return os.path.join(EXEC_REPORT_DIR, f"exec-{token}.json")
