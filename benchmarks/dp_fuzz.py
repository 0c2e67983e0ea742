"""At least 1,000,000 hostile frames through both decoders, both session tables and the detectors.

Random bytes, mutated and truncated well-formed frames (``tests.dp.synth.fuzz_frames``) go
through the Python decoder (``decode.decode``) and the compiled one (``_native.decode_frame``),
which must say the same of every frame; then, packed into TPACKET_V3 blocks, through the
per-packet reference (``block.feed_block`` into ``SessionTable``) and the compiled table
(``CompiledTable.feed_block``), both with the real detectors, collected after every chunk: their
reports must be identical. Prints frames per CPU-second for each, and whether anything escaped
(an exception, an ``internal_error``), the counters add up (decoded + malformed + ignored ==
total) and the two agree. Exits 1 if not.

    .venv/bin/python benchmarks/dp_fuzz.py [--frames 1000000] [--seed 0]
"""

from __future__ import annotations

import argparse
import gc
import random
import sys
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from flowmap_dp import _native  # noqa: E402
from flowmap_dp.compiled import CompiledTable  # noqa: E402
from flowmap_dp.decode import decode  # noqa: E402
from flowmap_dp.session import Health  # noqa: E402
from tests.dp.synth import fuzz_frames, pack_block  # noqa: E402
from tests.dp.twins import REASONS, ReferenceTable, assert_same_reports, balanced, native_outcome  # noqa: E402

CHUNK = 50_000
LINKS = (1, 1, 1, 101, 113)  # mostly Ethernet, some raw IP and Linux cooked


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--frames", type=int, default=1_000_000)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    rnd = random.Random(args.seed)
    # Small bounds, so that eviction from both the session and the fragment table is fuzzed too.
    bounds = {"max_sessions": 4000, "max_fragments": 256}
    tables = {"per-packet": ReferenceTable(**bounds), "compiled": CompiledTable(**bounds)}
    cpu = dict.fromkeys(("decode", "decode_frame", *tables), 0.0)
    outcomes: Counter[int] = Counter()
    differ = 0  # frames the two decoders disagree on
    reports = 0  # reports compared
    unequal = ""
    done = 0
    try:
        while done < args.frames:
            frames = fuzz_frames(min(CHUNK, args.frames - done), seed=args.seed * 1_000_003 + done)
            calls = [(raw, 0, len(raw), rnd.choice(LINKS), 0, len(raw) + rnd.choice((0, 0, 1, 2000))) for raw in frames]
            # The decoders' outcomes hold no cycles: without the collector (as timeit runs), their
            # times do not depend on how many objects the tables happen to keep.
            gc.disable()
            t = time.process_time()
            py = [decode(*c) for c in calls]
            cpu["decode"] += time.process_time() - t
            t = time.process_time()
            native = [_native.decode_frame(*c) for c in calls]
            cpu["decode_frame"] += time.process_time() - t
            gc.enable()
            for a, b in zip(py, native, strict=True):
                want = native_outcome(a)
                differ += want != b
                outcomes[want if isinstance(want, int) else -1] += 1

            tagged = [(f, done + i * 1e-3, rnd.choice((None, None, None, 7))) for i, f in enumerate(frames)]
            blocks = []
            while tagged:
                block, n = pack_block(tagged, 1 << 20)
                blocks.append(block)
                tagged = tagged[n:]
            got = {}
            for name, table in tables.items():
                t = time.process_time()
                for block in blocks:
                    table.feed_block(block)
                got[name] = table.collect(done + len(frames) * 1e-3)
                cpu[name] += time.process_time() - t
            done += len(frames)
            try:
                assert_same_reports(got["per-packet"], got["compiled"])
                reports += 1
            except AssertionError as e:
                unequal = unequal or f"after {done} frames: {e}"
        for table in tables.values():
            table.close_all()
        final = {name: table.collect(done + 1e4) for name, table in tables.items()}
        try:
            assert_same_reports(final["per-packet"], final["compiled"])
            reports += 1
        except AssertionError as e:
            unequal = unequal or f"at the end: {e}"
    except Exception as e:  # the point of the exercise: report it, exit 1
        print(f"EXCEPTION ESCAPED after {done} frames: {e!r}")
        raise

    internal = REASONS.index("internal_error")
    print(f"{done} hostile frames (seed {args.seed}), in CPU time per path:")
    for name in ("decode", "decode_frame"):
        print(f"  {name:12s} {done / cpu[name]:>10.0f} frames/CPU-s")
    for name in tables:
        print(f"  {name:12s} {done / cpu[name]:>10.0f} frames/CPU-s  (blocks in, sessions, detectors, a collect per"
              f" {CHUNK} frames)")
    print(f"  compiled / per-packet: decoder {cpu['decode'] / cpu['decode_frame']:.1f}x,"
          f" table {cpu['per-packet'] / cpu['compiled']:.1f}x")
    named = {("decoded" if k < 0 else REASONS[k]): v for k, v in sorted(outcomes.items())}
    print(f"decoders: {named}")
    decoders_ok = differ == 0 and outcomes[internal] == 0 and sum(outcomes.values()) == done
    print(f"decoders agree on every frame, no internal_error: {'yes' if decoders_ok else f'NO ({differ} differ)'}")
    h: Health = final["compiled"].health
    tables_ok = all(f.health.malformed["internal_error"] == 0 and balanced(f.health) and f.health.packets == done
                    for f in final.values())
    print(f"tables: packets {h.packets} decoded {h.decoded} malformed {sum(h.malformed.values())} ignored {h.ignored}"
          f" sessions created {h.created} evicted {h.evicted} expired {h.expired} unreported {h.unreported}"
          f" inspector errors {h.inspector_errors} fragments {h.fragments}")
    print(f"tables: internal_error 0 and totals balanced: {'yes' if tables_ok else 'NO'}")
    print(f"tables: {reports} reports compared, identical: {'yes' if not unequal else 'NO ' + unequal}")
    return 0 if decoders_ok and tables_ok and not unequal else 1


if __name__ == "__main__":
    sys.exit(main())
