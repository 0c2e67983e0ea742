"""The whole path on one simulated node: packets -> dp -> agent -> operator -> Connection.

The node is a network namespace with two pod namespaces behind veths, routed like Calico (a /32
host route per pod, proxy ARP on the host side, the pods' default route via 169.254.1.1). A real
HTTP server and client talk, the client in the other pod or in the node itself (as a kubelet
probe); the node's nftables counters are the ground truth (they count IP lengths, as the dp
does): the forward hook for pod to pod, output and input for the node's own requests. The
Connection must carry exactly those bytes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import REPO, need_root
from flowmap_devenv.netns import Lab
from tests.operator.harness import Cluster, Operator, create_pods, free_port, pod, running
from tests.operator.test_reports import connection, wait_for

WEB, CACHE, NODE_IP = "10.244.1.10", "10.244.1.20", "172.18.0.2"
ISSUER = "https://kubernetes.default.svc.cluster.local"
HEALTH_PORT = free_port()
# http.server, without the reverse DNS lookup HTTPServer.server_bind makes (no DNS in the pod).
SERVER = f"""
import http.server, socketserver
class Server(http.server.ThreadingHTTPServer):
    def server_bind(self):
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = "cache", 8080
Server(("{CACHE}", 8080), http.server.SimpleHTTPRequestHandler).serve_forever()
"""


@pytest.fixture
def node(cluster: Cluster) -> Iterator[tuple[Lab, str]]:
    need_root()
    create_pods(cluster.plane, pod("shop", "cache-0", "node-a", CACHE, owner=("StatefulSet", "cache")))
    lab = Lab()
    try:
        node_ns = lab.ns("fmnode")
        lab.exec(node_ns, "sysctl", "-qw", "net.ipv4.ip_forward=1")
        lab.veth(node_ns, [f"{NODE_IP}/24"], lab.ns("fmrtr"), ["172.18.0.1/24"])  # the uplink, to a router
        # Proxy ARP answers the pods' 169.254.1.1 only for what the node can route: a default route.
        lab.exec(node_ns, "ip", "route", "add", "default", "via", "172.18.0.1")
        for ip in (WEB, CACHE):
            lab.pod(node_ns, [ip])
        # Ground truth: the kernel counts each direction of the flow as it forwards it, or as
        # the node sends and receives it.
        lab.exec(node_ns, "nft", "-f", "-", input_text=f"""
table inet truth {{
  chain forward {{
    type filter hook forward priority 0;
    ip saddr {WEB} ip daddr {CACHE} tcp dport 8080 counter
    ip saddr {CACHE} ip daddr {WEB} tcp sport 8080 counter
  }}
  chain output {{
    type filter hook output priority 0;
    ip saddr {NODE_IP} ip daddr {CACHE} tcp dport 8080 counter
  }}
  chain input {{
    type filter hook input priority 0;
    ip saddr {CACHE} ip daddr {NODE_IP} tcp sport 8080 counter
  }}
}}""")
        yield lab, node_ns
    finally:
        lab.close()


def agent_process(cluster: Cluster, op: Operator, netns: str, folder: Path) -> subprocess.Popen[bytes]:
    admin = json.loads(cluster.plane.kubeconfig.read_text())
    admin["users"] = [{"name": "agent", "user": {"token": cluster.token("flowmap-agent", audience=ISSUER,
                                                                         pod_name="agent-a")}}]
    admin["contexts"][0]["context"]["user"] = "agent"
    (folder / "kubeconfig").write_text(json.dumps(admin))
    (folder / "token").write_text(cluster.token("flowmap-agent", pod_name="agent-a"))
    env = {**os.environ, "KUBECONFIG": str(folder / "kubeconfig"), "FLOWMAP_AGENT_NODE": "node-a",
           "FLOWMAP_AGENT_OPERATOR": f"localhost:{op.grpc_port}", "FLOWMAP_AGENT_CA_FILE": str(cluster.keys.ca_cert),
           "FLOWMAP_AGENT_TOKEN_FILE": str(folder / "token"), "FLOWMAP_AGENT_STATE_FILE": str(folder / "state"),
           "FLOWMAP_AGENT_SOCKET": str(folder / "dp.sock"), "FLOWMAP_AGENT_HEALTH_LISTEN": str(HEALTH_PORT),
           "FLOWMAP_AGENT_NETNS": netns, "FLOWMAP_AGENT_INTERVAL": "0.5"}
    log = open(folder / "agent.log", "wb")  # noqa: SIM115 - the child owns it
    return subprocess.Popen([sys.executable, "-m", "flowmap_cli", "agent", "run"], env=env, stdout=log,
                            stderr=subprocess.STDOUT, cwd=REPO)


def agent_metrics() -> str:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{HEALTH_PORT}/metrics", timeout=2) as r:
            return str(r.read().decode())
    except OSError:
        return ""


def counters(lab: Lab, node_ns: str) -> list[int]:
    rules = json.loads(lab.exec(node_ns, "nft", "-j", "list", "table", "inet", "truth"))["nftables"]
    return [r["rule"]["expr"][-1]["counter"]["bytes"] for r in rules if "rule" in r]


@pytest.mark.parametrize("client,name", [("pod", "shop.web-shop.cache-8080-tcp"), ("node", "nodes-shop.cache-8080-tcp")])
def test_http_to_a_pod_is_counted_exactly(cluster: Cluster, node: tuple[Lab, str], tmp_path: Path, client: str,
                                          name: str) -> None:
    lab, node_ns = node
    pods_ns = lab.namespaces[2:]
    op_iter = running(cluster)
    op = next(op_iter)
    agent = agent_process(cluster, op, node_ns, tmp_path)
    server = lab.popen(pods_ns[1], [sys.executable, "-c", SERVER], stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: ":8080" in lab.exec(pods_ns[1], "ss", "-ltn"), what="the server to listen")
        # Traffic starts once the dp captures on both pods' interfaces and the uplink.
        wait_for(lambda: "flowmap_agent_dp_interfaces 3.0" in agent_metrics(), what="the dp to attach")
        requests = ("import urllib.request\n"
                    "for i in range(20):\n"
                    f"    urllib.request.urlopen('http://{CACHE}:8080/', timeout=5).read()\n")
        lab.exec(pods_ns[0] if client == "pod" else node_ns, sys.executable, "-c", requests)
        truth = counters(lab, node_ns)
        c2s, s2c = truth[:2] if client == "pod" else truth[2:]
        assert c2s > 0 and s2c > 0

        def settled() -> dict[str, Any] | None:
            conn = connection(cluster, name)
            b = (conn or {}).get("status", {}).get("bytes", {})
            return conn if (b.get("clientToServer"), b.get("serverToClient")) == (c2s, s2c) else None

        try:
            conn = wait_for(settled, timeout=30, what=f"bytes {c2s}/{s2c}")
        except AssertionError:
            print((tmp_path / "agent.log").read_text()[-4000:], connection(cluster, name))
            raise
        assert conn["status"]["sessions"]["total"] == 20, conn["status"]
        assert "http" in conn["status"]["applications"], conn["status"]
    finally:
        server.terminate()
        agent.terminate()
        agent.wait(30)
        next(op_iter, None)
