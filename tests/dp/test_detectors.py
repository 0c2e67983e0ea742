"""Unit tests for every protocol detector, on real payload bytes.

Samples come from the public nDPI captures in ``tests/data/ndpi`` and from this project's own
captures of real clients and servers in ``tests/data/captures`` (both described by a
MANIFEST.json): the pcaps are read with scapy (tests only) and each labeled flow becomes the list
of its payloads in arrival order. Each detector must recognise its protocol's flows, reject every
other protocol's flows, survive any split of the first message, and never raise on garbage.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flowmap_dp.detectors import BY_NAME, REGISTRY
from flowmap_dp.detectors.base import Flow, Verdict

REPO = Path(__file__).resolve().parents[2]
SOURCES = (REPO / "tests" / "data" / "ndpi", REPO / "tests" / "data" / "captures")
APP_DETECTORS = [d for d in REGISTRY if d.scan is None]


@dataclass(frozen=True)
class Sample:
    """One labeled flow: its payloads in arrival order (True = client to server)."""

    source: str
    label: str
    app: str  # the protocol that carries it: the label, or for sqlinjection its carrier
    l4: str
    client_port: int
    server_port: int
    packets: tuple[tuple[bool, bytes], ...]
    threats: frozenset[str] = frozenset()  # the manifest's, with sqlinjection for that label

    def flow(self, limit: int | None = None) -> Flow:
        f = Flow(self.l4, self.client_port, self.server_port)
        for from_client, payload in self.packets[:limit]:
            f.add(from_client, payload)
        return f

    def __str__(self) -> str:
        return f"{self.source}:{self.client_port}->{self.server_port}({self.label})"


def _endpoint(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host.strip("[]").lower(), int(port)


def _payloads(path: Path) -> dict[tuple[str, int | None, frozenset[tuple[str, int]]], list[tuple[tuple[str, int], bytes]]]:
    from scapy.all import IP, TCP, UDP, Dot1Q, IPv6, PcapNgReader, PcapReader  # GPL: tests only

    reader = PcapNgReader if path.suffix == ".pcapng" else PcapReader
    out: dict[tuple[str, int | None, frozenset[tuple[str, int]]], list[tuple[tuple[str, int], bytes]]] = {}
    try:
        packets = reader(str(path))
    except Exception:
        packets = PcapReader(str(path))
    with packets:
        for p in packets:
            if IP in p:
                ip, src, dst, left = p[IP], p[IP].src, p[IP].dst, p[IP].len - p[IP].ihl * 4
            elif IPv6 in p:
                ip, src, dst, left = p[IPv6], p[IPv6].src, p[IPv6].dst, p[IPv6].plen
            else:
                continue
            if TCP in ip:
                t, l4 = ip[TCP], "tcp"
                start, n = t.dataofs * 4, left - t.dataofs * 4
            elif UDP in ip:
                t, l4 = ip[UDP], "udp"
                start, n = 8, t.len - 8
            else:
                continue
            payload = bytes(t)[start : start + max(n, 0)]
            a, b = (src.lower(), t.sport), (dst.lower(), t.dport)
            tags = [layer.vlan for layer in p.iterpayloads() if isinstance(layer, Dot1Q)]
            vlan = tags[-1] if tags else None  # QinQ: the inner tag names the flow, as nDPI keys it
            key = (l4, vlan, frozenset((a, b)))
            out.setdefault(key, [])
            if payload:
                out[key].append((a, payload))
    return out


@cache
def samples() -> tuple[Sample, ...]:
    """Every labeled, certain flow of both capture collections that carries payload."""
    out: list[Sample] = []
    for base in SOURCES:
        for entry in json.loads((base / "MANIFEST.json").read_text()):
            flows = _payloads(base / entry["file"])
            for label in entry["flows"]:
                if label.get("uncertain"):
                    continue
                client = _endpoint(label.get("client") or label["a"])
                server = _endpoint(label.get("server") or label["b"])
                ends = frozenset((client, server))
                # Without a vlan in the label, nDPI did not key the flow by it: any vlan matches.
                pk = next((v for (l4, vlan, e), v in flows.items() if l4 == label["proto"] and e == ends
                           and ("vlan" not in label or vlan == label["vlan"])), [])
                if not pk:
                    continue
                app = label.get("carrier", "http") if label["label"] == "sqlinjection" else label["label"]
                threats = {*label.get("threats", ()), *(["sqlinjection"] if label["label"] == "sqlinjection" else [])}
                out.append(Sample(entry["file"], label["label"], app, label["proto"], client[1], server[1],
                                  tuple((src == client, data) for src, data in pk[:24]), frozenset(threats)))
    return tuple(out)


def by_label(label: str) -> list[Sample]:
    return [s for s in samples() if s.label == label]


def verdict(name: str, sample: Sample, limit: int = 24) -> Verdict:
    """What detector ``name`` says after each packet, stopping at the first decision (as the
    inspector does): MATCH/NO, or MORE if it never decided."""
    det = BY_NAME[name]
    if sample.l4 not in det.l4:
        return Verdict.NO  # the inspector never asks it
    for n in range(1, min(len(sample.packets), limit) + 1):
        v = det.detect(sample.flow(n))
        if v is not Verdict.MORE:
            return v
        if n >= det.max_packets:
            break
    # The session ends: the inspector asks those still undecided to conclude.
    if det.conclude is not None:
        return det.conclude(sample.flow(limit))
    return Verdict.MORE


# -- recognition on real traffic ---------------------------------------------------------------

# Every protocol label with real captures (sqlinjection is a threat: its flows belong to their
# carrier protocol and are checked by the inspector tests).
CAPTURED = sorted({s.label for s in samples()} - {"unknown", "sqlinjection"})


@pytest.mark.parametrize("label", CAPTURED)
def test_detector_matches_every_flow_of_its_protocol(label: str) -> None:
    flows = by_label(label)
    assert flows
    missed = [str(s) for s in flows if verdict(label, s) is not Verdict.MATCH]
    assert not missed, missed


@pytest.mark.parametrize("name", [d.name for d in APP_DETECTORS])
def test_detector_rejects_other_protocols(name: str) -> None:
    """No detector claims another protocol's flow (a sqlinjection flow belongs to its carrier)."""
    wrong = []
    for s in samples():
        if s.app == name:
            continue
        if verdict(name, s) is Verdict.MATCH:
            wrong.append(str(s))
    assert not wrong, wrong


def test_every_detector_is_tested_on_at_least_two_captures() -> None:
    """Issue 3's done criterion: each of the 21 detectors meets at least two real captures."""
    files: dict[str, set[str]] = {name: set() for name in BY_NAME}
    for s in samples():
        if s.label in files:
            files[s.label].add(s.source)
    thin = {name: sorted(f) for name, f in files.items() if len(f) < 2}
    assert not thin, thin


# -- a message split over two segments ------------------------------------------------------------


def _splits() -> Iterator[tuple[str, Sample]]:
    for s in samples():
        if s.l4 == "tcp" and s.label in BY_NAME and s.label not in ("echo", "sqlinjection"):
            yield s.label, s


@pytest.mark.parametrize("label", sorted({label for label, _ in _splits()}))
def test_first_message_split_anywhere_is_still_recognised(label: str) -> None:
    rng = random.Random(label)
    det = BY_NAME[label]
    checked = 0
    for _, s in [x for x in _splits() if x[0] == label][:4]:
        first_dir, first = s.packets[0]
        if len(first) < 2:
            continue
        cuts = sorted({1, len(first) - 1, *rng.sample(range(1, len(first)), min(12, len(first) - 1))})
        for cut in cuts:
            packets = ((first_dir, first[:cut]), (first_dir, first[cut:]), *s.packets[1:])
            split = Sample(s.source, s.label, s.app, s.l4, s.client_port, s.server_port, packets)
            head = det.detect(split.flow(1))
            assert head is not Verdict.NO, f"{s} cut at {cut}: NO on the first part"
            assert verdict(label, split) is Verdict.MATCH, f"{s} cut at {cut}"
            checked += 1
    assert checked


# -- robustness -------------------------------------------------------------------------------------


def _all_calls(flow: Flow) -> None:
    for det in REGISTRY:
        det.detect(flow)
        if det.extract is not None:
            det.extract(flow)
        if det.scan is not None:
            for app in ("http", "mysql", "postgresql", "tds"):
                det.scan(flow, app)
        if det.settled is not None:
            det.settled(flow)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(l4=st.sampled_from(["tcp", "udp"]), packets=st.lists(st.tuples(st.booleans(), st.binary(max_size=300)), max_size=6))
def test_detectors_never_raise_on_random_bytes(l4: str, packets: list[tuple[bool, bytes]]) -> None:
    flow = Flow(l4, 40000, 443)
    for from_client, payload in packets:
        flow.add(from_client, payload)
    _all_calls(flow)


def test_detectors_never_raise_on_mutated_real_payloads() -> None:
    rng = random.Random(7)
    pool = [s for s in samples()]
    for _ in range(3000):
        s = rng.choice(pool)
        packets = []
        for from_client, payload in s.packets[:4]:
            b = bytearray(payload[: rng.choice([len(payload), rng.randrange(len(payload) + 1)])])
            for _ in range(rng.randrange(4)):
                if b:
                    b[rng.randrange(len(b))] = rng.randrange(256)
            packets.append((from_client, bytes(b)))
        flow = Flow(s.l4, s.client_port, s.server_port)
        for from_client, payload in packets:
            flow.add(from_client, payload)
        _all_calls(flow)


# -- metadata on real traffic -------------------------------------------------------------------


def _one(source: str, label: str, index: int = 0) -> Sample:
    found = [s for s in samples() if s.source == source and s.label == label]
    assert len(found) > index, (source, label)
    return found[index]


def _meta(name: str, sample: Sample) -> dict:
    det = BY_NAME[name]
    assert det.extract is not None
    return dict(det.extract(sample.flow()))[name]


def test_dns_answers_with_ttl() -> None:
    metas = [_meta("dns", s) for s in samples() if s.source == "dns/dig.pcap" and s.label == "dns"]
    a = next(m for m in metas if m["qname"] == "api.flowmap.test" and m["qtype"] == "A")
    assert a["rcode"] == "NOERROR"
    assert a["answers"] and all({"name", "type", "ttl", "data"} <= set(x) for x in a["answers"])
    assert a["answers"][0]["type"] == "A" and a["answers"][0]["ttl"] > 0
    cname = next(m for m in metas if m["qname"] == "www.flowmap.test" and m["qtype"] == "A")
    assert cname["answers"][0]["type"] == "CNAME"
    assert any(x["type"] == "A" for x in cname["answers"])
    # DNS over TCP (two-byte length prefix) gives the same shape.
    tcp = [s for s in samples() if s.source == "dns/dig.pcap" and s.l4 == "tcp"]
    assert tcp and _meta("dns", tcp[0])["answers"]


def test_dns_real_world_answers() -> None:
    m = next(m for s in samples() if s.source == "dns.pcap" and (m := _meta("dns", s))["qname"] == "e7.whatsapp.net")
    assert {x["data"] for x in m["answers"]} >= {"169.45.219.235", "169.47.40.142"}
    assert m["answers"][0]["ttl"] == 491


def test_tls_sni_alpn_and_negotiated_version() -> None:
    metas = [_meta("tls", s) for s in samples() if s.source == "tls/openssl-s_client.pcap"]
    wanted = {"sni": "api.flowmap.test", "version": "TLS1.3", "alpn": ["http/1.1"]}
    assert any(wanted.items() <= m.items() for m in metas), metas
    assert any(m.get("version") == "TLS1.2" for m in metas)
    m = _meta("tls", _one("selfsigned.pcap", "tls"))
    assert m["sni"] == "localhost" and m["alpn"] == ["h2", "http/1.1"] and m["version"] == "TLS1.2"


def test_tls_malformed_hello_yields_no_invented_fields() -> None:
    # tls_cipher_lens.pcap carries ClientHellos with wrong cipher-suite lengths on purpose.
    metas = [_meta("tls", s) for s in samples() if s.source == "tls_cipher_lens.pcap"]
    assert sum("sni" in m for m in metas) == 1  # the one well-formed hello
    assert all(set(m) <= {"client_version", "sni", "alpn", "version", "alpn_selected"} for m in metas)


def test_http_method_host_path_status() -> None:
    metas = [_meta("http", s) for s in samples() if s.source == "http/curl.pcap"]
    assert {"method": "GET", "path": "/index.html", "host": "web.flowmap.test", "status": 200}.items() <= metas[0].items()
    assert any(m["method"] == "HEAD" for m in metas) and any(m.get("status") == 404 for m in metas)


def test_http_path_is_truncated() -> None:
    flow = Flow("tcp", 40000, 80)
    flow.add(True, b"GET /" + b"a" * 5000 + b" HTTP/1.1\r\nHost: x\r\n\r\n")
    assert BY_NAME["http"].detect(flow) is Verdict.MATCH
    assert len(_extract("http", flow)["path"]) == 256


def test_http_request_line_split_across_segments() -> None:
    s = _one("http-lines-split.pcap", "http")
    assert verdict("http", s) is Verdict.MATCH
    assert _meta("http", s)["host"] == "toni.lan:31337"


def _extract(name: str, flow: Flow) -> dict:
    det = BY_NAME[name]
    assert det.extract is not None
    return dict(det.extract(flow))[name]


def test_grpc_service_and_method_from_real_capture() -> None:
    m = _meta("grpc", _one("grpc/grpcio.pcap", "grpc"))
    assert m["service"] == "flowmap.demo.Greeter" and m["method"] == "SayHello"
    assert m["authority"] == "10.199.0.1:50051"


def _h2_request(path: str, content_type: str, huffman: bool, split: int | None = None) -> bytes:
    """A prior-knowledge HTTP/2 request encoded by the hpack library (the peer's encoder)."""
    import hpack

    block = hpack.Encoder().encode(
        [(":method", "POST"), (":scheme", "http"), (":path", path), (":authority", "svc:50051"),
         ("content-type", content_type), ("te", "trailers")], huffman=huffman)
    settings = b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"
    if split is None:
        frames = len(block).to_bytes(3, "big") + b"\x01\x04" + (1).to_bytes(4, "big") + block
    else:  # HEADERS without END_HEADERS, then CONTINUATION
        a, b = block[:split], block[split:]
        frames = (len(a).to_bytes(3, "big") + b"\x01\x00" + (1).to_bytes(4, "big") + a
                  + len(b).to_bytes(3, "big") + b"\x09\x04" + (1).to_bytes(4, "big") + b)
    return b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + settings + frames


@pytest.mark.parametrize("huffman", [True, False])
@pytest.mark.parametrize("split", [None, 3])
def test_grpc_path_decoded_with_and_without_huffman(huffman: bool, split: int | None) -> None:
    data = _h2_request("/inventory.v1.Stock/Reserve", "application/grpc+proto", huffman, split)
    for cut in (None, 10, len(data) - 5):  # whole, and cut across TCP segments
        flow = Flow("tcp", 40000, 50051)
        if cut is None:
            flow.add(True, data)
        else:
            flow.add(True, data[:cut])
            assert BY_NAME["grpc"].detect(flow) is Verdict.MORE
            flow.add(True, data[cut:])
        assert BY_NAME["grpc"].detect(flow) is Verdict.MATCH
        assert BY_NAME["http"].detect(flow) is Verdict.NO
        m = _extract("grpc", flow)
        assert (m["service"], m["method"]) == ("inventory.v1.Stock", "Reserve")


def test_h2c_without_grpc_is_http() -> None:
    flow = Flow("tcp", 40000, 8080)
    flow.add(True, _h2_request("/index.html", "text/html", huffman=True))
    assert BY_NAME["grpc"].detect(flow) is Verdict.NO
    assert BY_NAME["http"].detect(flow) is Verdict.MATCH
    assert _extract("http", flow)["path"] == "/index.html"


def test_cheap_metadata_of_database_and_shell_protocols() -> None:
    assert _meta("ssh", _one("ssh.pcap", "ssh"))["server"] == "SSH-2.0-OpenSSH_5.3"
    versions = {_meta("mysql", s)["server_version"] for s in samples() if s.source == "mysql.pcapng"}
    assert versions == {"5.5.5-10.6.12-MariaDB-0ubuntu0.22.04.1", "8.0.36"}
    pg = _meta("postgresql", _one("pgsql.pcap", "postgresql"))
    assert (pg["user"], pg["database"]) == ("oryx", "mailstore")
    assert _meta("redis", _one("resp.pcap", "redis"))["command"] == "COMMAND"
    assert _meta("tns", _one("oracle12.pcapng", "tns"))["sid"] == "igor"
    assert {_meta("kafka", s)["client_id"] for s in samples() if s.source == "kafka.pcapng"} == {"rdkafka", "console-producer"}
    assert _meta("mongodb", _one("mongodb.pcap", "mongodb"))["command"] in ("ismaster", "isMaster", "getnonce")
    assert _meta("cassandra", _one("cassandra.pcap", "cassandra"))["cql_version"]


# -- protocols confirmed by structure: constructed from their specifications ----------------------


def _spark_rpc(request_id: int, body: bytes) -> bytes:
    """An RpcRequest frame as Spark's TransportFrameDecoder expects it."""
    return (21 + len(body)).to_bytes(8, "big") + b"\x03" + request_id.to_bytes(8, "big") + len(body).to_bytes(4, "big") + body


def test_spark_rpc_request_and_response() -> None:
    # NettyRpcEnv RequestMessage: sender address present, host as Java modified UTF, port, ...
    body = b"\x01\x00\x0910.0.0.12\x00\x00\x1b\xa5\x00\x0cMasterRegist" + b"\xac\xed\x00\x05" + bytes(20)
    req = _spark_rpc(6812345, body)
    flow = Flow("tcp", 40000, 7077)
    flow.add(True, req[:15])
    assert BY_NAME["spark"].detect(flow) is Verdict.MORE
    flow.add(True, req[15:])
    assert BY_NAME["spark"].detect(flow) is Verdict.MATCH
    # Opaque body (e.g. encrypted): only the server's RpcResponse with the same id confirms.
    opaque = _spark_rpc(77, bytes(range(200, 256)))
    flow = Flow("tcp", 40000, 7077)
    flow.add(True, opaque)
    assert BY_NAME["spark"].detect(flow) is Verdict.MORE
    flow.add(False, (21 + 4).to_bytes(8, "big") + b"\x04" + (77).to_bytes(8, "big") + b"\x00\x00\x00\x04abcd")
    assert BY_NAME["spark"].detect(flow) is Verdict.MATCH


def test_spark_rejects_near_misses() -> None:
    for payload in (_spark_rpc(1, b"x" * 30)[:8] + b"\x03" + bytes(12) + b"x" * 30,  # body size wrong
                    (30).to_bytes(8, "big") + b"\x07" + bytes(21),  # not a client message type
                    b"\x00\x00\x00\x00\x00\x00\x00\x15\x00" + bytes(12)):
        flow = Flow("tcp", 40000, 7077)
        flow.add(True, payload)
        flow.add(False, b"garbage reply")
        assert BY_NAME["spark"].detect(flow) is not Verdict.MATCH, payload


def _memcached_binary(magic: int, opcode: int, key: bytes = b"", extras: bytes = b"", value: bytes = b"") -> bytes:
    body = extras + key + value
    return (bytes([magic, opcode]) + len(key).to_bytes(2, "big") + bytes([len(extras), 0]) + b"\x00\x00"
            + len(body).to_bytes(4, "big") + b"\x00\x00\x00\x01" + bytes(8) + body)


def test_couchbase_kv_needs_couchbase_evidence() -> None:
    hello = _memcached_binary(0x80, 0x1F, key=b'{"a":"python/4.1"}', value=b"\x00\x01\x00\x06")
    flow = Flow("tcp", 40000, 40001)  # not a Couchbase port: HELLO itself is the evidence
    flow.add(True, hello)
    assert BY_NAME["couchbase"].detect(flow) is Verdict.MATCH
    plain_get = _memcached_binary(0x80, 0x00, key=b"user:1")
    flow = Flow("tcp", 40000, 40001)
    flow.add(True, plain_get)
    assert BY_NAME["couchbase"].detect(flow) is Verdict.NO  # plain memcached binary elsewhere
    flow = Flow("tcp", 40000, 11210)
    flow.add(True, plain_get)
    assert BY_NAME["couchbase"].detect(flow) is Verdict.MATCH


def test_couchbase_rest_before_http() -> None:
    flow = Flow("tcp", 40000, 8091)
    flow.add(True, b"GET /pools/default HTTP/1.1\r\nHost: cb:8091\r\nAuthorization: Basic eA==\r\n\r\n")
    assert BY_NAME["couchbase"].detect(flow) is Verdict.MATCH
    assert _extract("couchbase", flow) == {"interface": "rest", "path": "/pools/default"}
    other = Flow("tcp", 40000, 8091)
    other.add(True, b"GET /index.html HTTP/1.1\r\nHost: x\r\n\r\n")
    assert BY_NAME["couchbase"].detect(other) is Verdict.NO


def test_zookeeper_four_letter_word() -> None:
    flow = Flow("tcp", 40000, 2181)
    flow.add(True, b"ruok")
    assert BY_NAME["zookeeper"].detect(flow) is Verdict.MORE
    flow.add(False, b"imok")
    assert BY_NAME["zookeeper"].detect(flow) is Verdict.MATCH


def test_echo_needs_the_whole_session_for_one_round_trip() -> None:
    det = BY_NAME["echo"]
    assert det.conclude is not None
    flow = Flow("tcp", 40000, 7)
    flow.add(True, b"hello echo\n")
    flow.add(False, b"hello echo\n")
    assert det.detect(flow) is Verdict.MORE and det.conclude(flow) is Verdict.MATCH
    flow.add(True, b"again\n")
    flow.add(False, b"aga")
    flow.add(False, b"in\n")
    assert det.detect(flow) is Verdict.MATCH
    flow.add(False, b"extra")
    assert det.detect(flow) is Verdict.NO
    server_first = Flow("udp", 40000, 7)
    server_first.add(False, b"banner")
    assert det.detect(server_first) is Verdict.NO
