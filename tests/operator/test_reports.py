"""Reports become Groups and Connections: names, columns, counts, one observer per edge."""

from __future__ import annotations

import json
import re
import urllib.request
import time
from collections.abc import Iterator
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from flowmap_api import report_pb2 as pb
from tests.operator.harness import API, API_SVC, REDIS, WEB
from tests.operator.harness import Agent, Cluster, Operator, edge, running


def wait_for(check: Any, timeout: float = 30.0, what: str = "condition") -> Any:
    end = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def connection(cluster: Cluster, name: str) -> dict[str, Any] | None:
    proc = cluster.plane.kubectl("get", "connection", name, "-o", "json", check=False)
    return json.loads(proc.stdout) if proc.returncode == 0 else None


@pytest.fixture(scope="module")
def operator(cluster: Cluster) -> Iterator[Operator]:
    yield from running(cluster)


def agent(cluster: Cluster, op: Operator, node: str, pod: str, agent_id: str) -> Agent:
    return Agent(op, agent_id, node, cluster.token("flowmap-agent", pod_name=pod))


def test_reports_become_groups_and_connections(cluster: Cluster, operator: Operator) -> None:
    def total_bytes(name: str) -> tuple[int, int]:
        b = ((connection(cluster, name) or {}).get("status") or {}).get("bytes", {})
        return b.get("clientToServer", 0), b.get("serverToClient", 0)

    before = total_bytes("shop.web-shop.api-8080-tcp")  # the CRD tests may have made this one
    a = agent(cluster, operator, "node-a", "agent-a", "agent-a-1")
    b = agent(cluster, operator, "node-b", "agent-b", "agent-b-1")
    now = time.time()
    a.batch([edge(WEB, 40000, API_SVC, 80, bytes_c2s=300, bytes_s2c=5000, when=now),
             edge(WEB, 40001, "93.184.216.34", 443, apps=("tls",), bytes_c2s=700, bytes_s2c=9000, when=now)],
            names=[pb.DnsName(ip="93.184.216.34", name="example.com", ttl_seconds=300,
                              seen_unix_ms=int(now * 1000))])
    # node-b sees the same web -> api session from the server side: web is captured on node-a,
    # so only node-a's report counts.
    b.batch([edge(WEB, 40000, API, 8080, local="server", bytes_c2s=300, bytes_s2c=5000, when=now),
             edge(API, 50000, REDIS, 6379, apps=("redis",), bytes_c2s=50, bytes_s2c=60, when=now)])
    a.flush()
    b.flush()

    web_api = wait_for(lambda: connection(cluster, "shop.web-shop.api-8080-tcp"), what="web -> api")
    status = web_api["status"]
    assert web_api["spec"] == {"client": "shop.web", "server": "shop.api", "port": 8080, "protocol": "TCP"}
    assert total_bytes("shop.web-shop.api-8080-tcp") == (before[0] + 300, before[1] + 5000)
    assert status["service"] == "shop/api" and status["app"] == "http"
    external = wait_for(lambda: connection(cluster, "shop.web-example.com-443-tcp"), what="web -> example.com")
    assert external["status"]["app"] == "tls" and external["status"]["bytes"]["total"] == 9700
    redis = wait_for(lambda: connection(cluster, "shop.api-shop.redis-6379-tcp"), what="api -> redis")
    assert redis["status"]["bytes"]["total"] == 110

    groups = json.loads(cluster.plane.kubectl("get", "groups", "-o", "json").stdout)["items"]
    by_name = {g["metadata"]["name"]: g.get("status", {}) for g in groups}
    assert by_name["shop.web"]["kind"] == "Workload"
    assert by_name["shop.web"]["workload"] == {"kind": "Deployment", "name": "web"}
    assert by_name["shop.redis"]["workload"] == {"kind": "StatefulSet", "name": "redis"}
    assert by_name["example.com"]["kind"] == "FQDN"
    rows = [re.split(r"\s{2,}", line) for line in cluster.plane.kubectl("get", "connections").stdout.splitlines()]
    assert ["shop.web-shop.api-8080-tcp", "shop.web", "shop.api", "8080", "TCP", "http"] in [r[:6] for r in rows]


def test_edge_counters_are_the_connections_and_survive_a_restart(cluster: Cluster, operator: Operator) -> None:
    a = agent(cluster, operator, "node-a", "agent-a", f"metrics-{time.monotonic_ns()}")
    a.batch([edge(WEB, 40000, REDIS, 6380, apps=("redis",), bytes_c2s=123, bytes_s2c=4567, packets=9)])
    a.flush()  # acknowledged: written to the Connection
    edge_labels = {"client_group": "shop.web", "client_namespace": "shop", "server_group": "shop.redis",
                   "server_namespace": "shop", "port": "6380", "protocol": "TCP", "app": "redis"}

    def exported() -> dict[tuple[str, str], float]:
        text = urllib.request.urlopen(f"http://127.0.0.1:{operator.metrics_port}/metrics", timeout=5).read().decode()
        return {(s.name, s.labels.get("direction", "")): s.value for family in text_string_to_metric_families(text)
                for s in family.samples if {k: v for k, v in s.labels.items() if k != "direction"} == edge_labels}

    status = (connection(cluster, "shop.web-shop.redis-6380-tcp") or {})["status"]
    want = {("flowmap_edge_bytes_total", "client_to_server"): status["bytes"]["clientToServer"],
            ("flowmap_edge_bytes_total", "server_to_client"): status["bytes"]["serverToClient"],
            ("flowmap_edge_packets_total", "client_to_server"): status["packets"]["clientToServer"],
            ("flowmap_edge_packets_total", "server_to_client"): status["packets"]["serverToClient"],
            ("flowmap_edge_sessions_total", ""): status["sessions"]["total"]}
    assert want == {("flowmap_edge_bytes_total", "client_to_server"): 123,
                    ("flowmap_edge_bytes_total", "server_to_client"): 4567,
                    ("flowmap_edge_packets_total", "client_to_server"): 9,
                    ("flowmap_edge_packets_total", "server_to_client"): 9,
                    ("flowmap_edge_sessions_total", ""): 1}
    # At the next checkpoint of the edge series (flowmap_operator.highwater).
    wait_for(lambda: exported() == want, what="the series to be the Connection's totals")
    # A restarted operator exports the Connection's totals, not counters starting from zero: from
    # its first checkpoint on, and nothing before (a replica taking the lead waits 5 s).
    operator.stop()
    operator.start().wait_leading()
    assert exported() == {}
    wait_for(lambda: exported() == want, what="the series to be the Connection's totals after the restart")


def test_threats_show_on_the_connection_in_its_column_as_events_and_in_metrics(cluster: Cluster,
                                                                                 operator: Operator) -> None:
    a = agent(cluster, operator, "node-a", "agent-a", f"threats-{time.monotonic_ns()}")
    now = time.time()
    hits = [pb.ThreatHit(name="auth-brute-force", snippet="28P01 x40 in 10s \x1b[2J", time_unix_ms=int(now * 1000)),
            pb.ThreatHit(name="heartbleed", snippet="claims 16384, holds 3", time_unix_ms=int(now * 1000))]
    delta = edge(WEB, 40000, REDIS, 6390, apps=("redis",), when=now)
    delta.threats.extend(hits)
    a.batch([delta])
    again = edge(WEB, 40001, REDIS, 6390, apps=("redis",), when=now + 1)
    again.threats.append(pb.ThreatHit(name="auth-brute-force", snippet="", time_unix_ms=int((now + 1) * 1000)))
    a.batch([again])
    a.flush()
    name = "shop.web-shop.redis-6390-tcp"

    def threats() -> list[dict[str, Any]]:
        return ((connection(cluster, name) or {}).get("status") or {}).get("threats") or []

    listed = wait_for(lambda: [t for t in threats() if t["name"] == "auth-brute-force" and t["count"] == 2] and threats(),
                      what="the threats on the Connection")
    assert [(t["name"], t["severity"], t["count"]) for t in listed] == [("heartbleed", "Critical", 1),
                                                                         ("auth-brute-force", "High", 2)]
    # The example came from a packet: its escape sequence is shown, never played.
    assert listed[1]["example"] == "28P01 x40 in 10s \\x1b[2J"
    rows = [re.split(r"\s{2,}", line) for line in cluster.plane.kubectl("get", "connections", name).stdout.splitlines()]
    assert rows[0][9] == "THREATS" and rows[1][9] == "heartbleed,auth-brute-force"

    # One Event per Group and threat: on both workloads' Groups, found by kubectl describe.
    def events(group: str) -> list[dict[str, Any]]:
        items = json.loads(cluster.plane.kubectl("get", "events", "-n", "default", "-o", "json").stdout)["items"]
        return [e for e in items if e["involvedObject"].get("kind") == "Group" and e["involvedObject"]["name"] == group]

    for group in ("shop.web", "shop.redis"):
        raised = wait_for(lambda: len(events(group)) >= 2 and events(group), what=f"the Events on {group}")
        assert sorted(e["message"].split(" ", 1)[0] for e in raised) == ["auth-brute-force", "heartbleed"]
        assert all(e["reason"] == "Threat" and e["type"] == "Warning" for e in raised)
    uid = json.loads(cluster.plane.kubectl("get", "group", "shop.redis", "-o", "json").stdout)["metadata"]["uid"]
    assert {e["involvedObject"]["uid"] for e in events("shop.redis")} == {uid}
    assert "heartbleed (Critical): shop.web -> shop.redis 6390/TCP" in \
        cluster.plane.kubectl("describe", "group", "shop.redis").stdout

    def exported() -> dict[str, float]:
        text = urllib.request.urlopen(f"http://127.0.0.1:{operator.metrics_port}/metrics", timeout=5).read().decode()
        return {s.labels["name"]: s.value for family in text_string_to_metric_families(text)
                for s in family.samples if s.name == "flowmap_threats_total" and s.labels["server_group"] == "shop.redis"
                and s.labels["port"] == "6390"}

    wait_for(lambda: exported() == {"heartbleed": 1, "auth-brute-force": 2}, what="flowmap_threats_total")
    # A restarted operator reads the tallies back from the Connection and goes on from there.
    operator.stop()
    operator.start().wait_leading()
    a = agent(cluster, operator, "node-a", "agent-a", f"threats-{time.monotonic_ns()}")
    more = edge(WEB, 40002, REDIS, 6390, apps=("redis",))
    more.threats.append(pb.ThreatHit(name="heartbleed", snippet="claims 65535, holds 3"))
    a.batch([more])
    a.flush()
    wait_for(lambda: exported() == {"heartbleed": 2, "auth-brute-force": 2}, what="the counts after a restart")
    assert [(t["name"], t["count"]) for t in threats()] == [("heartbleed", 2), ("auth-brute-force", 2)]
