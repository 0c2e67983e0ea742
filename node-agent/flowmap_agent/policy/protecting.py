"""Protect mode on the node: follow ``PolicyService.Watch``, keep the table ``inet flowmap`` in sync.

Protect must not lapse while the agent restarts or the operator is away, so the table outlives
both: until the first policy of a run arrives, whatever table the last run left stays as it is;
when the stream breaks, the last policy stays in force while the agent reconnects (jittered
backoff); a graceful stop leaves the table too. Only a policy removes it: the emergency switch
(``enforcement_disabled``) or no protected pod on the node.

Policies are applied by one loop, latest first (a burst of updates costs one transaction). A
policy that is invalid or too large is refused whole and waits for the next one; a failed
``nft`` is retried every interval. Either way the rules in force stay. The table is read back
every ``policy_resync`` seconds, so a hand that touched it is undone.

Threat blocks (``block``) do not wait for that loop: the reports' thread calls it as soon as the
dp reports a threat a protected pod's policy blocks, and each is one ``nft`` transaction of its own
(adding elements to the threat sets, which a policy's transaction never touches).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterator, Sequence

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, Metric

from flowmap_agent.errors import NftError, PolicyRefused
from flowmap_agent.following import alongside, follow
from flowmap_agent.policy.compiling import Block, PolicyInForce, desired, parse, threat_elements
from flowmap_agent.policy.nftables import Table
from flowmap_agent.settings import Settings
from flowmap_api import report_pb2 as pb
from flowmap_api import report_pb2_grpc as pb_grpc
from flowmap_api.threats import BY_NAME, UNKNOWN

log = logging.getLogger("flowmap.agent.protect")
COUNTERS_EVERY = 5.0  # seconds between reads of the rules' counters (the whole ruleset, without set elements)


class Protector:
    def __init__(self, settings: Settings, registry: CollectorRegistry,
                 applied: Callable[[PolicyInForce], None] = lambda policy: None) -> None:
        self.settings, self.applied = settings, applied
        self.table = Table(settings.netns)
        self.wanted: pb.NodePolicy | None = None  # the latest policy streamed
        self.changed = asyncio.Event()
        self.rules: dict[tuple[str, str], tuple[int, int]] = {}  # (chain, rule) -> (packets, bytes)
        self.version = Gauge("flowmap_agent_policy_version", "Version of the policy in force.", registry=registry)
        self.pods = Gauge("flowmap_agent_policy_protected_pods", "Protected pods on this node.", registry=registry)
        self.elements = Gauge("flowmap_agent_policy_elements", "Set elements in the table.", registry=registry)
        self.errors = Counter("flowmap_agent_policy_apply_errors", "Failed nft transactions (retried; the rules in "
                              "force stay).", registry=registry)
        self.refused = Counter("flowmap_agent_policy_refused", "Policies refused whole: invalid or too large.",
                               registry=registry)
        self.transactions = Counter("flowmap_agent_policy_transactions", "nft transactions applied.",
                                    registry=registry)
        self.seconds = Histogram("flowmap_agent_policy_apply_seconds", "Time to apply a policy (read, diff, nft).",
                                 registry=registry)
        self.streams = Counter("flowmap_agent_policy_watch_breaks", "PolicyService.Watch streams that broke, by code.",
                               ("code",), registry=registry)
        self.blocks = Counter("flowmap_agent_policy_threat_blocks", "Sessions blocked for a threat (result "
                              "blocked), or not (failed: nft refused, the set full or gone).", ("threat", "result"),
                              registry=registry)
        registry.register(self)

    def collect(self) -> Iterator[Metric]:
        """The table's own counters, per rule: the kernel's count of what each rule let through or stopped."""
        packets = CounterMetricFamily("flowmap_agent_policy_rule_packets", "Packets that matched a rule of the "
                                      "table.", labels=("chain", "rule"))
        octets = CounterMetricFamily("flowmap_agent_policy_rule_bytes", "Bytes that matched a rule of the table.",
                                     labels=("chain", "rule"))
        for (chain, rule), (p, b) in sorted(self.rules.items()):
            packets.add_metric((chain, rule), float(p))
            octets.add_metric((chain, rule), float(b))
        yield packets
        yield octets

    async def run(self, stop: asyncio.Event) -> None:
        """Watch and enforce until ``stop``; the table stays as it is."""
        await alongside(stop, self.watch(stop), self.enforce(stop))

    async def watch(self, stop: asyncio.Event) -> None:
        """Keep the stream open (flowmap_agent.following); each policy becomes the wanted one."""
        def want(policy: pb.NodePolicy) -> None:
            self.wanted = policy
            self.changed.set()

        await follow(self.settings,
                     lambda channel, metadata: pb_grpc.PolicyServiceStub(channel).Watch(
                         pb.WatchRequest(node=self.settings.node), metadata=metadata),
                     want, self.streams, stop, what="policy", stays="the policy in force stays",
                     max_receive=self.settings.policy_max_bytes)

    async def enforce(self, stop: asyncio.Event) -> None:
        """Apply the wanted policy when it changes, after a failure (each interval), and at each resync."""
        s = self.settings
        done: pb.NodePolicy | None = None  # the last policy applied or refused
        resync = counted = time.monotonic()
        while not stop.is_set():
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.changed.wait(), timeout=s.interval)
            self.changed.clear()
            now = time.monotonic()
            if now - resync >= s.policy_resync:
                resync, done = now, None
                self.table.forget()
            wanted = self.wanted
            if wanted is not None and wanted is not done:
                try:
                    policy = await asyncio.to_thread(self.apply, wanted)
                except NftError as exc:
                    self.errors.inc()
                    log.error("policy %d not applied, retrying in %.1f s; the rules in force stay: %s",
                              wanted.version, s.interval, exc)
                else:
                    done = wanted
                    if policy is not None:
                        self.applied(policy)
            if now - counted >= COUNTERS_EVERY and self.table.have is not None:
                counted = now
                with contextlib.suppress(NftError):
                    self.rules = await asyncio.to_thread(self.table.counters)

    def block(self, blocks: Sequence[Block]) -> bool:
        """Block these sessions from now on, in one transaction; whether nft took them (else none is).

        Called from the reports' thread: the table's threat sets are the only thing it touches.
        """
        started = time.monotonic()
        try:
            self.table.add(threat_elements(blocks))
        except NftError as exc:
            for b in blocks:
                self.blocks.labels(b.threat if b.threat in BY_NAME else UNKNOWN, "failed").inc()
            log.error("%d sessions not blocked for their threats: %s", len(blocks), exc)
            return False
        for b in blocks:
            self.blocks.labels(b.threat if b.threat in BY_NAME else UNKNOWN, "blocked").inc()
            log.warning("blocked for %s: %s:%d -> %s:%d (IP protocol %d; nft took %.0f ms)", b.threat, b.client,
                        b.client_port, b.server, b.server_port, b.l4, 1000 * (time.monotonic() - started))
        return True

    def apply(self, message: pb.NodePolicy) -> PolicyInForce | None:
        """Make the table ``message``'s: the policy now in force, or None when it is refused whole.

        Raises NftError when nft failed (nothing of the change was applied).
        """
        s = self.settings
        started = time.monotonic()
        try:
            policy = parse(message, s.policy_max_elements)
            want = desired(policy, s.policy_max_elements, s.threat_block_seconds, s.threat_block_max)
        except PolicyRefused as exc:
            self.refused.inc()
            log.error("policy %d refused whole, the rules in force stay: %s", message.version, exc)
            return None
        commands = self.table.apply(want)
        self.seconds.observe(time.monotonic() - started)
        if commands:
            self.transactions.inc()
            log.info("policy %d in force: %d protected pods, %d set elements (%d commands, %.2f s)", message.version,
                     policy.pods, want.size, commands, time.monotonic() - started)
        self.version.set(message.version)
        self.pods.set(policy.pods)
        self.elements.set(want.size)
        return policy
