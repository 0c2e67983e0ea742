"""The demo shop's programs, as its pods on a real cluster run them (one role each).

Standalone (standard library, and grpcio where gRPC is spoken): the cluster mounts this file
into the shop's image from a ConfigMap, and the "internet" of the test bed runs ``payments``.
Every call is real and by name through the cluster's DNS:

* ``api``: with ``--serve``, serves HTTP on 8080 (``/healthz`` for the kubelet's probe) and gRPC
  on 9090; in each round stores an order in Redis, reads it back from PostgreSQL, and charges it
  at ``payments.example.com`` over TLS checked against that name;
* ``web``: calls the api's Service over HTTP and gRPC, and counts visits in Redis;
* ``worker``: calls the api's Service over HTTP;
* ``postgres``, ``redis``: the servers (PostgreSQL initialised on first start, as its user);
* ``payments``: the TLS server outside the cluster; ``http --port N``: an HTTP server alone.

The simulated cluster (flowmap_devenv.simcluster, simtraffic) runs the same servers and calls.

A client does ``--rounds`` rounds (0: forever; -1: none, a test runs them with ``kubectl exec``),
prints ``done ROUNDS FAILURES`` and keeps its servers running, so a test can wait for the traffic
to end and then compare counters. ``connect HOST PORT`` tries one TCP connection and prints what
happened (``connected``, ``refused``, ``timeout``) and how long it took.
"""

from __future__ import annotations

import argparse
import http.server
import os
import pwd
import socket
import socketserver
import ssl
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable

API = "api.shop.svc.cluster.local"
REDIS = ("redis.shop.svc.cluster.local", 6379)
POSTGRES = "postgres.shop.svc.cluster.local"
PAYMENTS = "payments.example.com"
PAYMENTS_CA = "/etc/shop/payments-ca.crt"
HTTP_PORT, GRPC_PORT = 8080, 9090
BODY = b'{"items": ["espresso", "filter", "cold brew"]}'


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:  # noqa: N802 - the standard library's name
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(BODY)))
        self.end_headers()
        self.wfile.write(BODY)

    def log_message(self, *args: object) -> None:
        pass


class Server(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def server_bind(self) -> None:  # no reverse DNS lookup of our own address
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = "shop", self.server_address[1]


def serve_http(port: int = HTTP_PORT, host: str = "0.0.0.0") -> Server:
    server = Server((host, port), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def serve_grpc(port: int = GRPC_PORT, host: str = "0.0.0.0") -> object:
    import grpc
    from concurrent import futures

    server = grpc.server(futures.ThreadPoolExecutor(4))
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
        "shop.Catalog", {"List": grpc.unary_unary_rpc_method_handler(lambda request, context: BODY)}),))
    server.add_insecure_port(f"{host}:{port}")
    server.start()
    return server


def redis(address: tuple[str, int], *commands: list[str]) -> None:
    """Send RESP commands over one connection and read one reply each."""
    with socket.create_connection(address, timeout=5) as s:
        reader = s.makefile("rb")
        for cmd in commands:
            s.sendall(b"".join([f"*{len(cmd)}\r\n".encode()] +
                               [f"${len(a.encode())}\r\n{a}\r\n".encode() for a in cmd]))
            line = reader.readline()
            if line.startswith(b"$") and line[1:].strip() != b"-1":
                reader.readline()


def http_get(url: str) -> None:
    with urllib.request.urlopen(url, timeout=5) as r:
        r.read()


def grpc_call(target: str) -> None:
    import grpc

    with grpc.insecure_channel(target) as channel:
        channel.unary_unary("/shop.Catalog/List")(b"", timeout=5)


def payments(ca: str = PAYMENTS_CA) -> None:
    """Resolve the external service by name, then a TLS request checked against that name."""
    context = ssl.create_default_context(cafile=ca)
    with socket.create_connection((PAYMENTS, 443), timeout=5) as raw, \
            context.wrap_socket(raw, server_hostname=PAYMENTS) as tls:
        tls.sendall(f"GET /charge HTTP/1.1\r\nHost: {PAYMENTS}\r\nConnection: close\r\n\r\n".encode())
        while tls.recv(4096):
            pass


def web(n: int) -> None:
    http_get(f"http://{API}/")
    grpc_call(f"{API}:{GRPC_PORT}")
    redis(REDIS, ["INCR", "visits"])


def api(n: int) -> None:
    redis(REDIS, ["SET", f"order:{n}", "paid"], ["GET", f"order:{n}"])
    done = subprocess.run(["psql", "-h", POSTGRES, "-U", "shop", "-d", "postgres", "-XAtqc", f"SELECT {n} AS order_id"],
                          capture_output=True, text=True, timeout=10)
    if done.returncode:
        raise OSError(f"psql: {done.stderr.strip()}")
    payments()


def worker(n: int) -> None:
    http_get(f"http://{API}/orders/{n}")


CLIENTS: dict[str, Callable[[int], None]] = {"web": web, "api": api, "worker": worker}


def rounds(role: str, count: int, pause: float) -> None:
    if count < 0:
        return
    n = failures = 0
    while not count or n < count:
        n += 1
        try:
            CLIENTS[role](n)
        except Exception as exc:  # noqa: BLE001 - a failed call is counted and reported, the loop goes on
            failures += 1
            print(f"{role} round {n}: {exc}", file=sys.stderr, flush=True)
        time.sleep(pause)
    print(f"done {n} {failures}", flush=True)


def connect(host: str, port: int) -> tuple[str, float]:
    started = time.monotonic()
    try:
        with socket.create_connection((host, port), timeout=3):
            outcome = "connected"
    except ConnectionRefusedError:
        outcome = "refused"
    except (socket.timeout, TimeoutError):
        outcome = "timeout"
    return outcome, round(time.monotonic() - started, 3)


def postgres(data: str) -> None:
    """initdb on first start, then the server, as the postgres user (it refuses root)."""
    bin_dir = next(p for p in sorted(os.listdir("/usr/lib/postgresql"), reverse=True))
    tools = f"/usr/lib/postgresql/{bin_dir}/bin"
    user = pwd.getpwnam("postgres")
    os.makedirs(data, exist_ok=True)
    os.chown(data, user.pw_uid, user.pw_gid)
    os.setgid(user.pw_gid)
    os.setuid(user.pw_uid)
    if not os.path.exists(os.path.join(data, "PG_VERSION")):
        subprocess.run([f"{tools}/initdb", "-D", data, "-U", "shop", "--auth=trust", "--no-sync"], check=True,
                       stdout=subprocess.DEVNULL)
        with open(os.path.join(data, "pg_hba.conf"), "a") as hba:
            hba.write("host all shop 0.0.0.0/0 trust\n")
    os.execv(f"{tools}/postgres", [f"{tools}/postgres", "-D", data, "-c", "listen_addresses=*",
                                   "-c", f"unix_socket_directories={data}", "-c", "fsync=off"])


def serve_payments(cert: str, key: str) -> None:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(cert, key)
    srv = socket.create_server(("0.0.0.0", 443))

    def one(conn: socket.socket) -> None:
        try:
            with ctx.wrap_socket(conn, server_side=True) as tls:
                tls.recv(4096)
                tls.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\nConnection: close\r\n\r\ncharged\r\n")
        except (OSError, ssl.SSLError):
            pass

    while True:
        conn, _ = srv.accept()
        threading.Thread(target=one, args=(conn,), daemon=True).start()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("role", choices=[*CLIENTS, "postgres", "redis", "payments", "http", "connect"])
    p.add_argument("target", nargs="*", help="connect: HOST PORT")
    p.add_argument("--rounds", type=int, default=0, help="client rounds, 0: until stopped")
    p.add_argument("--pause", type=float, default=1.0, help="seconds between rounds")
    p.add_argument("--serve", action="store_true", help="api: serve HTTP and gRPC too")
    p.add_argument("--stay", action="store_true", help="keep running after the rounds (a pod's main process)")
    p.add_argument("--data", default="/var/lib/shop-pg", help="postgres: its data folder")
    p.add_argument("--port", type=int, default=HTTP_PORT, help="http: its port")
    p.add_argument("--cert", help="payments: certificate")
    p.add_argument("--key", help="payments: key")
    args = p.parse_args()
    if args.role == "postgres":
        postgres(args.data)
    elif args.role == "redis":
        os.execvp("redis-server", ["redis-server", "--bind", "0.0.0.0", "--protected-mode", "no", "--save", "",
                                   "--appendonly", "no"])
    elif args.role == "payments":
        serve_payments(args.cert, args.key)
    elif args.role == "http":
        serve_http(args.port)
        while True:
            time.sleep(3600)
    elif args.role == "connect":
        print(*connect(args.target[0], int(args.target[1])))
    else:
        servers = [serve_http(), serve_grpc()] if args.serve else []  # a gRPC server stops when collected
        rounds(args.role, args.rounds, args.pause)
        while args.stay:  # a pod's main process: its servers go on, and a finished client does not restart
            time.sleep(3600)
    return 0


if __name__ == "__main__":
    sys.exit(main())
