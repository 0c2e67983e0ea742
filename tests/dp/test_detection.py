"""The slow-path inspector (``flowmap_dp.detection``) and the sqlinjection threat scanner."""

from __future__ import annotations

import random

import pytest

import flowmap_dp.detection as detection
from flowmap_dp import threats
from flowmap_dp.detection import MAX_PACKETS, NO_VERDICT, SERVER_FIRST, Inspector
from flowmap_dp.detectors import BY_NAME, REGISTRY
from flowmap_dp.detectors.base import STREAM_LIMIT, Detector, Flow, Verdict
from flowmap_dp.detectors.sqlinjection import scan

from tests.dp.test_detectors import Sample, samples


def _run(sample: Sample) -> Inspector:
    """Feed a sample as the session table would: until done, then finish at session end."""
    insp = Inspector(sample.l4, sample.client_port, sample.server_port,
                     scanners=threats.bind(threats.Config.parse([], sample.limits)))
    for (from_client, payload), ts in zip(sample.packets, sample.times):
        if insp.feed(from_client, payload, ts):
            break
    insp.finish()
    return insp


def test_inspector_agrees_with_every_real_sample() -> None:
    wrong = []
    for s in samples():
        insp = _run(s)
        hit = any(t.name == "sqlinjection" for t in insp.threats) and s.label == "sqlinjection"
        got = "sqlinjection" if hit and insp.app == s.app else insp.app
        if got != s.label:
            wrong.append(f"{s}: {got}")
    assert not wrong, wrong


def test_no_threat_on_ordinary_traffic() -> None:
    """The scanners' hits on each sample are among the threats its manifest lists (none for ordinary
    traffic); the watches' are not the inspector's: test_own_captures checks those."""
    runs = [(s, _run(s)) for s in samples()]
    noisy = [f"{s}: {insp.threats}" for s, insp in runs if {t.name for t in insp.threats} - set(s.threats)]
    assert not noisy, noisy


def test_interface_and_done_semantics() -> None:
    insp = Inspector("tcp", 40000, 80)
    assert insp.app == "unknown" and insp.metadata == {} and insp.threats == []
    assert insp.feed(True, b"") is False  # no payload: nothing to look at
    assert insp.feed(True, b"GET /?q=1%27+or+%271%27%3D%271 HTTP/1.1\r\nHost: shop\r\n\r\n") is False  # lingers
    assert insp.app == "http" and insp.metadata["http"]["host"] == "shop"
    done = False
    for _ in range(20):
        done = insp.feed(False, b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
        if done:
            break
    assert done and insp.feed(True, b"more") is True
    assert insp.metadata["http"]["status"] == 200
    assert [t.where for t in insp.threats] == ["http.query"]
    insp.finish()
    insp.finish()  # idempotent
    assert insp.app == "http"


def _dns_query(ident: int) -> bytes:
    return ident.to_bytes(2, "big") + b"\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00\x03www\x07example\x03com\x00\x00\x01\x00\x01"


def _dns_answer(ident: int) -> bytes:
    q = _dns_query(ident)
    return (q[:2] + b"\x81\x80\x00\x01\x00\x01\x00\x00\x00\x00" + q[12:]
            + b"\xc0\x0c\x00\x01\x00\x01\x00\x00\x01\x2c\x00\x04\x5d\xb8\xd8\x22")


def test_dns_waits_for_the_answer() -> None:
    insp = Inspector("udp", 40000, 53)
    assert insp.feed(True, _dns_query(7)) is False
    assert insp.app == "dns"
    assert insp.feed(False, _dns_answer(7)) is True
    assert insp.metadata["dns"]["answers"] == [{"name": "www.example.com", "type": "A", "ttl": 300, "data": "93.184.216.34"}]


def test_the_servers_words_read_first_rule_no_protocol_out() -> None:
    """Live, the client's packets and the server's enter the node on different interfaces and
    rings; the server's may be read first. PostgreSQL's "N" (no TLS) and Redis's "+OK" then come
    before the client's request, and a gRPC server's SETTINGS and response before the call."""
    postgres = Inspector("tcp", 40000, 5432)
    postgres.feed(False, b"N")
    postgres.feed(True, (8).to_bytes(4, "big") + (80877103).to_bytes(4, "big"))  # SSLRequest
    redis = Inspector("tcp", 40001, 6379)
    for _ in range(4):  # as many server packets as the detector's own budget
        redis.feed(False, b"+OK\r\n")
    redis.feed(True, b"*1\r\n$4\r\nPING\r\n")
    assert (postgres.app, redis.app) == ("postgresql", "redis")


def test_the_servers_words_alone_give_no_verdict_unless_they_match() -> None:
    """A DNAT'd session's reply half (the client's node sees the answers of a call to a Service
    under the pod's address, the call itself under the Service's): the server's words alone say
    nothing of a gRPC call, so the half says nothing, not "unknown" (which would be a verdict on
    the edge the other half decides). Words that do match (a DNS answer) still decide."""
    settings = b"\x00\x00\x06\x04\x00\x00\x00\x00\x00\x00\x04\x00\x3f\xff\xff"  # a SETTINGS frame
    half = Inspector("tcp", 38102, 9090)
    for _ in range(5):
        half.feed(False, settings)
    half.judge_server_alone()
    half.finish()
    assert (half.done, half.app) == (True, NO_VERDICT)
    answer = Inspector("udp", 40000, 53)
    answer.feed(False, _dns_answer(7))
    answer.finish()
    assert answer.app == "dns"
    spoke = Inspector("tcp", 38104, 9090)  # the client spoke: what nobody knows is unknown
    spoke.feed(True, b"\x16garbage")
    spoke.finish()
    assert spoke.app == "unknown"


def test_the_servers_words_read_first_rule_nothing_out_before_the_client_speaks() -> None:
    """A PostgreSQL session whose server half the dp read first (the answers entered the client's
    node through the tunnel, whose ring was read before the pod's veth): the server's words alone
    match nothing (its first is "N", no SSL), but the client's SSLRequest, read later, decides. On a
    loaded node this was "unknown" (the detector had said NO to the server's words for good)."""
    server = [b"N", b"R" + (8).to_bytes(4, "big") + (0).to_bytes(4, "big"),
              b"Z\x00\x00\x00\x05I", b"T\x00\x00\x00\x06\x00\x00", b"C\x00\x00\x00\x0dSELECT 1\x00",
              b"Z\x00\x00\x00\x05I"]
    assert len(server) > SERVER_FIRST
    session = Inspector("tcp", 40000, 5432)
    for word in server:
        session.feed(False, word)
    session.feed(True, (8).to_bytes(4, "big") + (80877103).to_bytes(4, "big"))  # SSLRequest
    session.finish()
    assert session.app == "postgresql"


def test_dns_flow_with_many_queries_is_bounded() -> None:
    insp = Inspector("udp", 40000, 53)
    fed = 0
    for i in range(1000):
        fed += 1
        if insp.feed(True, _dns_query(i)):
            break
    assert insp.done and fed <= MAX_PACKETS
    assert insp.app == "dns"


def test_unknown_traffic_ends_unknown_and_bounded() -> None:
    rng = random.Random(3)
    insp = Inspector("tcp", 40000, 40001)
    fed = 0
    while not insp.feed(fed % 2 == 0, bytes(rng.randrange(256) for _ in range(200))):
        fed += 1
        assert fed < 100
    insp.finish()
    assert insp.app == "unknown" and insp.metadata == {} and insp.threats == []


def test_stream_bytes_are_bounded() -> None:
    insp = Inspector("tcp", 40000, 40001)
    big = b"\x00" * 10000
    for _ in range(10):
        if insp.feed(True, big):
            break
    assert sum(map(len, insp.flow.c2s)) <= STREAM_LIMIT


def test_echo_is_concluded_when_the_session_ends() -> None:
    insp = Inspector("tcp", 40000, 7)
    assert insp.feed(True, b"hello echo\n") is False
    assert insp.feed(False, b"hello echo\n") is False
    assert insp.app == "unknown"
    insp.finish()
    assert insp.app == "echo"


def _raises(flow: Flow) -> Verdict:
    raise IndexError("a detector bug")


def test_a_raising_detector_is_counted_and_dropped(monkeypatch: pytest.MonkeyPatch) -> None:
    broken = Detector(name="broken", l4=frozenset({"tcp"}), ports=frozenset(), max_packets=4, detect=_raises)
    monkeypatch.setattr(detection, "candidates", lambda l4, c, s: [broken, BY_NAME["ssh"]])
    insp = Inspector("tcp", 40000, 22)
    insp.feed(False, b"SSH-2.0-OpenSSH_9.2p1\r\n")
    insp.feed(True, b"SSH-2.0-PuTTY_Release_0.78\r\n")  # the server's words wait for the client's
    assert insp.errors == 1 and insp.app == "ssh"


def test_hostile_payloads_never_escape() -> None:
    rng = random.Random(11)
    for i in range(300):
        insp = Inspector(rng.choice(["tcp", "udp"]), rng.randrange(65536), rng.choice([80, 53, 443, 3306, 5432, 1433, 7]))
        for _ in range(rng.randrange(1, 12)):
            if insp.feed(rng.random() < 0.6, bytes(rng.randrange(256) for _ in range(rng.randrange(1, 400)))):
                break
        insp.finish()
        assert insp.errors == 0, i


# -- sqlinjection -----------------------------------------------------------------------------------


def _http_flow(request: bytes) -> Flow:
    flow = Flow("tcp", 40000, 80)
    flow.add(True, request)
    return flow


@pytest.mark.parametrize("query", [
    "id=1%27+and+1%3D1%23", "q=1%27%20OR%20%271%27%3D%271", "id=1+UNION+SELECT+username,password+FROM+users--",
    "user=admin%27--&pass=x", "id=1;+DROP+TABLE+users", "id=1%27+AND+SLEEP(5)--", "x=1';waitfor+delay+'0:0:5'--",
    "id=-1+union/**/select+1,2,3", "t=1+and+1=1+union+all+select+table_name+from+information_schema.tables",
])
def test_sqlinjection_in_query_strings(query: str) -> None:
    hits = scan(_http_flow(f"GET /item?{query} HTTP/1.1\r\nHost: x\r\n\r\n".encode()), "http")
    assert [h.where for h in hits] == ["http.query"], query
    assert len(hits[0].snippet) <= 128


@pytest.mark.parametrize("query", [
    "id=1%27", "name=O%27Brien", "q=select+a+car", "q=union+station+opening+hours", "q=it%27s+a+test",
    "sort=name;asc", "q=rock+%26+roll", "next=%2Fhome%23top", "q=1%3D1", "email=a%40b.c&remember=on",
])
def test_ordinary_query_strings_are_not_injection(query: str) -> None:
    assert not scan(_http_flow(f"GET /search?{query} HTTP/1.1\r\nHost: x\r\n\r\n".encode()), "http"), query


def test_sqlinjection_in_form_body_but_not_in_json_prose() -> None:
    body = b"user=admin%27+OR+1%3D1+--+&pass=x"
    req = (b"POST /login HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-www-form-urlencoded\r\n"
           b"Content-Length: %d\r\n\r\n" % len(body) + body)
    assert [h.where for h in scan(_http_flow(req), "http")] == ["http.body"]
    prose = b'{"comment": "it\'s #1 -- really", "color": "#fff"}'
    req = b"POST /c HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(prose) + prose
    assert not scan(_http_flow(req), "http")


def test_sqlinjection_in_a_later_request_of_the_session() -> None:
    first = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"
    second = b"GET /p?id=1%27+or+%27a%27%3D%27a HTTP/1.1\r\nHost: x\r\n\r\n"
    insp = Inspector("tcp", 40000, 80)
    insp.feed(True, first)
    insp.feed(False, b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
    insp.feed(True, second)
    insp.finish()
    assert insp.app == "http" and [t.name for t in insp.threats] == ["sqlinjection"]


def _mysql_query(sql: str) -> bytes:
    body = b"\x03" + sql.encode()
    return len(body).to_bytes(3, "little") + b"\x00" + body


def _pg_query(sql: str) -> bytes:
    body = sql.encode() + b"\x00"
    return b"Q" + (len(body) + 4).to_bytes(4, "big") + body


def _tds_batch(sql: str) -> bytes:
    # ALL_HEADERS: total length, then one transaction-descriptor header (length, type 2,
    # descriptor, outstanding request count).
    all_headers = ((22).to_bytes(4, "little") + (18).to_bytes(4, "little") + (2).to_bytes(2, "little")
                   + bytes(8) + (1).to_bytes(4, "little"))
    body = all_headers + sql.encode("utf-16-le")
    return bytes([0x01, 0x01]) + (8 + len(body)).to_bytes(2, "big") + b"\x00\x00\x01\x00" + body


INJECTED_SQL = [
    "SELECT * FROM users WHERE name = '' OR '1'='1'",
    "SELECT name FROM items WHERE id = 1 UNION SELECT NULL, @@version -- ",
    "SELECT * FROM t WHERE a = 'x'; DROP TABLE users",
    "SELECT * FROM users WHERE user = 'admin'-- ' AND pass = 'x'",
    "SELECT * FROM t WHERE id = '1' AND SLEEP(5)",
]
ORDINARY_SQL = [
    "SELECT id, name FROM users WHERE name = 'x' OR email = 'y'",
    "SELECT a FROM t1 UNION SELECT b FROM t2",
    "SELECT table_name FROM information_schema.tables WHERE table_schema = 'public'",
    "SELECT 1 -- health check",
    "SELECT pg_sleep(0.1)",
    "INSERT INTO t (a) VALUES ('it''s fine'); COMMIT",
    "SELECT * FROM t WHERE a = 1 OR 1 = 1",  # odd but typed by a person, no quote broken
]


@pytest.mark.parametrize(("app", "wire"), [("mysql", _mysql_query), ("postgresql", _pg_query), ("tds", _tds_batch)])
def test_sqlinjection_in_database_protocols(app: str, wire: object) -> None:
    for sql in INJECTED_SQL:
        flow = Flow("tcp", 40000, 1)
        flow.add(True, wire(sql))  # type: ignore[operator]
        hits = scan(flow, app)
        assert [h.where.split(".")[0] for h in hits] == [app], sql
    for sql in ORDINARY_SQL:
        flow = Flow("tcp", 40000, 1)
        flow.add(True, wire(sql))  # type: ignore[operator]
        assert not scan(flow, app), sql


def test_scanner_ignores_other_protocols() -> None:
    flow = Flow("tcp", 40000, 6379)
    flow.add(True, b"*2\r\n$3\r\nGET\r\n$13\r\n' or '1'='1\r\n")
    assert scan(flow, "redis") == []


def test_registry_is_importable_without_forbidden_modules() -> None:
    import sys

    assert REGISTRY
    for name in ("scapy", "grpc", "kubernetes", "prometheus_client", "pyroute2"):
        mod = sys.modules.get(name)
        # The test suite itself may import them; the detectors must not need them.
        assert mod is None or not any(getattr(d.detect, "__module__", "").startswith(name) for d in REGISTRY)


# -- hard negatives: protocols we do not cover must stay unknown ------------------------------------

HARD_NEGATIVES: dict[str, tuple[str, int, list[tuple[bool, bytes]]]] = {
    "smtp": ("tcp", 25, [(False, b"220 mail.example.com ESMTP Postfix\r\n"), (True, b"EHLO client\r\n"),
                         (False, b"250-mail.example.com\r\n250 PIPELINING\r\n")]),
    "imap": ("tcp", 143, [(False, b"* OK [CAPABILITY IMAP4rev1] ready\r\n"), (True, b"a1 LOGIN x y\r\n")]),
    "ftp": ("tcp", 21, [(False, b"220 (vsFTPd 3.0.3)\r\n"), (True, b"USER anonymous\r\n"),
                        (False, b"331 Please specify the password.\r\n")]),
    "vnc": ("tcp", 5900, [(False, b"RFB 003.008\n"), (True, b"RFB 003.008\n"), (False, b"\x01\x02"), (True, b"\x02")]),
    "rdp": ("tcp", 3389, [(True, b"\x03\x00\x00\x13\x0e\xe0\x00\x00\x00\x00\x00\x01\x00\x08\x00\x03\x00\x00\x00")]),
    "ldap": ("tcp", 389, [(True, b"0\x0c\x02\x01\x01`\x07\x02\x01\x03\x04\x00\x80\x00"),
                          (False, b"0\x0c\x02\x01\x01a\x07\n\x01\x00\x04\x00\x04\x00")]),
    "mqtt": ("tcp", 1883, [(True, b"\x10\x10\x00\x04MQTT\x04\x02\x00<\x00\x04abcd"), (False, b" \x02\x00\x00")]),
    "amqp": ("tcp", 5672, [(True, b"AMQP\x00\x00\t\x01")]),
    "nats": ("tcp", 4222, [(False, b'INFO {"server_id":"x","version":"2.9"}\r\n'), (True, b"CONNECT {}\r\nPING\r\n"),
                           (False, b"PONG\r\n")]),
    "rtsp": ("tcp", 554, [(True, b"OPTIONS rtsp://cam/stream RTSP/1.0\r\nCSeq: 1\r\n\r\n"),
                          (False, b"RTSP/1.0 200 OK\r\nCSeq: 1\r\n\r\n")]),
    "sip": ("udp", 5060, [(True, b"INVITE sip:bob@x SIP/2.0\r\nVia: SIP/2.0/UDP a\r\n\r\n")]),
    "stun": ("udp", 3478, [(True, b"\x00\x01\x00\x00\x21\x12\xa4\x42" + bytes(12))]),
    "syslog": ("udp", 514, [(True, b"<34>Oct 11 22:14:15 host su: 'su root' failed")]),
    "snmp": ("udp", 161, [(True, b"0&\x02\x01\x01\x04\x06public\xa0\x19\x02\x04\x124Vx\x02\x01\x00\x02\x01\x000\x0b0"
                                 b"\t\x06\x05+\x06\x01\x02\x01\x05\x00")]),
    "quic": ("udp", 443, [(True, b"\xc3\x00\x00\x00\x01\x08" + bytes(range(8)) + b"\x00" + bytes(1180))]),
    "memcached-text": ("tcp", 11211, [(True, b"get foo\r\n"), (False, b"END\r\n")]),
    "smb2": ("tcp", 445, [(True, b"\x00\x00\x00\x54\xfeSMB@\x00" + bytes(78))]),
    "xmpp": ("tcp", 5222, [(True, b"<?xml version='1.0'?><stream:stream to='x' xmlns='jabber:client'>")]),
    "telnet": ("tcp", 23, [(False, b"\xff\xfd\x18\xff\xfd \xff\xfd#\xff\xfd'"), (True, b"\xff\xfb\x18")]),
    "zero-filled-udp": ("udp", 123, [(True, b"\x1b" + bytes(47))]),
}


@pytest.mark.parametrize("name", sorted(HARD_NEGATIVES))
def test_uncovered_protocols_stay_unknown(name: str) -> None:
    l4, port, packets = HARD_NEGATIVES[name]
    insp = Inspector(l4, 40000, port)
    for from_client, payload in packets:
        if insp.feed(from_client, payload):
            break
    insp.finish()
    assert insp.app == "unknown", name


def test_minimal_sntp_request_counts_once_answered() -> None:
    request = b"\x1b" + bytes(47)  # the classic minimal SNTP query: zero transmit timestamp
    answer = b"\x1c\x02\x03\xe8" + bytes(8) + b"\x0a\x00\x00\x01" + b"\xe9\x00\x00\x00\x00\x00\x00\x00" + bytes(8) \
        + b"\xe9\x00\x00\x01\x00\x00\x00\x00" + b"\xe9\x00\x00\x01\x00\x00\x10\x00"
    insp = Inspector("udp", 40000, 123)
    assert insp.feed(True, request) is False
    insp.feed(False, answer)
    insp.finish()
    assert insp.app == "ntp"
