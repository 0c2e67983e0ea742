"""dp session records become one delta per edge, with local endpoints marked and names learned."""

from __future__ import annotations

import ipaddress

from flowmap_api import report_pb2 as pb
from flowmap_agent.aggregation import Aggregator
from flowmap_dp import wire_pb2


def ip(text: str) -> bytes:
    return ipaddress.ip_address(text).packed


def session(client: str, cport: int, server: str, sport: int, *, new: bool = False, opened: bool | None = None,
            closed: bool = False, c2s: int = 0, s2c: int = 0, app: str = "", proto: int = 6) -> wire_pb2.Session:
    """``opened`` defaults to ``new``: the dp saw the session open in its first report."""
    return wire_pb2.Session(ip_proto=proto, client_ip=ip(client), client_port=cport, server_ip=ip(server),
                            server_port=sport, new=new, opened=new if opened is None else opened, closed=closed,
                            bytes_c2s=c2s, bytes_s2c=s2c,
                            packets_c2s=1 if c2s else 0, packets_s2c=1 if s2c else 0, app=app,
                            first_seen_ns=1_000_000_000, last_seen_ns=2_000_000_000)


def test_sessions_of_one_edge_add_up_and_local_ends_are_marked() -> None:
    agg = Aggregator(local_pods={"10.244.1.10": "shop/web-1"}, node_ips=frozenset({"172.18.0.2"}))
    report = wire_pb2.Report(sessions=[
        session("10.244.1.10", 40000, "10.96.0.50", 80, new=True, c2s=100, s2c=900, app="http"),
        session("10.244.1.10", 40001, "10.96.0.50", 80, new=True, c2s=50, s2c=60),
        session("172.18.0.2", 50000, "10.244.1.10", 8080, new=True, closed=True, c2s=7, s2c=8),
        session("2001:db8::1", 1, "10.244.1.10", 53, proto=17, c2s=1),  # family mix: still its own edge
    ], dns=[wire_pb2.DnsAnswer(name="Example.COM.", type="A", address=ip("93.184.216.34"), ttl=300),
            wire_pb2.DnsAnswer(name="example.com", type="CNAME", target="x.example.net", ttl=300)],
        threats=[wire_pb2.ThreatHit(threat="sqlinjection", ip_proto=6, client_ip=ip("10.244.1.10"),
                                    client_port=40000, server_ip=ip("10.96.0.50"), server_port=80,
                                    snippet="' or 1=1--", seen_ns=3_000_000_000)], end_ns=5_000_000_000)
    edges, names = agg.aggregate(report)
    by_server = {(d.server.ip, d.server.port): d for d in edges}
    web_api = by_server[("10.96.0.50", 80)]
    assert (web_api.bytes_c2s, web_api.bytes_s2c, web_api.sessions_opened, web_api.sessions_active) == (150, 960, 2, 2)
    assert web_api.client.local and web_api.client.pod == "shop/web-1" and not web_api.server.local
    assert list(web_api.apps) == ["http"] and web_api.threats[0].name == "sqlinjection"
    node_pod = by_server[("10.244.1.10", 8080)]
    assert node_pod.client.local and not node_pod.client.pod and node_pod.server.pod == "shop/web-1"
    assert node_pod.sessions_closed == 1 and node_pod.sessions_active == 0
    assert by_server[("10.244.1.10", 53)].protocol == pb.UDP
    assert [(n.ip, n.name, n.ttl_seconds) for n in names] == [("93.184.216.34", "example.com", 300)]

    # The next interval: one of the two sessions closes; the gauge follows.
    edges, _ = agg.aggregate(wire_pb2.Report(sessions=[session("10.244.1.10", 40000, "10.96.0.50", 80, closed=True,
                                                          c2s=1)]))
    assert edges[0].sessions_active == 1 and edges[0].sessions_opened == 0


def test_only_a_seen_opening_counts_a_session() -> None:
    agg = Aggregator(local_pods={"10.244.1.10": "shop/web-1"})
    # kube-proxy DNAT: the request half (to the ClusterIP, with the SYN) enters on the pod's veth,
    # the reply half (from the backend, starting with a SYN-ACK) on the uplink; both are reported.
    # A session picked up mid-stream after a dp restart was counted by the dp run before.
    edges, _ = agg.aggregate(wire_pb2.Report(sessions=[
        session("10.244.1.10", 40000, "10.96.0.50", 80, new=True, c2s=60),
        session("10.244.1.10", 40000, "10.244.2.7", 8080, new=True, opened=False, s2c=60),
        session("10.244.1.10", 40001, "10.96.0.50", 80, new=True, opened=False, c2s=500, s2c=900),
    ]))
    service, backend = sorted(edges, key=lambda d: d.server.port)
    assert (service.sessions_opened, service.sessions_active) == (1, 1)
    assert (backend.sessions_opened, backend.sessions_active) == (0, 0)

    # A client SYN read after its SYN-ACK (two rings): the session opens in a later record.
    half = session("10.244.1.10", 40002, "10.96.0.50", 80, new=True, opened=False, s2c=60)
    (service,), _ = agg.aggregate(wire_pb2.Report(sessions=[half]))
    assert (service.sessions_opened, service.sessions_active) == (0, 1)  # 40000 is still open
    syn = session("10.244.1.10", 40002, "10.96.0.50", 80, opened=True, c2s=60)
    (service,), _ = agg.aggregate(wire_pb2.Report(sessions=[syn]))
    assert (service.sessions_opened, service.sessions_active) == (1, 2)


def test_link_scoped_traffic_is_no_connection() -> None:
    agg = Aggregator(local_pods={"10.244.1.10": "shop/web-1", "fd00:10:244:1::10": "shop/web-1"})
    edges, _ = agg.aggregate(wire_pb2.Report(sessions=[
        session("fe80::1", 0, "fd00:10:244:1::10", 0, new=True, proto=58, c2s=72),  # neighbour discovery
        session("fd00:10:244:1::10", 0, "ff02::2", 0, new=True, proto=58, c2s=56),  # router solicitation
        session("0.0.0.0", 68, "255.255.255.255", 67, new=True, proto=17, c2s=300),  # DHCP discover
        session("169.254.1.1", 1, "10.244.1.10", 80, new=True, c2s=10),
        session("fd00:10:244:1::10", 40000, "fd00:10:244:2::30", 6379, new=True, c2s=90),
    ]))
    assert [(d.client.ip, d.server.ip) for d in edges] == [("fd00:10:244:1::10", "fd00:10:244:2::30")]


def test_a_call_to_a_clusterip_is_judged_where_the_node_sent_it() -> None:
    """The dp sees the pod's SYN to the ClusterIP, before the node's DNAT; the node's table sees it
    after, towards the pod behind it. An edge the policy would deny is judged there again."""
    import ipaddress as ipa

    from flowmap_agent.policy.compiling import AllowedPeer, PolicyInForce

    web, api, service, db = "10.244.1.10", "10.244.2.20", "10.96.0.50", "10.244.2.30"
    allowed = AllowedPeer(pb.TCP, (ipa.ip_network(f"{api}/32"),), frozenset({8080}))
    asked: list[tuple[int, str, int, str, int]] = []

    def destination(key: tuple[int, str, int, str, int]) -> tuple[str, int] | None:
        asked.append(key)
        return {service: (api, 8080)}.get(key[3])

    agg = Aggregator(local_pods={web: "shop/web-1"}, policy=PolicyInForce(egress={web: (allowed,)}),
                     destination=destination)
    # The answer of a ClusterIP call comes back as another 5-tuple: this edge never sees one.
    via_service, direct_db = agg.aggregate(wire_pb2.Report(sessions=[
        session(web, 40000, service, 80, new=True, c2s=74),
        session(web, 40001, db, 5432, new=True, c2s=74)]))[0]
    assert via_service.verdict == pb.ALLOWED
    assert direct_db.verdict == pb.DENIED  # no DNAT: nothing else to judge
    assert [k[3] for k in asked] == [service, db]  # asked only for edges the policy would deny


def test_a_vm_of_this_node_is_a_local_end_named_by_the_batchs_list_of_vms() -> None:
    agg = Aggregator(local_pods={"10.244.1.10": "shop/web-1"}, node_ips=frozenset({"172.18.0.2", "10.77.1.1"}),
                     local_vms={"10.77.1.2": "0d5c8e1a-2f0b-4c1b-9a57-7e0f4e3b1c2d"})
    edges, _ = agg.aggregate(wire_pb2.Report(sessions=[
        session("10.244.1.10", 40000, "10.77.1.2", 80, new=True, c2s=100, s2c=900),
        session("10.77.1.2", 40001, "10.244.2.20", 8080, new=True, c2s=10, s2c=20),
        session("10.77.1.1", 40002, "10.77.1.2", 80, new=True, c2s=1, s2c=2)]))
    ends = {(d.client.ip, d.server.ip): (d.client.local, d.client.pod, d.server.local, d.server.pod) for d in edges}
    assert ends == {("10.244.1.10", "10.77.1.2"): (True, "shop/web-1", True, ""),
                    ("10.77.1.2", "10.244.2.20"): (True, "", False, ""),  # the pod on another node: not local
                    ("10.77.1.1", "10.77.1.2"): (True, "", True, "")}  # the node (the tap's address) to its VM
