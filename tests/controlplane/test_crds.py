"""The CRDs as the API server serves them: established, printed, validated."""

from __future__ import annotations

import json
import re

import pytest

from flowmap_devenv.controlplane import ControlPlane
from tests.conftest import REPO

CRDS = ("groups.flowmap.dev", "connections.flowmap.dev", "networklearningpolicies.flowmap.dev",
        "packetcaptures.flowmap.dev")


def apply(plane: ControlPlane, manifest: str, *extra: str, check: bool = True):  # type: ignore[no-untyped-def]
    return plane.kubectl("apply", "-f", "-", *extra, input=manifest, check=check)


def refused(plane: ControlPlane, manifest: str) -> str:
    proc = apply(plane, manifest, check=False)
    assert proc.returncode != 0, f"the API server accepted an invalid object:\n{manifest}"
    return proc.stderr


def columns(header: str) -> list[str]:
    return re.split(r"\s{2,}", header.strip())


def test_crds_are_established(controlplane: ControlPlane) -> None:
    listed = json.loads(controlplane.kubectl("get", "crd", "-o", "json").stdout)["items"]
    by_name = {crd["metadata"]["name"]: crd for crd in listed}
    for name in CRDS:
        conditions = {c["type"]: c["status"] for c in by_name[name]["status"]["conditions"]}
        assert conditions["Established"] == "True", name
        assert by_name[name]["spec"]["names"]["categories"] == ["flowmap"]
    short = {by_name[n]["spec"]["names"]["shortNames"][0] for n in CRDS}
    assert short == {"fg", "conn", "nlp", "pcap"}


CONNECTION = """
apiVersion: flowmap.dev/v1alpha1
kind: Connection
metadata: {name: shop.web-shop.api-8080-tcp}
spec: {client: shop.web, server: shop.api, port: 8080, protocol: TCP}
"""


def test_connection_prints_the_map_columns(controlplane: ControlPlane) -> None:
    apply(controlplane, CONNECTION)
    status = {"status": {"app": "http", "applications": ["http"], "action": "Learned",
                         "bytes": {"clientToServer": 1200, "serverToClient": 34000, "total": 35200},
                         "packets": {"clientToServer": 12, "serverToClient": 30},
                         "sessions": {"total": 7, "active": 1},
                         "firstSeen": "2026-11-21T10:00:00Z", "lastSeen": "2026-11-21T10:05:00Z"}}
    controlplane.kubectl("patch", "connection", "shop.web-shop.api-8080-tcp", "--subresource=status",
                         "--type=merge", "-p", json.dumps(status))
    # (The control plane is the session's: other tests' Connections may be listed too.)
    out = controlplane.kubectl("get", "connection", "shop.web-shop.api-8080-tcp").stdout.splitlines()
    assert columns(out[0]) == ["NAME", "CLIENT", "SERVER", "PORT", "PROTOCOL", "APP", "ACTION", "BYTES",
                               "SESSIONS", "LAST-SEEN", "AGE"]
    row = columns(out[1])
    assert row[:9] == ["shop.web-shop.api-8080-tcp", "shop.web", "shop.api", "8080", "TCP", "http", "Learned",
                       "35200", "7"]
    # The short name works too, and a plain update cannot touch status (subresource only).
    assert "shop.web-shop.api-8080-tcp" in controlplane.kubectl("get", "conn").stdout
    apply(controlplane, CONNECTION.replace("spec:", "status: {action: Denied}\nspec:"))
    got = json.loads(controlplane.kubectl("get", "conn", "shop.web-shop.api-8080-tcp", "-o", "json").stdout)
    assert got["status"]["action"] == "Learned"


def test_group_and_policy_columns(controlplane: ControlPlane) -> None:
    controlplane.kubectl("create", "namespace", "columns")
    apply(controlplane, """
apiVersion: flowmap.dev/v1alpha1
kind: Group
metadata: {name: columns.api}
""")
    controlplane.kubectl("patch", "group", "columns.api", "--subresource=status", "--type=merge", "-p",
                         json.dumps({"status": {"kind": "Workload", "namespace": "columns", "memberCount": 3,
                                                "mode": "Monitor"}}))
    out = controlplane.kubectl("get", "fg", "columns.api").stdout.splitlines()
    assert columns(out[0]) == ["NAME", "KIND", "NAMESPACE", "MEMBERS", "MODE", "AGE"]
    assert columns(out[1])[:5] == ["columns.api", "Workload", "columns", "3", "Monitor"]

    apply(controlplane, """
apiVersion: flowmap.dev/v1alpha1
kind: NetworkLearningPolicy
metadata: {name: api, namespace: columns}
spec: {mode: Monitor, groups: [columns.api]}
""")
    controlplane.kubectl("patch", "nlp", "api", "-n", "columns", "--subresource=status", "--type=merge", "-p",
                         json.dumps({"status": {"ruleCount": 2, "learnedCount": 5, "conditions": [
                             {"type": "Ready", "status": "True", "reason": "Compiled", "message": "ok",
                              "lastTransitionTime": "2026-11-21T10:00:00Z"}]}}))
    out = controlplane.kubectl("get", "nlp", "-n", "columns").stdout.splitlines()
    assert columns(out[0]) == ["NAME", "MODE", "READY", "RULES", "LEARNED", "AGE"]
    assert columns(out[1])[:5] == ["api", "Monitor", "True", "2", "5"]


@pytest.mark.parametrize(("manifest", "field", "says"), [
    (CONNECTION.replace("port: 8080", "port: 70000"), "spec.port", "less than or equal to 65535"),
    (CONNECTION.replace("protocol: TCP", "protocol: HTTP"), "spec.protocol", "Unsupported value"),
    (CONNECTION.replace(", protocol: TCP", ""), "spec.protocol", "Required value"),
    ("""
apiVersion: flowmap.dev/v1alpha1
kind: NetworkLearningPolicy
metadata: {name: bad-mode, namespace: default}
spec: {mode: Block, selector: {}}
""", "spec.mode", "Unsupported value"),
    ("""
apiVersion: flowmap.dev/v1alpha1
kind: NetworkLearningPolicy
metadata: {name: selects-nothing, namespace: default}
spec: {mode: Learn}
""", "spec", "select workloads with selector"),
    ("""
apiVersion: flowmap.dev/v1alpha1
kind: NetworkLearningPolicy
metadata: {name: two-peers, namespace: default}
spec:
  mode: Protect
  selector: {}
  rules: [{direction: Egress, peer: {group: a.b, cidr: 10.0.0.0/8}}]
""", "spec.rules[0].peer", "either a group or a cidr"),
    ("""
apiVersion: flowmap.dev/v1alpha1
kind: NetworkLearningPolicy
metadata: {name: both, namespace: default}
spec: {mode: Learn, selector: {}, groups: [default.web]}
""", "spec", "not both"),
    ("""
apiVersion: flowmap.dev/v1alpha1
kind: NetworkLearningPolicy
metadata: {name: icmp-port, namespace: default}
spec:
  mode: Protect
  groups: [default.web]
  rules: [{direction: Ingress, peer: {group: nodes}, ports: [{port: 8, protocol: ICMP}]}]
""", "spec.rules[0].ports[0]", "ICMP has no ports"),
    ("""
apiVersion: flowmap.dev/v1alpha1
kind: NetworkLearningPolicy
metadata: {name: not-a-group, namespace: default}
spec: {mode: Monitor, groups: [web]}
""", "spec.groups[0]", "should match"),
    ("""
apiVersion: flowmap.dev/v1alpha1
kind: Group
metadata: {name: bad-cidr}
spec: {cidrs: [10.0.0.0/33]}
""", "spec.cidrs[0]", "must be a CIDR"),
])
def test_invalid_objects_are_refused_naming_the_field(controlplane: ControlPlane, manifest: str, field: str,
                                                      says: str) -> None:
    message = refused(controlplane, manifest)
    assert field in message and says in message, message


def test_connection_identity_is_immutable(controlplane: ControlPlane) -> None:
    apply(controlplane, CONNECTION)
    message = refused(controlplane, CONNECTION.replace("server: shop.api", "server: shop.other"))
    assert "immutable" in message


def test_samples_and_manifests_pass_server_side_dry_run(controlplane: ControlPlane) -> None:
    samples = sorted((REPO / "manifests" / "samples").glob("*.yaml"))
    assert len(samples) >= 3
    for sample in samples:
        controlplane.kubectl("apply", "--dry-run=server", "-f", str(sample))
    # A dry run creates nothing, so the namespace the namespaced objects land in must exist.
    controlplane.kubectl("create", "namespace", "flowmap-system", check=False)
    out = controlplane.kubectl("apply", "--server-side", "--dry-run=server", "-k", str(REPO / "manifests")).stdout
    for name in CRDS:
        assert f"customresourcedefinition.apiextensions.k8s.io/{name}" in out
    assert "namespace/flowmap-system" in out
    assert "clusterrole.rbac.authorization.k8s.io/flowmap-operator" in out
    assert "clusterkopfpeering.kopf.dev/flowmap" in out
