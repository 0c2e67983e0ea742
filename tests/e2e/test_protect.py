"""Learn, Monitor, Protect on the simulated cluster, end to end: the shop is learned, exported with
``flowmap export``, applied in Protect mode; the agents' nftables let the learned traffic through
and stop the rest at its first packet; Monitor lets it through and says so; an agent restart
under Protect lets nothing wrong through; the exported NetworkPolicies allow exactly the learned
edges and DNS.
"""

from __future__ import annotations

import hashlib
import json
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import pytest
import yaml

from flowmap_devenv.controlplane import REPO
from flowmap_dp.capturing import file_name
from flowmap_dp.classify import classify_file
from flowmap_devenv.simcluster import API, DNS, NODES, POSTGRES, REDIS, WEB, WORKER, Pod, SimCluster
from tests.e2e.shop import shop_cluster
from tests.netpol import PodRef, allowed

ECHO_PORT = 5353  # a UDP echo server in the DNS pod: no shop workload ever uses it
# One probe of a connection from inside a pod: prints "<outcome> <seconds>".
PROBE = """
import socket, sys, time
kind, host, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
family = socket.AF_INET6 if ":" in host else socket.AF_INET
started = time.monotonic()
try:
    if kind == "tcp":
        with socket.create_connection((host, port), timeout=3):
            outcome = "connected"
    else:
        with socket.socket(family, socket.SOCK_DGRAM) as s:
            s.settimeout(2)
            s.sendto(b"ping", (host, port))
            outcome = "answered" if s.recv(64) == b"ping" else "garbled"
except ConnectionRefusedError:
    outcome = "refused"
except (socket.timeout, TimeoutError):
    outcome = "timeout"
print(outcome, round(time.monotonic() - started, 3))
"""
# Allowed and denied connections in a loop, for the agent restart: prints counts as JSON.
LOOP = """
import json, socket, sys, time
end = time.monotonic() + float(sys.argv[1])
allowed_host, allowed_port, denied_host, denied_port = sys.argv[2], int(sys.argv[3]), sys.argv[4], int(sys.argv[5])
n = {"allowed_ok": 0, "allowed_failed": 0, "denied_refused": 0, "denied_connected": 0, "denied_other": 0}
while time.monotonic() < end:
    try:
        with socket.create_connection((allowed_host, allowed_port), timeout=3) as s:
            s.sendall(b"GET /healthz HTTP/1.1\\r\\nHost: api\\r\\nConnection: close\\r\\n\\r\\n")
            n["allowed_ok" if s.recv(12).startswith(b"HTTP/1.") else "allowed_failed"] += 1
    except OSError:
        n["allowed_failed"] += 1
    try:
        with socket.create_connection((denied_host, denied_port), timeout=3):
            n["denied_connected"] += 1
    except ConnectionRefusedError:
        n["denied_refused"] += 1
    except OSError:
        n["denied_other"] += 1
    time.sleep(0.02)
print(json.dumps(n))
"""


RESULTS = "/apis/results.flowmap.dev/v1alpha1/namespaces/shop/packetcaptures/denied/pcapng"
# Armed on web until something web does is Denied; then three seconds more.
CAPTURE = {"apiVersion": "flowmap.dev/v1alpha1", "kind": "PacketCapture",
           "metadata": {"name": "denied", "namespace": "shop"},
           "spec": {"targets": {"groups": ["web"]}, "durationSeconds": 3,
                    "trigger": {"on": "Denied", "preTriggerSeconds": 5}}}


@pytest.fixture(scope="module")
def sim() -> Iterator[SimCluster]:
    with shop_cluster() as cluster:
        cluster.spawn("udp-echo", DNS, [sys.executable, "-c", (
            "import socket\ns = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
            f"s.bind(('{DNS.ip}', {ECHO_PORT}))\nwhile True:\n    d, a = s.recvfrom(64)\n    s.sendto(d, a)\n")])
        yield cluster


def probe(sim: SimCluster, pod: Pod, kind: str, host: str, port: int) -> tuple[str, float]:
    out = sim.lab.exec(sim.ns[pod.name], sys.executable, "-c", PROBE, kind, host, str(port)).split()
    return out[0], float(out[1])


def kubectl(sim: SimCluster, *args: str, input: str | None = None) -> str:
    return sim.plane.kubectl(*args, input=input).stdout


def connection(sim: SimCluster, name: str) -> dict[str, Any]:
    proc = sim.plane.kubectl("get", "connection", name, "-o", "json", check=False)
    return json.loads(proc.stdout) if proc.returncode == 0 else {}


def raw(sim: SimCluster, path: str, *args: str) -> subprocess.CompletedProcess[bytes]:
    """``kubectl get --raw``: the bytes as the API server gives them (a pcapng is no text)."""
    st = sim.plane.state()
    assert st is not None
    return subprocess.run([st.kubectl, f"--kubeconfig={sim.plane.kubeconfig}", *args, "get", "--raw", path],
                          capture_output=True, timeout=60)


def capture(sim: SimCluster) -> dict[str, Any]:
    return json.loads(kubectl(sim, "get", "packetcapture", "-n", "shop", "denied", "-o", "json"))


def wait_for(check: Any, what: str, timeout: float = 60.0) -> Any:
    end = time.monotonic() + timeout
    while not (value := check()):
        assert time.monotonic() < end, f"timed out waiting for {what}"
        time.sleep(0.1)
    return value


def rule_packets(sim: SimCluster, node: str, chain: str, rule: str) -> int:
    """The kernel's counter of one rule of the agent's table (its comment starts with the rule's name)."""
    out = json.loads(sim.lab.exec(sim.ns[node], "nft", "-j", "list", "chain", "inet", "flowmap", chain))
    return next(e["counter"]["packets"] for r in out["nftables"] if "rule" in r
                and r["rule"].get("comment", "").split()[0] == rule for e in r["rule"]["expr"] if "counter" in e)


def metric_packets(sim: SimCluster, node: str, chain: str, rule: str) -> float:
    return sim.agent_metrics(node).get(f'flowmap_agent_policy_rule_packets_total{{chain="{chain}",rule="{rule}"}}', -1)


def shop_traffic(sim: SimCluster, rounds: int) -> None:
    """The shop's clients, ``rounds`` rounds each: every call must succeed (a client exits 1 if not)."""
    clients = [sim.traffic(pod, rounds, pause=0.02) for pod in (WEB, API, WORKER, None)]
    for proc in clients:
        assert proc.popen.wait(300) == 0, proc.log.read_text()[-2000:]


def export(sim: SimCluster, *args: str) -> list[dict[str, Any]]:
    done = subprocess.run([sys.executable, "-m", "flowmap_cli", "export", "--namespace", "shop", *args],
                          capture_output=True, text=True, cwd=REPO, timeout=60,
                          env={"KUBECONFIG": str(sim.plane.kubeconfig), "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr
    return [d for d in yaml.safe_load_all(done.stdout) if d]


def set_mode(sim: SimCluster, policies: list[dict[str, Any]], mode: str) -> None:
    for p in policies:
        p["spec"]["mode"] = mode
    kubectl(sim, "apply", "--server-side", "-f", "-", input=yaml.safe_dump_all(policies))


def enforcing(sim: SimCluster, pods: int) -> bool:
    """Both agents enforce what the operator compiled (``pods`` protected pods in all)."""
    return sum(sim.agent_metrics(n.name).get("flowmap_agent_policy_protected_pods", 0) for n in NODES) == pods


def test_learn_export_protect_monitor_and_restart(sim: SimCluster) -> None:
    # Learn (the operator's default): the shop's traffic becomes the map.
    shop_traffic(sim, 10)
    learned = {"shop.web-shop.api-8080-tcp", "shop.web-shop.redis-6379-tcp", "shop.api-shop.postgres-5432-tcp",
               "shop.api-payments.example.com-443-tcp", "shop.worker-shop.api-8080-tcp", "nodes-shop.api-8080-tcp"}
    wait_for(lambda: learned <= {c["metadata"]["name"] for c in json.loads(
        kubectl(sim, "get", "connections", "-o", "json"))["items"]}, "the shop's map")

    # The exported NetworkPolicies: the API server takes them, and they allow exactly the
    # learned edges and DNS.
    netpols = export(sim, "--format", "networkpolicy")
    kubectl(sim, "apply", "--server-side", "--dry-run=server", "-f", "-", input=yaml.safe_dump_all(netpols))
    pods = [PodRef(p.namespace, tuple(sorted(p.labels)), (p.ip, p.ip6)) for p in (WEB, API, WORKER, REDIS, POSTGRES, DNS)]
    for src, dst, port, proto in ((WEB.ip, API.ip, 8080, "TCP"), (WEB.ip6, REDIS.ip6, 6379, "TCP"),
                                  (API.ip, POSTGRES.ip, 5432, "TCP"), (API.ip, "203.0.113.10", 443, "TCP"),
                                  (WORKER.ip, API.ip, 8080, "TCP"), (NODES[1].ip, API.ip, 8080, "TCP"),
                                  (WEB.ip, API.ip, 9090, "TCP"), (API.ip, REDIS.ip, 6379, "TCP"),
                                  (WEB.ip, DNS.ip, 53, "UDP"), (WORKER.ip, DNS.ip, 53, "TCP")):
        assert allowed(netpols, pods, src, dst, port, proto), (src, dst, port)
    for src, dst, port, proto in ((WEB.ip, POSTGRES.ip, 5432, "TCP"), (WORKER.ip6, REDIS.ip6, 6379, "TCP"),
                                  (WEB.ip, DNS.ip, ECHO_PORT, "UDP"), (API.ip, WEB.ip, 8080, "TCP"),
                                  (WORKER.ip, API.ip, 9090, "TCP"), (API.ip, "203.0.113.11", 443, "TCP")):
        assert not allowed(netpols, pods, src, dst, port, proto), (src, dst, port)

    # Protect: the export, applied. Every learned call keeps working.
    policies = export(sim, "--mode", "Protect")
    assert {p["spec"]["groups"][0] for p in policies} == {"shop.web", "shop.api", "shop.worker", "shop.redis",
                                                          "shop.postgres"}
    kubectl(sim, "apply", "--server-side", "-f", "-", input=yaml.safe_dump_all(policies))
    wait_for(lambda: enforcing(sim, 5), "both agents enforcing the five shop pods")
    shop_traffic(sim, 60)  # 60 rounds of 4 clients, 3 to 4 calls each: hundreds of requests

    # A capture of web, armed until something web does is Denied.
    kubectl(sim, "apply", "-f", "-", input=yaml.safe_dump(CAPTURE))
    wait_for(lambda: [n["phase"] for n in capture(sim).get("status", {}).get("nodes", [])] == ["Armed"],
             "the capture armed on web's node")
    assert probe(sim, WEB, "tcp", API.ip, 8080)[0] == "connected"  # learned: no trigger, kept in the window

    # A new TCP connection no rule allows is reset at its first SYN, and shows as Denied.
    resets = rule_packets(sim, "node-a", "egress", "reject")
    outcome, took = probe(sim, WEB, "tcp", POSTGRES.ip, 5432)
    tried = time.monotonic()
    assert outcome == "refused", (outcome, took)
    assert rule_packets(sim, "node-a", "egress", "reject") == resets + 1  # one SYN, no retransmission
    wait_for(lambda: metric_packets(sim, "node-a", "egress", "reject") == resets + 1, "the agent's rule metric")
    name = "shop.web-shop.postgres-5432-tcp"
    wait_for(lambda: connection(sim, name).get("status", {}).get("action") == "Denied", "Denied")
    print(f"unlearned TCP: refused after {took * 1000:.1f} ms; Denied in the API {time.monotonic() - tried:.2f} s later")
    # The Denied fired the capture: its file holds the reset SYN, and web's call from before it.
    done = wait_for(lambda: (c := capture(sim)).get("status", {}).get("phase") == "Completed" and c["status"],
                    "the capture completed", timeout=60)
    print(f"capture fired {time.monotonic() - tried:.2f} s after the Denied probe: {done['totals']}")
    (node,) = done["nodes"]
    path = sim.capture_dir("node-a") / file_name(f"shop/denied/{capture(sim)['metadata']['uid']}")
    data = path.read_bytes()
    assert (node["node"], node["stopReason"], node["sha256"], node["fileBytes"]) == (
        "node-a", "DurationReached", hashlib.sha256(data).hexdigest(), len(data))
    # The same bytes through the API server, with the caller's own credentials and nothing else:
    # an editor of the namespace may read them; a viewer sees the capture, not its packets.
    kubectl(sim, "create", "rolebinding", "shop-editor", "-n", "shop", "--clusterrole=flowmap-editor", "--user=ed")
    kubectl(sim, "create", "rolebinding", "shop-viewer", "-n", "shop", "--clusterrole=flowmap-viewer", "--user=vi")
    for url, who in ((RESULTS, ()), (RESULTS, ("--as=ed",)), (RESULTS + "?node=node-a", ("--as=ed",))):
        got = raw(sim, url, *who)  # the admin, then the editor
        assert got.stdout == data, (who, got.stderr[-1000:])
    assert kubectl(sim, "--as=vi", "get", "packetcapture", "-n", "shop", "denied", "-o", "name")
    refused = raw(sim, RESULTS, "--as=vi")
    assert refused.returncode and b'cannot get resource "packetcaptures/pcapng"' in refused.stderr, refused.stderr
    assert b"holds no finished file" in raw(sim, RESULTS + "?node=node-b").stderr
    flows = classify_file(path)
    (syn,) = [f for f in flows if f["server"] == f"{POSTGRES.ip}:5432"]
    assert syn["client"].startswith(f"{WEB.ip}:"), syn
    assert (syn["packets_c2s"], syn["packets_s2c"]) == (1, 1), syn  # the SYN and the node's reset
    assert any(f["server"] == f"{API.ip}:8080" and f["last_seen"] < syn["first_seen"] for f in flows), flows  # before
    # UDP to a port no rule allows is dropped.
    drops = rule_packets(sim, "node-a", "egress", "drop")
    assert probe(sim, WEB, "udp", DNS.ip, ECHO_PORT)[0] == "timeout"
    assert rule_packets(sim, "node-a", "egress", "drop") == drops + 1
    # The same for IPv6: worker never talked to redis.
    outcome, _ = probe(sim, WORKER, "tcp", REDIS.ip6, 6379)
    assert outcome == "refused"
    assert probe(sim, WEB, "tcp", REDIS.ip6, 6379)[0] == "connected"  # learned over IPv6

    # Monitor: the same connection gets through, is a Violation, and raises one Event.
    set_mode(sim, policies, "Monitor")
    wait_for(lambda: enforcing(sim, 0), "enforcement lifted")
    assert probe(sim, WEB, "tcp", POSTGRES.ip, 5432)[0] == "connected"
    assert probe(sim, WEB, "udp", DNS.ip, ECHO_PORT)[0] == "answered"
    wait_for(lambda: connection(sim, name).get("status", {}).get("action") == "Violation", "Violation")
    assert connection(sim, name)["status"]["policy"] == "shop/web"
    for _ in range(3):
        probe(sim, WEB, "tcp", POSTGRES.ip, 5432)
    time.sleep(3)  # more reports of the same violation
    events = wait_for(lambda: [e for e in json.loads(kubectl(sim, "get", "events", "-n", "shop", "-o", "json"))["items"]
                               if e["reason"] == "Violation" and name in e["message"]], "the Event")
    assert len(events) == 1 and events[0]["involvedObject"]["name"] == "web"
    # Examples fill in as reports come (the dropped UDP probe's session may be reported first).
    wait_for(lambda: name in [e["connection"] for e in json.loads(kubectl(sim, "get", "nlp", "web", "-n", "shop", "-o",
                                                                          "json"))["status"]
                              .get("wouldBlock", {}).get("examples", [])], "what Protect would block")

    # Protect again, then the agent restarts under it: nothing allowed fails, nothing denied passes.
    set_mode(sim, policies, "Protect")
    wait_for(lambda: enforcing(sim, 5), "enforcing again")
    loop = sim.spawn("restart-loop", WEB, [sys.executable, "-c", LOOP, "12", API.ip, "8080", POSTGRES.ip, "5432"])
    time.sleep(3)
    agent = sim.agents["node-a"]
    sim.stop(agent, signal.SIGKILL)
    sim.start_agent("node-a")
    wait_for(lambda: sim.agent_metrics("node-a").get("flowmap_agent_policy_protected_pods") == 2.0,
             "the restarted agent takes policy")
    assert loop.popen.wait(60) == 0
    counts = json.loads(loop.log.read_text().strip().splitlines()[-1])
    print(f"agent restart under Protect: {counts}")
    assert counts["allowed_failed"] == 0 and counts["denied_connected"] == 0, counts
    assert counts["allowed_ok"] > 10 and counts["denied_refused"] > 10, counts  # the loop did run

    # Removing the policies removes every rule.
    kubectl(sim, "delete", "nlp", "--all", "-n", "shop")
    wait_for(lambda: enforcing(sim, 0), "no enforcement")
    for n in NODES:
        tables = sim.lab.exec(sim.ns[n.name], "nft", "list", "tables")
        assert "flowmap" not in tables, tables
    assert probe(sim, WEB, "tcp", POSTGRES.ip, 5432)[0] == "connected"
