"""Delivering the outbox to the operator: ``ReportService.Report``, one batch at a time, in order.

The agent's one connection to the operator's reports: TLS with the operator's CA, the projected
token read again for each delivery (it rotates). The loop never waits on the operator longer than
a send timeout, and a failure backs off with jitter (from 0.5 s: a batch the operator defers
because it names a pod it does not know yet goes again within a second). What a failed call means
is read in one place (flowmap_agent.errors.failure).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import grpc

from flowmap_agent.errors import Failed, Invalid, RefusedEdge, RefusedWhole, Resend, failure
from flowmap_agent.metrics import LAG, RECONNECTS, REPORT_SECONDS, REPORTS, SPLITS, UNACKED
from flowmap_agent.outbox import Outbox
from flowmap_agent.quarantine import Quarantine
from flowmap_agent.settings import Settings
from flowmap_api import report_pb2 as pb
from flowmap_api import report_pb2_grpc as pb_grpc
from flowmap_api.pacing import Backoff

log = logging.getLogger("flowmap.agent")
MAX_REFUSAL_ROUNDS = 64  # refusals handled in one delivery, before the next interval's


class Delivery:
    """The outbox's way to the operator: the channel, the backoff, and what a refusal changes."""

    def __init__(self, settings: Settings, outbox: Outbox, quarantine: Quarantine) -> None:
        self.settings, self.outbox, self.quarantine = settings, outbox, quarantine
        self.channel: grpc.aio.Channel | None = None
        self.retry_at = 0.0
        self.backoff = Backoff(0.5, 30.0, jitter=0.5)

    def _stub(self) -> pb_grpc.ReportServiceStub:
        if self.channel is None:
            creds = grpc.ssl_channel_credentials(root_certificates=Path(self.settings.ca_file).read_bytes())
            self.channel = grpc.aio.secure_channel(self.settings.operator, creds)
            RECONNECTS.inc()
        return pb_grpc.ReportServiceStub(self.channel)

    async def close(self) -> None:
        """Close the connection; the next delivery opens another."""
        if self.channel is not None:
            await self.channel.close()
            self.channel = None

    async def deliver(self) -> None:
        """Send what is not acknowledged, in order; on a failure, back off and resend later.

        A refusal is never a reason to drop what is unacknowledged: a batch refused for one edge
        (flowmap_agent.errors.RefusedEdge) loses that edge alone, counted, and goes again at once; a
        batch over the contract's limits is cut down and goes again at once; any other refusal is
        retried with backoff, and the batch kept, however long it takes (it is counted under
        ``flowmap_agent_reports_total`` by its code, and logged each time).
        """
        if time.monotonic() < self.retry_at:
            return
        box = self.outbox
        batch: pb.ReportBatch | None = None
        try:
            token = Path(self.settings.token_file).read_text().strip()
            rounds = 0
            again = True
            while again:
                again = False
                for batch in box.to_deliver():
                    try:
                        ack = await self._report(batch, token)
                    except RefusedWhole as exc:
                        if not self._refused(batch, exc):
                            raise
                        rounds += 1
                        again = rounds < MAX_REFUSAL_ROUNDS  # beyond: the next interval goes on, no backoff
                        break
                    box.delivered_ok(batch, ack)
            self.backoff.reset()
        except (Failed, grpc.RpcError, OSError) as exc:
            failed = exc if isinstance(exc, Failed) else failure(exc)
            if failed.status is not None:
                REPORTS.labels(failed.label).inc()
            if isinstance(failed, Invalid):
                # Nothing the agent can take out: kept, and retried, until an agent or operator that
                # agree on the contract are running.
                log.error("batch %d refused as invalid (%s): kept, resent in %.1f s", batch.sequence if batch else 0,
                          failed.details, self.backoff.current)
            else:
                log.warning("report failed (%s); resending from batch %d in %.1f s", failed.code, box.acked + 1,
                            self.backoff.current)
            box.failed()
            self.retry_at = time.monotonic() + self.backoff.next()
        UNACKED.set(box.edges)
        oldest = box.unacked[0].sent_unix_ms if box.unacked and box.unacked[0].sent_unix_ms else 0
        LAG.set(max(0.0, time.time() - oldest / 1000) if oldest else 0.0)

    async def _report(self, batch: pb.ReportBatch, token: str) -> pb.ReportAck:
        """One call; the operator's acknowledgement (flowmap_agent.errors.Failed if there is none)."""
        started = time.monotonic()
        try:
            ack: pb.ReportAck = await self._stub().Report(batch, metadata=(("authorization", f"Bearer {token}"),),
                                                          timeout=self.settings.send_timeout)
        except grpc.RpcError as exc:
            raise failure(exc) from exc
        REPORT_SECONDS.observe(time.monotonic() - started)
        if not ack.leader:
            REPORTS.labels("not_leader").inc()
            await self.close()  # a new connection may reach the leader
            raise Resend("ConnectionError", "not the leader")
        REPORTS.labels("ok").inc()
        return ack

    def _refused(self, batch: pb.ReportBatch, exc: RefusedWhole) -> bool:
        """A refusal the agent can act on at once: True once ``batch`` is fit to go again."""
        if isinstance(exc, RefusedEdge) and (bad := self.outbox.quarantine(batch, exc.edge)) is not None:
            REPORTS.labels("refused_edge").inc()
            self.quarantine.add(bad, exc.details or "refused", by="operator")
            return True
        if self.outbox.split(batch):
            REPORTS.labels("split").inc()
            SPLITS.inc()
            log.warning("batch %d was over the contract's limits (%s): cut down, the rest goes in the next batches",
                        batch.sequence, exc.details)
            return True
        return False
