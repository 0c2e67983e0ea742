"""A NetworkPolicy evaluator (networking.k8s.io/v1 semantics), to judge exported policies by.

A connection from one address to another is allowed when the source pod's egress and the
destination pod's ingress both allow it: a side that no policy of its namespace selects (for that
direction) allows everything; a selected side allows what one of its rules allows. Addresses that
are no pod (nodes, the outside) have no side of their own.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class PodRef:
    namespace: str
    labels: tuple[tuple[str, str], ...]
    ips: tuple[str, ...]


def _selects(selector: Mapping[str, Any], labels: Mapping[str, str]) -> bool:
    for k, v in (selector.get("matchLabels") or {}).items():
        if labels.get(k) != v:
            return False
    for e in selector.get("matchExpressions") or []:
        key, op, values = e["key"], e["operator"], e.get("values") or []
        if (op == "In" and labels.get(key) not in values or op == "NotIn" and labels.get(key) in values
                or op == "Exists" and key not in labels or op == "DoesNotExist" and key in labels):
            return False
    return True


def _peer(peer: Mapping[str, Any], policy_ns: str, other_ip: str, other: PodRef | None) -> bool:
    if "ipBlock" in peer:
        addr = ipaddress.ip_address(other_ip)
        net = ipaddress.ip_network(peer["ipBlock"]["cidr"])
        return addr.version == net.version and addr in net and not any(
            addr in ipaddress.ip_network(e) for e in peer["ipBlock"].get("except") or [])
    if other is None:
        return False
    if "namespaceSelector" in peer:
        if not _selects(peer["namespaceSelector"], {"kubernetes.io/metadata.name": other.namespace}):
            return False
    elif other.namespace != policy_ns:
        return False
    return _selects(peer.get("podSelector") or {}, dict(other.labels))


def _ports(ports: Iterable[Mapping[str, Any]] | None, port: int, protocol: str) -> bool:
    ports = list(ports or [])
    return not ports or any(p.get("protocol", "TCP") == protocol and p.get("port") in (None, port) for p in ports)


def _side(policies: list[Mapping[str, Any]], me: PodRef, kind: str, other_ip: str, other: PodRef | None,
          port: int, protocol: str) -> bool:
    mine = [p for p in policies if p["metadata"]["namespace"] == me.namespace
            and kind in p["spec"].get("policyTypes", ["Ingress"])
            and _selects(p["spec"].get("podSelector") or {}, dict(me.labels))]
    if not mine:
        return True
    key, peers = ("egress", "to") if kind == "Egress" else ("ingress", "from")
    for p in mine:
        for rule in p["spec"].get(key) or []:
            if not _ports(rule.get("ports"), port, protocol):
                continue
            if not rule.get(peers) or any(_peer(x, me.namespace, other_ip, other) for x in rule[peers]):
                return True
    return False


def allowed(policies: list[Mapping[str, Any]], pods: list[PodRef], src: str, dst: str, port: int,
            protocol: str) -> bool:
    """Would these NetworkPolicies let ``src`` open a connection to ``dst``:``port``/``protocol``?"""
    by_ip = {ip: p for p in pods for ip in p.ips}
    s, d = by_ip.get(src), by_ip.get(dst)
    return ((s is None or _side(policies, s, "Egress", dst, d, port, protocol))
            and (d is None or _side(policies, d, "Ingress", src, s, port, protocol)))
