"""Seed inputs for the fuzz targets, in their formats (see fuzz_targets/*.rs), from the frames of
``tests.dp.synth``: every shape the decoder knows, fragment pairs, TCP and DNS exchanges
(with the pauses that start a new lookup), VLAN tags in the frame and stripped, a ready block.

    python dp/native/fuzz/seeds.py OUT_DIR     # writes OUT_DIR/decode/* and OUT_DIR/walk/*
"""

from __future__ import annotations

import hashlib
import random
import struct
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[3]  # the frame builders are test tools, not shipped: tests.dp.synth
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from tests.dp.synth import ether, ipv4, ipv6, pack_block, seed_frames, tcp, udp  # noqa: E402

A4, B4 = bytes([10, 0, 0, 1]), bytes([10, 0, 0, 2])
A6, B6 = b"\xfd" + bytes(14) + b"\x01", b"\xfd" + bytes(14) + b"\x02"
# decode: the link selector's index of LINK_RAW, and the bits of wire_len and window modes.
RAW, WIRE_PLUS, WINDOW_CUT, SEQUENCE = 1, 1 << 3, 2 << 5, 0x80
# walk: mode bits; flags bits of a frame.
TIMEOUTS, HOLD = 8, 16
STRIPPED, LAST, CORRUPT = 2, 8, 16
STEP = {0.0: 0, 0.001: 1, 0.2: 2, 1.5: 3, 12.0: 4, 45.0: 5, 400.0: 6, -0.7: 7}


def decode_seeds(rnd: random.Random) -> list[bytes]:
    """Every seed frame on Ethernet and raw, with a longer wire and a cut window; fragment pairs."""
    frames = seed_frames(rnd)
    out = []
    for f in frames:
        out.append(bytes([0]) + bytes(2) + f)  # Ethernet, the whole frame
        out.append(bytes([RAW]) + bytes(2) + f[14:])  # raw IP
        out.append(bytes([WIRE_PLUS]) + bytes(2) + bytes([200]) + f)  # wire longer than captured
        out.append(bytes([WINDOW_CUT]) + struct.pack("<H", 7) + bytes([10]) + f)  # last bytes cut
    # Fragments: a first fragment and a later one of the same datagram (twice); then, with a short
    # timeout, the later one again once its first fragment is forgotten.
    first = ether(ipv4(A4, B4, 17, udp(5353, 53, b"q" * 16), ident=7, frag=0x2000))
    later = ether(ipv4(A4, B4, 17, b"r" * 16, ident=7, frag=0x0003))
    step0 = 8 << 3  # the sequence's time step for +0 s, link Ethernet
    pair = b"".join(bytes([step0]) + struct.pack("<H", len(f)) + f for f in (first, later, later))
    out.append(bytes([SEQUENCE | 4]) + pair)
    out.append(bytes([SEQUENCE | 1 | 8]) + pair + bytes([31 << 3]) + struct.pack("<H", len(later)) + later)
    return out


def frame(data: bytes, step: float = 0.001, flags: int = 0, tci: int | None = None,
          corrupt: tuple[int, int] | None = None) -> bytes:
    """One frame of the walk target's input: its flags, optional fields, length and bytes."""
    flags |= STEP[step] << 5 | (STRIPPED if tci is not None else 0) | (CORRUPT if corrupt else 0)
    head = bytes([flags])
    if tci is not None:
        head += struct.pack("<H", tci)
    if corrupt:
        head += struct.pack("<BI", *corrupt)
    return head + struct.pack("<H", len(data)) + data


def walk_seeds() -> list[bytes]:
    """Exchanges laid out in blocks under a few table sizes and answer policies; a ready block."""
    syn, synack, ack, fin = 0x02, 0x12, 0x10, 0x11
    conv = [
        frame(ether(ipv4(A4, B4, 6, tcp(40000, 80, syn)))),
        frame(ether(ipv4(B4, A4, 6, tcp(80, 40000, synack)))),
        frame(ether(ipv4(A4, B4, 6, tcp(40000, 80, 0x18, b"GET / HTTP/1.1\r\n\r\n")))),
        frame(ether(ipv4(B4, A4, 6, tcp(80, 40000, 0x18, b"HTTP/1.1 200 OK\r\n\r\n"))), flags=LAST),
        frame(ether(ipv4(A4, B4, 6, tcp(40000, 80, fin))), step=1.5),
        frame(ether(ipv4(B4, A4, 6, tcp(80, 40000, fin)))),
        frame(ether(ipv4(A4, B4, 6, tcp(40000, 80, ack)))),
        frame(ether(ipv4(A4, B4, 6, tcp(40000, 80, syn))), step=12.0),  # the 5-tuple reused
    ]
    query = ether(ipv4(A4, B4, 17, udp(5353, 53, b"\x12\x34\x01\x00" + bytes(8))))
    reply = ether(ipv4(B4, A4, 17, udp(53, 5353, b"\x12\x34\x81\x80" + bytes(8))))
    dns = [frame(query), frame(reply), frame(query, step=1.5), frame(reply, step=0.001),
           frame(query, step=45.0, tci=7), frame(ether(ipv6(A6, B6, 17, udp(5353, 53, b"\x00" * 12)), (9,)))]
    frag = [frame(ether(ipv4(A4, B4, 17, udp(1, 2, b"f" * 24), ident=9, frag=0x2000))),
            frame(ether(ipv4(A4, B4, 17, b"g" * 24, ident=9, frag=0x0004))),
            frame(ipv4(A4, B4, 1, bytes([8, 0, 0, 0, 0, 7, 0, 1])), flags=1)]  # raw IP
    head = bytes([0, 63, 0xEC, 8])  # answer never; 64 sessions; 15 pending, feed 8; 8 fragments
    out = [
        head + b"".join(conv),
        bytes([TIMEOUTS | 2, 0, 0x21, 2]) + b"".join(conv + dns),  # one session: evictions
        bytes([TIMEOUTS | HOLD | 4, 3, 0x40, 0x84]) + b"".join(dns + frag),
        bytes([6, 7, 0x02, 0]) + b"".join(dns * 3),  # answers by handle; 2 pending
        # A chain that points into the middle of a header, then a frame count far too high.
        head + frame(conv[0][3:], corrupt=(0, 3)) + b"".join(conv[1:3]),
        head + b"".join(conv[:2]) + frame(query, corrupt=(4, 1000)),
    ]
    block, _ = pack_block([(ether(ipv4(A4, B4, 6, tcp(40000, 80, 0x18, b"abc"))), 1.0),
                           (ether(ipv4(B4, A4, 17, udp(53, 5353, b"d"))), 1.5, 5)], block_size=512)
    out.append(bytes([1, 63, 0xEC, 8]) + block)  # a block as the kernel lays it out, raw mode
    return out


def write(folder: Path, seeds: list[bytes]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for s in seeds:
        (folder / hashlib.sha1(s).hexdigest()).write_bytes(s)


def main() -> int:
    if len(sys.argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    out = Path(sys.argv[1])
    write(out / "decode", decode_seeds(random.Random(1)))
    write(out / "walk", walk_seeds())
    return 0


if __name__ == "__main__":
    sys.exit(main())
