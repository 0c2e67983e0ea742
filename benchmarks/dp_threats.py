"""The CPU cost of the threat pack (flowmap_dp.threats) on benign traffic: the compiled table fed the
same frames with every threat detection on, and with all of them off, in the same process.

Two benign mixes:

* ``captures``: every capture the project has of real, benign traffic (tests/data/captures and
  nDPI's, tests/data/ndpi), each file into a fresh table as the live dp would see it: every
  protocol's real payloads reach the detectors and the scanners. Files whose flows are labelled
  with a threat (the attack captures) are left out: the mix is benign.
* ``synthetic``: tests.dp.synth's mixed traffic (thousands of flows, handshakes, closes) in
  TPACKET_V3 blocks, reported every ``--interval`` seconds of its time, as the live loop does.

Rounds alternate on and off so that drift hits both; each side's best round is kept. Prints the
packets per CPU-second of each side and the extra CPU the pack costs; asserts nothing.

    .venv/bin/python benchmarks/dp_threats.py [--rounds 5] [--packets 200000]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from flowmap_dp import threats  # noqa: E402
from flowmap_dp.block import block_packets  # noqa: E402
from flowmap_dp.compiled import CompiledTable  # noqa: E402
from flowmap_dp.detection import Inspector  # noqa: E402
from flowmap_dp.pcapfile import read_records  # noqa: E402
from benchmarks.dp_blocks import build_blocks  # noqa: E402

DATA = REPO / "tests" / "data"
Frames = list[tuple[bytes, int, int, float]]


def benign_captures() -> list[Frames]:
    """The frames of every capture none of whose flows is labelled with a threat."""
    files = []
    for folder in (DATA / "captures", DATA / "ndpi"):
        manifest = json.loads((folder / "MANIFEST.json").read_text())
        for entry in manifest:
            if any(flow.get("threats") or flow.get("label") == "sqlinjection" for flow in entry.get("flows", [])):
                continue
            files.append([(r.data, r.link, r.wire_len, r.ts) for r in read_records(folder / entry["file"])])
    return files


def pack(config: threats.Config) -> Callable[[], tuple[CompiledTable, threats.Watching]]:
    """A fresh table and its watches, as one packet loop has them."""
    factory = partial(Inspector, scanners=threats.bind(config))
    return lambda: (CompiledTable(max_sessions=1_000_000, timeouts=None, inspector_factory=factory),
                    threats.Watching(config))


def run_captures(files: list[Frames], config: threats.Config) -> tuple[float, int]:
    """Each capture into a table and watches of its own (each was recorded apart: one client and
    one server address across them, times that go back), one report at its end."""
    make = pack(config)
    hits = 0
    start = time.process_time()
    for frames in files:
        table, watching = make()
        table.feed_frames(frames)
        table.close_all()
        report = table.collect(0.0)
        watching.observe(report.time, report.sessions)
        hits += sum(len(s.threats) for s in report.sessions)
    return time.process_time() - start, hits


def run_blocks(blocks: list[bytes], config: threats.Config, per_report: int) -> tuple[float, int]:
    (table, watching), hits, now = pack(config)(), 0, 0.0
    start = time.process_time()
    for i, block in enumerate(blocks, 1):
        table.feed_block(block)
        if i % per_report == 0 or i == len(blocks):
            now += 1.0
            report = table.collect(now)
            watching.observe(report.time, report.sessions)
            hits += sum(len(s.threats) for s in report.sessions)
    return time.process_time() - start, hits


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--packets", type=int, default=200_000, help="packets of the synthetic mix")
    ap.add_argument("--flows", type=int, default=5000)
    ap.add_argument("--blocks-per-report", type=int, default=8)
    ap.add_argument("--repeat", type=int, default=20, help="times the captures are fed per round (they are small)")
    args = ap.parse_args()

    names = sorted({s.name for s in threats.SCANNERS} | {w.name for w in threats.WATCHERS})
    on, off = threats.Config(), threats.Config(off=frozenset(names))
    print(f"threat detections: {len(names)} ({', '.join(names)})")
    files = benign_captures() * args.repeat
    packets = sum(len(f) for f in files)
    blocks = build_blocks(args.packets, args.flows, 1 << 20, seed=1, close_rate=0.02)
    synthetic = sum(block_packets(b)[0] for b in blocks)
    print(f"captures: {len(files) // args.repeat} benign files x {args.repeat}, {packets} packets; synthetic: {synthetic} packets in "
          f"{len(blocks)} blocks, a report every {args.blocks_per_report} blocks")

    for mix, total, run in (("captures", packets, lambda c: run_captures(files, c)),
                            ("synthetic", synthetic, lambda c: run_blocks(blocks, c, args.blocks_per_report))):
        best: dict[str, tuple[float, int]] = {}
        for _ in range(args.rounds):
            for side, config in (("on", on), ("off", off)):
                seconds, hits = run(config)
                if side not in best or seconds < best[side][0]:
                    best[side] = (seconds, hits)
        (t_on, hits_on), (t_off, _) = best["on"], best["off"]
        print(f"{mix:9s} threats off {total / t_off / 1e3:8.1f} kpps   on {total / t_on / 1e3:8.1f} kpps   "
              f"extra CPU {100 * (t_on / t_off - 1):+5.1f}%   hits on benign traffic {hits_on}")


if __name__ == "__main__":
    main()
