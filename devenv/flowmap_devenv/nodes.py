"""One Kubernetes node on this machine: containerd + runc, kubelet and kube-proxy, its own network.

A node is what a separate machine would be, as far as the programs on it can tell:

* **network**: a network namespace (``/run/netns/fmc-<node>``), joined to the cluster's network
  by its ``eth0``; every process of the node, and the pods with ``hostNetwork``, live there.
  Processes enter it with ``nsenter --net`` (``ip netns exec`` would remount ``/sys`` and hide
  the cgroup mounts from kubelet and runc);
* **files**: a mount namespace of its own, held open by a ``sleep`` process, in which a folder of
  the node's state is bind-mounted over each path a node owns (``/var/lib/kubelet``,
  ``/var/lib/containerd``, ``/run/containerd``, ``/etc/cni/net.d``, ``/var/lib/cni``,
  ``/var/log/pods``, ``/run/netns``, ``/run/flannel``, ``/var/lib/flowmap`` …). So every hostPath
  a DaemonSet mounts is that node's own, and the mounts kubelet and containerd make (volumes,
  snapshots, network namespaces) never reach this machine's mount table;
* **cgroups**: ``/fmc-<node>`` in every cgroup v1 hierarchy: its daemons in ``system`` below it,
  its pods where kubelet puts them (``cgroupRoot``). Stopping a node freezes that tree, kills
  every process in it and removes it, so nothing outlives the node.

Facts of this kind of machine the configuration answers (measured, see ``docs/real-cluster.md``):
containerd 1.6 must ``restrict_oom_score_adj`` (no CAP_SYS_RESOURCE here) and has no
RuntimeConfig RPC (kubelet's ``cgroupDriver: cgroupfs``); kubelet 1.36 needs ``failCgroupV1:
false`` on cgroup v1; kube-proxy in a namespace needs ``conntrack.maxPerCore: 0``.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")
# Paths a node owns: each gets a folder of the node's own, bind-mounted in its mount namespace.
NODE_PATHS = ("/var/lib/kubelet", "/var/lib/containerd", "/run/containerd", "/etc/cni/net.d", "/var/lib/cni",
              "/var/log/pods", "/var/log/containers", "/run/netns", "/run/flannel", "/run/flowmap", "/var/lib/flowmap",
              "/etc/kubernetes")
CNI_BIN = "/usr/lib/cni"  # Debian's containernetworking-plugins
Log = Callable[[str], None]


class NodeError(RuntimeError):
    """A node could not be started; the message says why and where its logs are."""


@dataclass(frozen=True)
class NodeSpec:
    name: str
    ip: str
    netns: str  # under /run/netns


class Node:
    """A node's processes and files; the network namespace is made by the cluster."""

    def __init__(self, spec: NodeSpec, folder: Path, log: Log = print) -> None:
        self.spec = spec
        self.dir = folder
        self.log = log

    # -- places ----------------------------------------------------------------------------------

    @property
    def cgroup(self) -> str:
        return f"fmc-{self.spec.name}"

    def host_path(self, node_path: str) -> Path:
        """Where this node's ``node_path`` is on this machine (its bind-mount source)."""
        return self.dir / "root" / node_path.strip("/").replace("/", "-")

    @property
    def containerd_socket(self) -> Path:
        return self.host_path("/run/containerd") / "containerd.sock"

    def _pids(self) -> dict[str, int]:
        try:
            return {k: int(v) for k, v in json.loads((self.dir / "pids.json").read_text()).items()}
        except (OSError, ValueError):
            return {}

    def _save_pid(self, name: str, pid: int) -> None:
        pids = self._pids()
        pids[name] = pid
        (self.dir / "pids.json").write_text(json.dumps(pids))

    # -- starting --------------------------------------------------------------------------------

    def start(self, *, kubeconfig: Path, proxy_kubeconfig: Path, ca: Path, cluster_dns: str, cluster_cidr: str,
              images: Sequence[Path], sandbox_image: str) -> None:
        """containerd (with the images imported), kubelet and kube-proxy, in that order."""
        from flowmap_devenv import binaries

        bins = binaries.ensure_programs(("kubelet", "kube-proxy"), self.log)
        self.dir.mkdir(parents=True, exist_ok=True)
        self._cgroups()
        holder = self._mount_namespace()
        self._write_configs(kubeconfig, proxy_kubeconfig, ca, cluster_dns, cluster_cidr, sandbox_image)
        self._spawn("containerd", ["containerd", "--config", str(self.dir / "containerd.toml")], holder)
        self._wait(lambda: self.containerd_socket.exists(), "containerd", 30)
        for archive in images:
            self.ctr("images", "import", str(archive))
        self._spawn("kubelet", [str(bins["kubelet"]), f"--config={self.dir / 'kubelet.yaml'}",
                                f"--kubeconfig={kubeconfig}", f"--hostname-override={self.spec.name}",
                                f"--node-ip={self.spec.ip}", "--v=1"], holder)
        self._spawn("kube-proxy", [str(bins["kube-proxy"]), f"--config={self.dir / 'kube-proxy.yaml'}", "--v=1"],
                    holder)

    def ctr(self, *args: str) -> str:
        """containerd's own client against this node's containerd (namespace k8s.io)."""
        done = subprocess.run(["ctr", "--address", str(self.containerd_socket), "--namespace", "k8s.io", *args],
                              capture_output=True, text=True, timeout=600)
        if done.returncode:
            raise NodeError(f"ctr {' '.join(args)} on {self.spec.name}: {done.stderr.strip()}")
        return done.stdout

    def _cgroups(self) -> None:
        """``/fmc-<node>/system`` in every hierarchy; cpusets need their cpus and mems first."""
        for hierarchy in _hierarchies():
            for sub in (self.cgroup, f"{self.cgroup}/system"):
                path = hierarchy / sub
                path.mkdir(exist_ok=True)
                if (path / "cpuset.cpus").exists():
                    for knob in ("cpuset.cpus", "cpuset.mems"):
                        (path / knob).write_text((path.parent / knob).read_text())

    def _mount_namespace(self) -> int:
        """A process holding the node's mount namespace, with the node's folders bound in it."""
        pids = self._pids()
        if "holder" in pids and _alive(pids["holder"]):
            return pids["holder"]
        proc = subprocess.Popen(["unshare", "--mount", "--propagation", "private", "sleep", "infinity"],
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                preexec_fn=self._join_cgroup, start_new_session=True)
        self._save_pid("holder", proc.pid)
        ns = Path(f"/proc/{proc.pid}/ns/mnt")
        self._wait(lambda: ns.exists() and os.readlink(ns) != os.readlink("/proc/self/ns/mnt"), "mount namespace", 5)
        created = []
        for node_path in NODE_PATHS:
            source = self.host_path(node_path)
            source.mkdir(parents=True, exist_ok=True)
            if not Path(node_path).exists():
                Path(node_path).mkdir(parents=True)
                created.append(node_path)
            _run(["nsenter", f"--mount={ns}", "mount", "--bind", str(source), node_path])
        (self.dir / "created-mountpoints.json").write_text(json.dumps(created))
        return proc.pid

    def _join_cgroup(self) -> None:
        """In the child, before exec: into the node's ``system`` cgroup in every hierarchy."""
        for hierarchy in _hierarchies():
            (hierarchy / self.cgroup / "system" / "cgroup.procs").write_text(str(os.getpid()))

    def _spawn(self, name: str, argv: list[str], holder: int) -> None:
        log = open(self.dir / f"{name}.log", "ab")  # noqa: SIM115 - handed to the child
        with log:
            proc = subprocess.Popen(
                ["nsenter", f"--net=/run/netns/{self.spec.netns}", f"--mount=/proc/{holder}/ns/mnt", "--", *argv],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, preexec_fn=self._join_cgroup,
                start_new_session=True)
        self._save_pid(name, proc.pid)

    def _wait(self, ready: Callable[[], bool], what: str, timeout: float) -> None:
        end = time.monotonic() + timeout
        while not ready():
            for name, pid in self._pids().items():
                if not _alive(pid):
                    raise NodeError(f"{name} of {self.spec.name} exited:\n{self.tail(name)}")
            if time.monotonic() > end:
                raise NodeError(f"{what} of {self.spec.name} not ready after {timeout:.0f} s")
            time.sleep(0.1)

    def tail(self, name: str, lines: int = 30) -> str:
        try:
            return "\n".join((self.dir / f"{name}.log").read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def _write_configs(self, kubeconfig: Path, proxy_kubeconfig: Path, ca: Path, cluster_dns: str,
                       cluster_cidr: str, sandbox_image: str) -> None:
        cri = 'plugins."io.containerd.grpc.v1.cri"'
        (self.dir / "containerd.toml").write_text(f"""version = 2
root = "/var/lib/containerd"
state = "/run/containerd"
[grpc]
  address = "/run/containerd/containerd.sock"
[{cri}]
  sandbox_image = "{sandbox_image}"
  # This machine grants no CAP_SYS_RESOURCE: runc may not lower a sandbox's oom_score_adj.
  restrict_oom_score_adj = true
[{cri}.containerd]
  snapshotter = "overlayfs"
  default_runtime_name = "runc"
[{cri}.containerd.runtimes.runc]
  runtime_type = "io.containerd.runc.v2"
[{cri}.cni]
  bin_dir = "{CNI_BIN}"
  conf_dir = "/etc/cni/net.d"
""")
        (self.dir / "resolv.conf").write_text("nameserver 127.0.0.53\n")  # nothing answers: no DNS outside
        kubelet = {
            "apiVersion": "kubelet.config.k8s.io/v1beta1", "kind": "KubeletConfiguration",
            "address": self.spec.ip, "readOnlyPort": 0, "healthzBindAddress": "127.0.0.1",
            "authentication": {"anonymous": {"enabled": False}, "webhook": {"enabled": True},
                               "x509": {"clientCAFile": str(ca)}},
            "authorization": {"mode": "Webhook"},
            "containerRuntimeEndpoint": "unix:///run/containerd/containerd.sock",
            "cgroupDriver": "cgroupfs", "cgroupRoot": f"/{self.cgroup}", "failCgroupV1": False,
            "failSwapOn": False, "clusterDNS": [cluster_dns], "clusterDomain": "cluster.local",
            "resolvConf": str(self.dir / "resolv.conf"), "maxPods": 50, "serializeImagePulls": False,
            # A laptop's disk is shared with everything else: only a nearly full one evicts pods.
            "evictionHard": {"memory.available": "100Mi", "nodefs.available": "1%", "imagefs.available": "1%",
                             "nodefs.inodesFree": "1%"},
            "imageGCHighThresholdPercent": 100, "imageGCLowThresholdPercent": 99,
            "volumePluginDir": "/var/lib/kubelet/volumeplugins",
        }
        (self.dir / "kubelet.yaml").write_text(json.dumps(kubelet, indent=1))
        proxy = {
            "apiVersion": "kubeproxy.config.k8s.io/v1alpha1", "kind": "KubeProxyConfiguration",
            "clientConnection": {"kubeconfig": str(proxy_kubeconfig)}, "hostnameOverride": self.spec.name,
            "clusterCIDR": cluster_cidr, "healthzBindAddress": "127.0.0.1:10256",
            "metricsBindAddress": "127.0.0.1:10249",
            # The conntrack table is the machine's; a namespace may not size it.
            "conntrack": {"maxPerCore": 0},
        }
        (self.dir / "kube-proxy.yaml").write_text(json.dumps(proxy, indent=1))

    # -- state -----------------------------------------------------------------------------------

    def alive(self) -> dict[str, bool]:
        return {name: _alive(pid) for name, pid in self._pids().items()}

    # -- stopping --------------------------------------------------------------------------------

    def stop(self) -> None:
        """Freeze the node's cgroups, kill everything in them, remove them; unmount nothing:
        the mount namespace goes with its last process."""
        trees = [h / self.cgroup for h in _hierarchies() if (h / self.cgroup).is_dir()]
        freezer = CGROUP_ROOT / "freezer" / self.cgroup / "freezer.state"
        for _ in range(50):
            pids = {pid for tree in trees for pid in _procs(tree)}
            if not pids:
                break
            if freezer.exists():
                freezer.write_text("FROZEN")
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            if freezer.exists():
                freezer.write_text("THAWED")
            time.sleep(0.1)
        for tree in trees:
            for sub in sorted((p for p in tree.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)):
                _rmdir(sub)
            _rmdir(tree)
        try:
            created = json.loads((self.dir / "created-mountpoints.json").read_text())
        except (OSError, ValueError):
            created = []
        for path in created:
            try:
                Path(path).rmdir()  # only if empty: it was made for the bind mount
            except OSError:
                pass
        (self.dir / "pids.json").unlink(missing_ok=True)


def _hierarchies() -> list[Path]:
    """The mounted cgroup hierarchies (v1 controllers, the named systemd one, the unified one)."""
    found = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields = line.split()
        sep = fields.index("-")
        if fields[sep + 1] in ("cgroup", "cgroup2") and fields[4].startswith(str(CGROUP_ROOT)):
            found.append(Path(fields[4]))
    return found


def _procs(tree: Path) -> set[int]:
    pids: set[int] = set()
    for procs in tree.rglob("cgroup.procs"):
        try:
            pids.update(int(p) for p in procs.read_text().split())
        except OSError:
            pass
    return pids


def _rmdir(path: Path) -> None:
    for _ in range(20):
        try:
            path.rmdir()
            return
        except FileNotFoundError:
            return
        except OSError:
            time.sleep(0.05)


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] != "Z"
    except (OSError, IndexError):
        return False


def _run(argv: list[str]) -> str:
    done = subprocess.run(argv, capture_output=True, text=True)
    if done.returncode:
        raise NodeError(f"{' '.join(argv)}: {done.stderr.strip()}")
    return done.stdout
