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
(``tp_net == tp_mac``): they are read as raw IP.
"""

from __future__ import annotations

from collections.abc import Iterable
import struct
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
_SEQ_TS = Struct("<QIIII")


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


def pack_block(frames: Iterable[tuple[bytes, float] | tuple[bytes, float, int | None]], block_size: int = 1 << 20,
               snaplen: int = 65535, seq: int = 0, link_header: int = 14) -> tuple[bytes, int]:
    """Lay frames out as the kernel would in one TPACKET_V3 block (for tests and benchmarks).

    Each frame is (bytes, timestamp) or (bytes, timestamp, stripped VLAN TCI). Returns the block
    and how many frames fit; the rest belong in the next block. ``link_header`` is the device's
    link header length: 14 for Ethernet, 0 for a tunnel whose frames are raw IP.
    """
    out = bytearray(block_size)
    # The kernel's macoff: the network header aligned to 16 after the headers (tpacket_rcv).
    mac = ((TPACKET3_HDRLEN + max(link_header, 16) + 15) & ~15) - link_header
    first = off = (BLOCK_DESC_SIZE + 7) & ~7
    n = last = 0
    ts_first = ts_last = (0, 0)
    for item in frames:
        data, ts = item[0], item[1]
        tci = item[2] if len(item) > 2 else None
        cap = min(len(data), snaplen)
        step = (mac + cap + 7) & ~7
        if off + step > block_size:
            break
        sec = int(ts)
        nsec = int(round((ts - sec) * 1e9))
        if nsec >= 1_000_000_000:
            sec, nsec = sec + 1, nsec - 1_000_000_000
        status = TP_STATUS_USER | (TP_STATUS_VLAN_VALID if tci is not None else 0)
        TPACKET3_HDR.pack_into(out, off, step, sec, nsec, cap, len(data), status, mac, mac + link_header, 0, tci or 0,
                               0x8100 if tci is not None else 0, 0)
        out[off + mac : off + mac + cap] = data[:cap]
        last = off
        if n == 0:
            ts_first = (sec, nsec)
        ts_last = (sec, nsec)
        off += step
        n += 1
    if n:
        struct.pack_into("<I", out, last, 0)  # as prb_close_block: the last packet links nowhere
    BLOCK_DESC.pack_into(out, 0, 3, BLOCK_DESC_SIZE, TP_STATUS_USER, n, first, off)
    _SEQ_TS.pack_into(out, 24, seq, *ts_first, *ts_last)
    return bytes(out), n
