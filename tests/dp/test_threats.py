"""The threat registry (flowmap_dp.threats): its names are flowmap_api.threats', its switches and
thresholds are checked where they are read, and a scanner or a watch that raises costs nothing."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

import pytest

from flowmap_api import threats as api
from flowmap_dp import threats
from flowmap_dp.detection import Inspector
from flowmap_dp.detectors import NAMES as PROTOCOLS
from flowmap_dp.detectors.base import Flow, Threat
from flowmap_dp.session import SessionDelta
from flowmap_dp.threats import Bound, Config, Scanner, Seen, Watcher, Watching


def test_every_dp_name_is_a_known_threat_found_by_the_dp() -> None:
    scanned, watched = [s.name for s in threats.SCANNERS], [w.name for w in threats.WATCHERS]
    assert len(scanned) == len(set(scanned)) and len(watched) == len(set(watched)), "a threat has two detections"
    for name in scanned + watched:
        assert name in api.BY_NAME and api.BY_NAME[name].found_by == "dp", name
    for scanner in threats.SCANNERS:
        assert scanner.apps and scanner.apps <= set(PROTOCOLS), scanner.name


def test_the_api_table_is_well_formed() -> None:
    assert len(api.NAMES) == len(set(api.NAMES))
    for kind in api.KINDS:
        assert kind.severity in api.SEVERITIES and kind.found_by in ("dp", "operator"), kind
        assert kind.name == kind.name.lower() and len(kind.name) <= 32 and kind.name != api.UNKNOWN


def test_config_parses_the_command_line() -> None:
    c = Config.parse(["sqlinjection"], [])
    others = [s.name for s in threats.SCANNERS if s.name != "sqlinjection"]
    assert not c.on("sqlinjection") and [b.name for b in threats.bind(c)] == others
    assert [b.name for b in threats.bind(Config())] == [s.name for s in threats.SCANNERS]


@pytest.mark.parametrize("off, limits, error", [
    (["nope"], [], "no threat detection is called 'nope'"),
    ([], ["sqlinjection.x=1"], "sqlinjection has no limit 'x': it has none"),
    ([], ["nope.x=1"], "no threat detection is called 'nope'"),
    ([], ["sqlinjection=1"], "is not NAME.KEY=VALUE"),
    ([], ["a.b=c"], "'c' is not a number"),
])
def test_config_refuses_what_it_does_not_know(off: list[str], limits: list[str], error: str) -> None:
    with pytest.raises(ValueError, match=error):
        Config.parse(off, limits)


def _limited(monkeypatch: pytest.MonkeyPatch) -> Scanner:
    def scan(flow: Flow, app: str, metadata: Mapping[str, Any], limits: Mapping[str, float]) -> Sequence[Threat]:
        return [Threat("deprecated-tls", f"{limits['at']:g} {len(flow.c2s)}", "test")]

    scanner = Scanner("deprecated-tls", frozenset({"http"}), scan, {"at": 3.0}, linger=12)
    monkeypatch.setattr(threats, "SCANNERS", (scanner,))
    return scanner


def test_a_limit_reaches_its_scanner_and_bad_values_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    _limited(monkeypatch)
    (bound,) = threats.bind(Config.parse([], ["deprecated-tls.at=7"]))
    assert bound.scan(Flow("tcp", 1, 80, [b"x"]), "http", {})[0].snippet == "7 1"
    for bad in ("deprecated-tls.at=-1", "deprecated-tls.at=nan", "deprecated-tls.other=1"):
        with pytest.raises(ValueError, match="deprecated-tls"):
            Config.parse([], [bad])


def test_the_inspector_lingers_as_long_as_a_scanner_of_its_protocol_asks(monkeypatch: pytest.MonkeyPatch) -> None:
    _limited(monkeypatch)
    insp = Inspector("tcp", 40000, 80, scanners=threats.bind())
    request = b"GET / HTTP/1.1\r\nHost: a\r\n\r\n"
    fed = [insp.feed(True, request)]
    fed += [insp.feed(i % 2 == 0, b"HTTP/1.1 200 OK\r\n\r\n" if i % 2 else request) for i in range(1, 16)]
    # http lingers 8 packets on its own; the scanner asks for 12 after the match (packet 0).
    assert fed.index(True) == 12, fed
    assert insp.app == "http" and [t.snippet for t in insp.threats] == ["3 7"]


def test_a_raising_scanner_is_counted_and_the_others_still_run() -> None:
    def boom(flow: Flow, app: str, metadata: Mapping[str, Any]) -> Sequence[Threat]:
        raise RuntimeError("bug")

    good = Bound("sqlinjection", frozenset({"http"}), 0,
                 lambda flow, app, metadata: [Threat("sqlinjection", "x", "test")])
    insp = Inspector("tcp", 40000, 80, scanners=(Bound("heartbleed", frozenset({"http"}), 0, boom), good))
    insp.feed(True, b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
    insp.finish()
    assert insp.errors == 1 and [t.name for t in insp.threats] == ["sqlinjection"]


def _delta(**kw: Any) -> SessionDelta:
    base = SessionDelta("tcp", 6, 0, b"\x0a\x00\x00\x01", 40000, b"\x0a\x00\x00\x02", 80, 1.0, 2.0, True, True, False,
                        "", "established", "http", True, 1, 1, 10, 10, {}, [])
    return replace(base, **kw)


def test_watching_adds_hits_to_the_session_that_tipped_them_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    class Count:
        def __init__(self, limits: Mapping[str, float]) -> None:
            self.seen, self.at = 0, limits["at"]

        def observe(self, session: Seen, now: float) -> Sequence[Threat]:
            if session.server_port == 666:
                raise RuntimeError("bug")
            self.seen += 1
            return [Threat("port-scan", f"{i}", "test") for i in range(6)] if self.seen == self.at else []

    monkeypatch.setattr(threats, "WATCHERS", (Watcher("port-scan", Count, {"at": 2.0}),))
    sessions = [_delta(), _delta(server_port=666), _delta(client_port=40001)]
    watching = Watching()
    watching.observe(5.0, sessions)
    assert watching.errors == 1
    assert [len(s.threats) for s in sessions] == [0, 0, threats.MAX_HITS]
    off = Watching(Config.parse(["port-scan"]))
    more = [_delta(), _delta()]
    off.observe(6.0, more)
    assert [s.threats for s in more] == [[], []]
