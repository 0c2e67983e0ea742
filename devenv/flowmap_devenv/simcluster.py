"""A simulated cluster: a real control plane, nodes and pods as network namespaces, real traffic.

::

    internet   203.0.113.10  payments.example.com:443 (TLS)
       |       203.0.113.0/24
    router     bridge 172.18.0.1/24, fd00:172:18::1/64; a route to each node's pod CIDR
      /   \\
    node-a  node-b   172.18.0.2/.3; routes to the other node's pods via its address (as kindnet);
      |       |      a veth and a /32 (/128) host route per pod, proxy ARP/NDP (as Calico);
    pods     pods    kube-proxy's ClusterIP DNAT in nftables; flowmap's agent and dp per node

Node, Pod, Service and EndpointSlice objects are created in the API server with the real
addresses (pod status through the status subresource, as a kubelet would), plus an agent pod per
node whose bound token the agent presents. The demo shop (pods in ``PODS``, servers in
``_servers``, clients in flowmap_devenv.simtraffic):

* ``shop.web`` (node-a) calls ``api`` through its ClusterIP Service by name (HTTP) and directly
  over gRPC, and Redis over IPv6;
* ``shop.api`` (node-b) serves HTTP and gRPC, uses Redis on its node and PostgreSQL across nodes,
  and pays through ``payments.example.com`` on the internet (DNS, then TLS checked against the name);
* ``shop.worker`` (node-b) calls ``api`` through the Service too: a ClusterIP whose backend is
  on the caller's own node;
* node-b probes the api pod's HTTP port, as its kubelet would (``nodes`` -> ``shop.api``);
* ``shop.postgres`` (node-a) is a real PostgreSQL;
* ``kube-system.coredns`` (dnsmasq, node-a) answers everyone's DNS;
* ``shop.redis`` (node-b) is a real redis-server;
* the internet also serves HTTP on ``SITES`` more names and addresses (``site``), for tests that
  need new edges on demand.

Everything made here is named with this process's id and removed by :meth:`SimCluster.down`,
which a crashed run's successor can also do by name (:func:`leftovers`).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypedDict

from flowmap_devenv.controlplane import REPO, ControlPlane
from flowmap_devenv.kube import NS, Cluster, Operator, apply, create_pods, free_port, node, pod, serve_results
from flowmap_devenv.netns import Lab, run, unique

ISSUER = "https://kubernetes.default.svc.cluster.local"
ROUTER, ROUTER6 = "172.18.0.1", "fd00:172:18::1"
INTERNET, INTERNET_GW = "203.0.113.10", "203.0.113.1"
PAYMENTS = "payments.example.com"
# More external services, one name and address each (new edges on demand): site-N.example.net.
SITES = 50
# What every other name under example.com (_svcN.example.com, looked up by the "lookups" client)
# resolves to: an address no one calls, so that the names change no edge's group.
LOOKED_UP = "203.0.113.20"


def site(n: int) -> tuple[str, str]:
    """The name and address of external site ``n`` (0 <= n < SITES)."""
    return f"site-{n}.example.net", f"203.0.113.{100 + n}"


class _Service(TypedDict):
    namespace: str
    name: str
    ip: str
    port: int
    target: int


SERVICE: _Service = {"namespace": "shop", "name": "api", "ip": "10.96.0.50", "port": 80, "target": 8080}


@dataclass(frozen=True)
class Node:
    name: str
    index: int  # 1, 2: the node's address and pod CIDR follow from it

    @property
    def ip(self) -> str:
        return f"172.18.0.{self.index + 1}"

    @property
    def ip6(self) -> str:
        return f"fd00:172:18::{self.index + 1}"

    @property
    def cidr(self) -> str:
        return f"10.244.{self.index}.0/24"

    @property
    def cidr6(self) -> str:
        return f"fd00:10:244:{self.index}::/64"


NODES = (Node("node-a", 1), Node("node-b", 2))


@dataclass(frozen=True)
class Pod:
    namespace: str
    name: str
    owner: tuple[str, str]  # its controller: ("ReplicaSet", "web-7d4b9c5f8") or ("StatefulSet", "redis")
    node: Node
    host: int  # the last part of its addresses
    labels: tuple[tuple[str, str], ...] = ()

    @property
    def ip(self) -> str:
        return f"10.244.{self.node.index}.{self.host}"

    @property
    def ip6(self) -> str:
        return f"fd00:10:244:{self.node.index}::{self.host}"


def _rs(app: str, template_hash: str) -> dict[str, Any]:
    return {"owner": ("ReplicaSet", f"{app}-{template_hash}"),
            "labels": (("app", app), ("pod-template-hash", template_hash))}


DNS = Pod("kube-system", "coredns-5d78c9869d-q2x7k", node=NODES[0], host=53,
          **{**_rs("coredns", "5d78c9869d"), "labels": (("k8s-app", "kube-dns"), ("pod-template-hash", "5d78c9869d"))})
WEB = Pod("shop", "web-7d4b9c5f8-x1b2c", node=NODES[0], host=10, **_rs("web", "7d4b9c5f8"))
API = Pod("shop", "api-6c9f7d8b4-k3m4n", node=NODES[1], host=20, **_rs("api", "6c9f7d8b4"))
REDIS = Pod("shop", "redis-0", ("StatefulSet", "redis"), NODES[1], 30, (("app", "redis"),))
POSTGRES = Pod("shop", "postgres-0", ("StatefulSet", "postgres"), NODES[0], 40, (("app", "postgres"),))
WORKER = Pod("shop", "worker-58c9d7f6b5-p7q8r", node=NODES[1], host=50, **_rs("worker", "58c9d7f6b5"))
PODS = (DNS, WEB, API, REDIS, POSTGRES, WORKER)
GRPC_PORT = 9090


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[bytes]
    log: Path


@dataclass
class SimCluster:
    """Build with :meth:`up`, remove with :meth:`down` (also after a failed ``up``)."""

    plane: ControlPlane
    folder: Path
    say: Callable[[str], None] = lambda line: None
    interval: float = 0.5  # the agents' report interval
    lab: Lab = field(default_factory=Lab)
    ns: dict[str, str] = field(default_factory=dict)  # node, pod, "router", "internet" -> namespace
    procs: list[Proc] = field(default_factory=list)
    operator: Operator | None = None
    cluster: Cluster | None = None
    health_ports: dict[str, int] = field(default_factory=dict)
    agents: dict[str, Proc] = field(default_factory=dict)  # node -> its agent
    dps: dict[str, Proc] = field(default_factory=dict)  # node -> its dp
    _agent_env: dict[str, dict[str, str]] = field(default_factory=dict)
    pg_data: Path | None = None

    # -- building ------------------------------------------------------------------------------

    def up(self) -> SimCluster:
        self.folder.mkdir(parents=True, exist_ok=True)
        self.cluster = Cluster(self.plane, self.folder)
        self.say(f"network: router, internet, 2 nodes, {len(PODS)} pods")
        self._network()
        self.say("API objects: nodes, agent pods, the shop's pods, the api Service")
        self._objects()
        self.say("servers: dnsmasq, redis-server, PostgreSQL, the api's HTTP and gRPC servers, the internet's")
        self._servers()
        self.say("flowmap: the operator, an agent (and its dp) per node")
        self.operator = Operator(self.cluster, write_budget=50, flush_interval=0.2).start().wait_leading()
        serve_results(self.plane, self.cluster, self.operator)
        for n in NODES:
            self._agent(n)
        self._wait_capturing()
        return self

    def _wait_capturing(self, timeout: float = 60.0) -> None:
        """Until every node's dp captures on its pods' veths and its uplink: before that, a name a
        DNS answer gives could be missed, and its connections would show as "external"."""
        end = time.monotonic() + timeout
        for n in NODES:
            want = 1 + sum(1 for p in PODS if p.node == n)
            while self.agent_metrics(n.name).get("flowmap_agent_dp_interfaces", 0) < want:
                self._check_alive()
                if time.monotonic() > end:
                    raise RuntimeError(f"the dp of {n.name} did not capture on {want} interfaces within {timeout} s")
                time.sleep(0.1)

    def _network(self) -> None:
        lab = self.lab
        router = self.ns["router"] = lab.ns("fmrtr")
        internet = self.ns["internet"] = lab.ns("fmnet")
        for key in ("net.ipv4.ip_forward=1", "net.ipv6.conf.all.forwarding=1"):
            lab.exec(router, "sysctl", "-qw", key)
        bridge = unique("fmbr")
        lab.exec(router, "ip", "link", "add", bridge, "type", "bridge")
        lab.exec(router, "ip", "addr", "add", f"{ROUTER}/24", "dev", bridge)
        lab.exec(router, "ip", "addr", "add", f"{ROUTER6}/64", "dev", bridge, "nodad")
        lab.exec(router, "ip", "link", "set", bridge, "up")
        lab.veth(router, [f"{INTERNET_GW}/24"], internet, [f"{INTERNET}/24"] + [f"{site(n)[1]}/32" for n in range(SITES)])
        lab.exec(internet, "ip", "route", "add", "default", "via", INTERNET_GW)
        for n in NODES:
            node_ns = self.ns[n.name] = lab.ns("fmnode")
            for key in ("net.ipv4.ip_forward=1", "net.ipv6.conf.all.forwarding=1",
                        "net.ipv6.conf.all.proxy_ndp=1"):
                lab.exec(node_ns, "sysctl", "-qw", key)
            _, port = lab.veth(node_ns, [f"{n.ip}/24", f"{n.ip6}/64"], router, [])
            lab.exec(router, "ip", "link", "set", port, "master", bridge)
            lab.exec(router, "ip", "route", "add", n.cidr, "via", n.ip)
            lab.exec(router, "ip", "-6", "route", "add", n.cidr6, "via", n.ip6)
            # Proxy ARP answers the pods' 169.254.1.1 only for what the node can route: a default route.
            lab.exec(node_ns, "ip", "route", "add", "default", "via", ROUTER)
            lab.exec(node_ns, "ip", "-6", "route", "add", "default", "via", ROUTER6)
            for other in NODES:
                if other != n:  # pod to pod across nodes goes node to node, as kindnet routes it
                    lab.exec(node_ns, "ip", "route", "add", other.cidr, "via", other.ip)
                    lab.exec(node_ns, "ip", "-6", "route", "add", other.cidr6, "via", other.ip6)
            self._kube_proxy(node_ns)
            # What pods send outside the cluster leaves masqueraded, as kindnet and ip-masq-agent do.
            lab.exec(node_ns, "nft", "-f", "-", input_text="""
table ip pod-egress {
  chain postrouting {
    type nat hook postrouting priority srcnat;
    ip saddr 10.244.0.0/16 ip daddr != { 10.244.0.0/16, 172.18.0.0/24 } masquerade
  }
}""")
        for p in PODS:
            self._pod(p)

    def _pod(self, p: Pod) -> None:
        lab, node_ns = self.lab, self.ns[p.node.name]
        pod_ns = self.ns[p.name] = lab.pod(node_ns, [p.ip, p.ip6])[0]
        # `ip netns exec` mounts /etc/netns/NAME/* over /etc: the pod's resolver is the DNS pod.
        etc = Path("/etc/netns") / pod_ns
        etc.mkdir(parents=True, exist_ok=True)
        (etc / "resolv.conf").write_text(f"nameserver {DNS.ip}\nsearch shop.svc.cluster.local svc.cluster.local\n")
        (etc / "hosts").write_text(f"127.0.0.1 localhost\n{p.ip} {p.name}\n")

    def _kube_proxy(self, node_ns: str) -> None:
        """The ClusterIP Service as kube-proxy's nftables mode programs it: DNAT to the endpoint."""
        s = SERVICE
        self.lab.exec(node_ns, "nft", "-f", "-", input_text=f"""
table ip kube-proxy {{
  chain services {{
    ip daddr {s['ip']} tcp dport {s['port']} dnat to {API.ip}:{s['target']}
  }}
  chain prerouting {{ type nat hook prerouting priority -100; jump services; }}
  chain output {{ type nat hook output priority -100; jump services; }}
}}""")

    def _objects(self) -> None:
        plane, cluster = self.plane, self.cluster
        assert cluster is not None
        plane.kubectl("apply", "--server-side", "-k", str(REPO / "manifests"))
        for namespace in sorted({p.namespace for p in PODS}):
            plane.kubectl("create", "namespace", namespace, check=False)
        apply(plane, *(node(n.name, n.ip) for n in NODES))
        agent = {"labels": {"app.kubernetes.io/name": "flowmap-agent"}, "sa": "flowmap-agent", "host_network": True}
        create_pods(plane, *(pod(NS, f"flowmap-agent-{n.name}", n.name, n.ip, owner=("DaemonSet", "flowmap-agent"),
                                 **agent) for n in NODES),  # type: ignore[arg-type]
                    *(pod(p.namespace, p.name, p.node.name, p.ip, owner=p.owner, labels=dict(p.labels), ipv6=p.ip6)
                      for p in PODS))
        s = SERVICE
        apply(plane,
              {"apiVersion": "v1", "kind": "Service", "metadata": {"name": s["name"], "namespace": s["namespace"]},
               "spec": {"clusterIP": s["ip"], "selector": {"app": "api"},
                        "ports": [{"name": "http", "port": s["port"], "targetPort": s["target"]}]}},
              {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
               "metadata": {"name": f"{s['name']}-7xk2p", "namespace": s["namespace"],
                            "labels": {"kubernetes.io/service-name": s["name"]}},
               "addressType": "IPv4", "ports": [{"name": "http", "port": s["target"], "protocol": "TCP"}],
               "endpoints": [{"addresses": [API.ip], "conditions": {"ready": True},
                              "targetRef": {"kind": "Pod", "namespace": API.namespace, "name": API.name}}]})

    def _servers(self) -> None:
        ca = self.tls_ca
        subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
                        "-keyout", str(self.folder / "payments.key"), "-out", str(ca), "-days", "1",
                        "-subj", f"/CN={PAYMENTS}", "-addext", f"subjectAltName=DNS:{PAYMENTS}"],
                       check=True, capture_output=True)
        self.spawn("dns", DNS, ["dnsmasq", "--keep-in-foreground", "--no-resolv", "--no-hosts", "--bind-interfaces",
                                f"--listen-address={DNS.ip}", f"--listen-address={DNS.ip6}", "--user=root",
                                f"--address=/api.shop.svc.cluster.local/{SERVICE['ip']}",
                                f"--address=/{PAYMENTS}/{INTERNET}", f"--address=/example.com/{LOOKED_UP}",
                                "--log-facility=-", "--pid-file=",
                                *(f"--address=/{name}/{ip}" for name, ip in map(site, range(SITES)))])
        self.spawn("redis", REDIS, ["redis-server", "--bind", REDIS.ip, REDIS.ip6, "--port", "6379", "--save", "",
                                    "--appendonly", "no", "--protected-mode", "no"])
        shop = [sys.executable, "-m", "flowmap_devenv.shop"]  # the real cluster's shop runs the same servers
        self.spawn("api", API, [*shop, "api", "--serve", "--stay", "--rounds", "-1"])
        self._postgres()
        self.spawn("payments", self.ns["internet"], [*shop, "payments", "--cert", str(ca),
                                                     "--key", str(self.folder / "payments.key")])
        self.spawn("sites", self.ns["internet"], [*shop, "http", "--port", "80"])
        for name, p, port in (("dns", DNS, 53), ("redis", REDIS, 6379), ("api", API, SERVICE["target"]),
                              ("api", API, GRPC_PORT), ("postgres", POSTGRES, 5432)):
            self._wait_listening(self.ns[p.name], port, name)
        self._wait_listening(self.ns["internet"], 443, "payments")
        self._wait_listening(self.ns["internet"], 80, "sites")

    def _postgres(self) -> None:
        """A PostgreSQL cluster of its own, run as the postgres user (it refuses root)."""
        # Its own directory: the cluster's folder is private to root, and postgres must reach it.
        data = self.pg_data = Path(tempfile.mkdtemp(prefix="flowmap-pg-"))
        shutil.chown(data, "postgres", "postgres")
        bin_dir = postgres_bin()
        subprocess.run(["runuser", "-u", "postgres", "--", str(bin_dir / "initdb"), "-D", str(data), "-U", "shop",
                        "--auth=trust", "--no-sync"], check=True, capture_output=True)
        with open(data / "pg_hba.conf", "a") as hba:  # the shop's pods may connect; anyone else needs a password
            hba.write("host all shop 10.244.0.0/16 trust\nhost all all 10.244.0.0/16 scram-sha-256\n")
        self.spawn("postgres", POSTGRES, ["runuser", "-u", "postgres", "--", str(bin_dir / "postgres"), "-D", str(data),
                                          "-c", f"listen_addresses={POSTGRES.ip}", "-c", f"unix_socket_directories={data}",
                                          "-c", "fsync=off"])

    @property
    def tls_ca(self) -> Path:
        return self.folder / "payments.crt"

    def _wait_listening(self, ns: str, port: int, what: str, timeout: float = 20.0) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if f":{port} " in self.lab.exec(ns, "ss", "-Hltun"):
                return
            self._check_alive()
            time.sleep(0.1)
        raise RuntimeError(f"{what} did not listen on port {port} within {timeout} s")

    def _agent(self, n: Node) -> None:
        cluster = self.cluster
        assert cluster is not None and self.operator is not None
        folder = self.folder / n.name
        folder.mkdir(exist_ok=True)
        admin = json.loads(self.plane.kubeconfig.read_text())
        pod_name = f"flowmap-agent-{n.name}"
        admin["users"] = [{"name": "agent", "user": {"token": cluster.token("flowmap-agent", audience=ISSUER,
                                                                             pod_name=pod_name)}}]
        admin["contexts"][0]["context"]["user"] = "agent"
        (folder / "kubeconfig").write_text(json.dumps(admin))
        (folder / "token").write_text(cluster.token("flowmap-agent", pod_name=pod_name))
        port = self.health_ports[n.name] = free_port()
        # TMPDIR: the API client's copy of the kubeconfig's CA stays in the cluster's folder when
        # a test kills the agent with -9.
        env = {"KUBECONFIG": str(folder / "kubeconfig"), "TMPDIR": str(self.folder), "FLOWMAP_AGENT_NODE": n.name,
               "FLOWMAP_AGENT_OPERATOR": f"localhost:{self.operator.grpc_port}",
               "FLOWMAP_AGENT_CA_FILE": str(cluster.keys.ca_cert), "FLOWMAP_AGENT_TOKEN_FILE": str(folder / "token"),
               "FLOWMAP_AGENT_STATE_FILE": str(folder / "state"), "FLOWMAP_AGENT_SOCKET": str(folder / "dp.sock"),
               "FLOWMAP_AGENT_HEALTH_LISTEN": str(port), "FLOWMAP_AGENT_NETNS": self.ns[n.name],
               "FLOWMAP_AGENT_INTERVAL": str(self.interval), "FLOWMAP_AGENT_DP": "external",
               "FLOWMAP_AGENT_CAPTURE_DIR": str(self.capture_dir(n.name))}
        self._agent_env[n.name] = env
        self.start_agent(n.name)
        self.start_dp(n.name)

    def start_agent(self, node_name: str) -> Proc:
        """(Re)start a node's agent; its state file and health port stay the same."""
        self.agents[node_name] = self.spawn(f"agent-{node_name}", None,
                                            [sys.executable, "-m", "flowmap_cli", "agent", "run"],
                                            env=self._agent_env[node_name])
        return self.agents[node_name]

    def restart_agent(self, node_name: str, **env: str) -> Proc:
        """Stop a node's agent (in order) and start it again with more settings, e.g.
        ``FLOWMAP_AGENT_LIBVIRT_URI``; its dp captures on meanwhile."""
        self.stop(self.agents[node_name])
        self._agent_env[node_name].update(env)
        return self.start_agent(node_name)

    def start_dp(self, node_name: str) -> Proc:
        """(Re)start a node's dp, as the DaemonSet flowmap-dp runs it, apart from the agent (its own
        process in the node's namespace, told the node's addresses, reporting to the agent's
        socket, which it finds again when the agent restarts)."""
        n = next(n for n in NODES if n.name == node_name)
        self.dps[node_name] = self.spawn(f"dp-{node_name}", self.ns[node_name], [
            sys.executable, "-m", "flowmap_cli", "dp", "run", "--socket", self._agent_env[node_name]["FLOWMAP_AGENT_SOCKET"],
            "--interval", str(self.interval), "--local-address", n.ip, "--local-address", n.ip6,
            "--capture-dir", str(self.capture_dir(node_name))])
        return self.dps[node_name]

    def capture_dir(self, node_name: str) -> Path:
        """Where a node's dp writes its packet captures (the DaemonSet's hostPath)."""
        return self.folder / node_name / "captures"

    def agent_metrics(self, node_name: str) -> dict[str, float]:
        """The agent's own series (name with labels -> value); empty while it does not answer."""
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.health_ports[node_name]}/metrics", timeout=2) as r:
                text = r.read().decode()
        except OSError:
            return {}
        return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
                for line in text.splitlines() if line.startswith("flowmap_agent_")}

    # -- processes -----------------------------------------------------------------------------

    def spawn(self, name: str, where: Pod | str | None, args: list[str], env: dict[str, str] | None = None) -> Proc:
        """Start a process in a pod's (or a named) namespace, or on the host; its output to a log."""
        ns = self.ns[where.name] if isinstance(where, Pod) else where
        log = self.folder / f"{name}.log"
        with open(log, "ab") as out:
            popen = subprocess.Popen((["ip", "netns", "exec", ns] if ns else []) + args, stdout=out,
                                     stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=REPO,
                                     env={**os.environ, **(env or {})}, start_new_session=True)
        proc = Proc(name, popen, log)
        self.procs.append(proc)
        return proc

    def traffic(self, pod_: Pod | None, rounds: int, pause: float = 0.2, role: str = "") -> Proc:
        """A client of the shop (flowmap_devenv.simtraffic) in its pod, by default in the pod's own
        role; ``None``: the kubelet's probe of the api pod, from the api's node."""
        role = role or (pod_.owner[1].rsplit("-", 1)[0] if pod_ else "probe")
        where = pod_ if pod_ else self.ns[API.node.name]
        return self.spawn(f"traffic-{role}", where, [sys.executable, "-m", "flowmap_devenv.simtraffic", role,
                                                     "--rounds", str(rounds), "--pause", str(pause),
                                                     "--ca", str(self.tls_ca)])

    def _check_alive(self) -> None:
        for p in self.procs:
            if p.popen.poll() is not None and not p.name.startswith("traffic-"):
                tail = p.log.read_text(errors="replace")[-2000:] if p.log.exists() else ""
                raise RuntimeError(f"{p.name} exited with {p.popen.returncode}:\n{tail}")

    def stop(self, proc: Proc, sig: int = signal.SIGTERM, timeout: float = 20.0) -> int | None:
        if proc.popen.poll() is None:
            os.killpg(proc.popen.pid, sig)
            try:
                proc.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(proc.popen.pid, signal.SIGKILL)
                proc.popen.wait(10)
        return proc.popen.returncode

    def down(self) -> None:
        """Stop every process (agents first, so that they flush), remove every namespace and file."""
        for proc in sorted(self.procs, key=lambda p: not p.name.startswith(("agent-", "dp-"))):
            try:
                self.stop(proc)
            except ProcessLookupError:
                pass
        if self.operator is not None:
            try:
                self.operator.stop()
            except AssertionError as exc:
                self.say(str(exc))
        for ns in self.lab.namespaces:
            shutil.rmtree(Path("/etc/netns") / ns, ignore_errors=True)
        self.lab.close()
        if self.pg_data is not None:
            shutil.rmtree(self.pg_data, ignore_errors=True)

    # -- looking -------------------------------------------------------------------------------

    def truth(self, node_name: str) -> dict[str, int]:
        """Bytes the node's kernel counted, by rule comment (see :meth:`count`)."""
        out = json.loads(self.lab.exec(self.ns[node_name], "nft", "-j", "list", "table", "inet", "truth"))
        return {r["rule"]["comment"]: next(e["counter"]["bytes"] for e in r["rule"]["expr"] if "counter" in e)
                for r in out["nftables"] if "rule" in r and "comment" in r["rule"]}

    def count(self, node_name: str, rules: dict[str, str], hook: str = "forward") -> None:
        """Count bytes on a node: {comment: nft match}, e.g. "ip saddr A ip daddr B tcp dport 80", as
        the node forwards them (``hook`` forward), sends them (output) or takes them (input)."""
        body = "\n".join(f'    {match} counter comment "{name}"' for name, match in rules.items())
        self.lab.exec(self.ns[node_name], "nft", "-f", "-", input_text=f"""
table inet truth {{
  chain {hook} {{
    type filter hook {hook} priority -300;
{body}
  }}
}}""")


def postgres_bin() -> Path:
    """Debian's PostgreSQL server binaries (the newest installed major version)."""
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/postgres"), key=lambda p: int(p.parent.parent.name))
    if not found:
        raise RuntimeError("PostgreSQL is not installed (Debian package postgresql)")
    return found[-1].parent


def leftovers() -> list[str]:
    """Namespaces a simulated cluster of this machine left behind (to clean up, or to test that none are)."""
    names = run("ip", "netns", "list").split()
    return [n for n in names if n.startswith(("fmrtr", "fmnet", "fmnode", "fmpod"))]

