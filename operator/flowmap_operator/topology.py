"""Reports become edges: resolve both ends, pick the one observer that counts, apply once.

Pure apart from the clock it is handed: the writer turns what this module keeps into API
objects, and rebuilds it from them on start.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any

from flowmap_api import report_pb2 as pb
from flowmap_operator.errors import Crowded
from flowmap_operator.ledger import Counters, EdgeKey, Ledger
from flowmap_operator.modes import DENIED, LEARNED, VIOLATION, Modes
from flowmap_operator.naming import connection_name
from flowmap_operator.policy import PolicyKey
from flowmap_operator.resolution import Peer, Resolver

PROTOCOLS = {pb.TCP: "TCP", pb.UDP: "UDP", pb.SCTP: "SCTP", pb.ICMP: "ICMP"}
# Watermarks one Connection may carry (the CRD's status.observers maxItems): ~7 kB at most.
MAX_OBSERVERS = 128


@dataclass
class EdgeInfo:
    """What an edge carries besides its counters; merging it twice changes nothing."""

    name: str
    apps: set[str] = field(default_factory=set)
    service: str = ""
    first_seen: float = 0.0
    last_seen: float = 0.0
    threats: int = 0  # threat hits (best effort: a resent batch may add its hits again)
    threat_examples: deque[dict[str, Any]] = field(default_factory=lambda: deque(maxlen=5))
    action: str = LEARNED  # what policy makes of it (modes.judge)
    policy: PolicyKey | None = None  # the policy whose rules decided
    active: dict[str, int] = field(default_factory=dict)  # agent -> sessions open at its last report

    @property
    def app(self) -> str:
        """The APP column (and metrics label): the applications seen, "unknown" only if nothing better."""
        return (",".join(a for a in sorted(self.apps) if a != "unknown") or "unknown")[:256]


@dataclass
class GroupInfo:
    peer: Peer
    last_seen: float = 0.0
    written_last_seen: float = -1.0
    exists: bool = False
    user_defined: bool = False  # a CIDR group a user wrote: never deleted by us
    empty_since: float | None = None  # a workload group with no pods since then
    overflow: int = 0  # its edges dropped because the Connection cap is reached
    written_overflow: int = 0


# A delta with both ends resolved: (delta, when, protocol, client, server, port, service, counted elsewhere)
_Resolved = tuple[pb.EdgeDelta, float, str, Peer, Peer, int, str, bool]


@dataclass
class Ingested:
    counted: int = 0  # edge deltas applied
    duplicates: int = 0  # already counted (a resent batch)
    other_observer: int = 0  # counted by the node on the other side
    overflow: int = 0  # dropped: the Connection cap is reached
    external: int = 0  # ends that resolved to nothing better than "external"
    blocked: list[tuple[EdgeKey, str, int]] = field(default_factory=list)  # (edge, Violation|Denied, sessions)


class Topology:
    def __init__(self, resolver: Resolver, *, max_connections: int, max_ports: int, modes: Modes | None = None) -> None:
        self.resolver = resolver
        self.modes = modes or Modes(resolver)
        self.ledger = Ledger()
        self.edges: dict[EdgeKey, EdgeInfo] = {}
        self.groups: dict[str, GroupInfo] = {}
        self.ports: dict[tuple[str, str, str], set[int]] = {}  # (client, server, protocol) -> ports
        self.max_connections = max_connections
        self.max_ports = max_ports
        self.overflow_total = 0
        self.lost: dict[str, float] = {}  # node -> when its agent last reported deltas it could not keep

    def forget(self, key: EdgeKey) -> None:
        """Drop an edge whose Connection was deleted (idle past its TTL)."""
        self.edges.pop(key, None)
        self.ledger.edges.pop(key, None)
        ports = self.ports.get((key[0], key[1], key[3]))
        if ports is not None:
            ports.discard(key[2])
            if not ports:
                del self.ports[(key[0], key[1], key[3])]

    def key_for(self, client: str, server: str, port: int, protocol: str) -> EdgeKey | None:
        """The edge a delta belongs to: ports beyond the limit share the "any" edge (port 0)."""
        seen = self.ports.setdefault((client, server, protocol), set())
        if port and port not in seen and len(seen - {0}) >= self.max_ports:
            port = 0
        key = (client, server, port, protocol)
        if key not in self.edges and len(self.edges) >= self.max_connections:
            return None
        seen.add(port)
        return key

    def edge(self, key: EdgeKey) -> EdgeInfo:
        info = self.edges.get(key)
        if info is None:
            info = self.edges[key] = EdgeInfo(connection_name(*key))
        return info

    def _touch(self, peer: Peer, when: float) -> None:
        group = self.groups.get(peer.group)
        if group is None:
            # An FQDN group keeps its name (its object name may be shortened); a pod is no group's name.
            group = self.groups[peer.group] = GroupInfo(Peer(peer.group, peer.kind, peer.namespace, peer.workload_kind,
                                                             peer.workload, peer.member if peer.kind == "FQDN" else ""))
        group.last_seen = max(group.last_seen, when)

    def ingest(self, batch: pb.ReportBatch, now: float) -> Ingested:
        """Apply one validated batch, or refuse it whole (OutOfOrder, NotKnownYet, Crowded).

        Every end is resolved before anything is changed: a batch refused because an address is
        not known yet leaves no trace, and is applied whole when resent. What the batch teaches
        about the world comes first, since its own deltas may need it: the node's addresses and
        the DNS answers it saw are facts of the node, and taking them twice changes nothing.
        """
        agent, seq = batch.agent_id, batch.sequence
        self.resolver.node_addresses_seen(batch.node, batch.node_addresses, batch.sent_unix_ms / 1000 or now)
        if not seq:  # a question for the acknowledgement
            self.ledger.begin_batch(agent, batch.node, 0, batch.acked, 0)
            return Ingested()
        for name in batch.names:
            self.resolver.learn_name(name.ip, name.name, name.ttl_seconds, name.seen_unix_ms / 1000 or now)
        result = Ingested()
        resolved = [r for r in (self._resolve(delta, batch.node, now, result) for delta in batch.edges) if r]
        # Several deltas of one batch can land on one edge (two pods of a workload on this node,
        # collapsed ports): merge them first, since the ledger takes one delta per edge per batch.
        merged: dict[EdgeKey, tuple[Counters, list[pb.ThreatHit], int, Peer, Peer]] = {}
        for delta, when, protocol, client, server, port, service, other in resolved:
            self._touch(client, when)
            key = self.key_for(client.group, server.group, port, protocol)
            if key is None:
                result.overflow += 1
                self.overflow_total += 1
                self.groups[client.group].overflow += 1
                continue
            self._touch(server, when)
            info = self.edge(key)
            action, by = self.modes.judge(client, server, delta.client.ip, delta.server.ip, key[2], protocol,
                                          delta.verdict == pb.DENIED, delta.packets_s2c > 0)
            self._act(key, info, action, by, when, now)
            if other:
                result.other_observer += 1
                continue
            result.external += (client.kind == "External") + (server.kind == "External")
            counters = Counters(delta.bytes_c2s, delta.bytes_s2c, delta.packets_c2s, delta.packets_s2c,
                                delta.sessions_opened)
            if key in merged:
                total, threats, active, _, _ = merged[key]
                total.add(counters)
                merged[key] = (total, threats + list(delta.threats), active + delta.sessions_active, client, server)
            else:
                merged[key] = (counters, list(delta.threats), delta.sessions_active, client, server)
            info.apps.update(delta.apps)  # none yet: the dp has not decided (it says "unknown" when it gives up)
            info.service = service or info.service
            first = delta.first_seen_unix_ms / 1000 or when
            info.first_seen = min(info.first_seen, first) if info.first_seen else first
            info.last_seen = max(info.last_seen, when)
        for key in merged:
            edge = self.ledger.edges.get(key)
            if edge and agent not in edge.watermarks and agent not in edge.pending and (
                    len(edge.watermarks.keys() | edge.pending.keys()) >= MAX_OBSERVERS):
                raise Crowded(f"edge {key} already carries {MAX_OBSERVERS} unconfirmed observers")
        # Only now does the batch take its place in the agent's sequence: a refusal above must
        # leave no trace, or the batch could be acknowledged without having been counted.
        self.ledger.begin_batch(agent, batch.node, seq, batch.acked, batch.previous)
        for key, (counters, threats, active, client, server) in merged.items():
            info = self.edges[key]
            info.active[agent] = active
            if self.ledger.apply(agent, seq, key, counters, now):
                result.counted += 1
                if info.action in (VIOLATION, DENIED):
                    result.blocked.append((key, info.action, counters.sessions))
                info.threats += len(threats)
                info.threat_examples.extend({"name": t.name, "snippet": t.snippet[:256]} for t in threats)
                if info.action != DENIED:  # what a group tried and was refused is no rule of it
                    self.modes.learn(client, server, key[2], key[3], info.apps, counters.sessions,
                                     info.first_seen, info.last_seen)
            else:
                result.duplicates += 1
        return result

    def _resolve(self, delta: pb.EdgeDelta, node: str, now: float, result: Ingested) -> _Resolved | None:
        """Both ends of one delta (raises NotKnownYet), or None for a delta the other observer counts.

        One observer per session: the client's node when the client is captured (a pod or a node
        that runs an agent), else the server's (an external client, a pod or a node without an
        agent). Another node's report of a captured client's session is not counted; only a block
        it saw its own rules make is taken from it.
        """
        when = delta.last_seen_unix_ms / 1000 or now
        protocol = PROTOCOLS[delta.protocol]
        if not delta.client.local and not delta.server.local and delta.verdict != pb.DENIED:
            result.other_observer += 1  # neither end is this node's: whoever it is, not ours to count
            return None
        client = self.resolver.resolve_endpoint(delta.client.ip, when, node, delta.client.local, delta.client.pod, now)
        other = not delta.client.local and not (delta.server.local and not self.resolver.captured(client))
        if other and delta.verdict != pb.DENIED:
            result.other_observer += 1
            return None
        via = self.resolver.resolve_service(delta.server.ip, delta.server.port, protocol, when)
        if via:
            server, port, service = via
        else:
            server = self.resolver.resolve_endpoint(delta.server.ip, when, node, delta.server.local,
                                                    delta.server.pod, now)
            port, service = delta.server.port, ""
        return delta, when, protocol, client, server, port, service, other

    def _act(self, key: EdgeKey, info: EdgeInfo, action: str, by: PolicyKey | None, when: float, now: float) -> None:
        """Take a judgement of the edge: a change is written, and what no rule allows is raised."""
        first = action != info.action
        if first:
            if info.action in (VIOLATION, DENIED):
                self.modes.unblocked(info.policy, info.name)
            info.action, info.policy = action, by
            self.ledger.touch(key, now)
        if action in (VIOLATION, DENIED):
            client, server, port, protocol = key
            mode = "Protect mode blocked it" if action == DENIED else "it was let through"
            self.modes.blocked(by, info.name, action, f"{client} -> {server} port {port or 'any'}/{protocol}: "
                               f"no rule allows it; {mode} (Connection {info.name})", when, first)
