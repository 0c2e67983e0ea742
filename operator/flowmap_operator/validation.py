"""A report batch is checked whole before anything of it is applied: refused whole, with a reason."""

from __future__ import annotations

import ipaddress
import re

from flowmap_api import report_pb2 as pb
from flowmap_api.apps import APPLICATIONS, UNKNOWN
from flowmap_api.limits import MAX_NODE_ADDRESSES
from flowmap_operator.errors import InvalidReport

_APPS = frozenset((*APPLICATIONS, UNKNOWN))
_AGENT_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:/-]{0,127}$")
_DNS_NAME = re.compile(r"^(?=.{1,253}$)[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*\.?$")
_POD = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?/[a-z0-9]([-.a-z0-9]*[a-z0-9])?$")
MAX_COUNTER = 2**62  # far above any real interval, far below int64 overflow when summed
MAX_THREATS = 16
MAX_SNIPPET = 256
MAX_NAMES = 10_000


def _ip(value: str, where: str) -> None:
    try:
        ipaddress.ip_address(value)
    except ValueError:
        raise InvalidReport(f"{where}: {value[:64]!r} is not an IP address") from None


def _endpoint(ep: pb.Endpoint, where: str) -> None:
    _ip(ep.ip, f"{where}.ip")
    if ep.port > 65535:
        raise InvalidReport(f"{where}.port: {ep.port} is above 65535")
    if ep.pod and (len(ep.pod) > 317 or not _POD.match(ep.pod)):
        raise InvalidReport(f"{where}.pod: {ep.pod[:64]!r} is not namespace/name")


def validate(batch: pb.ReportBatch, *, max_edges: int) -> None:
    """Raise InvalidReport unless every field of the batch is within the contract."""
    if not _AGENT_ID.match(batch.agent_id):
        raise InvalidReport(f"agent_id: {batch.agent_id[:64]!r} is not 1-128 characters of [A-Za-z0-9._:/-]")
    if not _DNS_NAME.match(batch.node):
        raise InvalidReport(f"node: {batch.node[:64]!r} is not a node name")
    if not batch.sequence:
        if batch.edges or batch.names or batch.lost_deltas or batch.previous:
            raise InvalidReport("sequence: 0 asks for the acknowledgement (and says the node's addresses) only, "
                                "and carries nothing else")
    elif not batch.acked <= batch.previous < batch.sequence:
        raise InvalidReport(f"acked {batch.acked} <= previous {batch.previous} < sequence {batch.sequence} "
                            "does not hold")
    if len(batch.edges) > max_edges:
        raise InvalidReport(f"edges: {len(batch.edges)} edges, more than the limit {max_edges}")
    if len(batch.names) > MAX_NAMES:
        raise InvalidReport(f"names: {len(batch.names)} names, more than the limit {MAX_NAMES}")
    if len(batch.node_addresses) > MAX_NODE_ADDRESSES:
        raise InvalidReport(f"node_addresses: {len(batch.node_addresses)} addresses, more than the limit "
                            f"{MAX_NODE_ADDRESSES}")
    for i, address in enumerate(batch.node_addresses):
        _ip(address, f"node_addresses[{i}]")
    for i, edge in enumerate(batch.edges):
        where = f"edges[{i}]"
        _endpoint(edge.client, f"{where}.client")
        _endpoint(edge.server, f"{where}.server")
        if edge.protocol == pb.PROTOCOL_UNSPECIFIED or edge.protocol not in pb.Protocol.values():
            raise InvalidReport(f"{where}.protocol: must be TCP, UDP, SCTP or ICMP")
        for app in edge.apps:
            if app not in _APPS:
                raise InvalidReport(f"{where}.apps: {app[:32]!r} is not a known application")
        for name in ("bytes_c2s", "bytes_s2c", "packets_c2s", "packets_s2c"):
            if getattr(edge, name) > MAX_COUNTER:
                raise InvalidReport(f"{where}.{name}: {getattr(edge, name)} is implausibly large")
        if edge.first_seen_unix_ms > edge.last_seen_unix_ms:
            raise InvalidReport(f"{where}: first_seen is after last_seen")
        if len(edge.threats) > MAX_THREATS:
            raise InvalidReport(f"{where}.threats: more than {MAX_THREATS}")
        for threat in edge.threats:
            if threat.name not in _APPS or len(threat.snippet) > MAX_SNIPPET:
                raise InvalidReport(f"{where}.threats: unknown name or snippet over {MAX_SNIPPET} characters")
        if edge.verdict not in pb.Verdict.values():
            raise InvalidReport(f"{where}.verdict: unknown value {edge.verdict}")
    for i, name in enumerate(batch.names):
        _ip(name.ip, f"names[{i}].ip")
        if not _DNS_NAME.match(name.name.lower()):
            raise InvalidReport(f"names[{i}].name: {name.name[:64]!r} is not a DNS name")
