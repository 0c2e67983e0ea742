"""The edge series' marks: fresh (what was counted, written or not) and never going back, through a
crash of the operator, a change of leader, a lost write and a Connection deleted by hand.

A Ledger fed as the report path feeds it, and EdgeTotals driven as flowmap_operator.checkpointing
drives it, with a dict of encoded shards for the ConfigMaps.
"""

from __future__ import annotations

import json
import zlib

import pytest

from flowmap_operator import highwater
from flowmap_operator.highwater import OTHER, SHARDS, EdgeTotals, decode, encode, shard
from flowmap_operator.ledger import Counters, EdgeKey, Ledger

WEB_API: EdgeKey = ("shop.web", "shop.api", 8080, "TCP")
API_PG: EdgeKey = ("shop.api", "shop.postgres", 5432, "TCP")
API_REDIS: EdgeKey = ("shop.api", "shop.redis", 6379, "TCP")


class Store:
    """The sixteen ConfigMaps: encoded marks per shard, and whether writes land."""

    def __init__(self) -> None:
        self.shards: dict[int, bytes] = {}
        self.down = False

    def load(self, totals: EdgeTotals) -> None:
        for index, data in self.shards.items():
            totals.load(index, decode(data))

    def round(self, totals: EdgeTotals, ledger: Ledger) -> None:
        for index, marks in totals.take(highwater.applied(ledger.edges.values())).items():
            if not self.down:
                self.shards[index] = encode(marks)
                totals.wrote(index, marks)
        totals.publish()


def report(ledger: Ledger, agent: str, seq: int, key: EdgeKey, count: int) -> None:
    ledger.begin_batch(agent, "node-" + agent, seq, acked=seq - 1, previous=seq - 1)
    ledger.apply(agent, seq, key, Counters(count, 2 * count, 1, 1, 1), now=float(seq))


def exported(totals: EdgeTotals, key: EdgeKey) -> int:
    return totals.published[key].bytes_c2s if key in totals.published else -1


def test_the_series_show_what_was_counted_before_it_is_written_and_never_fall_through_a_crash() -> None:
    ledger, store, totals = Ledger(), Store(), EdgeTotals(cap=10)
    ledger.load(WEB_API, Counters(1000, 0, 0, 0, 0), [], "1")  # the Connection as written
    report(ledger, "a", 1, WEB_API, 300)
    report(ledger, "b", 1, WEB_API, 200)
    store.round(totals, ledger)
    assert exported(totals, WEB_API) == 1500  # written 1000 + waiting 500: fresh
    ledger.written(ledger.plan(WEB_API), "2")
    report(ledger, "a", 2, WEB_API, 50)  # counted, not written, and not checkpointed: lost in the crash
    seen = [exported(totals, WEB_API)]

    # kill -9: a new operator loads the Connection (1500) and the marks, then the agents resend.
    ledger, totals = Ledger(), EdgeTotals(cap=10)
    ledger.load(WEB_API, Counters(1500, 0, 0, 0, 0), [("a", "node-a", 1), ("b", "node-b", 1)], "2")
    store.load(totals)
    store.round(totals, ledger)
    seen.append(exported(totals, WEB_API))
    report(ledger, "a", 2, WEB_API, 50)  # the resend
    store.round(totals, ledger)
    seen.append(exported(totals, WEB_API))
    assert seen == [1500, 1500, 1550]


def test_a_new_leader_that_has_counted_less_than_was_exported_shows_the_mark_until_it_catches_up() -> None:
    ledger, store, totals = Ledger(), Store(), EdgeTotals(cap=10)
    ledger.load(WEB_API, Counters(), [], "1")
    for seq in range(1, 4):
        report(ledger, "a", seq, WEB_API, 100)
    store.round(totals, ledger)
    assert exported(totals, WEB_API) == 300 and totals.published[WEB_API].bytes_s2c == 600

    # The new leader has only the Connection as written (nothing), and agent a's first resend.
    ledger, totals = Ledger(), EdgeTotals(cap=10)
    ledger.load(WEB_API, Counters(), [], "1")
    store.load(totals)
    report(ledger, "a", 1, WEB_API, 100)
    store.round(totals, ledger)
    assert exported(totals, WEB_API) == 300
    for seq in range(2, 5):
        report(ledger, "a", seq, WEB_API, 100)
    store.round(totals, ledger)
    assert exported(totals, WEB_API) == 400


def test_only_marks_the_store_took_are_exported() -> None:
    ledger, store, totals = Ledger(), Store(), EdgeTotals(cap=10)
    ledger.load(WEB_API, Counters(), [], "1")
    report(ledger, "a", 1, WEB_API, 100)
    store.round(totals, ledger)
    store.down = True  # the API server is away: nothing new is exported, and nothing is forgotten
    report(ledger, "a", 2, WEB_API, 100)
    store.round(totals, ledger)
    assert exported(totals, WEB_API) == 100
    store.down = False
    store.round(totals, ledger)
    assert exported(totals, WEB_API) == 200


def test_another_replicas_higher_marks_are_merged_count_by_count() -> None:
    totals = EdgeTotals(cap=10)
    totals.load(shard(WEB_API), {WEB_API: Counters(10, 50, 1, 9, 3)})
    totals.load(shard(WEB_API), {WEB_API: Counters(20, 40, 2, 8, 3)})  # after a conflict: read again
    ledger = Ledger()
    ledger.load(WEB_API, Counters(15, 60, 0, 0, 0), [], "1")
    changed = totals.take(highwater.applied(ledger.edges.values()))
    assert changed == {shard(WEB_API): {WEB_API: Counters(20, 60, 2, 9, 3)}}


def test_a_connection_deleted_by_hand_starts_again_and_its_series_stays_flat_until_it_passes() -> None:
    ledger, store, totals = Ledger(), Store(), EdgeTotals(cap=10)
    ledger.load(WEB_API, Counters(500, 0, 0, 0, 0), [], "1")
    store.round(totals, ledger)
    ledger.vanished(WEB_API)
    ledger.created(WEB_API, "7")
    report(ledger, "a", 1, WEB_API, 300)
    store.round(totals, ledger)
    assert exported(totals, WEB_API) == 500
    report(ledger, "a", 2, WEB_API, 300)
    store.round(totals, ledger)
    assert exported(totals, WEB_API) == 600


def test_other_keeps_its_mark_through_a_restart_that_folds_other_edges() -> None:
    ledger, store, totals = Ledger(), Store(), EdgeTotals(cap=1)
    for n, key in enumerate((WEB_API, API_PG, API_REDIS), start=1):
        ledger.load(key, Counters(100 * n, 0, 0, 0, 0), [], str(n))
    store.round(totals, ledger)
    assert list(totals.published) == [WEB_API, OTHER] and exported(totals, OTHER) == 500
    assert totals.overflow == 2

    # After a restart the ledger lists the edges in another order: postgres gets the one slot.
    ledger, totals = Ledger(), EdgeTotals(cap=1)
    for n, key in ((2, API_PG), (1, WEB_API), (3, API_REDIS)):
        ledger.load(key, Counters(100 * n, 0, 0, 0, 0), [], str(n))
    store.load(totals)
    store.round(totals, ledger)
    assert list(totals.published) == [API_PG, OTHER]
    assert exported(totals, OTHER) == 500  # 100 + 300 counted now; the mark holds
    assert WEB_API not in totals.published  # an edge folded now leaves its shard
    assert all(WEB_API not in decode(data) for data in store.shards.values())


def test_a_forgotten_edge_leaves_the_store_and_frees_its_slot() -> None:
    ledger, store, totals = Ledger(), Store(), EdgeTotals(cap=1)
    ledger.load(WEB_API, Counters(1, 0, 0, 0, 0), [], "1")
    store.round(totals, ledger)
    ledger.forget(WEB_API)
    ledger.load(API_PG, Counters(2, 0, 0, 0, 0), [], "2")
    store.round(totals, ledger)
    assert list(totals.published) == [API_PG] and totals.overflow == 0
    assert all(WEB_API not in decode(data) for data in store.shards.values())


def test_shards_are_stable_and_what_is_stored_reads_back() -> None:
    # The shard of a key is part of the store's format: a new release must find the old marks.
    assert SHARDS == 16 and [shard(k) for k in (WEB_API, API_PG, API_REDIS, OTHER)] == [12, 3, 3, 15]
    marks = {WEB_API: Counters(2 ** 63, 1, 2, 3, 4), ("\u00e9\udcff", "x", 0, "UDP"): Counters()}
    assert decode(encode(marks)) == marks


@pytest.mark.parametrize("data, reason", [
    (b"not compressed", "not compressed marks"),
    (zlib.compress(b"{"), "not JSON"),
    (zlib.compress(b'{"version": 2, "marks": []}'), "not version 1"),
    (zlib.compress(json.dumps({"version": 1, "marks": [["a", "b", 1, "TCP", 1, 2, 3, 4]]}).encode()), "a row"),
    (zlib.compress(json.dumps({"version": 1, "marks": [["a", "b", 1, "TCP", 1, 2, 3, 4, -5]]}).encode()), "a row"),
    (zlib.compress(json.dumps({"version": 1, "marks": [["a", "b", 1, "TCP", 1, 2, 3, 4, True]]}).encode()), "a row"),
    (zlib.compress(json.dumps({"version": 1, "marks": [["a", 7, 1, "TCP", 1, 2, 3, 4, 5]]}).encode()), "a row"),
    (zlib.compress(b" " * (highwater.MAX_STORED + 1)), "unpacks to more than"),
])
def test_a_shard_someone_else_wrote_is_refused_with_its_reason(data: bytes, reason: str) -> None:
    with pytest.raises(ValueError, match=reason):
        decode(data)
