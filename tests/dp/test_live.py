"""``flowmap dp run`` end to end: real servers and clients in pod namespaces, a node namespace
routing between them, the dp watching the node's pod-facing veths, this test as the agent.

Expected counts come from the kernel: an nftables table in the node namespace counts, per
direction, the packets and bytes (IP length at the forward hook) of exactly the 5-tuple under
test; the dp's per-session deltas, summed over the reports, must equal them exactly.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import pytest

from flowmap_agent.listening import ReportReader
from flowmap_devenv.netns import Lab, netns
from flowmap_dp import wire_pb2
from flowmap_dp.capture import Encapsulation, RingConfig
from flowmap_dp.running import Capture
from tests.conftest import need

FLOWMAP = str(Path(sys.executable).with_name("flowmap"))
A4, B4, A6, B6 = "10.62.1.2", "10.62.2.2", "fd62:1::2", "fd62:2::2"
# The node's own addresses (the pods' gateways), given to the dp as the agent gives them.
NODE_A4, NODE_A6, NODE_B4, NODE_B6 = "10.62.1.1", "fd62:1::1", "10.62.2.1", "fd62:2::1"

Key = tuple[int, bytes, int, bytes, int]


@dataclass
class Node:
    """pod-a and pod-b namespaces, each joined to a node namespace that routes between them."""

    lab: Lab
    node: str
    pod_a: str
    pod_b: str
    host_a: str  # node side of pod-a's veth
    host_b: str

    def nft(self, family: str, proto: str, client: str, cport: int, server: str, sport: int,
            hooks: tuple[str, ...] = ("forward",)) -> None:
        """Count the 5-tuple per direction at the node's forward hook (or ``hooks``: input and
        output for the node's own sessions). A later IP fragment carries no ports: those between
        the two addresses are counted apart, per direction (``c2s_frag``, ``s2c_frag``)."""
        fam = "ip" if family == "ip" else "ip6"
        later = "ip frag-off & 0x1fff != 0" if fam == "ip" else "frag frag-off != 0"
        chains = "".join(f"""
          chain fm{hook} {{
            type filter hook {hook} priority 0; policy accept;
            {fam} saddr {client} {fam} daddr {server} {proto} sport {cport} {proto} dport {sport} counter name c2s
            {fam} saddr {server} {fam} daddr {client} {proto} sport {sport} {proto} dport {cport} counter name s2c
            {fam} saddr {client} {fam} daddr {server} {later} counter name c2s_frag
            {fam} saddr {server} {fam} daddr {client} {later} counter name s2c_frag
          }}""" for hook in hooks)
        rules = f"""
        table inet fmtest {{
          counter c2s {{ packets 0 bytes 0 }}
          counter s2c {{ packets 0 bytes 0 }}
          counter c2s_frag {{ packets 0 bytes 0 }}
          counter s2c_frag {{ packets 0 bytes 0 }}{chains}
        }}"""
        self.lab.exec(self.node, "nft", "-f", "-", input_text=rules)

    def counters(self) -> dict[str, tuple[int, int]]:
        """(packets, bytes) per named counter."""
        out = json.loads(self.lab.exec(self.node, "nft", "-j", "list", "counters", "table", "inet", "fmtest"))
        return {c["counter"]["name"]: (c["counter"]["packets"], c["counter"]["bytes"])
                for c in out["nftables"] if "counter" in c}


@pytest.fixture
def node(privileged: None) -> Iterator[Node]:
    lab = Lab()
    try:
        n, a, b = lab.ns("fmn"), lab.ns("fma"), lab.ns("fmb")
        pa, ha = lab.veth(a, [f"{A4}/24", f"{A6}/64"], n, ["10.62.1.1/24", "fd62:1::1/64"])
        pb, hb = lab.veth(b, [f"{B4}/24", f"{B6}/64"], n, ["10.62.2.1/24", "fd62:2::1/64"])
        for pod, gw4, gw6 in ((a, "10.62.1.1", "fd62:1::1"), (b, "10.62.2.1", "fd62:2::1")):
            lab.exec(pod, "ip", "route", "add", "default", "via", gw4)
            lab.exec(pod, "ip", "-6", "route", "add", "default", "via", gw6)
        lab.exec(n, "sysctl", "-qw", "net.ipv4.ip_forward=1", "net.ipv6.conf.all.forwarding=1")
        yield Node(lab, n, a, b, ha, hb)
    finally:
        lab.close()


class Agent:
    """This test plays the node-agent: it listens, the dp connects and streams reports."""

    def __init__(self, path: str) -> None:
        self.reader = ReportReader(path)
        self.reports: list[wire_pb2.Report] = []

    def pump(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            self.reports += self.reader.poll(left)

    def totals(self, key: Key) -> tuple[int, int, int, int]:
        """Summed (packets c2s, bytes c2s, packets s2c, bytes s2c) of one session, oriented as ``key``.

        Records the dp oriented the other way round are swapped back: the dp reads each ring in
        turn, so when a session's first two packets enter through different interfaces, the answer
        can be read first and taken for the opening packet (TCP is decided by its SYN and is not
        affected). What is counted, per direction, must still be exact.
        """
        proto, c, cp, s_ip, sp = key
        t = [0, 0, 0, 0]
        for r in self.reports:
            for s in r.sessions:
                k = (s.ip_proto, s.client_ip, s.client_port, s.server_ip, s.server_port)
                if k == key:
                    t = [t[0] + s.packets_c2s, t[1] + s.bytes_c2s, t[2] + s.packets_s2c, t[3] + s.bytes_s2c]
                elif k == (proto, s_ip, sp, c, cp):
                    t = [t[0] + s.packets_s2c, t[1] + s.bytes_s2c, t[2] + s.packets_c2s, t[3] + s.bytes_c2s]
        return t[0], t[1], t[2], t[3]

    def wait(self, cond: Callable[[], bool], timeout: float = 10.0) -> bool:
        deadline = time.monotonic() + timeout
        while not cond():
            if time.monotonic() > deadline:
                return False
            self.pump(0.1)
        return True

    def dump(self) -> str:
        """Every session record received, for assertion messages."""
        return "\n".join(f"w{r.worker} seq{r.sequence} {s.ip_proto} {s.client_ip.hex()}:{s.client_port} -> "
                         f"{s.server_ip.hex()}:{s.server_port} c2s={s.packets_c2s}/{s.bytes_c2s} "
                         f"s2c={s.packets_s2c}/{s.bytes_s2c}" for r in self.reports for s in r.sessions)

    def health(self, worker: int = 0) -> wire_pb2.Health:
        return [r for r in self.reports if r.worker == worker and r.HasField("health")][-1].health


@pytest.fixture
def agent(tmp_path: Path) -> Iterator[Agent]:
    a = Agent(str(tmp_path / "agent.sock"))
    yield a
    a.reader.close()


@pytest.fixture
def start_dp(node: Node, agent: Agent, tmp_path: Path) -> Iterator[Callable[..., subprocess.Popen[str]]]:
    procs: list[subprocess.Popen[str]] = []

    def start(*args: str) -> subprocess.Popen[str]:
        log = open(tmp_path / f"dp{len(procs)}.log", "w")
        own = [arg for address in (NODE_A4, NODE_A6, NODE_B4, NODE_B6) for arg in ("--local-address", address)]
        p = node.lab.popen(node.node, [FLOWMAP, "dp", "run", "--socket", agent.reader.path, "--interval", "0.2",
                                       "--retire-ms", "10", "--block-size", str(1 << 18), *own, *args],
                           stdout=log, stderr=subprocess.STDOUT)
        procs.append(p)
        # Its first report comes once its loop runs on the attached rings (it connects before).
        before = len(agent.reports)
        assert agent.wait(lambda: len(agent.reports) > before or p.poll() is not None, 10), "dp did not report"
        assert p.poll() is None, (tmp_path / f"dp{len(procs) - 1}.log").read_text()
        return p

    yield start
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


def _ip(addr: str) -> bytes:
    return socket.inet_pton(socket.AF_INET6 if ":" in addr else socket.AF_INET, addr)


def _http_exchange(node: Node, tmp_path: Path, server: str, client: str, cport: int,
                   server_ns: str = "", client_ns: str = "") -> int:
    """http.server in pod-b (or ``server_ns``) serves a 200 kB file to a client socket in pod-a
    (or ``client_ns``); returns bytes received."""
    server_ns, client_ns = server_ns or node.pod_b, client_ns or node.pod_a
    (tmp_path / "www").mkdir(exist_ok=True)
    (tmp_path / "www" / "blob").write_bytes(os.urandom(200_000))
    family = socket.AF_INET6 if ":" in server else socket.AF_INET
    srv = node.lab.popen(server_ns, [sys.executable, "-m", "http.server", "--bind", server, "8080"],
                         cwd=tmp_path / "www", stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _attempt in range(200):  # wait for the server from an ephemeral port: not the session under test
            with netns(client_ns), socket.socket(family, socket.SOCK_STREAM) as probe:
                if probe.connect_ex((server, 8080)) == 0:
                    break
            time.sleep(0.05)
        with netns(client_ns):
            sock = socket.socket(family, socket.SOCK_STREAM)
        received = b""
        with sock:
            sock.bind((client, cport))
            sock.settimeout(5)
            sock.connect((server, 8080))
            sock.sendall(b"GET /blob HTTP/1.0\r\nHost: pod-b\r\n\r\n")
            while chunk := sock.recv(65536):
                received += chunk
        return len(received)
    finally:
        srv.terminate()
        srv.wait()


@pytest.mark.parametrize("parser", ["compiled", "per-packet"])
@pytest.mark.parametrize("server,client", [(B4, A4), (B6, A6)], ids=["ipv4", "ipv6"])
def test_tcp_session_counts_equal_the_kernel(node: Node, agent: Agent, start_dp: Callable[..., object],
                                             tmp_path: Path, server: str, client: str, parser: str) -> None:
    node.nft("ip" if ":" not in server else "ip6", "tcp", client, 41000, server, 8080)
    start_dp("--iface", node.host_a, "--iface", node.host_b, "--parser", parser)
    got = _http_exchange(node, tmp_path, server, client, 41000)
    assert got > 200_000
    c2s, s2c = node.counters()["c2s"], node.counters()["s2c"]
    key = (6, _ip(client), 41000, _ip(server), 8080)
    want = (c2s[0], c2s[1], s2c[0], s2c[1])
    agent.wait(lambda: agent.totals(key) == want)
    assert agent.totals(key) == want
    new = [s for r in agent.reports for s in r.sessions if (s.ip_proto, s.client_port, s.server_port) == key[::2]]
    assert sum(s.new for s in new) == sum(s.opened for s in new) == 1
    h = agent.health()
    assert h.kernel_drops == 0 and h.kernel_packets >= c2s[0] + s2c[0]
    assert sorted(h.interfaces) == sorted([node.host_a, node.host_b])


@pytest.mark.parametrize("node_is", ["client", "server"])
@pytest.mark.parametrize("family", ["ip", "ip6"])
def test_the_nodes_own_sessions_count_both_directions(node: Node, agent: Agent, start_dp: Callable[..., object],
                                                      tmp_path: Path, family: str, node_is: str) -> None:
    """The node's own stack talks to a pod (a kubelet probe, a hostNetwork pod) or serves one:
    what it sends leaves through the pod's veth, kept because its source is the node's."""
    if node_is == "client":  # node -> pod-b
        client, server = (NODE_B4, B4) if family == "ip" else (NODE_B6, B6)
        client_ns, server_ns = node.node, node.pod_b
    else:  # pod-a -> node
        client, server = (A4, NODE_A4) if family == "ip" else (A6, NODE_A6)
        client_ns, server_ns = node.pod_a, node.node
    node.nft(family, "tcp", client, 41004, server, 8080, hooks=("input", "output"))
    start_dp("--iface", node.host_a, "--iface", node.host_b)
    assert _http_exchange(node, tmp_path, server, client, 41004, server_ns, client_ns) > 200_000
    c2s, s2c = node.counters()["c2s"], node.counters()["s2c"]
    key = (6, _ip(client), 41004, _ip(server), 8080)
    want = (c2s[0], c2s[1], s2c[0], s2c[1])
    assert c2s[1] > 0 and s2c[1] > 200_000
    assert agent.wait(lambda: agent.totals(key) == want), (want, agent.totals(key))
    assert sum(s.opened for r in agent.reports for s in r.sessions if (s.client_port, s.server_port) == (41004, 8080)) == 1


@pytest.mark.parametrize("server,client", [(B4, A4), (B6, A6)], ids=["ipv4", "ipv6"])
def test_udp_exchange_counts_equal_the_kernel(node: Node, agent: Agent, start_dp: Callable[..., object],
                                              server: str, client: str) -> None:
    node.nft("ip" if ":" not in server else "ip6", "udp", client, 41001, server, 5353)
    start_dp("--iface", node.host_a, "--iface", node.host_b)
    family = socket.AF_INET6 if ":" in server else socket.AF_INET
    with netns(node.pod_b):
        srv = socket.socket(family, socket.SOCK_DGRAM)
        srv.bind((server, 5353))
    with netns(node.pod_a):
        cli = socket.socket(family, socket.SOCK_DGRAM)
        cli.bind((client, 41001))
    with srv, cli:
        srv.settimeout(5)
        cli.settimeout(5)
        for size in SIZES:
            cli.sendto(b"u" * size, (server, 5353))
            data, peer = srv.recvfrom(65536)
            srv.sendto(data[: size // 3], peer)
            cli.recv(65536)
    n = node.counters()
    key = (17, _ip(client), 41001, _ip(server), 5353)
    # The 4000- and 7000-byte datagrams (and the 2333-byte answer) are fragmented on the 1500-byte
    # veths: the session counts every fragment, the later ones attributed through their first.
    want = (n["c2s"][0] + n["c2s_frag"][0], n["c2s"][1] + n["c2s_frag"][1],
            n["s2c"][0] + n["s2c_frag"][0], n["s2c"][1] + n["s2c_frag"][1])
    agent.wait(lambda: agent.totals(key) == want)
    assert agent.totals(key) == want
    v6 = family == socket.AF_INET6
    on_wire = [_on_wire(size, v6) for size in SIZES], [_on_wire(size // 3, v6) for size in SIZES]
    assert want == (sum(p for p, _ in on_wire[0]), sum(b for _, b in on_wire[0]),
                    sum(p for p, _ in on_wire[1]), sum(b for _, b in on_wire[1]))
    assert n["c2s"][0] == n["s2c"][0] == len(SIZES) and n["c2s_frag"][0] == 2 + 4 and n["s2c_frag"][0] == 1
    assert agent.health().ignored["fragment"] == 0
    # The fragment table's events, as exported: 3 fragmented datagrams, 7 later fragments.
    frags = {"tracked": 3, "attributed": 7, "evicted_full": 0, "expired": 0}
    assert agent.wait(lambda: dict(agent.health().fragments) == frags), agent.health().fragments


SIZES = (1, 100, 1000, 1400, 4000, 7000)


def _on_wire(size: int, v6: bool, mtu: int = 1500) -> tuple[int, int]:
    """(packets, IP bytes) of a UDP datagram of ``size`` payload bytes as the kernel sends it on
    a ``mtu`` link: fragments of (mtu - headers) rounded down to 8 bytes, each with its own IP
    header (IPv6: 40 bytes + an 8-byte Fragment header)."""
    l4, hdr = size + 8, 40 if v6 else 20
    if hdr + l4 <= mtu:
        return 1, hdr + l4
    frag_hdr = hdr + (8 if v6 else 0)
    per = (mtu - frag_hdr) & ~7
    count = -(-l4 // per)
    return count, l4 + count * frag_hdr


def test_attach_and_detach_at_run_time(node: Node, agent: Agent, start_dp: Callable[..., object]) -> None:
    start_dp()  # no interface yet: the agent names them
    ports = iter(range(42000, 42100))

    def exchange() -> Key:
        port = next(ports)
        with netns(node.pod_b):
            srv = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            srv.bind((B4, 6000))
        with netns(node.pod_a):
            cli = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            cli.bind((A4, port))
        with srv, cli:
            srv.settimeout(5)
            cli.sendto(b"ping", (B4, 6000))
            _, peer = srv.recvfrom(100)
            srv.sendto(b"pong", peer)
        return (17, _ip(A4), port, _ip(B4), 6000)

    def attached(names: list[str]) -> bool:
        return bool(agent.reports) and sorted(agent.health().interfaces) == sorted(names)

    agent.reader.set_interfaces([node.host_a, node.host_b])
    assert agent.wait(lambda: attached([node.host_a, node.host_b]))
    k1 = exchange()
    assert agent.wait(lambda: agent.totals(k1) == (1, 32, 1, 32)), agent.dump()  # 20 + 8 + 4 each way
    agent.reader.set_interfaces([node.host_b])
    assert agent.wait(lambda: attached([node.host_b]))
    k2 = exchange()
    agent.pump(1.0)
    assert agent.totals(k2) == (0, 0, 1, 32)  # only the answer entered the node through a watched veth
    agent.reader.set_interfaces([node.host_a, node.host_b, "fm-not-there"])
    assert agent.wait(lambda: attached([node.host_a, node.host_b]))
    assert list(agent.health().failed_interfaces) == ["fm-not-there"]
    k3 = exchange()
    assert agent.wait(lambda: agent.totals(k3) == (1, 32, 1, 32)), agent.dump()


def test_bpf_filter_expression(node: Node, agent: Agent, start_dp: Callable[..., object], tmp_path: Path) -> None:
    start_dp("--iface", node.host_a, "--iface", node.host_b, "--filter", "udp")
    _http_exchange(node, tmp_path, B4, A4, 41002)
    with netns(node.pod_a):
        cli = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        cli.bind((A4, 41003))
    with cli:
        cli.sendto(b"x" * 10, (B4, 9))
    udp = (17, _ip(A4), 41003, _ip(B4), 9)
    assert agent.wait(lambda: agent.totals(udp) == (1, 38, 0, 0))
    assert not [s for r in agent.reports for s in r.sessions if s.ip_proto == 6]


@pytest.mark.parametrize("named_by", ["cli", "agent"])
def test_fanout_two_workers_count_every_flow_once(node: Node, agent: Agent, start_dp: Callable[..., object],
                                                  named_by: str) -> None:
    node.lab.exec(node.node, "nft", "-f", "-", input_text="""
    table inet fmtest {
      counter c2s { packets 0 bytes 0 }
      counter s2c { packets 0 bytes 0 }
      chain fmfwd {
        type filter hook forward priority 0; policy accept;
        ip saddr 10.62.1.2 udp dport 7000 counter name c2s
        ip daddr 10.62.1.2 udp sport 7000 counter name s2c
      }
    }""")
    if named_by == "cli":
        start_dp("--iface", node.host_a, "--iface", node.host_b, "--workers", "2")
    else:  # attached at run time: the supervisor opens both workers' fanout members
        start_dp("--workers", "2")
        agent.reader.set_interfaces([node.host_a, node.host_b])
    assert agent.wait(lambda: agent.reader.connections == 2)
    assert agent.wait(lambda: all(sorted(agent.health(w).interfaces) == sorted([node.host_a, node.host_b])
                                  for w in (0, 1)) if {r.worker for r in agent.reports} == {0, 1} else False)
    with netns(node.pod_b):
        srv = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        srv.bind((B4, 7000))
    flows = 64
    with srv:
        srv.settimeout(5)
        for i in range(flows):
            with netns(node.pod_a):
                cli = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            with cli:
                cli.bind((A4, 43000 + i))
                for n in (10, 300):
                    cli.sendto(b"f" * n, (B4, 7000))
                    data, peer = srv.recvfrom(1000)
                    srv.sendto(data, peer)
    c2s, s2c = node.counters()["c2s"], node.counters()["s2c"]
    keys = [(17, _ip(A4), 43000 + i, _ip(B4), 7000) for i in range(flows)]

    def summed() -> tuple[int, int, int, int]:
        return tuple(map(sum, zip(*(agent.totals(k) for k in keys))))  # type: ignore[return-value]

    assert agent.wait(lambda: summed() == (c2s[0], c2s[1], s2c[0], s2c[1]))
    owners: dict[int, set[int]] = {}
    for r in agent.reports:
        for s in r.sessions:
            if s.server_port == 7000:
                owners.setdefault(s.client_port, set()).add(r.worker)
    assert len(owners) == flows and all(len(w) == 1 for w in owners.values())
    assert {w for ws in owners.values() for w in ws} == {0, 1}  # the hash spread 64 flows over both


def test_a_control_becomes_each_rings_filter() -> None:
    """The agent's addresses add to the command line's; the overlay goes on the underlay's rings
    only; what the dp cannot use (a newer agent's, a typo) is left out, never fatal."""
    control = wire_pb2.Control(interfaces=["veth1", "eth0", "veth1", "flannel.1"],
                               local_addresses=["10.244.0.1", "not-an-address", "172.18.0.2"], underlay=["eth0"],
                               overlay=[wire_pb2.Encapsulation(ip_proto=17, port=8472),
                                        wire_pb2.Encapsulation(ip_proto=17, port=0),
                                        wire_pb2.Encapsulation(ip_proto=4)])
    capture = Capture.from_control(control)
    assert capture.interfaces == ("veth1", "eth0", "flannel.1")
    base = RingConfig(local_addresses=("172.18.0.2",))
    assert capture.ring(base, "eth0") == replace(base, local_addresses=("172.18.0.2", "10.244.0.1"),
                                                 overlay=(Encapsulation(17, 8472), Encapsulation(4)))
    assert capture.ring(base, "veth1").overlay == capture.ring(base, "flannel.1").overlay == ()
    assert Capture.from_json(json.loads(json.dumps(capture.to_json()))) == capture
    assert Capture.from_control(wire_pb2.Control(interfaces=["eth0"])).ring(base, "eth0") == base


@pytest.mark.parametrize("workers", [1, 2])
def test_the_agent_names_the_nodes_addresses_at_run_time(node: Node, agent: Agent, start_dp: Callable[..., object],
                                                         workers: int) -> None:
    """An address the node gains after the dp started (a CNI's bridge or tunnel address appears
    with the first pod) counts as the node's own once the agent names it, and no longer once it
    stops naming it; the command line's addresses stay. With two workers, the supervisor opens
    the rings with the agent's addresses."""
    gateway = "10.62.2.254"
    node.lab.exec(node.node, "ip", "addr", "add", f"{gateway}/32", "dev", node.host_b)
    start_dp("--workers", str(workers))
    ports = iter(range(43100, 43300))

    def exchange(source: str) -> tuple[int, int, int, int]:
        """The node (from ``source``) asks pod-b; what the dp counted of it."""
        port = next(ports)
        with netns(node.pod_b):
            srv = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            srv.bind((B4, 6001))
        with netns(node.node):
            cli = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            cli.bind((source, port))
        with srv, cli:
            srv.settimeout(5)
            cli.sendto(b"ping", (B4, 6001))
            _, peer = srv.recvfrom(100)
            srv.sendto(b"pong", peer)
        key = (17, _ip(source), port, _ip(B4), 6001)
        agent.wait(lambda: agent.totals(key)[2] == 1)  # the answer entered through pod-b's veth
        agent.pump(0.5)
        return agent.totals(key)

    both = [node.host_a, node.host_b]
    agent.reader.set_control(wire_pb2.Control(interfaces=both, local_addresses=[gateway]))
    assert agent.wait(lambda: agent.reader.connections == workers and {r.worker for r in agent.reports} == set(
        range(workers)) and all(sorted(agent.health(w).interfaces) == both for w in range(workers)))
    assert exchange(gateway) == (1, 32, 1, 32)  # 20 + 8 + 4 each way
    assert exchange(NODE_B4) == (1, 32, 1, 32)  # the command line's: still the node's
    agent.reader.set_control(wire_pb2.Control(interfaces=both))
    deadline = time.monotonic() + 10
    while (got := exchange(gateway)) != (0, 0, 1, 32) and time.monotonic() < deadline:
        assert got == (1, 32, 1, 32)  # until the dp has the new filter on
    assert got == (0, 0, 1, 32), agent.dump()
    assert exchange(NODE_B4) == (1, 32, 1, 32)


def _dns_name(name: str) -> bytes:
    return b"".join(bytes([len(p)]) + p.encode() for p in name.split(".")) + b"\0"


def test_dns_answer_reaches_the_agent(node: Node, agent: Agent, start_dp: Callable[..., object]) -> None:
    start_dp("--iface", node.host_a, "--iface", node.host_b)
    question = _dns_name("svc.flowmap.test") + struct.pack("!HH", 1, 1)  # A, IN
    with netns(node.pod_b):
        srv = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        srv.bind((B4, 53))
    with netns(node.pod_a):
        cli = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    with srv, cli:
        srv.settimeout(5)
        cli.settimeout(5)
        cli.sendto(struct.pack("!HHHHHH", 0x4242, 0x0100, 1, 0, 0, 0) + question, (B4, 53))
        query, peer = srv.recvfrom(512)
        answer = struct.pack("!HHHIH", 0xC00C, 1, 1, 300, 4) + socket.inet_aton("10.62.9.9")
        srv.sendto(struct.pack("!HHHHHH", 0x4242, 0x8180, 1, 1, 0, 0) + question + answer, peer)
        cli.recv(512)
    assert agent.wait(lambda: any(a.name == "svc.flowmap.test" for r in agent.reports for a in r.dns)), agent.dump()
    (ans,) = [a for r in agent.reports for a in r.dns]
    assert (ans.type, ans.address, ans.ttl, ans.client_ip, ans.server_ip) == (
        "A", socket.inet_aton("10.62.9.9"), 300, _ip(A4), _ip(B4))
    apps = {s.app for r in agent.reports for s in r.sessions if s.server_port == 53 and s.app}
    assert apps == {"dns"}


def _checksum(data: bytes) -> int:
    data += bytes(len(data) % 2)
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def _icmp_echo(ident: int, seq: int, payload: bytes) -> bytes:
    head = struct.pack("!BBHHH", 8, 0, 0, ident, seq)
    return struct.pack("!BBHHH", 8, 0, _checksum(head + payload), ident, seq) + payload


def _ipv4_fragment(src: str, dst: str, ident: int, offset: int, more: bool, data: bytes) -> bytes:
    head = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(data), ident, (0x2000 if more else 0) | offset // 8, 64, 1,
                       0, _ip(src), _ip(dst))
    return head + data


@pytest.mark.parametrize("parser", ["compiled", "per-packet"])
def test_packet_threats_through_the_dp(node: Node, agent: Agent, start_dp: Callable[..., object], parser: str) -> None:
    """Real ping (any size: benign), an echo stream whose payload changes (icmp-tunnel), a ping of
    death sent as raw fragments, and the kernel's cookieless TCP Fast Open (syn-with-data), from
    pod-a to pod-b through the dp: exactly those hits, on exactly those sessions."""
    assert subprocess.run(["which", "ping"], capture_output=True).returncode == 0, "needs ping (iputils-ping)"
    start_dp("--iface", node.host_a, "--iface", node.host_b, "--parser", parser)
    node.lab.exec(node.pod_b, "sysctl", "-qw", "net.ipv4.tcp_fastopen=515")  # 0x203: serve, no cookie needed
    node.lab.exec(node.pod_a, "sysctl", "-qw", "net.ipv4.tcp_fastopen=5")  # 0x5: data in the SYN, no cookie
    node.lab.exec(node.pod_a, "ping", "-n", "-c", "4", "-i", "0.2", "-s", "1472", B4)
    node.lab.exec(node.pod_a, "ping", "-n", "-c", "3", "-i", "0.2", "-p", "ff00", B4)
    with netns(node.pod_a):
        raw = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
        hdrincl = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
        client = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    with netns(node.pod_b):
        server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    with raw, hdrincl, client, server:
        for seq in range(6):  # a tunnel's requests: different data each time (pod-b echoes them)
            raw.sendto(_icmp_echo(0x5151, seq, os.urandom(16) + f"chunk {seq} ".encode() * 40), (B4, 0))
            time.sleep(0.05)
        message = _icmp_echo(0x6262, 1, bytes(1472))
        hdrincl.sendto(_ipv4_fragment(A4, B4, 0x6262, 0, True, message[:1480]), (B4, 0))
        hdrincl.sendto(_ipv4_fragment(A4, B4, 0x6262, 65512, False, bytes(100)), (B4, 0))  # ends at 65,632
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        server.setsockopt(socket.IPPROTO_TCP, socket.TCP_FASTOPEN, 8)
        server.bind((B4, 8081))
        server.listen()
        server.settimeout(5)
        client.settimeout(5)
        client.bind((A4, 41010))
        client.sendto(b"GET / HTTP/1.0\r\n\r\n", socket.MSG_FASTOPEN, (B4, 8081))
        conn, _ = server.accept()
        with conn:
            assert conn.recv(100).startswith(b"GET /")
            conn.sendall(b"HTTP/1.0 200 OK\r\n\r\n")
        assert client.recv(100).startswith(b"HTTP/1.0 200")

    want = {("icmp-tunnel", 1, 0x5151), ("ping-of-death", 1, 0x6262), ("syn-with-data", 6, 41010)}

    def hits() -> set[tuple[str, int, int]]:
        return {(t.threat, t.ip_proto, t.client_port) for r in agent.reports for t in r.threats}

    agent.wait(lambda: hits() >= want, 15)
    agent.pump(1.0)  # anything more would come now
    assert hits() == want, agent.dump()
    pings = [s for r in agent.reports for s in r.sessions
             if s.ip_proto == 1 and s.client_port not in (0x5151, 0x6262) and s.bytes_c2s]
    assert sum(s.packets_c2s for s in pings) == 7 and max(s.bytes_c2s for s in pings) >= 1500, agent.dump()


def test_a_syn_flood_is_seen_alike_by_both_parsers(node: Node, agent: Agent, start_dp: Callable[..., object],
                                                   tmp_path: Path) -> None:
    """hping3 floods a listening server in pod-b from random spoofed sources in pod-a; two dps
    watch the same veths, one with the compiled parser and one with the per-packet reference.
    Each raises one syn-flood hit, on the destination's key (no source repeats), the same one:
    same session, same snippet. Then 300 completed connections to the same server raise none."""
    need(shutil.which("hping3") is not None, "this test needs hping3 (hack/debian-packages.txt)")
    node.lab.exec(node.node, "sysctl", "-qw", "net.ipv4.conf.all.rp_filter=0")
    srv = node.lab.popen(node.pod_b, [sys.executable, "-c", _LISTENER, B4, "8080"],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        compiled = start_dp("--iface", node.host_a, "--iface", node.host_b, "--parser", "compiled")
        reference = start_dp("--iface", node.host_a, "--iface", node.host_b, "--parser", "per-packet")
        assert compiled and reference
        _connect_burst(node, 300)
        # hping3 exits 1: no answer comes back to it (they go to the spoofed sources).
        subprocess.run(["ip", "netns", "exec", node.pod_a, "hping3", "-q", "-S", "-p", "8080", "--rand-source",
                        "-c", "1500", "-i", "u1000", B4], capture_output=True, timeout=60)
        assert agent.wait(lambda: len({r.run_id for r in agent.reports}) == 2)
        runs = sorted({r.run_id for r in agent.reports})

        def hits(run: str) -> list[tuple[str, str, bytes, int, bytes, int]]:
            return [(t.threat, t.snippet, t.client_ip, t.client_port, t.server_ip, t.server_port)
                    for r in agent.reports if r.run_id == run for t in r.threats]

        agent.wait(lambda: all(hits(run) for run in runs))
        agent.pump(1.0)
        first, second = hits(runs[0]), hits(runs[1])
        assert len(first) == 1 and first[0][0] == "syn-flood" and first[0][4:] == (_ip(B4), 8080), first
        # hping3 sends one SYN a millisecond: the 501st half-open tips the key, about half a second in
        # (how long exactly is the machine's: a busy one sends slower).
        said = SYN_FLOOD.fullmatch(first[0][1])
        assert said and said["where"] == "to 10.62.2.2:8080 (100%, 501" and 0.3 <= float(said["span"]) <= 2.0, first
        drops = [h.kernel_drops for r in agent.reports if r.HasField("health") for h in [r.health]]
        if not any(drops):  # the same packets read by both: the same hit, on the same key
            # Which session tips the key, and so the rate shown, hangs on the order in which each dp's
            # table hands its sessions to its watch (its own: a later first-seen time never moves a
            # key's clock back): one of the flood's sessions, at a rate within 2%.
            other = SYN_FLOOD.fullmatch(second[0][1]) if len(second) == 1 else None
            assert other and second[0][0] == "syn-flood" and second[0][4:] == first[0][4:], (first, second)
            assert other["where"] == said["where"]
            assert float(other["rate"]) == pytest.approx(float(said["rate"]), rel=0.02), (first, second)
        else:
            assert [h[0] for h in second] == ["syn-flood"]
    finally:
        srv.terminate()
        srv.wait()


# A syn-flood hit's snippet: its rate, what it is to and its share and count, over how long.
SYN_FLOOD = re.compile(r"(?P<rate>\d+) half-open/s (?P<where>.+) in (?P<span>\d+\.\d)s\)")

_LISTENER = """
import socket, sys, threading
ls = socket.create_server((sys.argv[1], int(sys.argv[2])), backlog=512)
def serve(c):
    with c:
        c.sendall(c.recv(64))
while True:
    threading.Thread(target=serve, args=(ls.accept()[0],), daemon=True).start()
"""


def _connect_burst(node: Node, count: int) -> None:
    """``count`` completed connections from pod-a to the listener, one after another."""
    for _attempt in range(200):
        with netns(node.pod_a), socket.socket() as probe:
            if probe.connect_ex((B4, 8080)) == 0:
                break
        time.sleep(0.05)
    for _ in range(count):
        with netns(node.pod_a):
            s = socket.create_connection((B4, 8080), timeout=5)
        with s:
            s.sendall(b"ping\n")
            s.recv(64)
