"""PacketCapture's side that touches the world: the captures as the watch delivers them, each
watched node's NodeCaptures streamed to its agent (with the fetches of files it serves now,
flowmap_operator.uploading), the agents' reports, and status writes.

The plan and the status are the pure core's (flowmap_operator.capturing); this keeps what they
are computed from. Everything is bounded by the cluster's PacketCaptures (each at most
``capturing.MAX_NODES`` nodes' reports) and the nodes that watch.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import replace
from typing import Any

from kubernetes_asyncio.client import CustomObjectsApi

from flowmap_api import report_pb2 as pb
from flowmap_operator import capturing
from flowmap_operator.capturing import Capture, CaptureKey, NodeReport, Plan
from flowmap_operator.errors import ApiError, Conflict, NotFound
from flowmap_operator.kubeapi import FIELD_MANAGER, GROUP, MERGE, VERSION
from flowmap_operator.times import parse_iso
from flowmap_operator.resolution import Resolver, group_name
from flowmap_operator.streaming import NodeStreams
from flowmap_operator.writing import Writer

log = logging.getLogger("flowmap.operator.recording")
PLURAL = "packetcaptures"
RETRY_AFTER = 10.0  # a status the API server refused (429, 5xx, a schema it breaks) is written again after this
REPLAN_EVERY = 30.0  # finished captures' TTLs pass with nothing else changing: recompute the keep lists


_STATES = {phase: state for state, phase in capturing.NODE_PHASES.items()}


def written_reports(capture: Capture) -> dict[str, NodeReport]:
    """The nodes' reports as the capture's status last said them: what a new leader (or a restarted
    operator) starts from, so that a status never steps back while the agents have not reported yet."""
    out = {}
    for entry in list((capture.status or {}).get("nodes") or [])[:capturing.MAX_NODES]:
        state = _STATES.get(entry.get("phase", ""))
        if state and isinstance(entry.get("node"), str):
            out[entry["node"]] = NodeReport(entry["node"], state, int(entry.get("packets") or 0),
                                            int(entry.get("bytes") or 0), int(entry.get("drops") or 0),
                                            int(entry.get("fileBytes") or 0), str(entry.get("sha256") or ""),
                                            str(entry.get("stopReason") or ""))
    return out


def node_report(node: str, status: pb.CaptureStatus) -> NodeReport:
    """One checked CaptureStatus (flowmap_api.validity.check_capture_report) as the core takes it."""
    return NodeReport(node, status.state, status.packets, status.bytes, status.drops, status.file_bytes,
                      status.sha256, status.stop_reason, status.message)


class CaptureHub(NodeStreams[pb.NodeCaptures]):
    """The PacketCaptures, their plans, each watched node's NodeCaptures and the agents' reports."""

    def __init__(self, resolver: Resolver, max_per_namespace: int) -> None:
        super().__init__()
        self.resolver, self.max_per_namespace = resolver, max_per_namespace
        self.captures: dict[CaptureKey, Capture] = {}
        self.reports: dict[str, dict[str, NodeReport]] = {}  # capture id -> node -> its last report
        self.plans: dict[CaptureKey, Plan] = {}
        self.fired: dict[str, float] = {}  # capture id -> when its trigger happened
        self.uploads: dict[str, tuple[pb.UploadRequest, ...]] = {}  # node -> the fetches it serves now
        self.changes = 0  # of captures and reports
        self._inputs: tuple[int, int] = (-1, -1)
        self._planned_at = 0.0

    # -- what the watch and the agents say --------------------------------------------------------

    def seen(self, body: Mapping[str, Any]) -> None:
        capture = Capture.from_body(body)
        old = self.captures.get(capture.key)
        if old is not None and old.uid != capture.uid:
            self.reports.pop(old.id, None)  # deleted and created again under the same name
            self.fired.pop(old.id, None)
        if capture.id not in self.reports:
            self.reports[capture.id] = written_reports(capture)
        if capture.id not in self.fired and (at := (capture.status or {}).get("triggeredAt")):
            self.fired[capture.id] = parse_iso(at)  # as written: a new leader fires it again
        self.captures[capture.key] = capture
        self.changes += 1

    def gone(self, namespace: str, name: str) -> None:
        old = self.captures.pop((namespace, name), None)
        if old is not None:
            self.reports.pop(old.id, None)
            self.fired.pop(old.id, None)
            self.plans.pop(old.key, None)
            self.changes += 1

    def reported(self, node: str, statuses: Iterable[pb.CaptureStatus]) -> int:
        """Take a node's checked statuses; those of captures not known (deleted) are left out.
        Returns how many were taken."""
        known = {c.id for c in self.captures.values()}
        taken = 0
        for status in statuses:
            if status.id not in known:
                continue
            by_node = self.reports.setdefault(status.id, {})
            if node not in by_node and len(by_node) >= capturing.MAX_NODES:
                continue
            report = node_report(node, status)
            if by_node.get(node) != report:
                by_node[node] = report
                self.changes += 1
            taken += 1
        return taken

    def saw(self, events: Iterable[capturing.Event]) -> None:
        """What a report showed (flowmap_operator.topology.Ingested.events): the armed captures it
        fires are told to their nodes at the next update."""
        if events and (new := capturing.fires(self.plans.values(), events, self.fired)):
            self.fired.update(new)
            self.changes += 1

    # -- plans and streams -------------------------------------------------------------------------

    def replan(self, now: float) -> bool:
        """Plan every capture and each watched node's NodeCaptures again if what they depend on
        changed; True when a node's changed."""
        inputs = (self.changes, self.resolver.version)
        if inputs == self._inputs and now - self._planned_at < REPLAN_EVERY:
            return False
        self._inputs, self._planned_at = inputs, now
        admitted = capturing.admitted(self.captures.values(), self.max_per_namespace)
        pods: dict[str, list[capturing.PodView]] = {}
        for key, capture in self.captures.items():
            if capture.namespace not in pods:
                pods[capture.namespace] = list(self.resolver.namespace_pods(capture.namespace))
            peers = {group_name(capture.namespace, f["peer"]["group"]) for f in capture.filters
                     if isinstance(f.get("peer"), Mapping) and f["peer"].get("group")}
            self.plans[key] = capturing.plan(capture, pods[capture.namespace], admitted=key in admitted,
                                             max_per_namespace=self.max_per_namespace,
                                             services={g: self.resolver.service_ips(g) for g in peers})
        changed = False
        for node in self.watching():
            changed |= self._compose(node, now)
        return changed

    def _compose(self, node: str, now: float) -> bool:
        captures = capturing.node_captures(self.plans.values(), node,
                                           capturing.kept(self.captures.values(), now), self.fired)
        captures.uploads.extend(self.uploads.get(node, ()))
        return self.replace(node, captures)

    async def ask(self, node: str, requests: Sequence[pb.UploadRequest]) -> None:
        """The fetches ``node`` serves now, whole (flowmap_operator.uploading): carried in its
        NodeCaptures from now on, and its streams woken at once, not at the next flush round (a
        fetch waits for them). A node nobody watches hears them when its agent comes."""
        if requests:
            self.uploads[node] = tuple(requests)
        else:
            self.uploads.pop(node, None)
        if node in self.current and self._compose(node, time.time()):
            await self.notify()

    async def update(self, now: float) -> None:
        """Re-plan, and wake the streams of the nodes whose captures changed."""
        if self.replan(now):
            await self.notify()

    def first(self, node: str, now: float) -> None:
        self._inputs = (-1, -1)  # plan now: the node may be new
        self.replan(now)

    # -- status ------------------------------------------------------------------------------------

    def statuses(self, now: float) -> list[tuple[Capture, dict[str, Any]]]:
        """The captures whose status, computed from their plan and reports, differs from the last written."""
        out = []
        for key, plan in self.plans.items():
            capture = self.captures.get(key)
            if capture is None or capture is not plan.capture:
                continue  # changed since it was planned: planned again first
            status = capturing.status(plan, self.reports.get(capture.id, {}), now, self.fired.get(capture.id))
            if status != (capture.status or {}):
                out.append((capture, status))
        return out

    def written(self, capture: Capture, status: Mapping[str, Any]) -> None:
        """The status as written: the next plan and admission go from it (the watch brings it too)."""
        if self.captures.get(capture.key) is capture:
            self.captures[capture.key] = replace(capture, status=dict(status))
            self.changes += 1


class StatusWriter:
    """Writes the captures' statuses that changed, through the writer's budget (status subresource)."""

    def __init__(self, writer: Writer, hub: CaptureHub) -> None:
        self.writer, self.api, self.hub = writer, writer.api, hub
        self.refused: dict[CaptureKey, float] = {}  # until when a refused status is not written again

    async def flush(self, now: float) -> int:
        """Write every changed status once; a refused write is logged and tried at the next round."""
        wrote = 0
        self.refused = {k: until for k, until in self.refused.items() if until > now and k in self.hub.captures}
        for capture, status in self.hub.statuses(now):
            if capture.key in self.refused:
                continue
            try:
                await self.writer.write("packetcapture", "patch_status", self._patch(self.api, capture, status))
            except (NotFound, Conflict):
                continue  # deleted (or made anew) meanwhile: the watch says so
            except ApiError as exc:
                log.warning("status of PacketCapture %s/%s not written: %s; tried again in %.0f s",
                            capture.namespace, capture.name, exc, RETRY_AFTER)
                self.refused[capture.key] = now + RETRY_AFTER
                continue
            self.hub.written(capture, status)
            wrote += 1
        return wrote

    @staticmethod
    async def _patch(api: CustomObjectsApi, capture: Capture, status: Mapping[str, Any]) -> Any:
        # A merge patch replaces lists whole (nodes, conditions): the status is written entire. The
        # uid is a precondition: a capture deleted and created again under its name is not written.
        body = {"metadata": {"uid": capture.uid}, "status": dict(status)}
        return await api.patch_namespaced_custom_object_status(
            GROUP, VERSION, capture.namespace, PLURAL, capture.name, body,
            _content_type=MERGE, field_manager=FIELD_MANAGER)  # type: ignore[call-arg]  # not in the stub
