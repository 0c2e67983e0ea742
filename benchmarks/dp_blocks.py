"""The compiled table versus the per-packet reference reading TPACKET_V3 blocks, in packets per
CPU-second.

Builds realistic blocks in memory (``tests.dp.synth``: mixed 64-1500-byte frames, thousands
of flows with skewed popularity, packet trains, TCP handshakes and closes, IPv4 + IPv6, some
VLAN tags in the frame and some stripped into the TPACKET header) and feeds them to each table:

* ``per-packet``  — ``flowmap_dp.block.feed_block`` into ``SessionTable`` (the Python reference)
* ``compiled``    — ``flowmap_dp.compiled.CompiledTable.feed_block`` (Rust walk, decoder and table;
  detection stays Python)
* ``reference``   — the leanest per-packet Python loop (one Struct call per header, one slice
  as a dict key, no decoding), measured in the same run so numbers from different machines
  can be compared by ratio.

"cold" starts from an empty table and times every block (every flow is created on the way);
"steady" feeds the first quarter of the blocks untimed, then times the rest (most flows are
established; new connections, closes and undecided payloads still reach the detectors). Prints
ratios, asserts nothing; the two tables' final reports (every session, every counter) are
checked to be identical.

    .venv/bin/python benchmarks/dp_blocks.py [--packets 300000] [--flows 5000] [--block-kib 1024]
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from flowmap_dp.block import TPACKET3_HDR, block_packets  # noqa: E402
from tests.dp.synth import mixed_traffic, pack_block  # noqa: E402
from tests.dp.twins import KINDS, Table, assert_same_reports, make_table  # noqa: E402

def build_blocks(packets: int, flows: int, block_size: int, seed: int, close_rate: float = 0.005) -> list[bytes]:
    frames = mixed_traffic(packets, flows, seed=seed, close_rate=close_rate)
    blocks = []
    rest = frames
    while rest:
        block, n = pack_block(rest, block_size)
        blocks.append(block)
        rest = rest[n:]
    return blocks


def reference(block: bytes, counts: dict[bytes, int]) -> int:
    """The leanest per-packet loop: header walk, one slice of the addresses+ports as key."""
    n, off = block_packets(block)
    hdr = TPACKET3_HDR.unpack_from
    for _ in range(n):
        nxt, _s, _ns, _snap, _len, _st, mac, _net, _rx, _tci, _tpid, _pad = hdr(block, off)
        key = block[off + mac + 26 : off + mac + 38]
        counts[key] = counts.get(key, 0) + 1
        off += nxt
    return n


class _Settled:
    """An inspector that settles at once: measures the datapath without detection."""

    def __init__(self, l4: str, client_port: int, server_port: int) -> None:
        self.app = "unknown"
        self.metadata: dict[str, object] = {}
        self.threats: list[object] = []

    def feed(self, from_client: bool, payload: bytes) -> bool:
        return True

    def judge_server_alone(self) -> bool:
        return True

    def finish(self) -> None:
        pass


def cpu(fn: Callable[[], object]) -> float:
    t = time.process_time()
    fn()
    return time.process_time() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--packets", type=int, default=300_000)
    ap.add_argument("--flows", type=int, default=5000)
    ap.add_argument("--block-kib", type=int, default=1024)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--inspector", choices=("real", "none"), default="real",
                    help="none: every session settles as unknown at its first payload (datapath alone)")
    ap.add_argument("--close-rate", type=float, default=0.005,
                    help="chance a TCP packet closes its connection (short connections = more slow path)")
    args = ap.parse_args()

    blocks = build_blocks(args.packets, args.flows, args.block_kib * 1024, args.seed, args.close_rate)
    total = sum(block_packets(b)[0] for b in blocks)
    print(f"{total} packets in {len(blocks)} blocks of {args.block_kib} KiB, {args.flows} flows,"
          f" close rate {args.close_rate}, inspector {args.inspector}")

    counts: dict[bytes, int] = {}
    ref = total / cpu(lambda: [reference(b, counts) for b in blocks])
    print(f"reference loop (walk + slice key):  {ref / 1e6:6.3f} Mpps")

    factory = None if args.inspector == "real" else _Settled
    results: dict[str, tuple[float, float, Table]] = {}
    warmup = len(blocks) // 4
    steady_packets = sum(block_packets(b)[0] for b in blocks[warmup:])
    for name in KINDS:
        table = make_table(name, max_sessions=1_000_000, inspector_factory=factory)
        cold = total / cpu(lambda: [table.feed_block(b) for b in blocks])
        warm = make_table(name, max_sessions=1_000_000, inspector_factory=factory)
        for b in blocks[:warmup]:
            warm.feed_block(b)
        steady = steady_packets / cpu(lambda: [warm.feed_block(b) for b in blocks[warmup:]])
        results[name] = (cold, steady, table)
        print(f"{name:11s} cold {cold / 1e6:6.3f} Mpps   steady {steady / 1e6:6.3f} Mpps"
              f"   (steady = {steady / ref:4.2f}x the reference loop; sessions {len(table)})")
    (pc, pw, pt), (cc, cw, ct) = results["per-packet"], results["compiled"]
    print(f"compiled / per-packet: cold {cc / pc:4.2f}x   steady {cw / pw:4.2f}x")
    pt.close_all()
    ct.close_all()
    try:
        assert_same_reports(pt.collect(0.0), ct.collect(0.0))
        print("identical reports (every session, every counter): yes")
    except AssertionError as e:
        print(f"identical reports (every session, every counter): NO\n{e}")


if __name__ == "__main__":
    main()
