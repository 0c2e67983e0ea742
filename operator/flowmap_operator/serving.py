"""The gRPC ReportService: a thin servicer over the pure topology, one place for status codes."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable

import grpc

from flowmap_api import report_pb2 as pb
from flowmap_api import report_pb2_grpc as pb_grpc
from flowmap_operator import metrics
from flowmap_operator.auth import Authenticator, PermissionDenied, Unauthenticated, Unavailable
from flowmap_operator.ledger import OutOfOrder
from flowmap_operator.settings import Settings
from flowmap_operator.topology import Crowded, Topology
from flowmap_operator.validation import InvalidReport, validate

log = logging.getLogger("flowmap.operator.serving")


class Busy(Exception):
    """The operator holds too much of this agent's unwritten data: retry later, keep the batch."""


class ReportServicer(pb_grpc.ReportServiceServicer):
    def __init__(self, topology: Topology, auth: Authenticator, settings: Settings,
                 is_leader: Callable[[], bool]) -> None:
        self.topology, self.auth, self.settings = topology, auth, settings
        self.is_leader = is_leader

    async def Report(self, request: pb.ReportBatch, context: grpc.aio.ServicerContext) -> pb.ReportAck:  # noqa: N802
        code, message = grpc.StatusCode.OK, ""
        try:
            return await self._report(request, context)
        except Unauthenticated as exc:
            code, message, outcome = grpc.StatusCode.UNAUTHENTICATED, str(exc), "unauthenticated"
        except PermissionDenied as exc:
            code, message, outcome = grpc.StatusCode.PERMISSION_DENIED, str(exc), "permission_denied"
        except InvalidReport as exc:
            code, message, outcome = grpc.StatusCode.INVALID_ARGUMENT, str(exc), "invalid"
        except OutOfOrder as exc:
            code, message, outcome = grpc.StatusCode.FAILED_PRECONDITION, str(exc), "out_of_order"
        except (Busy, Crowded) as exc:
            code, message, outcome = grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc), "busy"
        except Unavailable as exc:
            code, message, outcome = grpc.StatusCode.UNAVAILABLE, str(exc), "unavailable"
        metrics.REPORTS.labels(outcome).inc()
        # Back-pressure is routine under load (one line per agent per second): only counted.
        log.log(logging.DEBUG if outcome == "busy" else logging.INFO, "report refused (%s): %s", code.name, message)
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
        for outcome in ("counted", "duplicates", "other_observer", "overflow"):
            metrics.REPORT_EDGES.labels(outcome).inc(getattr(result, outcome))
        metrics.RESOLUTION_MISSES.inc(result.external)
        metrics.CONNECTION_OVERFLOW.inc(result.overflow)
        metrics.REPORTS.labels("applied" if request.sequence else "ack_query").inc()
        applied, received, waiting = ledger.progress(request.agent_id)
        return pb.ReportAck(applied=applied, received=received, waiting=waiting, leader=True)


class PolicyServicer(pb_grpc.PolicyServiceServicer):
    """Streams each node the policy it enforces: the current one at once, then every change.

    Until a NetworkLearningPolicy in Protect mode selects a pod on the node, that policy is
    empty (nothing is enforced); the policy compiler is what fills it.
    """

    def __init__(self, auth: Authenticator, policies: Callable[[str], pb.NodePolicy]) -> None:
        self.auth, self.policies = auth, policies

    async def Watch(self, request: pb.WatchRequest,  # noqa: N802
                    context: grpc.aio.ServicerContext) -> AsyncIterator[pb.NodePolicy]:
        try:
            identity = await self.auth.identify(tuple(context.invocation_metadata() or ()))
            self.auth.authorize(identity, request.node)
        except Unauthenticated as exc:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, str(exc))
        except PermissionDenied as exc:
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, str(exc))
        except Unavailable as exc:
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(exc))
        yield self.policies(request.node)
        await asyncio.Event().wait()  # held open (policy changes will be sent here) until the agent goes
