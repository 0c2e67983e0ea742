"""NetworkLearningPolicy against the real control plane: a real operator, the test agent's reports,
a real PolicyService stream. Learn records rules in the policy's status; Monitor marks what no
rule allows as a Violation, counts it and raises one Event; Protect streams each node what it
must enforce; the switches lift it. The namespace ``lock`` is this module's own.
"""

from __future__ import annotations

import json
import threading
import time
import urllib.request
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from flowmap_api import report_pb2 as pb
from flowmap_api import report_pb2_grpc as pb_grpc
from tests.operator.harness import Agent, Cluster, Operator, apply, create_pods, edge, pod, running
from tests.operator.test_reports import connection, wait_for

NS = "lock"
WEB, API, REDIS, DNS = "10.244.1.110", "10.244.2.120", "10.244.2.130", "10.244.1.153"
WEB_POD = "web-6b7c8-a1"


@pytest.fixture(scope="module")
def operator(cluster: Cluster) -> Iterator[Operator]:
    plane = cluster.plane
    plane.kubectl("create", "namespace", NS, check=False)
    create_pods(plane,
                pod(NS, WEB_POD, "node-a", WEB, owner=("ReplicaSet", "web-6b7c8"),
                    labels={"app": "web", "pod-template-hash": "6b7c8"}),
                pod(NS, "api-0", "node-b", API, owner=("StatefulSet", "api"), labels={"app": "api"}),
                pod(NS, "redis-0", "node-b", REDIS, owner=("StatefulSet", "redis"), labels={"app": "redis"}),
                pod("kube-system", "coredns-77f-d1", "node-a", DNS, owner=("ReplicaSet", "coredns-77f"),
                    labels={"k8s-app": "kube-dns", "pod-template-hash": "77f"}))
    yield from running(cluster, policy_status_interval=0.5)


def policy(cluster: Cluster, name: str, mode: str, **spec: Any) -> None:
    apply(cluster.plane, {"apiVersion": "flowmap.dev/v1alpha1", "kind": "NetworkLearningPolicy",
                          "metadata": {"name": name, "namespace": NS}, "spec": {"mode": mode, **spec}})


def status(cluster: Cluster, name: str) -> dict[str, Any]:
    got = json.loads(cluster.plane.kubectl("get", "nlp", name, "-n", NS, "-o", "json").stdout)
    return got.get("status") or {}


def condition(cluster: Cluster, name: str, kind: str) -> dict[str, Any]:
    return next((c for c in status(cluster, name).get("conditions", []) if c["type"] == kind), {})


def send(agent: Agent, *edges: pb.EdgeDelta) -> None:
    agent.batch(edges)
    agent.flush()


def metric(op: Operator, name: str, **labels: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{op.metrics_port}/metrics", timeout=5) as r:
        text = r.read().decode()
    return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples
               if s.name == name and labels.items() <= s.labels.items())


class Watcher:
    """The agent's side of PolicyService.Watch: every NodePolicy the operator streams."""

    def __init__(self, op: Operator, node: str, token: str) -> None:
        creds = grpc.ssl_channel_credentials(root_certificates=op.cluster.keys.ca_cert.read_bytes())
        self.channel = grpc.secure_channel(f"localhost:{op.grpc_port}", creds)
        self.got: list[pb.NodePolicy] = []
        self.error: grpc.RpcError | None = None
        self.stream = pb_grpc.PolicyServiceStub(self.channel).Watch(
            pb.WatchRequest(node=node), metadata=(("authorization", f"Bearer {token}"),) if token else ())
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        try:
            for policy in self.stream:
                self.got.append(policy)
        except grpc.RpcError as exc:
            self.error = exc

    def pods(self) -> dict[str, pb.PodPolicy]:
        return {p.pod: p for p in self.got[-1].pods} if self.got else {}

    def close(self) -> None:
        self.stream.cancel()
        self.channel.close()


def test_learn_monitor_protect(cluster: Cluster, operator: Operator) -> None:
    a = Agent(operator, "lock-a-1", "node-a", cluster.token("flowmap-agent", pod_name="agent-a"))
    watcher = Watcher(operator, "node-a", cluster.token("flowmap-agent", pod_name="agent-a"))
    try:
        # Learn: what web does becomes rules of its policy; DNS too, like any connection.
        policy(cluster, "web", "Learn", groups=[f"{NS}.web"])
        wait_for(lambda: condition(cluster, "web", "Learning").get("status") == "True", what="Learning=True")
        send(a, edge(WEB, 40000, API, 8080, sessions=4), edge(WEB, 40001, DNS, 53, proto=pb.UDP, apps=("dns",)))
        learned = wait_for(lambda: len(status(cluster, "web").get("learnedRules", [])) == 2
                           and status(cluster, "web")["learnedRules"], what="two learned rules")
        assert {(r["peer"], r["port"], r["protocol"], r.get("app"), r["evidence"]) for r in learned} == {
            (f"{NS}.api", 8080, "TCP", "http", 4), ("kube-system.coredns", 53, "UDP", "dns", 1)}
        assert all(r["group"] == f"{NS}.web" and r["direction"] == "Egress" for r in learned)
        group = wait_for(lambda: (json.loads(cluster.plane.kubectl("get", "fg", f"{NS}.web", "-o", "json").stdout)
                                  .get("status", {}).get("policy") == f"{NS}/web") and
                         json.loads(cluster.plane.kubectl("get", "fg", f"{NS}.web", "-o", "json").stdout)["status"],
                         what="the Group shows its policy")
        assert group["mode"] == "Learn"
        assert (connection(cluster, f"{NS}.web-{NS}.api-8080-tcp") or {}).get("status", {}).get("action") == "Learned"

        # Monitor: the learned connection is Allowed; a new one is a Violation, counted, raised once.
        policy(cluster, "web", "Monitor", groups=[f"{NS}.web"])
        wait_for(lambda: condition(cluster, "web", "Learning").get("status") == "False", what="Learning=False")
        send(a, edge(WEB, 40002, API, 8080), edge(WEB, 40003, REDIS, 6379, apps=("redis",), sessions=2))
        for _ in range(3):  # more sessions of the same violation: still one Event
            send(a, edge(WEB, 40004, REDIS, 6379, apps=("redis",)))
        name = f"{NS}.web-{NS}.redis-6379-tcp"
        wait_for(lambda: (connection(cluster, name) or {}).get("status", {}).get("action") == "Violation",
                 what="a Violation")
        assert connection(cluster, name)["status"]["policy"] == f"{NS}/web"
        wait_for(lambda: (connection(cluster, f"{NS}.web-{NS}.api-8080-tcp") or {}).get("status", {}).get("action")
                 == "Allowed", what="the learned connection Allowed")
        blocked = wait_for(lambda: status(cluster, "web").get("wouldBlock", {}).get("count") == 1
                           and status(cluster, "web")["wouldBlock"], what="wouldBlock")
        assert [e["connection"] for e in blocked["examples"]] == [name]
        assert metric(operator, "flowmap_policy_violations_total", server_group=f"{NS}.redis", action="Violation") == 5
        events = wait_for(lambda: json.loads(cluster.plane.kubectl(
            "get", "events", "-n", NS, "--field-selector", "involvedObject.name=web", "-o", "json").stdout)["items"],
            what="an Event")
        time.sleep(1.5)  # a second Event would come within the rate limit's second
        events = json.loads(cluster.plane.kubectl("get", "events", "-n", NS, "--field-selector",
                                                  "involvedObject.name=web", "-o", "json").stdout)["items"]
        assert [(e["reason"], e["type"], e["involvedObject"]["kind"]) for e in events] == [
            ("Violation", "Warning", "NetworkLearningPolicy")]
        assert name in events[0]["message"]
        assert not watcher.pods(), "nothing is enforced before Protect"

        # Protect: node-a's agent gets web's pod with its allowed peers; node-b has none of web's pods.
        policy(cluster, "web", "Protect", groups=[f"{NS}.web"])
        wait_for(lambda: f"{NS}/{WEB_POD}" in watcher.pods(), what="the protected pod streamed")
        web = watcher.pods()[f"{NS}/{WEB_POD}"]
        assert list(web.ips) == [WEB] and not web.ingress
        assert {(tuple(p.cidrs), p.protocol, tuple(p.ports)) for p in web.egress} == {
            ((f"{API}/32",), pb.TCP, (8080,)), ((f"{DNS}/32",), pb.UDP, (53,)), ((f"{DNS}/32",), pb.TCP, (53,))}
        enforcing = wait_for(lambda: condition(cluster, "web", "Enforcing").get("status") == "True"
                             and condition(cluster, "web", "Enforcing"), what="Enforcing=True")
        assert enforcing["observedGeneration"] == json.loads(cluster.plane.kubectl(
            "get", "nlp", "web", "-n", NS, "-o", "json").stdout)["metadata"]["generation"]
        # The attempt node-a saw go unanswered is Denied.
        attempt = edge(WEB, 40005, REDIS, 6380, apps=(), bytes_s2c=0)
        attempt.packets_s2c = 0
        send(a, attempt)
        wait_for(lambda: (connection(cluster, f"{NS}.web-{NS}.redis-6380-tcp") or {}).get("status", {}).get("action")
                 == "Denied", what="Denied")

        # The annotation switch lifts this policy's enforcement; removing the policy lifts it too.
        version = watcher.got[-1].version
        cluster.plane.kubectl("annotate", "nlp", "web", "-n", NS, "flowmap.dev/enforcement=disabled")
        wait_for(lambda: watcher.got[-1].version > version and not watcher.pods(), what="enforcement lifted")
        # The stream changes first; the policy's status is written after it.
        wait_for(lambda: condition(cluster, "web", "Enforcing").get("reason") in ("EnforcementDisabled", ""),
                 what="Enforcing says EnforcementDisabled")
        cluster.plane.kubectl("annotate", "nlp", "web", "-n", NS, "flowmap.dev/enforcement-")
        wait_for(lambda: f"{NS}/{WEB_POD}" in watcher.pods(), what="enforced again")
        cluster.plane.kubectl("delete", "nlp", "web", "-n", NS)
        wait_for(lambda: not watcher.pods(), what="the deleted policy lifted")
        assert watcher.error is None
    finally:
        watcher.close()


def test_what_only_the_operator_can_judge_is_a_condition(cluster: Cluster, operator: Operator) -> None:
    policy(cluster, "foreign", "Monitor", groups=["other.web"])
    ready = wait_for(lambda: condition(cluster, "foreign", "Ready").get("status") == "False"
                     and condition(cluster, "foreign", "Ready"), what="Ready=False")
    assert ready["reason"] == "InvalidGroups" and "other.web" in ready["message"]
    # Two policies as specific as each other that disagree: a condition on both, and on the Group.
    policy(cluster, "a", "Monitor", selector={"matchLabels": {"app": "api"}})
    policy(cluster, "b", "Protect", selector={"matchLabels": {"app": "api"}})
    for name in ("a", "b"):
        ready = wait_for(lambda: condition(cluster, name, "Ready").get("reason") == "ModeConflict"
                         and condition(cluster, name, "Ready"), what=f"ModeConflict on {name}")
        assert f"{NS}.api" in ready["message"]
    for name in ("foreign", "a", "b"):
        cluster.plane.kubectl("delete", "nlp", name, "-n", NS)


def test_watch_refuses_what_report_refuses(cluster: Cluster, operator: Operator) -> None:
    for token, node, code in ((None, "node-a", grpc.StatusCode.UNAUTHENTICATED),
                              (cluster.token("flowmap-agent", pod_name="agent-a"), "node-b",
                               grpc.StatusCode.PERMISSION_DENIED),
                              (cluster.token("flowmap-operator"), "node-a", grpc.StatusCode.PERMISSION_DENIED)):
        watcher = Watcher(operator, node, token or "")
        try:
            wait_for(lambda: watcher.error is not None, what="a refusal")
            assert watcher.error.code() == code and not watcher.got
        finally:
            watcher.close()



def test_protect_for_all_of_kube_system_is_accepted_with_a_warning(cluster: Cluster, operator: Operator) -> None:
    # As found: accepted without a word; the cluster's DNS and CNI are then blocked from whatever
    # they were not seen doing.
    def warning(name: str, namespace: str) -> dict[str, Any]:
        got = json.loads(cluster.plane.kubectl("get", "nlp", name, "-n", namespace, "-o", "json").stdout)
        return next((c for c in (got.get("status") or {}).get("conditions", []) if c["type"] == "Warning"), {})

    apply(cluster.plane, {"apiVersion": "flowmap.dev/v1alpha1", "kind": "NetworkLearningPolicy",
                          "metadata": {"name": "everything", "namespace": "kube-system"},
                          "spec": {"mode": "Protect", "selector": {}}})
    policy(cluster, "everything", "Protect", selector={})  # the same in an application's namespace: fine
    try:
        said = wait_for(lambda: warning("everything", "kube-system").get("status") == "True"
                        and warning("everything", "kube-system"), what="the warning")
        assert said["reason"] == "ProtectsWholeSystemNamespace" and "kube-system" in said["message"]
        assert said["observedGeneration"] == 1
        assert wait_for(lambda: warning("everything", NS), what="the policy's conditions")["status"] == "False"
    finally:
        cluster.plane.kubectl("delete", "nlp", "everything", "-n", "kube-system")
        cluster.plane.kubectl("delete", "nlp", "everything", "-n", NS)


def test_a_session_blocked_for_its_threat_is_denied_with_the_threat_named(cluster: Cluster, operator: Operator) -> None:
    web_agent = Agent(operator, "lock-a-threat", "node-a", cluster.token("flowmap-agent", pod_name="agent-a"))
    api_agent = Agent(operator, "lock-b-threat", "node-b", cluster.token("flowmap-agent", pod_name="agent-b"))
    watcher = Watcher(operator, "node-b", cluster.token("flowmap-agent", pod_name="agent-b"))
    name = f"{NS}.web-{NS}.api-8443-tcp"
    try:
        policy(cluster, "api", "Protect", groups=[f"{NS}.api"],
               rules=[{"direction": "Ingress", "peer": {"group": f"{NS}.web"}}],
               threats=[{"name": "sqlinjection", "action": "Block"}, {"name": "heartbleed"}])
        # node-b's agent is told which threats to block for api's pod; heartbleed is only alerted on.
        wait_for(lambda: "lock/api-0" in watcher.pods(), what="api's pod streamed")
        assert list(watcher.pods()["lock/api-0"].block_threats) == ["sqlinjection"]
        send(web_agent, edge(WEB, 41000, API, 8443))
        wait_for(lambda: (connection(cluster, name) or {}).get("status", {}).get("action") == "Allowed",
                 what="Allowed")
        # node-b reset a session of it for its threat (the server's node blocks it; the client's counts it).
        blocked = edge(WEB, 41001, API, 8443, local="server")
        blocked.threats.append(pb.ThreatHit(name="sqlinjection", snippet="' OR 1=1 --"))
        blocked.verdict, blocked.denied_for = pb.DENIED, "sqlinjection"
        send(api_agent, blocked)
        shown = wait_for(lambda: (connection(cluster, name) or {}).get("status", {}).get("action") == "Denied"
                         and connection(cluster, name)["status"], what="Denied")
        assert shown["deniedFor"] == "sqlinjection" and shown["policy"] == f"{NS}/api"
        examples = wait_for(lambda: status(cluster, "api").get("wouldBlock", {}).get("examples"),
                            what="the policy's blocked list")
        assert [(e["connection"], e["reason"]) for e in examples] == [(name, "threat sqlinjection")]
        events = wait_for(lambda: [e for e in json.loads(cluster.plane.kubectl(
            "get", "events", "-n", NS, "--field-selector", "involvedObject.name=api", "-o", "json").stdout)["items"]
            if e["reason"] == "Denied"], what="an Event")
        assert "blocked: threat sqlinjection" in events[0]["message"] and name in events[0]["message"]
        # Monitor blocks no threat: the node is told none.
        policy(cluster, "api", "Monitor", groups=[f"{NS}.api"], threats=[{"name": "sqlinjection", "action": "Block"}])
        wait_for(lambda: not watcher.pods(), what="nothing enforced in Monitor")
        assert watcher.error is None
    finally:
        watcher.close()
        cluster.plane.kubectl("delete", "nlp", "api", "-n", NS)
