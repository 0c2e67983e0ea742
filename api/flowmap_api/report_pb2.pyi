from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Protocol(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    PROTOCOL_UNSPECIFIED: _ClassVar[Protocol]
    TCP: _ClassVar[Protocol]
    UDP: _ClassVar[Protocol]
    SCTP: _ClassVar[Protocol]
    ICMP: _ClassVar[Protocol]

class Verdict(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    VERDICT_UNSPECIFIED: _ClassVar[Verdict]
    ALLOWED: _ClassVar[Verdict]
    DENIED: _ClassVar[Verdict]

class CaptureDirection(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    CAPTURE_DIRECTION_BOTH: _ClassVar[CaptureDirection]
    CAPTURE_DIRECTION_INGRESS: _ClassVar[CaptureDirection]
    CAPTURE_DIRECTION_EGRESS: _ClassVar[CaptureDirection]
PROTOCOL_UNSPECIFIED: Protocol
TCP: Protocol
UDP: Protocol
SCTP: Protocol
ICMP: Protocol
VERDICT_UNSPECIFIED: Verdict
ALLOWED: Verdict
DENIED: Verdict
CAPTURE_DIRECTION_BOTH: CaptureDirection
CAPTURE_DIRECTION_INGRESS: CaptureDirection
CAPTURE_DIRECTION_EGRESS: CaptureDirection

class Endpoint(_message.Message):
    __slots__ = ("ip", "port", "pod", "local")
    IP_FIELD_NUMBER: _ClassVar[int]
    PORT_FIELD_NUMBER: _ClassVar[int]
    POD_FIELD_NUMBER: _ClassVar[int]
    LOCAL_FIELD_NUMBER: _ClassVar[int]
    ip: str
    port: int
    pod: str
    local: bool
    def __init__(self, ip: _Optional[str] = ..., port: _Optional[int] = ..., pod: _Optional[str] = ..., local: _Optional[bool] = ...) -> None: ...

class ThreatHit(_message.Message):
    __slots__ = ("name", "snippet", "time_unix_ms")
    NAME_FIELD_NUMBER: _ClassVar[int]
    SNIPPET_FIELD_NUMBER: _ClassVar[int]
    TIME_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    name: str
    snippet: str
    time_unix_ms: int
    def __init__(self, name: _Optional[str] = ..., snippet: _Optional[str] = ..., time_unix_ms: _Optional[int] = ...) -> None: ...

class EdgeDelta(_message.Message):
    __slots__ = ("client", "server", "protocol", "apps", "bytes_c2s", "bytes_s2c", "packets_c2s", "packets_s2c", "sessions_opened", "sessions_closed", "sessions_active", "first_seen_unix_ms", "last_seen_unix_ms", "threats", "verdict", "denied_for")
    CLIENT_FIELD_NUMBER: _ClassVar[int]
    SERVER_FIELD_NUMBER: _ClassVar[int]
    PROTOCOL_FIELD_NUMBER: _ClassVar[int]
    APPS_FIELD_NUMBER: _ClassVar[int]
    BYTES_C2S_FIELD_NUMBER: _ClassVar[int]
    BYTES_S2C_FIELD_NUMBER: _ClassVar[int]
    PACKETS_C2S_FIELD_NUMBER: _ClassVar[int]
    PACKETS_S2C_FIELD_NUMBER: _ClassVar[int]
    SESSIONS_OPENED_FIELD_NUMBER: _ClassVar[int]
    SESSIONS_CLOSED_FIELD_NUMBER: _ClassVar[int]
    SESSIONS_ACTIVE_FIELD_NUMBER: _ClassVar[int]
    FIRST_SEEN_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    LAST_SEEN_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    THREATS_FIELD_NUMBER: _ClassVar[int]
    VERDICT_FIELD_NUMBER: _ClassVar[int]
    DENIED_FOR_FIELD_NUMBER: _ClassVar[int]
    client: Endpoint
    server: Endpoint
    protocol: Protocol
    apps: _containers.RepeatedScalarFieldContainer[str]
    bytes_c2s: int
    bytes_s2c: int
    packets_c2s: int
    packets_s2c: int
    sessions_opened: int
    sessions_closed: int
    sessions_active: int
    first_seen_unix_ms: int
    last_seen_unix_ms: int
    threats: _containers.RepeatedCompositeFieldContainer[ThreatHit]
    verdict: Verdict
    denied_for: str
    def __init__(self, client: _Optional[_Union[Endpoint, _Mapping]] = ..., server: _Optional[_Union[Endpoint, _Mapping]] = ..., protocol: _Optional[_Union[Protocol, str]] = ..., apps: _Optional[_Iterable[str]] = ..., bytes_c2s: _Optional[int] = ..., bytes_s2c: _Optional[int] = ..., packets_c2s: _Optional[int] = ..., packets_s2c: _Optional[int] = ..., sessions_opened: _Optional[int] = ..., sessions_closed: _Optional[int] = ..., sessions_active: _Optional[int] = ..., first_seen_unix_ms: _Optional[int] = ..., last_seen_unix_ms: _Optional[int] = ..., threats: _Optional[_Iterable[_Union[ThreatHit, _Mapping]]] = ..., verdict: _Optional[_Union[Verdict, str]] = ..., denied_for: _Optional[str] = ...) -> None: ...

class DnsName(_message.Message):
    __slots__ = ("ip", "name", "ttl_seconds", "seen_unix_ms")
    IP_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    TTL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    SEEN_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    ip: str
    name: str
    ttl_seconds: int
    seen_unix_ms: int
    def __init__(self, ip: _Optional[str] = ..., name: _Optional[str] = ..., ttl_seconds: _Optional[int] = ..., seen_unix_ms: _Optional[int] = ...) -> None: ...

class LocalVm(_message.Message):
    __slots__ = ("uuid", "name", "label", "addresses")
    UUID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    LABEL_FIELD_NUMBER: _ClassVar[int]
    ADDRESSES_FIELD_NUMBER: _ClassVar[int]
    uuid: str
    name: str
    label: str
    addresses: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, uuid: _Optional[str] = ..., name: _Optional[str] = ..., label: _Optional[str] = ..., addresses: _Optional[_Iterable[str]] = ...) -> None: ...

class ReportBatch(_message.Message):
    __slots__ = ("agent_id", "node", "sequence", "acked", "interval_ms", "sent_unix_ms", "edges", "names", "lost_deltas", "previous", "node_addresses", "vms_followed", "vms", "pod_addresses")
    AGENT_ID_FIELD_NUMBER: _ClassVar[int]
    NODE_FIELD_NUMBER: _ClassVar[int]
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    ACKED_FIELD_NUMBER: _ClassVar[int]
    INTERVAL_MS_FIELD_NUMBER: _ClassVar[int]
    SENT_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    EDGES_FIELD_NUMBER: _ClassVar[int]
    NAMES_FIELD_NUMBER: _ClassVar[int]
    LOST_DELTAS_FIELD_NUMBER: _ClassVar[int]
    PREVIOUS_FIELD_NUMBER: _ClassVar[int]
    NODE_ADDRESSES_FIELD_NUMBER: _ClassVar[int]
    VMS_FOLLOWED_FIELD_NUMBER: _ClassVar[int]
    VMS_FIELD_NUMBER: _ClassVar[int]
    POD_ADDRESSES_FIELD_NUMBER: _ClassVar[int]
    agent_id: str
    node: str
    sequence: int
    acked: int
    interval_ms: int
    sent_unix_ms: int
    edges: _containers.RepeatedCompositeFieldContainer[EdgeDelta]
    names: _containers.RepeatedCompositeFieldContainer[DnsName]
    lost_deltas: int
    previous: int
    node_addresses: _containers.RepeatedScalarFieldContainer[str]
    vms_followed: bool
    vms: _containers.RepeatedCompositeFieldContainer[LocalVm]
    pod_addresses: _containers.RepeatedCompositeFieldContainer[PodAddresses]
    def __init__(self, agent_id: _Optional[str] = ..., node: _Optional[str] = ..., sequence: _Optional[int] = ..., acked: _Optional[int] = ..., interval_ms: _Optional[int] = ..., sent_unix_ms: _Optional[int] = ..., edges: _Optional[_Iterable[_Union[EdgeDelta, _Mapping]]] = ..., names: _Optional[_Iterable[_Union[DnsName, _Mapping]]] = ..., lost_deltas: _Optional[int] = ..., previous: _Optional[int] = ..., node_addresses: _Optional[_Iterable[str]] = ..., vms_followed: _Optional[bool] = ..., vms: _Optional[_Iterable[_Union[LocalVm, _Mapping]]] = ..., pod_addresses: _Optional[_Iterable[_Union[PodAddresses, _Mapping]]] = ...) -> None: ...

class PodAddresses(_message.Message):
    __slots__ = ("pod", "ips")
    POD_FIELD_NUMBER: _ClassVar[int]
    IPS_FIELD_NUMBER: _ClassVar[int]
    pod: str
    ips: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, pod: _Optional[str] = ..., ips: _Optional[_Iterable[str]] = ...) -> None: ...

class ReportAck(_message.Message):
    __slots__ = ("applied", "leader", "received", "waiting")
    APPLIED_FIELD_NUMBER: _ClassVar[int]
    LEADER_FIELD_NUMBER: _ClassVar[int]
    RECEIVED_FIELD_NUMBER: _ClassVar[int]
    WAITING_FIELD_NUMBER: _ClassVar[int]
    applied: int
    leader: bool
    received: int
    waiting: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, applied: _Optional[int] = ..., leader: _Optional[bool] = ..., received: _Optional[int] = ..., waiting: _Optional[_Iterable[int]] = ...) -> None: ...

class WatchRequest(_message.Message):
    __slots__ = ("node",)
    NODE_FIELD_NUMBER: _ClassVar[int]
    node: str
    def __init__(self, node: _Optional[str] = ...) -> None: ...

class PodPolicy(_message.Message):
    __slots__ = ("pod", "ips", "egress", "ingress", "block_threats")
    class Peer(_message.Message):
        __slots__ = ("cidrs", "protocol", "ports")
        CIDRS_FIELD_NUMBER: _ClassVar[int]
        PROTOCOL_FIELD_NUMBER: _ClassVar[int]
        PORTS_FIELD_NUMBER: _ClassVar[int]
        cidrs: _containers.RepeatedScalarFieldContainer[str]
        protocol: Protocol
        ports: _containers.RepeatedScalarFieldContainer[int]
        def __init__(self, cidrs: _Optional[_Iterable[str]] = ..., protocol: _Optional[_Union[Protocol, str]] = ..., ports: _Optional[_Iterable[int]] = ...) -> None: ...
    POD_FIELD_NUMBER: _ClassVar[int]
    IPS_FIELD_NUMBER: _ClassVar[int]
    EGRESS_FIELD_NUMBER: _ClassVar[int]
    INGRESS_FIELD_NUMBER: _ClassVar[int]
    BLOCK_THREATS_FIELD_NUMBER: _ClassVar[int]
    pod: str
    ips: _containers.RepeatedScalarFieldContainer[str]
    egress: _containers.RepeatedCompositeFieldContainer[PodPolicy.Peer]
    ingress: _containers.RepeatedCompositeFieldContainer[PodPolicy.Peer]
    block_threats: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, pod: _Optional[str] = ..., ips: _Optional[_Iterable[str]] = ..., egress: _Optional[_Iterable[_Union[PodPolicy.Peer, _Mapping]]] = ..., ingress: _Optional[_Iterable[_Union[PodPolicy.Peer, _Mapping]]] = ..., block_threats: _Optional[_Iterable[str]] = ...) -> None: ...

class NodePolicy(_message.Message):
    __slots__ = ("version", "enforcement_disabled", "pods")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    ENFORCEMENT_DISABLED_FIELD_NUMBER: _ClassVar[int]
    PODS_FIELD_NUMBER: _ClassVar[int]
    version: int
    enforcement_disabled: bool
    pods: _containers.RepeatedCompositeFieldContainer[PodPolicy]
    def __init__(self, version: _Optional[int] = ..., enforcement_disabled: _Optional[bool] = ..., pods: _Optional[_Iterable[_Union[PodPolicy, _Mapping]]] = ...) -> None: ...

class CaptureFilter(_message.Message):
    __slots__ = ("cidrs", "protocol", "port", "direction")
    CIDRS_FIELD_NUMBER: _ClassVar[int]
    PROTOCOL_FIELD_NUMBER: _ClassVar[int]
    PORT_FIELD_NUMBER: _ClassVar[int]
    DIRECTION_FIELD_NUMBER: _ClassVar[int]
    cidrs: _containers.RepeatedScalarFieldContainer[str]
    protocol: Protocol
    port: int
    direction: CaptureDirection
    def __init__(self, cidrs: _Optional[_Iterable[str]] = ..., protocol: _Optional[_Union[Protocol, str]] = ..., port: _Optional[int] = ..., direction: _Optional[_Union[CaptureDirection, str]] = ...) -> None: ...

class CaptureTarget(_message.Message):
    __slots__ = ("pod", "workload")
    POD_FIELD_NUMBER: _ClassVar[int]
    WORKLOAD_FIELD_NUMBER: _ClassVar[int]
    pod: str
    workload: str
    def __init__(self, pod: _Optional[str] = ..., workload: _Optional[str] = ...) -> None: ...

class CaptureOrder(_message.Message):
    __slots__ = ("id", "targets", "filters", "snap_length", "max_bytes", "max_packets", "duration_seconds", "armed", "pre_trigger_seconds", "fired", "fired_unix_ms")
    ID_FIELD_NUMBER: _ClassVar[int]
    TARGETS_FIELD_NUMBER: _ClassVar[int]
    FILTERS_FIELD_NUMBER: _ClassVar[int]
    SNAP_LENGTH_FIELD_NUMBER: _ClassVar[int]
    MAX_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_PACKETS_FIELD_NUMBER: _ClassVar[int]
    DURATION_SECONDS_FIELD_NUMBER: _ClassVar[int]
    ARMED_FIELD_NUMBER: _ClassVar[int]
    PRE_TRIGGER_SECONDS_FIELD_NUMBER: _ClassVar[int]
    FIRED_FIELD_NUMBER: _ClassVar[int]
    FIRED_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    id: str
    targets: _containers.RepeatedCompositeFieldContainer[CaptureTarget]
    filters: _containers.RepeatedCompositeFieldContainer[CaptureFilter]
    snap_length: int
    max_bytes: int
    max_packets: int
    duration_seconds: int
    armed: bool
    pre_trigger_seconds: int
    fired: bool
    fired_unix_ms: int
    def __init__(self, id: _Optional[str] = ..., targets: _Optional[_Iterable[_Union[CaptureTarget, _Mapping]]] = ..., filters: _Optional[_Iterable[_Union[CaptureFilter, _Mapping]]] = ..., snap_length: _Optional[int] = ..., max_bytes: _Optional[int] = ..., max_packets: _Optional[int] = ..., duration_seconds: _Optional[int] = ..., armed: _Optional[bool] = ..., pre_trigger_seconds: _Optional[int] = ..., fired: _Optional[bool] = ..., fired_unix_ms: _Optional[int] = ...) -> None: ...

class UploadRequest(_message.Message):
    __slots__ = ("request", "id")
    REQUEST_FIELD_NUMBER: _ClassVar[int]
    ID_FIELD_NUMBER: _ClassVar[int]
    request: str
    id: str
    def __init__(self, request: _Optional[str] = ..., id: _Optional[str] = ...) -> None: ...

class NodeCaptures(_message.Message):
    __slots__ = ("version", "captures", "keep", "uploads")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    CAPTURES_FIELD_NUMBER: _ClassVar[int]
    KEEP_FIELD_NUMBER: _ClassVar[int]
    UPLOADS_FIELD_NUMBER: _ClassVar[int]
    version: int
    captures: _containers.RepeatedCompositeFieldContainer[CaptureOrder]
    keep: _containers.RepeatedScalarFieldContainer[str]
    uploads: _containers.RepeatedCompositeFieldContainer[UploadRequest]
    def __init__(self, version: _Optional[int] = ..., captures: _Optional[_Iterable[_Union[CaptureOrder, _Mapping]]] = ..., keep: _Optional[_Iterable[str]] = ..., uploads: _Optional[_Iterable[_Union[UploadRequest, _Mapping]]] = ...) -> None: ...

class CaptureStatus(_message.Message):
    __slots__ = ("id", "state", "packets", "bytes", "drops", "file_bytes", "sha256", "stop_reason", "message")
    ID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    PACKETS_FIELD_NUMBER: _ClassVar[int]
    BYTES_FIELD_NUMBER: _ClassVar[int]
    DROPS_FIELD_NUMBER: _ClassVar[int]
    FILE_BYTES_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    STOP_REASON_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    id: str
    state: str
    packets: int
    bytes: int
    drops: int
    file_bytes: int
    sha256: str
    stop_reason: str
    message: str
    def __init__(self, id: _Optional[str] = ..., state: _Optional[str] = ..., packets: _Optional[int] = ..., bytes: _Optional[int] = ..., drops: _Optional[int] = ..., file_bytes: _Optional[int] = ..., sha256: _Optional[str] = ..., stop_reason: _Optional[str] = ..., message: _Optional[str] = ...) -> None: ...

class CaptureReport(_message.Message):
    __slots__ = ("node", "captures")
    NODE_FIELD_NUMBER: _ClassVar[int]
    CAPTURES_FIELD_NUMBER: _ClassVar[int]
    node: str
    captures: _containers.RepeatedCompositeFieldContainer[CaptureStatus]
    def __init__(self, node: _Optional[str] = ..., captures: _Optional[_Iterable[_Union[CaptureStatus, _Mapping]]] = ...) -> None: ...

class CaptureReportAck(_message.Message):
    __slots__ = ("leader",)
    LEADER_FIELD_NUMBER: _ClassVar[int]
    leader: bool
    def __init__(self, leader: _Optional[bool] = ...) -> None: ...

class UploadChunk(_message.Message):
    __slots__ = ("node", "request", "id", "size", "sha256", "data", "error")
    NODE_FIELD_NUMBER: _ClassVar[int]
    REQUEST_FIELD_NUMBER: _ClassVar[int]
    ID_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    node: str
    request: str
    id: str
    size: int
    sha256: str
    data: bytes
    error: str
    def __init__(self, node: _Optional[str] = ..., request: _Optional[str] = ..., id: _Optional[str] = ..., size: _Optional[int] = ..., sha256: _Optional[str] = ..., data: _Optional[bytes] = ..., error: _Optional[str] = ...) -> None: ...

class UploadAck(_message.Message):
    __slots__ = ("leader",)
    LEADER_FIELD_NUMBER: _ClassVar[int]
    leader: bool
    def __init__(self, leader: _Optional[bool] = ...) -> None: ...
