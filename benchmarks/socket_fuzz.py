"""At least 1,000,000 hostile streams on the dp socket, through the reader's framing and the agent.

Streams of ``tests.dp.synth.wire_streams`` (reports with odd values, the same mutated: header
and body bytes, lying lengths, cut short, garbage after, random bytes; split into reads at random
points) go through ``flowmap_dp.framing.Stream`` one read at a time, and every report that
parses through the agent's own path (``Intake.record``: positions, aggregation, the shared
validity, the outbox). Prints the count, the time, and why connections would be closed. Exits 1
if an exception other than a counted WireError escaped, or an intact stream lost a report.

    .venv/bin/python benchmarks/socket_fuzz.py [--streams 1000000] [--seed 0]
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

from prometheus_client import CollectorRegistry

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from flowmap_agent.aggregation import Aggregator  # noqa: E402
from flowmap_agent.receiving import admissible  # noqa: E402
from flowmap_agent.running import Agent  # noqa: E402
from flowmap_agent.settings import Settings  # noqa: E402
from flowmap_dp.framing import HEADER, MAX_FRAME, Stream, WireError  # noqa: E402
from tests.dp.synth import wire_streams  # noqa: E402

CHUNK = 20_000


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--streams", type=int, default=1_000_000)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    logging.getLogger("flowmap.agent").setLevel(logging.CRITICAL)  # gaps and set-apart edges are the point
    with tempfile.TemporaryDirectory() as tmp:
        agent = Agent(Settings(node="node-a", state_file=str(Path(tmp) / "state")), registry=CollectorRegistry())
        closed: Counter[str] = Counter()
        done = reports = frames_bytes = intact = 0
        cpu = 0.0
        started = time.monotonic()
        try:
            while done < args.streams:
                streams = wire_streams(min(CHUNK, args.streams - done), seed=args.seed * 1_000_003 + done)
                t = time.process_time()
                for chunks, expected in streams:
                    stream, parsed, reason = Stream(), 0, None
                    for chunk in chunks:
                        frames_bytes += len(chunk)
                        try:
                            got = stream.feed(chunk)
                        except WireError as exc:
                            reason = exc.reason
                            break
                        if stream.buffered > HEADER.size + MAX_FRAME + len(chunk):
                            print(f"UNBOUNDED: {stream.buffered} bytes held")
                            return 1
                        parsed += len(got)
                        agent.intake.record(admissible(got)[0])
                    if reason is not None:
                        closed[reason] += 1
                    if expected is not None:
                        intact += 1
                        if reason is not None or parsed != expected:
                            print(f"AN INTACT STREAM LOST ITS REPORTS: {parsed} of {expected}, {reason}")
                            return 1
                    reports += parsed
                cpu += time.process_time() - t
                done += len(streams)
                # What the agent holds is not under test here: keep its memory flat.
                agent.outbox.pending.clear()
                agent.outbox.names.clear()
                agent.outbox.dp_positions.clear()
                agent.intake.aggregator = Aggregator()
        except Exception as exc:  # the point of the exercise: report it, exit 1
            print(f"EXCEPTION ESCAPED after {done} streams: {exc!r}")
            raise
        finally:
            agent.intake.conntrack.shutdown()
    wall = time.monotonic() - started
    print(f"{done} streams ({intact} intact, {frames_bytes / 2**20:.0f} MiB) in {wall:.0f} s wall, "
          f"{cpu:.0f} CPU-s through the framing and the agent ({done / cpu:.0f} streams/CPU-s); "
          f"{reports} reports parsed and taken; connections closed by reason: {dict(sorted(closed.items()))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
