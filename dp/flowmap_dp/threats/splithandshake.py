"""tcp-split-handshake: a TCP SYN answered by a SYN.

Rule: a session whose opener's SYN (no ACK) is answered, before the handshake completes, by a SYN
(no ACK) from the other side raises it once, in the report that carries that SYN. A server that
answers a SYN with a SYN instead of a SYN-ACK (the "split handshake", Beardsley and Qian 2010)
takes the client's role in RFC 793's simultaneous open: an IDS or firewall that decides client
and server from who sent the SYN-ACK gets them backwards, and a client stack that accepts it
connects to a server that behaves as a client. The session table sets the mark
(``session.MARK_SPLIT_HANDSHAKE``, per packet, no state beyond the TCP state it already keeps).

Thresholds: none (one such SYN is the whole evidence).

What it cannot see: a genuine simultaneous open (TCP hole punching by peer-to-peer software
behind NAT, rare) looks the same on the wire and is raised too; a SYN the capture missed (a
lost or filtered packet) hides it; the answering SYN read before the opener's (another ring)
is still a SYN answering a SYN, in either order, and is raised.
"""

from __future__ import annotations

from flowmap_dp.decode import MARK_SPLIT_HANDSHAKE, PROTO_TCP
from flowmap_dp.detectors.base import Threat
from flowmap_dp.threats.base import marked

NAME = "tcp-split-handshake"
WATCHER = marked(Threat(NAME, "SYN answered by SYN", "tcp.handshake"), MARK_SPLIT_HANDSHAKE, PROTO_TCP)
