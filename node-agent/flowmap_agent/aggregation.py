"""The dp's per-session records become per-edge deltas for the operator (pure).

An edge, from the node's point of view, is client address -> server address and port, L4
protocol: the client's ephemeral port does not matter to the map, so all sessions between the
same two addresses on one server port add up. Endpoints on this node (its pods, the node itself
from any of its own addresses, a CNI bridge's gateway included) are marked local and local pods
named, which is how the operator knows which node counts an edge (and that a local end without
a pod is the node itself).
Under Protect mode each delta also says what this node's policy did to it (the policy in force
is injected; see flowmap_agent.enforcement.verdict). The dp sees a pod's call to a ClusterIP
before the node's DNAT, while the node's table judges it after: an edge the policy would deny
is judged again at the address the kernel sent it to (``destination``, from conntrack, injected).
Traffic that never leaves a link (IPv6 neighbour discovery, link-local, multicast, broadcast) is
the network's own plumbing, not a connection between workloads: it is not reported.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from flowmap_agent.enforcement import Policy, verdict
from flowmap_api import report_pb2 as pb
from flowmap_dp import wire_pb2

PROTOCOLS = {6: pb.TCP, 17: pb.UDP, 132: pb.SCTP, 1: pb.ICMP, 58: pb.ICMP}
MAX_OPEN_PER_EDGE = 1 << 20  # open-session tracking is a gauge; never let it grow without end


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
    policy: Policy = field(default_factory=Policy)  # the policy in force on this node
    # Where the node's DNAT sent a session: (l4, client, port, server, port) -> (address, port), or None.
    destination: Callable[[tuple[int, str, int, str, int]], tuple[str, int] | None] | None = None
    # Open sessions per edge (their 5-tuples), for the sessions_active gauge.
    _open: dict[tuple[str, str, int, int], set[tuple[int, int]]] = field(default_factory=dict)

    def _endpoint(self, ip: str, port: int) -> pb.Endpoint:
        pod = self.local_pods.get(ip, "")
        return pb.Endpoint(ip=ip, port=port, pod=pod, local=bool(pod) or ip in self.node_ips)

    def take(self, report: wire_pb2.Report) -> tuple[list[pb.EdgeDelta], list[pb.DnsName]]:
        """One dp report's sessions as edge deltas (one per edge), and the names its DNS answers gave."""
        edges: dict[tuple[str, str, int, int], pb.EdgeDelta] = {}
        sample: dict[tuple[str, str, int, int], tuple[int, str, int, str, int]] = {}  # a session of each edge
        threats: dict[tuple[int, bytes, int, bytes, int], list[wire_pb2.ThreatHit]] = {}
        for hit in report.threats:
            threats.setdefault((hit.ip_proto, hit.client_ip, hit.client_port, hit.server_ip, hit.server_port),
                               []).append(hit)
        for s in report.sessions:
            protocol = PROTOCOLS.get(s.ip_proto)
            if protocol is None or len(s.client_ip) not in (4, 16) or len(s.server_ip) not in (4, 16):
                continue
            if link_scoped(s.client_ip) or link_scoped(s.server_ip):
                continue
            client, server = text(s.client_ip), text(s.server_ip)
            port = s.server_port if protocol != pb.ICMP else 0
            key = (client, server, port, protocol)
            d = edges.get(key)
            if d is None:
                d = edges[key] = pb.EdgeDelta(client=self._endpoint(client, 0), server=self._endpoint(server, port),
                                              protocol=protocol)
                sample[key] = (s.ip_proto, client, s.client_port, server, s.server_port)
            d.bytes_c2s += s.bytes_c2s
            d.bytes_s2c += s.bytes_s2c
            d.packets_c2s += s.packets_c2s
            d.packets_s2c += s.packets_s2c
            first, last = s.first_seen_ns // 1_000_000, s.last_seen_ns // 1_000_000
            if first and (not d.first_seen_unix_ms or first < d.first_seen_unix_ms):
                d.first_seen_unix_ms = first
            d.last_seen_unix_ms = max(d.last_seen_unix_ms, last)
            if s.app and s.app not in d.apps:
                d.apps.append(s.app)
            opened = self._open.setdefault(key, set())
            session = (s.client_port, s.vlan)
            if s.opened:  # not s.new: a DNAT'd reply half or a session picked up mid-stream is no new session
                d.sessions_opened += 1
                if len(opened) < MAX_OPEN_PER_EDGE:
                    opened.add(session)
            if s.closed:
                d.sessions_closed += 1
                opened.discard(session)
            for hit in threats.get((s.ip_proto, s.client_ip, s.client_port, s.server_ip, s.server_port), ()):
                if len(d.threats) < 16:
                    d.threats.append(pb.ThreatHit(name=hit.threat, snippet=hit.snippet[:256],
                                                  time_unix_ms=hit.seen_ns // 1_000_000))
        for key, d in edges.items():
            d.sessions_active = len(self._open.get(key, ()))
            d.verdict = verdict(self.policy, key[0], key[1], key[2], key[3], answered=d.bytes_s2c > 0,
                                opened=d.sessions_opened > 0)
            if d.verdict == pb.DENIED and self.destination is not None:
                sent_to = self.destination(sample[key])  # a ClusterIP: judged where the table saw it
                if sent_to is not None:
                    d.verdict = verdict(self.policy, key[0], sent_to[0], sent_to[1], key[3],
                                        answered=d.bytes_s2c > 0, opened=d.sessions_opened > 0)
            if not d.sessions_active:
                self._open.pop(key, None)
        names = [pb.DnsName(ip=text(a.address), name=a.name.rstrip(".").lower(), ttl_seconds=a.ttl,
                            seen_unix_ms=report.end_ns // 1_000_000)
                 for a in report.dns if a.type in ("A", "AAAA") and len(a.address) in (4, 16) and a.name]
        return list(edges.values()), names
