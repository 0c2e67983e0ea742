"""Exactly-once counting through resends, write conflicts, updates in doubt and operator crashes."""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import pytest

from flowmap_operator.ledger import Counters, EdgeKey, Ledger, OutOfOrder

A: EdgeKey = ("shop.web", "shop.api", 8080, "TCP")
B: EdgeKey = ("shop.api", "shop.redis", 6379, "TCP")


def c(n: int) -> Counters:
    return Counters(bytes_c2s=n, bytes_s2c=10 * n, packets_c2s=1, packets_s2c=2, sessions=1)


def test_a_resent_batch_counts_once() -> None:
    ledger = Ledger()
    for _ in range(3):  # the agent resends batch 1 twice (its acks were lost)
        ledger.begin_batch("agent-1", "node-a", 1, acked=0, previous=0)
        ledger.apply("agent-1", 1, A, c(5), now=0.0)
    plan = ledger.plan(A)
    assert plan.counters == c(5)
    assert ledger.progress("agent-1") == (0, 1, [1])  # not in the API server yet
    ledger.written(plan, "7")
    assert ledger.progress("agent-1") == (1, 1, [])
    ledger.begin_batch("agent-1", "node-a", 1, acked=0, previous=0)  # resent once more after the write
    assert not ledger.apply("agent-1", 1, A, c(5), now=1.0)
    assert ledger.edges[A].persisted == c(5) and not ledger.dirty()


def test_a_batch_waits_only_for_its_own_edges() -> None:
    ledger = Ledger()
    ledger.begin_batch("ag", "n", 1, 0, 0)
    ledger.apply("ag", 1, A, c(1), 0.0)
    ledger.apply("ag", 1, B, c(1), 0.0)
    ledger.begin_batch("ag", "n", 2, 0, 1)
    ledger.apply("ag", 2, A, c(2), 0.0)
    ledger.written(ledger.plan(A), "1")  # carries batches 1 and 2 for A
    assert ledger.progress("ag") == (0, 2, [1])  # batch 1 still waits on B; batch 2 is done
    ledger.written(ledger.plan(B), "1")
    assert ledger.progress("ag") == (2, 2, [])


def test_deltas_arriving_during_a_write_stay_pending() -> None:
    ledger = Ledger()
    ledger.begin_batch("ag", "n", 1, 0, 0)
    ledger.apply("ag", 1, A, c(1), 0.0)
    plan = ledger.plan(A)
    ledger.begin_batch("ag", "n", 2, 0, 1)
    ledger.apply("ag", 2, A, c(2), 0.0)  # while the write of batch 1 is on the wire
    ledger.written(plan, "2")
    assert ledger.acked("ag") == 1
    assert ledger.plan(A).counters == Counters(3, 30, 2, 4, 2)


def test_an_update_in_doubt_that_landed_is_not_counted_again() -> None:
    ledger = Ledger()
    ledger.begin_batch("ag", "n", 1, 0, 0)
    ledger.apply("ag", 1, A, c(1), 0.0)
    plan = ledger.plan(A)
    ledger.in_doubt(plan)  # the API server took it, but the answer was lost
    ledger.begin_batch("ag", "n", 2, 0, 1)
    ledger.apply("ag", 2, A, c(2), 0.0)
    ledger.load(A, plan.counters, [("ag", "n", 1)], "9")  # the re-read shows batch 1's watermark
    final = ledger.plan(A)
    assert final.counters == Counters(3, 30, 2, 4, 2)
    assert ledger.acked("ag") == 1


def test_a_batch_after_one_that_never_arrived_is_refused() -> None:
    ledger = Ledger()
    ledger.begin_batch("ag", "n", 1, 0, 0)
    with pytest.raises(OutOfOrder) as err:
        ledger.begin_batch("ag", "n", 3, 0, 2)  # batch 2 was lost on the way
    assert err.value.delivered == 1
    ledger.begin_batch("ag", "n", 3, 0, 1)  # but batch 2 may be one the agent saw acknowledged
    # A replica that never saw this agent takes its word for what it dropped.
    fresh = Ledger()
    fresh.begin_batch("ag", "n", 7, acked=4, previous=4)
    with pytest.raises(OutOfOrder):
        Ledger().begin_batch("ag", "n", 7, acked=4, previous=5)


def test_watermarks_are_pruned_once_the_agent_moved_on() -> None:
    ledger = Ledger()
    ledger.begin_batch("ag", "n", 1, 0, 0)
    ledger.apply("ag", 1, A, c(1), 0.0)
    ledger.written(ledger.plan(A), "1")
    assert set(ledger.plan(A).watermarks) == {"ag"}
    ledger.begin_batch("ag", "n", 0, acked=1, previous=0)  # an ack question: the agent dropped batch 1
    assert ledger.plan(A).watermarks == {}


@dataclass
class Agent:
    name: str
    node: str
    seq: int = 0
    acked: int = 0
    unacked: list[tuple[int, dict[EdgeKey, Counters]]] = field(default_factory=list)
    next_send: int = 0


def simulate(seed: int) -> None:
    rng = random.Random(seed)
    keys: list[EdgeKey] = [("a", "b", p, "TCP") for p in range(4)]
    agents = [Agent(f"agent-{i}", f"node-{i}") for i in range(3)]
    store: dict[EdgeKey, tuple[Counters, list[tuple[str, str, int]], int]] = {}
    truth: dict[EdgeKey, Counters] = {k: Counters() for k in keys}
    ledger = Ledger()

    def write(key: EdgeKey) -> None:
        edge = ledger.edges[key]
        if edge.in_doubt is not None:  # re-read before writing again
            counters, marks, rv = store.get(key, (Counters(), [], 0))
            ledger.load(key, counters, marks, str(rv))
            if edge.dirty_since is None:
                return
        plan = ledger.plan(key)
        current_rv = store.get(key, (None, None, 0))[2]
        if str(current_rv) != (edge.resource_version or "0"):
            ledger.load(key, store[key][0], store[key][1], str(current_rv))  # 409: re-read
            return
        outcome = rng.random()
        if outcome < 0.15:
            return  # refused (API down): nothing changes
        new = (plan.counters.copy(), [(a, w.node, w.batch) for a, w in plan.watermarks.items()], current_rv + 1)
        if outcome < 0.3:
            if rng.random() < 0.5:
                store[key] = new  # landed, but the answer was lost
            ledger.in_doubt(plan)
            return
        store[key] = new
        ledger.written(plan, str(new[2]))

    def deliver(agent: Agent) -> None:
        if agent.next_send >= len(agent.unacked):
            if not agent.unacked:
                return
            seq, deltas, previous = 0, {}, 0  # everything is sent but not acknowledged: ask
        else:
            seq, deltas = agent.unacked[agent.next_send]
            previous = agent.unacked[agent.next_send - 1][0] if agent.next_send else agent.acked
        ledger.begin_batch(agent.name, agent.node, seq, agent.acked, previous)
        for key, delta in deltas.items():
            ledger.apply(agent.name, seq, key, delta, now=float(seq))
        if seq:
            agent.next_send += 1
        if rng.random() < 0.8:  # else the answer is lost
            applied, received, waiting = ledger.progress(agent.name)
            done = [s <= applied or (s <= received and s not in waiting) for s, _ in agent.unacked]
            # An ack may cover batches delivered before a reconnect: never step before the list.
            agent.next_send -= sum(done[:agent.next_send])
            agent.unacked = [b for b, d in zip(agent.unacked, done) if not d]
            agent.acked = agent.unacked[0][0] - 1 if agent.unacked else agent.seq
        else:
            agent.next_send = 0  # the agent reconnects and resends everything unacknowledged

    for _ in range(400):
        roll = rng.random()
        agent = rng.choice(agents)
        if roll < 0.3:
            agent.seq += 1
            deltas = {k: c(rng.randint(0, 50)) for k in rng.sample(keys, rng.randint(0, 3))}
            for k, d in deltas.items():
                truth[k].add(d)
            agent.unacked.append((agent.seq, deltas))
        elif roll < 0.6:
            deliver(agent)
        elif roll < 0.95:
            dirty = ledger.dirty()
            if dirty:
                write(dirty[0].key if rng.random() < 0.7 else rng.choice(dirty).key)
        else:  # the operator crashes: all memory is gone, rebuilt from the objects
            ledger = Ledger()
            for key, (counters, marks, rv) in store.items():
                ledger.load(key, counters, marks, str(rv))
            for a in agents:
                a.next_send = 0
        for edge in ledger.edges.values():  # the bytes kept for urgency are the pending ones
            assert edge.unwritten == sum(p.counters.bytes_c2s + p.counters.bytes_s2c for p in edge.pending.values())
    # Drain: everything gets delivered and written.
    for _ in range(10_000):
        if not any(a.unacked for a in agents):
            break
        for a in agents:
            deliver(a)
        for edge in ledger.dirty():
            write(edge.key)
    assert not any(a.unacked for a in agents), "agents still hold unacknowledged batches"
    for key in keys:
        assert store.get(key, (Counters(),))[0] == truth[key], (seed, key)


@pytest.mark.parametrize("seed", range(300))
def test_random_histories_count_every_delta_exactly_once(seed: int) -> None:
    simulate(seed)


def test_an_edge_refuses_more_unconfirmed_observers_than_it_may_hold() -> None:
    import time

    from flowmap_operator import topology
    from flowmap_operator.resolution import Resolver
    from tests.operator.harness import edge
    from flowmap_api import report_pb2 as pb

    topo = topology.Topology(Resolver(), max_connections=10, max_ports=20)
    for i in range(topology.MAX_OBSERVERS):
        batch = pb.ReportBatch(agent_id=f"agent-{i}", node=f"node-{i}", sequence=1,
                               edges=[edge("10.0.0.1", 1, "192.0.2.1", 80)])
        assert topo.ingest(batch, time.time()).counted == 1
    crowded = pb.ReportBatch(agent_id="one-too-many", node="node-x", sequence=1,
                             edges=[edge("10.0.0.1", 1, "192.0.2.1", 80)])
    with pytest.raises(topology.Crowded):
        topo.ingest(crowded, time.time())
    assert topo.ledger.acked("one-too-many") == 0  # refused without a trace: never acknowledged
    key = next(iter(topo.edges))
    topo.ledger.written(topo.ledger.plan(key), "1")
    for i in range(topology.MAX_OBSERVERS):  # every agent confirms its acknowledgement
        topo.ledger.begin_batch(f"agent-{i}", f"node-{i}", 0, acked=1, previous=0)
    topo.ledger.written(topo.ledger.plan(key), "2")  # the write prunes the confirmed watermarks
    assert topo.ingest(crowded, time.time()).counted == 1


def test_the_write_budget_never_bursts_above_its_rate() -> None:
    import asyncio
    import time

    from flowmap_operator.kubeapi import Bucket

    async def takes(n: int, bucket: Bucket) -> float:
        await asyncio.sleep(0.1)  # idle: an idle bucket holds one write, not a second's worth
        started = time.monotonic()
        for _ in range(n):
            await bucket.take()
        return time.monotonic() - started

    # 41 writes at 200/s: the first at once, then one every 5 ms.
    assert asyncio.run(takes(41, Bucket(200.0))) >= 40 / 200.0
