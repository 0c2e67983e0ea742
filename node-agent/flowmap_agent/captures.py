"""Packet captures on demand, on the node (pure): the operator's orders (``NodeCaptures``) and
the agent's view of its pods into the dp's ``Control.packet_captures`` and ``keep``; the dp's
``Health.packet_captures`` back into the operator's ``CaptureStatus``.

flowmap_agent.capturing carries them (the stream, the reports); everything decided is decided here.

* **Targets.** An order names its target pods as ``namespace/name``; the dp captures on the host
  side of their veths, each described ``namespace/workload pod`` (the pcapng's if_description).
  A libvirt VM's member is named ``namespace/node/domain``: the dp captures on each of its taps.
  A pod the agent does not know on this node (yet: its veth not found, or the pod watch behind)
  is left out of the targets, and an order with no known target is left out of the Control until
  one appears: the operator sees no status for it, and it starts when its first target is found.
* **Files.** Every id ordered but left out is added to ``keep``: the dp deletes a finished file
  whose id is neither listed nor kept, and an order's pod that went away must not take its file.
* **What the dp would refuse** (a bound past the schema's, a port without a port protocol) goes
  through as asked, and the dp refuses it whole, saying why: one place for those rules. What the
  agent cannot even say (a CIDR that is none, an enum value it does not know) it refuses itself,
  never widening a filter: that order is reported failed with the reason, as the dp would.

* **Uploads.** The operator asks for a finished file in ``NodeCaptures.uploads``: the agent serves
  each request once, at most ``MAX_NODE_UPLOADS`` at a time (:func:`uploads` says which to start
  and which to cancel, withdrawn), and sends only the file the dp reported for that id, by the
  path of its status, if that path is the dp's own name for it directly in the capture folder
  (:func:`upload_path`: nothing else on the node can be asked for by naming it).

Sizes: at most ``demand.MAX_WANTED`` orders and ``demand.MAX_KEEP`` kept ids are read (the dp
reads no more), descriptions and every status string are cut to a bound, statuses at most
``MAX_STATUSES``.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import PurePosixPath

from flowmap_agent.domains import Vm, local_vm
from flowmap_agent.errors import Unservable, Untranslatable
from flowmap_api import report_pb2 as pb
from flowmap_api.limits import MAX_NODE_UPLOADS
from flowmap_dp import wire_pb2
from flowmap_dp.capturing import file_name
from flowmap_dp.demand import MAX_ID, MAX_KEEP, MAX_WANTED

# The Protocol enum of the contract -> the IP protocol number (the dp takes ICMP as ICMPv6 on IPv6).
PROTOCOLS = {pb.PROTOCOL_UNSPECIFIED: 0, pb.TCP: 6, pb.UDP: 17, pb.SCTP: 132, pb.ICMP: 1}
DIRECTIONS = {
    pb.CAPTURE_DIRECTION_BOTH: wire_pb2.PACKET_CAPTURE_DIRECTION_BOTH,
    pb.CAPTURE_DIRECTION_INGRESS: wire_pb2.PACKET_CAPTURE_DIRECTION_INGRESS,
    pb.CAPTURE_DIRECTION_EGRESS: wire_pb2.PACKET_CAPTURE_DIRECTION_EGRESS,
}
MAX_DESCRIPTION = 256  # characters: the dp cuts the file's strings to 256 bytes anyway
MAX_STATUSES = MAX_WANTED + MAX_KEEP  # at most what one Control can name
MAX_MESSAGE = 256
MAX_WORD = 64  # state, stop reason, sha256 (64 hex digits)
SHOWN = 64  # characters of an untranslatable value quoted in a message

_MAX_MS = ((1 << 63) - 1) // 1_000_000  # the most milliseconds an int64 of nanoseconds holds


def local_pods(by_ip: Mapping[str, str], interfaces: Mapping[str, str]) -> dict[str, str]:
    """``namespace/name`` -> the host side of its veth, for every pod whose veth is found:
    ``by_ip`` is the pod watch's (IP -> pod), ``interfaces`` the plumbing's (pod IP -> interface)."""
    out: dict[str, str] = {}
    for ip, interface in sorted(interfaces.items()):
        pod = by_ip.get(ip)
        if pod is not None and pod not in out:
            out[pod] = interface
    return out


def _network(cidr: str) -> wire_pb2.PacketCaptureNetwork:
    try:
        net = ipaddress.ip_network(cidr, strict=False)
    except ValueError:
        raise Untranslatable(f"peer {cidr[:SHOWN]!r} is not a CIDR") from None
    return wire_pb2.PacketCaptureNetwork(address=net.network_address.packed, prefix_length=net.prefixlen)


def _filter(f: pb.CaptureFilter) -> wire_pb2.PacketCaptureFilter:
    if f.protocol not in PROTOCOLS:
        raise Untranslatable(f"unknown protocol {f.protocol}")
    if f.direction not in DIRECTIONS:
        raise Untranslatable(f"unknown direction {f.direction}")
    return wire_pb2.PacketCaptureFilter(peers=[_network(c) for c in f.cidrs], protocol=PROTOCOLS[f.protocol],
                                        port=f.port, direction=DIRECTIONS[f.direction])


def description(pod: str, workload: str) -> str:
    """``namespace/workload pod``, bounded."""
    namespace, _, name = pod.partition("/")
    return f"{namespace}/{workload} {name}"[:MAX_DESCRIPTION]


def local_vms(node: str, vms: Iterable[Vm], present: Collection[str]) -> dict[str, tuple[str, ...]]:
    """``<node>/<domain>`` (how the operator names a VM's member, flowmap_operator.resolution) ->
    its taps that are on the node."""
    return {f"{node}/{local_vm(vm, ()).name}": taps for vm in vms if (taps := tuple(t for t in vm.taps if t in present))}


def capture(order: pb.CaptureOrder, pods: Mapping[str, str],
            vms: Mapping[str, Sequence[str]] | None = None) -> wire_pb2.PacketCapture | None:
    """The dp's entry for ``order`` on this node (``pods``: pod -> its interface; ``vms``: a libvirt
    VM's ``<node>/<domain>`` -> its taps, a target ``<namespace>/<node>/<domain>``); None while no
    target is known here. Untranslatable when the order cannot be said to the dp."""
    targets: dict[str, wire_pb2.PacketCaptureTarget] = {}
    for target in order.targets:
        found = pods.get(target.pod)
        interfaces = (found,) if found is not None else (vms or {}).get(target.pod.partition("/")[2], ())
        for interface in interfaces:
            if interface in targets:  # the dp refuses an interface named twice
                continue
            targets[interface] = wire_pb2.PacketCaptureTarget(
                name=interface, description=description(target.pod, target.workload or target.pod.partition("/")[2]))
    filters = [_filter(f) for f in order.filters]  # refused even while no target is known
    if not targets:
        return None
    return wire_pb2.PacketCapture(
        id=order.id, targets=targets.values(), filters=filters, snap_length=order.snap_length,
        max_bytes=order.max_bytes, max_packets=order.max_packets, duration_seconds=order.duration_seconds,
        pre_trigger_seconds=order.pre_trigger_seconds, fired=order.fired, armed=order.armed,
        fired_ns=min(max(order.fired_unix_ms, 0), _MAX_MS) * 1_000_000)


@dataclass(frozen=True)
class Orders:
    """The node's captures in the dp's words: what every Control carries."""

    captures: tuple[wire_pb2.PacketCapture, ...] = ()
    keep: tuple[str, ...] = ()
    refused: Mapping[str, str] = field(default_factory=dict)  # id -> why: the agent's own refusals


def orders(node: pb.NodeCaptures, pods: Mapping[str, str], vms: Mapping[str, Sequence[str]] | None = None) -> Orders:
    """The dp's ``packet_captures`` and ``keep`` for the operator's ``node`` orders and the pods
    known here (see the module docstring)."""
    listed: list[wire_pb2.PacketCapture] = []
    seen: set[str] = set()
    unlisted: list[str] = []
    refused: dict[str, str] = {}
    for order in node.captures[:MAX_WANTED]:
        capture_id = order.id[:MAX_ID]
        if capture_id in seen:
            continue  # an id ordered twice: the first order counts, as in the dp
        seen.add(capture_id)
        try:
            entry = capture(order, pods, vms)
        except Untranslatable as exc:
            refused[capture_id] = str(exc)
            unlisted.append(capture_id)
            continue
        if entry is None:
            unlisted.append(capture_id)
        else:
            listed.append(entry)
    keep = tuple(dict.fromkeys([*unlisted, *(k[:MAX_ID] for k in node.keep[:MAX_KEEP])]))[:MAX_KEEP]
    return Orders(tuple(listed), keep, refused)


def statuses(reported: Iterable[wire_pb2.PacketCaptureStatus], refused: Mapping[str, str]) -> list[pb.CaptureStatus]:
    """How each capture stands, for the operator: the dp's words (its ``Health.packet_captures``),
    strings cut, and the agent's own refusals as failed captures; at most ``MAX_STATUSES``,
    sorted by id."""
    out: dict[str, pb.CaptureStatus] = {}
    for capture_id, why in refused.items():
        out[capture_id[:MAX_ID]] = pb.CaptureStatus(id=capture_id[:MAX_ID], state="failed", stop_reason="Failed",
                                                    message=why[:MAX_MESSAGE])
    for s in reported:
        capture_id = s.id[:MAX_ID]
        if capture_id in out or len(out) >= MAX_STATUSES:
            continue
        out[capture_id] = pb.CaptureStatus(
            id=capture_id, state=s.state[:MAX_WORD], packets=s.packets, bytes=s.bytes, drops=s.drops,
            file_bytes=s.file_bytes, sha256=s.sha256[:MAX_WORD], stop_reason=s.stop_reason[:MAX_WORD],
            message=s.message[:MAX_MESSAGE])
    return [out[i] for i in sorted(out)][:MAX_STATUSES]


@dataclass(frozen=True)
class Uploading:
    """What to do about the operator's upload requests now."""

    start: tuple[pb.UploadRequest, ...] = ()
    cancel: tuple[str, ...] = ()  # request ids being served that the operator no longer asks for


def uploads(asked: Sequence[pb.UploadRequest], serving: Collection[str], served: Collection[str],
            most: int = MAX_NODE_UPLOADS) -> Uploading:
    """Which of the ``asked`` requests to start, and which of those ``serving`` to cancel: each
    request is served once (``served``: ended already, whatever the outcome: the operator asks
    again under a new id), at most ``most`` at a time, in the operator's order."""
    wanted = {r.request: r for r in asked[:MAX_WANTED]}
    cancel = tuple(r for r in serving if r not in wanted)
    room = most - (len(serving) - len(cancel))
    start = [r for i, r in wanted.items() if i not in serving and i not in served][:max(room, 0)]
    return Uploading(tuple(start), cancel)


def upload_path(capture_id: str, reported: Iterable[wire_pb2.PacketCaptureStatus], folder: str
                ) -> tuple[str, wire_pb2.PacketCaptureStatus]:
    """The path of capture ``capture_id``'s file and the dp's status of it, from the dp's latest
    statuses: only a finished capture's file, named by the dp's rule directly in ``folder``.
    Unservable otherwise. (That it is a regular file, not a link, is checked when it is opened.)"""
    shown = capture_id[:SHOWN]
    try:
        name = file_name(capture_id)
    except ValueError:
        raise Unservable(f"{shown!r} is not a capture id") from None
    status = next((s for s in reported if s.id == capture_id), None)
    if status is None:
        raise Unservable(f"the dp reports no capture {shown} (not run here, or by an earlier dp)")
    if status.state in ("armed", "running"):
        raise Unservable(f"capture {shown} is still {status.state}: its file is not finished")
    if not status.path:
        raise Unservable(f"capture {shown} has no file on this node")
    path = PurePosixPath(status.path)
    if path.parent != PurePosixPath(folder) or path.name != name:
        raise Unservable(f"capture {shown}'s file is not {name} in the capture folder: {status.path[:2 * SHOWN]!r}")
    return str(path), status
