"""The cluster's objects and flowmap's operator for the simulated cluster, tests and benchmarks.

Objects are applied with kubectl (server-side) as a kubelet or controller would make them; the
operator runs as a child process with the flowmap-operator ServiceAccount's token (the RBAC of
manifests/), its gRPC port serving TLS with a certificate made here; agents authenticate with
tokens of the flowmap-agent ServiceAccount bound to their agent pod (which names the node).
"""

from __future__ import annotations

import base64
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flowmap_devenv import pki
from flowmap_operator.certs import service_names
from flowmap_devenv.controlplane import REPO, ControlPlane

NS = "flowmap-system"


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
    operator_cert: tuple[Path, Path] = field(init=False)  # the operator's serving certificate and key

    def __post_init__(self) -> None:
        self.keys = pki.create(self.folder / "grpc-pki")
        # Agents dial it on loopback, the API server (results.flowmap.dev) by its Service's name.
        self.operator_cert = pki.issue(self.folder / "grpc-pki", "operator", "flowmap-operator", server=True,
                                       names=("localhost", *service_names("flowmap-operator", NS)),
                                       ips=("127.0.0.1", "::1"))

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
        self.grpc_port, self.metrics_port, self.results_port = free_port(), free_port(), free_port()
        self.log = cluster.folder / f"operator-{self.grpc_port}.log"
        # TMPDIR: the API client writes the kubeconfig's CA to a temporary file it removes at exit;
        # a test's kill -9 leaves it, in the cluster's folder, which goes with the cluster.
        self.env = {**os.environ, "KUBECONFIG": str(cluster.operator_kubeconfig()), "TMPDIR": str(cluster.folder),
                    "FLOWMAP_OPERATOR_GRPC_LISTEN": str(self.grpc_port),
                    "FLOWMAP_OPERATOR_METRICS_LISTEN": str(self.metrics_port),
                    "FLOWMAP_OPERATOR_RESULTS_LISTEN": str(self.results_port),
                    "FLOWMAP_OPERATOR_GRPC_TLS_CERT": str(cluster.operator_cert[0]),
                    "FLOWMAP_OPERATOR_GRPC_TLS_KEY": str(cluster.operator_cert[1]),
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


def host_address() -> str:
    """This host's address towards the outside (its default route's source): one the API server
    can dial that an endpoint may hold (loopback may not)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("198.51.100.1", 9))  # no packet is sent: the kernel picks the route
        except OSError as exc:
            raise RuntimeError("results.flowmap.dev needs an address of this host that is not loopback "
                               f"(a default route): {exc}") from exc
        return str(s.getsockname()[0])


def serve_results(plane: ControlPlane, cluster: Cluster, operator: Operator) -> None:
    """results.flowmap.dev as an install has it (manifests/operator/apiservice.yaml), the operator
    being a process of this host: its Service's endpoint is this host, and the APIService trusts
    the operator's CA (in a cluster, the endpoint controller and the operator do both)."""
    apply(plane, {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
                  "metadata": {"name": "flowmap-operator-host", "namespace": NS,
                               "labels": {"kubernetes.io/service-name": "flowmap-operator",
                                          "endpointslice.kubernetes.io/managed-by": "flowmap-devenv"}},
                  "addressType": "IPv4",
                  "ports": [{"name": "results", "port": operator.results_port, "protocol": "TCP"}],
                  "endpoints": [{"addresses": [host_address()], "conditions": {"ready": True}}]})
    ca = base64.b64encode(cluster.keys.ca_cert.read_bytes()).decode()
    plane.kubectl("patch", "apiservice", "v1alpha1.results.flowmap.dev", "--type=merge",
                  "-p", json.dumps({"spec": {"caBundle": ca}}))
