"""What a namespace's workloads were seen doing, as YAML for git (pure: API objects in, objects out).

A workload's rules are what the map allows of it: its Connections that no rule refused (Learned,
Allowed), and the rules of the policies that select it (``spec.rules`` and the learned rules).
Two forms:

* ``nlp``: one NetworkLearningPolicy per workload, selecting it by name, its rules as
  ``spec.rules`` — to commit, then switch to Monitor or Protect;
* ``networkpolicy``: one ``networking.k8s.io/v1`` NetworkPolicy per workload, selecting its pods by
  the labels all of them carry (never pod names), peers as pod and namespace selectors, or
  ipBlocks for nodes, CIDR groups, names learned from DNS and the outside; DNS to the cluster's
  DNS always allowed. What NetworkPolicy cannot say (ICMP, a workload without labels of its own)
  is left out and named in the warnings.

libvirt VMs on the nodes are workloads of the operator's VM namespace (their Groups, of kind VM,
list them with their addresses): a NetworkLearningPolicy selects them by name and their node
enforces it, but a NetworkPolicy selects pods only. So ``networkpolicy`` makes none for a VM
(a warning says to use ``nlp``), and a pod's peer that is a VM becomes its addresses as its
Group last listed them (a warning says so).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, cast

from flowmap_operator.policy.rules import ANY, Policy
from flowmap_operator.resolution import EXTERNAL, LIBVIRT, NODES, RUNTIME_LABELS, VM_KIND, group_name, workload_of

Obj = Mapping[str, Any]
RuleKey = tuple[str, str, str, int, str]  # direction, peer group, peer cidr, port, protocol
DNS_PEER = {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "kube-system"}},
            "podSelector": {"matchLabels": {"k8s-app": "kube-dns"}}}


@dataclass
class Workload:
    namespace: str
    name: str
    group: str
    labels: dict[str, str]  # carried by all its pods
    ips: list[str] = field(default_factory=list)
    vm: bool = False  # libvirt VMs on nodes, not pods


@dataclass
class Inventory:
    """The cluster as the export needs it."""

    workloads: dict[str, Workload]  # group -> workload, every namespace
    node_ips: list[str]
    cidrs: dict[str, list[str]]  # CIDR group -> networks
    names: dict[str, list[str]]  # FQDN group -> addresses last seen

    @classmethod
    def build(cls, pods: Iterable[Obj], nodes: Iterable[Obj], groups: Iterable[Obj]) -> Inventory:
        workloads: dict[str, Workload] = {}
        for pod in pods:
            meta, status = pod.get("metadata") or {}, pod.get("status") or {}
            if (pod.get("spec") or {}).get("hostNetwork") or status.get("phase") in ("Succeeded", "Failed"):
                continue
            namespace = meta.get("namespace", "")
            _, name = workload_of(pod, {})
            labels = {k: v for k, v in (meta.get("labels") or {}).items() if k not in RUNTIME_LABELS}
            group = group_name(namespace, name)
            found = workloads.get(group)
            if found is None:
                found = workloads[group] = Workload(namespace, name, group, labels)
            else:
                found.labels = {k: v for k, v in found.labels.items() if labels.get(k) == v}
            found.ips += [p["ip"] for p in status.get("podIPs") or [] if p.get("ip")]
        node_ips = sorted(a["address"] for n in nodes for a in (n.get("status") or {}).get("addresses") or []
                          if a.get("type") in ("InternalIP", "ExternalIP"))
        cidrs, names = {}, {}
        for g in groups:
            name, spec, status = g["metadata"]["name"], g.get("spec") or {}, g.get("status") or {}
            if spec.get("cidrs"):
                cidrs[name] = list(spec["cidrs"])
            elif status.get("kind") == "FQDN":
                names[name] = sorted({ip for m in status.get("members") or [] for ip in m.get("ips") or []})
            elif status.get("kind") == VM_KIND and (status.get("workload") or {}).get("kind") == LIBVIRT:
                workloads[name] = Workload(status.get("namespace", ""), status["workload"].get("name", ""), name, {},
                                           sorted({ip for m in status.get("members") or [] for ip in m.get("ips") or []}),
                                           vm=True)
        return cls(workloads, node_ips, cidrs, names)


def rules_of(group: str, connections: Iterable[Obj], policies: Iterable[Policy],
             labels: Mapping[str, str]) -> dict[RuleKey, str]:
    """A workload group's rules: (direction, peer group, peer cidr, port, protocol) -> app."""
    rules: dict[RuleKey, str] = {}

    def add(key: RuleKey, app: str) -> None:
        apps = set(filter(None, rules.get(key, "").split(","))) | set(filter(None, app.split(",")))
        rules[key] = ",".join(sorted(apps - {"unknown"}))

    for c in connections:
        spec, status = c.get("spec") or {}, c.get("status") or {}
        if status.get("action", "Learned") not in ("Learned", "Allowed"):
            continue
        for me, peer, direction in ((spec.get("client"), spec.get("server"), "Egress"),
                                    (spec.get("server"), spec.get("client"), "Ingress")):
            if me == group:  # the schema requires client and server: peer is a name
                add((direction, cast(str, peer), "", int(spec.get("port", 0)), spec.get("protocol", "TCP")),
                    status.get("app", ""))
    for policy in policies:
        if not policy.selects(group, labels):
            continue
        for rule in policy.rules:
            for port, protocol in rule.ports or [(ANY, p) for p in ("TCP", "UDP", "SCTP", "ICMP")]:
                add((rule.direction, rule.peer, str(rule.cidr) if rule.cidr else "", port, protocol), rule.app)
        for r in policy.learned_rules(group):
            add((r["direction"], r["peer"], "", r["port"], r["protocol"]), r.get("app", ""))
    return rules


def learning_policies(namespace: str, mode: str, inventory: Inventory, connections: list[Obj],
                      policies: list[Policy]) -> list[dict[str, Any]]:
    """One NetworkLearningPolicy per workload of the namespace, its rules in spec."""
    out = []
    for w in sorted((w for w in inventory.workloads.values() if w.namespace == namespace), key=lambda w: w.name):
        rules = []
        for (direction, peer, cidr, port, protocol), app in sorted(rules_of(w.group, connections, policies,
                                                                             w.labels).items()):
            rule: dict[str, Any] = {"direction": direction, "peer": {"cidr": cidr} if cidr else {"group": peer},
                                    "ports": [{"port": port, "protocol": protocol} if port else {"protocol": protocol}]}
            if app and "," not in app:
                rule["app"] = app
            rules.append(rule)
        out.append({"apiVersion": "flowmap.dev/v1alpha1", "kind": "NetworkLearningPolicy",
                    "metadata": {"name": w.name, "namespace": namespace},
                    "spec": {"mode": mode, "groups": [w.group], "rules": rules[:1024]}})
    return out


def _ip_blocks(addresses: Iterable[str]) -> list[dict[str, Any]]:
    blocks = []
    for a in sorted(set(addresses)):
        net = ipaddress.ip_network(a if "/" in a else f"{a}/{32 if ':' not in a else 128}", strict=False)
        blocks.append({"ipBlock": {"cidr": str(net)}})
    return blocks


def network_policies(namespace: str, inventory: Inventory, connections: list[Obj],
                     policies: list[Policy]) -> tuple[list[dict[str, Any]], list[str]]:
    """One NetworkPolicy per workload of the namespace, and warnings for what it cannot say."""
    out, warnings = [], []

    def peers(group: str, cidr: str) -> list[dict[str, Any]] | None:
        if cidr:
            return _ip_blocks([cidr])
        w = inventory.workloads.get(group)
        if w is not None and w.vm:
            if not w.ips:
                warnings.append(f"{group}: a libvirt VM with no address known; left out")
                return None
            warnings.append(f"{group}: a libvirt VM is no pod; its addresses as its Group last listed them "
                            f"({', '.join(w.ips[:4])}) are allowed instead")
            return _ip_blocks(w.ips)
        if w is not None:
            if not w.labels:
                warnings.append(f"{group}: its pods share no label to select them by; left out")
                return None
            selector: dict[str, Any] = {"podSelector": {"matchLabels": dict(sorted(w.labels.items()))}}
            if w.namespace != namespace:
                selector["namespaceSelector"] = {"matchLabels": {"kubernetes.io/metadata.name": w.namespace}}
            return [selector]
        if group == NODES:
            return _ip_blocks(inventory.node_ips)
        if group == EXTERNAL:
            return _ip_blocks(["0.0.0.0/0", "::/0"])
        if group in inventory.cidrs:
            return _ip_blocks(inventory.cidrs[group])
        if inventory.names.get(group):
            warnings.append(f"{group}: NetworkPolicy has no names; its addresses as last seen "
                            f"({', '.join(inventory.names[group][:4])}) are allowed instead")
            return _ip_blocks(inventory.names[group])
        warnings.append(f"{group}: no pods or addresses known any more; left out")
        return None

    for w in sorted((w for w in inventory.workloads.values() if w.namespace == namespace), key=lambda w: w.name):
        if w.vm:
            warnings.append(f"{w.group}: a libvirt VM; a NetworkPolicy selects pods only: no NetworkPolicy for it "
                            "(export it with --format nlp: its node enforces a NetworkLearningPolicy)")
            continue
        if not w.labels:
            warnings.append(f"{w.group}: its pods share no label to select them by; no NetworkPolicy for it")
            continue
        sections: dict[str, list[dict[str, Any]]] = {"Egress": [], "Ingress": []}
        for (direction, peer, cidr, port, protocol), _ in sorted(rules_of(w.group, connections, policies,
                                                                          w.labels).items()):
            if protocol == "ICMP":
                warnings.append(f"{w.group}: {direction} ICMP with {peer or cidr} cannot be said in a NetworkPolicy")
                continue
            selected = peers(peer, cidr)
            if selected is None:
                continue
            entry = {"to" if direction == "Egress" else "from": selected,
                     "ports": [{"protocol": protocol, "port": port} if port else {"protocol": protocol}]}
            if entry not in sections[direction]:
                sections[direction].append(entry)
        dns = {"to": [DNS_PEER], "ports": [{"protocol": "UDP", "port": 53}, {"protocol": "TCP", "port": 53}]}
        sections["Egress"].insert(0, dns)
        out.append({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
                    "metadata": {"name": f"flowmap-{w.name}"[:253], "namespace": namespace,
                                 "labels": {"app.kubernetes.io/managed-by": "flowmap"}},
                    "spec": {"podSelector": {"matchLabels": dict(sorted(w.labels.items()))},
                             "policyTypes": ["Ingress", "Egress"],
                             "ingress": sections["Ingress"], "egress": sections["Egress"]}})
    return out, warnings

