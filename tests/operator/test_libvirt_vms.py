"""libvirt VMs on a node resolve to Groups of their own, pure: what an agent says of its node's VMs
(``ReportBatch.vms``) names their addresses, as a pod's status names a pod's.

A Resolver fed as the operator's watches feed it, a Topology, batches as agents send them.
"""

from __future__ import annotations

import time

from flowmap_api import report_pb2 as pb
from flowmap_cli.drawing import to_dot
from flowmap_cli.mapping import build, group_node
from flowmap_operator.exporting import Inventory, learning_policies, network_policies
from flowmap_operator.naming import object_name
from flowmap_operator.policy.compiling import Compiler
from flowmap_operator.policy.modes import Modes
from flowmap_operator.resolution import LIBVIRT, Resolver, shown_kind
from flowmap_operator.status import group_status
from flowmap_operator.topology import Topology
from tests.operator.harness import edge
from tests.operator.test_vms import CLIENT, client_pod, resolver

NOW = time.time()
VM_IP, OTHER_IP = "10.77.1.2", "10.77.2.2"
UUID = "0d5c8e1a-2f0b-4c1b-9a57-7e0f4e3b1c2d"


def batch(seq: int, *edges: pb.EdgeDelta, vms: tuple[pb.LocalVm, ...] = (), followed: bool = True,
          node: str = "node-a", sent: float = NOW) -> pb.ReportBatch:
    return pb.ReportBatch(agent_id=f"agent-{node}", node=node, sequence=seq, previous=max(seq - 1, 0),
                          edges=list(edges), sent_unix_ms=int(sent * 1000), vms_followed=followed, vms=list(vms))


def vm(name: str, *ips: str, label: str = "", n: int = 1) -> pb.LocalVm:
    return pb.LocalVm(uuid=f"00000000-0000-0000-0000-{n:012x}", name=name, label=label, addresses=list(ips))


def test_a_vm_is_named_after_its_node_and_domain_or_its_label() -> None:
    r = Resolver()
    r.vms_seen("node-a", [("db 1", "", [VM_IP]), ("web-1", "web", [OTHER_IP])], NOW, NOW)
    r.vms_seen("node-b", [("web-2", "web", ["10.78.1.2"])], NOW, NOW)
    db = r.resolve(VM_IP, NOW, NOW)
    assert (db.group, db.kind, db.namespace, db.workload_kind, db.workload, db.member, db.node) == (
        object_name("libvirt.node-a.db 1"), "Workload", "libvirt", LIBVIRT, "node-a.db 1", "node-a/db 1", "node-a")
    assert shown_kind(db) == "VM"
    # VMs sharing a label are one Group, wherever they run, as a workload's pods are
    assert r.resolve(OTHER_IP, NOW, NOW).group == r.resolve("10.78.1.2", NOW, NOW).group == "libvirt.web"
    assert r.members("libvirt.web", 32) == ([{"name": "node-a/web-1", "ips": [OTHER_IP], "node": "node-a"},
                                             {"name": "node-b/web-2", "ips": ["10.78.1.2"], "node": "node-b"}], 2)


def test_the_vm_namespace_is_the_operators_setting() -> None:
    r = Resolver(vm_namespace="hypervisors")
    r.vms_seen("node-a", [("db", "", [VM_IP])], NOW, NOW)
    assert r.resolve(VM_IP, NOW, NOW).group == "hypervisors.node-a.db"
    assert r.workloads("hypervisors") == {"hypervisors.node-a.db": {}}  # NetworkLearningPolicies there select it


def test_a_vm_gone_from_the_list_keeps_its_address_for_the_grace_period_and_an_older_list_changes_nothing() -> None:
    r = Resolver(grace=300)
    r.vms_seen("node-a", [("db", "", [VM_IP])], NOW - 100, NOW - 100)
    version = r.version
    r.vms_seen("node-a", [("db", "", [VM_IP])], NOW - 90, NOW - 90)
    assert r.version == version  # the same list: nothing compiled from it is stale
    r.vms_seen("node-a", [], NOW - 50, NOW - 50)  # destroyed
    assert r.members("libvirt.node-a.db", 32)[1] == 0
    assert r.resolve(VM_IP, NOW - 60, NOW).group == "libvirt.node-a.db"  # a late delta from before
    r.vms_seen("node-a", [("db", "", [VM_IP])], NOW - 95, NOW)  # a resent batch from before the destroy
    assert r.members("libvirt.node-a.db", 32)[1] == 0
    r.vms_seen("node-a", [("db", "", [VM_IP])], NOW, NOW)  # started again
    r.node_gone("node-a", NOW + 1)  # the node's VMs go with it
    assert r.members("libvirt.node-a.db", 32)[1] == 0


def test_an_agent_that_does_not_follow_libvirt_says_nothing_of_vms() -> None:
    r = resolver()
    topo = Topology(r, max_connections=100, max_ports=20)
    topo.ingest(batch(1, vms=(vm("db", VM_IP),)), NOW)
    topo.ingest(batch(2, followed=False), NOW)
    assert r.resolve(VM_IP, NOW, NOW).group == "libvirt.node-a.db"
    topo.ingest(batch(3), NOW)  # follows libvirt, and no VM runs
    assert r.members("libvirt.node-a.db", 32)[1] == 0


def test_a_pod_talking_to_a_vm_on_its_node_is_a_connection_between_their_groups_counted_by_the_node() -> None:
    r = resolver()
    topo = Topology(r, max_connections=100, max_ports=20)
    # the VM's end is local on node-a (captured on its tap), named by the batch's own list
    delta = edge(CLIENT, 40000, VM_IP, 80, bytes_c2s=100, bytes_s2c=1000, when=NOW)
    delta.server.local = True
    got = topo.ingest(batch(1, delta, vms=(vm("db", VM_IP, label="legacy-db"),)), NOW)
    assert (got.counted, got.external, got.other_observer) == (1, 0, 0)
    key = ("vms.web", "libvirt.legacy-db", 80, "TCP")
    assert set(topo.edges) == {key}
    counters = topo.ledger.edges[key].applied()
    assert (counters.bytes_c2s, counters.bytes_s2c) == (100, 1000)
    status, _ = group_status(topo, topo.groups["libvirt.legacy-db"], NOW)
    assert (status["kind"], status["namespace"], status["workload"], status["members"]) == (
        "VM", "libvirt", {"kind": LIBVIRT, "name": "legacy-db"},
        [{"name": "node-a/db", "ips": [VM_IP], "node": "node-a"}])


def test_protect_on_a_vm_is_enforced_by_its_node_on_its_addresses() -> None:
    r = resolver()
    r.vms_seen("node-a", [("db", "legacy-db", [VM_IP])], NOW, NOW)
    modes = Modes(r)
    modes.seen({"metadata": {"namespace": "libvirt", "name": "db", "generation": 1},
                "spec": {"mode": "Protect", "groups": ["libvirt.legacy-db"],
                         "rules": [{"direction": "Ingress", "peer": {"group": "vms.web"},
                                    "ports": [{"port": 80, "protocol": "TCP"}]}]}}, True)
    modes.refresh()
    assert modes.enforced("libvirt.legacy-db")
    policy = Compiler(modes).node("node-a", NOW)
    (db,) = policy.pods
    assert (db.pod, list(db.ips)) == ("libvirt/node-a/db", [VM_IP])
    assert [(list(p.cidrs), p.protocol, list(p.ports)) for p in db.ingress] == [([f"{CLIENT}/32"], pb.TCP, [80])]
    assert Compiler(modes).node("node-b", NOW).pods == []  # only its own node enforces it


def test_export_makes_a_learning_policy_for_a_vm_and_no_network_policy_and_says_why() -> None:
    vm_group = {"metadata": {"name": "libvirt.legacy-db"}, "status": {
        "kind": "VM", "namespace": "libvirt", "workload": {"kind": LIBVIRT, "name": "legacy-db"},
        "members": [{"name": "node-a/db", "ips": [VM_IP], "node": "node-a"}]}}
    inventory = Inventory.build([client_pod()], [], [vm_group])
    learned = [{"spec": {"client": "vms.web", "server": "libvirt.legacy-db", "port": 80, "protocol": "TCP"},
                "status": {"action": "Learned", "app": "http"}}]
    (nlp,) = learning_policies("libvirt", "Protect", inventory, learned, [])
    assert nlp["metadata"] == {"name": "legacy-db", "namespace": "libvirt"}
    assert nlp["spec"] == {"mode": "Protect", "groups": ["libvirt.legacy-db"], "rules": [
        {"direction": "Ingress", "peer": {"group": "vms.web"}, "ports": [{"port": 80, "protocol": "TCP"}],
         "app": "http"}]}
    docs, warnings = network_policies("libvirt", inventory, learned, [])
    assert docs == [] and warnings == ["libvirt.legacy-db: a libvirt VM; a NetworkPolicy selects pods only: no "
                                       "NetworkPolicy for it (export it with --format nlp: its node enforces a "
                                       "NetworkLearningPolicy)"]
    # the web pod's NetworkPolicy allows the VM by its addresses, and says so
    (web,), warnings = network_policies("vms", inventory, learned, [])
    assert web["spec"]["egress"][1] == {"to": [{"ipBlock": {"cidr": f"{VM_IP}/32"}}],
                                        "ports": [{"protocol": "TCP", "port": 80}]}
    assert warnings == [f"libvirt.legacy-db: a libvirt VM is no pod; its addresses as its Group last listed them "
                        f"({VM_IP}) are allowed instead"]


def test_the_graph_draws_libvirt_vms_as_vms() -> None:
    vm = group_node({"metadata": {"name": "libvirt.legacy-db"}, "status": {
        "kind": "VM", "namespace": "libvirt", "workload": {"kind": LIBVIRT, "name": "legacy-db"}, "memberCount": 2}})
    assert (vm.kind, vm.detail) == ("VM", "LibvirtDomain · 2 VMs")
    line = next(x for x in to_dot(build([vm], [])).splitlines() if x.strip().startswith('"libvirt.legacy-db" ['))
    assert "shape=component" in line
