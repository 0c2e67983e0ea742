"""The simulated cluster's clients: what each pod of the demo shop calls, in rounds.

Run inside a pod's network namespace (``ip netns exec``); standard library only, so that what is
measured is the protocols themselves. Every call is real: DNS through the resolver of the pod
(its resolv.conf names the cluster DNS pod), HTTP through the ClusterIP Service, Redis over
IPv6, gRPC, PostgreSQL with psql, TLS to a server on the "internet" checked against its name.

    python -m flowmap_devenv.simtraffic web|api|worker|sites|probe --rounds N --pause SECONDS --ca FILE

``probe`` runs in the api pod's node, as the kubelet's readiness probe does. ``sites`` calls a
new external site each round (site-N.example.net, N = round - 1) and prints
when each call began (``N unix-time``): each is an edge never seen before. ``lookups`` (in the
web pod) asks the cluster DNS for a new SRV-style name each round (``_svcN.example.com``, with
the underscore DNS-SD and meshes use) and calls the api.
"""

from __future__ import annotations

import argparse
import random
import socket
import struct
import subprocess
import sys
import time
import urllib.request

import grpc

from flowmap_devenv.shop import payments, redis  # the real cluster's shop makes the same calls

API_URL = "http://api.shop.svc.cluster.local/"  # the ClusterIP Service, by name
REDIS_V4 = ("10.244.2.30", 6379)
REDIS_V6 = ("fd00:10:244:2::30", 6379)
GRPC_TARGET = "10.244.2.20:9090"
POSTGRES = "10.244.1.40"


def web(n: int, ca: str) -> None:
    with urllib.request.urlopen(API_URL, timeout=5) as r:
        r.read()
    with grpc.insecure_channel(GRPC_TARGET) as channel:
        channel.unary_unary("/shop.Catalog/List")(b"", timeout=5)
    redis(REDIS_V6, ["INCR", "visits"])


def api(n: int, ca: str) -> None:
    redis(REDIS_V4, ["SET", f"order:{n}", "paid"], ["GET", f"order:{n}"])
    done = subprocess.run(["psql", "-h", POSTGRES, "-U", "shop", "-d", "postgres", "-XAtqc",
                           f"SELECT {n} AS order_id"], capture_output=True, text=True, timeout=10)
    if done.returncode:
        raise OSError(f"psql: {done.stderr.strip()}")
    payments(ca)


def sites(n: int, ca: str) -> None:
    print(n - 1, time.time(), flush=True)
    with urllib.request.urlopen(f"http://site-{n - 1}.example.net/", timeout=5) as r:
        r.read()


def resolve(name: str) -> bytes:
    """An A query for ``name`` to the pod's nameserver (the resolver's own checks would refuse an
    underscore before asking); the raw answer."""
    with open("/etc/resolv.conf") as f:
        server = next(line.split()[1] for line in f if line.startswith("nameserver"))
    query = struct.pack("!HHHHHH", random.randrange(65536), 0x0100, 1, 0, 0, 0)
    query += b"".join(bytes([len(label)]) + label.encode() for label in name.split(".")) + b"\0" + struct.pack("!HH", 1, 1)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(5)
        s.sendto(query, (server, 53))
        answer = s.recv(512)
    if struct.unpack_from("!H", answer, 6)[0] < 1:
        raise OSError(f"no answer for {name}")
    return answer


def lookups(n: int, ca: str) -> None:
    resolve(f"_svc{n}.example.com")
    with urllib.request.urlopen(API_URL + f"lookups/{n}", timeout=5) as r:
        r.read()


def worker(n: int, ca: str) -> None:
    with urllib.request.urlopen(API_URL + f"orders/{n}", timeout=5) as r:
        r.read()


def probe(n: int, ca: str) -> None:
    """The kubelet's HTTP readiness probe of the api pod, from its node."""
    with urllib.request.urlopen(f"http://{GRPC_TARGET.split(':')[0]}:8080/healthz", timeout=5) as r:
        r.read()


ROLES = {"web": web, "api": api, "worker": worker, "sites": sites, "probe": probe, "lookups": lookups}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("role", choices=sorted(ROLES))
    p.add_argument("--rounds", type=int, default=0, help="0: until stopped")
    p.add_argument("--pause", type=float, default=1.0)
    p.add_argument("--ca", required=True, help="the CA file that signs the external service's certificate")
    args = p.parse_args()
    n, failures = 0, 0
    while not args.rounds or n < args.rounds:
        n += 1
        try:
            ROLES[args.role](n, args.ca)
        except (OSError, grpc.RpcError, subprocess.TimeoutExpired) as exc:
            failures += 1
            print(f"{args.role} round {n}: {exc}", file=sys.stderr, flush=True)
        time.sleep(args.pause)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
