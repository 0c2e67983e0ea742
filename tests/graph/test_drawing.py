"""The map as DOT, from fixed objects: clusters, labels, colours, quoting, and how a huge map collapses."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

from flowmap_cli import drawing, mapping
from flowmap_cli.drawing import COLOURS
from tests.conftest import need
from tests.graph import demo
from tests.graph.dotfile import read, read_svg

GOLDEN = Path(__file__).with_name("golden") / "demo.dot"


def draw(groups: list[dict[str, Any]], connections: list[dict[str, Any]]) -> str:
    return drawing.to_dot(mapping.build(map(mapping.group_node, groups), map(mapping.connection_edge, connections)))


def dot_svg(text: str) -> bytes:
    need(shutil.which("dot") is not None, "these tests need Graphviz's dot (hack/debian-packages.txt)")
    return subprocess.run(["dot", "-Tsvg"], input=text.encode(), capture_output=True, check=True, timeout=60).stdout


def group(name: str, kind: str, namespace: str = "", **extra: Any) -> dict[str, Any]:
    status = {"kind": kind, **({"namespace": namespace} if namespace else {})}
    return {"metadata": {"name": name}, "status": status, **extra}


def conn(client: str, server: str, port: int, protocol: str = "TCP", **status: Any) -> dict[str, Any]:
    return {"metadata": {"name": demo.name(client, server, port, protocol)},
            "spec": {"client": client, "server": server, "port": port, "protocol": protocol}, "status": status}


def test_the_demo_map_has_a_cluster_per_namespace_and_an_edge_per_connection() -> None:
    d = read(draw(demo.groups(), demo.connections()))
    assert d.clusters == {
        "cluster_ns/kube-system": ["kube-system.coredns"],
        "cluster_ns/shop": ["shop.api", "shop.postgres", "shop.redis", "shop.web", "shop.worker"],
        "cluster_outside": [demo.FQDN]}
    # Inside its namespace a workload is called by its own name; the id stays the group's.
    assert "<b>web</b>" in d.nodes["shop.web"]["label"] and "Deployment · 2 pods" in d.nodes["shop.web"]["label"]
    by_id = {attrs["id"]: (client, server, attrs) for client, server, attrs in d.edges}
    assert len(d.edges) == len(by_id) == len(demo.CONNECTIONS)
    for client, server, port, protocol, app, action, _, _ in demo.CONNECTIONS:
        got_client, got_server, attrs = by_id["edge:" + demo.name(client, server, port, protocol)]
        assert (got_client, got_server) == (client, server)
        assert attrs["color"] == COLOURS[action], (client, server, action)
        assert f"<b>{app}</b>" in attrs["label"] and f"{port}/{protocol}" in attrs["label"]
        assert attrs["style"] == ("dashed" if action == "Denied" else "solid")
    # The heaviest edge is the widest, the lightest (the Denied one) the thinnest.
    widths = {i: float(a["penwidth"]) for i, (_, _, a) in by_id.items()}
    assert max(widths, key=widths.__getitem__) == "edge:shop.api-payments.example.com-443-tcp"
    assert min(widths, key=widths.__getitem__) == "edge:" + demo.DENIED
    legend = d.graph["label"]
    assert "Learned 10" in legend and "Violation 1" in legend and "Denied 1" in legend and "Allowed" not in legend
    assert "7 groups · 12 connections" in legend


def test_the_demo_map_is_drawn_as_the_golden_file() -> None:
    text = draw(demo.groups(), demo.connections())
    if os.environ.get("FLOWMAP_UPDATE_GOLDEN") == "1":
        GOLDEN.parent.mkdir(exist_ok=True)
        GOLDEN.write_text(text)
    assert text == GOLDEN.read_text(), "the DOT changed: look at it, then FLOWMAP_UPDATE_GOLDEN=1 to accept"


def test_special_groups_sit_outside_the_namespaces_and_port_zero_means_any() -> None:
    groups = [group("shop.web", "Workload", "shop"), group("nodes", "Nodes"), group("external", "External"),
              group("api.stripe.com", "FQDN"), group("corporate-vpn", "CIDR", spec={"cidrs": ["10.200.0.0/16"]})]
    connections = [conn("nodes", "shop.web", 8080, app="http", action="Allowed", bytes={"total": 10}),
                   conn("shop.web", "external", 0, app="unknown", action="Learned"),
                   conn("shop.web", "corporate-vpn", 0, "ICMP"),
                   conn("shop.web", "api.stripe.com", 443, app="tls", action="Violation",
                        threats=[{"name": "deprecated-tls", "severity": "Medium", "count": 1},
                                 {"name": "sqlinjection", "severity": "High", "count": 1}, "junk"])]
    d = read(draw(groups, connections))
    assert d.clusters == {"cluster_ns/shop": ["shop.web"],
                          "cluster_outside": ["api.stripe.com", "corporate-vpn", "external"]}
    assert d.nodes["nodes"]["shape"] == "box3d"
    assert "10.200.0.0/16" in d.nodes["corporate-vpn"]["label"]
    labels = {(c, s): a for c, s, a in d.edges}
    assert "any/TCP" in labels[("shop.web", "external")]["label"]
    assert "ICMP" in labels[("shop.web", "corporate-vpn")]["label"]
    assert labels[("shop.web", "corporate-vpn")]["color"] == COLOURS[""]  # no action written yet
    assert labels[("nodes", "shop.web")]["color"] == COLOURS["Allowed"]
    assert "2 threats" in labels[("shop.web", "api.stripe.com")]["label"]
    assert "no action yet 1" in d.graph["label"] and "Allowed 1" in d.graph["label"]


HOSTILE = ['quo"te', "back\\slash", "trailing\\", "new\nline", "<script>alert(1)</script>", "&amp;lt;",
           "a -> b", '"]; x -> y; subgraph z {', "\\N\\G", "ünï€ode"]


def test_hostile_names_stay_names() -> None:
    groups = [group(n, "Workload", 'ns"}<b>') for n in HOSTILE]
    connections = [conn(a, b, 80, app="<i>&", action="Denied") for a, b in zip(HOSTILE, HOSTILE[1:])]
    text = draw(groups, connections)
    d = read(text)
    cleaned = [n.replace("\n", "?") for n in HOSTILE]  # control characters never reach dot
    assert sorted(d.nodes) == sorted(cleaned)
    assert [(c, s) for c, s, _ in d.edges] == sorted(zip(cleaned, cleaned[1:]))
    # dot agrees: exactly these nodes and edges, no more (nothing was injected), and valid XML.
    svg = read_svg(dot_svg(text))
    assert len(svg.nodes) == len(HOSTILE) and sum(svg.edges.values()) == len(HOSTILE) - 1
    # In a title (the id) dot shows a backslash doubled and decodes an entity; labels show both as they are.
    assert {n for n in cleaned if "\\" not in n and "&" not in n} <= svg.nodes
    assert "<script>alert(1)</script>" in svg.texts and "&amp;lt;" in svg.texts and "<i>&" in svg.texts
    assert b"<script" not in dot_svg(text)


def test_fields_of_the_wrong_type_are_drawn_as_unknown() -> None:
    bad = {"metadata": {"name": 7}, "spec": {"client": "a", "server": "b", "port": "http", "protocol": None},
           "status": {"action": "Exploded", "bytes": {"total": -5}, "app": ["x"], "sessions": "many"}}
    edge = mapping.connection_edge(bad)
    assert (edge.ports, edge.action, edge.bytes, edge.apps, edge.sessions) == (((0, "?"),), "", 0, (), 0)
    node = mapping.group_node({"metadata": None, "status": {"kind": 3, "memberCount": True}})
    assert (node.name, node.kind) == ("", "Unknown")
    m = mapping.build([node], [edge])
    assert set(m.nodes) == {"a", "b"} and m.nodes["a"].detail == "no Group object"


def test_a_connection_without_its_group_lands_in_the_namespace_its_labels_name() -> None:
    m = mapping.build([], map(mapping.connection_edge, demo.connections()[:1]),
                      {"shop.api": "shop", "kube-system.coredns": "kube-system"})
    assert read(drawing.to_dot(m)).clusters == {"cluster_ns/kube-system": ["kube-system.coredns"],
                                                "cluster_ns/shop": ["shop.api"]}


def test_focus_keeps_a_namespace_and_what_it_talks_to() -> None:
    m = mapping.build(map(mapping.group_node, demo.groups()), map(mapping.connection_edge, demo.connections()))
    kube = mapping.focus(m, "kube-system")
    assert sorted((e.client, e.server) for e in kube.edges) == [
        ("shop.api", "kube-system.coredns"), ("shop.web", "kube-system.coredns"),
        ("shop.worker", "kube-system.coredns")]
    assert set(kube.nodes) == {"kube-system.coredns", "shop.api", "shop.web", "shop.worker"}
    assert "namespace kube-system" in drawing.to_dot(kube)


def test_parallel_connections_merge_into_the_worst_action() -> None:
    edges = [mapping.connection_edge(c) for c in (
        conn("a", "b", 80, app="http", action="Learned", bytes={"total": 100}),
        conn("a", "b", 5432, app="postgresql", action="Violation", bytes={"total": 50}),
        conn("b", "a", 80, app="http", action="Denied"))]
    merged = sorted(mapping.merge(edges), key=lambda e: e.client)
    assert [(e.client, e.server, e.action, e.bytes, e.count) for e in merged] == [
        ("a", "b", "Violation", 150, 2), ("b", "a", "Denied", 0, 1)]
    assert merged[0].ports == ((80, "TCP"), (5432, "TCP")) and merged[0].apps == ("http", "postgresql")


def big_map(edges: int = 5000, namespaces: int = 50, per_namespace: int = 20) -> mapping.Map:
    """``edges`` Connections between the workloads of many namespaces, three of them Denied."""
    names = [f"ns{n}.app{w}" for n in range(namespaces) for w in range(per_namespace)]
    groups = [mapping.Node(name, "Workload", name.split(".")[0]) for name in names]
    made = [mapping.Edge(names[i % len(names)], names[(i * 37 + 1) % len(names)], ((8000 + i % 50, "TCP"),),
                         ("http",), "Denied" if i < 3 else "Learned", bytes=1000 + i, names=(f"e{i}",))
            for i in range(edges)]
    return mapping.build(groups, made)


def test_a_huge_map_collapses_to_the_bound_and_keeps_what_was_denied() -> None:
    m = big_map()
    small = mapping.collapse(m, 400)
    assert len(small.edges) <= 400
    assert small.hidden + sum(e.count for e in small.edges) == 5000  # every Connection drawn or counted
    # Each Denied Connection is in a line between its namespaces, and that line shows Denied.
    drawn = {(e.client, e.server): e.action for e in small.edges}
    denied = [(f"ns/{e.client.split('.')[0]}", f"ns/{e.server.split('.')[0]}") for e in m.edges if e.action == "Denied"]
    assert len(denied) == 3 and all(drawn.get(pair) == "Denied" for pair in denied)
    assert all(e.client in small.nodes and e.server in small.nodes for e in small.edges)
    assert {n.kind for n in small.nodes.values()} == {"Namespace"}  # 50 namespaces, not 1,000 workloads
    text = drawing.to_dot(small)
    assert f"{small.hidden} more not drawn" in text and small.hidden > 0
    assert "Learned 4997" in text and "Denied 3" in text  # the legend counts Connections, not lines
    # Focused on a namespace, its own workloads stay themselves.
    focused = mapping.collapse(mapping.focus(m, "ns7"), 400)
    assert {n.name for n in focused.nodes.values() if n.namespace == "ns7"} == {f"ns7.app{w}" for w in range(20)}
    assert mapping.collapse(big_map(300, 5), 400) == big_map(300, 5)  # a small map is left as it is


def test_bytes_read_the_way_people_read_them() -> None:
    assert [drawing.human(n) for n in (0, 999, 1000, 35200, 999_999, 12_345_678_901, 10**16)] == [
        "0 B", "999 B", "1 kB", "35.2 kB", "1 MB", "12.3 GB", "10000 TB"]
