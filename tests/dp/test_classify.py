"""Offline classification: capture file formats, link types, golden flows, the CLI, and the
client/server direction of every flow the nDPI captures (tests/data/ndpi) give evidence for."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import pytest

from flowmap_cli.main import main as flowmap
from flowmap_dp.classify import classify_file
from flowmap_dp.pcapfile import CaptureFormatError, read_records
from tests.dp.synth import ether, ipv4, ipv6, tcp, udp
from tests.conftest import NDPI

A, B = bytes([192, 168, 1, 1]), bytes([192, 168, 1, 2])


def write_pcap(path: Path, frames: list[tuple[float, bytes]], link: int = 1, nano: bool = False,
               big: bool = False, snap: int = 65535) -> Path:
    e = ">" if big else "<"
    magic = 0xA1B23C4D if nano else 0xA1B2C3D4
    out = struct.pack(e + "IHHiIII", magic, 2, 4, 0, 0, snap, link)
    for ts, data in frames:
        frac = int(round((ts % 1) * (1e9 if nano else 1e6)))
        cap = data[:snap]
        out += struct.pack(e + "IIII", int(ts), frac, len(cap), len(data)) + cap
    path.write_bytes(out)
    return path


def block(btype: int, body: bytes) -> bytes:
    body += b"\0" * (-len(body) % 4)
    return struct.pack("<II", btype, len(body) + 12) + body + struct.pack("<I", len(body) + 12)


def write_pcapng(path: Path, ifaces: list[tuple[int, bytes]], packets: list[tuple[int, int, bytes]]) -> Path:
    """``ifaces``: (link type, options); ``packets``: (interface, ts in the interface's unit, frame)."""
    out = block(0x0A0D0D0A, struct.pack("<IHHq", 0x1A2B3C4D, 1, 0, -1))
    for link, opts in ifaces:
        out += block(1, struct.pack("<HHI", link, 0, 0) + opts)
    for iface, ts, data in packets:
        out += block(6, struct.pack("<IIIII", iface, ts >> 32, ts & 0xFFFFFFFF, len(data), len(data)) + data)
    path.write_bytes(out)
    return path


def handshake(a: bytes = A, b: bytes = B, cport: int = 40000, sport: int = 80) -> list[bytes]:
    return [ether(ipv4(a, b, 6, tcp(cport, sport, 0x02))), ether(ipv4(b, a, 6, tcp(sport, cport, 0x12))),
            ether(ipv4(a, b, 6, tcp(cport, sport, 0x18, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")))]


def test_golden_dns_pcap() -> None:
    flows = classify_file(NDPI / "dns.pcap")
    assert [(f["l4"], f["client"], f["server"], f.get("vlan"), f["packets_c2s"], f["packets_s2c"],
             f["bytes_c2s"], f["bytes_s2c"]) for f in flows] == [
        ("udp", "192.168.170.8:32795", "192.168.170.20:53", None, 1, 2, 61, 123),
        ("udp", "82.178.113.245:47255", "82.178.158.181:53", 785, 1, 1, 61, 189),
    ]


def test_vlan_keyed_flows() -> None:
    flows = classify_file(NDPI / "mongodb.pcap")
    vlans = {f.get("vlan") for f in flows if f["server"].endswith(":27017")}
    assert {50, 300} <= vlans


def test_every_field_is_there() -> None:
    (flow, *_) = classify_file(NDPI / "dns.pcap")
    assert set(flow) >= {"l4", "client", "server", "app", "bytes_c2s", "bytes_s2c", "packets_c2s", "packets_s2c",
                         "metadata", "threats"}
    assert isinstance(flow["metadata"], dict) and isinstance(flow["threats"], list)


def manifest() -> list[dict[str, Any]]:
    return json.loads((NDPI / "MANIFEST.json").read_text())  # type: ignore[no-any-return]


def test_direction_agrees_with_every_evidenced_manifest_flow() -> None:
    checked, wrong = 0, []
    for entry in manifest():
        flows = classify_file(NDPI / entry["file"])
        for want in entry["flows"]:
            if "client" not in want:
                continue  # a/b: the capture does not show who started
            pair = {want["client"], want["server"]}
            got = [f for f in flows if {f["client"], f["server"]} == pair and f["l4"] == want["proto"]
                   and ("vlan" not in want or f.get("vlan") == want["vlan"])]
            assert got, (entry["file"], want)
            checked += 1
            if any(f["client"] != want["client"] for f in got):
                wrong.append((entry["file"], want["dir_evidence"], want["client"], want["server"]))
    assert checked > 150 and wrong == []


def test_pcap_variants(tmp_path: Path) -> None:
    frames = [(1.25, f) for f in handshake()]
    for nano in (False, True):
        for big in (False, True):
            path = write_pcap(tmp_path / f"x{nano}{big}.pcap", frames, nano=nano, big=big)
            recs = list(read_records(path))
            assert [r.ts for r in recs] == [1.25] * 3 and recs[0].link == 1
            (flow,) = classify_file(path)
            assert (flow["client"], flow["server"], flow["packets_c2s"], flow["packets_s2c"]) == \
                ("192.168.1.1:40000", "192.168.1.2:80", 2, 1)


def test_snaplen_and_truncated_last_record(tmp_path: Path) -> None:
    path = write_pcap(tmp_path / "cut.pcap", [(1.0, f) for f in handshake()], snap=60)
    raw = path.read_bytes()
    path.write_bytes(raw + raw[24:40])  # half a record header at the end
    (flow,) = classify_file(path)
    assert flow["bytes_c2s"] == 40 + 40 + 27  # IP lengths, not captured lengths


def test_linux_cooked_and_raw_links(tmp_path: Path) -> None:
    ip = ipv4(A, B, 17, udp(5000, 53, b"q"))
    sll = struct.pack("!HHH8sH", 0, 1, 6, bytes(8), 0x0800) + ip
    sll2 = struct.pack("!HHIHBB8s", 0x0800, 0, 2, 1, 0, 6, bytes(8)) + ip
    for link, data in ((113, sll), (276, sll2), (101, ip), (228, ip)):
        (flow,) = classify_file(write_pcap(tmp_path / f"{link}.pcap", [(1.0, data)], link=link))
        assert (flow["l4"], flow["client"], flow["server"]) == ("udp", "192.168.1.1:5000", "192.168.1.2:53")


def test_pcapng_two_interfaces_and_tsresol(tmp_path: Path) -> None:
    v6 = ipv6(b"\xfd" + bytes(14) + b"\x01", b"\xfd" + bytes(14) + b"\x02", 17, udp(5000, 53, b"q"))
    nano = struct.pack("<HHB3x", 9, 1, 9) + struct.pack("<HH", 0, 0)
    path = write_pcapng(tmp_path / "x.pcapng", [(1, b""), (101, nano)],
                        [(0, 2_500_000, handshake()[0]), (1, 3_000_000_000, v6)])
    recs = list(read_records(path))
    assert [(r.link, r.ts) for r in recs] == [(1, 2.5), (101, 3.0)]
    flows = classify_file(path)
    assert [f["server"] for f in flows] == ["192.168.1.2:80", "[fd00::2]:53"]


def test_tcp_reuse_after_close_is_two_flows(tmp_path: Path) -> None:
    close = [ether(ipv4(A, B, 6, tcp(40000, 80, 0x11))), ether(ipv4(B, A, 6, tcp(80, 40000, 0x11)))]
    frames = [(float(i), f) for i, f in enumerate(handshake() + close + handshake())]
    flows = classify_file(write_pcap(tmp_path / "reuse.pcap", frames))
    assert [(f["packets_c2s"], f["packets_s2c"], f["state"]) for f in flows] == [(3, 2, "closed"), (2, 1, "open")]


def test_not_a_capture(tmp_path: Path) -> None:
    path = tmp_path / "x.pcap"
    path.write_bytes(b"hello world, not a pcap")
    with pytest.raises(CaptureFormatError):
        classify_file(path)


def test_cli_json_and_table(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write_pcap(tmp_path / "x.pcap", [(1.0, f) for f in handshake()])
    assert flowmap(["dp", "classify", "--pcap", str(path), "--json"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [json.loads(line)["server"] for line in lines] == ["192.168.1.2:80"]
    assert flowmap(["dp", "classify", "--pcap", str(path)]) == 0
    out = capsys.readouterr().out
    assert "192.168.1.1:40000" in out and out.splitlines()[0].split()[:4] == ["L4", "CLIENT", "SERVER", "APP"]
    assert flowmap(["dp", "classify", "--pcap", str(tmp_path / "missing.pcap")]) == 2


def test_every_ndpi_capture_classifies_cleanly() -> None:
    for entry in manifest():
        flows = classify_file(NDPI / entry["file"])
        assert flows and all(f["bytes_c2s"] + f["bytes_s2c"] > 0 for f in flows)
