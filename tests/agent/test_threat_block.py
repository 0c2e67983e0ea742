"""Protect mode's threat blocks on a simulated node: real nftables, real TCP and UDP clients.

The node of tests/agent/test_protect.py (pods a, b, c; a may call b on 8080/TCP and 5353/UDP).
b's policy blocks sqlinjection and dns-tunnel. A session that is already flowing is reported by
the dp with a threat hit (the report is built here: the dp on the pods' veths is exercised
elsewhere) and handed to the agent's aggregation, wired to the agent's Protector as in the agent:
from then on that session is reset (TCP) or dropped (UDP), the rest of a to b goes on, and the
delta says DENIED for the threat.
"""

from __future__ import annotations

import ipaddress
import subprocess
import sys
import time

import pytest

from flowmap_agent.aggregation import Aggregator
from flowmap_agent.policy.compiling import PolicyInForce
from flowmap_api import report_pb2 as pb
from flowmap_dp import wire_pb2
from tests.agent import test_protect
from tests.agent.test_protect import PODS, SERVICE, Node, policy

node = test_protect.node  # the simulated node, a fixture

# A held session: says its own port, then sends each line typed on stdin and says what came back:
# the echo, "reset" (a TCP reset) or "timeout" (nothing: dropped).
HELD = """
import socket, sys
kind, host, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
family = socket.AF_INET6 if ":" in host else socket.AF_INET
s = socket.socket(family, socket.SOCK_STREAM if kind == "tcp" else socket.SOCK_DGRAM)
s.settimeout(2)
s.connect((host, port))
print(s.getsockname()[1], flush=True)
for line in sys.stdin:
    try:
        s.send(line.encode())
        print(s.recv(4096).decode().strip() or "closed", flush=True)
    except ConnectionResetError:
        print("reset", flush=True)
    except TimeoutError:
        print("timeout", flush=True)
    except OSError as exc:
        print(f"error {exc.errno}", flush=True)
"""


class Held:
    """A session from pod ``client`` to ``server``:``port``, held open by a process in the pod."""

    def __init__(self, node: Node, client: str, kind: str, server: str, port: int) -> None:
        self.proc = node.lab.popen(node.pods[client], [sys.executable, "-c", HELD, kind, server, str(port)],
                                   stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        assert self.proc.stdout is not None
        self.port = int(self.proc.stdout.readline())

    def say(self, word: str) -> str:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(word + "\n")
        self.proc.stdin.flush()
        return self.proc.stdout.readline().strip()

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait()


def report(l4: int, client: str, client_port: int, server: str, server_port: int, threat: str) -> wire_pb2.Report:
    """The dp's report of one session, with one threat hit in it (none: ``threat`` empty)."""
    now = time.time_ns()
    c, s = ipaddress.ip_address(client).packed, ipaddress.ip_address(server).packed
    return wire_pb2.Report(end_ns=now, sessions=[wire_pb2.Session(
        ip_proto=l4, client_ip=c, client_port=client_port, server_ip=s, server_port=server_port,
        bytes_c2s=300, bytes_s2c=200, packets_c2s=3, packets_s2c=2, first_seen_ns=now - 10**9, last_seen_ns=now)],
        threats=[wire_pb2.ThreatHit(threat=threat, ip_proto=l4, client_ip=c, client_port=client_port, server_ip=s,
                                    server_port=server_port, snippet="' OR 1=1 --", seen_ns=now)] if threat else [])


def blocking_policy(version: int) -> pb.NodePolicy:
    p = policy(version)
    b = next(pod for pod in p.pods if pod.pod == "shop/b")
    b.block_threats.extend(["dns-tunnel", "sqlinjection"])
    return p


def threat_set(node: Node, name: str) -> dict[str, object]:
    listing = node.table() or {"nftables": []}
    (found,) = [item["set"] for item in listing["nftables"] if "set" in item and item["set"]["name"] == name]
    return dict(found)


@pytest.mark.parametrize("family", [0, 1], ids=["ipv4", "ipv6"])
def test_a_session_with_a_blocked_threat_is_reset_and_shows_denied(node: Node, family: int) -> None:
    a, b = PODS["a"][family], PODS["b"][family]
    protector = node.protector()
    enforced = protector.apply(blocking_policy(1))
    assert isinstance(enforced, PolicyInForce) and enforced.block[b] == {"sqlinjection", "dns-tunnel"}
    aggregator = Aggregator(local_pods={PODS[p][family]: f"shop/{p}" for p in PODS}, policy=enforced,
                            block=protector.block)
    tcp, other = Held(node, "a", "tcp", b, 8080), Held(node, "a", "tcp", b, 8080)
    try:
        assert tcp.say("select") == "select" and other.say("hello") == "hello"
        # A hit b's policy only alerts on: reported, nothing blocked.
        (delta,), _ = aggregator.aggregate(report(6, a, tcp.port, b, 8080, "deprecated-tls"))
        assert delta.verdict == pb.ALLOWED and not delta.denied_for and [t.name for t in delta.threats] == [
            "deprecated-tls"]
        assert tcp.say("still") == "still"

        started = time.monotonic()
        (delta,), _ = aggregator.aggregate(report(6, a, tcp.port, b, 8080, "sqlinjection"))
        blocked = time.monotonic()
        assert tcp.say("union select") == "reset"
        reset = time.monotonic()
        print(f"\nthreat report -> set element: {1000 * (blocked - started):.1f} ms; "
              f"-> the client's reset: {1000 * (reset - started):.1f} ms")
        assert delta.verdict == pb.DENIED and delta.denied_for == "sqlinjection"
        assert node.counter("forward", f"threat-reset{4 + 2 * family}") >= 1
        assert node.metric("flowmap_agent_policy_threat_blocks_total", threat="sqlinjection", result="blocked") == 1

        # The rest of a to b goes on: the other session, and new ones.
        assert other.say("hello again") == "hello again"
        assert node.probe("a", ("tcp", b, 8080)) == ["ok"]
        # The blocked session's later deltas (its reset) say so still.
        (later,), _ = aggregator.aggregate(report(6, a, tcp.port, b, 8080, ""))
        assert later.verdict == pb.DENIED and later.denied_for == "sqlinjection"
    finally:
        tcp.close()
        other.close()

    # Bounded, timed elements, both ways; a policy applied again (the table read back) keeps them.
    kind = threat_set(node, f"threats{4 + 2 * family}")
    assert kind["size"] == 65536 and kind["timeout"] == 600 and len(kind["elem"]) == 2  # type: ignore[arg-type]
    protector.table.forget()
    assert protector.apply(blocking_policy(1)) is not None
    assert len(threat_set(node, f"threats{4 + 2 * family}")["elem"]) == 2  # type: ignore[arg-type]
    # The emergency switch lifts them with the rest.
    assert protector.apply(pb.NodePolicy(version=2, enforcement_disabled=True)) is not None
    assert node.table() is None


def test_a_udp_flow_with_a_blocked_threat_is_dropped(node: Node) -> None:
    a, b = PODS["a"][0], PODS["b"][0]
    protector = node.protector()
    enforced = protector.apply(blocking_policy(1))
    assert enforced is not None
    aggregator = Aggregator(local_pods={PODS[p][0]: f"shop/{p}" for p in PODS}, policy=enforced,
                            block=protector.block)
    udp = Held(node, "a", "udp", b, 5353)
    try:
        assert udp.say("q1") == "q1"
        (delta,), _ = aggregator.aggregate(report(17, a, udp.port, b, 5353, "dns-tunnel"))
        assert delta.verdict == pb.DENIED and delta.denied_for == "dns-tunnel"
        assert udp.say("q2") == "timeout"
        assert node.counter("forward", "threat-drop4") >= 1 and node.counter("forward", "threat-reset4") == 0
        assert node.probe("a", ("udp", b, 5353)) == ["ok"]  # another flow (another port) still passes
    finally:
        udp.close()


def test_a_session_through_a_service_is_reset_where_the_dnat_sent_it(node: Node) -> None:
    """The dp on a's veth sees a call to the ClusterIP; the forward hook sees it after the DNAT, at b.
    (Where conntrack says the DNAT sent it is injected: flowmap_agent.nat reads it on a node.)"""
    a, b = PODS["a"][0], PODS["b"][0]
    protector = node.protector()
    enforced = protector.apply(blocking_policy(1))
    assert enforced is not None
    aggregator = Aggregator(local_pods={PODS[p][0]: f"shop/{p}" for p in PODS}, policy=enforced, block=protector.block,
                            destination=lambda s: (b, 8080) if s[3:] == (SERVICE[0], 80) else None)
    tcp = Held(node, "a", "tcp", SERVICE[0], 80)
    try:
        assert tcp.say("select") == "select"
        (delta,), _ = aggregator.aggregate(report(6, a, tcp.port, SERVICE[0], 80, "sqlinjection"))
        assert (delta.verdict, delta.denied_for, delta.server.ip) == (pb.DENIED, "sqlinjection", SERVICE[0])
        assert tcp.say("union select") == "reset"
        assert node.probe("a", ("tcp", SERVICE[0], 80)) == ["ok"]
        assert len(threat_set(node, "threats4")["elem"]) == 4  # type: ignore[arg-type]  # as sent, as DNATed
    finally:
        tcp.close()


def test_a_failed_block_is_not_shown_as_denied(node: Node) -> None:
    a, b = PODS["a"][0], PODS["b"][0]
    protector = node.protector()
    enforced = protector.apply(blocking_policy(1))
    assert enforced is not None
    node.nft("delete", "table", "inet", "flowmap")  # another hand took the table away
    aggregator = Aggregator(policy=enforced, block=protector.block)
    (delta,), _ = aggregator.aggregate(report(6, a, 41000, b, 8080, "sqlinjection"))
    assert delta.verdict == pb.ALLOWED and not delta.denied_for
    assert node.metric("flowmap_agent_policy_threat_blocks_total", threat="sqlinjection", result="failed") == 1
