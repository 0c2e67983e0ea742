"""Which mode each workload group is in, and what that makes of its connections (pure).

It also marks what its judgements change, for the writers to take: policies whose status is due
(``dirty``, ``urgent``), Groups whose mode shows anew (``changed_groups``), Events to raise. The
statuses themselves are built by flowmap_operator.status.

Each group has one effective mode: that of the most specific NetworkLearningPolicy selecting it
(names beat selectors, more selector terms beat fewer). Two equally specific policies setting
different modes are a conflict: both say so in their conditions and the group keeps the mode it
had (never a guess). Groups no policy selects are in the operator's default mode. The rules of
every policy selecting a group add up, as NetworkPolicies do. DNS to the cluster's DNS is always
allowed.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from flowmap_operator.policy.rules import EGRESS, INGRESS, Policy, PolicyKey
from flowmap_operator.resolution import Peer, Resolver

LEARNED, ALLOWED, VIOLATION, DENIED = "Learned", "Allowed", "Violation", "Denied"
MAX_EVENTS = 1000  # Events waiting for the write budget; beyond, they are counted and dropped
MAX_EXAMPLES = 10  # status.wouldBlock.examples maxItems


@dataclass(frozen=True)
class Effective:
    mode: str
    policy: PolicyKey | None  # the policy that sets the mode; None in a conflict
    policies: tuple[PolicyKey, ...] = ()  # every policy selecting the group: their rules add up
    conflict: tuple[PolicyKey, ...] = ()  # equally specific policies that disagree


class Modes:
    def __init__(self, resolver: Resolver, *, default_mode: str = "Learn", enforcement_disabled: bool = False,
                 dns: tuple[str, Mapping[str, str]] = ("kube-system", {"k8s-app": "kube-dns"}),
                 system_namespaces: Iterable[str] = ("kube-system",)) -> None:
        self.resolver, self.default_mode, self.enforcement_disabled = resolver, default_mode, enforcement_disabled
        self.dns_namespace, self.dns_labels = dns
        # Where Protect for every workload at once blocks the cluster's own plumbing: a warning.
        self.system_namespaces = frozenset(system_namespaces)
        self.policies: dict[PolicyKey, Policy] = {}
        self.groups: dict[str, Effective] = {}  # selected workload groups
        self.prior: dict[str, str] = {}  # group -> the mode its Group showed when we started
        self.dirty: set[PolicyKey] = set()  # status to write when the budget allows
        self.urgent: set[PolicyKey] = set()  # status to write first: conditions or selection changed
        self.changed_groups: set[str] = set()  # Groups whose shown mode is to be written
        self.events: deque[tuple[PolicyKey, str, str]] = deque()  # (policy, reason, message) to raise
        self.events_dropped = 0
        # Connections no rule allows, or a threat blocked -> (last seen, why)
        self.blocking: dict[PolicyKey, dict[str, tuple[float, str]]] = {}
        self.version = 0  # bumped whenever what a node enforces may have changed
        self._stale, self._seen_resolver, self._dns = True, -1, frozenset[str]()

    # -- policies come and go ---------------------------------------------------------------------

    def seen(self, body: Mapping[str, Any], leading: bool) -> None:
        meta = body.get("metadata") or {}
        key = (meta.get("namespace", ""), meta.get("name", ""))
        policy = self.policies.get(key)
        if policy is None or not leading:
            # A new policy, or a follower keeping up with the leader: its status is the truth.
            policy = self.policies[key] = policy or Policy(*key)
            policy.load_status(body.get("status") or {})
        before = (policy.generation, policy.disabled) if policy.generation else None
        policy.update(body)
        if before == (policy.generation, policy.disabled):
            return  # our own status write coming back, or a label: nothing to redo
        self.blocking.pop(key, None)  # new rules or mode: what they block shows anew
        policy.blocked_forgotten = 0
        self._stale = True
        self.urgent.add(key)

    def gone(self, namespace: str, name: str) -> None:
        if self.policies.pop((namespace, name), None) is not None:
            self._stale = True
        self.blocking.pop((namespace, name), None)

    def refresh(self) -> list[tuple[PolicyKey, str]]:
        """Recompute who selects what after a policy or a pod changed; the groups a Learn policy
        newly governs (for the caller to seed with what the map already saw)."""
        if not self._stale and self._seen_resolver == self.resolver.version:
            return []
        self._stale, self._seen_resolver = False, self.resolver.version
        self._dns = frozenset(self.resolver.pods_labelled(self.dns_namespace, self.dns_labels))
        selecting: dict[str, list[Policy]] = {}
        workloads: dict[str, dict[str, dict[str, str]]] = {}
        for policy in self.policies.values():
            labels = workloads.setdefault(policy.namespace, self.resolver.workloads(policy.namespace))
            named = set(policy.groups) - set(policy.foreign_groups())
            for group in named | {g for g, lab in labels.items() if policy.selects(g, lab)}:
                selecting.setdefault(group, []).append(policy)
        groups: dict[str, Effective] = {}
        for group, policies in selecting.items():
            top = max(p.specificity() for p in policies)
            first = sorted((p for p in policies if p.specificity() == top), key=lambda p: p.key)
            every = tuple(sorted(p.key for p in policies))
            if len({p.mode for p in first}) == 1:
                groups[group] = Effective(first[0].mode, first[0].key, every)
            else:
                before = self.groups.get(group)
                mode = before.mode if before else self.prior.get(group, self.default_mode)
                groups[group] = Effective(mode, None, every, tuple(p.key for p in first))
        seeds = []
        for group in groups.keys() | self.groups.keys():
            old, new = self.groups.get(group), groups.get(group)
            if old == new:
                continue
            self.changed_groups.add(group)
            for eff in (old, new):
                self.urgent.update(eff.policies if eff else ())
            if new and new.mode == "Learn" and new.policy and (old is None or (old.mode, old.policy) != (
                    "Learn", new.policy)):
                seeds.append((new.policy, group))
        self.groups = groups
        self.version += 1
        return seeds

    def mode(self, group: str) -> tuple[str, PolicyKey | None]:
        eff = self.groups.get(group)
        return (eff.mode, eff.policy) if eff else (self.default_mode, None)

    def is_dns(self, group: str) -> bool:
        return group in self._dns

    def named_peers(self) -> set[str]:
        """The groups the rules of ``spec.rules`` name as peers (what git says must keep working)."""
        return {rule.peer for policy in self.policies.values() for rule in policy.rules if rule.peer}

    def dns_groups(self) -> list[str]:
        """The cluster DNS's workload groups (pods labelled as kube-dns in kube-system, by default)."""
        return sorted(self._dns)

    # -- connections --------------------------------------------------------------------------------

    def allows(self, group: str, direction: str, peer: Peer, peer_ip: str, port: int, protocol: str) -> bool:
        """Does any rule of ``group`` allow this connection (DNS to the cluster's DNS always is)?"""
        dns = self.is_dns(peer.group) if direction == EGRESS else self.is_dns(group)
        if dns and port == 53 and protocol in ("UDP", "TCP"):
            return True
        eff = self.groups.get(group)
        return eff is not None and any(
            self.policies[k].allows(group, direction, peer.group, peer_ip, port, protocol)
            for k in eff.policies if k in self.policies)

    def judge(self, client: Peer, server: Peer, client_ip: str, server_ip: str, port: int, protocol: str,
              denied: bool, answered: bool) -> tuple[str, PolicyKey | None]:
        """The Connection's action, and the policy that makes it so (if any).

        Allowed when the rules of every side in Monitor or Protect mode allow it, Learned when no
        side is in either mode. Else Denied when an agent saw its node block it (``denied``), or
        when a side in Protect mode is enforced and the server never answered: the agent of that
        side's node blocked it (its own report says so too; the client's node cannot know);
        Violation when it got through all the same (Monitor mode, a connection that was open
        before Protect, enforcement switched off).
        """
        action, by, blocked = LEARNED, None, False
        for me, peer, peer_ip, direction in ((client, server, server_ip, EGRESS), (server, client, client_ip, INGRESS)):
            if me.kind != "Workload":
                continue
            mode, policy = self.mode(me.group)
            if mode == "Learn":
                continue
            if not self.allows(me.group, direction, peer, peer_ip, port, protocol):
                action, by = VIOLATION, by or policy or self._setter(me.group)
                blocked = blocked or mode == "Protect" and self.enforced(me.group)
            elif action == LEARNED:
                action, by = ALLOWED, policy
        if denied or action == VIOLATION and blocked and not answered:
            return DENIED, by
        return action, by

    def enforced(self, group: str) -> bool:
        """Is the group's Protect mode in force (no emergency switch on)?"""
        eff = self.groups.get(group)
        setters = [self.policies.get(k) for k in ((eff.policy,) if eff.policy else eff.conflict)] if eff else []
        return (not self.enforcement_disabled and eff is not None and eff.mode == "Protect"
                and all(p is not None and not p.disabled for p in setters))

    def blocked_threats(self, group: str) -> frozenset[str]:
        """The threats whose sessions the group's nodes block: in Protect mode (in force), what every
        policy selecting it says to Block (they add up, as rules do); nothing in another mode."""
        eff = self.groups.get(group)
        if eff is None or not self.enforced(group):
            return frozenset()
        return frozenset().union(*(self.policies[k].block_threats for k in eff.policies if k in self.policies))

    def _setter(self, group: str) -> PolicyKey | None:
        eff = self.groups.get(group)
        return eff.conflict[0] if eff and eff.conflict else None

    def learn(self, client: Peer, server: Peer, port: int, protocol: str, apps: Iterable[str], sessions: int,
              first: float, last: float) -> None:
        """A counted delta of a connection: a rule of each side whose group is in Learn mode."""
        for me, peer, direction in ((client, server, EGRESS), (server, client, INGRESS)):
            eff = self.groups.get(me.group)
            if eff is None or eff.mode != "Learn" or eff.policy is None:
                continue
            policy = self.policies[eff.policy]
            before = policy.learned_overflow
            policy.learn(me.group, direction, peer.group, port, protocol, set(apps), sessions, first, last)
            self.dirty.add(eff.policy)
            if policy.learned_overflow and not before:
                self.urgent.add(eff.policy)  # Degraded: LearnedRulesFull

    def seed(self, key: PolicyKey, group: str,
             edges: Iterable[tuple[str, str, int, str, Iterable[str], int, float, float]]) -> None:
        """A Learn policy that newly governs ``group`` learns what the map already saw of it:
        (client, server, port, protocol, apps, sessions, first, last) per edge. Rules it already has
        (from its status, after a restart) keep their evidence."""
        policy = self.policies.get(key)
        if policy is None:
            return
        for client, server, port, protocol, apps, sessions, first, last in edges:
            for me, peer, direction in ((client, server, EGRESS), (server, client, INGRESS)):
                if me == group and not policy.allows(group, direction, peer, "", port, protocol):
                    policy.learn(group, direction, peer, port, protocol, set(apps), sessions, first, last)
        self.dirty.add(key)

    def blocked(self, policy: PolicyKey | None, connection: str, action: str, message: str, when: float,
                first: bool, why: str = "no rule allows it") -> None:
        """A connection no rule allows was seen, or a threat block on it (``why``); ``first``: its action
        (or why) just changed to this."""
        if policy is None or policy not in self.policies:
            return
        seen = self.blocking.setdefault(policy, {})
        if connection not in seen and len(seen) >= 10 * MAX_EXAMPLES:
            seen.pop(min(seen, key=lambda c: seen[c][0]))  # the count below stays exact; the oldest examples go
            self.policies[policy].blocked_forgotten += 1
        seen[connection] = (when, why)
        self.dirty.add(policy)
        if first:
            if len(self.events) < MAX_EVENTS:
                self.events.append((policy, action, message))
            else:
                self.events_dropped += 1

    def unblocked(self, policy: PolicyKey | None, connection: str) -> None:
        """A connection listed as blocked is allowed now (a rule was added)."""
        if policy is not None and self.blocking.get(policy, {}).pop(connection, None) is not None:
            self.dirty.add(policy)
