"""What the operator does not know yet, against the real API server: a pod its watch has not
delivered, a node whose agent has not reported, a pod deleted before the operator restarted.

Two nodes of this module's own (``node-p``, ``node-q``) with flannel's shape: a pod range each
(``spec.podCIDRs``), the tunnel's .0 and the bridge's .1 as addresses only their agents know. The
namespace ``wait`` is this module's own.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import grpc
import pytest

from flowmap_api import report_pb2 as pb
from tests.operator.harness import Agent, Cluster, Operator, apply, create_pods, edge, pod, running
from tests.operator.test_policy import Watcher, metric
from tests.operator.test_reports import connection, wait_for

NS = "wait"
NODE_P, NODE_Q = "172.18.1.2", "172.18.1.3"
OWN = {"node-p": [NODE_P, "10.250.1.0", "10.250.1.1"], "node-q": [NODE_Q, "10.250.2.0", "10.250.2.1"]}
SERVER = "10.250.2.20"  # wait.server, on node-q


@pytest.fixture(scope="module")
def operator(cluster: Cluster) -> Iterator[Operator]:
    plane = cluster.plane
    apply(plane, *({"apiVersion": "v1", "kind": "Node", "metadata": {"name": name},
                    "spec": {"podCIDR": cidr, "podCIDRs": [cidr]},
                    "status": {"addresses": [{"type": "InternalIP", "address": ip}]}}
                   for name, ip, cidr in (("node-p", NODE_P, "10.250.1.0/24"), ("node-q", NODE_Q, "10.250.2.0/24"))))
    plane.kubectl("create", "namespace", NS, check=False)
    agent = {"labels": {"app.kubernetes.io/name": "flowmap-agent"}, "sa": "flowmap-agent", "host_network": True}
    create_pods(plane,
                pod("flowmap-system", "agent-p", "node-p", NODE_P, owner=("DaemonSet", "flowmap-agent"), **agent),  # type: ignore[arg-type]
                pod("flowmap-system", "agent-q", "node-q", NODE_Q, owner=("DaemonSet", "flowmap-agent"), **agent),  # type: ignore[arg-type]
                pod(NS, "server-6d5f-s1", "node-q", SERVER, owner=("ReplicaSet", "server-6d5f"),
                    labels={"app": "server", "pod-template-hash": "6d5f"}))
    yield from running(cluster)


def agent(cluster: Cluster, op: Operator, node: str) -> Agent:
    return Agent(op, f"{node}-{time.monotonic_ns()}", node, cluster.token("flowmap-agent", pod_name=f"agent-{node[-1]}"))


def said(b: pb.ReportBatch, node: str) -> pb.ReportBatch:
    """The batch says its node's addresses, as every real agent's does."""
    b.node_addresses[:] = OWN[node]
    return b


def deferred(a: Agent, b: pb.ReportBatch) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as err:
        a.send(b)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE, err.value.details()
    return err.value


def connections(cluster: Cluster) -> dict[str, dict[str, Any]]:
    items = json.loads(cluster.plane.kubectl("get", "connections", "-o", "json").stdout)["items"]
    return {c["metadata"]["name"]: c for c in items}


def total(cluster: Cluster, name: str) -> int:
    return int(((connection(cluster, name) or {}).get("status") or {}).get("bytes", {}).get("total", 0))


def test_a_new_pods_first_batch_waits_for_the_pod_then_names_it(cluster: Cluster, operator: Operator) -> None:
    q = agent(cluster, operator, "node-q")
    before = metric(operator, "flowmap_operator_report_deferrals_total", node="node-q")
    # A pod the kubelet just started asks the server on its node, before the operator's watch has it.
    first = said(q.batch([edge("10.250.2.31", 40000, SERVER, 8080, local="client", client_pod=f"{NS}/client-7c9-c1",
                               bytes_c2s=120, bytes_s2c=880)]), "node-q")
    err = deferred(q, first)
    assert "10.250.2.31 is inside node node-q's pod range" in (err.details() or "")
    assert metric(operator, "flowmap_operator_report_deferrals_total", node="node-q") == before + 1
    create_pods(cluster.plane, pod(NS, "client-7c9-c1", "node-q", "10.250.2.31", owner=("ReplicaSet", "client-7c9"),
                                   labels={"app": "client", "pod-template-hash": "7c9"}))
    q.flush()  # resent with backoff until the watch has delivered the pod
    wait_for(lambda: total(cluster, f"{NS}.client-{NS}.server-8080-tcp") == 1000, what="client -> server")
    assert not [n for n, c in connections(cluster).items() if c["spec"]["server"] == f"{NS}.server"
                and c["spec"]["client"] in ("nodes", "external")], "the new pod was named something else"


def test_a_nodes_own_addresses_come_from_its_agent_and_reach_protect(cluster: Cluster, operator: Operator) -> None:
    """A hostNetwork client on node-p reaches the server on node-q through the tunnel: its source is
    flannel.1's 10.250.1.0, which only node-p's agent knows. node-q's report waits until it does."""
    p, q = agent(cluster, operator, "node-p"), agent(cluster, operator, "node-q")
    seen_by_q = said(q.batch([edge("10.250.1.0", 41000, SERVER, 8443, local="server", bytes_c2s=10, bytes_s2c=20)]),
                     "node-q")
    deferred(q, seen_by_q)
    said(p.batch([edge("10.250.1.0", 41000, SERVER, 8443, bytes_c2s=10, bytes_s2c=20)]), "node-p")
    p.flush()
    q.flush()
    name = f"nodes-{NS}.server-8443-tcp"
    wait_for(lambda: total(cluster, name) == 30, what="nodes -> server, counted once")
    time.sleep(1.0)  # a second count would show within a flush
    assert total(cluster, name) == 30
    assert not [n for n, c in connections(cluster).items() if c["spec"]["server"] == f"{NS}.server"
                and c["spec"]["client"] == "external"]
    # Under Protect, the nodes peer holds the tunnel's address too, or the client would be dropped.
    apply(cluster.plane, {"apiVersion": "flowmap.dev/v1alpha1", "kind": "NetworkLearningPolicy",
                          "metadata": {"name": "server", "namespace": NS},
                          "spec": {"mode": "Protect", "groups": [f"{NS}.server"],
                                   "rules": [{"direction": "Ingress", "peer": {"group": "nodes"}}]}})
    watcher = Watcher(operator, "node-q", cluster.token("flowmap-agent", pod_name="agent-q"))
    try:
        ingress = wait_for(lambda: {c for peer in getattr(watcher.pods().get(f"{NS}/server-6d5f-s1"), "ingress", [])
                                    for c in peer.cidrs}, what="the server's policy on node-q")
        assert {"10.250.1.0/32", "10.250.1.1/32", f"{NODE_P}/32", "10.250.2.0/32", f"{NODE_Q}/32"} <= ingress
    finally:
        watcher.close()
        cluster.plane.kubectl("delete", "nlp", "server", "-n", NS)


def test_a_pod_deleted_across_an_operator_restart_keeps_its_group(cluster: Cluster, operator: Operator) -> None:
    """The agents resend their unacknowledged batches to the new operator; some name the old
    operator's pod, gone from the API before the new one listed pods. Its Group's members say who
    it was: the batch is taken at once, to that group, never to nodes."""
    old = "10.250.2.50"
    create_pods(cluster.plane, pod(NS, "metrics-5d8f-m1", "node-q", old, owner=("ReplicaSet", "metrics-5d8f"),
                                   labels={"app": "metrics", "pod-template-hash": "5d8f"}))
    p = agent(cluster, operator, "node-p")
    said(p.batch([edge(NODE_P, 42000, old, 9090, bytes_c2s=100, bytes_s2c=900)]), "node-p")
    p.flush()  # resent while the operator's watch has not delivered the pod yet
    name = f"nodes-{NS}.metrics-9090-tcp"
    wait_for(lambda: total(cluster, name) == 1000, what="nodes -> metrics")
    wait_for(lambda: [m for m in _group(cluster, f"{NS}.metrics").get("members", []) if old in m.get("ips", [])],
             what="the Group's members")
    resent = said(p.batch([edge(NODE_P, 42001, old, 9090, bytes_c2s=50, bytes_s2c=450)]), "node-p")
    operator.kill()
    cluster.plane.kubectl("delete", "pod", "metrics-5d8f-m1", "-n", NS, "--force", "--grace-period=0")
    operator.start().wait_leading()
    ack = p.send(resent)  # taken at once: not deferred, not nodes
    assert ack.leader
    p.flush()
    wait_for(lambda: total(cluster, name) == 1500, what="the resent batch counted to metrics")
    assert not [n for n, c in connections(cluster).items()
                if c["spec"]["client"] == "nodes" and c["spec"]["server"] in ("nodes", "external")
                and c["spec"]["port"] == 9090]


def _group(cluster: Cluster, name: str) -> dict[str, Any]:
    proc = cluster.plane.kubectl("get", "group", name, "-o", "json", check=False)
    return (json.loads(proc.stdout).get("status") or {}) if proc.returncode == 0 else {}
