"""The map as Graphviz DOT: namespaces as clusters, an edge per Connection coloured by its action.

Pure and deterministic (the same map gives the same text), so it is tested on fixed objects.
Every name comes from the cluster and may hold anything: node ids and tooltips go through
``quote`` (DOT's only escapes are ``\\"`` and, in labels, the backslash), labels are HTML-like
and go through ``html`` (XML escaping), and control characters never reach dot.
"""

from __future__ import annotations

import html as _html
import math
import re
from collections.abc import Iterable

from flowmap_cli.mapping import ACTIONS, Edge, Map, Node, severity

# Colour-blind-safe enough to tell apart, and Denied is also dashed: colour is never the only cue.
COLOURS = {"Learned": "#3b6fd4", "Allowed": "#2e9e4f", "Violation": "#f29200", "Denied": "#d62728", "": "#8c96a3"}
GREY, INK, FONT = "#6b7785", "#1f2733", "Helvetica"
FILLS = {"Workload": "#ffffff", "VM": "#eef6fb", "Namespace": "#e6edf7", "Nodes": "#eef1f5", "External": "#fff4e0",
         "FQDN": "#eaf6ec", "CIDR": "#f1ebfa", "Unknown": "#ffffff"}
OUTSIDE = ("External", "FQDN", "CIDR")
SHAPES = {"Nodes": "box3d", "VM": "component"}  # a VM: a box with two tabs, like a machine's module
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
MAX_LABEL = 40


def _clean(text: str) -> str:
    # Lone surrogates (possible in JSON) cannot be written as UTF-8; control characters have no
    # business in a picture and some would end a DOT line or be invalid XML.
    return _CONTROL.sub("?", text.encode("utf-8", "replace").decode("utf-8"))


def quote(text: str) -> str:
    """A DOT double-quoted string: ``\\`` and ``"`` escaped, nothing else can end it."""
    return '"' + _clean(text).replace("\\", "\\\\").replace('"', '\\"') + '"'


def html(text: str, limit: int = MAX_LABEL) -> str:
    """Text for an HTML-like label: XML-escaped, shortened with an ellipsis past ``limit``."""
    text = _clean(text)
    return _html.escape(text if len(text) <= limit else text[: limit - 1] + "…", quote=True)


def human(count: int) -> str:
    """Bytes the way people read them: 950 B, 35 kB, 1.2 MB."""
    if count < 1000:
        return f"{count} B"
    value = float(count)
    for unit in ("kB", "MB", "GB", "TB"):
        value /= 1000
        if value < 999.5 or unit == "TB":  # 999.6 kB would print as "1e+03 kB"
            break
    return f"{value:.3g} {unit}" if value < 999.5 else f"{value:.0f} {unit}"


def ports(e: Edge) -> str:
    """``8080/TCP``; port 0 means any port; many ports are counted rather than listed."""
    if len(e.ports) > 3:
        return f"{len(e.ports)} ports"
    return ", ".join(proto if proto == "ICMP" else f"{port or 'any'}/{proto}" for port, proto in e.ports)


def _node(n: Node, namespace: str) -> str:
    short = n.name[len(namespace) + 1:] if namespace and n.name.startswith(namespace + ".") else n.name
    if n.kind == "Namespace":
        short = n.namespace
    label = f"<b>{html(short)}</b>" + (f'<br/><font point-size="9" color="{GREY}">{html(n.detail)}</font>'
                                        if n.detail else "")
    shape = SHAPES.get(n.kind, "box")
    style = "filled,dashed" if n.kind == "Unknown" else "rounded,filled"
    tooltip = _tooltip(n.name, n.kind + (f" in {n.namespace}" if n.namespace else "") + (
        f": {n.detail}" if n.detail else ""))
    return (f"{quote(n.name)} [id={quote('group:' + n.name)}, label=<{label}>, shape={shape}, style={quote(style)}, "
            f"fillcolor=\"{FILLS.get(n.kind, '#ffffff')}\", tooltip={tooltip}]")


def _tooltip(*lines: str) -> str:
    """A tooltip of several lines: each quoted on its own, joined by DOT's line break."""
    return '"' + "\\n".join(quote(line)[1:-1] for line in lines) + '"'


def _edge(e: Edge, heaviest: int) -> str:
    colour = COLOURS[e.action]
    apps = ", ".join(e.apps[:3]) + (f" +{len(e.apps) - 3}" if len(e.apps) > 3 else "")
    lines = [f"<b>{html(apps)}</b>"] if apps else []
    lines.append(html(" · ".join(p for p in (ports(e), human(e.bytes) if e.bytes else "") if p)))
    if e.threats:
        lines.append(f'<font color="{COLOURS["Denied"]}">{e.threats} threat{"s" if e.threats > 1 else ""}</font>')
    # By area rather than length: the square root keeps a small edge visible beside a big one.
    width = 1.0 + 3.5 * math.sqrt(e.bytes / heaviest) if heaviest else 1.0
    what = f"{e.count} connections" if e.count > 1 else (e.names[0] if e.names else "")
    tooltip = _tooltip(f"{e.client} → {e.server}", what, f"{', '.join(e.apps) or 'no app'} · {ports(e)}",
                       f"{e.action or 'no action yet'} · {human(e.bytes)} · {e.sessions} sessions")
    ident = "edge:" + (e.names[0] if e.names and e.names[0] else f"{e.client}->{e.server}")
    return (f"{quote(e.client)} -> {quote(e.server)} [id={quote(ident)}, label=<{'<br/>'.join(lines)}>, "
            f"color=\"{colour}\", fontcolor=\"{colour if severity(e) >= 2 else INK}\", penwidth={width:.2f}, "
            f"style={'dashed' if e.action == 'Denied' else 'solid'}, tooltip={tooltip}]")


def _legend(m: Map) -> str:
    counts = m.tally()
    facts = [f"{len(m.nodes)} groups", f"{sum(counts.values())} connections"]
    if m.namespace:
        facts.insert(0, f"namespace {m.namespace}")
    if m.hidden:
        facts.append(f"{m.hidden} more not drawn (--namespace to focus)")
    keys = [f'<td width="22" height="4" fixedsize="true" bgcolor="{COLOURS[a]}"></td>'
            f'<td align="left">{a or "no action yet"} {counts[a]}   </td>' for a in (*ACTIONS, "") if counts.get(a)]
    # The keys sit in a table of their own, so a long title row does not spread them apart.
    return (f'<<table border="0" cellspacing="2" cellpadding="0"><tr><td align="left">'
            f'<font point-size="16"><b>flowmap</b></font>   <font color="{GREY}">{html(" · ".join(facts), 200)}</font>'
            f'</td></tr><tr><td align="left"><table border="0" cellspacing="3" cellpadding="0"><tr>{"".join(keys)}'
            f'</tr></table></td></tr></table>>')


def _clusters(nodes: Iterable[Node]) -> dict[str, list[Node]]:
    """Nodes by the cluster they are drawn in: a namespace, "outside", or "" (none)."""
    clusters: dict[str, list[Node]] = {}
    for n in sorted(nodes, key=lambda n: n.name):
        key = f"ns/{n.namespace}" if n.namespace and n.kind != "Namespace" else (
            "outside" if n.kind in OUTSIDE else "")
        clusters.setdefault(key, []).append(n)
    return dict(sorted(clusters.items()))


def to_dot(m: Map) -> str:
    """The map as a DOT digraph, laid out left to right from clients to servers."""
    lines = ["digraph flowmap {",
             f"  graph [rankdir=LR, newrank=true, nodesep=0.4, ranksep=1.3, pad=0.3, fontname={FONT}, "
             f"fontsize=11, fontcolor=\"{INK}\", labelloc=t, labeljust=l, outputorder=edgesfirst, "
             f"bgcolor=white, charset=\"UTF-8\", label={_legend(m)}]",
             f"  node [fontname={FONT}, fontsize=11, fontcolor=\"{INK}\", color=\"#8a99ad\", margin=\"0.15,0.06\"]",
             f"  edge [fontname={FONT}, fontsize=9, arrowsize=0.7]"]
    for key, members in _clusters(m.nodes.values()).items():
        if key.startswith("ns/"):
            ns = key[3:]
            lines += [f"  subgraph {quote('cluster_' + key)} {{",
                      f"    label=<<b>{html(ns, 63)}</b>  <font color=\"{GREY}\">namespace</font>>; "
                      "style=\"rounded,filled\"; fillcolor=\"#f5f7fa\"; color=\"#cfd8e3\""]
        elif key == "outside":
            lines += ["  subgraph cluster_outside {",
                      f"    label=<<font color=\"{GREY}\">outside the cluster</font>>; "
                      "style=\"rounded,filled\"; fillcolor=\"#fffbf3\"; color=\"#ecdcc0\""]
        lines += [f"    {_node(n, n.namespace if key.startswith('ns/') else '')}" for n in members]
        if key:
            lines.append("  }")
    heaviest = max((e.bytes for e in m.edges), default=0)
    lines += [f"  {_edge(e, heaviest)}" for e in sorted(m.edges, key=lambda e: (e.client, e.server, e.ports))]
    lines.append("}")
    return "\n".join(lines) + "\n"
