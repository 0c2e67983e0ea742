"""The dp's per-session records become per-edge deltas for the operator (pure).

An edge, from the node's point of view, is client address -> server address and port, L4
protocol: the client's ephemeral port does not matter to the map, so all sessions between the
same two addresses on one server port add up. Endpoints on this node (its pods, its libvirt VMs,
the node itself from any of its own addresses, a CNI bridge's gateway included) are marked local and
local pods named, which is how the operator knows which node counts an edge (and that a local end
without a pod is one of the VMs the batch lists, else the node itself).
Under Protect mode each delta also says what this node's policy did to it (the policy in force
is injected; see flowmap_agent.policy.compiling.verdict). The dp sees a pod's call to a ClusterIP
before the node's DNAT, while the node's table judges it after: an edge the policy would deny
is judged again at the address the kernel sent it to (``destination``, from conntrack, injected).
A session whose threat a protected end of this node blocks (``threats: Block``) is handed to the
injected ``block`` (the table's threat sets, flowmap_agent.policy.protecting) at the address the
kernel sent it to, and once blocked its edge's delta says DENIED for that threat (``denied_for``),
as do its later deltas while the block lasts.
Traffic that never leaves a link (IPv6 neighbour discovery, link-local, multicast, broadcast) is
the network's own plumbing, not a connection between workloads: it is not reported.
What enters the outbox has passed the one definition of a valid report the operator applies too
(:func:`admit`, flowmap_api.validity): metadata normalised, never a reason to lose a count.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from flowmap_agent.deltas import U32, U64, earliest
from flowmap_agent.policy.compiling import Block, PolicyInForce, blocking, verdict
from flowmap_api import report_pb2 as pb
from flowmap_api import validity
from flowmap_dp import wire_pb2

PROTOCOLS = {6: pb.TCP, 17: pb.UDP, 132: pb.SCTP, 1: pb.ICMP, 58: pb.ICMP}
MAX_OPEN_PER_EDGE = 1 << 20  # open-session tracking is a gauge; never let it grow without end
Session = tuple[int, str, int, str, int]  # l4, client, its port, server, its port
# An edge's sums while a report is read: bytes and packets each way, first and last seen (ms),
# sessions opened and closed, applications, threat hits.
_Sums = list[Any]


@dataclass
class Admitted:
    """What of an interval's deltas and names may enter a batch."""

    edges: list[pb.EdgeDelta]
    names: list[pb.DnsName]
    refused: list[tuple[pb.EdgeDelta, str]]  # edges no operator can count, and why
    tally: validity.Tally  # metadata normalised or dropped, by (field, reason)


def admit(edges: list[pb.EdgeDelta], names: list[pb.DnsName]) -> Admitted:
    """Normalise, in place, what the operator would (it would refuse a whole batch otherwise,
    or an older operator would): names, applications, pods, snippets; set apart an edge that can
    never be counted (an address that is not one, a port above 65535...), so that it holds back
    no other."""
    tally: validity.Tally = validity.Tally()
    kept, refused = [], []
    for d in edges:
        problem = validity.uncountable(d)
        if problem is None:
            validity.normalise_edge(d, tally)
            kept.append(d)
        else:
            refused.append((d, problem))
    holder = pb.ReportBatch(names=names)
    validity.normalise_names(holder, tally)
    return Admitted(kept, list(holder.names), refused, tally)


def _reported(ip: bytes) -> str:
    """The text of an address the map shows, or "" (not an address, or it never leaves its link)."""
    return text(ip) if len(ip) in (4, 16) and not link_scoped(ip) else ""


def text(ip: bytes) -> str:
    return str(ipaddress.ip_address(ip))


def link_scoped(ip: bytes) -> bool:
    """An address that does not leave its link: link-local, multicast, broadcast, unspecified."""
    addr = ipaddress.ip_address(ip)
    return addr.is_link_local or addr.is_multicast or addr.is_unspecified or ip == b"\xff\xff\xff\xff"


@dataclass
class Aggregator:
    local_pods: Mapping[str, str] = field(default_factory=dict)  # pod IP on this node -> "namespace/name"
    node_ips: frozenset[str] = frozenset()  # the node's own addresses (flowmap_agent.plumbing.own_addresses)
    local_vms: Mapping[str, str] = field(default_factory=dict)  # a libvirt VM's address on this node -> its UUID
    policy: PolicyInForce = field(default_factory=PolicyInForce)  # the policy in force on this node
    # Where the node's DNAT sent a session: (l4, client, port, server, port) -> (address, port), or None.
    destination: Callable[[tuple[int, str, int, str, int]], tuple[str, int] | None] | None = None
    # Blocks the sessions it is given for their threat (the table's threat sets); False: nothing was.
    block: Callable[[Sequence[Block]], bool] | None = None
    block_seconds: float = 600.0  # how long a block lasts (the threat sets' timeout)
    max_blocked: int = 65536  # blocked sessions remembered (the threat sets' size)
    # Sessions blocked for a threat, as the dp names them -> (the threat, until when, ns of the dp's clock).
    _blocked: dict[Session, tuple[str, int]] = field(default_factory=dict)
    # Open sessions per edge (their 5-tuples), for the sessions_active gauge.
    _open: dict[tuple[str, str, int, pb.Protocol], set[tuple[int, int]]] = field(default_factory=dict)

    def _endpoint(self, ip: str, port: int) -> pb.Endpoint:
        pod = self.local_pods.get(ip, "")
        return pb.Endpoint(ip=ip, port=port, pod=pod, local=bool(pod) or ip in self.node_ips or ip in self.local_vms)

    def aggregate(self, report: wire_pb2.Report) -> tuple[list[pb.EdgeDelta], list[pb.DnsName]]:
        """One dp report's sessions as edge deltas (one per edge), and the names its DNS answers gave.

        Sums are kept in plain lists and each address is read once per report (a report holds up
        to 100k sessions among far fewer addresses): the protobuf messages are built at the end. The
        sessions fold by the rules of the one merge of deltas (flowmap_agent.deltas).
        """
        acc: dict[tuple[str, str, int, pb.Protocol], _Sums] = {}
        sample: dict[tuple[str, str, int, pb.Protocol], tuple[int, str, int, str, int]] = {}  # a session of each edge
        threats: dict[tuple[int, bytes, int, bytes, int], list[wire_pb2.ThreatHit]] = {}
        for hit in report.threats:
            threats.setdefault((hit.ip_proto, hit.client_ip, hit.client_port, hit.server_ip, hit.server_port),
                               []).append(hit)
        blocks: list[tuple[tuple[str, str, int, pb.Protocol], Session, str]] = []  # (edge, session, threat)
        remembered = self._prune(report.end_ns) if self._blocked else {}
        denied: dict[tuple[str, str, int, pb.Protocol], str] = {}  # edge -> the threat a session of it is blocked for
        addresses: dict[bytes, str] = {}  # "": not reported (not an address, or link-scoped)
        for s in report.sessions:
            protocol = PROTOCOLS.get(s.ip_proto)
            if protocol is None:
                continue
            cip, sip = s.client_ip, s.server_ip
            client = addresses.get(cip)
            if client is None:
                client = addresses[cip] = _reported(cip)
            server = addresses.get(sip)
            if server is None:
                server = addresses[sip] = _reported(sip)
            if not client or not server:
                continue
            port = s.server_port if protocol != pb.ICMP else 0
            key = (client, server, port, protocol)
            e = acc.get(key)
            if e is None:
                e = acc[key] = [0, 0, 0, 0, 0, 0, 0, 0, [], []]
                sample[key] = (s.ip_proto, client, s.client_port, server, s.server_port)
            e[0] += s.bytes_c2s
            e[1] += s.bytes_s2c
            e[2] += s.packets_c2s
            e[3] += s.packets_s2c
            first, last = s.first_seen_ns // 1_000_000, s.last_seen_ns // 1_000_000
            e[4] = earliest(e[4], first)
            if last > e[5]:
                e[5] = last
            if s.app and s.app not in e[8]:
                e[8].append(s.app)
            opened = self._open.setdefault(key, set())
            session = (s.client_port, s.vlan)
            if s.opened:  # not s.new: a DNAT'd reply half or a session picked up mid-stream is no new session
                e[6] += 1
                if len(opened) < MAX_OPEN_PER_EDGE:
                    opened.add(session)
            if s.closed:
                e[7] += 1
                opened.discard(session)
            if threats:
                hits = threats.get((s.ip_proto, cip, s.client_port, sip, s.server_port), ())
                for hit in hits:
                    if len(e[9]) < validity.MAX_THREATS:
                        e[9].append(pb.ThreatHit(name=hit.threat, snippet=hit.snippet[:256],
                                                 time_unix_ms=hit.seen_ns // 1_000_000))
                if hits and self.policy.block:
                    five = (s.ip_proto, client, s.client_port, server, s.server_port)
                    if threat := self._blocking(five, [h.threat for h in hits]):
                        blocks.append((key, five, threat))
            if remembered:
                five = (s.ip_proto, client, s.client_port, server, s.server_port)
                was = remembered.get(five)
                if was is not None and self._blocking(five, [was[0]]):
                    denied[key] = was[0]  # reset or dropped since: still the threat's doing
        if blocks:
            denied.update(self._block(blocks, report.end_ns))
        edges = []
        for key, e in acc.items():
            # Sums beyond the fields' widths come only from a peer that is no dp: kept at the bound,
            # where the shared validity refuses them (their edge is set apart, not the report).
            d = pb.EdgeDelta(client=self._endpoint(key[0], 0), server=self._endpoint(key[1], key[2]), protocol=key[3],
                             bytes_c2s=min(e[0], U64), bytes_s2c=min(e[1], U64), packets_c2s=min(e[2], U64),
                             packets_s2c=min(e[3], U64), first_seen_unix_ms=e[4], last_seen_unix_ms=e[5],
                             sessions_opened=min(e[6], U32), sessions_closed=min(e[7], U32), apps=e[8], threats=e[9])
            d.sessions_active = min(len(self._open.get(key, ())), U32)
            d.verdict = verdict(self.policy, key[0], key[1], key[2], key[3], answered=d.bytes_s2c > 0,
                                opened=d.sessions_opened > 0)
            if d.verdict == pb.DENIED and self.destination is not None:
                sent_to = self.destination(sample[key])  # a ClusterIP: judged where the table saw it
                if sent_to is not None:
                    d.verdict = verdict(self.policy, key[0], sent_to[0], sent_to[1], key[3],
                                        answered=d.bytes_s2c > 0, opened=d.sessions_opened > 0)
            if key in denied:
                d.verdict, d.denied_for = pb.DENIED, denied[key]
            if not d.sessions_active:
                self._open.pop(key, None)
            edges.append(d)
        names = [pb.DnsName(ip=text(a.address), name=a.name.rstrip(".").lower(), ttl_seconds=a.ttl,
                            seen_unix_ms=report.end_ns // 1_000_000)
                 for a in report.dns if a.type in ("A", "AAAA") and len(a.address) in (4, 16) and a.name]
        return edges, names

    def _block(self, blocks: list[tuple[tuple[str, str, int, pb.Protocol], Session, str]],
               now_ns: int) -> dict[tuple[str, str, int, pb.Protocol], str]:
        """Block these sessions (where the node's DNAT sent them, too); the edges now denied, and why."""
        wanted = []
        for _, session, threat in blocks:
            sent_to = self.destination(session) if self.destination is not None else None
            wanted.append(Block(*session, threat, sent_to if sent_to != (session[3], session[4]) else None))
        if self.block is None or not self.block(wanted):
            return {}
        until = now_ns + int(self.block_seconds * 1e9)
        for _, session, threat in blocks:
            if session in self._blocked or len(self._blocked) < self.max_blocked:
                self._blocked[session] = (threat, until)
        return {key: threat for key, _, threat in blocks}

    def _blocking(self, session: Session, threats: list[str]) -> str:
        """The threat of ``threats`` a protected end of the session blocks, or "": the server may be a
        ClusterIP, whose pod is an end only after the node's DNAT (the dp saw the client's side)."""
        threat = blocking(self.policy, session[1], session[3], threats)
        if not threat and self.destination is not None and (sent_to := self.destination(session)) is not None:
            threat = blocking(self.policy, session[1], sent_to[0], threats)
        return threat

    def _prune(self, now_ns: int) -> dict[Session, tuple[str, int]]:
        """The blocks still in force (those expired are forgotten, as the kernel forgets them)."""
        expired = []
        for session, (_, until) in self._blocked.items():  # in the order they were blocked: oldest first
            if until > now_ns:
                break
            expired.append(session)
        for session in expired:
            del self._blocked[session]
        return self._blocked
