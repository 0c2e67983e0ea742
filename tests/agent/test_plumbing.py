"""What the node's links mean for capture, on plain values (flowmap_agent.plumbing)."""

from __future__ import annotations

from flowmap_agent.plumbing import (
    REREAD, Address, Link, Seen, overlay, own_addresses, plan, pod_interfaces, to_read, tunnels,
)
from flowmap_dp.capture import Encapsulation

LINK_SCOPE, HOST_SCOPE = 253, 254
LO = Link(1, "lo")
ETH0 = Link(2, "eth0")
CNI0 = Link(3, "cni0", "bridge")
FLANNEL = Link(4, "flannel.1", "vxlan", port=8472)
IPVS = Link(5, "kube-ipvs0", "dummy", up=False)
# Pods: two on the bridge (their peers in namespaces 0 and 1), one routed (namespace 2).
POD_A = Link(10, "veth1", "veth", peer=2, peer_netns=0)
POD_B = Link(11, "veth2", "veth", peer=2, peer_netns=1)
POD_C = Link(12, "cali3", "veth", peer=3, peer_netns=2)
LINKS = [LO, ETH0, CNI0, FLANNEL, IPVS, POD_A, POD_B, POD_C]
ADDRESSES = [
    Address(1, "127.0.0.1", HOST_SCOPE), Address(1, "::1", HOST_SCOPE),
    Address(2, "172.18.0.2"), Address(2, "fd00:172:18::2"), Address(2, "fe80::1", LINK_SCOPE),
    Address(3, "10.244.1.1"), Address(4, "10.244.1.0"),
    Address(5, "10.96.0.1"), Address(5, "10.96.0.10"),  # every ClusterIP, on a down dummy
    Address(12, "169.254.1.1"),  # a ptp-like gateway on the host side: link-local, never leaves
]
PEERS = {
    (10, 0, 2): Seen(frozenset({"10.244.1.10", "fd00:10:244:1::a"}), 0.0),
    (11, 1, 2): Seen(frozenset({"10.244.1.11"}), 0.0),
    (12, 2, 3): Seen(frozenset({"10.244.1.12"}), 0.0),
}


def test_each_pod_is_found_through_its_veth_peer_whatever_the_routes() -> None:
    pods = pod_interfaces(LINKS, PEERS, ["10.244.1.10", "fd00:10:244:1::a", "10.244.1.11", "10.244.1.12",
                                         "10.244.2.99"])
    assert pods == {"10.244.1.10": "veth1", "fd00:10:244:1::a": "veth1", "10.244.1.11": "veth2",
                    "10.244.1.12": "cali3"}
    # A sandbox's old veth that still holds the address: the newest link wins.
    old = Link(9, "vethold", "veth", peer=2, peer_netns=7)
    assert pod_interfaces([*LINKS, old], {**PEERS, (9, 7, 2): Seen(frozenset({"10.244.1.11"}), 0.0)},
                          ["10.244.1.11"]) == {"10.244.1.11": "veth2"}
    # A veth whose peer is in this namespace (no namespace id), or no veth at all, is no pod's.
    assert Link(20, "vethx", "veth", peer=21).peer_key is None
    assert Link(20, "macvlan0", "macvlan", peer=2, peer_netns=3).peer_key is None


def test_only_new_or_empty_peers_are_read_and_all_of_them_now_and_then_while_a_pod_is_missing() -> None:
    known = {(10, 0, 2): PEERS[(10, 0, 2)], (11, 1, 2): Seen(frozenset(), 5.0)}
    assert to_read(LINKS, known, missing=False, now=5.0) == [(11, 1, 2), (12, 2, 3)]
    assert to_read(LINKS, PEERS, missing=False, now=100.0) == []
    assert to_read(LINKS, PEERS, missing=True, now=REREAD - 1) == []
    assert to_read(LINKS, PEERS, missing=True, now=REREAD) == [(10, 0, 2), (11, 1, 2), (12, 2, 3)]


def test_the_nodes_own_addresses_are_the_global_ones_on_interfaces_that_are_up() -> None:
    assert own_addresses(LINKS, ADDRESSES) == {"172.18.0.2", "fd00:172:18::2", "10.244.1.1", "10.244.1.0"}


def test_tunnels_that_are_up_and_what_they_put_on_the_wire() -> None:
    links = [
        FLANNEL,
        Link(30, "vxlan.calico", "vxlan", port=4789),
        Link(31, "vx0", "vxlan"),  # port not told: the kernel's default
        Link(32, "cilium_geneve", "geneve"),
        Link(33, "wireguard.cali", "wireguard", port=51820),
        Link(34, "flannel-wg", "wireguard"),  # listen port not read
        Link(35, "tunl0", "ipip"),
        Link(36, "gre0", "gre", up=False),  # a fallback device: down
        Link(37, "ip6tnl1", "ip6tnl"),
        CNI0, POD_A,
    ]
    assert tunnels(links) == {
        "flannel.1": (Encapsulation(17, 8472),), "vxlan.calico": (Encapsulation(17, 4789),),
        "vx0": (Encapsulation(17, 8472),), "cilium_geneve": (Encapsulation(17, 6081),),
        "wireguard.cali": (Encapsulation(17, 51820),), "flannel-wg": (Encapsulation(17, 51820),),
        "tunl0": (Encapsulation(4),), "ip6tnl1": (Encapsulation(4), Encapsulation(41)),
    }
    assert overlay(links) == (Encapsulation(4), Encapsulation(17, 4789), Encapsulation(17, 6081),
                              Encapsulation(17, 8472), Encapsulation(17, 51820), Encapsulation(41))


def test_the_plan_captures_pods_uplinks_and_tunnels_and_drops_the_overlay_on_the_uplinks() -> None:
    pod_ips = ["10.244.1.10", "10.244.1.11", "10.244.1.12", "10.244.1.13"]
    p = plan(LINKS, ADDRESSES, PEERS, pod_ips, node_ips={"172.18.0.2", "203.0.113.7"})
    assert p.interfaces == ("cali3", "eth0", "flannel.1", "veth1", "veth2")
    assert p.underlay == ("eth0",) and p.overlay == (Encapsulation(17, 8472),)
    # The Node object's addresses are the node's even when no interface holds them (a cloud's NAT).
    assert p.own == {"172.18.0.2", "fd00:172:18::2", "10.244.1.1", "10.244.1.0", "203.0.113.7"}
    assert p.missing(pod_ips) and not p.missing(pod_ips[:3])
    assert plan(LINKS, ADDRESSES, PEERS, pod_ips, {"172.18.0.2"}, uplinks=["bond0"]).underlay == ("bond0",)
