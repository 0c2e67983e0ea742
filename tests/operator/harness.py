"""A real operator process against the real control plane, and a test agent speaking the real proto.

The operator and the cluster's objects come from flowmap_devenv.kube (shared with the simulated
cluster and the benchmarks); the test agent here sends hand-made batches.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator
from typing import Any, TypeVar

import grpc
from kubernetes_asyncio import client, config

from flowmap_api import report_pb2 as pb
from flowmap_api import report_pb2_grpc as pb_grpc
from flowmap_devenv.controlplane import REPO, ControlPlane
from flowmap_devenv.kube import NS, Cluster, Operator, apply, create_pods, free_port, node, pod

__all__ = ["NS", "Cluster", "Operator", "apply", "create_pods", "free_port", "node", "pod"]

T = TypeVar("T")

NODE_A, NODE_B = "172.18.0.2", "172.18.0.3"
WEB, API, REDIS = "10.244.1.10", "10.244.2.20", "10.244.2.30"
API_SVC = "10.96.0.50"


def as_operator(cluster: Cluster, work: Callable[[client.CoreV1Api], Awaitable[T]]) -> T:
    """Run ``work`` with a client holding the operator ServiceAccount's token (its RBAC only)."""
    async def go() -> T:
        conf = client.Configuration()
        await config.load_kube_config(config_file=str(cluster.operator_kubeconfig()), client_configuration=conf)
        async with client.ApiClient(conf) as api:
            return await work(client.CoreV1Api(api))
    return asyncio.run(go())


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
        held = [b.sequence for b in self.unacked if b.sequence < batch.sequence]
        batch.acked = self.acked
        if batch.sequence:  # else a question for the acknowledgement
            batch.previous = max(held, default=self.acked)
        metadata = (("authorization", f"Bearer {token if token is not None else self.token}"),) if (
            token is None or token) else ()
        ack: pb.ReportAck = self.stub.Report(batch, metadata=metadata, timeout=timeout)
        if ack.leader:
            waiting = set(ack.waiting)
            self.unacked = [b for b in self.unacked if b.sequence > ack.applied and (
                b.sequence > ack.received or b.sequence in waiting)]
            self.acked = self.unacked[0].sequence - 1 if self.unacked else self.sequence
        return ack

    def pump(self) -> None:
        """Deliver, in order, every batch not yet delivered; after an error, resend all unacked."""
        try:
            for b in list(self.unacked):
                if b.sequence > self.delivered and b in self.unacked:
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
                    if b in self.unacked:  # an earlier answer may have covered it
                        self.send(b)
                if not self.unacked:
                    return
                self.send(pb.ReportBatch(agent_id=self.agent_id, node=self.node))  # asks for the ack
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
