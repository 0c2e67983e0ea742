"""Per node, what its agent enforces: the allowed peers of each local pod of a protected group (pure).

A rule's peer becomes addresses: a workload group's pods (host routes, all nodes), ``nodes`` the
node addresses, a CIDR group its networks, an FQDN group the addresses agents saw it resolve to,
``external`` everything (a learned "talks to unknown addresses" can only be kept that way), a
``cidr`` itself. The cluster's DNS pods on port 53 are always among a protected pod's egress
peers, and a protected DNS pod takes queries from anyone. The agent gets no special cases. Each
protected pod also carries the threats its policies Block (flowmap_operator.policy.modes).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

from flowmap_api import report_pb2 as pb
from flowmap_operator.policy.modes import Modes
from flowmap_operator.policy.rules import ANY, EGRESS, INGRESS
from flowmap_operator.resolution import EXTERNAL, NODES

PROTOCOLS = {"TCP": pb.TCP, "UDP": pb.UDP, "SCTP": pb.SCTP, "ICMP": pb.ICMP}
EVERYWHERE = ("0.0.0.0/0", "::/0")


def _host(ip: str) -> str:
    return f"{ip}/{32 if ipaddress.ip_address(ip).version == 4 else 128}"


class Compiler:
    def __init__(self, modes: Modes) -> None:
        self.modes, self.resolver = modes, modes.resolver

    def addresses(self, group: str, now: float) -> list[str]:
        """A group's addresses as networks, for a peer set."""
        if group == NODES:
            return [_host(ip) for ip in self.resolver.node_addresses()]
        if group == EXTERNAL:
            return list(EVERYWHERE)
        nets = self.resolver.cidr_networks(group)
        if nets:
            return nets
        pods = self.resolver.group_pods(group)
        if pods:
            return [_host(ip) for _, _, ips, _ in pods for ip in ips]
        return [_host(ip) for ip in self.resolver.fqdn_addresses(group, now)]

    def peers(self, group: str, direction: str, now: float) -> list[pb.PodPolicy.Peer]:
        """The allowed peers of one protected group in one direction, merged by peer and protocol."""
        eff = self.modes.groups.get(group)
        # (cidrs, protocol) -> ports; an empty port set is any port
        wanted: dict[tuple[tuple[str, ...], str], set[int] | None] = {}

        def allow(cidrs: Iterable[str], protocol: str, port: int) -> None:
            key = (tuple(sorted(set(cidrs))), protocol)
            if not key[0]:
                return
            ports = wanted.setdefault(key, set())
            if port == ANY or ports is None:
                wanted[key] = None
            else:
                ports.add(port)

        dns = [_host(ip) for g in self.modes.dns_groups() for _, _, ips, _ in self.resolver.group_pods(g) for ip in ips]
        if direction == EGRESS:
            for protocol in ("UDP", "TCP"):
                allow(dns, protocol, 53)
        elif self.modes.is_dns(group):
            for protocol in ("UDP", "TCP"):
                allow(EVERYWHERE, protocol, 53)
        for key in eff.policies if eff else ():
            policy = self.modes.policies.get(key)
            if policy is None:
                continue
            for rule in policy.rules:
                if rule.direction != direction:
                    continue
                cidrs = [str(rule.cidr)] if rule.cidr is not None else self.addresses(rule.peer, now)
                for port, protocol in rule.ports or [(ANY, p) for p in PROTOCOLS]:
                    allow(cidrs, protocol, port)
            for (g, d, peer, protocol), learned in policy.learned.items():
                if g == group and d == direction:
                    for port in learned.ports:
                        allow(self.addresses(peer, now), protocol, port)
        return [pb.PodPolicy.Peer(cidrs=list(cidrs), protocol=PROTOCOLS[protocol],
                                  ports=[] if ports is None else sorted(ports))
                for (cidrs, protocol), ports in sorted(wanted.items())]

    def node(self, node: str, now: float) -> pb.NodePolicy:
        """What ``node`` enforces (version left 0: the caller numbers the changes)."""
        if self.modes.enforcement_disabled:
            return pb.NodePolicy(enforcement_disabled=True)
        pods = []
        cache: dict[str, tuple[list[pb.PodPolicy.Peer], list[pb.PodPolicy.Peer]]] = {}
        for group in sorted(self.modes.groups):
            if not self.modes.enforced(group):
                continue
            for namespace, name, ips, where in self.resolver.group_pods(group):
                if where != node or not ips:
                    continue
                if group not in cache:
                    cache[group] = (self.peers(group, EGRESS, now), self.peers(group, INGRESS, now))
                egress, ingress = cache[group]
                pods.append(pb.PodPolicy(pod=f"{namespace}/{name}", ips=ips, egress=egress, ingress=ingress,
                                         block_threats=sorted(self.modes.blocked_threats(group))))
        return pb.NodePolicy(pods=pods)

