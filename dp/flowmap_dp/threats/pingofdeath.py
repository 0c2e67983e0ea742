"""ping-of-death: an ICMP packet larger than an IP packet may be.

Rule: an ICMP or ICMPv6 session raises it once per report in which one of its IP fragments
reassembles past IP's own bound: a fragment whose offset plus length puts its datagram's total
length (IPv4) or payload length (IPv6) above 65,535 bytes. No stack may send that, and stacks
that reassembled it into a 65,535-byte buffer crashed (the 1996 "ping of death"). The decoder checks each later fragment as it
reads its header (``decode.MARK_OVERSIZED``: one comparison, no reassembly, nothing kept); the
fragment table attributes it to the session of its first fragment, which carries the ICMP
header.

Thresholds: none: 65,535 is IP's bound, not a setting. A large but legal echo (``ping -s
65507``, exactly 65,535 bytes reassembled) is not raised.

What it cannot see: fragments whose first fragment was not seen or is forgotten (30 s, 4,096
datagrams; counted as ignored ``fragment``), which belong to no session; oversized datagrams of
other protocols (marked, not raised: the name is ICMP's); an IPv6 jumbogram, which is legal.
"""

from __future__ import annotations

from flowmap_dp.decode import MARK_OVERSIZED, PROTO_ICMP, PROTO_ICMPV6
from flowmap_dp.detectors.base import Threat
from flowmap_dp.threats.base import marked

NAME = "ping-of-death"
WATCHER = marked(Threat(NAME, "fragments reassemble past 65,535 bytes", "ip.fragment"), MARK_OVERSIZED, PROTO_ICMP,
                 PROTO_ICMPV6)
