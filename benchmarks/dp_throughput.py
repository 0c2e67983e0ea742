"""dp capture throughput: prints numbers, asserts nothing.

(a) **drain** — trafgen fills a TPACKET_V3 ring on a veth while the reader is paused (mixed
64-1500-byte UDP/TCP frames over thousands of flows), then the reader drains it. Packets per
CPU-second and per packet (ns) for the dp's two block readers — compiled (the Rust walk and
table) and per-packet (the Python reference) — each into its session table with the real
detectors, the first round all new flows, the second the same flows again (steady); in the same
run, a reference C reader compiled here that walks the blocks and keeps no table. Then the
same with PACKET_FANOUT over 2 processes. The detection's cost per new session is the new-flow
round's CPU minus the steady round's, over the sessions made.

(c) **SYN flood** — 1,000,000 SYNs of distinct 5-tuples drained into a table bounded at 200,000,
against the C reader.

(b) **live** — ``flowmap dp run`` watches the veth while trafgen sends as fast as it can (and at
a few fixed rates): packets handled per second, kernel drops, dp CPU %.

Usage: sudo .venv/bin/python benchmarks/dp_throughput.py [--packets N] [--synflood N] [--live-seconds S]
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import re
import signal
import struct
import subprocess
import sys
import tempfile
import time
from multiprocessing.connection import Connection
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from dp_lab import Link, build_c_reader, cpu_seconds, mixed_config, netns, pump, require, syn_config  # noqa: E402
from flowmap_agent.listening import ReportReader  # noqa: E402
from flowmap_dp import wire_pb2  # noqa: E402
from flowmap_dp.capture import Direction, Ring, RingConfig, fanout_group  # noqa: E402
from flowmap_dp.compiled import CompiledTable  # noqa: E402
from flowmap_dp.running import BlockParser, LiveTable, make_table  # noqa: E402

BLOCK, BLOCKS, SNAP = 1 << 22, 160, 256  # 640 MiB: room for 1,500,000 frames of the mix
RING = RingConfig(block_size=BLOCK, block_count=BLOCKS, snaplen=SNAP, direction=Direction.BOTH)
_NUM = struct.Struct("=I")


def drain_ring(ring: Ring, table: LiveTable, parse: BlockParser) -> tuple[int, float, float, int]:
    """Drain every ready block through the dp's block reader: (packets, cpu s, wall s, sessions)."""
    n = 0
    c0, w0 = time.process_time(), time.perf_counter()
    for block in ring.blocks():
        n += _NUM.unpack_from(block, 12)[0]
        parse(block)
    return n, time.process_time() - c0, time.perf_counter() - w0, table.health().sessions


def _dp_child(cap_ns: str, group: int | None, parser: str, rounds: int, conn: Connection,
              max_sessions: int = 1_000_000) -> None:
    with netns(cap_ns):
        ring = Ring("c0", RING, fanout=group)
    if parser == "compiled, no detection":  # nothing handed to the detectors: the table's own cost
        compiled = CompiledTable(max_sessions=max_sessions, feed_limit=0)
        table, parse = compiled, compiled.feed_block
    else:
        table, parse = make_table(parser, max_sessions)  # kept across rounds: round 2 is the steady state
    conn.send("ready")
    for _ in range(rounds):
        conn.recv()
        conn.send(drain_ring(ring, table, parse))
    ring.close()


def dp_drain(link: Link, config: str, packets: int, parser: str, procs: int, rounds: int = 2,
             max_sessions: int = 1_000_000) -> list[tuple[int, float, float, int]]:
    """Fill ``procs`` fanout rings, drain them in parallel, ``rounds`` times (new flows, then the
    same flows again): per round (packets, summed cpu, max wall, sessions in the tables)."""
    ctx = multiprocessing.get_context("fork")
    group = fanout_group(os.getpid(), 7) if procs > 1 else None
    pipes, children = [], []
    for _ in range(procs):
        parent, child = ctx.Pipe()
        p = ctx.Process(target=_dp_child, args=(link.cap, group, parser, rounds, child, max_sessions))
        p.start()
        pipes.append(parent)
        children.append(p)
    for c in pipes:
        c.recv()
    out = []
    for _ in range(rounds):
        fill(link, config, packets)
        for c in pipes:
            c.send("go")
        results = [c.recv() for c in pipes]
        out.append((sum(r[0] for r in results), sum(r[1] for r in results), max(r[2] for r in results),
                    sum(r[3] for r in results)))
    for p in children:
        p.join()
    return out


def c_drain(link: Link, exe: Path, config: str, packets: int, procs: int) -> tuple[int, float, float]:
    """The same with the reference C reader."""
    group = (os.getpid() + 11) & 0xFFFF if procs > 1 else 0
    readers = [subprocess.Popen(["ip", "netns", "exec", link.cap, str(exe), "c0", str(BLOCK), str(BLOCKS), str(SNAP),
                                 str(group)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
               for _ in range(procs)]
    for r in readers:
        assert r.stdout is not None and r.stdout.readline().strip() == "ready"
    fill(link, config, packets)
    for r in readers:
        assert r.stdin is not None
        r.stdin.write("\n")
        r.stdin.flush()
    out = []
    for r in readers:
        assert r.stdout is not None
        pk, _b, cpu, wall, _h = r.stdout.readline().split()
        out.append((int(pk), float(cpu), float(wall)))
        r.wait()
    return sum(o[0] for o in out), sum(o[1] for o in out), max(o[2] for o in out)


def fill(link: Link, config: str, packets: int) -> None:
    """Send ``packets`` frames with trafgen, then wait for the last block's retire timer."""
    done = link.trafgen(config, packets, cpus=1)
    if done.returncode:
        raise RuntimeError(done.stderr)
    time.sleep(0.3)


def drain(link: Link, exe: Path, packets: int) -> None:
    """Part (a)."""
    config = mixed_config(link.mac())
    print(f"\n(a) drain: {packets} frames, sizes 64..1500 (IMIX-like), 4000 flows, ring {BLOCKS} x {BLOCK >> 20} MiB, "
          f"snaplen {SNAP}")
    print(HEADER)
    rows: dict[tuple[str, int], tuple[int, float, float]] = {}
    sessions = 0
    for name, procs in (("C reference", 1), ("dp compiled", 1), ("dp compiled, no detection", 1), ("dp per-packet", 1),
                        ("C reference", 2), ("dp compiled", 2)):
        # A drain takes tens of milliseconds of CPU, so one run says little: the median of
        # REPEATS runs (the Python reference, a hundred times slower, runs once).
        repeats = 1 if name == "dp per-packet" else REPEATS
        if name.startswith("C"):
            results = {name: median([c_drain(link, exe, config, packets, procs) for _ in range(repeats)])}
        else:
            kind = name.removeprefix("dp ")
            cold = [dp_drain(link, config, packets, kind, procs, rounds=1)[0] for _ in range(repeats)]
            warm = dp_drain(link, config, packets, kind, procs, rounds=1 + repeats)[1:]
            sessions = cold[0][3]
            results = {f"{name}, new flows": median([c[:3] for c in cold]),
                       f"{name}, steady": median([w[:3] for w in warm])}
        for label, r in results.items():
            rows[(label, procs)] = r
            row(label, procs, r)
    per_cpu = {k: v[0] / v[1] for k, v in rows.items()}
    c_ref = per_cpu[("C reference", 1)]
    for label in ("dp compiled, steady", "dp compiled, new flows", "dp compiled, no detection, new flows",
                  "dp per-packet, steady", "dp per-packet, new flows"):
        print(f"ratio {label} / C reader (per CPU-second): {per_cpu[(label, 1)] / c_ref:.4f}")
    new = rows[("dp compiled, new flows", 1)]
    bare = rows[("dp compiled, no detection, new flows", 1)]
    print(f"detection (Python) per new session: {(new[1] - bare[1]) / sessions * 1e6:.1f} us ({sessions} sessions: "
          "the new-flow round's CPU with detection minus without, over the sessions made)")
    print(f"compiled / per-packet, steady: "
          f"{per_cpu[('dp compiled, steady', 1)] / per_cpu[('dp per-packet, steady', 1)]:.2f}x")
    for label in ("dp compiled, steady", "C reference"):
        one, two = rows[(label, 1)], rows[(label, 2)]
        print(f"fanout scaling, {label}, 2 processes vs 1 (wall-clock pps): {(two[0] / two[2]) / (one[0] / one[2]):.2f}x"
              f"  (pps per CPU-second, 2 vs 1: {per_cpu[(label, 2)] / per_cpu[(label, 1)]:.2f}x)")


REPEATS = 5


def median(runs: list[tuple[int, float, float]]) -> tuple[int, float, float]:
    """The run of median CPU time per packet."""
    return sorted(runs, key=lambda r: r[1] / r[0])[len(runs) // 2]


HEADER = (f"{'reader':36} {'procs':>5} {'packets':>9} {'cpu s':>7} {'wall s':>7} {'Mpps/cpu-s':>11} "
          f"{'Mpps wall':>10} {'ns/packet':>10}")


def row(label: str, procs: int, r: tuple[int, float, float]) -> None:
    pk, cpu, wall = r
    print(f"{label:36} {procs:>5} {pk:>9} {cpu:>7.3f} {wall:>7.3f} {pk / cpu / 1e6:>11.2f} {pk / wall / 1e6:>10.2f} "
          f"{cpu / pk * 1e9:>10.1f}")


def synflood(link: Link, exe: Path, packets: int, bound: int = 200_000) -> None:
    """Part (c): SYNs of ``packets`` distinct 5-tuples through a table bounded at ``bound``."""
    config = syn_config(link.mac())
    print(f"\n(c) SYN flood drain: {packets} SYNs, every one a new 5-tuple, table bound {bound}")
    print(HEADER)
    c = median([c_drain(link, exe, config, packets, 1) for _ in range(REPEATS)])
    row("C reference", 1, c)
    floods = [dp_drain(link, config, packets, "compiled", 1, rounds=1, max_sessions=bound)[0] for _ in range(REPEATS)]
    d = median([f[:3] for f in floods])
    row("dp compiled, SYN flood", 1, d)
    print(f"(each row the median of {REPEATS} runs)")
    print(f"sessions in the table after each flood: {sorted({f[3] for f in floods})} (bound {bound}); "
          f"ratio to the C reader (per CPU-second): {(d[0] / d[1]) / (c[0] / c[1]):.4f}")


WARM_UP = 200_000  # packets: 50 of each of the 4,000 flows


def live(link: Link, seconds: float, workers: int, interval: float) -> None:
    """Part (b): the real ``flowmap dp run`` under trafgen at full speed and at fixed rates."""
    config = mixed_config(link.mac())
    flowmap = str(Path(sys.executable).with_name("flowmap"))
    print(f"\n(b) live: flowmap dp run --workers {workers} --interval {interval} on the veth, trafgen for "
          f"{seconds:.0f} s per rate")
    print(f"(after {WARM_UP} packets of the same flows: detection done)")
    print(f"{'rate':>10} {'sent':>9} {'sent pps':>9} {'handled':>9} {'pps':>9} {'drops':>8} {'dp CPU %':>9}"
          "   (pps over trafgen's run; CPU % of all dp processes over the run + 0.5 s)")
    for rate in (None, 400_000, 250_000, 100_000, 50_000):
        with tempfile.TemporaryDirectory() as tmp:
            reader = ReportReader(f"{tmp}/agent.sock")
            dp = subprocess.Popen(["ip", "netns", "exec", link.cap, flowmap, "dp", "run", "--iface", "c0", "--socket",
                                   reader.path, "--interval", str(interval), "--direction", "both", "--workers", str(workers),
                                   "--block-size", str(1 << 21), "--block-count", "32"],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            try:
                deadline = time.monotonic() + 10
                while reader.connections < workers and time.monotonic() < deadline:
                    reader.poll(0.1)
                # The flows once first, so their detection is done (it costs once per session:
                # part (a) prints it) and what follows is the steady cost of each rate.
                link.trafgen(config, WARM_UP)
                warm = pump(reader, 1.5)
                before = {r.worker: r.health.packets for r in warm if r.HasField("health")}
                reports: list[wire_pb2.Report] = []
                pids = [dp.pid] + [int(p) for p in subprocess.run(["pgrep", "-P", str(dp.pid)], capture_output=True,
                                                                  text=True).stdout.split()]
                cpu0, w0 = sum(cpu_seconds(p) for p in pids), time.monotonic()
                # A packet count, never a kill: max speed sends 2 M, a fixed rate `seconds` worth.
                count = int(rate * seconds) if rate else 2_000_000
                t_gen = time.monotonic()
                done = link.trafgen(config, count, rate=f"{rate}pps" if rate else None)
                gen_s = time.monotonic() - t_gen
                time.sleep(0.5)
                cpu1, w1 = sum(cpu_seconds(p) for p in pids), time.monotonic()
                reports += pump(reader, 0.7)
                dp.send_signal(signal.SIGTERM)
                while dp.poll() is None:
                    reports += reader.poll(0.1)
                reports += pump(reader, 0.3)
            finally:
                if dp.poll() is None:
                    dp.kill()
                reader.close()
        last = {}
        for r in reports:
            if r.HasField("health"):
                last[r.worker] = r.health
        handled = sum(h.packets for h in last.values()) - sum(before.values())
        drops = sum(h.kernel_drops for h in last.values())
        m = re.search(r"(\d+) packets outgoing", done.stdout + done.stderr)
        sent = int(m.group(1)) if m else 0
        print(f"{rate or 'max':>10} {sent:>9} {sent / gen_s:>9.0f} {handled:>9} {handled / gen_s:>9.0f} "
              f"{drops:>8} {100 * (cpu1 - cpu0) / (w1 - w0):>9.1f}")


def main() -> None:
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the cleanup in finally blocks
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--packets", type=int, default=1_500_000)
    ap.add_argument("--synflood", type=int, default=1_000_000)
    ap.add_argument("--live-seconds", type=float, default=5.0)
    ap.add_argument("--interval", type=float, default=1.0, help="the dp's report interval (the agent's default: 1 s)")
    ap.add_argument("--skip-live", action="store_true")
    ap.add_argument("--skip-drain", action="store_true")
    args = ap.parse_args()
    require()
    link = Link("t")
    try:
        with tempfile.TemporaryDirectory() as tmp:
            exe = build_c_reader(Path(tmp))
            print(f"machine: {os.cpu_count()} CPUs, kernel {os.uname().release}")
            if not args.skip_drain:
                drain(link, exe, args.packets)
                synflood(link, exe, args.synflood)
        if not args.skip_live:
            for workers in (1, 2):
                live(link, args.live_seconds, workers, args.interval)
    finally:
        link.close()


if __name__ == "__main__":
    main()
