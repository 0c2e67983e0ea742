"""Hostile report batches for the batch validator, and the properties every outcome must have.

Shared by ``tests/operator/test_fuzz.py`` (a bounded run) and ``benchmarks/operator_fuzz.py``
(1,000,000 inputs). An input is raw bytes as the operator's gate receives them: random bytes,
mutated and truncated real batches, and batches built from hostile pieces (addresses in every
spelling, names with control characters, punycode and underscores, counters at and past the
bound, unknown enums, sequence orders that do not hold).
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from typing import Any

from google.protobuf.message import DecodeError

from flowmap_api import report_pb2 as pb
from flowmap_api.apps import APPLICATIONS, UNKNOWN
from flowmap_api.limits import MAX_BATCH_EDGES, MAX_NAMES
from flowmap_api.validity import MAX_COUNTER, MAX_POD, MAX_SNIPPET, MAX_THREATS, address, dns_name, uncountable
from flowmap_operator.errors import InvalidReport
from flowmap_operator.validation import validate

ADDRESSES = ["10.244.1.10", "192.0.2.1", "0.0.0.0", "255.255.255.255", "fd00::1", "FD00::1", "fe80::1%eth0",
             "::ffff:10.0.0.1", "2001:db8:0:0:0:0:0:1", "10.0.0.999", "010.0.0.1", "10.0.0.1\n", " 10.0.0.1", "",
             "::", "1.2.3", "x" * 70, "١٢٣.1.1.1", "10.0.0.1%", "%"]
NAMES = ["api.shop.svc.cluster.local", "_http._tcp.api.shop.svc.cluster.local", "Example.COM.", "evil.com\n",
         "bücher.example", "日本.jp", "<script>", "a b", "a..b", ".", "", "-x.example", "x" * 64 + ".example",
         ("a" * 63 + ".") * 4, "\x00.example", "\u200b", "xn--bcher-kva.example", "a.b.", "_", "*.example",
         "ex\u3002ample", "\ud7ff.example", "ß.example", "a" * 2000]
PODS = ["shop/web-7d4b9-x1", "kube-system/coredns-1", "shop/", "/web", "Shop/web", "shop/web\n", "a" * 64 + "/b",
        "shop/" + "b" * 300, "shop/web/x", "shop/-web", ""]
AGENTS = ["node-a/0f3c9a", "a", "", "x" * 129, "agent\n", "-a", "node-a/ä"]
NODES = ["node-a", "node-a.example", "", "Node-A", "node-a\n", "node_a", "n" * 254, "node-a."]
COUNTERS = [0, 1, 1500, MAX_COUNTER, MAX_COUNTER + 1, 2**64 - 1]
PORTS = [0, 1, 53, 443, 65535, 65536, 2**32 - 1]
ENUMS = [0, 1, 2, 3, 4, 5, 99, -1]
SEEN = [0, 1_700_000_000_000, -1, 2**63 - 1, -(2**63)]


def _text(rnd: random.Random, pool: list[str]) -> str:
    if rnd.random() < 0.8:
        return rnd.choice(pool)
    return "".join(chr(rnd.choice((rnd.randrange(0x20, 0x7f), rnd.randrange(0, 0x20), rnd.randrange(0x80, 0x3000))))
                   for _ in range(rnd.randrange(0, 40)))


def _either(rnd: random.Random, good: list[Any], hostile: list[Any], p_hostile: float) -> Any:
    return rnd.choice(hostile) if rnd.random() < p_hostile else rnd.choice(good)


def random_batch(rnd: random.Random) -> pb.ReportBatch:
    """A batch built from hostile pieces: metadata always drawn from values at and past its bounds,
    what decides counting (addresses, ports, enums, counters, the batch's own fields) now and then,
    so that every edge is sometimes countable and sometimes not."""
    def ip() -> str:
        return _either(rnd, ADDRESSES[:9], [_text(rnd, ADDRESSES)], 0.05)

    def endpoint() -> pb.Endpoint:
        return pb.Endpoint(ip=ip(), port=_either(rnd, PORTS[:5], PORTS, 0.05), pod=_text(rnd, PODS),
                           local=rnd.random() < 0.5)

    edges = []
    for _ in range(rnd.choice((0, 1, 2, 3, 8))):
        edges.append(pb.EdgeDelta(
            client=endpoint(), server=endpoint(), protocol=_either(rnd, ENUMS[1:5], ENUMS, 0.05),
            verdict=_either(rnd, ENUMS[:3], ENUMS, 0.05),
            apps=[rnd.choice((*APPLICATIONS[:4], UNKNOWN, "bittorrent", "", "HTTP")) for _ in range(rnd.randrange(4))],
            bytes_c2s=_either(rnd, COUNTERS[:4], COUNTERS, 0.02), bytes_s2c=_either(rnd, COUNTERS[:4], COUNTERS, 0.02),
            packets_c2s=rnd.choice(COUNTERS[:4]), packets_s2c=_either(rnd, COUNTERS[:4], COUNTERS, 0.02),
            sessions_opened=rnd.randrange(3), sessions_active=rnd.randrange(3),
            first_seen_unix_ms=rnd.choice(SEEN), last_seen_unix_ms=rnd.choice(SEEN),
            threats=[pb.ThreatHit(name=rnd.choice(("sqlinjection", "dns", "?", "")),
                                  snippet=rnd.choice(("' OR 1=1 --", "x" * (MAX_SNIPPET + 1), "é" * 300, "")))
                     for _ in range(rnd.choice((0, 0, 1, MAX_THREATS + 2)))]))
    names = [pb.DnsName(ip=_either(rnd, ADDRESSES[:9], ADDRESSES, 0.2), name=_text(rnd, NAMES),
                        ttl_seconds=rnd.randrange(3600)) for _ in range(rnd.choice((0, 1, 3, 6)))]
    sequence = rnd.choice((1, 2, 7)) if edges or rnd.random() < 0.9 else 0
    previous = _either(rnd, [sequence - 1 if sequence else 0], [sequence, sequence + 1], 0.05)
    return pb.ReportBatch(agent_id=_either(rnd, AGENTS[:2], AGENTS, 0.05), node=_either(rnd, NODES[:2], NODES, 0.05),
                          sequence=sequence, previous=previous,
                          acked=_either(rnd, [0, previous], [previous + 1], 0.05), edges=edges, names=names,
                          node_addresses=_either(rnd, [[], ["10.0.0.1", "FD00::2"]],
                                                 [[_text(rnd, ADDRESSES)], ["10.0.0.1"] * 65], 0.05),
                          lost_deltas=rnd.choice((0, 0, 3)))


def hostile_inputs(count: int, seed: int = 0) -> Iterator[bytes]:
    """``count`` inputs: a third random bytes, a third mutated or cut batches, a third hostile batches."""
    rnd = random.Random(seed)
    for i in range(count):
        kind = i % 3
        if kind == 0:
            yield rnd.randbytes(rnd.randrange(0, 300))
            continue
        raw = random_batch(rnd).SerializeToString()
        if kind == 1 and raw:
            data = bytearray(raw)
            for _ in range(rnd.randrange(1, 6)):
                data[rnd.randrange(len(data))] = rnd.randrange(256)
            raw = bytes(data[:rnd.randrange(len(data) + 1)]) if rnd.random() < 0.3 else bytes(data)
        yield raw


def check(raw: bytes) -> str:
    """Parse and validate one input as the operator does; assert what every outcome must hold.

    Returns the outcome: ``undecodable``, ``refused_batch``, ``refused_edge`` or ``accepted``.
    Anything but DecodeError from parsing and InvalidReport from validation escapes (a crash).
    """
    try:
        batch = pb.ReportBatch.FromString(raw)
    except DecodeError:
        return "undecodable"
    original = pb.ReportBatch()
    original.CopyFrom(batch)
    try:
        tally = validate(batch, max_edges=MAX_BATCH_EDGES)
    except InvalidReport as exc:
        if exc.edge is None:
            return "refused_batch"
        assert 0 <= exc.edge < len(original.edges), exc.edge
        assert uncountable(original.edges[exc.edge]) is not None, (exc, original.edges[exc.edge])
        assert all(uncountable(e) is None for e in original.edges[:exc.edge])
        return "refused_edge"
    assert all(isinstance(n, int) and n > 0 for n in tally.values()), tally
    _assert_normal(batch, original)
    again = pb.ReportBatch()
    again.CopyFrom(batch)
    assert validate(again, max_edges=MAX_BATCH_EDGES) == {}, "normalising twice changed something"
    assert pb.ReportBatch.FromString(batch.SerializeToString()) == batch
    return "accepted"


def _assert_normal(batch: pb.ReportBatch, original: pb.ReportBatch) -> None:
    assert len(batch.edges) == len(original.edges), "an edge was dropped"
    known = {*APPLICATIONS, UNKNOWN}
    for edge in batch.edges:
        assert uncountable(edge) is None
        for ep in (edge.client, edge.server):
            assert address(ep.ip) == ep.ip, ep.ip
            assert not ep.pod or (len(ep.pod) <= MAX_POD and ep.pod.count("/") == 1 and ep.pod.isascii()), ep.pod
        assert set(edge.apps) <= known and len(set(edge.apps)) == len(edge.apps), edge.apps
        assert edge.first_seen_unix_ms <= edge.last_seen_unix_ms
        assert len(edge.threats) <= MAX_THREATS
        assert all(t.name in known and len(t.snippet) <= MAX_SNIPPET for t in edge.threats)
    assert len(batch.names) <= min(len(original.names), MAX_NAMES)
    for name in batch.names:
        assert address(name.ip) == name.ip and dns_name(name.name) == (name.name, ""), (name.ip, name.name)
        assert name.name == name.name.strip() and name.name.isascii()
    for node_address in batch.node_addresses:
        assert address(node_address) == node_address


def outcomes(inputs: Iterator[bytes]) -> dict[str, Any]:
    """Every input checked; the count of each outcome."""
    counts: dict[str, Any] = {}
    for raw in inputs:
        outcome = check(raw)
        counts[outcome] = counts.get(outcome, 0) + 1
    return counts
