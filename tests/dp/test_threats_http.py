"""http-smuggling (and the http detector's raw header lines) and slowloris on crafted requests,
through the inspector and both session tables as the dp runs them: hits, the nearest benign
cases, truncated or garbage input."""

from __future__ import annotations

import random
from functools import partial

import pytest

from flowmap_dp import threats
from flowmap_dp.decode import TCP_ACK as ACK, TCP_SYN as SYN
from flowmap_dp.detection import Inspector
from flowmap_dp.detectors.base import Flow
from flowmap_dp.detectors.http import header_lines, parse_request
from flowmap_dp.session import Timeouts
from flowmap_dp.threats import Bound, Config, smuggling
from tests.dp.synth import Frame, ether, ipv4, tcp
from tests.dp.twins import Twins, blocks_of


def inspect(*client: bytes) -> Inspector:
    insp = Inspector("tcp", 40000, 80, scanners=threats.bind())
    for payload in client:
        if insp.feed(True, payload):
            break
    insp.finish()
    return insp


def found(*client: bytes) -> list[str]:
    return [t.snippet for t in inspect(*client).threats if t.name == "http-smuggling"]


def post(*headers: str, body: bytes = b"") -> bytes:
    return ("POST /upload HTTP/1.1\r\nHost: web\r\n" + "".join(h + "\r\n" for h in headers) + "\r\n").encode(
        "latin-1") + body


def test_header_lines_keep_what_was_sent() -> None:
    head = b"GET / HTTP/1.1\r\nA: 1\r\nA : 2\r\n folded\r\nTransfer-Encoding:\txchunked \r\nnocolon"
    assert header_lines(head) == [("A", " 1"), ("A ", " 2"), (" folded", None), ("Transfer-Encoding", "\txchunked "),
                                  ("nocolon", None)]
    # parse_request still merges: the first value, stripped, names lower case.
    req = parse_request(head + b"\r\n\r\n")
    assert req is not None and req[2] == {"a": "1", "transfer-encoding": "xchunked"}


@pytest.mark.parametrize("headers, want", [
    (("Content-Length: 6", "Transfer-Encoding: chunked"),
     "Content-Length with Transfer-Encoding: Content-Length: 6 | Transfer-Encoding: chunked"),
    (("Transfer-Encoding: chunked", "Content-Length: 4"),
     "Content-Length with Transfer-Encoding: Content-Length: 4 | Transfer-Encoding: chunked"),
    (("Content-Length: 5", "Content-Length: 6"), "conflicting Content-Length: Content-Length: 5 | Content-Length: 6"),
    (("Content-Length: 5, 6",), "conflicting Content-Length: Content-Length: 5, 6"),
    (("Content-Length: -1",), "Content-Length not a number: Content-Length: -1"),
    (("Content-Length: +5",), "Content-Length not a number: Content-Length: +5"),
    (("Content-Length: 0x10",), "Content-Length not a number: Content-Length: 0x10"),
    (("Content-Length: five",), "Content-Length not a number: Content-Length: five"),
    (("Content-Length:",), "Content-Length not a number: Content-Length:"),
    (("Transfer-Encoding: xchunked",), "obfuscated Transfer-Encoding: Transfer-Encoding: xchunked"),
    (("Transfer-Encoding: chunked, identity",), "obfuscated Transfer-Encoding: Transfer-Encoding: chunked, identity"),
    (("Transfer-Encoding: chunked, gzip",), "obfuscated Transfer-Encoding: Transfer-Encoding: chunked, gzip"),
    (("Transfer-Encoding:\x0bchunked",), "obfuscated Transfer-Encoding: Transfer-Encoding:\\x0bchunked"),
    (("Transfer-Encoding: chunked\x00",), "obfuscated Transfer-Encoding: Transfer-Encoding: chunked\\x00"),
    (("Transfer-Encoding: ch\xfcnked",), "obfuscated Transfer-Encoding: Transfer-Encoding: ch\\xfcnked"),
    (("Transfer-Encoding: chunked", "Transfer-Encoding: chunked"),
     "Transfer-Encoding twice: Transfer-Encoding: chunked | Transfer-Encoding: chunked"),
    (("Transfer-Encoding: chunked", "transfer-encoding: identity"),
     "Transfer-Encoding twice: Transfer-Encoding: chunked | transfer-encoding: identity"),
    (("Transfer-Encoding :chunked",), "obfuscated header name: Transfer-Encoding :chunked"),
    (("Transfer_Encoding: chunked",), "obfuscated header name: Transfer_Encoding: chunked"),
    (("X: y", " Transfer-Encoding: chunked"), "obfuscated header name:  Transfer-Encoding: chunked"),
    (("Transfer-Encoding:", " chunked"), "folded header:  chunked"),
    (("Content-Length: 4", "\t4"), "folded header: \t4"),
])
def test_an_ambiguous_length_is_a_hit(headers: tuple[str, ...], want: str) -> None:
    insp = inspect(post(*headers, body=b"0\r\n\r\n"))
    assert insp.app == "http"
    assert [(t.name, t.snippet, t.where) for t in insp.threats] == [("http-smuggling", want, "http.headers")]


@pytest.mark.parametrize("headers", [
    ("Content-Length: 5",),
    ("Content-Length: 5", "Content-Length: 5"),  # identical repeats: RFC 9110 lets them be accepted
    ("Content-Length: 5, 5",),
    ("Content-Length:\t5 ",),  # optional whitespace
    ("Transfer-Encoding: chunked",),
    ("Transfer-Encoding:\tchunked",),
    ("transfer-encoding: CHUNKED",),
    ("Transfer-Encoding: gzip, chunked",),
    ("Transfer-Encoding: gzip,chunked",),
    ("X-Transfer-Encoding: xchunked", "X-Content-Length: -1"),  # other headers
    ("Content-Lengths: 4", "Content-Length: 5"),
    ("X-Long: a", " b", "Content-Length: 5"),  # a folded line, but not of a length header
])
def test_an_unambiguous_request_is_no_hit(headers: tuple[str, ...]) -> None:
    insp = inspect(post(*headers, body=b"hello"))
    assert insp.app == "http" and not insp.threats, insp.threats


def test_later_requests_are_read_after_each_body() -> None:
    chunked = post("Transfer-Encoding: chunked", body=b"5;ext=1\r\nhello\r\n0\r\nTrailer: x\r\n\r\n")
    sized = post("Content-Length: 5", body=b"hello")
    bad = post("Content-Length: 5", "Transfer-Encoding: chunked", body=b"0\r\n\r\n")
    assert found(chunked, sized, bad) == [
        "Content-Length with Transfer-Encoding: Content-Length: 5 | Transfer-Encoding: chunked"]
    assert found(sized, chunked, sized) == []
    # A smuggled request inside a body the front end read as one: the body's own headers are
    # not a request of the stream (the conflict is what shows it).
    assert len(found(post("Content-Length: 44", "Transfer-Encoding: chunked", body=b"0\r\n\r\n" + bad))) == 1


def test_a_request_split_over_packets_is_read_whole() -> None:
    req = post("Content-Length: 3", "Transfer-Encoding: chunked", body=b"0\r\n\r\n")
    assert len(found(req[:20], req[20:45], req[45:])) == 1
    assert found(req[:40]) == []  # the headers that conflict never came


def test_responses_and_other_protocols_are_not_read() -> None:
    insp = Inspector("tcp", 40000, 80, scanners=threats.bind())
    insp.feed(True, b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
    insp.feed(False, b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\n")
    insp.finish()
    assert not insp.threats
    assert smuggling.scan(Flow("tcp", 1, 80, [b"SSH-2.0-x\r\nContent-Length: -1\r\n\r\n"]), "http", {}, {}) == []


def test_truncated_and_garbage_requests_never_raise() -> None:
    rng = random.Random(7)
    base = post("Content-Length: 5", "Transfer-Encoding: chunked", "Content-Length: 6", body=b"0\r\n\r\n") * 3
    for cut in range(len(base) + 1):
        smuggling.scan(Flow("tcp", 1, 80, [base[:cut]]), "http", {}, {})
    alphabet = b"POST / HTTP/1.1\r\n:,-0123456789 \tchunkedContent-LengthTransfer-Encoding\x0b\x00\xff"
    for _ in range(3000):
        junk = b"POST / HTTP/1.1\r\n" + bytes(rng.choice(alphabet) for _ in range(rng.randrange(0, 120)))
        smuggling.scan(Flow("tcp", 1, 80, [junk]), "http", {}, {})


# -------------------------------------------------------------------------- slowloris


def slow(*lines: tuple[float, bytes], config: Config = Config()) -> list[str]:
    insp = Inspector("tcp", 40000, 80, scanners=threats.bind(config))
    for ts, payload in lines:
        if insp.feed(True, payload, ts):
            break
    insp.finish()
    return [t.snippet for t in insp.threats if t.name == "slowloris"]


REQUEST_LINE = b"GET /index.html HTTP/1.1\r\nHost: web\r\n"


def test_headers_trickled_past_the_limit_are_a_hit() -> None:
    lines = [(100.0, REQUEST_LINE), *((100.0 + 3 * i, f"X-a-{i}: {i}\r\n".encode()) for i in range(1, 5))]
    assert slow(*lines) == ["headers incomplete after 12.0 s (6 lines, 77 bytes): GET /index.html HTTP/1.1"]
    assert slow(*lines[:3]) == []  # 6 s: under the default 10
    assert slow(*lines[:3], config=Config.parse([], ["slowloris.seconds=6"])) != []
    assert slow(*lines, config=Config.parse(["slowloris"])) == []


def test_a_slow_request_that_ends_its_headers_is_no_hit() -> None:
    assert slow((100.0, REQUEST_LINE), (105.0, b"X-a: 1\r\n"), (112.0, b"\r\n")) == []
    # Split over packets quickly: the closest benign case.
    request = REQUEST_LINE + b"User-Agent: split\r\nAccept: */*\r\n\r\n"
    assert slow(*((100.0 + 0.05 * i, request[i * 20:(i + 1) * 20]) for i in range(5))) == []


def test_a_slow_body_is_no_hit_a_slow_request_line_is() -> None:
    assert slow((100.0, b"POST / HTTP/1.1\r\nContent-Length: 100\r\n\r\n"), (130.0, b"x")) == []
    # A request line trickled is seen once it ends (the http detector waits 6 packets for it).
    assert slow((100.0, b"GET / HTTP/1.1\r"), (130.0, b"\n")) == [
        "headers incomplete after 30.0 s (1 lines, 16 bytes): GET / HTTP/1.1"]


PSH = 0x08


def _twins(config: Config) -> Twins:
    return Twins(partial(Inspector, scanners=threats.bind(config)), timeouts=Timeouts())


def _tcp_frames(t0: float, *payloads: tuple[float, bytes]) -> list[Frame]:
    c, s = bytes([10, 0, 0, 1]), bytes([10, 0, 0, 2])
    out: list[Frame] = [(ether(ipv4(c, s, 6, tcp(40000, 80, SYN))), t0, None),
                        (ether(ipv4(s, c, 6, tcp(80, 40000, SYN | ACK))), t0, None),
                        (ether(ipv4(c, s, 6, tcp(40000, 80, ACK))), t0, None)]
    out += [(ether(ipv4(c, s, 6, tcp(40000, 80, ACK | PSH, p))), t, None) for t, p in payloads]
    return out


def test_live_an_idle_incomplete_head_waits_for_its_limit_in_both_tables() -> None:
    # A line every 15 s: the table would settle the idle session after 2 s; the scanner asks it to
    # wait until 10 s after the request began, and then the head is still incomplete: a hit.
    twins = _twins(Config())
    twins.feed_blocks(blocks_of(_tcp_frames(100.0, (100.0, REQUEST_LINE))))
    first = twins.collect(100.5)  # the app, as soon as it matched
    assert [(d.app, d.threats) for d in first.sessions] == [("http", [])]
    assert twins.collect(104.0).sessions == []  # idle 4 s, still waiting: nothing to say yet
    (d,) = twins.collect(110.5).sessions
    assert [t.snippet for t in d.threats] == [
        "headers incomplete after 10.5 s (2 lines, 37 bytes): GET /index.html HTTP/1.1"]


def test_live_a_complete_request_settles_when_idle_without_a_hit() -> None:
    twins = _twins(Config())
    twins.feed_blocks(blocks_of(_tcp_frames(100.0, (100.0, REQUEST_LINE + b"\r\n"))))
    twins.collect(100.5)
    (d,) = twins.collect(102.5).sessions  # settled at the usual idle time: its metadata, no threat
    assert d.metadata and d.threats == []


def test_a_raising_wait_is_counted_and_the_session_settles() -> None:
    def boom(flow: Flow, app: str) -> float:
        raise RuntimeError("bug")

    insp = Inspector("tcp", 40000, 80, scanners=(Bound("slowloris", frozenset({"http"}), 0, lambda f, a, m: [], boom),))
    insp.feed(True, REQUEST_LINE, 1.0)
    assert insp.waits(5.0) is False and insp.errors == 1
