"""Which host interface leads to each local pod, read from the kernel's routes over netlink.

CNIs like kindnet and Calico route each pod with a host route (/32 or /128) through the host
side of the pod's veth; the dp captures there. The node's own addresses tell the uplinks, and
the uplinks' addresses tell the dp what the node itself sends.
"""

from __future__ import annotations

import ctypes
import os
import socket
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

from pyroute2 import IPRoute

_CLONE_NEWNET = 0x40000000
RT_SCOPE_UNIVERSE = 0


@contextmanager
def in_netns(netns: str) -> Iterator[None]:
    """Run the body with this thread in ``netns`` (a name under /run/netns; "" stays here).

    A netlink socket stays in the namespace it was made in, so sockets made in the body can be
    used afterwards from here; pyroute2's own netns mode would fork a helper process from this
    multi-threaded one.
    """
    if not netns:
        yield
        return
    libc = ctypes.CDLL(None, use_errno=True)
    with open("/proc/thread-self/ns/net", "rb") as home, open(f"/run/netns/{netns}", "rb") as there:
        if libc.setns(there.fileno(), _CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()), netns)
        try:
            yield
        finally:
            if libc.setns(home.fileno(), _CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), "cannot return to the agent's network namespace")


@contextmanager
def _ipr(netns: str) -> Iterator[IPRoute]:
    """An IPRoute socket in ``netns``, or in our own namespace."""
    with in_netns(netns):
        ipr = IPRoute()
    with ipr:
        yield ipr


def pod_interfaces(pod_ips: Iterable[str], netns: str = "") -> dict[str, str]:
    """Pod IP -> host interface name, for the pods that have a host route."""
    wanted = set(pod_ips)
    out: dict[str, str] = {}
    with _ipr(netns) as ipr:
        names = {link["index"]: link.get_attr("IFLA_IFNAME") for link in ipr.get_links()}
        for family, full in ((socket.AF_INET, 32), (socket.AF_INET6, 128)):
            for route in ipr.get_routes(family=family):
                dst, oif = route.get_attr("RTA_DST"), route.get_attr("RTA_OIF")
                if route["dst_len"] == full and dst in wanted and oif in names:
                    out[dst] = names[oif]
    return out


def address_interfaces(addresses: Iterable[str], netns: str = "") -> set[str]:
    """The interfaces holding any of these addresses (the node's uplinks)."""
    wanted = set(addresses)
    with _ipr(netns) as ipr:
        names = {link["index"]: link.get_attr("IFLA_IFNAME") for link in ipr.get_links()}
        return {names[a["index"]] for a in ipr.get_addr() if a.get_attr("IFA_ADDRESS") in wanted
                and a["index"] in names}


def interface_addresses(interfaces: Iterable[str], netns: str = "") -> set[str]:
    """The global addresses on these interfaces (link-local ones never leave their link)."""
    wanted = set(interfaces)
    with _ipr(netns) as ipr:
        names = {link["index"]: link.get_attr("IFLA_IFNAME") for link in ipr.get_links()}
        # IFA_LOCAL is our end of a point-to-point link (IFA_ADDRESS the peer's); IPv6 has only IFA_ADDRESS.
        return {a.get_attr("IFA_LOCAL") or a.get_attr("IFA_ADDRESS") for a in ipr.get_addr()
                if a["scope"] == RT_SCOPE_UNIVERSE and names.get(a["index"]) in wanted}
