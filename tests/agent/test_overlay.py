"""Two simulated nodes shaped as flannel shapes them, each with its agent and dp, a real operator:
pods on a bridge with no route of their own, a VXLAN overlay between the nodes.

::

    node-fa 172.19.0.2                              node-fb 172.19.0.3
      cni0 10.245.1.1/24 -- web 10.245.1.10           cni0 10.245.2.1/24 -- api 10.245.2.20
      flannel.1 10.245.1.0/32, VXLAN 8472             flannel.1 10.245.2.0/32
      10.245.2.0/24 via 10.245.2.0 onlink             10.245.1.0/24 via 10.245.1.0 onlink
               \\______________ router bridge 172.19.0.1/24 ______________/

What flannel installs is installed the same way: permanent FDB and neighbour entries for the
other node's tunnel, MTU 1450 inside. Real HTTP servers and clients; node-fa's nftables counters
are the ground truth (IP lengths, as the dp counts): the forward hook for web -> api, output and
input for what node-fa's own stack sends from the bridge's gateway (a kubelet probe) and from
the tunnel's address (a hostNetwork client reaching a pod on the other node). Each Connection
must carry exactly those bytes: counted once, although both nodes see every cross-node packet
and the uplinks carry it a second time, encapsulated; and no edge on the VXLAN port.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from flowmap_devenv.netns import Lab
from flowmap_operator.naming import connection_name
from tests.conftest import REPO, need_root
from tests.operator.harness import NS, Cluster, Operator, apply, create_pods, free_port, pod, running
from tests.operator.test_reports import connection, wait_for

ISSUER = "https://kubernetes.default.svc.cluster.local"
ROUTER = "172.19.0.1"
WEB, API = "10.245.1.10", "10.245.2.20"
GATEWAY_A, TUNNEL_A = "10.245.1.1", "10.245.1.0"
ROUNDS = {"pod": 20, "probe": 5, "host": 5}
SERVER = """
import http.server, socketserver, sys
class Server(http.server.ThreadingHTTPServer):
    def server_bind(self):  # no reverse DNS lookup of our own address
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = "pod", 8080
Server((sys.argv[1], 8080), http.server.SimpleHTTPRequestHandler).serve_forever()
"""
CLIENT = """
import http.client, sys
source, server, rounds = sys.argv[1], sys.argv[2], int(sys.argv[3])
for _ in range(rounds):
    c = http.client.HTTPConnection(server, 8080, timeout=5, source_address=(source, 0) if source else None)
    c.request("GET", "/")
    c.getresponse().read()
    c.close()
"""


@dataclass(frozen=True)
class FlannelNode:
    name: str
    index: int  # 1, 2: addresses follow
    ip: str

    @property
    def cidr(self) -> str:
        return f"10.245.{self.index}.0/24"

    @property
    def mac(self) -> str:
        return f"0e:00:00:00:00:0{self.index}"  # flannel.1's, known to the other node


NODES = (FlannelNode("node-fa", 1, "172.19.0.2"), FlannelNode("node-fb", 2, "172.19.0.3"))


@dataclass
class Overlay:
    lab: Lab
    ns: dict[str, str]  # node or pod name -> its namespace
    veths: dict[str, str]  # pod name -> its host-side veth


def _flannel(lab: Lab) -> Overlay:
    router = lab.ns("fmrtr")
    lab.exec(router, "ip", "link", "add", "br0", "type", "bridge")
    lab.exec(router, "ip", "addr", "add", f"{ROUTER}/24", "dev", "br0")
    lab.exec(router, "ip", "link", "set", "br0", "up")
    ns: dict[str, str] = {}
    veths: dict[str, str] = {}
    for n in NODES:
        node = ns[n.name] = lab.ns("fmnode")
        lab.exec(node, "sysctl", "-qw", "net.ipv4.ip_forward=1")
        uplink, port = lab.veth(node, [f"{n.ip}/24"], router, [])
        lab.exec(router, "ip", "link", "set", port, "master", "br0")
        lab.exec(node, "ip", "link", "add", "cni0", "type", "bridge")
        lab.exec(node, "ip", "addr", "add", f"10.245.{n.index}.1/24", "dev", "cni0")
        lab.exec(node, "ip", "link", "set", "cni0", "up")
        lab.exec(node, "ip", "link", "add", "flannel.1", "address", n.mac, "type", "vxlan", "id", "1", "local", n.ip,
                 "dev", uplink, "dstport", "8472", "nolearning")
        lab.exec(node, "ip", "addr", "add", f"10.245.{n.index}.0/32", "dev", "flannel.1")
        lab.exec(node, "ip", "link", "set", "flannel.1", "up")
    for n in NODES:
        for other in NODES:
            if other != n:
                gw = f"10.245.{other.index}.0"
                lab.exec(ns[n.name], "ip", "neigh", "add", gw, "lladdr", other.mac, "dev", "flannel.1", "nud", "permanent")
                lab.exec(ns[n.name], "bridge", "fdb", "append", other.mac, "dev", "flannel.1", "dst", other.ip, "self",
                         "permanent")
                lab.exec(ns[n.name], "ip", "route", "add", other.cidr, "via", gw, "dev", "flannel.1", "onlink")
    for name, ip, n in (("web", WEB, NODES[0]), ("api", API, NODES[1])):
        # As the bridge plugin wires a pod: a port of cni0, the gateway its default route, flannel's MTU.
        pod_ns = ns[name] = lab.ns("fmpod")
        host_side, pod_side = lab.veth(ns[n.name], [], pod_ns, [f"{ip}/24"])
        for where, dev in ((ns[n.name], host_side), (pod_ns, pod_side)):
            lab.exec(where, "ip", "link", "set", dev, "mtu", "1450")
        lab.exec(ns[n.name], "ip", "link", "set", host_side, "master", "cni0")
        lab.exec(pod_ns, "ip", "route", "add", "default", "via", f"10.245.{n.index}.1")
        veths[name] = host_side
    node_a = ns[NODES[0].name]
    assert WEB not in lab.exec(node_a, "ip", "route") and "10.245.1.10/" not in lab.exec(node_a, "ip", "route")
    # Ground truth on node-fa, ahead of everything else; and the tunnel's own bytes on the wire.
    lab.exec(node_a, "nft", "-f", "-", input_text=f"""
table inet truth {{
  chain forward {{
    type filter hook forward priority -300;
    ip saddr {WEB} ip daddr {API} tcp dport 8080 counter comment "pod c2s"
    ip saddr {API} ip daddr {WEB} tcp sport 8080 counter comment "pod s2c"
  }}
  chain output {{
    type filter hook output priority -300;
    ip saddr {GATEWAY_A} ip daddr {WEB} tcp dport 8080 counter comment "probe c2s"
    ip saddr {TUNNEL_A} ip daddr {API} tcp dport 8080 counter comment "host c2s"
    udp dport 8472 counter comment "vxlan out"
  }}
  chain input {{
    type filter hook input priority -300;
    ip saddr {WEB} ip daddr {GATEWAY_A} tcp sport 8080 counter comment "probe s2c"
    ip saddr {API} ip daddr {TUNNEL_A} tcp sport 8080 counter comment "host s2c"
    udp dport 8472 counter comment "vxlan in"
  }}
}}""")
    return Overlay(lab, ns, veths)


def counters(overlay: Overlay) -> dict[str, tuple[int, int]]:
    """(packets, bytes) per counted rule, by its comment."""
    out = json.loads(overlay.lab.exec(overlay.ns[NODES[0].name], "nft", "-j", "list", "table", "inet", "truth"))
    return {r["rule"]["comment"]: (r["rule"]["expr"][-1]["counter"]["packets"], r["rule"]["expr"][-1]["counter"]["bytes"])
            for r in out["nftables"] if "rule" in r}


@pytest.fixture
def overlay(cluster: Cluster) -> Iterator[Overlay]:
    need_root()
    plane = cluster.plane
    apply(plane, *({"apiVersion": "v1", "kind": "Node", "metadata": {"name": n.name},
                    "spec": {"podCIDR": n.cidr, "podCIDRs": [n.cidr]},
                    "status": {"addresses": [{"type": "InternalIP", "address": n.ip}]}} for n in NODES))
    plane.kubectl("create", "namespace", "ovl", check=False)
    agent = {"labels": {"app.kubernetes.io/name": "flowmap-agent"}, "sa": "flowmap-agent", "host_network": True}
    create_pods(plane, *(pod(NS, f"agent-{n.name}", n.name, n.ip, owner=("DaemonSet", "flowmap-agent"), **agent)  # type: ignore[arg-type]
                         for n in NODES),
                pod("ovl", "web-0", NODES[0].name, WEB, owner=("StatefulSet", "web")),
                pod("ovl", "api-0", NODES[1].name, API, owner=("StatefulSet", "api")))
    lab = Lab()
    try:
        yield _flannel(lab)
    finally:
        lab.close()
        plane.kubectl("delete", "namespace", "ovl", "--wait=false", check=False)
        for n in NODES:
            plane.kubectl("delete", "pod", "-n", NS, f"agent-{n.name}", "--grace-period=0", "--force", check=False)
            plane.kubectl("delete", "node", n.name, check=False)


def agent_process(cluster: Cluster, op: Operator, n: FlannelNode, netns: str, folder: Path,
                  health: int) -> subprocess.Popen[bytes]:
    folder.mkdir(parents=True, exist_ok=True)
    admin = json.loads(cluster.plane.kubeconfig.read_text())
    admin["users"] = [{"name": "agent", "user": {"token": cluster.token("flowmap-agent", audience=ISSUER,
                                                                         pod_name=f"agent-{n.name}")}}]
    admin["contexts"][0]["context"]["user"] = "agent"
    (folder / "kubeconfig").write_text(json.dumps(admin))
    (folder / "token").write_text(cluster.token("flowmap-agent", pod_name=f"agent-{n.name}"))
    env = {**os.environ, "KUBECONFIG": str(folder / "kubeconfig"), "FLOWMAP_AGENT_NODE": n.name,
           "FLOWMAP_AGENT_OPERATOR": f"localhost:{op.grpc_port}", "FLOWMAP_AGENT_CA_FILE": str(cluster.keys.ca_cert),
           "FLOWMAP_AGENT_TOKEN_FILE": str(folder / "token"), "FLOWMAP_AGENT_STATE_FILE": str(folder / "state"),
           "FLOWMAP_AGENT_SOCKET": str(folder / "dp.sock"), "FLOWMAP_AGENT_HEALTH_LISTEN": str(health),
           "FLOWMAP_AGENT_NETNS": netns, "FLOWMAP_AGENT_INTERVAL": "0.5"}
    log = open(folder / "agent.log", "wb")  # noqa: SIM115 - the child owns it
    return subprocess.Popen([sys.executable, "-m", "flowmap_cli", "agent", "run"], env=env, stdout=log,
                            stderr=subprocess.STDOUT, cwd=REPO)


def metric(port: int, name: str) -> float:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as r:
            text = r.read().decode()
    except OSError:
        return -1.0
    return next((float(line.split()[-1]) for line in text.splitlines() if line.startswith(name + " ")), -1.0)


def test_a_flannel_overlay_counts_every_byte_once_and_makes_no_edge_of_its_own(
        cluster: Cluster, overlay: Overlay, tmp_path: Path) -> None:
    lab, ns = overlay.lab, overlay.ns
    op_iter = running(cluster)
    op = next(op_iter)
    health = {n.name: free_port() for n in NODES}
    agents = [agent_process(cluster, op, n, ns[n.name], tmp_path / n.name, health[n.name]) for n in NODES]
    servers = [lab.popen(ns[name], [sys.executable, "-c", SERVER, ip], stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL) for name, ip in (("web", WEB), ("api", API))]

    def logs() -> str:
        return "\n".join(f"--- {n.name}\n" + (tmp_path / n.name / "agent.log").read_text()[-3000:] for n in NODES)

    try:
        for name, ip in (("web", WEB), ("api", API)):
            wait_for(lambda: ":8080" in lab.exec(ns[name], "ss", "-ltn"), what=f"{name}'s server")
        # Each dp captures on its pod's veth (found through its peer: no route leads there), the
        # uplink and the tunnel.
        try:
            for n in NODES:
                wait_for(lambda: metric(health[n.name], "flowmap_agent_dp_interfaces") == 3.0, timeout=60,
                         what=f"the dp of {n.name} to capture on 3 interfaces")
        except AssertionError:
            print(logs())
            raise
        lab.exec(ns["web"], sys.executable, "-c", CLIENT, "", API, str(ROUNDS["pod"]))
        node_a = ns[NODES[0].name]
        lab.exec(node_a, sys.executable, "-c", CLIENT, GATEWAY_A, WEB, str(ROUNDS["probe"]))  # a kubelet probe
        lab.exec(node_a, sys.executable, "-c", CLIENT, TUNNEL_A, API, str(ROUNDS["host"]))  # hostNetwork, across
        truth = counters(overlay)
        print("kernel counters on node-fa (packets, bytes):", truth)
        # The overlay carried the cross-node traffic, encapsulated, both ways.
        assert truth["vxlan out"][0] > 0 and truth["vxlan in"][0] > 0

        expected = {
            connection_name("ovl.web", "ovl.api", 8080, "TCP"): ("pod", ROUNDS["pod"]),
            connection_name("nodes", "ovl.web", 8080, "TCP"): ("probe", ROUNDS["probe"]),
            connection_name("nodes", "ovl.api", 8080, "TCP"): ("host", ROUNDS["host"]),
        }
        for name, (what, rounds) in expected.items():
            c2s, s2c = truth[f"{what} c2s"], truth[f"{what} s2c"]
            assert c2s[1] > 0 and s2c[1] > 0

            def settled(name: str = name, c2s: tuple[int, int] = c2s, s2c: tuple[int, int] = s2c) -> Any:
                conn = connection(cluster, name)
                status = (conn or {}).get("status", {})
                got = (status.get("bytes", {}).get("clientToServer"), status.get("bytes", {}).get("serverToClient"),
                       status.get("packets", {}).get("clientToServer"), status.get("packets", {}).get("serverToClient"))
                return conn if got == (c2s[1], s2c[1], c2s[0], s2c[0]) else None

            try:
                conn = wait_for(settled, timeout=60, what=f"{name}: bytes {c2s[1]}/{s2c[1]}")
            except AssertionError:
                print(logs(), json.dumps(connection(cluster, name), indent=1))
                raise
            assert conn["status"]["sessions"]["total"] == rounds, conn["status"]
        # Nothing else: no edge of the overlay's own (nodes -> nodes :8472/udp), none other of these pods.
        listed = json.loads(cluster.plane.kubectl("get", "connections", "-o", "json").stdout)["items"]
        ours = {c["metadata"]["name"] for c in listed if c["spec"]["port"] == 8472 or {
            c["spec"]["client"], c["spec"]["server"]} & {"ovl.web", "ovl.api"}}
        assert ours == set(expected), ours
    finally:
        for p in servers:
            p.terminate()
        for a in agents:
            a.terminate()
        for a in agents:
            a.wait(30)
        next(op_iter, None)
