"""Read back what ``flowmap_cli.drawing`` writes (one statement per line), and dot's SVG of it.

Just enough of DOT for the tests to check structure: which cluster holds which node, and each
edge's attributes. The SVG is read as XML, through the ``<title>``s and ids Graphviz writes.
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from collections import Counter
from dataclasses import dataclass, field

SVG = "{http://www.w3.org/2000/svg}"
_QUOTED = r'"((?:[^"\\]|\\.)*)"'
_ATTR = re.compile(r'(\w+)=(' + _QUOTED + r'|<(?:[^<>]|<[^<>]*>)*>|[^,\]\s]+)')


def unquote(text: str) -> str:
    return re.sub(r'\\(["\\])', r"\1", text)


def _attrs(text: str) -> dict[str, str]:
    found = {}
    for m in _ATTR.finditer(text):
        value = m.group(2)
        found[m.group(1)] = unquote(m.group(3)) if m.group(3) is not None else value
    return found


@dataclass
class Dot:
    clusters: dict[str, list[str]] = field(default_factory=dict)  # cluster id -> node ids
    nodes: dict[str, dict[str, str]] = field(default_factory=dict)
    edges: list[tuple[str, str, dict[str, str]]] = field(default_factory=list)
    graph: dict[str, str] = field(default_factory=dict)


def read(text: str) -> Dot:
    dot, cluster = Dot(), ""
    for line in text.splitlines()[1:-1]:
        line = line.strip()
        if m := re.fullmatch(r"subgraph (?:" + _QUOTED + r"|(\w+)) \{", line):
            cluster = unquote(m.group(1)) if m.group(1) is not None else m.group(2)
            dot.clusters[cluster] = []
        elif line == "}":
            cluster = ""
        elif m := re.fullmatch(_QUOTED + " -> " + _QUOTED + r" \[(.*)\]", line):
            dot.edges.append((unquote(m.group(1)), unquote(m.group(2)), _attrs(m.group(3))))
        elif m := re.fullmatch(_QUOTED + r" \[(.*)\]", line):
            dot.nodes[unquote(m.group(1))] = _attrs(m.group(2))
            if cluster:
                dot.clusters[cluster].append(unquote(m.group(1)))
        elif line.startswith("graph ["):
            dot.graph = _attrs(line)
    return dot


@dataclass
class Svg:
    nodes: set[str]
    edges: Counter[str]  # "client->server", as Graphviz titles an edge
    clusters: set[str]
    strokes: dict[str, tuple[str, str]]  # element id -> (stroke colour, dash array) of its line
    texts: list[str]


def read_svg(data: bytes) -> Svg:
    root = ET.fromstring(data)
    nodes: set[str] = set()
    clusters: set[str] = set()
    strokes: dict[str, tuple[str, str]] = {}
    edges: Counter[str] = Counter()
    for g in root.iter(f"{SVG}g"):
        title = g.findtext(f"{SVG}title") or ""
        kind = g.get("class")
        if kind == "node":
            nodes.add(title)
        elif kind == "cluster":
            clusters.add(title)
        elif kind == "edge":
            edges[title] += 1
            path = g.find(f".//{SVG}path")
            if path is not None:
                strokes[g.get("id", "")] = (path.get("stroke", ""), path.get("stroke-dasharray", ""))
    texts = ["".join(t.itertext()) for t in root.iter(f"{SVG}text")]
    return Svg(nodes, edges, clusters, strokes, texts)
