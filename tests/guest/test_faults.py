"""Faults, and exactly what survives each (single boot; what survives a kexec is in the
two-stage classes at the end).

- the process preserving files is SIGKILLed at each step of a preserve sequence: before the
  hand-off nothing stays preserved (the session name is free again); after it, everything does;
- the holder is SIGKILLed before the kexec: every session it held is un-preserved (its ledger
  mirror shows it dead), and a restarted holder serves new sessions;
- a client is SIGKILLed in the middle of a hand-off: the holder keeps running and keeps what it
  held; the client's own session goes with the client;
- a missing or corrupt kexec image is a KexecError, and nothing is loaded.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from pyvfio_lu import errors, handoff, kexec, ledger
from pyvfio_lu.holder import Holder
from pyvfio_lu.luo import LiveUpdate
from pyvfio_lu.memfd import Memfd

STEPS = ["created", "preserved", "handed"]
CHILD = r"""
import os, sys, time
from pyvfio_lu.holder import Holder
from pyvfio_lu.luo import LiveUpdate
from pyvfio_lu.memfd import Memfd
name, stop_at, sock = sys.argv[1], sys.argv[2], sys.argv[3]
def at(step):
    print(step, flush=True)
    if step == stop_at:
        time.sleep(600)  # killed here
with LiveUpdate() as lu:
    s = lu.create_session(name)
at("created")
with Memfd.create("ram", b"precious") as m:
    s.preserve(m, 1)
at("preserved")
Holder(sock).hold_session(s)
at("handed")
"""


def _name_free(lu: LiveUpdate, name: str) -> bool:
    try:
        lu.create_session(name).close()
        return True
    except errors.SessionExists:
        return False


@pytest.mark.parametrize("step", STEPS)
def test_preserving_process_killed(step, luo):
    sock = f"/run/pyvfio-lu-fault-{step}.sock"
    holder = Holder.spawn(sock)
    name = f"fault-kill-{step}"
    luo.close()  # the child needs /dev/liveupdate (single-open)
    child = subprocess.Popen([sys.executable, "-c", CHILD, name, step, sock], stdout=subprocess.PIPE, text=True)
    try:
        seen = [child.stdout.readline().strip() for _ in range(STEPS.index(step) + 1)]
        assert seen[-1] == step
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
    finally:
        child.stdout.close()
    try:
        with LiveUpdate() as lu:
            if step == "handed":  # the holder has it: still preserved
                assert not _name_free(lu, name)
                assert f"session:{name}" in holder.list()
            else:  # the process's exit closed the session: nothing stayed preserved
                assert _name_free(lu, name)
    finally:
        holder.stop()
    with LiveUpdate() as lu:
        assert _name_free(lu, name)  # stopping the holder un-preserved it too


def test_holder_killed_then_restarted(luo):
    sock = "/run/pyvfio-lu-fault-holder.sock"
    holder = Holder.spawn(sock)
    s = luo.create_session("fault-holder-killed")
    with Memfd.create("ram", b"x") as m:
        s.preserve(m, 1)
    holder.hold_session(s)
    pid = holder.pid
    assert "fault-holder-killed" in ledger.outgoing()
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while os.path.exists(f"/proc/{pid}") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _name_free(luo, "fault-holder-killed")  # everything it held is gone
    assert "fault-holder-killed" not in ledger.outgoing()  # its mirror is shown as dead
    with pytest.raises(OSError):
        holder.list()
    again = Holder.spawn(sock)  # a new holder replaces the stale socket
    try:
        s = luo.create_session("fault-holder-restarted")
        again.hold_session(s)
        assert "session:fault-holder-restarted" in again.list()
    finally:
        again.stop()


def test_client_killed_mid_handoff(luo):
    sock = "/run/pyvfio-lu-fault-mid.sock"
    holder = Holder.spawn(sock, request_timeout=2)
    try:
        kept = luo.create_session("fault-kept")
        holder.hold_session(kept)
        luo.close()
        code = ("import sys, time; from pyvfio_lu import handoff\n"
                "s = handoff.connect(sys.argv[1]); s.send(handoff.CONTINUED + b'{\"op\": \"hold\", \"na')\n"
                "print('sent', flush=True); time.sleep(600)\n")
        child = subprocess.Popen([sys.executable, "-c", code, sock], stdout=subprocess.PIPE, text=True)
        assert child.stdout.readline().strip() == "sent"
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
        child.stdout.close()
        assert set(holder.list()) == {"session:fault-kept"}  # still serving, still holding
    finally:
        holder.stop()


@pytest.mark.parametrize("image", ["/nonexistent/bzImage", "/proc/self/status", "/dev/null"])
def test_bad_kexec_images(image):
    with pytest.raises(errors.KexecError):
        kexec.load(image, None, "console=ttyS0")
    assert not kexec.loaded()


def test_handoff_connect_to_nothing_leaks_nothing():
    before = set(os.listdir("/proc/self/fd"))
    with pytest.raises(OSError):
        handoff.connect("/run/pyvfio-lu-nobody-listens.sock")
    assert set(os.listdir("/proc/self/fd")) == before
