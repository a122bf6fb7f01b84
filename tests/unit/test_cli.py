"""The pyvfio-lu command against the fake sysfs (and a fake kernel / netlink): argument
handling, output (text and --json), and the exit codes scripts rely on:
0 ok, 1 failed, 2 bad usage, 3 refused by a safety check."""

from __future__ import annotations

import json

import pytest
from fake_sysfs import guest_like
from test_netsafety import guest_eth0

from pyvfio_lu import cli, netsafety, status
from pyvfio_lu.netsafety import Link


@pytest.fixture
def fs(tmp_path, monkeypatch):
    fs = guest_like(tmp_path / "sys")
    fs.emulate(monkeypatch)
    return fs


@pytest.fixture
def netlink(monkeypatch):
    """eth0 as the guest has it: up, 10.0.2.15/24, default route."""
    nl = guest_eth0()
    monkeypatch.setattr(netsafety, "open_netlink", lambda: nl)
    return nl


def run(fs, *argv):
    return cli.main(["--sysfs", str(fs), *argv])


def out_json(capsys):
    return json.loads(capsys.readouterr().out)


# --- usage ------------------------------------------------------------------------------------------
def test_no_command_is_usage_error(capsys):
    assert cli.main([]) == cli.EXIT_USAGE
    assert "usage: pyvfio-lu" in capsys.readouterr().err


def test_help_has_examples_and_exit_codes(capsys):
    assert cli.main(["--help"]) == cli.EXIT_OK
    out = capsys.readouterr().out
    assert "examples:" in out and "pyvfio-lu bind 0000:00:04.0" in out and "3 refused" in out


@pytest.mark.parametrize("command", ["devices", "bind", "unbind", "status", "demo"])
def test_every_command_has_help_with_an_example(command, capsys):
    assert cli.main([command, "--help"]) == cli.EXIT_OK
    assert "example: " in capsys.readouterr().out


@pytest.mark.parametrize("argv", [["bogus"], ["bind"], ["unbind"], ["bind", "0000:00:04.0", "--nope"],
                                  ["demo", "--iommu", "amd"], ["demo", "--timeout", "soon"]])
def test_bad_arguments_exit_2(argv, capsys):
    assert cli.main(argv) == cli.EXIT_USAGE
    assert "usage:" in capsys.readouterr().err


@pytest.mark.parametrize("bdf", ["../../x", "0000:00:04.0/../..", "0000:00:04.0\0", "x" * 5000, "0000:00:20.0"])
@pytest.mark.parametrize("command", ["bind", "unbind", "devices"])
def test_hostile_bdf_is_usage_error(fs, command, bdf, capsys):
    assert run(fs, command, bdf) == cli.EXIT_USAGE
    err = capsys.readouterr().err
    assert err.startswith(f"pyvfio-lu {command}: parse BDF") and len(err) < 400


def test_hostile_driver_is_usage_error(fs, capsys):
    assert run(fs, "unbind", "0000:00:04.0", "--driver", "../../../x") == cli.EXIT_USAGE
    assert "driver name" in capsys.readouterr().err


def test_unknown_device_exits_1(fs, capsys):
    assert run(fs, "bind", "0000:00:1e.0") == cli.EXIT_FAILED
    assert "no PCI device 0000:00:1e.0" in capsys.readouterr().err


def test_errors_as_json_for_scripts(fs, capsys):
    assert run(fs, "bind", "0000:00:1e.0", "--json") == cli.EXIT_FAILED
    doc = out_json(capsys)
    assert doc["ok"] is False and doc["exit"] == 1 and doc["errno"] == "ENOENT" and doc["kind"] == "NotFound"


# --- devices ----------------------------------------------------------------------------------------
def test_devices_json(fs, capsys):
    assert run(fs, "devices", "--json") == cli.EXIT_OK
    rows = {r["bdf"]: r for r in out_json(capsys)}
    assert "0000:00:00.0" not in rows and "0000:00:1f.0" not in rows  # bridges hidden
    edu = rows["0000:00:04.0"]
    assert edu["vendor"] == "1234" and edu["device"] == "11e8" and edu["driver"] is None
    assert edu["iommu_group"] == 1 and edu["vfio_cdev"] is None
    assert rows["0000:00:05.0"]["net"] == ["eth0"]
    assert rows["0000:00:1f.2"]["group"] == [{"bdf": "0000:00:1f.0", "driver": None},
                                             {"bdf": "0000:00:1f.2", "driver": None},
                                             {"bdf": "0000:00:1f.3", "driver": "i801_smbus"}]


def test_devices_all_includes_bridges(fs, capsys):
    assert run(fs, "devices", "--all", "--json") == cli.EXIT_OK
    assert "0000:00:00.0" in {r["bdf"] for r in out_json(capsys)}


def test_devices_selected(fs, capsys):
    assert run(fs, "devices", "--json", "00:04.0", "0000:00:05.0") == cli.EXIT_OK
    assert [r["bdf"] for r in out_json(capsys)] == ["0000:00:04.0", "0000:00:05.0"]


def test_devices_text_shows_group_siblings_and_cdev(fs, capsys):
    assert run(fs, "bind", "0000:00:04.0") == cli.EXIT_OK
    capsys.readouterr()
    assert run(fs, "devices") == cli.EXIT_OK
    out = capsys.readouterr().out
    edu = next(line for line in out.splitlines() if line.startswith("0000:00:04.0"))
    assert "1234:11e8" in edu and "vfio-pci" in edu and "/dev/vfio/devices/vfio0" in edu
    assert "group 5 also holds: 0000:00:1f.0 (no driver), 0000:00:1f.3 (i801_smbus)" in out
    assert "eth0" in next(line for line in out.splitlines() if line.startswith("0000:00:05.0"))


# --- bind / unbind ------------------------------------------------------------------------------------
def test_bind_and_unbind_edu(fs, capsys):
    assert run(fs, "bind", "0000:00:04.0", "--json") == cli.EXIT_OK
    doc = out_json(capsys)
    assert doc == {"ok": True, "bdf": "0000:00:04.0", "driver": "vfio-pci", "previous_driver": None,
                   "vfio_cdev": "/dev/vfio/devices/vfio0", "iommu_group": 1, "forced_past": []}
    assert run(fs, "unbind", "0000:00:04.0") == cli.EXIT_OK
    assert "unbound from vfio-pci; driver now none" in capsys.readouterr().out
    assert fs.devices["0000:00:04.0"].driver is None and fs.override("0000:00:04.0") is None


def test_bind_non_viable_group_is_refused_with_exit_3(fs, capsys):
    assert run(fs, "bind", "0000:00:1f.2") == cli.EXIT_REFUSED
    err = capsys.readouterr().err
    assert "IOMMU group 5 is not viable" in err and "0000:00:1f.3 (driver i801_smbus)" in err
    assert fs.devices["0000:00:1f.2"].driver is None and fs.override("0000:00:1f.2") is None


def test_force_does_not_override_group_viability(fs, capsys, netlink):
    assert run(fs, "bind", "0000:00:1f.2", "--force") == cli.EXIT_REFUSED


def test_bind_active_nic_is_refused_with_exit_3(fs, netlink, capsys):
    assert run(fs, "bind", "0000:00:05.0") == cli.EXIT_REFUSED
    err = capsys.readouterr().err
    assert err.startswith("pyvfio-lu bind: unbind network device on 0000:00:05.0")
    for part in ("eth0", "10.0.2.15/24", "default via 10.0.2.2"):
        assert part in err
    assert fs.devices["0000:00:05.0"].driver == "virtio-pci"


def test_bind_active_nic_json_error_names_it(fs, netlink, capsys):
    assert run(fs, "bind", "0000:00:05.0", "--json") == cli.EXIT_REFUSED
    doc = out_json(capsys)
    assert doc["exit"] == 3 and doc["kind"] == "InterfaceInUse" and "10.0.2.15/24" in doc["reason"]


def test_bind_nic_after_it_is_taken_down_and_give_it_back(fs, netlink, capsys):
    netlink.links["eth0"] = Link(2, "eth0", 0x1002, "DOWN")
    netlink.addrs.clear()
    netlink.routes_by_index.clear()
    assert run(fs, "bind", "0000:00:05.0") == cli.EXIT_OK
    out = capsys.readouterr().out
    assert "bound to vfio-pci (was: virtio-pci)" in out and "--driver virtio-pci" in out
    assert run(fs, "unbind", "0000:00:05.0", "--driver", "virtio-pci", "--json") == cli.EXIT_OK
    doc = out_json(capsys)
    assert doc["driver"] == "virtio-pci" and doc["previous_driver"] == "vfio-pci" and doc["net"] == ["eth0"]


def test_bind_forced_past_an_active_nic_reports_it(fs, netlink, capsys):
    assert run(fs, "bind", "0000:00:05.0", "--force") == cli.EXIT_OK
    assert "forced past: eth0: link is up; addresses 10.0.2.15/24" in capsys.readouterr().out


def test_unbind_of_active_nic_from_its_kernel_driver_is_refused(fs, netlink, capsys):
    assert run(fs, "unbind", "0000:00:05.0") == cli.EXIT_REFUSED
    assert "eth0" in capsys.readouterr().err and fs.devices["0000:00:05.0"].driver == "virtio-pci"


def test_unbind_from_vfio_skips_the_network_check(fs, monkeypatch, capsys):
    assert run(fs, "bind", "0000:00:04.0") == cli.EXIT_OK
    monkeypatch.setattr(netsafety, "open_netlink", lambda: pytest.fail("netlink opened"))
    assert run(fs, "unbind", "0000:00:04.0") == cli.EXIT_OK


def test_unbind_to_driver_that_refuses_exits_1(fs, capsys):
    assert run(fs, "bind", "0000:00:04.0") == cli.EXIT_OK
    capsys.readouterr()
    assert run(fs, "unbind", "0000:00:04.0", "--driver", "e1000e") == cli.EXIT_FAILED
    assert "not e1000e" in capsys.readouterr().err


# --- status -------------------------------------------------------------------------------------------
@pytest.fixture
def fake_status(monkeypatch):
    st = status.Status(luo_enabled=True, kho_enabled=True, liveupdate_number=3, boot_id="b00t", kexec_loaded=False,
                       cmdline="kho=on liveupdate=on",
                       sessions={"vm-1": [{"pid": 4242, "comm": "python", "fd": 5}]},
                       holders_of_device=[])
    monkeypatch.setattr(status, "status", lambda: st)
    monkeypatch.setattr(cli, "_cmdline", lambda pid: f"python -m pyvfio_lu.holder --socket /run/h{pid}.sock")
    return st


def test_status_json(fake_status, capsys):
    assert cli.main(["status", "--json"]) == cli.EXIT_OK
    doc = out_json(capsys)
    assert doc["liveupdate_number"] == 3 and doc["luo_enabled"] is True
    assert doc["sessions"]["vm-1"] == [{"pid": 4242, "comm": "python", "fd": 5,
                                        "cmdline": "python -m pyvfio_lu.holder --socket /run/h4242.sock"}]


def test_status_text(fake_status, capsys):
    assert cli.main(["status"]) == cli.EXIT_OK
    out = capsys.readouterr().out
    assert "live update number:   3" in out and "/dev/liveupdate open: nobody" in out
    line = next(line for line in out.splitlines() if "vm-1" in line)
    assert "pid 4242" in line and "fd 5" in line and "pyvfio_lu.holder" in line


def test_status_cold_boot_without_sessions(monkeypatch, capsys):
    st = status.Status(False, None, None, "b00t", False, "")
    monkeypatch.setattr(status, "status", lambda: st)
    assert cli.main(["status"]) == cli.EXIT_OK
    out = capsys.readouterr().out
    assert "LUO enabled:          no" in out and "- (cold boot)" in out and "none open" in out


def test_cmdline_of_this_process():
    import os

    assert "pytest" in cli._cmdline(os.getpid()) or "python" in cli._cmdline(os.getpid())
    assert cli._cmdline(2**22 + 12345) == ""


def test_demo_passes_its_options(monkeypatch):
    seen = []
    import pyvfio_lu.demo

    monkeypatch.setattr(pyvfio_lu.demo, "main", lambda argv: seen.append(argv) or 0)
    assert cli.main(["demo", "--iommu", "virtio", "--timeout", "60"]) == 0
    assert cli.main(["demo", "--flavour", "vfio-lu"]) == 0
    assert seen == [["--iommu", "virtio", "--timeout", "60.0", "--flavour", "auto"],
                    ["--iommu", "intel", "--timeout", "900.0", "--flavour", "vfio-lu"]]


def test_keyboard_interrupt_exits_130(monkeypatch):
    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "cmd_status", interrupted)
    assert cli.main(["status"]) == 130


def test_main_module_runs_the_cli():
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "pyvfio_lu", "bind", "../x"], capture_output=True, text=True,
                          check=False)
    assert proc.returncode == 2 and "parse BDF" in proc.stderr
