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
                         "threats": [{"name": "heartbleed", "severity": "Critical", "count": 1,
                                      "firstSeen": "2026-11-21T10:01:00Z", "lastSeen": "2026-11-21T10:01:00Z"},
                                     {"name": "sqlinjection", "severity": "High", "count": 3,
                                      "example": "id=1' OR '1'='1"}],
                         "threatSummary": "heartbleed,sqlinjection",
                         "firstSeen": "2026-11-21T10:00:00Z", "lastSeen": "2026-11-21T10:05:00Z"}}
    controlplane.kubectl("patch", "connection", "shop.web-shop.api-8080-tcp", "--subresource=status",
                         "--type=merge", "-p", json.dumps(status))
    # (The control plane is the session's: other tests' Connections may be listed too.)
    out = controlplane.kubectl("get", "connection", "shop.web-shop.api-8080-tcp").stdout.splitlines()
    assert columns(out[0]) == ["NAME", "CLIENT", "SERVER", "PORT", "PROTOCOL", "APP", "ACTION", "BYTES",
                               "SESSIONS", "THREATS", "LAST-SEEN", "AGE"]
    row = columns(out[1])
    assert row[:10] == ["shop.web-shop.api-8080-tcp", "shop.web", "shop.api", "8080", "TCP", "http", "Learned",
                        "35200", "7", "heartbleed,sqlinjection"]
    # A threat the schema does not know, or a severity it does not, is refused naming the field.
    for bad, field in (({"name": "evil", "severity": "High", "count": 1}, "status.threats[0].name"),
                       ({"name": "heartbleed", "severity": "Severe", "count": 1}, "status.threats[0].severity"),
                       ({"name": "heartbleed", "severity": "High", "count": 1, "example": "x" * 257},
                        "status.threats[0].example")):
        refused = controlplane.kubectl("patch", "connection", "shop.web-shop.api-8080-tcp", "--subresource=status",
                                       "--type=merge", "-p", json.dumps({"status": {"threats": [bad]}}), check=False)
        assert refused.returncode != 0 and field in refused.stderr, refused.stderr
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
kind: NetworkLearningPolicy
metadata: {name: unknown-threat, namespace: default}
spec: {mode: Protect, groups: [default.web], threats: [{name: sql-injection, action: Block}]}
""", "spec.threats[0].name", "Unsupported value"),
    ("""
apiVersion: flowmap.dev/v1alpha1
kind: NetworkLearningPolicy
metadata: {name: bad-action, namespace: default}
spec: {mode: Protect, groups: [default.web], threats: [{name: heartbleed, action: Drop}]}
""", "spec.threats[0].action", "Unsupported value"),
    ("""
apiVersion: flowmap.dev/v1alpha1
kind: NetworkLearningPolicy
metadata: {name: twice, namespace: default}
spec: {mode: Protect, groups: [default.web], threats: [{name: heartbleed, action: Block}, {name: heartbleed}]}
""", "spec.threats[1]", "Duplicate value"),
    ("""
apiVersion: flowmap.dev/v1alpha1
kind: NetworkLearningPolicy
metadata: {name: block-mitm, namespace: default}
spec: {mode: Protect, groups: [default.web], threats: [{name: external-ip-mitm, action: Block}]}
""", "spec.threats[0]", "can be alerted on, not blocked"),
    ("""
apiVersion: flowmap.dev/v1alpha1
kind: NetworkLearningPolicy
metadata: {name: too-many-threats, namespace: default}
spec: {mode: Protect, groups: [default.web], threats: [""" + ", ".join(f"{{name: t{i}}}" for i in range(33)) + """]}
""", "spec.threats", "must have at most 32 items"),
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


def test_a_threat_s_action_defaults_to_alert(controlplane: ControlPlane) -> None:
    apply(controlplane, """
apiVersion: flowmap.dev/v1alpha1
kind: NetworkLearningPolicy
metadata: {name: threats, namespace: default}
spec: {mode: Protect, groups: [default.web], threats: [{name: sqlinjection, action: Block}, {name: heartbleed},
                                                      {name: external-ip-mitm, action: Alert}]}
""")
    try:
        got = json.loads(controlplane.kubectl("get", "nlp", "threats", "-n", "default", "-o", "json").stdout)
        assert got["spec"]["threats"] == [{"name": "sqlinjection", "action": "Block"},
                                          {"name": "heartbleed", "action": "Alert"},
                                          {"name": "external-ip-mitm", "action": "Alert"}]
    finally:
        controlplane.kubectl("delete", "nlp", "threats", "-n", "default")


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


# -- PacketCapture ------------------------------------------------------------------------------------

CAPTURE = """
apiVersion: flowmap.dev/v1alpha1
kind: PacketCapture
metadata: {name: web, namespace: default}
spec:
  targets: {groups: [web]}
"""


def capture(name: str, spec: str) -> str:
    """A PacketCapture in namespace default with ``spec`` (YAML indented by four)."""
    return f"""
apiVersion: flowmap.dev/v1alpha1
kind: PacketCapture
metadata: {{name: {name}, namespace: default}}
spec:
{spec}"""


def test_capture_defaults_are_applied(controlplane: ControlPlane) -> None:
    controlplane.kubectl("create", "namespace", "capturing")
    apply(controlplane, capture("defaults", """\
  targets: {podSelector: {matchLabels: {app: web}}}
  filters: [{peer: {cidr: 10.0.0.0/8}}]
  trigger: {"on": Violation}
""").replace("namespace: default", "namespace: capturing"))
    got = json.loads(controlplane.kubectl("get", "pcap", "defaults", "-n", "capturing", "-o", "json").stdout)["spec"]
    assert got == {"targets": {"podSelector": {"matchLabels": {"app": "web"}}},
                   "filters": [{"peer": {"cidr": "10.0.0.0/8"}, "direction": "Both"}],
                   "trigger": {"on": "Violation", "preTriggerSeconds": 5},
                   "durationSeconds": 60, "maxBytesPerNode": 1048576, "maxPacketsPerNode": 10000,
                   "wholePackets": False, "ttlSecondsAfterFinished": 3600}
    # snapLength has no schema default (it would always clash with wholePackets): the operator's is 128.
    assert "snapLength" not in got


def test_a_capture_at_every_upper_bound_is_accepted(controlplane: ControlPlane) -> None:
    filters = "\n".join(f"    - {{peer: {{group: g{i}}}, protocol: UDP, port: {i + 1}, direction: Egress}}"
                        for i in range(16))
    apply(controlplane, capture("upper", f"""\
  targets:
    groups: [{", ".join(f"w{i}" for i in range(16))}]
    podSelector: {{matchExpressions: [{{key: tier, operator: In, values: [a, b]}}]}}
  filters:
{filters}
  durationSeconds: 600
  maxBytesPerNode: 104857600
  maxPacketsPerNode: 1000000
  wholePackets: true
  trigger: {{"on": Threat, preTriggerSeconds: 30}}
  ttlSecondsAfterFinished: 604800
"""))
    apply(controlplane, capture("snap", """\
  targets: {groups: [web]}
  filters: [{peer: {cidr: "2001:db8::/48"}, protocol: SCTP, port: 65535}, {protocol: ICMP}]
  snapLength: 1024
  wholePackets: false
"""))


def test_capture_prints_its_columns(controlplane: ControlPlane) -> None:
    apply(controlplane, capture("columns", '  targets: {groups: [web]}\n  trigger: {"on": Denied}\n'))
    status = {"status": {"phase": "Running", "observedGeneration": 1,
                         "totals": {"packets": 42, "bytes": 5000, "drops": 0, "fileBytes": 6144},
                         "nodes": [{"node": "n1", "phase": "Running", "packets": 42, "bytes": 5000,
                                    "fileBytes": 6144}],
                         "conditions": [{"type": "Ready", "status": "True", "reason": "Running", "message": "1 node",
                                         "lastTransitionTime": "2026-11-21T10:00:00Z", "observedGeneration": 1}]}}
    controlplane.kubectl("patch", "pcap", "columns", "-n", "default", "--subresource=status", "--type=merge",
                         "-p", json.dumps(status))
    out = controlplane.kubectl("get", "packetcapture", "columns", "-n", "default").stdout.splitlines()
    assert columns(out[0]) == ["NAME", "PHASE", "TRIGGER", "PACKETS", "SIZE", "AGE"]
    assert columns(out[1])[:5] == ["columns", "Running", "Denied", "42", "6144"]
    # It is in the flowmap category, and a plain update cannot touch status (subresource only).
    assert "packetcapture.flowmap.dev/columns" in controlplane.kubectl("get", "flowmap", "-n", "default",
                                                                       "-o", "name").stdout
    apply(controlplane, capture("columns", '  targets: {groups: [web]}\n  trigger: {"on": Denied}\n'
                                ).replace("spec:", "status: {phase: Failed}\nspec:"))
    got = json.loads(controlplane.kubectl("get", "pcap", "columns", "-n", "default", "-o", "json").stdout)
    assert got["status"]["phase"] == "Running"


def test_a_capture_spec_is_immutable(controlplane: ControlPlane) -> None:
    apply(controlplane, capture("fixed", "  targets: {groups: [web]}\n"))
    message = refused(controlplane, capture("fixed", "  targets: {groups: [web]}\n  durationSeconds: 600\n"))
    assert "spec" in message and "immutable" in message, message
    message = refused(controlplane, capture("fixed", "  targets: {groups: [web, api]}\n"))
    assert "immutable" in message, message


def test_a_bare_on_is_refused_not_dropped(controlplane: ControlPlane) -> None:
    # kubectl's YAML 1.1 reads a bare `on` as the boolean true: the field is then "true", which the
    # API server refuses by name (strict decoding), rather than keeping a capture without its trigger.
    message = refused(controlplane, capture("bare-on", "  targets: {groups: [web]}\n  trigger: {on: Denied}\n"))
    assert 'unknown field "spec.trigger.true"' in message, message
    # Without strict decoding the unknown field is pruned, and the trigger has no "on": refused too.
    proc = apply(controlplane, capture("bare-on", "  targets: {groups: [web]}\n  trigger: {on: Denied}\n"),
                 "--validate=false", check=False)
    assert proc.returncode != 0 and "spec.trigger.on: Required value" in proc.stderr, proc.stderr


SIXTEEN = ", ".join(["{protocol: TCP}"] * 16)
INVALID_CAPTURES = [  # (spec, the field the refusal names, what it says)
    ("  targets: {groups: [web]}\n  durationSeconds: 601\n", "spec.durationSeconds", "less than or equal to 600"),
    ("  targets: {groups: [web]}\n  durationSeconds: 0\n", "spec.durationSeconds", "greater than or equal to 1"),
    ("  targets: {groups: [web]}\n  maxBytesPerNode: 104857601\n", "spec.maxBytesPerNode",
     "less than or equal to 104857600"),
    ("  targets: {groups: [web]}\n  maxBytesPerNode: 1023\n", "spec.maxBytesPerNode", "greater than or equal to 1024"),
    ("  targets: {groups: [web]}\n  maxPacketsPerNode: 1000001\n", "spec.maxPacketsPerNode",
     "less than or equal to 1000000"),
    ("  targets: {groups: [web]}\n  snapLength: 63\n", "spec.snapLength", "greater than or equal to 64"),
    ("  targets: {groups: [web]}\n  snapLength: 1025\n", "spec.snapLength", "less than or equal to 1024"),
    ("  targets: {groups: [web]}\n  snapLength: 128\n  wholePackets: true\n", "spec",
     "snapLength and wholePackets do not go together"),
    ("  targets: {groups: [web]}\n  ttlSecondsAfterFinished: 59\n", "spec.ttlSecondsAfterFinished",
     "greater than or equal to 60"),
    ("  targets: {groups: [web]}\n  ttlSecondsAfterFinished: 604801\n", "spec.ttlSecondsAfterFinished",
     "less than or equal to 604800"),
    ("  targets: {}\n", "spec.targets", "name groups or give a podSelector"),
    ("  durationSeconds: 60\n", "spec.targets", "Required value"),
    ("  targets: {groups: []}\n", "spec.targets.groups", "should have at least 1 items"),
    ("  targets: {groups: [Web]}\n", "spec.targets.groups[0]", "should match"),
    ("  targets: {groups: [shop/web]}\n", "spec.targets.groups[0]", "should match"),
    ("  targets: {groups: [" + ", ".join(f"w{i}" for i in range(17)) + "]}\n", "spec.targets.groups",
     "must have at most 16 items"),
    ("  targets: {podSelector: {matchExpressions: [{key: a, operator: In}]}}\n",
     "spec.targets.podSelector.matchExpressions[0]", "In and NotIn need values"),
    ("  targets: {groups: [web]}\n  namespace: other\n", "spec", 'unknown field "spec.namespace"'),
    ("  targets: {groups: [web]}\n  filters: [{peer: {cidr: 10.0.0.0/33}}]\n", "spec.filters[0].peer.cidr",
     "must be a CIDR"),
    ("  targets: {groups: [web]}\n  filters: [{peer: {cidr: db}}]\n", "spec.filters[0].peer.cidr", "must be a CIDR"),
    ("  targets: {groups: [web]}\n  filters: [{peer: {group: db, cidr: 10.0.0.0/8}}]\n", "spec.filters[0].peer",
     "either a group or a cidr"),
    ("  targets: {groups: [web]}\n  filters: [{peer: {}}]\n", "spec.filters[0].peer", "either a group or a cidr"),
    ("  targets: {groups: [web]}\n  filters: [{protocol: ICMP, port: 8}]\n", "spec.filters[0]",
     "a port needs protocol TCP, UDP or SCTP"),
    ("  targets: {groups: [web]}\n  filters: [{port: 53}]\n", "spec.filters[0]",
     "a port needs protocol TCP, UDP or SCTP"),
    ("  targets: {groups: [web]}\n  filters: [{protocol: TCP, port: 0}]\n", "spec.filters[0].port",
     "greater than or equal to 1"),
    ("  targets: {groups: [web]}\n  filters: [{protocol: GRE}]\n", "spec.filters[0].protocol", "Unsupported value"),
    ("  targets: {groups: [web]}\n  filters: [{direction: In}]\n", "spec.filters[0].direction", "Unsupported value"),
    (f"  targets: {{groups: [web]}}\n  filters: [{SIXTEEN}, {{protocol: UDP}}]\n", "spec.filters",
     "must have at most 16 items"),
    ('  targets: {groups: [web]}\n  trigger: {"on": Allowed}\n', "spec.trigger.on", "Unsupported value"),
    ('  targets: {groups: [web]}\n  trigger: {"on": Denied, preTriggerSeconds: 31}\n',
     "spec.trigger.preTriggerSeconds", "less than or equal to 30"),
    ("  targets: {groups: [web]}\n  trigger: {preTriggerSeconds: 3}\n", "spec.trigger.on", "Required value"),
]


@pytest.mark.parametrize(("spec", "field", "says"), INVALID_CAPTURES,
                         ids=[f"{field}-{' '.join(says.split()[:3])}" for _, field, says in INVALID_CAPTURES])
def test_invalid_captures_are_refused_naming_the_field(controlplane: ControlPlane, spec: str, field: str,
                                                       says: str) -> None:
    message = refused(controlplane, capture("invalid", spec))
    assert field in message and says in message, message
