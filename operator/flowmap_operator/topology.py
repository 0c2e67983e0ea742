"""Reports become edges: resolve both ends, pick the one observer that counts, apply once.

Pure apart from the clock it is handed: the writer turns what this module keeps into API
objects, and rebuilds it from them on start.

Bounded: at most ``max_connections`` edges, ``max_ports`` ports between two groups, and
``max_fqdn_groups`` groups learned from DNS names (beyond it, a new name's addresses are
``external``, unless a policy's rule names its group); what did not fit is counted and said on
the Groups (``conditions``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from flowmap_api import report_pb2 as pb
from flowmap_api.validity import MAX_SNIPPET, MAX_THREATS
from flowmap_operator.conditions import Said
from flowmap_operator.errors import Crowded
from flowmap_operator.ledger import Counters, EdgeKey, Ledger
from flowmap_operator.policy.modes import DENIED, LEARNED, VIOLATION, Modes
from flowmap_operator.naming import connection_name
from flowmap_operator.policy.rules import PolicyKey
from flowmap_operator.resolution import EXTERNAL, Peer, Resolver
from flowmap_operator.threats import Alerts, Tally, tally

PROTOCOLS = {pb.TCP: "TCP", pb.UDP: "UDP", pb.SCTP: "SCTP", pb.ICMP: "ICMP"}
# Watermarks one Connection may carry (the CRD's status.observers maxItems): ~7 kB at most.
MAX_OBSERVERS = 128

NO_RULE = "no rule allows it"  # why a Connection is Violation or Denied, unless a threat blocked it
THREAT = "Threat"  # an edge whose sessions carried a threat hit: an event, as Violation and Denied are
EXTERNAL_IP_MITM = "external-ip-mitm"  # flowmap_api.threats: the operator finds this one (Resolver.intercepting)


@dataclass
class EdgeInfo:
    """What an edge carries besides its counters; merging it twice changes nothing."""

    name: str
    apps: set[str] = field(default_factory=set)
    service: str = ""
    first_seen: float = 0.0
    last_seen: float = 0.0
    threats: dict[str, Tally] = field(default_factory=dict)  # threat name -> its hits (flowmap_operator.threats)
    action: str = LEARNED  # what policy makes of it (modes.judge)
    policy: PolicyKey | None = None  # the policy whose rules decided
    denied_for: str = ""  # Denied by a threat block (spec.threats Block): the threat's name
    active: dict[str, int] = field(default_factory=dict)  # agent -> sessions open at its last report

    @property
    def app(self) -> str:
        """The APP column (and metrics label) of this edge."""
        return app_label(self.apps)


def app_label(apps: Iterable[str]) -> str:
    """The APP column (and metrics label): the applications seen, "unknown" only if nothing better."""
    return (",".join(a for a in sorted(apps) if a != "unknown") or "unknown")[:256]


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
    generation: int = 0  # of the object, as last seen (its spec: a user's CIDRs)
    uid: str = ""  # of the object, as last seen: an Event names it (kubectl describe finds it by it)
    conditions: dict[str, dict[str, Any]] = field(default_factory=dict)  # as last written, by type
    written_said: tuple[tuple[str, bool, str], ...] = ()  # (type, holds, reason) of those


# A delta with both ends resolved, the fields read more than once read once (a protobuf attribute
# costs about as much as a dict lookup, and a submessage's more): (delta, when, protocol, client,
# server, client address, server address, port, service, counted elsewhere).
_Resolved = tuple[pb.EdgeDelta, float, str, Peer, Peer, str, str, int, str, bool]


@dataclass
class Ingested:
    counted: int = 0  # edge deltas applied
    duplicates: int = 0  # already counted (a resent batch)
    other_observer: int = 0  # counted by the node on the other side
    overflow: int = 0  # dropped: the Connection cap is reached
    external: int = 0  # ends that resolved to nothing better than "external"
    fqdn_overflow: int = 0  # of those, ends named by DNS whose group would pass the FQDN Group cap
    blocked: list[tuple[EdgeKey, str, int]] = field(default_factory=list)  # (edge, Violation|Denied, sessions)
    # What a PacketCapture's trigger waits for: (edge, Denied|Violation|Threat, when its first packet
    # was seen), from every observer's deltas (a block the server's node made included).
    events: list[tuple[EdgeKey, str, float]] = field(default_factory=list)


class Topology:
    def __init__(self, resolver: Resolver, *, max_connections: int, max_ports: int, modes: Modes | None = None,
                 max_fqdn_groups: int = 1000) -> None:
        self.resolver = resolver
        self.modes = modes or Modes(resolver)
        self.ledger = Ledger()
        self.alerts = Alerts()  # the Events threats raise on Groups
        self.edges: dict[EdgeKey, EdgeInfo] = {}
        self.groups: dict[str, GroupInfo] = {}
        self.ports: dict[tuple[str, str, str], set[int]] = {}  # (client, server, protocol) -> ports
        self.max_connections = max_connections
        self.max_ports = max_ports
        self.max_fqdn_groups = max_fqdn_groups
        self.overflow_total = 0
        self.fqdn_overflow_total = 0  # edge ends resolved to "external" for the FQDN Group cap
        self.lost: dict[str, float] = {}  # node -> when its agent last reported deltas it could not keep

    def forget(self, key: EdgeKey) -> None:
        """Drop an edge whose Connection was deleted (idle past its TTL)."""
        self.edges.pop(key, None)
        self.ledger.forget(key)
        ports = self.ports.get((key[0], key[1], key[3]))
        if ports is not None:
            ports.discard(key[2])
            if not ports:
                del self.ports[(key[0], key[1], key[3])]

    def idle_edges(self, now: float, ttl: float) -> list[tuple[EdgeKey, str]]:
        """The edges idle past ``ttl`` whose objects hold everything counted (nothing pending), with
        the resourceVersion to delete them at: what is written since is never deleted."""
        idle = []
        for key, info in self.edges.items():
            edge = self.ledger.edges.get(key)
            if edge is None or edge.dirty_since is not None or edge.resource_version is None:
                continue
            if info.last_seen and now - info.last_seen > ttl:
                idle.append((key, edge.resource_version))
        return idle

    def gone_groups(self, now: float, ttl: float) -> list[str]:
        """The Groups the operator made whose workload has had no pod for ``ttl``, or (any other
        kind) that no edge names and nothing touched for ``ttl``. Keeps, as it looks, since when
        each workload Group has been empty (``empty_since``): the clock of that ``ttl``."""
        referenced = {name for key in self.edges for name in (key[0], key[1])}
        gone = []
        for name, group in self.groups.items():
            if group.user_defined or not group.exists:
                continue
            if group.peer.kind == "Workload":
                if self.resolver.members(name, 0)[1]:
                    group.empty_since = None
                    continue
                group.empty_since = group.empty_since or now
                if now - group.empty_since > ttl:
                    gone.append(name)
            elif name not in referenced and now - group.last_seen > ttl:
                gone.append(name)
        return gone

    def key_for(self, client: str, server: str, port: int, protocol: str) -> EdgeKey | None:
        """The edge a delta belongs to: ports beyond the limit share the "any" edge (port 0)."""
        seen = self.ports.get((client, server, protocol))
        if seen is None:
            seen = self.ports[(client, server, protocol)] = set()
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
                                                             peer.workload, peer.member if peer.kind == "FQDN" else ""),
                                                        user_defined=peer.kind == "CIDR")
        elif peer.kind == group.peer.kind == "Workload" and (peer.workload_kind, peer.workload) != (
                group.peer.workload_kind, group.peer.workload):
            # Read back from a Group whose status was never written, or a workload of the same name
            # and another kind (a StatefulSet replaced by a Deployment): what the pods say now.
            group.peer = Peer(peer.group, peer.kind, peer.namespace, peer.workload_kind, peer.workload)
            group.written_last_seen = -1.0  # its status says the old one
        group.last_seen = max(group.last_seen, when)

    # -- the Group objects, as the watch sees them --------------------------------------------------

    def group_seen(self, body: Mapping[str, Any]) -> None:
        """A Group object was written (by a user: its spec; by us: its status)."""
        self.resolver.cidr_group_seen(body)
        meta = body.get("metadata") or {}
        group = self.groups.get(meta.get("name", ""))
        if group is None and self.resolver.catch_all(meta.get("name", "")):
            # Never seen in traffic, but it must say what its CIDRs do: a Group of its own to write.
            name = meta.get("name", "")
            group = self.groups[name] = GroupInfo(self.resolver.workload_peer(name) or Peer(name, "CIDR"),
                                                  exists=True, user_defined=True)
        if group is not None:
            group.generation = int(meta.get("generation") or 0)
            group.uid = str(meta.get("uid") or group.uid)

    def group_deleted(self, name: str) -> None:
        """A Group object was deleted. Its user's CIDR group is gone with it; a group the operator
        keeps (a workload, ``nodes``, ``external``, a name from DNS) is written anew at the next flush.
        Deleting one idle past its TTL, the operator forgets it first: it is not brought back."""
        self.resolver.cidr_group_gone(name)
        group = self.groups.get(name)
        if group is None:
            return
        if group.user_defined or group.peer.kind == "CIDR":
            del self.groups[name]
        else:
            group.exists, group.conditions, group.written_said = False, {}, ()

    def fqdn_groups(self) -> int:
        return sum(1 for g in self.groups.values() if g.peer.kind == "FQDN")

    def said(self, group: GroupInfo) -> list[Said]:
        """What a Group's conditions say, beyond its mode (pure: from what is kept here)."""
        said: list[Said] = []
        name = group.peer.group
        eff = self.modes.groups.get(name) if group.peer.kind == "Workload" else None
        if eff and eff.conflict:
            said.append(("ModeConflict", True, "EquallySpecificPolicies",
                         f"{', '.join(f'{ns}/{n}' for ns, n in eff.conflict)} select this group as specifically and "
                         f"set different modes: it keeps mode {eff.mode} until one of them changes"))
        if group.overflow:
            said.append(("ConnectionsRecorded", False, "ConnectionLimitReached",
                         f"{group.overflow} reports of new edges of this group were dropped: the cluster holds "
                         f"the maximum of {self.max_connections} Connections (FLOWMAP_OPERATOR_MAX_CONNECTIONS)"))
        if name == EXTERNAL:
            ignored = self.resolver.cidr_groups_ignored()
            why, what = [], []
            if self.fqdn_overflow_total:
                why.append("FQDNGroupLimitReached")
                what.append(f"{self.fqdn_overflow_total} reports of addresses named by DNS counted here: the cluster holds the "
                            f"maximum of {self.max_fqdn_groups} FQDN Groups (FLOWMAP_OPERATOR_MAX_FQDN_GROUPS)")
            if ignored:
                why.append("CIDRGroupLimitReached")
                what.append(f"{len(ignored)} CIDR Groups are not used, the newest ({', '.join(ignored[:5])}"
                            f"{' …' if len(ignored) > 5 else ''}): the operator uses at most "
                            f"{self.resolver.max_cidr_groups} (FLOWMAP_OPERATOR_MAX_CIDR_GROUPS)")
            if why:
                said.append(("GroupsRecorded", False, ",".join(why), "; ".join(what)))
        if self.resolver.catch_all(name):
            whose = (f"every address that is not a pod's, a Service's or a node's counts as workload "
                     f"{group.peer.namespace}/{group.peer.workload}, and a rule allowing this group allows the "
                     "whole Internet") if group.peer.kind == "Workload" else (
                     "every address that is not a pod's, a Service's or a node's counts as this group: nothing "
                     "is 'external' any more, and a rule allowing this group allows the whole Internet")
            said.append(("Warning", True, "CatchAllCIDR",
                         f"spec.cidrs holds {' and '.join(self.resolver.catch_all(name))}: {whose}"))
        return said

    def _fqdn_bound(self, result: Ingested) -> Callable[[Peer, str], Peer]:
        """For one batch: an end named by DNS whose group would pass the FQDN Group cap counts as
        ``external``, unless a rule of a policy names that group. What is kept is counted once."""
        admitted: set[str] = set()  # new FQDN groups of this batch
        kept: list[int] = []
        named: list[set[str]] = []

        def bound(peer: Peer, ip: str) -> Peer:
            if peer.kind != "FQDN" or peer.group in self.groups or peer.group in admitted:
                return peer
            if not kept:
                kept.append(self.fqdn_groups())
            if kept[0] + len(admitted) >= self.max_fqdn_groups:
                if not named:
                    named.append(self.modes.named_peers())
                if peer.group not in named[0]:
                    result.fqdn_overflow += 1
                    return Peer(EXTERNAL, "External", member=ip)
            admitted.add(peer.group)
            return peer
        return bound

    def ingest(self, batch: pb.ReportBatch, now: float) -> Ingested:
        """Apply one validated batch, or refuse it whole (OutOfOrder, NotKnownYet, Crowded).

        Every end is resolved before anything is changed: a batch refused because an address is
        not known yet leaves no trace, and is applied whole when resent. What the batch teaches
        about the world comes first, since its own deltas may need it: the node's addresses and
        the DNS answers it saw, the VMs it runs are facts of the node, and taking them twice changes nothing.
        """
        agent, seq = batch.agent_id, batch.sequence
        sent = batch.sent_unix_ms / 1000 or now
        self.resolver.node_addresses_seen(batch.node, batch.node_addresses, sent)
        if batch.vms_followed:
            self.resolver.vms_seen(batch.node, ((vm.name, vm.label, vm.addresses) for vm in batch.vms), sent, now)
        self.resolver.pod_addresses_seen(batch.node, ((e.pod, e.ips) for e in batch.pod_addresses), sent, now)
        if not seq:  # a question for the acknowledgement
            self.ledger.begin_batch(agent, batch.node, 0, batch.acked, 0)
            return Ingested()
        for name in batch.names:
            self.resolver.learn_name(name.ip, name.name, name.ttl_seconds, name.seen_unix_ms / 1000 or now, now)
        result = Ingested()
        bound = self._fqdn_bound(result)
        resolved = [r for r in (self._resolve(delta, batch.node, now, result, bound) for delta in batch.edges) if r]
        # Several deltas of one batch can land on one edge (two pods of a workload on this node,
        # collapsed ports): merge them first, since the ledger takes one delta per edge per batch.
        merged: dict[EdgeKey, tuple[Counters, tuple[pb.ThreatHit, ...], int, Peer, Peer]] = {}
        for delta, when, protocol, client, server, client_ip, server_ip, port, service, other in resolved:
            key = self.key_for(client.group, server.group, port, protocol)
            if key is None:
                # Said on the group whose edges these are: the client's, unless it would be a new group
                # only to say so (an outside client of one of ours: 500 of them made 500 Groups).
                holder = client if client.kind == "Workload" or client.group in self.groups else server
                self._touch(holder, when)
                result.overflow += 1
                self.overflow_total += 1
                self.groups[holder.group].overflow += 1
                continue
            self._touch(client, when)
            self._touch(server, when)
            info = self.edge(key)
            action, by = self.modes.judge(client, server, client_ip, server_ip, key[2], protocol,
                                          delta.verdict == pb.DENIED, delta.packets_s2c > 0)
            self._act(key, info, action, by, when, now, delta.denied_for if action == DENIED else "")
            first = delta.first_seen_unix_ms / 1000 or when
            threats = tuple(delta.threats)
            if action in (VIOLATION, DENIED):
                result.events.append((key, action, first))
            if threats:
                result.events.append((key, THREAT, first))
            if other:
                result.other_observer += 1
                continue
            result.external += (client.kind == "External") + (server.kind == "External")
            counters = Counters(delta.bytes_c2s, delta.bytes_s2c, delta.packets_c2s, delta.packets_s2c,
                                delta.sessions_opened)
            before = merged.get(key)
            if before is not None:
                total, earlier, active, _, _ = before
                total.add(counters)
                merged[key] = (total, earlier + threats, active + delta.sessions_active, client, server)
            else:
                merged[key] = (counters, threats, delta.sessions_active, client, server)
            info.apps.update(delta.apps)  # none yet: the dp has not decided (it says "unknown" when it gives up)
            info.service = service or info.service
            info.first_seen = min(info.first_seen, first) if info.first_seen else first
            info.last_seen = max(info.last_seen, when)
        for key in merged:
            edge = self.ledger.edges.get(key)
            if edge and agent not in edge.watermarks and agent not in edge.pending and (
                    len(edge.watermarks.keys() | edge.pending.keys()) >= MAX_OBSERVERS):
                raise Crowded(f"edge {key} already carries {MAX_OBSERVERS} unconfirmed observers")
        # Only now does the batch take its place in the agent's sequence: a refusal above must
        # leave no trace, or the batch could be acknowledged without having been counted.
        state = self.ledger.agents.get(agent)
        fresh = state is None or seq > max(state.delivered, batch.acked)  # not a batch resent
        self.ledger.begin_batch(agent, batch.node, seq, batch.acked, batch.previous)
        if fresh:
            self.fqdn_overflow_total += result.fqdn_overflow
        for key, (counters, threats, active, client, server) in merged.items():
            info = self.edges[key]
            info.active[agent] = active
            if self.ledger.apply(agent, seq, key, counters, now):
                result.counted += 1
                if info.action in (VIOLATION, DENIED):
                    result.blocked.append((key, info.action, counters.sessions))
                if threats:
                    names = tally(info.threats, threats, now)
                    workloads = [p.group for p in (client, server) if p.kind == "Workload"] or [server.group]
                    self.alerts.saw(workloads, key, names, info.threats, now)
                if info.action != DENIED:  # what a group tried and was refused is no rule of it
                    self.modes.learn(client, server, key[2], key[3], info.apps, counters.sessions,
                                     info.first_seen, info.last_seen)
            else:
                result.duplicates += 1
        return result

    def _resolve(self, delta: pb.EdgeDelta, node: str, now: float, result: Ingested,
                 bound: Callable[[Peer, str], Peer]) -> _Resolved | None:
        """Both ends of one delta (raises NotKnownYet), or None for a delta the other observer counts;
        ``bound`` is the batch's FQDN Group cap (``_fqdn_bound``).

        One observer per session: the client's node when the client is captured (a pod or a node
        that runs an agent), else the server's (an external client, a pod or a node without an
        agent). Another node's report of a captured client's session is not counted; only a block
        it saw its own rules make is taken from it.
        """
        when = delta.last_seen_unix_ms / 1000 or now
        protocol = PROTOCOLS[delta.protocol]
        client_end, server_end = delta.client, delta.server
        client_local, server_local, denied = client_end.local, server_end.local, delta.verdict == pb.DENIED
        if not client_local and not server_local and not denied:
            result.other_observer += 1  # neither end is this node's: whoever it is, not ours to count
            return None
        client_ip, server_ip = client_end.ip, server_end.ip
        client = self.resolver.resolve_endpoint(client_ip, when, node, client_local, client_end.pod, now)
        other = not client_local and not (server_local and not self.resolver.captured(client))
        if other and not denied:
            result.other_observer += 1
            return None
        via = self.resolver.resolve_service(server_ip, server_end.port, protocol, when)
        if via:
            server, port, service = via
            if (claimed := self.resolver.intercepting(server_ip)) and len(delta.threats) < MAX_THREATS:
                delta.threats.append(pb.ThreatHit(
                    name=EXTERNAL_IP_MITM, time_unix_ms=delta.last_seen_unix_ms,
                    snippet=f"{server_ip}:{server_end.port} is an externalIP of Service {claimed}"[:MAX_SNIPPET]))
        else:
            server = self.resolver.resolve_endpoint(server_ip, when, node, server_local, server_end.pod, now)
            port, service = server_end.port, ""
        return (delta, when, protocol, bound(client, client_ip), bound(server, server_ip), client_ip, server_ip, port,
                service, other)

    def _act(self, key: EdgeKey, info: EdgeInfo, action: str, by: PolicyKey | None, when: float, now: float,
             threat: str = "") -> None:
        """Take a judgement of the edge: a change is written, and what no rule allows (or a threat
        blocked: ``threat``, the agent's ``denied_for``) is raised."""
        first = (action, threat) != (info.action, info.denied_for)
        if first:
            if info.action in (VIOLATION, DENIED):
                self.modes.unblocked(info.policy, info.name)
            info.action, info.policy, info.denied_for = action, by, threat
            self.ledger.touch(key, now)
        if action in (VIOLATION, DENIED):
            client, server, port, protocol = key
            if threat:
                why, mode = f"threat {threat}", f"blocked: threat {threat}"
            else:
                why = NO_RULE
                mode = f"{NO_RULE}; " + ("Protect mode blocked it" if action == DENIED else "it was let through")
            self.modes.blocked(by, info.name, action, f"{client} -> {server} port {port or 'any'}/{protocol}: "
                               f"{mode} (Connection {info.name})", when, first, why)
