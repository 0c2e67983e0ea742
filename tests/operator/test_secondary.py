"""Secondary (Multus) addresses: named after a pod only where its node's agent confirms them
(ReportBatch.pod_addresses), the pod runs on that node and its network-status annotation lists
them; never over a pod's podIPs or a node's address.

Pure: a Resolver and a Topology fed as the watches and the agents feed them. Then the real
operator on the real API server, the pods there with their annotations, a test agent speaking
the real proto with the agent's token.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import pytest

from flowmap_api import networks
from flowmap_api import report_pb2 as pb
from flowmap_api.limits import MAX_POD_ADDRESSES
from flowmap_api.validity import Invalid, check_batch, normalise
from flowmap_operator.errors import NotKnownYet, SecondaryNotKnownYet
from flowmap_operator.resolution import Resolver
from flowmap_operator.topology import Topology
from tests.operator.harness import Agent, Cluster, Operator, create_pods, edge, pod, running
from tests.operator.test_addresses import NOW, WAIT, resolver
from tests.operator.test_addresses import pod as pod_body
from tests.operator.test_reports import wait_for

DB, DB2, ELSEWHERE = "10.244.1.50", "192.168.100.50", "192.168.100.60"


def annotated(body: dict[str, Any], *claims: str) -> dict[str, Any]:
    body["metadata"]["annotations"] = {networks.NETWORK_STATUS: json.dumps(
        [{"name": "cbr0", "interface": "eth0", "ips": [body["status"]["podIP"]], "default": True},
         {"name": "multus/storage", "interface": "net1", "ips": list(claims)}])}
    return body


def fed(now: float = NOW) -> Resolver:
    """test_addresses' cluster (web on node-a, api on node-b), and db on node-a on a second network."""
    r = resolver(now)
    r.pod_seen(annotated(pod_body("db-0", DB, "node-a", created="2026-01-01T00:00:00Z"), DB2, "192.168.100.51",
                         "10.244.2.20", "172.18.0.3"), now)
    r.pod_seen(annotated(pod_body("far-0", "10.244.2.50", "node-b"), ELSEWHERE), now)
    return r


def said(r: Resolver, node: str, sent: float, **pods: list[str]) -> None:
    r.pod_addresses_seen(node, ((f"shop/{name.replace('_', '-')}", ips) for name, ips in pods.items()), sent, sent)


def test_a_confirmed_and_annotated_address_is_the_pods_for_as_long_as_its_agent_says_so() -> None:
    r = fed()
    assert r.resolve(DB2, NOW, NOW).group == "external"  # the annotation alone: not believed
    said(r, "node-a", NOW, db_0=[DB2])
    peer = r.resolve(DB2, NOW, NOW)
    assert (peer.group, peer.member, peer.node) == ("shop.db-0", "db-0", "node-a")
    assert r.resolve(DB2, NOW - 3600, NOW).group == "shop.db-0"  # since the pod started
    said(r, "node-a", NOW - 10, db_0=[])  # a batch resent from before: older news, changes nothing
    assert r.resolve(DB2, NOW + 5, NOW + 5).group == "shop.db-0"
    said(r, "node-a", NOW + 10)  # no longer confirmed (the interface went): its pod's until then
    assert r.resolve(DB2, NOW + 5, NOW + 10).group == "shop.db-0"
    assert r.resolve(DB2, NOW + 10 + r.grace + 1, NOW + 10 + r.grace + 1).group == "external"
    said(r, "node-a", NOW + 20, db_0=[DB2])
    r.pod_gone("shop", "db-0", NOW + 30)  # the pod's addresses end with it
    assert r.resolve(DB2, NOW + 25, NOW + 30).group == "shop.db-0"
    assert r.resolve(DB2, NOW + 30 + r.grace + 1, NOW + 30 + r.grace + 1).group == "external"


def test_neither_a_claim_alone_nor_an_agent_alone_nor_one_over_a_pod_or_node_is_believed() -> None:
    r = fed()
    # node-a's agent for node-b's pod (whose annotation lists it): not node-a's to say, not waited for.
    said(r, "node-a", NOW, db_0=["10.244.2.20", "172.18.0.3"], far_0=[ELSEWHERE])
    assert r.resolve(ELSEWHERE, NOW, NOW).group == "external"
    # The annotation lists api's podIP and node-b's address: theirs, whoever confirms them.
    assert r.resolve("10.244.2.20", NOW, NOW).group == "shop.api"
    assert r.resolve("172.18.0.3", NOW, NOW).member == "node-b"
    # An address the agent confirms but the annotation does not list (yet): waited for, then not believed.
    said(r, "node-a", NOW, db_0=["192.168.100.99"])
    with pytest.raises(SecondaryNotKnownYet, match="192.168.100.99 is a secondary address node node-a's agent"):
        r.resolve("192.168.100.99", NOW, NOW)
    assert r.resolve("192.168.100.99", NOW, NOW + WAIT + 1).group == "external"
    # Two pods confirmed to hold one address at once (isolated networks reusing a range): neither's.
    r.pod_seen(annotated(pod_body("db-1", "10.244.2.51", "node-b"), DB2), NOW)
    said(r, "node-a", NOW, db_0=[DB2])
    said(r, "node-b", NOW, db_1=[DB2])
    assert r.resolve(DB2, NOW, NOW).group == "external"
    said(r, "node-b", NOW + 1)
    assert r.resolve(DB2, NOW + 2, NOW + 2).group == "shop.db-0"


def test_a_pod_the_watch_has_not_delivered_is_waited_for_then_named() -> None:
    topo = Topology(fed(), max_connections=100, max_ports=20)
    new = edge("192.168.100.70", 40000, "10.244.2.20", 8080, client_pod="shop/new-0", when=NOW)
    batch = pb.ReportBatch(agent_id="agent-node-a", node="node-a", sequence=1, sent_unix_ms=int(NOW * 1000), edges=[new],
                           pod_addresses=[pb.PodAddresses(pod="shop/new-0", ips=["192.168.100.70"])])
    with pytest.raises(NotKnownYet) as err:
        topo.ingest(batch, NOW + 1)
    assert (err.value.ip, err.value.node) == ("192.168.100.70", "node-a")
    topo.resolver.pod_seen(annotated(pod_body("new-0", "10.244.1.70", "node-a", owner="new"), "192.168.100.70"),
                           NOW + 2)
    assert topo.ingest(batch, NOW + 2).counted == 1
    assert ("shop.new", "shop.api", 8080, "TCP") in topo.ledger.edges


def test_the_contract_bounds_pod_addresses_and_refuses_what_is_not_one() -> None:
    def batch(*entries: tuple[str, list[str]]) -> pb.ReportBatch:
        return pb.ReportBatch(agent_id="a", node="node-a", pod_addresses=[pb.PodAddresses(pod=p, ips=ips)
                                                                            for p, ips in entries])
    check_batch(batch(("shop/db-0", [DB2, "fd00::1"])))
    ok = batch(("shop/db-0", ["FD00:0::1"]))
    assert normalise(ok)[("pod_address", "not_canonical")] == 1 and list(ok.pod_addresses[0].ips) == ["fd00::1"]
    for bad, why in ((batch(("shop/db-0", ["192.168.100.300"])), r"pod_addresses\[0\]\.ips\[0\]: '192.168.100.300'"),
                     (batch(("db-0", [DB2])), r"pod_addresses\[0\]\.pod: 'db-0' is not namespace/name"),
                     (batch(*[(f"shop/p{i}", [f"10.1.{i // 256}.{i % 256}"]) for i in range(MAX_POD_ADDRESSES + 1)]),
                      f"more than the limit {MAX_POD_ADDRESSES}")):
        with pytest.raises(Invalid, match=why):
            check_batch(bad)


# -- the real operator on the real API server ---------------------------------------------------------

@pytest.fixture
def multus_pods(cluster: Cluster) -> Iterator[None]:
    cluster.plane.kubectl("create", "namespace", "storage", check=False)
    db = pod("storage", "db-0", "node-a", DB, owner=("StatefulSet", "db"))
    far = pod("storage", "far-0", "node-b", "10.244.2.60", owner=("StatefulSet", "far"))
    for body, claims in ((db, [DB2]), (far, [ELSEWHERE])):
        body["metadata"]["annotations"] = {networks.NETWORK_STATUS: json.dumps(
            [{"name": "storage/san", "interface": "net1", "ips": claims}])}
    create_pods(cluster.plane, db, far)
    yield
    cluster.plane.kubectl("delete", "pod", "-n", "storage", "db-0", "far-0", "--grace-period=0", "--force",
                          check=False)


@pytest.fixture
def operator(cluster: Cluster) -> Iterator[Operator]:
    yield from running(cluster, unknown_address_wait=2.0)


def clients(cluster: Cluster, port: int) -> list[str]:
    listed = json.loads(cluster.plane.kubectl("get", "connections", "-o", "json").stdout)["items"]
    return sorted(c["spec"]["client"] for c in listed if c["spec"]["port"] == port)


def test_the_operator_names_a_confirmed_secondary_address_after_its_pod_and_nothing_else(
        cluster: Cluster, multus_pods: None, operator: Operator) -> None:
    a = Agent(operator, f"multus-{time.monotonic_ns()}", "node-a", cluster.token("flowmap-agent", pod_name="agent-a"))
    now = time.time()
    batch = a.batch([edge(DB2, 40000, "198.51.100.7", 3260, client_pod="storage/db-0", when=now),
                     edge("192.168.100.52", 40001, "198.51.100.7", 3261, client_pod="storage/db-0", when=now),
                     edge(ELSEWHERE, 40002, "198.51.100.7", 3262, client_pod="storage/far-0", when=now)])
    # node-a's agent confirms db-0's address, one db-0's annotation does not list, and node-b's pod's.
    batch.pod_addresses.extend([pb.PodAddresses(pod="storage/db-0", ips=[DB2, "192.168.100.52"]),
                                pb.PodAddresses(pod="storage/far-0", ips=[ELSEWHERE])])
    a.flush()  # the unlisted address is waited for (2 s here), then taken for what it is
    assert wait_for(lambda: clients(cluster, 3260), what="db's Connection") == ["storage.db"]
    assert wait_for(lambda: clients(cluster, 3261), what="the unlisted address's") == ["external"]
    assert wait_for(lambda: clients(cluster, 3262), what="the other node's pod's") == ["external"]
    group = json.loads(cluster.plane.kubectl("get", "groups", "storage.db", "-o", "json").stdout)
    assert group["status"]["workload"] == {"kind": "StatefulSet", "name": "db"}
