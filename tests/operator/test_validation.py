"""What a report may say (flowmap_api.validity, under flowmap_operator.validation), pure.

Nothing countable is refused for its metadata: names, applications, pods and snippets are
normalised or dropped and counted; only an edge that cannot be counted is refused, by its index.
What this looks like to an agent, over gRPC, is in test_refusals.
"""

from __future__ import annotations

import pytest

from flowmap_api import report_pb2 as pb
from flowmap_api.limits import MAX_BATCH_EDGES, MAX_NAMES, MAX_NODE_ADDRESSES, MAX_NODE_VMS, MAX_VM_ADDRESSES
from flowmap_api.validity import MAX_COUNTER, dns_name, uncountable
from flowmap_operator.errors import InvalidReport
from flowmap_operator.settings import Settings
from flowmap_operator.validation import validate


def edge(client: str = "10.244.1.10", server: str = "192.0.2.1", **fields: object) -> pb.EdgeDelta:
    return pb.EdgeDelta(client=pb.Endpoint(ip=client, port=40000, local=True), server=pb.Endpoint(ip=server, port=443),
                        protocol=pb.TCP, bytes_c2s=100, **{"apps": ["tls"], **fields})  # type: ignore[arg-type]


def batch(*edges: pb.EdgeDelta, names: tuple[tuple[str, str], ...] = ()) -> pb.ReportBatch:
    return pb.ReportBatch(agent_id="a", node="node-a", sequence=1, edges=edges,
                          names=[pb.DnsName(ip=ip, name=name, ttl_seconds=30) for ip, name in names])


def test_node_addresses_are_bounded_and_must_be_addresses() -> None:
    said = [f"10.244.1.{i}" for i in range(MAX_NODE_ADDRESSES)]
    validate(pb.ReportBatch(agent_id="a", node="node-a", sequence=1, node_addresses=said), max_edges=10)
    validate(pb.ReportBatch(agent_id="a", node="node-a", node_addresses=said), max_edges=10)  # with an ack question too
    with pytest.raises(InvalidReport, match=f"65 addresses, more than the limit {MAX_NODE_ADDRESSES}"):
        validate(pb.ReportBatch(agent_id="a", node="node-a", node_addresses=[*said, "fd00::1"]), max_edges=10)
    with pytest.raises(InvalidReport, match=r"node_addresses\[1\]: 'cni0' is not an IP address"):
        validate(pb.ReportBatch(agent_id="a", node="node-a", node_addresses=["10.244.1.0", "cni0"]), max_edges=10)


UUID = "0d5c8e1a-2f0b-4c1b-9a57-7e0f4e3b1c2d"


def vms(*listed: pb.LocalVm, followed: bool = True, sequence: int = 1) -> pb.ReportBatch:
    return pb.ReportBatch(agent_id="a", node="node-a", sequence=sequence, vms_followed=followed, vms=listed)


def test_a_nodes_vms_are_checked_whole_their_addresses_made_canonical() -> None:
    web = pb.LocalVm(uuid=UUID, name="web 1", label="web", addresses=["10.77.1.2", "2001:DB8::2"])
    said = vms(web)
    tally = validate(said, max_edges=10)
    assert list(said.vms[0].addresses) == ["10.77.1.2", "2001:db8::2"] and tally[("vm_address", "not_canonical")] == 1
    validate(vms(web, sequence=0), max_edges=10)  # an ack question says them too
    validate(vms(), max_edges=10)  # none run
    many = [pb.LocalVm(uuid=f"00000000-0000-0000-0000-{i:012x}", name=f"vm{i}") for i in range(MAX_NODE_VMS + 1)]
    with pytest.raises(InvalidReport, match=f"vms: {MAX_NODE_VMS + 1} VMs, more than the limit {MAX_NODE_VMS}"):
        validate(vms(*many), max_edges=10)


@pytest.mark.parametrize(("vm", "followed", "says"), [
    (pb.LocalVm(uuid=UUID, name="web"), False, "vms: listed by an agent that does not say it follows"),
    (pb.LocalVm(uuid=UUID.upper(), name="web"), True, r"vms\[0\].uuid: .* is not a canonical UUID"),
    (pb.LocalVm(uuid="web", name="web"), True, r"vms\[0\].uuid"),
    (pb.LocalVm(uuid=UUID, name=""), True, r"vms\[0\].name"),
    (pb.LocalVm(uuid=UUID, name="a/b"), True, r"vms\[0\].name: 'a/b' is not 1-200 printable characters without '/'"),
    (pb.LocalVm(uuid=UUID, name="web\x1b[2J"), True, r"vms\[0\].name: 'web\\\\x1b\[2J'"),  # shown escaped
    (pb.LocalVm(uuid=UUID, name="x" * 201), True, r"vms\[0\].name"),
    (pb.LocalVm(uuid=UUID, name="web", label="Web"), True, r"vms\[0\].label: 'Web' is not a DNS label"),
    (pb.LocalVm(uuid=UUID, name="web", label="web\n"), True, r"vms\[0\].label"),  # anchored at the very end
    (pb.LocalVm(uuid=UUID, name="web", addresses=["eth0"]), True, r"vms\[0\].addresses\[0\]: 'eth0' is not an IP"),
    (pb.LocalVm(uuid=UUID, name="web", addresses=[f"10.0.0.{i}" for i in range(MAX_VM_ADDRESSES + 1)]), True,
     f"vms\\[0\\].addresses: {MAX_VM_ADDRESSES + 1} addresses, more than the limit {MAX_VM_ADDRESSES}"),
])
def test_a_batch_naming_a_vm_wrongly_is_refused_whole(vm: pb.LocalVm, followed: bool, says: str) -> None:
    with pytest.raises(InvalidReport, match=says) as err:
        validate(vms(vm, followed=followed), max_edges=10)
    assert err.value.edge is None


def test_the_same_vm_twice_is_refused() -> None:
    with pytest.raises(InvalidReport, match=r"vms\[1\].uuid: .* listed twice"):
        validate(vms(pb.LocalVm(uuid=UUID, name="a"), pb.LocalVm(uuid=UUID, name="b")), max_edges=10)


@pytest.mark.parametrize(("raw", "kept", "reason"), [
    ("api.shop.svc.cluster.local", "api.shop.svc.cluster.local", ""),
    ("WWW.Example.COM.", "www.example.com", ""),  # case and the root's dot are spelling
    ("_http._tcp.api.shop.svc.cluster.local", "_http._tcp.api.shop.svc.cluster.local", ""),  # SRV: ordinary DNS
    ("_services._dns-sd._udp.local", "_services._dns-sd._udp.local", ""),
    ("bücher.example", "xn--bcher-kva.example", "idna"),
    ("日本.jp", "xn--wgv71a.jp", "idna"),
    ("evil.com\n", None, "invalid"),  # `$` matched before a final newline: it once made a Group of its own
    ("evil.com\r", None, "invalid"),
    ("<script>.example", None, "invalid"),
    ("a b.example", None, "invalid"),
    ("a..example", None, "invalid"),
    ("-a.example", None, "invalid"),
    ("\u200b.example", None, "invalid"),
    ("x" * 64 + ".example", None, "invalid"),  # a label is at most 63
    (("a" * 63 + ".") * 4, None, "too_long"),
    ("x" * 100_000, None, "too_long"),
    ("", None, "empty"),
    (".", None, "empty"),
])
def test_dns_names_are_kept_normalised_or_dropped(raw: str, kept: str | None, reason: str) -> None:
    assert dns_name(raw) == (kept, reason)


def test_a_batch_with_bad_metadata_counts_every_edge_and_says_what_it_changed() -> None:
    b = batch(edge(apps=["http", "bittorrent", "http"]),
              edge(client="FD00::1"),
              edge(threats=[pb.ThreatHit(name="sqlinjection", snippet="x" * 300)] * 20 + [pb.ThreatHit(name="?")]),
              edge(first_seen_unix_ms=2000, last_seen_unix_ms=1000),
              names=(("192.0.2.1", "_http._tcp.api.shop.svc.cluster.local"), ("192.0.2.2", "bücher.example"),
                     ("192.0.2.3", "<b>.example"), ("192.0.2.4", "evil.com\n"), ("not-an-ip", "ok.example")))
    b.edges[0].client.pod = "shop/web; rm -rf"
    tally = validate(b, max_edges=10)
    assert len(b.edges) == 4
    assert list(b.edges[0].apps) == ["http", "unknown"] and b.edges[0].client.pod == ""
    assert b.edges[1].client.ip == "fd00::1"
    assert len(b.edges[2].threats) == 16 and {len(t.snippet) for t in b.edges[2].threats} == {256}
    assert b.edges[3].first_seen_unix_ms == 1000
    assert [(n.ip, n.name) for n in b.names] == [("192.0.2.1", "_http._tcp.api.shop.svc.cluster.local"),
                                                ("192.0.2.2", "xn--bcher-kva.example")]
    assert tally == {("app", "unknown"): 1, ("pod", "invalid"): 1, ("ip", "not_canonical"): 1,
                     ("threats", "too_many"): 5, ("snippet", "too_long"): 16, ("seen", "first_after_last"): 1,
                     ("name", "idna"): 1, ("name", "invalid"): 2, ("name_ip", "not_ip"): 1}
    assert validate(b, max_edges=10) == {}  # normalised once is normalised


def test_names_beyond_the_limit_are_dropped_and_counted_not_refused() -> None:
    b = batch(edge(), names=tuple((f"192.0.2.{i % 250}", f"n{i}.example") for i in range(MAX_NAMES + 7)))
    assert validate(b, max_edges=10) == {("names", "too_many"): 7}
    assert len(b.names) == MAX_NAMES and len(b.edges) == 1


@pytest.mark.parametrize(("spoil", "says"), [
    (lambda e: e.client.__setattr__("ip", "10.0.0.999"), "edges[2].client.ip: '10.0.0.999' is not an IP address"),
    (lambda e: e.server.__setattr__("ip", "192.0.2.1\n"), "edges[2].server.ip"),
    (lambda e: e.server.__setattr__("port", 70000), "edges[2].server.port: 70000 is above 65535"),
    (lambda e: e.__setattr__("protocol", pb.PROTOCOL_UNSPECIFIED), "edges[2].protocol"),
    (lambda e: e.__setattr__("protocol", 99), "edges[2].protocol"),
    (lambda e: e.__setattr__("verdict", 7), "edges[2].verdict"),
    (lambda e: e.__setattr__("bytes_s2c", MAX_COUNTER + 1), "edges[2].bytes_s2c"),
])
def test_an_edge_that_cannot_be_counted_is_refused_by_its_index(spoil, says: str) -> None:  # type: ignore[no-untyped-def]
    b = batch(edge(), edge(), edge(), edge())
    spoil(b.edges[2])
    with pytest.raises(InvalidReport) as err:
        validate(b, max_edges=10)
    assert err.value.edge == 2 and str(err.value).startswith(says), str(err.value)
    assert uncountable(b.edges[2]) is not None and all(uncountable(e) is None for e in b.edges[:2])


@pytest.mark.parametrize(("spoil", "says"), [
    (lambda b: b.__setattr__("agent_id", "x" * 200), "agent_id"),
    (lambda b: b.__setattr__("agent_id", "agent\n"), "agent_id"),  # anchored at the very end
    (lambda b: b.__setattr__("node", "node-a\n"), "node"),
    (lambda b: b.__setattr__("node", "Node_A"), "node"),
    (lambda b: b.__setattr__("previous", 5), "acked 0 <= previous 5 < sequence 1"),
    (lambda b: b.edges.extend([edge()] * 10), "edges: 11 edges, more than the limit 10"),
])
def test_a_batch_is_refused_whole_only_for_what_is_its_own(spoil, says: str) -> None:  # type: ignore[no-untyped-def]
    b = batch(edge())
    spoil(b)
    with pytest.raises(InvalidReport, match=says) as err:
        validate(b, max_edges=10)
    assert err.value.edge is None


def test_the_operator_takes_no_more_edges_than_the_contract_says() -> None:
    assert Settings().max_batch_edges == MAX_BATCH_EDGES
    with pytest.raises(ValueError, match="MAX_BATCH_EDGES"):
        Settings.from_env({"FLOWMAP_OPERATOR_MAX_BATCH_EDGES": str(MAX_BATCH_EDGES + 1)})


def test_threat_snippets_are_shown_escaped_and_unknown_threat_names_counted() -> None:
    b = batch(edge(threats=[pb.ThreatHit(name="heartbleed", snippet="GET /\x1b[2J\r\nX-\u2028: \x00" + "y" * 300),
                            pb.ThreatHit(name="newer-threat", snippet="ok")]))
    assert validate(b, max_edges=10) == {("snippet", "too_long"): 1, ("snippet", "unprintable"): 1,
                                         ("threat_name", "unknown"): 1}
    first, second = b.edges[0].threats
    assert first.snippet.startswith("GET /\\x1b[2J\\x0d\\x0aX-\\u2028: \\x00yyy") and len(first.snippet) == 256
    assert first.snippet.endswith("…") and (second.name, second.snippet) == ("unknown", "ok")
    assert validate(b, max_edges=10) == {}  # normalised once is normalised
