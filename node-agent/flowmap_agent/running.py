"""``flowmap agent run``: the dp (a child, or external), local pods, per-edge deltas, reports to the operator.

Each interval: read the node's plumbing over netlink (flowmap_agent.links, .plumbing) and tell
the dp what to capture (the host side of each local pod's veth, found through its peer on any
veth-based CNI, and the veths of its Multus secondary networks whose addresses the kernel
confirms, flowmap_api.networks; the taps of the node's libvirt VMs, followed by flowmap_agent.libvirting when
``FLOWMAP_AGENT_LIBVIRT_URI`` names a libvirtd; the uplinks; the overlay's tunnels), the node's
own addresses (every global address on an interface that is up: they change, a CNI's bridge and
tunnel appear with the first pod) and the overlay's encapsulation to drop on the uplinks; take the dp's reports (read
off its socket as they arrive, flowmap_agent.receiving), aggregate them per edge, pass them
through the one definition of a valid report, cut numbered batches within the contract's limits,
save the outbox to disk, then deliver whatever is not acknowledged, each batch saying the node's
own addresses as they are when it is sent (``node_addresses``: another node's report of them, a
hostNetwork client arriving through the tunnel, is then this node's, not a pod's nor the
outside's) and, when it follows libvirt, the node's VMs with their addresses (``vms``: each a member
of its own Group, flowmap_agent.domains). The loop never waits on the operator longer than a send timeout, and backs off with
jitter (from 0.5 s: a batch the operator defers because it names a pod it does not know yet goes
again within a second). The dp starts with the Node object's addresses and takes the rest from
the agent, so it also counts what the node itself sends (a kubelet probe from a bridge's gateway
address too), where it leaves the node. Alongside, Protect mode (flowmap_agent.policy) keeps the
node's nftables table to the policy the operator streams, and each delta says what that policy
did to it; and the packet captures the operator orders (flowmap_agent.capturing) go to the dp in
every Control, their statuses back.

What a crash can lose, exactly, and how it is counted:

* a crash, restart or upgrade of the agent loses nothing when the dp runs on its own
  (``FLOWMAP_AGENT_DP=external``: the DaemonSet flowmap-dp beside the agent's): the dp keeps
  capturing, keeps every report until the agent has saved it (``Ack``), queues new ones
  (``--queue``) and sends them all to the next agent, which skips what it had saved already; a
  gap in the reports' sequence would still be counted (``flowmap_agent_dp_report_gaps_total``).
  With the dp as a child, it goes with the agent (it gets SIGTERM when the agent dies, so a
  restarted agent never shares the rings with an orphan), losing its current interval and what
  passes until the next one captures. Either way the restarted agent counts the run that did not
  stop cleanly (``flowmap_agent_unclean_restarts_total``);
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
  no refusal of the operator makes the agent drop anything else (see :meth:`flowmap_agent.delivering.Delivery.deliver`).

Nothing is lost silently.

Each job has its module: the dp's reports into the outbox (flowmap_agent.ingesting), delivery to
the operator (.delivering), what the dp is told (.controlling), the dp as a child (.supervising),
the HTTP endpoints (.endpoints), the metrics (.metrics). Here they are put together, and run: the
interval loop, and the ordered stop.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
from collections.abc import Mapping
from pathlib import Path

from kubernetes_asyncio import client, config
from prometheus_client import CollectorRegistry

from flowmap_agent import domains, links, plumbing
from flowmap_agent.captures import local_vms
from flowmap_agent.capturing import Capturer
from flowmap_agent.controlling import DpControl
from flowmap_agent.delivering import Delivery
from flowmap_agent.domains import Vm
from flowmap_agent.endpoints import serve
from flowmap_agent.ingesting import Intake
from flowmap_agent.libvirting import LibvirtVMs
from flowmap_agent.listening import ReportReader
from flowmap_agent.metrics import REGISTRY, UNCLEAN, DpHealth
from flowmap_agent.outbox import resume
from flowmap_agent.pods import LocalPods
from flowmap_agent.policy.protecting import Protector
from flowmap_agent.positions import acks
from flowmap_agent.quarantine import Quarantine
from flowmap_agent.receiving import Receiver
from flowmap_agent.settings import Settings
from flowmap_agent.supervising import supervise_dp
from flowmap_api import report_pb2 as pb
from flowmap_api import validity
from flowmap_api.pacing import pause

log = logging.getLogger("flowmap.agent")
STOP_DEADLINE = 10.0


class Agent:
    """The node's agent: its parts, put together; :meth:`run` runs them until SIGTERM."""

    def __init__(self, settings: Settings, registry: CollectorRegistry = REGISTRY) -> None:
        self.settings = settings
        self.registry = registry  # where this agent's own collectors go (a test makes several agents)
        self.stop = asyncio.Event()
        self.health = DpHealth()
        registry.register(self.health)
        self.receiver: Receiver | None = None
        self.outbox = resume(Path(settings.state_file), settings.node, window=settings.window,
                             interval_ms=int(settings.interval * 1000), refresh=settings.refresh_interval)
        # A node name no operator would take makes every batch fail, forever: say so now.
        validity.check_batch(pb.ReportBatch(agent_id=self.outbox.agent_id, node=settings.node))
        quarantine = Quarantine()
        self.capturer = Capturer(settings, registry)
        self.intake = Intake(self.outbox, self.health, quarantine, captures_seen=self.capturer.took)
        self.delivery = Delivery(settings, self.outbox, quarantine)
        self.protector = Protector(settings, registry, applied=self.intake.enforced)
        self.intake.blocking(self.protector.block, settings.threat_block_seconds, settings.threat_block_max)
        self.dp_control = DpControl(self.capturer, own_changed=self.own_changed)
        self.vms = LibvirtVMs(settings.libvirt_uri, registry, settings.libvirt_resync) if settings.libvirt_uri else None
        self.vm_addresses: dict[str, tuple[str, ...]] = {}  # UUID -> the addresses its VM is known by
        self.links = links.Reader(settings.netns)
        self.last_tick = time.monotonic()

    def own_changed(self, wanted: plumbing.Plan) -> None:
        """The node's own addresses changed: the same for the dp, the aggregation, the NAT's
        undoing, and every batch from now on (the operator names them this node)."""
        self.intake.own_addresses(wanted.own)
        self.outbox.node_addresses = wanted.announced

    def vms_seen(self, vms: Mapping[str, Vm], neighbours: Mapping[str, list[str]]) -> None:
        """The node's VMs with their addresses as of now (read after the reports they name were
        taken off the dp's socket): the same for the aggregation, the NAT's undoing and every
        batch from now on."""
        held = self.vm_addresses = {uuid: domains.addresses(vm, neighbours, self.vm_addresses.get(uuid, ()))
                                    for uuid, vm in vms.items()}
        self.intake.local_vms({ip: uuid for uuid, ips in held.items() for ip in ips})
        self.outbox.vms = [domains.local_vm(vm, held[uuid]) for uuid, vm in sorted(vms.items())]
        self.outbox.vms_followed = True

    def secondary_changed(self, pods: LocalPods, wanted: plumbing.Plan) -> None:
        """The pods' secondary addresses the kernel confirms now: named after their pods in the
        deltas from now on, and told the operator with every batch (ReportBatch.pod_addresses)."""
        before = dict(pods.secondary)
        pods.confirm(wanted.secondary)
        if pods.secondary != before:
            log.info("secondary addresses of the node's pods: %s", dict(sorted(pods.secondary.items())))
        self.outbox.pod_addresses = plumbing.secondary_reported(pods.secondary)

    def open_dp(self) -> ReportReader:
        """The dp socket, the agent's own (flowmap_agent.receiving), read as data arrives from now on."""
        self.receiver = Receiver(self.settings.socket).start()
        self.registry.register(self.receiver)
        return self.receiver.reader

    def ready(self, pods: LocalPods, reader: ReportReader) -> bool:
        """Ready once the pods are read and the dp has reported (it connects before its rings are
        attached)."""
        return pods.synced.is_set() and reader.connections > 0 and bool(self.health.by_worker)

    async def step(self, dp: ReportReader, *, ingest: bool = True) -> None:
        """One interval's work: what the dp sent meanwhile into the outbox, numbered batches cut
        and saved, the dp told what is saved, then delivery. Not ``ingest``: the node's pods are not
        read yet, and an end taken now would miss its pod (and the operator the node that counts
        it); the reports wait, unacknowledged, in the receiver and the dp."""
        assert self.receiver is not None
        if ingest:
            reports = self.receiver.drain()
            if self.vms is not None:  # the VMs' addresses as the node knows them after those reports' packets
                self.vms_seen(self.vms.vms, await asyncio.to_thread(self.links.neighbours))
            await self.intake.ingest(reports)
        self.outbox.cut_all()
        await asyncio.to_thread(self.outbox.save, Path(self.settings.state_file))
        dp.ack(acks(self.outbox.dp_positions))  # saved: the dp may forget them
        await self.delivery.deliver()

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
        self.intake.aggregator.local_pods = pods.by_ip
        node = await core.read_node(s.node)
        node_ips = frozenset(a.address for a in node.status.addresses or [] if a.type in ("InternalIP", "ExternalIP"))
        node_links = self.links
        uplinks = set(s.uplinks)
        view = await asyncio.to_thread(node_links.read, False, time.monotonic())
        wanted = plumbing.plan(view.links, view.addresses, view.peers, (), node_ips, uplinks)
        # What the node sends from any of its addresses is its own traffic: the dp keeps it, and
        # reports mark that end local (the operator takes a local end without a pod for the node).
        self.intake.own_addresses(wanted.own)
        await self.intake.open_conntrack(s.netns, wanted.own, pods.by_ip)

        running = Path(s.state_file + ".running")  # present while an agent runs: left by a crash
        if running.exists():
            UNCLEAN.inc()
            log.warning("the last run did not stop cleanly: reports it took after its last save are lost")
        running.parent.mkdir(parents=True, exist_ok=True)
        running.touch()
        dp = self.open_dp()
        runner = await serve(s.health_listen, lambda: time.monotonic() - self.last_tick < 5 * s.interval + 5,
                             lambda: self.ready(pods, dp))
        tasks = [asyncio.create_task(pods.run(self.stop))]
        if s.dp == "child":
            tasks.append(asyncio.create_task(supervise_dp(s, sorted(node_ips), self.stop, STOP_DEADLINE / 2)))
        tasks.append(asyncio.create_task(self.protector.run(self.stop)))  # the table stays when it stops
        # When it stops, an external dp runs on the captures it was told last.
        tasks.append(asyncio.create_task(self.capturer.run(self.stop)))
        if self.vms is not None:  # its VMs' taps join the capture as libvirt reports them
            tasks.append(asyncio.create_task(self.vms.run(self.stop)))
        log.info("agent %s on node %s: uplinks %s", self.outbox.agent_id, s.node, list(wanted.underlay))
        while not self.stop.is_set():
            self.last_tick = time.monotonic()
            # Until the node's pods are read, a plan knows none of their veths: told to the dp, it
            # would stop capturing them (a restarted agent's dp captures on as it was told). Whether
            # they were read is taken with the pods the plan is made of: they may arrive meanwhile.
            synced, pod_ips, claims = pods.synced.is_set(), pods.primary_ips(), pods.claims()
            view = await asyncio.to_thread(node_links.read, wanted.missing(pod_ips), self.last_tick)
            wanted = plumbing.plan(view.links, view.addresses, view.peers, pod_ips, node_ips, uplinks,
                                   self.vms.taps if self.vms is not None else (), claims)
            if synced:
                self.secondary_changed(pods, wanted)
                self.dp_control.update(dp, wanted, pods, None if self.vms is None else local_vms(
                    s.node, self.vms.vms.values(), wanted.interfaces))
            await self.step(dp, ingest=synced)
            await pause(self.stop, s.interval - (time.monotonic() - self.last_tick))

        await self.stop_in_order(dp, pods, tasks)
        await runner.cleanup()
        await api.close()
        running.unlink()

    async def stop_in_order(self, dp: ReportReader, pods: LocalPods, tasks: list[asyncio.Task[None]]) -> None:
        """Ordered stop: our dp sends its last report, which is saved and delivered within the
        deadline (an external dp keeps capturing, for the next agent); then every part closes."""
        deadline = time.monotonic() + STOP_DEADLINE
        if tasks[1:]:
            await asyncio.wait(tasks[1:], timeout=STOP_DEADLINE / 2)
        assert self.receiver is not None
        if pods.synced.is_set():  # else left to the dp, unacknowledged, for the next agent
            await self.intake.ingest(self.receiver.last(timeout=0.5))
        while time.monotonic() < deadline:
            self.outbox.cut_all()  # in batches within the contract's limits, however large the backlog
            self.outbox.save(Path(self.settings.state_file))
            dp.ack(acks(self.outbox.dp_positions))
            if not self.outbox.unacked and not self.outbox.pending:
                break
            self.delivery.retry_at = self.outbox.ask_at = 0.0  # stopping: ask every round
            await self.delivery.deliver()
            await asyncio.sleep(0.2)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self.receiver.close()
        await self.intake.close()
        await self.delivery.close()
