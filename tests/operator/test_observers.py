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


# flannel's shape: each node's pod range, the bridge's gateway (.1) and the tunnel's address (.0).
POD_CIDRS = {"node-a": "10.244.1.0/24", "node-b": "10.244.2.0/24", "node-c": "10.244.3.0/24"}


def own_addresses(node: str) -> list[str]:
    """What a node's agent reports as the node's: the uplink's, the tunnel's .0 and the bridge's .1."""
    n = node[-1]
    return [NODES[node], f"10.244.{ord(n) - ord('a') + 1}.0", f"10.244.{ord(n) - ord('a') + 1}.1", f"fd00:10:244:{n}::1"]


@pytest.mark.parametrize("client,server,observers,counter,groups", [
    # The kubelet's probe from the bridge's gateway: only node-a sees it, its own address.
    ("10.244.1.1", WEB, {"node-a": ("client",)}, "node-a", ("nodes", "shop.web")),
    # A hostNetwork client on node-a reaching a pod on node-b leaves from flannel.1's address:
    # node-b sees an address node-a's agent reports, node-a's own client.
    ("10.244.1.0", API, {"node-a": ("client",), "node-b": ("server",)}, "node-a", ("nodes", "shop.api")),
    # A pod calling a server on another node's own address inside its range.
    (API, "10.244.1.0", {"node-b": ("client",), "node-a": ("server",)}, "node-b", ("shop.api", "nodes")),
    (API, "fd00:10:244:a::1", {"node-b": ("client",), "node-a": ("server",)}, "node-b", ("shop.api", "nodes")),
], ids=["probe-from-gateway", "host-client-through-tunnel", "pod-to-tunnel-address", "pod-to-ipv6-address"])
def test_a_nodes_addresses_beyond_its_node_object_are_the_node(
        client: str, server: str, observers: dict[str, tuple[str, ...]], counter: str, groups: tuple[str, str]) -> None:
    """An end the observer marks local without a pod is the observer itself; elsewhere, an address
    the node's agent reports with its batches is that node: counted once, as nodes."""
    now = time.time()
    r = resolver(now)
    for name, ip in NODES.items():
        r.node_seen({"metadata": {"name": name}, "spec": {"podCIDRs": [POD_CIDRS[name], f"fd00:10:244:{name[-1]}::/64"]},
                     "status": {"addresses": [{"type": "InternalIP", "address": ip}]}})
    topo = Topology(r, max_connections=100, max_ports=20)
    for node in AGENTS:  # each agent's first word to the operator (a batch, or a question for the ack)
        topo.ingest(pb.ReportBatch(agent_id=f"agent-{node}", node=node, node_addresses=own_addresses(node)), now)
    counted = []
    for node, local in observers.items():
        delta = edge(client, 40000, server, 8080, when=now)
        delta.client.local, delta.server.local = "client" in local, "server" in local
        delta.client.pod = f"shop/{PODS[client][0]}" if client in PODS and delta.client.local else ""
        delta.server.pod = f"shop/{PODS[server][0]}" if server in PODS and delta.server.local else ""
        result = topo.ingest(pb.ReportBatch(agent_id=f"agent-{node}", node=node, sequence=1, edges=[delta],
                                            node_addresses=own_addresses(node)), now)
        assert result.counted + result.other_observer == 1 and result.external == 0
        counted += [node] * result.counted
    assert counted == [counter]
    assert [key[:2] for key in topo.ledger.edges] == [groups]
    # An address outside every range and every node stays external.
    assert r.resolve("10.245.0.1", now, now).kind == "External"
