"""What the operator writes into its objects, and what it reads back from them (pure).

Every ``status`` the writers send is built here from what the core keeps (the topology, the
ledger's flush plan, the modes), and every object read on start is turned back into the core's
terms here: the writers (flowmap_operator.writing, .loading, .policing) only schedule, send and
feed the answers back. Conditions go through flowmap_operator.conditions, one way for all.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from flowmap_operator.conditions import Said, conditions
from flowmap_operator.ledger import Counters, EdgeKey, FlushPlan, watermarks_from_status, watermarks_to_status
from flowmap_operator.policy.modes import MAX_EXAMPLES, Modes
from flowmap_operator.policy.rules import DISABLE_ANNOTATION, MAX_LEARNED, Policy, PolicyKey
from flowmap_operator.times import iso, parse_iso
from flowmap_operator.resolution import Peer, peer_kind, shown_kind
from flowmap_operator.threats import Tally, from_status, to_status
from flowmap_operator.topology import EdgeInfo, GroupInfo, Topology

MAX_MEMBERS = 32  # a workload Group's status.members
MAX_FQDN_ADDRESSES = 128  # a name's addresses a Group lists, four to a member entry

Facts = tuple[tuple[str, bool, str], ...]


def facts(said: list[Said]) -> Facts:
    """What a change of is worth a write: the conditions but their messages (counts in them change often)."""
    return tuple((kind, holds, reason) for kind, holds, reason, _ in said)


# -- Connections ----------------------------------------------------------------------------------


def connection_status(plan: FlushPlan, info: EdgeInfo) -> dict[str, Any]:
    """A Connection's whole status: the flush plan's counters and watermarks, and what the edge carries."""
    c = plan.counters
    status: dict[str, Any] = {
        "app": info.app,
        "applications": sorted(info.apps),
        "bytes": {"clientToServer": c.bytes_c2s, "serverToClient": c.bytes_s2c, "total": c.bytes_c2s + c.bytes_s2c},
        "packets": {"clientToServer": c.packets_c2s, "serverToClient": c.packets_s2c},
        "sessions": {"total": c.sessions, "active": sum(info.active.values())},
        "action": info.action,
        "observers": watermarks_to_status(plan.watermarks),
    }
    if info.first_seen:
        status["firstSeen"] = iso(info.first_seen)
    if info.last_seen:
        status["lastSeen"] = iso(info.last_seen)
    if info.service:
        status["service"] = info.service
    if info.policy:
        status["policy"] = f"{info.policy[0]}/{info.policy[1]}"
    if info.denied_for:
        status["deniedFor"] = info.denied_for
    if info.threats:
        status["threats"], status["threatSummary"] = to_status(info.threats)
    return status


def connection_key(obj: Mapping[str, Any]) -> EdgeKey:
    spec = obj.get("spec") or {}
    return spec["client"], spec["server"], int(spec["port"]), spec["protocol"]


def connection_body(key: EdgeKey, name: str, labels: Mapping[str, str] | None = None,
                    resource_version: str | None = None, status: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """A Connection object: its metadata, its spec (the edge) and, for an update, its status."""
    meta: dict[str, Any] = {"name": name}
    if labels:
        meta["labels"] = dict(labels)
    if resource_version is not None:
        meta["resourceVersion"] = resource_version
    body: dict[str, Any] = {"apiVersion": "flowmap.dev/v1alpha1", "kind": "Connection", "metadata": meta,
                            "spec": {"client": key[0], "server": key[1], "port": key[2], "protocol": key[3]}}
    if status is not None:
        body["status"] = dict(status)
    return body


def connection_labels(topology: Topology, key: EdgeKey) -> dict[str, str]:
    """The namespaces of both ends, as labels (``kubectl get connections -l``)."""
    namespaces = [topology.groups[g].peer.namespace if g in topology.groups else "" for g in key[:2]]
    return {k: v for k, v in zip(("flowmap.dev/client-namespace", "flowmap.dev/server-namespace"), namespaces) if v}


@dataclass
class ConnectionRead:
    """A Connection as read from the API: what the ledger and the edge take back from it."""

    key: EdgeKey
    counters: Counters
    watermarks: list[tuple[str, str, int]]
    resource_version: str
    name: str
    apps: list[str] = field(default_factory=list)
    service: str = ""
    first_seen: float = 0.0
    last_seen: float = 0.0
    threats: dict[str, Tally] = field(default_factory=dict)
    action: str = ""
    policy: PolicyKey | None = None
    denied_for: str = ""


def read_connection(obj: Mapping[str, Any]) -> ConnectionRead:
    status = obj.get("status") or {}
    b, p, s = status.get("bytes") or {}, status.get("packets") or {}, status.get("sessions") or {}
    counters = Counters(int(b.get("clientToServer", 0)), int(b.get("serverToClient", 0)),
                        int(p.get("clientToServer", 0)), int(p.get("serverToClient", 0)), int(s.get("total", 0)))
    namespace, _, policy = str(status.get("policy", "")).partition("/")
    return ConnectionRead(
        connection_key(obj), counters, watermarks_from_status(status), obj["metadata"]["resourceVersion"],
        obj["metadata"]["name"], list(status.get("applications") or []), status.get("service", ""),
        parse_iso(status.get("firstSeen")), parse_iso(status.get("lastSeen")),
        from_status(status.get("threats")), status.get("action") or "",
        (namespace, policy) if policy else None, str(status.get("deniedFor") or ""))


def edge_read_back(info: EdgeInfo, read: ConnectionRead) -> None:
    """An edge takes back what its Connection said (the operator's start)."""
    info.name = read.name
    info.apps.update(read.apps)
    info.service = read.service
    info.first_seen, info.last_seen, info.threats = read.first_seen, read.last_seen, read.threats
    info.action = read.action or info.action
    info.policy = read.policy or info.policy
    info.denied_for = read.denied_for if read.action else info.denied_for


# -- Groups ---------------------------------------------------------------------------------------


@dataclass
class GroupRead:
    """A Group as read from the API on start."""

    name: str
    peer: Peer
    mode: str
    fqdn_ips: list[str]
    last_seen: float
    user_defined: bool
    generation: int
    conditions: dict[str, dict[str, Any]]


def read_group(obj: Mapping[str, Any]) -> GroupRead:
    status, spec, meta = obj.get("status") or {}, obj.get("spec") or {}, obj["metadata"]
    name = meta["name"]
    wl = status.get("workload") or {}
    members = status.get("members") or []
    kind = peer_kind(status.get("kind") or ("CIDR" if spec.get("cidrs") else "Workload"), wl.get("kind", ""))
    fqdn = members[0].get("name", "") if kind == "FQDN" and members else ""
    ips = [ip for member in members for ip in member.get("ips") or []] if fqdn else []
    said = {c["type"]: c for c in status.get("conditions") or [] if isinstance(c, dict) and "type" in c}
    return GroupRead(name, Peer(name, kind, status.get("namespace", ""), wl.get("kind", ""), wl.get("name", ""), fqdn),
                     status.get("mode", ""), ips, parse_iso(status.get("lastSeen")), bool(spec.get("cidrs")),
                     int(meta.get("generation") or 0), said)


def written_facts(written: Mapping[str, Mapping[str, Any]]) -> Facts:
    """The facts (type, holds, reason) of conditions as written."""
    return tuple((c["type"], c.get("status") == "True", c.get("reason", "")) for c in written.values())


def group_body(peer: Peer) -> dict[str, Any]:
    """A new Group object: labelled by kind and namespace; its status follows in its own write."""
    labels = {"flowmap.dev/kind": shown_kind(peer).lower()}
    if peer.namespace:
        labels["flowmap.dev/namespace"] = peer.namespace
    return {"apiVersion": "flowmap.dev/v1alpha1", "kind": "Group", "metadata": {"name": peer.group, "labels": labels}}


def group_status(topology: Topology, group: GroupInfo, now: float) -> tuple[dict[str, Any], list[Said]]:
    """A Group's status (a merge patch) and what its conditions say, from the core's view of it."""
    peer, modes, resolver = group.peer, topology.modes, topology.resolver
    status: dict[str, Any] = {"kind": shown_kind(peer), "lastSeen": iso(group.last_seen or now)}
    if peer.namespace:
        status["namespace"] = peer.namespace
    if peer.kind == "Workload":
        if peer.workload_kind:  # else not said yet (a merge patch keeps what is there)
            status["workload"] = {"kind": peer.workload_kind, "name": peer.workload}
        members, count = resolver.members(peer.group, MAX_MEMBERS)
        status["members"], status["memberCount"] = members, count
        status["mode"], by = modes.mode(peer.group)
        status["policy"] = f"{by[0]}/{by[1]}" if by else None
    elif peer.kind == "FQDN":
        ips = resolver.fqdn_addresses(peer.group, now)
        status["members"] = [{"name": peer.member or peer.group, "ips": ips[i:i + 4]}
                             for i in range(0, min(len(ips), MAX_FQDN_ADDRESSES), 4)]
        status["memberCount"] = len(ips)
    said = topology.said(group)
    status["conditions"] = conditions(said, group.conditions, now, group.generation or None) or None
    return status, said


def refused_conditions(group: GroupInfo, said: str, retry_max: float, now: float) -> list[dict[str, Any]]:
    """A Group's conditions once the API server refused its status: ``StatusWritten`` False, with why."""
    kept = [(c["type"], c.get("status") == "True", c.get("reason", ""), c.get("message", ""))
            for c in group.conditions.values() if c["type"] != "StatusWritten"]
    return conditions([*kept, ("StatusWritten", False, "RefusedByAPIServer",
                               f"{said}; it is written again with backoff, at most every {retry_max:.0f} s")],
                      group.conditions, now, group.generation or None)


# -- NetworkLearningPolicies ----------------------------------------------------------------------


def policy_status(modes: Modes, key: PolicyKey, now: float, *, agents: set[str], watching: set[str],
                  lossy: set[str]) -> dict[str, Any]:
    """A policy's status: selection, learned rules, what Protect blocks, conditions.

    ``agents``: nodes running an agent; ``watching``: nodes whose agent takes policy now;
    ``lossy``: nodes whose agents lately reported deltas they could not keep.
    """
    p = modes.policies[key]
    selected = sorted(g for g, eff in modes.groups.items() if key in eff.policies)
    governed = [g for g in selected if modes.groups[g].policy == key]
    conflicts = sorted({(g, other) for g in selected for other in modes.groups[g].conflict if other != key})
    nodes = {pod[3] for g in governed for pod in modes.resolver.group_pods(g) if pod[3]}
    unwatched = sorted(nodes - (watching if p.mode == "Protect" else agents))
    foreign = p.foreign_groups()
    off = modes.enforcement_disabled or p.disabled
    said: list[Said] = []
    if foreign:
        said.append(("Ready", False, "InvalidGroups", f"groups of another namespace: {', '.join(foreign[:5])}"))
    elif conflicts:
        said.append(("Ready", False, "ModeConflict", "; ".join(
            f"{g}: {other[0]}/{other[1]} is as specific and sets another mode" for g, other in conflicts[:5])))
    else:
        said.append(("Ready", True, "Ready", f"mode {p.mode} for {len(governed)} of {len(selected)} selected groups"))
    said.append(("Learning", p.mode == "Learn" and bool(governed), "Learning" if p.mode == "Learn" else "NotLearning",
                 f"{p.learned_count()} rules learned" if p.mode == "Learn" else f"mode {p.mode}: rules are fixed"))
    if p.mode != "Protect":
        enforcing = (False, "NotProtectMode", f"mode {p.mode}: nothing is blocked")
    elif off:
        enforcing = (False, "EnforcementDisabled", "the emergency switch is on: nothing is blocked"
                     + (f" (annotation {DISABLE_ANNOTATION}=disabled)" if p.disabled else " (operator setting)"))
    elif not governed:
        enforcing = (False, "NothingSelected", "no group takes its mode from this policy")
    elif unwatched:
        enforcing = (False, "AgentsMissing", f"no agent takes policy on {', '.join(unwatched[:5])}")
    else:
        enforcing = (True, "Enforcing", f"blocked on {len(nodes)} nodes what no rule allows")
    said.append(("Enforcing", *enforcing))
    problems = []
    if unwatched:
        problems.append(("AgentsMissing", f"no agent on {', '.join(unwatched[:5])}: its traffic is not seen"
                         + (" or enforced" if p.mode == "Protect" else "")))
    if nodes & lossy:
        problems.append(("ReportsLost", f"agents on {', '.join(sorted(nodes & lossy)[:5])} lost reports lately"))
    if p.learned_overflow:
        problems.append(("LearnedRulesFull", f"{p.learned_overflow} connections not learned: "
                         f"{MAX_LEARNED} rules is the most a policy keeps; split it or write spec.rules"))
    said.append(("Degraded", bool(problems), ",".join(r for r, _ in problems) or "AsExpected",
                 "; ".join(m for _, m in problems) or "nothing lost, every node has an agent"))
    said.append(_warning(p, modes.system_namespaces))
    blocking = modes.blocking.get(key, {})
    examples = sorted(blocking.items(), key=lambda kv: -kv[1][0])[:MAX_EXAMPLES]
    learned = p.learned_rules()
    return {"observedGeneration": p.generation, "ruleCount": len(p.rules), "learnedCount": len(learned),
            "groups": selected[:256], "learnedRules": learned[:MAX_LEARNED],
            "wouldBlock": {"count": len(blocking) + p.blocked_forgotten,
                           "examples": [{"connection": c, "lastSeen": iso(t), "reason": why}
                                        for c, (t, why) in examples]},
            "conditions": conditions(said, p.conditions, now, p.generation)}


def _warning(p: Policy, system_namespaces: frozenset[str]) -> Said:
    """What the API server accepts but is most likely a mistake: Protect for every workload of a
    namespace the cluster runs on (its DNS, its CNI, kube-proxy), where whatever was not learned
    is then blocked."""
    everything = p.selector is not None and not p.groups and not (
        p.selector.get("matchLabels") or p.selector.get("matchExpressions"))
    if p.mode == "Protect" and everything and p.namespace in system_namespaces:
        return ("Warning", True, "ProtectsWholeSystemNamespace",
                f"selector {{}} puts every workload of {p.namespace} in Protect mode: the cluster's own "
                "components there (DNS, the CNI, kube-proxy …) are blocked from whatever they were not seen "
                "doing; select the workloads to protect by name or labels")
    return ("Warning", False, "AsExpected", "nothing unusual")
