"""The gRPC services: thin servicers over the pure topology, behind one gate; one place for status codes.

The gate (``Gate``) authenticates every call from its metadata before the call's message is read:
an unauthenticated client costs a metadata frame, never a parsed message. It then reads the one
request message and parses it itself, so a message that is not protobuf is INVALID_ARGUMENT and
counted (grpc.aio would answer UNKNOWN with a traceback), and it parses at most
``max_reports_at_once`` reports at a time, each at most MAX_MESSAGE_BYTES (the server's receive
limit). A stream of requests (an agent's Upload) is parsed message by message as the servicer
reads it, after the same authentication; its bounds are flowmap_operator.uploading's.
``OPTIONS`` bounds the connections themselves.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from contextvars import ContextVar
from typing import Any, NoReturn

import grpc
from google.protobuf.message import DecodeError
from prometheus_client import Counter as Series

from flowmap_api import report_pb2 as pb
from flowmap_api import report_pb2_grpc as pb_grpc
from flowmap_api.limits import MAX_MESSAGE_BYTES
from flowmap_api.validity import REFUSED_EDGE
from flowmap_operator import capturing, metrics
from flowmap_operator.auth import Authenticator, Identity
from flowmap_operator.errors import (Busy, Crowded, InvalidReport, Malformed, NotKnownYet, NotRequested, OutOfOrder,
                                     PermissionDenied, Unauthenticated, Unavailable, Withdrawn)
from flowmap_operator.policy.publishing import PolicyHub
from flowmap_operator.recording import CaptureHub
from flowmap_operator.settings import Settings
from flowmap_operator.topology import Topology
from flowmap_operator.uploading import Uploads
from flowmap_operator.validation import validate, validate_captures

log = logging.getLogger("flowmap.operator.serving")
# The one mapping of the operator's errors (flowmap_operator.errors) to gRPC status codes, with the
# outcome label they are counted under. INVALID_ARGUMENT is the only refusal that would repeat.
STATUS: dict[type[Exception], tuple[grpc.StatusCode, str]] = {
    Unauthenticated: (grpc.StatusCode.UNAUTHENTICATED, "unauthenticated"),
    PermissionDenied: (grpc.StatusCode.PERMISSION_DENIED, "permission_denied"),
    Malformed: (grpc.StatusCode.INVALID_ARGUMENT, "malformed"),
    InvalidReport: (grpc.StatusCode.INVALID_ARGUMENT, "invalid"),
    OutOfOrder: (grpc.StatusCode.FAILED_PRECONDITION, "out_of_order"),
    Busy: (grpc.StatusCode.RESOURCE_EXHAUSTED, "busy"),
    Crowded: (grpc.StatusCode.RESOURCE_EXHAUSTED, "busy"),
    Unavailable: (grpc.StatusCode.UNAVAILABLE, "unavailable"),
    # "Retry with backoff" in gRPC's own words; the agent keeps the batch and starts at 0.5 s.
    NotKnownYet: (grpc.StatusCode.UNAVAILABLE, "deferred"),
    # An upload the operator did not ask for: the agent stops sending it (and never retries it).
    NotRequested: (grpc.StatusCode.FAILED_PRECONDITION, "not_requested"),
    Withdrawn: (grpc.StatusCode.CANCELLED, "withdrawn"),
}
REFUSALS = tuple(STATUS)
# Routine under load, while a pod is new, or when a user stops a download: only counted.
QUIET = frozenset({"busy", "deferred", "withdrawn"})

# The server's channel arguments. Agents report every second on one connection and hold a policy
# stream on another (pinging every 300 s), so none of these limits touches them; they bound what a
# stranger can hold: idle or half-open connections, streams per connection, pings.
OPTIONS: tuple[tuple[str, int], ...] = (
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_concurrent_streams", 64),  # per connection: an agent uses one per channel; beyond, REFUSED_STREAM
    # No window growth by bandwidth-delay probing: with it, the core took in ~100 MiB of strangers'
    # messages that nothing reads (measured, tests/operator/test_strangers.py); without, ~4 MiB. A
    # 3.3 MB report took the same time either way on loopback (not measured across a slow link).
    ("grpc.http2.bdp_probe", 0),
    ("grpc.keepalive_time_ms", 120_000),  # ping the client after 2 idle minutes: finds dead peers
    ("grpc.keepalive_timeout_ms", 20_000),
    ("grpc.keepalive_permit_without_calls", 0),  # a client pinging with no call open is misbehaving
    ("grpc.http2.min_ping_interval_without_data_ms", 60_000),  # more often: GOAWAY after max_ping_strikes
    ("grpc.http2.max_ping_strikes", 2),
    ("grpc.max_connection_idle_ms", 300_000),  # no call for 5 minutes: closed (a client reconnects at will)
    # Every connection is renewed within an hour (±10 % jitter from gRPC); a policy stream open then
    # is ended after the grace and the agent resumes it, keeping its rules meanwhile.
    ("grpc.max_connection_age_ms", 3_600_000),
    ("grpc.max_connection_age_grace_ms", 300_000),
)

# Who the gate authenticated the current call as (each call runs in a task of its own).
IDENTITY: ContextVar[Identity] = ContextVar("flowmap_identity")


def status_of(exc: Exception) -> tuple[grpc.StatusCode, str]:
    """The status code and outcome label of one of the operator's errors."""
    return next(STATUS[t] for t in type(exc).__mro__ if t in STATUS)


class Tally:
    """Refusal log lines as a count per interval, not a line per refusal: the first refusal after a
    quiet interval is logged as it comes, the others of the interval are summed into one line."""

    def __init__(self, interval: float = 10.0) -> None:
        self.interval = interval
        self.until = float("-inf")  # the end of the interval in which lines are summed
        self.counts: Counter[str] = Counter()
        self.latest: dict[str, str] = {}

    def note(self, outcome: str, message: str, now: float) -> list[str]:
        """The lines to log now for one refusal."""
        if now < self.until:
            self.counts[outcome] += 1
            self.latest[outcome] = message
            return []
        self.until = now + self.interval
        return [*self.summary(), f"refused ({outcome}): {message}"]

    def summary(self) -> list[str]:
        """The line summing the refusals not logged yet, if any."""
        if not self.counts:
            return []
        total, kinds = sum(self.counts.values()), ", ".join(f"{k} {n}" for k, n in self.counts.most_common())
        latest = "; ".join(f"{k}: {m}" for k, m in self.latest.items())
        self.counts.clear()
        self.latest.clear()
        return [f"refused {total} more in {self.interval:.0f} s ({kinds}); latest: {latest}"]


class Refusals:
    """Each refusal counted by outcome, logged through a Tally, and answered with its status code."""

    def __init__(self, tally: Tally | None = None) -> None:
        self.tally = tally or Tally()
        self._flush: asyncio.TimerHandle | None = None

    async def refuse(self, exc: Exception, context: grpc.aio.ServicerContext) -> NoReturn:
        (code, outcome), message = status_of(exc), str(exc)
        metrics.REPORTS.labels(outcome).inc()
        if isinstance(exc, NotKnownYet):
            metrics.DEFERRALS.labels(exc.node).inc()
        if outcome in QUIET:
            log.debug("refused (%s): %s", outcome, message)
        else:
            for line in self.tally.note(outcome, message, time.monotonic()):
                log.info("%s", line)
            if self.tally.counts and self._flush is None:  # the interval's sum, even if nothing follows
                self._flush = asyncio.get_running_loop().call_later(self.tally.interval + 0.1, self._log_summary)
        trailing: tuple[tuple[str, str], ...] = ()
        if isinstance(exc, InvalidReport) and exc.edge is not None:
            trailing = ((REFUSED_EDGE, str(exc.edge)),)
        await context.abort(code, message, trailing_metadata=trailing)
        raise AssertionError("unreachable")  # context.abort raises

    def _log_summary(self) -> None:
        self._flush = None  # scheduled after the interval in which the refusals were summed
        for line in self.tally.summary():
            log.info("%s", line)


class Gate(grpc.aio.ServerInterceptor):  # type: ignore[misc]  # grpc ships no type hints
    """Every call authenticated from its metadata before its message is read, then parsed here.

    A unary request becomes a stream of one to the server (``request_deserializer`` None: raw
    bytes), so that nothing of it is read until the token is known good. A method taking a stream
    and answering one message (Upload) gets its requests parsed here one by one as it reads them
    (a message that is not protobuf: Malformed, raised to the servicer); one taking and answering
    streams is not served (UNIMPLEMENTED): there is none.
    """

    def __init__(self, auth: Authenticator, refusals: Refusals, reports_at_once: int) -> None:
        self.auth, self.refusals = auth, refusals
        self.parsing = asyncio.Semaphore(reports_at_once)

    async def intercept_service(self, continuation: Callable[[grpc.HandlerCallDetails],
                                                             Awaitable[grpc.RpcMethodHandler | None]],
                                details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        handler = await continuation(details)
        if handler is None or (handler.request_streaming and handler.response_streaming):
            return None
        parse: Callable[[bytes], Any] = handler.request_deserializer
        if handler.request_streaming:
            taking = handler.stream_unary

            async def taken(requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> Any:
                await self._authenticate(context)
                return await taking(self._each(requests, parse), context)

            return grpc.stream_unary_rpc_method_handler(taken, response_serializer=handler.response_serializer)
        if handler.response_streaming:
            stream = handler.unary_stream

            async def streaming(requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
                await self._authenticate(context)
                request = await self._read(requests, parse, context)
                async for response in stream(request, context):
                    yield response

            return grpc.stream_stream_rpc_method_handler(streaming, response_serializer=handler.response_serializer)
        unary = handler.unary_unary

        async def answering(requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> Any:
            await self._authenticate(context)
            async with self.parsing:  # parsed and applied a few at a time: bounded memory
                request = await self._read(requests, parse, context)
                return await unary(request, context)

        return grpc.stream_unary_rpc_method_handler(answering, response_serializer=handler.response_serializer)

    async def _authenticate(self, context: grpc.aio.ServicerContext) -> None:
        try:
            IDENTITY.set(await self.auth.identify(tuple(context.invocation_metadata() or ()), context.peer()))
        except (Unauthenticated, Unavailable) as exc:
            await self.refusals.refuse(exc, context)

    @staticmethod
    async def _each(requests: AsyncIterator[bytes], parse: Callable[[bytes], Any]) -> AsyncIterator[Any]:
        """Each message of a request stream, parsed as the servicer asks for it."""
        index = 0
        async for raw in requests:
            try:
                message = parse(raw)
            except (DecodeError, ValueError, TypeError) as exc:
                raise Malformed(f"message {index} of the stream is not a valid message: {exc}"[:256]) from None
            yield message
            index += 1

    async def _read(self, requests: AsyncIterator[bytes], parse: Callable[[bytes], Any],
                    context: grpc.aio.ServicerContext) -> Any:
        async for raw in requests:
            break
        else:
            # None sent, or one above the receive limit: gRPC has answered RESOURCE_EXHAUSTED already.
            await self.refusals.refuse(Malformed(f"no request message read (none sent, or one above "
                                                 f"{MAX_MESSAGE_BYTES} bytes)"), context)
        try:
            return parse(raw)
        except (DecodeError, ValueError, TypeError) as exc:
            await self.refusals.refuse(Malformed(f"the request is not a valid message: {exc}"[:256]), context)


class ReportServicer(pb_grpc.ReportServiceServicer):
    def __init__(self, topology: Topology, auth: Authenticator, settings: Settings, refusals: Refusals,
                 is_leader: Callable[[], bool], saw: Callable[[list[capturing.Event]], None] = lambda _: None) -> None:
        self.topology, self.auth, self.settings, self.refusals = topology, auth, settings, refusals
        self.is_leader, self.saw = is_leader, saw
        self.blocked_labels: set[tuple[str, ...]] = set()  # violation series, capped
        # The series every batch counts in, each looked up once: labels() costs ~1.5 µs a call.
        self._series: dict[tuple[str, str], Series] = {}

    async def Report(self, request: pb.ReportBatch, context: grpc.aio.ServicerContext) -> pb.ReportAck:  # noqa: N802
        try:
            return self._report(request)
        except REFUSALS as exc:
            await self.refusals.refuse(exc, context)

    def _report(self, request: pb.ReportBatch) -> pb.ReportAck:
        self.auth.authorize(IDENTITY.get(), request.node)
        normalised = validate(request, max_edges=self.settings.max_batch_edges)
        if not self.is_leader():
            metrics.REPORTS.labels("not_leader").inc()
            return pb.ReportAck(applied=0, leader=False)
        ledger = self.topology.ledger
        new = ledger.admit(request.agent_id, request.sequence, self.settings.max_waiting_batches)
        if request.sequence and request.sent_unix_ms:
            metrics.BATCH_LAG.observe(max(0.0, time.time() - request.sent_unix_ms / 1000))
        result = self.topology.ingest(request, time.time())
        self.saw(result.events)  # a capture's trigger
        if new:  # a batch resent until acknowledged is normalised again, and counted once
            for (field, reason), count in normalised.items():
                metrics.NORMALISED.labels(field, reason).inc(count)
        if new and request.lost_deltas:
            metrics.LOST_DELTAS.labels(request.node).inc(request.lost_deltas)
            self.topology.lost[request.node] = time.time()
        for outcome in ("counted", "duplicates", "other_observer", "overflow"):
            self._series_of("edges", outcome).inc(getattr(result, outcome))
        metrics.RESOLUTION_MISSES.inc(result.external)
        metrics.CONNECTION_OVERFLOW.inc(result.overflow)
        for key, action, sessions in result.blocked:
            if sessions:
                client, server = self.topology.groups[key[0]].peer, self.topology.groups[key[1]].peer
                labels = (client.group, client.namespace, server.group, server.namespace, str(key[2]), key[3])
                metrics.POLICY_VIOLATIONS.labels(*self._capped(labels, action)).inc(sessions)
        self._series_of("reports", "applied" if request.sequence else "ack_query").inc()
        applied, received, still_waiting = ledger.progress(request.agent_id)
        return pb.ReportAck(applied=applied, received=received, waiting=still_waiting, leader=True)

    def _series_of(self, family: str, outcome: str) -> Series:
        """The series of REPORTS ("reports") or REPORT_EDGES ("edges") for ``outcome``."""
        series = self._series.get((family, outcome))
        if series is None:
            metric = metrics.REPORTS if family == "reports" else metrics.REPORT_EDGES
            series = self._series[(family, outcome)] = metric.labels(outcome)
        return series

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

    def __init__(self, auth: Authenticator, hub: PolicyHub, refusals: Refusals, is_leader: Callable[[], bool]) -> None:
        self.auth, self.hub, self.refusals, self.is_leader = auth, hub, refusals, is_leader

    async def Watch(self, request: pb.WatchRequest,  # noqa: N802
                    context: grpc.aio.ServicerContext) -> AsyncIterator[pb.NodePolicy]:
        try:
            self.auth.authorize(IDENTITY.get(), request.node)
        except PermissionDenied as exc:
            await self.refusals.refuse(exc, context)
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


class CaptureServicer(pb_grpc.CaptureServiceServicer):
    """Streams each node the packet captures it runs and takes how they stand, as PolicyServicer
    does policy: a token watches, reports and uploads for its own node only, and only the leader
    keeps captures (a follower answers UNAVAILABLE to a watch and ``leader=false`` to a report or
    an upload). An upload serves one of the operator's fetches (flowmap_operator.uploading)."""

    def __init__(self, auth: Authenticator, hub: CaptureHub, refusals: Refusals, is_leader: Callable[[], bool],
                 uploads: Uploads) -> None:
        self.auth, self.hub, self.refusals, self.is_leader, self.uploads = auth, hub, refusals, is_leader, uploads

    async def Watch(self, request: pb.WatchRequest,  # noqa: N802
                    context: grpc.aio.ServicerContext) -> AsyncIterator[pb.NodeCaptures]:
        try:
            self.auth.authorize(IDENTITY.get(), request.node)
        except PermissionDenied as exc:
            await self.refusals.refuse(exc, context)
        if not self.is_leader():
            await context.abort(grpc.StatusCode.UNAVAILABLE, "not the leader: captures come from the leader")
        log.info("node %s takes captures", request.node)
        async for captures in self.hub.stream(request.node):
            yield captures
            if not self.is_leader():  # lost the lead: the agent finds the new leader
                return

    async def Report(self, request: pb.CaptureReport,  # noqa: N802
                     context: grpc.aio.ServicerContext) -> pb.CaptureReportAck:
        try:
            return self._report(request)
        except REFUSALS as exc:
            await self.refusals.refuse(exc, context)

    def _report(self, request: pb.CaptureReport) -> pb.CaptureReportAck:
        self.auth.authorize(IDENTITY.get(), request.node)
        validate_captures(request)
        if not self.is_leader():
            return pb.CaptureReportAck(leader=False)
        self.hub.reported(request.node, request.captures)
        return pb.CaptureReportAck(leader=True)

    async def Upload(self, request_iterator: AsyncIterator[pb.UploadChunk],  # noqa: N802
                     context: grpc.aio.ServicerContext) -> pb.UploadAck:
        try:
            return await self._upload(request_iterator)
        except REFUSALS as exc:
            await self.refusals.refuse(exc, context)

    async def _upload(self, chunks: AsyncIterator[pb.UploadChunk]) -> pb.UploadAck:
        try:  # an authenticated stream that names nothing holds no call for long
            first = await asyncio.wait_for(anext(chunks, None), self.uploads.stall_timeout)
        except asyncio.TimeoutError:
            raise Malformed(f"no first chunk within {self.uploads.stall_timeout:g} s") from None
        if first is None:
            raise Malformed("an upload with no chunk")
        self.auth.authorize(IDENTITY.get(), first.node)
        if not self.is_leader():
            return pb.UploadAck(leader=False)
        await self.uploads.receive(first.node, first, chunks)
        return pb.UploadAck(leader=True)
