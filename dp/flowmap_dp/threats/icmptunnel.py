"""icmp-tunnel: data carried in ICMP echoes.

Rule: an echo session (ICMP echo or ICMPv6 echo, one per identifier between two addresses)
raises it once when its echo payloads changed ``changes`` times (default 4) in all: an echo
request unlike the request before it, or an echo reply unlike the request it answers. An echo
is summed up by the session table (``session.echo_digest``: 16 bits of its IP length and its
captured payload bytes 16 to 272) and compared with the session's last request only: two bytes
a session, no payload kept. Real pings never change: ping (iputils, BusyBox, Windows, macOS)
writes a timestamp in the payload's first 16 bytes, which are skipped, then the same pattern
in every request (``-p`` only picks the pattern), and a reply echoes its request byte for byte.
A tunnel (ptunnel-ng, hans, icmptunnel) puts different data in each request and answers with
the server's data in the replies.

Large payloads alone are no tunnel: ``ping -s 1472`` (a full 1,500-byte frame) and even
``ping -s 65507`` send a constant pattern, and path-MTU probes are large on purpose. So size is
not a trigger; a payload that changes from echo to echo is (the snippet gives the bytes per
packet of the report that tipped it).

Thresholds (``--threat-limit icmp-tunnel.KEY=VALUE``): ``changes`` (default 4): changed echoes
before a session is raised. The watch remembers the counts of at most ``REMEMBERED`` (4,096)
echo sessions that have changed at least once, the least recently changed forgotten first, and
forgets a session when it ends.

What it cannot see: a tunnel that keeps each echo's bytes 16 to 272 and its length constant
(data only in the first 16 bytes, or past byte 272) and answers with copies of its requests;
echo sessions whose requests the capture does not see (their replies are compared with
nothing); one in 65,536 changed echoes sums up like its request and is not counted. ICMP
messages other than echoes (timestamps, errors) are not looked at.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

from flowmap_dp.decode import PROTO_ICMP, PROTO_ICMPV6
from flowmap_dp.detectors.base import Threat
from flowmap_dp.threats.base import ICMP, Limits, Seen, Watcher

NAME = "icmp-tunnel"
LIMITS: Limits = {"changes": 4.0}
REMEMBERED = 4096
_Key = tuple[int, int, bytes, bytes, int]
_RAISED = -1


class IcmpTunnel:
    """Changed echoes per session, summed across reports until the threshold."""

    def __init__(self, limits: Limits) -> None:
        self.changes = max(1.0, limits["changes"])
        self.counts: OrderedDict[_Key, int] = OrderedDict()  # _RAISED once said

    def observe(self, session: Seen, now: float) -> Sequence[Threat]:
        if session.proto != PROTO_ICMP and session.proto != PROTO_ICMPV6:
            return ()
        key = (session.proto, session.vlan, session.client, session.server, session.client_port)
        counts = self.counts
        hit: Sequence[Threat] = ()
        if session.echo_changes:
            seen = counts.pop(key, 0)
            if seen != _RAISED and seen + session.echo_changes >= self.changes:
                packets = session.packets_c2s + session.packets_s2c
                size = (session.bytes_c2s + session.bytes_s2c) // packets if packets else 0
                hit = (Threat(NAME, f"{seen + session.echo_changes} echoes unlike their request, "
                                    f"{size} bytes a packet", "icmp.echo"),)
                seen = _RAISED
            else:
                seen = seen if seen == _RAISED else seen + session.echo_changes
            counts[key] = seen
            if len(counts) > REMEMBERED:
                counts.popitem(last=False)
        if session.closed:
            counts.pop(key, None)
        return hit


WATCHER = Watcher(NAME, IcmpTunnel, LIMITS, sees=ICMP)
