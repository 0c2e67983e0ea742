"""``flowmap export``'s conversion: the learned map as NetworkLearningPolicies and NetworkPolicies.

Pure, on objects as the API returns them; the NetworkPolicies are judged by an evaluator of
their semantics (tests/netpol.py) and refused or not by the real API server's dry run.
"""

from __future__ import annotations

import json
from typing import Any

import yaml

from flowmap_devenv.controlplane import ControlPlane
from flowmap_operator.exporting import Inventory, learning_policies, network_policies
from flowmap_operator.policy.rules import Policy
from tests.netpol import PodRef, allowed

PODS = {  # name -> (namespace, ip, labels, owner kind, owner)
    "web-7d4b9-x1": ("shop", "10.244.1.10", {"app": "web", "pod-template-hash": "7d4b9"}, "ReplicaSet", "web-7d4b9"),
    "web-7d4b9-x2": ("shop", "10.244.2.11", {"app": "web", "pod-template-hash": "7d4b9"}, "ReplicaSet", "web-7d4b9"),
    "api-6c9f7-k3": ("shop", "10.244.2.20", {"app": "api", "pod-template-hash": "6c9f7"}, "ReplicaSet", "api-6c9f7"),
    "redis-0": ("shop", "10.244.2.30", {"app": "redis", "statefulset.kubernetes.io/pod-name": "redis-0"},
                "StatefulSet", "redis"),
    "coredns-5d-q2": ("kube-system", "10.244.1.53", {"k8s-app": "kube-dns", "pod-template-hash": "5d"}, "ReplicaSet",
                      "coredns-5d"),
    "loner": ("shop", "10.244.1.99", {}, "", ""),
}
NODE_IPS = ["172.18.0.2", "172.18.0.3"]


def pod_objects() -> list[dict[str, Any]]:
    out = []
    for name, (ns, ip, labels, kind, owner) in PODS.items():
        meta: dict[str, Any] = {"name": name, "namespace": ns, "labels": labels}
        if owner:
            meta["ownerReferences"] = [{"kind": kind, "name": owner, "controller": True}]
        out.append({"metadata": meta, "spec": {}, "status": {"phase": "Running", "podIPs": [{"ip": ip}]}})
    return out


def conn(client: str, server: str, port: int, protocol: str = "TCP", action: str = "Learned",
         app: str = "") -> dict[str, Any]:
    return {"spec": {"client": client, "server": server, "port": port, "protocol": protocol},
            "status": {"action": action, "app": app}}


CONNECTIONS = [
    conn("shop.web", "shop.api", 8080, app="http"),
    conn("shop.web", "kube-system.coredns", 53, "UDP", app="dns"),
    conn("shop.api", "shop.redis", 6379, app="redis"),
    conn("shop.api", "payments.example.com", 443, action="Allowed", app="tls"),
    conn("nodes", "shop.api", 8080, app="http"),
    conn("shop.web", "shop.redis", 6380, action="Violation"),  # refused by a rule: not exported
    conn("shop.api", "shop.web", 0, "ICMP"),
]
GROUPS = [{"metadata": {"name": "payments.example.com"},
           "status": {"kind": "FQDN", "members": [{"name": "payments.example.com", "ips": ["203.0.113.10"]}]}}]


def inventory() -> Inventory:
    nodes = [{"status": {"addresses": [{"type": "InternalIP", "address": ip}]}} for ip in NODE_IPS]
    return Inventory.build(pod_objects(), nodes, GROUPS)


def policy(body: dict[str, Any]) -> Policy:
    p = Policy(body["metadata"]["namespace"], body["metadata"]["name"])
    p.update(body)
    p.load_status(body.get("status") or {})
    return p


def test_workloads_are_selected_by_the_labels_all_their_pods_carry() -> None:
    inv = inventory()
    assert inv.workloads["shop.web"].labels == {"app": "web"}
    assert sorted(inv.workloads["shop.web"].ips) == ["10.244.1.10", "10.244.2.11"]
    assert inv.workloads["shop.redis"].labels == {"app": "redis"}  # the per-pod label is left out
    assert inv.names == {"payments.example.com": ["203.0.113.10"]}


def test_learning_policies_carry_what_was_allowed_as_spec_rules() -> None:
    # A policy selecting redis adds its written rule; its learned rules come along too.
    redis_policy = policy({"metadata": {"namespace": "shop", "name": "cache"},
                           "spec": {"mode": "Learn", "groups": ["shop.redis"], "rules": [
                               {"direction": "Ingress", "peer": {"cidr": "10.9.0.0/16"},
                                "ports": [{"port": 6379, "protocol": "TCP"}], "app": "redis"}]},
                           "status": {"learnedRules": [{"group": "shop.redis", "direction": "Egress",
                                                        "peer": "nodes", "port": 0, "protocol": "ICMP"}]}})
    docs = {d["metadata"]["name"]: d for d in learning_policies("shop", "Protect", inventory(), CONNECTIONS,
                                                                   [redis_policy])}
    assert set(docs) == {"web", "api", "redis", "loner"}
    web = docs["web"]["spec"]
    assert (web["mode"], web["groups"]) == ("Protect", ["shop.web"])
    assert {(r["direction"], r["peer"].get("group"), r["ports"][0].get("port"), r["ports"][0]["protocol"])
            for r in web["rules"]} == {("Egress", "shop.api", 8080, "TCP"), ("Egress", "kube-system.coredns", 53, "UDP"),
                                       ("Ingress", "shop.api", None, "ICMP")}
    assert {(r["direction"], r["peer"].get("group") or r["peer"].get("cidr"), r.get("app"))
            for r in docs["redis"]["spec"]["rules"]} == {("Ingress", "shop.api", "redis"),
                                                          ("Ingress", "10.9.0.0/16", "redis"), ("Egress", "nodes", None)}


def test_network_policies_allow_exactly_the_learned_edges_and_dns() -> None:
    docs, warnings = network_policies("shop", inventory(), CONNECTIONS, [])
    assert {d["metadata"]["name"] for d in docs} == {"flowmap-web", "flowmap-api", "flowmap-redis"}
    assert any("loner" in w for w in warnings) and any("ICMP" in w for w in warnings)
    assert any("payments.example.com" in w and "203.0.113.10" in w for w in warnings)
    assert all("pod-template-hash" not in json.dumps(d) and "web-7d4b9" not in json.dumps(d) for d in docs)
    pods = [PodRef(ns, tuple(sorted(labels.items())), (ip,)) for ns, ip, labels, _, _ in PODS.values()]
    web, web2, api, redis, dns, loner = (v[1] for v in PODS.values())
    learned = [(web, api, 8080, "TCP"), (web2, api, 8080, "TCP"), (web, dns, 53, "UDP"), (api, redis, 6379, "TCP"),
               (api, "203.0.113.10", 443, "TCP"), ("172.18.0.3", api, 8080, "TCP"),
               (api, dns, 53, "UDP"), (redis, dns, 53, "TCP")]  # DNS, for everyone
    for edge in learned:
        assert allowed(docs, pods, *edge), edge
    for edge in [(web, redis, 6380, "TCP"), (web, redis, 6379, "TCP"), (api, web, 8080, "TCP"),
                 (web, api, 9090, "TCP"), (web, api, 8080, "UDP"), (redis, api, 8080, "TCP"),
                 (api, "203.0.113.11", 443, "TCP"), ("198.51.100.1", api, 8080, "TCP"), (web, dns, 5353, "UDP")]:
        assert not allowed(docs, pods, *edge), edge
    assert allowed(docs, pods, loner, api, 8080, "TCP") is False  # api's ingress does not name it
    assert allowed(docs, pods, web, loner, 80, "TCP") is False  # web's egress does not name it


def test_exports_pass_the_api_servers_dry_run(controlplane: ControlPlane) -> None:
    controlplane.kubectl("create", "namespace", "shop", check=False)
    netpols, _ = network_policies("shop", inventory(), CONNECTIONS, [])
    nlps = learning_policies("shop", "Protect", inventory(), CONNECTIONS, [])
    text = yaml.safe_dump_all(netpols + nlps)
    out = controlplane.kubectl("apply", "--server-side", "--dry-run=server", "-f", "-", input=text).stdout
    assert out.count("networkpolicy.networking.k8s.io/flowmap-") == 3
    assert out.count("networklearningpolicy.flowmap.dev/") == 4
