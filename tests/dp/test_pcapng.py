"""The pcapng writer: our own reader and libpcap (through tcpdump) read back exactly what was
written, the byte bound is never passed, and the sha256 is the file's."""

from __future__ import annotations

import hashlib
import io
import shutil
import socket
import struct
import subprocess
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from flowmap_dp import pcapng
from tests.dp import synth
from flowmap_dp.pcapfile import read_records
from tests.conftest import need

A, B = socket.inet_aton("10.1.0.1"), socket.inet_aton("10.1.0.2")


def _frames() -> list[tuple[int, int, bytes, int]]:
    """(interface, ts_ns, captured bytes, original length): whole, snapped and odd-sized frames."""
    out = []
    for i, size in enumerate((0, 1, 3, 100, 1400)):
        frame = synth.ether(synth.ipv4(A, B, 17, synth.udp(4000 + i, 53, b"x" * size)))
        snap = frame[:64]  # the interfaces' snap length
        out.append((i % 2, 1_700_000_000_123_456_789 + i * 1001, snap, len(frame)))
    return out


def _write(path: Path, max_bytes: int = 1 << 20) -> pcapng.Writer:
    with open(path, "wb") as f:
        w = pcapng.Writer(f, max_bytes)
        assert w.section(comment="capture default/web-debug")
        assert w.interface("vethab12", "default/web web-7d9f-abcde", 64) == 0
        assert w.interface("vethcd34", "default/db db-0", 64) == 1
        for iface, ts, data, orig in _frames():
            assert w.packet(iface, ts, data, orig)
    return w


def test_our_reader_reads_back_every_field(tmp_path: Path) -> None:
    path = tmp_path / "c.pcapng"
    w = _write(path)
    got = [(r.link, r.data, r.wire_len, round(r.ts * 1e9)) for r in read_records(path)]
    assert [(1, d, o) for _, _, d, o in _frames()] == [g[:3] for g in got]
    for (_, ts, _, _), g in zip(_frames(), got):
        assert abs(g[3] - ts) < 1000  # a float of seconds holds ~0.2 µs at this epoch
    raw = path.read_bytes()
    assert w.size == len(raw) and w.hexdigest() == hashlib.sha256(raw).hexdigest() and w.packets == 5
    # The options as written, read at their fixed places (one section, two interfaces).
    assert b"flowmap" in raw and b"capture default/web-debug" in raw and b"default/db db-0" in raw
    shb_len = struct.unpack_from("<I", raw, 4)[0]
    idb_type, idb_len, link, _, snap = struct.unpack_from("<IIHHI", raw, shb_len)
    assert (idb_type, link, snap) == (1, 1, 64)
    assert raw[shb_len + 16 : shb_len + idb_len - 4].find(struct.pack("<HHB", 9, 1, 9)) >= 0  # if_tsresol = 9


def _tcpdump() -> str:
    path = shutil.which("tcpdump")
    need(path is not None, "this test needs tcpdump (libpcap) as an independent reader")
    assert path is not None
    return path


def test_libpcap_reads_it_too(tmp_path: Path) -> None:
    """tcpdump reads the file and writes it out as classic pcap: every record's captured and
    original length, and its nanosecond timestamp, come through libpcap's own pcapng reader."""
    tcpdump = _tcpdump()
    path = tmp_path / "c.pcapng"
    _write(path)
    out = tmp_path / "c.pcap"
    subprocess.run([tcpdump, "-r", str(path), "-w", str(out), "--time-stamp-precision=nano"], check=True,
                   capture_output=True)
    raw = out.read_bytes()
    assert raw[:4] == b"\x4d\x3c\xb2\xa1"  # nanosecond pcap
    records, pos = [], 24
    while pos < len(raw):
        sec, nsec, incl, orig = struct.unpack_from("<IIII", raw, pos)
        records.append((sec * 10**9 + nsec, raw[pos + 16 : pos + 16 + incl], orig))
        pos += 16 + incl
    assert records == [(ts, data, orig) for _, ts, data, orig in _frames()]
    text = subprocess.run([tcpdump, "-r", str(path), "-nn", "-e"], check=True, capture_output=True, text=True).stdout
    assert [int(line.split("length ")[1].split(":")[0]) for line in text.splitlines()] == [o for *_, o in _frames()]


def test_a_block_that_does_not_fit_is_not_written(tmp_path: Path) -> None:
    frame = synth.ether(synth.ipv4(A, B, 17, synth.udp(1, 2, b"y" * 50)))
    buf = io.BytesIO()
    w = pcapng.Writer(buf, 400)
    assert w.section() and w.interface("eth0", "", 128) == 0
    header = w.size
    per = pcapng.enhanced_packet_size(len(frame))
    fit = (400 - header) // per
    assert all(w.packet(0, i, frame, len(frame)) for i in range(fit)) and not w.full
    assert not w.packet(0, 99, frame, len(frame)) and w.full
    assert w.size == buf.tell() == header + fit * per <= 400 and w.packets == fit
    assert w.hexdigest() == hashlib.sha256(buf.getvalue()).hexdigest()
    small_fits = w.size + pcapng.enhanced_packet_size(4) <= 400
    assert w.packet(0, 100, frame[:4], len(frame)) is small_fits  # a smaller block may still fit


def test_strings_are_bounded_and_unknown_interfaces_refused() -> None:
    long = "é" * 1000
    idb = pcapng.interface_description(long, long, 128)
    assert len(idb) <= 20 + 2 * (4 + pcapng.MAX_STRING) + 8 + 4
    w = pcapng.Writer(io.BytesIO(), 1 << 16)
    with pytest.raises(ValueError):
        w.packet(0, 0, b"", 0)
    with pytest.raises(ValueError):
        pcapng.enhanced_packet(0, 0, b"abc", 2)
    assert w.interface("eth0", "", 64) == 0
    with pytest.raises(ValueError, match="snap length 64"):
        w.packet(0, 0, bytes(65), 65)


@settings(max_examples=50, deadline=None)
@given(st.lists(st.tuples(st.binary(max_size=300), st.integers(0, 200), st.integers(0, 2**63)), max_size=20),
       st.integers(100, 4000))
def test_any_packets_round_trip_within_the_bound(tmp_path_factory: pytest.TempPathFactory,
                                                 packets: list[tuple[bytes, int, int]], bound: int) -> None:
    path = tmp_path_factory.mktemp("p") / "f.pcapng"
    with open(path, "wb") as f:
        w = pcapng.Writer(f, bound)
        kept = []
        if w.section() and w.interface("x", "y", 0) == 0:
            for data, extra, ts in packets:
                if not w.packet(0, ts, data, len(data) + extra):
                    break
                kept.append((data, len(data) + extra))
    assert path.stat().st_size == w.size <= bound
    assert [(r.data, r.wire_len) for r in read_records(path)] == kept
