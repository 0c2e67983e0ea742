"""The dp's reports into the outbox: their source NAT undone, each taken once, gaps counted.

Reports are aggregated per edge (flowmap_agent.aggregation), passed through the one definition of
a valid report (``admit``: what no operator can count is set apart, flowmap_agent.quarantine) and
merged into the outbox. Where each dp worker's reports got to (flowmap_agent.positions, saved with
the outbox) tells a report sent again after a restart, which is skipped, from a gap in the
sequence, which is counted (``flowmap_agent_dp_report_gaps_total``); a new run id is a dp
restart (``flowmap_agent_dp_restarts_total``); the dp's own count of what it could not hand over
goes on as ``lost_deltas``, once.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor

from flowmap_agent import nat
from flowmap_agent.aggregation import Aggregator, admit
from flowmap_agent.errors import NoConntrack
from flowmap_agent.metrics import DP_RESTARTS, LOST, NAT_SESSIONS, NORMALISED, REPORT_GAPS, DpHealth
from flowmap_agent.outbox import Outbox
from flowmap_agent.policy.compiling import Block, PolicyInForce
from flowmap_agent.positions import follow
from flowmap_agent.quarantine import Quarantine
from flowmap_dp import wire_pb2

log = logging.getLogger("flowmap.agent")


class Intake:
    """What the dp reports, into the outbox; the dp's health, for the metrics and the captures."""

    def __init__(self, outbox: Outbox, health: DpHealth, quarantine: Quarantine,
                 captures_seen: Callable[[wire_pb2.Health], None]) -> None:
        self.outbox, self.health, self.quarantine, self.captures_seen = outbox, health, quarantine, captures_seen
        self.aggregator = Aggregator()
        self.unnat: nat.Unnat | None = None
        # pyroute2's netlink sockets run their own event loop: they live on a thread of their own.
        self.conntrack = ThreadPoolExecutor(1, thread_name_prefix="conntrack")
        self._close_conntrack: Callable[[], None] = lambda: None

    def enforced(self, policy: PolicyInForce) -> None:
        """A policy is in force: deltas from now on say what it did to them."""
        self.aggregator.policy = policy

    def blocking(self, block: Callable[[Sequence[Block]], bool], seconds: float, most: int) -> None:
        """Sessions whose threat the policy in force blocks go to ``block`` (Protect mode's table),
        for ``seconds``; at most ``most`` of them are remembered as blocked (the table's bound)."""
        a = self.aggregator
        a.block, a.block_seconds, a.max_blocked = block, seconds, most

    def own_addresses(self, own: frozenset[str]) -> None:
        """The node's own addresses, the same for the aggregation and the NAT's undoing."""
        self.aggregator.node_ips = own
        if self.unnat is not None:
            self.unnat.node_addresses = own

    def local_vms(self, by_ip: Mapping[str, str]) -> None:
        """The addresses of the node's libvirt VMs (-> UUID), the same for the aggregation and the NAT's undoing."""
        self.aggregator.local_vms = by_ip
        if self.unnat is not None:
            self.unnat.local_vms = by_ip

    async def open_conntrack(self, netns: str, own: frozenset[str], local_pods: Mapping[str, str]) -> None:
        """Read the node's connection tracking from now on, if it can be read (else say so, and go on)."""
        try:
            lookup, destination, close = await asyncio.get_running_loop().run_in_executor(
                self.conntrack, nat.conntrack_lookup, netns)
        except NoConntrack as exc:
            log.warning("no connection tracking (%s): masqueraded traffic will show as the node's", exc)
            return
        self.unnat = nat.Unnat(lookup, own, local_pods)
        self.unnat.local_vms = self.aggregator.local_vms
        self.aggregator.destination = destination
        self._close_conntrack = close

    async def close(self) -> None:
        """Close the connection tracking's sockets, on their thread, and the thread."""
        await asyncio.get_running_loop().run_in_executor(self.conntrack, self._close_conntrack)
        self.conntrack.shutdown()

    async def ingest(self, reports: list[wire_pb2.Report]) -> None:
        """The dp's reports, their source NAT undone (flowmap_agent.nat), into the outbox: on the
        conntrack thread, whose sockets the NAT undo and the judgement of DNAT'd edges read."""
        if not reports:
            return
        unnat = self.unnat
        translated, dropped = (unnat.translated, unnat.dropped) if unnat else (0, 0)

        def work() -> None:
            if unnat is not None:
                for r in reports:
                    unnat.apply(r)
            self.record(reports)

        await asyncio.get_running_loop().run_in_executor(self.conntrack, work)
        if unnat is not None:
            NAT_SESSIONS.labels("translated").inc(unnat.translated - translated)
            NAT_SESSIONS.labels("dropped").inc(unnat.dropped - dropped)

    def record(self, reports: list[wire_pb2.Report]) -> None:
        """The dp's reports into the outbox, each once (flowmap_agent.positions), through the
        one definition of a valid report (flowmap_agent.aggregation.admit)."""
        positions, box = self.outbox.dp_positions, self.outbox
        for report in reports:
            step, here = follow(positions.get(report.worker), report)
            if step.restarted:
                DP_RESTARTS.inc()  # its current interval died with it
            if not step.take:
                continue  # sent again after our restart, but saved before it: already counted
            if step.missing:
                # Sent by the dp, never taken here: dropped by it (counted in lost_reports too),
                # cut off with a broken connection, or read by an agent that died before saving.
                REPORT_GAPS.inc(step.missing)
                log.warning("dp worker %d: %d reports never arrived", report.worker, step.missing)
            deltas, names = self.aggregator.aggregate(report)
            admitted = admit(deltas, names)
            for (field, reason), n in admitted.tally.items():
                NORMALISED.labels(field, reason).inc(n)
            for d, problem in admitted.refused:
                box.lost_deltas += 1
                self.quarantine.add(d, problem, by="agent")
            box.add(admitted.edges, admitted.names)
            if report.HasField("health"):
                self.health.by_worker[report.worker] = report.health
                if report.worker == 0:  # it runs the node's packet captures (flowmap_dp.demand)
                    self.captures_seen(report.health)
                lost = report.health.lost_sessions - here.lost  # cumulative, per run: counted once
                if lost > 0:
                    here = here._replace(lost=report.health.lost_sessions)
                    box.lost_deltas += lost
                    LOST.inc(lost)
            positions[report.worker] = here
