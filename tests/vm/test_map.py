"""A real libvirt VM in the map, end to end: on node-a of the simulated cluster (flowmap_devenv.
simcluster), a real libvirtd boots the test VM on a routed tap; node-a's agent follows libvirt,
its dp captures on the tap. The VM calls a pod on the other node (HTTP) and the cluster's DNS, a
pod calls the VM; the Connections between the VM's Group and the pods' carry exactly what node-a's
kernel forwarded. Then what the VM did, exported with ``flowmap export`` and applied in Protect:
the pod it learned still gets through, another pod is reset at its first SYN; and a packet
capture of the VM's Group holds what crossed its tap.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from flowmap_devenv.controlplane import REPO
from flowmap_dp.capturing import file_name
from flowmap_dp.classify import classify_file
from flowmap_devenv.simcluster import API, DNS, NODES, WEB, WORKER, SimCluster
from flowmap_operator.naming import connection_name
from tests.conftest import need
from tests.e2e.shop import shop_cluster
from tests.e2e.test_protect import probe, rule_packets
from tests.vm.harness import Node, libvirt_ready

ROUNDS = 5
GROUP = "libvirt.legacy-db"  # the operator's VM namespace, and the label in the domain's metadata
# name -> (client group, server group, port, protocol, the kernel's match each way)
EDGES: dict[str, tuple[str, str, int, str]] = {
    "web-vm": ("shop.web", GROUP, 80, "TCP"),
    "vm-api": (GROUP, "shop.api", 8080, "TCP"),
    "vm-dns": (GROUP, "kube-system.coredns", 53, "UDP"),
}


@pytest.fixture
def hypervisor(tmp_path: Path) -> Iterator[tuple[SimCluster, Node]]:
    """The simulated cluster, with a private libvirtd in node-a's namespace; afterwards nothing of it is left."""
    need(not (missing := libvirt_ready()), missing)
    with shop_cluster() as sim:
        node = Node(tmp_path / "hypervisor")
        try:
            node.open(sim.ns["node-a"])
            yield sim, node
        finally:
            left = node.close()
        assert not left, f"left behind: {left}"


def wait_for(check: Callable[[], Any], what: str, timeout: float = 60.0) -> Any:
    end = time.monotonic() + timeout
    while not (value := check()):
        assert time.monotonic() < end, f"timed out waiting for {what}"
        time.sleep(0.2)
    return value


def connections(sim: SimCluster) -> dict[str, dict[str, Any]]:
    items = json.loads(sim.plane.kubectl("get", "connections", "-o", "json").stdout)["items"]
    return {c["metadata"]["name"]: c for c in items}


def test_a_libvirt_vm_talks_to_pods_as_a_group_of_its_own_counted_exactly_and_protected(
        hypervisor: tuple[SimCluster, Node]) -> None:
    sim, node = hypervisor
    assert node.daemon is not None
    node_a = NODES[0]
    vm = node.boot(node.domain("legacy-db", label="legacy-db", dns=DNS.ip)).domain
    # The VM's network is routed, as a pod CIDR is, and not masqueraded (an ip-masq-agent's
    # nonMasqueradeCIDRs would list it).
    sim.lab.exec(sim.ns["router"], "ip", "route", "add", "10.77.0.0/16", "via", node_a.ip)
    for n in NODES:
        sim.lab.exec(sim.ns[n.name], "nft", "insert", "rule", "ip", "pod-egress", "postrouting", "ip", "daddr",
                     "10.77.0.0/16", "accept")
    interfaces = sim.agent_metrics("node-a")["flowmap_agent_dp_interfaces"]
    sim.restart_agent("node-a", FLOWMAP_AGENT_LIBVIRT_URI=node.daemon.uri, FLOWMAP_AGENT_LIBVIRT_RESYNC="2")
    wait_for(lambda: sim.agent_metrics("node-a").get("flowmap_agent_dp_interfaces", 0) == interfaces + 1,
             "node-a's dp captures on the VM's tap")
    assert sim.agent_metrics("node-a")["flowmap_agent_libvirt_vms"] == 1

    # The kernel's count, where node-a forwards (ahead of everything else).
    vm_ip, web, api, dns = vm.vm_ip, WEB.ip, API.ip, DNS.ip
    sim.count("node-a", {
        "web-vm-c2s": f"ip saddr {web} ip daddr {vm_ip} tcp dport 80",
        "web-vm-s2c": f"ip saddr {vm_ip} ip daddr {web} tcp sport 80",
        "vm-api-c2s": f"ip saddr {vm_ip} ip daddr {api} tcp dport 8080",
        "vm-api-s2c": f"ip saddr {api} ip daddr {vm_ip} tcp sport 8080",
        "vm-dns-c2s": f"ip saddr {vm_ip} ip daddr {dns} udp dport 53",
        "vm-dns-s2c": f"ip saddr {dns} ip daddr {vm_ip} udp sport 53",
    })
    # node-a reaches the VM first (its ARP makes the VM's address known by its MAC), then the VM
    # is known to the operator as a Group of kind VM.
    assert "legacy-db" in node.http(f"http://{vm_ip}/")
    group = wait_for(lambda: json.loads(sim.plane.kubectl("get", "fg", GROUP, "-o", "json", check=False).stdout
                                        or "{}").get("status", {}).get("members"), "the VM's Group", 30)
    assert group == [{"name": "node-a/legacy-db", "ips": [vm_ip], "node": "node-a"}]
    status = json.loads(sim.plane.kubectl("get", "fg", GROUP, "-o", "json").stdout)["status"]
    assert (status["kind"], status["namespace"], status["workload"]) == (
        "VM", "libvirt", {"kind": "LibvirtDomain", "name": "legacy-db"})

    for _ in range(ROUNDS):
        page = sim.lab.exec(sim.ns[WEB.name], sys.executable, "-c", (
            "import urllib.request, sys\n"
            f"print(urllib.request.urlopen('http://{vm_ip}/', timeout=10).read().decode())"))
        assert "legacy-db" in page
        assert "espresso" in node.http(f"http://{vm_ip}/cgi-bin/fetch?http://{api}:8080/items", timeout=30)
        assert "Address" in node.http(f"http://{vm_ip}/cgi-bin/lookup?api.shop.svc.cluster.local.", timeout=30)
    truth = sim.truth("node-a")
    want = {name: (truth[f"{name}-c2s"], truth[f"{name}-s2c"]) for name in EDGES}
    assert all(c2s and s2c for c2s, s2c in want.values()), want

    def counted() -> dict[str, tuple[int, int]]:
        got = connections(sim)
        return {name: tuple(got.get(connection_name(*e), {}).get("status", {}).get("bytes", {}).get(way, 0)
                            for way in ("clientToServer", "serverToClient"))  # type: ignore[misc]
                for name, e in EDGES.items()}

    end = time.monotonic() + 60
    while (now := counted()) != want:
        assert time.monotonic() < end, f"the VM's Connections do not match the kernel's counters:\nwant {want}\ngot  {now}"
        time.sleep(0.5)
    got = connections(sim)
    assert got[connection_name(*EDGES["web-vm"])]["status"]["sessions"]["total"] == ROUNDS
    assert got[connection_name(*EDGES["vm-api"])]["status"]["applications"] == ["http"]
    print(f"\nthe VM's Connections: {want} (bytes each way), exactly node-a's kernel's")

    # What the VM was seen doing, exported for git and applied in Protect: web may call it on port 80,
    # nothing else that it did not see may. A NetworkPolicy cannot select a VM, and says so.
    done = subprocess.run([sys.executable, "-m", "flowmap_cli", "export", "-n", "libvirt", "--mode", "Protect"],
                          capture_output=True, text=True, cwd=REPO, timeout=60,
                          env={"KUBECONFIG": str(sim.plane.kubeconfig), "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr
    (policy,) = [d for d in yaml.safe_load_all(done.stdout) if d]
    assert (policy["metadata"], policy["spec"]["groups"]) == ({"name": "legacy-db", "namespace": "libvirt"}, [GROUP])
    rules = {(r["direction"], r["peer"].get("group"), r["ports"][0].get("port")) for r in policy["spec"]["rules"]}
    assert {("Ingress", "shop.web", 80), ("Egress", "shop.api", 8080), ("Egress", "kube-system.coredns", 53)} <= rules
    assert ("Ingress", "shop.worker", 80) not in rules
    refused = subprocess.run([sys.executable, "-m", "flowmap_cli", "export", "-n", "libvirt", "--format",
                              "networkpolicy"], capture_output=True, text=True, cwd=REPO, timeout=60,
                             env={"KUBECONFIG": str(sim.plane.kubeconfig), "PATH": "/usr/bin:/bin"})
    assert f"{GROUP}: a libvirt VM; a NetworkPolicy selects pods only" in refused.stderr
    sim.plane.kubectl("create", "namespace", "libvirt")
    sim.plane.kubectl("apply", "-f", "-", input=json.dumps(policy))

    def protected() -> bool:
        listed = subprocess.run(["ip", "netns", "exec", sim.ns["node-a"], "nft", "list", "set", "inet", "flowmap",
                                 "pods4"], capture_output=True, text=True)  # no table before the first policy
        return vm_ip in listed.stdout

    wait_for(protected, "node-a's table protects the VM's address", 30)
    resets = rule_packets(sim, "node-a", "ingress", "reject")
    assert probe(sim, WEB, "tcp", vm_ip, 80)[0] == "connected"
    outcome, took = probe(sim, WORKER, "tcp", vm_ip, 80)  # from node-b: node-a forwards it to the tap
    assert outcome == "refused", (outcome, took)
    assert rule_packets(sim, "node-a", "ingress", "reject") == resets + 1  # one SYN, no retransmission

    # A packet capture of the VM's Group: its node's dp writes what crosses the VM's tap.
    sim.plane.kubectl("apply", "-f", "-", input=json.dumps({
        "apiVersion": "flowmap.dev/v1alpha1", "kind": "PacketCapture", "metadata": {"name": "vm", "namespace": "libvirt"},
        "spec": {"targets": {"groups": ["legacy-db"]}, "durationSeconds": 4}}))

    def capture() -> dict[str, Any]:
        return dict(json.loads(sim.plane.kubectl("get", "packetcapture", "-n", "libvirt", "vm", "-o", "json").stdout))

    wait_for(lambda: capture().get("status", {}).get("phase") == "Running", "the VM's capture runs", 30)
    assert probe(sim, WEB, "tcp", vm_ip, 80)[0] == "connected"
    done = wait_for(lambda: (c := capture()).get("status", {}).get("phase") == "Completed" and c["status"],
                    "the VM's capture completed", 60)
    (ran,) = done["nodes"]
    path = sim.capture_dir("node-a") / file_name(f"libvirt/vm/{capture()['metadata']['uid']}")
    assert (ran["node"], ran["fileBytes"]) == ("node-a", path.stat().st_size)
    flows = [f for f in classify_file(path) if f["server"] == f"{vm_ip}:80"]
    assert flows and all(f["client"].startswith(f"{WEB.ip}:") and f["packets_c2s"] >= 3 for f in flows), flows
