"""What flowmap costs on a real cluster: CPU and memory of each node's agent and dp, and of the
operator, while the demo shop runs, next to what the shop itself uses (the reference, measured
in the same run) and the packets the nodes carried.

    python benchmarks/cluster_overhead.py [--cni ptp|bridge-vxlan] [--pause 0.05] [--seconds 60]

Brings up its own cluster (flowmap_devenv.cluster), installs flowmap as the README says, runs the
shop with ``--pause`` between rounds, waits ``--warmup`` seconds, then reads the containers'
cgroups (cpuacct.usage, memory.stat rss) at the start and end of ``--seconds``. Prints numbers;
asserts nothing. Needs root and what ``make setup`` installs.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from flowmap_devenv import images
from flowmap_devenv.cluster import CNIS, Cluster
from flowmap_devenv.nodes import CGROUP_ROOT

Sample = dict[str, tuple[int, int]]  # container -> (cpu ns, rss bytes)


def containers(cluster: Cluster) -> dict[str, Path]:
    """'namespace/pod/container' -> its cgroup folder under the cpuacct hierarchy."""
    found: dict[str, Path] = {}
    pods = json.loads(cluster.kubectl("get", "pods", "-A", "-o", "json").stdout)["items"]
    cgroups = {p.name: p for p in (CGROUP_ROOT / "cpuacct").glob("fmc-*/kubepods/**/*") if p.is_dir()}
    for pod in pods:
        for status in pod["status"].get("containerStatuses", []):
            cid = status.get("containerID", "").split("://")[-1]
            if cid in cgroups:
                found[f"{pod['metadata']['namespace']}/{pod['spec']['nodeName']}/{status['name']}"] = cgroups[cid]
    return found


def sample(where: dict[str, Path]) -> Sample:
    out = {}
    for name, path in where.items():
        cpu = int((path / "cpuacct.usage").read_text())
        stat = dict(line.split() for line in (CGROUP_ROOT / "memory" / path.relative_to(CGROUP_ROOT / "cpuacct")
                                              / "memory.stat").read_text().splitlines())
        out[name] = (cpu, int(stat.get("total_rss", stat.get("rss", 0))))
    return out


def packets(cluster: Cluster) -> int:
    """Packets the nodes' dps took from their rings (the agents' metric, read on each node)."""
    total = 0
    for node in cluster.nodes():
        text = subprocess.run(["nsenter", f"--net=/run/netns/{node.spec.netns}", sys.executable, "-c",
                               "import urllib.request;print(urllib.request.urlopen("
                               "'http://127.0.0.1:9091/metrics',timeout=5).read().decode())"],
                              capture_output=True, text=True).stdout
        total += int(float(next((line.split()[1] for line in text.splitlines()
                                 if line.startswith("flowmap_agent_dp_packets_total ")), "0")))
    return total


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cni", choices=CNIS, default="bridge-vxlan")
    p.add_argument("--pause", type=float, default=0.05, help="seconds between two rounds of each shop client")
    p.add_argument("--warmup", type=float, default=20)
    p.add_argument("--seconds", type=float, default=60)
    args = p.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="flowmap-bench-"))
    cluster = Cluster(folder / "cluster", log=lambda line: print(line, file=sys.stderr))
    try:
        cluster.up(nodes=2, cni=args.cni)
        cluster.install_flowmap(images.NAMES["flowmap"])
        cluster.deploy_shop(rounds=0, pause=args.pause)
        time.sleep(args.warmup)
        where = containers(cluster)
        first, pkts0, t0 = sample(where), packets(cluster), time.monotonic()
        time.sleep(args.seconds)
        last, pkts1, t1 = sample(where), packets(cluster), time.monotonic()
    finally:
        cluster.down()
    span = t1 - t0
    rate = (pkts1 - pkts0) / span
    cpu = {n: (last[n][0] - first[n][0]) / 1e9 / span * 100 for n in last if n in first}
    shop = sum(v for n, v in cpu.items() if n.startswith("shop/"))
    print(f"\n{args.cni}, 2 nodes, shop pause {args.pause} s, {span:.0f} s measured; the dps took {rate:,.0f} packets/s")
    print(f"{'container':<44} {'CPU %':>7} {'RSS MiB':>8}")
    for name in sorted(cpu):
        if name.startswith("flowmap-system/"):
            print(f"{name:<44} {cpu[name]:>7.1f} {last[name][1] / 2**20:>8.0f}")
    ours = sum(v for n, v in cpu.items() if n.startswith("flowmap-system/"))
    print(f"{'flowmap, all':<44} {ours:>7.1f}")
    print(f"{'the shop (reference)':<44} {shop:>7.1f}")
    if shop:
        print(f"flowmap / shop CPU: {ours / shop:.2f}; flowmap CPU per 1,000 packets/s: {ours / rate * 1000:.2f} %"
              if rate else f"flowmap / shop CPU: {ours / shop:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
