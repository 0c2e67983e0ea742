"""RSS of the datapath with 100,000 live sessions (target: at most 64 MB per 100,000, rings aside).

Creates ``--sessions`` distinct sessions (HTTP over TCP and DNS over UDP, IPv4 and IPv6, all
through the real ``Inspector``), in TPACKET_V3 blocks through the chosen table (``--table
compiled``, the default and what ``flowmap dp run`` uses, or ``per-packet``, the Python
reference), then prints the process RSS, the growth and bytes per session.
By default every exchange completes, so detection settles and the Inspector is dropped (the
steady state of long-lived sessions); ``--undecided`` stops before that (the worst case: every
session still holds its Inspector and the payloads it buffered). Run once per mode: RSS does not
shrink back within a process.

    .venv/bin/python benchmarks/dp_memory.py [--table compiled|per-packet] [--sessions 100000] [--undecided]
    .venv/bin/python benchmarks/dp_memory.py --syn-flood 1000000 [--sessions 100000] [--table ...]
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from flowmap_dp.running import LiveTable, make_table  # noqa: E402
from tests.dp.synth import Frame, ether, ipv4, ipv6, pack_block, tcp, udp  # noqa: E402


def rss_mb() -> float:
    with open(f"/proc/{os.getpid()}/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1e6


def _dns(i: int, answer: bool) -> bytes:
    head = (i & 0xFFFF).to_bytes(2, "big") + (b"\x81\x80\x00\x01\x00\x01" if answer else b"\x01\x00\x00\x01\x00\x00")
    question = b"\x00\x00\x00\x00\x03api\x03svc\x00\x00\x01\x00\x01"
    rr = b"\xc0\x0c\x00\x01\x00\x01\x00\x00\x00\x3c\x00\x04\x0a\x00\x00\x01" if answer else b""
    return head + question + rr


def frames(i: int, complete: bool) -> list[bytes]:
    """A short exchange for session ``i``: a TCP handshake and HTTP request (and response when
    ``complete``), or a DNS query (and answer)."""
    v6 = i % 4 == 0
    c = (b"\xfd" + bytes(11) + i.to_bytes(4, "big")) if v6 else bytes([10]) + i.to_bytes(3, "big")
    s = (b"\xfd" + bytes(14) + b"\x01") if v6 else bytes([10, 255, 0, 1])
    ip = ipv6 if v6 else ipv4
    port = 20000 + i % 40000
    if i % 3:
        out = [ether(ip(c, s, 6, tcp(port, 80, 0x02))), ether(ip(s, c, 6, tcp(80, port, 0x12))),
               ether(ip(c, s, 6, tcp(port, 80, 0x18, b"GET /x HTTP/1.1\r\nHost: svc\r\n\r\n")))]
        if complete:
            out.append(ether(ip(s, c, 6, tcp(80, port, 0x18, b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"))))
        return out
    out = [ether(ip(c, s, 17, udp(port, 53, _dns(i, False))))]
    if complete:
        out.append(ether(ip(s, c, 17, udp(53, port, _dns(i, True)))))
    return out


def blocks_of(frames: list[Frame]) -> list[bytes]:
    out = []
    while frames:
        block, k = pack_block(frames, 1 << 20)
        out.append(block)
        frames = frames[k:]
    return out


def measure(kind: str, count: int, complete: bool) -> None:
    """The blocks are made first: only what the table keeps counts."""
    rounds = []
    for start in range(0, count, 10_000):  # the export drains deltas each 10,000 sessions, as live
        stop = min(count, start + 10_000)
        rounds.append((blocks_of([(raw, i * 1e-4, None) for i in range(start, stop) for raw in frames(i, complete)]),
                       stop * 1e-4))  # 100k sessions in 10 s: none idles out
    gc.collect()
    before = rss_mb()
    table, parse = make_table(kind, count)
    live = 0
    for blocks, now in rounds:
        for block in blocks:
            parse(block)
        # The live dp turns each report into wire messages and lets it go: it is not kept while
        # the next interval's packets arrive (nor is the last one: what the table keeps counts).
        live = table.collect(now).health.sessions
    gc.collect()
    after = rss_mb()
    state = "detection settled" if complete else "still inspecting"
    print(f"{kind} table, {state}: {live} live sessions")
    print(f"  RSS {after:.1f} MB total, {after - before:.1f} MB for the sessions, "
          f"{(after - before) * 1e6 / max(live, 1):.0f} bytes per session")


def syn_flood(kind: str, count: int, bound: int) -> None:
    """``count`` SYNs from distinct 5-tuples, in TPACKET_V3 blocks through the table's reader,
    a report collected every 100,000 packets (a 1 s interval at that rate). The blocks are made
    first: only what the table keeps counts."""
    rounds = []
    for sent in range(0, count, 100_000):
        n = min(100_000, count - sent)
        rounds.append((blocks_of([(ether(ipv4(bytes([10, 9]) + ((sent + i) // 60000).to_bytes(2, "big"),
                                                bytes([10, 255, 0, 1]), 6, tcp(1024 + (sent + i) % 60000, 80, 0x02))),
                                    (sent + i) * 1e-5, None) for i in range(n)]), (sent + n) * 1e-5))
    gc.collect()
    before = peak = rss_mb()
    table: LiveTable
    table, parse = make_table(kind, bound)
    for blocks, now in rounds:
        for block in blocks:
            parse(block)
        report = table.collect(now)
        peak = max(peak, rss_mb())
    h = report.health
    del report
    gc.collect()
    kept = rss_mb()
    print(f"{kind} table, SYN flood: {h.created} SYNs, table {h.sessions} (bound {bound}), created {h.created}, "
          f"evicted {h.evicted}, unreported {h.unreported}")
    print(f"  RSS {peak:.1f} MB peak (with an interval's report), {peak - before:.1f} MB above the start; "
          f"without the report {kept - before:.1f} MB, {(kept - before) * 1e6 / max(h.sessions, 1):.0f} bytes per "
          "live session")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--table", choices=("compiled", "per-packet"), default="compiled")
    ap.add_argument("--sessions", type=int, default=100_000)
    ap.add_argument("--undecided", action="store_true",
                    help="stop each exchange before detection settles (Inspector still attached)")
    ap.add_argument("--syn-flood", type=int, default=0, metavar="N",
                    help="instead: N SYNs from distinct 5-tuples against a table bounded at --sessions")
    args = ap.parse_args()
    if args.syn_flood:
        syn_flood(args.table, args.syn_flood, args.sessions)
        return
    import flowmap_dp.detection  # noqa: F401  (its registry counts in the baseline, not per session)

    measure(args.table, args.sessions, complete=not args.undecided)


if __name__ == "__main__":
    main()
