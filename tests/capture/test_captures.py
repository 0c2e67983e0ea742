"""``flowmap capture``'s pure side: flags into the spec, statuses into lines, the API's refusals
into one line, and a download of real pcapng files (``flowmap_dp.pcapng.Writer``, one per node)
checked part by part against the status, in chunks of any size."""

from __future__ import annotations

import argparse
import io
import json
import time
from pathlib import Path
from typing import Any

import pytest

from flowmap_cli import capture, captures
from flowmap_cli.captures import Part, check, clean, explain, parts
from flowmap_cli.main import build_parser
from flowmap_dp import pcapng
from flowmap_dp.pcapfile import read_records
from flowmap_operator.times import iso


def flags(*argv: str) -> argparse.Namespace:
    return build_parser(["capture"]).parse_args(["capture", "start", "cap", *argv])


def test_flags_give_only_what_they_say() -> None:
    assert captures.spec(flags("--group", "web")) == {"targets": {"groups": ["web"]}}
    assert captures.spec(flags("--selector", "")) == {"targets": {"podSelector": {}}}
    every = flags("--group", "web", "--group", "api", "--group", "web", "--selector", "app=web, tier=front",
                  "--peer-group", "db", "--port", "5432", "--protocol", "TCP", "--direction", "Egress",
                  "--duration", "5m", "--max-bytes", "4Mi", "--max-packets", "500", "--snap-length", "256",
                  "--trigger", "Denied", "--pre-trigger", "10", "--ttl", "2h")
    assert captures.spec(every) == {
        "targets": {"groups": ["web", "api"], "podSelector": {"matchLabels": {"app": "web", "tier": "front"}}},
        "filters": [{"peer": {"group": "db"}, "protocol": "TCP", "port": 5432, "direction": "Egress"}],
        "durationSeconds": 300, "maxBytesPerNode": 4 * 1024 * 1024, "maxPacketsPerNode": 500, "snapLength": 256,
        "ttlSecondsAfterFinished": 7200, "trigger": {"on": "Denied", "preTriggerSeconds": 10}}
    whole = captures.spec(flags("--group", "web", "--peer-cidr", "10.0.0.0/8", "--whole-packets"))
    assert whole == {"targets": {"groups": ["web"]}, "filters": [{"peer": {"cidr": "10.0.0.0/8"}}],
                     "wholePackets": True}
    # What the schema refuses goes to it as given: its message names the field.
    assert captures.spec(flags("--pre-trigger", "3")) == {"targets": {}, "trigger": {"preTriggerSeconds": 3}}
    assert captures.spec(flags("--group", "web", "--protocol", "tcp"))["filters"] == [{"protocol": "tcp"}]


def test_flag_syntax_is_checked_here(capsys: pytest.CaptureFixture[str]) -> None:
    assert [captures.seconds(t) for t in ("90", "90s", "5m", "2h", "7d")] == [90, 90, 300, 7200, 604800]
    assert [captures.size(t) for t in ("1024", "512Ki", "4Mi", "4MiB", "1M", "1k")] == [
        1024, 524288, 4194304, 4194304, 1000000, 1000]
    assert captures.labels("a=1,b=") == {"a": "1", "b": ""} and captures.labels("") == {}
    for bad in (("--duration", "5 minutes"), ("--max-bytes", "4MB/s"), ("--selector", "app"),
                ("--snap-length", "64", "--whole-packets")):
        with pytest.raises(SystemExit) as exit_:
            flags("--group", "web", *bad)
        assert exit_.value.code == 2
    assert "not allowed with argument --snap-length" in capsys.readouterr().err


def test_o_needs_wait_and_stop_is_a_metadata_patch() -> None:
    args = flags("--group", "web", "-o", "x.pcapng")
    with pytest.raises(capture.Failed, match="-o needs --wait"):
        capture._start_checked(args)
    assert captures.stop_patch() == {"metadata": {"annotations": {"flowmap.dev/stop": "true"}}}
    assert captures.body("cap", {"targets": {}}) == {
        "apiVersion": "flowmap.dev/v1alpha1", "kind": "PacketCapture", "metadata": {"name": "cap"},
        "spec": {"targets": {}}}


def test_strings_from_the_cluster_are_escaped_and_bounded() -> None:
    assert clean("web\x1b[2J\nnext\u2028") == "web\\x1b[2J\\x0anext\\u2028"
    assert clean("x" * 500, 10) == "x" * 9 + "…"
    assert clean(None) == "None"


def status(phase: str = "Running", **extra: Any) -> dict[str, Any]:
    return {"phase": phase, "totals": {"packets": 15, "bytes": 1700, "drops": 0, "fileBytes": 2600},
            "nodes": [{"node": "node-a", "phase": "Running", "packets": 10, "fileBytes": 1500},
                      {"node": "node-b", "phase": "Completed", "packets": 5, "fileBytes": 1100, "sha256": "ab" * 32,
                       "stopReason": "MaxBytesReached"}], **extra}


def test_list_rows_and_progress_lines() -> None:
    now = float(int(time.time()))
    obj = {"metadata": {"name": "web\x1bx", "creationTimestamp": iso(now - 200)},
           "spec": {"trigger": {"on": "Denied"}}, "status": status()}
    assert captures.row(obj, now, now - 200) == ["web\\x1bx", "Running", "Denied", "15", "2.5 KiB", "3m", "1/2"]
    stopping = {**obj, "metadata": {**obj["metadata"], "annotations": {"flowmap.dev/stop": "true"}}}
    assert captures.row(stopping, now, now - 5)[1] == "Running(stopping)"
    assert captures.row({"metadata": {"name": "new"}}, now, None) == ["new", "Pending", "-", "0", "0 B", "-", "0/0"]
    lines = captures.table([captures.row(obj, now, now - 200), ["a-much-longer-name", "Completed", "-", "1", "0 B",
                                                                "4d", "2/2"]])
    assert lines[0].split() == ["NAME", "PHASE", "TRIGGER", "PACKETS", "SIZE", "AGE", "NODES"]
    assert len({line.index(line.split()[1]) for line in lines}) == 1  # PHASE aligned
    assert captures.progress(status()) == ("Running: 15 packets, 1.7 KiB captured, file 2.5 KiB | node-a Running "
                                           "10 pkts 1.5 KiB | node-b Completed 5 pkts 1.1 KiB")
    assert [captures.human(n) for n in (0, 1023, 1024, 5 << 20, 3 << 30)] == [
        "0 B", "1023 B", "1.0 KiB", "5.0 MiB", "3.0 GiB"]
    done = {"phase": "Completed", "conditions": [
        {"type": "Ready", "reason": "Stopped", "message": "stopped by the user"},
        {"type": "Complete", "reason": "Stopped", "message": "stopped by the user (flowmap.dev/stop); node-a: Stopped"}]}
    assert captures.outcome(done) == "Stopped: stopped by the user (flowmap.dev/stop); node-a: Stopped"


def test_refusals_are_the_api_servers_message() -> None:
    forbidden = json.dumps({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "Forbidden",
                            "code": 403, "message": 'packetcaptures.results.flowmap.dev "web" is forbidden: User '
                                                    '"alice" cannot get resource "packetcaptures/pcapng"'}).encode()
    assert explain(403, forbidden, results=True).startswith('packetcaptures.results.flowmap.dev "web" is forbidden')
    # The API server's own 404 for a group nobody serves: no name in its details.
    generic = json.dumps({"kind": "Status", "code": 404, "reason": "NotFound",
                          "message": "the server could not find the requested resource", "details": {}})
    assert "results API is not installed" in explain(404, generic, results=True)
    named = json.dumps({"kind": "Status", "code": 404, "reason": "NotFound", "message": 'packetcaptures "x" not found',
                        "details": {"name": "x", "kind": "packetcaptures"}})
    assert explain(404, named, results=True) == 'packetcaptures "x" not found'
    assert "is the operator running" in explain(503, b"service unavailable", results=True)
    assert explain(500, b"<html>oops</html>") == "the API server answered 500"
    assert "\x1b" not in explain(422, json.dumps({"kind": "Status", "message": "bad\x1b[2Jname"}))
    assert "401 Unauthorized" in explain(401, b"")
    invalid = {"kind": "Status", "code": 422, "reason": "Invalid",
               "message": 'PacketCapture.flowmap.dev "p" is invalid: [spec.trigger.on: Required value, <nil>: Invalid '
                          'value: null: some validation rules were not checked because the object was invalid]',
               "details": {"name": "p", "causes": [
                   {"reason": "FieldValueRequired", "message": "Required value", "field": "spec.trigger.on"},
                   {"reason": "FieldValueInvalid", "message": "Invalid value: null: some validation rules were not "
                                                              "checked", "field": "<nil>"}]}}
    assert explain(422, json.dumps(invalid)) == 'PacketCapture.flowmap.dev "p" is invalid: spec.trigger.on: Required value'


# -- a download checked against the status -----------------------------------------------------------


def node_file(node: str, count: int) -> tuple[bytes, dict[str, Any]]:
    """A real capture file as the dp writes it, and the node's status entry for it."""
    out = io.BytesIO()
    w = pcapng.Writer(out, 1 << 20)
    w.section(comment=f"shop/cap on {node}")
    iface = w.interface("veth1", f"shop/web web-{node}", 128)
    assert iface is not None
    for i in range(count):
        frame = bytes(14) + bytes([i % 256]) * (60 + i)
        w.packet(iface, 1_700_000_000_000_000_000 + i, frame[:128], len(frame))
    return out.getvalue(), {"node": node, "phase": "Completed", "packets": count, "fileBytes": w.size,
                            "sha256": w.hexdigest(), "stopReason": "DurationReached"}


def chunked(data: bytes, size: int) -> list[bytes]:
    return [data[i:i + size] for i in range(0, len(data), size)]


def test_a_download_is_each_finished_nodes_file_in_node_order(tmp_path: Path) -> None:
    b, entry_b = node_file("node-b", 3)
    a, entry_a = node_file("node-a", 5)
    running = {"node": "node-c", "phase": "Running", "packets": 9, "fileBytes": 4000}  # no sha256: not sent
    st = {"phase": "Running", "nodes": [entry_b, running, entry_a]}
    expected = parts(st)
    assert [p.node for p in expected] == ["node-a", "node-b"]
    assert parts(st, "node-b") == [Part("node-b", len(b), entry_b["sha256"], 3)] and parts(st, "node-c") == []
    body = a + b
    for size in (1, 7, len(a), len(a) + 1, 64 * 1024):
        verdict = check(expected, chunked(body, size))
        assert verdict.ok and verdict.got == [len(a), len(b)], size
    assert verdict.lines()[0].startswith("node-a: ") and verdict.lines()[0].endswith("5 packets, sha256 "
                                                                                     f"{entry_a['sha256'][:12]}… ok")
    # What the results API sends is a file Wireshark reads: two sections, every packet.
    (tmp_path / "both.pcapng").write_bytes(body)
    assert len(list(read_records(tmp_path / "both.pcapng"))) == 8


def test_a_download_that_differs_from_the_status_is_refused() -> None:
    a, entry_a = node_file("node-a", 5)
    b, entry_b = node_file("node-b", 3)
    expected = parts({"nodes": [entry_a, entry_b]})
    cut = check(expected, chunked(a + b[:-4], 100))
    assert not cut.ok and "MISMATCH: 4 bytes received" not in " ".join(cut.lines())
    assert any(f"{len(b) - 4} bytes received, the status says {len(b)}" in line for line in cut.lines())
    flipped = bytearray(a + b)
    flipped[len(a) + 40] ^= 1
    wrong = check(expected, [bytes(flipped)])
    assert not wrong.ok and wrong.lines()[0].endswith("ok") and "MISMATCH: sha256" in wrong.lines()[1]
    longer = check(expected, [a, b, b"\0" * 10])
    assert not longer.ok and longer.lines()[-1] == "MISMATCH: 10 bytes more than the status's files"
    swapped = check(expected, [b, a])  # in another order than the status's: refused
    assert not swapped.ok


class Answer:
    """An HTTP answer as urllib3 gives it with preload_content=False: read in chunks, never whole."""

    def __init__(self, body: bytes, code: int = 200, fail_after: int | None = None) -> None:
        self.body, self.status, self.fail_after, self.released = body, code, fail_after, False
        self.largest = 0

    def stream(self, amt: int) -> Any:
        from urllib3.exceptions import ProtocolError

        for i, chunk in enumerate(chunked(self.body, min(amt, 4096))):  # a network's pieces are smaller
            if self.fail_after is not None and i >= self.fail_after:
                raise ProtocolError("Connection broken: IncompleteRead")
            self.largest = max(self.largest, len(chunk))
            yield chunk

    def read(self, amt: int) -> bytes:
        return self.body[:amt]

    def release_conn(self) -> None:
        self.released = True


class Cluster:
    """A Session with the API's answers given: the status, then the files."""

    def __init__(self, st: dict[str, Any], answer: Answer, later: dict[str, Any] | None = None) -> None:
        self.statuses, self.answer, self.asked = [st, later or st], answer, []

    def read(self, name: str) -> dict[str, Any]:
        return {"status": self.statuses.pop(0) if len(self.statuses) > 1 else self.statuses[0]}

    def results(self, name: str, node: str | None) -> Answer:
        self.asked.append(node)
        return self.answer


def test_get_writes_the_file_only_once_every_part_checks(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    a, entry_a = node_file("node-a", 300)
    b, entry_b = node_file("node-b", 3)
    st = {"phase": "Completed", "nodes": [entry_a, entry_b]}
    out = tmp_path / "out.pcapng"
    answer = Answer(a + b)
    assert capture._get_files(Cluster(st, answer), "cap", str(out), None, None) == 0  # type: ignore[arg-type]
    assert out.read_bytes() == a + b and answer.released and answer.largest <= 4096
    assert oct(out.stat().st_mode & 0o777) == "0o600"  # packets carry payload
    err = capsys.readouterr().err
    assert "node-a: " in err and "300 packets" in err and "2 node files" in err
    # One node's: asked by name, checked against that node's entry alone.
    cluster = Cluster(st, Answer(b))
    assert capture._get_files(cluster, "cap", str(tmp_path / "b.pcapng"), "node-b", None) == 0  # type: ignore[arg-type]
    assert cluster.asked == ["node-b"] and (tmp_path / "b.pcapng").read_bytes() == b
    # Wrong bytes, a broken connection, or nothing finished: an error, and nothing under the name.
    for bad in (Cluster(st, Answer(a + b[:-1])), Cluster(st, Answer(a + b, fail_after=1)),
                Cluster({"phase": "Running", "nodes": [{"node": "node-a", "phase": "Running"}]}, Answer(b""))):
        with pytest.raises(capture.Failed):
            capture._get_files(bad, "cap", str(tmp_path / "bad.pcapng"), None, None)  # type: ignore[arg-type]
        assert sorted(p.name for p in tmp_path.iterdir()) == ["b.pcapng", "out.pcapng"]  # no half file, no .part


def test_a_node_finishing_during_the_download_is_read_again(tmp_path: Path) -> None:
    a, entry_a = node_file("node-a", 4)
    b, entry_b = node_file("node-b", 2)
    before = {"phase": "Running", "nodes": [entry_a, {"node": "node-b", "phase": "Running"}]}
    after = {"phase": "Completed", "nodes": [entry_a, entry_b]}
    assert capture._get_files(Cluster(before, Answer(a + b), after), "cap",  # type: ignore[arg-type]
                              str(tmp_path / "x.pcapng"), None, None) == 0
    assert (tmp_path / "x.pcapng").read_bytes() == a + b


class Watched:
    """A Session whose capture moves on at each read."""

    def __init__(self, *statuses: dict[str, Any]) -> None:
        self.statuses = list(statuses)

    def read(self, name: str) -> dict[str, Any]:
        return {"status": self.statuses.pop(0) if len(self.statuses) > 1 else self.statuses[0]}


def test_wait_shows_one_line_per_change_until_it_finishes(capsys: pytest.CaptureFixture[str]) -> None:
    pending = {"phase": "Pending"}
    done = {**status("Completed"), "conditions": [{"type": "Complete", "reason": "DurationReached", "message": "m"}]}
    last = capture._follow(Watched(pending, pending, status(), status(), done), "cap", poll=0)  # type: ignore[arg-type]
    assert last == done
    lines = capsys.readouterr().err.splitlines()  # not a terminal: a line per change, no escapes
    assert [line.split(":")[0] for line in lines] == ["Pending", "Running", "Completed"]
    assert captures.outcome(last) == "DurationReached: m"
