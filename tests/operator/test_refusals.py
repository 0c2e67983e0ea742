"""Who may report, and what a report may say: refused whole, with a reason, and counted."""

from __future__ import annotations

import json
import time
import urllib.request
from collections.abc import Iterator

import grpc
import pytest

from flowmap_api import report_pb2 as pb
from flowmap_api import report_pb2_grpc as pb_grpc
from tests.operator.harness import WEB
from tests.operator.harness import Agent, Cluster, Operator, edge, running


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


@pytest.mark.parametrize(("spoil", "says"), [
    (lambda b: b.edges[1].client.__setattr__("ip", "10.0.0.999"), "edges[1].client.ip"),
    (lambda b: b.edges[1].server.__setattr__("port", 70000), "edges[1].server.port: 70000 is above 65535"),
    (lambda b: b.edges[1].apps.append("bittorrent"), "edges[1].apps: 'bittorrent' is not a known application"),
    (lambda b: b.edges[1].__setattr__("protocol", pb.PROTOCOL_UNSPECIFIED), "edges[1].protocol"),
    (lambda b: b.names.add(ip="192.0.2.9", name="bad name!", ttl_seconds=5), "names[0].name"),
    (lambda b: b.__setattr__("agent_id", "x" * 200), "agent_id"),
])
def test_a_malformed_batch_is_refused_whole(cluster: Cluster, operator: Operator, spoil, says: str) -> None:  # type: ignore[no-untyped-def]
    agent = Agent(operator, f"malformed-{time.monotonic_ns()}", "node-a",
                  cluster.token("flowmap-agent", pod_name="agent-a"))
    port = 20000 + time.monotonic_ns() % 10000
    batch = agent.batch([edge(WEB, 1, "192.0.2.77", port), edge(WEB, 2, "192.0.2.78", port)])
    spoil(batch)
    err = refused(agent, batch)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and says in (err.details() or ""), err.details()
    time.sleep(1.0)  # give a half-applied batch every chance to show
    names = json.loads(cluster.plane.kubectl("get", "connections", "-o", "json").stdout)["items"]
    assert not [c for c in names if c["spec"]["port"] == port], "part of a refused batch was applied"


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
