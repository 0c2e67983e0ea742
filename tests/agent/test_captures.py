"""Packet captures in the dp's words (flowmap_agent.captures, pure): the operator's orders and the
agent's pods into Control.packet_captures and keep; the dp's statuses back for the operator."""

from __future__ import annotations

import re

import pytest

from flowmap_agent.captures import (MAX_DESCRIPTION, MAX_MESSAGE, MAX_STATUSES, local_pods, local_vms, orders,
                                    statuses, upload_path, uploads)
from flowmap_agent.domains import parse
from flowmap_agent.errors import Unservable
from flowmap_api import report_pb2 as pb
from flowmap_dp import demand, wire_pb2
from flowmap_dp.demand import MAX_KEEP, MAX_WANTED

PODS = {"shop/web-7d4b9-abcde": "cali1234", "shop/db-0": "veth99"}  # pod -> its interface
WORKLOADS = {"shop/web-7d4b9-abcde": "web", "shop/db-0": "db"}  # as the operator names them
ID = "shop/cap/0f1e2d3c-aaaa-bbbb-cccc-000000000001"


def order(pods: tuple[str, ...] | list[str] = ("shop/web-7d4b9-abcde",), **fields: object) -> pb.CaptureOrder:
    base: dict[str, object] = dict(id=ID, snap_length=128, max_bytes=1 << 20, max_packets=10_000, duration_seconds=60,
                                   targets=[pb.CaptureTarget(pod=p, workload=WORKLOADS.get(p, "")) for p in pods])
    base.update(fields)
    return pb.CaptureOrder(**base)  # type: ignore[arg-type]


def test_an_order_becomes_the_dp_entry_the_dp_accepts() -> None:
    o = order(pods=["shop/web-7d4b9-abcde", "shop/db-0"], armed=True, pre_trigger_seconds=5, fired=True,
              fired_unix_ms=1_700_000_000_250, filters=[
        pb.CaptureFilter(cidrs=["10.0.0.0/8", "fd00::1/128"], protocol=pb.TCP, port=5432,
                         direction=pb.CAPTURE_DIRECTION_EGRESS),
        pb.CaptureFilter(protocol=pb.ICMP, direction=pb.CAPTURE_DIRECTION_INGRESS),
        pb.CaptureFilter(protocol=pb.UDP), pb.CaptureFilter(protocol=pb.SCTP, cidrs=["192.168.1.7/24"])])
    made = orders(pb.NodeCaptures(version=3, captures=[o]), PODS)
    assert made.refused == {} and made.keep == ()
    (entry,) = made.captures
    assert entry == wire_pb2.PacketCapture(
        id=ID, snap_length=128, max_bytes=1 << 20, max_packets=10_000, duration_seconds=60, armed=True,
        pre_trigger_seconds=5, fired=True, fired_ns=1_700_000_000_250_000_000,
        targets=[wire_pb2.PacketCaptureTarget(name="cali1234", description="shop/web web-7d4b9-abcde"),
                 wire_pb2.PacketCaptureTarget(name="veth99", description="shop/db db-0")],
        filters=[wire_pb2.PacketCaptureFilter(
                     peers=[wire_pb2.PacketCaptureNetwork(address=bytes([10, 0, 0, 0]), prefix_length=8),
                            wire_pb2.PacketCaptureNetwork(address=bytes([0xfd] + [0] * 14 + [1]), prefix_length=128)],
                     protocol=6, port=5432, direction=wire_pb2.PACKET_CAPTURE_DIRECTION_EGRESS),
                 wire_pb2.PacketCaptureFilter(protocol=1, direction=wire_pb2.PACKET_CAPTURE_DIRECTION_INGRESS),
                 wire_pb2.PacketCaptureFilter(protocol=17),
                 wire_pb2.PacketCaptureFilter(  # host bits cleared: the network the CIDR names
                     peers=[wire_pb2.PacketCaptureNetwork(address=bytes([192, 168, 1, 0]), prefix_length=24)],
                     protocol=132)])
    demand.spec_of(entry)  # the dp takes it as it is


def test_unknown_target_pods_are_left_out_and_an_order_without_any_waits_its_file_kept() -> None:
    waiting = order(id="shop/later/uid-2", pods=["shop/not-here-yet"])
    partly = order(pods=["shop/elsewhere", "shop/db-0"])
    made = orders(pb.NodeCaptures(captures=[waiting, partly], keep=["shop/old/uid-0"]), PODS)
    assert [e.id for e in made.captures] == [ID]
    assert [t.name for t in made.captures[0].targets] == ["veth99"]
    assert made.keep == ("shop/later/uid-2", "shop/old/uid-0")  # the dp deletes a file neither listed nor kept
    # The pod appears: the order goes to the dp.
    later = orders(pb.NodeCaptures(captures=[waiting, partly]), {**PODS, "shop/not-here-yet": "veth7"})
    assert [e.id for e in later.captures] == ["shop/later/uid-2", ID] and later.keep == ()


def test_one_interface_is_named_once_and_an_id_ordered_twice_counts_once() -> None:
    pods = {"shop/a": "veth1", "shop/b": "veth1"}
    made = orders(pb.NodeCaptures(captures=[order(pods=["shop/a", "shop/b"]), order(pods=["shop/b"], snap_length=64)]),
                  pods)
    (entry,) = made.captures
    assert [t.name for t in entry.targets] == ["veth1"] and entry.snap_length == 128


def test_what_the_agent_cannot_say_is_refused_never_widened() -> None:
    bad = [order(id="shop/a/1", filters=[pb.CaptureFilter(cidrs=["10.0.0.0/8"]), pb.CaptureFilter(cidrs=["web"])]),
           order(id="shop/b/1", filters=[pb.CaptureFilter(protocol=99)]),  # type: ignore[arg-type]
           order(id="shop/c/1", filters=[pb.CaptureFilter(direction=7)]),  # type: ignore[arg-type]
           order(id="shop/d/1", pods=["shop/nowhere"], filters=[pb.CaptureFilter(cidrs=["x" * 1000])])]
    made = orders(pb.NodeCaptures(captures=bad), PODS)
    assert made.captures == ()
    assert made.refused == {"shop/a/1": "peer 'web' is not a CIDR", "shop/b/1": "unknown protocol 99",
                            "shop/c/1": "unknown direction 7", "shop/d/1": f"peer {'x' * 64!r} is not a CIDR"}
    assert set(made.keep) == set(made.refused)  # a file of theirs stays
    reported = statuses([], made.refused)
    assert reported[0] == pb.CaptureStatus(id="shop/a/1", state="failed", stop_reason="Failed",
                                           message="peer 'web' is not a CIDR")


def test_what_the_dp_refuses_goes_through_as_asked() -> None:
    """One place for the dp's rules: a bound past the schema's is the dp's to refuse, saying why."""
    made = orders(pb.NodeCaptures(captures=[order(max_bytes=1 << 40, filters=[pb.CaptureFilter(port=80)])]), PODS)
    (entry,) = made.captures
    assert entry.max_bytes == 1 << 40 and entry.filters[0].port == 80
    plan = demand.plan(wire_pb2.Control(packet_captures=made.captures), {})
    assert [i for i, _ in plan.refuse] == [ID]


def test_sizes_are_bounded() -> None:
    many = [order(id=f"shop/c{i}/u") for i in range(MAX_WANTED + 10)]
    keep = [f"shop/k{i}/u" for i in range(MAX_KEEP + 10)]
    made = orders(pb.NodeCaptures(captures=many, keep=keep), PODS)
    assert len(made.captures) == MAX_WANTED and len(made.keep) == MAX_KEEP
    long = {"ns/" + "p" * 300: "veth1"}  # no workload said: the pod's name stands in, cut as well
    (entry,) = orders(pb.NodeCaptures(captures=[order(pods=list(long))]), long).captures
    assert len(entry.targets[0].description) == MAX_DESCRIPTION
    dp = [wire_pb2.PacketCaptureStatus(id=f"shop/s{i:05}/u", state="running" * 20, sha256="f" * 500,
                                       stop_reason="R" * 500, message="m" * 5000, path="/x")
          for i in range(MAX_STATUSES + 5)]
    out = statuses(dp, {})
    assert len(out) == MAX_STATUSES
    assert all(len(s.state) <= 64 and len(s.sha256) == 64 and len(s.stop_reason) == 64
               and len(s.message) == MAX_MESSAGE for s in out)


def test_the_dp_statuses_become_the_operators() -> None:
    dp = [wire_pb2.PacketCaptureStatus(id="shop/b/2", state="done", packets=10, bytes=1280, drops=1, file_bytes=2048,
                                       sha256="ab" * 32, stop_reason="DurationReached", path="/var/lib/x.pcapng"),
          wire_pb2.PacketCaptureStatus(id="shop/a/1", state="armed")]
    assert statuses(dp, {}) == [
        pb.CaptureStatus(id="shop/a/1", state="armed"),
        pb.CaptureStatus(id="shop/b/2", state="done", packets=10, bytes=1280, drops=1, file_bytes=2048,
                         sha256="ab" * 32, stop_reason="DurationReached")]


def test_local_pods_join_the_pod_watch_and_the_plumbing() -> None:
    by_ip = {"10.244.1.5": "shop/web-1", "fd00::5": "shop/web-1", "10.244.1.6": "shop/db-0", "10.244.1.7": "x/gone"}
    interfaces = {"10.244.1.5": "veth5", "fd00::5": "veth5", "10.244.1.6": "veth6", "10.244.1.8": "veth8"}
    assert local_pods(by_ip, interfaces) == {"shop/web-1": "veth5", "shop/db-0": "veth6"}


def ask(*requests: str) -> list[pb.UploadRequest]:
    return [pb.UploadRequest(request=r, id=ID) for r in requests]


def test_uploads_start_each_request_once_two_at_a_time_and_cancel_the_withdrawn() -> None:
    todo = uploads(ask("r1", "r2", "r3"), serving=(), served=())
    assert [r.request for r in todo.start] == ["r1", "r2"] and todo.cancel == ()
    todo = uploads(ask("r1", "r2", "r3"), serving=("r1", "r2"), served=())
    assert todo.start == () and todo.cancel == ()
    todo = uploads(ask("r2", "r3", "r4"), serving=("r1", "r2"), served=())  # r1 withdrawn: room for r3
    assert [r.request for r in todo.start] == ["r3"] and todo.cancel == ("r1",)
    todo = uploads(ask("r1", "r2", "r3"), serving=("r2",), served=("r1",))  # r1 ended: not again
    assert [r.request for r in todo.start] == ["r3"]
    todo = uploads(ask("r1", "r1", "r2"), serving=(), served=())  # a request named twice is served once
    assert [r.request for r in todo.start] == ["r1", "r2"]


FOLDER = "/var/lib/flowmap/captures"
FILE = f"{FOLDER}/shop_cap_0f1e2d3c-aaaa-bbbb-cccc-000000000001.pcapng"


def done(path: str = FILE, state: str = "done", capture_id: str = ID) -> wire_pb2.PacketCaptureStatus:
    return wire_pb2.PacketCaptureStatus(id=capture_id, state=state, file_bytes=100, sha256="ab" * 32, path=path)


def test_only_a_finished_files_own_name_in_the_capture_folder_is_sent() -> None:
    assert upload_path(ID, [done(capture_id="shop/x/u"), done()], FOLDER) == (FILE, done())
    assert upload_path(ID, [done()], FOLDER + "/") == (FILE, done())
    refusals = {
        "the dp reports no capture shop/cap/": [done(capture_id="shop/x/u")],
        "is still running: its file is not finished": [done(state="running")],
        "has no file on this node": [done(path="")],
        "is not shop_cap_0f1e2d3c-aaaa-bbbb-cccc-000000000001.pcapng in the capture folder": [done(path=p) for p in (
            "/etc/shadow", f"{FOLDER}/../captures/{FILE.rsplit('/', 1)[1]}", f"{FOLDER}/sub/{FILE.rsplit('/', 1)[1]}",
            f"{FOLDER}/shop_other_u.pcapng", f"/tmp/{FILE.rsplit('/', 1)[1]}", FILE.rsplit("/", 1)[1])],
    }
    for why, reported in refusals.items():
        for status in reported:
            with pytest.raises(Unservable, match=re.escape(why)):
                upload_path(ID, [status], FOLDER)
    with pytest.raises(Unservable, match="is not a capture id"):
        upload_path("../../etc/passwd", [done(capture_id="../../etc/passwd")], FOLDER)


def test_a_libvirt_vms_member_is_captured_on_each_of_its_taps_on_the_node() -> None:
    db = parse("<domain><name>db</name><uuid>0d5c8e1a-2f0b-4c1b-9a57-7e0f4e3b1c2d</uuid><devices>"
               "<interface type='bridge'><mac address='52:54:00:00:00:01'/><target dev='vnet1'/></interface>"
               "<interface type='network'><mac address='52:54:00:00:00:02'/><target dev='vnet2'/></interface>"
               "<interface type='network'><mac address='52:54:00:00:00:03'/><target dev='vnet9'/></interface>"
               "</devices></domain>")
    vms = local_vms("node-a", [db], present={"vnet1", "vnet2", "eth0"})  # vnet9 is not on the node (yet)
    assert vms == {"node-a/db": ("vnet1", "vnet2")}
    made = orders(pb.NodeCaptures(captures=[pb.CaptureOrder(
        id="libvirt/cap/0f1e2d3c-aaaa-bbbb-cccc-000000000001", max_bytes=1 << 20, duration_seconds=5,
        targets=[pb.CaptureTarget(pod="libvirt/node-a/db", workload="legacy-db"),
                 pb.CaptureTarget(pod="libvirt/node-b/other", workload="legacy-db")])]), PODS, vms)
    (entry,) = made.captures
    assert [(t.name, t.description) for t in entry.targets] == [("vnet1", "libvirt/legacy-db node-a/db"),
                                                                ("vnet2", "libvirt/legacy-db node-a/db")]
    # a pod's name never holds a '/': a VM's member is never taken for a pod, nor a pod for a VM
    assert orders(pb.NodeCaptures(captures=[order(pods=["shop/db"])]), {}, {"shop/db": ("vnet1",)}).captures == ()
