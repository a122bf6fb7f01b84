"""The examples, run as an operator would run them (subprocesses), around the harness's real
kexec: stage 1 runs operator_pre_kexec.py and ``mini_vmm.py suspend`` (they load the same
kernel the harness then kexecs into, but do not exec it themselves); stage 2 runs
operator_post_kexec.py and ``mini_vmm.py resume``, which must find everything intact."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from pyvfio_lu import kexec, procfs
from pyvfio_lu.errors import NoSuchSession
from pyvfio_lu.luo import LiveUpdate
from pyvfio_lu.preservation import can_preserve_devices
from pyvfio_lu.sysfs import PciDevice
from pyvfio_lu.vm.qemu import EDU_BDFS

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
EDU = EDU_BDFS["operator"]  # its own edu: where the kernel can, the device stays preserved until the kexec
VMM_EDU = EDU_BDFS["vmm"]
HOLDER = "/run/pyvfio-lu-examples-holder.sock"
MANIFEST = "/shared/examples/operator-manifest.json"  # /shared survives the kexec


def example(*argv: str, code: int = 0, keep: str | None = None) -> subprocess.CompletedProcess:
    """Run an example; with ``keep``, its output is also saved as /shared/examples/<keep>.txt."""
    proc = subprocess.run([sys.executable, str(EXAMPLES / argv[0]), *argv[1:]], capture_output=True, text=True,
                          timeout=300, check=False)
    sys.stdout.write(proc.stdout)  # shown by pytest when the test fails
    sys.stderr.write(proc.stderr)
    if keep:
        os.makedirs(os.path.dirname(MANIFEST), exist_ok=True)
        with open(f"{os.path.dirname(MANIFEST)}/{keep}.txt", "w") as fh:
            fh.write(f"$ {' '.join(['python', 'examples/' + argv[0], *argv[1:]])}\n{proc.stdout}{proc.stderr}")
    assert proc.returncode == code, f"{' '.join(argv)}: exit {proc.returncode}, wanted {code}\n{proc.stderr[-2000:]}"
    return proc


def harness_images() -> list[str]:
    """--kernel/--initrd of the kexec the harness does after stage 1 (from /shared/run.sh)."""
    try:
        text = Path("/shared/run.sh").read_text()
    except OSError:
        return ["--no-load"]
    m = re.search(r"--kernel (\S+) --initrd (\S+)", text)
    return ["--kernel", m.group(1), "--initrd", m.group(2)] if m else ["--no-load"]


def session_gone(name: str) -> bool:
    with LiveUpdate() as lu:
        try:
            lu.retrieve_session(name).close()
        except NoSuchSession:
            return True
    return False


@pytest.mark.parametrize("script", ["operator_pre_kexec.py", "operator_post_kexec.py", "mini_vmm.py"])
def test_help(script):
    out = example(script, "--help").stdout
    assert "usage:" in out and "example:" in out and "Exit status" in out


def test_post_without_a_live_update_fails_clearly():
    proc = example("operator_post_kexec.py", "--manifest", "/nonexistent.json", "--session", "never-preserved", code=1)
    assert "no incoming session 'never-preserved'" in proc.stderr


def test_resume_without_a_suspend_fails_clearly():
    proc = example("mini_vmm.py", "--session", "never-suspended", "resume", code=1)
    assert "nothing to resume" in proc.stderr


def test_pre_refuses_an_active_nic():
    nic = PciDevice("0000:00:05.0")
    if nic.driver != "virtio-pci" or not nic.net_interfaces:
        pytest.skip("no virtio-net NIC with an interface here")
    proc = example("operator_pre_kexec.py", "--bdf", nic.bdf, "--session", "never-created", "--no-load", code=3)
    assert "refused:" in proc.stderr and "eth0" in proc.stderr
    assert nic.driver == "virtio-pci"
    assert "never-created" not in procfs.session_holders()


class TestOperatorScripts:
    SESSION = "operator-example"

    @pytest.mark.before_kexec
    def test_pre(self, carry):
        proc = example("operator_pre_kexec.py", "--bdf", EDU, "--session", self.SESSION, "--payload-mib", "4",
                       "--manifest", MANIFEST, "--holder-socket", HOLDER, *harness_images(), "--json", keep="operator_pre_kexec")
        report = json.loads(proc.stdout)
        assert report["ok"] and report["session"] == self.SESSION
        dev = report["device"]
        if can_preserve_devices():
            assert dev["bdf"] == EDU and dev["preserved"], dev
        else:
            assert dev["bdf"] == EDU and not dev["preserved"] and dev["error"] == "VfioPreservationUnsupported"
        assert "VFIO device" in proc.stderr and "payload preserved as token 0x1" in proc.stderr
        if "--no-load" not in harness_images():
            assert report["kexec"]["loaded"] and kexec.loaded()
            kexec.unload()  # the harness loads its own (with the stage-2 command line); later tests expect none
        holder = report["holder"]
        assert holder["kind"] == "holder"
        assert [h.pid for h in procfs.session_holders()[self.SESSION]] == [holder["pid"]]  # the script exited
        with open(MANIFEST) as fh:
            manifest = json.load(fh)
        assert manifest["files"]["0x1"]["size"] == 4 << 20 and len(manifest["files"]["0x1"]["sha256"]) == 64
        assert PciDevice(EDU).driver == "vfio-pci"
        carry["sha256"] = manifest["files"]["0x1"]["sha256"]

    @pytest.mark.after_kexec
    def test_post(self, carry):
        proc = example("operator_post_kexec.py", "--manifest", MANIFEST, keep="operator_post_kexec")
        out = proc.stdout
        assert f"sha256 {carry['sha256'][:16]}... matches" in out
        assert "everything verified" in out and "finished" in out
        how = "taken from the session" if can_preserve_devices() else "set up again"
        assert f"VFIO device    {EDU} on vfio-pci" in out and how in out
        assert PciDevice(EDU).driver == "vfio-pci"
        assert session_gone(self.SESSION)  # finished: the kernel let it go


class TestMiniVmm:
    SESSION = "mini-vmm-example"

    @pytest.mark.before_kexec
    def test_suspend(self, carry):
        proc = example("mini_vmm.py", "--bdf", VMM_EDU, "--session", self.SESSION, "suspend", "--ram-mib", "8",
                       "--holder-socket", HOLDER, *harness_images(), keep="mini_vmm_suspend")
        out = proc.stdout
        assert "all identical" in out and "guest RAM preserved as token 0x1" in out
        if can_preserve_devices():
            assert "device preserved as token" in out
        else:
            assert "device NOT preserved; the kernel says:" in out and "cannot preserve VFIO devices" in out
        assert out.rstrip().endswith("suspended")
        assert len(procfs.session_holders()[self.SESSION]) == 1
        if "--no-load" not in harness_images():
            assert "next kernel loaded with kexec_file_load" in out and kexec.loaded()
            kexec.unload()

    @pytest.mark.after_kexec
    def test_resume(self, carry):  # carry: skipped when the suspend did not pass
        out = example("mini_vmm.py", "--session", self.SESSION, "resume", keep="mini_vmm_resume").stdout
        if can_preserve_devices():
            assert "device retrieved from token" in out
        assert "identical to before the kexec" in out
        assert "mapped again at the same IOVA 0x1000000" in out
        assert "identical to disk block 0" in out
        assert "guest resumed: boot 2" in out and out.rstrip().endswith("resumed")
        assert session_gone(self.SESSION)
