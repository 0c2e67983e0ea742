"""The Group objects against the real control plane, when someone else has a say: the API server
refuses a status, a user deletes a Group or gives one every address, DNS names more clients than
the map should hold. Each test runs an operator of its own (their settings differ); the
namespace ``grp`` is this module's.
"""

from __future__ import annotations

import json
import time
import urllib.request
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from flowmap_api import report_pb2 as pb
from tests.operator.harness import Agent, Cluster, Operator, apply, create_pods, edge, pod, running
from tests.operator.test_reports import wait_for

NS = "grp"


def group(cluster: Cluster, name: str) -> dict[str, Any] | None:
    proc = cluster.plane.kubectl("get", "group", name, "-o", "json", check=False)
    return json.loads(proc.stdout) if proc.returncode == 0 else None


def condition(cluster: Cluster, name: str, kind: str) -> dict[str, Any]:
    conditions = ((group(cluster, name) or {}).get("status") or {}).get("conditions") or []
    return next((c for c in conditions if c["type"] == kind), {})


def writes(op: Operator, result: str, kind: str = "group") -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{op.metrics_port}/metrics", timeout=5) as r:
        text = r.read().decode()
    return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples
               if s.name == "flowmap_operator_api_writes_total" and s.labels == {
                   "kind": kind, "verb": "status", "result": result})


def workload(cluster: Cluster, name: str, ip: str, kind: str = "StatefulSet") -> None:
    cluster.plane.kubectl("create", "namespace", NS, check=False)
    create_pods(cluster.plane, pod(NS, f"{name}-0", "node-a", ip, owner=(kind, name)))


def report(cluster: Cluster, op: Operator, *edges: pb.EdgeDelta, names: tuple[pb.DnsName, ...] = ()) -> None:
    agent = Agent(op, f"groups-{time.monotonic_ns()}", "node-a", cluster.token("flowmap-agent", pod_name="agent-a"))
    agent.batch(edges, names)
    agent.flush()


def test_a_deleted_group_is_made_again(cluster: Cluster) -> None:
    workload(cluster, "kept", "10.244.1.201")
    for op in running(cluster):
        report(cluster, op, edge("10.244.1.201", 40000, "192.0.2.201", 443))
        first = wait_for(lambda: (group(cluster, f"{NS}.kept") or {}).get("status"), what="the Group")
        assert first["kind"] == "Workload"
        before = writes(op, "404")
        cluster.plane.kubectl("delete", "group", f"{NS}.kept")
        # As found: not made again until a restart, with 2 refused writes a second meanwhile.
        again = wait_for(lambda: (group(cluster, f"{NS}.kept") or {}).get("status"), timeout=15, what="the Group again")
        assert again["kind"] == "Workload" and again["workload"] == {"kind": "StatefulSet", "name": "kept"}
        assert again["members"][0]["name"] == "kept-0"
        time.sleep(2)
        assert writes(op, "404") - before <= 1


def test_a_status_the_api_server_refuses_is_a_condition_and_backs_off(cluster: Cluster) -> None:
    # A pod whose controller is of a kind the Group schema does not list (Argo Workflows' pods are
    # owned by their Workflow): the API server refuses the Group's status (422).
    workload(cluster, "flow", "10.244.1.202", kind="Workflow")
    for op in running(cluster):
        report(cluster, op, edge("10.244.1.202", 40000, "192.0.2.202", 443))
        refused = wait_for(lambda: condition(cluster, f"{NS}.flow", "StatusWritten"), what="the refusal said")
        assert refused["status"] == "False" and refused["reason"] == "RefusedByAPIServer"
        assert "422" in refused["message"] and "Workflow" in refused["message"]
        # As found: refused twice a second forever (five times a second at this operator's flush interval).
        before, started = writes(op, "422"), time.monotonic()
        time.sleep(6)
        assert writes(op, "422") - before <= 3, f"{writes(op, '422') - before} refused writes in " \
                                                f"{time.monotonic() - started:.0f} s"
        # The edge itself is counted all the same.
        assert wait_for(lambda: cluster.plane.kubectl("get", "connection", f"{NS}.flow-external-443-tcp",
                                                      check=False).returncode == 0, what="the Connection")


def test_a_catch_all_cidr_on_a_workload_group_is_a_warning(cluster: Cluster) -> None:
    workload(cluster, "open", "10.244.1.203")
    for op in running(cluster):
        report(cluster, op, edge("10.244.1.203", 40000, "192.0.2.203", 443))
        wait_for(lambda: group(cluster, f"{NS}.open"), what="the Group")
        apply(cluster.plane, {"apiVersion": "flowmap.dev/v1alpha1", "kind": "Group", "metadata": {"name": f"{NS}.open"},
                              "spec": {"cidrs": ["0.0.0.0/0"]}})
        try:
            warning = wait_for(lambda: condition(cluster, f"{NS}.open", "Warning"), what="the warning")
            assert warning["status"] == "True" and warning["reason"] == "CatchAllCIDR"
            assert "0.0.0.0/0" in warning["message"] and f"{NS}/open" in warning["message"]
            assert warning["observedGeneration"] == group(cluster, f"{NS}.open")["metadata"]["generation"]
        finally:
            cluster.plane.kubectl("patch", "group", f"{NS}.open", "--type=json",
                                  "-p", '[{"op": "remove", "path": "/spec/cidrs"}]')
        wait_for(lambda: not condition(cluster, f"{NS}.open", "Warning"), what="the warning gone")


def test_named_clients_beyond_the_fqdn_group_cap_are_external_and_said_so(cluster: Cluster) -> None:
    workload(cluster, "front", "10.244.1.204")
    fqdn = json.loads(cluster.plane.kubectl("get", "groups", "-l", "flowmap.dev/kind=fqdn", "-o", "json").stdout)
    existing = len(fqdn["items"])
    for op in running(cluster, max_fqdn_groups=existing + 5):
        now, tag = time.time(), time.monotonic_ns()
        ips = [f"203.0.113.{i + 1}" for i in range(50)]
        names = tuple(pb.DnsName(ip=ip, name=f"c{i}-{tag}.example.net", ttl_seconds=300, seen_unix_ms=int(now * 1000))
                      for i, ip in enumerate(ips))
        report(cluster, op, *(edge(ip, 40000 + i, "10.244.1.204", 8080, local="server", when=now)
                              for i, ip in enumerate(ips)), names=names)
        said = wait_for(lambda: condition(cluster, "external", "GroupsRecorded"), what="the cap said on external")
        assert said["status"] == "False" and said["reason"] == "FQDNGroupLimitReached" and "45" in said["message"]
        made = [g for g in json.loads(cluster.plane.kubectl("get", "groups", "-o", "json").stdout)["items"]
                if g["metadata"]["name"].endswith(f"-{tag}.example.net")]
        assert len(made) == 5
        assert wait_for(lambda: cluster.plane.kubectl("get", "connection", f"external-{NS}.front-8080-tcp",
                                                      check=False).returncode == 0, what="the rest as external")
