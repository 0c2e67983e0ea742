"""Bounded by design: the Connection cap, port collapse into an "any" edge, TTL deletion.

This operator deletes whatever is idle past a few seconds, including other tests' objects:
every test in this suite creates what it checks.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import pytest

from flowmap_api import report_pb2 as pb

from tests.operator.harness import REDIS, WEB
from tests.operator.harness import Agent, Cluster, Operator, create_pods, edge, pod, running
from tests.operator.test_reports import connection, wait_for


def existing_connections(cluster: Cluster) -> int:
    return len(json.loads(cluster.plane.kubectl("get", "connections", "-o", "json").stdout)["items"])


def group(cluster: Cluster, name: str) -> dict[str, Any] | None:
    proc = cluster.plane.kubectl("get", "group", name, "-o", "json", check=False)
    return json.loads(proc.stdout) if proc.returncode == 0 else None


@pytest.fixture
def limited(cluster: Cluster) -> Iterator[Operator]:
    yield from running(cluster, max_connections=existing_connections(cluster) + 4, max_ports_per_pair=3)


@pytest.fixture
def forgetful(cluster: Cluster) -> Iterator[Operator]:
    yield from running(cluster, connection_ttl=6, group_ttl=3, gc_interval=0.5)


def test_ports_collapse_and_the_cap_holds(cluster: Cluster, limited: Operator) -> None:
    agent = Agent(limited, f"limits-{time.monotonic_ns()}", "node-a",
                  cluster.token("flowmap-agent", pod_name="agent-a"))
    # Five ports between the same two groups (a server of its own, named by DNS): the first three
    # get their own edge, the rest share one.
    server = f"collapse-{time.monotonic_ns()}.example.com"
    agent.batch([edge(WEB, 1, "192.0.2.200", 7000 + i, bytes_c2s=10 * i, bytes_s2c=0) for i in range(1, 6)],
                names=[pb.DnsName(ip="192.0.2.200", name=server, ttl_seconds=600, seen_unix_ms=int(time.time() * 1000))])
    agent.flush()
    for port in (7001, 7002, 7003):
        assert wait_for(lambda p=port: connection(cluster, f"shop.web-{server}-{p}-tcp"), what=f"port {port}")
    anyport = wait_for(lambda: connection(cluster, f"shop.web-{server}-any-tcp"), what="the any edge")
    assert anyport["spec"]["port"] == 0 and anyport["status"]["bytes"]["clientToServer"] == 40 + 50
    assert connection(cluster, f"shop.web-{server}-7004-tcp") is None

    # The cap (4 more than existed) is reached: a new edge is dropped, counted and surfaced.
    agent.batch([edge(WEB, 1, REDIS, 6379, bytes_c2s=1, bytes_s2c=1)])  # a new pair of groups
    agent.flush()
    condition = wait_for(lambda: [c for c in (group(cluster, "shop.web") or {}).get("status", {}).get("conditions", [])
                                  if c["type"] == "ConnectionsRecorded"], what="the overflow condition")
    assert condition[0]["status"] == "False" and condition[0]["reason"] == "ConnectionLimitReached"
    assert connection(cluster, "shop.web-shop.redis-6379-tcp") is None


def test_idle_connections_and_gone_workloads_are_deleted(cluster: Cluster, forgetful: Operator) -> None:
    create_pods(cluster.plane, pod("shop", "batch-1", "node-a", "10.244.1.77", owner=("Job", "report")))
    agent = Agent(forgetful, f"ttl-{time.monotonic_ns()}", "node-a",
                  cluster.token("flowmap-agent", pod_name="agent-a"))
    agent.batch([edge("10.244.1.77", 1, "192.0.2.210", 6000)])
    agent.flush()
    assert wait_for(lambda: connection(cluster, "shop.report-external-6000-tcp"), what="the job's connection")
    # Idle past the TTL (6 s): the Connection goes. A workload gone past its TTL (3 s): its Group goes.
    assert wait_for(lambda: group(cluster, "shop.report"), what="the job's group")
    cluster.plane.kubectl("delete", "pod", "batch-1", "-n", "shop", "--grace-period=0", "--force")
    wait_for(lambda: group(cluster, "shop.report") is None, timeout=30, what="the group of a gone workload")
    wait_for(lambda: connection(cluster, "shop.report-external-6000-tcp") is None, timeout=30, what="TTL deletion")
    assert group(cluster, "shop.web") is not None  # its pods still run
