"""KubeVirt VMs on the real API server: the operator runs without KubeVirt's CRDs, starts watching
VirtualMachineInstances when they are installed, and a virt-launcher pod's traffic lands on the
VirtualMachine's Group, which keeps its name and counters through a (simulated) live migration.

KubeVirt's CRDs are tests/data/kubevirt.io.yaml (trimmed, see its header); the VirtualMachine, the
VMI it owns and the launcher pods are API objects made as KubeVirt's controllers make them (no
kubelet runs them: the pods' addresses are set through the status subresource, as a kubelet would).
Reports go through the real gRPC path, from agents with the agent ServiceAccount's tokens.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from collections.abc import Iterator
from typing import Any

import pytest
from kubernetes_asyncio import client, config

from flowmap_devenv.controlplane import REPO
from flowmap_operator.watching import OptionalWatch
from tests.operator.harness import NS, REDIS, WEB, Agent, Cluster, Operator, apply, create_pods, edge, pod, running
from tests.operator.test_reports import agent, connection, wait_for

CRDS = REPO / "tests" / "data" / "kubevirt.io.yaml"
# Two nodes of this module's, with pod ranges: a launcher pod's address the operator's pod watch has
# not delivered yet is waited for (the agent's batch deferred and sent again), never taken for
# "external" (the harness's nodes have no pod range).
NODES = {"kv-a": ("172.18.0.12", "10.250.1.0/24"), "kv-b": ("172.18.0.13", "10.250.2.0/24")}
SOURCE, TARGET, SCRATCH, LATER = "10.250.1.50", "10.250.2.60", "10.250.1.51", "10.250.1.52"
NOT_SERVED = "virtualmachineinstances.kubevirt.io/v1 is not served"


@pytest.fixture(scope="module")
def operator(cluster: Cluster) -> Iterator[Operator]:
    plane = cluster.plane
    plane.kubectl("delete", "-f", str(CRDS), "--ignore-not-found", "--wait=true")
    apply(plane, *({"apiVersion": "v1", "kind": "Node", "metadata": {"name": name}, "spec": {"podCIDR": cidr,
                                                                                            "podCIDRs": [cidr]},
                    "status": {"addresses": [{"type": "InternalIP", "address": ip}]}}
                   for name, (ip, cidr) in NODES.items()))
    create_pods(plane, *(pod(NS, f"agent-{name}", name, ip, owner=("DaemonSet", "flowmap-agent"), sa="flowmap-agent",
                             labels={"app.kubernetes.io/name": "flowmap-agent"}, host_network=True)
                         for name, (ip, _) in NODES.items()))
    try:
        yield from running(cluster, kubevirt_poll=0.5)
    finally:
        plane.kubectl("delete", "pods", "--all", "-n", "vms", "--force", "--grace-period=0", "--ignore-not-found")
        plane.kubectl("delete", "namespace", "vms", "--ignore-not-found", "--wait=false")
        plane.kubectl("delete", "-f", str(CRDS), "--ignore-not-found", "--wait=true")
        for name in NODES:
            plane.kubectl("delete", "pod", f"agent-{name}", "-n", NS, "--force", "--grace-period=0")
            plane.kubectl("delete", "node", name)


def log(op: Operator) -> str:
    return op.log.read_text(errors="replace")


def launcher(name: str, vmi: dict[str, Any], node: str, ip: str,
             labels: dict[str, str] | None = None) -> dict[str, Any]:
    """A virt-launcher pod as KubeVirt renders it: its VMI's labels and its own, owned by the VMI."""
    meta = vmi["metadata"]
    made = pod("vms", name, node, ip, labels={
        **(meta.get("labels") or {}), "kubevirt.io": "virt-launcher", "kubevirt.io/created-by": meta["uid"],
        "vm.kubevirt.io/name": meta["name"], **(labels or {})})
    made["metadata"]["ownerReferences"] = [{"apiVersion": "kubevirt.io/v1", "kind": "VirtualMachineInstance",
                                            "name": meta["name"], "uid": meta["uid"], "controller": True,
                                            "blockOwnerDeletion": True}]
    return made


def get(cluster: Cluster, *what: str) -> dict[str, Any]:
    return json.loads(cluster.plane.kubectl("get", *what, "-o", "json").stdout)  # type: ignore[no-any-return]


def group(cluster: Cluster, name: str) -> dict[str, Any]:
    proc = cluster.plane.kubectl("get", "group", name, "-o", "json", check=False)
    return json.loads(proc.stdout).get("status") or {} if proc.returncode == 0 else {}


def totals(cluster: Cluster, name: str) -> tuple[int, int, int]:
    status = (connection(cluster, name) or {}).get("status") or {}
    b = status.get("bytes") or {}
    return b.get("clientToServer", 0), b.get("serverToClient", 0), (status.get("sessions") or {}).get("total", 0)


def test_a_kubevirt_vm_is_a_group_of_its_own_through_a_live_migration(cluster: Cluster, operator: Operator) -> None:
    plane = cluster.plane
    # Without KubeVirt: the operator serves, and says once that VMIs are not served (asked every 0.5 s).
    time.sleep(3)
    assert log(operator).count(NOT_SERVED) == 1, operator.tail()
    assert "watching virtualmachineinstances" not in log(operator) and "Traceback" not in log(operator)

    # KubeVirt installed after the operator: its watch starts.
    plane.kubectl("apply", "--server-side", "-f", str(CRDS))
    plane.kubectl("wait", "--for=condition=Established", "crd", "virtualmachines.kubevirt.io",
                  "virtualmachineinstances.kubevirt.io", "--timeout=60s")
    wait_for(lambda: "virtualmachineinstances.kubevirt.io/v1 is served" in log(operator), what="the VMI watch")
    plane.kubectl("create", "namespace", "vms")
    template = {"metadata": {"labels": {"app": "db", "kubevirt.io/domain": "db"}}, "spec": {"domain": {"devices": {}}}}
    apply(plane, {"apiVersion": "kubevirt.io/v1", "kind": "VirtualMachine",
                  "metadata": {"name": "db", "namespace": "vms"},
                  "spec": {"runStrategy": "Always", "template": template}})
    vm = get(cluster, "vm", "db", "-n", "vms")
    # The VMI the VM controller makes: the VM's name, its template's labels, the VM its controller.
    apply(plane, {"apiVersion": "kubevirt.io/v1", "kind": "VirtualMachineInstance",
                  "metadata": {"name": "db", "namespace": "vms", "labels": {**template["metadata"]["labels"],
                                                                            "vm.kubevirt.io/name": "db"},
                               "ownerReferences": [{"apiVersion": "kubevirt.io/v1", "kind": "VirtualMachine",
                                                    "name": "db", "uid": vm["metadata"]["uid"], "controller": True,
                                                    "blockOwnerDeletion": True}]},
                  "spec": template["spec"]},
          # A VMI of its own (no VM): its Group is named after it.
          {"apiVersion": "kubevirt.io/v1", "kind": "VirtualMachineInstance",
           "metadata": {"name": "scratch", "namespace": "vms"}, "spec": {"domain": {"devices": {}}}})
    vmi, scratch = get(cluster, "vmi", "db", "-n", "vms"), get(cluster, "vmi", "scratch", "-n", "vms")
    create_pods(plane, launcher("virt-launcher-db-abcde", vmi, "kv-a", SOURCE),
                launcher("virt-launcher-scratch-q1w2e", scratch, "kv-a", SCRATCH))

    web = agent(cluster, operator, "node-a", "agent-a", f"kubevirt-web-{time.monotonic_ns()}")
    a = agent(cluster, operator, "kv-a", "agent-kv-a", f"kubevirt-a-{time.monotonic_ns()}")
    b = agent(cluster, operator, "kv-b", "agent-kv-b", f"kubevirt-b-{time.monotonic_ns()}")
    now = time.time()
    # The web pod's node reports what web sends; the VM's node what the VM sends.
    web.batch([edge(WEB, 40000, SOURCE, 5432, apps=("postgresql",), bytes_c2s=100, bytes_s2c=1000, when=now),
               edge(WEB, 40002, SCRATCH, 8000, bytes_c2s=5, bytes_s2c=7, when=now)])
    a.batch([edge(SOURCE, 41000, REDIS, 6379, apps=("redis",), bytes_c2s=10, bytes_s2c=20, when=now)])
    web.flush()
    a.flush()
    served, calls = "shop.web-vms.db-5432-tcp", "vms.db-shop.redis-6379-tcp"
    wait_for(lambda: totals(cluster, served) == (100, 1000, 1) and totals(cluster, calls) == (10, 20, 1),
             what="the VM's Connections")
    wait_for(lambda: group(cluster, "vms.db").get("workload") == {"kind": "VirtualMachine", "name": "db"}
             and group(cluster, "vms.db").get("members"), what="the VM's Group")
    db = group(cluster, "vms.db")
    assert (db["kind"], db["namespace"], db["memberCount"]) == ("VM", "vms", 1)
    assert db["members"] == [{"name": "virt-launcher-db-abcde", "ips": [SOURCE], "node": "kv-a"}]
    wait_for(lambda: group(cluster, "vms.scratch").get("workload"), what="the lone VMI's Group")
    assert (group(cluster, "vms.scratch")["kind"], group(cluster, "vms.scratch")["workload"]) == (
        "VM", {"kind": "VirtualMachineInstance", "name": "scratch"})
    assert totals(cluster, "shop.web-vms.scratch-8000-tcp") == (5, 7, 1)

    # The live migration: a target pod on kv-b with another address; the source pod completes and goes.
    create_pods(plane, launcher("virt-launcher-db-zxcvb", vmi, "kv-b", TARGET,
                                labels={"kubevirt.io/migrationJobUID": "0b0e8a1c", "kubevirt.io/nodeName": "kv-a"}))
    plane.kubectl("patch", "pod", "virt-launcher-db-abcde", "-n", "vms", "--subresource=status", "--type=merge",
                  "-p", json.dumps({"status": {"phase": "Succeeded"}}))
    plane.kubectl("delete", "pod", "virt-launcher-db-abcde", "-n", "vms", "--grace-period=0", "--force")
    now = time.time()
    web.batch([edge(WEB, 40001, TARGET, 5432, apps=("postgresql",), bytes_c2s=200, bytes_s2c=2000, when=now)])
    # The VM now sends from kv-b: kv-b's agent reports it.
    b.batch([edge(TARGET, 41001, REDIS, 6379, apps=("redis",), bytes_c2s=30, bytes_s2c=40, when=now)])
    web.flush()
    b.flush()
    wait_for(lambda: totals(cluster, served) == (300, 3000, 2) and totals(cluster, calls) == (40, 60, 2),
             what="both pods' traffic on the same Connections")
    # (Its members are rewritten with its lastSeen, every minute at most: tests/operator/test_vms.py has them.)
    assert (group(cluster, "vms.db")["kind"], group(cluster, "vms.db")["workload"]) == (
        "VM", {"kind": "VirtualMachine", "name": "db"})
    connections = get(cluster, "connections", "-l", "flowmap.dev/server-namespace=vms")["items"]
    assert sorted(c["metadata"]["name"] for c in connections) == [served, "shop.web-vms.scratch-8000-tcp"]
    # What `kubectl get fg` users read: the KIND column says VM; the label selects VMs.
    rows = {r[0]: r for r in (re.split(r"\s{2,}", line) for line in plane.kubectl("get", "fg").stdout.splitlines())}
    assert rows["vms.db"][1:4] == ["VM", "vms", "1"] and rows["shop.web"][1] == "Workload"
    labelled = get(cluster, "groups", "-l", "flowmap.dev/kind=vm")["items"]
    assert sorted(g["metadata"]["name"] for g in labelled) == ["vms.db", "vms.scratch"]

    # KubeVirt uninstalled: the operator goes back to asking, says so once more, and keeps serving.
    plane.kubectl("delete", "-f", str(CRDS), "--wait=true")
    wait_for(lambda: log(operator).count(NOT_SERVED) == 2, what="the watch to notice the CRD is gone")
    time.sleep(2)
    assert log(operator).count(NOT_SERVED) == 2 and "Traceback" not in log(operator), operator.tail()
    operator.wait_leading(5)


def test_the_operator_reads_vmis_on_start_when_kubevirt_is_there(cluster: Cluster, operator: Operator) -> None:
    """Installed before the operator starts: its first list (before it serves) names the VM."""
    plane = cluster.plane
    plane.kubectl("apply", "--server-side", "-f", str(CRDS))
    plane.kubectl("wait", "--for=condition=Established", "crd", "virtualmachineinstances.kubevirt.io", "--timeout=60s")
    plane.kubectl("create", "namespace", "vms", check=False)
    apply(plane, {"apiVersion": "kubevirt.io/v1", "kind": "VirtualMachine",
                  "metadata": {"name": "web", "namespace": "vms"},
                  "spec": {"runStrategy": "Always", "template": {"spec": {}}}})
    vm = get(cluster, "vm", "web", "-n", "vms")
    apply(plane, {"apiVersion": "kubevirt.io/v1", "kind": "VirtualMachineInstance",
                  "metadata": {"name": "web", "namespace": "vms", "ownerReferences": [
                      {"apiVersion": "kubevirt.io/v1", "kind": "VirtualMachine", "name": "web",
                       "uid": vm["metadata"]["uid"], "controller": True}]}, "spec": {}})
    create_pods(plane, launcher("virt-launcher-web-r4t5y", get(cluster, "vmi", "web", "-n", "vms"), "kv-a", LATER))
    operator.stop()
    operator.start().wait_leading()
    assert "virtualmachineinstances.kubevirt.io/v1 is served: 1 listed" in operator.tail(200)
    a: Agent = agent(cluster, operator, "kv-a", "agent-kv-a", f"kubevirt-start-{time.monotonic_ns()}")
    a.batch([edge(LATER, 42000, REDIS, 6379, apps=("redis",), bytes_c2s=1, bytes_s2c=2)])
    a.flush()
    wait_for(lambda: group(cluster, "vms.web").get("workload") == {"kind": "VirtualMachine", "name": "web"},
             what="the VM's Group")
    assert group(cluster, "vms.web")["kind"] == "VM"


def test_a_refused_watch_is_said_once_and_never_stops_the_start(cluster: Cluster, caplog: Any) -> None:
    """An account without the grant (an old ClusterRole): 403 at every ask, one warning, no crash."""
    admin = json.loads(cluster.plane.kubeconfig.read_text())
    admin["users"] = [{"name": "agent", "user": {"token": cluster.token(
        "flowmap-agent", audience="https://kubernetes.default.svc.cluster.local")}}]
    admin["contexts"][0]["context"]["user"] = "agent"
    kubeconfig = cluster.folder / "no-kubevirt.kubeconfig"
    kubeconfig.write_text(json.dumps(admin))
    fed: list[Any] = []

    async def go() -> None:
        conf = client.Configuration()
        await config.load_kube_config(config_file=str(kubeconfig), client_configuration=conf)
        async with client.ApiClient(conf) as api:
            watch = OptionalWatch(client.CustomObjectsApi(api), "kubevirt.io", "v1", "virtualmachineinstances",
                                  listed=fed.append, seen=fed.append, gone=fed.append, forgotten=lambda: fed.append(0),
                                  poll=0.1, most=0.2)
            await watch.prime()
            stop = asyncio.Event()
            task = asyncio.create_task(watch.keep(stop))
            await asyncio.sleep(2)  # ten asks or more
            stop.set()
            await asyncio.wait_for(task, 5)
            assert watch.served is None and fed == []

    with caplog.at_level(logging.INFO, logger="flowmap.operator"):
        asyncio.run(go())
    said = [r.getMessage() for r in caplog.records if r.name == "flowmap.operator"]
    assert len(said) == 1 and "403" in said[0] and "virtualmachineinstances.kubevirt.io/v1" in said[0], said
