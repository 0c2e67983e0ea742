"""A real Kubernetes cluster on this machine: ``flowmap cluster up | down | status | env | load-image``.

::

    this machine   etcd, kube-apiserver (172.30.0.2:6443), kube-controller-manager, kube-scheduler
        |          172.30.0.0/24
    router         a bridge (172.30.0.1), and the "internet" beyond it (198.51.100.0/24:
      /   \\         payments.example.com at .10, a TLS server)
    node-1  node-2  172.30.0.11 / .12 on eth0: containerd + runc, kubelet, kube-proxy (flowmap_devenv.nodes)
      |       |     pods from 10.240.0.0/16 (each node's spec.podCIDR), Services from 10.100.0.0/16
    pods     pods   CoreDNS at 10.100.0.10

Two CNI shapes, the two users meet:

* ``ptp``: a veth and a /32 host route per pod (the ``ptp`` plugin), pod CIDRs routed node to
  node, egress masqueraded: the shape of kindnet, Calico and the AWS VPC CNI;
* ``bridge-vxlan``: every pod's veth on the bridge ``cni0`` (the ``bridge`` plugin) and a VXLAN
  overlay between nodes run by real flannel (its DaemonSet): the shape of flannel, k3s, kubenet.

Images come from flowmap_devenv.images and are imported into each node's containerd; binaries
from flowmap_devenv.binaries. Everything lives in the state folder, and ``down`` removes every
process, namespace, cgroup and mount it made, also after a crashed ``up``.
"""

from __future__ import annotations

import json
import os
import shutil
import string
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from flowmap_devenv import binaries, images
from flowmap_devenv.controlplane import REPO, ControlPlane, ControlPlaneError, Options
from flowmap_devenv.nodes import Node, NodeError, NodeSpec

Log = Callable[[str], None]
ADDONS = Path(__file__).resolve().parent / "addons"
CNIS = ("ptp", "bridge-vxlan")
SUBNET, ROUTER, HOST = "172.30.0.0/24", "172.30.0.1", "172.30.0.2"
API_PORT = 6443
CLUSTER_CIDR, SERVICE_CIDR, DNS_IP = "10.240.0.0/16", "10.100.0.0/16", "10.100.0.10"
INTERNET_SUBNET, INTERNET_GW, INTERNET = "198.51.100.0/24", "198.51.100.1", "198.51.100.10"
PAYMENTS = "payments.example.com"
VXLAN_PORT = 8472  # flannel's default, the Linux one
ROUTER_NS, INTERNET_NS, HOST_LINK = "fmc-router", "fmc-internet", "fmc-host"
BRIDGE_MTU = 1450  # 1500 less VXLAN's 50


class ClusterError(RuntimeError):
    """The cluster could not be brought up (or down); the message says why."""


def default_state_dir() -> Path:
    override = os.environ.get("FLOWMAP_CLUSTER_DIR")
    if override:
        return Path(override).expanduser()
    return Path(os.environ.get("XDG_STATE_HOME", Path.home() / ".local" / "state")) / "flowmap" / "cluster"


def node_specs(count: int) -> list[NodeSpec]:
    return [NodeSpec(f"node-{i}", f"172.30.0.{10 + i}", f"fmc-node-{i}") for i in range(1, count + 1)]


@dataclass(frozen=True)
class Layout:
    """What ``up`` was asked for, kept in the state folder."""

    nodes: int = 2
    cni: str = "ptp"


class Cluster:
    """One cluster, identified by its state folder."""

    def __init__(self, state_dir: Path | None = None, log: Log = print) -> None:
        self.dir = (state_dir or default_state_dir()).resolve()
        self.log = log
        self.plane = ControlPlane(self.dir / "controlplane", crds=None, log=log,
                                  options=Options(address=HOST, port=API_PORT, service_cidrs=SERVICE_CIDR,
                                                  cluster_cidr=CLUSTER_CIDR))

    # -- state -----------------------------------------------------------------------------------

    def layout(self) -> Layout | None:
        try:
            return Layout(**json.loads((self.dir / "layout.json").read_text()))
        except (OSError, ValueError, TypeError):
            return None

    def nodes(self) -> list[Node]:
        layout = self.layout()
        return [Node(spec, self.dir / "nodes" / spec.name, self.log) for spec in node_specs(layout.nodes if layout else 0)]

    @property
    def kubeconfig(self) -> Path:
        return self.plane.kubeconfig

    def kubectl(self, *args: str, input: str | None = None, check: bool = True,
                timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return self.plane.kubectl(*args, input=input, check=check, timeout=timeout)

    def env(self) -> str:
        return self.plane.env()

    def status(self) -> dict[str, Any]:
        layout = self.layout()
        if layout is None:
            return {"state": str(self.dir), "running": False}
        plane = self.plane.status()
        nodes = {node.spec.name: node.alive() for node in self.nodes()}
        ready = {}
        if plane.get("running"):
            got = self.kubectl("get", "nodes", "-o", "json", check=False)
            if got.returncode == 0:
                for item in json.loads(got.stdout)["items"]:
                    cond = {c["type"]: c["status"] for c in item["status"].get("conditions", [])}
                    ready[item["metadata"]["name"]] = cond.get("Ready") == "True"
        running = bool(plane.get("running")) and all(all(n.values()) for n in nodes.values()) and \
            len(ready) == layout.nodes and all(ready.values())
        return {"state": str(self.dir), "running": running, "cni": layout.cni, "controlplane": plane,
                "processes": nodes, "ready": ready, "kubeconfig": str(self.kubeconfig)}

    # -- up --------------------------------------------------------------------------------------

    def up(self, nodes: int = 2, cni: str = "ptp") -> None:
        """Build what is missing, then bring up the network, control plane, nodes, CNI and DNS."""
        if cni not in CNIS:
            raise ClusterError(f"--cni {cni}: one of {', '.join(CNIS)}")
        if not 1 <= nodes <= 9:
            raise ClusterError("--nodes: 1 to 9")
        for tool, package in (("containerd", "containerd"), ("runc", "runc"), ("nft", "nftables"),
                              ("iptables", "iptables"), ("conntrack", "conntrack"), ("nsenter", "util-linux")):
            if not shutil.which(tool):
                raise ClusterError(f"'{tool}' is needed on this machine: apt-get install {package}")
        if not (Path("/usr/lib/cni") / "ptp").exists():
            raise ClusterError("the standard CNI plugins are needed in /usr/lib/cni: "
                               "apt-get install containernetworking-plugins")
        if self.layout() is not None or Path(f"/run/netns/{ROUTER_NS}").exists():
            raise ClusterError(f"a cluster is already up or was left behind (state in {self.dir}, or "
                               f"/run/netns/{ROUTER_NS}): run 'flowmap cluster down' first")
        bins = binaries.ensure_programs(binaries.CLUSTER, self.log)
        built = images.Builder(self.log).all()
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / "layout.json").write_text(json.dumps({"nodes": nodes, "cni": cni}))
        started = time.monotonic()
        try:
            self._network()
            self.log(f"[cluster] control plane at https://{HOST}:{API_PORT}")
            self.plane.up()
            ca = self.plane.dir / "pki" / "ca.crt"
            proxy = self.plane.client_kubeconfig("kube-proxy", "system:kube-proxy")
            archives = [b.archive for name, b in built.items() if name != "base"]
            for node in self.nodes():
                self.log(f"[cluster] {node.spec.name}: containerd ({len(archives)} images), kubelet, kube-proxy")
                kubeconfig = self.plane.client_kubeconfig(f"kubelet-{node.spec.name}",
                                                          f"system:node:{node.spec.name}", "system:nodes")
                node.start(kubeconfig=kubeconfig, proxy_kubeconfig=proxy, ca=ca, cluster_dns=DNS_IP,
                           cluster_cidr=CLUSTER_CIDR, images=archives, sandbox_image=built["pause"].name)
            cidrs = self._wait_registered()
            self.log(f"[cluster] CNI {cni}: {', '.join(f'{n} {c}' for n, c in cidrs.items())}")
            specs = {s.name: s for s in node_specs(nodes)}
            for name, cidr in cidrs.items():
                # The API server reaches pods as it does on a control-plane node (aggregated APIs,
                # admission webhooks); the routes go with HOST_LINK at down.
                _run("ip", "route", "replace", cidr, "via", specs[name].ip, "dev", HOST_LINK)
            if cni == "ptp":
                self._ptp(cidrs)
            else:
                self._bridge_vxlan(cidrs, built["flannel"].name)
            self._wait_ready()
            self.log("[cluster] CoreDNS")
            self.apply_template(ADDONS / "coredns.yaml", IMAGE=built["coredns"].name, DNS_IP=DNS_IP,
                                DNS_NODE=node_specs(nodes)[0].name, HOSTS=f"            {INTERNET} {PAYMENTS}")
            self.kubectl("-n", "kube-system", "rollout", "status", "deployment/coredns", "--timeout=180s",
                         timeout=200)
        except BaseException:
            self.log(f"[cluster] up failed; its logs are in {self.dir}")
            raise
        self.log(f"[cluster] up in {time.monotonic() - started:.0f} s: {nodes} nodes, CNI {cni}, "
                 f"Kubernetes {binaries.KUBERNETES_VERSION} ({len(bins)} programs)")

    def apply_template(self, path: Path, **values: str) -> None:
        self.kubectl("apply", "-f", "-", input=string.Template(path.read_text()).substitute(values))

    def _network(self) -> None:
        """The router's bridge, this machine on it, each node's namespace with eth0, the internet."""
        self.log("[cluster] network: router, internet, nodes")
        _ns_add(ROUTER_NS)
        _in(ROUTER_NS, "sysctl", "-qw", "net.ipv4.ip_forward=1")
        _in(ROUTER_NS, "ip", "link", "add", "br0", "type", "bridge")
        _in(ROUTER_NS, "ip", "addr", "add", f"{ROUTER}/24", "dev", "br0")
        _in(ROUTER_NS, "ip", "link", "set", "br0", "up")
        _run("ip", "link", "add", HOST_LINK, "type", "veth", "peer", "name", "host", "netns", ROUTER_NS)
        _run("ip", "addr", "add", f"{HOST}/24", "dev", HOST_LINK)
        _run("ip", "link", "set", HOST_LINK, "up")
        _in(ROUTER_NS, "ip", "link", "set", "host", "master", "br0", "up")
        _ns_add(INTERNET_NS)
        _run("ip", "link", "add", "internet", "netns", ROUTER_NS, "type", "veth", "peer", "name", "eth0",
             "netns", INTERNET_NS)
        _in(ROUTER_NS, "ip", "addr", "add", f"{INTERNET_GW}/24", "dev", "internet")
        _in(ROUTER_NS, "ip", "link", "set", "internet", "up")
        _in(INTERNET_NS, "ip", "addr", "add", f"{INTERNET}/24", "dev", "eth0")
        _in(INTERNET_NS, "ip", "link", "set", "eth0", "up")
        _in(INTERNET_NS, "ip", "route", "add", "default", "via", INTERNET_GW)
        for spec in node_specs(self.layout().nodes):  # type: ignore[union-attr]
            _ns_add(spec.netns)
            _run("ip", "link", "add", spec.name, "netns", ROUTER_NS, "type", "veth", "peer", "name", "eth0",
                 "netns", spec.netns)
            _in(ROUTER_NS, "ip", "link", "set", spec.name, "master", "br0", "up")
            _in(spec.netns, "ip", "addr", "add", f"{spec.ip}/24", "dev", "eth0")
            _in(spec.netns, "ip", "link", "set", "eth0", "up")
            _in(spec.netns, "ip", "route", "add", "default", "via", ROUTER)
            for key in ("net.ipv4.ip_forward=1", "net.bridge.bridge-nf-call-iptables=1",
                        "net.bridge.bridge-nf-call-ip6tables=1"):
                _in(spec.netns, "sysctl", "-qw", key)
        self._payments()

    def _payments(self) -> None:
        """payments.example.com on the internet: HTTPS with a certificate of a CA of our own."""
        folder = self.dir / "internet"
        folder.mkdir(exist_ok=True)
        subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
                        "-keyout", str(folder / "payments.key"), "-out", str(folder / "payments.crt"), "-days", "30",
                        "-subj", f"/CN={PAYMENTS}", "-addext", f"subjectAltName=DNS:{PAYMENTS}"],
                       check=True, capture_output=True)
        log = open(folder / "payments.log", "ab")  # noqa: SIM115 - handed to the child
        with log:
            proc = subprocess.Popen(
                ["nsenter", f"--net=/run/netns/{INTERNET_NS}", sys.executable, "-m", "flowmap_devenv.shop",
                 "payments", "--cert", str(folder / "payments.crt"), "--key", str(folder / "payments.key")],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        (folder / "payments.pid").write_text(str(proc.pid))

    @property
    def payments_ca(self) -> Path:
        return self.dir / "internet" / "payments.crt"

    def _wait_registered(self, timeout: float = 120) -> dict[str, str]:
        """Each node's pod CIDR, once it registered and the controller-manager gave it one."""
        want = {n.spec.name for n in self.nodes()}
        end = time.monotonic() + timeout
        while True:
            got = json.loads(self.kubectl("get", "nodes", "-o", "json").stdout)["items"]
            cidrs = {n["metadata"]["name"]: n["spec"].get("podCIDR", "") for n in got}
            if set(cidrs) >= want and all(cidrs[n] for n in want):
                return {n: cidrs[n] for n in sorted(want)}
            self._check_alive()
            if time.monotonic() > end:
                raise ClusterError(f"nodes not registered with a pod CIDR after {timeout:.0f} s: {cidrs}")
            time.sleep(0.5)

    def _wait_ready(self, timeout: float = 180) -> None:
        self.kubectl("wait", "--for=condition=Ready", "node", "--all", f"--timeout={timeout:.0f}s",
                     timeout=timeout + 10)

    def _check_alive(self) -> None:
        for node in self.nodes():
            for name, alive in node.alive().items():
                if not alive:
                    raise NodeError(f"{name} of {node.spec.name} exited:\n{node.tail(name)}")

    def _ptp(self, cidrs: dict[str, str]) -> None:
        """Per-pod veths and host routes; pod CIDRs routed between nodes; egress masqueraded."""
        specs = {s.name: s for s in node_specs(len(cidrs))}
        for node in self.nodes():
            name = node.spec.name
            _write(node.host_path("/etc/cni/net.d") / "10-ptp.conflist", {
                "cniVersion": "1.0.0", "name": "ptp", "plugins": [
                    {"type": "ptp", "ipMasq": False, "mtu": 1500,
                     "ipam": {"type": "host-local", "ranges": [[{"subnet": cidrs[name]}]],
                              "routes": [{"dst": "0.0.0.0/0"}]}},
                    {"type": "portmap", "capabilities": {"portMappings": True}}]})
            for other, cidr in cidrs.items():
                if other != name:
                    _in(node.spec.netns, "ip", "route", "add", cidr, "via", specs[other].ip)
            # What pods send outside the cluster leaves with the node's address, as kindnet does.
            _in(node.spec.netns, "nft", "-f", "-", input_text=f"""
table ip fmc-masquerade {{
  chain postrouting {{
    type nat hook postrouting priority srcnat;
    ip saddr {CLUSTER_CIDR} ip daddr != {CLUSTER_CIDR} oifname "eth0" masquerade
  }}
}}""")

    def _bridge_vxlan(self, cidrs: dict[str, str], image: str) -> None:
        """flannel's DaemonSet for the overlay; the bridge plugin for the pods, as flannel's plugin
        would configure it."""
        for node in self.nodes():
            _write(node.host_path("/etc/cni/net.d") / "10-flannel.conflist", {
                "cniVersion": "1.0.0", "name": "cbr0", "plugins": [
                    {"type": "bridge", "bridge": "cni0", "isGateway": True, "isDefaultGateway": True,
                     "hairpinMode": True, "ipMasq": False, "mtu": BRIDGE_MTU,
                     "ipam": {"type": "host-local", "ranges": [[{"subnet": cidrs[node.spec.name]}]]}},
                    {"type": "portmap", "capabilities": {"portMappings": True}}]})
        self.apply_template(ADDONS / "flannel.yaml", IMAGE=image, CLUSTER_CIDR=CLUSTER_CIDR,
                            VXLAN_PORT=str(VXLAN_PORT))
        self.kubectl("-n", "kube-flannel", "rollout", "status", "daemonset/kube-flannel-ds", "--timeout=180s",
                     timeout=200)

    # -- images ----------------------------------------------------------------------------------

    def load_image(self, archive: Path) -> None:
        """Import an image archive (docker-archive or OCI) into every node's containerd."""
        for node in self.nodes():
            node.ctr("images", "import", str(archive))

    # -- flowmap, as the README installs it ------------------------------------------------------

    def install_flowmap(self, image: str) -> None:
        """The README's install: the CRDs, then the base through an overlay naming ``image``."""
        self.kubectl("apply", "--server-side", "-k", str(REPO / "crds"))
        self.kubectl("wait", "--for=condition=Established", "crd", "-l", "app.kubernetes.io/part-of=flowmap",
                     "--timeout=60s")
        overlay = REPO / "hack" / f".cluster-overlay-{os.getpid()}"  # an overlay may not name its base by an absolute path
        overlay.mkdir(exist_ok=True)
        try:
            name, tag = image.rsplit(":", 1)
            (overlay / "kustomization.yaml").write_text(json.dumps({
                "apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
                "resources": ["../../manifests"],
                "images": [{"name": "ghcr.io/flowmap-dev/flowmap", "newName": name, "newTag": tag}]}))
            self.kubectl("apply", "--server-side", "-k", str(overlay))
        finally:
            shutil.rmtree(overlay, ignore_errors=True)
        self.kubectl("-n", "flowmap-system", "rollout", "status", "deployment/flowmap-operator", "--timeout=240s",
                     timeout=260)
        for ds in ("flowmap-dp", "flowmap-agent"):
            self.kubectl("-n", "flowmap-system", "rollout", "status", f"daemonset/{ds}", "--timeout=240s", timeout=260)

    # -- the demo shop ---------------------------------------------------------------------------

    def deploy_shop(self, rounds: int = 0, pause: float = 1.0, probe_period: int = 5) -> None:
        """The shop (addons/shop.yaml) in stages, servers before their clients, so that no client
        calls a Service before kube-proxy knows its endpoints. ``rounds`` 0: traffic until removed."""
        nodes = [n.spec.name for n in self.nodes()]
        docs = [d for d in yaml.safe_load_all(string.Template((ADDONS / "shop.yaml").read_text()).substitute(
            IMAGE=images.NAMES["shop"], NODE_A=nodes[0], NODE_B=nodes[-1], ROUNDS=str(rounds), PAUSE=str(pause),
            PROBE_PERIOD=str(probe_period))) if d]
        self.kubectl("apply", "-f", "-", input=json.dumps(next(d for d in docs if d["kind"] == "Namespace")))
        for name, path in (("shop-programs", Path(__file__).with_name("shop.py")), ("payments-ca", self.payments_ca)):
            key = "shop.py" if name == "shop-programs" else "payments-ca.crt"
            self.kubectl("apply", "-f", "-", input=json.dumps({
                "apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": name, "namespace": "shop"},
                "data": {key: path.read_text()}}))
        for stage in (("redis", "postgres"), ("api",), ("web", "worker")):
            chosen = [d for d in docs if d["metadata"]["name"] in stage]
            self.kubectl("apply", "-f", "-", input=json.dumps({"apiVersion": "v1", "kind": "List", "items": chosen}))
            for d in chosen:
                if d["kind"] in ("Deployment", "StatefulSet"):
                    self.kubectl("-n", "shop", "rollout", "status", f"{d['kind'].lower()}/{d['metadata']['name']}",
                                 "--timeout=180s", timeout=200)
            time.sleep(2)  # kube-proxy applies new endpoints within its minimum sync period (1 s)

    # -- down ------------------------------------------------------------------------------------

    def down(self, force: bool = False) -> None:
        """Stop and remove everything, whatever state ``up`` got to.

        What a cluster makes on the machine has fixed names (namespaces, cgroups: one cluster per
        machine), so without a cluster in its own state folder ``down`` removes only that folder,
        unless ``force``: then whatever a cluster whose state is gone left here (``flowmap cluster
        down`` says so)."""
        if self.layout() is not None or force:
            self._teardown()
        if self.dir.exists():
            # Each node's images, unpacked: tens of thousands of files. rm -rf, the nodes at once.
            removing = [subprocess.Popen(["rm", "-rf", "--one-file-system", str(p)]) for p in (self.dir / "nodes").glob("*")]
            for proc in removing:
                proc.wait()
            shutil.rmtree(self.dir)
        self.log(f"[cluster] down; removed {self.dir}")

    def _teardown(self) -> None:
        for node in self.nodes() or [Node(s, self.dir / "nodes" / s.name, self.log) for s in node_specs(9)]:
            node.stop()
        pid_file = self.dir / "internet" / "payments.pid"
        if pid_file.exists():
            try:
                os.killpg(int(pid_file.read_text()), 9)
            except (ProcessLookupError, ValueError):
                pass
        try:
            self.plane.down(quiet=True)
        except ControlPlaneError as exc:
            self.log(f"[cluster] {exc}")
        subprocess.run(["ip", "link", "del", HOST_LINK], capture_output=True)
        for ns in [ROUTER_NS, INTERNET_NS, *(s.netns for s in node_specs(9))]:
            if Path(f"/run/netns/{ns}").exists():
                subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def _ns_add(name: str) -> None:
    _run("ip", "netns", "add", name)
    _in(name, "ip", "link", "set", "lo", "up")


def _in(ns: str, *args: str, input_text: str | None = None) -> str:
    return _run("nsenter", f"--net=/run/netns/{ns}", *args, input_text=input_text)


def _run(*args: str, input_text: str | None = None) -> str:
    done = subprocess.run(list(args), capture_output=True, text=True, input=input_text)
    if done.returncode:
        raise ClusterError(f"{' '.join(args)}: {done.stderr.strip()}")
    return done.stdout


def _write(path: Path, doc: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=1))
