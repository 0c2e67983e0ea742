"""Hostile input: no exception ever leaves decode (Python or compiled), the session tables or the
inspector; the decode counters always add up; and the compiled decoder and table say exactly what
the Python ones say. The same loop at 1,000,000 frames is ``benchmarks/dp_fuzz.py``."""

from __future__ import annotations

import random

import pytest

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flowmap_dp import _native
from flowmap_dp.decode import IGNORED, MALFORMED, Decoded, Fragments, decode
from tests.dp.synth import ether, fuzz_frames, ipv4, pack_block, seed_frames, tcp
from tests.dp.twins import Twins, balanced, block_time, native_outcome

LINKS = [0, 1, 101, 113, 228, 229, 276, 999]
SEEDS = seed_frames(random.Random(3))
# Real Inspector: the detectors see the hostile payloads too. Fed by every example, in order.
TWINS = Twins(max_sessions=1000, max_fragments=16)
FRAGMENTS = Fragments(16)


def check(out: Decoded | str, size: int) -> None:
    if isinstance(out, str):
        assert out in MALFORMED or out in IGNORED
        assert out != "internal_error"
    else:
        assert 0 <= out.payload_start <= out.payload_end <= size
        assert 0 <= out.sport < 65536 and 0 <= out.dport < 65536 and out.ip_len >= 0


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=200), st.sampled_from(LINKS), st.integers(0, 4095), st.sampled_from([0, 1, 60, 9000, 70000]))
def test_random_bytes(raw: bytes, link: int, vlan: int, wire_len: int) -> None:
    out = decode(raw, 0, len(raw), link, vlan, wire_len)
    check(out, len(raw))
    assert _native.decode_frame(raw, 0, len(raw), link, vlan, wire_len) == native_outcome(out)
    tracked = FRAGMENTS.decode(raw, 0, len(raw), link, vlan, 0, 1.0)
    check(tracked, len(raw))
    if isinstance(out, str) and out != "fragment":  # tracking changes only what a later fragment is
        assert tracked == out
    TWINS.feed_frames([(raw, link, wire_len, 1.0)])


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(SEEDS), st.lists(st.tuples(st.integers(0, 120), st.integers(0, 255)), max_size=8),
       st.integers(0, 2000), st.integers(0, 20))
def test_mutated_frames(seed: bytes, flips: list[tuple[int, int]], cut: int, start: int) -> None:
    raw = bytearray(seed)
    for at, value in flips:
        if at < len(raw):
            raw[at] = value
    data = bytes(raw[:cut])
    out = decode(data, 0, len(data))
    check(out, len(data))
    assert _native.decode_frame(data, 0, len(data), 1) == native_outcome(out)
    start = min(start, len(data))  # a frame further into a buffer, as in a block
    assert _native.decode_frame(data, start, len(data), 101) == native_outcome(decode(data, start, len(data), 101))
    TWINS.feed_frames([(data, 1, len(data), 2.0)])
    TWINS.collect(3.0)


def test_bulk_fuzz_through_both_decoders_tables_and_the_inspector() -> None:
    frames = fuzz_frames(20_000, seed=42)
    rnd = random.Random(42)
    frames += [rnd.randbytes(rnd.randrange(0, 200)) for _ in range(2000)]
    outcomes: dict[str, int] = {}
    for raw in frames:
        link, wire_len = rnd.choice((1, 1, 1, 101, 113)), len(raw) + rnd.choice((0, 0, 1, 2000))
        out = decode(raw, 0, len(raw), link, 0, wire_len)
        assert _native.decode_frame(raw, 0, len(raw), link, 0, wire_len) == native_outcome(out), (raw.hex(), link)
        kind = out if isinstance(out, str) else "decoded"
        outcomes[kind] = outcomes.get(kind, 0) + 1
    assert outcomes["decoded"] > 5000 and len(outcomes) >= 8 and "internal_error" not in outcomes

    half = len(frames) // 2  # then a pause: what the fragment table remembers expires
    tagged = [(f, i * 0.002 + (100 if i > half else 0), rnd.choice((None, None, 5))) for i, f in enumerate(frames)]
    blocks = []
    while tagged:
        block, n = pack_block(tagged, 1 << 15)
        blocks.append(block)
        tagged = tagged[n:]
    twins = Twins(max_sessions=500, max_fragments=64)  # small: the session and fragment bounds are hit
    for i, block in enumerate(blocks):
        twins.feed_blocks([block])
        if i % 3 == 2:  # expiry walks the tables in recency order: it must be the same order
            twins.collect(block_time(block))
    h = twins.collect(1e9).health
    assert h.packets == len(frames) and balanced(h)
    assert h.malformed["internal_error"] == 0 and h.ignored["fragment"] > 0 and h.evicted > 0 and h.expired > 0
    assert h.fragments["evicted_full"] > 0 and h.fragments["expired"] > 0 and len(twins.ref.fragments) <= 64


@pytest.mark.parametrize("wire_len", [1 << 32, 1 << 63, (1 << 64) - 1])
def test_a_wire_length_no_capture_gives_is_clamped_alike(wire_len: int) -> None:
    """cargo-fuzz's first find: a length past 32 bits overflowed the compiled decoder's arithmetic
    (wrapped in a release build, a panic in a debug one). Both decoders clamp it to 32 bits."""
    syn = ether(ipv4(bytes([1, 2, 3, 4]), bytes([5, 6, 7, 8]), 6, tcp(1000, 80, 0x02)))
    frame = syn[:16] + b"\x00\x00" + syn[18:]  # IP total length 0: the wire length is used
    for raw in (bytes(14), frame):
        assert _native.decode_frame(raw, 0, len(raw), 1, 0, wire_len) == native_outcome(decode(raw, 0, len(raw), 1, 0,
                                                                                              wire_len))
    out = decode(frame, 0, len(frame), 1, 0, wire_len)
    assert not isinstance(out, str) and out.ip_len == 0xFFFFFFFF - 14
