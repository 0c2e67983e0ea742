"""What the operator keeps of threats (flowmap_operator.threats): tallies per edge and name, the
status list most severe first, read back as written, and Events bounded per Group and name."""

from __future__ import annotations

from flowmap_api import report_pb2 as pb
from flowmap_operator.threats import MAX_SUMMARY, Alerts, Tally, from_status, ordered, tally, to_status

EDGE = ("shop.web", "shop.db", 5432, "TCP")


def hit(name: str, snippet: str = "", at: float = 0.0) -> pb.ThreatHit:
    return pb.ThreatHit(name=name, snippet=snippet, time_unix_ms=int(at * 1000))


def test_hits_are_tallied_by_name_with_first_last_and_latest_example() -> None:
    tallies: dict[str, Tally] = {}
    assert tally(tallies, [hit("sqlinjection", "' or 1=1", 10), hit("sqlinjection", "", 5)], 100.0) == ["sqlinjection"]
    assert tally(tallies, [hit("heartbleed", "len 16384 > 3"), hit("nonsense", "x", 20)], 100.0) == \
        ["heartbleed", "unknown"]
    assert tallies["sqlinjection"] == Tally(2, 5.0, 10.0, "' or 1=1")  # an empty example keeps the last one
    assert tallies["heartbleed"] == Tally(1, 100.0, 100.0, "len 16384 > 3")  # no time on the hit: the batch's
    assert tallies["unknown"].count == 1


def test_status_lists_the_most_severe_first_and_reads_back_as_written() -> None:
    tallies = {"syn-with-data": Tally(9, 1.0, 2.0, ""), "sqlinjection": Tally(2, 1.0, 2.0, "x"),
               "heartbleed": Tally(1, 1.0, 2.0, ""), "port-scan": Tally(5, 1.0, 2.0, ""),
               "deprecated-tls": Tally(7, 1.0, 2.0, "TLSv1.0")}
    assert ordered(tallies) == ["heartbleed", "sqlinjection", "deprecated-tls", "port-scan", "syn-with-data"]
    items, summary = to_status(tallies)
    assert summary == "heartbleed,sqlinjection,deprecated-tls,port-scan,syn-with-data"
    assert items[0] == {"name": "heartbleed", "severity": "Critical", "count": 1,
                        "firstSeen": "1970-01-01T00:00:01Z", "lastSeen": "1970-01-01T00:00:02Z"}
    assert items[2]["example"] == "TLSv1.0" and items[2]["severity"] == "Medium"
    assert from_status(items) == tallies
    assert from_status("nonsense") == {} and from_status([{"name": 3}, {"name": "a", "count": "1"}]) == {}


def test_the_summary_is_bounded() -> None:
    many = {f"{n}-{i}": Tally(1, 0.0, 0.0, "") for i in range(12) for n in ("heartbleed",)}
    _, summary = to_status(many)
    assert len(summary) == MAX_SUMMARY and summary.endswith("...")


def test_events_once_per_group_and_name_per_cooldown() -> None:
    alerts = Alerts(cooldown=600.0)
    tallies = {"auth-brute-force": Tally(40, 0.0, 0.0, "28P01 x40"), "sqlinjection": Tally(1, 0.0, 0.0, "")}
    alerts.saw(["shop.web", "shop.db"], EDGE, ["auth-brute-force"], tallies, 1000.0)
    alerts.saw(["shop.web", "shop.db"], EDGE, ["auth-brute-force", "sqlinjection"], tallies, 1300.0)
    assert [(a.group, a.name) for a in alerts.queue] == [
        ("shop.web", "auth-brute-force"), ("shop.db", "auth-brute-force"),
        ("shop.web", "sqlinjection"), ("shop.db", "sqlinjection")]
    assert alerts.queue[0].message == ("auth-brute-force (High): shop.web -> shop.db 5432/TCP, 40 hits; "
                                       "e.g. 28P01 x40")
    alerts.saw(["shop.web"], EDGE, ["auth-brute-force"], tallies, 1601.0)  # the cooldown ran out
    assert len(alerts.queue) == 5


def test_the_event_queue_is_bounded_and_counts_what_it_drops() -> None:
    alerts = Alerts(cooldown=600.0, max_queued=3)
    tallies = {"syn-flood": Tally(1, 0.0, 0.0, "")}
    for i in range(5):
        alerts.saw([f"g{i}"], EDGE, ["syn-flood"], tallies, 10.0)
    assert len(alerts.queue) == 3 and alerts.dropped == 2
    alerts.queue.clear()
    alerts.saw(["g4"], EDGE, ["syn-flood"], tallies, 20.0)  # dropped, so not in cooldown: raised when there is room
    assert [a.group for a in alerts.queue] == ["g4"]
