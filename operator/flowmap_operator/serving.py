"""The gRPC ReportService: a thin servicer over the pure topology, one place for status codes."""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Callable

import grpc

from flowmap_api import report_pb2 as pb
from flowmap_api import report_pb2_grpc as pb_grpc
from flowmap_operator import metrics
from flowmap_operator.auth import Authenticator
from flowmap_operator.errors import (Busy, Crowded, InvalidReport, NotKnownYet, OutOfOrder, PermissionDenied,
                                     Unauthenticated, Unavailable)
from flowmap_operator.policing import PolicyHub
from flowmap_operator.settings import Settings
from flowmap_operator.topology import Topology
from flowmap_operator.validation import validate

log = logging.getLogger("flowmap.operator.serving")
# The one mapping of the operator's errors (flowmap_operator.errors) to gRPC status codes, with the
# outcome label they are counted under. The agent drops a batch only on INVALID_ARGUMENT.
STATUS: dict[type[Exception], tuple[grpc.StatusCode, str]] = {
    Unauthenticated: (grpc.StatusCode.UNAUTHENTICATED, "unauthenticated"),
    PermissionDenied: (grpc.StatusCode.PERMISSION_DENIED, "permission_denied"),
    InvalidReport: (grpc.StatusCode.INVALID_ARGUMENT, "invalid"),
    OutOfOrder: (grpc.StatusCode.FAILED_PRECONDITION, "out_of_order"),
    Busy: (grpc.StatusCode.RESOURCE_EXHAUSTED, "busy"),
    Crowded: (grpc.StatusCode.RESOURCE_EXHAUSTED, "busy"),
    Unavailable: (grpc.StatusCode.UNAVAILABLE, "unavailable"),
    # "Retry with backoff" in gRPC's own words; the agent keeps the batch and starts at 0.5 s.
    NotKnownYet: (grpc.StatusCode.UNAVAILABLE, "deferred"),
}
REFUSALS = tuple(STATUS)


def status_of(exc: Exception) -> tuple[grpc.StatusCode, str]:
    """The status code and outcome label of one of the operator's errors."""
    return next(STATUS[t] for t in type(exc).__mro__ if t in STATUS)


class ReportServicer(pb_grpc.ReportServiceServicer):
    def __init__(self, topology: Topology, auth: Authenticator, settings: Settings,
                 is_leader: Callable[[], bool]) -> None:
        self.topology, self.auth, self.settings = topology, auth, settings
        self.is_leader = is_leader
        self.blocked_labels: set[tuple[str, ...]] = set()  # violation series, capped

    async def Report(self, request: pb.ReportBatch, context: grpc.aio.ServicerContext) -> pb.ReportAck:  # noqa: N802
        try:
            return await self._report(request, context)
        except REFUSALS as exc:
            (code, outcome), message = status_of(exc), str(exc)
            if isinstance(exc, NotKnownYet):
                metrics.DEFERRALS.labels(exc.node).inc()
        metrics.REPORTS.labels(outcome).inc()
        # Back-pressure is routine under load (one line per agent per second), and so is waiting for
        # a new pod: only counted.
        log.log(logging.DEBUG if outcome in ("busy", "deferred") else logging.INFO, "report refused (%s): %s",
                code.name, message)
        await context.abort(code, message)
        raise AssertionError("unreachable")  # context.abort raises

    async def _report(self, request: pb.ReportBatch, context: grpc.aio.ServicerContext) -> pb.ReportAck:
        identity = await self.auth.identify(tuple(context.invocation_metadata() or ()))
        self.auth.authorize(identity, request.node)
        validate(request, max_edges=self.settings.max_batch_edges)
        if not self.is_leader():
            metrics.REPORTS.labels("not_leader").inc()
            return pb.ReportAck(applied=0, leader=False)
        ledger = self.topology.ledger
        state = ledger.agents.get(request.agent_id)
        waiting = ledger.waiting_batches(request.agent_id)
        new = state is None or request.sequence > state.delivered
        if new and waiting >= self.settings.max_waiting_batches:
            raise Busy(f"{waiting} batches of this agent are not written yet")
        if request.sequence and request.sent_unix_ms:
            metrics.BATCH_LAG.observe(max(0.0, time.time() - request.sent_unix_ms / 1000))
        result = self.topology.ingest(request, time.time())
        if new and request.lost_deltas:
            metrics.LOST_DELTAS.labels(request.node).inc(request.lost_deltas)
            self.topology.lost[request.node] = time.time()
        for outcome in ("counted", "duplicates", "other_observer", "overflow"):
            metrics.REPORT_EDGES.labels(outcome).inc(getattr(result, outcome))
        metrics.RESOLUTION_MISSES.inc(result.external)
        metrics.CONNECTION_OVERFLOW.inc(result.overflow)
        for key, action, sessions in result.blocked:
            if sessions:
                client, server = self.topology.groups[key[0]].peer, self.topology.groups[key[1]].peer
                labels = (client.group, client.namespace, server.group, server.namespace, str(key[2]), key[3])
                metrics.POLICY_VIOLATIONS.labels(*self._capped(labels, action)).inc(sessions)
        metrics.REPORTS.labels("applied" if request.sequence else "ack_query").inc()
        applied, received, waiting = ledger.progress(request.agent_id)
        return pb.ReportAck(applied=applied, received=received, waiting=waiting, leader=True)

    def _capped(self, labels: tuple[str, ...], action: str) -> tuple[str, ...]:
        """A violation series' labels, or "other" beyond the series cap."""
        if labels not in self.blocked_labels:
            if len(self.blocked_labels) >= self.settings.metrics_series_cap:
                return (*(("other",) * len(labels)), action)
            self.blocked_labels.add(labels)
        return (*labels, action)


class PolicyServicer(pb_grpc.PolicyServiceServicer):
    """Streams each node the policy its agent enforces: the current one at once, then every change.

    Only the leader streams (it alone keeps the learned rules up to date); a follower answers
    UNAVAILABLE and the agent, keeping its rules, tries again.
    """

    def __init__(self, auth: Authenticator, hub: PolicyHub, is_leader: Callable[[], bool]) -> None:
        self.auth, self.hub, self.is_leader = auth, hub, is_leader

    async def Watch(self, request: pb.WatchRequest,  # noqa: N802
                    context: grpc.aio.ServicerContext) -> AsyncIterator[pb.NodePolicy]:
        try:
            identity = await self.auth.identify(tuple(context.invocation_metadata() or ()))
            self.auth.authorize(identity, request.node)
        except (Unauthenticated, PermissionDenied, Unavailable) as exc:
            code, outcome = status_of(exc)
            if not isinstance(exc, Unavailable):
                metrics.REPORTS.labels(outcome).inc()
            await context.abort(code, str(exc))
        if not self.is_leader():
            await context.abort(grpc.StatusCode.UNAVAILABLE, "not the leader: policy comes from the leader")
        log.info("node %s takes policy", request.node)
        metrics.POLICY_WATCHERS.inc()
        try:
            async for policy in self.hub.stream(request.node):
                yield policy
                if not self.is_leader():  # lost the lead: the agent finds the new leader
                    return
        finally:
            metrics.POLICY_WATCHERS.dec()
