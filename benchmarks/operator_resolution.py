"""Address → group with many CIDR Groups, and the memory of many DNS names: prints numbers, asserts nothing.

1. **Lookups.** --cidrs distinct networks (nested /8s to /32s, a tenth IPv6) in Groups of 64 (the
   schema's most). The reference, measured in the same run, is the scan the operator did before
   (every CIDR of every Group, longest prefix wins) on --scan-sample addresses; then the table
   (flowmap_operator.prefixes): its build, and lookups per second of --lookups random addresses
   through ``Resolver.resolve``, with the ratio to the scan.
2. **A batch.** One --edges-edge batch of a pod calling random outside addresses through
   ``Topology.ingest``, the table built in it (the first batch after a Group changed).
3. **Names.** --names DNS answers, all distinct, through ``Resolver.learn_name``, each in a fresh
   process: the process's RSS before and after with the table bounded at --max-names and with no bound
   (what the operator did before: it never forgot a name).

    .venv/bin/python benchmarks/operator_resolution.py [--cidrs 100000] [--lookups 100000]
        [--scan-sample 20] [--edges 3000] [--names 300000] [--max-names 100000]
"""

from __future__ import annotations

import argparse
import gc
import ipaddress
import random
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from flowmap_api import report_pb2 as pb  # noqa: E402
from flowmap_operator.resolution import Resolver  # noqa: E402
from flowmap_operator.topology import Topology  # noqa: E402
from tests.operator.test_bounds import linear, networks  # noqa: E402

POD = "10.244.1.10"


def cluster(groups: dict[str, list[str]], now: float) -> Resolver:
    r = Resolver(max_cidr_groups=len(groups) + 1)
    r.node_seen({"metadata": {"name": "node-a"}, "spec": {"podCIDRs": ["10.244.1.0/24"]},
                 "status": {"addresses": [{"type": "InternalIP", "address": "172.18.0.2"}]}})
    r.pod_seen({"metadata": {"namespace": "flowmap-system", "name": "agent-a",
                             "labels": {"app.kubernetes.io/name": "flowmap-agent"}},
                "spec": {"nodeName": "node-a", "hostNetwork": True},
                "status": {"phase": "Running", "podIP": "172.18.0.2"}}, now)
    r.pod_seen({"metadata": {"namespace": "shop", "name": "web-0"}, "spec": {"nodeName": "node-a"},
                "status": {"phase": "Running", "podIP": POD}}, now)
    for name, cidrs in groups.items():
        r.cidr_group_seen({"metadata": {"name": name}, "spec": {"cidrs": cidrs}})
    return r


def addresses(count: int, rng: random.Random) -> list[str]:
    return [str(ipaddress.IPv4Address(rng.randrange(2**32))) if rng.random() < 0.9 else
            str(ipaddress.IPv6Address((0x20010db8 << 96) | rng.randrange(2**96))) for _ in range(count)]


def lookups(args: argparse.Namespace) -> None:
    rng, now = random.Random(7), time.time()
    nets = networks(args.cidrs, rng)
    groups = {f"ranges-{g}": nets[i:i + 64] for g, i in enumerate(range(0, len(nets), 64))}
    r = cluster(groups, now)
    print(f"{len(nets):,} CIDRs in {len(groups):,} Groups")

    parsed = {name: [ipaddress.ip_network(c) for c in cidrs] for name, cidrs in groups.items()}
    sample = addresses(args.scan_sample, rng)
    started = time.perf_counter()
    expected = [linear(parsed, ip) or "external" for ip in sample]
    scan_rate = len(sample) / (time.perf_counter() - started)
    print(f"reference, the scan of every CIDR: {scan_rate:,.1f} lookups/s ({len(sample)} addresses)")

    started = time.perf_counter()
    r.resolve(sample[0], now, now)  # builds the table
    print(f"table built in {time.perf_counter() - started:.3f} s")
    assert [r.resolve(ip, now, now).group for ip in sample] == expected, "the table and the scan disagree"
    probes = addresses(args.lookups, rng)
    started = time.perf_counter()
    for ip in probes:
        r.resolve(ip, now, now)
    rate = len(probes) / (time.perf_counter() - started)
    print(f"table: {rate:,.0f} lookups/s ({len(probes):,} addresses through Resolver.resolve), "
          f"{rate / scan_rate:,.0f} × the scan")

    r.cidr_group_seen({"metadata": {"name": "one-more"}, "spec": {"cidrs": ["192.0.2.0/24"]}})  # a Group changed
    topology = Topology(r, max_connections=args.edges + 10, max_ports=20)
    ms = int(now * 1000)
    batch = pb.ReportBatch(agent_id="agent-a", node="node-a", sequence=1, sent_unix_ms=ms, edges=[
        pb.EdgeDelta(client=pb.Endpoint(ip=POD, port=40000, local=True), server=pb.Endpoint(ip=ip, port=443),
                     protocol=pb.TCP, bytes_c2s=100, bytes_s2c=1000, packets_c2s=3, packets_s2c=3, sessions_opened=1,
                     first_seen_unix_ms=ms, last_seen_unix_ms=ms) for ip in addresses(args.edges, rng)])
    started = time.perf_counter()
    result = topology.ingest(batch, now)
    print(f"a {args.edges:,}-edge batch of outside addresses, the table rebuilt in it: "
          f"{time.perf_counter() - started:.3f} s ({result.counted:,} edges); the scan would take "
          f"~{2 * args.edges / scan_rate:,.0f} s")


def rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def names_child(count: int, limit: int) -> None:
    """In a fresh process: RSS before and after ``count`` names (printed for the parent)."""
    now = time.time()
    r = Resolver(max_names=limit)
    gc.collect()
    before = rss_mib()
    for i in range(count):
        r.learn_name(f"100.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}", f"host-{i}.cdn-{i % 97}.example.org", 300,
                     now, now)
    gc.collect()
    print(f"{before:.1f} {rss_mib():.1f} {len(r.names)}")


def names(args: argparse.Namespace) -> None:
    for label, limit in ((f"bounded at {args.max_names:,}", args.max_names), ("no bound (as before)", 10**12)):
        out = subprocess.run([sys.executable, __file__, "--names-child", str(args.names), str(limit)], check=True,
                             capture_output=True, text=True).stdout.split()
        before, after, kept = float(out[0]), float(out[1]), int(out[2])
        print(f"{args.names:,} names, {label}: RSS {before:.0f} → {after:.0f} MiB (+{after - before:.0f}), "
              f"{kept:,} kept")


def main() -> None:
    if len(sys.argv) == 4 and sys.argv[1] == "--names-child":
        names_child(int(sys.argv[2]), int(sys.argv[3]))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cidrs", type=int, default=100_000)
    parser.add_argument("--lookups", type=int, default=100_000)
    parser.add_argument("--scan-sample", type=int, default=20)
    parser.add_argument("--edges", type=int, default=3000)
    parser.add_argument("--names", type=int, default=300_000)
    parser.add_argument("--max-names", type=int, default=100_000)
    args = parser.parse_args()
    lookups(args)
    names(args)


if __name__ == "__main__":
    main()
