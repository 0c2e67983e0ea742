"""Packet captures as the agent asks for them: a Control's entries decoded into specs (or refused
whole, with the reason), the plan that brings the node's captures to a Control, and the files:
kept while listed or in ``keep``, deleted (their bytes given back) when neither. Then live:
``flowmap dp run`` between two pod namespaces, this test as the agent."""

from __future__ import annotations

import hashlib
import ipaddress
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from flowmap_dp import wire_pb2
from flowmap_dp.capturing import Captures, DiskBudget, Spec, State, StopReason, Target, file_name, id_of_file
from flowmap_dp.demand import MAX_WANTED, Malformed, PacketCaptures, Plan, plan, spec_of, status
from flowmap_dp.filtering import Filter, PodDirection
from flowmap_dp.pcapfile import read_records
from tests.dp.test_capturing import _udp
from tests.dp.test_live import Agent, Node, agent, node, start_dp  # noqa: F401 (the fixtures)

ID = "shop/web-dump/0b6f3a52-9f2c-4a8e-8c1e-1f2d3c4b5a69"


def _entry(capture_id: str = ID, **kw: object) -> wire_pb2.PacketCapture:
    fields: dict[str, object] = dict(
        id=capture_id, targets=[wire_pb2.PacketCaptureTarget(name="veth1a2b", description="shop/web web-0")],
        snap_length=128, max_bytes=1 << 20, max_packets=10_000, duration_seconds=60)
    fields.update(kw)
    return wire_pb2.PacketCapture(**fields)  # type: ignore[arg-type]


def test_an_entry_becomes_its_spec() -> None:
    entry = _entry(filters=[
        wire_pb2.PacketCaptureFilter(
            peers=[wire_pb2.PacketCaptureNetwork(address=bytes([10, 0, 0, 0]), prefix_length=8),
                   wire_pb2.PacketCaptureNetwork(address=ipaddress.ip_address("fd00::1").packed, prefix_length=128)],
            protocol=6, port=5432, direction=wire_pb2.PACKET_CAPTURE_DIRECTION_EGRESS),
        wire_pb2.PacketCaptureFilter(protocol=17)], armed=True, pre_trigger_seconds=5, duration_seconds=30)
    assert spec_of(entry) == Spec(
        ID, (Target("veth1a2b", "shop/web web-0"),),
        (Filter((ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("fd00::1/128")), 6, 5432,
                PodDirection.EGRESS), Filter(protocol=17)),
        snaplen=128, max_bytes=1 << 20, max_packets=10_000, duration=30.0, armed=True, pre_trigger=5.0)
    # Host bits under the prefix are the network's (as a CIDR the agent resolved).
    loose = _entry(filters=[wire_pb2.PacketCaptureFilter(peers=[
        wire_pb2.PacketCaptureNetwork(address=bytes([10, 1, 2, 3]), prefix_length=16)])])
    assert spec_of(loose).filters[0].peers == (ipaddress.ip_network("10.1.0.0/16"),)


NET = wire_pb2.PacketCaptureNetwork


@pytest.mark.parametrize("change,why", [
    ({"id": "shop/web"}, "not namespace/name/uid"),
    ({"id": "../../etc/passwd"}, "not namespace/name/uid"),
    ({"id": "shop/web_dump/u1"}, "not namespace/name/uid"),  # "_" would make file names ambiguous
    ({"targets": []}, "0 targets"),
    ({"targets": [wire_pb2.PacketCaptureTarget(name="x" * 16)]}, "is not one"),
    ({"targets": [wire_pb2.PacketCaptureTarget(name="../eth0")]}, "is not one"),
    ({"targets": [wire_pb2.PacketCaptureTarget(name="veth1")] * 2}, "named twice"),
    ({"targets": [wire_pb2.PacketCaptureTarget(name=f"v{i}") for i in range(65)]}, "65 targets"),
    ({"filters": [wire_pb2.PacketCaptureFilter(protocol=1)] * 17}, "17 filters"),
    ({"filters": [wire_pb2.PacketCaptureFilter(peers=[NET(address=b"\x0a\x00\x00", prefix_length=8)])]},
     "3 bytes"),
    ({"filters": [wire_pb2.PacketCaptureFilter(peers=[NET(address=bytes(4), prefix_length=33)])]},
     "prefix length 33"),
    ({"filters": [wire_pb2.PacketCaptureFilter(peers=[NET(address=bytes(4), prefix_length=32)] * 257)]},
     "257 peers"),
    ({"filters": [wire_pb2.PacketCaptureFilter(direction=7)]}, "unknown direction 7"),  # a newer agent's
    ({"filters": [wire_pb2.PacketCaptureFilter(protocol=1, port=53)]}, "a port needs TCP, UDP or SCTP"),
    ({"filters": [wire_pb2.PacketCaptureFilter(port=70000)]}, "out of range"),
    ({"filters": [wire_pb2.PacketCaptureFilter(peers=[NET(address=bytes(16), prefix_length=128)] * 256)] * 2},
     "instructions"),
    ({"snap_length": 0}, "snap length 0"),
    ({"snap_length": 262145}, "snap length 262145"),
    ({"max_bytes": 1023}, "max bytes 1023"),
    ({"max_bytes": (100 << 20) + 1}, "max bytes"),
    ({"max_packets": 0}, "max packets 0"),
    ({"duration_seconds": 0}, "duration 0"),
    ({"duration_seconds": 601}, "duration 601"),
    ({"pre_trigger_seconds": 31, "armed": True}, "pre-trigger seconds 31"),
    ({"pre_trigger_seconds": 5}, "not armed"),
])
def test_a_malformed_entry_is_refused_whole_with_its_reason(change: dict[str, object], why: str) -> None:
    with pytest.raises(Malformed, match=why.replace("(", r"\(")):
        spec_of(_entry(**change))


def test_file_names_give_the_id_back() -> None:
    assert file_name(ID) == "shop_web-dump_0b6f3a52-9f2c-4a8e-8c1e-1f2d3c4b5a69.pcapng"
    assert id_of_file(file_name(ID)) == ID
    for other in ("notes.txt", "a_b.pcapng", "a_b_c_d.pcapng", "A_b_c.pcapng", ".._b_c.pcapng"):
        assert id_of_file(other) is None
    with pytest.raises(ValueError):
        file_name("a/../b")


def _control(*entries: wire_pb2.PacketCapture, keep: tuple[str, ...] = ()) -> wire_pb2.Control:
    return wire_pb2.Control(interfaces=["veth1a2b"], packet_captures=entries, keep=keep)


def test_the_plan_starts_fires_stops_and_deletes() -> None:
    new, armed, running, done, failed = (f"shop/{n}/u" for n in ("new", "armed", "running", "done", "failed"))
    held = {armed: State.ARMED, running: State.RUNNING, done: State.DONE, failed: State.FAILED}
    # Everything held is still listed: only the new one starts, the armed one fires.
    p = plan(_control(_entry(new), _entry(armed, fired=True, fired_ns=2_500_000_000),
                      _entry(running, fired=True), _entry(done),
                      _entry(failed)), held)
    assert p == Plan(start=(spec_of(_entry(new)),), fire=((armed, 2.5),))
    # Nothing listed, the finished one kept: the active ones stop; all but the kept one go.
    p = plan(_control(keep=(done,)), held)
    assert p == Plan(stop=(armed, running), delete=(armed, running, failed))
    # A listed id is kept even when the agent's keep does not name it (it may have just ended).
    assert plan(_control(_entry(done)), held) == Plan(stop=(armed, running), delete=(armed, running, failed))
    # A new capture the trigger already fired for: armed and fired at once; unarmed: nothing to fire.
    p = plan(_control(_entry(new, armed=True, pre_trigger_seconds=5, fired=True)), {})
    assert p.fire == ((new, None),) and p.start[0].pre_trigger == 5  # when: now
    assert plan(_control(_entry(new, fired=True)), {}).fire == ()


def test_the_plan_refuses_a_malformed_entry_and_goes_on() -> None:
    p = plan(_control(_entry("shop/bad/u", duration_seconds=0), _entry("shop/good/u")), {})
    assert [s.id for s in p.start] == ["shop/good/u"]
    assert p.refuse == (("shop/bad/u", "duration 0 not in 1..600"),)
    # Once refused it is held (failed): listed again, it is neither refused nor started again.
    assert plan(_control(_entry("shop/bad/u", duration_seconds=0)), {"shop/bad/u": State.FAILED}) == Plan()


def test_the_plan_bounds_what_it_reads() -> None:
    entries = [_entry(f"shop/c{i}/u") for i in range(MAX_WANTED + 10)]
    p = plan(_control(*entries, _entry(ID)), {})
    assert len(p.start) == MAX_WANTED and ID not in {s.id for s in p.start}
    # An id listed twice: the first entry counts.
    p = plan(_control(_entry(ID, duration_seconds=5), _entry(ID, duration_seconds=9)), {})
    assert [s.duration for s in p.start] == [5.0]


def test_files_of_an_earlier_run_are_kept_deleted_or_reported_interrupted() -> None:
    kept, gone, again = "shop/kept/u", "shop/gone/u", "shop/again/u"
    p = plan(_control(_entry(again), keep=(kept,)), {}, leftovers=(kept, gone, again))
    assert p == Plan(delete=(gone,), interrupted=(again,))


def test_a_status_says_what_the_agent_reads() -> None:
    from flowmap_dp.capturing import Result

    r = Result(ID, State.DONE, 3, 300, 1, 512, "ab" * 32, StopReason.DURATION, "", "/captures/x.pcapng")
    assert status(r) == wire_pb2.PacketCaptureStatus(
        id=ID, state="done", packets=3, bytes=300, drops=1, file_bytes=512, sha256="ab" * 32,
        stop_reason="DurationReached", path="/captures/x.pcapng")
    assert status(Result(ID, State.RUNNING)).stop_reason == ""


# The edge on files, without rings: a capture on an interface that does not exist ends at once
# (InterfaceGone) with its header written, which is all the file logic needs.

def _gone(capture_id: str) -> wire_pb2.PacketCapture:
    return _entry(capture_id, targets=[wire_pb2.PacketCaptureTarget(name="fm-not-there")])


def test_files_are_deleted_when_neither_listed_nor_kept_and_their_bytes_given_back(tmp_path: Path) -> None:
    folder = tmp_path / "captures"  # made by the first capture
    pc = PacketCaptures(folder, 1 << 20, max_captures=4)
    a, b = "shop/a/u", "shop/b/u"
    pc.apply(_control(_gone(a), _gone(b)), time.time())
    results = {s.id: s for s in pc.statuses()}
    assert {s.stop_reason for s in results.values()} == {"InterfaceGone"}
    assert all(Path(s.path).stat().st_size == s.file_bytes > 0 for s in results.values())
    assert pc.captures.budget.used == sum(s.file_bytes for s in results.values())
    pc.apply(_control(keep=(a,)), time.time())
    assert [s.id for s in pc.statuses()] == [a] and not (folder / file_name(b)).exists()
    assert pc.captures.budget.used == results[a].file_bytes
    pc.apply(_control(), time.time())
    assert list(pc.statuses()) == [] and list(folder.iterdir()) == [] and pc.captures.budget.used == 0


def test_the_next_run_counts_the_files_left_and_deletes_those_not_kept(tmp_path: Path) -> None:
    pc = PacketCaptures(tmp_path, 1 << 20, max_captures=4)
    kept, gone, again = "shop/kept/u", "shop/gone/u", "shop/again/u"
    pc.apply(_control(_gone(kept), _gone(gone), _gone(again)), time.time())
    sizes = {s.id: s.file_bytes for s in pc.statuses()}
    (tmp_path / "not-ours.txt").write_text("left alone")
    pc = PacketCaptures(tmp_path, 1 << 20, max_captures=4)  # the dp restarted
    assert pc.captures.budget.used == sum(sizes.values()) and list(pc.statuses()) == []
    pc.apply(_control(_gone(again), keep=(kept,)), time.time())
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([file_name(kept), file_name(again), "not-ours.txt"])
    (interrupted,) = pc.statuses()
    assert (interrupted.id, interrupted.state, interrupted.stop_reason, interrupted.file_bytes) == (
        again, "failed", "Failed", sizes[again])
    assert "interrupted" in interrupted.message
    assert pc.captures.budget.used == sizes[kept] + sizes[again]


def test_a_file_that_cannot_be_made_fails_that_capture_only(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    pc = PacketCaptures(tmp_path / "file" / "captures", 1 << 20, max_captures=4)  # not a directory
    pc.apply(_control(_gone("shop/a/u")), time.time())
    (s,) = pc.statuses()
    assert (s.state, s.stop_reason, s.path) == ("failed", "Failed", "") and "could not start" in s.message


def test_a_planted_link_is_not_followed(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_text("precious")
    (tmp_path / "captures").mkdir()
    (tmp_path / "captures" / file_name("shop/a/u")).symlink_to(victim)
    captures = Captures(tmp_path / "captures", DiskBudget(1 << 20))
    result = captures.start(Spec("shop/a/u", (Target("fm-not-there"),)), time.time())
    assert result.state is State.FAILED and "could not start" in result.message
    assert victim.read_text() == "precious"


# Live: `flowmap dp run` as the node-agent starts it, this test as the agent (tests/dp/test_live.py).

PORT = 6353
LIVE_SIZES = [1, 50, 100, 500, 1000, 1400]


def _status(agent: Agent, capture_id: str) -> wire_pb2.PacketCaptureStatus | None:
    """The capture as worker 0's latest health says it stands."""
    healths = [r.health for r in agent.reports if r.worker == 0 and r.HasField("health")]
    found = [s for s in healths[-1].packet_captures if s.id == capture_id] if healths else []
    return found[0] if found else None


def _stands(agent: Agent, capture_id: str, state: str) -> Callable[[], bool]:
    return lambda: (s := _status(agent, capture_id)) is not None and s.state == state


def _on_pod_b(capture_id: str, node: Node, **kw: object) -> wire_pb2.PacketCapture:
    """A capture of UDP port PORT on pod-b's veth, 128 bytes of each packet."""
    return _entry(capture_id, targets=[wire_pb2.PacketCaptureTarget(name=node.host_b, description="default/b pod-b")],
                  filters=[wire_pb2.PacketCaptureFilter(protocol=17, port=PORT)], **kw)


def _wire(sizes: list[int]) -> list[int]:
    """Frame lengths of the exchange on pod-b's veth: each datagram and its answer (half its
    size) once: Ethernet 14 + IPv4 20 + UDP 8 + payload."""
    return [42 + s for s in sizes] + [42 + s // 2 for s in sizes]


def _records(path: str) -> list[tuple[float, int, int]]:
    return [(r.ts, len(r.data), r.wire_len) for r in read_records(Path(path))]


def test_the_agent_starts_a_capture_gets_its_file_and_has_it_deleted(
        node: Node, agent: Agent, start_dp: Callable[..., object], tmp_path: Path) -> None:
    folder = tmp_path / "captures"
    start_dp("--capture-dir", str(folder))
    both = [node.host_a, node.host_b]
    cid = "default/udp-dump/4f1c"
    agent.reader.set_control(wire_pb2.Control(interfaces=both, packet_captures=[
        _on_pod_b(cid, node, duration_seconds=3)]))
    assert agent.wait(_stands(agent, cid, "running")), _status(agent, cid)
    _udp(node, LIVE_SIZES, PORT)  # and one datagram to PORT + 1, which the filter leaves out
    assert agent.wait(_stands(agent, cid, "done")), _status(agent, cid)
    s = _status(agent, cid)
    assert s is not None and (s.stop_reason, s.drops, s.message) == ("DurationReached", 0, "")
    raw = Path(s.path).read_bytes()
    assert Path(s.path).parent == folder and (s.file_bytes, s.sha256) == (len(raw), hashlib.sha256(raw).hexdigest())
    got = sorted((n, wire) for _, n, wire in _records(s.path))
    assert got == sorted((min(128, w), w) for w in _wire(LIVE_SIZES))
    assert (s.packets, s.bytes) == (len(got), sum(n for n, _ in got))
    # No longer listed but kept: the file stays and is still reported.
    agent.reader.set_control(wire_pb2.Control(interfaces=both, keep=[cid]))
    agent.pump(1.0)
    assert Path(s.path).read_bytes() == raw and _stands(agent, cid, "done")()
    # Neither listed nor kept: deleted, and no longer reported.
    agent.reader.set_control(wire_pb2.Control(interfaces=both))
    assert agent.wait(lambda: bool(agent.reports) and _status(agent, cid) is None and not Path(s.path).exists())
    assert list(folder.iterdir()) == []


def test_an_armed_capture_fired_by_the_agent_holds_the_packets_from_before(
        node: Node, agent: Agent, start_dp: Callable[..., object], tmp_path: Path) -> None:
    start_dp("--capture-dir", str(tmp_path / "captures"))
    both = [node.host_a, node.host_b]
    cid = "default/armed-dump/9c2e"
    entry = _on_pod_b(cid, node, armed=True, pre_trigger_seconds=5, duration_seconds=2)
    agent.reader.set_control(wire_pb2.Control(interfaces=both, packet_captures=[entry]))
    assert agent.wait(_stands(agent, cid, "armed")), _status(agent, cid)
    _udp(node, LIVE_SIZES[:3], PORT)
    agent.pump(0.5)  # the dp has read them into its window (its rings hand over a block every 50 ms)
    s = _status(agent, cid)
    assert s is not None and (s.state, s.packets) == ("armed", 0)  # held in memory, not written yet
    fired = time.time()
    entry.fired = True
    agent.reader.set_control(wire_pb2.Control(interfaces=both, packet_captures=[entry]))
    assert agent.wait(_stands(agent, cid, "running")), _status(agent, cid)
    _udp(node, LIVE_SIZES[3:], PORT)
    assert agent.wait(_stands(agent, cid, "done")), _status(agent, cid)
    s = _status(agent, cid)
    assert s is not None and s.stop_reason == "DurationReached"
    records = _records(s.path)
    assert sorted(wire for ts, _, wire in records if ts < fired) == sorted(_wire(LIVE_SIZES[:3]))
    assert sorted(wire for ts, _, wire in records if ts >= fired) == sorted(_wire(LIVE_SIZES[3:]))
    assert s.packets == len(records) == 2 * len(LIVE_SIZES)
