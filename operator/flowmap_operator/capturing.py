"""PacketCapture: what one capture targets, what its status says, when its files go (pure).

A capture names only its own namespace's workloads (``spec.targets.groups`` are workload names,
looked up as ``<namespace>.<workload>`` Groups; ``podSelector`` selects the namespace's pods), so
creating one is capturing that namespace and nothing more. The pods come from the Resolver
(:meth:`~flowmap_operator.resolution.Resolver.namespace_pods`), as ``Peer`` records of their
workload group; the agent on each node turns a pod into its host-side interface.

A capture with a trigger is armed on its nodes until an event of its kind (Denied, Violation,
Threat) touches one of its target workloads' edges (:func:`fires`); the orders then say when
it happened, so that each node writes the packets from ``preTriggerSeconds`` before that moment.

A user stops a capture with the annotation ``flowmap.dev/stop: "true"`` (``flowmap capture stop``;
the spec is immutable, the metadata is not). A stopped capture is never ordered to a node again,
so each dp still running or armed with it ends it (Stopped) and reports done; it never fires or
starts later, and its files are kept as a finished capture's are (:func:`kept`). Its phase:

* Running while a node that ran it (Armed or Running in the status) has not said it ended: the
  files' sizes and sha256s come with that;
* then Completed, or Failed when no node completed and one failed; a capture stopped before any
  node ran it (Pending, held, or still unreported) is Completed at once, with no file: the user
  ended it, nothing went wrong.

Its conditions say so with the reason ``Stopped``: Ready False (unless a node failed, which is
said first), and Complete's reason holds ``Stopped`` once done. A stop that comes after the
capture finished changes nothing.

Bounded: at most ``max_per_namespace`` unfinished captures of a namespace run (the others wait,
``NamespaceCaptureLimit``), ``MAX_NODES`` nodes per capture (the status's ``nodes`` maxItems) and
``MAX_PEER_ADDRESSES`` addresses in a capture's filters (its peer groups' pods).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from flowmap_api import report_pb2 as pb
from flowmap_api.validity import SHA256
from flowmap_operator.conditions import Said, conditions
from flowmap_operator.ledger import EdgeKey
from flowmap_operator.policy.rules import matches
from flowmap_operator.times import iso, parse_iso
from flowmap_operator.resolution import Peer, group_name

# The schema's defaults, again: the operator never trusts an object to hold them. snapLength's is
# only here (a schema default would always clash with wholePackets).
DURATION, MAX_BYTES, MAX_PACKETS, SNAP, PRE_TRIGGER, TTL = 60, 1 << 20, 10_000, 128, 5, 3600
WHOLE_SNAP = 262_144  # wholePackets: what tcpdump keeps by default
MAX_NODES = 1000  # status.nodes maxItems
MAX_PEER_ADDRESSES = 1024  # all the filters' peer-group addresses of one capture
PENDING, RUNNING, COMPLETED, FAILED = "Pending", "Running", "Completed", "Failed"
# Seconds past a capture's end (its duration, or the user's stop) after which a node that has not
# said it ended is failed (its agent, dp or the node is gone), so that the capture finishes; a
# word it sends later still counts (its file, if any, can be read).
NODE_GRACE = 60.0
STOP_ANNOTATION = "flowmap.dev/stop"  # "true": the user stopped the capture (see the module docstring)
STOPPED = "Stopped"  # the conditions' reason, and the dp's stopReason, for a stop
FINISHED = (COMPLETED, FAILED)
# The dp's states (wire.proto Report) and what a node's entry in status.nodes says of each.
NODE_PHASES = {"armed": "Armed", "running": RUNNING, "done": COMPLETED, "failed": FAILED}
# status.nodes[].stopReason's enum: anything else a node says is written as Failed (an unknown value
# would make the API server refuse the whole status).
STOP_REASONS = frozenset(("DurationReached", "MaxBytesReached", "MaxPacketsReached", "NodeDiskFull",
                          "NodeCaptureLimit", "Stopped", "InterfaceGone", "Failed"))

CaptureKey = tuple[str, str]  # namespace, name
# A live pod of the namespace: its workload group's Peer (member: the pod, node: where it runs),
# its addresses and its labels (those a controller adds per revision or pod left out).
PodView = tuple[Peer, Sequence[str], Mapping[str, str]]


@dataclass(frozen=True)
class Filter:
    """One spec filter, its peer resolved. ``peers`` None: any peer; else the peer's networks."""

    peers: tuple[str, ...] | None = None
    protocol: str = ""  # "" any, else TCP, UDP, ICMP or SCTP
    port: int = 0  # 0 any, else either end's port
    direction: str = "Both"  # Ingress (to the target pod), Egress (from it), Both


@dataclass(frozen=True)
class Capture:
    """One PacketCapture object, as the operator reads it (defaults filled, nothing trusted)."""

    namespace: str
    name: str
    uid: str = ""
    generation: int = 0
    created: float = 0.0
    groups: tuple[str, ...] = ()
    selector: Mapping[str, Any] | None = None
    filters: tuple[Mapping[str, Any], ...] = ()
    duration: int = DURATION
    max_bytes: int = MAX_BYTES
    max_packets: int = MAX_PACKETS
    snaplen: int = SNAP
    trigger: str = ""  # "" none, else Denied, Violation or Threat
    pre_trigger: int = PRE_TRIGGER
    ttl: int = TTL
    status: Mapping[str, Any] | None = None  # as last written
    stopped: bool = False  # the user's STOP_ANNOTATION: never ordered again

    @property
    def key(self) -> CaptureKey:
        return self.namespace, self.name

    @property
    def id(self) -> str:
        """The capture's id on the nodes (wire.proto): ``namespace/name/uid``."""
        return f"{self.namespace}/{self.name}/{self.uid}"

    @property
    def phase(self) -> str:
        return str((self.status or {}).get("phase") or PENDING)

    @property
    def user_stopped(self) -> bool:
        """The user's stop ended it: asked while it had not finished, or said so in the status
        (``stoppedAt``, which stays when the annotation goes: a stopped capture never starts again).
        A stop asked after it finished changes nothing."""
        return bool((self.status or {}).get("stoppedAt")) or (self.stopped and self.phase not in FINISHED)

    @classmethod
    def from_body(cls, body: Mapping[str, Any]) -> Capture:
        meta, spec = body.get("metadata") or {}, body.get("spec") or {}
        targets, trigger = spec.get("targets") or {}, spec.get("trigger") or {}
        snap = WHOLE_SNAP if spec.get("wholePackets") else int(spec.get("snapLength") or SNAP)
        return cls(meta.get("namespace", ""), meta.get("name", ""), meta.get("uid", ""),
                   int(meta.get("generation") or 0), parse_iso(meta.get("creationTimestamp")),
                   tuple(targets.get("groups") or ()), targets.get("podSelector"),
                   tuple(spec.get("filters") or ()), int(spec.get("durationSeconds") or DURATION),
                   int(spec.get("maxBytesPerNode") or MAX_BYTES), int(spec.get("maxPacketsPerNode") or MAX_PACKETS),
                   snap, str(trigger.get("on") or ""), int(trigger.get("preTriggerSeconds", PRE_TRIGGER)),
                   int(spec.get("ttlSecondsAfterFinished") or TTL), body.get("status") or {},
                   (meta.get("annotations") or {}).get(STOP_ANNOTATION) == "true")


# -- (a) the plan ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Plan:
    """What the agents are told of one capture, or why it does not run (``held``)."""

    capture: Capture
    nodes: tuple[tuple[str, tuple[Peer, ...]], ...] = ()  # node -> the target pods on it, sorted
    filters: tuple[Filter, ...] = ()  # none: every packet of the targets
    held: Said | None = None  # ("Ready", False, reason, message) while it may not run
    held_phase: str = PENDING  # the phase while held: Pending (it may run later) or Failed
    nodes_left_out: int = 0  # target nodes beyond MAX_NODES

    @property
    def armed(self) -> bool:
        """Waits for its trigger (even with preTriggerSeconds 0, which keeps no window)."""
        return bool(self.capture.trigger)


def admitted(captures: Iterable[Capture], max_per_namespace: int) -> set[CaptureKey]:
    """The unfinished captures that may run: per namespace, those already running, then the oldest.

    One already running is never displaced by an older one that could not run before; a stopped
    one takes no place.
    """
    by_namespace: dict[str, list[Capture]] = {}
    for c in captures:
        if c.phase not in FINISHED and not c.user_stopped:  # never runs again: no slot
            by_namespace.setdefault(c.namespace, []).append(c)
    out: set[CaptureKey] = set()
    for found in by_namespace.values():
        found.sort(key=lambda c: (c.phase != RUNNING, c.created, c.name))
        out.update(c.key for c in found[:max_per_namespace])
    return out


def _networks(values: Iterable[str]) -> list[str]:
    """Each address or network normalised (an address is its own /32 or /128); what does not parse
    (the schema refuses such a CIDR: never trust, never crash) is left out."""
    out = []
    for value in values:
        try:
            out.append(str(ipaddress.ip_network(value, strict=False)))
        except ValueError:
            continue
    return out


def plan(capture: Capture, pods: Iterable[PodView], *, admitted: bool, max_per_namespace: int,
         services: Mapping[str, Sequence[str]] | None = None) -> Plan:
    """Which nodes and pods ``capture`` targets among ``pods`` (the live pods of its namespace),
    and its filters with peer groups resolved to their pods' addresses and the ClusterIPs of the
    Services in front of them (``services``, by group: the target pod's interface carries the
    Service's address of a call, as the node DNATs after it). A stopped capture is held
    (no node is told of it again) and Completed unless a node that ran it still runs."""
    if capture.user_stopped:
        # No nodes: the status lists those that ran it (their reports), as its schema says.
        return Plan(capture, held=("Ready", False, STOPPED, f"stopped by the user ({STOP_ANNOTATION})"),
                    held_phase=COMPLETED)
    if not admitted:
        return Plan(capture, held=("Ready", False, "NamespaceCaptureLimit",
                                   f"{capture.namespace} already runs {max_per_namespace} captures, the most a "
                                   "namespace may (FLOWMAP_OPERATOR_MAX_CAPTURES_PER_NAMESPACE); it starts when "
                                   "one of them finishes"))
    ns = capture.namespace
    own = [(peer, ips, labels) for peer, ips, labels in pods if peer.namespace == ns]  # never another namespace
    groups = {group_name(ns, g) for g in capture.groups}
    by_node: dict[str, list[Peer]] = {}
    for peer, _, labels in own:
        chosen = peer.group in groups or (capture.selector is not None and matches(capture.selector, labels))
        if chosen and peer.node:
            by_node.setdefault(peer.node, []).append(peer)
    nodes = tuple((node, tuple(sorted(by_node[node], key=lambda p: p.member))) for node in sorted(by_node))
    if not nodes:
        return Plan(capture, held=("Ready", False, "NoTargets",
                                   f"no running pod of {ns} is a target (groups {', '.join(capture.groups) or '-'}"
                                   f"{', podSelector' if capture.selector is not None else ''}); it starts when one is"))
    addresses: dict[str, list[str]] = {group: _networks(ips) for group, ips in (services or {}).items()}
    for peer, ips, _ in own:
        addresses.setdefault(peer.group, []).extend(_networks(ips))
    filters, empty, total = [], [], 0
    for raw in capture.filters:
        other = raw.get("peer") or {}
        peers: tuple[str, ...] | None = None
        if other.get("group"):
            peers = tuple(sorted(set(addresses.get(group_name(ns, other["group"]), ()))))
            total += len(peers)
            if not peers:
                empty.append(other["group"])
                continue  # matches nothing while the group has no pods
        elif other.get("cidr"):
            peers = tuple(_networks([other["cidr"]]))
            if not peers:
                empty.append(other["cidr"])
                continue
        filters.append(Filter(peers, str(raw.get("protocol") or ""), int(raw.get("port") or 0),
                              str(raw.get("direction") or "Both")))
    if capture.filters and not filters:
        # No filter left is not "no filters" (every packet): it waits for a peer to have pods.
        return Plan(capture, held=("Ready", False, "NoTargets",
                                   f"the peers of every filter hold no address ({', '.join(empty)}): "
                                   "nothing can match yet"))
    if total > MAX_PEER_ADDRESSES:
        return Plan(capture, held=("Ready", False, "Failed",
                                   f"the filters' peer groups hold {total} addresses, more than the "
                                   f"{MAX_PEER_ADDRESSES} a capture may filter on: name a cidr instead"),
                    held_phase=FAILED)
    return Plan(capture, nodes[:MAX_NODES], tuple(filters), nodes_left_out=max(0, len(nodes) - MAX_NODES))


# -- (b) the status ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class NodeReport:
    """What a node's agent last said of one capture (the dp's Report)."""

    node: str
    state: str  # armed | running | done | failed
    packets: int = 0
    bytes: int = 0
    drops: int = 0
    file_bytes: int = 0
    sha256: str = ""  # when done
    stop_reason: str = ""  # DurationReached, MaxBytesReached, ..., Failed
    message: str = ""  # with a failure: what the node said


def _node_entry(node: str, report: NodeReport | None) -> dict[str, Any]:
    if report is None:
        return {"node": node, "phase": PENDING}
    entry: dict[str, Any] = {"node": node, "phase": NODE_PHASES.get(report.state, PENDING),
                             "packets": max(0, report.packets), "bytes": max(0, report.bytes),
                             "drops": max(0, report.drops), "fileBytes": max(0, report.file_bytes)}
    if SHA256.fullmatch(report.sha256):
        entry["sha256"] = report.sha256
    if report.stop_reason:
        entry["stopReason"] = report.stop_reason if report.stop_reason in STOP_REASONS else "Failed"
    return entry


def _why(entry: Mapping[str, Any], reports: Mapping[str, NodeReport]) -> str:
    """``node: StopReason (what the node said)``."""
    report = reports.get(entry["node"])
    said = f" ({report.message})" if report and report.message else ""
    return f"{entry['node']}: {entry.get('stopReason') or entry['phase']}{said}"


def _phase(plan: Plan, entries: Sequence[dict[str, Any]], before: str) -> str:
    phases = [e["phase"] for e in entries]
    if before in FINISHED:
        return before  # a finished capture never runs again
    if not phases or all(p == PENDING for p in phases):
        return plan.held_phase if plan.held else PENDING
    if all(p in FINISHED for p in phases):
        return COMPLETED if COMPLETED in phases else FAILED
    return RUNNING


def _said(plan: Plan, entries: Sequence[dict[str, Any]], phase: str,
          reports: Mapping[str, NodeReport]) -> list[Said]:
    failed = [e for e in entries if e["phase"] == FAILED]
    by_user = plan.capture.user_stopped
    stopped = sorted({e.get("stopReason") or "Failed" for e in entries if e["phase"] in FINISHED}
                     | ({STOPPED} if by_user else set()))
    if plan.held and (phase in (PENDING, FAILED) or by_user) and not failed:
        ready = plan.held
    elif failed:
        reasons = ",".join(sorted({e.get("stopReason") or "Failed" for e in failed}))
        ready = ("Ready", False, reasons, "; ".join(_why(e, reports) for e in failed))
    elif phase == PENDING:
        ready = ("Ready", False, "Starting", f"waiting for the agents of {len(entries)} nodes")
    else:
        waiting = sum(e["phase"] == PENDING for e in entries)
        arming = sum(e["phase"] == "Armed" for e in entries)
        reason = "Starting" if waiting else "Armed" if arming else phase
        message = f"{len(entries) - waiting} of {len(entries)} nodes started"
        ready = ("Ready", not waiting, reason,
                 message + (f", {arming} waiting for {plan.capture.trigger}" if arming else ""))
    if plan.nodes_left_out:
        kind, holds, reason, message = ready
        ready = (kind, holds, reason, f"{message}; {plan.nodes_left_out} more nodes left out (at most {MAX_NODES})")
    if phase in FINISHED:
        why = "; ".join(_why(e, reports) for e in entries if e["phase"] in FINISHED)
        if by_user:
            why = f"stopped by the user ({STOP_ANNOTATION}){'; ' + why if why else ' before any node ran it'}"
        complete: Said = ("Complete", True, ",".join(stopped) or phase, why or "it never ran")
    elif by_user:
        closing = [e["node"] for e in entries if e["phase"] not in FINISHED]
        complete = ("Complete", False, STOPPED, f"stopped by the user ({STOP_ANNOTATION}); waiting for "
                                               f"{len(closing)} nodes to close their files ({', '.join(closing)})")
    else:
        active = [e["phase"] for e in entries if e["phase"] != PENDING]
        done = sum(p in FINISHED for p in active)
        armed = bool(active) and all(p == "Armed" for p in active)
        complete = ("Complete", False, "Armed" if armed else phase,
                    f"{done} of {len(entries)} nodes finished, {len(active) - done} "
                    f"{'armed' if armed else 'running'}")
    return [ready, complete]


def status(plan: Plan, reports: Mapping[str, NodeReport], now: float, fired: float | None = None) -> dict[str, Any]:
    """The status to write: phase, per-node entries and totals, times, conditions.

    ``reports`` are the agents' last words by node; a node that reported keeps its entry even once
    it holds no target any more (its file is there); ``fired``: when the trigger happened (see
    :func:`fires`). Times are set once, when first true (``stoppedAt``: when the operator first
    saw the user's stop of an unfinished capture).
    """
    capture = plan.capture
    before = capture.status or {}
    names = sorted({node for node, _ in plan.nodes} | set(reports))[:MAX_NODES]
    end = _end(capture, before)
    if end is not None and now > end + NODE_GRACE:
        reports = {**{node: NodeReport(node, "failed", stop_reason="Failed", message=(
            f"no end reported {NODE_GRACE:.0f} s after the capture's: the node, its agent or its dp is gone"))
            for node in names}, **{node: r for node, r in reports.items() if r.state in ("done", "failed")}}
    entries = [_node_entry(node, reports.get(node)) for node in names]
    phase = _phase(plan, entries, str(before.get("phase") or PENDING))
    out: dict[str, Any] = {"phase": phase, "observedGeneration": capture.generation,
                           "totals": {k: sum(e.get(k, 0) for e in entries)
                                      for k in ("packets", "bytes", "drops", "fileBytes")},
                           "nodes": entries}
    started = before.get("startTime") or (iso(now) if any(e["phase"] != PENDING for e in entries) else None)
    triggered = before.get("triggeredAt") or (iso(fired) if capture.trigger and fired is not None else None)
    finished = before.get("completionTime") or (iso(now) if phase in FINISHED else None)
    halted = before.get("stoppedAt") or (iso(now) if capture.user_stopped else None)
    for key, value in (("startTime", started), ("triggeredAt", triggered), ("stoppedAt", halted),
                       ("completionTime", finished)):
        if value:
            out[key] = value
    written = {c.get("type", ""): c for c in before.get("conditions") or []}
    out["conditions"] = conditions(_said(plan, entries, phase, reports), written, now, capture.generation)
    return out


def _end(capture: Capture, before: Mapping[str, Any]) -> float | None:
    """When every node should have ended the capture (None: not known yet: not started, or armed)."""
    if before.get("stoppedAt"):
        return parse_iso(before["stoppedAt"])
    since = before.get("triggeredAt") if capture.trigger else before.get("startTime")
    return parse_iso(since) + capture.duration if since else None


# -- (c) expiry --------------------------------------------------------------------------------------


def expires_at(capture: Capture) -> float | None:
    """When a finished capture's files must be removed from the nodes; None while it is not finished."""
    status = capture.status or {}
    if capture.phase not in FINISHED or not status.get("completionTime"):
        return None
    return parse_iso(status["completionTime"]) + capture.ttl


def expired(capture: Capture, now: float) -> bool:
    when = expires_at(capture)
    return when is not None and now >= when


def kept(captures: Iterable[Capture], now: float) -> set[str]:
    """The ids whose files the nodes keep (wire.proto ``keep``): finished, not yet expired; and
    stopped by the user, from the moment it is no longer ordered (a dp deletes the file of an id
    neither ordered nor kept, and a stopped capture ends on the nodes before its phase says so)."""
    return {c.id for c in captures if (c.user_stopped or expires_at(c) is not None) and not expired(c, now)}


# -- (d) triggers ------------------------------------------------------------------------------------

# What the map saw, that a trigger waits for: (edge, Denied | Violation | Threat, when its first
# packet was seen); flowmap_operator.topology.Ingested.events.
Event = tuple[EdgeKey, str, float]


def fires(plans: Iterable[Plan], events: Iterable[Event], fired: Mapping[str, float]) -> dict[str, float]:
    """The armed captures that ``events`` fire, with when: the first event of the capture's kind
    on an edge one of its target workloads is an end of (a workload's pods share its edges, so a
    target pod's workload is what is matched). Captures held, finished or already ``fired`` are
    left out; an event older than the capture counts from the capture's creation."""
    events = list(events)
    out: dict[str, float] = {}
    for p in plans:
        c = p.capture
        if not c.trigger or p.held or c.phase in FINISHED or c.id in fired:
            continue
        groups = {peer.group for _, pods in p.nodes for peer in pods}
        times = [at for (client, server, _, _), kind, at in events
                 if kind == c.trigger and (client in groups or server in groups)]
        if times:
            out[c.id] = max(min(times), c.created)
    return out


# -- (e) what each node is told ---------------------------------------------------------------------

_PROTOCOLS = {"TCP": pb.TCP, "UDP": pb.UDP, "SCTP": pb.SCTP, "ICMP": pb.ICMP}
_DIRECTIONS = {"Ingress": pb.CAPTURE_DIRECTION_INGRESS, "Egress": pb.CAPTURE_DIRECTION_EGRESS}


def order(plan: Plan, pods: Sequence[Peer], fired: float | None = None) -> pb.CaptureOrder:
    """One planned capture as the node holding ``pods`` (its target pods there) runs it;
    ``fired``: when its trigger happened."""
    c = plan.capture
    return pb.CaptureOrder(
        id=c.id, targets=[pb.CaptureTarget(pod=f"{p.namespace}/{p.member}", workload=p.workload) for p in pods],
        filters=[pb.CaptureFilter(cidrs=list(f.peers or ()), protocol=_PROTOCOLS.get(f.protocol, pb.PROTOCOL_UNSPECIFIED),
                                  port=f.port, direction=_DIRECTIONS.get(f.direction, pb.CAPTURE_DIRECTION_BOTH))
                 for f in plan.filters],
        snap_length=c.snaplen, max_bytes=c.max_bytes, max_packets=c.max_packets, duration_seconds=c.duration,
        armed=plan.armed, pre_trigger_seconds=c.pre_trigger if plan.armed else 0,
        fired=plan.armed and fired is not None, fired_unix_ms=round(fired * 1000) if plan.armed and fired else 0)


def node_captures(plans: Iterable[Plan], node: str, keep: Iterable[str],
                  fired: Mapping[str, float] | None = None) -> pb.NodeCaptures:
    """What ``node`` runs now (version left 0): the orders of the unfinished, unheld captures that
    target pods on it, sorted by id, and the finished ids whose files it keeps. ``fired``: when
    each fired capture's trigger happened, by id."""
    fired = fired or {}
    orders: list[pb.CaptureOrder] = [order(p, pods, fired.get(p.capture.id)) for p in plans
                                     if not p.held and p.capture.phase not in FINISHED
                                     for at, pods in p.nodes if at == node]
    orders.sort(key=lambda o: o.id)
    return pb.NodeCaptures(captures=orders, keep=sorted(keep))
