"""The node's links and addresses, and each pod veth's peer addresses, read over netlink.

The thin edge of flowmap_agent.plumbing, which decides what they mean. A pod's addresses are
read in the pod's own namespace without entering it: ``RTM_GETADDR`` with
``IFA_TARGET_NETNSID`` (Linux 4.20) names the namespace by the id the node's namespace gives it,
the one a host-side veth reports for its peer (``IFLA_LINK_NETNSID``). That needs no route (a
bridge CNI has none per pod), no runtime socket and no hostPID, only NET_ADMIN over the pod's
namespace, which the agent holds in the node's. pyroute2 (0.9) has no call for it and declares
the attribute a string, so the request is built with its message class, the attribute an s32 as
the kernel reads it; the kernel honours it only on a socket with strict checking.

The alternatives were weaker: bridge FDB or neighbour entries tie a pod's MAC or IP to a bridge
port only once the pod has sent something (and ageing forgets them), per-pod host routes do not
exist on bridge CNIs, and the runtime's namespaces are not visible without hostPID or its socket.
"""

from __future__ import annotations

import ctypes
import logging
import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace

from pyroute2 import IPRoute, WireGuard
from pyroute2.netlink import NLM_F_DUMP, NLM_F_REQUEST
from pyroute2.netlink.exceptions import NetlinkError
from pyroute2.netlink.rtnl import RTM_GETADDR
from pyroute2.netlink.rtnl.ifaddrmsg import ifaddrmsg
from pyroute2.netlink.rtnl.ifinfmsg import ifinfmsg

from flowmap_agent.plumbing import Address, Link, PeerKey, Seen, global_addresses, to_read

log = logging.getLogger("flowmap.agent.links")
_CLONE_NEWNET = 0x40000000
IFF_UP = 0x1
NUD_INCOMPLETE, NUD_FAILED = 0x01, 0x20


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
    """An IPRoute socket in ``netns``, or in our own namespace, with strict checking."""
    with in_netns(netns):
        ipr = IPRoute(strict_check=True)
    with ipr:
        yield ipr


# pyroute2 is untyped: --strict refuses a subclass of what it cannot see, the default run does not.
class _ifaddrmsg_target(ifaddrmsg):  # type: ignore[misc, unused-ignore]  # noqa: N801 - pyroute2's naming
    """``ifaddrmsg`` with IFA_TARGET_NETNSID an s32, as the kernel reads it."""

    nla_map = tuple((name, "int32" if name == "IFA_TARGET_NETNSID" else kind) for name, kind in ifaddrmsg.nla_map)
    # pyroute2 compiles a class's map on its first message and keeps it on the class: a subclass
    # made after ifaddrmsg was used would inherit ifaddrmsg's compiled one, not this map.
    _nlmsg_base__compiled_nla = False


@dataclass
class View:
    """One reading of the node's plumbing."""

    links: list[Link]
    addresses: list[Address]
    peers: dict[PeerKey, Seen]  # every pod veth's peer addresses known now


@dataclass
class Reader:
    """Reads the node's plumbing in ``netns`` ("" for ours), remembering what each pod's veth
    peer held: a pod's addresses do not change while its veth lives, so only new (or still
    empty) peers are read each time."""

    netns: str = ""
    peers: dict[PeerKey, Seen] = field(default_factory=dict)

    def read(self, missing: bool = False, now: float = 0.0) -> View:
        """Links, addresses, and the peers of new veths (and of all, every ``REREAD`` seconds,
        while ``missing``: a pod IP not found)."""
        with _ipr(self.netns) as ipr:
            links = [_link(msg) for msg in ipr.get_links()]
            addresses = [_address(msg) for msg in ipr.get_addr()]
            for key in to_read(links, self.peers, missing, now):
                self.peers[key] = Seen(global_addresses(_peer_addresses(ipr, key)), now)
        links = [replace(link, port=self._wireguard_port(link.name)) if link.kind == "wireguard" else link
                 for link in links]
        alive = {link.peer_key for link in links}
        for key in [k for k in self.peers if k not in alive]:
            del self.peers[key]
        return View(links, addresses, dict(self.peers))

    def neighbours(self) -> dict[str, list[str]]:
        """The neighbour table's entries that hold a link-layer address (not failed or still
        resolving): MAC (lower case) -> addresses. The node's VMs are known by their MACs."""
        found: dict[str, list[str]] = {}
        with _ipr(self.netns) as ipr:
            for msg in ipr.get_neighbours():
                mac, ip = msg.get_attr("NDA_LLADDR"), msg.get_attr("NDA_DST")
                if mac and ip and not msg["state"] & (NUD_INCOMPLETE | NUD_FAILED):
                    found.setdefault(str(mac).lower(), []).append(str(ip))
        return found

    def _wireguard_port(self, name: str) -> int:
        """A WireGuard device's listen port, over generic netlink; 0 if it cannot be read (then
        WireGuard's usual port is assumed). pyroute2 opens the socket at its first request, so
        the request is made in the namespace too."""
        try:
            with in_netns(self.netns), WireGuard() as wg:
                replies = list(wg.info(name))
        except Exception as exc:  # noqa: BLE001 - an optional detail (untested here: no wireguard module)
            log.warning("cannot read the listen port of %s (%s): assuming 51820", name, exc)
            return 0
        return next((int(port) for msg in replies if (port := msg.get_attr("WGDEVICE_A_LISTEN_PORT"))), 0)


def _link(msg: ifinfmsg) -> Link:
    info = msg.get_attr("IFLA_LINKINFO")
    kind = (info.get_attr("IFLA_INFO_KIND") if info is not None else None) or ""
    data = info.get_attr("IFLA_INFO_DATA") if info is not None else None
    port = 0
    if kind == "vxlan" and data is not None:
        port = data.get_attr("IFLA_VXLAN_PORT") or 0
    elif kind == "geneve" and data is not None:
        port = data.get_attr("IFLA_GENEVE_PORT") or 0
    return Link(index=msg["index"], name=msg.get_attr("IFLA_IFNAME") or "", kind=kind,
                up=bool(msg["flags"] & IFF_UP), peer=msg.get_attr("IFLA_LINK") or 0,
                peer_netns=msg.get_attr("IFLA_LINK_NETNSID"), port=port, master=msg.get_attr("IFLA_MASTER") or 0)


def _address(msg: ifaddrmsg) -> Address:
    # IFA_LOCAL is our end of a point-to-point link (IFA_ADDRESS the peer's); IPv6 has only IFA_ADDRESS.
    return Address(msg["index"], msg.get_attr("IFA_LOCAL") or msg.get_attr("IFA_ADDRESS"), msg["scope"])


def _peer_addresses(ipr: IPRoute, key: PeerKey) -> list[Address]:
    """The addresses of a veth's peer, read in the peer's namespace; [] if it went away."""
    _index, netnsid, peer = key
    request = _ifaddrmsg_target()
    request["family"] = socket.AF_UNSPEC
    request["index"] = peer  # the kernel filters by index under strict checking
    request["attrs"] = [("IFA_TARGET_NETNSID", netnsid)]
    try:
        sent = ipr.put(request, RTM_GETADDR, NLM_F_REQUEST | NLM_F_DUMP)
        replies = ipr.get(msg_seq=sent.msg["header"]["sequence_number"])
    except NetlinkError as exc:  # the namespace went away between the two dumps
        log.debug("addresses of %s: %s", key, exc)
        return []
    return [_address(msg) for msg in replies if msg["index"] == peer and msg.get_attr("IFA_ADDRESS")]
