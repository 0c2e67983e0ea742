"""What the node's links mean for capture (pure): the host interface of each pod, the node's own
addresses, the overlay's tunnels and what they put on the wire.

flowmap_agent.links reads the kernel's links and addresses over netlink into the plain values
below; everything decided from them is decided here.

**Pods, on any veth-based CNI, without routes.** The host side of a pod's veth names its peer:
``IFLA_LINK`` (the peer's index) in ``IFLA_LINK_NETNSID`` (the pod's namespace, as the node's
namespace numbers it). The addresses that peer holds are the pod's, so the host-side veth of a
pod is found the same way whether the CNI routes each pod (ptp, Calico, kindnet, the AWS VPC CNI,
Cilium) or bridges them (the bridge plugin, flannel, kubenet). Not found: pods whose interface
is no veth (macvlan, ipvlan, SR-IOV), which no host interface of the node carries anyway.

**A pod's secondary networks** (Multus, flowmap_api.networks): a network a veth-based plugin
attaches (bridge, ptp) gives the pod another veth, its peer (``net1`` …) in the same namespace
as the pod's own. An address the pod's annotation claims is taken only where the kernel
shows it: on the peer of a veth whose namespace id is the one of the veth holding the pod's
status.podIPs, and held in no other namespace of the node (two pods on isolated networks may
reuse an address: neither is named) nor by the node. That veth is captured like the pod's own, and so are
the other ports of the bridge it is a port of (an uplink NIC of that network, a VM's or a
stranger's veth): what enters the network from there entered the node there, and the secondary
network never passes the node's uplinks (a pod's traffic to a host of that network would
otherwise be counted one way only).

**The node's own addresses** are every global address on an interface that is up: the
uplinks', a CNI bridge's gateway (``cni0`` 10.244.0.1, the kubelet's probes leave from it), a
ptp host-side veth's, an overlay tunnel's (flannel's ``flannel.1`` 10.244.0.0, Calico's
``vxlan.calico``/``tunl0``). A down interface's are not: kube-proxy's IPVS dummy ``kube-ipvs0``
is down and holds every ClusterIP, which are Services, not the node.

**Virtual machines' taps**: a libvirt VM's NICs that cross a host interface have one, a tap the
agent learns from libvirt (flowmap_agent.libvirting); each that exists on the node is captured
like a pod's veth, whatever its name. A bridge the taps are ports of is not: the taps see it all.

**Overlay tunnels** are the links of a tunnel kind that are up (the kernel's fallback devices,
``tunl0``, ``gre0``, ``sit0`` …, exist down as soon as their module is loaded). What entered
the node through one came from another node's pod or the node itself, decapsulated: they are
captured like uplinks. Their encapsulation on the underlay is the same traffic again: the dp
drops it there (flowmap_dp.capture, "Overlay encapsulation").
"""

from __future__ import annotations

import ipaddress
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field

from flowmap_api.limits import MAX_NODE_ADDRESSES, MAX_POD_ADDRESSES
from flowmap_dp.capture import Encapsulation

RT_SCOPE_UNIVERSE = 0
# A UDP tunnel's default port, when the link does not say (IFLA_VXLAN_PORT 0 is the kernel's
# default, 8472; WireGuard's listen port is read over generic netlink).
UDP_TUNNELS = {"vxlan": 8472, "geneve": 6081, "wireguard": 51820}
# The outer IP protocol of the others. sit carries IPv6 in IPv4 (its ipip mode is not told
# apart); ip6tnl either family in IPv6.
IP_TUNNELS: dict[str, tuple[int, ...]] = {
    "ipip": (4,), "sit": (41,), "ip6tnl": (4, 41), "gre": (47,), "gretap": (47,), "ip6gre": (47,),
    "ip6gretap": (47,), "erspan": (47,), "ip6erspan": (47,),
}
REREAD = 10.0  # seconds before a pod's veth is read again while a pod IP is not found
PeerKey = tuple[int, int, int]  # a veth's (index, peer's namespace id, peer's index)


@dataclass(frozen=True)
class Link:
    index: int
    name: str
    kind: str = ""  # IFLA_INFO_KIND: "veth", "bridge", "vxlan" …; "" for a NIC
    up: bool = True  # IFF_UP
    peer: int = 0  # IFLA_LINK: a veth's peer, by its index in its own namespace
    peer_netns: int | None = None  # IFLA_LINK_NETNSID: the peer's namespace; None: this one
    port: int = 0  # a UDP tunnel's port (vxlan, geneve: its destination; wireguard: its listen port)
    master: int = 0  # IFLA_MASTER: the bridge (or bond …) this link is a port of, by index; 0: none

    @property
    def peer_key(self) -> PeerKey | None:
        """Where this veth's other end is, if it is in another namespace (a pod's)."""
        if self.kind != "veth" or self.peer_netns is None or self.peer_netns < 0 or not self.peer:
            return None
        return self.index, self.peer_netns, self.peer


@dataclass(frozen=True)
class Address:
    index: int  # the link holding it
    ip: str
    scope: int = RT_SCOPE_UNIVERSE


@dataclass(frozen=True)
class Seen:
    """The global addresses of a veth's peer, and when they were read."""

    addresses: frozenset[str]
    at: float


def global_addresses(addresses: Iterable[Address]) -> frozenset[str]:
    """The addresses that leave their link (not host, link-local or multicast scoped)."""
    return frozenset(a.ip for a in addresses if a.scope == RT_SCOPE_UNIVERSE
                     and not ipaddress.ip_address(a.ip).is_link_local)


def to_read(links: Iterable[Link], known: Mapping[PeerKey, Seen], missing: bool, now: float) -> list[PeerKey]:
    """The veth peers whose addresses should be read now: new ones, ones with no address yet (the
    CNI is still setting the pod up), and, while some pod's IP is ``missing``, ones read more than
    ``REREAD`` seconds ago (a pod given a second address later)."""
    out = []
    for link in links:
        key = link.peer_key
        if key is None:
            continue
        seen = known.get(key)
        if seen is None or not seen.addresses or (missing and now - seen.at >= REREAD):
            out.append(key)
    return out


def pod_interfaces(links: Iterable[Link], peers: Mapping[PeerKey, Seen], pod_ips: Iterable[str]) -> dict[str, str]:
    """Pod IP -> the host-side veth whose peer holds it. Should two hold one (a sandbox's veth
    not yet removed), the newest link (highest index) wins."""
    wanted = set(pod_ips)
    out: dict[str, str] = {}
    for link in sorted(links, key=lambda link: link.index):
        key = link.peer_key
        seen = peers.get(key) if key is not None else None
        for ip in seen.addresses & wanted if seen is not None else ():
            out[ip] = link.name
    return out


def secondary_interfaces(links: Iterable[Link], peers: Mapping[PeerKey, Seen],
                         claims: Mapping[str, tuple[Collection[str], Collection[str]]],
                         own: Collection[str] = ()) -> dict[str, tuple[str, str]]:
    """Secondary address -> (its host-side veth, its pod), for the addresses each pod claims
    (``claims``: pod -> (its status.podIPs, the addresses its annotation claims)) that a veth peer
    in the pod's own namespace holds: the namespace of the veth holding one of its podIPs. Not an
    address the claimants' podIPs or ``own`` (the node's, and the other pods' podIPs) hold, nor
    one a veth peer in another namespace holds too (isolated networks reusing a range: by its
    address, no one can tell the two apart)."""
    veths = [(link, key, seen) for link in sorted(links, key=lambda link: link.index)
             if (key := link.peer_key) is not None and (seen := peers.get(key)) is not None]
    netns_of: dict[str, set[int]] = {}  # an address -> the namespace ids of the veth peers holding it
    in_netns: dict[int, list[tuple[Link, Seen]]] = {}  # a namespace id -> the veths whose peer is there
    for link, key, seen in veths:
        in_netns.setdefault(key[1], []).append((link, seen))
        for ip in seen.addresses:
            netns_of.setdefault(ip, set()).add(key[1])
    primary = {ip for ips, _ in claims.values() for ip in ips}
    found: dict[str, tuple[str, str]] = {}
    for pod, (ips, wanted) in sorted(claims.items()):
        netns = {n for ip in ips for n in netns_of.get(ip, ())}
        if not wanted or len(netns) != 1:
            continue  # not found yet, or its podIPs in two namespaces (a sandbox being replaced): not sure
        claimed = set(wanted)
        for link, seen in in_netns[netns.pop()]:
            for ip in seen.addresses & claimed:
                if len(netns_of[ip]) == 1 and ip not in primary and ip not in own:
                    found.setdefault(ip, (link.name, pod))
    return found


def secondary_ports(links: Collection[Link], secondary: Mapping[str, tuple[str, str]]) -> set[str]:
    """The veths of the confirmed secondary addresses, and every other port of the bridges they are
    ports of (where the rest of that network enters the node)."""
    veths = {iface for iface, _ in secondary.values()}
    bridges = {link.master for link in links if link.name in veths and link.master}
    return veths | {link.name for link in links if link.master in bridges}


def own_addresses(links: Iterable[Link], addresses: Iterable[Address]) -> frozenset[str]:
    """The node's own: every global address on an interface that is up."""
    up = {link.index for link in links if link.up}
    return global_addresses(a for a in addresses if a.index in up)


def holders(links: Iterable[Link], addresses: Iterable[Address], ips: Collection[str]) -> set[str]:
    """The interfaces holding any of ``ips`` (given the Node's addresses: the uplinks)."""
    names = {link.index: link.name for link in links}
    return {names[a.index] for a in addresses if a.ip in ips and a.index in names}


def encapsulation(link: Link) -> tuple[Encapsulation, ...]:
    """What a tunnel link puts on the wire; () for a link that is no tunnel."""
    if link.kind in UDP_TUNNELS:
        return (Encapsulation(17, link.port or UDP_TUNNELS[link.kind]),)
    return tuple(Encapsulation(p) for p in IP_TUNNELS.get(link.kind, ()))


def tunnels(links: Iterable[Link]) -> dict[str, tuple[Encapsulation, ...]]:
    """The overlay's tunnels that are up, by name, with their encapsulation."""
    return {link.name: encap for link in links if link.up and (encap := encapsulation(link))}


def overlay(links: Iterable[Link]) -> tuple[Encapsulation, ...]:
    """Every encapsulation the node's tunnels use, once each, in a stable order."""
    return tuple(sorted({e for encap in tunnels(links).values() for e in encap}))


def announced(own: Collection[str], node_ips: Collection[str], limit: int = MAX_NODE_ADDRESSES) -> tuple[str, ...]:
    """The node's own addresses as the operator is told them with each batch, so that another
    node's report of them names this node: the Node object's first, then the rest, at most
    ``limit`` (the contract's bound; a node with more keeps its uplinks and the first of the rest)."""
    first = sorted(set(node_ips))
    rest = sorted(set(own) - set(first), key=lambda ip: (ipaddress.ip_address(ip).version, ipaddress.ip_address(ip)))
    return tuple([*first, *rest][:limit])


def secondary_reported(confirmed: Mapping[str, str],
                       limit: int = MAX_POD_ADDRESSES) -> tuple[tuple[str, tuple[str, ...]], ...]:
    """The confirmed secondary addresses (address -> "namespace/name") as the operator is told them
    with each batch (ReportBatch.pod_addresses): by pod, pods and addresses sorted, at most ``limit``
    addresses in all (the contract's bound; the first pods keep theirs)."""
    by_pod: dict[str, list[str]] = {}
    for ip, pod in confirmed.items():
        by_pod.setdefault(pod, []).append(ip)
    out, left = [], limit
    for pod in sorted(by_pod):
        ips = sorted(by_pod[pod], key=lambda ip: (ipaddress.ip_address(ip).version, ipaddress.ip_address(ip)))[:left]
        if not ips:
            break
        out.append((pod, tuple(ips)))
        left -= len(ips)
    return tuple(out)


@dataclass(frozen=True)
class Plan:
    """What the dp captures on a node, and what the agent calls the node's own."""

    pods: Mapping[str, str]  # pod IP -> its host-side interface
    interfaces: tuple[str, ...]  # the pods', the VMs' taps, the uplinks', the tunnels'
    own: frozenset[str]  # the node's own addresses
    underlay: tuple[str, ...]  # the uplinks: the overlay's encapsulation passes there
    overlay: tuple[Encapsulation, ...]
    announced: tuple[str, ...] = ()  # the own addresses the operator is told (ReportBatch.node_addresses)
    # Secondary (Multus) address -> (its host-side veth, its pod), verified (secondary_interfaces).
    secondary: Mapping[str, tuple[str, str]] = field(default_factory=dict)

    def missing(self, pod_ips: Iterable[str]) -> bool:
        """Is a pod's interface not found (yet)?"""
        return any(ip not in self.pods for ip in pod_ips)


def plan(links: Collection[Link], addresses: Collection[Address], peers: Mapping[PeerKey, Seen],
         pod_ips: Iterable[str], node_ips: Collection[str], uplinks: Collection[str] = (),
         vm_taps: Collection[str] = (),
         claims: Mapping[str, tuple[Collection[str], Collection[str]]] | None = None) -> Plan:
    """The capture for one reading of the node: each pod's veth, each VM tap that exists
    (``vm_taps``, from libvirt), the veths of the pods' secondary networks their annotations
    claim and the kernel confirms (``claims``, see secondary_interfaces), the uplinks
    (``uplinks``, or the interfaces holding the Node's addresses) and the tunnels; the node's own
    addresses (with the Node object's, which a cloud's NAT may keep off every interface)."""
    pod_ips = list(pod_ips)
    pods = pod_interfaces(links, peers, pod_ips)
    underlay = set(uplinks) or holders(links, addresses, node_ips)
    taps = {link.name for link in links if link.name in vm_taps}
    own = own_addresses(links, addresses) | frozenset(node_ips)
    secondary = secondary_interfaces(links, peers, claims, own | set(pod_ips)) if claims else {}
    interfaces = set(pods.values()) | secondary_ports(links, secondary) | taps | underlay | set(tunnels(links))
    return Plan(pods, tuple(sorted(interfaces)), own, tuple(sorted(underlay)), overlay(links), announced(own, node_ips),
                secondary)
