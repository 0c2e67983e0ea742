"""A real Prometheus scrapes the simulated cluster: PromQL gives the kernel's bytes, and the dashboard evaluates.

Debian's prometheus scrapes the operator's metrics port and each agent's health port every second.
After the shop's traffic, once the agents hold nothing unacknowledged, a PromQL query for the bytes
between two groups must return exactly what the client node's kernel forwarded (the nftables
counters of the simulated cluster), through a kill -9 of the operator too; and every expression of
the Grafana dashboard must parse and evaluate, the map's panels with data.
"""

from __future__ import annotations

import json
import re
import shutil
import signal
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from flowmap_devenv.controlplane import REPO
from flowmap_devenv.prometheus import SCRAPE_INTERVAL, Prometheus
from flowmap_devenv.simcluster import API, POSTGRES, WEB, WORKER, SimCluster
from flowmap_operator.naming import connection_name
from tests.conftest import need
from tests.e2e.test_simcluster import EDGES, busy_shop, counted, health, settled, sim  # noqa: F401 - sim: a fixture

DASHBOARD = REPO / "manifests" / "monitoring" / "grafana-dashboard.json"
MONITORS = REPO / "manifests" / "prometheus-operator" / "monitors.yaml"
ROUNDS = 10
# What Grafana puts in place of its variables, for a 1 s scrape interval (the shop ran within the
# last minute): $__rate_interval is max(4 x scrape interval, $__interval + scrape interval).
GRAFANA = {"$__rate_interval": "30s", "$__interval": "1s", "$__range": "5m"}


def relabelings(monitor: str) -> list[dict[str, Any]]:
    """The metricRelabelings of a ServiceMonitor we ship, as Prometheus' metric_relabel_configs."""
    snake = lambda name: re.sub(r"[A-Z]", lambda m: "_" + m[0].lower(), name)  # noqa: E731
    docs = yaml.safe_load_all(MONITORS.read_text())
    found = next(d for d in docs if d["kind"] == "ServiceMonitor" and d["metadata"]["name"] == monitor)
    rules = [rule for endpoint in found["spec"]["endpoints"] for rule in endpoint.get("metricRelabelings", [])]
    assert rules, f"{monitor} has no metricRelabelings"
    return [{snake(k): v for k, v in rule.items()} for rule in rules]


@pytest.fixture(scope="module")
def prom(sim: SimCluster) -> Iterator[Prometheus]:  # noqa: F811 - the fixture imported above
    need(shutil.which("prometheus") is not None, "this test needs prometheus (Debian package prometheus)")
    assert sim.operator is not None
    folder = Path(tempfile.mkdtemp(prefix="flowmap-prom-"))
    server = Prometheus(folder, {
        "flowmap-operator": [(f"127.0.0.1:{sim.operator.metrics_port}", {})],
        "flowmap-agent": [(f"127.0.0.1:{port}", {"node": node}) for node, port in sim.health_ports.items()]},
        relabel={"flowmap-operator": relabelings("flowmap-operator")})
    try:
        yield server.start()
    finally:
        server.stop()
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="module")
def shop(sim: SimCluster, prom: Prometheus) -> dict[str, tuple[int, int]]:  # noqa: F811
    """The shop's traffic, run once: the kernel's bytes per edge (client to server, server to client)."""
    clients = [sim.traffic(pod, ROUNDS, pause=0.05) for pod in (WEB, API, WORKER, None)]
    for proc in clients:
        assert proc.popen.wait(120) == 0, proc.log.read_text()[-2000:]
    truth, _ = settled(sim)
    assert all(c2s and s2c for c2s, s2c in truth.values()), truth
    prom.scraped_since(time.time())
    return truth


def edge_bytes(prom: Prometheus) -> dict[str, tuple[int, int]]:
    """flowmap_edge_bytes_total as Prometheus has it, per edge of EDGES."""
    got: dict[tuple[str, str, str, str, str], int] = {}
    for s in prom.query("flowmap_edge_bytes_total"):
        m = s["metric"]
        key = (m["client_group"], m["server_group"], m["port"], m["protocol"], m["direction"])
        assert key not in got, f"two series for one edge and direction: {m}"
        got[key] = int(float(s["value"][1]))
    edges = {(e[0], e[1], str(e[2]), e[3]) for e in EDGES.values()}
    assert {k[:4] for k in got} == edges, f"unexpected edges: {sorted({k[:4] for k in got} - edges)}"
    return {name: (got.get((e[0], e[1], str(e[2]), e[3], "client_to_server"), -1),
                   got.get((e[0], e[1], str(e[2]), e[3], "server_to_client"), -1)) for name, e in EDGES.items()}


def between(prom: Prometheus, selector: str) -> tuple[int, int]:
    """The bytes of the edges ``selector`` picks, client to server and server to client."""
    by = {s["metric"]["direction"]: int(float(s["value"][1]))
          for s in prom.query(f"sum by (direction) (flowmap_edge_bytes_total{{{selector}}})")}
    return by.get("client_to_server", -1), by.get("server_to_client", -1)


def test_promql_gives_the_kernels_bytes_between_two_groups(sim: SimCluster, prom: Prometheus,  # noqa: F811
                                                          shop: dict[str, tuple[int, int]]) -> None:
    web_api = shop["web-api"]
    assert between(prom, 'client_group="shop.web", server_group="shop.api", port="8080"') == web_api
    # Both of web's ports on api (HTTP through the Service, gRPC direct) in one query.
    both = [a + b for a, b in zip(web_api, shop["web-grpc"])]
    assert list(between(prom, 'client_group="shop.web", server_group="shop.api"')) == both
    assert edge_bytes(prom) == shop

    up = {(s["metric"]["job"], s["metric"].get("node", "")): s["value"][1] for s in prom.query("up")}
    assert up == {("flowmap-operator", ""): "1", ("flowmap-agent", "node-a"): "1", ("flowmap-agent", "node-b"): "1"}
    packets = {s["metric"]["node"]: float(s["value"][1]) for s in prom.query("flowmap_agent_dp_packets_total")}
    assert set(packets) == {"node-a", "node-b"} and all(packets.values()), packets
    # Health series of both agents (what they hold changes as sessions close: any value will do).
    for name in ("flowmap_agent_unacked_edges", "flowmap_agent_dp_sessions", "flowmap_agent_dp_kernel_drops_total"):
        assert {s["metric"]["node"] for s in prom.query(name)} == {"node-a", "node-b"}, name
    apps = {s["metric"]["client_group"] + ">" + s["metric"]["server_group"] + ":" + s["metric"]["port"]:
            s["metric"]["app"] for s in prom.query('flowmap_edge_sessions_total')}
    assert apps == {f"{e[0]}>{e[1]}:{e[2]}": e[7] for e in EDGES.values()}


def test_a_restarted_operator_exports_the_same_totals(sim: SimCluster, prom: Prometheus,  # noqa: F811
                                                      shop: dict[str, tuple[int, int]]) -> None:
    op = sim.operator
    assert op is not None
    before = edge_bytes(prom)
    assert before == shop
    op.kill()
    op.start().wait_leading()
    exported(prom, before)
    # Prometheus saw no counter go back (a restart from zero would be a reset of every edge).
    resets = prom.query("sum(resets(flowmap_edge_bytes_total[10m]))")
    assert [float(s["value"][1]) for s in resets] == [0.0]


def exported(prom: Prometheus, truth: dict[str, tuple[int, int]], timeout: float = 30) -> None:
    """Until Prometheus has ``truth`` for every edge: the next checkpoint, then the next scrape (a
    new leader exports nothing for its first seconds)."""
    end = time.monotonic() + timeout
    while True:
        try:
            got: dict[str, tuple[int, int]] | None = edge_bytes(prom)
        except AssertionError:  # some series not there (yet)
            got = None
        if got == truth:
            return
        assert time.monotonic() < end, (got, truth)
        time.sleep(0.5)


def test_the_counters_are_fresh_and_never_fall_through_kill_9_of_the_operator_and_an_agent(
        sim: SimCluster, prom: Prometheus, shop: dict[str, tuple[int, int]]) -> None:  # noqa: F811
    """Writes lag (a budget of 2 a second for a dozen busy Connections), the edge series do not: they
    run ahead of the Connections while the shop's clients run, through a kill -9 of the operator
    and of node-b's agent, and over the whole window they grew by exactly what the kernels counted."""
    op = sim.operator
    assert op is not None
    settings = {"FLOWMAP_OPERATOR_WRITE_BUDGET": "2", "FLOWMAP_OPERATOR_WRITE_BUDGET_MAX": "2",
                "FLOWMAP_OPERATOR_METRICS_CHECKPOINT_INTERVAL": "1"}
    default = {name: op.env.get(name) for name in settings}
    op.env.update(settings)
    try:
        op.kill()
        op.start().wait_leading()
        truth0, _ = settled(sim)
        exported(prom, truth0)
        started = time.time()
        ahead: list[tuple[int, int]] = []  # (Prometheus, the Connection) of web -> api, client to server

        def during() -> None:
            # Until the series is seen ahead of the Connection, or 15 s: on a busy machine the
            # clients may start late, and nothing moves before they do.
            for _ in range(30):
                exported = between(prom, 'client_group="shop.web", server_group="shop.api", port="8080"')[0]
                ahead.append((exported, counted(sim)["web-api"][0]))
                if exported > ahead[-1][1]:
                    break
                time.sleep(0.5)
            op.kill()
            sim.stop(sim.agents["node-b"], signal.SIGKILL)
            sim.start_agent("node-b")
            time.sleep(2)  # reports pile up in the agents meanwhile
            op.start().wait_leading()

        busy_shop(sim, during, rounds=120)
        truth1, conn1 = settled(sim)
        assert conn1 == truth1, health(sim)
        exported(prom, truth1)
        ended = time.time()
        time.sleep(2 * SCRAPE_INTERVAL)  # the queries below are at ``ended``: their last scrape is in
    finally:
        for name, value in default.items():
            if value is None:
                op.env.pop(name, None)
            else:
                op.env[name] = value
        op.stop()
        op.start().wait_leading()

    assert any(exported > written for exported, written in ahead), f"never ahead of the Connection: {ahead}"
    # Over the window, what each series grew by (increase() without its extrapolation to the
    # window's edges) is what the kernel counted; and no sample was ever below the one before.
    # (The restart of the operator at the end leaves the series absent for a moment: ask at ``ended``.)
    window = f"{int((ended - started) * 1000)}ms"  # from the sample that showed ``truth0``
    grew = {(s["metric"]["client_group"], s["metric"]["server_group"], s["metric"]["port"], s["metric"]["direction"]):
            int(float(s["value"][1]))
            for s in prom.query(f"flowmap_edge_bytes_total - flowmap_edge_bytes_total offset {window}", at=ended)}
    for name, e in EDGES.items():
        sent = (truth1[name][0] - truth0[name][0], truth1[name][1] - truth0[name][1])
        assert (grew[(e[0], e[1], str(e[2]), "client_to_server")], grew[(e[0], e[1], str(e[2]), "server_to_client")]
                ) == sent, name
    resets = prom.query(f"sum(resets(flowmap_edge_bytes_total[{int(ended - started) + 60}s]))", at=ended)
    assert [float(r["value"][1]) for r in resets] == [0.0]
    # One series per edge whichever process served it: the ServiceMonitor's relabelling.
    assert {r["metric"].get("instance") for r in prom.query("flowmap_edge_bytes_total", at=ended)} == {
        "flowmap-operator"}
    exported(prom, truth1)  # the operator of the default settings too


def expressions(node: Any) -> Iterator[tuple[str, str, str]]:
    """(panel title, refId, expr) of every query in the dashboard, rows' panels included."""
    for panel in node.get("panels", []):
        for t in panel.get("targets", []):
            yield panel["title"], t["refId"], t["expr"]
        yield from expressions(panel)


def grafana(expr: str) -> str:
    for var, value in GRAFANA.items():
        expr = expr.replace(var, value)
    assert "$" not in re.sub(r'"\$\d"', "", expr), f"a variable the test does not know: {expr}"
    return expr


def test_every_dashboard_query_evaluates_and_the_map_has_data(prom: Prometheus,
                                                              shop: dict[str, tuple[int, int]]) -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert [v["name"] for v in dashboard["templating"]["list"]] == ["datasource"]
    queries = list(expressions(dashboard))
    assert len(queries) >= 20, queries
    for panel in (p for p in dashboard["panels"] if p["type"] != "row"):
        for where in (panel, *panel["targets"]):
            assert where["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
    # Every metric read is one the operator or an agent declares (a typo would read nothing, silently).
    # Families by their base name: the operator answers Prometheus in OpenMetrics ("# TYPE x counter"
    # for x_total), the agent in the text format ("# TYPE x_total counter").
    family = lambda name: re.sub(r"_(total|bucket|sum|count)$", "", name)  # noqa: E731
    declared = {family(name) for name in prom.metadata()}
    for title, ref, expr in queries:
        for name in set(re.findall(r"\bflowmap_[a-z0-9_]+", expr)):
            assert family(name) in declared, f"{title} ({ref}) reads {name}, which nothing declares"

    results = {(title, ref): prom.query(grafana(expr)) for title, ref, expr in queries}  # PromQLError if refused
    map_panels = {title for title, _, expr in queries if "flowmap_edge_" in expr}
    assert {"Groups and the bytes between them", "Top talkers"} <= map_panels
    for title in map_panels:
        assert any(results[(t, ref)] for t, ref in results if t == title), f"{title}: no data"

    graph = next(p for p in dashboard["panels"] if p["type"] == "nodeGraph")
    nodes, edges = (results[(graph["title"], ref)] for ref in ("nodes", "edges"))
    ids = {s["metric"]["id"] for s in nodes}
    assert ids >= {e[0] for e in EDGES.values()} | {e[1] for e in EDGES.values()}
    assert all(s["metric"]["title"] == s["metric"]["id"] for s in nodes)
    # The labels the panel's transformations turn into the node graph's source and target.
    organize = next(t for t in graph["transformations"] if t["id"] == "organize")["options"]
    assert organize["renameByName"] == {"client_group": "source", "server_group": "target"}
    assert {(s["metric"]["client_group"], s["metric"]["server_group"]) for s in edges} == {
        (e[0], e[1]) for e in EDGES.values()}
    assert all(s["metric"]["id"] and s["metric"]["server_group"] in ids for s in edges)


def test_a_password_guesser_shows_on_its_connection_as_events_and_in_promql(
        sim: SimCluster, prom: Prometheus, shop: dict[str, tuple[int, int]]) -> None:  # noqa: F811
    """A real psql in the worker's pod guesses passwords of the real PostgreSQL, which refuses each
    (SQLSTATE 28P01): the dp's auth-brute-force shows on the Connection, as Events on both Groups,
    and in PromQL with the Connection's count. Last in the module: it adds an edge to the shop's."""
    guesses = 40
    script = (f"for i in $(seq {guesses}); do PGPASSWORD=guess$i psql -h {POSTGRES.ip} -U admin -d postgres -w "
              f"-XAtqc 'select 1' 2>&1 | grep -c 'password authentication failed' || true; done")
    guesser = sim.spawn("guesser", WORKER, ["bash", "-c", script])
    assert guesser.popen.wait(120) == 0
    refused = guesser.log.read_text().split()
    assert refused == ["1"] * guesses, refused  # each guess was refused for its password, by the server
    name = connection_name("shop.worker", "shop.postgres", 5432, "TCP")

    def brute_force() -> dict[str, Any] | None:
        proc = sim.plane.kubectl("get", "connection", name, "-o", "json", check=False)
        listed = json.loads(proc.stdout).get("status", {}).get("threats", []) if proc.returncode == 0 else []
        return next((t for t in listed if t["name"] == "auth-brute-force"), None)

    end = time.monotonic() + 60
    while (threat := brute_force()) is None:
        assert time.monotonic() < end, "no auth-brute-force on the Connection"
        time.sleep(0.5)
    assert threat["severity"] == "High" and threat["count"] >= 1
    assert "refused postgresql logins" in threat.get("example", ""), threat
    def raised_on() -> set[str]:
        events = json.loads(sim.plane.kubectl("get", "events", "-n", "default", "-o", "json").stdout)["items"]
        return {e["involvedObject"]["name"] for e in events if e["reason"] == "Threat"
                and e["message"].startswith("auth-brute-force (High): shop.worker -> shop.postgres")}

    end = time.monotonic() + 30  # Events are written at most one a second
    while (on := raised_on()) != {"shop.worker", "shop.postgres"}:
        assert time.monotonic() < end, on
        time.sleep(0.5)
    selector = 'name="auth-brute-force", client_group="shop.worker", server_group="shop.postgres", port="5432"'
    end = time.monotonic() + 60
    while [float(s["value"][1]) for s in prom.query(f"flowmap_threats_total{{{selector}}}")] != [threat["count"]]:
        assert time.monotonic() < end, prom.query(f"flowmap_threats_total{{{selector}}}")
        time.sleep(0.5)
