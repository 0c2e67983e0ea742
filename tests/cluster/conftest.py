"""A real two-node cluster per CNI shape, flowmap installed on it as the README says, the shop idle.

Module-scoped and parametrized by CNI: pytest runs every test of a module on ``ptp``, then brings
the cluster down and does them all again on ``bridge-vxlan`` (one cluster at a time: they share
the machine's addresses, and ``flowmap demo`` makes one too). The teardown checks
that nothing the cluster made is left: processes, network namespaces, cgroups, mounts.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from flowmap_devenv import images
from flowmap_devenv.cluster import CNIS, Cluster, node_specs
from tests.conftest import need, need_root

SHOP_NODES = {"web": 0, "postgres": 0, "coredns": 0, "api": 1, "worker": 1, "redis": 1}  # node index


@dataclass
class Real:
    cluster: Cluster
    cni: str
    pods: dict[str, str] = field(default_factory=dict)  # app -> pod IP

    def kubectl(self, *args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return self.cluster.kubectl(*args, check=check, timeout=timeout)

    def json(self, *args: str) -> Any:
        return json.loads(self.kubectl(*args, "-o", "json").stdout)

    def netns(self, app_or_index: str | int) -> str:
        index = SHOP_NODES[app_or_index] if isinstance(app_or_index, str) else app_or_index
        return node_specs(2)[index].netns

    def nft(self, node: int, ruleset: str) -> None:
        subprocess.run(["nsenter", f"--net=/run/netns/{self.netns(node)}", "nft", "-f", "-"], input=ruleset,
                       text=True, check=True, capture_output=True)

    def counters(self, node: int, table: str) -> dict[str, tuple[int, int]]:
        """(bytes, packets) of each commented rule of an ``inet`` table of a node."""
        out = json.loads(subprocess.run(["nsenter", f"--net=/run/netns/{self.netns(node)}", "nft", "-j", "list",
                                         "table", "inet", table], capture_output=True, text=True, check=True).stdout)
        found = {}
        for item in out["nftables"]:
            rule = item.get("rule")
            if rule and "comment" in rule:
                counter = next(e["counter"] for e in rule["expr"] if "counter" in e)
                found[rule["comment"]] = (counter["bytes"], counter["packets"])
        return found

    def shop(self, deployment: str, *args: str, timeout: float = 300) -> str:
        """Run the shop's program in a pod of ``deployment`` (kubectl exec): its traffic is the pod's."""
        return self.kubectl("-n", "shop", "exec", f"deploy/{deployment}", "--", "python3", "/shop/shop.py", *args,
                            timeout=timeout).stdout

    def in_parallel(self, *calls: tuple[str, ...]) -> list[str]:
        """Shop rounds in several pods at once (each call: role, arguments); each call's output, in order."""
        results: list[str] = [""] * len(calls)

        def one(i: int, call: tuple[str, ...]) -> None:
            results[i] = self.shop(call[0], *call)

        threads = [threading.Thread(target=one, args=(i, c)) for i, c in enumerate(calls)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return results

    def connections(self) -> dict[str, dict[str, Any]]:
        return {c["metadata"]["name"]: c for c in self.json("get", "connections")["items"]}


def need_cluster() -> None:
    """Skip (laptop) or fail (CI) unless this machine can run the local cluster."""
    need_root()
    for tool in ("containerd", "runc", "buildah", "debootstrap", "iptables", "conntrack"):
        need(shutil.which(tool) is not None, f"the real cluster needs {tool} (make setup installs it)")
    need(Path("/usr/lib/cni/ptp").exists(), "the real cluster needs the CNI plugins (containernetworking-plugins)")


def cluster_leftovers(state: Path) -> list[str]:
    """What a cluster made that is still here."""
    found = []
    names = set(subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.split())
    found += [f"netns {n}" for n in names if n.startswith("fmc-")]
    found += [f"cgroup {p}" for p in Path("/sys/fs/cgroup").glob("*/fmc-*")]
    found += [f"mount {line.split()[4]}" for line in Path("/proc/self/mountinfo").read_text().splitlines()
              if str(state) in line]
    for proc in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            cmd = proc.read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if str(state) in cmd:
            found.append(f"process {proc.parent.name}: {cmd[:120]}")
    if subprocess.run(["ip", "link", "show", "fmc-host"], capture_output=True).returncode == 0:
        found.append("link fmc-host")
    return found


@pytest.fixture(scope="module", params=CNIS)
def real(request: pytest.FixtureRequest) -> Iterator[Real]:
    need_cluster()
    folder = Path(tempfile.mkdtemp(prefix="flowmap-real-"))
    state = folder / "state"
    lines: list[str] = []
    cluster = Cluster(state, log=lines.append)
    try:
        try:
            cluster.up(nodes=2, cni=request.param)
            cluster.install_flowmap(images.NAMES["flowmap"])
            cluster.deploy_shop(rounds=-1, probe_period=2)
        except Exception as exc:
            pods = cluster.kubectl("get", "pods", "-A", "-o", "wide", check=False).stdout if cluster.layout() else ""
            raise AssertionError(f"the {request.param} cluster did not come up: {exc}\n" + "\n".join(lines[-20:]) +
                                 f"\n{pods}") from exc
        real = Real(cluster, request.param)
        for pod in real.json("get", "pods", "-A")["items"]:
            app = pod["metadata"].get("labels", {}).get("app") or pod["metadata"].get("labels", {}).get("k8s-app")
            if pod["metadata"]["namespace"] in ("shop", "kube-system") and app:
                real.pods["coredns" if app == "kube-dns" else app] = pod["status"]["podIP"]
        yield real
    finally:
        try:
            cluster.down()
        finally:
            left = cluster_leftovers(state)
            shutil.rmtree(folder, ignore_errors=True)
    assert not left, f"the cluster left these behind: {left}"
