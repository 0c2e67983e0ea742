"""A real operator process against the real control plane, and a test agent speaking the real proto.

The operator runs with the flowmap-operator ServiceAccount's token (the RBAC in manifests/), its
gRPC port serves TLS with a certificate made for the test, and agents authenticate with tokens
of the flowmap-agent ServiceAccount bound to their agent pod (which names the node).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from flowmap_api import report_pb2 as pb
from flowmap_api import report_pb2_grpc as pb_grpc
from flowmap_devenv import pki
from flowmap_devenv.controlplane import ControlPlane
from tests.conftest import REPO

NS = "flowmap-system"

NODE_A, NODE_B = "172.18.0.2", "172.18.0.3"
WEB, API, REDIS = "10.244.1.10", "10.244.2.20", "10.244.2.30"
API_SVC = "10.96.0.50"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def apply(plane: ControlPlane, *objects: dict[str, Any]) -> None:
    plane.kubectl("apply", "--server-side", "--force-conflicts", "-f", "-",
                  input="\n---\n".join(json.dumps(o) for o in objects))


def pod(namespace: str, name: str, node: str, ip: str, *, owner: tuple[str, str] | None = None,
        labels: dict[str, str] | None = None, ipv6: str | None = None, sa: str | None = None,
        host_network: bool = False) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name, "namespace": namespace, "labels": dict(labels or {})}
    if owner:
        kind, owner_name = owner
        meta["ownerReferences"] = [{"apiVersion": "apps/v1", "kind": kind, "name": owner_name, "controller": True,
                                    "uid": "00000000-0000-0000-0000-000000000001"}]
    spec: dict[str, Any] = {"nodeName": node, "containers": [{"name": "c", "image": "registry.invalid/c:1"}]}
    if sa:
        spec["serviceAccountName"] = sa
    if host_network:
        spec["hostNetwork"] = True
    return {"apiVersion": "v1", "kind": "Pod", "metadata": meta, "spec": spec,
            "_status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}] + ([{"ip": ipv6}] if ipv6 else [])}}


def create_pods(plane: ControlPlane, *pods: dict[str, Any]) -> None:
    """Create pods and set their status through the status subresource, as a kubelet would."""
    statuses = [p.pop("_status") for p in pods]
    apply(plane, *pods)
    for p, status in zip(pods, statuses):
        plane.kubectl("patch", "pod", p["metadata"]["name"], "-n", p["metadata"]["namespace"], "--subresource=status",
                      "--type=merge", "-p", json.dumps({"status": status}))


def node(name: str, ip: str) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Node", "metadata": {"name": name},
            "status": {"addresses": [{"type": "InternalIP", "address": ip}]}}


@dataclass
class Cluster:
    plane: ControlPlane
    folder: Path
    keys: pki.Pki = field(init=False)

    def __post_init__(self) -> None:
        self.keys = pki.create(self.folder / "grpc-pki")

    def token(self, sa: str, *, audience: str = "flowmap", pod_name: str | None = None,
              namespace: str = NS, node_name: str | None = None) -> str:
        args = ["create", "token", sa, "-n", namespace, f"--audience={audience}", "--duration=2h"]
        if pod_name:
            args += ["--bound-object-kind=Pod", f"--bound-object-name={pod_name}"]
        if node_name:
            args += ["--bound-object-kind=Node", f"--bound-object-name={node_name}"]
        return self.plane.kubectl(*args).stdout.strip()

    def operator_kubeconfig(self) -> Path:
        """A kubeconfig with the operator ServiceAccount's token: the operator runs unprivileged."""
        admin = json.loads(self.plane.kubeconfig.read_text())
        token = self.token("flowmap-operator", audience="https://kubernetes.default.svc.cluster.local")
        admin["users"] = [{"name": "flowmap-operator", "user": {"token": token}}]
        admin["contexts"][0]["context"]["user"] = "flowmap-operator"
        path = self.folder / "operator.kubeconfig"
        path.write_text(json.dumps(admin))
        return path


class Operator:
    """``flowmap operator run`` as a child process."""

    def __init__(self, cluster: Cluster, **settings: Any) -> None:
        self.cluster = cluster
        self.grpc_port, self.metrics_port = free_port(), free_port()
        self.log = cluster.folder / f"operator-{self.grpc_port}.log"
        self.env = {**os.environ, "KUBECONFIG": str(cluster.operator_kubeconfig()),
                    "FLOWMAP_OPERATOR_GRPC_PORT": str(self.grpc_port),
                    "FLOWMAP_OPERATOR_METRICS_PORT": str(self.metrics_port),
                    "FLOWMAP_OPERATOR_GRPC_TLS_CERT": str(cluster.keys.serving_cert),
                    "FLOWMAP_OPERATOR_GRPC_TLS_KEY": str(cluster.keys.serving_key),
                    **{f"FLOWMAP_OPERATOR_{k.upper()}": str(v) for k, v in settings.items()}}
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Operator:
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen([sys.executable, "-m", "flowmap_cli", "operator", "run"], env=self.env,
                                         stdout=out, stderr=subprocess.STDOUT, cwd=REPO)
        return self

    def wait_leading(self, timeout: float = 60.0) -> Operator:
        """Until the operator serves and leads (its own metric says so), or fail with its log."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.proc is None or self.proc.poll() is not None:
                raise AssertionError(f"the operator exited:\n{self.tail()}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=2) as r:
                    if "flowmap_operator_leader 1.0" in r.read().decode():
                        return self
            except OSError:
                pass
            time.sleep(0.2)
        raise AssertionError(f"the operator did not lead within {timeout} s:\n{self.tail()}")

    def kill(self) -> None:
        """kill -9: no flush, no goodbye."""
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> int:
        """SIGTERM: the operator flushes and exits on its own within its stop deadline."""
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                return self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.kill()
                raise AssertionError(f"the operator did not stop on SIGTERM:\n{self.tail()}") from None
        return self.proc.returncode if self.proc else 0

    def tail(self, lines: int = 40) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:]) if self.log.exists() else ""


def running(cluster: Cluster, **settings: Any) -> Iterator[Operator]:
    """An operator for a fixture: started and leading, stopped (SIGTERM) afterwards."""
    op = Operator(cluster, write_budget=50, flush_interval=0.2, **settings).start().wait_leading()
    try:
        yield op
    finally:
        op.stop()


class Agent:
    """A test agent: real proto, real gRPC over TLS, the agent ServiceAccount's token."""

    def __init__(self, operator: Operator, agent_id: str, node: str, token: str) -> None:
        creds = grpc.ssl_channel_credentials(root_certificates=operator.cluster.keys.ca_cert.read_bytes())
        self.channel = grpc.secure_channel(f"localhost:{operator.grpc_port}", creds)
        self.stub = pb_grpc.ReportServiceStub(self.channel)
        self.agent_id, self.node, self.token = agent_id, node, token
        self.sequence, self.acked, self.delivered = 0, 0, 0
        self.unacked: list[pb.ReportBatch] = []

    def batch(self, edges: Iterable[pb.EdgeDelta] = (), names: Iterable[pb.DnsName] = ()) -> pb.ReportBatch:
        self.sequence += 1
        b = pb.ReportBatch(agent_id=self.agent_id, node=self.node, sequence=self.sequence, interval_ms=1000,
                           sent_unix_ms=int(time.time() * 1000), edges=list(edges), names=list(names))
        self.unacked.append(b)
        return b

    def send(self, batch: pb.ReportBatch, token: str | None = None, timeout: float = 10) -> pb.ReportAck:
        batch.acked = self.acked
        metadata = (("authorization", f"Bearer {token if token is not None else self.token}"),) if (
            token is None or token) else ()
        ack: pb.ReportAck = self.stub.Report(batch, metadata=metadata, timeout=timeout)
        if ack.leader:
            self.acked = max(self.acked, ack.applied)
            self.unacked = [b for b in self.unacked if b.sequence > self.acked]
        return ack

    def pump(self) -> None:
        """Deliver, in order, every batch not yet delivered; after an error, resend all unacked."""
        try:
            for b in list(self.unacked):
                if b.sequence > max(self.delivered, self.acked):
                    ack = self.send(b)
                    if not ack.leader:
                        raise RuntimeError("not the leader")
                    self.delivered = b.sequence
        except (grpc.RpcError, RuntimeError):
            self.delivered = self.acked  # the operator may have lost what it had not written
            raise

    def flush(self, deadline: float = 60.0) -> None:
        """Resend unacknowledged batches (in order) until all are acknowledged."""
        end = time.monotonic() + deadline
        while time.monotonic() < end:
            try:
                for b in list(self.unacked):
                    if b.sequence > self.acked:  # an earlier answer may have covered it
                        self.send(b)
                if not self.unacked:
                    return
                self.send(self.batch())  # an empty batch asks for the ack
            except grpc.RpcError as err:
                if err.code() not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED,
                                      grpc.StatusCode.RESOURCE_EXHAUSTED):
                    raise
            time.sleep(0.2)
        raise TimeoutError(f"{len(self.unacked)} batches still unacknowledged after {deadline} s")


def edge(client: str, cport: int, server: str, sport: int, *, local: str = "client", proto: int = pb.TCP,
         apps: tuple[str, ...] = ("http",), bytes_c2s: int = 100, bytes_s2c: int = 1000, packets: int = 3,
         sessions: int = 1, when: float | None = None, client_pod: str = "") -> pb.EdgeDelta:
    ms = int((when or time.time()) * 1000)
    return pb.EdgeDelta(
        client=pb.Endpoint(ip=client, port=cport, local=local == "client", pod=client_pod),
        server=pb.Endpoint(ip=server, port=sport, local=local == "server"),
        protocol=proto, apps=list(apps), bytes_c2s=bytes_c2s, bytes_s2c=bytes_s2c, packets_c2s=packets,
        packets_s2c=packets, sessions_opened=sessions, first_seen_unix_ms=ms, last_seen_unix_ms=ms)


def build_cluster(plane: ControlPlane) -> None:
    """Two nodes with agents and a shop with three workloads, in the real API server."""
    plane.kubectl("apply", "--server-side", "-k", str(REPO / "manifests"))
    apply(plane, node("node-a", NODE_A), node("node-b", NODE_B))
    plane.kubectl("create", "namespace", "shop", check=False)
    agent = {"labels": {"app.kubernetes.io/name": "flowmap-agent"}, "sa": "flowmap-agent", "host_network": True}
    create_pods(plane,
                pod(NS, "agent-a", "node-a", NODE_A, owner=("DaemonSet", "flowmap-agent"), **agent),  # type: ignore[arg-type]
                pod(NS, "agent-b", "node-b", NODE_B, owner=("DaemonSet", "flowmap-agent"), **agent),  # type: ignore[arg-type]
                pod("shop", "web-7d4b9-x1", "node-a", WEB, owner=("ReplicaSet", "web-7d4b9"),
                    labels={"pod-template-hash": "7d4b9"}),
                pod("shop", "api-5f6c8-y2", "node-b", API, owner=("ReplicaSet", "api-5f6c8"),
                    labels={"pod-template-hash": "5f6c8"}),
                pod("shop", "redis-0", "node-b", REDIS, owner=("StatefulSet", "redis")))
    apply(plane,
          {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "api", "namespace": "shop"},
           "spec": {"clusterIP": API_SVC, "ports": [{"name": "http", "port": 80, "targetPort": 8080}]}},
          {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
           "metadata": {"name": "api-abcde", "namespace": "shop", "labels": {"kubernetes.io/service-name": "api"}},
           "addressType": "IPv4", "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
           "endpoints": [{"addresses": [API], "targetRef": {"kind": "Pod", "namespace": "shop",
                                                             "name": "api-5f6c8-y2"}}]})
