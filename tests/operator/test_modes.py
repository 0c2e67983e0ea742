"""Policy, pure: which mode each group is in, what it learns, how connections are judged, what a
node enforces. A Resolver fed as the operator's watches feed it, policies as the API returns them.
"""

from __future__ import annotations

import time
from typing import Any

import pytest

from flowmap_api import report_pb2 as pb
from flowmap_operator.policy.compiling import Compiler
from flowmap_operator.policy.modes import ALLOWED, DENIED, LEARNED, VIOLATION, Modes
from flowmap_operator.policy.rules import MAX_LEARNED, MAX_PORTS, Policy, matches
from flowmap_operator.resolution import Peer, Resolver
from flowmap_operator.status import connection_status, policy_status
from flowmap_operator.topology import THREAT, Topology
from tests.operator.harness import edge

NOW = time.time()
PODS = {  # name -> (ip, node, labels, owner)
    "web-7d4b9-x1": ("10.244.1.10", "node-a", {"app": "web", "tier": "front", "pod-template-hash": "7d4b9"}, "web-7d4b9"),
    "web-7d4b9-x2": ("10.244.2.11", "node-b", {"app": "web", "tier": "front", "pod-template-hash": "7d4b9"}, "web-7d4b9"),
    "api-5f6c8-y1": ("10.244.2.20", "node-b", {"app": "api", "tier": "back", "pod-template-hash": "5f6c8"}, "api-5f6c8"),
    "db-0": ("10.244.1.30", "node-a", {"app": "db", "tier": "back"}, "db"),
}
DNS_IP = "10.244.1.53"


def body(name: str, mode: str, *, generation: int = 1, status: dict[str, Any] | None = None,
         annotations: dict[str, str] | None = None, **spec: Any) -> dict[str, Any]:
    return {"metadata": {"namespace": "shop", "name": name, "generation": generation, "uid": f"uid-{name}",
                         "annotations": annotations or {}},
            "spec": {"mode": mode, **spec}, "status": status or {}}


def cluster() -> Resolver:
    r = Resolver()
    for node, ip in (("node-a", "172.18.0.2"), ("node-b", "172.18.0.3")):
        r.node_seen({"metadata": {"name": node}, "status": {"addresses": [{"type": "InternalIP", "address": ip}]}})
    for name, (ip, node, labels, owner) in PODS.items():
        kind = "StatefulSet" if owner == "db" else "ReplicaSet"
        r.pod_seen({"metadata": {"namespace": "shop", "name": name, "labels": labels,
                                 "ownerReferences": [{"kind": kind, "name": owner, "controller": True}]},
                    "spec": {"nodeName": node}, "status": {"phase": "Running", "podIP": ip}}, NOW)
    r.pod_seen({"metadata": {"namespace": "kube-system", "name": "coredns-1", "labels": {"k8s-app": "kube-dns"}},
                "spec": {"nodeName": "node-a"}, "status": {"phase": "Running", "podIP": DNS_IP}}, NOW)
    r.cidr_group_seen({"metadata": {"name": "partners"}, "spec": {"cidrs": ["198.51.100.0/24"]}})
    r.learn_name("203.0.113.10", "payments.example.com", 60, NOW)
    return r


def modes(*policies: dict[str, Any], default: str = "Learn", disabled: bool = False) -> Modes:
    m = Modes(cluster(), default_mode=default, enforcement_disabled=disabled)
    for p in policies:
        m.seen(p, leading=True)
    m.refresh()
    return m


def peer(r: Resolver, ip: str) -> Peer:
    return r.resolve(ip, NOW, NOW)


def judge(m: Modes, client: str, server: str, port: int, protocol: str = "TCP", *, denied: bool = False,
          answered: bool = True) -> str:
    r = m.resolver
    return m.judge(peer(r, client), peer(r, server), client, server, port, protocol, denied, answered)[0]


WEB, WEB2, API, DB = (v[0] for v in PODS.values())


def test_label_selectors_match_as_kubernetes_does() -> None:
    labels = {"app": "web", "tier": "front"}
    assert matches({}, labels)
    assert matches({"matchLabels": {"app": "web"}}, labels)
    assert not matches({"matchLabels": {"app": "api"}}, labels)
    assert matches({"matchExpressions": [{"key": "tier", "operator": "In", "values": ["front", "edge"]}]}, labels)
    assert not matches({"matchExpressions": [{"key": "tier", "operator": "NotIn", "values": ["front"]}]}, labels)
    assert matches({"matchExpressions": [{"key": "env", "operator": "NotIn", "values": ["prod"]}]}, labels)
    assert matches({"matchExpressions": [{"key": "app", "operator": "Exists"}]}, labels)
    assert not matches({"matchExpressions": [{"key": "app", "operator": "DoesNotExist"}]}, labels)


def test_selection_by_pod_labels_ignores_revision_labels_and_names_win() -> None:
    m = modes(body("all", "Learn", selector={}),
              body("back", "Monitor", selector={"matchLabels": {"tier": "back"}}),
              body("db", "Protect", groups=["shop.db"]),
              body("revision", "Protect", selector={"matchLabels": {"pod-template-hash": "7d4b9"}}))
    assert m.mode("shop.web") == ("Learn", ("shop", "all"))  # the hash label selects nothing
    assert m.mode("shop.api") == ("Monitor", ("shop", "back"))  # more terms beat {}
    assert m.mode("shop.db") == ("Protect", ("shop", "db"))  # names beat selectors
    assert m.groups["shop.db"].policies == (("shop", "all"), ("shop", "back"), ("shop", "db"))
    assert m.mode("kube-system.coredns") == ("Learn", None)  # another namespace: the default
    assert "shop.web" not in modes(body("x", "Monitor", groups=["other.web"])).groups  # names of its own namespace only


def test_equally_specific_policies_that_disagree_are_a_conflict_never_a_guess() -> None:
    m = modes(body("a", "Monitor", selector={"matchLabels": {"app": "api"}}),
              body("b", "Protect", selector={"matchLabels": {"tier": "back"}}))
    m.prior["shop.api"] = "Learn"  # what the Group showed before
    m._stale = True
    m.refresh()
    eff = m.groups["shop.api"]
    assert (eff.mode, eff.policy, eff.conflict) == ("Learn", None, (("shop", "a"), ("shop", "b")))
    status = policy_status(m, ("shop", "a"), NOW, agents={"node-a", "node-b"}, watching=set(), lossy=set())
    ready = next(c for c in status["conditions"] if c["type"] == "Ready")
    assert (ready["status"], ready["reason"]) == ("False", "ModeConflict")
    assert "shop.api" in ready["message"] and "shop/b" in ready["message"]
    # Agreeing policies are no conflict: the rules of both apply.
    agree = modes(body("a", "Monitor", selector={"matchLabels": {"app": "api"}}),
                  body("b", "Monitor", selector={"matchLabels": {"tier": "back"}}))
    assert agree.groups["shop.api"].policy == ("shop", "a") and not agree.groups["shop.api"].conflict


def test_judging_connections_by_mode_and_rules() -> None:
    rules = [{"direction": "Egress", "peer": {"group": "shop.api"}, "ports": [{"port": 8080, "protocol": "TCP"}]},
             {"direction": "Egress", "peer": {"cidr": "198.51.100.0/25"}},
             {"direction": "Ingress", "peer": {"group": "shop.web"}, "ports": [{"protocol": "TCP"}]}]
    m = modes(body("web", "Monitor", groups=["shop.web"], rules=rules[:2]),
              body("api", "Protect", groups=["shop.api"], rules=rules[2:]))
    assert judge(m, WEB, API, 8080) == ALLOWED  # web's egress rule, api's ingress rule (any TCP port)
    assert judge(m, WEB, API, 9090) == VIOLATION  # web's egress allows 8080 only; the server answered
    assert judge(m, WEB, API, 9090, answered=False) == VIOLATION  # api's rule allows it: web only monitors
    assert judge(m, WEB, API, 8080, denied=True) == DENIED  # an agent says its node blocked it
    assert judge(m, WEB, "198.51.100.7", 443) == ALLOWED  # inside the cidr
    assert judge(m, WEB, "198.51.100.200", 443) == VIOLATION  # outside it
    assert judge(m, WEB, DNS_IP, 53, "UDP") == ALLOWED  # DNS to the cluster's DNS always is
    assert judge(m, WEB, DNS_IP, 5353, "UDP") == VIOLATION
    assert judge(m, DB, "203.0.113.10", 443) == LEARNED  # no side in Monitor or Protect
    assert judge(m, DB, API, 8080, answered=False) == DENIED  # db learns, api protects
    assert m.judge(peer(m.resolver, DB), peer(m.resolver, API), DB, API, 8080, "TCP", False, False)[1] == ("shop", "api")
    # The emergency switch: nothing is blocked, so what no rule allows is a Violation.
    off = modes(body("api", "Protect", groups=["shop.api"], rules=rules[2:]), disabled=True)
    assert judge(off, DB, API, 8080, answered=False) == VIOLATION
    annotated = modes(body("api", "Protect", groups=["shop.api"], rules=rules[2:],
                           annotations={"flowmap.dev/enforcement": "disabled"}))
    assert judge(annotated, DB, API, 8080, answered=False) == VIOLATION


def test_learning_records_rules_of_learn_groups_and_collapses_ports() -> None:
    m = modes(body("web", "Learn", groups=["shop.web"]), body("api", "Monitor", groups=["shop.api"]))
    r = m.resolver
    m.learn(peer(r, WEB), peer(r, API), 8080, "TCP", {"http"}, 3, NOW - 5, NOW)
    m.learn(peer(r, WEB2), peer(r, API), 8080, "TCP", {"http", "unknown"}, 2, NOW - 9, NOW + 1)
    rules = m.policies[("shop", "web")].learned_rules()
    assert rules == [{"group": "shop.web", "direction": "Egress", "peer": "shop.api", "port": 8080, "protocol": "TCP",
                      "evidence": 5, "app": "http", "firstSeen": rules[0]["firstSeen"], "lastSeen": rules[0]["lastSeen"]}]
    assert not m.policies[("shop", "api")].learned  # Monitor learns nothing
    assert judge(m, WEB, API, 8080) == VIOLATION  # api (Monitor) has no ingress rule for web
    policy = m.policies[("shop", "web")]
    for port in range(1000, 1000 + MAX_PORTS + 1):
        policy.learn("shop.web", "Egress", "shop.db", port, "TCP", set(), 1, NOW, NOW)
    db = [r for r in policy.learned_rules() if r["peer"] == "shop.db"]
    assert [(r["port"], r["evidence"]) for r in db] == [(0, MAX_PORTS + 1)]  # one "any" rule
    assert policy.allows("shop.web", "Egress", "shop.db", "", 5432, "TCP")
    assert not policy.allows("shop.web", "Egress", "shop.db", "", 5432, "UDP")


def test_learned_rules_are_bounded_and_the_overflow_is_a_condition() -> None:
    m = modes(body("web", "Learn", groups=["shop.web"]))
    policy = m.policies[("shop", "web")]
    for n in range(MAX_LEARNED + 10):
        policy.learn("shop.web", "Egress", f"peer-{n}", 80, "TCP", set(), 1, NOW, NOW)
    assert policy.learned_count() == MAX_LEARNED and policy.learned_overflow == 10
    status = policy_status(m, ("shop", "web"), NOW, agents={"node-a", "node-b"}, watching=set(), lossy=set())
    degraded = next(c for c in status["conditions"] if c["type"] == "Degraded")
    assert degraded["status"] == "True" and "LearnedRulesFull" in degraded["reason"]
    assert len(status["learnedRules"]) == MAX_LEARNED


def test_status_round_trips_through_the_object_and_says_what_is_in_force() -> None:
    m = modes(body("web", "Learn", groups=["shop.web"]))
    r = m.resolver
    m.learn(peer(r, WEB), peer(r, API), 8080, "TCP", {"http"}, 3, NOW - 5, NOW)
    status = policy_status(m, ("shop", "web"), NOW, agents={"node-a"}, watching=set(), lossy=set())
    assert status["groups"] == ["shop.web"] and status["learnedCount"] == 1 and status["observedGeneration"] == 1
    by_type = {c["type"]: c for c in status["conditions"]}
    assert by_type["Ready"]["status"] == "True" and by_type["Learning"]["status"] == "True"
    assert by_type["Enforcing"]["reason"] == "NotProtectMode"
    assert by_type["Degraded"]["status"] == "True" and "node-b" in by_type["Degraded"]["message"]  # no agent there
    # A new operator (or a follower) takes the learned rules from the status.
    again = Policy("shop", "web")
    again.load_status(status)
    assert again.learned_rules() == m.policies[("shop", "web")].learned_rules()
    # Protect without an agent taking policy on a node of the group: not enforcing, and why.
    p = modes(body("web", "Protect", groups=["shop.web"]))
    by_type = {c["type"]: c for c in policy_status(p, ("shop", "web"), NOW, agents={"node-a", "node-b"},
                                               watching={"node-a"}, lossy=set())["conditions"]}
    assert (by_type["Enforcing"]["status"], by_type["Enforcing"]["reason"]) == ("False", "AgentsMissing")
    by_type = {c["type"]: c for c in policy_status(p, ("shop", "web"), NOW, agents={"node-a", "node-b"},
                                               watching={"node-a", "node-b"}, lossy=set())["conditions"]}
    assert by_type["Enforcing"]["status"] == "True" and by_type["Degraded"]["status"] == "False"


def test_a_node_enforces_its_protected_pods_allowed_peers() -> None:
    m = modes(body("web", "Protect", groups=["shop.web"], rules=[
        {"direction": "Egress", "peer": {"group": "shop.api"}, "ports": [{"port": 8080, "protocol": "TCP"}]},
        {"direction": "Egress", "peer": {"group": "partners"}, "ports": [{"port": 443, "protocol": "TCP"}]},
        {"direction": "Ingress", "peer": {"group": "nodes"}}]),
        body("db", "Monitor", groups=["shop.db"]))
    m.policies[("shop", "web")].learn("shop.web", "Egress", "payments.example.com", 443, "TCP", {"tls"}, 1, NOW, NOW)
    compiler = Compiler(m)
    a = compiler.node("node-a", NOW)
    assert [p.pod for p in a.pods] == ["shop/web-7d4b9-x1"]  # db is in Monitor: not enforced
    pod = a.pods[0]
    assert list(pod.ips) == [WEB]
    egress = {(tuple(p.cidrs), p.protocol, tuple(p.ports)) for p in pod.egress}
    assert egress == {((f"{API}/32",), pb.TCP, (8080,)), (("198.51.100.0/24",), pb.TCP, (443,)),
                      (("203.0.113.10/32",), pb.TCP, (443,)),
                      ((f"{DNS_IP}/32",), pb.UDP, (53,)), ((f"{DNS_IP}/32",), pb.TCP, (53,))}
    ingress = {(tuple(p.cidrs), p.protocol, tuple(p.ports)) for p in pod.ingress}
    nodes = ("172.18.0.2/32", "172.18.0.3/32")
    assert ingress == {(nodes, proto, ()) for proto in (pb.TCP, pb.UDP, pb.SCTP, pb.ICMP)}
    assert [p.pod for p in compiler.node("node-b", NOW).pods] == ["shop/web-7d4b9-x2"]
    assert compiler.node("node-b", NOW).pods[0].egress == pod.egress  # the same rules, the other pod
    assert Modes(cluster(), enforcement_disabled=True).enforcement_disabled
    off = Compiler(modes(body("web", "Protect", groups=["shop.web"]), disabled=True)).node("node-a", NOW)
    assert off.enforcement_disabled and not off.pods


def test_the_nodes_peer_holds_every_address_the_agents_report() -> None:
    """A hostNetwork client on node-a reaching a protected pod on node-b through flannel leaves from
    flannel.1's 10.244.1.0: the nodes peer must hold it, or Protect drops what the map calls nodes."""
    m = modes(body("web", "Protect", groups=["shop.web"], rules=[{"direction": "Ingress", "peer": {"group": "nodes"}}]))
    r = m.resolver
    r.node_addresses_seen("node-a", ["172.18.0.2", "10.244.1.0", "10.244.1.1", "fd00:10:244:1::"], NOW)
    cidrs = {c for p in Compiler(m).node("node-b", NOW).pods[0].ingress for c in p.cidrs}
    assert cidrs == {"172.18.0.2/32", "172.18.0.3/32", "10.244.1.0/32", "10.244.1.1/32", "fd00:10:244:1::/128"}
    version = r.version
    r.node_addresses_seen("node-a", ["172.18.0.2", "10.244.1.0"], NOW + 1)  # cni0 went away
    assert r.version > version and "10.244.1.1" not in r.node_addresses()
    r.node_gone("node-a", 0.0)
    assert r.node_addresses() == ["172.18.0.3"]


def test_judgements_reach_the_connection_and_denied_is_taken_from_the_other_node() -> None:
    m = modes(body("api", "Protect", groups=["shop.api"]))
    r = m.resolver
    r.agent_nodes.update({"node-a", "node-b"})
    topo = Topology(r, max_connections=100, max_ports=20, modes=m)
    # node-b (the server's) saw its rules stop the SYN; node-a (the client's) counts the attempt.
    denied = edge(WEB, 40000, API, 8080, local="server", bytes_s2c=0, sessions=1)
    denied.verdict = pb.DENIED
    denied.first_seen_unix_ms = 1_700_000_000_500
    b = pb.ReportBatch(agent_id="b/1", node="node-b", sequence=1, edges=[denied])
    seen = topo.ingest(b, NOW)
    key = ("shop.web", "shop.api", 8080, "TCP")
    assert seen.other_observer == 1 and seen.events == [(key, DENIED, 1_700_000_000.5)]  # what a capture's trigger waits for
    assert topo.edges[key].action == DENIED and topo.edges[key].policy == ("shop", "api")
    attempt = edge(WEB, 40000, API, 8080, bytes_s2c=0)
    attempt.packets_s2c = 0
    result = topo.ingest(pb.ReportBatch(agent_id="a/1", node="node-a", sequence=1, edges=[attempt]), NOW)
    assert result.counted == 1 and result.blocked == [(key, DENIED, 1)]
    assert topo.edges[key].action == DENIED  # not a Violation: the server never answered
    assert [e[1] for e in m.events] == [DENIED]  # raised once
    assert list(m.blocking[("shop", "api")]) == [topo.edges[key].name]  # what Protect blocks, in its status
    hit = edge(WEB, 40001, API, 8080)
    hit.threats.append(pb.ThreatHit(name="sqlinjection", snippet="' OR 1=1"))
    result = topo.ingest(pb.ReportBatch(agent_id="a/1", node="node-a", sequence=2, edges=[hit]), NOW)
    assert [kind for _, kind, _ in result.events] == [VIOLATION, THREAT]  # answered: it got through


@pytest.mark.parametrize("mode", ["Learn", "Monitor"])
def test_a_follower_takes_learned_rules_from_status_the_leader_keeps_its_own(mode: str) -> None:
    learned = {"learnedRules": [{"group": "shop.web", "direction": "Egress", "peer": "shop.api", "port": 8080,
                                 "protocol": "TCP", "evidence": 7}]}
    m = modes(body("web", mode, groups=["shop.web"], status=learned))
    assert m.policies[("shop", "web")].learned_count() == 1
    m.seen(body("web", mode, groups=["shop.web"], status={}), leading=True)
    assert m.policies[("shop", "web")].learned_count() == 1  # the leader's memory is the truth
    m.seen(body("web", mode, groups=["shop.web"], status={}), leading=False)
    assert m.policies[("shop", "web")].learned_count() == 0


def test_a_new_learn_policy_learns_what_the_map_saw_and_a_restart_doubles_nothing() -> None:
    seen = [("shop.web", "shop.api", 8080, "TCP", {"http"}, 12, NOW - 60, NOW),
            ("shop.db", "shop.web", 9000, "TCP", set(), 1, NOW - 30, NOW - 30),
            ("shop.api", "shop.db", 5432, "TCP", {"postgresql"}, 3, NOW, NOW)]  # not web's
    m = modes(body("web", "Learn", groups=["shop.web"]))
    m.seed(("shop", "web"), "shop.web", seen)
    rules = {(r["direction"], r["peer"], r["port"], r["evidence"]) for r in m.policies[("shop", "web")].learned_rules()}
    assert rules == {("Egress", "shop.api", 8080, 12), ("Ingress", "shop.db", 9000, 1)}
    # After a restart the rules come from the status, and seeding again adds nothing to them.
    again = modes(body("web", "Learn", groups=["shop.web"], status=policy_status(
        m, ("shop", "web"), NOW, agents=set(), watching=set(), lossy=set())))
    again.seed(("shop", "web"), "shop.web", seen)
    assert again.policies[("shop", "web")].learned_rules() == m.policies[("shop", "web")].learned_rules()


def test_only_a_change_of_spec_or_switch_asks_for_a_status_write() -> None:
    m = modes(body("web", "Monitor", groups=["shop.web"]))
    m.urgent.clear()
    m.seen(body("web", "Monitor", groups=["shop.web"], status={"ruleCount": 0}), leading=True)  # our write, back
    assert not m.urgent
    m.seen(body("web", "Protect", groups=["shop.web"], generation=2), leading=True)
    assert m.urgent == {("shop", "web")}
    m.urgent.clear()
    m.seen(body("web", "Protect", groups=["shop.web"], generation=2,
                annotations={"flowmap.dev/enforcement": "disabled"}), leading=True)
    assert m.urgent == {("shop", "web")}


def test_protect_for_every_workload_of_kube_system_is_a_warning() -> None:
    modes = Modes(cluster(), system_namespaces=("kube-system", "flowmap-system"))

    def warning(namespace: str, mode: str, **spec: Any) -> tuple[str, str]:
        modes.seen({"metadata": {"namespace": namespace, "name": "p", "generation": 1},
                    "spec": {"mode": mode, **spec}}, leading=True)
        c = next(c for c in policy_status(modes, (namespace, "p"), NOW, agents=set(), watching=set(), lossy=set())[
            "conditions"] if c["type"] == "Warning")
        modes.gone(namespace, "p")
        return c["status"], c["reason"]

    assert warning("kube-system", "Protect", selector={}) == ("True", "ProtectsWholeSystemNamespace")
    assert warning("flowmap-system", "Protect", selector={"matchLabels": {}}) == ("True", "ProtectsWholeSystemNamespace")
    assert warning("kube-system", "Monitor", selector={}) == ("False", "AsExpected")
    assert warning("kube-system", "Protect", selector={"matchLabels": {"k8s-app": "metrics-server"}}) == (
        "False", "AsExpected")
    assert warning("shop", "Protect", selector={}) == ("False", "AsExpected")


def test_a_protected_pod_carries_the_threats_its_policies_block() -> None:
    threats = [{"name": "sqlinjection", "action": "Block"}, {"name": "heartbleed", "action": "Alert"},
               {"name": "external-ip-mitm", "action": "Block"},  # the schema refuses it; never trusted
               {"name": "a-threat-of-tomorrow", "action": "Block"}]
    m = modes(body("web", "Protect", groups=["shop.web"], threats=threats),
              body("all", "Monitor", selector={}, threats=[{"name": "dns-tunnel", "action": "Block"}]),
              body("db", "Monitor", groups=["shop.db"], threats=[{"name": "sqlinjection", "action": "Block"}]))
    assert m.blocked_threats("shop.web") == {"sqlinjection", "dns-tunnel"}  # they add up, as rules do
    assert m.blocked_threats("shop.db") == frozenset()  # Monitor blocks nothing
    (web,) = Compiler(m).node("node-a", NOW).pods
    assert list(web.block_threats) == ["dns-tunnel", "sqlinjection"]
    off = modes(body("web", "Protect", groups=["shop.web"], annotations={"flowmap.dev/enforcement": "disabled"},
                     threats=threats))
    assert off.blocked_threats("shop.web") == frozenset() and not Compiler(off).node("node-a", NOW).pods


def test_a_threat_block_shows_denied_with_the_threat_as_the_reason() -> None:
    m = modes(body("api", "Protect", groups=["shop.api"],
                   rules=[{"direction": "Ingress", "peer": {"group": "shop.web"}}],
                   threats=[{"name": "sqlinjection", "action": "Block"}]))
    topo = Topology(m.resolver, max_connections=100, max_ports=20, modes=m)
    key = ("shop.web", "shop.api", 8080, "TCP")
    allowed = edge(WEB2, 40000, API, 8080, local="server", client_pod="")
    topo.ingest(pb.ReportBatch(agent_id="b/1", node="node-b", sequence=1, edges=[allowed]), NOW)
    assert topo.edges[key].action == ALLOWED
    # node-b (the server's, which blocks it) reset a session of the edge for its threat.
    hit = edge(WEB2, 40001, API, 8080, local="server")
    hit.threats.append(pb.ThreatHit(name="sqlinjection", snippet="' OR 1=1"))
    hit.verdict, hit.denied_for = pb.DENIED, "sqlinjection"
    seen = topo.ingest(pb.ReportBatch(agent_id="b/1", node="node-b", sequence=2, edges=[hit]), NOW)
    info = topo.edges[key]
    assert (info.action, info.denied_for, info.policy) == (DENIED, "sqlinjection", ("shop", "api"))
    assert [kind for _, kind, _ in seen.events] == [DENIED, THREAT] and seen.blocked == [(key, DENIED, 1)]
    (event,) = m.events
    assert event[:2] == (("shop", "api"), DENIED) and "blocked: threat sqlinjection" in event[2]
    assert "no rule allows it" not in event[2]
    status = policy_status(m, ("shop", "api"), NOW, agents={"node-a", "node-b"}, watching={"node-a", "node-b"},
                           lossy=set())
    assert [(e["connection"], e["reason"]) for e in status["wouldBlock"]["examples"]] == [
        (info.name, "threat sqlinjection")]
    assert connection_status(topo.ledger.plan(key), info)["deniedFor"] == "sqlinjection"
    # A later session of the edge let through is Allowed again, and the Connection says no reason.
    topo.ingest(pb.ReportBatch(agent_id="b/1", node="node-b", sequence=3, edges=[allowed]), NOW)
    assert (topo.edges[key].action, topo.edges[key].denied_for) == (ALLOWED, "")
