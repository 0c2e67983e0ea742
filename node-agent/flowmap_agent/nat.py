"""Undo the node's source NAT, so that masqueraded pod traffic counts once, under the pod.

A pod's connection to the outside usually leaves the node masqueraded (kindnet, ip-masq-agent,
most CNIs): its request is captured where it enters, on the pod's veth, as pod -> server; the
same request leaves the uplink as node -> server (the node's address as its source, so the dp
keeps it: the node's own traffic), and the answer comes back on the uplink as server -> node,
before the kernel turns it back into server -> pod. So the dp reports two sessions: the pod's,
with only its request, and the node's, with a copy of the request and the whole answer.

The kernel's connection tracking knows both: looking the node's session up by its reply tuple
(server -> node) gives the original tuple. When that original client is a pod of this node, the
node's session becomes the pod's (a libvirt VM of this node's too: libvirt's NAT networks
masquerade its VMs the same way) — its answer bytes are the pod's answer, its request bytes a
copy already counted on the veth (dropped), and it opens nothing. When the original client is
not a pod of this node (a NodePort's SNAT of an outside client), the node's session is the
kernel's plumbing of a connection counted as it entered: it is dropped. When the original client
is the node itself (kube-proxy and flannel masquerade a hostNetwork client of a ClusterIP onto the
bridge's or the tunnel's address), the session is the node's own, seen nowhere else: it stays.
Sessions conntrack does not know (not NATed, or expired) are left as they are.

Lookups go to the kernel once per session (a bounded cache remembers them), only for sessions
whose client is one of the node's addresses.
"""

from __future__ import annotations

import ipaddress
import socket
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping

from flowmap_agent.errors import NoConntrack
from flowmap_dp import wire_pb2

# (l4 protocol, client, client port, server, server port) -> the original (client, port, server,
# port) of a source-NATed session, or None when it was not source-NATed.
Tuple5 = tuple[int, str, int, str, int]
Original = tuple[str, int, str, int] | None
Lookup = Callable[[Tuple5], Original]
# (l4 protocol, client, client port, server, server port) as the client sent it -> the (address,
# port) the kernel sent it to, when it translated the destination (a ClusterIP's DNAT), else None.
Destination = Callable[[Tuple5], tuple[str, int] | None]
CACHE = 65536
_PORTED = (6, 17, 132)  # protocols with ports in their conntrack tuple


class Unnat:
    def __init__(self, lookup: Lookup, node_addresses: Iterable[str], local_pods: Mapping[str, str]) -> None:
        # The node's own addresses: the agent replaces them when the node's plumbing changes.
        self.lookup, self.node_addresses, self.local_pods = lookup, frozenset(node_addresses), local_pods
        self.local_vms: Mapping[str, str] = {}  # the node's libvirt VMs' addresses, which the agent replaces
        self._cache: OrderedDict[Tuple5, Original] = OrderedDict()
        self.translated = 0  # sessions that became their pod's
        self.dropped = 0  # sessions that were the kernel's plumbing of one counted elsewhere

    def apply(self, report: wire_pb2.Report) -> None:
        """Rewrite ``report``'s sessions in place."""
        keep = []
        for s in report.sessions:
            if s.ip_proto not in _PORTED or len(s.client_ip) not in (4, 16):
                keep.append(s)
                continue
            client = str(ipaddress.ip_address(s.client_ip))
            if client not in self.node_addresses:
                keep.append(s)
                continue
            original = self._original((s.ip_proto, client, s.client_port,
                                       str(ipaddress.ip_address(s.server_ip)), s.server_port))
            if original is None or original[0] in self.node_addresses:
                # Not NATed, or the node's own traffic given another of its addresses (a hostNetwork
                # client of a ClusterIP, masqueraded onto cni0's or flannel.1's address): it entered
                # the network nowhere else, so it is counted here, as the node's.
                keep.append(s)
            elif original[0] in self.local_pods or original[0] in self.local_vms:
                s.client_ip, s.client_port = ipaddress.ip_address(original[0]).packed, original[1]
                s.server_ip, s.server_port = ipaddress.ip_address(original[2]).packed, original[3]
                s.bytes_c2s = s.packets_c2s = 0
                s.opened = False
                keep.append(s)
                self.translated += 1
            else:
                self.dropped += 1
        if len(keep) != len(report.sessions):
            del report.sessions[:]
            report.sessions.extend(keep)

    def _original(self, key: Tuple5) -> Original:
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        found = self.lookup(key)
        self._cache[key] = found
        if len(self._cache) > CACHE:
            self._cache.popitem(last=False)
        return found


def conntrack_lookup(netns: str) -> tuple[Lookup, Destination, Callable[[], None]]:
    """Lookups in the kernel's connection tracking of ``netns`` ("" for ours): a session's original
    tuple by its reply, its translated destination by its original; and their closer. Both run
    on the thread that made them (pyroute2's sockets)."""
    from pyroute2.netlink.exceptions import NetlinkError
    from pyroute2.netlink.nfnetlink.nfctsocket import NFCTAttrTuple, NFCTSocket

    from flowmap_agent.links import in_netns

    sockets: dict[socket.AddressFamily, NFCTSocket] = {}
    for family in (socket.AF_INET, socket.AF_INET6):
        try:
            with in_netns(netns):
                sock = NFCTSocket(family)
                sock.stat()  # pyroute2 opens the netlink socket at its first request: here, in the namespace
        except (NetlinkError, OSError) as exc:
            for opened in sockets.values():
                opened.close()
            raise NoConntrack(str(exc)) from exc
        sockets[family] = sock

    def lookup(key: Tuple5) -> Original:
        proto, client, cport, server, sport = key
        family = socket.AF_INET6 if ":" in client else socket.AF_INET
        reply = NFCTAttrTuple(family=family, saddr=server, daddr=client, proto=proto, sport=sport, dport=cport)
        try:
            messages = sockets[family].entry("get", tuple_reply=reply)
        except NetlinkError:
            return None  # not tracked (or no longer)
        for msg in messages:
            orig = msg.get_attr("CTA_TUPLE_ORIG")
            if orig is not None:
                o = NFCTAttrTuple.from_netlink(family, orig)
                return None if o.saddr == client else (o.saddr, o.sport, o.daddr, o.dport)
        return None

    def destination(key: Tuple5) -> tuple[str, int] | None:
        proto, client, cport, server, sport = key
        family = socket.AF_INET6 if ":" in client else socket.AF_INET
        orig = NFCTAttrTuple(family=family, saddr=client, daddr=server, proto=proto, sport=cport, dport=sport)
        try:
            messages = sockets[family].entry("get", tuple_orig=orig)
        except NetlinkError:
            return None
        for msg in messages:
            reply = msg.get_attr("CTA_TUPLE_REPLY")
            if reply is not None:
                r = NFCTAttrTuple.from_netlink(family, reply)
                return None if (r.saddr, r.sport) == (server, sport) else (r.saddr, r.sport)
        return None

    def close() -> None:
        for sock in sockets.values():
            sock.close()

    return lookup, destination, close
