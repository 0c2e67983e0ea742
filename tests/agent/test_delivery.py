"""The agent's delivery against a real gRPC server: what it keeps, what it says, how soon it retries.

The operator defers a batch naming an address it does not know yet (UNAVAILABLE): the agent must
keep it, resend it soon (its backoff starts small) and, like every batch, say the node's
addresses with it. Only INVALID_ARGUMENT drops a batch.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import grpc

from flowmap_agent.outbox import Outbox
from flowmap_agent.plumbing import announced
from flowmap_agent.running import Agent
from flowmap_agent.settings import Settings
from flowmap_api import report_pb2 as pb
from flowmap_api import report_pb2_grpc as pb_grpc
from flowmap_api.limits import MAX_NODE_ADDRESSES

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
    agent._stub = lambda: pb_grpc.ReportServiceStub(channel)  # type: ignore[method-assign]
    agent.outbox.node_addresses = OWN
    agent.outbox.add([pb.EdgeDelta(client=pb.Endpoint(ip="10.244.1.10", local=True),
                                   server=pb.Endpoint(ip="10.244.2.40", port=53), protocol=pb.UDP, bytes_c2s=60)])
    agent.outbox.cut()
    after = []
    try:
        for _ in range(3):
            agent.retry_at = 0.0
            await agent.deliver()
            after.append((len(agent.outbox.unacked), agent.backoff, agent.retry_at - time.monotonic()))
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
    box.delivered_ok(again[0], pb.ReportAck(applied=0, received=1, waiting=[1], leader=True))
    ask = box.to_deliver()
    assert [(b.sequence, tuple(b.node_addresses)) for b in ask] == [(0, OWN[:1])]
