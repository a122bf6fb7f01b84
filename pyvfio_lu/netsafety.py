"""Refuse to take a NIC away from the kernel while the host is using it (pyroute2/netlink).

Before a device that backs a network interface is unbound, :func:`check_device` looks at
each of its interfaces through netlink: is the link up, which addresses does it carry,
which routes go through it. Anything active is an :class:`InterfaceInUse` naming the
interface and what is active, unless ``force``. (dpdk-devbind refuses on the routing table
alone; this names every reason so the operator knows what to take down.)

The decision and the message are pure functions of what netlink reports
(:func:`usage_of`, :func:`refusal_reason`, :func:`check_interfaces`); only
:class:`Pyroute2Netlink` talks to the kernel, so the logic can be tested with a fake.
"""

from __future__ import annotations

import errno
import socket
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from .errors import PyvfioError

if TYPE_CHECKING:
    from collections.abc import Iterable

    from typing_extensions import Self  # typing.Self from 3.11; type checkers ship this stub

    from .sysfs import PciDevice

IFF_UP = 0x1
RT_TABLE_MAIN = 254
RT_TABLE_LOCAL = 255
RTN_UNICAST = 1


class InterfaceInUse(PyvfioError):
    """The device backs a network interface that is up, addressed or routed."""

    def __init__(self, err: int | None, operation: str, target: str = "", reason: str = "",
                 usage: Iterable[InterfaceUsage] = ()):
        self.usage = list(usage)
        super().__init__(err, operation, target, reason)


class NetworkCheckFailed(InterfaceInUse):
    """The interfaces could not be inspected through netlink, so the device is treated as in use."""


# --- what netlink reports -----------------------------------------------------------------------
@dataclass(frozen=True)
class Link:
    index: int
    name: str
    flags: int
    operstate: str | None = None

    @property
    def up(self) -> bool:
        return bool(self.flags & IFF_UP)


@dataclass(frozen=True)
class Address:
    address: str
    prefixlen: int
    family: int = socket.AF_INET

    def __str__(self) -> str:
        return f"{self.address}/{self.prefixlen}"


@dataclass(frozen=True)
class Route:
    dst: str | None  # None: the default route
    dst_len: int
    gateway: str | None = None
    table: int = RT_TABLE_MAIN
    type: int = RTN_UNICAST
    family: int = socket.AF_INET

    @property
    def counts(self) -> bool:
        """A route the host uses to send traffic: not the local table (its local and broadcast
        routes only mirror the addresses), and unicast."""
        return self.table != RT_TABLE_LOCAL and self.type == RTN_UNICAST

    def __str__(self) -> str:
        # S104: 0.0.0.0 here is a route's destination, not an address anything binds to
        where = ("default" if not self.dst or (self.dst_len == 0 and self.dst in ("0.0.0.0", "::"))  # noqa: S104
                 else f"{self.dst}/{self.dst_len}")
        text = where + (f" via {self.gateway}" if self.gateway else "")
        if self.table not in (RT_TABLE_MAIN, RT_TABLE_LOCAL):
            text += f" table {self.table}"
        return text


class Netlink(Protocol):
    """The three questions the check asks (a fake in the unit tests, pyroute2 for real)."""

    def link(self, ifname: str) -> Link | None: ...
    def addresses(self, index: int) -> list[Address]: ...
    def routes(self, index: int) -> list[Route]: ...


# --- the decision (pure) --------------------------------------------------------------------------
@dataclass
class InterfaceUsage:
    name: str
    up: bool
    addresses: list[str] = field(default_factory=list)
    routes: list[str] = field(default_factory=list)

    @property
    def active(self) -> bool:
        return self.up or bool(self.addresses) or bool(self.routes)

    def describe(self) -> str:
        parts = []
        if self.up:
            parts.append("link is up")
        if self.addresses:
            parts.append("addresses " + ", ".join(self.addresses))
        if self.routes:
            parts.append("routes " + ", ".join(self.routes))
        return f"{self.name}: " + ("; ".join(parts) if parts else "idle")

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "up": self.up, "addresses": self.addresses, "routes": self.routes,
                "active": self.active}


def usage_of(ifname: str, netlink: Netlink) -> InterfaceUsage:
    """What is active on ``ifname``: link state, addresses, routes through it."""
    link = netlink.link(ifname)
    if link is None:  # gone between the sysfs listing and now: nothing to protect
        return InterfaceUsage(ifname, False)
    addrs = [str(a) for a in netlink.addresses(link.index)]
    routes = [str(r) for r in netlink.routes(link.index) if r.counts]
    return InterfaceUsage(ifname, link.up, addrs, routes)


def refusal_reason(bdf: str, active: Iterable[InterfaceUsage]) -> str:
    """The message for a refused unbind: every active interface and what is active on it,
    and how to take it down."""
    active = list(active)
    names = [u.name for u in active]
    how = " && ".join(f"ip link set dev {n} down && ip addr flush dev {n}" for n in names)
    return (f"{bdf} backs network interface{'s' if len(active) > 1 else ''} in use: "
            + " | ".join(u.describe() for u in active)
            + f". Take {'them' if len(active) > 1 else 'it'} down first ({how}), or force")


def check_interfaces(bdf: str, ifnames: Iterable[str], netlink: Netlink, force: bool = False) -> list[InterfaceUsage]:
    """InterfaceInUse if any of ``ifnames`` is active (unless ``force``); returns the usage seen."""
    usage = [usage_of(name, netlink) for name in ifnames]
    active = [u for u in usage if u.active]
    if active and not force:
        raise InterfaceInUse(errno.EBUSY, "unbind network device", bdf, refusal_reason(bdf, active), usage=active)
    return usage


# --- the kernel (pyroute2) ------------------------------------------------------------------------
class Pyroute2Netlink:
    """:class:`Netlink` over one pyroute2 ``IPRoute`` socket (closed by :meth:`close`)."""

    def __init__(self) -> None:
        from pyroute2 import IPRoute  # deferred: pyroute2 is heavy and only needed here

        self._ipr = IPRoute()

    def link(self, ifname: str) -> Link | None:
        indices = self._ipr.link_lookup(ifname=ifname)
        if not indices:
            return None
        msg = self._ipr.get_links(indices[0])[0]
        return Link(indices[0], ifname, msg["flags"], msg.get_attr("IFLA_OPERSTATE"))

    def addresses(self, index: int) -> list[Address]:
        return [Address(a.get_attr("IFA_ADDRESS"), a["prefixlen"], a["family"])
                for a in self._ipr.get_addr(index=index)]

    def routes(self, index: int) -> list[Route]:
        out = []
        for r in self._ipr.get_routes(oif=index):
            table = r.get_attr("RTA_TABLE")
            out.append(Route(r.get_attr("RTA_DST"), r["dst_len"], r.get_attr("RTA_GATEWAY"),
                             table if table is not None else r["table"], r["type"], r["family"]))
        return out

    def close(self) -> None:
        self._ipr.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_netlink() -> Pyroute2Netlink:
    """The real netlink layer (a seam for tests)."""
    return Pyroute2Netlink()


def interface_usage(ifname: str) -> InterfaceUsage:
    """Link state, addresses and routes of ``ifname``, read through netlink."""
    with open_netlink() as nl:
        return usage_of(ifname, nl)


def check_device(pci: PciDevice, force: bool = False, netlink: Netlink | None = None) -> list[InterfaceUsage]:
    """InterfaceInUse if ``pci`` backs an active interface (unless ``force``); returns the usage seen.

    When the interfaces cannot be inspected (no pyroute2, a netlink error) the device is
    treated as in use: NetworkCheckFailed, unless ``force``.
    """
    names = pci.net_interfaces
    if not names:
        return []
    if netlink is not None:
        return check_interfaces(pci.bdf, names, netlink, force)
    try:
        nl = open_netlink()
    except Exception as exc:  # noqa: BLE001 - ImportError, or the netlink socket could not be opened
        if force:
            return []
        raise NetworkCheckFailed(errno.EIO, "unbind network device", pci.bdf,
                                 f"{pci.bdf} backs {', '.join(names)} but netlink could not be queried "
                                 f"({type(exc).__name__}: {exc}); check by hand, then force") from None
    try:
        return check_interfaces(pci.bdf, names, nl, force)
    except InterfaceInUse:
        raise
    except Exception as exc:  # noqa: BLE001 - any netlink error while asking
        if force:
            return []
        raise NetworkCheckFailed(errno.EIO, "unbind network device", pci.bdf,
                                 f"{pci.bdf} backs {', '.join(names)} but netlink failed "
                                 f"({type(exc).__name__}: {exc}); check by hand, then force") from None
    finally:
        nl.close()
