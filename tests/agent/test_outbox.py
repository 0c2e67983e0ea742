"""The agent's outbox and the operator's ledger together count every delta exactly once.

A model run: deltas arrive every interval; the state is saved before sending (as the agent
does); answers get lost, the operator crashes (its memory rebuilt from the "API"), writes fail
or land in doubt, and the agent itself crashes and restarts from its saved file. Some deltas
name a port no operator can count: the operator refuses their batch naming the edge (the shared
validity), the agent sets that one delta apart and resends the rest; and half the runs cut
batches of one edge, as a backlog beyond the contract's limits is cut.
"""

from __future__ import annotations

import random
import shutil
import struct
import tempfile
from collections import Counter, defaultdict
from collections.abc import Iterator
from pathlib import Path

import pytest

from flowmap_agent.deltas import EdgeKey
from flowmap_agent.errors import StateError
from flowmap_agent.outbox import MAX_BATCH_BYTES, Outbox
from flowmap_agent.positions import Position
from flowmap_api import report_pb2 as pb
from flowmap_api import validity
from flowmap_api.limits import (MAX_BATCH_EDGES, MAX_MESSAGE_BYTES, MAX_NAMES, MAX_NODE_ADDRESSES, MAX_NODE_VMS,
                                MAX_POD_ADDRESSES, MAX_VM_ADDRESSES, MAX_VM_NAME)
from flowmap_operator.ledger import Counters, Ledger, OutOfOrder

SERVERS = ["10.0.0.1", "10.0.0.2", "10.0.0.3", "10.0.0.4"]
# The operator's edge for each: two agent edges resolve to one operator edge (one workload
# behind two pod IPs), so deltas of different batches and edges meet on one object.
GROUP = {"10.0.0.1": "g1", "10.0.0.2": "g2", "10.0.0.3": "g34", "10.0.0.4": "g34"}
BAD = "10.0.0.9"  # its deltas say port 70000: no operator can count them


def delta(server: str, n: int) -> pb.EdgeDelta:
    return pb.EdgeDelta(client=pb.Endpoint(ip="10.1.0.1", local=True),
                        server=pb.Endpoint(ip=server, port=70000 if server == BAD else 80),
                        protocol=pb.TCP, bytes_c2s=n, bytes_s2c=3 * n, packets_c2s=1, packets_s2c=1,
                        sessions_opened=1)


def run(seed: int, tmp: Path) -> None:
    rng = random.Random(seed)
    state = tmp / f"state-{seed}"
    box = Outbox("agent-1", "node-a", window=rng.choice((2, 1024)))
    ledger = Ledger()
    store: dict[str, tuple[Counters, list[tuple[str, str, int]], int]] = {}
    truth: dict[str, int] = defaultdict(int)

    def write_one() -> None:
        dirty = ledger.dirty()
        if not dirty:
            return
        key = dirty[0].key
        edge = ledger.edges[key]
        counters, marks, rv = store.get(key[1], (Counters(), [], 0))
        if edge.in_doubt is not None or (edge.resource_version or "0") != str(rv):
            ledger.load(key, counters, marks, str(rv))
            return
        plan = ledger.plan(key)
        roll = rng.random()
        if roll < 0.1:
            return  # refused
        new = (plan.counters.copy(), [(a, w.node, w.batch) for a, w in plan.watermarks.items()], rv + 1)
        if roll < 0.2:
            if rng.random() < 0.5:
                store[key[1]] = new
            ledger.in_doubt(plan)
            return
        store[key[1]] = new
        ledger.written(plan, str(rv + 1))

    def deliver(now: float) -> None:  # one interval after another: questions are paced (model time)
        for batch in box.to_deliver(now):
            seen = pb.ReportBatch()
            seen.CopyFrom(batch)
            try:
                validity.normalise(seen)  # as the operator does, before anything of the batch is applied
            except validity.Invalid as exc:
                assert exc.edge is not None, exc
                bad = box.quarantine(batch, exc.edge)
                assert bad is not None and bad.server.ip == BAD
                return  # the rest goes again (the next call), under the same number
            try:
                ledger.begin_batch(batch.agent_id, batch.node, batch.sequence, batch.acked, batch.previous)
            except OutOfOrder:
                box.failed()
                return
            merged: dict[tuple[str, str, int, str], Counters] = {}  # per operator edge, as ingest does
            for d in batch.edges:
                c = Counters(d.bytes_c2s, d.bytes_s2c, d.packets_c2s, d.packets_s2c, d.sessions_opened)
                merged.setdefault((d.client.ip, GROUP[d.server.ip], 80, "TCP"), Counters()).add(c)
            for key, c in merged.items():
                ledger.apply(batch.agent_id, batch.sequence, key, c, 0.0)
            if rng.random() < 0.15:
                box.failed()  # the answer is lost
                return
            applied, received, waiting = ledger.progress(batch.agent_id)
            box.delivered_ok(batch, pb.ReportAck(applied=applied, received=received, waiting=waiting, leader=True), now)

    for step in range(300):
        deltas = [delta(s, rng.randint(1, 1000)) for s in rng.sample(SERVERS + [BAD], rng.randint(0, 3))]
        box.add(deltas)
        box.cut_all()
        box.save(state)  # before anything is sent: what is saved is never lost
        for d in deltas:
            if d.server.ip != BAD:
                truth[GROUP[d.server.ip]] += d.bytes_c2s
        deliver(float(step))
        for _ in range(rng.randint(0, 3)):
            write_one()
        roll = rng.random()
        if roll < 0.04:  # the agent crashes and restarts from its file
            box = Outbox.load(state, "node-a", window=box.window)
        elif roll < 0.07:  # the operator crashes
            ledger = Ledger()
            for group, (counters, marks, rv) in store.items():
                ledger.load(("10.1.0.1", group, 80, "TCP"), counters, marks, str(rv))
            box.failed()
    for step in range(300, 5300):
        box.cut_all()
        deliver(float(step))
        write_one()
        if not box.unacked and not box.pending:
            break
    assert not box.unacked and not box.pending
    assert {s: c[0].bytes_c2s for s, c in store.items()} == {s: n for s, n in truth.items() if n}, seed


@pytest.fixture
def fast_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """What is under test is what the state file holds, not the disk: 300 synced saves per run
    would cost minutes, so the runs use memory (tmpfs when there is one) and skip fsync."""
    monkeypatch.setattr("flowmap_agent.outbox.os.fsync", lambda fd: None)
    shm = Path("/dev/shm")
    if not shm.is_dir():
        yield tmp_path
        return
    folder = Path(tempfile.mkdtemp(dir=shm, prefix="flowmap-outbox-"))
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@pytest.mark.parametrize("seed", range(150))
def test_agent_and_operator_crashes_neither_lose_nor_double(seed: int, fast_dir: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    if seed % 2:
        monkeypatch.setattr("flowmap_agent.outbox.MAX_BATCH_EDGES", 1)  # every edge a batch of its own
    run(seed, fast_dir)


def test_an_edge_in_flight_goes_again_each_refresh_until_too_much_is_in_flight_and_new_edges_never_wait(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("flowmap_agent.outbox.MAX_IN_FLIGHT", 3)
    box = Outbox("a", "n", refresh=10.0)
    web: EdgeKey = ("10.1.0.1", "10.0.0.1", 80, pb.TCP, "", True, False)
    box.add([delta("10.0.0.1", 5)])
    assert box.cut(now=0.0) is not None
    for now in (1.0, 9.0):  # the operator has not written 10.0.0.1's edge yet: it merges...
        box.add([delta("10.0.0.1", 5)])
        assert box.cut(now=now) is None
    for now in (10.0, 20.5):  # ... and goes again every refresh interval
        assert box.cut(now=now) is not None
        box.add([delta("10.0.0.1", 5)])
    assert box.in_flight == {web: 3} and box.sent_at == {web: 20.5}
    for now in range(30, 130):  # three in flight: the edge's next deltas merge, whenever
        box.add([delta("10.0.0.1", 1)])
        assert box.cut(now=float(now)) is None
    box.add([delta("10.0.0.2", 1)])  # a new edge goes out at once
    fourth = box.cut(now=130.0)
    assert fourth is not None and [d.server.ip for d in fourth.edges] == ["10.0.0.2"]
    assert box.edges == 5  # three deltas in flight, one new, one merged pending: not 104
    assert box.pending[web].bytes_c2s == 105
    sent = box.to_deliver()
    assert [(b.sequence, b.previous) for b in sent] == [(1, 0), (2, 1), (3, 2), (4, 3)]
    box.delivered_ok(sent[3], pb.ReportAck(applied=0, received=4, waiting=[1, 2, 3], leader=True), now=130.0)
    assert [b.sequence for b in box.unacked] == [1, 2, 3] and box.acked == 0  # batch 4 is written
    assert box.to_deliver(now=130.5) == []  # the next question is due an interval after the answer
    ask = box.to_deliver(now=131.0)  # nothing new to send: a question for the acknowledgement
    assert [(b.sequence, len(b.edges)) for b in ask] == [(0, 0)]
    box.delivered_ok(ask[0], pb.ReportAck(applied=2, received=4, waiting=[3], leader=True))
    assert [b.sequence for b in box.unacked] == [3] and box.in_flight == {web: 1}
    assert box.cut(now=131.0) is not None  # its last delta went at 20.5: due
    assert box.cut(now=131.0) is None
    box.delivered_ok(box.to_deliver()[-1], pb.ReportAck(applied=5, received=5, leader=True))
    assert not box.in_flight and not box.sent_at  # every delta written: nothing to wait for


def test_an_unreadable_or_foreign_state_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "state"
    Outbox("a", "node-a").save(path)
    with pytest.raises(StateError, match="another node"):
        Outbox.load(path, "node-b")
    path.write_bytes(path.read_bytes()[:-1] + b"\xff\xff")
    with pytest.raises(StateError):
        Outbox.load(path, "node-a")
    path.write_bytes(b"garbage!")
    with pytest.raises(StateError):
        Outbox.load(path, "node-a")


def test_a_refused_edge_is_set_apart_and_the_rest_goes_again_under_the_same_number() -> None:
    box = Outbox("a", "n")
    box.add([delta("10.0.0.1", 5), delta(BAD, 1), delta("10.0.0.2", 2)])
    first = box.cut()
    box.add([delta("10.0.0.3", 1)])
    second = box.cut()
    assert first is not None and second is not None
    sent = box.to_deliver()
    assert [(b.sequence, b.previous) for b in sent] == [(1, 0), (2, 1)]
    bad = box.quarantine(sent[0], 1)  # the operator refused batch 1 naming its edge 1
    assert bad is not None and bad.server.port == 70000
    again = box.to_deliver()  # at once, in order, with the same numbers: nothing else dropped
    assert [(b.sequence, b.previous, [d.bytes_c2s for d in b.edges]) for b in again] == [(1, 0, [5, 2]), (2, 1, [1])]
    assert box.quarantine(again[0], 5) is None  # no such edge: not a refusal the agent can act on
    box.add([delta(BAD, 7)])  # its edge is free again, and so counted as lost once more if refused again
    third = box.cut()
    assert third is not None and third.lost_deltas == 1 and [d.bytes_c2s for d in third.edges] == [7]


def test_batches_keep_to_the_contracts_limits_however_large_the_backlog() -> None:
    box = Outbox("a", "n")
    box.add(pb.EdgeDelta(client=pb.Endpoint(ip="10.1.0.1"), server=pb.Endpoint(ip=f"10.{i >> 16}.{i >> 8 & 255}.{i & 255}",
                                                                            port=80), protocol=pb.TCP, bytes_c2s=1)
            for i in range(50_001))
    box.add((), (pb.DnsName(ip=f"192.0.{i >> 8}.{i & 255}", name=f"n{i}.example.com") for i in range(MAX_NAMES + 5)))
    batches = box.cut_all()
    assert [len(b.edges) for b in batches] == [MAX_BATCH_EDGES] * 10 + [1]
    assert [len(b.names) for b in batches] == [MAX_NAMES, 5] + [0] * 9
    assert [b.sequence for b in batches] == list(range(1, 12)) and not box.pending and not box.names
    # Heavy edges (16 threat hits of 256 characters each) are cut by their bytes.
    heavy = [pb.EdgeDelta(client=pb.Endpoint(ip="10.2.0.1"), server=pb.Endpoint(ip=f"10.3.{i >> 8}.{i & 255}", port=80),
                          protocol=pb.TCP, threats=[pb.ThreatHit(name="sqlinjection", snippet="x" * 256)] * 16)
             for i in range(2_000)]
    box.add(heavy)
    cut = box.cut_all()
    assert len(cut) > 1 and sum(len(b.edges) for b in cut) == 2_000
    assert all(b.ByteSize() <= MAX_BATCH_BYTES for b in cut)


def test_a_batch_over_the_limits_from_an_older_agent_is_cut_down_when_refused(tmp_path: Path) -> None:
    old = Outbox("a", "node-a")
    old.unacked = [pb.ReportBatch(agent_id="a", node="node-a", sequence=1, edges=[delta(f"10.0.{i >> 8}.{i & 255}", 1)
                                                                                  for i in range(MAX_BATCH_EDGES + 10)])]
    old.in_flight = Counter(("10.1.0.1", d.server.ip, 80, pb.TCP, "", True, False) for d in old.unacked[0].edges)
    old.sequence = 1
    old.add([delta("10.0.19.140", 100)])  # a newer delta of an edge in the old batch's surplus (index 5004)
    old.save(tmp_path / "state")
    box = Outbox.load(tmp_path / "state", "node-a")
    [batch] = box.to_deliver()
    assert box.split(batch)  # the operator refused it whole for its size
    assert len(batch.edges) == MAX_BATCH_EDGES and batch.sequence == 1
    assert not box.split(batch)  # within the limits now: a refusal of it is about something else
    rest = box.cut_all()
    assert [(b.sequence, len(b.edges)) for b in rest] == [(2, 10)]
    merged = {d.server.ip: d.bytes_c2s for d in rest[0].edges}
    assert merged["10.0.19.140"] == 101  # the surplus and the newer delta of the same edge: one delta


def test_the_dps_positions_survive_a_restart_and_older_files_still_load(tmp_path: Path) -> None:
    path = tmp_path / "state"
    box = Outbox("a", "node-a")
    box.dp_positions = {0: Position(77, 12, 1, 3, 40), 1: Position(78, 9)}
    box.add([delta("10.0.0.1", 5)])
    box.save(path)
    again = Outbox.load(path, "node-a")
    assert again.dp_positions == {0: Position(77, 12, 1, 3, 40), 1: Position(78, 9)} and len(again.pending) == 1
    data = path.read_bytes()
    records = data[4 + 2 + 2 + 2 * 36:]  # magic, version, count, two positions of version 3
    # Version 2 kept whole intervals: (worker, run, sequence).
    v2 = b"FMAS\x00\x02\x00\x02" + struct.pack("!IQQIQQ", 0, 77, 12, 1, 78, 9) + records
    path.write_bytes(v2)
    older = Outbox.load(path, "node-a")
    assert older.dp_positions == {0: Position(77, 12), 1: Position(78, 9)} and len(older.pending) == 1
    assert older.dp_positions[0].acked == 12
    # Version 1 had no positions: the same records after the header.
    path.write_bytes(b"FMAS\x00\x01" + records)
    old = Outbox.load(path, "node-a")
    assert old.dp_positions == {} and len(old.pending) == 1


def test_a_question_that_brings_nothing_waits_twice_as_long_for_the_next_up_to_refresh() -> None:
    box = Outbox("a", "n", interval_ms=1000, refresh=10.0)
    box.add([delta("10.0.0.1", 5), delta("10.0.0.2", 5)])
    [first] = box.cut_all()
    box.add([delta("10.0.0.3", 5)])
    [second] = box.cut_all()
    for b in box.to_deliver(now=0.0):
        box.delivered_ok(b, pb.ReportAck(applied=0, received=b.sequence, waiting=[1, 2][:b.sequence], leader=True),
                         now=0.0)
    asked = []
    now = 0.0
    while now < 40.0 and box.unacked:
        if (ask := box.to_deliver(now=now)):
            assert [b.sequence for b in ask] == [0]
            asked.append(now)
            written = now >= 30.0  # the operator writes batch 1 at 30 s
            box.delivered_ok(ask[0], pb.ReportAck(applied=1 if written else 0, received=2,
                                                  waiting=[2] if written else [1, 2], leader=True), now=now)
            if written:
                break
        now += 0.5
    # The batches' own two answers brought nothing (waits of 2, then 4 s), nor do the questions'
    # until the write: 8 s, then every refresh (10 s).
    assert asked == [4.0, 12.0, 22.0, 32.0]
    assert [b.sequence for b in box.unacked] == [second.sequence] and first.sequence == 1
    assert box.to_deliver(now=32.5) == [] and box.to_deliver(now=33.0) != []  # progress: an interval again


def test_every_batch_says_the_nodes_vms_as_they_are_when_it_is_sent_within_the_contract() -> None:
    box = Outbox("a", "node-a")
    box.add([delta("10.0.0.1", 5)])
    assert box.cut(now=0.0) is not None
    [first] = box.to_deliver()
    assert not first.vms_followed and not first.vms  # an agent that does not follow libvirt says nothing
    largest = [pb.LocalVm(uuid=f"00000000-0000-0000-0000-{i:012x}", name="\U0010ffff" * MAX_VM_NAME,
                          label="a" * 63, addresses=[f"ffff:ffff:ffff:ffff:ffff:ffff:255.255.{i % 256}.{j}"
                                                     for j in range(MAX_VM_ADDRESSES)])
               for i in range(MAX_NODE_VMS)]
    box.vms, box.vms_followed = largest, True
    box.delivered = 0  # a new connection: sent again, saying the VMs as they are now
    box.add([delta(f"10.1.{i // 250}.{i % 250}", 10**9) for i in range(MAX_BATCH_EDGES)])
    while box.cut(now=1.0) is not None:
        pass
    sent = box.to_deliver()
    assert len(sent) >= 2 and all(list(b.vms) == largest and b.vms_followed for b in sent)
    # what is set at sending, at its largest, never pushes a batch of the most deltas over the receive limit
    said = pb.ReportBatch(agent_id="a" * 128, node="n" * 253, sequence=2**64 - 1, acked=2**64 - 1,
                          previous=2**64 - 1, sent_unix_ms=2**62, vms_followed=True, vms=largest,
                          node_addresses=["ffff:ffff:ffff:ffff:ffff:ffff:255.255.255.255"] * MAX_NODE_ADDRESSES,
                          pod_addresses=[pb.PodAddresses(pod=f"{'n' * 63}/{i:0253d}",
                                                         ips=["ffff:ffff:ffff:ffff:ffff:ffff:255.255.255.255"])
                                         for i in range(MAX_POD_ADDRESSES)])
    validity.check_pod_addresses(said)
    assert said.ByteSize() + MAX_BATCH_BYTES <= MAX_MESSAGE_BYTES
    for b in sent:
        validity.check_batch(b)
    box.vms = []
    again = box.to_deliver(now=100.0)
    assert all(b.vms_followed and not b.vms for b in again)  # none run now
