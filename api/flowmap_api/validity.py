"""What a report may say: one definition, used by the agent before it sends and by the operator
when it receives (an old agent may not have checked).

Nothing counted is ever lost for its metadata. What cannot stop counting is normalised or
dropped, and counted by (field, reason): a DNS name that is not one (dropped; non-ASCII is
converted to IDNA), an application the registry does not know (``unknown``), a pod string that
is not ``namespace/name`` (cleared: the endpoint still counts by its address), an address in a
non-canonical spelling, threat hits beyond the bound or an over-long snippet (cut), a threat block's
name (``denied_for``) this version does not know (``unknown``) or on an edge that was not denied
(cleared). Only an edge
that cannot be counted is refused, by its index into ``batch.edges`` (``Invalid.edge``): an
address that is not an IP, a port above 65535, an unknown L4 protocol or verdict, a counter above
``MAX_COUNTER``. A batch is refused as a whole only for what is the batch's own: its agent id,
node, sequence order, and the counts of ``flowmap_api.limits``.

Every pattern is anchored at both ends with ``re.fullmatch`` (``$`` would match before a final
newline: ``evil.com\\n`` passed once). Pure: no I/O, no clock.
"""

from __future__ import annotations

import functools
import ipaddress
import operator
import re
from collections import Counter
from collections.abc import MutableSequence

from flowmap_api import report_pb2 as pb
from flowmap_api.apps import APPLICATIONS, UNKNOWN
from flowmap_api.text import printable
from flowmap_api.threats import NAMES as THREATS
from flowmap_api.threats import UNKNOWN as UNKNOWN_THREAT
from flowmap_api.limits import (MAX_BATCH_EDGES, MAX_CAPTURE_MESSAGE, MAX_CAPTURE_STATUSES, MAX_NAMES,
                                MAX_NODE_ADDRESSES, MAX_NODE_VMS, MAX_POD_ADDRESSES, MAX_VM_ADDRESSES,
                                MAX_VM_NAME)

# The trailing metadata key of an INVALID_ARGUMENT refusal caused by one edge; its value is the
# edge's index into ``batch.edges`` (decimal). A refusal of the batch itself has no such key.
REFUSED_EDGE = "flowmap-refused-edge"

MAX_COUNTER = 2**62  # far above any real interval, far below int64 overflow when summed
MAX_THREATS = 16  # threat hits per edge per batch
MAX_SNIPPET = 256  # characters of a threat hit's snippet (the Connection CRD's bound)
MAX_POD = 317  # namespace (63) / name (253)
MAX_NAME = 253  # a DNS name in text, without the root's dot
# Addresses whose answer ``address`` remembers, and the longest text it remembers one for (an IPv6
# address with an IPv4 tail and a zone fits; a longer string is parsed every time, never kept).
_REMEMBERED, _REMEMBERED_LENGTH = 16384, 64

_APPS = frozenset((*APPLICATIONS, UNKNOWN))
_THREATS = frozenset((*THREATS, UNKNOWN_THREAT))
_PROTOCOLS = frozenset(v for v in pb.Protocol.values() if v != pb.PROTOCOL_UNSPECIFIED)
_VERDICTS = frozenset(pb.Verdict.values())
_COUNTERS = ("bytes_c2s", "bytes_s2c", "packets_c2s", "packets_s2c")
_counters = operator.attrgetter(*_COUNTERS)
_AGENT_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:/-]{0,127}")
_K8S_NAME = re.compile(r"[a-z0-9](?:[-a-z0-9]*[a-z0-9])?(?:\.[a-z0-9](?:[-a-z0-9]*[a-z0-9])?)*")
_POD = re.compile(r"[a-z0-9](?:[-a-z0-9]{0,61}[a-z0-9])?/[a-z0-9](?:[-.a-z0-9]*[a-z0-9])?")
# A DNS label as resolvers hand them out: letters, digits, hyphens inside, and underscores anywhere
# (SRV and DNS-SD names such as _http._tcp.api.shop.svc.cluster.local are ordinary DNS).
_LABEL = r"[a-z0-9_](?:[-a-z0-9_]{0,61}[a-z0-9_])?"
_DNS_NAME = re.compile(rf"{_LABEL}(?:\.{_LABEL})*")
# A capture's id (CaptureOrder.id): namespace (a DNS label) / name (a DNS subdomain) / uid.
_CAPTURE_ID = re.compile(r"[a-z0-9](?:[-a-z0-9]{0,61}[a-z0-9])?/[a-z0-9](?:[-.a-z0-9]{0,251}[a-z0-9])?"
                         r"/[0-9a-f][-0-9a-f]{0,63}")
CAPTURE_STATES = frozenset(("armed", "running", "done", "failed"))
SHA256 = re.compile(r"[0-9a-f]{64}")  # a finished capture's file digest, as status.nodes[].sha256 holds it
_STOP_REASON = re.compile(r"[A-Za-z]{1,64}")
_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
VM_LABEL = re.compile(r"[a-z0-9](?:[-a-z0-9]{0,61}[a-z0-9])?")  # a DNS label: it names the VM's Group

# What became of an element, as (field, reason): the labels of the operator's metric.
Tally = Counter[tuple[str, str]]


class Invalid(ValueError):
    """The batch cannot be applied: ``edge`` is the index of the one edge that cannot be counted,
    or None when the batch itself breaks the contract. The message names the field."""

    def __init__(self, message: str, edge: int | None = None) -> None:
        super().__init__(message)
        self.edge = edge


def dns_name(raw: str) -> tuple[str | None, str]:
    """A name as the map keeps it: lower case, no root dot, IDNA (punycode) for non-ASCII.

    Returns ``(name, "")`` when it was already so (up to case and the root dot, which are
    spelling), ``(name, reason)`` when converted, ``(None, reason)`` when it is no DNS name
    (control characters, ``<``, spaces, empty labels, over-long).
    """
    if len(raw) > 4 * MAX_NAME:
        return None, "too_long"
    name, reason = raw, ""
    if not name.isascii():
        try:
            name = name.encode("idna").decode("ascii")  # nameprep + punycode, per label (IDNA 2003)
        except UnicodeError:
            return None, "invalid"
        reason = "idna"
    name = name.lower().removesuffix(".")
    if not name:
        return None, "empty"
    if len(name) > MAX_NAME:
        return None, "too_long"
    if not _DNS_NAME.fullmatch(name):
        return None, "invalid"
    return name, reason


def address(raw: str) -> str | None:
    """The canonical text of an IP address, or None when it is not one. A zone (``%eth0``) is
    dropped: it names an interface of the sender, not an address of the map.

    Every end of every edge is read here, a few thousand times a second from the same few
    thousand addresses: the answers for short texts are remembered (a bounded cache, the same
    answers), parsing one costs ~3 µs.
    """
    return _remembered(raw) if len(raw) <= _REMEMBERED_LENGTH else _address(raw)


def _address(raw: str) -> str | None:
    try:
        ip = ipaddress.ip_address(raw.partition("%")[0] if "%" in raw else raw)
    except ValueError:
        return None
    return str(ip) if ip.version == 6 or "%" in raw else raw  # an IPv4 address parses only canonical


_remembered = functools.lru_cache(maxsize=_REMEMBERED)(_address)


def uncountable(edge: pb.EdgeDelta) -> str | None:
    """Why this edge cannot be counted (naming the field), or None when it can."""
    # (Each field is read once: the operator checks every delta of every batch, and a protobuf
    # attribute costs about as much as a dict lookup.)
    for side, ep in (("client", edge.client), ("server", edge.server)):
        ip, port = ep.ip, ep.port
        if address(ip) is None:
            return f"{side}.ip: {ip[:64]!r} is not an IP address"
        if port > 65535:
            return f"{side}.port: {port} is above 65535"
    if edge.protocol not in _PROTOCOLS:
        return f"protocol: {edge.protocol} is not TCP, UDP, SCTP or ICMP"
    if edge.verdict not in _VERDICTS:
        return f"verdict: {edge.verdict} is not a known verdict (whether the bytes were delivered is unknown)"
    counters = _counters(edge)
    if max(counters) > MAX_COUNTER:
        name, value = next((n, v) for n, v in zip(_COUNTERS, counters) if v > MAX_COUNTER)
        return f"{name}: {value} is above {MAX_COUNTER}"
    return None


def normalise_edge(edge: pb.EdgeDelta, tally: Tally) -> None:
    """Normalise, in place, the metadata of an edge that can be counted; count what changed."""
    for ep in (edge.client, edge.server):
        ip, pod = ep.ip, ep.pod
        canonical = address(ip)
        if canonical is not None and canonical != ip:
            ep.ip = canonical
            tally["ip", "not_canonical"] += 1
        if pod and (len(pod) > MAX_POD or not _POD.fullmatch(pod)):
            ep.pod = ""
            tally["pod", "invalid"] += 1
    apps = edge.apps
    if len(apps) > 1 or (apps and apps[0] not in _APPS):
        unknown = sum(app not in _APPS for app in apps)
        known = list(dict.fromkeys(app if app in _APPS else UNKNOWN for app in apps))  # each once
        if unknown:
            tally["app", "unknown"] += unknown
        del apps[:]
        apps.extend(known)
    first, last = edge.first_seen_unix_ms, edge.last_seen_unix_ms
    if first > last:
        edge.first_seen_unix_ms = last
        tally["seen", "first_after_last"] += 1
    threats = edge.threats
    if len(threats) > MAX_THREATS:
        tally["threats", "too_many"] += len(threats) - MAX_THREATS
        del threats[MAX_THREATS:]
    for threat in threats:
        if threat.name not in _THREATS:
            threat.name = UNKNOWN_THREAT
            tally["threat_name", "unknown"] += 1
        if len(threat.snippet) > MAX_SNIPPET:
            threat.snippet = threat.snippet[:MAX_SNIPPET]
            tally["snippet", "too_long"] += 1
        if (shown := printable(threat.snippet, MAX_SNIPPET)) != threat.snippet:
            threat.snippet = shown
            tally["snippet", "unprintable"] += 1
    if edge.denied_for:
        if edge.verdict != pb.DENIED:
            edge.denied_for = ""  # a reason for a denial that did not happen says nothing
            tally["denied_for", "not_denied"] += 1
        elif edge.denied_for not in _THREATS:
            edge.denied_for = UNKNOWN_THREAT
            tally["denied_for", "unknown"] += 1


def normalise_names(batch: pb.ReportBatch, tally: Tally) -> None:
    """Keep, in place, the DNS answers that name an address with a DNS name, normalised; count the rest."""
    if len(batch.names) > MAX_NAMES:
        tally["names", "too_many"] += len(batch.names) - MAX_NAMES
        del batch.names[MAX_NAMES:]
    dropped = False
    for entry in batch.names:
        ip, (name, reason) = address(entry.ip), dns_name(entry.name)
        if ip is None:
            tally["name_ip", "not_ip"] += 1
        elif name is None or reason:
            tally["name", reason] += 1
        if ip is None or name is None:
            dropped = True
            entry.name = ""  # marks it for removal below
            continue
        if ip != entry.ip:
            entry.ip = ip
        if name != entry.name:
            entry.name = name
    if dropped:
        kept = [entry for entry in batch.names if entry.name]
        del batch.names[:]
        batch.names.extend(kept)


def check_batch(batch: pb.ReportBatch, *, max_edges: int = MAX_BATCH_EDGES) -> None:
    """Raise ``Invalid`` (naming no edge) unless the batch's own fields are within the contract."""
    if not _AGENT_ID.fullmatch(batch.agent_id):
        raise Invalid(f"agent_id: {batch.agent_id[:64]!r} is not 1-128 characters of [A-Za-z0-9._:/-]")
    if len(batch.node) > MAX_NAME or not _K8S_NAME.fullmatch(batch.node):
        raise Invalid(f"node: {batch.node[:64]!r} is not a node name")
    if not batch.sequence:
        if batch.edges or batch.names or batch.lost_deltas or batch.previous:
            raise Invalid("sequence: 0 asks for the acknowledgement (and says the node's addresses and VMs) "
                          "only, and carries nothing else")
    elif not batch.acked <= batch.previous < batch.sequence:
        raise Invalid(f"acked {batch.acked} <= previous {batch.previous} < sequence {batch.sequence} does not hold")
    if len(batch.edges) > max_edges:
        raise Invalid(f"edges: {len(batch.edges)} edges, more than the limit {max_edges}")
    if len(batch.node_addresses) > MAX_NODE_ADDRESSES:
        raise Invalid(f"node_addresses: {len(batch.node_addresses)} addresses, more than the limit "
                      f"{MAX_NODE_ADDRESSES}")
    for i, raw in enumerate(batch.node_addresses):
        if address(raw) is None:
            raise Invalid(f"node_addresses[{i}]: {raw[:64]!r} is not an IP address")
    if batch.vms:
        check_vms(batch)
    check_pod_addresses(batch)


def check_vms(batch: pb.ReportBatch) -> None:
    """Raise ``Invalid`` unless the batch's VMs are within the contract (they name Groups: the
    agent sends only what this accepts, flowmap_agent.domains)."""
    if not batch.vms_followed:
        raise Invalid("vms: listed by an agent that does not say it follows the node's libvirt (vms_followed)")
    if len(batch.vms) > MAX_NODE_VMS:
        raise Invalid(f"vms: {len(batch.vms)} VMs, more than the limit {MAX_NODE_VMS}")
    seen: set[str] = set()
    for i, vm in enumerate(batch.vms):
        if not _UUID.fullmatch(vm.uuid) or vm.uuid in seen:
            raise Invalid(f"vms[{i}].uuid: {vm.uuid[:64]!r} is not a canonical UUID, or is listed twice")
        seen.add(vm.uuid)
        if not 0 < len(vm.name) <= MAX_VM_NAME or "/" in vm.name or printable(vm.name, MAX_VM_NAME) != vm.name:
            raise Invalid(f"vms[{i}].name: {printable(vm.name, 80)!r} is not 1-{MAX_VM_NAME} printable "
                          "characters without '/' (a libvirt domain's name)")
        if vm.label and not VM_LABEL.fullmatch(vm.label):
            raise Invalid(f"vms[{i}].label: {printable(vm.label, 80)!r} is not a DNS label")
        if len(vm.addresses) > MAX_VM_ADDRESSES:
            raise Invalid(f"vms[{i}].addresses: {len(vm.addresses)} addresses, more than the limit {MAX_VM_ADDRESSES}")
        for j, raw in enumerate(vm.addresses):
            if address(raw) is None:
                raise Invalid(f"vms[{i}].addresses[{j}]: {raw[:64]!r} is not an IP address")


def check_pod_addresses(batch: pb.ReportBatch) -> None:
    """Raise ``Invalid`` unless the batch's secondary pod addresses are within the contract: at most
    ``MAX_POD_ADDRESSES`` in all, each entry a pod name with IP addresses (the agent builds them so)."""
    total = sum(len(entry.ips) for entry in batch.pod_addresses)
    if len(batch.pod_addresses) > MAX_POD_ADDRESSES or total > MAX_POD_ADDRESSES:
        raise Invalid(f"pod_addresses: {total} addresses of {len(batch.pod_addresses)} pods, more than the limit "
                      f"{MAX_POD_ADDRESSES}")
    for i, entry in enumerate(batch.pod_addresses):
        if len(entry.pod) > MAX_POD or not _POD.fullmatch(entry.pod):
            raise Invalid(f"pod_addresses[{i}].pod: {entry.pod[:64]!r} is not namespace/name")
        for j, raw in enumerate(entry.ips):
            if address(raw) is None:
                raise Invalid(f"pod_addresses[{i}].ips[{j}]: {raw[:64]!r} is not an IP address")


def _canonical(addresses: MutableSequence[str], field: str, tally: Tally) -> None:
    """Addresses (checked already) in canonical spelling, in place; each one respelt counted."""
    for i, raw in enumerate(addresses):
        canonical = address(raw)
        if canonical is not None and canonical != raw:
            addresses[i] = canonical
            tally[field, "not_canonical"] += 1


def normalise(batch: pb.ReportBatch, *, max_edges: int = MAX_BATCH_EDGES) -> Tally:
    """Check the batch and normalise its metadata in place; what was normalised or dropped, by
    (field, reason). Raises ``Invalid`` for the batch, or for the first edge that cannot be counted
    (edges before it may already be normalised)."""
    check_batch(batch, max_edges=max_edges)
    tally: Tally = Counter()
    for i, edge in enumerate(batch.edges):
        problem = uncountable(edge)
        if problem is not None:
            raise Invalid(f"edges[{i}].{problem}", edge=i)
        normalise_edge(edge, tally)
    _canonical(batch.node_addresses, "node_address", tally)
    for vm in batch.vms:
        _canonical(vm.addresses, "vm_address", tally)
    for entry in batch.pod_addresses:
        _canonical(entry.ips, "pod_address", tally)
    normalise_names(batch, tally)
    return tally


def check_capture_report(report: pb.CaptureReport) -> None:
    """Raise ``Invalid`` unless every part of the capture report is within the contract: it is
    applied whole or not at all (each status is cumulative, so nothing is lost by refusing)."""
    if len(report.node) > MAX_NAME or not _K8S_NAME.fullmatch(report.node):
        raise Invalid(f"node: {report.node[:64]!r} is not a node name")
    if len(report.captures) > MAX_CAPTURE_STATUSES:
        raise Invalid(f"captures: {len(report.captures)} statuses, more than the limit {MAX_CAPTURE_STATUSES}")
    seen: set[str] = set()
    for i, status in enumerate(report.captures):
        if not _CAPTURE_ID.fullmatch(status.id):
            raise Invalid(f"captures[{i}].id: {status.id[:64]!r} is not namespace/name/uid")
        if status.id in seen:
            raise Invalid(f"captures[{i}].id: {status.id} is reported twice")
        seen.add(status.id)
        if status.state not in CAPTURE_STATES:
            raise Invalid(f"captures[{i}].state: {status.state[:64]!r} is not one of {', '.join(sorted(CAPTURE_STATES))}")
        for name in ("packets", "bytes", "drops", "file_bytes"):
            if getattr(status, name) > MAX_COUNTER:
                raise Invalid(f"captures[{i}].{name}: {getattr(status, name)} is above {MAX_COUNTER}")
        if status.sha256 and not SHA256.fullmatch(status.sha256):
            raise Invalid(f"captures[{i}].sha256: {status.sha256[:80]!r} is not 64 lower-case hex digits")
        if status.stop_reason and not _STOP_REASON.fullmatch(status.stop_reason):
            raise Invalid(f"captures[{i}].stop_reason: {status.stop_reason[:80]!r} is not 1-64 letters")
        if len(status.message) > MAX_CAPTURE_MESSAGE:
            raise Invalid(f"captures[{i}].message: {len(status.message)} characters, more than {MAX_CAPTURE_MESSAGE}")
