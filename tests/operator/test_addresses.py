"""Whose an address is when the operator cannot know yet, pure: a pod its watch has not delivered,
a node whose agent has not reported, a pod deleted before the operator (re)started.

A Resolver fed as the operator's watches feed it, a Topology, batches as the agents send them.
"""

from __future__ import annotations

import copy
import time
from datetime import datetime, timezone
from typing import Any

import pytest

from flowmap_api import report_pb2 as pb
from flowmap_operator.errors import NotKnownYet
from flowmap_operator.resolution import Peer, Resolver
from flowmap_operator.topology import GroupInfo, Topology
from tests.operator.harness import edge

NOW = time.time()
NODES = {"node-a": ("172.18.0.2", "10.244.1.0/24"), "node-b": ("172.18.0.3", "10.244.2.0/24"),
         "node-c": ("172.18.0.4", "10.244.3.0/24")}  # node-c runs no agent
OWN = {"node-a": ["172.18.0.2", "10.244.1.0", "10.244.1.1"], "node-b": ["172.18.0.3", "10.244.2.0", "10.244.2.1"]}
WEB, API = "10.244.1.10", "10.244.2.20"
NEW = "10.244.2.40"  # a pod on node-b the watch has not delivered yet
WAIT = 15.0


def pod(name: str, ip: str, node: str, *, owner: str = "", namespace: str = "shop", created: str = "",
        **extra: Any) -> dict[str, Any]:
    meta: dict[str, Any] = {"namespace": namespace, "name": name, **extra}
    if owner:
        meta["ownerReferences"] = [{"kind": "ReplicaSet", "name": f"{owner}-5f6c8", "controller": True}]
        meta["labels"] = {"pod-template-hash": "5f6c8"}
    if created:
        meta["creationTimestamp"] = created
    return {"metadata": meta, "spec": {"nodeName": node}, "status": {"phase": "Running", "podIP": ip}}


def resolver(now: float = NOW) -> Resolver:
    r = Resolver(wait=WAIT)
    for name, (ip, cidr) in NODES.items():
        r.node_seen({"metadata": {"name": name}, "spec": {"podCIDRs": [cidr]},
                     "status": {"addresses": [{"type": "InternalIP", "address": ip}]}})
    for node in OWN:
        r.pod_seen({"metadata": {"namespace": "flowmap-system", "name": f"agent-{node}",
                                 "labels": {"app.kubernetes.io/name": "flowmap-agent"}},
                    "spec": {"nodeName": node, "hostNetwork": True},
                    "status": {"phase": "Running", "podIP": NODES[node][0]}}, now)
    r.pod_seen(pod("web-5f6c8-x", WEB, "node-a", owner="web"), now)
    r.pod_seen(pod("api-5f6c8-y", API, "node-b", owner="api"), now)
    return r


def state(topo: Topology) -> Any:
    """Everything a batch could change in the operator's map (not the wait's clock)."""
    return copy.deepcopy((topo.ledger.edges, {a: vars(s) for a, s in topo.ledger.agents.items()}, topo.edges,
                          topo.groups, topo.ports, topo.modes.policies))


def batch(node: str, seq: int, *edges: pb.EdgeDelta, sent: float = NOW, addresses: bool = True) -> pb.ReportBatch:
    return pb.ReportBatch(agent_id=f"agent-{node}", node=node, sequence=seq, previous=seq - 1, edges=list(edges),
                          sent_unix_ms=int(sent * 1000), node_addresses=OWN[node] if addresses else [])


def test_a_pod_the_watch_has_not_delivered_is_waited_for_and_the_refusal_leaves_no_trace() -> None:
    topo = Topology(resolver(), max_connections=100, max_ports=20)
    topo.ingest(batch("node-a", 1, edge(WEB, 40000, API, 8080, when=NOW)), NOW)
    before = state(topo)
    # node-b's new pod asks the DNS server on node-a's web pod, before the operator knows the pod.
    first = batch("node-b", 1, edge(API, 40001, WEB, 8080, local="client", when=NOW),
                  edge(NEW, 40002, WEB, 53, local="client", client_pod="shop/api-5f6c8-z", proto=pb.UDP, when=NOW))
    with pytest.raises(NotKnownYet) as err:
        topo.ingest(first, NOW + 1)
    assert (err.value.ip, err.value.node) == (NEW, "node-b")
    assert state(topo) == before, "a deferred batch changed the map"
    with pytest.raises(NotKnownYet):
        topo.ingest(first, NOW + 2)  # resent too early: the same answer
    topo.resolver.pod_seen(pod("api-5f6c8-z", NEW, "node-b", owner="api"), NOW + 3)
    result = topo.ingest(first, NOW + 3)  # resent once the watch delivered it: applied whole
    assert result.counted == 2
    assert ("shop.api", "shop.web", 53, "UDP") in topo.ledger.edges
    assert not [key for key in topo.ledger.edges if "nodes" in key[:2]]


def test_a_node_address_waits_for_its_agents_first_report() -> None:
    """After a restart, node-b reports a hostNetwork client of node-a arriving through flannel
    (10.244.1.0) before node-a's agent has said a word: it waits for node-a, then is node-a."""
    topo = Topology(resolver(), max_connections=100, max_ports=20)
    from_tunnel = batch("node-b", 1, edge("10.244.1.0", 40000, API, 8080, local="server", when=NOW))
    with pytest.raises(NotKnownYet):
        topo.ingest(from_tunnel, NOW + 1)
    topo.ingest(pb.ReportBatch(agent_id="agent-node-a", node="node-a", node_addresses=OWN["node-a"]), NOW + 2)
    result = topo.ingest(from_tunnel, NOW + 2)
    assert result.other_observer == 1  # node-a's own client: node-a counts it
    assert topo.resolver.resolve("10.244.1.0", NOW, NOW + 2).member == "node-a"
    assert topo.resolver.resolve("172.18.0.2", NOW, NOW + 2).member == "node-a"  # the Node object's, as before


def test_the_wait_is_bounded_and_an_agentless_nodes_gateway_is_still_that_node() -> None:
    topo = Topology(resolver(), max_connections=100, max_ports=20)
    probe = batch("node-b", 1, edge("10.244.3.1", 40000, API, 8080, local="server", when=NOW))
    for at in (NOW, NOW + 1, NOW + WAIT - 1):
        with pytest.raises(NotKnownYet):
            topo.ingest(probe, at)
    result = topo.ingest(probe, NOW + WAIT)  # no agent on node-c will ever say: its own, as before
    assert result.counted == 1 and list(topo.ledger.edges) == [("nodes", "shop.api", 8080, "TCP")]
    # Waited for once: the next batch naming it, however fresh, is not held again.
    later = NOW + WAIT + 60
    again = batch("node-b", 2, edge("10.244.3.1", 40001, API, 8080, local="server", when=later), sent=later)
    assert topo.ingest(again, later).counted == 1
    # A delta older than the wait (resent after a long outage) is not held at all.
    r = resolver()
    assert r.resolve("10.244.3.7", NOW - WAIT - 1, NOW).member == "node-c"
    # An address quiet for the grace period is waited for afresh (a new pod may hold it now).
    assert r.resolve("10.244.3.7", NOW, NOW + 1).member == "node-c"
    with pytest.raises(NotKnownYet):
        r.resolve("10.244.3.7", NOW + r.grace + 10, NOW + r.grace + 10)


def test_what_is_not_in_a_pod_range_is_never_waited_for() -> None:
    r = resolver()
    r.cidr_group_seen({"metadata": {"name": "partners"}, "spec": {"cidrs": ["198.51.100.0/24"]}})
    assert r.resolve("198.51.100.7", NOW, NOW).group == "partners"
    assert r.resolve("192.0.2.1", NOW, NOW).kind == "External"
    assert r.resolve(API, NOW, NOW).group == "shop.api"
    # the observer's own end, marked local without a pod, is the observer, whatever its address
    assert r.resolve_endpoint("10.244.2.77", NOW, "node-b", True, "", NOW).member == "node-b"


def test_reported_addresses_keep_the_latest_report_of_the_node() -> None:
    r = resolver()
    r.node_addresses_seen("node-a", OWN["node-a"], NOW)
    version = r.version
    r.node_addresses_seen("node-a", ["172.18.0.2"], NOW - 5)  # a batch resent from before: older news
    r.node_addresses_seen("node-a", [], NOW + 5)  # an agent that does not say
    r.node_addresses_seen("node-a", reversed(OWN["node-a"]), NOW + 6)  # the same set
    assert r.version == version and r.resolve("10.244.1.1", NOW, NOW).member == "node-a"
    r.node_addresses_seen("node-a", ["172.18.0.2", "10.244.1.0"], NOW + 7)  # cni0 is gone
    assert r.version == version + 1
    with pytest.raises(NotKnownYet):
        r.resolve("10.244.1.1", NOW + 7, NOW + 7)
    # Two nodes with one address (a VIP, docker0): always the same one of them, never a flip-flop.
    r.node_addresses_seen("node-b", [*OWN["node-b"], "10.0.0.100"], NOW)
    r.node_addresses_seen("node-a", ["172.18.0.2", "10.0.0.100"], NOW + 8)
    assert r.resolve("10.0.0.100", NOW, NOW).member == "node-a"
    r.node_addresses_seen("node-a", ["172.18.0.2"], NOW + 9)
    assert r.resolve("10.0.0.100", NOW, NOW).member == "node-b"


def group(name: str, namespace: str, workload: str, *members: tuple[str, str, str]) -> dict[str, Any]:
    return {"metadata": {"name": name}, "status": {
        "kind": "Workload", "namespace": namespace, "workload": {"kind": "Deployment", "name": workload},
        "members": [{"name": n, "ips": [ip], "node": node} for n, ip, node in members], "memberCount": len(members)}}


def test_a_pod_gone_before_a_restart_is_known_from_its_groups_members() -> None:
    """The previous operator's pod was deleted before the new one listed pods: only its Group's
    status still names it, and the batches agents resend after the restart name its address."""
    old_ip, start = "10.244.2.50", NOW
    r = resolver(start)
    r.pod_seen(pod("flowmap-operator-5f6c8-new", "10.244.1.60", "node-a", owner="flowmap-operator",
                   namespace="flowmap-system"), start)
    r.group_members_seen(group("flowmap-system.flowmap-operator", "flowmap-system", "flowmap-operator",
                               ("flowmap-operator-5f6c8-old", old_ip, "node-b"),
                               ("flowmap-operator-5f6c8-new", "10.244.1.60", "node-a")), start)
    r.group_members_seen({"metadata": {"name": "example.com"}, "status": {"kind": "FQDN", "members": [
        {"name": "example.com", "ips": ["10.244.2.51"]}]}}, start)  # not a workload: no pods
    old = r.resolve(old_ip, start - 3, start + 2)  # a delta from before the restart, resent after it
    assert (old.group, old.member, old.node) == ("flowmap-system.flowmap-operator", "flowmap-operator-5f6c8-old",
                                                 "node-b")
    assert r.resolve(old_ip, start + 60, start + 60).member == "flowmap-operator-5f6c8-old"  # late packets: grace
    new = r.resolve("10.244.1.60", start, start)
    assert new.member == "flowmap-operator-5f6c8-new"  # the live pod keeps its own span
    assert r.members("flowmap-system.flowmap-operator", 10)[1] == 1  # a gone pod is no member
    with pytest.raises(NotKnownYet):
        r.resolve("10.244.2.51", start, start)
    with pytest.raises(NotKnownYet):  # past the grace period the address is nobody's again
        r.resolve(old_ip, start + r.grace + 1, start + r.grace + 1)
    # The address reused by a new pod since: the new pod wins for its own time.
    r.pod_seen(pod("redis-0", old_ip, "node-b", created=datetime.fromtimestamp(start + 4, timezone.utc).isoformat()),
               start + 5)
    assert r.resolve(old_ip, start + 5, start + 5).member == "redis-0"
    assert r.resolve(old_ip, start - 3, start + 5).member == "flowmap-operator-5f6c8-old"



def test_a_group_read_back_without_its_workload_takes_the_one_its_pods_say() -> None:
    """A Group whose status the API server never took (or a workload replaced by one of another
    kind under the same name) is read back knowing no workload kind; its next status must not
    say an empty one (the schema refuses that, and the refusal would repeat at every restart)."""
    topo = Topology(resolver(), max_connections=100, max_ports=20)
    topo.groups["shop.web"] = GroupInfo(Peer("shop.web", "Workload"), exists=True)  # as read back
    topo.ingest(batch("node-a", 1, edge(WEB, 40000, "192.0.2.9", 443, when=NOW)), NOW)
    peer = topo.groups["shop.web"].peer
    assert (peer.workload_kind, peer.workload) == ("Deployment", "web")
    assert topo.groups["shop.web"].written_last_seen < topo.groups["shop.web"].last_seen  # written again
