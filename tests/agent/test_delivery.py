"""The agent's delivery against a real gRPC server: what it keeps, what it says, how soon it retries.

The operator defers a batch naming an address it does not know yet (UNAVAILABLE): the agent must
keep it, resend it soon (its backoff starts small) and, like every batch, say the node's
addresses with it. No refusal drops a batch: one naming an edge loses that edge alone (counted),
one for the batch's size gets it cut down, and either goes again at once.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from pathlib import Path

import grpc
import pytest
from prometheus_client import CollectorRegistry

from flowmap_agent.deltas import edge_key
from flowmap_agent.outbox import Outbox
from flowmap_agent.plumbing import announced
from flowmap_agent.metrics import REGISTRY
from flowmap_agent.running import Agent
from flowmap_agent.settings import Settings
from flowmap_api import report_pb2 as pb
from flowmap_api import report_pb2_grpc as pb_grpc
from flowmap_api import validity
from flowmap_api.limits import MAX_MESSAGE_BYTES, MAX_NODE_ADDRESSES
from flowmap_dp import wire_pb2

OWN = ("172.18.0.2", "10.244.1.0", "10.244.1.1")


class Operator(pb_grpc.ReportServiceServicer):
    """Refuses with the given codes, in order, then acknowledges everything; keeps what it got."""

    def __init__(self, *codes: grpc.StatusCode) -> None:
        self.codes = list(codes)
        self.got: list[pb.ReportBatch] = []

    async def Report(self, request: pb.ReportBatch, context: grpc.aio.ServicerContext) -> pb.ReportAck:  # noqa: N802
        self.got.append(request)
        if self.codes:
            await context.abort(self.codes.pop(0), "not now")
        return pb.ReportAck(applied=request.sequence, received=request.sequence, leader=True)


async def deliver_through(operator: Operator, tmp: Path) -> tuple[Agent, list[tuple[int, float, float]]]:
    """Three deliveries of one batch; (unacknowledged batches, backoff, seconds until the retry) after each."""
    server = grpc.aio.server()
    pb_grpc.add_ReportServiceServicer_to_server(operator, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    token = tmp / "token"
    token.write_text("t")
    agent = Agent(Settings(node="node-a", state_file=str(tmp / "state"), token_file=str(token)))
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    agent.delivery._stub = lambda: pb_grpc.ReportServiceStub(channel)  # type: ignore[method-assign]
    agent.outbox.node_addresses = OWN
    agent.outbox.add([pb.EdgeDelta(client=pb.Endpoint(ip="10.244.1.10", local=True),
                                   server=pb.Endpoint(ip="10.244.2.40", port=53), protocol=pb.UDP, bytes_c2s=60)])
    agent.outbox.cut()
    after = []
    try:
        for _ in range(3):
            agent.delivery.retry_at = 0.0
            await agent.delivery.deliver()
            after.append((len(agent.outbox.unacked), agent.delivery.backoff.current,
                          agent.delivery.retry_at - time.monotonic()))
    finally:
        await channel.close()
        await server.stop(None)
    return agent, after


def test_a_deferred_batch_is_kept_and_resent_soon_with_the_nodes_addresses(tmp_path: Path) -> None:
    operator = Operator(grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.UNAVAILABLE)
    agent, after = asyncio.run(deliver_through(operator, tmp_path))
    # Kept through both refusals, retried within 0.75 s and then 1.5 s (0.5 s doubled, with jitter).
    assert [(n, backoff) for n, backoff, _ in after] == [(1, 1.0), (1, 2.0), (0, 0.5)]
    assert 0 < after[0][2] <= 0.75 and 0 < after[1][2] <= 1.5
    assert [b.sequence for b in operator.got] == [1, 1, 1]  # the same batch, never dropped nor renumbered
    assert all(tuple(b.node_addresses) == OWN for b in operator.got)
    assert agent.outbox.lost_deltas == 0


def test_the_operator_is_told_the_node_objects_addresses_first_and_never_more_than_the_bound() -> None:
    own = {f"10.244.{i}.1" for i in range(100)} | {"172.18.0.2", "fd00::2", "10.0.0.9"}
    told = announced(own, {"172.18.0.2", "fd00::2"})
    assert told[:2] == ("172.18.0.2", "fd00::2") and len(told) == MAX_NODE_ADDRESSES
    assert told[2:5] == ("10.0.0.9", "10.244.0.1", "10.244.1.1")  # then by address, IPv4 first
    assert announced({"10.244.1.0", "fd00:10:244:1::", "172.18.0.2"}, {"172.18.0.2"}) == (
        "172.18.0.2", "10.244.1.0", "fd00:10:244:1::")


def test_a_resent_batch_and_a_question_for_the_ack_say_the_addresses_as_they_are_now() -> None:
    box = Outbox("a", "node-a")
    box.node_addresses = OWN
    box.add([pb.EdgeDelta(client=pb.Endpoint(ip="10.244.1.10", local=True), server=pb.Endpoint(ip="10.0.0.1", port=80),
                          protocol=pb.TCP, bytes_c2s=1)])
    box.cut()
    said = [tuple(b.node_addresses) for b in box.to_deliver()]
    box.failed()
    box.node_addresses = OWN[:1]  # the tunnel and the bridge went away in between
    again = box.to_deliver()
    said += [tuple(b.node_addresses) for b in again]
    assert said == [OWN, OWN[:1]]  # one batch, sent twice, each time as the node is
    box.delivered_ok(again[0], pb.ReportAck(applied=0, received=1, waiting=[1], leader=True), now=0.0)
    ask = box.to_deliver(now=box.ask_at)
    assert [(b.sequence, tuple(b.node_addresses)) for b in ask] == [(0, OWN[:1])]


# -- refusals: nothing unacknowledged is dropped ------------------------------------------------

class Contract(pb_grpc.ReportServiceServicer):
    """An operator's front door as the contract says: the shared validity before anything is
    applied, an uncountable edge named in the refusal's trailing metadata, the contract's receive
    limit; then each batch counted once (by its number)."""

    def __init__(self) -> None:
        self.counted: dict[int, int] = {}  # batch -> bytes counted
        self.refusals: list[tuple[int, str]] = []  # (batch, the edge's index or "batch")
        self.lost = 0

    async def Report(self, request: pb.ReportBatch, context: grpc.aio.ServicerContext) -> pb.ReportAck:  # noqa: N802
        try:
            validity.normalise(request)
        except validity.Invalid as exc:
            self.refusals.append((request.sequence, "batch" if exc.edge is None else str(exc.edge)))
            if exc.edge is not None:
                context.set_trailing_metadata(((validity.REFUSED_EDGE, str(exc.edge)),))
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        if request.sequence and request.sequence not in self.counted:
            self.counted[request.sequence] = sum(d.bytes_c2s for d in request.edges)
            self.lost += request.lost_deltas
        return pb.ReportAck(applied=request.sequence, received=request.sequence, leader=True)


async def against(operator: Contract, agent: Agent, rounds: int = 3) -> None:
    server = grpc.aio.server(options=[("grpc.max_receive_message_length", MAX_MESSAGE_BYTES)])
    pb_grpc.add_ReportServiceServicer_to_server(operator, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    agent.delivery._stub = lambda: pb_grpc.ReportServiceStub(channel)  # type: ignore[method-assign]
    try:
        for _ in range(rounds):
            agent.outbox.cut_all()
            await agent.delivery.deliver()
            if not (agent.outbox.unacked or agent.outbox.pending or agent.outbox.lost_deltas):
                break
    finally:
        await channel.close()
        await server.stop(None)


def an_agent(tmp: Path) -> Agent:
    token = tmp / "token"
    token.write_text("t")
    return Agent(Settings(node="node-a", state_file=str(tmp / "state"), token_file=str(token)),
                 registry=CollectorRegistry())


def edge(i: int, port: int = 80, n: int = 1) -> pb.EdgeDelta:
    return pb.EdgeDelta(client=pb.Endpoint(ip="10.244.1.10", local=True),
                        server=pb.Endpoint(ip=f"10.{i >> 16}.{i >> 8 & 255}.{i & 255}", port=port),
                        protocol=pb.TCP, bytes_c2s=n)


def test_a_backlog_of_50001_edges_goes_in_batches_the_operator_takes(tmp_path: Path) -> None:
    agent = an_agent(tmp_path)
    agent.outbox.add([edge(i, n=i + 1) for i in range(50_001)])
    operator = Contract()
    asyncio.run(against(operator, agent))
    assert not operator.refusals and not agent.outbox.unacked and not agent.outbox.pending
    assert len(operator.counted) == 11 and sum(operator.counted.values()) == 50_001 * 50_002 // 2


@pytest.mark.parametrize("over", ["edges", "bytes"])
def test_an_older_agents_oversized_batch_is_cut_down_when_refused_and_all_of_it_counted(tmp_path: Path,
                                                                                        over: str) -> None:
    # As an agent before the contract's limits saved it at shutdown: more edges than a batch may
    # carry (refused INVALID_ARGUMENT, naming no edge), or more bytes than the operator receives
    # (RESOURCE_EXHAUSTED, from gRPC itself).
    old = an_agent(tmp_path).outbox
    if over == "edges":
        edges = [edge(i, n=2) for i in range(50_001)]
    else:
        hit = pb.ThreatHit(name="sqlinjection", snippet="' OR 1=1 --".ljust(256, "x"))
        edges = [edge(i, n=2) for i in range(4_000)]
        for d in edges:
            d.threats.extend([hit] * 16)
    old.unacked = [pb.ReportBatch(agent_id=old.agent_id, node="node-a", sequence=1, edges=edges)]
    old.in_flight = Counter(edge_key(d) for d in edges)
    old.sequence = 1
    old.save(tmp_path / "state")
    agent = an_agent(tmp_path)
    assert len(agent.outbox.unacked[0].edges) == len(edges)
    operator = Contract()
    asyncio.run(against(operator, agent))
    assert operator.refusals == ([(1, "batch")] if over == "edges" else [])  # refused whole once; then cut down
    assert sum(operator.counted.values()) == 2 * len(edges) and not agent.outbox.unacked and not agent.outbox.pending
    assert agent.delivery.backoff.current == 0.5 and agent.delivery.retry_at == 0.0  # at once, no backoff
    assert REGISTRY.get_sample_value("flowmap_agent_split_batches_total") >= 1


def test_an_edge_the_operator_cannot_count_is_set_apart_and_the_rest_counted_at_once(tmp_path: Path) -> None:
    agent = an_agent(tmp_path)
    # An older agent's delta (the agent's own check would have set it apart before the batch).
    agent.outbox.add([edge(1, n=10), edge(2, port=70_000, n=999), edge(3, n=20)])
    agent.outbox.cut_all()
    agent.outbox.add([edge(4, n=30)])
    operator = Contract()
    before = REGISTRY.get_sample_value("flowmap_agent_quarantined_edges_total", {"by": "operator"}) or 0
    asyncio.run(against(operator, agent))
    assert operator.refusals == [(1, "1")]
    # Batch 1 without the edge, then the next; the one after says a delta was lost.
    assert operator.counted == {1: 30, 2: 30, 3: 0}
    assert operator.lost == 1 and agent.delivery.backoff.current == 0.5 and agent.delivery.retry_at == 0.0
    after = REGISTRY.get_sample_value("flowmap_agent_quarantined_edges_total", {"by": "operator"})
    assert after == before + 1


def test_the_agent_sets_apart_an_uncountable_delta_and_normalises_names_before_a_batch(tmp_path: Path) -> None:
    agent = an_agent(tmp_path)
    report = wire_pb2.Report(run_id=1, sequence=1, parts=1)
    report.sessions.add(ip_proto=17, client_ip=bytes([10, 244, 1, 10]), client_port=5000,
                        server_ip=bytes([10, 96, 0, 10]), server_port=53, bytes_c2s=60, packets_c2s=1, app="dns")
    report.sessions.add(ip_proto=6, client_ip=bytes([10, 244, 1, 10]), client_port=5001,
                        server_ip=bytes([10, 96, 0, 11]), server_port=70_000, bytes_c2s=7, packets_c2s=1)
    for name in ("_svc1.example.com.", "Bücher.example", "evil.com\n", "a<b.example"):
        report.dns.add(name=name, type="A", address=bytes([192, 0, 2, 1 + len(name)]))
    agent.intake.record([report])
    box = agent.outbox
    assert [d.server.port for d in box.pending.values()] == [53] and box.lost_deltas == 1
    assert sorted(n.name for n in box.names.values()) == ["_svc1.example.com", "xn--bcher-kva.example"]
