"""PacketCapture, pure: which pods and nodes a capture targets, the namespace cap, its status from
the nodes' reports, and when its files expire. A Resolver fed as the operator's watches feed it."""

from __future__ import annotations

import time
from dataclasses import replace
from typing import Any

import pytest

from flowmap_operator.capturing import (MAX_PEER_ADDRESSES, NODE_GRACE, WHOLE_SNAP, Capture, Filter, NodeReport,
                                        Plan, admitted, expired, expires_at, fires, kept, node_captures, order,
                                        plan, status)
from flowmap_operator.times import iso
from flowmap_operator.resolution import Resolver
from flowmap_operator.settings import Settings

NOW = float(int(time.time()))
PODS = {  # (namespace, name) -> (ip, node, labels, owner: a ReplicaSet's name or kind/name)
    ("shop", "web-7d4b9-x1"): ("10.244.1.10", "node-a", {"app": "web", "pod-template-hash": "7d4b9"}, "web-7d4b9"),
    ("shop", "web-7d4b9-x2"): ("10.244.2.11", "node-b", {"app": "web", "pod-template-hash": "7d4b9"}, "web-7d4b9"),
    ("shop", "db-0"): ("10.244.1.30", "node-a", {"app": "db"}, "StatefulSet/db"),
    # Another namespace with a workload of the same name and the same labels: never a target.
    ("other", "web-5f6c8-z1"): ("10.244.3.40", "node-c", {"app": "web", "pod-template-hash": "5f6c8"}, "web-5f6c8"),
}


def cluster() -> Resolver:
    r = Resolver()
    for (ns, name), (ip, node, labels, owner) in PODS.items():
        meta: dict[str, Any] = {"namespace": ns, "name": name, "labels": labels}
        kind, _, owned_by = owner.rpartition("/")
        meta["ownerReferences"] = [{"kind": kind or "ReplicaSet", "name": owned_by, "controller": True}]
        r.pod_seen({"metadata": meta, "spec": {"nodeName": node}, "status": {"podIP": ip, "phase": "Running"}}, NOW)
    return r


def body(name: str = "cap", *, created: float = NOW, status: dict[str, Any] | None = None, **spec: Any) -> dict[str, Any]:
    return {"metadata": {"namespace": "shop", "name": name, "uid": f"uid-{name}", "generation": 1,
                         "creationTimestamp": iso(created)},
            "spec": {"targets": {"groups": ["web"]}, **spec}, "status": status or {}}


def planned(r: Resolver | None = None, **spec: Any) -> Plan:
    capture = Capture.from_body(body(**spec))
    return plan(capture, (r or cluster()).namespace_pods("shop"), admitted=True, max_per_namespace=4)


# -- the plan --------------------------------------------------------------------------------------


def test_groups_name_workloads_of_the_captures_namespace() -> None:
    p = planned()
    assert p.held is None
    assert [(node, [pod.member for pod in pods]) for node, pods in p.nodes] == [
        ("node-a", ["web-7d4b9-x1"]), ("node-b", ["web-7d4b9-x2"])]
    assert {pod.group for _, pods in p.nodes for pod in pods} == {"shop.web"}
    assert p.capture.id == "shop/cap/uid-cap" and p.filters == () and p.capture.snaplen == 128 and not p.armed


def test_a_selector_selects_pods_of_the_namespace_only() -> None:
    every = planned(targets={"podSelector": {}})
    assert [node for node, _ in every.nodes] == ["node-a", "node-b"]  # never node-c, the other namespace's
    assert sorted(pod.member for _, pods in every.nodes for pod in pods) == ["db-0", "web-7d4b9-x1", "web-7d4b9-x2"]
    web = planned(targets={"podSelector": {"matchLabels": {"app": "web"}}, "groups": ["db"]})  # the union
    assert sorted(pod.member for _, pods in web.nodes for pod in pods) == ["db-0", "web-7d4b9-x1", "web-7d4b9-x2"]
    expr = planned(targets={"podSelector": {"matchExpressions": [{"key": "app", "operator": "NotIn",
                                                                  "values": ["web"]}]}})
    assert [(n, [p.member for p in pods]) for n, pods in expr.nodes] == [("node-a", ["db-0"])]
    # The per-revision labels a controller adds are not matched: a selector on one picks nothing.
    hashed = planned(targets={"podSelector": {"matchLabels": {"pod-template-hash": "7d4b9"}}})
    assert hashed.held is not None and hashed.held[2] == "NoTargets"


def test_pods_of_another_namespace_are_never_targets_even_if_handed_in() -> None:
    r = cluster()
    capture = Capture.from_body(body(targets={"podSelector": {}}))
    p = plan(capture, r.namespace_pods("shop") + r.namespace_pods("other"), admitted=True, max_per_namespace=4)
    assert "node-c" not in dict(p.nodes)


def test_the_resolver_hands_in_live_pod_network_pods_only() -> None:
    r = cluster()
    r.pod_seen({"metadata": {"namespace": "shop", "name": "host-agent", "labels": {"app": "web"}},
                "spec": {"nodeName": "node-a", "hostNetwork": True}, "status": {"podIP": "172.18.0.2"}}, NOW)
    r.pod_gone("shop", "web-7d4b9-x2", NOW)
    pods = r.namespace_pods("shop")
    assert [(peer.member, peer.node, ips) for peer, ips, _ in pods] == [
        ("db-0", "node-a", ["10.244.1.30"]), ("web-7d4b9-x1", "node-a", ["10.244.1.10"])]
    assert pods[1][2] == {"app": "web"}  # pod-template-hash left out
    assert [n for n, _ in planned(r, targets={"podSelector": {}}).nodes] == ["node-a"]


def test_no_running_target_holds_it_pending() -> None:
    p = planned(targets={"groups": ["api"]})
    assert p.held is not None and p.held[:3] == ("Ready", False, "NoTargets") and p.held_phase == "Pending"
    assert p.nodes == ()


def test_filters_resolve_peer_groups_to_their_pods_addresses() -> None:
    p = planned(filters=[{"peer": {"group": "db"}, "protocol": "TCP", "port": 5432, "direction": "Egress"},
                         {"peer": {"cidr": "10.1.2.3/8"}},
                         {"protocol": "ICMP"},
                         {"peer": {"group": "gone"}}])  # no pods: matches nothing, so it is left out
    assert p.held is None
    assert p.filters == (Filter(("10.244.1.30/32",), "TCP", 5432, "Egress"), Filter(("10.0.0.0/8",)),
                         Filter(None, "ICMP"))


def test_filters_that_all_match_nothing_are_not_every_packet() -> None:
    p = planned(filters=[{"peer": {"group": "gone"}}])
    assert p.held is not None and p.held[2] == "NoTargets" and "gone" in p.held[3]


def test_a_cidr_the_schema_would_refuse_matches_nothing_and_crashes_nothing() -> None:
    p = planned(filters=[{"peer": {"cidr": "10.0.0.0/33"}}, {"peer": {"cidr": "10.0.0.0/8"}}])
    assert p.filters == (Filter(("10.0.0.0/8",)),)
    p = planned(filters=[{"peer": {"cidr": "db"}}])
    assert p.held is not None and p.held[2] == "NoTargets" and "db" in p.held[3]


def test_too_many_peer_addresses_fail_it() -> None:
    r = cluster()
    for i in range(MAX_PEER_ADDRESSES + 1):
        r.pod_seen({"metadata": {"namespace": "shop", "name": f"big-{i}", "labels": {}},
                    "spec": {"nodeName": "node-a"}, "status": {"podIP": f"10.245.{i // 250}.{i % 250}"}}, NOW)
    big = planned(r)
    assert big.held is None
    for i in range(MAX_PEER_ADDRESSES + 1):  # each pod its own workload: make them one group
        r.pod_gone("shop", f"big-{i}", NOW)
        r.pod_seen({"metadata": {"namespace": "shop", "name": f"big-{i}", "labels": {},
                                 "ownerReferences": [{"kind": "StatefulSet", "name": "big", "controller": True}]},
                    "spec": {"nodeName": "node-a"}, "status": {"podIP": f"10.245.{i // 250}.{i % 250}"}}, NOW)
    p = planned(r, filters=[{"peer": {"group": "big"}}])
    assert p.held is not None and p.held[2] == "Failed" and p.held_phase == "Failed"


@pytest.mark.parametrize(("spec", "snaplen"), [({}, 128), ({"snapLength": 64}, 64),
                                               ({"wholePackets": True}, WHOLE_SNAP),
                                               ({"wholePackets": False, "snapLength": 1024}, 1024)])
def test_snap_length(spec: dict[str, Any], snaplen: int) -> None:
    assert planned(**spec).capture.snaplen == snaplen


def test_a_trigger_arms_it_even_without_a_window() -> None:
    p = planned(trigger={"on": "Denied", "preTriggerSeconds": 0})
    assert p.armed and p.capture.trigger == "Denied" and p.capture.pre_trigger == 0


# -- the namespace cap -------------------------------------------------------------------------------


def capture(name: str, created: float, phase: str = "", namespace: str = "shop") -> Capture:
    b = body(name, created=created, status={"phase": phase} if phase else None)
    b["metadata"]["namespace"] = namespace
    return Capture.from_body(b)


def test_the_oldest_unfinished_captures_of_a_namespace_run() -> None:
    caps = [capture("c", NOW + 3), capture("a", NOW + 1), capture("b", NOW + 2), capture("done", NOW, "Completed"),
            capture("failed", NOW, "Failed"), capture("x", NOW + 9, namespace="other")]
    assert admitted(caps, 2) == {("shop", "a"), ("shop", "b"), ("other", "x")}
    # One already running keeps its place when an older one could run again (its pods came back).
    caps = [capture("old", NOW), capture("new", NOW + 5, "Running"), capture("newer", NOW + 6, "Running")]
    assert admitted(caps, 2) == {("shop", "new"), ("shop", "newer")}


def test_the_cap_is_a_setting() -> None:
    assert Settings().max_captures_per_namespace == 4
    assert Settings.from_env({"FLOWMAP_OPERATOR_MAX_CAPTURES_PER_NAMESPACE": "1"}).max_captures_per_namespace == 1
    with pytest.raises(ValueError, match="MAX_CAPTURES_PER_NAMESPACE"):
        Settings.from_env({"FLOWMAP_OPERATOR_MAX_CAPTURES_PER_NAMESPACE": "0"})


def test_a_capture_beyond_the_cap_is_pending_saying_so() -> None:
    c = Capture.from_body(body())
    p = plan(c, cluster().namespace_pods("shop"), admitted=False, max_per_namespace=2)
    assert p.held is not None and p.held[2] == "NamespaceCaptureLimit" and "2 captures" in p.held[3]
    s = status(p, {}, NOW)
    assert s["phase"] == "Pending" and s["nodes"] == []
    assert {c["type"]: c["reason"] for c in s["conditions"]} == {"Ready": "NamespaceCaptureLimit",
                                                                 "Complete": "Pending"}


# -- the status --------------------------------------------------------------------------------------


def cond(s: dict[str, Any], kind: str) -> dict[str, Any]:
    return next(c for c in s["conditions"] if c["type"] == kind)


def again(p: Plan, s: dict[str, Any]) -> Plan:
    """The same plan, the capture holding the status written before."""
    return replace(p, capture=replace(p.capture, status=s))


def test_status_from_start_to_completion() -> None:
    p = planned()
    s = status(p, {}, NOW)
    assert s["phase"] == "Pending" and s["observedGeneration"] == 1
    assert s["nodes"] == [{"node": "node-a", "phase": "Pending"}, {"node": "node-b", "phase": "Pending"}]
    assert (cond(s, "Ready")["status"], cond(s, "Ready")["reason"]) == ("False", "Starting")
    assert "startTime" not in s and "completionTime" not in s

    running = {"node-a": NodeReport("node-a", "running", 10, 1000, 1, 1500),
               "node-b": NodeReport("node-b", "running", 5, 700, 0, 1100)}
    s = status(again(p, s), running, NOW + 1)
    assert s["phase"] == "Running" and s["startTime"] == iso(NOW + 1)
    assert s["totals"] == {"packets": 15, "bytes": 1700, "drops": 1, "fileBytes": 2600}
    assert (cond(s, "Ready")["status"], cond(s, "Complete")["status"]) == ("True", "False")

    sha = "ab" * 32
    done = {"node-a": NodeReport("node-a", "done", 12, 1200, 1, 1800, sha, "DurationReached"),
            "node-b": NodeReport("node-b", "done", 9, 900, 0, 1024 * 1024, sha, "MaxBytesReached")}
    s = status(again(p, s), done, NOW + 61)
    assert s["phase"] == "Completed" and s["startTime"] == iso(NOW + 1) and s["completionTime"] == iso(NOW + 61)
    assert s["nodes"][1] == {"node": "node-b", "phase": "Completed", "packets": 9, "bytes": 900, "drops": 0,
                             "fileBytes": 1024 * 1024, "sha256": sha, "stopReason": "MaxBytesReached"}
    complete = cond(s, "Complete")
    assert (complete["status"], complete["reason"]) == ("True", "DurationReached,MaxBytesReached")
    assert "node-b: MaxBytesReached" in complete["message"]
    assert all(c["observedGeneration"] == 1 for c in s["conditions"])


def test_last_transition_time_moves_only_with_the_status() -> None:
    p = planned()
    running = {"node-a": NodeReport("node-a", "running"), "node-b": NodeReport("node-b", "running")}
    first = status(p, running, NOW)
    later = status(again(p, first), {k: NodeReport(k, "running", 99) for k in running}, NOW + 30)
    assert cond(later, "Ready")["lastTransitionTime"] == iso(NOW)  # still True: since then
    assert later["totals"]["packets"] == 198
    done = status(again(p, later), {k: NodeReport(k, "done", stop_reason="DurationReached") for k in running},
                  NOW + 60)
    assert cond(done, "Complete")["lastTransitionTime"] == iso(NOW + 60)
    assert cond(done, "Ready")["lastTransitionTime"] == iso(NOW)


def test_a_node_that_fails_is_said_by_name() -> None:
    p = planned()
    reports = {"node-a": NodeReport("node-a", "done", 3, stop_reason="DurationReached"),
               "node-b": NodeReport("node-b", "failed", stop_reason="NodeDiskFull", message="256 MiB in use")}
    s = status(p, reports, NOW)
    assert s["phase"] == "Completed"  # node-a's file is there
    ready = cond(s, "Ready")
    assert (ready["status"], ready["reason"]) == ("False", "NodeDiskFull")
    assert ready["message"] == "node-b: NodeDiskFull (256 MiB in use)"
    reports["node-a"] = NodeReport("node-a", "failed", stop_reason="NodeCaptureLimit")
    s = status(p, reports, NOW)
    assert s["phase"] == "Failed" and cond(s, "Ready")["reason"] == "NodeCaptureLimit,NodeDiskFull"


def test_a_failed_plan_fails_the_capture() -> None:
    p = Plan(Capture.from_body(body()), held=("Ready", False, "Failed", "too many addresses"), held_phase="Failed")
    s = status(p, {}, NOW)
    assert s["phase"] == "Failed" and s["completionTime"] == iso(NOW)
    assert cond(s, "Ready")["message"] == "too many addresses"


def test_a_triggered_capture_is_armed_then_fires() -> None:
    p = planned(trigger={"on": "Denied"})
    armed = {"node-a": NodeReport("node-a", "armed"), "node-b": NodeReport("node-b", "armed")}
    s = status(p, armed, NOW)
    assert s["phase"] == "Running" and "triggeredAt" not in s
    assert [n["phase"] for n in s["nodes"]] == ["Armed", "Armed"]
    assert cond(s, "Complete")["reason"] == "Armed" and cond(s, "Ready")["reason"] == "Armed"
    armed["node-b"] = NodeReport("node-b", "running", 4)
    s = status(again(p, s), armed, NOW + 7, fired=NOW + 5)
    assert s["triggeredAt"] == iso(NOW + 5)  # when it happened, not when it was heard of
    s = status(again(p, s), armed, NOW + 9, fired=NOW + 8)
    assert s["triggeredAt"] == iso(NOW + 5)  # set once
    # Stopped while still armed: it never fired.
    stopped = status(p, {"node-a": NodeReport("node-a", "done", stop_reason="Stopped")}, NOW)
    assert "triggeredAt" not in stopped and stopped["phase"] == "Running"  # node-b has not said yet


def test_an_event_of_its_kind_on_a_target_workloads_edge_fires_a_capture() -> None:
    denied, threat = planned(trigger={"on": "Denied"}), planned(trigger={"on": "Threat"})
    plain = planned()
    events = [(("shop.db", "shop.cache", 6379, "TCP"), "Denied", NOW + 1),  # no target's edge
              (("shop.web", "shop.db", 5432, "TCP"), "Violation", NOW + 2),  # not its kind
              (("other.x", "shop.web", 80, "TCP"), "Denied", NOW + 4),  # the web pods are the server
              (("shop.web", "shop.db", 5432, "TCP"), "Denied", NOW + 3)]
    assert fires([denied, plain], events, {}) == {denied.capture.id: NOW + 3}  # the first; plain has no trigger
    assert fires([denied], events, {denied.capture.id: NOW}) == {}  # fired already
    assert fires([threat], events, {}) == {}
    assert fires([threat], [(("shop.web", "ext", 443, "TCP"), "Threat", NOW - 60)], {}) == {
        threat.capture.id: NOW}  # an event from before the capture counts from its creation
    held = replace(denied, held=("Ready", False, "NamespaceCaptureLimit", "..."))
    assert fires([held], events, {}) == {}


def test_a_fired_capture_tells_its_nodes_when() -> None:
    p = planned(trigger={"on": "Violation", "preTriggerSeconds": 10})
    (node, pods), _ = p.nodes
    armed = order(p, pods)
    assert armed.armed and armed.pre_trigger_seconds == 10 and not armed.fired and not armed.fired_unix_ms
    fired = node_captures([p], node, (), {p.capture.id: NOW + 1.5}).captures[0]
    assert fired.fired and fired.fired_unix_ms == (NOW + 1.5) * 1000
    assert not order(planned(), pods, NOW).fired  # a capture without a trigger never fires


def test_a_node_that_never_says_it_ended_fails_and_the_capture_finishes() -> None:
    sha = "ab" * 32
    p = planned(durationSeconds=10)  # on node-a and node-b
    running = {"phase": "Running", "startTime": iso(NOW)}
    reports = {"node-a": NodeReport("node-a", "done", 3, file_bytes=99, sha256=sha, stop_reason="DurationReached"),
               "node-b": NodeReport("node-b", "running", 2)}  # its agent went away
    assert status(again(p, running), reports, NOW + 10 + NODE_GRACE)["phase"] == "Running"  # its word may come yet
    s = status(again(p, running), reports, NOW + 10 + NODE_GRACE + 1)
    assert s["phase"] == "Completed" and [(n["node"], n["phase"]) for n in s["nodes"]] == [
        ("node-a", "Completed"), ("node-b", "Failed")]
    assert "node-b: Failed (no end reported 60 s after the capture's" in cond(s, "Ready")["message"]
    reports["node-b"] = NodeReport("node-b", "done", 4, file_bytes=98, sha256=sha, stop_reason="DurationReached")
    late = status(again(p, s), reports, NOW + 300)
    assert late["phase"] == "Completed" and late["nodes"][1]["sha256"] == sha  # its late word counts: its file too
    # No end is known while it is armed and not fired: it waits for its trigger as long as it takes.
    armed = planned(trigger={"on": "Denied"}, durationSeconds=10)
    waiting = status(again(armed, running), {"node-a": NodeReport("node-a", "armed")}, NOW + 10_000)
    assert [n["phase"] for n in waiting["nodes"]] == ["Armed", "Pending"]
    fired = status(again(armed, {**running, "triggeredAt": iso(NOW + 5000)}), {"node-a": NodeReport("node-a", "armed")},
                   NOW + 5000 + 10 + NODE_GRACE + 1)
    assert [n["phase"] for n in fired["nodes"]] == ["Failed", "Failed"] and fired["phase"] == "Failed"


def test_a_finished_capture_stays_finished() -> None:
    p = planned()
    done = {"node-a": NodeReport("node-a", "done", stop_reason="Stopped")}
    s = status(again(p, {"phase": "Completed", "completionTime": iso(NOW)}), done, NOW + 5)
    assert s["phase"] == "Completed" and s["completionTime"] == iso(NOW)
    # node-b never ran it: its entry says so, and the capture does not run again.
    assert s["nodes"][1] == {"node": "node-b", "phase": "Pending"}


def test_what_a_node_says_cannot_break_the_status_write() -> None:
    p = planned()
    reports = {"node-a": NodeReport("node-a", "done", -5, sha256="not-a-digest", stop_reason="Exploded"),
               "node-b": NodeReport("node-b", "sideways")}
    s = status(p, reports, NOW)
    assert s["nodes"] == [{"node": "node-a", "phase": "Completed", "packets": 0, "bytes": 0, "drops": 0,
                           "fileBytes": 0, "stopReason": "Failed"},
                          {"node": "node-b", "phase": "Pending", "packets": 0, "bytes": 0, "drops": 0,
                           "fileBytes": 0}]


def test_a_node_that_ran_it_keeps_its_entry_when_its_pods_are_gone() -> None:
    p = planned()
    reports = {"node-z": NodeReport("node-z", "done", 1, stop_reason="InterfaceGone")}
    assert [n["node"] for n in status(p, reports, NOW)["nodes"]] == ["node-a", "node-b", "node-z"]


# -- expiry --------------------------------------------------------------------------------------------


def test_results_expire_ttl_after_completion() -> None:
    running = Capture.from_body(body(status={"phase": "Running", "startTime": iso(NOW)}))
    assert expires_at(running) is None and not expired(running, NOW + 10**9)
    done = Capture.from_body(body("done", ttlSecondsAfterFinished=60,
                                  status={"phase": "Completed", "completionTime": iso(NOW)}))
    failed = Capture.from_body(body("failed", status={"phase": "Failed", "completionTime": iso(NOW)}))
    assert expires_at(done) == NOW + 60 and expires_at(failed) == NOW + 3600  # the default TTL
    assert not expired(done, NOW + 59) and expired(done, NOW + 60)
    assert kept([running, done, failed], NOW + 30) == {"shop/done/uid-done", "shop/failed/uid-failed"}
    assert kept([running, done, failed], NOW + 60) == {"shop/failed/uid-failed"}


# -- the user's stop ---------------------------------------------------------------------------------


def stopped(p: Plan, s: dict[str, Any] | None = None) -> Plan:
    """``p`` planned again once the user has set flowmap.dev/stop (and the status ``s`` is written)."""
    b = body(**{k: v for k, v in {"trigger": {"on": p.capture.trigger}}.items() if p.capture.trigger})
    b["metadata"]["annotations"] = {"flowmap.dev/stop": "true"}
    b["status"] = s if s is not None else dict(p.capture.status or {})
    return plan(Capture.from_body(b), cluster().namespace_pods("shop"), admitted=True, max_per_namespace=4)


def test_the_stop_annotation_is_read_as_true_only() -> None:
    for value, expected in (("true", True), ("false", False), ("yes", False)):
        b = body()
        b["metadata"]["annotations"] = {"flowmap.dev/stop": value}
        assert Capture.from_body(b).stopped is expected
    assert not Capture.from_body(body()).stopped


def test_a_running_capture_stopped_is_ordered_nowhere_kept_and_completes_when_its_nodes_close() -> None:
    p = planned()
    running = {"node-a": NodeReport("node-a", "running", 10, 1000, 0, 1500),
               "node-b": NodeReport("node-b", "running", 5, 700, 0, 1100)}
    s = status(p, running, NOW)
    assert [o.id for o in node_captures([p], "node-a", kept([p.capture], NOW)).captures] == [p.capture.id]
    q = stopped(p, s)
    assert q.held is not None and q.held[2] == "Stopped" and not q.nodes
    for node in ("node-a", "node-b"):
        told = node_captures([q], node, kept([q.capture], NOW + 1))
        assert not told.captures and list(told.keep) == [p.capture.id]  # the dp stops it and keeps the file
    # The nodes have not said yet that they closed their files: still Running, saying why.
    s = status(q, running, NOW + 1)
    assert s["phase"] == "Running" and s["stoppedAt"] == iso(NOW + 1) and "completionTime" not in s
    assert (cond(s, "Ready")["status"], cond(s, "Ready")["reason"]) == ("False", "Stopped")
    assert (cond(s, "Complete")["status"], cond(s, "Complete")["reason"]) == ("False", "Stopped")
    assert "node-a, node-b" in cond(s, "Complete")["message"]
    sha = "cd" * 32
    done = {n: NodeReport(n, "done", r.packets, r.bytes, 0, r.file_bytes, sha, "Stopped") for n, r in running.items()}
    s = status(stopped(p, s), done, NOW + 2)
    assert s["phase"] == "Completed" and s["completionTime"] == iso(NOW + 2) and s["stoppedAt"] == iso(NOW + 1)
    assert [n["sha256"] for n in s["nodes"]] == [sha, sha]
    complete = cond(s, "Complete")
    assert (complete["status"], complete["reason"]) == ("True", "Stopped")
    assert complete["message"].startswith("stopped by the user (flowmap.dev/stop); node-a: Stopped")
    # Kept as any finished capture: until its TTL after completion.
    finished = stopped(p, s).capture
    assert kept([finished], NOW + 2 + 3599) == {p.capture.id} and kept([finished], NOW + 2 + 3600) == set()


def test_a_pending_capture_stopped_completes_at_once_without_files() -> None:
    p = planned()
    s = status(stopped(p, {}), {}, NOW)
    assert s["phase"] == "Completed" and s["nodes"] == [] and s["stoppedAt"] == s["completionTime"] == iso(NOW)
    assert (cond(s, "Ready")["status"], cond(s, "Ready")["reason"]) == ("False", "Stopped")
    assert cond(s, "Complete")["reason"] == "Stopped"
    assert cond(s, "Complete")["message"] == "stopped by the user (flowmap.dev/stop) before any node ran it"
    # Held beyond the namespace cap, then stopped: the same, and it takes no place in the cap.
    waiting = capture("waiting", NOW - 5)
    b = body("waiting", created=NOW - 5)
    b["metadata"]["annotations"] = {"flowmap.dev/stop": "true"}
    assert admitted([Capture.from_body(b), capture("next", NOW)], 1) == {("shop", "next")}
    assert admitted([waiting, capture("next", NOW)], 1) == {("shop", "waiting")}


def test_an_armed_capture_stopped_never_fires() -> None:
    p = planned(trigger={"on": "Denied"})
    armed = {"node-a": NodeReport("node-a", "armed", file_bytes=200),
             "node-b": NodeReport("node-b", "armed", file_bytes=200)}
    q = stopped(p, status(p, armed, NOW))
    event = [(("shop.web", "shop.db", 5432, "TCP"), "Denied", NOW + 1)]
    assert fires([p], event, {}) == {p.capture.id: NOW + 1} and fires([q], event, {}) == {}
    assert not node_captures([q], "node-a", (), {p.capture.id: NOW + 1}).captures  # even if fired before
    # The dps end it (Stopped) with the header written and the window never kept: Completed.
    done = {n: NodeReport(n, "done", file_bytes=200, sha256="ef" * 32, stop_reason="Stopped") for n in armed}
    s = status(q, done, NOW + 2)
    assert s["phase"] == "Completed" and "triggeredAt" not in s and cond(s, "Complete")["reason"] == "Stopped"


def test_a_stop_after_it_finished_changes_nothing_and_a_stop_lasts() -> None:
    p = planned()
    done = {n: NodeReport(n, "done", 3, stop_reason="DurationReached") for n in ("node-a", "node-b")}
    s = status(p, done, NOW)
    late = stopped(p, s)
    assert late.held is None and status(late, done, NOW + 5) == s and "stoppedAt" not in s
    # Stopped while running, then the annotation removed: still stopped (stoppedAt), never ordered.
    s = status(stopped(p, status(p, {}, NOW)), {}, NOW + 1)
    b = body(status=s)
    again_ = plan(Capture.from_body(b), cluster().namespace_pods("shop"), admitted=True, max_per_namespace=4)
    assert again_.capture.user_stopped and again_.held is not None
    assert not node_captures([again_], "node-a", ()).captures
    assert status(again_, {}, NOW + 9) == s


def test_a_node_that_failed_is_said_before_the_stop() -> None:
    p = planned()
    reports = {"node-a": NodeReport("node-a", "failed", stop_reason="NodeDiskFull", message="full"),
               "node-b": NodeReport("node-b", "running", 1)}
    s = status(stopped(p, status(p, reports, NOW)), reports, NOW + 1)
    assert s["phase"] == "Running" and cond(s, "Ready")["reason"] == "NodeDiskFull"
    reports["node-b"] = NodeReport("node-b", "done", 1, stop_reason="Stopped")
    s = status(stopped(p, s), reports, NOW + 2)
    assert s["phase"] == "Completed" and cond(s, "Complete")["reason"] == "NodeDiskFull,Stopped"
