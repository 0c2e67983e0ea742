"""A small cluster in the real API server: two nodes with agents, a shop with three workloads."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from flowmap_devenv.controlplane import ControlPlane
from tests.conftest import REPO
from tests.controlplane.conftest import controlplane  # noqa: F401 - the session's control plane
from tests.operator.harness import NS, Cluster, apply, create_pods, node, pod

NODE_A, NODE_B = "172.18.0.2", "172.18.0.3"
WEB, API, REDIS = "10.244.1.10", "10.244.2.20", "10.244.2.30"
API_SVC = "10.96.0.50"


@pytest.fixture(scope="session")
def cluster(controlplane: ControlPlane) -> Iterator[Cluster]:  # noqa: F811
    plane = controlplane
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
    folder = Path(tempfile.mkdtemp(prefix="flowmap-op-"))
    try:
        yield Cluster(plane, folder)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
