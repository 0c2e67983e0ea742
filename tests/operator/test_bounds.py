"""What no number of Groups, names or addresses may do to the operator, pure: slow a report down,
make a Group per name, or grow its memory without end; nor may one Group take every address
without a word.

A Resolver and a Topology fed as the operator's watches feed them, batches as agents send them.
"""

from __future__ import annotations

import ipaddress
import random
import time
import tracemalloc
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from flowmap_api import report_pb2 as pb
from flowmap_operator.dns import NameTable
from flowmap_operator.policy.modes import Modes
from flowmap_operator.prefixes import Network, PrefixTable, span
from flowmap_operator.resolution import Peer, Resolver
from flowmap_operator.topology import GroupInfo, Topology
from tests.operator.harness import edge

NOW = time.time()
WEB = "10.244.1.10"  # a pod of shop.web on node-a, which runs an agent


def resolver(**bounds: Any) -> Resolver:
    r = Resolver(**bounds)
    r.node_seen({"metadata": {"name": "node-a"}, "spec": {"podCIDRs": ["10.244.1.0/24"]},
                 "status": {"addresses": [{"type": "InternalIP", "address": "172.18.0.2"}]}})
    r.pod_seen({"metadata": {"namespace": "flowmap-system", "name": "agent-a",
                             "labels": {"app.kubernetes.io/name": "flowmap-agent"}},
                "spec": {"nodeName": "node-a", "hostNetwork": True},
                "status": {"phase": "Running", "podIP": "172.18.0.2"}}, NOW)
    r.pod_seen({"metadata": {"namespace": "shop", "name": "web-1",
                             "ownerReferences": [{"kind": "StatefulSet", "name": "web", "controller": True}]},
                "spec": {"nodeName": "node-a"}, "status": {"phase": "Running", "podIP": WEB}}, NOW)
    return r


def cidr_group(name: str, *cidrs: str, created: str = "") -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name}
    if created:
        meta["creationTimestamp"] = created
    return {"metadata": meta, "spec": {"cidrs": list(cidrs)}}


def batch(edges: list[pb.EdgeDelta], names: list[pb.DnsName] = (), seq: int = 1) -> pb.ReportBatch:  # type: ignore[assignment]
    return pb.ReportBatch(agent_id="agent-a", node="node-a", sequence=seq, previous=seq - 1, acked=seq - 1,
                          sent_unix_ms=int(NOW * 1000), edges=edges, names=list(names))


def linear(groups: dict[str, list[Network]], ip: str) -> str | None:
    """The scan the operator did before: every CIDR of every group, the longest prefix wins."""
    addr = ipaddress.ip_address(ip)
    best: tuple[int, str] | None = None
    for name, nets in groups.items():
        for net in nets:
            if addr.version == net.version and addr in net and (
                    best is None or net.prefixlen > best[0] or net.prefixlen == best[0] and name < best[1]):
                best = (net.prefixlen, name)
    return best[1] if best else None


# -- longest prefix in logarithmic time ---------------------------------------------------------

networks = st.one_of(
    st.builds(lambda a, n: ipaddress.ip_network(f"{ipaddress.IPv4Address(a)}/{n}", strict=False),
              st.integers(0, 2**32 - 1), st.integers(0, 32)),
    st.builds(lambda a, n: ipaddress.ip_network(f"{ipaddress.IPv6Address(a)}/{n}", strict=False),
              st.integers(0, 2**128 - 1), st.integers(0, 128)))


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from("abcdef"), st.lists(networks, max_size=12), max_size=6),
       st.lists(st.one_of(st.integers(0, 2**32 - 1).map(lambda a: str(ipaddress.IPv4Address(a))),
                          st.integers(0, 2**128 - 1).map(lambda a: str(ipaddress.IPv6Address(a)))), max_size=20))
def test_the_table_finds_what_the_scan_of_every_cidr_finds(groups: dict[str, list[Network]], probes: list[str]) -> None:
    table = PrefixTable({name: map(span, nets) for name, nets in groups.items()})
    # Probe the edges of every network too: the first and last address, and just outside.
    for net in (n for nets in groups.values() for n in nets):
        for value in (int(net.network_address) - 1, int(net.network_address), int(net.broadcast_address),
                      int(net.broadcast_address) + 1):
            if 0 <= value < 2 ** net.max_prefixlen:
                probes.append(str(ipaddress.ip_address(value) if net.version == 4 else ipaddress.IPv6Address(value)))
    for ip in probes:
        assert table.lookup(ipaddress.ip_address(ip)) == linear(groups, ip), ip


def networks(count: int, rng: random.Random) -> list[str]:
    """``count`` distinct networks in random order: a cloud's address ranges and more, nested /8s
    to /32s, a tenth IPv6 (benchmarks/operator_resolution.py uses them too)."""
    seen: set[str] = set()
    while len(seen) < count:
        if rng.random() < 0.1:
            seen.add(str(ipaddress.ip_network(f"2001:db8:{rng.randrange(65536):x}:{rng.randrange(65536):x}::/"
                                              f"{rng.choice((48, 56, 64))}", strict=False)))
        else:
            bits = rng.choice((8, 12, 16, 20, 22, 24, 24, 24, 26, 28, 32))
            seen.add(str(ipaddress.ip_network(f"{ipaddress.IPv4Address(rng.randrange(2**32))}/{bits}", strict=False)))
    nets = sorted(seen)
    rng.shuffle(nets)
    return nets


def hundred_thousand_cidrs(rng: random.Random) -> dict[str, list[str]]:
    """100,000 distinct networks in Groups of 64 (the schema's most)."""
    nets = networks(100_000, rng)
    return {f"ranges-{g}": nets[i:i + 64] for g, i in enumerate(range(0, len(nets), 64))}


def test_a_3000_edge_batch_against_100000_cidrs_is_ingested_in_under_a_second() -> None:
    rng = random.Random(12)
    r = resolver(max_cidr_groups=2000)
    groups = hundred_thousand_cidrs(rng)
    for name, cidrs in groups.items():
        r.cidr_group_seen(cidr_group(name, *cidrs))
    assert sum(map(len, groups.values())) == 100_000
    ips = [str(ipaddress.IPv4Address(rng.randrange(2**32))) for _ in range(3000)]
    topo = Topology(r, max_connections=100_000, max_ports=20)
    # Timed from the first lookup after the Groups changed: the table is built in it.
    started = time.perf_counter()
    result = topo.ingest(batch([edge(WEB, 40000, ip, 443, when=NOW) for ip in ips]), NOW)
    took = time.perf_counter() - started
    assert result.counted > 0
    print(f"3,000 edges against {r._cidr_table().size:,} CIDRs: {took:.3f} s")
    assert took < 1.0, f"{took:.2f} s"
    nets = {name: [ipaddress.ip_network(c) for c in cidrs] for name, cidrs in groups.items()}
    for ip in ips[:20]:
        assert r.resolve(ip, NOW, NOW).group == (linear(nets, ip) or "external"), ip


def test_a_group_change_is_seen_at_the_next_lookup_and_pod_ranges_stay_waited_for() -> None:
    r = resolver()
    r.cidr_group_seen(cidr_group("partners", "198.51.100.0/24"))
    assert r.resolve("198.51.100.7", NOW, NOW).group == "partners"
    r.cidr_group_seen(cidr_group("one-partner", "198.51.100.7/32"))
    assert r.resolve("198.51.100.7", NOW, NOW).group == "one-partner"
    r.cidr_group_gone("one-partner")
    assert r.resolve("198.51.100.7", NOW, NOW).group == "partners"
    r.cidr_group_seen(cidr_group("partners"))  # its CIDRs removed
    assert r.resolve("198.51.100.7", NOW, NOW).group == "external"
    assert r.pod_range_of("10.244.1.99") == "node-a" and r.pod_range_of("10.244.2.99") == ""


def test_cidr_groups_beyond_the_cap_are_the_newest_and_are_said_on_external() -> None:
    r = resolver(max_cidr_groups=2)
    r.cidr_group_seen(cidr_group("newest", "203.0.113.0/24", created="2026-03-01T00:00:00Z"))
    r.cidr_group_seen(cidr_group("oldest", "198.51.100.0/24", created="2024-01-01T00:00:00Z"))
    r.cidr_group_seen(cidr_group("middle", "192.0.2.0/24", created="2025-01-01T00:00:00Z"))
    assert r.resolve("203.0.113.9", NOW, NOW).group == "external"  # a new Group never displaces one in use
    assert r.resolve("198.51.100.9", NOW, NOW).group == "oldest"
    assert r.cidr_groups_ignored() == ["newest"] and r.cidr_networks("newest") == []
    topo = Topology(r, max_connections=100, max_ports=20)
    said = {kind: (holds, reason, message) for kind, holds, reason, message in
            topo.said(GroupInfo(Peer("external", "External")))}
    assert said["GroupsRecorded"][:2] == (False, "CIDRGroupLimitReached") and "newest" in said["GroupsRecorded"][2]
    r.cidr_group_gone("oldest")
    assert r.resolve("203.0.113.9", NOW, NOW).group == "newest" and r.cidr_groups_ignored() == []


# -- groups learned from DNS names: a cap ---------------------------------------------------------

def inbound_from_names(count: int) -> pb.ReportBatch:
    """``count`` clients outside the cluster, each named by a DNS answer, calling shop.web."""
    ips = [f"203.0.{i // 250}.{i % 250 + 1}" for i in range(count)]
    names = [pb.DnsName(ip=ip, name=f"client-{i}.example.net", ttl_seconds=300, seen_unix_ms=int(NOW * 1000))
             for i, ip in enumerate(ips)]
    return batch([edge(ip, 40000 + i, WEB, 8080, local="server", when=NOW) for i, ip in enumerate(ips)], names)


def fqdn_groups(topo: Topology) -> int:
    return sum(1 for g in topo.groups.values() if g.peer.kind == "FQDN")


def test_500_named_clients_make_no_more_fqdn_groups_than_the_cap() -> None:
    topo = Topology(resolver(), max_connections=10_000, max_ports=20, max_fqdn_groups=20)
    result = topo.ingest(inbound_from_names(500), NOW)
    assert fqdn_groups(topo) == 20
    assert result.fqdn_overflow == 480 and topo.fqdn_overflow_total == 480
    assert result.counted == 21  # 20 named clients, and everyone else as one "external" edge
    said = {kind: (holds, reason, message) for kind, holds, reason, message in topo.said(topo.groups["external"])}
    assert said["GroupsRecorded"][:2] == (False, "FQDNGroupLimitReached")
    assert "480" in said["GroupsRecorded"][2] and "FLOWMAP_OPERATOR_MAX_FQDN_GROUPS" in said["GroupsRecorded"][2]


def test_edges_dropped_at_the_connection_cap_make_no_group_for_their_outside_client() -> None:
    # As found: 500 inbound connections from named addresses made 450 Groups while Connections sat
    # at their cap of 60.
    topo = Topology(resolver(), max_connections=60, max_ports=20)
    result = topo.ingest(inbound_from_names(500), NOW)
    assert len(topo.edges) == 60 and result.overflow == 440
    assert fqdn_groups(topo) == 60
    assert topo.groups["shop.web"].overflow == 440  # said on the group whose edges they are


def test_a_name_a_policy_rule_names_keeps_its_group_beyond_the_cap() -> None:
    r = resolver()
    modes = Modes(r)
    modes.seen({"metadata": {"namespace": "shop", "name": "egress", "generation": 1},
                "spec": {"mode": "Monitor", "groups": ["shop.web"],
                         "rules": [{"direction": "Ingress", "peer": {"group": "client-499.example.net"}}]}},
               leading=True)
    topo = Topology(r, max_connections=10_000, max_ports=20, modes=modes, max_fqdn_groups=5)
    topo.ingest(inbound_from_names(500), NOW)
    assert "client-499.example.net" in topo.groups and fqdn_groups(topo) == 6


# -- the DNS name table: bounded, forgets by TTL -------------------------------------------------

def test_the_name_table_forgets_expired_answers_and_keeps_at_most_its_bound() -> None:
    table = NameTable(limit=1000)
    for i in range(300_000):
        table.learn(f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}", f"n{i}.example.com", NOW + 60 + i / 1000, NOW)
    assert len(table) == 1000 and table.forgotten["full"] == 299_000
    newest = "10.4.147.223"  # i = 299,999: among those that stay
    assert table.name_at(newest, NOW) == "n299999.example.com"
    assert table.addresses("n299999.example.com", NOW) == [newest]
    assert table.addresses("n0.example.com", NOW) == []
    table.expire(NOW + 60 + 300)  # every answer's TTL is over
    assert len(table) == 0 and table.forgotten["expired"] == 1000


def test_a_renewed_answer_stays_and_a_new_name_moves_the_address() -> None:
    table = NameTable(limit=10)
    assert table.learn("192.0.2.1", "a.example.com", NOW + 10, NOW)
    assert not table.learn("192.0.2.1", "a.example.com", NOW + 100, NOW + 5)  # renewed: same name
    table.expire(NOW + 50)
    assert table.name_at("192.0.2.1", NOW + 50) == "a.example.com"
    assert table.learn("192.0.2.1", "b.example.com", NOW + 200, NOW + 60)
    assert table.addresses("a.example.com", NOW + 60) == [] and table.addresses("b.example.com", NOW + 60) == [
        "192.0.2.1"]
    table.learn("192.0.2.2", "b.example.com", NOW + 200, NOW + 60)  # a name with two addresses
    assert table.addresses("b.example.com", NOW + 60) == ["192.0.2.1", "192.0.2.2"]
    table.learn("192.0.2.2", "c.example.com", NOW + 300, NOW + 60)
    assert table.addresses("b.example.com", NOW + 60) == ["192.0.2.1"]
    for _ in range(10_000):  # renewals leave stale heap entries behind: they are compacted
        table.learn("192.0.2.1", "b.example.com", table._names["192.0.2.1"][1] + 1, NOW + 60)
    assert len(table._heap) <= 2 * len(table) + 1024


def test_300000_names_through_the_operator_keep_its_memory_bounded() -> None:
    # As found: 300,000 names took the operator from 135 to 319 MiB, and it never forgot one.
    r = resolver(max_names=10_000)
    tracemalloc.start()
    try:
        before = tracemalloc.take_snapshot()
        for i in range(300_000):
            r.learn_name(f"100.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}", f"host-{i}.example.org", 60, NOW, NOW)
        grown = sum(s.size_diff for s in tracemalloc.take_snapshot().compare_to(before, "filename"))
    finally:
        tracemalloc.stop()
    assert len(r.names) == 10_000
    assert grown < 16 * 2**20, f"{grown / 2**20:.0f} MiB"
    assert r.resolve("100.4.147.223", NOW, NOW).group == "host-299999.example.org"
    r.names.expire(NOW + 60 + r.grace + 1)
    assert len(r.names) == 0 and r.resolve("100.4.147.223", NOW, NOW).group == "external"


# -- warnings: what the API server accepts but is most likely a mistake -------------------------

def test_a_catch_all_cidr_merged_into_a_workload_group_is_a_warning() -> None:
    r = resolver()
    r.cidr_group_seen({"metadata": {"name": "shop.web", "generation": 2}, "spec": {"cidrs": ["0.0.0.0/0", "::/0"]}})
    topo = Topology(r, max_connections=100, max_ports=20)
    topo.group_seen({"metadata": {"name": "shop.web", "generation": 2}, "spec": {"cidrs": ["0.0.0.0/0", "::/0"]}})
    group = topo.groups["shop.web"]
    assert group.peer.kind == "Workload" and group.generation == 2
    warning = next(s for s in topo.said(group) if s[0] == "Warning")
    assert warning[1:3] == (True, "CatchAllCIDR")
    assert "0.0.0.0/0 and ::/0" in warning[3] and "shop/web" in warning[3]
    r.cidr_group_seen(cidr_group("partners", "198.51.100.0/24"))
    topo.group_seen(cidr_group("partners", "198.51.100.0/24"))
    assert "partners" not in topo.groups  # nothing to say: no Group of ours for it until traffic
