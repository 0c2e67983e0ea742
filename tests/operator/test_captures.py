"""PacketCapture against the real control plane: a real operator (as its ServiceAccount, so its RBAC
is the manifests'), a test agent on a real CaptureService stream. The agent on node-a is told the
capture with its pods and resolved filters, reports it running then done, and the object's status
follows; a token reports only for its own node; a malformed report is refused whole; a capture
beyond the namespace's cap waits. The namespace ``snap`` is this module's own.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from typing import Any

import grpc
import pytest

from flowmap_api import report_pb2 as pb
from flowmap_api import report_pb2_grpc as pb_grpc
from tests.operator.harness import Cluster, Operator, apply, create_pods, pod, running
from tests.operator.test_policy import metric
from tests.operator.test_reports import wait_for

NS = "snap"
WEB, DB, API = "10.244.1.160", "10.244.1.161", "10.244.2.162"
SHA = "5e" * 32


@pytest.fixture(scope="module")
def operator(cluster: Cluster) -> Iterator[Operator]:
    plane = cluster.plane
    plane.kubectl("create", "namespace", NS, check=False)
    create_pods(plane,
                pod(NS, "web-6b7c8-a1", "node-a", WEB, owner=("ReplicaSet", "web-6b7c8"),
                    labels={"app": "web", "pod-template-hash": "6b7c8"}),
                pod(NS, "db-0", "node-a", DB, owner=("StatefulSet", "db"), labels={"app": "db"}),
                pod(NS, "api-0", "node-b", API, owner=("StatefulSet", "api"), labels={"app": "api"}))
    yield from running(cluster, max_captures_per_namespace=1)


class Watcher:
    """A CaptureService stream read on a thread of its own."""

    def __init__(self, op: Operator, node: str, token: str) -> None:
        creds = grpc.ssl_channel_credentials(root_certificates=op.cluster.keys.ca_cert.read_bytes())
        self.channel = grpc.secure_channel(f"localhost:{op.grpc_port}", creds)
        self.stub = pb_grpc.CaptureServiceStub(self.channel)
        self.metadata = (("authorization", f"Bearer {token}"),)
        self.got: list[pb.NodeCaptures] = []
        self.error: grpc.RpcError | None = None
        self.stream = self.stub.Watch(pb.WatchRequest(node=node), metadata=self.metadata)
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        try:
            for captures in self.stream:
                self.got.append(captures)
        except grpc.RpcError as exc:
            self.error = exc

    def latest(self) -> pb.NodeCaptures | None:
        return self.got[-1] if self.got else None

    def report(self, node: str, *statuses: pb.CaptureStatus) -> pb.CaptureReportAck:
        ack: pb.CaptureReportAck = self.stub.Report(pb.CaptureReport(node=node, captures=list(statuses)),
                                                    metadata=self.metadata, timeout=10)
        return ack

    def close(self) -> None:
        self.stream.cancel()
        self.channel.close()


def capture(cluster: Cluster, name: str, **spec: Any) -> None:
    apply(cluster.plane, {"apiVersion": "flowmap.dev/v1alpha1", "kind": "PacketCapture",
                          "metadata": {"name": name, "namespace": NS}, "spec": spec})


def get(cluster: Cluster, name: str) -> dict[str, Any]:
    got: dict[str, Any] = json.loads(cluster.plane.kubectl("get", "pcap", name, "-n", NS, "-o", "json").stdout)
    return got


def ready(obj: dict[str, Any]) -> dict[str, Any]:
    return next((c for c in (obj.get("status") or {}).get("conditions", []) if c["type"] == "Ready"), {})


def order(watcher: Watcher, name: str) -> pb.CaptureOrder | None:
    latest = watcher.latest()
    return next((o for o in latest.captures if o.id.split("/")[1] == name), None) if latest else None


def test_ordered_run_reported_and_completed_and_the_next_waits_its_turn(cluster: Cluster, operator: Operator) -> None:
    token = cluster.token("flowmap-agent", pod_name="agent-a")
    watcher = Watcher(operator, "node-a", token)
    try:
        capture(cluster, "first", targets={"podSelector": {"matchLabels": {"app": "web"}}},
                filters=[{"peer": {"group": "db"}, "protocol": "TCP", "port": 5432, "direction": "Egress"}],
                durationSeconds=30, snapLength=96)
        first = wait_for(lambda: order(watcher, "first"), what="node-a told the capture")
        uid = get(cluster, "first")["metadata"]["uid"]
        assert first.id == f"{NS}/first/{uid}" and [(t.pod, t.workload) for t in first.targets] == [(f"{NS}/web-6b7c8-a1", "web")]
        assert [(list(f.cidrs), f.protocol, f.port, f.direction) for f in first.filters] == [
            ([f"{DB}/32"], pb.TCP, 5432, pb.CAPTURE_DIRECTION_EGRESS)]
        assert (first.snap_length, first.duration_seconds, first.max_bytes, first.armed) == (96, 30, 1 << 20, False)
        wait_for(lambda: get(cluster, "first").get("status", {}).get("phase") == "Pending", what="first Pending")

        # Beyond the namespace's cap (1 here): Pending, and no node is told.
        time.sleep(0.05)
        capture(cluster, "second", targets={"groups": ["web"]})
        wait_for(lambda: ready(get(cluster, "second")).get("reason") == "NamespaceCaptureLimit",
                 what="second held by the namespace cap")
        assert get(cluster, "second")["status"]["phase"] == "Pending" and order(watcher, "second") is None

        assert watcher.report("node-a", pb.CaptureStatus(id=first.id, state="running", packets=4, bytes=384)).leader
        wait_for(lambda: get(cluster, "first")["status"]["phase"] == "Running", what="first Running")
        status = get(cluster, "first")["status"]
        assert status["totals"]["packets"] == 4 and status["startTime"]
        assert watcher.report("node-a", pb.CaptureStatus(
            id=first.id, state="done", packets=10, bytes=960, drops=1, file_bytes=1400, sha256=SHA,
            stop_reason="DurationReached")).leader
        wait_for(lambda: get(cluster, "first")["status"]["phase"] == "Completed", what="first Completed")
        status = get(cluster, "first")["status"]
        assert status["totals"] == {"packets": 10, "bytes": 960, "drops": 1, "fileBytes": 1400}
        assert status["nodes"] == [{"node": "node-a", "phase": "Completed", "packets": 10, "bytes": 960, "drops": 1,
                                    "fileBytes": 1400, "sha256": SHA, "stopReason": "DurationReached"}]
        assert status["completionTime"] and status["observedGeneration"] == 1
        complete = next(c for c in status["conditions"] if c["type"] == "Complete")
        assert (complete["status"], complete["reason"]) == ("True", "DurationReached")

        # Finished: no longer run, its file kept; the waiting one runs now.
        wait_for(lambda: order(watcher, "first") is None and first.id in watcher.latest().keep  # type: ignore[union-attr]
                 and order(watcher, "second"), what="first kept, second ordered")
        wait_for(lambda: ready(get(cluster, "second")).get("reason") == "Starting", what="second starting")
    finally:
        watcher.close()


def test_a_token_watches_and_reports_only_its_own_node(cluster: Cluster, operator: Operator) -> None:
    watcher = Watcher(operator, "node-b", cluster.token("flowmap-agent", pod_name="agent-a"))
    try:
        wait_for(lambda: watcher.error is not None, what="the watch refused")
        assert watcher.error is not None and watcher.error.code() == grpc.StatusCode.PERMISSION_DENIED
        with pytest.raises(grpc.RpcError) as refused:
            watcher.report("node-b", pb.CaptureStatus(id=f"{NS}/x/0f0e", state="running"))
        assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "bound to node node-a" in (refused.value.details() or "")
    finally:
        watcher.close()


def test_a_malformed_report_is_refused_whole_with_its_reason(cluster: Cluster, operator: Operator) -> None:
    capture(cluster, "third", targets={"groups": ["db"]})
    uid = wait_for(lambda: get(cluster, "third")["metadata"].get("uid"), what="third created")
    watcher = Watcher(operator, "node-a", cluster.token("flowmap-agent", pod_name="agent-a"))
    try:
        good = pb.CaptureStatus(id=f"{NS}/third/{uid}", state="running", packets=7)
        with pytest.raises(grpc.RpcError) as refused:
            watcher.report("node-a", good, pb.CaptureStatus(id=f"{NS}/first/{uid}", state="paused"))
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "captures[1].state: 'paused'" in (refused.value.details() or "")
        with pytest.raises(grpc.RpcError) as refused:
            watcher.report("node-a", pb.CaptureStatus(id="not an id", state="running"))
        assert "captures[0].id" in (refused.value.details() or "")
        time.sleep(1.5)  # a few flush rounds: the good entry of the refused report was not taken either
        assert (get(cluster, "third").get("status") or {}).get("totals", {}).get("packets", 0) == 0
    finally:
        watcher.close()


def test_a_status_is_written_only_when_it_changes(cluster: Cluster, operator: Operator) -> None:
    wait_for(lambda: (get(cluster, "third").get("status") or {}).get("phase") == "Pending", what="third written")
    time.sleep(1.0)  # the watch brings back what was written
    before = metric(operator, "flowmap_operator_api_writes_total", kind="packetcapture", verb="patch_status",
                    result="ok")
    time.sleep(3.0)  # many flush rounds, nothing changed
    assert metric(operator, "flowmap_operator_api_writes_total", kind="packetcapture", verb="patch_status",
                  result="ok") == before > 0
