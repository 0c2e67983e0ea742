from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class PacketCaptureDirection(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    PACKET_CAPTURE_DIRECTION_BOTH: _ClassVar[PacketCaptureDirection]
    PACKET_CAPTURE_DIRECTION_INGRESS: _ClassVar[PacketCaptureDirection]
    PACKET_CAPTURE_DIRECTION_EGRESS: _ClassVar[PacketCaptureDirection]
PACKET_CAPTURE_DIRECTION_BOTH: PacketCaptureDirection
PACKET_CAPTURE_DIRECTION_INGRESS: PacketCaptureDirection
PACKET_CAPTURE_DIRECTION_EGRESS: PacketCaptureDirection

class Session(_message.Message):
    __slots__ = ("ip_proto", "client_ip", "client_port", "server_ip", "server_port", "vlan", "new", "closed", "close_reason", "app", "metadata", "role_basis", "bytes_c2s", "bytes_s2c", "packets_c2s", "packets_s2c", "first_seen_ns", "last_seen_ns", "iface", "opened")
    class MetadataEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    IP_PROTO_FIELD_NUMBER: _ClassVar[int]
    CLIENT_IP_FIELD_NUMBER: _ClassVar[int]
    CLIENT_PORT_FIELD_NUMBER: _ClassVar[int]
    SERVER_IP_FIELD_NUMBER: _ClassVar[int]
    SERVER_PORT_FIELD_NUMBER: _ClassVar[int]
    VLAN_FIELD_NUMBER: _ClassVar[int]
    NEW_FIELD_NUMBER: _ClassVar[int]
    CLOSED_FIELD_NUMBER: _ClassVar[int]
    CLOSE_REASON_FIELD_NUMBER: _ClassVar[int]
    APP_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    ROLE_BASIS_FIELD_NUMBER: _ClassVar[int]
    BYTES_C2S_FIELD_NUMBER: _ClassVar[int]
    BYTES_S2C_FIELD_NUMBER: _ClassVar[int]
    PACKETS_C2S_FIELD_NUMBER: _ClassVar[int]
    PACKETS_S2C_FIELD_NUMBER: _ClassVar[int]
    FIRST_SEEN_NS_FIELD_NUMBER: _ClassVar[int]
    LAST_SEEN_NS_FIELD_NUMBER: _ClassVar[int]
    IFACE_FIELD_NUMBER: _ClassVar[int]
    OPENED_FIELD_NUMBER: _ClassVar[int]
    ip_proto: int
    client_ip: bytes
    client_port: int
    server_ip: bytes
    server_port: int
    vlan: int
    new: bool
    closed: bool
    close_reason: str
    app: str
    metadata: _containers.ScalarMap[str, str]
    role_basis: str
    bytes_c2s: int
    bytes_s2c: int
    packets_c2s: int
    packets_s2c: int
    first_seen_ns: int
    last_seen_ns: int
    iface: str
    opened: bool
    def __init__(self, ip_proto: _Optional[int] = ..., client_ip: _Optional[bytes] = ..., client_port: _Optional[int] = ..., server_ip: _Optional[bytes] = ..., server_port: _Optional[int] = ..., vlan: _Optional[int] = ..., new: _Optional[bool] = ..., closed: _Optional[bool] = ..., close_reason: _Optional[str] = ..., app: _Optional[str] = ..., metadata: _Optional[_Mapping[str, str]] = ..., role_basis: _Optional[str] = ..., bytes_c2s: _Optional[int] = ..., bytes_s2c: _Optional[int] = ..., packets_c2s: _Optional[int] = ..., packets_s2c: _Optional[int] = ..., first_seen_ns: _Optional[int] = ..., last_seen_ns: _Optional[int] = ..., iface: _Optional[str] = ..., opened: _Optional[bool] = ...) -> None: ...

class DnsAnswer(_message.Message):
    __slots__ = ("name", "type", "address", "target", "ttl", "client_ip", "server_ip")
    NAME_FIELD_NUMBER: _ClassVar[int]
    TYPE_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    TARGET_FIELD_NUMBER: _ClassVar[int]
    TTL_FIELD_NUMBER: _ClassVar[int]
    CLIENT_IP_FIELD_NUMBER: _ClassVar[int]
    SERVER_IP_FIELD_NUMBER: _ClassVar[int]
    name: str
    type: str
    address: bytes
    target: str
    ttl: int
    client_ip: bytes
    server_ip: bytes
    def __init__(self, name: _Optional[str] = ..., type: _Optional[str] = ..., address: _Optional[bytes] = ..., target: _Optional[str] = ..., ttl: _Optional[int] = ..., client_ip: _Optional[bytes] = ..., server_ip: _Optional[bytes] = ...) -> None: ...

class ThreatHit(_message.Message):
    __slots__ = ("threat", "ip_proto", "client_ip", "client_port", "server_ip", "server_port", "app", "snippet", "seen_ns", "where")
    THREAT_FIELD_NUMBER: _ClassVar[int]
    IP_PROTO_FIELD_NUMBER: _ClassVar[int]
    CLIENT_IP_FIELD_NUMBER: _ClassVar[int]
    CLIENT_PORT_FIELD_NUMBER: _ClassVar[int]
    SERVER_IP_FIELD_NUMBER: _ClassVar[int]
    SERVER_PORT_FIELD_NUMBER: _ClassVar[int]
    APP_FIELD_NUMBER: _ClassVar[int]
    SNIPPET_FIELD_NUMBER: _ClassVar[int]
    SEEN_NS_FIELD_NUMBER: _ClassVar[int]
    WHERE_FIELD_NUMBER: _ClassVar[int]
    threat: str
    ip_proto: int
    client_ip: bytes
    client_port: int
    server_ip: bytes
    server_port: int
    app: str
    snippet: str
    seen_ns: int
    where: str
    def __init__(self, threat: _Optional[str] = ..., ip_proto: _Optional[int] = ..., client_ip: _Optional[bytes] = ..., client_port: _Optional[int] = ..., server_ip: _Optional[bytes] = ..., server_port: _Optional[int] = ..., app: _Optional[str] = ..., snippet: _Optional[str] = ..., seen_ns: _Optional[int] = ..., where: _Optional[str] = ...) -> None: ...

class Health(_message.Message):
    __slots__ = ("packets", "decoded", "kernel_packets", "kernel_drops", "kernel_freezes", "malformed", "ignored", "table_size", "table_capacity", "evictions", "lost_reports", "lost_sessions", "interfaces", "failed_interfaces", "blocks", "sessions_created", "sessions_expired", "sessions_closed", "inspector_errors", "fragments", "packet_captures")
    class MalformedEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    class IgnoredEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    class FragmentsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    PACKETS_FIELD_NUMBER: _ClassVar[int]
    DECODED_FIELD_NUMBER: _ClassVar[int]
    KERNEL_PACKETS_FIELD_NUMBER: _ClassVar[int]
    KERNEL_DROPS_FIELD_NUMBER: _ClassVar[int]
    KERNEL_FREEZES_FIELD_NUMBER: _ClassVar[int]
    MALFORMED_FIELD_NUMBER: _ClassVar[int]
    IGNORED_FIELD_NUMBER: _ClassVar[int]
    TABLE_SIZE_FIELD_NUMBER: _ClassVar[int]
    TABLE_CAPACITY_FIELD_NUMBER: _ClassVar[int]
    EVICTIONS_FIELD_NUMBER: _ClassVar[int]
    LOST_REPORTS_FIELD_NUMBER: _ClassVar[int]
    LOST_SESSIONS_FIELD_NUMBER: _ClassVar[int]
    INTERFACES_FIELD_NUMBER: _ClassVar[int]
    FAILED_INTERFACES_FIELD_NUMBER: _ClassVar[int]
    BLOCKS_FIELD_NUMBER: _ClassVar[int]
    SESSIONS_CREATED_FIELD_NUMBER: _ClassVar[int]
    SESSIONS_EXPIRED_FIELD_NUMBER: _ClassVar[int]
    SESSIONS_CLOSED_FIELD_NUMBER: _ClassVar[int]
    INSPECTOR_ERRORS_FIELD_NUMBER: _ClassVar[int]
    FRAGMENTS_FIELD_NUMBER: _ClassVar[int]
    PACKET_CAPTURES_FIELD_NUMBER: _ClassVar[int]
    packets: int
    decoded: int
    kernel_packets: int
    kernel_drops: int
    kernel_freezes: int
    malformed: _containers.ScalarMap[str, int]
    ignored: _containers.ScalarMap[str, int]
    table_size: int
    table_capacity: int
    evictions: int
    lost_reports: int
    lost_sessions: int
    interfaces: _containers.RepeatedScalarFieldContainer[str]
    failed_interfaces: _containers.RepeatedScalarFieldContainer[str]
    blocks: int
    sessions_created: int
    sessions_expired: int
    sessions_closed: int
    inspector_errors: int
    fragments: _containers.ScalarMap[str, int]
    packet_captures: _containers.RepeatedCompositeFieldContainer[PacketCaptureStatus]
    def __init__(self, packets: _Optional[int] = ..., decoded: _Optional[int] = ..., kernel_packets: _Optional[int] = ..., kernel_drops: _Optional[int] = ..., kernel_freezes: _Optional[int] = ..., malformed: _Optional[_Mapping[str, int]] = ..., ignored: _Optional[_Mapping[str, int]] = ..., table_size: _Optional[int] = ..., table_capacity: _Optional[int] = ..., evictions: _Optional[int] = ..., lost_reports: _Optional[int] = ..., lost_sessions: _Optional[int] = ..., interfaces: _Optional[_Iterable[str]] = ..., failed_interfaces: _Optional[_Iterable[str]] = ..., blocks: _Optional[int] = ..., sessions_created: _Optional[int] = ..., sessions_expired: _Optional[int] = ..., sessions_closed: _Optional[int] = ..., inspector_errors: _Optional[int] = ..., fragments: _Optional[_Mapping[str, int]] = ..., packet_captures: _Optional[_Iterable[_Union[PacketCaptureStatus, _Mapping]]] = ...) -> None: ...

class PacketCaptureStatus(_message.Message):
    __slots__ = ("id", "state", "packets", "bytes", "drops", "file_bytes", "sha256", "stop_reason", "message", "path")
    ID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    PACKETS_FIELD_NUMBER: _ClassVar[int]
    BYTES_FIELD_NUMBER: _ClassVar[int]
    DROPS_FIELD_NUMBER: _ClassVar[int]
    FILE_BYTES_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    STOP_REASON_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    id: str
    state: str
    packets: int
    bytes: int
    drops: int
    file_bytes: int
    sha256: str
    stop_reason: str
    message: str
    path: str
    def __init__(self, id: _Optional[str] = ..., state: _Optional[str] = ..., packets: _Optional[int] = ..., bytes: _Optional[int] = ..., drops: _Optional[int] = ..., file_bytes: _Optional[int] = ..., sha256: _Optional[str] = ..., stop_reason: _Optional[str] = ..., message: _Optional[str] = ..., path: _Optional[str] = ...) -> None: ...

class Report(_message.Message):
    __slots__ = ("run_id", "worker", "workers", "sequence", "part", "parts", "start_ns", "end_ns", "sessions", "dns", "threats", "health")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    WORKER_FIELD_NUMBER: _ClassVar[int]
    WORKERS_FIELD_NUMBER: _ClassVar[int]
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    PART_FIELD_NUMBER: _ClassVar[int]
    PARTS_FIELD_NUMBER: _ClassVar[int]
    START_NS_FIELD_NUMBER: _ClassVar[int]
    END_NS_FIELD_NUMBER: _ClassVar[int]
    SESSIONS_FIELD_NUMBER: _ClassVar[int]
    DNS_FIELD_NUMBER: _ClassVar[int]
    THREATS_FIELD_NUMBER: _ClassVar[int]
    HEALTH_FIELD_NUMBER: _ClassVar[int]
    run_id: int
    worker: int
    workers: int
    sequence: int
    part: int
    parts: int
    start_ns: int
    end_ns: int
    sessions: _containers.RepeatedCompositeFieldContainer[Session]
    dns: _containers.RepeatedCompositeFieldContainer[DnsAnswer]
    threats: _containers.RepeatedCompositeFieldContainer[ThreatHit]
    health: Health
    def __init__(self, run_id: _Optional[int] = ..., worker: _Optional[int] = ..., workers: _Optional[int] = ..., sequence: _Optional[int] = ..., part: _Optional[int] = ..., parts: _Optional[int] = ..., start_ns: _Optional[int] = ..., end_ns: _Optional[int] = ..., sessions: _Optional[_Iterable[_Union[Session, _Mapping]]] = ..., dns: _Optional[_Iterable[_Union[DnsAnswer, _Mapping]]] = ..., threats: _Optional[_Iterable[_Union[ThreatHit, _Mapping]]] = ..., health: _Optional[_Union[Health, _Mapping]] = ...) -> None: ...

class Encapsulation(_message.Message):
    __slots__ = ("ip_proto", "port")
    IP_PROTO_FIELD_NUMBER: _ClassVar[int]
    PORT_FIELD_NUMBER: _ClassVar[int]
    ip_proto: int
    port: int
    def __init__(self, ip_proto: _Optional[int] = ..., port: _Optional[int] = ...) -> None: ...

class Control(_message.Message):
    __slots__ = ("interfaces", "local_addresses", "underlay", "overlay", "packet_captures", "keep")
    INTERFACES_FIELD_NUMBER: _ClassVar[int]
    LOCAL_ADDRESSES_FIELD_NUMBER: _ClassVar[int]
    UNDERLAY_FIELD_NUMBER: _ClassVar[int]
    OVERLAY_FIELD_NUMBER: _ClassVar[int]
    PACKET_CAPTURES_FIELD_NUMBER: _ClassVar[int]
    KEEP_FIELD_NUMBER: _ClassVar[int]
    interfaces: _containers.RepeatedScalarFieldContainer[str]
    local_addresses: _containers.RepeatedScalarFieldContainer[str]
    underlay: _containers.RepeatedScalarFieldContainer[str]
    overlay: _containers.RepeatedCompositeFieldContainer[Encapsulation]
    packet_captures: _containers.RepeatedCompositeFieldContainer[PacketCapture]
    keep: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, interfaces: _Optional[_Iterable[str]] = ..., local_addresses: _Optional[_Iterable[str]] = ..., underlay: _Optional[_Iterable[str]] = ..., overlay: _Optional[_Iterable[_Union[Encapsulation, _Mapping]]] = ..., packet_captures: _Optional[_Iterable[_Union[PacketCapture, _Mapping]]] = ..., keep: _Optional[_Iterable[str]] = ...) -> None: ...

class PacketCaptureNetwork(_message.Message):
    __slots__ = ("address", "prefix_length")
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    PREFIX_LENGTH_FIELD_NUMBER: _ClassVar[int]
    address: bytes
    prefix_length: int
    def __init__(self, address: _Optional[bytes] = ..., prefix_length: _Optional[int] = ...) -> None: ...

class PacketCaptureFilter(_message.Message):
    __slots__ = ("peers", "protocol", "port", "direction")
    PEERS_FIELD_NUMBER: _ClassVar[int]
    PROTOCOL_FIELD_NUMBER: _ClassVar[int]
    PORT_FIELD_NUMBER: _ClassVar[int]
    DIRECTION_FIELD_NUMBER: _ClassVar[int]
    peers: _containers.RepeatedCompositeFieldContainer[PacketCaptureNetwork]
    protocol: int
    port: int
    direction: PacketCaptureDirection
    def __init__(self, peers: _Optional[_Iterable[_Union[PacketCaptureNetwork, _Mapping]]] = ..., protocol: _Optional[int] = ..., port: _Optional[int] = ..., direction: _Optional[_Union[PacketCaptureDirection, str]] = ...) -> None: ...

class PacketCaptureTarget(_message.Message):
    __slots__ = ("name", "description")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    name: str
    description: str
    def __init__(self, name: _Optional[str] = ..., description: _Optional[str] = ...) -> None: ...

class PacketCapture(_message.Message):
    __slots__ = ("id", "targets", "filters", "snap_length", "max_bytes", "max_packets", "duration_seconds", "pre_trigger_seconds", "fired", "armed", "fired_ns")
    ID_FIELD_NUMBER: _ClassVar[int]
    TARGETS_FIELD_NUMBER: _ClassVar[int]
    FILTERS_FIELD_NUMBER: _ClassVar[int]
    SNAP_LENGTH_FIELD_NUMBER: _ClassVar[int]
    MAX_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_PACKETS_FIELD_NUMBER: _ClassVar[int]
    DURATION_SECONDS_FIELD_NUMBER: _ClassVar[int]
    PRE_TRIGGER_SECONDS_FIELD_NUMBER: _ClassVar[int]
    FIRED_FIELD_NUMBER: _ClassVar[int]
    ARMED_FIELD_NUMBER: _ClassVar[int]
    FIRED_NS_FIELD_NUMBER: _ClassVar[int]
    id: str
    targets: _containers.RepeatedCompositeFieldContainer[PacketCaptureTarget]
    filters: _containers.RepeatedCompositeFieldContainer[PacketCaptureFilter]
    snap_length: int
    max_bytes: int
    max_packets: int
    duration_seconds: int
    pre_trigger_seconds: int
    fired: bool
    armed: bool
    fired_ns: int
    def __init__(self, id: _Optional[str] = ..., targets: _Optional[_Iterable[_Union[PacketCaptureTarget, _Mapping]]] = ..., filters: _Optional[_Iterable[_Union[PacketCaptureFilter, _Mapping]]] = ..., snap_length: _Optional[int] = ..., max_bytes: _Optional[int] = ..., max_packets: _Optional[int] = ..., duration_seconds: _Optional[int] = ..., pre_trigger_seconds: _Optional[int] = ..., fired: _Optional[bool] = ..., armed: _Optional[bool] = ..., fired_ns: _Optional[int] = ...) -> None: ...

class Ack(_message.Message):
    __slots__ = ("run_id", "worker", "sequence")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    WORKER_FIELD_NUMBER: _ClassVar[int]
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    run_id: int
    worker: int
    sequence: int
    def __init__(self, run_id: _Optional[int] = ..., worker: _Optional[int] = ..., sequence: _Optional[int] = ...) -> None: ...
