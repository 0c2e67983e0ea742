"""Hostile input: no exception ever leaves decode, the session table or the inspector, and the
decode counters always add up. The same loop at 1,000,000 frames is ``benchmarks/dp_fuzz.py``."""

from __future__ import annotations

import random

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flowmap_dp.block import feed_block, pack_block
from flowmap_dp.decode import IGNORED, MALFORMED, Decoded, decode
from flowmap_dp.session import SessionTable
from flowmap_dp.synth import fuzz_frames, seed_frames
from flowmap_dp.vectorised import feed_block_vectorised

LINKS = [0, 1, 101, 113, 228, 229, 276, 999]
SEEDS = seed_frames(random.Random(3))
TABLE = SessionTable(max_sessions=1000, max_fragments=16)  # real Inspector: detectors see the hostile payloads too


def check(out: Decoded | str, size: int) -> None:
    if isinstance(out, str):
        assert out in MALFORMED or out in IGNORED
        assert out != "internal_error"
    else:
        assert 0 <= out.payload_start <= out.payload_end <= size
        assert 0 <= out.sport < 65536 and 0 <= out.dport < 65536 and out.ip_len >= 0


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=200), st.sampled_from(LINKS), st.integers(0, 4095))
def test_random_bytes(raw: bytes, link: int, vlan: int) -> None:
    out = decode(raw, 0, len(raw), link, vlan)
    check(out, len(raw))
    tracked = TABLE.fragments.decode(raw, 0, len(raw), link, vlan, 0, 1.0)
    check(tracked, len(raw))
    if isinstance(out, str) and out != "fragment":  # tracking changes only what a later fragment is
        assert tracked == out
    if isinstance(out, Decoded):
        TABLE.packet(out, 1.0, raw)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(SEEDS), st.lists(st.tuples(st.integers(0, 120), st.integers(0, 255)), max_size=8),
       st.integers(0, 2000))
def test_mutated_frames(seed: bytes, flips: list[tuple[int, int]], cut: int) -> None:
    raw = bytearray(seed)
    for at, value in flips:
        if at < len(raw):
            raw[at] = value
    data = bytes(raw[:cut])
    out = TABLE.fragments.decode(data, 0, len(data), ts=2.0)
    check(out, len(data))
    if isinstance(out, Decoded):
        TABLE.packet(out, 2.0, data)
    TABLE.collect(3.0)


def test_bulk_fuzz_through_decode_sessions_inspector_and_both_readers() -> None:
    frames = fuzz_frames(20_000, seed=42)
    rnd = random.Random(42)
    direct = SessionTable(max_sessions=2000, max_fragments=64)  # small: the fragment bound is hit too
    for i, raw in enumerate(frames):
        out = direct.fragments.decode(raw, 0, len(raw), 1, 0, len(raw) + rnd.randrange(0, 3), float(i))
        direct.stats.count(out)
        if isinstance(out, Decoded):
            direct.packet(out, float(i), raw)
    stats = direct.stats
    assert stats.total == len(frames) and stats.balanced()
    assert stats.malformed["internal_error"] == 0
    assert stats.decoded > 1000 and sum(stats.malformed.values()) > 1000 and stats.ignored["fragment"] > 0

    tagged = [(f, float(i), rnd.choice((None, None, 5))) for i, f in enumerate(frames)]
    blocks = []
    while tagged:
        block, n = pack_block(tagged, 1 << 15)
        blocks.append(block)
        tagged = tagged[n:]
    a, b = SessionTable(max_fragments=64), SessionTable(max_fragments=64)
    for i, block in enumerate(blocks):
        feed_block(block, a)
        feed_block_vectorised(block, b)
        if i % 3 == 2:  # expiry walks the tables in recency order: it must be the same order
            a.collect(float(i * 1000))
            b.collect(float(i * 1000))
    assert [(k, s.last, s.pkts_c2s, s.pkts_s2c, s.bytes_c2s, s.bytes_s2c) for k, s in a.sessions.items()] == \
        [(k, s.last, s.pkts_c2s, s.pkts_s2c, s.bytes_c2s, s.bytes_s2c) for k, s in b.sessions.items()]
    assert a.stats.total == b.stats.total == len(frames)
    assert a.stats.balanced() and b.stats.balanced() and a.stats.malformed == b.stats.malformed
    ra, rb = a.collect(1e9), b.collect(1e9)
    assert ra.health.malformed["internal_error"] == 0 and ra.health.decoded == rb.health.decoded
    assert ra.health.fragments == rb.health.fragments and len(a.fragments) <= 64
