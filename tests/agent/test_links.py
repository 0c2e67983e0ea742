"""The node's plumbing read over netlink (flowmap_agent.links), in throwaway namespaces shaped
like the two kinds of CNI: pods on a bridge with no route of their own and a VXLAN overlay
(flannel), and pods with a host route each (ptp, Calico, kindnet)."""

from __future__ import annotations

from flowmap_agent import links, plumbing
from flowmap_devenv.netns import Lab
from flowmap_dp.capture import Encapsulation

NODE_IP, NODE_IP6 = "172.18.0.2", "fd00:172:18::2"


def bridged_pod(lab: Lab, node: str, bridge: str, ips: list[str]) -> tuple[str, str]:
    """A pod as the CNI bridge plugin wires it: a veth port of the bridge, no route of its own."""
    pod = lab.ns("fmpod")
    host_side, _ = lab.veth(node, [], pod, ips)
    lab.exec(node, "ip", "link", "set", host_side, "master", bridge)
    return pod, host_side


def test_pods_addresses_and_tunnels_of_both_cni_shapes(privileged: None) -> None:
    lab = Lab()
    try:
        node, router = lab.ns("fmnode"), lab.ns("fmrtr")
        uplink, _ = lab.veth(node, [f"{NODE_IP}/24", "172.18.9.2/24", f"{NODE_IP6}/64"], router, ["172.18.0.1/24"])
        # flannel's shape: cni0 with the pods' gateway, flannel.1 (VXLAN) with the node's .0.
        lab.exec(node, "ip", "link", "add", "cni0", "type", "bridge")
        lab.exec(node, "ip", "addr", "add", "10.244.1.1/24", "dev", "cni0")
        lab.exec(node, "ip", "link", "set", "cni0", "up")
        lab.exec(node, "ip", "link", "add", "flannel.1", "type", "vxlan", "id", "1", "local", NODE_IP, "dev", uplink,
                 "dstport", "8472", "nolearning")
        lab.exec(node, "ip", "addr", "add", "10.244.1.0/32", "dev", "flannel.1")
        lab.exec(node, "ip", "link", "set", "flannel.1", "up")
        lab.exec(node, "ip", "link", "add", "vx-default", "type", "vxlan", "id", "2", "dev", uplink, "dstport", "0")
        lab.exec(node, "ip", "link", "set", "vx-default", "up")
        lab.exec(node, "ip", "link", "add", "vx-down", "type", "vxlan", "id", "3", "dev", uplink, "dstport", "4789")
        # kube-proxy's IPVS dummy holds every ClusterIP and is down (no dummy module here: a bridge).
        lab.exec(node, "ip", "link", "add", "kube-ipvs0", "type", "bridge")
        lab.exec(node, "ip", "addr", "add", "10.96.0.1/32", "dev", "kube-ipvs0")
        _, web = bridged_pod(lab, node, "cni0", ["10.244.1.10/24", "fd00:10:244:1::a/64"])
        _, cache = bridged_pod(lab, node, "cni0", ["10.244.1.11/24"])
        # The routed shape, next to it: a /32 host route per pod (Lab.pod, as Calico does).
        _, routed = lab.pod(node, ["10.244.1.20"])
        assert "10.244.1.10" not in lab.exec(node, "ip", "route")  # no route leads to a bridged pod

        reader = links.Reader(node)
        view = reader.read()
        pod_ips = ["10.244.1.10", "fd00:10:244:1::a", "10.244.1.11", "10.244.1.20"]
        plan = plumbing.plan(view.links, view.addresses, view.peers, pod_ips, {NODE_IP, NODE_IP6})
        assert plan.pods == {"10.244.1.10": web, "fd00:10:244:1::a": web, "10.244.1.11": cache, "10.244.1.20": routed}
        assert "inet6 fe80:" in lab.exec(node, "ip", "addr", "show", uplink)  # link-local: not the node's
        assert plan.own == {NODE_IP, "172.18.9.2", NODE_IP6, "10.244.1.1", "10.244.1.0"}
        assert plan.underlay == (uplink,)
        assert plan.interfaces == tuple(sorted([web, cache, routed, uplink, "flannel.1", "vx-default"]))
        assert plumbing.tunnels(view.links) == {"flannel.1": (Encapsulation(17, 8472),),
                                                "vx-default": (Encapsulation(17, 8472),)}

        # A pod whose veth exists before its address (the CNI at work) is found once it has one;
        # a pod that is gone leaves nothing behind.
        late = lab.ns("fmpod")
        late_side, late_peer = lab.veth(node, [], late, [])
        lab.exec(node, "ip", "link", "set", late_side, "master", "cni0")
        view = reader.read(missing=True, now=1.0)
        assert plumbing.pod_interfaces(view.links, view.peers, ["10.244.1.12"]) == {}
        lab.exec(late, "ip", "addr", "add", "10.244.1.12/24", "dev", late_peer)
        lab.exec(node, "ip", "link", "del", cache)
        view = reader.read(missing=True, now=2.0)
        assert plumbing.pod_interfaces(view.links, view.peers, pod_ips + ["10.244.1.12"]) == {
            "10.244.1.10": web, "fd00:10:244:1::a": web, "10.244.1.20": routed, "10.244.1.12": late_side}
        # Remembered: web's, routed's and late's peers, and the uplink's (the router); cache's is forgotten.
        assert sorted(map(sorted, (seen.addresses for seen in reader.peers.values()))) == [
            ["10.244.1.10", "fd00:10:244:1::a"], ["10.244.1.12"], ["10.244.1.20"], ["172.18.0.1"]]
    finally:
        lab.close()


def test_the_neighbour_table_by_mac_is_what_the_node_resolved(privileged: None) -> None:
    lab = Lab()
    try:
        node, vm = lab.ns("fmnode"), lab.ns("fmpod")
        tap, nic = lab.veth(node, ["10.77.1.1/30", "2001:db8:77::1/64"], vm, ["10.77.1.2/30", "2001:db8:77::2/64"])
        mac = lab.exec(vm, "cat", f"/sys/class/net/{nic}/address").strip()
        lab.exec(node, "ping", "-c", "1", "-W", "2", "10.77.1.2")  # the node resolves the VM's address
        lab.exec(node, "ip", "neigh", "add", "10.77.1.3", "dev", tap, "nud", "failed")  # never resolved
        lab.exec(node, "ip", "neigh", "add", "2001:db8:77::9", "lladdr", "52:54:00:77:00:09", "dev", tap,
                 "nud", "stale")  # aged, still the MAC's
        found = links.Reader(node).neighbours()
        assert "10.77.1.2" in found[mac.lower()]
        assert found["52:54:00:77:00:09"] == ["2001:db8:77::9"]
        assert not any("10.77.1.3" in ips for ips in found.values())
    finally:
        lab.close()
