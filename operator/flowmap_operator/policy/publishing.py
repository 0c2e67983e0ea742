"""Policy's side that touches the world: NetworkLearningPolicy status and Events written through the
write budget, and each node's compiled policy streamed to its agent.

A policy's status is written at once when its selection or conditions change, otherwise (new
evidence for learned rules, what Protect would block) at most every ``status_interval``. Events
are raised once per connection that turns Violation or Denied, and for threats on the Groups of
their workloads (flowmap_operator.threats.Alerts), together at most ``events_per_second``.
"""

from __future__ import annotations

import contextlib
import logging
import time
from typing import Any

from kubernetes_asyncio.client import CoreV1Api

from flowmap_api import report_pb2 as pb
from flowmap_operator import metrics
from flowmap_operator.policy.compiling import Compiler
from flowmap_operator.errors import NotFound
from flowmap_operator.kubeapi import FIELD_MANAGER, GROUP, MERGE, VERSION
from flowmap_operator.policy.modes import Modes
from flowmap_operator.policy.rules import PolicyKey
from flowmap_operator.times import iso
from flowmap_operator.status import policy_status
from flowmap_operator.streaming import NodeStreams
from flowmap_operator.threats import Alert
from flowmap_operator.writing import Writer

log = logging.getLogger("flowmap.operator.policing")
LOSSY_FOR = 600.0  # an agent's reported loss degrades the policies of its node this long
RECOMPILE_EVERY = 30.0  # names learned from DNS expire: recompile even when nothing else changed


class PolicyHub(NodeStreams[pb.NodePolicy]):
    """Each watched node's NodePolicy, recompiled when what it depends on changed."""

    def __init__(self, modes: Modes) -> None:
        super().__init__()
        self.modes, self.compiler = modes, Compiler(modes)
        self._inputs: tuple[int, int] = (-1, -1)
        self._compiled_at = 0.0

    async def update(self, now: float) -> None:
        """Recompile every watched node's policy if its inputs changed; wake the streams that changed."""
        inputs = (self.modes.version, self.modes.resolver.version)
        if inputs == self._inputs and now - self._compiled_at < RECOMPILE_EVERY:
            return
        self._inputs, self._compiled_at = inputs, now
        changed = False
        for node in self.watching():
            changed |= self._compile(node, now)
        if changed:
            await self.notify()

    def _compile(self, node: str, now: float) -> bool:
        policy = self.compiler.node(node, now)
        if not self.replace(node, policy):
            return False
        metrics.POLICY_PODS.labels(node).set(len(policy.pods))
        return True

    def first(self, node: str, now: float) -> None:
        self._compile(node, now)

    def forget(self, node: str) -> None:
        with contextlib.suppress(KeyError):
            metrics.POLICY_PODS.remove(node)


class PolicyWriter:
    """Writes policy status and raises Events, each write taking its token from the writer's budget."""

    def __init__(self, writer: Writer, modes: Modes, hub: PolicyHub, core: CoreV1Api, identity: str, *,
                 status_interval: float = 10.0, events_per_second: float = 1.0) -> None:
        self.writer, self.modes, self.hub, self.core, self.identity = writer, modes, hub, core, identity
        self.status_interval, self.events_per_second = status_interval, events_per_second
        self.written: dict[PolicyKey, float] = {}
        self._event_at = 0.0

    def refresh(self) -> None:
        """Take in changed policies and pods; groups a Learn policy newly governs learn, at once,
        what the map already saw of them."""
        topology = self.writer.topology
        for key, group in self.modes.refresh():
            seen = []
            for edge_key, info in topology.edges.items():
                if group in edge_key[:2] and info.action != "Denied":
                    edge = topology.ledger.edges.get(edge_key)
                    sessions = edge.persisted.sessions + sum(p.counters.sessions for p in edge.pending.values()) \
                        if edge else 0
                    seen.append((*edge_key, info.apps, sessions, info.first_seen, info.last_seen))
            self.modes.seed(key, group, seen)

    async def flush(self, deadline: float) -> int:
        """Write what is due until ``deadline`` (monotonic): urgent status, due status, Events."""
        now, written = time.time(), 0
        lossy = {n for n, t in self.writer.topology.lost.items() if now - t < LOSSY_FOR}
        agents, watching = self.modes.resolver.agent_nodes, self.hub.watching()
        due = sorted(self.modes.urgent) + sorted(
            k for k in self.modes.dirty - self.modes.urgent if now - self.written.get(k, 0.0) >= self.status_interval)
        for key in due:
            if time.monotonic() >= deadline:
                return written
            if key not in self.modes.policies:
                self.modes.urgent.discard(key)
                self.modes.dirty.discard(key)
                continue
            status = policy_status(self.modes, key, now, agents=agents, watching=watching, lossy=lossy)
            self.modes.policies[key].conditions = {c["type"]: c for c in status["conditions"]}
            written += await self.writer.guard(self._patch(key, status))
        alerts = self.writer.topology.alerts.queue
        while (self.modes.events or alerts) and time.monotonic() < deadline and time.monotonic() >= self._event_at:
            if self.modes.events:
                policy, reason, message = self.modes.events.popleft()
                written += await self.writer.guard(self._policy_event(policy, reason, message))
            else:
                written += await self.writer.guard(self._threat_event(alerts.popleft()))
            self._event_at = time.monotonic() + 1.0 / self.events_per_second
        return written

    async def _patch(self, key: PolicyKey, status: dict[str, Any]) -> bool:
        namespace, name = key
        try:
            await self.writer.write("policy", "status", self.writer.api.patch_namespaced_custom_object_status(
                GROUP, VERSION, namespace, "networklearningpolicies", name, {"status": status},
                _content_type=MERGE, field_manager=FIELD_MANAGER))  # type: ignore[call-arg]  # not in the stub
        except NotFound:
            pass
        self.modes.urgent.discard(key)
        self.modes.dirty.discard(key)
        self.written[key] = time.time()
        return True

    async def _policy_event(self, key: PolicyKey, reason: str, message: str) -> bool:
        namespace, name = key
        uid = policy.uid if (policy := self.modes.policies.get(key)) else ""
        await self._event(namespace, {"kind": "NetworkLearningPolicy", "namespace": namespace, "name": name, "uid": uid},
                          reason, message)
        metrics.POLICY_EVENTS.labels(reason).inc()
        return True

    async def _threat_event(self, alert: Alert) -> bool:
        # A Group is cluster-scoped: its Events live in "default", as a Node's do.
        group = self.writer.topology.groups.get(alert.group)
        await self._event("default", {"kind": "Group", "name": alert.group, "uid": group.uid if group else ""},
                          "Threat", alert.message)
        metrics.THREAT_EVENTS.labels(alert.name).inc()
        return True

    async def _event(self, namespace: str, involved: dict[str, str], reason: str, message: str) -> None:
        now = iso(time.time())
        body = {"apiVersion": "v1", "kind": "Event",
                "metadata": {"generateName": f"{involved['name'][:200]}.", "namespace": namespace},
                "involvedObject": {"apiVersion": f"{GROUP}/{VERSION}", **involved},
                "type": "Warning", "reason": reason, "message": message[:1024], "count": 1,
                "firstTimestamp": now, "lastTimestamp": now, "source": {"component": "flowmap-operator"},
                "reportingComponent": "flowmap.dev/operator", "reportingInstance": self.identity[:128]}
        # The client takes a plain dict for body; its stub says CoreV1Event.
        await self.writer.write("event", "create", self.core.create_namespaced_event(namespace, body))  # type: ignore[arg-type]
