"""Multus secondary networks: a pod's second veth captured and its traffic named as the pod's.

Pure: what a network-status annotation claims (flowmap_api.networks), which claims the kernel's
view confirms (flowmap_agent.plumbing.secondary_interfaces), what the operator is told.

Live, on one simulated node (a network namespace) with the real dp, agent, operator and API
server: two pods on the cluster network (routed, as Calico does) and on a secondary network as
Multus' bridge plugin makes it (a second veth each, ``net1`` in the pod, the host side a port of a
bridge with no address), and a stranger on that bridge that is no pod (a VM or a host of that
network). The web pod's annotation claims the stranger's address too. The node's nftables
counters (bridge family: the secondary network never reaches the node's IP stack) are the ground
truth; web's Connection to cache carries exactly what the kernel counted between their secondary
addresses, and the stranger's traffic is the outside's, not web's.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from flowmap_agent import links, plumbing
from flowmap_agent.plumbing import Link, Seen
from flowmap_agent.pods import LocalPods
from flowmap_api import networks
from flowmap_api.limits import MAX_POD_ADDRESSES
from flowmap_devenv.netns import Lab
from tests.agent.test_path import agent_metrics, agent_process
from tests.conftest import need_root
from tests.operator.harness import Cluster, create_pods, pod, running
from tests.operator.test_reports import connection, wait_for

WEB, CACHE = "10.244.1.40", "10.244.1.41"  # the cluster network's (status.podIPs)
WEB2, CACHE2, STRANGER = "192.168.100.10", "192.168.100.20", "192.168.100.30"  # the secondary network's
NODE_IP = "172.18.0.2"


def status(default: str, *secondary: str, interface: str = "net1") -> str:
    """A network-status annotation as Multus writes it: the cluster network's entry, then one secondary."""
    return json.dumps([
        {"name": "cbr0", "interface": "eth0", "ips": [default], "mac": "0a:58:0a:f4:01:28", "default": True,
         "dns": {}},
        {"name": "multus/secondary", "interface": interface, "ips": list(secondary), "mac": "0a:58:c0:a8:64:0a",
         "dns": {}}])


# -- pure ------------------------------------------------------------------------------------------

def test_an_annotation_claims_its_secondary_addresses_only_and_bad_ones_say_why() -> None:
    annotations = {networks.NETWORK_STATUS: status(WEB, WEB2, "fd00:100:0:0::a", "fd00:100::a")}
    assert networks.claimed(annotations) == (WEB2, "fd00:100::a")  # canonical, once, not the default's
    assert networks.claimed(None) == networks.claimed({"other": "x"}) == ()
    many = json.dumps([{"name": "n", "ips": [f"192.168.{i // 250}.{i % 250 + 1}" for i in range(100)]}])
    assert len(networks.claimed({networks.NETWORK_STATUS: many})) == networks.MAX_CLAIMS
    for bad, why in (("{", "not JSON"), ('{"ips": []}', "not a list"), ('[{"ips": "10.0.0.1"}]', "list of ips"),
                     ('[{"ips": ["10.0.0.300"]}]', "'10.0.0.300' is not an IP"), ('[{"ips": [7]}]', "'7' is not"),
                     ("[" + " " * networks.MAX_ANNOTATION + "]", "characters, more than")):
        with pytest.raises(networks.BadAnnotation, match=why):
            networks.claimed({networks.NETWORK_STATUS: bad})


def veth(index: int, netns: int, peer: int, master: int = 0) -> Link:
    return Link(index, f"veth{index}", "veth", peer=peer, peer_netns=netns, master=master)


def test_a_claim_is_confirmed_only_in_the_pods_own_namespace_and_by_nobody_else() -> None:
    # Namespace ids 1 (web), 2 (cache), 3 (db), 4 (a stranger's veth on the secondary bridge, 99);
    # db's second veth is on another bridge (98), with a NIC of that network.
    links_ = [veth(10, 1, 2), veth(11, 1, 3, 99), veth(20, 2, 2), veth(21, 2, 3, 99), veth(30, 3, 2),
              veth(31, 3, 3, 98), veth(40, 4, 2, 99), Link(5, "uplink"), Link(6, "eth1", master=98),
              Link(98, "br-db", "bridge"), Link(99, "br-sec", "bridge")]
    # web and the stranger both hold .44: no one can tell them apart by it.
    peers = {(10, 1, 2): Seen(frozenset({WEB}), 0),
             (11, 1, 3): Seen(frozenset({WEB2, "fd00:100::a", "192.168.100.44"}), 0),
             (20, 2, 2): Seen(frozenset({CACHE}), 0), (21, 2, 3): Seen(frozenset({CACHE2, "10.99.0.1"}), 0),
             (30, 3, 2): Seen(frozenset({"10.244.1.42"}), 0), (31, 3, 3): Seen(frozenset({"10.99.0.1"}), 0),
             (40, 4, 2): Seen(frozenset({STRANGER, "192.168.100.44"}), 0)}
    claims = {
        # Besides its own: the stranger's, cache's podIP, the node's, one the stranger holds too.
        "shop/web": ([WEB], [WEB2, "fd00:100::a", STRANGER, CACHE, NODE_IP, "192.168.100.44"]),
        "shop/cache": ([CACHE], [CACHE2, "10.99.0.1"]),
        "shop/db": (["10.244.1.42"], ["10.99.0.1"]),  # isolated networks reusing an address: neither's
        "shop/new": (["10.244.1.43"], ["192.168.100.43"]),  # its veth not found yet
    }
    found = plumbing.secondary_interfaces(links_, peers, claims, own={NODE_IP})
    assert found == {WEB2: ("veth11", "shop/web"), "fd00:100::a": ("veth11", "shop/web"),
                     CACHE2: ("veth21", "shop/cache")}
    plan = plumbing.plan(links_, [], peers, [WEB, CACHE, "10.244.1.42"], {NODE_IP}, ["uplink"], claims=claims)
    assert plan.secondary == found
    # The secondary veths and the other ports of their bridge (the stranger's); not an unconfirmed one's bridge.
    assert plan.interfaces == ("uplink", "veth10", "veth11", "veth20", "veth21", "veth30", "veth40")
    # A pod whose podIPs sit in two namespaces (a sandbox being replaced) is not sure: nothing of it.
    twice = {**peers, (30, 3, 2): Seen(frozenset({"10.244.1.42", WEB}), 0)}
    assert "shop/web" not in {pod for _, pod in plumbing.secondary_interfaces(links_, twice, claims).values()}


def test_the_operator_is_told_every_confirmed_address_by_pod_within_the_bound() -> None:
    confirmed = {WEB2: "shop/web", "fd00:100::a": "shop/web", CACHE2: "shop/cache"}
    assert plumbing.secondary_reported(confirmed) == (("shop/cache", (CACHE2,)), ("shop/web", (WEB2, "fd00:100::a")))
    assert plumbing.secondary_reported(confirmed, limit=2) == (("shop/cache", (CACHE2,)), ("shop/web", (WEB2,)))
    many = {f"10.{i // 65536}.{i // 256 % 256}.{i % 256}": f"shop/p{i // 4:04d}" for i in range(MAX_POD_ADDRESSES + 9)}
    assert sum(len(ips) for _, ips in plumbing.secondary_reported(many)) == MAX_POD_ADDRESSES


def pod_object(name: str, ip: str, annotations: dict[str, str] | None = None) -> SimpleNamespace:
    """A pod as the agent's watch hands it over (kubernetes_asyncio's attribute names)."""
    return SimpleNamespace(metadata=SimpleNamespace(namespace="shop", name=name, annotations=annotations),
                           spec=SimpleNamespace(host_network=False),
                           status=SimpleNamespace(phase="Running", pod_ip=ip, pod_ips=[SimpleNamespace(ip=ip)]))


def test_the_agent_names_a_confirmed_address_while_its_pod_claims_it() -> None:
    pods = LocalPods(None, "node-a")  # type: ignore[arg-type]  # the watch's API is not used here
    claims = {networks.NETWORK_STATUS: status(WEB, WEB2)}
    pods._seen(pod_object("web", WEB, claims))
    pods._seen(pod_object("cache", CACHE, {networks.NETWORK_STATUS: "not json"}))  # logged, not read
    assert pods.claims() == {"shop/web": ([WEB], (WEB2,))} and pods.primary_ips() == [WEB, CACHE]
    pods.confirm({WEB2: ("veth11", "shop/web"), CACHE: ("veth21", "shop/web"), "192.168.100.99": ("x", "shop/gone")})
    assert pods.by_ip == {WEB: "shop/web", CACHE: "shop/cache", WEB2: "shop/web"}  # never over a podIP
    pods._seen(pod_object("web", WEB, claims))  # a pod's frequent updates do not drop it meanwhile
    assert pods.by_ip[WEB2] == "shop/web"
    pods._seen(pod_object("web", WEB))  # its annotation no longer claims it: not the pod's now
    assert WEB2 not in pods.by_ip and not pods.secondary
    pods._seen(pod_object("web", WEB, claims))
    pods.confirm({WEB2: ("veth11", "shop/web")})
    pods.confirm({})  # the kernel no longer shows it
    assert WEB2 not in pods.by_ip
    pods.confirm({WEB2: ("veth11", "shop/web")})
    pods._gone("shop/web")
    assert pods.by_ip == {CACHE: "shop/cache"} and not pods.secondary and not pods.claims()


# -- live ------------------------------------------------------------------------------------------

SERVER = """
import http.server, socketserver
class Server(http.server.ThreadingHTTPServer):
    def server_bind(self):
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = "cache", 8080
Server(("0.0.0.0", 8080), http.server.SimpleHTTPRequestHandler).serve_forever()
"""


def requests(count: int) -> str:
    return ("import urllib.request\n"
            f"for i in range({count}):\n"
            f"    urllib.request.urlopen('http://{CACHE2}:8080/', timeout=5).read()\n")


@pytest.fixture
def node(cluster: Cluster) -> Iterator[tuple[Lab, str, dict[str, str]]]:
    """The node, its pods on both networks, the stranger; the pods in the API server with the
    annotations Multus would write (web's lying about the stranger's address)."""
    need_root()
    cluster.plane.kubectl("create", "namespace", "multus", check=False)
    web = pod("multus", "web-0", "node-a", WEB, owner=("StatefulSet", "web"))
    web["metadata"]["annotations"] = {networks.NETWORK_STATUS: status(WEB, WEB2, STRANGER)}
    cache = pod("multus", "cache-0", "node-a", CACHE, owner=("StatefulSet", "cache"))
    cache["metadata"]["annotations"] = {networks.NETWORK_STATUS: status(CACHE, CACHE2)}
    create_pods(cluster.plane, web, cache)
    lab = Lab()
    try:
        node_ns = lab.ns("fmnode")
        lab.exec(node_ns, "sysctl", "-qw", "net.ipv4.ip_forward=1")
        lab.veth(node_ns, [f"{NODE_IP}/24"], lab.ns("fmrtr"), ["172.18.0.1/24"])
        lab.exec(node_ns, "ip", "route", "add", "default", "via", "172.18.0.1")
        lab.exec(node_ns, "ip", "link", "add", "br-sec", "type", "bridge")
        lab.exec(node_ns, "ip", "link", "set", "br-sec", "up")
        where: dict[str, str] = {}
        for name, ip, second in (("web", WEB, WEB2), ("cache", CACHE, CACHE2)):
            where[name], where[f"{name}-eth0"] = lab.pod(node_ns, [ip])
            # The bridge plugin's second veth: net1 in the pod, the host side a port of br-sec.
            where[f"{name}-net1"], _ = lab.veth(node_ns, [], where[name], [f"{second}/24"])
            lab.exec(node_ns, "ip", "link", "set", where[f"{name}-net1"], "master", "br-sec")
        where["stranger"] = lab.ns("fmvm")
        where["stranger-port"], _ = lab.veth(node_ns, [], where["stranger"], [f"{STRANGER}/24"])
        lab.exec(node_ns, "ip", "link", "set", where["stranger-port"], "master", "br-sec")
        lab.exec(node_ns, "nft", "-f", "-", input_text=f"""
table bridge truth {{
  chain forward {{
    type filter hook forward priority 0;
    ip saddr {WEB2} ip daddr {CACHE2} tcp dport 8080 counter
    ip saddr {CACHE2} ip daddr {WEB2} tcp sport 8080 counter
    ip saddr {STRANGER} ip daddr {CACHE2} tcp dport 8080 counter
    ip saddr {CACHE2} ip daddr {STRANGER} tcp sport 8080 counter
  }}
}}""")
        yield lab, node_ns, where
    finally:
        lab.close()
        cluster.plane.kubectl("delete", "pod", "-n", "multus", "web-0", "cache-0", "--grace-period=0", "--force",
                              check=False)


def counters(lab: Lab, node_ns: str) -> list[int]:
    rules = json.loads(lab.exec(node_ns, "nft", "-j", "list", "table", "bridge", "truth"))["nftables"]
    return [r["rule"]["expr"][-1]["counter"]["bytes"] for r in rules if "rule" in r]


def test_the_kernel_confirms_a_secondary_address_only_in_the_pods_namespace(
        cluster: Cluster, node: tuple[Lab, str, dict[str, str]]) -> None:
    lab, node_ns, where = node
    view = links.Reader(node_ns).read()
    claims = {"multus/web-0": ([WEB], networks.claimed({networks.NETWORK_STATUS: status(WEB, WEB2, STRANGER)})),
              "multus/cache-0": ([CACHE], (CACHE2,))}
    plan = plumbing.plan(view.links, view.addresses, view.peers, [WEB, CACHE], {NODE_IP}, claims=claims)
    assert plan.secondary == {WEB2: (where["web-net1"], "multus/web-0"),
                              CACHE2: (where["cache-net1"], "multus/cache-0")}
    assert plan.pods == {WEB: where["web-eth0"], CACHE: where["cache-eth0"]}
    assert set(plan.interfaces) >= {where["web-net1"], where["cache-net1"], where["web-eth0"], where["cache-eth0"],
                                    where["stranger-port"]}  # where the rest of the secondary network enters
    assert "br-sec" not in plan.interfaces and len(plan.interfaces) == 6  # and the uplink


def test_secondary_traffic_is_the_pods_exactly_and_a_false_claim_is_not_believed(
        cluster: Cluster, node: tuple[Lab, str, dict[str, str]], tmp_path: Path) -> None:
    lab, node_ns, where = node
    op_iter = running(cluster)
    op = next(op_iter)
    agent = agent_process(cluster, op, node_ns, tmp_path)
    server = lab.popen(where["cache"], [sys.executable, "-c", SERVER], stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: ":8080" in lab.exec(where["cache"], "ss", "-ltn"), what="the server to listen")
        # Both pods' veths on both networks, the secondary bridge's other port, and the uplink.
        wait_for(lambda: "flowmap_agent_dp_interfaces 6.0" in agent_metrics(), what="the dp to attach")
        lab.exec(where["web"], sys.executable, "-c", requests(20))
        lab.exec(where["stranger"], sys.executable, "-c", requests(10))
        web_c2s, web_s2c, out_c2s, out_s2c = counters(lab, node_ns)
        assert min(web_c2s, web_s2c, out_c2s, out_s2c) > 0

        def settled(name: str, c2s: int, s2c: int) -> dict[str, Any] | None:
            conn = connection(cluster, name)
            b = (conn or {}).get("status", {}).get("bytes", {})
            return conn if (b.get("clientToServer"), b.get("serverToClient")) == (c2s, s2c) else None

        try:
            mine = wait_for(lambda: settled("multus.web-multus.cache-8080-tcp", web_c2s, web_s2c), timeout=30,
                            what=f"web's bytes {web_c2s}/{web_s2c}")
            outside = wait_for(lambda: settled("external-multus.cache-8080-tcp", out_c2s, out_s2c), timeout=30,
                               what=f"the stranger's bytes {out_c2s}/{out_s2c}")
        except AssertionError:
            print((tmp_path / "agent.log").read_text()[-4000:])
            listed = json.loads(cluster.plane.kubectl("get", "connections", "-o", "json").stdout)["items"]
            print({c["metadata"]["name"]: c.get("status", {}).get("bytes") for c in listed})
            raise
        assert mine["status"]["sessions"]["total"] == 20, mine["status"]
        assert "http" in mine["status"]["applications"], mine["status"]
        assert outside["status"]["sessions"]["total"] == 10, outside["status"]
        print(cluster.plane.kubectl("get", "connections").stdout)  # for the record (pytest -rP)
        said = [line for line in (tmp_path / "agent.log").read_text().splitlines() if "secondary addresses" in line]
        assert said and f"'{WEB2}': 'multus/web-0'" in said[-1] and not any(STRANGER in line for line in said), said
    finally:
        server.terminate()
        server.wait(10)
        agent.terminate()
        agent.wait(30)
        next(op_iter, None)
