"""RSS of the datapath with 100,000 live sessions (target: at most 100 MB in total).

Creates ``--sessions`` distinct sessions (HTTP over TCP and DNS over UDP, IPv4 and IPv6, all
through the real ``Inspector``), then prints the process RSS, the growth and bytes per session.
By default every exchange completes, so detection settles and the Inspector is dropped (the
steady state of long-lived sessions); ``--undecided`` stops before that (the worst case: every
session still holds its Inspector and the payloads it buffered). Run once per mode: RSS does not
shrink back within a process.

    .venv/bin/python benchmarks/dp_memory.py [--sessions 100000] [--undecided]
    .venv/bin/python benchmarks/dp_memory.py --syn-flood 1000000 [--sessions 100000]
"""

from __future__ import annotations

import argparse
import gc
import os

from flowmap_dp.decode import Decoded, decode
from flowmap_dp.session import SessionTable
from flowmap_dp.synth import ether, ipv4, ipv6, tcp, udp


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


def measure(count: int, complete: bool) -> None:
    table = SessionTable(max_sessions=count)
    gc.collect()
    before = rss_mb()
    for i in range(count):
        for raw in frames(i, complete):
            d = decode(raw, 0, len(raw))
            table.stats.count(d)
            if isinstance(d, Decoded):
                table.packet(d, i * 1e-4, raw)  # 100k sessions in 10 s: none idles out
        if i % 10_000 == 9_999:
            table.collect(i * 1e-4)  # the export drains deltas each interval, as live
    table.collect(count * 1e-4)
    gc.collect()
    after = rss_mb()
    apps: dict[str, int] = {}
    deciding = 0
    for s in table.sessions.values():
        apps[s.app] = apps.get(s.app, 0) + 1
        deciding += s.insp is not False and s.insp is not None
    state = "detection settled" if complete else "still inspecting"
    print(f"{state}: {len(table)} live sessions, {deciding} with an Inspector attached, apps {apps}")
    print(f"  RSS {after:.1f} MB total, {after - before:.1f} MB for the sessions, "
          f"{(after - before) * 1e6 / max(len(table), 1):.0f} bytes per session")
    table.sessions.clear()


def syn_flood(count: int, bound: int) -> None:
    """``count`` SYNs from distinct 5-tuples, in TPACKET_V3 blocks through the per-block reader,
    a report collected every 100,000 packets (a 1 s interval at that rate)."""
    from flowmap_dp.block import pack_block
    from flowmap_dp.vectorised import feed_block_vectorised

    table = SessionTable(max_sessions=bound)
    gc.collect()
    before = rss_mb()
    peak = before
    sent = 0
    while sent < count:
        n = min(100_000, count - sent)
        frames = [(ether(ipv4(bytes([10, 9]) + ((sent + i) // 60000).to_bytes(2, "big"), bytes([10, 255, 0, 1]), 6,
                                 tcp(1024 + (sent + i) % 60000, 80, 0x02))), (sent + i) * 1e-5, None)
                  for i in range(n)]
        while frames:
            block, k = pack_block(frames, 1 << 20)
            feed_block_vectorised(block, table)
            frames = frames[k:]
        sent += n
        report = table.collect(sent * 1e-5)
        peak = max(peak, rss_mb())
    h = report.health
    print(f"SYN flood: {sent} SYNs, table {h.sessions} (bound {bound}), created {h.created}, evicted {h.evicted},"
          f" unreported {h.unreported}")
    print(f"  RSS {peak:.1f} MB peak, {peak - before:.1f} MB above the start")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sessions", type=int, default=100_000)
    ap.add_argument("--undecided", action="store_true",
                    help="stop each exchange before detection settles (Inspector still attached)")
    ap.add_argument("--syn-flood", type=int, default=0, metavar="N",
                    help="instead: N SYNs from distinct 5-tuples against a table bounded at --sessions")
    args = ap.parse_args()
    if args.syn_flood:
        syn_flood(args.syn_flood, args.sessions)
        return
    import flowmap_dp.detection  # noqa: F401  (its registry counts in the baseline, not per session)

    measure(args.sessions, complete=not args.undecided)


if __name__ == "__main__":
    main()
