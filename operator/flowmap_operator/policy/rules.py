"""One NetworkLearningPolicy: what it selects, what its rules allow, what it learned (pure).

Rules are seen from the selected group's side: ``Egress`` rules allow the group as client,
``Ingress`` rules as server. ``spec.rules`` come from git and apply to every group the policy
selects; learned rules (``status.learnedRules``) each name the group that made the connection.
Enforcement is by address, protocol and port; a rule's ``app`` documents what was seen.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from flowmap_api.limits import MAX_POLICY_THREATS
from flowmap_api.threats import BY_NAME
from flowmap_operator.times import iso, parse_iso

MODES = ("Learn", "Monitor", "Protect")
EGRESS, INGRESS = "Egress", "Ingress"
MAX_LEARNED = 1024  # status.learnedRules maxItems
MAX_PORTS = 20  # more ports between two groups collapse into one "any" rule (NeuVector's rule)
ANY = 0
DISABLE_ANNOTATION = "flowmap.dev/enforcement"  # "disabled": this policy's Protect blocks nothing

PolicyKey = tuple[str, str]  # namespace, name
LearnKey = tuple[str, str, str, str]  # group, direction, peer group, protocol


@dataclass(frozen=True)
class Rule:
    direction: str
    peer: str = ""  # a group name, or
    cidr: ipaddress.IPv4Network | ipaddress.IPv6Network | None = None
    ports: tuple[tuple[int, str], ...] = ()  # (port or ANY, protocol); empty: any port of any protocol
    app: str = ""

    def allows_port(self, port: int, protocol: str) -> bool:
        return not self.ports or any(proto == protocol and p in (ANY, port) for p, proto in self.ports)


@dataclass
class Learned:
    """Ports one group used with one peer, one direction and protocol (port ANY once collapsed)."""

    ports: dict[int, dict[str, Any]] = field(default_factory=dict)  # port -> {apps, first, last, evidence}


def matches(selector: Mapping[str, Any], labels: Mapping[str, str]) -> bool:
    """A Kubernetes label selector (matchLabels and matchExpressions) against a label set."""
    for key, value in (selector.get("matchLabels") or {}).items():
        if labels.get(key) != value:
            return False
    for expr in selector.get("matchExpressions") or []:
        key, op, values = expr.get("key", ""), expr.get("operator", ""), expr.get("values") or []
        if op == "In" and labels.get(key) not in values or op == "NotIn" and key in labels and labels[key] in values:
            return False
        if op == "Exists" and key not in labels or op == "DoesNotExist" and key in labels:
            return False
    return True


def _rule(raw: Mapping[str, Any]) -> Rule:
    peer = raw.get("peer") or {}
    cidr = None
    if peer.get("cidr"):
        try:
            cidr = ipaddress.ip_network(peer["cidr"], strict=False)
        except ValueError:
            cidr = None  # the schema refuses it; never trust, never crash
    ports = tuple((int(p.get("port") or ANY), p.get("protocol", "TCP")) for p in raw.get("ports") or [])
    return Rule(raw.get("direction", EGRESS), peer.get("group", ""), cidr, ports, raw.get("app", ""))


@dataclass
class Policy:
    namespace: str
    name: str
    generation: int = 0
    uid: str = ""
    mode: str = "Learn"
    groups: tuple[str, ...] = ()  # selected by name
    selector: Mapping[str, Any] | None = None  # selected by the labels of a workload's pods
    rules: tuple[Rule, ...] = ()
    block_threats: frozenset[str] = frozenset()  # spec.threats with action Block (Protect mode blocks them)
    disabled: bool = False  # the annotation: enforcement off for this policy
    learned: dict[LearnKey, Learned] = field(default_factory=dict)
    learned_overflow: int = 0  # connections not learned: status.learnedRules is full
    blocked_forgotten: int = 0  # connections no rule allows, beyond those still listed
    conditions: dict[str, dict[str, Any]] = field(default_factory=dict)  # as last written, by type

    @property
    def key(self) -> PolicyKey:
        return self.namespace, self.name

    def update(self, body: Mapping[str, Any]) -> None:
        """Take the object's spec and annotations (the operator never writes those)."""
        meta, spec = body.get("metadata") or {}, body.get("spec") or {}
        self.generation = int(meta.get("generation") or 0)
        self.uid = meta.get("uid", "")
        mode = spec.get("mode")
        self.mode = mode if mode in MODES else "Learn"
        self.groups = tuple(spec.get("groups") or ())
        self.selector = spec.get("selector")
        self.rules = tuple(_rule(r) for r in spec.get("rules") or [])
        # The schema bounds the list and its names; a name this operator does not know is dropped,
        # one the node cannot see (found by the operator) can never be hit there: it blocks nothing.
        self.block_threats = frozenset(t.get("name", "") for t in (spec.get("threats") or [])[:MAX_POLICY_THREATS]
                                       if t.get("action") == "Block" and t.get("name") in BY_NAME
                                       and BY_NAME[t["name"]].found_by == "dp")
        self.disabled = (meta.get("annotations") or {}).get(DISABLE_ANNOTATION) == "disabled"

    def load_status(self, status: Mapping[str, Any]) -> None:
        """Take the learned rules and conditions written before (an operator start, a new leader)."""
        self.learned.clear()
        for r in status.get("learnedRules") or []:
            key = (r.get("group", ""), r.get("direction", EGRESS), r.get("peer", ""), r.get("protocol", "TCP"))
            self.learned.setdefault(key, Learned()).ports[int(r.get("port") or ANY)] = {
                "apps": set(filter(None, str(r.get("app", "")).split(","))), "first": parse_iso(r.get("firstSeen")),
                "last": parse_iso(r.get("lastSeen")), "evidence": int(r.get("evidence") or 0)}
        self.conditions = {c["type"]: dict(c) for c in status.get("conditions") or [] if "type" in c}

    def specificity(self) -> tuple[int, int]:
        """Names beat selectors; a selector with more terms beats one with fewer."""
        if self.groups:
            return 2, 0
        sel = self.selector or {}
        return 1, len(sel.get("matchLabels") or {}) + len(sel.get("matchExpressions") or [])

    def selects(self, group: str, labels: Mapping[str, str] | None) -> bool:
        """Does it select this group of its namespace (``labels``: its pods' common labels)?"""
        if self.groups:
            return group in self.groups
        return self.selector is not None and labels is not None and matches(self.selector, labels)

    def foreign_groups(self) -> list[str]:
        """Named groups that are not of the policy's namespace: only the operator can tell."""
        return [g for g in self.groups if not g.startswith(f"{self.namespace}.")]

    # -- rules ------------------------------------------------------------------------------------

    def allows(self, group: str, direction: str, peer: str, peer_ip: str, port: int, protocol: str) -> bool:
        """Does a rule of this policy, written or learned, allow this connection of ``group``?"""
        for r in self.rules:
            if r.direction != direction or not r.allows_port(port, protocol):
                continue
            if r.peer and r.peer == peer:
                return True
            if r.cidr is not None and peer_ip and _within(peer_ip, r.cidr):
                return True
        learned = self.learned.get((group, direction, peer, protocol))
        return learned is not None and (ANY in learned.ports or (port != ANY and port in learned.ports))

    def learn(self, group: str, direction: str, peer: str, port: int, protocol: str, apps: set[str],
              sessions: int, first: float, last: float) -> bool:
        """Record a connection as a learned rule; False if there is no room left (counted)."""
        key = (group, direction, peer, protocol)
        entry = self.learned.get(key)
        if entry is None:
            if self.learned_count() >= MAX_LEARNED:
                self.learned_overflow += 1
                return False
            entry = self.learned[key] = Learned()
        if ANY in entry.ports:
            port = ANY
        elif port not in entry.ports and len(entry.ports) >= MAX_PORTS:
            merged: dict[str, Any] = {"apps": set(), "first": first, "last": last, "evidence": 0}
            for seen in entry.ports.values():
                merged["apps"] |= seen["apps"]
                merged["first"] = min(merged["first"], seen["first"] or merged["first"])
                merged["last"] = max(merged["last"], seen["last"])
                merged["evidence"] += seen["evidence"]
            entry.ports = {ANY: merged}
            port = ANY
        elif port not in entry.ports and self.learned_count() >= MAX_LEARNED:
            self.learned_overflow += 1
            return False
        seen = entry.ports.setdefault(port, {"apps": set(), "first": first, "last": last, "evidence": 0})
        seen["apps"] |= apps - {"unknown"}
        seen["first"] = min(seen["first"], first) if seen["first"] else first
        seen["last"] = max(seen["last"], last)
        seen["evidence"] += sessions
        return True

    def learned_count(self) -> int:
        return sum(len(entry.ports) for entry in self.learned.values())

    def learned_rules(self, group: str | None = None) -> list[dict[str, Any]]:
        """``status.learnedRules``, sorted (of one group, or all)."""
        out = []
        for (g, direction, peer, protocol), entry in sorted(self.learned.items()):
            if group is not None and g != group:
                continue
            for port, seen in sorted(entry.ports.items()):
                rule: dict[str, Any] = {"group": g, "direction": direction, "peer": peer, "port": port,
                                        "protocol": protocol, "evidence": seen["evidence"]}
                if seen["apps"]:
                    rule["app"] = ",".join(sorted(seen["apps"]))[:256]
                if seen["first"]:
                    rule["firstSeen"] = iso(seen["first"])
                if seen["last"]:
                    rule["lastSeen"] = iso(seen["last"])
                out.append(rule)
        return out


def _within(ip: str, net: ipaddress.IPv4Network | ipaddress.IPv6Network) -> bool:
    try:
        addr = ipaddress.ip_address(ip)
    except ValueError:
        return False
    return addr.version == net.version and addr in net
