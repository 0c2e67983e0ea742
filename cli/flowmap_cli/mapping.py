"""The map as ``flowmap graph`` draws it: Groups and Connections read into nodes and edges.

Pure: plain dicts in (as the API returns them), plain values out. Everything read from the
cluster is treated as untrusted: a missing field, a wrong type or an overlong string never fails
the picture, it is drawn as what is known.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from flowmap_operator.resolution import LIBVIRT

ACTIONS = ("Learned", "Allowed", "Violation", "Denied")  # mildest first: a merged edge shows the worst
# Groups of pods: a workload's, and a KubeVirt VM's (its virt-launcher pods), drawn apart; and a
# libvirt VM's (its members are VMs on nodes, LIBVIRT).
WORKLOADS = ("Workload", "VM")
MAX_TEXT = 253  # Kubernetes names are at most this long; longer text from the cluster is cut


@dataclass(frozen=True)
class Node:
    """One Group: a workload, ``nodes``, ``external``, an FQDN or a CIDR group (or a namespace, collapsed)."""

    name: str
    kind: str = "Unknown"  # Workload | VM | Nodes | External | FQDN | CIDR | Namespace | Unknown
    namespace: str = ""
    detail: str = ""  # what the node is: the workload's kind, the CIDRs, how many workloads


@dataclass(frozen=True)
class Edge:
    """One Connection, or several merged into one line when the map is collapsed."""

    client: str
    server: str
    ports: tuple[tuple[int, str], ...]  # (port, protocol); port 0 means any
    apps: tuple[str, ...] = ()
    action: str = ""
    bytes: int = 0
    sessions: int = 0
    threats: int = 0
    names: tuple[str, ...] = ()  # the Connections drawn as this edge (at most one kept when merged)
    count: int = 1


@dataclass
class Map:
    """Nodes by name and edges; ``hidden`` counts the Connections left out to keep the picture readable."""

    nodes: dict[str, Node] = field(default_factory=dict)
    edges: list[Edge] = field(default_factory=list)
    hidden: int = 0
    namespace: str = ""  # the namespace the map is focused on, if any
    actions: dict[str, int] = field(default_factory=dict)  # Connections per action, taken before merging

    def tally(self) -> dict[str, int]:
        """Connections per action ("" for none yet): a merged line shows one action for many."""
        if self.actions:
            return self.actions
        counts: dict[str, int] = {}
        for e in self.edges:
            counts[e.action] = counts.get(e.action, 0) + e.count
        return counts


def _text(value: Any, limit: int = MAX_TEXT) -> str:
    return value[:limit] if isinstance(value, str) else ""


def _int(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else 0


def _dict(value: Any) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


def _list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []


def group_node(obj: Mapping[str, Any]) -> Node:
    """A Group object as a node."""
    status, spec = _dict(obj.get("status")), _dict(obj.get("spec"))
    name, kind = _text(_dict(obj.get("metadata")).get("name")), _text(status.get("kind"), 16)
    kind = kind if kind in WORKLOADS + ("Nodes", "External", "FQDN", "CIDR") else "Unknown"
    namespace = _text(status.get("namespace"), 63)
    workload = _dict(status.get("workload"))
    if kind in WORKLOADS:
        members, what = _int(status.get("memberCount")), _text(workload.get("kind"), 16)
        unit = "VM" if what == LIBVIRT else "pod"
        counted = f"{members} {unit}{'s' if members > 1 else ''}" if members else ""
        detail = " · ".join(p for p in (what, counted) if p)
    elif isinstance(spec.get("cidrs"), list):
        cidrs = [_text(c, 43) for c in spec["cidrs"][:64]]
        detail = ", ".join(cidrs[:2]) + (f" +{len(cidrs) - 2}" if len(cidrs) > 2 else "")
        kind = "CIDR"
    else:
        detail = {"Nodes": "the nodes", "External": "any other address", "FQDN": "learned from DNS"}.get(kind, "")
    return Node(name, kind, namespace, detail)


def connection_edge(obj: Mapping[str, Any]) -> Edge:
    """A Connection object as an edge."""
    spec, status = _dict(obj.get("spec")), _dict(obj.get("status"))
    apps = tuple(a for a in _text(status.get("app"), 256).split(",") if a)[:22]
    action = _text(status.get("action"), 16)
    return Edge(client=_text(spec.get("client")), server=_text(spec.get("server")),
                ports=((min(_int(spec.get("port")), 65535), _text(spec.get("protocol"), 8) or "?"),), apps=apps,
                action=action if action in ACTIONS else "", bytes=_int(_dict(status.get("bytes")).get("total")),
                sessions=_int(_dict(status.get("sessions")).get("total")),
                threats=sum(_int(_dict(t).get("count")) for t in _list(status.get("threats"))[:32]),
                names=(_text(_dict(obj.get("metadata")).get("name")),))


def build(groups: Iterable[Node], edges: Iterable[Edge],
          connection_namespaces: Mapping[str, str] | None = None) -> Map:
    """The map: every Group, plus a node for each end of a Connection whose Group is not (yet) there.

    ``connection_namespaces`` gives the namespace of such ends, from the labels the operator puts
    on Connections, so that a workload whose Group is missing still lands in its namespace.
    """
    m = Map(nodes={n.name: n for n in groups if n.name})
    for e in edges:
        if not e.client or not e.server:
            continue
        m.edges.append(e)
        for end in (e.client, e.server):
            if end not in m.nodes:
                namespace = (connection_namespaces or {}).get(end, "")
                m.nodes[end] = Node(end, "Workload" if namespace else "Unknown", namespace, "no Group object")
    return m


def focus(m: Map, namespace: str) -> Map:
    """Only the edges with at least one end in ``namespace``, and the nodes they touch."""
    inside = {name for name, n in m.nodes.items() if n.namespace == namespace}
    edges = [e for e in m.edges if e.client in inside or e.server in inside]
    touched = inside | {e.client for e in edges} | {e.server for e in edges}
    return Map({k: n for k, n in m.nodes.items() if k in touched}, edges, m.hidden, namespace, m.actions)


def severity(e: Edge) -> int:
    """How bad the edge's action is: -1 none yet, 0 Learned ... 3 Denied."""
    return ACTIONS.index(e.action) if e.action in ACTIONS else -1


def merge(edges: Iterable[Edge]) -> list[Edge]:
    """One edge per (client, server): ports, apps and counters together, the worst action shown."""
    by_pair: dict[tuple[str, str], Edge] = {}
    for e in edges:
        seen = by_pair.get((e.client, e.server))
        if seen is None:
            by_pair[(e.client, e.server)] = e
            continue
        worst = max(seen, e, key=severity)
        by_pair[(e.client, e.server)] = replace(
            seen, ports=tuple(sorted(set(seen.ports + e.ports)))[:64], apps=tuple(sorted(set(seen.apps + e.apps)))[:22],
            action=worst.action, bytes=seen.bytes + e.bytes, sessions=seen.sessions + e.sessions,
            threats=seen.threats + e.threats, names=seen.names[:1], count=seen.count + e.count)
    return list(by_pair.values())


def collapse(m: Map, max_edges: int) -> Map:
    """At most ``max_edges`` lines, losing as little as possible, in steps.

    1. parallel Connections between two groups become one line;
    2. the workloads of each namespace (but the focused one) become one node per namespace;
    3. the heaviest lines stay, Denied and Violation first; the rest is counted in ``hidden``.
    Groups without a line are left out of a collapsed map. Graphviz's layout grows much faster
    than linearly with lines and nodes: this is what keeps thousands of Connections drawable.
    """
    if len(m.edges) <= max_edges and len(m.nodes) <= 2 * max_edges:
        return m
    nodes, edges = dict(m.nodes), merge(m.edges)
    if len(edges) > max_edges:
        moved: dict[str, str] = {}
        sizes: dict[str, int] = {}
        for name, n in m.nodes.items():
            if n.kind in WORKLOADS and n.namespace and n.namespace != m.namespace:
                moved[name] = f"ns/{n.namespace}"  # "/" is in no object name: no clash with a Group
                sizes[n.namespace] = sizes.get(n.namespace, 0) + 1
        for name in moved:
            del nodes[name]
        for ns, size in sizes.items():
            nodes[f"ns/{ns}"] = Node(f"ns/{ns}", "Namespace", ns, f"{size} workloads")
        edges = merge(replace(e, client=moved.get(e.client, e.client), server=moved.get(e.server, e.server))
                      for e in edges)
    hidden = m.hidden
    if len(edges) > max_edges:
        kept = heapq.nlargest(max_edges, edges, key=lambda e: (severity(e) >= 2, e.bytes, e.sessions))
        hidden += sum(e.count for e in edges) - sum(e.count for e in kept)
        edges = kept
    used = {e.client for e in edges} | {e.server for e in edges}
    return Map({k: n for k, n in nodes.items() if k in used}, edges, hidden, m.namespace, m.tally())
