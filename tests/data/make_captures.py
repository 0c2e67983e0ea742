#!/usr/bin/env python3
"""Record small captures of real traffic for the detector tests.

For each protocol this creates two network namespaces joined by a veth pair, starts a real
server in one (or, where no server can run here, a listener that answers with the protocol's
real replies — said so in the manifest), runs a real client in the other, and records the veth
with ``tcpdump -s 0``. The result is ``tests/data/captures/<protocol>/<name>.pcap`` plus an entry
in ``tests/data/captures/MANIFEST.json`` (same format as ``tests/data/ndpi/MANIFEST.json``).

Run as root from the repository root, with the Debian packages in
``hack/debian-packages-captures.txt`` and the ``captures`` extra installed::

    sudo .venv/bin/python tests/data/make_captures.py              # every protocol
    sudo .venv/bin/python tests/data/make_captures.py --protocol redis

Running it again replaces the captures of the protocols it ran and their manifest entries;
nothing else is touched, and a protocol whose recipe fails keeps its previous captures.
Namespaces, interfaces and processes are removed even on failure. Keys, certificates and
databases live in a temporary directory that is deleted afterwards. Servers that are jars on
Maven Central (Kafka, Cassandra, mongo-java-server) are fetched once with Debian's ``mvn`` into
``~/.cache/flowmap-captures`` (``FLOWMAP_CAPTURES_CACHE`` overrides). See captures/README.md.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import signal
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import capture_lab  # noqa: E402
from capture_lab import S4, S6, Lab, Made  # noqa: E402
from capture_recipes import RECIPES  # noqa: E402

HERE = Path(__file__).resolve().parent
OUT = HERE / "captures"

# --------------------------------------------------------------------------------------------
# Flows and the manifest


ECHO_TYPES = {"icmp": (8, 0), "icmpv6": (128, 129)}  # (request, reply)


def pcap_flows(path: Path) -> list[dict[str, Any]]:
    """TCP/UDP flows and ICMP/ICMPv6 echo sessions of a capture in first-seen order, client by
    SYN (or echo request) or else by first packet. An echo session's endpoints are the addresses
    with its identifier as the port, as the dp keys and prints it."""
    from scapy.layers.inet import ICMP, IP, TCP, UDP
    from scapy.layers.inet6 import ICMPv6EchoReply, ICMPv6EchoRequest, IPv6
    from scapy.utils import PcapReader

    flows: dict[frozenset[tuple[str, int]], dict[str, Any]] = {}
    with PcapReader(str(path)) as reader:
        for pkt in reader:
            ip = pkt.getlayer(IP) or pkt.getlayer(IPv6)
            if ip is None:
                continue
            fmt = (lambda a, p: f"[{a}]:{p}") if isinstance(ip, IPv6) else (lambda a, p: f"{a}:{p}")
            l4 = pkt.getlayer(TCP) or pkt.getlayer(UDP)
            icmp = pkt.getlayer(ICMP) or pkt.getlayer(ICMPv6EchoRequest) or pkt.getlayer(ICMPv6EchoReply)
            if l4 is not None:
                proto = "tcp" if isinstance(l4, TCP) else "udp"
                src, dst = fmt(ip.src, l4.sport), fmt(ip.dst, l4.dport)
                syn = proto == "tcp" and (int(l4.flags) & 0x12) == 0x02
            elif icmp is not None and icmp.type in ECHO_TYPES["icmp" if isinstance(ip, IP) else "icmpv6"]:
                proto = "icmp" if isinstance(ip, IP) else "icmpv6"
                src, dst = fmt(ip.src, icmp.id), fmt(ip.dst, icmp.id)
                syn = icmp.type == ECHO_TYPES[proto][0]
            else:
                continue  # later fragments, ICMP errors: not flows of their own
            key = frozenset({(proto, src), (proto, dst)})
            f = flows.get(key)
            if f is None:
                f = flows[key] = {"proto": proto, "client": src, "server": dst,
                                  "dir_evidence": _evidence(proto, syn), "_dirs": set()}
            elif syn and f["dir_evidence"] == "first-packet":
                f.update(client=src, server=dst, dir_evidence=_evidence(proto, syn))
            f["_dirs"].add(src)
    out = []
    for f in flows.values():
        f["bidirectional"] = len(f.pop("_dirs")) == 2
        # A UDP reply from a new port (a TFTP transfer) or to a new address (a DHCP offer) opens the
        # flow from the server's side; the lab knows which namespace holds the server.
        if f["dir_evidence"] == "first-packet" and _host(f["client"]) in SERVER_IPS \
                and _host(f["server"]) not in SERVER_IPS:
            f.update(client=f["server"], server=f["client"], dir_evidence="lab-server-namespace")
        out.append(f)
    return out


SERVER_IPS = {S4, S6}


def _evidence(proto: str, opening: bool) -> str:
    if not opening:
        return "first-packet"
    return "tcp-syn" if proto == "tcp" else "echo-request"


def _host(endpoint: str) -> str:
    return endpoint.rsplit(":", 1)[0].strip("[]")


def manifest_entry(proto_dir: str, made: Made, path: Path) -> dict[str, Any]:
    data = path.read_bytes()
    flows = pcap_flows(path)
    # Declared per flow, or (a tuple of names) found where the dp raises them, and checked below.
    raised = threats_raised(path, made.threat_limits) if isinstance(made.threats, tuple) else {}
    for i, f in enumerate(flows):
        if callable(made.threats):
            threats = made.threats(i, f)
        else:
            threats = raised.pop((f["proto"], f["client"], f["server"]), None) or raised.pop(
                (f["proto"], f["server"], f["client"]), None) or []
        label = made.label if isinstance(made.label, str) else made.label(f)
        f_ordered = {"proto": f["proto"], "client": f["client"], "server": f["server"], "label": label,
                     "dir_evidence": f["dir_evidence"], "bidirectional": f["bidirectional"]}
        if label == "sqlinjection" and made.carrier:
            f_ordered["carrier"] = made.carrier
        if threats:
            f_ordered["threats"] = sorted(threats)
        f.clear()
        f.update(f_ordered)
    if isinstance(made.threats, tuple):
        seen = {n for f in flows for n in f.get("threats", [])}
        if seen != set(made.threats) or raised:
            raise RuntimeError(f"{made.name}: raised {sorted(seen)} (want {sorted(made.threats)}); unmatched {raised}")
    entry = {
        "file": f"{proto_dir}/{made.name}.pcap",
        "source": "flowmap tests/data/make_captures.py",
        "sha256": hashlib.sha256(data).hexdigest(),
        "bytes": len(data),
        "tags": sorted({proto_dir, *made.tags}),
        "notes": made.notes,
        "made_by": made.made_by,
        "flows": flows,
    }
    if made.threat_limits:  # the thresholds the capture is judged with (a short capture, a low limit)
        entry["threat_limits"] = list(made.threat_limits)
    if not made.list_flows:  # a flood: the flows with a threat, and how many others there are
        entry["flows"] = [f for f in flows if f.get("threats")]
        entry["unlisted_flows"] = {"count": len(flows) - len(entry["flows"]), "label": made.label}
    return entry


def threats_raised(path: Path, limits: list[str]) -> dict[tuple[str, str, str], list[str]]:
    """(proto, client, server) -> the names of the threats the dp raises on that flow (but
    sqlinjection, which the flow's label says), as ``flowmap dp classify`` finds them."""
    from flowmap_dp.classify import classify_file
    from flowmap_dp.threats import Config

    out = {}
    for f in classify_file(path, threats=Config.parse([], limits)):
        names = sorted({t["name"] for t in f["threats"]} - {"sqlinjection"})
        if names:
            out[(f["l4"], f["client"], f["server"])] = names
    return out


def update_manifest(proto_dir: str, entries: list[dict[str, Any]]) -> None:
    mpath = OUT / "MANIFEST.json"
    current = json.loads(mpath.read_text()) if mpath.exists() else []
    current = [e for e in current if not e["file"].startswith(proto_dir + "/")]
    current.extend(entries)
    current.sort(key=lambda e: e["file"])
    mpath.write_text(json.dumps(current, indent=1) + "\n")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--protocol", action="append", choices=sorted(RECIPES),
                    help="make only this protocol's captures (repeatable; default: all)")
    ap.add_argument("--list", action="store_true", help="list the protocols and exit")
    ap.add_argument("--keep-temp", action="store_true", help="keep the temporary directory (logs) for debugging")
    args = ap.parse_args(argv)
    if args.list:
        print("\n".join(sorted(RECIPES)))
        return 0
    if os.geteuid() != 0:
        ap.error("must run as root (network namespaces, tcpdump)")
    failed = []
    for name in args.protocol or sorted(RECIPES):
        tmp = Path(tempfile.mkdtemp(prefix=f"flowmap-cap-{name}-"))
        tmp.chmod(0o755)  # servers that drop privileges (postgres, mariadb) work in here
        staging = tmp / "out"
        capture_lab.STAGING[:] = [staging]
        try:
            with Lab(tmp) as lab:
                made = RECIPES[name](lab, tmp)
            # Only a recipe that made all its captures, each raising what it must, replaces the committed ones.
            entries = [manifest_entry(name, m, staging / name / f"{m.name}.pcap") for m in made]
            (OUT / name).mkdir(parents=True, exist_ok=True)
            for old in (OUT / name).glob("*.pcap"):
                old.unlink()
            for m in made:
                shutil.move(staging / name / f"{m.name}.pcap", OUT / name / f"{m.name}.pcap")
            update_manifest(name, entries)
            for e in entries:
                print(f"{e['file']}: {e['bytes']} bytes, {len(e['flows'])} flows")
        except Exception as exc:  # one protocol failing must not stop the others
            failed.append(name)
            print(f"{name}: FAILED: {exc!r} (logs kept in {tmp})", file=sys.stderr)
        finally:
            if not args.keep_temp and name not in failed:
                shutil.rmtree(tmp, ignore_errors=True)
    if failed:
        print("failed: " + ", ".join(failed), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    sys.exit(main())
