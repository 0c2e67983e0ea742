"""TPACKET_V3 blocks: walk the packets of one block and feed them to a session table.

``feed_block`` reads per packet: one ``Struct`` call per ``tpacket3_hdr``, then ``decode`` and
``SessionTable.packet``. Simple; the reference of the compiled walk (``CompiledTable.feed_block``
in ``flowmap_dp.compiled``), which a test holds to identical reports (tests/dp/test_compiled.py).

Layout (``linux/if_packet.h``): ``struct tpacket_block_desc`` = version, offset_to_priv, then
``tpacket_hdr_v1`` {block_status, num_pkts, offset_to_first_pkt, blk_len, seq_num, ts_first,
ts_last}; then a chain of ``struct tpacket3_hdr`` linked by ``tp_next_offset``, the frame at
``tp_mac`` from its header. When the NIC/kernel stripped a VLAN tag, ``tp_status`` has
``TP_STATUS_VLAN_VALID`` and the tag is in ``hv1.tp_vlan_tci``. A device without a link header
(an IPIP or WireGuard tunnel) gives frames whose network header is where the frame starts
(``tp_net == tp_mac``): they are read as raw IP. Tests and benchmarks lay blocks out with
``tests.dp.synth.pack_block``.
"""

from __future__ import annotations

from struct import Struct
from typing import Final

from flowmap_dp.decode import LINK_ETHERNET, LINK_RAW
from flowmap_dp.session import SessionTable

TP_STATUS_USER: Final = 0x1
TP_STATUS_VLAN_VALID: Final = 0x10
TP_STATUS_VLAN_TPID_VALID: Final = 0x40

BLOCK_DESC = Struct("<IIIIII")  # version, offset_to_priv, block_status, num_pkts, offset_to_first_pkt, blk_len
BLOCK_DESC_SIZE: Final = 48  # with seq_num and the two timestamps
TPACKET3_HDR = Struct("<IIIIIIHHIIHH8x")  # next, sec, nsec, snaplen, len, status, mac, net, rxhash, tci, tpid, pad
TPACKET3_HDRLEN: Final = 68  # sizeof(tpacket3_hdr) + sizeof(sockaddr_ll): where the kernel puts the frame


def block_packets(block: bytes | memoryview) -> tuple[int, int]:
    """(num_pkts, offset_to_first_pkt) of a block."""
    _, _, _, n, first, _ = BLOCK_DESC.unpack_from(block, 0)
    return n, first


def feed_block(block: bytes | memoryview, table: SessionTable) -> int:
    """Per-packet reader: decode every frame of ``block`` into ``table``; returns frames seen.

    A header chain that leaves the block (never seen from a kernel, but the block is only bytes)
    ends the walk; frames are clamped to the block.
    """
    mv = memoryview(block)
    size = len(mv)
    if size < BLOCK_DESC_SIZE:
        return 0
    n, off = block_packets(mv)
    count = table.stats.count
    add = table.packet
    decode = table.fragments.decode
    hdr = TPACKET3_HDR.unpack_from
    seen = 0
    for _ in range(n):
        if off + TPACKET3_HDR.size > size:
            break
        nxt, sec, nsec, snap, wire, status, mac, net, _rx, tci, _tpid, _pad = hdr(mv, off)
        start = off + mac
        end = min(start + snap, size)
        ts = sec + nsec * 1e-9
        out = decode(mv, start, end, LINK_RAW if net == mac else LINK_ETHERNET,
                     tci & 0x0FFF if status & TP_STATUS_VLAN_VALID else 0, wire, ts)
        count(out)
        seen += 1
        if type(out) is not str:
            add(out, ts, mv)  # type: ignore[arg-type]
        if nxt == 0:
            break
        off += nxt
    return seen
