"""deprecated-tls and heartbleed on crafted TLS bytes, through the inspector as the dp runs them:
hits, the nearest benign cases, and truncated or garbage input that must never raise."""

from __future__ import annotations

import random
import struct

import pytest

from flowmap_dp import threats
from flowmap_dp.detection import Inspector
from flowmap_dp.detectors.base import Flow
from flowmap_dp.threats import Config, deprecated_tls, heartbleed


def record(ctype: int, body: bytes, version: int = 0x0303) -> bytes:
    return struct.pack("!BHH", ctype, version, len(body)) + body


def handshake(hs_type: int, body: bytes) -> bytes:
    return bytes([hs_type]) + len(body).to_bytes(3, "big") + body


def extensions(*exts: tuple[int, bytes]) -> bytes:
    data = b"".join(struct.pack("!HH", t, len(v)) + v for t, v in exts)
    return struct.pack("!H", len(data)) + data


def client_hello(legacy: int = 0x0303, offered: tuple[int, ...] = ()) -> bytes:
    name = b"a.flowmap.test"
    sni = b"\x00" + struct.pack("!H", len(name)) + name
    exts = [(0, struct.pack("!H", len(sni)) + sni), (15, b"\x01")]  # server_name, heartbeat
    if offered:
        exts.append((43, bytes([2 * len(offered)]) + b"".join(struct.pack("!H", v) for v in offered)))
    body = struct.pack("!H", legacy) + bytes(32) + b"\x00" + b"\x00\x02\x00\x2f" + b"\x01\x00" + extensions(*exts)
    return record(22, handshake(1, body), 0x0301)


def server_hello(legacy: int, chosen: int | None = None) -> bytes:
    exts = extensions((43, struct.pack("!H", chosen))) if chosen else extensions()
    body = struct.pack("!H", legacy) + bytes(32) + b"\x00" + b"\x00\x2f" + b"\x00" + exts
    return record(22, handshake(2, body), legacy if legacy < 0x0303 else 0x0303)


def heartbeat(claimed: int, payload: int, padding: int = 16, kind: int = 1) -> bytes:
    return record(24, bytes([kind]) + struct.pack("!H", claimed) + bytes(payload) + bytes(padding))


def inspect(packets: list[tuple[bool, bytes]], config: Config = Config()) -> Inspector:
    insp = Inspector("tcp", 40000, 443, scanners=threats.bind(config))
    for from_client, payload in packets:
        if insp.feed(from_client, payload):
            break
    insp.finish()
    return insp


def names(insp: Inspector) -> list[str]:
    return [t.name for t in insp.threats]


# -------------------------------------------------------------------------- deprecated-tls


@pytest.mark.parametrize("legacy, name", [(0x0300, "SSL3.0"), (0x0301, "TLS1.0"), (0x0302, "TLS1.1")])
def test_an_old_version_negotiated_is_a_hit(legacy: int, name: str) -> None:
    insp = inspect([(True, client_hello(legacy)), (False, server_hello(legacy))])
    assert insp.app == "tls" and insp.metadata["tls"]["version"] == name
    assert [(t.name, t.snippet, t.where) for t in insp.threats] == [
        ("deprecated-tls", f"{name} negotiated (SNI a.flowmap.test)", "tls.server_hello")]


@pytest.mark.parametrize("client, server", [
    (client_hello(0x0301), server_hello(0x0303)),  # an old client's hello, TLS 1.2 chosen
    (client_hello(0x0303, (0x0304, 0x0303, 0x0302, 0x0301)), server_hello(0x0303, 0x0304)),  # 1.3 chosen
    (client_hello(0x0303, (0x0302, 0x0301)), server_hello(0x0303)),  # old versions offered, 1.2 chosen
])
def test_old_versions_offered_but_not_negotiated_are_no_hit(client: bytes, server: bytes) -> None:
    insp = inspect([(True, client), (False, server)])
    assert insp.app == "tls" and insp.metadata["tls"]["version"] in ("TLS1.2", "TLS1.3") and not insp.threats


def test_supported_versions_outranks_the_legacy_field() -> None:
    # A ServerHello whose legacy field says 1.2 but whose supported_versions says 1.1 chose 1.1.
    insp = inspect([(True, client_hello()), (False, server_hello(0x0303, 0x0302))])
    assert names(insp) == ["deprecated-tls"]


def test_a_client_hello_alone_is_no_hit() -> None:
    assert not inspect([(True, client_hello(0x0300))]).threats


def test_deprecated_tls_reads_only_the_metadata() -> None:
    flow = Flow("tcp", 1, 443)
    for meta in ({}, {"tls": "TLS1.0"}, {"tls": {"version": 5}}, {"tls": {"version": "TLS1.0", "sni": 7}}):
        found = deprecated_tls.scan(flow, "tls", meta, {})
        assert [t.snippet for t in found] in ([], ["TLS1.0 negotiated"])


# -------------------------------------------------------------------------- heartbleed


def _handshake_then(*after: tuple[bool, bytes]) -> list[tuple[bool, bytes]]:
    server = server_hello(0x0302) + record(22, handshake(11, bytes(40))) + record(22, handshake(14, b""))
    return [(True, client_hello(0x0302)), (False, server), *after]


def test_a_cleartext_heartbeat_claiming_more_than_its_record_is_a_hit() -> None:
    insp = inspect(_handshake_then((True, heartbeat(0x4000, 0, 0)), (False, heartbeat(0x4000, 0x4000, 16, 2))))
    hits = [t for t in insp.threats if t.name == "heartbleed"]
    assert [(t.snippet, t.where) for t in hits] == [
        ("client: heartbeat request claims 16384 bytes of payload in a 3-byte record", "tls.heartbeat")]


def test_the_attacker_may_be_the_server() -> None:
    insp = inspect(_handshake_then((False, heartbeat(1000, 10))))
    assert [t.snippet for t in insp.threats if t.name == "heartbleed"][0].startswith("server: heartbeat request")


def test_a_well_formed_heartbeat_is_no_hit() -> None:
    for claimed, payload, padding in ((10, 10, 16), (0, 0, 16), (5, 5, 100), (0x3000, 0x3000, 16)):
        insp = inspect(_handshake_then((True, heartbeat(claimed, payload, padding)),
                                       (False, heartbeat(claimed, payload, padding, 2))))
        assert "heartbleed" not in names(insp), (claimed, payload, padding)


def test_one_byte_too_many_is_a_hit() -> None:
    # payload_length + 3 + 16 == record length is the largest well-formed claim.
    assert "heartbleed" in names(inspect(_handshake_then((True, heartbeat(11, 10)))))
    assert "heartbleed" not in names(inspect(_handshake_then((True, heartbeat(10, 10)))))


def test_a_malformed_heartbeat_response_is_no_hit() -> None:
    assert "heartbleed" not in names(inspect(_handshake_then((False, heartbeat(500, 0, 0, kind=2)))))


def test_after_change_cipher_spec_only_the_answer_size_counts() -> None:
    ccs = record(20, b"\x01")
    # Encrypted: the claimed length cannot be read (these bytes are ciphertext).
    small = record(24, bytes([1, 0x40, 0]) + bytes(37))
    benign = inspect(_handshake_then((True, ccs + small), (False, ccs + record(24, bytes(40 + 32)))))
    assert "heartbleed" not in names(benign)
    leak = inspect(_handshake_then((True, ccs + small), (False, ccs + record(24, bytes(16384)))))
    assert [t.snippet for t in leak.threats if t.name == "heartbleed"] == [
        "server answered an encrypted 40-byte heartbeat with 16384 bytes"]
    loose = Config.parse([], ["heartbleed.response_excess=20000"])
    leaked = _handshake_then((True, ccs + small), (False, ccs + record(24, bytes(16384))))
    assert "heartbleed" not in names(inspect(leaked, loose))


def test_the_inspector_waits_for_a_heartbeat_after_the_server_hello() -> None:
    # The tls detector alone stops at the ServerHello; heartbleed asks for more packets.
    packets = _handshake_then(*[(True, record(23, bytes(30))), (False, record(23, bytes(30)))] * 3,
                              (True, heartbeat(0x4000, 0, 0)))
    assert "heartbleed" in names(inspect(packets))
    assert "heartbleed" not in names(inspect(packets, Config.parse(["heartbleed"])))


def test_a_heartbleed_record_split_over_segments_is_read() -> None:
    hb = heartbeat(0xFFFF, 0, 0)
    assert "heartbleed" in names(inspect(_handshake_then((True, hb[:2]), (True, hb[2:]))))


def test_truncated_and_garbage_records_never_raise() -> None:
    rng = random.Random(17)
    base = b"".join(p for _, p in _handshake_then((True, heartbeat(0x4000, 0, 0))))
    limits = {"response_excess": 256.0}
    for cut in range(len(base) + 1):
        flow = Flow("tcp", 1, 443, [base[:cut]], [base[cut:]], [True, False])
        heartbleed.scan(flow, "tls", {}, limits)
    for _ in range(2000):
        junk = bytes(rng.choice((3, 20, 24, 0, 255, 1, 0x40)) for _ in range(rng.randrange(0, 40)))
        flow = Flow("tcp", 1, 443, [junk], [junk[::-1]], [True, False])
        heartbleed.scan(flow, "tls", {}, limits)
        inspect([(True, junk), (False, junk)])
    assert list(heartbleed.records(b"\x18\x03\x03\x00")) == []
