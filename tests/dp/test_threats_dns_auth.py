"""dns-tunnel, dns-zone-transfer, auth-brute-force and MongoDB operator injection on crafted bytes:
hits, the near misses next to them, and truncated or garbage input (never raising)."""

from __future__ import annotations

import hashlib
import random
import struct
from typing import Any

import pytest

from flowmap_dp.classify import classify_file
from flowmap_dp.detectors import mongodb, mysql, postgresql, redis, sqlinjection
from flowmap_dp.detectors.base import Flow
from flowmap_dp.session import SessionDelta
from flowmap_dp.threats import Config, Watching, bruteforce, dnstunnel, zonetransfer

from tests.dp.test_own_captures import OWN

TUNNEL = dnstunnel.LIMITS


# -- DNS messages -------------------------------------------------------------------------------

def _name(name: str) -> bytes:
    return b"".join(bytes([len(p)]) + p.encode() for p in name.split(".") if p) + b"\0"


def _query(name: str, qtype: int = 1, ident: int = 7, extra: bytes = b"") -> bytes:
    return struct.pack(">HHHHHH", ident, 0x0100, 1, 0, 0, 0) + _name(name) + struct.pack(">HH", qtype, 1) + extra


def _answer(name: str, qtype: int, rtype: int, rdata: bytes, ident: int = 7) -> bytes:
    head = struct.pack(">HHHHHH", ident, 0x8180, 1, 1, 0, 0) + _name(name) + struct.pack(">HH", qtype, 1)
    return head + b"\xc0\x0c" + struct.pack(">HHIH", rtype, 1, 300, len(rdata)) + rdata


def _txt(*strings: bytes) -> bytes:
    return b"".join(bytes([len(s)]) + s for s in strings)


def _dns(query: bytes, answer: bytes | None = None, l4: str = "udp") -> Flow:
    f = Flow(l4, 40000, 53)
    if l4 == "tcp":
        query = struct.pack(">H", len(query)) + query
        answer = answer and struct.pack(">H", len(answer)) + answer
    f.add(True, query)
    if answer:
        f.add(False, answer)
    return f


def _tunnel(flow: Flow) -> list[str]:
    return [t.where for t in dnstunnel.scan(flow, "dns", {}, TUNNEL)]


HEX = hashlib.sha256(b"x").hexdigest()  # 64 random-looking hex digits
B32 = "mfrggzdfmztwq2lknnwg23tpobyxe43uov3ho6dzpiydcmrtgq2tmnzyhe"


@pytest.mark.parametrize("name, where", [
    (f"{HEX[:40]}.t.example.com", "dns.label"),
    (f"{B32[:34]}.t.example.com", "dns.label"),
    (".".join([HEX[:50]] * 3) + ".t.example.com", "dns.label"),
    (".".join(["abcd-efgh-ijkl"] * 14) + ".example.com", "dns.name"),  # 14 x 15 characters: 221
])
def test_tunnel_names_fire(name: str, where: str) -> None:
    assert _tunnel(_dns(_query(name))) == [where]


@pytest.mark.parametrize("name", [
    "api.flowmap.test.kube-system.svc.cluster.local",
    "very-long-external-service-name.partner-api.example.com.my-namespace.svc.cluster.local",
    "kube-state-metrics-shard-0-headless-service-for-monitoring.monitoring.svc.cluster.local",
    "prometheus-kube-prometheus-stack-alertmanager-operated.monitoring.svc.cluster.local",
    "internal-my-loadbalancer-1234567890.us-west-2.elb.amazonaws.com",
    "r3---sn-aigl6nek.googlevideo.com", "e12345.dscb.akamaiedge.net", "selector1._domainkey.example.com",
    f"{HEX[:31]}.t.example.com",  # one character short
])
def test_ordinary_names_do_not(name: str) -> None:
    assert _tunnel(_dns(_query(name), _answer(name, 1, 1, b"\x0a\x00\x00\x01"))) == []


def test_what_the_label_rule_cannot_tell() -> None:
    # Letter frequencies, not words: 32+ letters of words run together measure like base32 (the
    # docstring says so). Hyphens keep such names apart.
    assert _tunnel(_dns(_query("thisisaverylongconcatenatedwordlabel.example.com"))) == ["dns.label"]
    assert _tunnel(_dns(_query("this-is-a-very-long-hyphenated-word-label.example.com"))) == []


def test_txt_and_null_answers() -> None:
    blob = _txt(B32.encode() * 3, B32.encode() * 2)
    assert _tunnel(_dns(_query("a.t.example.com", 16), _answer("a.t.example.com", 16, 16, blob))) == ["dns.answer"]
    assert _tunnel(_dns(_query("a.t.example.com", 10), _answer("a.t.example.com", 10, 10, bytes(220)))) == ["dns.answer"]
    assert _tunnel(_dns(_query("a.t.example.com", 10), _answer("a.t.example.com", 10, 10, bytes(150)))) == []
    dkim = _txt(b"v=DKIM1; k=rsa; p=MIIBIjANBgkqhkiG9w0BAQEFAAOCAQ8AMIIBCgKCAQEA" + b"q7Xn2Ybt" * 24, b"Hj5Lm0Pq" * 20)
    spf = _txt(b"v=spf1 " + b"include:_spf.example.com " * 9 + b"-all")
    verification = _txt(b"google-site-verification=" + (B32.encode() * 4)[:200])
    for rdata in (dkim, spf, verification):
        assert len(rdata) >= 200
        assert _tunnel(_dns(_query("example.com", 16), _answer("example.com", 16, 16, rdata), "tcp")) == []


def test_large_client_datagrams() -> None:
    opt = b"\0" + struct.pack(">HHIH", 41, 1232, 0, 604) + struct.pack(">HH", 65001, 600) + bytes(600)
    big = struct.pack(">HHHHHH", 7, 0x0100, 1, 0, 0, 1) + _name("a.example.com") + struct.pack(">HH", 1, 1) + opt
    assert _tunnel(_dns(big)) == ["dns.query"]
    assert _tunnel(_dns(big, l4="tcp")) == []  # over TCP, a big message is ordinary
    assert _tunnel(_dns(_query("a.example.com"))) == []


def test_limits_move_the_thresholds() -> None:
    name = f"{HEX[:40]}.t.example.com"
    assert dnstunnel.scan(_dns(_query(name)), "dns", {}, {**TUNNEL, "label_length": 41}) == []


def test_zone_transfers() -> None:
    def meta(qtype: str) -> dict[str, Any]:
        return {"dns": {"questions": [{"name": "example.com", "type": qtype}]}}

    flow = _dns(_query("example.com", 252), l4="tcp")
    assert [t.snippet for t in zonetransfer.scan(flow, "dns", meta("AXFR"), {})] == ["AXFR example.com"]
    assert zonetransfer.scan(flow, "dns", meta("IXFR"), {})
    for benign in ("SOA", "NS", "ANY", "251x"):
        assert not zonetransfer.scan(flow, "dns", meta(benign), {})
    assert not zonetransfer.scan(flow, "dns", {}, {}) and not zonetransfer.scan(flow, "dns", {"dns": {}}, {})


def test_the_dns_detector_names_transfer_types() -> None:
    from flowmap_dp.detectors import dns

    msg = dns.parse(_query("example.com", 252))
    assert msg is not None and msg["questions"] == [{"name": "example.com", "type": "AXFR"}]


# -- the unique-names watch -----------------------------------------------------------------------

def _delta(client: bytes, t: float, app: str, meta: dict[str, Any], server_port: int = 53) -> SessionDelta:
    return SessionDelta("udp", 17, 0, client, 40000, b"\x0a\0\0\x01", server_port, t, t, True, True, True, "",
                        "closed", app, True, 1, 1, 60, 100, meta)


def _names(watch: dnstunnel.UniqueNames, client: bytes, names: list[str], t0: float, step: float) -> list[int]:
    fired = []
    for i, name in enumerate(names):
        meta = {"dns": {"questions": [{"name": name, "type": "A"}]}}
        if watch.observe(_delta(client, t0 + i * step, "dns", meta), 0.0):
            fired.append(i)
    return fired


def test_many_names_under_one_domain_fire_once_per_episode() -> None:
    w = dnstunnel.UniqueNames(dnstunnel.WATCH_LIMITS)
    names = [f"{i:08x}.w.example.com" for i in range(400)]
    assert _names(w, b"\x0a\0\0\x02", names[:200], 0.0, 0.1) == [149]
    assert _names(w, b"\x0a\0\0\x03", names[:149], 0.0, 0.1) == []  # another client, one short
    # The same names again and again are one name each.
    assert _names(w, b"\x0a\0\0\x04", [names[i % 20] for i in range(500)], 0.0, 0.01) == []
    # Calm for a window, then a new episode fires again.
    assert _names(w, b"\x0a\0\0\x02", names[200:], 100.0, 0.1) == [149]
    # Spread out: 150 names over 10 minutes never hold 150 in one window.
    assert _names(dnstunnel.UniqueNames(dnstunnel.WATCH_LIMITS), b"\x0a\0\0\x05", names[:300], 0.0, 2.0) == []


def test_kubernetes_search_path_is_not_counted() -> None:
    w = dnstunnel.UniqueNames(dnstunnel.WATCH_LIMITS)
    names = [f"host{i}.example.org.{s}" for i in range(200)
             for s in ("default.svc.cluster.local", "svc.cluster.local", "cluster.local")]
    assert _names(w, b"\x0a\0\0\x02", names, 0.0, 0.01) == []


def test_registered_domain() -> None:
    assert dnstunnel.registered_domain("a.b.example.com") == "example.com"
    assert dnstunnel.registered_domain("x.example.co.uk.") == "example.co.uk"
    assert dnstunnel.registered_domain("localhost") == "localhost"


def test_the_watch_skips_what_is_not_its_own() -> None:
    w = dnstunnel.UniqueNames(dnstunnel.WATCH_LIMITS)
    for meta in (None, {}, {"dns": {}}, {"dns": {"questions": [{}]}}, {"http": {"host": "a"}}):
        assert w.observe(_delta(b"\x0a\0\0\x02", 1.0, "dns", meta), 0.0) == []  # type: ignore[arg-type]
    assert w.observe(_delta(b"\x0a\0\0\x02", 1.0, "http", {"dns": {"questions": []}}), 0.0) == []


# -- refused logins -------------------------------------------------------------------------------

def _my_err(code: int, seq: int = 2) -> bytes:
    body = b"\xff" + struct.pack("<H", code) + b"#28000Access denied for user 'app'@'10.0.0.2'"
    return struct.pack("<I", len(body))[:3] + bytes([seq]) + body


def _pg_error(code: bytes) -> bytes:
    body = b"SFATAL\0VFATAL\0C" + code + b"\0Mpassword authentication failed for user \"postgres\"\0\0"
    return b"E" + struct.pack(">I", len(body) + 4) + body


def test_mysql_refusals() -> None:
    ok = struct.pack("<I", 7)[:3] + b"\x02" + b"\x00\x00\x00\x02\x00\x00\x00"
    assert mysql.auth_failures(_my_err(1045)) == 1 and mysql.auth_failures(_my_err(1044)) == 1
    assert mysql.auth_failures(_my_err(1045) + _my_err(1045, 4)) == 2
    assert mysql.auth_failures(_my_err(1064)) == 0 and mysql.auth_failures(ok) == 0  # a syntax error, an OK
    assert mysql.auth_failures(_my_err(1045)[:6]) == 0


def test_postgresql_refusals() -> None:
    auth = b"R" + struct.pack(">II", 12, 5) + b"salt"  # AuthenticationMD5Password
    assert postgresql.auth_failures(b"", auth + _pg_error(b"28P01")) == 1
    assert postgresql.auth_failures(b"", _pg_error(b"28000")) == 1
    assert postgresql.auth_failures(b"", _pg_error(b"42P01")) == 0  # undefined table
    ssl = struct.pack(">II", 8, 80877103)
    assert postgresql.auth_failures(ssl, b"N" + _pg_error(b"28P01")) == 1
    assert postgresql.auth_failures(ssl, b"S" + _pg_error(b"28P01")) == 0  # TLS from here on
    assert postgresql.auth_failures(b"", _pg_error(b"28P01")[:9]) == 0


def test_redis_refusals() -> None:
    wrongpass = b"-WRONGPASS invalid username-password pair or user is disabled.\r\n"
    assert redis.auth_failures(wrongpass + b"-NOAUTH Authentication required.\r\n") == 1
    assert redis.auth_failures(b"-ERR invalid password\r\n") == 1
    assert redis.auth_failures(b"-NOAUTH Authentication required.\r\n" * 3) == 1
    assert redis.auth_failures(b"+OK\r\n+PONG\r\n") == 0


def _login(client: bytes, t: float, app: str = "mysql", failed: int = 1) -> SessionDelta:
    d = _delta(client, t, app, {app: {"auth_failures": failed} if failed else {}}, 3306)
    d.l4 = "tcp"
    return d


def test_the_rate_fires_once_per_episode() -> None:
    w = bruteforce.Failures(bruteforce.LIMITS)
    c = b"\x0a\0\0\x02"
    fired = [i for i in range(30) if w.observe(_login(c, i * 0.5), 0.0)]
    assert fired == [9]
    # A pause of a window calms it; the next burst fires again, on its tenth.
    fired = [i for i in range(12) if w.observe(_login(c, 100 + i), 0.0)]
    assert fired == [9]


def test_slow_or_scattered_failures_do_not_fire() -> None:
    w = bruteforce.Failures(bruteforce.LIMITS)
    assert not [i for i in range(40) if w.observe(_login(b"\x0a\0\0\x02", i * 10.0), 0.0)]  # one per 10 s
    assert not [i for i in range(40) if w.observe(_login(bytes([10, 0, 0, i]), 1.0), 0.0)]  # 40 clients, one each
    assert not [i for i in range(40) if w.observe(_login(b"\x0a\0\0\x03", 1.0, failed=0), 0.0)]  # logins that worked
    assert not w.observe(_login(b"\x0a\0\0\x03", 1.0, "http"), 0.0)
    # One mistyped password, then success: nothing.
    w2 = bruteforce.Failures(bruteforce.LIMITS)
    assert not w2.observe(_login(b"\x0a\0\0\x04", 1.0), 0.0) and not w2.observe(_login(b"\x0a\0\0\x04", 2.0, failed=0), 0.0)


def test_one_session_with_many_refusals_tips_it() -> None:
    w = bruteforce.Failures(bruteforce.LIMITS)
    hit = w.observe(_login(b"\x0a\0\0\x02", 1.0, "redis", failed=12), 0.0)
    assert [t.where for t in hit] == ["redis.auth"]


def test_the_limits_reach_the_watch() -> None:
    w = Watching(Config.parse([], ["auth-brute-force.failures=2", "dns-tunnel.unique_names=3"]))
    sessions = [_login(b"\x0a\0\0\x02", 1.0), _login(b"\x0a\0\0\x02", 2.0)]
    w.observe(0.0, sessions)
    assert [t.name for s in sessions for t in s.threats] == ["auth-brute-force"]


# -- MongoDB operator injection -------------------------------------------------------------------

def _bson(doc: dict[str, Any]) -> bytes:
    out = b""
    for k, v in doc.items():
        key = k.encode() + b"\0"
        if v is None:
            out += b"\x0a" + key
        elif isinstance(v, bool):
            out += b"\x08" + key + bytes([v])
        elif isinstance(v, int):
            out += b"\x10" + key + struct.pack("<i", v)
        elif isinstance(v, str):
            out += b"\x02" + key + struct.pack("<i", len(v.encode()) + 1) + v.encode() + b"\0"
        elif isinstance(v, list):
            out += b"\x04" + key + _bson({str(i): x for i, x in enumerate(v)})
        elif isinstance(v, tuple):  # ("regex", pattern) or ("code", js)
            kind, text = v
            if kind == "regex":
                out += b"\x0b" + key + text.encode() + b"\0" + b"\0"
            else:
                out += b"\x0d" + key + struct.pack("<i", len(text) + 1) + text.encode() + b"\0"
        else:
            out += b"\x03" + key + _bson(v)
    return struct.pack("<i", len(out) + 5) + out + b"\0"


def _op_msg(doc: dict[str, Any], seq: tuple[str, list[dict[str, Any]]] | None = None) -> bytes:
    body = b"\0\0\0\0" + b"\0" + _bson(doc)
    if seq:
        docs = b"".join(_bson(d) for d in seq[1])
        ident = seq[0].encode() + b"\0"
        body += b"\x01" + struct.pack("<i", 4 + len(ident) + len(docs)) + ident + docs
    return struct.pack("<iiii", 16 + len(body), 1, 0, 2013) + body


def _op_query(coll: str, doc: dict[str, Any]) -> bytes:
    body = b"\0\0\0\0" + coll.encode() + b"\0" + struct.pack("<ii", 0, 1) + _bson(doc)
    return struct.pack("<iiii", 16 + len(body), 1, 0, 2004) + body


def _mongo(*messages: bytes) -> list[str]:
    f = Flow("tcp", 40000, 27017)
    for m in messages:
        f.add(True, m)
    return [t.snippet for t in sqlinjection.scan(f, "mongodb")]


def _find(flt: dict[str, Any]) -> bytes:
    return _op_msg({"find": "users", "filter": flt, "$db": "shop"})


@pytest.mark.parametrize("message", [
    _find({"user": "admin", "password": {"$ne": None}}),
    _find({"username": {"$gt": ""}, "password": {"$gt": ""}}),
    _find({"user": "admin", "password": {"$regex": ".*"}}),
    _find({"user": "admin", "passwd": ("regex", "^a")}),
    _find({"$where": ("code", "this.password.match(/.*/)")}),
    _find({"$or": [{"user": "x"}, {"$where": "sleep(5000) || true"}]}),
    _find({"auth.token": {"$nin": ["x"]}}),
    _op_msg({"count": "users", "query": {"pwd": {"$exists": True, "$ne": "x"}}, "$db": "shop"}),
    _op_msg({"aggregate": "users", "pipeline": [{"$match": {"secret": {"$ne": None}}}], "$db": "shop"}),
    _op_msg({"delete": "users", "$db": "shop"}, ("deletes", [{"q": {"password": {"$ne": 1}}, "limit": 0}])),
    _op_msg({"update": "users", "updates": [{"q": {"password": {"$gt": ""}}, "u": {"$set": {"a": 1}}}]}),
    _op_query("shop.users", {"$query": {"user": "admin", "password": {"$ne": None}}}),
    _op_query("shop.$cmd", {"findAndModify": "users", "query": {"password": {"$ne": None}}}),
])
def test_operator_injection_fires(message: bytes) -> None:
    hello = _op_msg({"hello": 1, "$db": "admin"})
    assert len(_mongo(hello, message)) == 1


@pytest.mark.parametrize("message", [
    _find({"age": {"$gt": 30}}),
    _find({"deletedAt": {"$ne": None}, "user": {"$in": ["admin", "bob"]}}),
    _find({"user": "admin", "password": "s3cret"}),
    _find({"user": "admin", "password": {"$eq": "s3cret"}}),
    _find({"password": {"$exists": False}}),
    _find({"name": {"$regex": ".*", "$options": "i"}}),
    _op_msg({"insert": "users", "$db": "shop"}, ("documents", [{"user": "a", "password": {"$ne": None}}])),
    _op_msg({"saslStart": 1, "payload": "n,,n=user,r=abc", "$db": "admin"}),
    _op_query("admin.$cmd", {"isMaster": 1}),
])
def test_ordinary_queries_do_not(message: bytes) -> None:
    assert _mongo(message) == []


def test_the_bson_reader_is_bounded() -> None:
    deep: dict[str, Any] = {"a": 1}
    for _ in range(12):
        deep = {"d": deep}
    assert mongodb.document(_bson(deep)) is None
    wide = _bson({str(i): i for i in range(300)})
    assert mongodb.document(wide) is None
    doc = _bson({"a": "x" * 5000})
    assert len(mongodb.document(doc)["a"]) == 1024  # type: ignore[index]


def test_garbage_never_raises() -> None:
    rnd = random.Random(17)
    samples = [_find({"user": "admin", "password": {"$ne": None}}), _query(f"{HEX[:40]}.t.example.com", 16),
               _answer("a.example.com", 16, 16, _txt(b"x" * 250)), _my_err(1045), _pg_error(b"28P01")]
    for sample in samples:
        for _ in range(300):
            cut = sample[: rnd.randrange(len(sample) + 1)]
            noisy = bytes(b ^ (rnd.randrange(256) if rnd.random() < 0.05 else 0) for b in sample)
            for data in (cut, noisy, bytes(rnd.randrange(256) for _ in range(rnd.randrange(64)))):
                mongodb.documents(data)
                mongodb.document(data)
                _mongo(data)
                for l4 in ("udp", "tcp"):
                    f = _dns(data, data, l4)
                    dnstunnel.scan(f, "dns", {}, TUNNEL)
                mysql.auth_failures(data)
                postgresql.auth_failures(data[:8], data)
                redis.auth_failures(data)


def test_offline_and_live_reports_agree_on_the_watches() -> None:
    """Offline, a capture is one report at the end (now=0.0); live, a report a second. The
    watches read the sessions' own times, so both mark the same sessions."""
    path = OWN / "dns-tunnel" / "dnspython-many-names.pcap"
    offline = [i for i, f in enumerate(classify_file(path)) if f["threats"]]
    from flowmap_dp.classify import classify_table

    table = classify_table(path)
    report = table.collect(0.0)
    watching = Watching()
    by_second: dict[int, list[SessionDelta]] = {}
    for s in report.sessions:
        by_second.setdefault(int(s.last_seen), []).append(s)
    for second in sorted(by_second):
        watching.observe(float(second + 1), by_second[second])
    live = [i for i, s in enumerate(report.sessions) if s.threats]
    assert offline == live == [dnstunnel.WATCH_LIMITS["unique_names"] - 1]
