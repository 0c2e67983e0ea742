"""The base installs on an empty API server, and its RBAC grants each party what it needs, no more.

The install is the README's commands, run as written: the CRDs, a wait until they are served
(the base holds a ClusterKopfPeering, which kubectl cannot map before its CRD is served), then
the base, dry-run on the server first. Then ``kubectl auth can-i`` and SelfSubjectRulesReviews, impersonating each
ServiceAccount and two users bound to the user roles, give the matrix. This API server is the
module's own, not the session's: empty at the start, and no other test's objects in the answers.
There is no controller-manager, so the aggregation of flowmap-viewer/editor into view/edit/admin
is checked by its labels only.
"""

from __future__ import annotations

import json
import shlex
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from flowmap_agent.settings import Settings as AgentSettings
from flowmap_devenv import binaries
from flowmap_devenv.controlplane import ControlPlane
from flowmap_operator import checkpointing
from flowmap_operator.highwater import SHARDS
from tests.conftest import REPO, need

NS = "flowmap-system"
OPERATOR = f"system:serviceaccount:{NS}:flowmap-operator"
AGENT = f"system:serviceaccount:{NS}:flowmap-agent"
VIEWER, EDITOR, NOBODY = "alice", "bob", "mallory"  # bound to flowmap-viewer, flowmap-editor, nothing
Rule = tuple[str, str, str, str]  # (api group, resource, verb, resource name or "*")


def readme_install() -> list[list[str]]:
    """The kubectl commands of the README's "Install on a cluster", with the repository's paths."""
    text = (REPO / "README.md").read_text()
    block = text.split("## Install on a cluster", 1)[1].split("```sh", 1)[1].split("```", 1)[0]
    commands = [shlex.split(line)[1:] for line in block.splitlines() if line.startswith("kubectl ")]
    return [[str(REPO / a) if (REPO / a).exists() and a.endswith("/") else a for a in args] for args in commands]


@pytest.fixture(scope="module")
def installed() -> Iterator[ControlPlane]:
    need(binaries.find() is not None, "the control plane needs kube-apiserver and etcd ('flowmap controlplane build')")
    folder = Path(tempfile.mkdtemp(prefix="flowmap-install-"))
    plane = ControlPlane(folder / "state", crds=None, log=lambda line: None)
    plane.up()
    try:
        assert "flowmap.dev" not in plane.kubectl("api-resources").stdout  # empty indeed
        commands = readme_install()
        base = ["apply", "--server-side", "-k", str(REPO / "manifests")]
        assert base in commands and commands.index(base) > 0, commands
        for args in commands:
            if args == base:
                # A dry run cannot create the namespace its other objects go into: that one first.
                plane.kubectl("apply", "--server-side", "-f", str(REPO / "manifests" / "namespace.yaml"))
                dry = plane.kubectl(*args, "--dry-run=server", check=False)
                assert dry.returncode == 0, dry.stderr
                for kind in ("deployment.apps/flowmap-operator", "daemonset.apps/flowmap-agent",
                             "daemonset.apps/flowmap-dp",
                             "clusterrole.rbac.authorization.k8s.io/flowmap-viewer",
                             "clusterkopfpeering.kopf.dev/flowmap"):
                    assert f"{kind} serverside-applied (server dry run)" in dry.stdout, dry.stdout
            plane.kubectl(*args, timeout=90)
        bindings = [{"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
                     "metadata": {"name": f"test-{user}"},
                     "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": role},
                     "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": user}]}
                    for user, role in ((VIEWER, "flowmap-viewer"), (EDITOR, "flowmap-editor"))]
        plane.kubectl("apply", "-f", "-", input=json.dumps({"apiVersion": "v1", "kind": "List", "items": bindings}))
        plane.kubectl("create", "namespace", "shop")
        yield plane
    finally:
        plane.down(quiet=True)
        shutil.rmtree(folder, ignore_errors=True)


def test_the_base_is_what_the_api_server_stores(installed: ControlPlane) -> None:
    pods = {name: json.loads(installed.kubectl("get", "daemonset", name, "-n", NS, "-o", "json").stdout)
            ["spec"]["template"]["spec"] for name in ("flowmap-agent", "flowmap-dp")}
    for pod in pods.values():
        assert pod["hostNetwork"] and pod["tolerations"] == [{"operator": "Exists"}]
        assert {v["hostPath"]["path"] for v in pod["volumes"] if v["name"] == "run"} == {"/run/flowmap"}  # the socket
    token = next(v for v in pods["flowmap-agent"]["volumes"]
                 if v["name"] == "token")["projected"]["sources"][0]["serviceAccountToken"]
    assert token["audience"] == "flowmap"
    assert pods["flowmap-dp"]["automountServiceAccountToken"] is False  # the dp holds no API credential
    # Packet captures' files are on the node's disk, where they outlive a dp restart.
    captures = next(v for v in pods["flowmap-dp"]["volumes"] if v["name"] == "captures")["hostPath"]
    assert captures == {"path": "/var/lib/flowmap/captures", "type": "DirectoryOrCreate"}
    dp = pods["flowmap-dp"]["containers"][0]
    assert {"name": "captures", "mountPath": "/var/lib/flowmap/captures"} in dp["volumeMounts"]
    assert dp["args"][dp["args"].index("--capture-dir") + 1] == "/var/lib/flowmap/captures"
    # The agent reads the same files at the same path (its FLOWMAP_AGENT_CAPTURE_DIR's default), never writes them.
    assert next(v for v in pods["flowmap-agent"]["volumes"] if v["name"] == "captures")["hostPath"] == captures
    agent = pods["flowmap-agent"]["containers"][0]
    assert {"name": "captures", "mountPath": AgentSettings.capture_dir, "readOnly": True} in agent["volumeMounts"]
    caps = {c["name"]: c["securityContext"]["capabilities"] for pod in pods.values() for c in pod["containers"]}
    assert caps == {"agent": {"drop": ["ALL"], "add": ["NET_ADMIN"]}, "dp": {"drop": ["ALL"], "add": ["NET_RAW"]}}
    deploy = json.loads(installed.kubectl("get", "deployment", "flowmap-operator", "-n", NS, "-o", "json").stdout)
    spec = deploy["spec"]["template"]["spec"]
    ctx = spec["containers"][0]["securityContext"]
    assert spec["securityContext"]["runAsNonRoot"] and ctx["readOnlyRootFilesystem"]
    assert ctx["capabilities"] == {"drop": ["ALL"]} and not ctx["allowPrivilegeEscalation"]
    svc = json.loads(installed.kubectl("get", "service", "flowmap-operator", "-n", NS, "-o", "json").stdout)
    assert [(p["name"], p["port"]) for p in svc["spec"]["ports"]] == [("grpc", 9443), ("results", 9444)]
    # results.flowmap.dev, the capture files' API, is the operator's Service behind the API server;
    # its caBundle is the operator's to set (no key shipped, none trusted before the operator runs).
    api = json.loads(installed.kubectl("get", "apiservice", "v1alpha1.results.flowmap.dev", "-o", "json").stdout)
    assert api["spec"]["service"] == {"name": "flowmap-operator", "namespace": NS, "port": 9444}
    assert (api["spec"]["group"], api["spec"]["version"]) == ("results.flowmap.dev", "v1alpha1")
    assert not api["spec"].get("caBundle") and not api["spec"].get("insecureSkipTLSVerify")


def test_the_prometheus_operator_monitors_dry_run(installed: ControlPlane) -> None:
    installed.kubectl("apply", "--server-side", "-f", str(REPO / "tests" / "data" / "monitoring.coreos.com.yaml"))
    installed.kubectl("wait", "--for=condition=Established", "--timeout=60s",
                      "crd/servicemonitors.monitoring.coreos.com", "crd/podmonitors.monitoring.coreos.com")
    overlay = str(REPO / "manifests" / "prometheus-operator")
    dry = installed.kubectl("apply", "--server-side", "--dry-run=server", "-k", overlay, check=False)
    assert dry.returncode == 0, dry.stderr
    assert "servicemonitor.monitoring.coreos.com/flowmap-operator serverside-applied" in dry.stdout
    assert "podmonitor.monitoring.coreos.com/flowmap-agent serverside-applied" in dry.stdout
    # The stand-in CRD does check: a misspelt field is refused, as the real one would refuse it.
    bad = installed.kubectl("kustomize", overlay).stdout.replace("podMetricsEndpoints", "podMetricEndpoints")
    refused = installed.kubectl("apply", "--server-side", "--dry-run=server", "-f", "-", input=bad, check=False)
    assert refused.returncode != 0 and "podMetricEndpoints" in refused.stderr


def rules(plane: ControlPlane, who: str, namespace: str = NS) -> set[Rule]:
    """Everything ``who`` may do in ``namespace`` (cluster-wide rules included), one tuple per
    group, resource, verb and name; without what every authenticated user may do."""
    review = {"apiVersion": "authorization.k8s.io/v1", "kind": "SelfSubjectRulesReview", "spec": {"namespace": namespace}}
    out = json.loads(plane.kubectl("create", "--validate=false", "-f", "-", "-o", "json", f"--as={who}",
                                 input=json.dumps(review)).stdout)
    assert not out["status"].get("incomplete"), out["status"]
    found = {(g, r, v, n) for rule in out["status"]["resourceRules"] for g in rule.get("apiGroups", [""])
             for r in rule["resources"] for v in rule["verbs"] for n in rule.get("resourceNames") or ["*"]}
    everyone = {("authorization.k8s.io", "selfsubjectaccessreviews", "create", "*"),
                ("authorization.k8s.io", "selfsubjectrulesreviews", "create", "*"),
                ("authentication.k8s.io", "selfsubjectreviews", "create", "*")}
    return found - everyone


def grant(group: str, resources: str, verbs: str, names: str = "*") -> set[Rule]:
    return {(group, r, v, n) for r in resources.split() for v in verbs.split() for n in names.split()}


def test_the_agent_may_read_pods_and_its_node_and_nothing_else(installed: ControlPlane) -> None:
    assert rules(installed, AGENT) == grant("", "pods", "list watch") | grant("", "nodes", "get")


def test_the_operator_may_do_exactly_what_it_uses(installed: ControlPlane) -> None:
    expected = (grant("", "pods nodes services", "get list watch")
                | grant("discovery.k8s.io", "endpointslices", "get list watch")
                | grant("batch", "jobs", "get list watch")
                # KubeVirt's VMIs name their VirtualMachines (flowmap_operator.watching), when installed
                | grant("kubevirt.io", "virtualmachineinstances", "get list watch")
                | grant("flowmap.dev", "groups connections", "get list watch create delete")
                | grant("flowmap.dev", "groups/status connections/status networklearningpolicies/status",
                        "get update patch")
                | grant("flowmap.dev", "networklearningpolicies packetcaptures", "get list watch")
                | grant("flowmap.dev", "packetcaptures/status", "patch")
                | grant("authentication.k8s.io", "tokenreviews", "create")
                # results.flowmap.dev (flowmap_operator.results): is this caller allowed, and its APIService's CA
                | grant("authorization.k8s.io", "subjectaccessreviews", "create")
                | grant("apiregistration.k8s.io", "apiservices", "get patch", "v1alpha1.results.flowmap.dev")
                | grant("kopf.dev", "clusterkopfpeerings", "get list watch patch")
                | grant("", "events", "create patch") | grant("events.k8s.io", "events", "create patch")
                # its serving certificate (flowmap_operator.certs), in its own namespace only
                | grant("", "secrets", "get update", "flowmap-operator-tls")
                | grant("", "configmaps", "get update", "flowmap-ca")
                # the marks of its edge series (flowmap_operator.checkpointing), likewise
                | grant("", "configmaps", "get update", " ".join(checkpointing.name(i) for i in range(SHARDS)))
                | grant("", "secrets configmaps", "create"))
    assert rules(installed, OPERATOR) == expected
    # Elsewhere it has no secrets or configmaps at all.
    assert rules(installed, OPERATOR, "shop") == {r for r in expected if r[1] not in ("secrets", "configmaps")}
    # In kube-system, the one ConfigMap that says how the API server proxies (the front proxy's CA).
    assert {r for r in rules(installed, OPERATOR, "kube-system") if r[1] in ("secrets", "configmaps")} == grant(
        "", "configmaps", "get list watch", "extension-apiserver-authentication")


def can(plane: ControlPlane, who: str, verb: str, what: str, namespace: str | None = NS, sub: str = "") -> bool:
    args = ["auth", "can-i", verb, what, f"--as={who}", "--quiet"]
    args += ["-n", namespace] if namespace else ["--all-namespaces"]
    args += [f"--subresource={sub}"] if sub else []
    return _answer(plane.kubectl(*args, check=False).returncode)


def _answer(code: int) -> bool:
    assert code in (0, 1), f"kubectl auth can-i failed ({code})"
    return code == 0


MATRIX = [  # (who, verb, resource, namespace (None: all), subresource, allowed)
    (OPERATOR, "get", "secrets", None, "", False),
    (OPERATOR, "list", "secrets", NS, "", False),
    (OPERATOR, "get", "secrets/other", NS, "", False),
    (OPERATOR, "get", "secrets/flowmap-operator-tls", NS, "", True),
    (OPERATOR, "create", "secrets", "shop", "", False),
    (OPERATOR, "update", "connections", None, "", False),  # the spec is the edge's identity
    (OPERATOR, "patch", "groups", None, "", False),
    (OPERATOR, "update", "connections", None, "status", True),
    (OPERATOR, "update", "networklearningpolicies", "shop", "", False),  # users own the spec
    (OPERATOR, "create", "pods", NS, "", False),
    (OPERATOR, "create", "serviceaccounts", NS, "token", False),
    (OPERATOR, "impersonate", "users", None, "", False),
    (AGENT, "list", "pods", None, "", True),
    (AGENT, "get", "pods", NS, "", False),
    (AGENT, "get", "nodes", None, "", True),
    (AGENT, "list", "nodes", None, "", False),
    (AGENT, "get", "configmaps/flowmap-ca", NS, "", False),  # mounted by the kubelet, not read by the agent
    (AGENT, "create", "connections", None, "", False),
    (AGENT, "create", "tokenreviews", None, "", False),
    (VIEWER, "list", "connections", None, "", True),
    (VIEWER, "watch", "groups", None, "", True),
    (VIEWER, "get", "networklearningpolicies", "shop", "", True),
    (VIEWER, "create", "networklearningpolicies", "shop", "", False),
    (VIEWER, "delete", "connections", None, "", False),
    (VIEWER, "get", "secrets", NS, "", False),
    (EDITOR, "list", "connections", None, "", True),
    (EDITOR, "create", "networklearningpolicies", "shop", "", True),
    (EDITOR, "update", "networklearningpolicies", "shop", "", True),
    (EDITOR, "delete", "networklearningpolicies", "shop", "", True),
    (EDITOR, "update", "networklearningpolicies", "shop", "status", False),
    (EDITOR, "update", "connections", None, "status", False),
    (EDITOR, "patch", "groups", None, "status", False),
    (EDITOR, "create", "connections", None, "", False),
    (EDITOR, "delete", "groups", None, "", False),
    (NOBODY, "list", "connections", None, "", False),
    # Capturing a namespace is `create packetcaptures` there (reading the files: see the
    # SubjectAccessReview test below; `kubectl auth can-i` cannot name a group no API serves).
    (VIEWER, "list", "packetcaptures", "shop", "", True),
    (VIEWER, "get", "packetcaptures", "shop", "", True),
    (VIEWER, "create", "packetcaptures", "shop", "", False),
    (VIEWER, "delete", "packetcaptures", "shop", "", False),
    (EDITOR, "create", "packetcaptures", "shop", "", True),
    (EDITOR, "delete", "packetcaptures", "shop", "", True),
    (EDITOR, "update", "packetcaptures", "shop", "", False),  # the spec is immutable anyway
    (EDITOR, "patch", "packetcaptures", "shop", "", True),  # its metadata: the stop annotation
    (VIEWER, "patch", "packetcaptures", "shop", "", False),  # may not stop a capture
    (EDITOR, "patch", "packetcaptures", "shop", "status", False),
    (OPERATOR, "watch", "packetcaptures", None, "", True),
    (OPERATOR, "patch", "packetcaptures", "shop", "status", True),
    (OPERATOR, "update", "packetcaptures", "shop", "status", False),
    (OPERATOR, "create", "packetcaptures", "shop", "", False),
    (OPERATOR, "delete", "packetcaptures", "shop", "", False),
    (AGENT, "list", "packetcaptures", None, "", False),
    (NOBODY, "get", "packetcaptures", "shop", "", False),
]


@pytest.mark.parametrize(("who", "verb", "what", "namespace", "sub", "allowed"), MATRIX,
                         ids=[f"{m[0].rsplit(':', 1)[-1]}-{m[1]}-{m[2]}{'/' + m[4] if m[4] else ''}-{m[5]}"
                              for m in MATRIX])
def test_can_i(installed: ControlPlane, who: str, verb: str, what: str, namespace: str | None, sub: str,
               allowed: bool) -> None:
    assert can(installed, who, verb, what, namespace, sub) is allowed


def test_user_roles_join_view_edit_and_admin(installed: ControlPlane) -> None:
    def labels(role: str) -> dict[str, str]:
        got = json.loads(installed.kubectl("get", "clusterrole", role, "-o", "json").stdout)
        return {k.rsplit("/", 1)[1]: v for k, v in got["metadata"]["labels"].items()
                if k.startswith("rbac.authorization.k8s.io/")}

    assert labels("flowmap-viewer") == {"aggregate-to-view": "true", "aggregate-to-edit": "true",
                                        "aggregate-to-admin": "true"}
    assert labels("flowmap-editor") == {"aggregate-to-edit": "true", "aggregate-to-admin": "true"}


CAPTURE = {"apiVersion": "flowmap.dev/v1alpha1", "kind": "PacketCapture", "metadata": {"name": "web"},
           "spec": {"targets": {"groups": ["web"]}}}


def test_capturing_a_namespace_is_creating_packetcaptures_there(installed: ControlPlane) -> None:
    # carol may edit one namespace (a RoleBinding to flowmap-editor in "capture-a") and nothing else.
    for ns in ("capture-a", "capture-b"):
        installed.kubectl("create", "namespace", ns)
    installed.kubectl("create", "rolebinding", "carol-edits", "-n", "capture-a", "--clusterrole=flowmap-editor",
                      "--user=carol")

    def create(who: str, namespace: str) -> tuple[int, str]:
        proc = installed.kubectl("create", "-n", namespace, "-f", "-", f"--as={who}", input=json.dumps(CAPTURE),
                                 check=False)
        return proc.returncode, proc.stderr

    code, err = create(VIEWER, "shop")  # may see captures, not make one: refused by name
    assert code != 0 and 'User "alice" cannot create resource "packetcaptures" in API group "flowmap.dev"' in err, err
    assert create("carol", "capture-a") == (0, "")
    code, err = create("carol", "capture-b")
    assert code != 0 and 'cannot create resource "packetcaptures"' in err and '"capture-b"' in err, err
    assert create(EDITOR, "shop") == (0, "")
    listed = installed.kubectl("get", "pcap", "-n", "shop", "-o", "name", f"--as={VIEWER}").stdout.split()
    assert listed == ["packetcapture.flowmap.dev/web"]


def test_the_file_server_asks_the_api_server_who_may_read_a_capture(installed: ControlPlane) -> None:
    # What the component serving pcapng files will do for each caller: a SubjectAccessReview.
    def allowed(user: str, namespace: str) -> bool:
        review = {"apiVersion": "authorization.k8s.io/v1", "kind": "SubjectAccessReview",
                  "spec": {"user": user, "resourceAttributes": {
                      "group": "results.flowmap.dev", "resource": "packetcaptures", "subresource": "pcapng",
                      "verb": "get", "namespace": namespace, "name": "web"}}}
        out = installed.kubectl("create", "-f", "-", "-o", "json", input=json.dumps(review)).stdout
        return bool(json.loads(out)["status"].get("allowed"))

    assert allowed(EDITOR, "shop") and not allowed(VIEWER, "shop") and not allowed(NOBODY, "shop")
    assert not allowed(OPERATOR, "shop")
