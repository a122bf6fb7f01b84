"""The pyvfio-lu command and the safety checks on the guest's real devices, each command run
as a script would run it (a subprocess; exit code, stdout, stderr):

- edu (0000:00:04.0): bind, listed with its IOMMU group and VFIO cdev, restored to no
  driver, bound again and usable;
- the SATA function (0000:00:1f.2) shares IOMMU group 5 with the SMBus controller on
  i801_smbus: binding it is refused (exit 3) naming that sibling, nothing changes;
- the virtio-net NIC (0000:00:05.0, eth0 with 10.0.2.15/24 and a default route): bind and
  unbind are refused (exit 3) naming eth0, its address and the route; after
  ``ip link set eth0 down; ip addr flush dev eth0`` it binds to vfio-pci; then
  ``unbind --driver virtio-pci`` gives it back (and the test puts eth0's config back);
- status --json lists a session held by a holder process, by pid and name;
- the real output of ``devices`` and ``status`` after the live update is kept in
  /shared/cli-output/ for the README.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from pyvfio_lu import edu
from pyvfio_lu.holder import Holder
from pyvfio_lu.memfd import Memfd
from pyvfio_lu.sysfs import PciDevice
from pyvfio_lu.vfio import VfioDevice

EDU = os.environ.get("PYVFIO_LU_EDU_BDF", "0000:00:04.0")
NIC = "0000:00:05.0"
SATA, SMBUS = "0000:00:1f.2", "0000:00:1f.3"
HOLDER_SOCKET = "/run/pyvfio-lu-cli-test.sock"
OUTPUT_DIR = "/shared/cli-output"


def cli(*argv: str, check: int | None = 0) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "pyvfio_lu", *argv], capture_output=True, text=True, timeout=120,
                          check=False)
    if check is not None:
        assert proc.returncode == check, (
            f"pyvfio-lu {' '.join(argv)}: exit {proc.returncode}, wanted {check}\n"
            f"stdout: {proc.stdout}\nstderr: {proc.stderr}")
    return proc


def sh(command: str) -> None:
    subprocess.run(["sh", "-c", command], check=True, timeout=60)


def device_json(bdf: str) -> dict:
    (row,) = json.loads(cli("devices", "--json", bdf).stdout)
    return row


# --- edu: bind, list, restore, re-bind ----------------------------------------------------------------
def test_edu_bind_listed_with_group_and_cdev():
    out = json.loads(cli("bind", EDU, "--json").stdout)
    assert out["ok"] and out["driver"] == "vfio-pci" and out["vfio_cdev"].startswith("/dev/vfio/devices/vfio")
    row = device_json(EDU)
    assert (row["vendor"], row["device"]) == ("1234", "11e8")
    assert row["driver"] == "vfio-pci" and row["driver_override"] == "vfio-pci"
    assert row["iommu_group"] == int(os.path.basename(os.readlink(f"/sys/bus/pci/devices/{EDU}/iommu_group")))
    assert row["group"] == [{"bdf": EDU, "driver": "vfio-pci"}]
    assert row["vfio_cdev"] == out["vfio_cdev"] and os.path.exists(row["vfio_cdev"])
    text = cli("devices").stdout
    line = next(x for x in text.splitlines() if x.startswith(EDU))
    assert "1234:11e8" in line and "vfio-pci" in line and row["vfio_cdev"] in line and f" {row['iommu_group']} " in line


def test_edu_restored_to_no_driver_then_bound_again():
    cli("bind", EDU)
    out = json.loads(cli("unbind", EDU, "--json").stdout)
    assert out == {"ok": True, "bdf": EDU, "previous_driver": "vfio-pci", "driver": None, "net": []}
    pci = PciDevice(EDU)
    assert pci.driver is None and pci.driver_override is None and pci.vfio_cdev is None
    row = device_json(EDU)
    assert row["driver"] is None and row["vfio_cdev"] is None
    out = json.loads(cli("bind", EDU, "--json").stdout)
    assert out["previous_driver"] is None and out["driver"] == "vfio-pci"
    with VfioDevice.open(EDU, "iommufd") as dev:  # the re-bound device works
        assert edu.Edu(dev).identify() == edu.ID


def test_library_restore_and_rebind():
    pci = PciDevice(EDU)
    pci.bind_vfio()
    pci.restore(None)
    assert pci.driver is None and pci.driver_override is None
    assert pci.bind_vfio() is None and pci.driver == "vfio-pci" and pci.vfio_cdev


# --- group viability ---------------------------------------------------------------------------------
def test_non_viable_group_is_refused_naming_the_sibling():
    sata = PciDevice(SATA)
    members = {m.bdf: m.driver for m in sata.group_members()}
    if members.get(SMBUS) in (None, "vfio-pci"):
        pytest.skip(f"{SATA} shares no group with a device on a kernel driver here: {members}")
    before = (sata.driver, sata.driver_override)
    proc = cli("bind", SATA, check=3)
    assert f"IOMMU group {sata.iommu_group} is not viable" in proc.stderr
    assert f"{SMBUS} (driver {members[SMBUS]})" in proc.stderr
    assert (sata.driver, sata.driver_override) == before and PciDevice(SMBUS).driver == members[SMBUS]
    text = cli("devices", SATA).stdout
    assert f"{SMBUS} ({members[SMBUS]})" in text  # the listing shows who shares the group


# --- the NIC ------------------------------------------------------------------------------------------
@pytest.fixture
def nic():
    """The virtio NIC, given back to virtio-pci with eth0 configured as init.sh left it, whatever happens."""
    pci = PciDevice(NIC)
    if pci.driver != "virtio-pci" or pci.net_interfaces != ["eth0"]:
        pytest.skip(f"{NIC} is not the guest's virtio-net eth0 ({pci.driver}, {pci.net_interfaces})")
    yield pci
    if pci.driver != "virtio-pci":
        pci.restore("virtio-pci")
    for _ in range(100):
        if pci.net_interfaces:
            break
        time.sleep(0.05)
    (ifname,) = pci.net_interfaces
    restore = (f"ip link set {ifname} up; ip addr replace 10.0.2.15/24 dev {ifname}; "
               f"ip route replace default via 10.0.2.2 dev {ifname}")
    subprocess.run(["sh", "-c", restore], check=False)


def test_active_nic_refused_then_bound_when_down_and_given_back(nic):
    proc = cli("bind", NIC, check=3)
    for part in ("eth0", "link is up", "10.0.2.15/24", "default via 10.0.2.2", "ip link set dev eth0 down"):
        assert part in proc.stderr, part
    assert nic.driver == "virtio-pci" and nic.net_interfaces == ["eth0"]  # nothing changed

    proc = cli("unbind", NIC, check=3)  # taking it from virtio-pci is refused just the same
    assert "10.0.2.15/24" in proc.stderr and nic.driver == "virtio-pci"


    sh("ip link set eth0 down; ip addr flush dev eth0")
    out = json.loads(cli("bind", NIC, "--json").stdout)
    assert out["driver"] == "vfio-pci" and out["previous_driver"] == "virtio-pci" and out["vfio_cdev"]
    assert nic.net_interfaces == [] and not os.path.exists("/sys/class/net/eth0")
    row = device_json(NIC)
    assert row["driver"] == "vfio-pci" and row["net"] == [] and row["vfio_cdev"] == out["vfio_cdev"]

    proc = cli("unbind", NIC, "--driver", "virtio-pci")
    assert "unbound from vfio-pci; driver now virtio-pci" in proc.stdout
    assert nic.driver == "virtio-pci" and nic.driver_override is None and nic.net_interfaces == ["eth0"]


# --- exit codes as a script sees them -------------------------------------------------------------------
@pytest.mark.parametrize("argv, code, text", [
    ([], 2, "usage: pyvfio-lu"),
    (["bind", "../../sys/kernel"], 2, "parse BDF"),
    (["bind", "0000:00:04.0/../../.."], 2, "parse BDF"),
    (["unbind", EDU, "--driver", "../vfio-pci"], 2, "driver name"),
    (["bind", "0000:00:1e.0"], 1, "no PCI device 0000:00:1e.0"),
    (["unbind", EDU, "--driver", "nosuchdriver"], 1, "no PCI driver 'nosuchdriver'"),
    (["--help"], 0, "examples:"),
])
def test_exit_codes(argv, code, text):
    proc = cli(*argv, check=code)
    assert text in proc.stdout + proc.stderr


# --- status: who holds which session ----------------------------------------------------------------------
def test_status_json_lists_session_held_by_holder(luo):
    holder = Holder.spawn(HOLDER_SOCKET)
    try:
        s = luo.create_session("cli-status-held")
        with Memfd.create("cli-status", b"held by the holder") as m:
            s.preserve(m, 1)
        holder.hold_session(s, {"purpose": "test_status_json_lists_session_held_by_holder"})
        assert s.closed  # only the holder has it now
        doc = json.loads(cli("status", "--json").stdout)
        assert doc["luo_enabled"] is True and doc["kho_enabled"] is True
        (entry,) = doc["sessions"]["cli-status-held"]
        assert entry["pid"] == holder.pid
        assert "pyvfio_lu.holder" in entry["cmdline"] and HOLDER_SOCKET in entry["cmdline"]
        assert any(h["pid"] == os.getpid() for h in doc["holders_of_device"])  # the luo fixture's open
        text = cli("status").stdout
        line = next(x for x in text.splitlines() if "cli-status-held" in x)
        assert f"pid {holder.pid}" in line and "pyvfio_lu.holder" in line
    finally:
        holder.stop()
    assert "cli-status-held" not in json.loads(cli("status", "--json").stdout)["sessions"]


# --- the output the README shows ---------------------------------------------------------------------------
class TestCliOutputAcrossLiveUpdate:
    @pytest.mark.before_kexec
    def test_before(self, carry):
        doc = json.loads(cli("status", "--json").stdout)
        assert doc["liveupdate_number"] is None or isinstance(doc["liveupdate_number"], int)
        carry["boot_id"] = doc["boot_id"]
        carry["number"] = doc["liveupdate_number"]

    @pytest.mark.after_kexec
    def test_after(self, luo, carry):
        cli("bind", EDU)
        holder = Holder.spawn(HOLDER_SOCKET)
        try:
            s = luo.create_session("vm-example")
            with Memfd.create("guest-ram", size=1 << 20) as m:
                s.preserve(m, 1)
            holder.hold_session(s)
            luo.close()  # so /dev/liveupdate shows as free, as it is between operations
            devices, st = cli("devices").stdout, cli("status").stdout
            doc = json.loads(cli("status", "--json").stdout)
        finally:
            holder.stop()
        assert doc["boot_id"] != carry["boot_id"]
        assert doc["liveupdate_number"] is not None and doc["liveupdate_number"] != carry["number"]
        assert f"live update number:   {doc['liveupdate_number']}" in st
        assert "vm-example" in st and EDU in devices and "/dev/vfio/devices/vfio" in devices
        os.makedirs(OUTPUT_DIR, exist_ok=True)
        with open(f"{OUTPUT_DIR}/devices.txt", "w") as fh:
            fh.write("$ pyvfio-lu devices\n" + devices)
        with open(f"{OUTPUT_DIR}/status.txt", "w") as fh:
            fh.write("$ pyvfio-lu status\n" + st)
