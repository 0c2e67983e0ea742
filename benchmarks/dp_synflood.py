"""SYN flood and table memory: prints numbers, asserts nothing.

1. **flood** — trafgen sends 1,000,000 TCP SYNs with distinct 5-tuples from a namespace into the
   veth ``flowmap dp run`` watches (table bound 200,000). Printed: what was sent, what the dp
   took from its ring, kernel drops, the largest table size reported (must not pass the bound),
   evictions, and the dp's RSS over time (total, and anonymous memory, i.e. without the packet
   ring's mapped pages), and whether the dp exited cleanly on SIGTERM.
2. **100k sessions** — 100,000 distinct SYNs at a rate the dp keeps up with, table bound above
   that: RSS once the table holds them, against the RSS of the idle dp.

Usage: sudo .venv/bin/python benchmarks/dp_synflood.py [--flood N] [--live N]
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from dp_lab import Link, require, syn_config  # noqa: E402
from flowmap_agent.listening import ReportReader  # noqa: E402
from flowmap_dp import wire_pb2  # noqa: E402


def memory(pid: int) -> dict[str, float]:
    """VmRSS, VmHWM, RssAnon of a process, MB."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        k, _, v = line.partition(":")
        if k in ("VmRSS", "VmHWM", "RssAnon", "RssFile", "RssShmem"):
            out[k] = int(v.split()[0]) / 1024
    return out


def run_case(link: Link, *, packets: int, max_sessions: int, rate: str | None, ring: tuple[int, int],
             settle: float, label: str) -> None:
    """Start the dp, send ``packets`` SYNs, follow its health and memory until it has read them."""
    flowmap = str(Path(sys.executable).with_name("flowmap"))
    with tempfile.TemporaryDirectory() as tmp:
        reader = ReportReader(f"{tmp}/agent.sock")
        dp = subprocess.Popen(["ip", "netns", "exec", link.cap, flowmap, "dp", "run", "--iface", "c0", "--socket",
                               reader.path, "--interval", "0.5", "--direction", "both", "--max-sessions",
                               str(max_sessions), "--snaplen", "128", "--block-size", str(ring[0]), "--block-count",
                               str(ring[1])], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        health: wire_pb2.Health | None = None
        max_table = 0
        samples: list[tuple[float, dict[str, float], int, int]] = []

        def pump(seconds: float) -> None:
            nonlocal health, max_table
            deadline = time.monotonic() + seconds
            batch = []
            while (left := deadline - time.monotonic()) > 0:
                batch += reader.poll(left)
            for r in batch:
                if r.HasField("health"):
                    health = r.health
                    max_table = max(max_table, r.health.table_size)

        try:
            deadline = time.monotonic() + 10
            while reader.connections < 1 and time.monotonic() < deadline:
                reader.poll(0.1)
            pump(1.2)
            idle = memory(dp.pid)
            t0 = time.monotonic()
            args = ["ip", "netns", "exec", link.gen, "trafgen", "-q", "-o", link.gen_if, "-i", "-", "--cpus", "1",
                    "-n", str(packets), "--no-sock-mem"] + (["-b", rate] if rate else [])
            gen = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                   text=True, start_new_session=True)  # killpg below: trafgen forks
            assert gen.stdin is not None
            gen.stdin.write(syn_config(link.mac()))
            gen.stdin.close()
            last_packets, progress_at = -1, time.monotonic()
            while time.monotonic() - t0 < 600:
                pump(0.5)
                if health is None:
                    continue
                samples.append((time.monotonic() - t0, memory(dp.pid), health.table_size, health.packets))
                if health.packets != last_packets:
                    last_packets, progress_at = health.packets, time.monotonic()
                if gen.poll() is not None and (health.packets + health.kernel_drops >= packets
                                               or time.monotonic() - progress_at > 15):
                    break
            pump(settle)
            final_mem = memory(dp.pid)
            gen_out = gen.stdout.read() if gen.stdout else ""
            gen.wait()
            t_stop = time.monotonic()
            dp.send_signal(signal.SIGTERM)
            while dp.poll() is None and time.monotonic() - t_stop < 180:
                pump(0.2)  # keep reading: the final report closes every session in the table
            code = dp.poll()
            shutdown = time.monotonic() - t_stop
        finally:
            if dp.poll() is None:
                dp.kill()
            if "gen" in locals() and gen.poll() is None:
                os.killpg(gen.pid, signal.SIGKILL)
            reader.close()
    h = health or wire_pb2.Health()
    sent = next((int(w) for line in gen_out.splitlines() if "packets outgoing" in line for w in line.split()[:1]), 0)
    print(f"\n== {label}")
    print(f"sent {sent} SYNs; dp read {h.packets} frames, kernel saw {h.kernel_packets}, drops {h.kernel_drops}")
    print(f"table bound {max_sessions}: largest reported size {max_table}; now {h.table_size}; created "
          f"{h.sessions_created}; evictions {h.evictions}; expired {h.sessions_expired}; lost reports "
          f"{h.lost_reports}")
    print(f"RSS idle {idle['VmRSS']:.1f} MB (anon {idle['RssAnon']:.1f}); at the end {final_mem['VmRSS']:.1f} MB "
          f"(anon {final_mem['RssAnon']:.1f}, ring+files {final_mem['RssFile'] + final_mem['RssShmem']:.1f}); "
          f"peak (VmHWM) {final_mem['VmHWM']:.1f} MB")
    print("time s   VmRSS MB  anon MB  table   frames read")
    step = max(1, len(samples) // 12)
    for t, mem, size, pk in samples[::step]:
        print(f"{t:6.1f} {mem['VmRSS']:9.1f} {mem['RssAnon']:8.1f} {size:7} {pk:12}")
    print(f"dp exit code after SIGTERM: {code} (shutdown took {shutdown:.1f} s)" + (f"; stderr: {dp.stderr.read()[-500:]}" if code and dp.stderr else ""))


def main() -> None:
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the cleanup in finally blocks
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--flood", type=int, default=1_000_000)
    ap.add_argument("--live", type=int, default=100_000)
    ap.add_argument("--live-rate", default="20000pps", help="trafgen rate for the 100k-session case")
    args = ap.parse_args()
    require()
    link = Link("s")
    try:
        run_case(link, packets=args.flood, max_sessions=200_000, rate=None, ring=(1 << 22, 64), settle=1.0,
                 label=f"SYN flood: {args.flood} distinct 5-tuples at full speed, 256 MiB ring")
        run_case(link, packets=args.live, max_sessions=args.live * 2, rate=args.live_rate, ring=(1 << 20, 16),
                 settle=1.0, label=f"{args.live} live sessions (default 16 MiB ring)")
    finally:
        link.close()


if __name__ == "__main__":
    main()
