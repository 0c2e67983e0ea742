"""What packet captures on demand cost the dp: prints numbers, asserts nothing.

The real ``flowmap dp run`` watches a veth while trafgen sends the IMIX-like mix of
``dp_lab.mixed_config`` (4,000 flows) at a fixed rate; this script plays the agent and asks for
0, 1 or 10 packet captures on that veth (``Control.packet_captures``, snap length 128, bounds
high enough not to stop them), with one of three filters:

* ``every packet``  — no filter: each capture writes every frame;
* ``UDP port 53``   — the mix's UDP half (its four UDP classes go to port 53);
* ``one flow``      — UDP port 20000: one of the 4,000 flows.

For each case: the dp's CPU % over the run (all its processes), the packets the captures wrote
(summed) and their kernel drops (their own rings), and the main rings' drops. The no-capture
row is the reference measured in the same run.

Usage: sudo .venv/bin/python benchmarks/dp_capture.py [--rate 50000] [--seconds 5]
"""

from __future__ import annotations

import argparse
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from dp_lab import Link, cpu_seconds, mixed_config, pump, require  # noqa: E402
from flowmap_agent.listening import ReportReader  # noqa: E402
from flowmap_dp import wire_pb2  # noqa: E402

FILTERS: dict[str, list[wire_pb2.PacketCaptureFilter]] = {
    "every packet": [],
    "UDP port 53": [wire_pb2.PacketCaptureFilter(protocol=17, port=53)],
    "one flow": [wire_pb2.PacketCaptureFilter(protocol=17, port=20000)],
}


def captures(n: int, filters: list[wire_pb2.PacketCaptureFilter], iface: str) -> list[wire_pb2.PacketCapture]:
    return [wire_pb2.PacketCapture(id=f"bench/capture-{i}/u{i}", targets=[wire_pb2.PacketCaptureTarget(
                name=iface, description="bench/load generator")], filters=filters, snap_length=128,
                max_bytes=100 << 20, max_packets=1_000_000, duration_seconds=600) for i in range(n)]


def last_health(reports: list[wire_pb2.Report]) -> dict[int, wire_pb2.Health]:
    out: dict[int, wire_pb2.Health] = {}
    for r in reports:
        if r.HasField("health"):
            out[r.worker] = r.health
    return out


def run_case(link: Link, rate: int, seconds: float, n: int, filters: list[wire_pb2.PacketCaptureFilter]
             ) -> tuple[float, int, int, int, int]:
    """(dp CPU %, packets handled, capture packets, capture drops, main ring drops)."""
    config = mixed_config(link.mac())
    flowmap = str(Path(sys.executable).with_name("flowmap"))
    with tempfile.TemporaryDirectory() as tmp:
        reader = ReportReader(f"{tmp}/agent.sock")
        reader.set_control(wire_pb2.Control(interfaces=[link.cap_if], packet_captures=captures(n, filters, link.cap_if)))
        dp = subprocess.Popen(["ip", "netns", "exec", link.cap, flowmap, "dp", "run", "--iface", link.cap_if,
                               "--socket", reader.path, "--interval", "1", "--direction", "both",
                               "--capture-dir", f"{tmp}/captures", "--capture-disk-bytes", str(4 << 30),
                               "--max-captures", "10"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 10
            while reader.connections < 1 and time.monotonic() < deadline:
                reader.poll(0.1)
            link.trafgen(config, 20_000)  # the flows once: their detection is done before the timed run
            warm = last_health(pump(reader, 2.5))
            before = sum(h.packets for h in warm.values())
            pids = [dp.pid] + [int(p) for p in subprocess.run(["pgrep", "-P", str(dp.pid)], capture_output=True,
                                                              text=True).stdout.split()]
            cpu0, w0 = sum(cpu_seconds(p) for p in pids), time.monotonic()
            link.trafgen(config, int(rate * seconds), rate=f"{rate}pps")
            time.sleep(0.5)
            cpu1, w1 = sum(cpu_seconds(p) for p in pids), time.monotonic()
            health = last_health(pump(reader, 2.5))
            dp.send_signal(signal.SIGTERM)
            dp.wait(30)
        finally:
            if dp.poll() is None:
                dp.kill()
            reader.close()
    handled = sum(h.packets for h in health.values()) - before
    statuses = [s for h in health.values() for s in h.packet_captures]
    return (100 * (cpu1 - cpu0) / (w1 - w0), handled, sum(s.packets for s in statuses),
            sum(s.drops for s in statuses), sum(h.kernel_drops for h in health.values()))


def main() -> None:
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the cleanup in finally blocks
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--rate", type=int, default=50_000, help="packets per second trafgen sends")
    ap.add_argument("--seconds", type=float, default=5.0)
    args = ap.parse_args()
    require()
    link = Link("p")
    try:
        print(f"flowmap dp run (1 worker) on a veth, trafgen {args.rate} pps for {args.seconds:.0f} s "
              "(IMIX-like, 4,000 flows); packet captures with snap length 128")
        print(f"{'captures':>8} {'filter':>13} {'dp CPU %':>9} {'handled':>9} {'captured':>9} {'cap drops':>10} "
              f"{'ring drops':>11}")
        cases = [(0, "every packet")] + [(n, f) for f in FILTERS for n in (1, 10)]
        for n, name in cases:
            cpu, handled, captured, cap_drops, drops = run_case(link, args.rate, args.seconds, n, FILTERS[name])
            print(f"{n:>8} {name if n else '-':>13} {cpu:>9.1f} {handled:>9} {captured:>9} {cap_drops:>10} {drops:>11}")
    finally:
        link.close()


if __name__ == "__main__":
    main()
