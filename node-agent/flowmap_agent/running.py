"""``flowmap agent run``: the dp (a child, or external), local pods, per-edge deltas, reports to the operator.

Each interval: read the node's plumbing over netlink (flowmap_agent.links, .plumbing) and tell
the dp what to capture (the host side of each local pod's veth, found through its peer on any
veth-based CNI; the uplinks; the overlay's tunnels), the node's own addresses (every global
address on an interface that is up: they change, a CNI's bridge and tunnel appear with the
first pod) and the overlay's encapsulation to drop on the uplinks; take the dp's reports (read
off its socket as they arrive, flowmap_agent.receiving), aggregate them per edge, pass them
through the one definition of a valid report, cut numbered batches within the contract's limits,
save the outbox to disk, then deliver
whatever is not acknowledged, each batch saying the node's own addresses as they are when it is
sent (``node_addresses``: another node's report of them, a hostNetwork client arriving through the
tunnel, is then this node's, not a pod's nor the outside's). The loop never waits on the operator
longer than a send timeout, and backs off with jitter (from 0.5 s: a batch the operator defers
because it names a pod it does not know yet goes again within a second). The dp starts with
the Node object's addresses and takes the rest from the agent, so it also counts what the node
itself sends (a kubelet probe from a bridge's gateway address too), where it leaves the node.
Alongside, Protect mode (flowmap_agent.policy) keeps the node's nftables table to the policy
the operator streams, and each delta says what that policy did to it; and the packet captures
the operator orders (flowmap_agent.capturing) go to the dp in every Control, their statuses back.

What a crash can lose, exactly, and how it is counted:

* a crash, restart or upgrade of the agent loses nothing when the dp runs on its own
  (``FLOWMAP_AGENT_DP=external``: the DaemonSet flowmap-dp beside the agent's): the dp keeps
  capturing, keeps every report until the agent has saved it (``Ack``), queues new ones
  (``--queue``) and sends them all to the next agent, which skips what it had saved already; a gap in the reports' sequence would still be counted
  (``flowmap_agent_dp_report_gaps_total``). With the dp as a child, it goes with the agent (it
  gets SIGTERM when the agent dies, so a restarted agent never shares the rings with an orphan),
  losing its current interval and what passes until the next one captures. Either way the
  restarted agent counts the run that did not stop cleanly (``flowmap_agent_unclean_restarts_total``);
* a crash of the dp loses the deltas it held for its current interval, and the packets that pass
  until a new dp captures (the agent restarts a child at once; an external one is restarted by the
  kubelet); the agent sees the dp's new run id and counts the restart
  (``flowmap_agent_dp_restarts_total``);
* reports the dp could not hand over (agent away past its queue) it counts as
  ``lost_reports``/``lost_sessions``; the agent forwards those as ``lost_deltas``, which the
  operator counts per node (once: where the count stood is saved with the outbox). The agent
  counts, itself, every report that never reached it (``flowmap_agent_dp_report_gaps_total``:
  whole intervals or parts of one) and every connection to its socket it closed, by reason
  (``flowmap_agent_dp_stream_errors_total``), so a loss shows even when the reports carrying the
  dp's own counts are lost;
* an edge delta no operator can count (an address that is not one, a port above 65535) is set
  apart, logged once and counted (``flowmap_agent_quarantined_edges_total``, and ``lost_deltas``);
  no refusal of the operator makes the agent drop anything else (see :meth:`Agent.deliver`).

Nothing is lost silently.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import secrets
import signal
import sys
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
from aiohttp import web
from kubernetes_asyncio import client, config
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from flowmap_agent import links, nat, plumbing
from flowmap_agent.aggregation import Aggregator, admit
from flowmap_agent.captures import Orders, local_pods
from flowmap_agent.capturing import Capturer
from flowmap_agent.deltas import EdgeKey, edge_key
from flowmap_agent.errors import Failed, Invalid, NoConntrack, RefusedEdge, RefusedWhole, Resend, StateError, failure
from flowmap_agent.listening import ReportReader
from flowmap_agent.outbox import Outbox
from flowmap_agent.pods import LocalPods
from flowmap_agent.policy.compiling import PolicyInForce
from flowmap_agent.policy.protecting import Protector
from flowmap_agent.positions import acks, follow
from flowmap_agent.receiving import Receiver
from flowmap_agent.settings import Settings
from flowmap_api import report_pb2 as pb
from flowmap_api import report_pb2_grpc as pb_grpc
from flowmap_api import validity
from flowmap_api.pacing import Backoff, pause
from flowmap_dp import wire_pb2

log = logging.getLogger("flowmap.agent")
STOP_DEADLINE = 10.0
PR_SET_PDEATHSIG = 1

REGISTRY = CollectorRegistry(auto_describe=True)
REPORT_SECONDS = Histogram("flowmap_agent_report_seconds", "Latency of one report call to the operator.",
                           registry=REGISTRY)
REPORTS = Counter("flowmap_agent_reports", "Report calls by result.", ("result",), registry=REGISTRY)
RECONNECTS = Counter("flowmap_agent_reconnects", "New connections to the operator.", registry=REGISTRY)
DP_RESTARTS = Counter("flowmap_agent_dp_restarts", "dp restarts seen (a new run id): their last interval is lost.",
                      registry=REGISTRY)
NAT_SESSIONS = Counter("flowmap_agent_nat_sessions",
                       "Source-NATed sessions of the node: translated back to their pod, or dropped as the kernel's "
                       "plumbing of a session counted where it entered.", ("outcome",), registry=REGISTRY)
REPORT_GAPS = Counter("flowmap_agent_dp_report_gaps",
                      "dp reports that never reached the agent (a gap in their sequence).", registry=REGISTRY)
UNCLEAN = Counter("flowmap_agent_unclean_restarts",
                  "Starts after a run that did not stop cleanly (with the dp a child, it died too: its last "
                  "interval and what passed until the next dp captured are lost).", registry=REGISTRY)
LOST = Counter("flowmap_agent_lost_sessions", "Session records lost between the dp and the operator.",
               registry=REGISTRY)
UNACKED = Gauge("flowmap_agent_unacked_edges", "Edge deltas held until the operator acknowledges them.",
                registry=REGISTRY)
LAG = Gauge("flowmap_agent_report_lag_seconds", "Age of the oldest unacknowledged batch.", registry=REGISTRY)
NORMALISED = Counter("flowmap_agent_normalised", "Metadata of deltas and names normalised or dropped before a batch "
                     "(flowmap_api.validity), by field and reason: the counts still go.", ("field", "reason"),
                     registry=REGISTRY)
QUARANTINED = Counter("flowmap_agent_quarantined_edges",
                      "Edge deltas no operator can count (an address that is not one, a port above 65535...), set "
                      "apart before a batch (agent) or named by the operator's refusal (operator); each is counted "
                      "in lost_deltas too.", ("by",), registry=REGISTRY)
SPLITS = Counter("flowmap_agent_split_batches",
                 "Batches over the contract's limits (from an older agent's state), refused whole and cut down.",
                 registry=REGISTRY)
MAX_QUARANTINE_LOG = 4096  # edges whose quarantine was logged (each once), remembered
MAX_REFUSAL_ROUNDS = 64  # refusals handled in one delivery, before the next interval's


class DpHealth:
    """The dp's cumulative health counters, summed over its workers, exported as-is."""

    def __init__(self) -> None:
        self.by_worker: dict[int, wire_pb2.Health] = {}

    def collect(self) -> Iterator[Metric]:
        def total(field: str) -> float:
            return float(sum(getattr(h, field) for h in self.by_worker.values()))

        for field, help_text in (("packets", "Frames taken from the rings."),
                                 ("kernel_drops", "Frames the kernel dropped: ring full."),
                                 ("evictions", "Sessions evicted at the table bound."),
                                 ("lost_reports", "dp reports not handed to the agent.")):
            yield CounterMetricFamily(f"flowmap_agent_dp_{field}", help_text, value=total(field))
        malformed = CounterMetricFamily("flowmap_agent_dp_malformed", "Frames refused by reason.",
                                        labels=("reason",))
        reasons: dict[str, int] = {}
        for h in self.by_worker.values():
            for reason, n in h.malformed.items():
                reasons[reason] = reasons.get(reason, 0) + n
        for reason, n in sorted(reasons.items()):
            malformed.add_metric((reason,), float(n))
        yield malformed
        yield GaugeMetricFamily("flowmap_agent_dp_sessions", "Sessions in the dp's tables.", value=total("table_size"))
        attached = {i for h in self.by_worker.values() for i in h.interfaces}
        yield GaugeMetricFamily("flowmap_agent_dp_interfaces", "Interfaces the dp captures on.", value=len(attached))


class Agent:
    def __init__(self, settings: Settings, registry: CollectorRegistry = REGISTRY) -> None:
        self.settings = settings
        self.registry = registry  # where this agent's own collectors go (a test makes several agents)
        self.stop = asyncio.Event()
        self.health = DpHealth()
        registry.register(self.health)
        self.receiver: Receiver | None = None
        self.outbox = self._load_outbox()
        # A node name no operator would take makes every batch fail, forever: say so now.
        validity.check_batch(pb.ReportBatch(agent_id=self.outbox.agent_id, node=settings.node))
        self.logged: set[EdgeKey] = set()  # quarantined edges already logged
        self.aggregator = Aggregator()
        self.unnat: nat.Unnat | None = None
        # pyroute2's netlink sockets run their own event loop: they live on a thread of their own.
        self.conntrack = ThreadPoolExecutor(1, thread_name_prefix="conntrack")
        self.channel: grpc.aio.Channel | None = None
        self.retry_at = 0.0
        self.backoff = Backoff(0.5, 30.0, jitter=0.5)
        self.last_tick = time.monotonic()
        self.protector = Protector(settings, registry, applied=self.protected)
        self.capturer = Capturer(settings, registry)
        self.told: tuple[plumbing.Plan, Orders] | None = None  # what the dp was told last

    def protected(self, policy: PolicyInForce) -> None:
        """A policy is in force: deltas from now on say what it did to them."""
        self.aggregator.policy = policy

    def _load_outbox(self) -> Outbox:
        s, path = self.settings, Path(self.settings.state_file)
        if path.exists():
            try:
                box = Outbox.load(path, s.node, window=s.window, interval_ms=int(s.interval * 1000))
                log.info("resumed as %s at batch %d (%d unacknowledged)", box.agent_id, box.sequence, len(box.unacked))
                return box
            except (StateError, OSError) as exc:
                log.error("cannot resume from %s (%s): starting afresh", path, exc)
        # An agent id is at most 128 characters (flowmap_api.validity); a node name may be 253.
        return Outbox(f"{s.node[:114]}/{secrets.token_hex(6)}", s.node, window=s.window,
                      interval_ms=int(s.interval * 1000))

    # -- the operator ----------------------------------------------------------------------------

    def _stub(self) -> pb_grpc.ReportServiceStub:
        if self.channel is None:
            creds = grpc.ssl_channel_credentials(root_certificates=Path(self.settings.ca_file).read_bytes())
            self.channel = grpc.aio.secure_channel(self.settings.operator, creds)
            RECONNECTS.inc()
        return pb_grpc.ReportServiceStub(self.channel)

    async def _drop_channel(self) -> None:
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
            await self._drop_channel()  # a new connection may reach the leader
            raise Resend("ConnectionError", "not the leader")
        REPORTS.labels("ok").inc()
        return ack

    def _refused(self, batch: pb.ReportBatch, exc: RefusedWhole) -> bool:
        """A refusal the agent can act on at once: True once ``batch`` is fit to go again."""
        if isinstance(exc, RefusedEdge) and (bad := self.outbox.quarantine(batch, exc.edge)) is not None:
            REPORTS.labels("refused_edge").inc()
            self.quarantined(bad, exc.details or "refused", by="operator")
            return True
        if self.outbox.split(batch):
            REPORTS.labels("split").inc()
            SPLITS.inc()
            log.warning("batch %d was over the contract's limits (%s): cut down, the rest goes in the next batches",
                        batch.sequence, exc.details)
            return True
        return False

    def quarantined(self, d: pb.EdgeDelta, reason: str, *, by: str) -> None:
        """Count an edge delta no operator can count; log it the first time its edge is seen so."""
        QUARANTINED.labels(by).inc()
        key = edge_key(d)
        if key in self.logged or len(self.logged) >= MAX_QUARANTINE_LOG:
            return
        self.logged.add(key)
        protocol = pb.Protocol.Name(d.protocol) if d.protocol in pb.Protocol.values() else str(d.protocol)
        log.error("edge %r -> %r port %d %s cannot be counted (%s): its deltas are set apart and counted as lost "
                  "(%d bytes this time); logged once", d.client.ip[:64], d.server.ip[:64], d.server.port, protocol,
                  reason[:200], d.bytes_c2s + d.bytes_s2c)

    # -- the dp ----------------------------------------------------------------------------------

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
            self.take(reports)

        await asyncio.get_running_loop().run_in_executor(self.conntrack, work)
        if unnat is not None:
            NAT_SESSIONS.labels("translated").inc(unnat.translated - translated)
            NAT_SESSIONS.labels("dropped").inc(unnat.dropped - dropped)

    def take(self, reports: list[wire_pb2.Report]) -> None:
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
                self.quarantined(d, problem, by="agent")
            box.add(admitted.edges, admitted.names)
            if report.HasField("health"):
                self.health.by_worker[report.worker] = report.health
                if report.worker == 0:  # it runs the node's packet captures (flowmap_dp.demand)
                    self.capturer.took(report.health)
                lost = report.health.lost_sessions - here.lost  # cumulative, per run: counted once
                if lost > 0:
                    here = here._replace(lost=report.health.lost_sessions)
                    box.lost_deltas += lost
                    LOST.inc(lost)
            positions[report.worker] = here

    async def run_dp(self, local_addresses: Sequence[str]) -> None:
        """Keep the dp running as a child (``python -m flowmap_dp``, the arguments of ``flowmap dp run``);
        restart it (with backoff) if it exits.

        ``local_addresses`` are the node's own to start with (the Node object's, as the DaemonSet
        gives the external one): the dp counts what the node sends from them where it leaves (see
        ``flowmap_dp.capture``, "Direction"); the agent adds the rest at run time.
        """
        s = self.settings
        own = [arg for address in local_addresses for arg in ("--local-address", address)]
        backoff, at_once = Backoff(0.5, 30.0), True  # every moment without a dp is traffic not seen: restart
        while not self.stop.is_set():
            started = time.monotonic()
            inside = ("ip", "netns", "exec", s.netns) if s.netns else ()
            proc = await asyncio.create_subprocess_exec(
                *inside, sys.executable, "-m", "flowmap_dp", "--socket", s.socket, "--interval", str(s.interval),
                "--workers", str(s.dp_workers), *own, *s.dp_args.split(), preexec_fn=_die_with_parent)
            waiter = asyncio.ensure_future(proc.wait())
            await asyncio.wait([waiter, asyncio.ensure_future(self.stop.wait())], return_when=asyncio.FIRST_COMPLETED)
            if not waiter.done():
                proc.send_signal(signal.SIGTERM)  # its last report comes before it exits
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(waiter, STOP_DEADLINE / 2)
                if not waiter.done():
                    proc.kill()
                return
            if time.monotonic() - started > 60:
                backoff.reset()  # it ran well for a while: this is a new failure, not a crash loop
                at_once = True
            delay, at_once = (0.0 if at_once else backoff.next()), False  # at once, then back off
            log.error("the dp exited with %s; restarting in %.1f s", proc.returncode, delay)
            await pause(self.stop, delay)

    def control(self, dp: ReportReader, wanted: plumbing.Plan, pods: LocalPods) -> None:
        """Tell the dp when what it should do changed: the node's plumbing, or its packet captures
        (the operator's orders, for the pods whose interface is found now)."""
        orders = self.capturer.orders(local_pods(pods.by_ip, wanted.pods))
        told, told_orders = self.told if self.told is not None else (None, None)
        if told is None or orders != told_orders or (
                wanted.interfaces, wanted.own, wanted.underlay, wanted.overlay) != (
                told.interfaces, told.own, told.underlay, told.overlay):
            self.tell(dp, wanted, told, orders)
            self.told = (wanted, orders)

    def tell(self, dp: ReportReader, wanted: plumbing.Plan, told: plumbing.Plan | None, orders: Orders) -> None:
        """The node's plumbing or its packet captures changed: the dp captures what it should
        (every Control names the whole set of packet captures, flowmap_agent.capturing), and the
        node's own addresses are the same for the dp, the aggregation and the NAT's undoing."""
        if told is None or wanted.own != told.own:
            log.info("the node's own addresses: %s", sorted(wanted.own))
            self.aggregator.node_ips = wanted.own
            self.outbox.node_addresses = wanted.announced  # the operator names them this node
            if self.unnat is not None:
                self.unnat.node_addresses = wanted.own
        if told is None or (wanted.underlay, wanted.overlay) != (told.underlay, told.overlay):
            log.info("overlay %s dropped on %s", [tuple(e) for e in wanted.overlay], list(wanted.underlay))
        dp.set_control(wire_pb2.Control(
            interfaces=wanted.interfaces, local_addresses=sorted(wanted.own), underlay=wanted.underlay,
            overlay=[wire_pb2.Encapsulation(ip_proto=e.ip_proto, port=e.port) for e in wanted.overlay],
            packet_captures=orders.captures, keep=orders.keep))

    # -- health ----------------------------------------------------------------------------------

    async def serve_health(self, pods: LocalPods, reader: ReportReader) -> web.AppRunner:
        async def healthz(_: web.Request) -> web.Response:
            alive = time.monotonic() - self.last_tick < 5 * self.settings.interval + 5
            return web.Response(status=200 if alive else 503, text="ok" if alive else "stalled")

        async def readyz(_: web.Request) -> web.Response:
            # The dp connects before its rings are attached: ready once it has reported.
            ready = pods.synced.is_set() and reader.connections > 0 and bool(self.health.by_worker)
            return web.Response(status=200 if ready else 503, text="ok" if ready else "not ready")

        async def metrics(_: web.Request) -> web.Response:
            return web.Response(body=generate_latest(REGISTRY), content_type="text/plain")

        app = web.Application()
        app.add_routes([web.get("/healthz", healthz), web.get("/readyz", readyz), web.get("/metrics", metrics)])
        runner = web.AppRunner(app, access_log=None)  # a line per kubelet probe and scrape is noise
        await runner.setup()
        await web.TCPSite(runner, port=self.settings.health_listen).start()
        return runner

    # -- the loop --------------------------------------------------------------------------------

    def open_dp(self) -> ReportReader:
        """The dp socket, the agent's own (flowmap_agent.receiving), read as data arrives from now on."""
        self.receiver = Receiver(self.settings.socket).start()
        self.registry.register(self.receiver)
        return self.receiver.reader

    async def step(self, dp: ReportReader, *, take: bool = True) -> None:
        """One interval's work: what the dp sent meanwhile into the outbox, numbered batches cut
        and saved, the dp told what is saved, then delivery. Not ``take``: the node's pods are not
        read yet, and an end taken now would miss its pod (and the operator the node that counts
        it); the reports wait, unacknowledged, in the receiver and the dp."""
        assert self.receiver is not None
        if take:
            await self.ingest(self.receiver.drain())
        self.outbox.cut_all()
        await asyncio.to_thread(self.outbox.save, Path(self.settings.state_file))
        dp.ack(acks(self.outbox.dp_positions))  # saved: the dp may forget them
        await self.deliver()

    async def run(self) -> None:
        s = self.settings
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stop.set)
        if os.environ.get("KUBECONFIG"):
            await config.load_kube_config()
        else:
            config.load_incluster_config()  # type: ignore[no-untyped-call, unused-ignore]
        api = client.ApiClient()
        core = client.CoreV1Api(api)
        pods = LocalPods(core, s.node)
        self.aggregator.local_pods = pods.by_ip
        node = await core.read_node(s.node)
        node_ips = frozenset(a.address for a in node.status.addresses or [] if a.type in ("InternalIP", "ExternalIP"))
        node_links = links.Reader(s.netns)
        uplinks = set(filter(None, s.uplinks.split(",")))
        view = await asyncio.to_thread(node_links.read, False, time.monotonic())
        wanted = plumbing.plan(view.links, view.addresses, view.peers, (), node_ips, uplinks)
        # What the node sends from any of its addresses is its own traffic: the dp keeps it, and
        # reports mark that end local (the operator takes a local end without a pod for the node).
        self.aggregator.node_ips = wanted.own
        try:
            lookup, destination, close_conntrack = await loop.run_in_executor(self.conntrack, nat.conntrack_lookup,
                                                                              s.netns)
            self.unnat = nat.Unnat(lookup, wanted.own, pods.by_ip)
            self.aggregator.destination = destination
        except NoConntrack as exc:
            log.warning("no connection tracking (%s): masqueraded traffic will show as the node's", exc)
            close_conntrack = lambda: None  # noqa: E731

        running = Path(s.state_file + ".running")  # present while an agent runs: left by a crash
        if running.exists():
            UNCLEAN.inc()
            log.warning("the last run did not stop cleanly: reports it took after its last save are lost")
        running.parent.mkdir(parents=True, exist_ok=True)
        running.touch()
        dp = self.open_dp()
        runner = await self.serve_health(pods, dp)
        tasks = [asyncio.create_task(pods.run(self.stop))]
        if s.dp == "child":
            tasks.append(asyncio.create_task(self.run_dp(sorted(node_ips))))
        tasks.append(asyncio.create_task(self.protector.run(self.stop)))  # the table stays when it stops
        # When it stops, an external dp runs on the captures it was told last.
        tasks.append(asyncio.create_task(self.capturer.run(self.stop)))
        log.info("agent %s on node %s: uplinks %s", self.outbox.agent_id, s.node, list(wanted.underlay))
        while not self.stop.is_set():
            self.last_tick = time.monotonic()
            # Until the node's pods are read, a plan knows none of their veths: told to the dp, it
            # would stop capturing them (a restarted agent's dp captures on as it was told). Whether
            # they were read is taken with the pods the plan is made of: they may arrive meanwhile.
            synced, pod_ips = pods.synced.is_set(), list(pods.by_ip)
            view = await asyncio.to_thread(node_links.read, wanted.missing(pod_ips), self.last_tick)
            wanted = plumbing.plan(view.links, view.addresses, view.peers, pod_ips, node_ips, uplinks)
            if synced:
                self.control(dp, wanted, pods)
            await self.step(dp, take=synced)
            await pause(self.stop, s.interval - (time.monotonic() - self.last_tick))

        # Ordered stop: our dp sends its last report, which is saved and delivered within the
        # deadline (an external dp keeps capturing, for the next agent).
        deadline = time.monotonic() + STOP_DEADLINE
        if tasks[1:]:
            await asyncio.wait(tasks[1:], timeout=STOP_DEADLINE / 2)
        assert self.receiver is not None
        if pods.synced.is_set():  # else left to the dp, unacknowledged, for the next agent
            await self.ingest(self.receiver.last(timeout=0.5))
        while time.monotonic() < deadline:
            self.outbox.cut_all()  # in batches within the contract's limits, however large the backlog
            self.outbox.save(Path(s.state_file))
            dp.ack(acks(self.outbox.dp_positions))
            if not self.outbox.unacked and not self.outbox.pending:
                break
            self.retry_at = 0.0
            await self.deliver()
            await asyncio.sleep(0.2)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self.receiver.close()
        await loop.run_in_executor(self.conntrack, close_conntrack)
        self.conntrack.shutdown()
        await self._drop_channel()
        await runner.cleanup()
        await api.close()
        running.unlink()


def _die_with_parent() -> None:
    """In the dp child, before exec: SIGTERM when the agent dies, however it dies."""
    if ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG)")
