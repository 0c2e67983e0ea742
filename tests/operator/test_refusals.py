"""Who may report, and what a report may say: refused whole with a reason (naming the edge at
fault), or its metadata normalised while every edge counts; each counted."""

from __future__ import annotations

import json
import time
import urllib.request
from collections.abc import Iterator
from typing import Any

import grpc
import pytest

from flowmap_api import report_pb2 as pb
from flowmap_api import report_pb2_grpc as pb_grpc
from flowmap_api.validity import REFUSED_EDGE
from flowmap_operator.naming import object_name
from tests.operator.harness import WEB
from tests.operator.harness import Agent, Cluster, Operator, edge, running
from tests.operator.test_reports import wait_for

REPORT = "/flowmap.v1alpha1.ReportService/Report"


@pytest.fixture(scope="module")
def operator(cluster: Cluster) -> Iterator[Operator]:
    yield from running(cluster)


def refused(agent: Agent, batch: pb.ReportBatch, token: str | None = None) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as err:
        agent.send(batch, token=token)
    return err.value


def metric(op: Operator, name: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{op.metrics_port}/metrics", timeout=5) as r:
        for line in r.read().decode().splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
    return 0.0


def test_only_the_agent_of_the_claimed_node_may_report(cluster: Cluster, operator: Operator) -> None:
    own = cluster.token("flowmap-agent", pod_name="agent-a")
    agent = Agent(operator, "auth-agent-a", "node-a", own)
    cases = {
        "no token": ("", grpc.StatusCode.UNAUTHENTICATED),
        "garbage": ("not-a-token", grpc.StatusCode.UNAUTHENTICATED),
        "wrong audience": (cluster.token("flowmap-agent", audience="someone-else", pod_name="agent-a"),
                           grpc.StatusCode.UNAUTHENTICATED),
        "another service account": (cluster.token("flowmap-operator", node_name="node-a"),
                                    grpc.StatusCode.PERMISSION_DENIED),
        "not bound to a node": (cluster.token("flowmap-agent"), grpc.StatusCode.PERMISSION_DENIED),
        "bound to node-b": (cluster.token("flowmap-agent", pod_name="agent-b"), grpc.StatusCode.PERMISSION_DENIED),
    }
    before = metric(operator, 'flowmap_operator_reports_total{outcome="unauthenticated"}')
    batch = agent.batch([edge(WEB, 1, "192.0.2.1", 1111)])
    for case, (token, code) in cases.items():
        err = refused(agent, batch, token=token)
        assert err.code() == code, f"{case}: {err.code()} {err.details()}"
    assert metric(operator, 'flowmap_operator_reports_total{outcome="unauthenticated"}') - before == 3
    assert metric(operator, 'flowmap_operator_reports_total{outcome="permission_denied"}') >= 3
    ack = agent.send(batch)  # the agent's own token, for its own node
    assert ack.leader


@pytest.mark.parametrize(("spoil", "says", "edge_index"), [
    (lambda b: b.edges[1].client.__setattr__("ip", "10.0.0.999"), "edges[1].client.ip", "1"),
    (lambda b: b.edges[1].server.__setattr__("port", 70000), "edges[1].server.port: 70000 is above 65535", "1"),
    (lambda b: b.edges[1].__setattr__("protocol", pb.PROTOCOL_UNSPECIFIED), "edges[1].protocol", "1"),
    (lambda b: b.edges[0].__setattr__("bytes_c2s", 2**63), "edges[0].bytes_c2s", "0"),
    (lambda b: b.__setattr__("agent_id", "x" * 200), "agent_id", None),
    (lambda b: b.__setattr__("agent_id", "agent\n"), "agent_id", None),
])
def test_a_batch_that_cannot_be_counted_is_refused_whole_naming_its_edge(  # type: ignore[no-untyped-def]
        cluster: Cluster, operator: Operator, spoil, says: str, edge_index: str | None) -> None:
    agent = Agent(operator, f"malformed-{time.monotonic_ns()}", "node-a",
                  cluster.token("flowmap-agent", pod_name="agent-a"))
    port = 20000 + time.monotonic_ns() % 10000
    batch = agent.batch([edge(WEB, 1, "192.0.2.77", port), edge(WEB, 2, "192.0.2.78", port)])
    spoil(batch)
    err = refused(agent, batch)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and says in (err.details() or ""), err.details()
    # The one edge at fault, by its index, for the agent to set aside; a batch's own fault names none.
    assert dict(err.trailing_metadata() or ()).get(REFUSED_EDGE) == edge_index  # type: ignore[attr-defined]
    time.sleep(1.0)  # give a half-applied batch every chance to show
    names = json.loads(cluster.plane.kubectl("get", "connections", "-o", "json").stdout)["items"]
    assert not [c for c in names if c["spec"]["port"] == port], "part of a refused batch was applied"


def connections_on(cluster: Cluster, port: int) -> dict[str, dict[str, Any]]:
    """The Connections to a server port, by server group."""
    items = json.loads(cluster.plane.kubectl("get", "connections", "-o", "json").stdout)["items"]
    return {c["spec"]["server"]: c for c in items if c["spec"]["port"] == port}


def test_bad_names_and_apps_are_normalised_or_dropped_and_every_edge_counts(cluster: Cluster,
                                                                           operator: Operator) -> None:
    """An SRV lookup, a non-ASCII name, a '<' and 'evil.com\\n' in the DNS answers, an application the
    operator does not know: the batch is accepted, every byte counted, the names kept (the SRV
    name as it is, the other as punycode) or dropped, and each counted by reason."""
    agent = Agent(operator, f"names-{time.monotonic_ns()}", "node-a", cluster.token("flowmap-agent", pod_name="agent-a"))
    port = 30000 + time.monotonic_ns() % 10000
    now = time.time()
    ms = int(now * 1000)
    answers = {"198.51.100.11": "_http._tcp.shop-ext.example", "198.51.100.12": "bücher.example",
               "198.51.100.13": "<b>.example", "198.51.100.14": "evil.com\n"}
    before = {r: metric(operator, f'flowmap_operator_report_normalised_total{{field="{f}",reason="{r}"}}')
              for f, r in (("name", "invalid"), ("name", "idna"), ("app", "unknown"))}
    batch = agent.batch([edge(WEB, 40000 + i, ip, port, bytes_c2s=100 + i, bytes_s2c=1000, when=now,
                              apps=("bittorrent",) if i == 0 else ("http",)) for i, ip in enumerate(answers)],
                        names=[pb.DnsName(ip=ip, name=name, ttl_seconds=300, seen_unix_ms=ms)
                               for ip, name in answers.items()])
    assert agent.send(batch).leader
    agent.flush()
    srv, idna = object_name("_http._tcp.shop-ext.example"), object_name("xn--bcher-kva.example")

    def counted() -> dict[str, dict[str, Any]] | None:
        found = connections_on(cluster, port)
        total = sum((c.get("status") or {}).get("bytes", {}).get("total", 0) for c in found.values())
        return found if total == 4 * 1000 + 100 + 101 + 102 + 103 else None

    found = wait_for(counted, what="every byte of the batch counted")
    assert set(found) == {srv, idna, "external"}, set(found)  # '<' and 'evil.com\\n' name nothing
    assert found["external"]["status"]["bytes"]["total"] == 2 * 1000 + 102 + 103
    groups = {g["metadata"]["name"]: g.get("status") or {}
              for g in json.loads(cluster.plane.kubectl("get", "groups", "-o", "json").stdout)["items"]}
    assert groups[srv]["kind"] == "FQDN"
    assert [m["name"] for m in groups[srv]["members"]] == ["_http._tcp.shop-ext.example"]
    assert not [g for g in groups if g.startswith("evil")], "evil.com\\n made a group of its own"
    assert metric(operator, 'flowmap_operator_report_normalised_total{field="name",reason="invalid"}') \
        - before["invalid"] == 2
    assert metric(operator, 'flowmap_operator_report_normalised_total{field="name",reason="idna"}') \
        - before["idna"] == 1
    assert metric(operator, 'flowmap_operator_report_normalised_total{field="app",reason="unknown"}') \
        - before["unknown"] == 1


def test_a_message_that_is_not_a_batch_is_invalid_argument_and_counted(cluster: Cluster, operator: Operator) -> None:
    agent = Agent(operator, "garbage-a", "node-a", cluster.token("flowmap-agent", pod_name="agent-a"))
    raw = agent.channel.unary_unary(REPORT, request_serializer=lambda b: b, response_deserializer=pb.ReportAck.FromString)
    garbage = b"\xff\xff\xff\xff\x0f" + b"\x00" * 64
    before = metric(operator, 'flowmap_operator_reports_total{outcome="malformed"}')
    for _ in range(3):
        with pytest.raises(grpc.RpcError) as err:
            raw(garbage, metadata=(("authorization", f"Bearer {agent.token}"),), timeout=10)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
    assert metric(operator, 'flowmap_operator_reports_total{outcome="malformed"}') - before == 3
    # Without a token nothing is read, let alone parsed.
    with pytest.raises(grpc.RpcError) as err:
        raw(garbage, timeout=10)
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "Traceback" not in operator.log.read_text(errors="replace")


def test_policy_watch_streams_the_nodes_policy_to_its_own_agent_only(cluster: Cluster, operator: Operator) -> None:
    agent = Agent(operator, "policy-a", "node-a", cluster.token("flowmap-agent", pod_name="agent-a"))
    stub = pb_grpc.PolicyServiceStub(agent.channel)
    stream = stub.Watch(pb.WatchRequest(node="node-a"), metadata=(("authorization", f"Bearer {agent.token}"),),
                        timeout=10)
    first = next(stream)
    assert not first.pods and not first.enforcement_disabled  # nothing is in Protect mode
    stream.cancel()
    with pytest.raises(grpc.RpcError) as err:
        next(stub.Watch(pb.WatchRequest(node="node-b"), metadata=(("authorization", f"Bearer {agent.token}"),),
                        timeout=10))
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
