"""How long ``flowmap graph`` takes to draw a huge map, by how far it is collapsed.

Builds a map of many Connections between the workloads of many namespaces (some Denied), then
times collapse + DOT + Graphviz's dot for several ``--max-edges``, in SVG and PNG; ``reference``
is the demo-sized map (12 edges) drawn in the same run, so numbers from different machines can
be compared by ratio. Reading from the API is not included (see operator_ingest.py for the API
server's side). Prints numbers, asserts nothing.

    .venv/bin/python benchmarks/graph_render.py [--edges 5000] [--namespaces 50] [--workloads 20]
                                                [--max-edges 100,200,400,800] [--timeout 300]
"""

from __future__ import annotations

import argparse
import random
import time

from flowmap_cli import drawing, mapping, rendering


def big_map(edges: int, namespaces: int, workloads: int, seed: int = 7) -> mapping.Map:
    rng = random.Random(seed)
    names = [f"ns{n}.app{w}" for n in range(namespaces) for w in range(workloads)]
    groups = [mapping.Node(name, "Workload", name.split(".")[0], "Deployment · 2 pods") for name in names]
    groups += [mapping.Node("external", "External"), mapping.Node("nodes", "Nodes")]
    ends = names + ["external", "nodes"]
    made = []
    for i in range(edges):
        # Popular servers, as in a real cluster: a few databases and APIs get most of the calls.
        client, server = rng.choice(ends), ends[min(int(rng.paretovariate(1.2)) - 1, len(ends) - 1)]
        action = rng.choices(mapping.ACTIONS, weights=(90, 6, 3, 1))[0]
        made.append(mapping.Edge(client, server, ((rng.choice((53, 80, 443, 5432, 6379, 8080, 9090)), "TCP"),),
                                 ("http",), action, bytes=int(rng.lognormvariate(9, 2)), sessions=rng.randint(1, 99),
                                 names=(f"c{i}",)))
    return mapping.build(groups, made)


def timed(m: mapping.Map, max_edges: int, fmt: str, timeout: float) -> tuple[float, int, int]:
    started = time.perf_counter()
    small = mapping.collapse(m, max_edges)
    picture = rendering.render(drawing.to_dot(small), fmt, timeout)
    return time.perf_counter() - started, len(small.edges), len(picture)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--edges", type=int, default=5000)
    parser.add_argument("--namespaces", type=int, default=50)
    parser.add_argument("--workloads", type=int, default=20, help="per namespace")
    parser.add_argument("--max-edges", default="100,200,400,800")
    parser.add_argument("--timeout", type=float, default=300.0)
    args = parser.parse_args()

    demo = big_map(12, 2, 4)
    reference, _, _ = timed(demo, 400, "svg", args.timeout)
    print(f"reference: {len(demo.edges)} edges drawn as SVG in {reference:.3f} s")
    m = big_map(args.edges, args.namespaces, args.workloads)
    print(f"map: {len(m.edges)} Connections, {len(m.nodes)} groups")
    print(f"{'max-edges':>10} {'lines':>6} {'svg s':>8} {'png s':>8} {'svg KiB':>8} {'png KiB':>8} {'× ref':>7}")
    for limit in (int(x) for x in args.max_edges.split(",")):
        try:
            svg_s, lines, svg_size = timed(m, limit, "svg", args.timeout)
            png_s, _, png_size = timed(m, limit, "png", args.timeout)
        except rendering.RenderError as exc:
            print(f"{limit:>10} {exc}")
            continue
        print(f"{limit:>10} {lines:>6} {svg_s:>8.2f} {png_s:>8.2f} {svg_size >> 10:>8} {png_size >> 10:>8} "
              f"{svg_s / reference:>7.0f}")


if __name__ == "__main__":
    main()
