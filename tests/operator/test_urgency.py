"""What the writer writes first: new Connections, then the edges furthest behind in time and in
bytes; none starves."""

from __future__ import annotations

import random

from flowmap_operator.ledger import Counters, EdgeKey, Ledger
from flowmap_operator.urgency import behind, order, unwritten_bytes


def key(port: int) -> EdgeKey:
    return ("shop.web", "shop.api", port, "TCP")


def ledger_with(*edges: tuple[int, int, float, bool]) -> Ledger:
    """Edges (port, unwritten bytes, dirty since, has its object), each from one agent's batch 1."""
    ledger = Ledger()
    ledger.begin_batch("ag", "n", 1, 0, 0)
    for port, size, since, exists in edges:
        ledger.apply("ag", 1, key(port), Counters(bytes_c2s=size // 2, bytes_s2c=size - size // 2), now=since)
        if exists:
            ledger.created(key(port), "1")
    return ledger


def ports(ledger: Ledger, now: float) -> list[int]:
    return [e.key[2] for e in order(ledger.dirty(), now)]


def test_new_connections_go_first_oldest_first_whatever_the_others_carry() -> None:
    ledger = ledger_with((1, 10**9, 0.0, True), (2, 10, 50.0, False), (3, 10, 40.0, False))
    assert ports(ledger, 100.0) == [3, 2, 1]


def test_alike_edges_go_longest_dirty_first() -> None:
    ledger = ledger_with((1, 1000, 30.0, True), (2, 1000, 10.0, True), (3, 1000, 20.0, True))
    assert ports(ledger, 100.0) == [2, 3, 1]


def test_an_edge_missing_many_bytes_goes_before_a_quiet_one_dirty_as_long() -> None:
    ledger = ledger_with((1, 100, 0.0, True), (2, 10**8, 0.0, True), (3, 10**4, 0.0, True))
    assert ports(ledger, 60.0) == [2, 3, 1]
    assert unwritten_bytes(ledger.edges[key(2)]) == 10**8


def test_a_quiet_edge_waiting_long_enough_outranks_any_busy_one() -> None:
    # 1 GiB unwritten weighs its wait 30 times: a quiet edge dirty 31 times as long goes first,
    # one dirty 25 times as long does not.
    assert ports(ledger_with((1, 0, 0.0, True), (2, 2**30, 96.8, True)), 100.0) == [1, 2]
    assert ports(ledger_with((1, 0, 0.0, True), (2, 2**30, 96.0, True)), 100.0) == [2, 1]


def test_a_written_edge_is_not_behind() -> None:
    ledger = ledger_with((1, 1000, 0.0, True))
    edge = ledger.edges[key(1)]
    assert behind(edge, 10.0) > 0
    ledger.written(ledger.plan(key(1)), "2")
    assert behind(edge, 10.0) == 0.0 and not ledger.dirty()


def test_a_round_ranks_only_what_it_can_write_in_the_same_order() -> None:
    rng = random.Random(7)
    ledger = ledger_with(*((p, rng.choice((0, 10, 10**6, 10**9)), rng.uniform(0, 99), rng.random() < 0.8)
                           for p in range(1, 301)))
    full = order(ledger.dirty(), 100.0)
    for limit in (0, 1, 17, 299, 300, 1000):
        assert order(ledger.dirty(), 100.0, limit) == full[:limit]
