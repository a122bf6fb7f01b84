"""Refuse to take a NIC away from the kernel while the host is using it (pyroute2/netlink).

Before a device that backs a network interface is unbound, :func:`check_device` looks at
each of its interfaces through netlink: is the link up, which addresses does it carry,
which routes go through it. Anything active is an :class:`InterfaceInUse` naming the
interface and what is active, unless ``force``. (dpdk-devbind refuses on the routing table
alone; this names every reason so the operator knows what to take down.)
"""

from __future__ import annotations

import errno
from dataclasses import dataclass, field

from .errors import PyvfioError
from .sysfs import PciDevice


class InterfaceInUse(PyvfioError):
    """The device backs a network interface that is up, addressed or routed."""

    def __init__(self, err, operation, target="", reason="", usage: list["InterfaceUsage"] = ()):
        self.usage = list(usage)
        super().__init__(err, operation, target, reason)


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


def interface_usage(ifname: str) -> InterfaceUsage:
    """Link state, addresses and routes of ``ifname``, read through netlink."""
    from pyroute2 import IPRoute  # deferred: pyroute2 is heavy and only needed here

    with IPRoute() as ipr:
        links = ipr.link_lookup(ifname=ifname)
        if not links:
            return InterfaceUsage(ifname, False)
        index = links[0]
        link = ipr.get_links(index)[0]
        up = bool(link["flags"] & 1)  # IFF_UP
        addrs = [f"{a.get_attr('IFA_ADDRESS')}/{a['prefixlen']}" for a in ipr.get_addr(index=index)]
        routes = []
        for r in ipr.get_routes(oif=index):
            if r.get_attr("RTA_TABLE") not in (254, None):  # main table only: local/broadcast are implied by addresses
                continue
            dst = r.get_attr("RTA_DST")
            gw = r.get_attr("RTA_GATEWAY")
            routes.append(f"{dst or 'default'}/{r['dst_len']}" + (f" via {gw}" if gw else ""))
    return InterfaceUsage(ifname, up, addrs, routes)


def check_device(pci: PciDevice, force: bool = False) -> list[InterfaceUsage]:
    """InterfaceInUse if ``pci`` backs an active interface (unless ``force``); returns the usage seen."""
    usage = [interface_usage(name) for name in pci.net_interfaces]
    active = [u for u in usage if u.active]
    if active and not force:
        raise InterfaceInUse(errno.EBUSY, "unbind network device", pci.bdf,
                             f"{pci.bdf} backs network interfaces in use: "
                             + " | ".join(u.describe() for u in active)
                             + " (take them down first, or force)", usage=active)
    return usage
