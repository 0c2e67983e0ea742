"""flowmap on a real cluster, installed from its image and manifests, on both CNI shapes.

The shop's pods are real Deployments and StatefulSets of the shop image; the traffic is their own
(the shop's program run in them with ``kubectl exec``). Ground truth: an nftables counter per edge
and direction in the forward hook of the client's node, ahead of everything else (priority -300):
the kernel counts IP lengths, as the dp does, after kube-proxy's DNAT (so a ClusterIP call is
counted towards the pod that got it, which is what the Connection names) and, on the bridge, for
bridged frames too (br_netfilter, as flannel needs it).
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import yaml

from flowmap_devenv.cluster import INTERNET, PAYMENTS
from flowmap_dp.pcapfile import read_records
from flowmap_dp.session import Timeouts
from flowmap_operator.naming import connection_name, object_name
from tests.cluster.conftest import SHOP_NODES, Real

ROUNDS = 15
# name -> client group, server group, port, protocol, client app, server app (None: the internet), app
EDGES: dict[str, tuple[str, str, int, str, str, str | None, str]] = {
    "web-api": ("shop.web", "shop.api", 8080, "TCP", "web", "api", "http"),
    "web-grpc": ("shop.web", "shop.api", 9090, "TCP", "web", "api", "grpc"),
    "web-redis": ("shop.web", "shop.redis", 6379, "TCP", "web", "redis", "redis"),
    "web-dns": ("shop.web", "kube-system.coredns", 53, "UDP", "web", "coredns", "dns"),
    "api-redis": ("shop.api", "shop.redis", 6379, "TCP", "api", "redis", "redis"),
    "api-postgres": ("shop.api", "shop.postgres", 5432, "TCP", "api", "postgres", "postgresql"),
    "api-payments": ("shop.api", object_name(PAYMENTS), 443, "TCP", "api", None, "tls"),
    "api-dns": ("shop.api", "kube-system.coredns", 53, "UDP", "api", "coredns", "dns"),
    "worker-api": ("shop.worker", "shop.api", 8080, "TCP", "worker", "api", "http"),
    "worker-dns": ("shop.worker", "kube-system.coredns", 53, "UDP", "worker", "coredns", "dns"),
}
# The cluster's own traffic, which the map must show too (and nothing else). Not counted exactly:
# it never stops.
INFRASTRUCTURE = {
    ("nodes", "shop.api", 8080, "TCP"),  # kubelet probes, from the node (on ptp: from its gateway address)
    ("nodes", "shop.redis", 6379, "TCP"),
    ("nodes", "shop.postgres", 5432, "TCP"),
    ("nodes", "kube-system.coredns", 8080, "TCP"),
    ("nodes", "kube-system.coredns", 8181, "TCP"),
    ("nodes", "flowmap-system.flowmap-operator", 9090, "TCP"),
    ("nodes", "flowmap-system.flowmap-operator", 9443, "TCP"),  # the agents' reports (and the probe)
    ("nodes", "kube-system.coredns", 53, "UDP"),  # the agents look up the operator's Service
    ("nodes", "external", 6443, "TCP"),  # kubelet, kube-proxy, flannel, the agents: the API server is off the nodes
    ("external", "nodes", 10250, "TCP"),  # the API server to the kubelets: kubectl exec
    ("external", "flowmap-system.flowmap-operator", 9444, "TCP"),  # the API server to results.flowmap.dev
    # ICMP from outside the cluster (this machine or the router) to a node: the network's own, seen
    # now and then on bridge-vxlan (2 runs in 8); which message it is is not pinned down yet.
    ("external", "nodes", 0, "ICMP"),
    ("flowmap-system.flowmap-operator", "default.kubernetes", 6443, "TCP"),
    ("flowmap-system.flowmap-operator", "kube-system.coredns", 53, "UDP"),
    ("kube-system.coredns", "default.kubernetes", 6443, "TCP"),
}


def arm_counters(real: Real, table: str) -> None:
    """One counter per shop edge and direction on the client's node; fresh at zero."""
    per_node: dict[int, list[str]] = {0: [], 1: []}
    for name, (_, _, port, proto, client, server, _) in EDGES.items():
        c, s, l4 = real.pods[client], INTERNET if server is None else real.pods[server], proto.lower()
        per_node[SHOP_NODES[client]] += [
            f'ip saddr {c} ip daddr {s} {l4} dport {port} counter comment "{name}-c2s"',
            f'ip saddr {s} ip daddr {c} {l4} sport {port} counter comment "{name}-s2c"']
    for node, rules in per_node.items():
        body = "\n    ".join(rules)
        real.nft(node, f"table inet {table}\ndelete table inet {table}\n"
                       f"table inet {table} {{\n  chain forward {{\n    type filter hook forward priority -300;\n"
                       f"    {body}\n  }}\n}}\n")


def kernel(real: Real, table: str) -> dict[str, tuple[int, int, int, int]]:
    """Per edge: bytes c2s, bytes s2c, packets c2s, packets s2c, as the kernel counted them."""
    got = {**real.counters(0, table), **real.counters(1, table)}
    return {name: (got[f"{name}-c2s"][0], got[f"{name}-s2c"][0], got[f"{name}-c2s"][1], got[f"{name}-s2c"][1])
            for name in EDGES}


def counted(real: Real, since: dict[str, tuple[int, int, int, int]] | None = None
            ) -> dict[str, tuple[int, int, int, int]]:
    """The same from the Connections, less what they held at ``since``."""
    conns = real.connections()
    out = {}
    for name, e in EDGES.items():
        st = conns.get(connection_name(*e[:4]), {}).get("status", {})
        b, p = st.get("bytes", {}), st.get("packets", {})
        now = (b.get("clientToServer", 0), b.get("serverToClient", 0), p.get("clientToServer", 0),
               p.get("serverToClient", 0))
        base = (since or {}).get(name, (0, 0, 0, 0))
        out[name] = tuple(x - y for x, y in zip(now, base))  # type: ignore[assignment]
    return out


def converge(real: Real, table: str, since: dict[str, tuple[int, int, int, int]], timeout: float = 120) -> None:
    truth = kernel(real, table)
    assert all(c2s and s2c for c2s, s2c, _, _ in truth.values()), f"an edge had no traffic: {truth}"
    end = time.monotonic() + timeout
    while (now := counted(real, since)) != truth:
        assert time.monotonic() < end, (f"Connections do not match the kernel's counters on {real.cni}:\n"
                                        f"kernel {truth}\nmap    {now}")
        time.sleep(1)


def shop_rounds(real: Real, rounds: int, pause: float) -> None:
    outputs = real.in_parallel(("web", "--rounds", str(rounds), "--pause", str(pause)),
                               ("api", "--rounds", str(rounds), "--pause", str(pause)),
                               ("worker", "--rounds", str(rounds), "--pause", str(pause)))
    for out in outputs:
        assert out.strip().endswith(f"done {rounds} 0"), out


def test_shop_traffic_becomes_exactly_the_expected_connections(real: Real) -> None:
    since = counted(real)  # nothing yet, unless a probe-less edge was made by hand
    arm_counters(real, "truth")
    shop_rounds(real, ROUNDS, 0.1)
    ended = time.monotonic()
    converge(real, "truth", since)
    # Every session of the rounds has ended and been reported, the halves a node sees of a DNAT'd
    # cross-node call too (one FIN each: they end idle, after tcp_closing): their applications
    # are in, whatever they are.
    time.sleep(max(0.0, ended + Timeouts().tcp_closing + 5 - time.monotonic()))
    conns = real.connections()
    shop = {connection_name(*e[:4]): name for name, e in EDGES.items()}
    for conn, name in shop.items():
        assert conns[conn]["status"]["applications"] == [EDGES[name][6]], conns[conn]["status"]
    keys = {(c["spec"]["client"], c["spec"]["server"], c["spec"]["port"], c["spec"]["protocol"])
            for c in conns.values()}
    unexpected = keys - {e[:4] for e in EDGES.values()} - INFRASTRUCTURE
    assert not unexpected, f"edges no workload made, or misnamed, on {real.cni}: {sorted(unexpected)}"
    assert ("nodes", "shop.api", 8080, "TCP") in keys, "the kubelet's probe of the api is not from nodes"


def test_counters_stay_exact_through_operator_and_agent_restarts(real: Real) -> None:
    since = counted(real)
    arm_counters(real, "truth2")
    done: list[str] = []

    def kill_and_restart() -> None:
        time.sleep(4)
        real.kubectl("-n", "flowmap-system", "delete", "pod", "-l", "app.kubernetes.io/name=flowmap-operator",
                     "--force", "--grace-period=0")
        time.sleep(4)
        real.kubectl("-n", "flowmap-system", "rollout", "restart", "daemonset/flowmap-agent")
        real.kubectl("-n", "flowmap-system", "rollout", "status", "daemonset/flowmap-agent", "--timeout=180s",
                     timeout=200)
        done.append("restarted")

    chaos = threading.Thread(target=kill_and_restart)
    chaos.start()
    shop_rounds(real, 60, 0.3)
    chaos.join()
    assert done == ["restarted"]
    real.kubectl("-n", "flowmap-system", "rollout", "status", "deployment/flowmap-operator", "--timeout=180s",
                 timeout=200)
    converge(real, "truth2", since, timeout=180)


def export(real: Real, *args: str) -> list[dict[str, Any]]:
    done = subprocess.run([sys.executable, "-m", "flowmap_cli", "export", "--kubeconfig", str(real.cluster.kubeconfig),
                           "--namespace", "shop", *args], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return [d for d in yaml.safe_load_all(done.stdout) if d]


def test_exported_networkpolicies_are_accepted_by_the_cluster(real: Real) -> None:
    docs = export(real, "--format", "networkpolicy")
    assert docs and {d["kind"] for d in docs} == {"NetworkPolicy"}, docs
    real.cluster.kubectl("apply", "-n", "shop", "-f", "-", input=yaml.safe_dump_all(docs))
    assert {d["metadata"]["name"] for d in docs} <= {
        p["metadata"]["name"] for p in real.json("-n", "shop", "get", "networkpolicies")["items"]}


def flowmap(real: Real, *args: str) -> subprocess.CompletedProcess[str]:
    """The flowmap command as a user runs it: their kubeconfig, nothing else."""
    return subprocess.run([sys.executable, "-m", "flowmap_cli", *args], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "KUBECONFIG": str(real.cluster.kubeconfig)})


def capture_status(real: Real, name: str) -> dict[str, Any]:
    return real.json("-n", "shop", "get", "packetcapture", name).get("status", {})


def wait_capture(real: Real, name: str, done: Any, what: str, timeout: float = 90) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while not done(status := capture_status(real, name)):
        assert time.monotonic() < deadline, f"{what}: {status}"
        time.sleep(1)
    return status


def test_a_capture_holds_exactly_the_packets_its_filter_selects(real: Real, tmp_path: Path) -> None:
    """web <-> redis as web's interface carried it, started, stopped and read back with the flowmap
    command: every packet the kernel forwarded between them, each cut to the snap length."""
    arm_counters(real, "capture")
    name = f"redis-{real.cni}"
    started = flowmap(real, "capture", "start", name, "-n", "shop", "--group", "web", "--peer-group", "redis",
                      "--protocol", "TCP", "--port", "6379", "--snap-length", "64", "--duration", "300")
    assert started.returncode == 0, started.stderr
    wait_capture(real, name, lambda s: [n["phase"] for n in s.get("nodes", [])] == ["Running"], "running on web's node")
    out = real.shop("web", "web", "--rounds", "5", "--pause", "0.1")
    assert out.strip().endswith("done 5 0"), out
    time.sleep(2)  # the capture's ring hands over its last block
    stopped = flowmap(real, "capture", "stop", name, "-n", "shop")
    assert stopped.returncode == 0, stopped.stderr
    status = wait_capture(real, name, lambda s: s.get("phase") == "Completed", "completed")
    file = tmp_path / "web-redis.pcapng"
    got = flowmap(real, "capture", "get", name, "-n", "shop", "-o", str(file))
    assert got.returncode == 0, got.stderr
    records = list(read_records(file))
    bytes_c2s, bytes_s2c, packets_c2s, packets_s2c = kernel(real, "capture")["web-redis"]
    assert status["totals"]["packets"] == len(records) == packets_c2s + packets_s2c, (status, packets_c2s, packets_s2c)
    assert sum(r.wire_len - 14 for r in records) == bytes_c2s + bytes_s2c  # IP lengths, as the kernel counts
    assert all(len(r.data) == min(64, r.wire_len) for r in records) and max(r.wire_len for r in records) > 64
    libpcap = subprocess.run(["tcpdump", "-nn", "-r", str(file)], capture_output=True, text=True, check=True)
    assert len(libpcap.stdout.splitlines()) == len(records)  # what Wireshark and tcpdump read, they read whole
    assert flowmap(real, "capture", "delete", name, "-n", "shop").returncode == 0


def test_protect_lets_learned_traffic_through_and_resets_the_rest(real: Real) -> None:
    policies = export(real, "--mode", "Protect")
    assert {p["spec"]["groups"][0] for p in policies} >= {"shop.web", "shop.api", "shop.worker", "shop.redis",
                                                          "shop.postgres"}
    real.cluster.kubectl("apply", "--server-side", "-f", "-", input=yaml.safe_dump_all(policies))
    deadline = time.monotonic() + 90
    while True:  # Enforcing once every node's agent runs the compiled policy
        items = real.json("-n", "shop", "get", "networklearningpolicies")["items"]
        states = {p["metadata"]["name"]: {c["type"]: c["status"] for c in p.get("status", {}).get("conditions", [])}
                  .get("Enforcing") for p in items}
        if all(v == "True" for v in states.values()):
            break
        assert time.monotonic() < deadline, f"not every policy is enforcing: {states}"
        time.sleep(1)
    shop_rounds(real, 5, 0.1)  # everything learned still passes
    # web never spoke to postgres: reset at its first SYN, and shown Denied.
    outcome, seconds = real.shop("web", "connect", real.pods["postgres"], "5432", timeout=30).split()
    assert outcome == "refused" and float(seconds) < 1, (outcome, seconds)
    name = connection_name("shop.web", "shop.postgres", 5432, "TCP")
    deadline = time.monotonic() + 60
    while (real.connections().get(name, {}).get("status", {}).get("action")) != "Denied":
        assert time.monotonic() < deadline, real.connections().get(name)
        time.sleep(1)
