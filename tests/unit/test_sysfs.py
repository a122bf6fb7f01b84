"""pyvfio_lu.sysfs against a fake sysfs tree: strict BDF parsing (hostile input never reaches
the filesystem), device identity, IOMMU groups with their members' drivers, the VFIO cdev,
network interfaces (direct and through a virtio child), group viability naming the
siblings, and bind / restore through driver_override with a fake kernel."""

from __future__ import annotations

import os

import pytest
from fake_sysfs import FakeSysfs, guest_like

from pyvfio_lu import sysfs
from pyvfio_lu.errors import GroupNotViable, NotFound, PyvfioError
from pyvfio_lu.sysfs import (
    InvalidBdf,
    InvalidDriverName,
    PciDevice,
    check_driver_name,
    list_devices,
    parse_bdf,
)


@pytest.fixture
def fs(tmp_path) -> FakeSysfs:
    return guest_like(tmp_path / "sys")


@pytest.fixture
def kernel(fs, monkeypatch) -> FakeSysfs:
    fs.emulate(monkeypatch)
    return fs


# --- BDF parsing ------------------------------------------------------------------------------------
@pytest.mark.parametrize("text, canonical", [
    ("0000:00:04.0", "0000:00:04.0"),
    ("00:04.0", "0000:00:04.0"),
    ("0000:00:1F.2", "0000:00:1f.2"),
    ("ABCD:EF:1f.7", "abcd:ef:1f.7"),
    ("0000:00:04.0\n", "0000:00:04.0"),  # $(cat file)
    ("  0000:00:04.0\t", "0000:00:04.0"),
])
def test_bdf_canonical_form(text, canonical):
    assert parse_bdf(text) == canonical


HOSTILE = [
    "", " ", "../../x", "..", "0000:00:04.0/../..", "0000:00:04.0/", "/0000:00:04.0",
    "0000:00:04.0/../../../../etc", "../0000:00:04.0", "0000:00:04.0\0", "\x000000:00:04.0",
    "0000:00:04.0\0/../../x", "0000:00:04", "0000:00:04.", "0000:00:4.0", "0000:0:04.0",
    "000:00:04.0", "00000:00:04.0", "0000:00:20.0", "0000:00:04.8", "0000:00:04.0.0",
    "0000-00-04.0", "0000:00:04:0", "0000:00:04.0 0000:00:05.0", "0000:00:04.0\n0000:00:05.0",
    "0000:00:0g.0", "+000:00:04.0", "-000:00:04.0", "0x00:00:04.0",
    "\uff10000:00:04.0",  # a fullwidth digit
    "0000:00:0\u0664.0",  # an Arabic-Indic digit (str.isdigit() would say yes)
    "0000:00:04.0\u2028", "0000:00:04.0\x0b",
    "*", "0000:00:*", "0000:00:04.?",
    "0" * 10_000, "0000:00:04.0" * 1000, "a" * (1 << 20),
]


@pytest.mark.parametrize("text", HOSTILE, ids=lambda t: repr(t)[:40])
def test_hostile_bdf_is_refused(text):
    with pytest.raises(InvalidBdf) as exc:
        parse_bdf(text)
    assert exc.value.errno == 22 and isinstance(exc.value, ValueError)
    assert len(str(exc.value)) < 400  # a megabyte of input is not echoed back


@pytest.mark.parametrize("value", [None, 4, b"0000:00:04.0", ["0000:00:04.0"]])
def test_non_string_bdf_is_refused(value):
    with pytest.raises(InvalidBdf, match="must be a string"):
        parse_bdf(value)


@pytest.mark.parametrize("text", HOSTILE[:12])
def test_hostile_bdf_never_touches_the_filesystem(text, tmp_path, monkeypatch):
    seen = []
    for name in ("isdir", "exists", "islink"):
        real = getattr(os.path, name)
        monkeypatch.setattr(os.path, name, lambda p, _r=real: seen.append(p) or _r(p))
    with pytest.raises(InvalidBdf):
        PciDevice(text, str(tmp_path))
    assert seen == []


def test_escape_target_exists_but_is_unreachable(tmp_path):
    """Even when '../../x' would name a real directory, it is not a PCI address."""
    fs = guest_like(tmp_path / "sys")
    (fs.root / "bus" / "x").mkdir()
    with pytest.raises(InvalidBdf):
        PciDevice("../x", str(fs))
    with pytest.raises(InvalidBdf):
        PciDevice("0000:00:04.0/../../x", str(fs))


@pytest.mark.parametrize("name", ["vfio-pci", "virtio-pci", "i801_smbus", "mlx5_vfio_pci", "nvme"])
def test_driver_names(name):
    assert check_driver_name(name) == name


@pytest.mark.parametrize("name", ["", ".", "..", "../x", "a/b", "vfio-pci\n", "x\0", "-x", "a" * 65, "ü"])
def test_hostile_driver_names(name):
    with pytest.raises(InvalidDriverName):
        check_driver_name(name)


# --- identity, groups, cdev, net ------------------------------------------------------------------
def test_unknown_device(fs):
    with pytest.raises(NotFound, match=r"no PCI device 0000:00:1e.0"):
        PciDevice("0000:00:1e.0", str(fs))


def test_identity(fs):
    d = PciDevice("00:05.0", str(fs))
    assert d.bdf == "0000:00:05.0"
    assert (d.vendor, d.device, d.pci_class) == (0x1AF4, 0x1000, 0x020000)
    assert d.class_name == "network"
    assert d.driver == "virtio-pci" and d.driver_override is None
    assert d.iommu_group == 2
    assert "virtio-pci" in repr(d)


def test_list_devices_skips_odd_entries(fs):
    os.symlink("../../../devices/pci0000:00/0000:00:04.0", fs.root / "bus/pci/devices/not-a-bdf")
    assert [d.bdf for d in list_devices(str(fs))] == sorted(fs.devices)


def test_group_members_with_their_drivers(fs):
    d = PciDevice("0000:00:1f.2", str(fs))
    assert d.iommu_group == 5
    assert [(m.bdf, m.driver) for m in d.group_members()] == [
        ("0000:00:1f.0", None), ("0000:00:1f.2", None), ("0000:00:1f.3", "i801_smbus")]


def test_device_without_iommu_group(fs):
    fs.add("0000:00:06.0", driver="virtio-pci")
    d = PciDevice("0000:00:06.0", str(fs))
    assert d.iommu_group is None
    assert [(m.bdf, m.driver) for m in d.group_members()] == [("0000:00:06.0", "virtio-pci")]
    d.check_group_viable()  # alone: nothing to block it


def test_non_pci_group_member_is_listed(fs):
    g = fs.root / "kernel/iommu_groups/1/devices"
    other = fs.root / "devices/platform/foo"
    other.mkdir(parents=True)
    os.symlink("../../bus/pci/drivers/e1000e", other / "driver")
    os.symlink("../../../../devices/platform/foo", g / "foo")
    members = PciDevice("0000:00:04.0", str(fs)).group_members()
    assert ("foo", "e1000e") in [(m.bdf, m.driver) for m in members]
    with pytest.raises(GroupNotViable, match=r"foo \(driver e1000e\)"):
        PciDevice("0000:00:04.0", str(fs)).check_group_viable()


def test_virtio_nic_interface_found_through_child_device(fs):
    assert PciDevice("0000:00:05.0", str(fs)).net_interfaces == ["eth0"]
    assert PciDevice("0000:00:04.0", str(fs)).net_interfaces == []


def test_plain_nic_interface(fs):
    fs.add("0000:00:19.0", vendor=0x8086, device=0x10D3, pci_class=0x020000, driver="e1000e", group=6, net="enp0s25")
    assert PciDevice("0000:00:19.0", str(fs)).net_interfaces == ["enp0s25"]


def test_cdev_appears_on_vfio_pci(kernel):
    d = PciDevice("0000:00:04.0", str(kernel))
    assert d.vfio_cdev is None
    d.bind_vfio()
    assert d.vfio_cdev == "/dev/vfio/devices/vfio0"


def test_to_json(fs):
    j = PciDevice("0000:00:1f.3", str(fs)).to_json()
    assert j["bdf"] == "0000:00:1f.3" and j["driver"] == "i801_smbus" and j["iommu_group"] == 5
    assert j["class"] == "0c0500" and j["class_name"] == "serial bus"
    assert {"bdf": "0000:00:1f.2", "driver": None} in j["group"]


# --- viability -------------------------------------------------------------------------------------
def test_group_not_viable_names_siblings_and_drivers(fs):
    d = PciDevice("0000:00:1f.2", str(fs))
    with pytest.raises(GroupNotViable) as exc:
        d.check_group_viable()
    msg = str(exc.value)
    assert "IOMMU group 5 is not viable" in msg and "0000:00:1f.3 (driver i801_smbus)" in msg
    assert "0000:00:1f.0" not in msg  # no driver: not in the way
    assert exc.value.errno == 16


def test_bind_vfio_refused_changes_nothing(kernel):
    d = PciDevice("0000:00:1f.2", str(kernel))
    with pytest.raises(GroupNotViable):
        d.bind_vfio()
    assert d.driver is None and d.driver_override is None
    assert kernel.devices["0000:00:1f.3"].driver == "i801_smbus"


@pytest.mark.parametrize("driver", ["vfio-pci", "pci-stub", "pcieport", "mlx5_vfio_pci", None])
def test_siblings_on_dma_neutral_drivers_are_viable(fs, driver):
    fs.add_driver("pci-stub")
    fs.add_driver("mlx5_vfio_pci")
    fs._detach("0000:00:1f.3")
    if driver:
        fs._attach("0000:00:1f.3", driver)
    PciDevice("0000:00:1f.2", str(fs)).check_group_viable()


# --- bind / restore ---------------------------------------------------------------------------------
def test_bind_edu_restore_to_no_driver_and_rebind(kernel):
    d = PciDevice("0000:00:04.0", str(kernel))
    assert d.bind_vfio() is None
    assert d.driver == "vfio-pci" and d.driver_override == "vfio-pci"
    d.restore(None)
    assert d.driver is None and d.driver_override is None and d.vfio_cdev is None
    assert d.bind_vfio() is None and d.driver == "vfio-pci"
    assert d.bind_vfio() == "vfio-pci"  # already there: nothing to do


def test_bind_nic_and_give_it_back(kernel):
    d = PciDevice("0000:00:05.0", str(kernel))
    assert d.bind_vfio() == "virtio-pci"
    assert d.driver == "vfio-pci" and d.net_interfaces == []
    d.restore("virtio-pci")
    assert d.driver == "virtio-pci" and d.driver_override is None and d.net_interfaces == ["eth0"]


def test_restore_to_a_driver_the_probe_did_not_pick(kernel):
    """drivers_probe binds whatever matches; restore then uses the driver's bind file."""
    kernel.devices["0000:00:04.0"].matches = []
    d = PciDevice("0000:00:04.0", str(kernel))
    d.bind_vfio()
    kernel.devices["0000:00:04.0"].matches = ["pcieport"]  # the bind file accepts it; the probe does too
    d.restore("pcieport")
    assert d.driver == "pcieport"


def test_restore_fails_clearly_when_driver_will_not_take_it(kernel):
    d = PciDevice("0000:00:04.0", str(kernel))
    d.bind_vfio()
    with pytest.raises(PyvfioError, match="not e1000e"):
        d.restore("e1000e", timeout=0.05)
    assert d.driver is None and d.driver_override is None


def test_restore_refuses_unknown_or_hostile_driver(kernel):
    d = PciDevice("0000:00:04.0", str(kernel))
    d.bind_vfio()
    with pytest.raises(InvalidDriverName):
        d.restore("../../../x")
    with pytest.raises(NotFound, match="no PCI driver 'nosuch'"):
        d.restore("nosuch")
    assert d.driver == "vfio-pci"  # refused before anything changed


def test_bind_rolls_back_when_the_driver_does_not_bind(kernel, monkeypatch):
    d = PciDevice("0000:00:05.0", str(kernel))
    real = kernel._probe
    monkeypatch.setattr(kernel, "_probe", lambda bdf: None if kernel.override(bdf) else real(bdf))
    with pytest.raises(PyvfioError, match=r"did not bind to vfio-pci.*restored virtio-pci"):
        d.bind("vfio-pci", timeout=0.05)
    assert d.driver == "virtio-pci" and d.driver_override is None


def test_bind_to_unregistered_driver(kernel):
    with pytest.raises(NotFound, match="modprobe nosuch"):
        PciDevice("0000:00:04.0", str(kernel)).bind("nosuch")


def test_unbind_returns_previous_driver(kernel):
    d = PciDevice("0000:00:1f.3", str(kernel))
    assert d.unbind() == "i801_smbus" and d.driver is None
    assert d.unbind() is None


def test_write_errors_are_named(fs):
    d = PciDevice("0000:00:04.0", str(fs))
    attr = fs.dev_dir("0000:00:04.0") / "driver_override"
    attr.unlink()
    attr.mkdir()  # a write fails with EISDIR, even as root
    with pytest.raises(PyvfioError, match=r"write 'vfio-pci' to .*driver_override on 0000:00:04.0.*EISDIR"):
        d.set_driver_override("vfio-pci")


def test_module_keeps_its_public_names():
    for name in ("parse_bdf", "PciDevice", "GroupMember", "InvalidBdf", "VFIO_DRIVER"):
        assert hasattr(sysfs, name)
