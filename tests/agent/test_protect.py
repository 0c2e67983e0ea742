"""Protect mode on a simulated node: the agent's table in the node's real nftables, real traffic.

The node is a network namespace forwarding between three pod namespaces (a, b, c), routed like
Calico (a /32 and a /128 host route per pod; proxy ARP, and the node's fe80::1 as the pods' IPv6
gateway), with a kube-proxy-like DNAT of a Service to b. Each pod runs a TCP and a UDP echo
server (IPv4 and IPv6). Protected: a (may call b on 8080/TCP and 5353/UDP) and b (takes those
from a). c is not protected. The table's own counters say which rule stopped what.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import queue
import shutil
import subprocess
import sys
import threading
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
from prometheus_client import CollectorRegistry

from flowmap_agent.policy.compiling import Ruleset
from flowmap_agent.policy.protecting import Protector
from flowmap_agent.settings import Settings
from flowmap_api import report_pb2 as pb
from flowmap_api import report_pb2_grpc as pb_grpc
from flowmap_devenv import pki
from flowmap_devenv.netns import Lab
from tests.conftest import need, need_root
from tests.operator.test_reports import wait_for

Peer = pb.PodPolicy.Peer
PODS = {"a": ("10.244.1.10", "fd00:10::a"), "b": ("10.244.1.20", "fd00:10::b"), "c": ("10.244.1.30", "fd00:10::c")}
SERVICE = ("10.96.0.10", "fd00:96::10")  # port 80, DNATed to b:8080
# The pod's echo servers. UDP listens on the pod's own addresses (argv), not the wildcard, so that an
# answer leaves from the address it was asked on, as a real server's does: from a wildcard socket the
# kernel picks the source by the asker, and for a link-local asker (the node has no global IPv6
# address) that is the pod's own link-local address once its duplicate address detection is over,
# which the asker's connected socket refuses. Every socket is bound before "ready".
SERVER = """
import socket, sys, threading
def bound(kind, host, port):
    s = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, kind)
    if host == "::":
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((host, port))
    return s
def answer(s):
    while True:
        data, peer = s.recvfrom(4096)
        s.sendto(data, peer)
def accept(s):
    s.listen(128)
    while True:
        c, _ = s.accept()
        threading.Thread(target=echo, args=(c,), daemon=True).start()
def echo(c):
    with c:
        while data := c.recv(4096):
            c.sendall(data)
servers = [(accept, bound(socket.SOCK_STREAM, "::", port)) for port in (8080, 9090)]
servers += [(answer, bound(socket.SOCK_DGRAM, host, 5353)) for host in sys.argv[1:]]
for serve, s in servers:
    threading.Thread(target=serve, args=(s,), daemon=True).start()
print("ready", flush=True)
sys.stdin.read()
"""
# Each probe: "ok" (echoed), "refused" (a reset, or ICMP unreachable for UDP), "timeout" (no answer).
PROBE = """
import json, socket, sys
out = []
for kind, host, port in json.loads(sys.argv[1]):
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    s = socket.socket(family, socket.SOCK_STREAM if kind == "tcp" else socket.SOCK_DGRAM)
    s.settimeout(3 if kind == "tcp" else 1)
    try:
        s.connect((host, port))
        s.send(b"ping")
        out.append("ok" if s.recv(4) == b"ping" else "garbled")
    except ConnectionRefusedError:
        out.append("refused")
    except TimeoutError:
        out.append("timeout")
    finally:
        s.close()
print(json.dumps(out))
"""
# Connects again and again until the stop file appears; progress in a file, totals on stdout.
LOOP = """
import json, os, socket, sys
host, port, progress, stop = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
counts = {"ok": 0, "failed": 0}
while not os.path.exists(stop):
    s = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    s.settimeout(3)
    try:
        s.connect((host, port))
        s.send(b"ping")
        counts["ok" if s.recv(4) == b"ping" else "failed"] += 1
    except OSError:
        counts["failed"] += 1
    finally:
        s.close()
    with open(progress + ".tmp", "w") as f:
        f.write(str(sum(counts.values())))
    os.replace(progress + ".tmp", progress)
print(json.dumps(counts))
"""
# The agent's start, as far as Protect goes: the first policy of the run meets the table left before.
RESTART = """
import sys
from prometheus_client import CollectorRegistry
from flowmap_agent.policy.compiling import Ruleset
from flowmap_agent.policy.protecting import Protector
from flowmap_agent.settings import Settings
from flowmap_api import report_pb2 as pb
registry = CollectorRegistry()
Protector(Settings(node="node-a", netns=sys.argv[1]), registry).apply(pb.NodePolicy.FromString(sys.stdin.buffer.read()))
print(registry.get_sample_value("flowmap_agent_policy_transactions_total"))
"""
# A held connection: echoes each line typed on stdin through it.
HOLD = """
import socket, sys
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=3)
print("connected", flush=True)
for line in sys.stdin:
    s.sendall(line.encode())
    print(s.recv(4096).decode().strip(), flush=True)
"""


def policy(version: int, *, a_to_b: bool = True, c_to_b: bool = False) -> pb.NodePolicy:
    def hosts(*pods: str) -> list[str]:
        return [f"{PODS[p][0]}/32" for p in pods] + [f"{PODS[p][1]}/128" for p in pods]

    clients = ["a"] * a_to_b + ["c"] * c_to_b
    ingress = [Peer(cidrs=hosts(*clients), protocol=pb.TCP, ports=[8080])] if clients else []
    if a_to_b:
        ingress.append(Peer(cidrs=hosts("a"), protocol=pb.UDP, ports=[5353]))
    return pb.NodePolicy(version=version, pods=[
        pb.PodPolicy(pod="shop/a", ips=list(PODS["a"]), egress=[Peer(cidrs=hosts("b"), protocol=pb.TCP, ports=[8080]),
                                                                  Peer(cidrs=hosts("b"), protocol=pb.UDP, ports=[5353])]),
        pb.PodPolicy(pod="shop/b", ips=list(PODS["b"]), ingress=ingress)])


@dataclass
class Node:
    lab: Lab
    ns: str
    pods: dict[str, str]  # pod -> its namespace
    registry: CollectorRegistry = field(default_factory=CollectorRegistry)

    def nft(self, *args: str) -> str:
        return self.lab.exec(self.ns, "nft", *args)

    def probe(self, pod: str, *probes: tuple[str, str, int]) -> list[str]:
        ns = self.pods[pod] if pod != "node" else self.ns
        return list(json.loads(self.lab.exec(ns, sys.executable, "-c", PROBE, json.dumps(probes))))

    def table(self) -> dict[str, Any] | None:
        done = subprocess.run(["ip", "netns", "exec", self.ns, "nft", "-j", "list", "table", "inet", "flowmap"],
                              capture_output=True, text=True)
        return json.loads(done.stdout) if done.returncode == 0 else None

    def counter(self, chain: str, rule: str) -> int:
        """Packets counted by one rule of the table, read straight from nft."""
        listing = self.table() or {"nftables": []}
        (packets,) = [e["counter"]["packets"] for item in listing["nftables"] if "rule" in item
                      and item["rule"]["chain"] == chain and item["rule"].get("comment", "").split()[0] == rule
                      for e in item["rule"]["expr"] if "counter" in e]
        return int(packets)

    def handles(self) -> list[tuple[str, str, int]]:
        """Every set, chain and rule of the table with its handle: a rewrite would renumber them."""
        listing = self.table() or {"nftables": []}
        return sorted((kind, item[kind].get("chain", item[kind]["name"] if "name" in item[kind] else ""),
                       item[kind]["handle"]) for item in listing["nftables"] for kind in ("set", "chain", "rule")
                      if kind in item)

    def protector(self) -> Protector:
        self.registry = CollectorRegistry()
        return Protector(Settings(node="node-a", netns=self.ns), self.registry)

    def metric(self, name: str, **labels: str) -> float:
        return self.registry.get_sample_value(name, labels) or 0.0


@pytest.fixture
def node() -> Iterator[Node]:
    need_root()
    need(shutil.which("nft") is not None, "this test needs nft from nftables")
    lab = Lab()
    servers: list[subprocess.Popen[str]] = []
    try:
        node_ns = lab.ns("fmnode")
        for sysctl in ("net.ipv4.ip_forward=1", "net.ipv6.conf.all.forwarding=1"):
            lab.exec(node_ns, "sysctl", "-qw", sysctl)
        pods = {}
        for name, (ip4, ip6) in PODS.items():
            pods[name] = lab.pod(node_ns, [ip4, ip6])[0]
        # Proxy ARP answers the pods' 169.254.1.1 only for what the node can route: a default route.
        lab.veth(node_ns, ["172.18.0.2/24"], lab.ns("fmrtr"), ["172.18.0.1/24"])  # the uplink, to a router
        lab.exec(node_ns, "ip", "route", "add", "default", "via", "172.18.0.1")
        # kube-proxy's part: a Service DNATed to b in prerouting (and with it, connection tracking).
        lab.exec(node_ns, "nft", "-f", "-", input_text=f"""
table inet kubeproxy {{
  chain prerouting {{
    type nat hook prerouting priority dstnat;
    ip daddr {SERVICE[0]} tcp dport 80 dnat ip to {PODS["b"][0]}:8080
    ip6 daddr {SERVICE[1]} tcp dport 80 dnat ip6 to [{PODS["b"][1]}]:8080
  }}
}}""")
        for name, pod_ns in pods.items():
            servers.append(lab.popen(pod_ns, [sys.executable, "-c", SERVER, *PODS[name]], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE))
            assert servers[-1].stdout is not None and servers[-1].stdout.readline().strip() == "ready"
        n = Node(lab, node_ns, pods)
        # Everything flows before Protect (and IPv6 neighbours are resolved).
        assert n.probe("a", ("tcp", PODS["c"][0], 8080), ("tcp", PODS["c"][1], 9090)) == ["ok", "ok"]
        yield n
    finally:
        for server in servers:
            server.kill()
            server.wait()
        lab.close()


@pytest.mark.parametrize("family", [0, 1], ids=["ipv4", "ipv6"])
def test_allowed_traffic_passes_and_the_rest_is_reset_or_dropped(node: Node, family: int) -> None:
    b, c, service = PODS["b"][family], PODS["c"][family], SERVICE[family]
    assert node.protector().apply(policy(1)) is not None
    assert node.probe("a", ("tcp", b, 8080), ("udp", b, 5353), ("tcp", service, 80)) == ["ok", "ok", "ok"]
    # The node's own traffic to and from its pods is never filtered (kubelet probes).
    assert node.probe("node", ("tcp", b, 9090), ("udp", b, 5353)) == ["ok", "ok"]

    # New, unallowed TCP: a reset at the first SYN, counted once per attempt (no retransmission).
    before = node.counter("ingress", "reject"), node.counter("egress", "reject")
    assert node.probe("c", *[("tcp", b, 8080)] * 3, ("tcp", service, 80)) == ["refused"] * 4  # b's ingress
    assert node.probe("a", ("tcp", b, 9090), ("tcp", c, 8080)) == ["refused"] * 2  # a's egress
    assert (node.counter("ingress", "reject"), node.counter("egress", "reject")) == (before[0] + 4, before[1] + 2)

    # New, unallowed UDP: dropped, no answer.
    before = node.counter("ingress", "drop"), node.counter("egress", "drop")
    assert node.probe("c", ("udp", b, 5353), ("udp", b, 5353)) == ["timeout"] * 2
    assert node.probe("a", ("udp", c, 5353)) == ["timeout"]
    assert (node.counter("ingress", "drop"), node.counter("egress", "drop")) == (before[0] + 2, before[1] + 1)
    assert node.counter("egress", f"allowed{4 + 2 * family}") > 0 and node.counter("ingress", f"allowed{4 + 2 * family}") > 0


def test_a_connection_open_before_protect_keeps_going(node: Node) -> None:
    b = PODS["b"][0]
    held = node.lab.popen(node.pods["c"], [sys.executable, "-c", HOLD, b, "8080"], stdin=subprocess.PIPE,
                          stdout=subprocess.PIPE)
    assert held.stdin is not None and held.stdout is not None
    try:
        assert held.stdout.readline().strip() == "connected"
        assert node.protector().apply(policy(1)) is not None
        assert node.probe("c", ("tcp", b, 8080)) == ["refused"]  # a new one is not allowed
        for word in ("still", "here"):
            held.stdin.write(word + "\n")
            held.stdin.flush()
            assert held.stdout.readline().strip() == word
        assert node.counter("forward", "established") > 0
    finally:
        held.kill()
        held.wait()


def test_peers_change_in_place_without_touching_rules_or_connections(node: Node) -> None:
    b = PODS["b"][0]
    protector = node.protector()
    assert protector.apply(policy(1)) is not None
    handles = node.handles()
    held = node.lab.popen(node.pods["a"], [sys.executable, "-c", HOLD, b, "8080"], stdin=subprocess.PIPE,
                          stdout=subprocess.PIPE)
    assert held.stdin is not None and held.stdout is not None

    def echo(word: str) -> str:
        assert held.stdin is not None and held.stdout is not None
        held.stdin.write(word + "\n")
        held.stdin.flush()
        return held.stdout.readline().strip()

    try:
        assert held.stdout.readline().strip() == "connected"
        assert node.probe("c", ("tcp", b, 8080)) == ["refused"]
        assert protector.apply(policy(2, c_to_b=True)) is not None  # c joins b's peers
        assert node.probe("c", ("tcp", b, 8080)) == ["ok"] and echo("one") == "one"
        assert protector.apply(policy(3, a_to_b=False, c_to_b=True)) is not None  # a leaves them
        assert node.probe("a", ("tcp", b, 8080)) == ["refused"]  # new connections from a stop...
        assert echo("two") == "two"  # ...the established one goes on
        assert node.handles() == handles  # set elements changed in place: no set, chain or rule was rewritten
    finally:
        held.kill()
        held.wait()


@dataclass
class Loop:
    proc: subprocess.Popen[str]
    progress: Path

    def count(self) -> int:
        try:
            return int(self.progress.read_text() or 0)
        except FileNotFoundError:
            return 0


class Monitor:
    """``nft monitor`` in the node: every change to its ruleset, between marks of our own."""

    def __init__(self, node: Node) -> None:
        self.node, self.marks = node, 0
        self.ours: set[str] = set()  # the transactions of our marks, as the monitor names them
        self.proc = subprocess.Popen(["ip", "netns", "exec", node.ns, "nft", "monitor"], stdout=subprocess.PIPE,
                                     text=True)
        self.lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout or ():
            self.lines.put(line.strip())

    def mark(self) -> list[str]:
        """The changes reported since the last mark (a mark the monitor has not reported is made again)."""
        seen: list[str] = []
        while True:
            self.marks += 1
            name = f"fmmark{self.marks}"
            for verb in ("add", "delete"):  # `ip netns exec` execs nft: the pid the monitor names is ours
                nft = subprocess.Popen(["ip", "netns", "exec", self.node.ns, "nft", verb, "table", "inet", name])
                assert nft.wait() == 0
                self.ours.add(f"by process {nft.pid} (nft)")
            with contextlib.suppress(queue.Empty):
                while (line := self.lines.get(timeout=2)) != f"delete table inet {name}":
                    seen.append(line)
                return [line for line in seen if line and "fmmark" not in line and not line.endswith(tuple(self.ours))]

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait()


def test_a_restarted_agent_changes_nothing_and_nothing_slips_through(node: Node, tmp_path: Path) -> None:
    node.protector().apply(policy(1))
    handles = node.handles()
    stop = tmp_path / "stop"
    loops = {}
    monitor = Monitor(node)
    try:
        for family in (0, 1):
            for name, pod in (("allowed", "a"), ("denied", "c")):
                progress = tmp_path / f"{name}{family}"
                loops[(name, family)] = Loop(node.lab.popen(node.pods[pod], [
                    sys.executable, "-c", LOOP, PODS["b"][family], "8080", str(progress), str(stop)],
                    stdout=subprocess.PIPE), progress)
        wait_for(lambda: all(loop.count() >= 5 for loop in loops.values()), what="clients running before")
        started = {key: loop.count() for key, loop in loops.items()}
        monitor.mark()
        # The agent restarts: a new process, the same reconcile code, the table the last one left.
        done = subprocess.run([sys.executable, "-c", RESTART, node.ns], input=policy(1).SerializeToString(),
                              capture_output=True, check=True)
        assert done.stdout.strip() == b"0.0", done.stdout + done.stderr  # no transaction at all
        assert monitor.mark() == []  # nothing in the node's ruleset changed
        wait_for(lambda: all(loop.count() >= started[key] + 5 for key, loop in loops.items()),
                 what="clients running after")
        stop.touch()
        totals = {key: json.loads(loop.proc.communicate(timeout=30)[0]) for key, loop in loops.items()}
    finally:
        stop.touch()
        for loop in loops.values():
            loop.proc.kill()
            loop.proc.wait()
        monitor.close()
    for family in (0, 1):
        assert totals[("allowed", family)]["failed"] == 0 and totals[("allowed", family)]["ok"] >= 10
        assert totals[("denied", family)]["ok"] == 0 and totals[("denied", family)]["failed"] >= 10
    assert node.handles() == handles


def test_the_switch_and_an_empty_policy_remove_the_table(node: Node) -> None:
    b = PODS["b"][0]
    protector = node.protector()
    for removal in (pb.NodePolicy(version=2, enforcement_disabled=True, pods=policy(2).pods),
                    pb.NodePolicy(version=3)):
        assert protector.apply(policy(1)) is not None and node.table() is not None
        assert node.probe("c", ("tcp", b, 8080)) == ["refused"]
        assert protector.apply(removal) is not None
        assert node.table() is None and "flowmap" not in node.nft("list", "ruleset")
        assert node.probe("c", ("tcp", b, 8080), ("udp", b, 5353)) == ["ok", "ok"]
        assert protector.table.apply(Ruleset()) == 0  # removing again: nothing to do


@pytest.mark.parametrize("spoil", ["address", "network", "size"])
def test_a_hostile_policy_is_refused_whole_and_the_rules_stay(node: Node, spoil: str) -> None:
    protector = node.protector()
    assert protector.apply(policy(1)) is not None
    listing, handles = node.nft("list", "table", "inet", "flowmap"), node.handles()
    bad = policy(2, c_to_b=True)  # would let c in, if any of it were applied
    if spoil == "address":
        bad.pods[0].ips.append("10.244.1.300")
    elif spoil == "network":
        bad.pods[1].ingress[0].cidrs.append("fd00:10::1/64")
    else:
        peer = Peer(cidrs=[f"10.{i >> 16}.{(i >> 8) & 255}.{i & 255}" for i in range(1000)], protocol=pb.TCP, ports=[80])
        for i in range(1000):  # 10^6 elements
            bad.pods.add(pod=f"x/p{i}", ips=[f"10.245.{i >> 8}.{i & 255}"]).egress.append(peer)
    assert protector.apply(bad) is None
    assert node.metric("flowmap_agent_policy_refused_total") == 1
    assert node.nft("list", "table", "inet", "flowmap") == listing and node.handles() == handles
    assert node.probe("c", ("tcp", PODS["b"][0], 8080)) == ["refused"]


def test_a_failed_transaction_changes_nothing_and_is_retried(node: Node) -> None:
    from flowmap_agent.errors import NftError

    protector = node.protector()
    assert protector.apply(policy(1)) is not None
    # Another hand removes an element the agent believes is there: the next change, which deletes
    # it, fails whole — including its other parts (c joining b's peers).
    a, b = PODS["a"][0], PODS["b"][0]
    node.nft("delete", "element", "inet", "flowmap", "ingress4", f"{{ {b} . 17 . {a} . 5353 }}")
    listing = node.nft("list", "table", "inet", "flowmap")
    with pytest.raises(NftError):
        protector.apply(policy(2, a_to_b=False, c_to_b=True))
    assert node.nft("list", "table", "inet", "flowmap") == listing
    assert node.probe("c", ("tcp", b, 8080)) == ["refused"]
    # Retried: the table is read again first, and the change goes through.
    assert protector.apply(policy(2, a_to_b=False, c_to_b=True)) is not None
    assert node.probe("c", ("tcp", b, 8080)) == ["ok"]


class Operator(pb_grpc.PolicyServiceServicer):
    """A PolicyService for the test: streams what the test puts in its queue, checks the token."""

    def __init__(self, token: str) -> None:
        self.token = token
        self.queue: asyncio.Queue[pb.NodePolicy | None] = asyncio.Queue()  # None: break the stream
        self.nodes: list[str] = []

    async def Watch(self, request: pb.WatchRequest,  # noqa: N802
                    context: grpc.aio.ServicerContext) -> AsyncIterator[pb.NodePolicy]:
        if dict(context.invocation_metadata() or ()).get("authorization") != f"Bearer {self.token}":
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "no token")
        self.nodes.append(request.node)
        while (policy := await self.queue.get()) is not None:
            yield policy
        await context.abort(grpc.StatusCode.UNAVAILABLE, "going away")


def test_the_watch_stream_applies_updates_and_keeps_the_rules_through_a_break(node: Node, tmp_path: Path) -> None:
    keys = pki.create(tmp_path / "pki")
    (tmp_path / "token").write_text("secret-token\n")
    b = PODS["b"][0]

    async def scenario() -> None:
        operator = Operator("secret-token")

        async def serve(port: int = 0) -> tuple[grpc.aio.Server, int]:
            server = grpc.aio.server()
            pb_grpc.add_PolicyServiceServicer_to_server(operator, server)
            creds = grpc.ssl_server_credentials([(keys.serving_key.read_bytes(), keys.serving_cert.read_bytes())])
            port = server.add_secure_port(f"127.0.0.1:{port}", creds)
            await server.start()
            return server, port

        server, port = await serve()
        settings = Settings(node="node-a", netns=node.ns, operator=f"localhost:{port}", ca_file=str(keys.ca_cert),
                            token_file=str(tmp_path / "token"), interval=0.2)
        registry = CollectorRegistry()
        protector = Protector(settings, registry)
        stop = asyncio.Event()
        running = asyncio.create_task(protector.run(stop))

        async def until(check: Any, what: str) -> None:
            for _ in range(300):
                if await asyncio.to_thread(check):
                    return
                await asyncio.sleep(0.1)
            raise AssertionError(f"timed out waiting for {what}")

        def version() -> float:
            return registry.get_sample_value("flowmap_agent_policy_version") or 0.0

        def breaks() -> float:
            return registry.get_sample_value("flowmap_agent_policy_watch_breaks_total", {"code": "unavailable"}) or 0.0

        try:
            await operator.queue.put(policy(1))
            await until(lambda: version() == 1, "the first policy")
            assert operator.nodes == ["node-a"]
            assert await asyncio.to_thread(node.probe, "c", ("tcp", b, 8080)) == ["refused"]
            await operator.queue.put(policy(2, c_to_b=True))
            await until(lambda: version() == 2, "the update")
            assert await asyncio.to_thread(node.probe, "c", ("tcp", b, 8080)) == ["ok"]

            await operator.queue.put(None)  # the stream breaks; then the operator is away
            await until(lambda: breaks() >= 1, "the break")
            await server.stop(None)
            await until(lambda: breaks() >= 3, "reconnecting to fail twice")
            assert node.table() is not None and version() == 2
            assert await asyncio.to_thread(node.probe, "c", ("tcp", b, 8080), ("tcp", b, 9090)) == ["ok", "refused"]

            server, _ = await serve(port)  # back, with a new policy
            await operator.queue.put(policy(3, a_to_b=False, c_to_b=True))
            await until(lambda: version() == 3, "the policy after reconnecting")
            assert await asyncio.to_thread(node.probe, "a", ("tcp", b, 8080)) == ["refused"]
            assert operator.nodes == ["node-a"] * len(operator.nodes) and len(operator.nodes) >= 2
        finally:
            stop.set()
            await running
            await server.stop(None)
        assert node.table() is not None  # a graceful stop leaves the table

    asyncio.run(scenario())
