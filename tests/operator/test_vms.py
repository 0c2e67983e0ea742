"""KubeVirt VMs resolve to Groups of their own, pure: a virt-launcher pod, through its
VirtualMachineInstance, to its VirtualMachine; the same Group through a live migration.

A Resolver fed as the operator's watches feed it (pods, VMIs), a Topology, batches as agents send them.
"""

from __future__ import annotations

import time
from typing import Any

from flowmap_api import report_pb2 as pb
from flowmap_cli.drawing import to_dot
from flowmap_cli.mapping import build, group_node
from flowmap_operator.exporting import Inventory, network_policies
from flowmap_operator.resolution import RUNTIME_LABELS, Peer, Resolver, peer_kind, shown_kind, workload_of
from flowmap_operator.status import group_body, group_status, read_group
from flowmap_operator.topology import Topology
from tests.operator.harness import edge

NOW = time.time()
SOURCE, TARGET, CLIENT, SCRATCH = "10.244.1.50", "10.244.2.60", "10.244.1.10", "10.244.1.51"


def vmi(name: str, *, vm: str = "", namespace: str = "vms") -> dict[str, Any]:
    meta: dict[str, Any] = {"namespace": namespace, "name": name, "uid": f"uid-{name}"}
    if vm:
        meta["ownerReferences"] = [{"apiVersion": "kubevirt.io/v1", "kind": "VirtualMachine", "name": vm,
                                    "controller": True, "blockOwnerDeletion": True, "uid": f"uid-vm-{vm}"}]
    return {"apiVersion": "kubevirt.io/v1", "kind": "VirtualMachineInstance", "metadata": meta}


def launcher(name: str, of: str, ip: str, node: str, *, namespace: str = "vms", created: str = "",
             labels: dict[str, str] | None = None, phase: str = "Running") -> dict[str, Any]:
    """A virt-launcher pod as KubeVirt makes it: owned by its VMI, with the VMI's labels and its own."""
    meta: dict[str, Any] = {
        "namespace": namespace, "name": name,
        "labels": {"kubevirt.io": "virt-launcher", "kubevirt.io/created-by": f"uid-{of}", "vm.kubevirt.io/name": of,
                   **(labels or {})},
        "ownerReferences": [{"apiVersion": "kubevirt.io/v1", "kind": "VirtualMachineInstance", "name": of,
                             "controller": True, "blockOwnerDeletion": True, "uid": f"uid-{of}"}]}
    if created:
        meta["creationTimestamp"] = created
    return {"metadata": meta, "spec": {"nodeName": node}, "status": {"phase": phase, "podIP": ip}}


def client_pod() -> dict[str, Any]:
    return {"metadata": {"namespace": "vms", "name": "web-5f6c8-x", "labels": {"pod-template-hash": "5f6c8",
                                                                              "app": "web"},
                         "ownerReferences": [{"kind": "ReplicaSet", "name": "web-5f6c8", "controller": True}]},
            "spec": {"nodeName": "node-a"}, "status": {"phase": "Running", "podIP": CLIENT}}


def resolver() -> Resolver:
    """Agents on node-a and node-b (they report their pods' traffic) and a web client on node-a."""
    r = Resolver()
    for node, ip in (("node-a", "172.18.0.2"), ("node-b", "172.18.0.3")):
        r.pod_seen({"metadata": {"namespace": "flowmap-system", "name": f"agent-{node}",
                                 "labels": {"app.kubernetes.io/name": "flowmap-agent"}},
                    "spec": {"nodeName": node, "hostNetwork": True}, "status": {"phase": "Running", "podIP": ip}},
                   NOW - 1000)
    r.pod_seen(client_pod(), NOW - 1000)
    return r


def batch(seq: int, *edges: pb.EdgeDelta) -> pb.ReportBatch:
    return pb.ReportBatch(agent_id="agent-a", node="node-a", sequence=seq, previous=seq - 1, edges=list(edges),
                          sent_unix_ms=int(NOW * 1000))


def test_a_launcher_pod_is_its_vms_workload() -> None:
    pod = launcher("virt-launcher-db-abcde", "db", SOURCE, "node-a")
    assert workload_of(pod, {}, {("vms", "db"): "db"}) == ("VirtualMachine", "db")
    assert workload_of(pod, {}, {}) == ("VirtualMachineInstance", "db")  # no VM owner known: the VMI
    assert workload_of(pod, {}, {("other", "db"): "db"}) == ("VirtualMachineInstance", "db")  # per namespace


def test_the_group_is_the_vm_whether_its_vmi_comes_before_or_after_the_pod() -> None:
    for order in ("vmi first", "pod first"):
        r = Resolver()
        if order == "vmi first":
            r.vmi_seen(vmi("db", vm="db"))
        r.pod_seen(launcher("virt-launcher-db-abcde", "db", SOURCE, "node-a"), NOW)
        if order == "pod first":
            before = r.version
            r.vmi_seen(vmi("db", vm="db"))
            assert r.version > before  # what is compiled from the old answer is stale
        peer = r.resolve(SOURCE, NOW, NOW)
        assert (peer.group, peer.kind, peer.workload_kind, peer.workload, peer.member, peer.node) == (
            "vms.db", "Workload", "VirtualMachine", "db", "virt-launcher-db-abcde", "node-a"), order
        assert r.members("vms.db", 32) == ([{"name": "virt-launcher-db-abcde", "ips": [SOURCE], "node": "node-a"}], 1)


def test_a_vmi_without_a_vm_is_its_own_group() -> None:
    r = Resolver()
    r.vmi_seen(vmi("scratch"))
    r.pod_seen(launcher("virt-launcher-scratch-q1w2e", "scratch", SOURCE, "node-a"), NOW)
    peer = r.resolve(SOURCE, NOW, NOW)
    assert (peer.group, peer.workload_kind, peer.workload) == ("vms.scratch", "VirtualMachineInstance", "scratch")
    assert shown_kind(peer) == "VM"


def test_a_live_migration_keeps_the_group_and_the_connection_counts_both_pods() -> None:
    r = resolver()
    r.vmi_seen(vmi("db", vm="db"))
    r.pod_seen(launcher("virt-launcher-db-abcde", "db", SOURCE, "node-a"), NOW - 100)
    topo = Topology(r, max_connections=100, max_ports=20)
    topo.ingest(batch(1, edge(CLIENT, 40000, SOURCE, 5432, apps=("postgresql",), bytes_c2s=100, bytes_s2c=1000,
                              when=NOW - 50)), NOW - 50)
    # The migration: a target pod on node-b with another address, then the source pod ends.
    target = launcher("virt-launcher-db-zxcvb", "db", TARGET, "node-b",
                      labels={"kubevirt.io/migrationJobUID": "m-1", "kubevirt.io/nodeName": "node-a"})
    r.pod_seen(target, NOW - 40)
    assert r.members("vms.db", 32)[1] == 2  # both, while the memory is copied
    r.pod_seen(launcher("virt-launcher-db-abcde", "db", SOURCE, "node-a", phase="Succeeded"), NOW - 30)
    topo.ingest(batch(2, edge(CLIENT, 40001, TARGET, 5432, apps=("postgresql",), bytes_c2s=200, bytes_s2c=2000,
                              when=NOW - 20)), NOW - 20)
    assert r.members("vms.db", 32) == ([{"name": "virt-launcher-db-zxcvb", "ips": [TARGET], "node": "node-b"}], 1)
    key = ("vms.web", "vms.db", 5432, "TCP")
    assert set(topo.edges) == {key}
    counters = topo.ledger.edges[key].applied()
    assert (counters.bytes_c2s, counters.bytes_s2c, counters.sessions) == (300, 3000, 2)
    group = topo.groups["vms.db"]
    assert (group.peer.workload_kind, group.peer.workload) == ("VirtualMachine", "db")
    # The old address, reported late, is still the VM's (the grace period).
    assert r.resolve(SOURCE, NOW - 35, NOW).group == "vms.db"


def test_the_group_says_vm_in_its_kind_and_reads_back_as_a_workload() -> None:
    r = resolver()
    r.vmi_seen(vmi("db", vm="db"))
    r.pod_seen(launcher("virt-launcher-db-abcde", "db", SOURCE, "node-a"), NOW)
    topo = Topology(r, max_connections=100, max_ports=20)
    topo.ingest(batch(1, edge(SOURCE, 40000, "93.184.216.34", 443, when=NOW)), NOW)
    group = topo.groups["vms.db"]
    status, _ = group_status(topo, group, NOW)
    assert (status["kind"], status["workload"], status["memberCount"]) == (
        "VM", {"kind": "VirtualMachine", "name": "db"}, 1)
    assert group_body(group.peer)["metadata"]["labels"] == {"flowmap.dev/kind": "vm", "flowmap.dev/namespace": "vms"}
    read = read_group({"metadata": {"name": "vms.db", "resourceVersion": "1"}, "status": status})
    assert read.peer == Peer("vms.db", "Workload", "vms", "VirtualMachine", "db")
    # Another kind named VM (not KubeVirt's) is not taken for a workload.
    assert peer_kind("VM", "Domain") == "VM" and peer_kind("Workload", "Deployment") == "Workload"


def test_a_restarted_operator_keeps_a_migrated_pods_address_from_the_groups_members() -> None:
    r = Resolver()
    r.group_members_seen({"metadata": {"name": "vms.db"}, "status": {
        "kind": "VM", "namespace": "vms", "workload": {"kind": "VirtualMachine", "name": "db"},
        "members": [{"name": "virt-launcher-db-abcde", "ips": [SOURCE], "node": "node-a"}]}}, NOW)
    peer = r.resolve(SOURCE, NOW - 1, NOW)
    assert (peer.group, peer.kind, peer.workload_kind) == ("vms.db", "Workload", "VirtualMachine")


def test_vmis_listed_again_forget_the_deleted_and_uninstalled_kubevirt_forgets_all() -> None:
    r = Resolver()
    r.vmis_listed([vmi("db", vm="db"), vmi("cache", vm="cache")])
    r.vmis_listed([vmi("db", vm="db")])  # cache deleted while the watch was down
    assert workload_of(launcher("p", "cache", SOURCE, "node-a"), {}, r._vms) == ("VirtualMachineInstance", "cache")
    assert workload_of(launcher("p", "db", SOURCE, "node-a"), {}, r._vms) == ("VirtualMachine", "db")
    r.vmis_forgotten()
    assert r._vms == {}


def test_kubevirts_runtime_labels_stay_out_of_the_exported_network_policy() -> None:
    source = launcher("virt-launcher-db-abcde", "db", SOURCE, "node-a", labels={"app": "db"})
    target = launcher("virt-launcher-db-zxcvb", "db", TARGET, "node-b",
                      labels={"app": "db", "kubevirt.io/migrationJobUID": "m-1", "kubevirt.io/nodeName": "node-a",
                              "kubevirt.io/migrationTargetNodeName": "node-b"})
    assert {"kubevirt.io/created-by", "kubevirt.io/nodeName", "kubevirt.io/migrationTargetNodeName",
            "kubevirt.io/migrationJobUID"} <= RUNTIME_LABELS
    inventory = Inventory.build([source, target, client_pod()], [], [])
    assert inventory.workloads["vms.db"].labels == {"kubevirt.io": "virt-launcher", "vm.kubevirt.io/name": "db",
                                                    "app": "db"}
    connection = {"spec": {"client": "vms.web", "server": "vms.db", "port": 5432, "protocol": "TCP"},
                  "status": {"action": "Learned", "app": "postgresql"}}
    docs, warnings = network_policies("vms", inventory, [connection], [])
    db = next(d for d in docs if d["metadata"]["name"] == "flowmap-db")
    assert warnings == []
    assert db["spec"]["podSelector"] == {"matchLabels": {"app": "db", "kubevirt.io": "virt-launcher",
                                                         "vm.kubevirt.io/name": "db"}}
    assert db["spec"]["ingress"] == [{"from": [{"podSelector": {"matchLabels": {"app": "web"}}}],
                                      "ports": [{"protocol": "TCP", "port": 5432}]}]


def test_the_graph_draws_a_vm_with_its_own_shape() -> None:
    vm = group_node({"metadata": {"name": "vms.db"}, "status": {
        "kind": "VM", "namespace": "vms", "workload": {"kind": "VirtualMachine", "name": "db"}, "memberCount": 1}})
    web = group_node({"metadata": {"name": "vms.web"}, "status": {
        "kind": "Workload", "namespace": "vms", "workload": {"kind": "Deployment", "name": "web"}, "memberCount": 2}})
    assert (vm.kind, vm.detail) == ("VM", "VirtualMachine · 1 pod")
    dot = to_dot(build([vm, web], []))
    line = next(x for x in dot.splitlines() if x.strip().startswith('"vms.db" ['))
    assert "shape=component" in line and 'fillcolor="#eef6fb"' in line
    assert "shape=box," in next(x for x in dot.splitlines() if x.strip().startswith('"vms.web" ['))


def test_a_vmi_seen_after_both_pods_of_a_migration_renames_both_and_forgets_gone_pods() -> None:
    r = Resolver()
    r.pod_seen(launcher("virt-launcher-db-abcde", "db", SOURCE, "node-a"), NOW)
    r.pod_seen(launcher("virt-launcher-db-zxcvb", "db", TARGET, "node-b"), NOW)
    r.pod_seen(launcher("virt-launcher-other-q1w2e", "other", SCRATCH, "node-a"), NOW)
    r.vmi_seen(vmi("db", vm="db"))
    assert [(p.workload_kind, p.member) for p in (r.resolve(ip, NOW, NOW) for ip in (SOURCE, TARGET, SCRATCH))] == [
        ("VirtualMachine", "virt-launcher-db-abcde"), ("VirtualMachine", "virt-launcher-db-zxcvb"),
        ("VirtualMachineInstance", "virt-launcher-other-q1w2e")]
    r.pod_gone("vms", "virt-launcher-db-abcde", NOW)
    r.pod_gone("vms", "virt-launcher-db-zxcvb", NOW)
    assert ("vms", "db") not in r._launchers and ("vms", "virt-launcher-db-abcde") not in r._launcher_of
