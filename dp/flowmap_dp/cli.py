"""``flowmap dp ...`` subcommands. Each subcommand registers itself in its own function, so
adding one (``run``) is one more ``_register_*`` call in ``register``."""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any


def register(parser: argparse.ArgumentParser) -> None:
    """Add the ``dp`` subcommands to ``parser`` (the ``flowmap dp`` parser)."""
    sub = parser.add_subparsers(dest="dp_command", required=True, metavar="SUBCOMMAND")
    _register_classify(sub)
    _register_run(sub)


def _register_classify(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("classify", help="classify the flows of a pcap/pcapng file",
                       description="Run the datapath's decode, session and detection code over a capture file.")
    p.add_argument("--pcap", required=True, metavar="FILE", help="pcap or pcapng file")
    p.add_argument("--json", action="store_true", help="one JSON object per flow and line")
    p.set_defaults(func=_classify)


def _classify(args: argparse.Namespace) -> int:
    from flowmap_dp.classify import classify_file
    from flowmap_dp.errors import CaptureFormatError

    try:
        flows = classify_file(args.pcap)
    except (OSError, CaptureFormatError) as e:
        print(f"flowmap dp classify: {e}", file=sys.stderr)
        return 2
    try:
        _print(flows, args.json)
    except BrokenPipeError:  # `| head` closed the pipe: not an error of ours
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
    return 0


def _print(flows: list[dict[str, Any]], as_json: bool) -> None:
    out = sys.stdout
    if as_json:
        for f in flows:
            out.write(json.dumps(f, default=str) + "\n")
        return
    rows = [("L4", "CLIENT", "SERVER", "APP", "PKTS C>S", "BYTES C>S", "PKTS S>C", "BYTES S>C")]
    for f in flows:
        server = f["server"] + (f" vlan {f['vlan']}" if "vlan" in f else "")
        rows.append((f["l4"], f["client"], server, f["app"], str(f["packets_c2s"]), str(f["bytes_c2s"]),
                     str(f["packets_s2c"]), str(f["bytes_s2c"])))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        out.write("  ".join(c.ljust(w) if i < 4 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))).rstrip() + "\n")
    for f in flows:
        for t in f["threats"]:
            out.write(f"threat {t['name']} in {f['client']} -> {f['server']} ({t['where']}): {t['snippet']}\n")


RUN_DESCRIPTION = ("Capture on AF_PACKET TPACKET_V3 rings and send the agent, each interval, "
                   "the session deltas and the dp's health over a unix socket (the agent listens).")


def _register_run(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("run", help="capture live traffic and stream per-interval deltas to the agent",
                       description=RUN_DESCRIPTION)
    add_run_arguments(p)
    p.set_defaults(func=run_command)


def add_run_arguments(p: argparse.ArgumentParser) -> None:
    """The arguments of ``flowmap dp run`` (and of ``python -m flowmap_dp``, the same command); their
    defaults are the settings' (flowmap_dp.settings) and the ring's (flowmap_dp.capture.RingConfig)."""
    # Imported here, when a dp parser is built, not when `flowmap` starts (flowmap_cli.main).
    from flowmap_dp.capture import Direction, RingConfig
    from flowmap_dp.settings import PARSERS, Settings

    p.add_argument("--iface", action="append", default=[], metavar="IF",
                   help="interface to capture (repeat; the agent can change the set at run time)")
    p.add_argument("--socket", required=True, metavar="PATH", help="the agent's unix socket to connect to")
    p.add_argument("--interval", type=float, default=Settings.interval,
                   help="report interval in seconds (default %(default)s)")
    p.add_argument("--workers", type=int, default=Settings.workers,
                   help="packet loops, one process each, PACKET_FANOUT hash")
    p.add_argument("--filter", default=None, metavar="EXPR", help="pcap filter expression (needs tcpdump to compile)")
    p.add_argument("--direction", choices=[d.value for d in Direction], default=RingConfig.direction.value,
                   help="received: count each frame where it enters the node (default); both: every frame")
    p.add_argument("--local-address", action="append", default=[], metavar="ADDR[,ADDR]",
                   help="the node's own addresses (repeat, or comma-separated as the downward API's "
                        "status.hostIPs gives them): in received mode, frames the node sends from them are counted too; "
                        "the agent adds the addresses it reads at run time")
    p.add_argument("--snaplen", type=int, default=RingConfig.snaplen,
                   help="bytes copied per packet (default %(default)s)")
    p.add_argument("--block-size", type=int, default=RingConfig.block_size,
                   help="ring block size in bytes (page multiple)")
    p.add_argument("--block-count", type=int, default=RingConfig.block_count,
                   help="ring blocks per interface and worker")
    p.add_argument("--retire-ms", type=int, default=RingConfig.retire_timeout_ms,
                   help="hand over a partly filled block after this long")
    p.add_argument("--max-sessions", type=int, default=Settings.max_sessions, help="session table bound per worker")
    p.add_argument("--queue", type=int, default=Settings.queue_size,
                   help="reports waiting for the agent (while it restarts, say) before they are dropped")
    p.add_argument("--parser", choices=PARSERS, default=Settings.parser,
                   help="block reader and session table: compiled (default) or the Python reference")
    p.add_argument("--capture-dir", default=Settings.capture_dir, metavar="DIR",
                   help="packet captures on demand: where their pcapng files go (default %(default)s)")
    p.add_argument("--capture-disk-bytes", type=int, default=Settings.capture_disk_bytes, metavar="BYTES",
                   help="the bytes all packet capture files may hold on this node (default %(default)s)")
    p.add_argument("--threats-off", action="append", default=[], metavar="NAME[,NAME]",
                   help="threat detections to switch off (flowmap_api.threats names)")
    p.add_argument("--threat-limit", action="append", default=[], metavar="NAME.KEY=VALUE",
                   help="a threat detection's threshold (see its module's docstring for the keys and defaults)")
    p.add_argument("--max-captures", type=int, default=Settings.max_captures, metavar="N",
                   help="packet captures armed or running at once on this node (default %(default)s)")


def run_command(args: argparse.Namespace) -> int:
    """``flowmap dp run``: the live dp with the parsed arguments, until it is stopped."""
    from flowmap_dp.capture import Direction, RingConfig, compile_filter
    from flowmap_dp.running import run
    from flowmap_dp.settings import Settings
    from flowmap_dp.threats import Config

    try:
        bpf = compile_filter(args.filter, args.snaplen) if args.filter else None
        ring = RingConfig(block_size=args.block_size, block_count=args.block_count, retire_timeout_ms=args.retire_ms,
                          snaplen=args.snaplen, direction=Direction(args.direction), filter=bpf,
                          local_addresses=tuple(a for arg in args.local_address for a in arg.split(",") if a))
        settings = Settings(interfaces=tuple(args.iface), socket_path=args.socket, interval=args.interval,
                            workers=args.workers, ring=ring, max_sessions=args.max_sessions, queue_size=args.queue,
                            parser=args.parser, capture_dir=args.capture_dir,
                            capture_disk_bytes=args.capture_disk_bytes, max_captures=args.max_captures,
                            threats=Config.parse(args.threats_off, args.threat_limit))
    except (ValueError, RuntimeError, OSError) as e:
        print(f"flowmap dp run: {e}", file=sys.stderr)
        return 2
    return run(settings)
