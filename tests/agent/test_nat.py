"""Masqueraded pod traffic counts once, under the pod (the rewrite; the kernel's side is live in
tests/e2e, where the nodes masquerade what leaves for the internet)."""

from __future__ import annotations

import ipaddress

from flowmap_agent.nat import Original, Tuple5, Unnat
from flowmap_dp import wire_pb2

NODE, POD, EXT = "172.18.0.3", "10.244.2.20", "203.0.113.10"
BRIDGE, OPERATOR = "10.244.2.1", "10.244.2.40"


def session(client: str, cport: int, server: str, sport: int, c2s: int, s2c: int) -> wire_pb2.Session:
    return wire_pb2.Session(ip_proto=6, client_ip=ipaddress.ip_address(client).packed, client_port=cport,
                            server_ip=ipaddress.ip_address(server).packed, server_port=sport, new=True, opened=True,
                            bytes_c2s=c2s, bytes_s2c=s2c, packets_c2s=1, packets_s2c=1)


def test_the_nodes_half_of_a_masqueraded_session_becomes_the_pods_answer() -> None:
    conntrack: dict[Tuple5, Original] = {
        (6, NODE, 61000, EXT, 443): (POD, 40000, EXT, 443),  # masqueraded: the port changed too
        (6, NODE, 30080, "198.51.100.7", 5555): ("198.51.100.7", 5555, NODE, 30080),  # a NodePort's SNAT
        # A hostNetwork client of a ClusterIP, masqueraded onto the bridge's address (kube-proxy, flannel).
        (6, BRIDGE, 58057, OPERATOR, 9443): (NODE, 58057, "10.96.0.40", 9443),
    }
    asked: list[Tuple5] = []

    def lookup(key: Tuple5) -> Original:
        asked.append(key)
        return conntrack.get(key)

    unnat = Unnat(lookup, [NODE, BRIDGE], {POD: "shop/api-1"})
    report = wire_pb2.Report(sessions=[
        session(POD, 40000, EXT, 443, c2s=500, s2c=0),  # on the pod's veth: the request
        session(NODE, 61000, EXT, 443, c2s=500, s2c=9000),  # on the uplink: its copy, and the answer
        session(NODE, 30080, "198.51.100.7", 5555, c2s=70, s2c=80),  # plumbing of an outside client's call
        session(NODE, 50000, "172.18.0.2", 10250, c2s=10, s2c=20),  # the node's own: not NATed
        session(BRIDGE, 58057, OPERATOR, 9443, c2s=30, s2c=40),  # the node's own, under its bridge's address
    ])
    unnat.apply(report)
    got = [(str(ipaddress.ip_address(s.client_ip)), s.client_port, s.server_port, s.bytes_c2s, s.bytes_s2c, s.opened)
           for s in report.sessions]
    assert got == [(POD, 40000, 443, 500, 0, True), (POD, 40000, 443, 0, 9000, False),
                   (NODE, 50000, 10250, 10, 20, True), (BRIDGE, 58057, 9443, 30, 40, True)]
    assert (unnat.translated, unnat.dropped) == (1, 1)
    assert len(asked) == 4  # only the node's sessions are looked up
    unnat.apply(wire_pb2.Report(sessions=[session(NODE, 61000, EXT, 443, c2s=0, s2c=100)]))
    assert len(asked) == 4  # a session is looked up once
