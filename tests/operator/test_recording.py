"""Packet captures between the core and the wire, without a cluster: what each node is told
(NodeCaptures), and the hub that keeps captures, plans and reports and says which statuses to write."""

from __future__ import annotations

import asyncio

from flowmap_api import report_pb2 as pb
from flowmap_operator.capturing import COMPLETED, RUNNING
from flowmap_operator.times import iso
from flowmap_operator.recording import CaptureHub
from tests.operator.test_capturing import NOW, body, cluster

SHA = "ab" * 32


def hub(max_per_namespace: int = 4) -> CaptureHub:
    return CaptureHub(cluster(), max_per_namespace)


def capture_body(name: str = "cap", **spec: object) -> dict[str, object]:
    b = body(name, **spec)
    b["metadata"]["uid"] = "0f0e-" + name.encode().hex()  # type: ignore[index]
    return b


def test_each_node_is_told_its_own_pods_and_the_resolved_filters() -> None:
    h = hub()
    h.seen(capture_body(filters=[{"peer": {"group": "db"}, "protocol": "TCP", "port": 5432, "direction": "Egress"},
                                 {"peer": {"cidr": "10.0.0.0/8"}, "protocol": "UDP"}],
                        trigger={"on": "Denied", "preTriggerSeconds": 3}, snapLength=256))
    h.watchers = {"node-a": 1, "node-b": 1, "node-c": 1}
    assert h.replan(NOW)
    a, b, c = (h.current[n] for n in ("node-a", "node-b", "node-c"))
    (order,) = a.captures
    assert order.id == f"shop/cap/0f0e-{b'cap'.hex()}" and [(t.pod, t.workload) for t in order.targets] == [("shop/web-7d4b9-x1", "web")]
    assert [(list(f.cidrs), f.protocol, f.port, f.direction) for f in order.filters] == [
        (["10.244.1.30/32"], pb.TCP, 5432, pb.CAPTURE_DIRECTION_EGRESS),
        (["10.0.0.0/8"], pb.UDP, 0, pb.CAPTURE_DIRECTION_BOTH)]
    assert (order.snap_length, order.max_bytes, order.max_packets, order.duration_seconds) == (256, 1 << 20, 10_000, 60)
    assert order.armed and order.pre_trigger_seconds == 3 and not order.fired
    assert [t.pod for t in b.captures[0].targets] == ["shop/web-7d4b9-x2"]
    assert not c.captures  # no target there: told so, and nothing else
    # Nothing changed: no new version; a change gives each node it touches a higher one.
    versions = (a.version, b.version, c.version)
    assert not h.replan(NOW + 1)
    h.gone("shop", "cap")
    assert h.replan(NOW + 2)
    after = tuple(h.current[n] for n in ("node-a", "node-b", "node-c"))
    assert after[0].version > versions[0] and after[1].version > versions[1] and after[2].version == versions[2]
    assert not any(n.captures for n in after)


def test_beyond_the_namespace_cap_no_node_is_told_and_the_status_says_why() -> None:
    h = hub(max_per_namespace=1)
    h.seen(capture_body("first", created=NOW - 10))
    h.seen(capture_body("second", created=NOW))
    h.watchers = {"node-a": 1}
    h.replan(NOW)
    assert [o.id.split("/")[1] for o in h.current["node-a"].captures] == ["first"]
    written = dict((c.name, s) for c, s in h.statuses(NOW))
    assert written["second"]["phase"] == "Pending"
    ready = next(c for c in written["second"]["conditions"] if c["type"] == "Ready")
    assert ready["reason"] == "NamespaceCaptureLimit"


def test_reports_make_the_status_and_a_finished_capture_is_kept_not_run() -> None:
    h = hub()
    h.seen(capture_body())
    h.watchers = {"node-a": 1}
    h.replan(NOW)
    cid = h.current["node-a"].captures[0].id
    assert h.reported("node-a", [pb.CaptureStatus(id=cid, state="running", packets=3, bytes=300)]) == 1
    assert h.reported("node-a", [pb.CaptureStatus(id="shop/unknown/0f0e", state="running")]) == 0  # deleted: left out
    h.replan(NOW + 1)
    ((capture, st),) = h.statuses(NOW + 1)
    assert st["phase"] == RUNNING and st["totals"]["packets"] == 3
    h.written(capture, st)
    h.replan(NOW + 1)
    assert h.statuses(NOW + 1) == []  # written once: not again while nothing changes
    for node in ("node-a", "node-b"):
        h.reported(node, [pb.CaptureStatus(id=cid, state="done", packets=5, bytes=500, file_bytes=900, sha256=SHA,
                                           stop_reason="DurationReached")])
    h.replan(NOW + 2)
    ((capture, st),) = h.statuses(NOW + 2)
    assert st["phase"] == COMPLETED and st["totals"] == {"packets": 10, "bytes": 1000, "drops": 0, "fileBytes": 1800}
    assert {n["sha256"] for n in st["nodes"]} == {SHA}
    h.written(capture, st)
    h.replan(NOW + 3)
    told = h.current["node-a"]
    assert not told.captures and list(told.keep) == [cid]
    h.replan(NOW + 3 + 3600 + 1)  # past the TTL: the files go
    assert not h.current["node-a"].keep


def test_a_new_leader_starts_from_the_written_status_and_does_not_step_back() -> None:
    h = hub()
    h.seen(capture_body())
    h.replan(NOW)
    cid = next(iter(h.captures.values())).id
    h.reported("node-a", [pb.CaptureStatus(id=cid, state="running", packets=3, bytes=300)])
    h.reported("node-b", [pb.CaptureStatus(id=cid, state="done", packets=2, file_bytes=99, sha256=SHA,
                                           stop_reason="MaxPacketsReached")])
    h.replan(NOW + 1)
    ((_, st),) = h.statuses(NOW + 1)
    written = capture_body()
    written["status"] = st
    fresh = hub()  # a replica that only saw the object, with the status the old leader wrote
    fresh.seen(written)
    fresh.replan(NOW + 2)
    assert fresh.statuses(NOW + 2) == []
    assert fresh.reports[cid]["node-b"].sha256 == SHA


def test_a_stream_gives_the_current_captures_then_each_change() -> None:
    async def run() -> list[pb.NodeCaptures]:
        h = hub()
        got: list[pb.NodeCaptures] = []

        async def watch() -> None:
            async for captures in h.stream("node-a"):
                got.append(captures)
                if len(got) == 2:
                    return

        task = asyncio.create_task(watch())
        await asyncio.sleep(0.01)
        h.seen(capture_body())
        await h.update(NOW)
        await asyncio.wait_for(task, 2)
        assert "node-a" not in h.watchers and "node-a" not in h.current  # forgotten when the stream ends
        return got

    first, second = asyncio.run(run())
    assert not first.captures and len(second.captures) == 1 and second.version > first.version


def test_what_a_report_shows_fires_an_armed_capture_on_every_node_it_runs_on() -> None:
    h = hub()
    h.seen(capture_body(trigger={"on": "Violation", "preTriggerSeconds": 2}))
    h.watchers = {"node-a": 1, "node-b": 1}
    h.replan(NOW)
    cid = h.current["node-a"].captures[0].id
    h.saw([(("shop.db", "shop.web", 8080, "TCP"), "Denied", NOW)])  # not its kind
    assert not h.replan(NOW + 1) and h.fired == {}
    h.saw([(("shop.db", "shop.web", 8080, "TCP"), "Violation", NOW + 0.25)])
    assert h.replan(NOW + 1)
    for node in ("node-a", "node-b"):
        (told,) = h.current[node].captures
        assert told.fired and told.fired_unix_ms == (NOW + 0.25) * 1000
    h.reported("node-b", [pb.CaptureStatus(id=cid, state="running", packets=1)])
    h.replan(NOW + 2)
    ((capture, st),) = h.statuses(NOW + 2)
    assert st["triggeredAt"] == iso(NOW + 0.25)
    # A new leader reads when from the status, and still tells a node that has not fired yet.
    written = capture_body(trigger={"on": "Violation", "preTriggerSeconds": 2})
    written["status"] = st
    fresh = hub()
    fresh.seen(written)
    fresh.watchers = {"node-a": 1}
    fresh.replan(NOW + 3)
    assert fresh.current["node-a"].captures[0].fired


def test_a_stop_seen_on_the_watch_ends_it_on_its_nodes_and_keeps_its_files() -> None:
    h = hub()
    h.seen(capture_body())
    h.watchers = {"node-a": 1, "node-b": 1}
    h.replan(NOW)
    cid = h.current["node-a"].captures[0].id
    for node in ("node-a", "node-b"):
        h.reported(node, [pb.CaptureStatus(id=cid, state="running", packets=3, bytes=300, file_bytes=500)])
    h.replan(NOW + 1)
    ((capture, st),) = h.statuses(NOW + 1)
    h.written(capture, st)
    stopping = capture_body()
    stopping["metadata"]["annotations"] = {"flowmap.dev/stop": "true"}  # type: ignore[index]
    stopping["status"] = st
    h.seen(stopping)
    assert h.replan(NOW + 2)
    for node in ("node-a", "node-b"):
        told = h.current[node]
        assert not told.captures and list(told.keep) == [cid]  # no longer ordered: the dp stops it, keeps the file
    ((capture, st),) = h.statuses(NOW + 2)
    assert st["phase"] == RUNNING and st["stoppedAt"] == iso(NOW + 2)
    h.written(capture, st)
    for node in ("node-a", "node-b"):
        h.reported(node, [pb.CaptureStatus(id=cid, state="done", packets=3, bytes=300, file_bytes=500, sha256=SHA,
                                           stop_reason="Stopped")])
    h.replan(NOW + 3)
    ((capture, st),) = h.statuses(NOW + 3)
    assert st["phase"] == COMPLETED and {n["stopReason"] for n in st["nodes"]} == {"Stopped"}
    h.written(capture, st)
    h.replan(NOW + 4)
    assert list(h.current["node-a"].keep) == [cid] and h.statuses(NOW + 4) == []


def test_a_peer_group_is_its_pods_and_the_cluster_ips_of_its_services() -> None:
    """web calls db by its Service: web's interface carries the ClusterIP (the node DNATs after it),
    so a filter on the peer db must hold it too, or it would miss every such call."""
    h = hub()
    h.resolver.service_seen({"metadata": {"namespace": "shop", "name": "db"},
                             "spec": {"clusterIPs": ["10.96.0.40", "fd00:10:96::40"],
                                      "ports": [{"name": "pg", "port": 5432, "protocol": "TCP"}]}})
    h.resolver.slice_seen({"metadata": {"namespace": "shop", "name": "db-x7",
                                        "labels": {"kubernetes.io/service-name": "db"}},
                           "endpoints": [{"targetRef": {"kind": "Pod", "name": "db-0"}}],
                           "ports": [{"name": "pg", "port": 5432, "protocol": "TCP"}]})
    h.resolver.service_seen({"metadata": {"namespace": "shop", "name": "web"}, "spec": {"clusterIP": "10.96.0.80"}})
    assert h.resolver.service_ips("shop.db") == ["10.96.0.40", "fd00:10:96::40"]
    assert h.resolver.service_ips("shop.x") == []
    h.seen(capture_body(filters=[{"peer": {"group": "db"}, "protocol": "TCP", "port": 5432}]))
    h.watchers = {"node-a": 1}
    h.replan(NOW)
    (order,) = h.current["node-a"].captures
    assert sorted(order.filters[0].cidrs) == ["10.244.1.30/32", "10.96.0.40/32", "fd00:10:96::40/128"]
