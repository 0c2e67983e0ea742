"""``flowmap graph``: a picture of the map, read from the Kubernetes API.

    flowmap graph -o map.svg|map.png|map.html|map.dot [--namespace NS]
    flowmap graph --serve [--address 127.0.0.1] [--port 8080] [--every 5]

Reads Groups and Connections with the usual kubeconfig rules (--kubeconfig, $KUBECONFIG,
~/.kube/config, else the in-cluster ServiceAccount) and needs only get/list on both. Any failure
is one line on stderr and exit code 1.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from flowmap_cli import drawing, mapping, rendering
from flowmap_cli.kube import ClusterError, Source

GROUP, VERSION = "flowmap.dev", "v1alpha1"
PAGE = 500  # objects per list call: memory stays flat however large the map
MAX_OBJECTS = 100_000  # per kind; ten times the operator's default cap on Connections
REQUEST_TIMEOUT = (10, 60)  # seconds to connect, to read one page


# The map could not be read from the API (or the API reached): one line for the user.
ReadError = ClusterError


def _items(api: Any, plural: str) -> Iterator[dict[str, Any]]:
    """Every object of ``plural``, a page at a time, each failure turned into one clear line."""
    from kubernetes.client.exceptions import ApiException
    from urllib3.exceptions import HTTPError

    token, count = None, 0
    while True:
        try:
            page = api.list_cluster_custom_object(GROUP, VERSION, plural, limit=PAGE, _continue=token,
                                                  _request_timeout=REQUEST_TIMEOUT)
        except ApiException as exc:
            raise ReadError(_explain(exc, plural)) from None
        except (HTTPError, OSError) as exc:
            host = api.api_client.configuration.host
            raise ReadError(f"cannot reach the API server at {host}: {exc}") from None
        for item in page.get("items", []):
            count += 1
            if count > MAX_OBJECTS:
                raise ReadError(f"more than {MAX_OBJECTS} {plural}: is this flowmap's map? (--namespace does not "
                                "reduce what is read)")
            yield item
        token = page.get("metadata", {}).get("continue")
        if not token:
            return


def _explain(exc: Any, plural: str) -> str:
    try:
        message = json.loads(exc.body).get("message", "")
    except (TypeError, ValueError, AttributeError):
        message = ""
    if exc.status == 404:
        return (f"the API server has no {plural}.{GROUP}: the flowmap CRDs are not installed "
                "(kubectl apply -k crds/)")
    if exc.status == 401:
        return "the API server does not accept these credentials (401 Unauthorized)"
    if exc.status == 403:
        return f"{message or f'forbidden to list {plural}.{GROUP}'} (it needs get and list on groups and connections)"
    return f"the API server answered {exc.status} {exc.reason}: {message}".rstrip(": ")


def read(source: Source, namespace: str | None = None, max_edges: int = 400) -> mapping.Map:
    """The map as it is in the API now, focused and collapsed for drawing."""
    api = source.client()
    edges, ends = [], {}
    try:
        groups = [mapping.group_node(g) for g in _items(api, "groups")]
        for obj in _items(api, "connections"):
            edge = mapping.connection_edge(obj)
            edges.append(edge)
            labels = (obj.get("metadata") or {}).get("labels") or {}
            for end, group in (("client", edge.client), ("server", edge.server)):
                if isinstance(labels.get(f"flowmap.dev/{end}-namespace"), str):
                    ends[group] = labels[f"flowmap.dev/{end}-namespace"][:63]
    finally:
        api.api_client.close()
    m = mapping.build(groups, edges, ends)
    return mapping.collapse(mapping.focus(m, namespace) if namespace else m, max_edges)


def draw(source: Source, fmt: str, namespace: str | None = None, max_edges: int = 400,
         timeout: float = rendering.TIMEOUT) -> bytes:
    """The map in ``fmt`` (svg, png, html or dot), read fresh from the API."""
    dot = drawing.to_dot(read(source, namespace, max_edges))
    if fmt == "dot":
        return dot.encode()
    if fmt == "html":
        return rendering.page(rendering.render(dot, "svg", timeout), title(namespace)).encode()
    return rendering.render(dot, fmt, timeout)


def title(namespace: str | None) -> str:
    """What the picture shows, for the page's title."""
    return f"namespace {namespace}" if namespace else "the whole cluster"


def run(args: argparse.Namespace) -> int:
    source = Source(args.kubeconfig, args.context)
    try:
        if args.serve:
            from flowmap_cli import serving

            def svg() -> bytes:
                return draw(source, "svg", args.namespace, args.max_edges, args.timeout)

            return serving.serve(svg, title(args.namespace), args)
        fmt = Path(args.output).suffix.lstrip(".").lower() if args.output != "-" else "svg"
        fmt = "dot" if fmt == "gv" else fmt
        if fmt not in rendering.FORMATS:
            raise ReadError(f"cannot tell the format of {args.output}: name it .svg, .png, .html or .dot")
        picture = draw(source, fmt, args.namespace, args.max_edges, args.timeout)
        if args.output == "-":
            sys.stdout.buffer.write(picture)
        else:
            Path(args.output).write_bytes(picture)
    except (ReadError, rendering.RenderError, OSError) as exc:
        print(f"flowmap graph: {exc}", file=sys.stderr)
        return 1
    return 0


def _positive(kind: type[int] | type[float]) -> Callable[[str], int | float]:
    def parse(text: str) -> int | float:
        value = kind(text)
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be above 0, not {text}")
        return value
    return parse


def register(parser: argparse.ArgumentParser) -> None:
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("-o", "--output", metavar="FILE",
                        help="write the picture here, in the format its extension names: .svg, .png, .html or .dot "
                             "(- for SVG on stdout)")
    target.add_argument("--serve", action="store_true", help="serve a page that keeps itself up to date")
    parser.add_argument("-n", "--namespace", help="only the connections of this namespace's workloads")
    parser.add_argument("--max-edges", type=_positive(int), default=400,
                        help="collapse a larger map: parallel edges merged, then namespaces, then the lightest "
                             "edges left out (default: %(default)s)")
    parser.add_argument("--kubeconfig", help="kubeconfig file (default: $KUBECONFIG, ~/.kube/config, in-cluster)")
    parser.add_argument("--context", help="kubeconfig context (default: the current one)")
    parser.add_argument("--timeout", type=_positive(float), default=rendering.TIMEOUT, help="seconds dot may take")
    parser.add_argument("--address", default="127.0.0.1", help="--serve: address to listen on (default: loopback)")
    parser.add_argument("--port", type=int, choices=range(65536), metavar="PORT", default=8080,
                        help="--serve: port, 0 for any free one (default: %(default)s)")
    parser.add_argument("--every", type=_positive(float), default=5.0,
                        help="--serve: seconds between refreshes of the page (default: %(default)s)")
    parser.set_defaults(func=run)
