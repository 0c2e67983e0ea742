"""At least 1,000,000 hostile frames through decode, sessions and the detectors.

Random bytes, mutated and truncated well-formed frames (``flowmap_dp.synth.fuzz_frames``) go
through the per-packet decode + session table + Inspector, and, packed into TPACKET_V3 blocks,
through both block readers. Prints the count and the rate, and whether the counters add up
(decoded + malformed + ignored == total, no ``internal_error``). Exits 1 if anything escaped or
failed to add up.

    .venv/bin/python benchmarks/dp_fuzz.py [--frames 1000000] [--seed 0]
"""

from __future__ import annotations

import argparse
import random
import sys
import time

from flowmap_dp.block import feed_block, pack_block
from flowmap_dp.decode import Decoded, DecodeStats
from flowmap_dp.session import SessionTable
from flowmap_dp.synth import fuzz_frames
from flowmap_dp.vectorised import feed_block_vectorised

CHUNK = 50_000


def report(name: str, stats: DecodeStats, seconds: float, table: SessionTable) -> bool:
    ok = stats.balanced() and stats.malformed["internal_error"] == 0
    bad = {k: v for k, v in stats.malformed.items() if v}
    print(f"{name:11s} {stats.total:>9} frames  {stats.total / seconds:>9.0f} frames/CPU-s  decoded {stats.decoded}"
          f"  ignored {stats.ignored}  sessions created {table.created} evicted {table.evicted}"
          f"  inspector errors {table.inspector_errors}  {'adds up' if ok else 'DOES NOT ADD UP'}")
    print(f"{'':11s} malformed by reason: {bad}")
    return ok


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--frames", type=int, default=1_000_000)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    rnd = random.Random(args.seed)
    direct = SessionTable(max_sessions=100_000)
    per_packet = SessionTable(max_sessions=100_000)
    per_block = SessionTable(max_sessions=100_000)
    cpu = {"direct": 0.0, "per-packet": 0.0, "per-block": 0.0}
    done = 0
    try:
        while done < args.frames:
            frames = fuzz_frames(min(CHUNK, args.frames - done), seed=args.seed * 1_000_003 + done)
            t = time.process_time()
            for i, raw in enumerate(frames):
                out = direct.fragments.decode(raw, 0, len(raw), 1, 0, len(raw), float(done + i))
                direct.stats.count(out)
                if type(out) is Decoded:
                    direct.packet(out, float(done + i), raw)
            cpu["direct"] += time.process_time() - t
            tagged = [(f, float(done + i), rnd.choice((None, None, None, 7))) for i, f in enumerate(frames)]
            blocks = []
            while tagged:
                block, n = pack_block(tagged, 1 << 20)
                blocks.append(block)
                tagged = tagged[n:]
            for name, reader, table in (("per-packet", feed_block, per_packet),
                                        ("per-block", feed_block_vectorised, per_block)):
                t = time.process_time()
                for block in blocks:
                    reader(block, table)
                cpu[name] += time.process_time() - t
            done += len(frames)
            for table in (direct, per_packet, per_block):
                table.collect(float(done))
    except Exception as e:  # the point of the exercise: report it, exit 1
        print(f"EXCEPTION ESCAPED after {done} frames: {e!r}")
        raise
    ok = all(report(name, table.stats, cpu[name], table) for name, table in
             (("direct", direct), ("per-packet", per_packet), ("per-block", per_block)))
    same = per_packet.stats.malformed == per_block.stats.malformed and \
        per_packet.stats.decoded == per_block.stats.decoded
    print(f"block readers agree on decode counters: {'yes' if same else 'NO'}")
    return 0 if ok and same else 1


if __name__ == "__main__":
    sys.exit(main())
