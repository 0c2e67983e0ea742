"""The whole path on the simulated cluster: real traffic between pods on two nodes becomes exactly
the expected Connections, with exactly the bytes the nodes' kernels forwarded.

The control plane is the test's own (the operator tests' shop uses the same addresses). Ground
truth: an nftables counter per edge and direction in the forward hook of the client's node, ahead
of everything else; the kernel counts IP lengths, as the dp does, and sees the ClusterIP flow
after kube-proxy's DNAT, which is what the Connection must show (the backing workload).
"""

from __future__ import annotations

import json
import signal
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from flowmap_devenv.simcluster import (API, DNS, GRPC_PORT, INTERNET, NODES, PAYMENTS, POSTGRES, REDIS, SERVICE,
                                       SITES, WEB, WORKER, SimCluster, site)
from flowmap_operator.naming import connection_name, object_name
from tests.e2e.shop import shop_cluster

ROUNDS = 20

# name -> (client group, server group, port, protocol, node that counts, c2s match, s2c match, app)
EDGES: dict[str, tuple[str, str, int, str, str, str, str, str]] = {
    "web-api": ("shop.web", "shop.api", 8080, "TCP", "node-a",
                f"ip saddr {WEB.ip} ip daddr {API.ip} tcp dport 8080", f"ip saddr {API.ip} ip daddr {WEB.ip} tcp sport 8080",
                "http"),
    "web-grpc": ("shop.web", "shop.api", GRPC_PORT, "TCP", "node-a",
                 f"ip saddr {WEB.ip} ip daddr {API.ip} tcp dport {GRPC_PORT}",
                 f"ip saddr {API.ip} ip daddr {WEB.ip} tcp sport {GRPC_PORT}", "grpc"),
    "web-dns": ("shop.web", "kube-system.coredns", 53, "UDP", "node-a",
                f"ip saddr {WEB.ip} ip daddr {DNS.ip} udp dport 53", f"ip saddr {DNS.ip} ip daddr {WEB.ip} udp sport 53",
                "dns"),
    "web-redis6": ("shop.web", "shop.redis", 6379, "TCP", "node-a",
                   f"ip6 saddr {WEB.ip6} ip6 daddr {REDIS.ip6} tcp dport 6379",
                   f"ip6 saddr {REDIS.ip6} ip6 daddr {WEB.ip6} tcp sport 6379", "redis"),
    "api-dns": ("shop.api", "kube-system.coredns", 53, "UDP", "node-b",
                f"ip saddr {API.ip} ip daddr {DNS.ip} udp dport 53", f"ip saddr {DNS.ip} ip daddr {API.ip} udp sport 53",
                "dns"),
    "api-redis": ("shop.api", "shop.redis", 6379, "TCP", "node-b",
                  f"ip saddr {API.ip} ip daddr {REDIS.ip} tcp dport 6379",
                  f"ip saddr {REDIS.ip} ip daddr {API.ip} tcp sport 6379", "redis"),
    "api-postgres": ("shop.api", "shop.postgres", 5432, "TCP", "node-b",
                     f"ip saddr {API.ip} ip daddr {POSTGRES.ip} tcp dport 5432",
                     f"ip saddr {POSTGRES.ip} ip daddr {API.ip} tcp sport 5432", "postgresql"),
    # A ClusterIP whose backend is on the caller's own node.
    "worker-api": ("shop.worker", "shop.api", 8080, "TCP", "node-b",
                   f"ip saddr {WORKER.ip} ip daddr {API.ip} tcp dport 8080",
                   f"ip saddr {API.ip} ip daddr {WORKER.ip} tcp sport 8080", "http"),
    "worker-dns": ("shop.worker", "kube-system.coredns", 53, "UDP", "node-b",
                   f"ip saddr {WORKER.ip} ip daddr {DNS.ip} udp dport 53",
                   f"ip saddr {DNS.ip} ip daddr {WORKER.ip} udp sport 53", "dns"),
    "api-payments": ("shop.api", object_name(PAYMENTS), 443, "TCP", "node-b",
                     f"ip saddr {API.ip} ip daddr {INTERNET} tcp dport 443",
                     f"ip saddr {INTERNET} ip daddr {API.ip} tcp sport 443", "tls"),
    # The kubelet's probe: node-b itself to its pod. The node sends it (output) and takes the
    # answer (input): it is never forwarded.
    "probe-api": ("nodes", "shop.api", 8080, "TCP", "node-b",
                  f"ip saddr {NODES[1].ip} ip daddr {API.ip} tcp dport 8080",
                  f"ip saddr {API.ip} ip daddr {NODES[1].ip} tcp sport 8080", "http"),
}
SENT_BY_NODE = {"probe-api"}  # counted where the node sends and takes, not where it forwards


@pytest.fixture(scope="module")
def sim() -> Iterator[SimCluster]:
    with shop_cluster() as cluster:
        for node_name in ("node-a", "node-b"):
            cluster.count(node_name, {f"{name}-{way}": match for name, e in EDGES.items()
                                      if e[4] == node_name and name not in SENT_BY_NODE
                                      for way, match in (("c2s", e[5]), ("s2c", e[6]))})
        for name in SENT_BY_NODE:
            e = EDGES[name]
            cluster.count(e[4], {f"{name}-c2s": e[5]}, hook="output")
            cluster.count(e[4], {f"{name}-s2c": e[6]}, hook="input")
        yield cluster


def connections(sim: SimCluster) -> dict[str, dict[str, Any]]:
    items = json.loads(sim.plane.kubectl("get", "connections", "-o", "json").stdout)["items"]
    return {c["metadata"]["name"]: c for c in items}


def counted(sim: SimCluster) -> dict[str, tuple[int, int]]:
    got = connections(sim)
    return {name: tuple(got.get(connection_name(*e[:4]), {}).get("status", {}).get("bytes", {}).get(way, 0)
                        for way in ("clientToServer", "serverToClient"))  # type: ignore[misc]
            for name, e in EDGES.items()}


def kernel(sim: SimCluster) -> dict[str, tuple[int, int]]:
    truth = {**sim.truth("node-a"), **sim.truth("node-b")}
    return {name: (truth[f"{name}-c2s"], truth[f"{name}-s2c"]) for name in EDGES}


def test_shop_traffic_becomes_exactly_the_expected_connections(sim: SimCluster) -> None:
    clients = [sim.traffic(pod, ROUNDS, pause=0.05) for pod in (WEB, API, WORKER, None)]
    for proc in clients:
        assert proc.popen.wait(120) == 0, proc.log.read_text()[-2000:]
    truth = kernel(sim)
    assert all(c2s and s2c for c2s, s2c in truth.values()), truth
    end = time.monotonic() + 60
    while (now := counted(sim)) != truth:
        assert time.monotonic() < end, f"Connections do not match the kernel's counters:\nwant {truth}\ngot  {now}"
        time.sleep(0.5)
    want = {connection_name(*e[:4]): name for name, e in EDGES.items()}
    got = connections(sim)
    assert set(got) == set(want), f"unexpected edges: {sorted(set(got) - set(want))}"
    for conn, name in want.items():
        assert (got[conn]["spec"]["client"], got[conn]["spec"]["server"]) == EDGES[name][:2]
    apps = {name: got[conn]["status"]["applications"] for conn, name in want.items()}
    assert apps == {name: [e[7]] for name, e in EDGES.items()}
    # One connection (or DNS lookup) per client per round: the ClusterIP's two halves count one
    # session, and so does a query whose answer was read first (another ring).
    sessions = {name: got[conn]["status"]["sessions"]["total"] for conn, name in want.items()}
    assert sessions == dict.fromkeys(EDGES, ROUNDS)
    # The ClusterIP flow is attributed to the workload behind the Service, which is named.
    for name in ("web-api", "worker-api"):
        assert got[connection_name(*EDGES[name][:4])]["status"]["service"] == f"{SERVICE['namespace']}/{SERVICE['name']}"


# -- crashes ------------------------------------------------------------------------------------

def settled(sim: SimCluster, timeout: float = 60) -> tuple[dict[str, tuple[int, int]], dict[str, tuple[int, int]]]:
    """(kernel, Connections) once the agents hold nothing unacknowledged and nothing changes for 2 s."""
    end, last, since = time.monotonic() + timeout, None, time.monotonic()
    while time.monotonic() < end:
        held = sum(sim.agent_metrics(n).get("flowmap_agent_unacked_edges", 1) for n in ("node-a", "node-b"))
        now = counted(sim)
        if now != last or held:
            last, since = now, time.monotonic()
        elif time.monotonic() - since >= 2:
            return kernel(sim), now
        time.sleep(0.25)
    raise AssertionError(f"the Connections did not settle: {last}")


def health(sim: SimCluster) -> dict[str, dict[str, float]]:
    """What the agents say of their dp and of losses (for failure messages)."""
    return {n: {k: v for k, v in sim.agent_metrics(n).items() if k.endswith(("_total", "_sessions", "_interfaces"))
                and "malformed" not in k} for n in ("node-a", "node-b")}


def minus(a: dict[str, tuple[int, int]], b: dict[str, tuple[int, int]]) -> dict[str, tuple[int, int]]:
    return {k: (a[k][0] - b[k][0], a[k][1] - b[k][1]) for k in a}


def busy_shop(sim: SimCluster, during: Any, rounds: int = 200) -> dict[str, float]:
    """Run the clients for ``rounds`` rounds (10 to 25 s); call ``during()`` 3 s in; how long
    each client's traffic lasted, by the edge-name prefix of its pod ("web", "api", "worker")."""
    started = time.monotonic()
    clients = {pod: sim.traffic(pod, rounds, pause=0.05) for pod in (WEB, API, WORKER, None)}
    time.sleep(3.0)
    during()
    lasted: dict[str, float] = {}
    while len(lasted) < len(clients):
        for pod, proc in clients.items():
            role = pod.owner[1].rsplit("-", 1)[0] if pod else "probe"
            if role not in lasted and proc.popen.poll() is not None:
                assert proc.popen.returncode == 0, proc.log.read_text()[-2000:]
                lasted[role] = time.monotonic() - started
        assert time.monotonic() - started < 180, "the shop's clients did not finish"
        time.sleep(0.05)
    return lasted


def test_kill_9_of_the_operator_loses_and_doubles_nothing(sim: SimCluster) -> None:
    truth0, conn0 = settled(sim)
    op = sim.operator
    assert op is not None

    def crash() -> None:
        op.kill()
        time.sleep(2)  # reports pile up in the agents meanwhile
        op.start().wait_leading()

    busy_shop(sim, crash)
    truth1, conn1 = settled(sim)
    assert minus(conn1, conn0) == minus(truth1, truth0), health(sim)


@pytest.mark.parametrize("victim", ["dp", "agent"])
def test_kill_9_of_a_dp_or_an_agent_loses_at_most_its_interval_and_counts_it(sim: SimCluster, victim: str) -> None:
    node_name = "node-b"  # the api's node: it counts api -> redis, dns, payments
    truth0, conn0 = settled(sim)
    restarts = sim.agent_metrics(node_name).get("flowmap_agent_dp_restarts_total", 0.0)
    gap: list[float] = []

    def crash() -> None:
        dp = sim.dps[node_name]
        killed = time.monotonic()
        if victim == "dp":
            sim.stop(dp, signal.SIGKILL)
            sim.start_dp(node_name)  # as the kubelet restarts a container
            back = lambda m: m.get("flowmap_agent_dp_restarts_total", 0) > restarts  # noqa: E731 - the new dp reported
        else:
            sim.stop(sim.agents[node_name], signal.SIGKILL)
            sim.start_agent(node_name)
            back = lambda m: m.get("flowmap_agent_dp_packets_total", 0) > 0  # noqa: E731 - the dp reports again
        end = time.monotonic() + 30
        while not back(sim.agent_metrics(node_name)):
            assert time.monotonic() < end, "the dp or the agent did not come back"
            time.sleep(0.02)
        gap.append(time.monotonic() - killed)
        assert victim == "agent" or dp.popen.returncode == -signal.SIGKILL

    lasted = busy_shop(sim, crash)
    truth1, conn1 = settled(sim)
    sent, got = minus(truth1, truth0), minus(conn1, conn0)
    metrics = sim.agent_metrics(node_name)
    gaps = metrics.get("flowmap_agent_dp_report_gaps_total", 0)
    for name, e in EDGES.items():
        if e[4] != node_name:
            assert got[name] == sent[name], (name, got[name], sent[name], health(sim))  # the other node: exact
            continue
        lost = (sent[name][0] - got[name][0], sent[name][1] - got[name][1])
        duration = lasted[name.split("-")[0]]  # of the client's own traffic, for its average rate
        if victim == "dp":
            # Its current interval, and the packets that pass until the new dp captures (at the
            # traffic's average rate, with half a second to spare: the rounds are bursts).
            allowed = [int(b / duration * (sim.interval + gap[0] + 0.5)) for b in sent[name]]
        else:
            # The dp (its own process) kept capturing and kept every report until the agent saved it:
            # nothing is lost (a report lost anyway would be a counted gap).
            allowed = [int(b / duration * gaps * sim.interval) for b in sent[name]]
        assert 0 <= lost[0] <= allowed[0] and 0 <= lost[1] <= allowed[1], (name, lost, allowed, gap, health(sim))
        print(f"{victim} kill -9: {name} lost {lost} of {sent[name]} bytes = "
              f"{sum(lost) / sum(sent[name]) * duration:.2f} s of its traffic; back after {gap[0]:.2f} s; "
              f"{gaps:.0f} reports counted lost")
    if victim == "dp":
        assert metrics.get("flowmap_agent_dp_restarts_total", 0) == restarts + 1, metrics
    else:
        assert metrics.get("flowmap_agent_unclean_restarts_total") == 1, metrics
        assert gaps == 0, metrics


# -- freshness ----------------------------------------------------------------------------------

def test_every_new_edge_appears_and_how_fast(sim: SimCluster) -> None:
    from kubernetes import client as k8s
    from kubernetes import config as k8s_config
    from kubernetes import watch as k8s_watch

    api = k8s.ApiClient(k8s_config.new_client_from_config(str(sim.plane.kubeconfig)).configuration)
    custom = k8s.CustomObjectsApi(api)
    added: dict[str, float] = {}
    stop = threading.Event()

    def watch() -> None:
        rv = custom.list_cluster_custom_object("flowmap.dev", "v1alpha1", "connections")["metadata"]["resourceVersion"]
        while not stop.is_set():
            for ev in k8s_watch.Watch().stream(custom.list_cluster_custom_object, "flowmap.dev", "v1alpha1",
                                               "connections", resource_version=rv, timeout_seconds=2):
                rv = ev["object"]["metadata"]["resourceVersion"]
                if ev["type"] == "ADDED":
                    added.setdefault(ev["object"]["metadata"]["name"], time.time())

    # Each site is a group of its own, as a user's CIDR Group (a name learned from DNS would do
    # too; see the payments edge): every call is a client -> server pair never seen before.
    groups = [{"apiVersion": "flowmap.dev/v1alpha1", "kind": "Group", "metadata": {"name": f"site-{n}"},
               "spec": {"cidrs": [f"{site(n)[1]}/32"]}} for n in range(SITES)]
    sim.plane.kubectl("apply", "-f", "-", input="\n---\n".join(json.dumps(g) for g in groups))
    time.sleep(2)  # the operator's watch takes them in
    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        client = sim.traffic(WEB, SITES, pause=0.3, role="sites")
        assert client.popen.wait(120) == 0, client.log.read_text()[-2000:]
        began = {int(n): float(t) for n, t in (line.split() for line in client.log.read_text().splitlines()
                                                 if line.count(" ") == 1 and line.split()[0].isdigit())}
        assert sorted(began) == list(range(SITES))
        names = {n: connection_name("shop.web", f"site-{n}", 80, "TCP") for n in range(SITES)}
        end = time.monotonic() + 30
        while not all(name in added for name in names.values()) and time.monotonic() < end:
            time.sleep(0.2)
    finally:
        stop.set()
    missing = [n for n, name in names.items() if name not in added]
    assert not missing, f"never appeared: {missing}"
    latency = sorted(added[names[n]] - began[n] for n in range(SITES))
    p50, p95 = latency[len(latency) // 2], latency[int(len(latency) * 0.95)]
    # How fast is measured, not asserted (a loaded machine is slower): the numbers are printed.
    print(f"new edge -> Connection over {SITES} edges: min {latency[0]:.2f} s, p50 {p50:.2f} s, "
          f"p95 {p95:.2f} s, max {latency[-1]:.2f} s")


# -- names that once hid traffic ------------------------------------------------------------------

def test_srv_style_names_in_the_traffic_hide_no_byte(sim: SimCluster) -> None:
    """A pod looks up a new ``_svcN.example.com`` every second while it calls the api (12 s, as
    the finding measured: an underscore made the operator refuse the node's batches whole and the
    agent drop them, 972 of 23,328 bytes counted). Every byte the kernel forwarded is counted."""
    truth0, conn0 = settled(sim)
    before = sim.agent_metrics("node-a")
    client = sim.traffic(WEB, 12, pause=1.0, role="lookups")
    assert client.popen.wait(120) == 0, client.log.read_text()[-2000:]
    truth1, conn1 = settled(sim)
    sent, got = minus(truth1, truth0), minus(conn1, conn0)
    assert all(sent[name][0] and sent[name][1] for name in ("web-api", "web-dns")), sent
    assert got == sent, health(sim)
    after = sim.agent_metrics("node-a")
    for series in ('flowmap_agent_reports_total{result="invalid_argument"}',
                   'flowmap_agent_quarantined_edges_total{by="operator"}',
                   'flowmap_agent_quarantined_edges_total{by="agent"}'):
        assert after.get(series, 0) == before.get(series, 0), series
    print(f"12 s of lookups of _svcN.example.com and calls to the api: web -> api {sum(got['web-api'])} bytes, "
          f"web -> dns {sum(got['web-dns'])} bytes counted, as the kernel forwarded them")
