"""Protect mode at node scale: prints numbers, asserts nothing.

A NodePolicy of --pods protected pods (default 10,000) with --peers egress and as many ingress
peers each (host routes of other pods on 8080/TCP) plus DNS, so about 10 set elements per pod
(100,000 by default). Measured:

1. **compile**: NodePolicy -> validated policy -> the desired table (pure Python);
2. **first apply**: into an empty network namespace, one nft transaction (the reference: the
   same table written by ``nft -f`` from one file, measured in the same run);
3. **no-op**: the same policy again, by a fresh agent (read the table back, parse, diff: the
   restart path) and by a running one (diff against what it applied);
4. **one pod changes**: a pod replaced by another (new address), by a running agent;
5. reading the rules' counters (every few seconds, for metrics).

Usage (root, from the repo root): .venv/bin/python -m benchmarks.agent_policy [--pods 10000] [--peers 4]
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import random
import shutil
import subprocess
import time
from collections.abc import Callable
from typing import TypeVar

from flowmap_agent.policy.compiling import desired, parse
from flowmap_agent.policy.nftables import Found, Table, plan
from flowmap_api import report_pb2 as pb
from flowmap_devenv.netns import Lab

T = TypeVar("T")
Peer = pb.PodPolicy.Peer
LIMIT = 1_000_000


def timed(what: str, call: Callable[[], T]) -> tuple[T, float]:
    started = time.perf_counter()
    value = call()
    took = time.perf_counter() - started
    print(f"  {what:<58} {took * 1000:9.1f} ms")
    return value, took


def node_policy(pods: int, peers: int, seed: int = 1) -> pb.NodePolicy:
    rng = random.Random(seed)
    address = [str(ipaddress.ip_address(0x0AF40000 + i)) for i in range(pods)]  # 10.244.0.0/16
    message = pb.NodePolicy(version=1)
    for i in range(pods):
        pod = message.pods.add(pod=f"shop/pod-{i}", ips=[address[i]])
        pod.egress.append(Peer(cidrs=rng.sample(address, peers), protocol=pb.TCP, ports=[8080]))
        pod.egress.append(Peer(cidrs=["10.96.0.10/32"], protocol=pb.UDP, ports=[53]))
        pod.ingress.append(Peer(cidrs=rng.sample(address, peers), protocol=pb.TCP, ports=[8080]))
    return message


def main() -> None:
    args = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    args.add_argument("--pods", type=int, default=10_000)
    args.add_argument("--peers", type=int, default=4)
    opts = args.parse_args()
    message = node_policy(opts.pods, opts.peers)
    print(f"policy: {opts.pods} pods, {message.ByteSize() / 1e6:.1f} MB as protobuf")
    policy, parse_s = timed("parse and validate", lambda: parse(message, LIMIT))
    want, compile_s = timed("compile to the desired table", lambda: desired(policy, LIMIT))
    print(f"  {'= compile':<58} {(parse_s + compile_s) * 1000:9.1f} ms  ({want.size} set elements)")
    if os.geteuid() != 0 or shutil.which("nft") is None:
        raise SystemExit("the nft part needs root and nft")

    lab = Lab()
    try:
        scratch, node = lab.ns("fmbref"), lab.ns("fmbpol")
        script = "\n".join(plan(None, want)) + "\n"
        _, reference = timed("reference: nft -f of the whole table, from a file", lambda: subprocess.run(
            ["ip", "netns", "exec", scratch, "nft", "-f", "-"], input=script, text=True, check=True))
        running = Table(node)
        commands, first = timed("first apply (read empty, diff, one transaction)", lambda: running.apply(want))
        print(f"    {commands} commands; {first / reference:.2f}x the reference")

        rules, _ = timed("the rules' counters, for metrics (nft -j -t list ruleset)", running.counters)
        print(f"    {len(rules)} rules")
        fresh = Table(node)
        have, read_s = timed("no-op, fresh agent: nft -j list + parse", fresh.read)
        same, diff_s = timed("no-op, fresh agent: diff", lambda: plan(have, want))
        print(f"    {len(same)} commands; read + diff {(read_s + diff_s) * 1000:.1f} ms")
        same, _ = timed("no-op, running agent: diff against what it applied", lambda: plan(Found.of(want), want))
        print(f"    {len(same)} commands")

        changed = pb.NodePolicy()
        changed.CopyFrom(message)
        changed.version = 2
        changed.pods[0].ips[0] = "10.245.0.1"  # pod-0 is gone; a new pod with a new address
        changed.pods[0].pod = "shop/pod-new"

        def one_pod() -> int:
            return running.apply(desired(parse(changed, LIMIT), LIMIT))

        commands, _ = timed("one pod changes, running agent: compile + diff + nft", one_pod)
        print(f"    {commands} commands")
        fresh = Table(node)
        commands, _ = timed("the same, back, by a fresh agent (reads the table first)",
                            lambda: fresh.apply(want))
        print(f"    {commands} commands")
    finally:
        lab.close()


if __name__ == "__main__":
    main()
