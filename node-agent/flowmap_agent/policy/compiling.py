"""Protect mode, pure: a NodePolicy becomes the desired state of the table ``inet flowmap``.

flowmap_agent.policy.nftables makes the table so, flowmap_agent.policy.protecting follows the
operator's stream and applies each policy.

The node filters only what it forwards. A packet from a protected pod's address must match one
of that pod's egress peers; a packet to one must match one of its ingress peers (both, when both
ends are protected pods here). The rules never change with the policy: only set elements do,

* ``pods4``/``pods6``: the protected pods' addresses;
* ``egress4``/``egress6``: ``pod . l4proto . peer . server port`` (peer a network, port a range);
* ``ingress4``/``ingress6``: ``pod . l4proto . client . pod's port``;

so pods coming and going touch elements in place, never a rule. Established and related traffic
is accepted first (connections open before Protect keep going), a new TCP connection that
matches nothing gets a reset at its first SYN, anything else that matches nothing is dropped.

Before all of that, the sessions blocked for a threat (``threats: Block`` of a protected pod's
policy): their packets, either way, are answered with a TCP reset (TCP) or dropped (the rest).
The agent adds them as the dp reports their threats (``blocking``, ``threat_elements``), each
with the set's timeout, in sets bounded by their size:

* ``threats4``/``threats6``: ``l4proto . source . source port . destination . destination port``;
* ``threatpairs4``/``threatpairs6``: ``l4proto . source . destination`` (ICMP has no ports).

The kernel refuses an interval element that overlaps another one of the same set, so each pod's
elements are made disjoint here: networks collapsed per port, and a network allowed on one port
loses what an any-port network of the same pod and protocol already covers.
"""

from __future__ import annotations

import hashlib
import ipaddress
import re
from bisect import bisect_left, bisect_right
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from flowmap_agent.errors import PolicyRefused
from flowmap_api import report_pb2 as pb
from flowmap_api.limits import MAX_POLICY_THREATS

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
# pb.Protocol -> its IP protocol numbers (IPv4, IPv6)
L4: dict[int, tuple[int, int]] = {pb.TCP: (6, 6), pb.UDP: (17, 17), pb.SCTP: (132, 132), pb.ICMP: (1, 58)}
ANY_PORT = "0-65535"
PORTED = frozenset({6, 17, 132})  # IP protocols whose sessions have ports (in their first 4 bytes: th sport, dport)
_THREAT_NAME = re.compile(r"[a-z0-9](?:[-a-z0-9]{0,62}[a-z0-9])?")


@dataclass(frozen=True)
class AllowedPeer:
    """Whom a protected pod may reach (egress) or be reached by (ingress), on this node."""

    protocol: int  # pb.Protocol
    networks: tuple[Network, ...]  # of the pod address's family only
    ports: frozenset[int] | None  # None: any port (always for ICMP)


@dataclass(frozen=True)
class NftRule:
    """One rule of the table's chains, named (the name labels its counters)."""

    name: str
    text: str

    @property
    def comment(self) -> str:
        """The rule's name and a digest of its text: how a later run knows the rule is the same."""
        return f"{self.name} {hashlib.sha256(self.text.encode()).hexdigest()[:12]}"


@dataclass(frozen=True)
class Chain:
    base: tuple[str, str, int, str] | None  # (type, hook, priority, policy) of a base chain
    rules: tuple[NftRule, ...]


@dataclass(frozen=True)
class SetSpec:
    type: tuple[str, ...]
    interval: bool
    elements: frozenset[str]  # canonical element text (see flowmap_agent.policy.nftables.element)
    # A set with a timeout (seconds) is the agent's to fill as it goes (threat blocks): a policy
    # never touches its elements, which expire on their own. ``size``: the most it holds (0: no bound).
    timeout: int = 0
    size: int = 0


@dataclass(frozen=True)
class Ruleset:
    """The desired table; no sets and no chains means no table at all."""

    sets: Mapping[str, SetSpec] = field(default_factory=dict)
    chains: Mapping[str, Chain] = field(default_factory=dict)

    @property
    def size(self) -> int:
        return sum(len(s.elements) for s in self.sets.values())


@dataclass(frozen=True)
class PolicyInForce:
    """A validated NodePolicy, as this node enforces it: each protected address's peers, for the
    table and for ``verdict`` (the operator's policy is flowmap_operator.policy's, cluster-wide)."""

    version: int = 0
    pods: int = 0
    egress: Mapping[str, tuple[AllowedPeer, ...]] = field(default_factory=dict)  # protected address -> peers
    ingress: Mapping[str, tuple[AllowedPeer, ...]] = field(default_factory=dict)
    block: Mapping[str, frozenset[str]] = field(default_factory=dict)  # protected address -> threats it blocks


@dataclass(frozen=True)
class Block:
    """A session to block for a threat, as the node's forward hook sees it (after its DNAT)."""

    l4: int  # IP protocol number
    client: str
    client_port: int
    server: str
    server_port: int
    threat: str
    dnat: tuple[str, int] | None = None  # where the node's DNAT sent it (a ClusterIP's pod), when elsewhere


def chains() -> dict[str, Chain]:
    """The three chains; the base chain hooks forward, after kube-proxy's DNAT in prerouting."""
    def check(way: str, pod: str, peer: str) -> tuple[NftRule, ...]:
        return (NftRule("allowed4", f"ip {pod} . meta l4proto . ip {peer} . th dport @{way}4 counter return"),
                NftRule("allowed6", f"ip6 {pod} . meta l4proto . ip6 {peer} . th dport @{way}6 counter return"),
                NftRule("reject", "meta l4proto tcp counter reject with tcp reset"),
                NftRule("drop", "counter drop"))

    # A threat's session is stopped even when established: these come first.
    threats = tuple(rule for ip, v in (("ip", "4"), ("ip6", "6")) for rule in (
        NftRule(f"threat-reset{v}", f"meta l4proto tcp meta l4proto . {ip} saddr . th sport . {ip} daddr . th dport "
                                    f"@threats{v} counter reject with tcp reset"),
        NftRule(f"threat-drop{v}", f"meta l4proto . {ip} saddr . th sport . {ip} daddr . th dport @threats{v} "
                                   "counter drop"),
        NftRule(f"threat-pair{v}", f"meta l4proto . {ip} saddr . {ip} daddr @threatpairs{v} counter drop")))
    forward = (*threats, NftRule("established", "ct state established,related counter accept"),
               *(NftRule(f"{way}{v}", f"{ip} {end} @pods{v} counter jump {way}")
                 for way, end in (("egress", "saddr"), ("ingress", "daddr")) for ip, v in (("ip", "4"), ("ip6", "6"))))
    return {"egress": Chain(None, check("egress", "saddr", "daddr")),
            "ingress": Chain(None, check("ingress", "daddr", "saddr")),
            "forward": Chain(("filter", "forward", 0, "accept"), forward)}


def parse(policy: pb.NodePolicy, max_elements: int) -> PolicyInForce:
    """Validate ``policy`` whole; raise PolicyRefused naming the first bad field or the size."""
    if policy.enforcement_disabled:
        return PolicyInForce(version=policy.version)
    # Counted before anything is parsed or expanded, so a hostile policy costs little more than its bytes.
    budget = sum(len(pod.ips) * (1 + sum(len(p.cidrs) * (len(p.ports) or 1) for p in (*pod.egress, *pod.ingress)))
                 for pod in policy.pods)
    if budget > max_elements:
        raise PolicyRefused(f"the policy needs up to {budget} set elements, more than {max_elements}")
    egress: dict[str, list[AllowedPeer]] = {}
    ingress: dict[str, list[AllowedPeer]] = {}
    block: dict[str, frozenset[str]] = {}
    # Pods share peers: each is parsed once.
    known: dict[tuple[tuple[str, ...], int, tuple[int, ...]], AllowedPeer] = {}
    networks: dict[str, Network] = {}  # and addresses, in different peers
    for i, pod in enumerate(policy.pods):
        where = f"pods[{i}] ({pod.pod})"
        addresses = [_address(ip, f"{where}.ips[{j}]") for j, ip in enumerate(pod.ips)]
        threats = _threats(pod.block_threats, f"{where}.block_threats")
        if threats:
            block.update((str(a), threats) for a in addresses)
        for way, peers, into in (("egress", pod.egress, egress), ("ingress", pod.ingress, ingress)):
            parsed = []
            for k, p in enumerate(peers):
                key = (tuple(p.cidrs), p.protocol, tuple(p.ports))
                if key not in known:
                    known[key] = _peer(p, f"{where}.{way}[{k}]", networks)
                parsed.append(known[key])
            for address in addresses:
                family = [AllowedPeer(p.protocol, tuple(n for n in p.networks if n.version == address.version),
                                      p.ports) for p in parsed]
                into.setdefault(str(address), []).extend(p for p in family if p.networks)
    return PolicyInForce(policy.version, len(policy.pods), {a: tuple(p) for a, p in egress.items()},
                         {a: tuple(p) for a, p in ingress.items()}, block)


def desired(policy: PolicyInForce, max_elements: int, threat_timeout: int = 600, threat_size: int = 65536) -> Ruleset:
    """The desired table for ``policy``: empty (remove the table) when no pod is protected. The threat
    sets' elements live ``threat_timeout`` seconds, at most ``threat_size`` in each."""
    addresses = set(policy.egress) | set(policy.ingress)
    if not addresses:
        return Ruleset()
    sets = {f"pods{v}": SetSpec((kind,), False, frozenset(a for a in addresses if (":" in a) == (v == "6")))
            for v, kind in (("4", "ipv4_addr"), ("6", "ipv6_addr"))}
    for v, kind in (("4", "ipv4_addr"), ("6", "ipv6_addr")):
        sets[f"threats{v}"] = SetSpec(("inet_proto", kind, "inet_service", kind, "inet_service"), False, frozenset(),
                                      threat_timeout, threat_size)
        sets[f"threatpairs{v}"] = SetSpec(("inet_proto", kind, kind), False, frozenset(), threat_timeout, threat_size)
    for way, peers in (("egress", policy.egress), ("ingress", policy.ingress)):
        for v, kind in (("4", "ipv4_addr"), ("6", "ipv6_addr")):
            elements = frozenset(e for a, p in peers.items() if (":" in a) == (v == "6") for e in _elements(a, p))
            sets[f"{way}{v}"] = SetSpec((kind, "inet_proto", kind, "inet_service"), True, elements)
    ruleset = Ruleset(sets, chains())
    if ruleset.size > max_elements:  # the threat sets hold none here: they are bounded by their size
        raise PolicyRefused(f"the policy needs {ruleset.size} set elements, more than {max_elements}")
    return ruleset


def verdict(policy: PolicyInForce, client: str, server: str, port: int, protocol: int, answered: bool,
            opened: bool = True) -> pb.Verdict:
    """What this node's policy did to an edge the dp saw: pb.DENIED, pb.ALLOWED or unset.

    Denied: a protected end's peers do not allow it, and it was attempted (sessions opened) with
    nothing back from the server — an unallowed connection open before Protect still flows, and
    is not denied. Unset when no end is a protected pod of this node.
    """
    checks = [(peers, other) for peers, other in ((policy.egress.get(client), server),
                                                    (policy.ingress.get(server), client)) if peers is not None]
    if not checks:
        return pb.VERDICT_UNSPECIFIED
    if all(_allows(peers, other, port, protocol) for peers, other in checks):
        return pb.ALLOWED
    return pb.DENIED if opened and not answered else pb.VERDICT_UNSPECIFIED


def blocking(policy: PolicyInForce, client: str, server: str, threats: Iterable[str]) -> str:
    """The first of ``threats`` (seen in one session between these addresses) that a protected end
    of this node blocks, or "" (none: the hits are only reported)."""
    mine = policy.block.get(client, frozenset()) | policy.block.get(server, frozenset())
    return next((t for t in threats if t in mine), "") if mine else ""


def threat_elements(blocks: Iterable[Block]) -> dict[str, set[str]]:
    """The threat sets' elements that stop ``blocks``: each session both ways (a reset goes to
    whichever end sends next), by its 5-tuple, or by its addresses where it has no ports (ICMP);
    through a ClusterIP, as the client sent it and as the node's DNAT sent it on."""
    out: dict[str, set[str]] = {}
    for b in blocks:
        v = "6" if ":" in b.client else "4"
        for server, port in ((b.server, b.server_port), *((b.dnat,) if b.dnat else ())):
            if b.l4 in PORTED:
                out.setdefault(f"threats{v}", set()).update((
                    f"{b.l4} . {b.client} . {b.client_port} . {server} . {port}",
                    f"{b.l4} . {server} . {port} . {b.client} . {b.client_port}"))
            else:
                out.setdefault(f"threatpairs{v}", set()).update((f"{b.l4} . {b.client} . {server}",
                                                                  f"{b.l4} . {server} . {b.client}"))
    return out


def _allows(peers: Iterable[AllowedPeer], other: str, port: int, protocol: int) -> bool:
    address = ipaddress.ip_address(other)
    return any(p.protocol == protocol and (p.ports is None or port in p.ports)
               and any(n.version == address.version and address in n for n in p.networks) for p in peers)


def _address(text: str, where: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        raise PolicyRefused(f"{where}: {text!r} is not an IP address") from None


def _threats(names: Iterable[str], where: str) -> frozenset[str]:
    listed = list(names)
    if len(listed) > MAX_POLICY_THREATS:
        raise PolicyRefused(f"{where}: {len(listed)} threats, more than {MAX_POLICY_THREATS}")
    for k, name in enumerate(listed):
        if not _THREAT_NAME.fullmatch(name):  # a name this version does not know is kept: it blocks nothing
            raise PolicyRefused(f"{where}[{k}]: {name[:64]!r} is not a threat name")
    return frozenset(listed)


def _peer(peer: pb.PodPolicy.Peer, where: str, known: dict[str, Network]) -> AllowedPeer:
    if peer.protocol not in L4:
        raise PolicyRefused(f"{where}.protocol: {peer.protocol} is not TCP, UDP, SCTP or ICMP")
    networks = []
    for k, cidr in enumerate(peer.cidrs):
        if cidr not in known:
            try:
                known[cidr] = ipaddress.ip_network(cidr)  # strict: host bits set is a mistake, not a wider rule
            except ValueError:
                raise PolicyRefused(f"{where}.cidrs[{k}]: {cidr!r} is not a network") from None
        networks.append(known[cidr])
    if peer.protocol == pb.ICMP or not peer.ports:
        return AllowedPeer(peer.protocol, tuple(networks), None)  # ICMP has no ports: they are ignored
    bad = [p for p in peer.ports if not 0 < p < 65536]
    if bad:
        raise PolicyRefused(f"{where}.ports: {bad[0]} is not a port")
    return AllowedPeer(peer.protocol, tuple(networks), frozenset(peer.ports))


def _elements(address: str, peers: Iterable[AllowedPeer]) -> Iterable[str]:
    """One pod address's disjoint ``pod . l4proto . network . port`` elements."""
    six = ":" in address
    by_protocol: dict[int, dict[int | None, list[Network]]] = {}
    for p in peers:
        for port in (None,) if p.ports is None else p.ports:
            by_protocol.setdefault(L4[p.protocol][1 if six else 0], {}).setdefault(port, []).extend(p.networks)
    for l4, by_port in sorted(by_protocol.items()):
        anywhere = _disjoint(by_port.pop(None, []))
        for n in anywhere:
            yield f"{address} . {l4} . {net_text(n)} . {ANY_PORT}"
        for port, networks in sorted(by_port.items(), key=lambda kv: kv[0] or 0):  # None is gone
            for n in _uncovered(_disjoint(networks), anywhere) if anywhere else _disjoint(networks):
                yield f"{address} . {l4} . {net_text(n)} . {port}"


def _disjoint(networks: list[Network]) -> list[Network]:
    """Sorted, without duplicates, and collapsed where they may overlap (host routes never do)."""
    if all(n.prefixlen == n.max_prefixlen for n in networks):
        return sorted(set(networks))
    return list(ipaddress.collapse_addresses(networks))  # type: ignore[type-var]


def _uncovered(networks: list[Network], holes: list[Network]) -> Iterable[Network]:
    """The parts of ``networks`` outside ``holes`` (both collapsed: sorted and disjoint)."""
    starts = [int(h.network_address) for h in holes]
    for n in networks:
        first, last = int(n.network_address), int(n.broadcast_address)
        i = bisect_right(starts, first) - 1
        if i >= 0 and int(holes[i].broadcast_address) >= last:
            continue  # inside an any-port network already
        pieces = [n]
        for hole in holes[bisect_left(starts, first):bisect_right(starts, last)]:
            inside = next(p for p in pieces if hole.subnet_of(p))  # type: ignore[arg-type]
            pieces.remove(inside)
            pieces.extend(inside.address_exclude(hole))  # type: ignore[arg-type]
        yield from sorted(pieces)


def net_text(n: Network) -> str:
    """A network as nft writes it in a set element: a host route as its address."""
    return str(n.network_address) if n.prefixlen == n.max_prefixlen else str(n)
