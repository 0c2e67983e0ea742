"""Every delta counted exactly once through operator kill -9s and an API server outage.

Two test agents (real proto, real gRPC, their own tokens) report random deltas over several
edges every 50 ms, resending in order whatever was not acknowledged; meanwhile the operator is
killed with SIGKILL at random moments (applying, acknowledging, flushing) or the API server is
stopped. At the end every Connection must carry exactly the sum of what was sent.
"""

from __future__ import annotations

import json
import random
import threading
import time
from collections import defaultdict
from collections.abc import Iterator

import grpc
import pytest

from tests.operator.harness import API, API_SVC, REDIS, WEB
from tests.operator.harness import Agent, Cluster, Operator, edge

# (agent, client, server, port seen by the client, the Connection that counts it)
EDGES = [("a", WEB, API_SVC, 80, "shop.web-shop.api-8080-tcp")] + [
    ("a", WEB, f"198.51.100.{i}", 9000 + i, f"shop.web-external-{9000 + i}-tcp") for i in range(4)] + [
    ("b", API, REDIS, 6379, "shop.api-shop.redis-6379-tcp")]


class Traffic:
    """Agents reporting in the background; ``truth`` is what they sent, per Connection."""

    def __init__(self, cluster: Cluster, op: Operator, seed: int) -> None:
        tag = f"{seed}-{time.monotonic_ns()}"
        self.agents = {
            "a": Agent(op, f"agent-a-{tag}", "node-a", cluster.token("flowmap-agent", pod_name="agent-a")),
            "b": Agent(op, f"agent-b-{tag}", "node-b", cluster.token("flowmap-agent", pod_name="agent-b")),
        }
        self.rng = random.Random(seed)
        self.truth: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0, 0, 0])
        self.errors: dict[str, int] = defaultdict(int)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self.stop.is_set():
            for name, agent in self.agents.items():
                deltas = []
                for who, client, server, port, conn in EDGES:
                    if who != name or self.rng.random() < 0.3:
                        continue
                    c2s, s2c, sessions = self.rng.randint(1, 5000), self.rng.randint(1, 90000), self.rng.randint(0, 2)
                    packets = self.rng.randint(1, 40)
                    deltas.append(edge(client, 41000, server, port, bytes_c2s=c2s, bytes_s2c=s2c, packets=packets,
                                       sessions=sessions))
                    t = self.truth[conn]
                    t[0] += c2s
                    t[1] += s2c
                    t[2] += packets
                    t[3] += packets
                    t[4] += sessions
                agent.batch(deltas)
                try:
                    agent.pump()
                except (grpc.RpcError, RuntimeError) as err:
                    code = err.code().name if isinstance(err, grpc.RpcError) else "NOT_LEADER"
                    self.errors[code] += 1
            time.sleep(0.05)

    def __enter__(self) -> Traffic:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(10)

    def settle(self) -> None:
        for agent in self.agents.values():
            agent.flush(deadline=120)


def counts(cluster: Cluster) -> dict[str, list[int]]:
    items = json.loads(cluster.plane.kubectl("get", "connections", "-o", "json").stdout)["items"]
    out = {}
    for obj in items:
        st = obj.get("status") or {}
        b, p, s = st.get("bytes", {}), st.get("packets", {}), st.get("sessions", {})
        out[obj["metadata"]["name"]] = [b.get("clientToServer", 0), b.get("serverToClient", 0),
                                        p.get("clientToServer", 0), p.get("serverToClient", 0), s.get("total", 0)]
    return out


def assert_exact(cluster: Cluster, traffic: Traffic, before: dict[str, list[int]], op: Operator) -> None:
    deadline = time.monotonic() + 60
    while True:
        now = counts(cluster)
        got = {conn: [x - y for x, y in zip(now.get(conn, [0] * 5), before.get(conn, [0] * 5))]
               for conn in traffic.truth}
        if got == dict(traffic.truth) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert got == dict(traffic.truth), f"counters differ from what was sent\n{op.tail()}"


@pytest.fixture
def operator(cluster: Cluster) -> Iterator[Operator]:
    op = Operator(cluster, write_budget=30, flush_interval=0.2).start().wait_leading()
    try:
        yield op
    finally:
        op.kill()


def restart(op: Operator) -> None:
    op.kill()
    op.start().wait_leading()


@pytest.mark.parametrize("seed", [1, 2])
def test_kill_9_of_the_operator_neither_loses_nor_doubles(cluster: Cluster, operator: Operator, seed: int) -> None:
    before = counts(cluster)
    rng = random.Random(seed)
    with Traffic(cluster, operator, seed) as traffic:
        for _ in range(4):
            time.sleep(rng.uniform(0.3, 2.5))  # anywhere: applying, acknowledging, mid-flush
            restart(operator)
        time.sleep(2)
    traffic.settle()
    assert traffic.errors, "the kills never interrupted a report: the test proved nothing"
    assert_exact(cluster, traffic, before, operator)


def test_api_server_outage_of_30_s(cluster: Cluster, operator: Operator) -> None:
    before = counts(cluster)
    plane = cluster.plane
    with Traffic(cluster, operator, 7) as traffic:
        time.sleep(2)
        plane.stop_apiserver()
        try:
            time.sleep(30)
            assert operator.proc is not None and operator.proc.poll() is None, "the operator died"
        finally:
            plane.start_apiserver()
        time.sleep(3)
    traffic.settle()
    assert_exact(cluster, traffic, before, operator)
    assert operator.proc is not None and operator.proc.poll() is None
