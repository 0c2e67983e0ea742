"""A dp for the agent's loop tests, in a process of its own as the dp runs: one interval's report
of N sessions a second through the real Exporter (parts as the dp cuts them), printing when each
was offered; at the end, what the exporter could not hand over.

    python -m tests.agent.dpfeed SOCKET SESSIONS REPORTS INTERVAL
"""

from __future__ import annotations

import sys
import time

from flowmap_dp import wire_pb2
from flowmap_dp.sending import Exporter
from flowmap_dp.reporting import iter_reports
from flowmap_dp.session import Health, Report, SessionDelta

CLIENTS = 1000  # distinct client addresses: a report's sessions make up to this many edges
BYTES = 100  # per session, each way


def interval(sessions: int, t: float) -> Report:
    deltas = [SessionDelta(l4="tcp", proto=6, vlan=0, client=bytes([10, 244, 1 + (i % CLIENTS) // 250, i % 250]),
                           client_port=1024 + i // CLIENTS, server=bytes([10, 96, 0, 10]), server_port=8080,
                           first_seen=t, last_seen=t, new=True, opened=True, closed=True, end_reason="fin",
                           state="closed", app="http", app_decided=True, packets_c2s=1, packets_s2c=1,
                           bytes_c2s=BYTES, bytes_s2c=BYTES)
              for i in range(sessions)]
    return Report(t, deltas, Health(0, 0, {}, {}, 0, 0, 0, 0, 0, 0))


def main() -> int:
    path, sessions, count, every = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
    rep = interval(sessions, time.time())
    reports = [list(iter_reports(rep, run_id=7, worker=0, workers=1, sequence=seq, start=rep.time - every,
                                 health=wire_pb2.Health(), part_size=20_000))
               for seq in range(1, count + 1)]
    exporter = Exporter(path).start()
    deadline = time.monotonic() + 10
    while not exporter.connects and time.monotonic() < deadline:
        time.sleep(0.01)
    print("ready", flush=True)
    start = time.monotonic()
    for seq, parts in enumerate(reports, 1):
        time.sleep(max(0.0, start + (seq - 1) * every - time.monotonic()))
        offered = time.time()
        for part in parts:
            exporter.offer(part)
        print("offered", seq, len(parts), offered, flush=True)
    exporter.stop(timeout=30)
    print("lost", exporter.lost_reports, exporter.lost_sessions, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
