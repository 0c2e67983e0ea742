"""The map ``make demo`` learns (README), as the API returns it, plus a Violation and a Denied edge.

Plain dicts, used by the pure tests as they are and written to a real API server by the others.
"""

from __future__ import annotations

from typing import Any

API_VERSION = "flowmap.dev/v1alpha1"

# (namespace, workload kind, workload, pods); then the FQDN group the shop's api pays through.
WORKLOADS = [("shop", "Deployment", "web", 2), ("shop", "Deployment", "api", 1), ("shop", "Deployment", "worker", 1),
             ("shop", "StatefulSet", "redis", 1), ("shop", "StatefulSet", "postgres", 1),
             ("kube-system", "Deployment", "coredns", 2)]
FQDN = "payments.example.com"

# client, server, port, protocol, app, action, bytes, sessions: the README's table at 17 s, and
# two the demo's shop never makes: the worker reaching into the database (Monitor mode reports
# it), and the web calling the payment service itself (Protect mode blocks it).
CONNECTIONS = [
    ("shop.api", "kube-system.coredns", 53, "UDP", "dns", "Learned", 2516, 17),
    ("shop.api", FQDN, 443, "TCP", "tls", "Learned", 46499, 16),
    ("shop.api", "shop.postgres", 5432, "TCP", "postgresql", "Learned", 23323, 17),
    ("shop.api", "shop.redis", 6379, "TCP", "redis", "Learned", 11486, 16),
    ("shop.web", "kube-system.coredns", 53, "UDP", "dns", "Learned", 5472, 18),
    ("shop.web", "shop.api", 8080, "TCP", "http", "Learned", 17280, 18),
    ("shop.web", "shop.api", 9090, "TCP", "grpc", "Learned", 29737, 18),
    ("shop.web", "shop.redis", 6379, "TCP", "redis", "Learned", 13797, 18),
    ("shop.worker", "kube-system.coredns", 53, "UDP", "dns", "Learned", 5168, 17),
    ("shop.worker", "shop.api", 8080, "TCP", "http", "Learned", 17485, 18),
    ("shop.worker", "shop.postgres", 5432, "TCP", "postgresql", "Violation", 3120, 2),
    ("shop.web", FQDN, 443, "TCP", "tls", "Denied", 1480, 4),
]
VIOLATION, DENIED = "shop.worker-shop.postgres-5432-tcp", "shop.web-payments.example.com-443-tcp"


def name(client: str, server: str, port: int, protocol: str) -> str:
    """The operator's name for a Connection (flowmap_operator.naming, for these short names)."""
    return f"{client}-{server}-{port or 'any'}-{protocol.lower()}"


def groups() -> list[dict[str, Any]]:
    made = [{"apiVersion": API_VERSION, "kind": "Group",
             "metadata": {"name": f"{ns}.{workload}", "labels": {"flowmap.dev/kind": "workload",
                                                                 "flowmap.dev/namespace": ns}},
             "status": {"kind": "Workload", "namespace": ns, "workload": {"kind": kind, "name": workload},
                        "memberCount": pods, "lastSeen": "2026-11-21T10:05:00Z"}}
            for ns, kind, workload, pods in WORKLOADS]
    made.append({"apiVersion": API_VERSION, "kind": "Group",
                 "metadata": {"name": FQDN, "labels": {"flowmap.dev/kind": "fqdn"}},
                 "status": {"kind": "FQDN", "lastSeen": "2026-11-21T10:05:00Z"}})
    return made


def connections() -> list[dict[str, Any]]:
    made = []
    for client, server, port, protocol, app, action, total, sessions in CONNECTIONS:
        labels = {f"flowmap.dev/{end}-namespace": group.split(".")[0]
                  for end, group in (("client", client), ("server", server)) if group != FQDN}
        made.append({
            "apiVersion": API_VERSION, "kind": "Connection",
            "metadata": {"name": name(client, server, port, protocol), "labels": labels},
            "spec": {"client": client, "server": server, "port": port, "protocol": protocol},
            "status": {"app": app, "applications": [app], "action": action,
                       "bytes": {"clientToServer": total // 3, "serverToClient": total - total // 3, "total": total},
                       "packets": {"clientToServer": sessions * 4, "serverToClient": sessions * 4},
                       "sessions": {"total": sessions, "active": 0},
                       "firstSeen": "2026-11-21T10:04:43Z", "lastSeen": "2026-11-21T10:05:00Z"}})
    return made
