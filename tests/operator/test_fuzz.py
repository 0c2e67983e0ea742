"""Hostile batches through the batch validator: nothing escapes, and whatever it accepts is normal.

Every input is parsed as the gate parses it and validated as the servicer does; the properties are
in ``tests.operator.fuzzing.check``. The same loop at 1,000,000 inputs is ``benchmarks/operator_fuzz.py``.
"""

from __future__ import annotations

import random

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flowmap_api import report_pb2 as pb
from tests.operator.fuzzing import ADDRESSES, NAMES, check, hostile_inputs, outcomes, random_batch

TEXT = st.one_of(st.text(max_size=80), st.sampled_from(ADDRESSES + NAMES))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=400))
def test_random_bytes(raw: bytes) -> None:
    check(raw)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(0, 2**32), st.lists(st.tuples(st.integers(0, 2000), st.integers(0, 255)), max_size=6),
       st.integers(0, 4000))
def test_mutated_batches(seed: int, flips: list[tuple[int, int]], cut: int) -> None:
    raw = bytearray(random_batch(random.Random(seed)).SerializeToString())
    for at, value in flips:
        if at < len(raw):
            raw[at] = value
    check(bytes(raw[:cut]))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(TEXT, TEXT, TEXT, TEXT, st.integers(0, 2**32 - 1), st.integers(0, 2**64 - 1), st.integers(0, 5),
       st.lists(st.tuples(TEXT, TEXT), max_size=4))
def test_built_batches(client: str, server: str, pod: str, app: str, port: int, counter: int, protocol: int,
                       names: list[tuple[str, str]]) -> None:
    edge = pb.EdgeDelta(client=pb.Endpoint(ip=client, pod=pod), server=pb.Endpoint(ip=server, port=port),
                        protocol=protocol, apps=[app], bytes_c2s=counter)
    batch = pb.ReportBatch(agent_id="a", node="node-a", sequence=1, edges=[edge, edge],
                           names=[pb.DnsName(ip=ip, name=name) for ip, name in names])
    check(batch.SerializeToString())


def test_bulk_hostile_inputs_reach_every_outcome() -> None:
    counts = outcomes(hostile_inputs(6_000, seed=12))
    assert sum(counts.values()) == 6_000
    assert all(counts.get(k, 0) > 100 for k in ("undecodable", "refused_batch", "refused_edge", "accepted")), counts
