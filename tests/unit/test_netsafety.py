"""The network safety check's logic, with a fake netlink layer: what counts as "in use",
the refusal message (interface, addresses, routes, how to take it down), force, and the
device -> interface lookup through the fake sysfs (a virtio NIC's eth0 hangs off virtio0)."""

from __future__ import annotations

import socket

import pytest
from fake_sysfs import guest_like

from pyvfio_lu import netsafety
from pyvfio_lu.netsafety import (
    RT_TABLE_LOCAL,
    Address,
    InterfaceInUse,
    Link,
    NetworkCheckFailed,
    Route,
    check_device,
    check_interfaces,
    refusal_reason,
    usage_of,
)
from pyvfio_lu.sysfs import PciDevice

RTN_LOCAL, RTN_BROADCAST = 2, 3


class FakeNetlink:
    """Answers the three netlink questions from dicts (what `ip link/addr/route` would show)."""

    def __init__(self, links=None, addrs=None, routes=None):
        self.links = links or {}
        self.addrs = addrs or {}
        self.routes_by_index = routes or {}
        self.asked: list[str] = []
        self.closed = False

    def link(self, ifname):
        self.asked.append(ifname)
        return self.links.get(ifname)

    def addresses(self, index):
        return self.addrs.get(index, [])

    def routes(self, index):
        return self.routes_by_index.get(index, [])

    def close(self):
        self.closed = True

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def guest_eth0() -> FakeNetlink:
    """eth0 as the test guest's init.sh leaves it (plus what the kernel adds in the local table)."""
    return FakeNetlink(
        links={"eth0": Link(2, "eth0", 0x11043, "UP")},
        addrs={2: [Address("10.0.2.15", 24)]},
        routes={2: [Route(None, 0, "10.0.2.2"),
                    Route("10.0.2.0", 24),
                    Route("10.0.2.15", 32, table=RT_TABLE_LOCAL, type=RTN_LOCAL),
                    Route("10.0.2.255", 32, table=RT_TABLE_LOCAL, type=RTN_BROADCAST)]})


def test_active_interface_is_described_completely():
    u = usage_of("eth0", guest_eth0())
    assert u.active and u.up
    assert u.addresses == ["10.0.2.15/24"]
    assert u.routes == ["default via 10.0.2.2", "10.0.2.0/24"]  # local-table routes left out
    assert u.describe() == "eth0: link is up; addresses 10.0.2.15/24; routes default via 10.0.2.2, 10.0.2.0/24"


def test_refusal_names_interface_address_route_and_remedy():
    nl = guest_eth0()
    with pytest.raises(InterfaceInUse) as exc:
        check_interfaces("0000:00:05.0", ["eth0"], nl)
    e = exc.value
    msg = str(e)
    for part in ("0000:00:05.0", "eth0", "link is up", "10.0.2.15/24", "default via 10.0.2.2",
                 "ip link set dev eth0 down && ip addr flush dev eth0", "force"):
        assert part in msg, part
    assert e.errno == 16 and [u.name for u in e.usage] == ["eth0"]


def test_down_and_flushed_interface_passes():
    nl = FakeNetlink(links={"eth0": Link(2, "eth0", 0x1002, "DOWN")})
    usage = check_interfaces("0000:00:05.0", ["eth0"], nl)
    assert [u.active for u in usage] == [False]
    assert usage[0].describe() == "eth0: idle"


@pytest.mark.parametrize("links, addrs, routes, expect", [
    ({"eth0": Link(2, "eth0", 0x1)}, {}, {}, "link is up"),
    ({"eth0": Link(2, "eth0", 0x0)}, {2: [Address("fe80::1", 64, socket.AF_INET6)]}, {}, "addresses fe80::1/64"),
    ({"eth0": Link(2, "eth0", 0x0)}, {}, {2: [Route("192.168.0.0", 16, "10.0.2.1", table=100)]},
     "routes 192.168.0.0/16 via 10.0.2.1 table 100"),
])
def test_each_kind_of_activity_alone_refuses(links, addrs, routes, expect):
    with pytest.raises(InterfaceInUse, match=expect):
        check_interfaces("0000:00:05.0", ["eth0"], FakeNetlink(links, addrs, routes))


def test_only_local_table_routes_do_not_count():
    nl = FakeNetlink(links={"eth0": Link(2, "eth0", 0)},
                     routes={2: [Route("10.0.2.15", 32, table=RT_TABLE_LOCAL, type=RTN_LOCAL)]})
    assert not usage_of("eth0", nl).active


def test_vanished_interface_is_idle():
    assert not usage_of("eth9", FakeNetlink()).active


def test_force_returns_the_usage_instead_of_refusing():
    usage = check_interfaces("0000:00:05.0", ["eth0"], guest_eth0(), force=True)
    assert usage[0].active and usage[0].to_json()["addresses"] == ["10.0.2.15/24"]


def test_several_interfaces_all_named():
    nl = guest_eth0()
    nl.links["eth1"] = Link(3, "eth1", 0x1)
    nl.links["eth2"] = Link(4, "eth2", 0x0)
    with pytest.raises(InterfaceInUse) as exc:
        check_interfaces("0000:00:05.0", ["eth0", "eth1", "eth2"], nl)
    msg = str(exc.value)
    # eth2 is idle: neither listed nor in the remedy
    assert "interfaces in use" in msg and "eth0:" in msg and "eth1: link is up" in msg and "eth2" not in msg
    assert "Take them down" in msg


def test_refusal_reason_is_pure():
    u = netsafety.InterfaceUsage("eth0", True, ["10.0.2.15/24"], ["default via 10.0.2.2"])
    assert refusal_reason("0000:00:05.0", [u]).startswith(
        "0000:00:05.0 backs network interface in use: eth0: link is up; addresses 10.0.2.15/24; "
        "routes default via 10.0.2.2. Take it down first")


@pytest.mark.parametrize("route, text", [
    (Route(None, 0, "10.0.2.2"), "default via 10.0.2.2"),
    (Route("0.0.0.0", 0, "10.0.2.2"), "default via 10.0.2.2"),
    (Route("::", 0, "fe80::1", family=socket.AF_INET6), "default via fe80::1"),
    (Route("10.0.2.0", 24), "10.0.2.0/24"),
])
def test_route_text(route, text):
    assert str(route) == text


# --- the device -> interfaces -> netlink path -------------------------------------------------------
@pytest.fixture
def fs(tmp_path):
    return guest_like(tmp_path / "sys")


def test_check_device_finds_eth0_under_the_virtio_child(fs):
    nl = guest_eth0()
    with pytest.raises(InterfaceInUse, match="eth0"):
        check_device(PciDevice("0000:00:05.0", str(fs)), netlink=nl)
    assert nl.asked == ["eth0"]


def test_device_without_interfaces_never_asks_netlink(fs, monkeypatch):
    monkeypatch.setattr(netsafety, "open_netlink", lambda: pytest.fail("netlink opened"))
    assert check_device(PciDevice("0000:00:04.0", str(fs))) == []


def test_default_netlink_is_opened_and_closed(fs, monkeypatch):
    nl = guest_eth0()
    monkeypatch.setattr(netsafety, "open_netlink", lambda: nl)
    with pytest.raises(InterfaceInUse):
        check_device(PciDevice("0000:00:05.0", str(fs)))
    assert nl.closed


def test_netlink_unavailable_refuses_unless_forced(fs, monkeypatch):
    def broken():
        raise ImportError("No module named 'pyroute2'")

    monkeypatch.setattr(netsafety, "open_netlink", broken)
    pci = PciDevice("0000:00:05.0", str(fs))
    with pytest.raises(NetworkCheckFailed, match=r"backs eth0 but netlink could not be queried.*pyroute2"):
        check_device(pci)
    assert check_device(pci, force=True) == []


def test_netlink_error_while_asking_refuses(fs, monkeypatch):
    nl = guest_eth0()
    nl.addresses = lambda index: (_ for _ in ()).throw(OSError(105, "No buffer space"))
    monkeypatch.setattr(netsafety, "open_netlink", lambda: nl)
    with pytest.raises(NetworkCheckFailed, match="netlink failed"):
        check_device(PciDevice("0000:00:05.0", str(fs)))
    assert nl.closed
