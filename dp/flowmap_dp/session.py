"""The bounded session table: one entry per bidirectional 5-tuple (+ VLAN id).

Each session knows its client and server, its TCP state, bytes and packets per direction,
first and last seen, and (through the slow path) its application. Bytes are IP lengths: IPv4
total length, IPv6 40 + payload length, as sent (a short snap length does not shrink them).

Live export API (used by the capture loop and ``flowmap dp run``)::

    table = SessionTable(max_sessions=200_000, timeouts=Timeouts())
    table.packet(decoded, ts, buf)        # per packet (or block.BlockParser does it per block)
    report = table.collect(now)           # each interval: expire idle sessions, then deltas
    report.sessions -> list[SessionDelta] # sessions that changed since the previous collect():
        .new          first report of this session (5-tuple, client/server, vlan, first_seen)
        .opened       the one report in which the session's opening was seen: the client's SYN
                      (TCP), the client's first packet (every other protocol); what counts a session
        .packets_c2s .packets_s2c .bytes_c2s .bytes_s2c   deltas since the previous report
        .app, .app_decided    the app as soon as a detector matched, again once settled
        .metadata, .threats   only once, when settled (after lingering for more payload)
        .closed, .end_reason   the session left the table ("fin", "rst", "idle", "evicted",
                               "reused", "end"); it is never reported again
    report.health -> Health               # cumulative counters: packets, decode outcomes,
                                          # table size, created, evicted, expired, closed,
                                          # inspector errors, unreported

Both the table and what the next report holds are bounded: sessions born and ended within one
interval beyond ``max_pending`` (a SYN flood) are counted in ``Health.unreported`` instead of
being kept; a session that was reported once is always reported again when it ends.

Offline (``classify``) uses ``timeouts=None`` (nothing expires), calls ``close_all()`` at the
end of the file and one ``collect()``: each delta is then the whole flow.

Slow path: while a TCP/UDP session's application is undecided, each payload-carrying packet is
fed to an ``Inspector`` (``flowmap_dp.detection``); once it says done (or after ``feed_limit``
payload packets) the session never calls it again, so the hot path stays a few attribute updates.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Mapping
from types import MappingProxyType
from dataclasses import dataclass, field
from typing import Any, Protocol

from flowmap_dp.decode import (
    L4_NAMES, PROTO_ICMP, PROTO_ICMPV6, PROTO_TCP, PROTO_UDP, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN,
    FRAGMENT_MAX, MARK_SPLIT_HANDSHAKE, Decoded, DecodeStats, Fragments, flow_key, format_endpoint, split_key,
)
from flowmap_dp.detection import NO_VERDICT, UNKNOWN, Inspector
from flowmap_dp.detectors import REGISTRY
from flowmap_dp.detectors.base import Threat

# TCP states; every non-TCP session is OPEN.
SYN_SENT, SYN_RECV, OPEN, CLOSING, CLOSED = range(5)
STATE_NAMES = ("syn_sent", "syn_recv", "open", "closing", "closed")

# Where a session picked up mid-stream (or a UDP reply seen first) has its server: a port below
# 1024, or one of these, is a server's. Every port a detector hints at, and services no detector
# names (MQTT, etcd, NATS, AMQP, CouchDB, Elasticsearch, RabbitMQ's console, common app ports).
SERVICE_PORTS = frozenset({p for d in REGISTRY for p in d.ports} | {
    1883, 2379, 2380, 3000, 4222, 5000, 5672, 5984, 8081, 9000, 9200, 9300, 15672,
})
# UDP services: a first packet *from* one of these to another port is a reply seen first. The
# UDP detectors' ports, and SNMP, LDAP, IKE, syslog, RADIUS, mDNS, NetBIOS, VXLAN.
UDP_SERVICES = frozenset({p for d in REGISTRY if "udp" in d.l4 for p in d.ports} | {
    137, 161, 162, 389, 500, 514, 547, 1812, 1813, 4789, 5353, 8472,
})
# Below 1024 but used by clients: DHCP and DHCPv6 clients are not servers.
CLIENT_PORTS = frozenset({68, 546})
# Ports whose server answers from a new port (TFTP): the requester leads the session that follows.
HANDOFF_PORTS = frozenset(p for d in REGISTRY if d.answers_from_new_port for p in d.ports)
HANDOFF_REMEMBERED = 1024  # recent requesters on those ports kept to orient their answers' sessions
# Apps whose 5-tuple, used again after this many seconds of silence, carries a new exchange.
NEW_EXCHANGE_AFTER: Mapping[str, float] = MappingProxyType(
    {d.name: d.new_exchange_after for d in REGISTRY if d.new_exchange_after is not None})
# An inspector whose session carried nothing for this long is settled at the next report: a
# matched one stops lingering for later packets (an idle keep-alive connection reports its
# metadata now, not when it ends, and holds no buffered payload meanwhile).
INSPECTOR_IDLE = 2.0
MAX_FEED_LIMIT = 255  # payload packets one session may feed its inspector (0: detection off)

_NO_METADATA: Mapping[str, Any] = MappingProxyType({})
_ICMP_REPLIES = frozenset({0, 129})  # echo reply: the receiver asked, so it is the client

# Echo payloads (ICMP and ICMPv6 echo request and reply): each is summed up in 16 bits — its IP
# length and its captured bytes from ECHO_SKIP to ECHO_SKIP + ECHO_BYTES — and compared with
# the session's last request. Ping writes a timestamp in its first 16 bytes, then a fixed
# pattern, and the reply echoes the request: none of them differs.
ECHO_SKIP = 16
ECHO_BYTES = 256
ECHO_COUNT_MAX = 255  # echo changes counted per report at most (a byte in the compiled table)
_ECHO = {PROTO_ICMP: (8, 0), PROTO_ICMPV6: (128, 129)}  # (request type, reply type)


def echo_digest(ip_len: int, payload: bytes | memoryview) -> int:
    """16 bits of an echo's IP length and payload bytes ``[ECHO_SKIP, ECHO_SKIP + ECHO_BYTES)``:
    FNV-1a (32 bits) folded; never 0 (a session's 0 means no request seen yet)."""
    h = 0x811C9DC5
    for b in (ip_len & 0xFFFFFFFF).to_bytes(4, "big"):
        h = ((h ^ b) * 0x01000193) & 0xFFFFFFFF
    for b in bytes(payload[ECHO_SKIP:ECHO_SKIP + ECHO_BYTES]):
        h = ((h ^ b) * 0x01000193) & 0xFFFFFFFF
    return ((h ^ (h >> 16)) & 0xFFFF) or 1


@dataclass(frozen=True)
class Timeouts:
    """Idle timeouts in seconds (NeuVector-like defaults)."""

    tcp_open: float = 3600.0
    tcp_half_open: float = 30.0  # SYN or SYN-ACK seen, handshake not finished
    tcp_closing: float = 30.0  # one FIN seen
    tcp_closed: float = 5.0  # both FINs or a RST: linger for the last ACKs
    udp: float = 60.0
    icmp: float = 10.0
    other: float = 60.0


class InspectorLike(Protocol):
    # The matched detector's name (final once set); "unknown" until one matches; once done without
    # a match, "" when the client never spoke (detection.NO_VERDICT: no verdict to report).
    app: str
    metadata: dict[str, Any]
    threats: list[Threat]

    def feed(self, from_client: bool, payload: bytes, ts: float) -> bool: ...

    def waits(self, now: float) -> bool: ...

    def judge_server_alone(self) -> bool: ...

    def finish(self) -> None: ...


InspectorFactory = Callable[[str, int, int], InspectorLike]


def is_service_port(port: int) -> bool:
    """Whether a port looks like a server's (well-known or a known service), not ephemeral."""
    return (port < 1024 or port in SERVICE_PORTS) and port not in CLIENT_PORTS


def dst_is_server(sport: int, dport: int) -> bool:
    """Port heuristic for sessions picked up mid-stream: is the destination the server?"""
    s_svc, d_svc = is_service_port(sport), is_service_port(dport)
    if s_svc != d_svc:
        return d_svc
    return dport <= sport  # both or neither look like services: the lower port serves


class Session:
    """One session. Counters are by role (c2s = client to server), not by key order."""

    __slots__ = (
        "key", "proto", "a_is_client", "state", "fins", "first", "last",
        "pkts_c2s", "pkts_s2c", "bytes_c2s", "bytes_s2c",
        "rep_pkts_c2s", "rep_pkts_s2c", "rep_bytes_c2s", "rep_bytes_s2c",
        "insp", "feeds", "app", "metadata", "threats", "dirty", "new", "app_new", "end_reason",
        "opening_seen", "opened", "reply_at", "marks", "echo_changes", "echo_digest",
    )

    def __init__(self, key: bytes, proto: int, a_is_client: bool, ts: float) -> None:
        self.key = key
        self.proto = proto
        self.a_is_client = a_is_client  # the first endpoint of the key is the client
        self.state = OPEN
        self.fins = 0  # bit 1: client sent FIN, bit 2: server sent FIN
        self.first = ts
        self.last = ts
        self.pkts_c2s = self.pkts_s2c = self.bytes_c2s = self.bytes_s2c = 0
        self.rep_pkts_c2s = self.rep_pkts_s2c = self.rep_bytes_c2s = self.rep_bytes_s2c = 0
        # None: no payload seen yet; an inspector while deciding; False once decided.
        self.insp: InspectorLike | None | bool = None if proto in (PROTO_TCP, PROTO_UDP) else False
        self.feeds = 0
        self.app = "unknown"
        self.metadata: Mapping[str, Any] = _NO_METADATA  # shared empties: 120 bytes a session saved
        self.threats: tuple[Threat, ...] = ()
        self.dirty = False
        self.new = True
        self.app_new = False
        self.end_reason = ""
        # A TCP session opens with the client's SYN, which may come after the SYN-ACK (rings
        # read out of order) or never (the reply half of a DNAT'd connection, a session picked
        # up mid-stream); anything else opens with its first packet, if the client sent it.
        self.opening_seen = self.opened = proto != PROTO_TCP
        self.reply_at = 0.0  # a reply read before its opening: an older client packet opens it
        self.marks = 0  # MARK_* since the previous report
        self.echo_changes = 0  # echoes unlike the last request, since the previous report
        self.echo_digest = 0  # the last echo request's (echo_digest); 0: none yet

    def endpoints(self) -> tuple[bytes, int, bytes, int, int]:
        """(client addr, client port, server addr, server port, vlan)."""
        _, vlan, a, ap, b, bp = split_key(self.key)
        return (a, ap, b, bp, vlan) if self.a_is_client else (b, bp, a, ap, vlan)

    def __repr__(self) -> str:
        c, cp, s, sp, vlan = self.endpoints()
        return (f"Session({L4_NAMES.get(self.proto, self.proto)} {format_endpoint(c, cp)} -> "
                f"{format_endpoint(s, sp)} vlan={vlan} {STATE_NAMES[self.state]} app={self.app})")


@dataclass(slots=True)
class SessionDelta:
    """What changed in one session since the previous ``collect()``."""

    l4: str
    proto: int
    vlan: int  # 0: untagged
    client: bytes
    client_port: int
    server: bytes
    server_port: int
    first_seen: float
    last_seen: float
    new: bool
    opened: bool  # the session's opening was seen since the previous report (counted once)
    closed: bool
    end_reason: str
    state: str
    app: str
    app_decided: bool  # the application was matched or settled since the previous report
    packets_c2s: int
    packets_s2c: int
    bytes_c2s: int
    bytes_s2c: int
    metadata: Mapping[str, Any] | None = None  # only when app_decided (empty until settled)
    threats: list[Threat] = field(default_factory=list)  # only when app_decided (empty until settled)
    marks: int = 0  # decode.MARK_* bits the session's packets showed since the previous report
    # Echo payloads (ICMP/ICMPv6 echo) unlike the session's last request since the previous report:
    # a request unlike the one before, a reply unlike its request (at most ECHO_COUNT_MAX).
    echo_changes: int = 0

    @property
    def client_text(self) -> str:
        return format_endpoint(self.client, self.client_port)

    @property
    def server_text(self) -> str:
        return format_endpoint(self.server, self.server_port)


@dataclass(slots=True)
class Health:
    """Cumulative counters of the table and of the decoder feeding it."""

    packets: int
    decoded: int
    malformed: dict[str, int]
    ignored: dict[str, int]
    sessions: int  # live sessions in the table now
    created: int
    evicted: int
    expired: int
    closed: int  # sessions that left the table for any reason (incl. evicted and expired)
    inspector_errors: int
    unreported: int = 0  # sessions born and ended between two reports past ``max_pending``
    fragments: dict[str, int] = field(default_factory=dict)  # fragment table events (decode.FRAGMENT_COUNTERS)


@dataclass(slots=True)
class Report:
    time: float
    sessions: list[SessionDelta]
    health: Health


class Inspected(Protocol):
    """What the slow path keeps of one session (a ``Session``; ``compiled``'s per-handle record)."""

    insp: InspectorLike | None | bool  # None: no payload yet; an inspector while deciding; False once decided
    feeds: int
    app: str
    metadata: Mapping[str, Any]
    threats: tuple[Threat, ...]
    app_new: bool  # the app was matched or settled since the session's previous report


class Detection:
    """The slow path's rules, for every table: feed a session's payload to its inspector until
    it is done (or ``feed_limit`` packets), judge a server's lone words, settle. A detector bug
    never stops the packet loop: it is counted in ``errors`` and the session stops asking."""

    def __init__(self, factory: InspectorFactory | None, feed_limit: int) -> None:
        if not 0 <= feed_limit <= MAX_FEED_LIMIT:
            raise ValueError(f"feed_limit must be 0 (detection off) to {MAX_FEED_LIMIT}, not {feed_limit}")
        self.factory: InspectorFactory = Inspector if factory is None else factory
        self.feed_limit = feed_limit
        self.errors = 0

    def inspect(self, s: Inspected, tcp: bool, client_port: int, server_port: int, from_client: bool,
                payload: bytes, ts: float) -> bool:
        """Feed ``payload`` (captured at ``ts``) to the session's inspector (made on its first
        payload); True when its detection is settled now (``s.insp`` is False)."""
        insp = s.insp
        try:
            if insp is None:
                insp = s.insp = self.factory("tcp" if tcp else "udp", client_port, server_port)
            assert insp is not None and insp is not True and insp is not False
            s.feeds += 1
            if insp.feed(from_client, payload, ts) or s.feeds >= self.feed_limit:
                self.settle(s, finish=s.feeds >= self.feed_limit)
            elif insp.app != s.app:
                # A detector matched and the inspector lingers for metadata and threats, which
                # may take until the session ends: the name is final, so report it now.
                s.app = insp.app
                s.app_new = True
        except Exception:  # a detector bug must not stop the packet loop: count it, stop asking
            self.errors += 1
            s.insp = False
            s.app_new = True
        return s.insp is False

    def judge_server_alone(self, s: Inspected, insp: InspectorLike) -> None:
        """A session whose server spoke and whose client did not, in time for its client's packets
        to have come from any ring: its words are judged alone (a DNAT'd DNS answer names its
        addresses in this report, not when the session expires)."""
        try:
            if insp.judge_server_alone():
                self.settle(s, finish=False)
            elif insp.app != s.app:
                s.app = insp.app
                s.app_new = True
        except Exception:
            self.errors += 1
            s.insp = False
            s.app_new = True

    def waits(self, insp: InspectorLike, now: float) -> bool:
        """Whether an idle session's inspector asks to stay open at ``now`` (a bug: no)."""
        try:
            return insp.waits(now)
        except Exception:
            self.errors += 1
            return False

    def settle(self, s: Inspected, finish: bool) -> None:
        insp = s.insp
        s.insp = False
        if insp is None or insp is False or insp is True:
            return
        try:
            if finish:
                insp.finish()
            s.app = insp.app
            s.metadata = dict(insp.metadata) if insp.metadata else _NO_METADATA
            s.threats = tuple(insp.threats)
        except Exception:
            self.errors += 1
        s.app_new = True


def said_something(s: Inspected) -> bool:
    """Whether settling gave a session something to report on its own (an app, metadata, a
    threat): an idle session whose detectors found nothing waits for its next packet or its end."""
    return s.app not in (UNKNOWN, NO_VERDICT) or bool(s.metadata) or bool(s.threats)


def _echo(s: Session, request: bool, digest: int) -> None:
    """Count an echo unlike the session's last request; a request becomes the last."""
    if s.echo_digest and digest != s.echo_digest and s.echo_changes < ECHO_COUNT_MAX:
        s.echo_changes += 1
    if request:
        s.echo_digest = digest


class SessionTable:
    """Bounded session table in least-recently-seen order (the front is evicted first)."""

    def __init__(self, max_sessions: int = 200_000, timeouts: Timeouts | None = Timeouts(),
                 inspector_factory: InspectorFactory | None = None, feed_limit: int = 32,
                 max_pending: int | None = None, max_fragments: int = FRAGMENT_MAX) -> None:
        self.max_sessions = max_sessions
        # Sessions born and ended within one report interval that the next report still
        # carries; beyond this (a SYN flood) they are only counted (``Health.unreported``).
        self.max_pending = max_sessions if max_pending is None else max_pending
        self.timeouts = timeouts
        self.stats = DecodeStats()  # whoever decodes for this table counts here
        # Whoever decodes for this table decodes through here: later IP fragments of a datagram
        # whose first fragment was seen count toward its session.
        self.fragments = Fragments(max_fragments)
        self.sessions: OrderedDict[bytes, Session] = OrderedDict()
        self.detection = Detection(inspector_factory, feed_limit)
        self._dirty: dict[int, Session] = {}  # id -> session, in the order they changed
        self._pending_ended = 0
        self._requesters: OrderedDict[tuple[bytes, int], None] = OrderedDict()
        self.created = self.evicted = self.expired = self.closed = 0
        self.unreported = 0

    def __len__(self) -> int:
        return len(self.sessions)

    @property
    def inspector_errors(self) -> int:
        return self.detection.errors

    # -- hot path ------------------------------------------------------------------------------

    def packet(self, d: Decoded, ts: float, buf: bytes | memoryview) -> Session:
        """Account one decoded packet captured at ``ts``; ``buf`` holds its payload."""
        key, fwd = flow_key(d.proto, d.vlan, d.src, d.sport, d.dst, d.dport)
        s = self.sessions.get(key)
        if s is None:
            s = self._create(key, fwd, d, ts)
        else:
            self.sessions.move_to_end(key)
            if s.state == CLOSED and d.proto == PROTO_TCP and d.flags & (TCP_SYN | TCP_ACK) == TCP_SYN:
                self._end(s, "reused")  # a new connection on the same 5-tuple after a full close
                s = self._create(key, fwd, d, ts)
        from_client = fwd == s.a_is_client
        if (s.insp is False and s.app in NEW_EXCHANGE_AFTER and ts - s.last > NEW_EXCHANGE_AFTER[s.app]
                and d.payload_end > d.payload_start):
            # A 5-tuple used again after a pause (DNS: a resolver's port, picked again) carries a
            # new exchange: a session of its own, inspected too, or the names its answers give are
            # lost. Its request opens it, even when read after the answer (another ring).
            s.insp, s.feeds = None, 0
            if from_client:
                s.opened = True
            else:
                s.opening_seen, s.reply_at = False, ts
        if from_client:
            s.pkts_c2s += 1
            s.bytes_c2s += d.ip_len
        else:
            s.pkts_s2c += 1
            s.bytes_s2c += d.ip_len
        # Rings are read one after another, so a packet can be older than one already seen.
        if ts > s.last:
            s.last = ts
        elif ts < s.first:
            s.first = ts
        if from_client and not s.opening_seen and ts <= s.reply_at and d.proto != PROTO_TCP:
            s.opening_seen = s.opened = True  # the client's first packet, read after the reply
        if d.proto == PROTO_TCP:
            self._tcp(s, d.flags, from_client)
        elif d.proto in _ECHO and d.payload_end > d.payload_start and d.flags in _ECHO[d.proto]:
            _echo(s, d.flags == _ECHO[d.proto][0], echo_digest(d.ip_len, buf[d.payload_start:d.payload_end]))
        s.marks |= d.marks
        if s.insp is not False and d.payload_end > d.payload_start and self.detection.feed_limit:
            _, client_port, _, server_port, _ = s.endpoints()
            self.detection.inspect(s, s.proto == PROTO_TCP, client_port, server_port, from_client,
                                   bytes(buf[d.payload_start:d.payload_end]), ts)
        if not s.dirty:
            s.dirty = True
            self._dirty[id(s)] = s
        return s

    def _create(self, key: bytes, fwd: bool, d: Decoded, ts: float) -> Session:
        if len(self.sessions) >= self.max_sessions:
            _, oldest = self.sessions.popitem(last=False)
            self.evicted += 1
            self._end(oldest, "evicted", in_table=False)
        proto = d.proto
        state = OPEN
        if proto == PROTO_TCP:
            syn = d.flags & (TCP_SYN | TCP_ACK)
            if syn == TCP_SYN:
                src_client, state = True, SYN_SENT
            elif syn == TCP_SYN | TCP_ACK:
                src_client, state = False, SYN_RECV
            else:
                src_client = dst_is_server(d.sport, d.dport)  # picked up mid-stream
        elif proto == PROTO_UDP:
            # The first packet's sender is the client, unless it plainly comes from a service
            # port to an ephemeral one (a reply seen first: capture started mid-conversation).
            s_svc, d_svc = d.sport in UDP_SERVICES, d.dport in UDP_SERVICES
            if s_svc == d_svc:
                s_svc, d_svc = is_service_port(d.sport), is_service_port(d.dport)
            src_client = not (s_svc and not d_svc)
            src_client = self._udp_expected(d, src_client)
        elif proto == PROTO_ICMP or proto == PROTO_ICMPV6:
            src_client = d.flags not in _ICMP_REPLIES
        else:
            src_client = True
        s = Session(key, proto, fwd == src_client, ts)
        s.state = state
        if not src_client:  # a reply seen first: the reply half of a DNAT'd flow, or a late pickup
            s.opening_seen = s.opened = False
            s.reply_at = ts
        self.sessions[key] = s
        self.created += 1
        return s

    def _udp_expected(self, d: Decoded, src_client: bool) -> bool:
        """A server that answers from a new port (TFTP) sends the first packet of the session that
        follows, to the requester's port. Remember who asked on such a port (bounded) and let
        that endpoint be the client of the session that follows."""
        asked = self._requesters
        if d.dport in HANDOFF_PORTS:
            asked[(d.src, d.sport)] = None
            if len(asked) > HANDOFF_REMEMBERED:
                asked.popitem(last=False)
        elif asked and d.sport not in HANDOFF_PORTS:
            if (d.dst, d.dport) in asked:
                return False
            if (d.src, d.sport) in asked:
                return True
        return src_client

    def _tcp(self, s: Session, flags: int, from_client: bool) -> None:
        if flags & (TCP_SYN | TCP_ACK) == TCP_SYN:
            if not s.opening_seen:
                s.opening_seen = s.opened = True
            if s.state == SYN_SENT and not from_client:
                s.marks |= MARK_SPLIT_HANDSHAKE  # its opener's SYN answered by a SYN
        if flags & TCP_RST:
            s.state = CLOSED
        elif flags & TCP_FIN:
            s.fins |= 1 if from_client else 2
            s.state = CLOSED if s.fins == 3 else CLOSING
        elif s.state < OPEN:
            if flags & TCP_SYN:
                if flags & TCP_ACK:
                    s.state = SYN_RECV
            else:
                s.state = OPEN  # the handshake's last ACK (or a lost SYN-ACK): data can flow

    # -- ends ----------------------------------------------------------------------------------

    def _end(self, s: Session, reason: str, in_table: bool = True) -> None:
        if in_table:
            del self.sessions[s.key]
        if s.insp is not False:
            self.detection.settle(s, finish=True)
        s.end_reason = reason
        self.closed += 1
        if s.new and self._pending_ended >= self.max_pending:
            if s.dirty:  # never reported, and the next report is full: count it, keep nothing
                del self._dirty[id(s)]
            self.unreported += 1
            return
        self._pending_ended += 1
        if not s.dirty:
            s.dirty = True
            self._dirty[id(s)] = s

    def timeout_of(self, s: Session) -> float:
        """The idle timeout that applies to ``s`` in its current state."""
        t = self.timeouts or Timeouts()
        if s.proto == PROTO_TCP:
            return (t.tcp_half_open, t.tcp_half_open, t.tcp_open, t.tcp_closing, t.tcp_closed)[s.state]
        if s.proto == PROTO_UDP:
            return t.udp
        if s.proto == PROTO_ICMP or s.proto == PROTO_ICMPV6:
            return t.icmp
        return t.other

    def expire(self, now: float) -> int:
        """End the sessions idle past their timeout; returns how many. No-op without timeouts."""
        if self.timeouts is None:
            return 0
        shortest = min(vars(self.timeouts).values())
        stale = []
        # Least recently seen first: once a session is younger than the shortest timeout, all
        # the following ones are too.
        for s in self.sessions.values():
            idle = now - s.last
            if idle < shortest:
                break
            if idle >= self.timeout_of(s):
                stale.append(s)
        for s in stale:
            reason = "fin" if s.state == CLOSED and s.fins == 3 else "rst" if s.state == CLOSED else "idle"
            self._end(s, reason)
        self.expired += len(stale)
        return len(stale)

    def close_all(self, reason: str = "end") -> None:
        """End every session (end of a capture file, or shutdown)."""
        for s in list(self.sessions.values()):
            self._end(s, reason)

    # -- export --------------------------------------------------------------------------------

    def collect(self, now: float, hold: float = 0.0) -> Report:
        """Expire idle sessions, settle the inspectors of sessions idle for ``INSPECTOR_IDLE``,
        then return what changed since the previous call.

        A session first seen less than ``hold`` seconds ago waits for the next call: an older
        packet that belongs before it (the DNS answer that named its server) may still sit in
        another ring's block, which the kernel hands over only when it retires (live capture:
        ``hold`` is the rings' retire timeout). So what a report says, it says in order.
        """
        self.expire(now)
        recent = now - hold
        for s in list(self._dirty.values()):
            insp = s.insp
            if insp is not None and insp is not False and insp is not True and s.first <= recent:
                self.detection.judge_server_alone(s, insp)
        self._settle_idle(now)
        held = {k: s for k, s in self._dirty.items() if s.new and s.first > recent} if hold else {}
        deltas = [self._delta(s) for k, s in self._dirty.items() if k not in held]
        self._dirty = held
        self._pending_ended = sum(1 for s in held.values() if s.end_reason)
        return Report(now, deltas, self.health())

    def count_parser_error(self) -> None:
        """A block whose parsing raised (a bug): counted as ``internal_error``."""
        self.stats.malformed["internal_error"] += 1

    def _settle_idle(self, now: float) -> None:
        """Settle the inspectors of sessions last seen ``INSPECTOR_IDLE`` seconds before ``now`` or
        earlier (least recently seen first, as far as recency order says they are that old), but
        those a scanner asks to wait; the next report carries those that have something to say."""
        before = now - INSPECTOR_IDLE
        for s in self.sessions.values():
            if s.last > before:
                break
            insp = s.insp
            if insp is not None and insp is not False and insp is not True and not self.detection.waits(insp, now):
                self.detection.settle(s, finish=True)
                if said_something(s) and not s.dirty:
                    s.dirty = True
                    self._dirty[id(s)] = s

    def health(self) -> Health:
        """Cumulative counters (decoder and table)."""
        st = self.stats
        return Health(st.total, st.decoded, dict(st.malformed), dict(st.ignored), len(self.sessions),
                      self.created, self.evicted, self.expired, self.closed, self.detection.errors,
                      self.unreported, dict(self.fragments.counters))

    def _delta(self, s: Session) -> SessionDelta:
        c, cp, sv, sp, vlan = s.endpoints()
        decided = s.app_new
        d = SessionDelta(
            L4_NAMES.get(s.proto, str(s.proto)), s.proto, vlan, c, cp, sv, sp, s.first, s.last,
            s.new, s.opened, bool(s.end_reason), s.end_reason, STATE_NAMES[s.state], s.app, decided,
            s.pkts_c2s - s.rep_pkts_c2s, s.pkts_s2c - s.rep_pkts_s2c,
            s.bytes_c2s - s.rep_bytes_c2s, s.bytes_s2c - s.rep_bytes_s2c,
            s.metadata if decided else None, list(s.threats) if decided else [], s.marks, s.echo_changes,
        )
        s.marks = s.echo_changes = 0
        s.rep_pkts_c2s, s.rep_pkts_s2c = s.pkts_c2s, s.pkts_s2c
        s.rep_bytes_c2s, s.rep_bytes_s2c = s.bytes_c2s, s.bytes_s2c
        if decided and s.insp is False:  # said once: not kept
            s.metadata, s.threats = _NO_METADATA, ()
        s.dirty = s.new = s.opened = s.app_new = False
        return d
