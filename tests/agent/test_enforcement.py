"""Protect mode, pure: a NodePolicy becomes a table, a table's difference becomes nft commands,
and an edge the dp saw gets the verdict the table gives it."""

from __future__ import annotations

import ipaddress
import time
from collections.abc import Sequence
from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from flowmap_agent.aggregation import Aggregator
from flowmap_agent.errors import PolicyRefused
from flowmap_agent.deltas import merge
from flowmap_agent.policy.compiling import (ANY_PORT, Block, PolicyInForce, SetSpec, desired, parse, threat_elements,
                                            verdict)
from flowmap_agent.policy.compiling import blocking as blocking_of
from flowmap_agent.policy.nftables import Found, element, found, plan
from flowmap_api import report_pb2 as pb
from flowmap_api import validity
from flowmap_dp import wire_pb2

Peer = pb.PodPolicy.Peer
A, B, C = "10.244.1.10", "10.244.1.20", "10.244.1.30"
A6, B6 = "fd00:10::a", "fd00:10::b"
MAX = 250_000


def shop(version: int = 1, *, with_c: bool = False) -> pb.NodePolicy:
    """A (v4 and v6) may call B on 8080/TCP and DNS anywhere in 10/8; B takes 8080 from A (and C)."""
    clients = [f"{A}/32", f"{A6}/128"] + ([f"{C}/32"] if with_c else [])
    return pb.NodePolicy(version=version, pods=[
        pb.PodPolicy(pod="shop/a", ips=[A, A6], egress=[
            Peer(cidrs=[f"{B}/32", f"{B6}/128"], protocol=pb.TCP, ports=[8080]),
            Peer(cidrs=["10.0.0.0/8"], protocol=pb.UDP, ports=[53]),
            Peer(cidrs=["::/0"], protocol=pb.ICMP, ports=[7])]),  # ICMP: ports are ignored
        pb.PodPolicy(pod="shop/b", ips=[B, B6], ingress=[Peer(cidrs=clients, protocol=pb.TCP, ports=[8080])])])


def table(policy: pb.NodePolicy) -> dict[str, list[str]]:
    return {name: sorted(s.elements) for name, s in desired(parse(policy, MAX), MAX).sets.items() if not s.timeout}


def test_a_policy_becomes_set_elements_per_family() -> None:
    assert table(shop()) == {
        "pods4": [A, B], "pods6": [A6, B6],
        "egress4": [f"{A} . 17 . 10.0.0.0/8 . 53", f"{A} . 6 . {B} . 8080"],
        "egress6": [f"{A6} . 58 . ::/0 . {ANY_PORT}", f"{A6} . 6 . {B6} . 8080"],
        "ingress4": [f"{B} . 6 . {A} . 8080"],
        "ingress6": [f"{B6} . 6 . {A6} . 8080"]}


def test_no_protected_pod_or_the_emergency_switch_means_no_table() -> None:
    assert not desired(parse(pb.NodePolicy(version=4), MAX), MAX).sets
    switched = shop(5)
    switched.enforcement_disabled = True
    assert not desired(parse(switched, MAX), MAX).chains
    assert plan(None, desired(parse(switched, MAX), MAX)) == []
    assert plan(Found.of(desired(parse(shop(), MAX), MAX)), desired(parse(switched, MAX), MAX)) == [
        "delete table inet flowmap"]


def test_overlapping_networks_become_disjoint_elements() -> None:
    """The kernel refuses an element overlapping another: an any-port /8 and a port-53 /0 of one pod."""
    policy = pb.NodePolicy(pods=[pb.PodPolicy(pod="x/y", ips=[A], egress=[
        Peer(cidrs=["0.0.0.0/0", "10.1.0.0/16"], protocol=pb.UDP, ports=[53]),
        Peer(cidrs=["10.0.0.0/8", "10.2.0.0/16"], protocol=pb.UDP)])])
    elements = table(policy)["egress4"]
    assert f"{A} . 17 . 10.0.0.0/8 . {ANY_PORT}" in elements
    assert not any("10.1.0.0/16" in e or "0.0.0.0/0" in e or "10.2.0.0/16" in e for e in elements)
    assert len(elements) == 1 + 8  # 0/0 less 10/8 is eight networks, each on port 53


def _contains(text: str, address: str, proto: int, port: int) -> bool:
    _, l4, net, ports = text.split(" . ")
    low, _, high = ports.partition("-")
    return int(l4) == proto and ipaddress.ip_address(address) in ipaddress.ip_network(net) and (
        int(low) <= port <= int(high or low))


networks = st.builds(lambda a, n: str(ipaddress.ip_network((a & ~((1 << (32 - n)) - 1), n))),
                     st.integers(0, 2**32 - 1), st.integers(0, 32))
peers = st.builds(lambda cidrs, proto, ports: Peer(cidrs=cidrs, protocol=proto, ports=ports),
                  st.lists(networks, min_size=1, max_size=4), st.sampled_from([pb.TCP, pb.UDP]),
                  st.lists(st.sampled_from([53, 80, 443]), max_size=2))


@settings(max_examples=200, deadline=None)
@given(st.lists(peers, min_size=1, max_size=5), st.lists(networks, max_size=10))
def test_elements_are_disjoint_and_allow_exactly_what_the_verdict_allows(peer_list: list[pb.PodPolicy.Peer],
                                                                          probes: list[str]) -> None:
    message = pb.NodePolicy(pods=[pb.PodPolicy(pod="x/y", ips=[A], egress=peer_list)])
    policy = parse(message, MAX)
    elements = sorted(desired(policy, MAX).sets["egress4"].elements)
    # Disjoint: no element's first or last point lies in another (what the kernel checks).
    for i, e in enumerate(elements):
        _, l4, net, ports = e.split(" . ")
        n, low = ipaddress.ip_network(net), int(ports.partition("-")[0])
        high = int(ports.partition("-")[2] or low)
        for point in ((n.network_address, low), (n.broadcast_address, high)):
            assert not [o for j, o in enumerate(elements) if j != i and _contains(o, str(point[0]), int(l4), point[1])]
    # Every edge the verdict allows is in the table, and nothing else: probed at the edges of each
    # network the peers name and of random others.
    wanted = {pb.TCP: 6, pb.UDP: 17}
    edges = [ipaddress.ip_network(n) for p in peer_list for n in p.cidrs] + [ipaddress.ip_network(n) for n in probes]
    for address in {str(a) for n in edges for a in (n.network_address, n.broadcast_address)}:
        for port in (53, 80, 443, 8080):
            for proto in (pb.TCP, pb.UDP):
                in_table = any(_contains(e, address, wanted[proto], port) for e in elements)
                allowed = verdict(policy, A, address, port, proto, answered=False) == pb.ALLOWED
                assert in_table == allowed, (address, port, proto)


@pytest.mark.parametrize("spoil,says", [
    (lambda p: p.pods[0].ips.append("10.244.1.300"), "pods[0] (shop/a).ips[2]"),
    (lambda p: p.pods[1].ingress[0].cidrs.append("10.0.0.1/8"), "pods[1] (shop/b).ingress[0].cidrs[3]"),
    (lambda p: p.pods[0].egress[0].ports.append(70000), "pods[0] (shop/a).egress[0].ports: 70000"),
    (lambda p: p.pods[0].egress[0].ports.append(0), "egress[0].ports: 0"),
    (lambda p: p.pods[0].egress.append(Peer(cidrs=["10.0.0.0/8"], protocol=pb.PROTOCOL_UNSPECIFIED)),
     "egress[3].protocol"),
])
def test_a_bad_policy_is_refused_naming_the_field(spoil, says: str) -> None:  # type: ignore[no-untyped-def]
    policy = shop()
    policy.pods[1].ingress[0].cidrs.append(f"{C}/32")
    spoil(policy)
    with pytest.raises(PolicyRefused, match=says.replace("[", r"\[").replace("]", r"\]").replace("(", r"\(")
                       .replace(")", r"\)")):
        parse(policy, MAX)


def test_an_oversized_policy_is_refused_before_it_is_expanded() -> None:
    peer = Peer(cidrs=[str(ipaddress.ip_address(0x0A000000 + i)) for i in range(1000)], protocol=pb.TCP, ports=[80])
    huge = pb.NodePolicy()
    for i in range(1000):  # 10^6 elements
        huge.pods.add(pod=f"x/p{i}", ips=[str(ipaddress.ip_address(0x0B000000 + i))]).egress.append(peer)
    started = time.process_time()
    with pytest.raises(PolicyRefused, match=f"the policy needs up to 1001000 set elements, more than {MAX}"):
        parse(huge, MAX)
    print(f"refused in {time.process_time() - started:.3f} s of CPU")


def test_the_difference_is_elements_only_and_nothing_for_the_same_policy() -> None:
    old, new = desired(parse(shop(1), MAX), MAX), desired(parse(shop(2, with_c=True), MAX), MAX)
    created = plan(None, old)
    assert created[0] == "add table inet flowmap"
    assert sum(c.startswith("add rule") for c in created) == 19  # 6 of them stop threats' sessions
    assert plan(Found.of(old), old) == []
    assert plan(Found.of(old), new) == [f"add element inet flowmap ingress4 {{ {B} . 6 . {C} . 8080 }}"]
    assert plan(Found.of(new), old) == [f"delete element inet flowmap ingress4 {{ {B} . 6 . {C} . 8080 }}"]


def test_a_changed_rule_replaces_its_chain_only_and_a_changed_set_rebuilds_all() -> None:
    want = desired(parse(shop(), MAX), MAX)
    have = Found.of(want)
    assert have is not None
    base, comments = have.chains["egress"]
    have.chains["egress"] = (base, (*comments[:2], "reject 000000000000", comments[3]))  # an older agent's rule
    commands = plan(have, want)
    assert commands[0] == "flush chain inet flowmap egress"
    assert [c for c in commands if c.split()[1] in ("chain", "set", "element")] == ["flush chain inet flowmap egress"]
    assert len(commands) == 5 and all(c.startswith("add rule inet flowmap egress ") for c in commands[1:])

    have = Found.of(want)
    assert have is not None
    old = have.sets["pods4"]
    have.sets["pods4"] = type(old)(("ipv4_addr",), True, old.elements)  # was an interval set
    commands = plan(have, want)
    assert commands[:4] == ["flush chain inet flowmap egress", "flush chain inet flowmap forward",
                            "flush chain inet flowmap ingress", "delete set inet flowmap pods4"]
    assert "add set inet flowmap pods4 { type ipv4_addr; }" in commands
    assert sum(c.startswith("add rule") for c in commands) == 19


def test_the_listing_of_nft_reads_back_as_the_elements_written() -> None:
    """The forms nft 1.0.6 lists (``nft -j -p``): plain values, prefixes, ranges, concatenations."""
    listing = {"nftables": [
        {"metainfo": {"version": "1.0.6"}}, {"table": {"family": "inet", "name": "flowmap", "handle": 1}},
        {"set": {"family": "inet", "name": "egress6", "table": "flowmap", "handle": 5, "flags": ["interval"],
                 "type": ["ipv6_addr", "inet_proto", "ipv6_addr", "inet_service"],
                 "elem": [{"concat": ["fd00:10::a", 6, "fd00:10:0:0::b", 8080]},
                          {"concat": ["fd00:10::a", 58, {"prefix": {"addr": "::", "len": 0}}, {"range": [0, 65535]}]},
                          {"concat": ["fd00:10::a", 17, {"range": ["fd00::", "fd00::ffff"]}, {"range": [53, 53]}]}]}},
        {"chain": {"family": "inet", "table": "flowmap", "name": "forward", "handle": 2, "type": "filter",
                   "hook": "forward", "prio": 0, "policy": "accept"}},
        {"rule": {"family": "inet", "table": "flowmap", "chain": "forward", "handle": 6, "comment": "established x",
                  "expr": [{"counter": {"packets": 3, "bytes": 180}}, {"accept": None}]}}]}
    table = found(listing)
    assert sorted(table.sets["egress6"].elements) == [
        "fd00:10::a . 17 . fd00::/112 . 53", f"fd00:10::a . 58 . ::/0 . {ANY_PORT}", "fd00:10::a . 6 . fd00:10::b . 8080"]
    assert table.chains["forward"] == (("filter", "forward", 0, "accept"), ("established x",))
    assert element({"range": ["10.0.0.1", "10.0.0.5"]}) == "10.0.0.1-10.0.0.5"


def test_the_verdict_of_an_edge() -> None:
    policy = parse(shop(), MAX)
    assert verdict(policy, A, B, 8080, pb.TCP, answered=True) == pb.ALLOWED  # egress of A and ingress of B
    assert verdict(policy, A6, B6, 8080, pb.TCP, answered=True) == pb.ALLOWED
    assert verdict(policy, A, "10.9.9.9", 53, pb.UDP, answered=True) == pb.ALLOWED
    assert verdict(policy, A6, "fd00::99", 0, pb.ICMP, answered=True) == pb.ALLOWED  # any ICMP over v6
    assert verdict(policy, A, "10.9.9.9", 0, pb.ICMP, answered=False) == pb.DENIED  # not over v4
    assert verdict(policy, C, B, 8080, pb.TCP, answered=False) == pb.DENIED  # B's ingress
    assert verdict(policy, A, B, 9090, pb.TCP, answered=False) == pb.DENIED  # A's egress
    assert verdict(policy, A, B6, 8080, pb.TCP, answered=False) == pb.DENIED  # a family B's peers lack
    assert verdict(policy, C, "10.9.9.9", 80, pb.TCP, answered=False) == pb.VERDICT_UNSPECIFIED  # none protected
    # Unallowed but answered, or not attempted in this interval: open before Protect, not denied.
    assert verdict(policy, C, B, 8080, pb.TCP, answered=True) == pb.VERDICT_UNSPECIFIED
    assert verdict(policy, C, B, 8080, pb.TCP, answered=False, opened=False) == pb.VERDICT_UNSPECIFIED
    assert verdict(PolicyInForce(), A, B, 8080, pb.TCP, answered=False) == pb.VERDICT_UNSPECIFIED


def test_deltas_carry_the_verdict_of_the_policy_in_force() -> None:
    def session(client: str, server: str, port: int, s2c: int) -> wire_pb2.Session:
        return wire_pb2.Session(ip_proto=6, client_ip=ipaddress.ip_address(client).packed, client_port=40000,
                                server_ip=ipaddress.ip_address(server).packed, server_port=port, new=True, opened=True,
                                bytes_c2s=60, bytes_s2c=s2c, packets_c2s=1, packets_s2c=1 if s2c else 0)

    agg = Aggregator(local_pods={A: "shop/a", B: "shop/b", C: "shop/c"})
    report = wire_pb2.Report(sessions=[session(A, B, 8080, 500), session(C, B, 8080, 0), session(C, A, 22, 0)])
    assert {d.verdict for d in agg.aggregate(report)[0]} == {pb.VERDICT_UNSPECIFIED}  # no policy in force yet
    agg.policy = parse(shop(), MAX)
    verdicts = {(d.client.ip, d.server.ip, d.server.port): d.verdict for d in agg.aggregate(report)[0]}
    assert verdicts == {(A, B, 8080): pb.ALLOWED, (C, B, 8080): pb.DENIED, (C, A, 22): pb.DENIED}


# -- threat blocks ----------------------------------------------------------------------------------


def blocking(*threats: str) -> pb.NodePolicy:
    """The shop, where B (v4 and v6) blocks ``threats``."""
    policy = shop()
    policy.pods[1].block_threats.extend(threats)
    return policy


def test_a_pod_s_blocked_threats_are_its_addresses_and_a_bad_list_is_refused() -> None:
    policy = parse(blocking("sqlinjection", "dns-tunnel", "a-threat-of-tomorrow"), MAX)
    assert policy.block == {B: {"sqlinjection", "dns-tunnel", "a-threat-of-tomorrow"}} | {
        B6: {"sqlinjection", "dns-tunnel", "a-threat-of-tomorrow"}}  # a name unknown here is kept: it blocks nothing
    assert parse(pb.NodePolicy(enforcement_disabled=True, pods=blocking("heartbleed").pods), MAX).block == {}
    with pytest.raises(PolicyRefused, match=r"pods\[1\] \(shop/b\)\.block_threats\[0\]: 'SQL injection'"):
        parse(blocking("SQL injection"), MAX)
    with pytest.raises(PolicyRefused, match=r"block_threats: 33 threats, more than 32"):
        parse(blocking(*(f"t{i}" for i in range(33))), MAX)


def test_which_hit_blocks_a_session_and_its_elements_both_ways() -> None:
    policy = parse(blocking("sqlinjection", "icmp-tunnel"), MAX)
    assert blocking_of(policy, A, B, ["deprecated-tls", "sqlinjection"]) == "sqlinjection"  # B is the server
    assert blocking_of(policy, B, C, ["sqlinjection"]) == "sqlinjection"  # B is the client
    assert blocking_of(policy, A, B, ["deprecated-tls"]) == ""  # only alerted on
    assert blocking_of(policy, A, C, ["sqlinjection"]) == ""  # neither end blocks it
    elements = threat_elements([Block(6, A, 40000, B, 8080, "sqlinjection"), Block(17, A6, 5353, B6, 53, "dns-tunnel"),
                                Block(1, A, 0, B, 0, "icmp-tunnel"),
                                Block(6, A, 40001, C, 80, "sqlinjection", (B, 8080))])  # C: a ClusterIP, DNATed to B
    assert elements == {"threats4": {f"6 . {A} . 40000 . {B} . 8080", f"6 . {B} . 8080 . {A} . 40000",
                                     f"6 . {A} . 40001 . {C} . 80", f"6 . {C} . 80 . {A} . 40001",
                                     f"6 . {A} . 40001 . {B} . 8080", f"6 . {B} . 8080 . {A} . 40001"},
                        "threats6": {f"17 . {A6} . 5353 . {B6} . 53", f"17 . {B6} . 53 . {A6} . 5353"},
                        "threatpairs4": {f"1 . {A} . {B}", f"1 . {B} . {A}"}}


def test_the_threat_sets_are_timed_bounded_and_their_elements_the_agent_s() -> None:
    want = desired(parse(shop(), MAX), MAX, threat_timeout=120, threat_size=1000)
    created = plan(None, want)
    assert ("add set inet flowmap threats4 { type inet_proto . ipv4_addr . inet_service . ipv4_addr . inet_service; "
            "flags timeout; timeout 120s; size 1000; }") in created
    assert "add set inet flowmap threatpairs6 { type inet_proto . ipv6_addr . ipv6_addr; flags timeout; timeout 120s; " \
           "size 1000; }" in created
    # The forward chain stops a threat's session before it accepts what is established.
    forward = [c.split(" comment ")[0] for c in created if c.startswith("add rule inet flowmap forward ")]
    assert [r.split()[5] for r in forward[:7]] == ["meta"] * 6 + ["ct"]
    assert forward[0].endswith("@threats4 counter reject with tcp reset") and forward[2].endswith("@threatpairs4 counter drop")
    # Elements the agent added (as nft lists them) are never the policy's to remove.
    have = Found.of(want)
    assert have is not None
    have.sets["threats4"] = replace(have.sets["threats4"], elements=frozenset({f"6 . {A} . 1 . {B} . 2"}))
    assert plan(have, want) == []
    # Another timeout or size is another set: made anew (its blocks go), with every rule.
    bigger = desired(parse(shop(), MAX), MAX, threat_timeout=120, threat_size=2000)
    commands = plan(have, bigger)
    assert "delete set inet flowmap threats4" in commands and "delete set inet flowmap pods4" not in commands
    assert sum(c.startswith("add rule") for c in commands) == 19


def test_a_threat_set_reads_back_as_written() -> None:
    listing = {"nftables": [{"set": {
        "family": "inet", "name": "threats4", "table": "flowmap", "handle": 9, "flags": ["timeout"], "timeout": 600,
        "size": 65536, "type": ["inet_proto", "ipv4_addr", "inet_service", "ipv4_addr", "inet_service"],
        "elem": [{"elem": {"val": {"concat": [6, A, 40000, B, 8080]}, "timeout": 600, "expires": 597}}]}}]}
    table = found(listing)
    assert table.sets["threats4"] == SetSpec(("inet_proto", "ipv4_addr", "inet_service", "ipv4_addr", "inet_service"),
                                             False, frozenset({f"6 . {A} . 40000 . {B} . 8080"}), 600, 65536)


def threat_report(client: str, cport: int, server: str, sport: int, threat: str, *, end_ns: int = 10**18,
                  l4: int = 6) -> wire_pb2.Report:
    c, s = ipaddress.ip_address(client).packed, ipaddress.ip_address(server).packed
    hits = [wire_pb2.ThreatHit(threat=threat, ip_proto=l4, client_ip=c, client_port=cport, server_ip=s,
                               server_port=sport, snippet="x")] if threat else []
    return wire_pb2.Report(end_ns=end_ns, threats=hits, sessions=[wire_pb2.Session(
        ip_proto=l4, client_ip=c, client_port=cport, server_ip=s, server_port=sport, bytes_c2s=60, bytes_s2c=60,
        packets_c2s=1, packets_s2c=1)])


def test_a_blocked_threat_s_delta_is_denied_for_it_while_the_block_lasts() -> None:
    asked: list[list[Block]] = []
    works = True

    def block(blocks: Sequence[Block]) -> bool:
        asked.append(list(blocks))
        return works

    service = ("10.96.0.10", 80)
    agg = Aggregator(local_pods={A: "shop/a", B: "shop/b"}, policy=parse(blocking("sqlinjection"), MAX), block=block,
                     block_seconds=60, destination=lambda s: (B, 8080) if s[3:] == service else None)
    (d,), _ = agg.aggregate(threat_report(A, 40000, B, 8080, "deprecated-tls"))
    assert (d.verdict, d.denied_for, asked) == (pb.ALLOWED, "", [])  # alerted on only
    (d,), _ = agg.aggregate(threat_report(A, 40001, B, 8080, "sqlinjection"))
    assert (d.verdict, d.denied_for) == (pb.DENIED, "sqlinjection")
    assert asked.pop() == [Block(6, A, 40001, B, 8080, "sqlinjection")]
    # Through a ClusterIP: blocked where the node's DNAT sent it too (its forward hook sees that).
    (d,), _ = agg.aggregate(threat_report(A, 40002, *service, "sqlinjection"))
    assert asked.pop() == [Block(6, A, 40002, *service, "sqlinjection", (B, 8080))]
    assert (d.verdict, d.denied_for) == (pb.DENIED, "sqlinjection")
    (d,), _ = agg.aggregate(threat_report(A, 40002, *service, "", end_ns=10**18 + 10**9))
    assert (d.verdict, d.denied_for) == (pb.DENIED, "sqlinjection")
    # The blocked session's later deltas (its reset), until the block expires; other sessions are allowed.
    (d,), _ = agg.aggregate(threat_report(A, 40001, B, 8080, "", end_ns=10**18 + 59 * 10**9))
    assert (d.verdict, d.denied_for) == (pb.DENIED, "sqlinjection")
    (d,), _ = agg.aggregate(threat_report(A, 40009, B, 8080, "", end_ns=10**18 + 59 * 10**9))
    assert (d.verdict, d.denied_for) == (pb.ALLOWED, "")
    (d,), _ = agg.aggregate(threat_report(A, 40001, B, 8080, "", end_ns=10**18 + 61 * 10**9))
    assert (d.verdict, d.denied_for) == (pb.ALLOWED, "")
    assert agg._blocked == {}  # forgotten once expired (the kernel forgets its element too)
    # A block that failed (nft refused) is not shown as one; nor one with nothing to block with.
    works = False
    (d,), _ = agg.aggregate(threat_report(A, 40003, B, 8080, "sqlinjection"))
    assert (d.verdict, d.denied_for) == (pb.ALLOWED, "") and asked
    agg.block = None
    (d,), _ = agg.aggregate(threat_report(A, 40004, B, 8080, "sqlinjection"))
    assert (d.verdict, d.denied_for) == (pb.ALLOWED, "")
    # The switch lifts the policy: what was blocked is not said to be any more.
    works, agg.block = True, block
    agg.aggregate(threat_report(A, 40005, B, 8080, "sqlinjection"))
    agg.policy = parse(pb.NodePolicy(enforcement_disabled=True), MAX)
    (d,), _ = agg.aggregate(threat_report(A, 40005, B, 8080, ""))
    assert d.verdict == pb.VERDICT_UNSPECIFIED and not d.denied_for


def test_a_threat_denial_is_never_merged_away_and_its_reason_is_checked() -> None:
    denied = pb.EdgeDelta(verdict=pb.DENIED, denied_for="sqlinjection")
    merge(denied, pb.EdgeDelta(verdict=pb.ALLOWED))
    assert (denied.verdict, denied.denied_for) == (pb.DENIED, "sqlinjection")
    allowed = pb.EdgeDelta(verdict=pb.ALLOWED)
    merge(allowed, pb.EdgeDelta(verdict=pb.DENIED, denied_for="heartbleed"))
    assert (allowed.verdict, allowed.denied_for) == (pb.DENIED, "heartbleed")
    tally = validity.Tally()
    odd = pb.EdgeDelta(verdict=pb.DENIED, denied_for="x" * 1000)
    validity.normalise_edge(odd, tally)
    stray = pb.EdgeDelta(verdict=pb.ALLOWED, denied_for="sqlinjection")
    validity.normalise_edge(stray, tally)
    assert (odd.denied_for, stray.denied_for) == ("unknown", "")
    assert tally == {("denied_for", "unknown"): 1, ("denied_for", "not_denied"): 1}
