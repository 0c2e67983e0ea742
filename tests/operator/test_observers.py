"""The one-observer rule: of the nodes that report a session, exactly one counts it.

Pure: a Resolver fed with API objects as the operator's watches would feed it, a Topology, and
each session reported as the agents would report it — by the client's node and the server's node
when they run an agent, with the ends on the reporting node marked local.
"""

from __future__ import annotations

import time

import pytest

from flowmap_api import report_pb2 as pb
from flowmap_operator.resolution import Resolver
from flowmap_operator.topology import Topology
from tests.operator.harness import edge

NODES = {"node-a": "172.18.0.2", "node-b": "172.18.0.3", "node-c": "172.18.0.4"}  # node-c runs no agent
AGENTS = ("node-a", "node-b")
PODS = {"10.244.1.10": ("web", "node-a"), "10.244.2.20": ("api", "node-b"), "10.244.3.30": ("batch", "node-c")}
WEB, API, BATCH = PODS
EXTERNAL = "198.51.100.7"


def resolver(now: float) -> Resolver:
    r = Resolver()
    for name, ip in NODES.items():
        r.node_seen({"metadata": {"name": name}, "status": {"addresses": [{"type": "InternalIP", "address": ip}]}})
    for node in AGENTS:  # the agents are hostNetwork pods: their addresses are the node's
        r.pod_seen({"metadata": {"namespace": "flowmap-system", "name": f"agent-{node}",
                                 "labels": {"app.kubernetes.io/name": "flowmap-agent"}},
                    "spec": {"nodeName": node, "hostNetwork": True},
                    "status": {"phase": "Running", "podIP": NODES[node]}}, now)
    for ip, (name, node) in PODS.items():
        r.pod_seen({"metadata": {"namespace": "shop", "name": name}, "spec": {"nodeName": node},
                    "status": {"phase": "Running", "podIP": ip}}, now)
    return r


def node_of(ip: str) -> str | None:
    """The node an address lives on (a pod's node, or the node itself); None outside the cluster."""
    if ip in PODS:
        return PODS[ip][1]
    return next((name for name, node_ip in NODES.items() if node_ip == ip), None)


@pytest.mark.parametrize("client,server,counter", [
    (WEB, API, "node-a"),  # pod -> pod on another node: the client's node
    (NODES["node-a"], API, "node-a"),  # a node with an agent -> a pod elsewhere: the node's own agent
    (NODES["node-a"], WEB, "node-a"),  # the node -> its own pod: one observer
    (API, NODES["node-a"], "node-b"),  # a pod -> another node: the pod's node
    (NODES["node-a"], NODES["node-b"], "node-a"),  # node -> node, both with agents
    (NODES["node-c"], API, "node-b"),  # a node without an agent: the server's side
    (BATCH, API, "node-b"),  # a pod on a node without an agent: the server's side
    (EXTERNAL, API, "node-b"),  # from outside: the server's side
    (EXTERNAL, NODES["node-b"], "node-b"),
    (NODES["node-a"], EXTERNAL, "node-a"),  # the node to the outside: only its own agent sees it
    (WEB, NODES["node-c"], "node-a"),
], ids=["pod-pod", "node-pod", "node-own-pod", "pod-node", "node-node", "agentless-node-pod", "agentless-pod-pod",
        "external-pod", "external-node", "node-external", "pod-agentless-node"])
def test_every_session_is_counted_by_exactly_one_node(client: str, server: str, counter: str) -> None:
    now = time.time()
    topo = Topology(resolver(now), max_connections=100, max_ports=20)
    observers = [n for n in dict.fromkeys((node_of(client), node_of(server))) if n in AGENTS]
    counted = []
    for node in observers:
        delta = edge(client, 40000, server, 8080, when=now)
        delta.client.local, delta.server.local = node_of(client) == node, node_of(server) == node
        result = topo.ingest(pb.ReportBatch(agent_id=f"agent-{node}", node=node, sequence=1, edges=[delta]), now)
        assert result.counted + result.other_observer == 1
        counted += [node] * result.counted
    assert counted == [counter]
