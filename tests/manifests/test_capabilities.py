"""The capabilities the DaemonSets grant are enough, and each one is needed.

The dp and the agent's privileged work run here as the container runtime runs them: root, in a
node's network namespace, with every capability but the ones manifests/agent/ (daemonset.yaml, dp.yaml) add
removed from the bounding set (``setpriv``). The dp captures a pod's traffic with its grant, and
cannot open a ring without it; the agent reads links, its pods' addresses (in their namespaces)
and connection tracking and writes nftables rules with its grant, and is refused its pods'
addresses, conntrack and nftables without it.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from flowmap_agent.listening import ReportReader
from flowmap_devenv.netns import Lab
from tests.conftest import REPO, need

NODE_IP, POD_IP = "10.63.0.1", "10.63.1.2"


def granted(container: str) -> list[str]:
    docs = [d for f in ("daemonset.yaml", "dp.yaml")
            for d in yaml.safe_load_all((REPO / "manifests" / "agent" / f).read_text()) if d["kind"] == "DaemonSet"]
    found = next(c for ds in docs for c in ds["spec"]["template"]["spec"]["containers"] if c["name"] == container)
    caps = found["securityContext"]["capabilities"]
    assert caps["drop"] == ["ALL"]
    return [str(c) for c in caps.get("add", [])]


def confined(caps: list[str]) -> list[str]:
    """A command prefix: root holding only ``caps``, as in a container with drop ALL, add caps."""
    keep = "".join(f",+{c.lower()}" for c in caps)
    return ["setpriv", f"--bounding-set=-all{keep}", "--inh-caps=-all", "--"]


class Node:
    """A node namespace with one pod behind a veth, routed as kindnet routes it (/32 on the veth)."""

    def __init__(self, lab: Lab) -> None:
        self.lab = lab
        self.node, self.pod = lab.ns("fmcn"), lab.ns("fmcp")
        self.host_side, pod_side = lab.veth(self.node, [f"{NODE_IP}/32"], self.pod, [f"{POD_IP}/32"])
        lab.exec(self.node, "ip", "route", "add", f"{POD_IP}/32", "dev", self.host_side)
        lab.exec(self.pod, "ip", "route", "add", f"{NODE_IP}/32", "dev", pod_side)

    def run(self, caps: list[str], *args: str, **kw: object) -> subprocess.Popen[str]:
        return self.lab.popen(self.node, [*confined(caps), *args], **kw)


@pytest.fixture
def node(privileged: None) -> Iterator[Node]:
    need(shutil.which("setpriv") is not None, "this test needs setpriv (util-linux)")
    lab = Lab()
    try:
        yield Node(lab)
    finally:
        lab.close()


def capture(node: Node, caps: list[str], folder: Path) -> tuple[list[str], list[str], bool]:
    """Run the dp with ``caps`` on the pod's veth while the pod sends; (attached, failed, pod seen)."""
    reader = ReportReader(str(folder / "dp.sock"))
    dp = node.run(caps, sys.executable, "-m", "flowmap_cli", "dp", "run", "--socket", reader.path, "--interval", "0.2",
                  # Both families in one argument, as the DaemonSet passes status.hostIPs.
                  "--iface", node.host_side, "--local-address", f"{NODE_IP},fd63::1", stdout=subprocess.DEVNULL,
                  stderr=subprocess.STDOUT)
    try:
        health, seen, deadline = None, False, time.monotonic() + 15
        while time.monotonic() < deadline and not (seen or (health and health.failed_interfaces)):
            node.lab.exec(node.pod, sys.executable, "-c", "import socket; socket.socket(socket.AF_INET, "
                          f"socket.SOCK_DGRAM).sendto(b'flowmap', ('{NODE_IP}', 9999))")
            for report in reader.poll(0.3):
                health = report.health if report.HasField("health") else health
                seen = seen or any(socket.inet_ntop(socket.AF_INET, s.client_ip) == POD_IP for s in report.sessions
                                   if len(s.client_ip) == 4)
        assert health is not None, "the dp never reported"
        return list(health.interfaces), list(health.failed_interfaces), seen
    finally:
        dp.terminate()
        dp.wait(10)
        reader.close()


def test_the_dp_captures_with_net_raw_alone(node: Node, tmp_path: Path) -> None:
    caps = granted("dp")
    assert caps == ["NET_RAW"]
    attached, failed, seen = capture(node, caps, tmp_path)
    assert (attached, failed, seen) == ([node.host_side], [], True)


def test_the_dp_cannot_capture_without_net_raw(node: Node, tmp_path: Path) -> None:
    attached, failed, seen = capture(node, [c for c in granted("dp") if c != "NET_RAW"], tmp_path)
    assert (attached, failed, seen) == ([], [node.host_side], False)


AGENT_WORK = f"""
import json, subprocess
from flowmap_agent import errors, links, nat, plumbing
view = links.Reader("").read()
out = {{"pods": plumbing.pod_interfaces(view.links, view.peers, ["{POD_IP}"]),
       "uplinks": sorted(plumbing.holders(view.links, view.addresses, ["{NODE_IP}"]))}}
try:
    lookup, _, close = nat.conntrack_lookup("")
    out["conntrack"] = lookup((6, "{NODE_IP}", 40000, "192.0.2.1", 443)) or "read"
    close()
except errors.NoConntrack as exc:
    out["conntrack"] = "refused: " + str(exc)
nft = subprocess.run(["nft", "add", "table", "inet", "flowmap_captest"], capture_output=True, text=True)
out["nft"] = "written" if nft.returncode == 0 else "refused: " + nft.stderr.strip()
print(json.dumps(out))
"""


def agent_work(node: Node, caps: list[str]) -> dict[str, object]:
    proc = node.run(caps, sys.executable, "-c", AGENT_WORK, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    return dict(json.loads(out))


def test_the_agent_reads_links_conntrack_and_writes_nftables_with_net_admin_alone(node: Node) -> None:
    need(shutil.which("nft") is not None, "this test needs nft (Debian package nftables)")
    caps = granted("agent")
    assert caps == ["NET_ADMIN"]
    got = agent_work(node, caps)
    assert got == {"pods": {POD_IP: node.host_side}, "uplinks": [node.host_side], "conntrack": "read",
                   "nft": "written"}


def test_without_net_admin_the_agent_is_refused_conntrack_and_nftables(node: Node) -> None:
    need(shutil.which("nft") is not None, "this test needs nft (Debian package nftables)")
    got = agent_work(node, [c for c in granted("agent") if c != "NET_ADMIN"])
    assert got["uplinks"] == [node.host_side]  # the node's own links and addresses need no capability
    assert got["pods"] == {}  # a pod's addresses, read in its namespace, do
    assert str(got["conntrack"]).startswith("refused") and str(got["nft"]).startswith("refused"), got
