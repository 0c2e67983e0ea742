"""Operator ingest at scale: prints numbers, asserts nothing.

Simulated agents (one asyncio process, each agent its own pod-bound ServiceAccount token, its own
TLS channel, the agent's protocol of numbered batches acknowledged one by one) report over real gRPC to a real
``flowmap operator run`` (started here, RBAC of manifests/, write budget from --budget up to
--budget-max, as the API server allows) against a real
kube-apiserver + etcd (started here). The topology: --deployments workloads of --pods pods each,
spread over --nodes nodes; --edges initial edges between workloads; every node observes, each
interval, one delta (client.local=True) for every edge whose client workload has a pod on it, so
each edge has several observers; deltas merge per edge while the edge's last one is unacknowledged. For each node count:

1. **cold start**: the operator starts on an empty map (at --cold-budget writes/s at least, default
   the budget); time from the first report to all initial Connections existing.
2. **steady**: (after a restart at --budget if the cold budget differs) --duration seconds of
   reports with --new-rate new edges per second. Deltas ingested per second, API writes per
   second (the operator's ``flowmap_operator_api_writes_total``), time from a new edge's first
   report to its Connection's ADDED event (a watch in a thread), how far status.bytes.total lags
   behind what the agents observed, operator RSS and CPU (and the control plane's), and one
   /metrics scrape every --scrape-every seconds (text, no gzip, as curl reads it): the seconds to
   its last byte, and with this process's parse of the operator's own series (a thread of this
   process, which shares its GIL with the simulated agents).

Usage (from the repo root):
    .venv/bin/python -m benchmarks.operator_ingest [--quick] [--nodes 200,1000] [--budget 20]
        [--budget-max 200] [--cold-budget 200] [--duration 60] [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import shutil
import statistics
import sys
import tempfile
import threading
import time
import urllib.request
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import grpc  # noqa: E402
from kubernetes import client as k8s  # noqa: E402
from kubernetes import config as k8s_config  # noqa: E402
from kubernetes import watch as k8s_watch  # noqa: E402
from kubernetes.client.exceptions import ApiException  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from flowmap_agent.outbox import MAX_IN_FLIGHT, question_wait  # noqa: E402
from flowmap_api import report_pb2 as pb  # noqa: E402
from flowmap_devenv.controlplane import ControlPlane  # noqa: E402
from flowmap_operator.resolution import group_name  # noqa: E402
from tests.operator.harness import NS, Cluster, Operator  # noqa: E402

REPORT = "/flowmap.v1alpha1.ReportService/Report"
REFUSED = (grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED,
           grpc.StatusCode.INVALID_ARGUMENT)
G, V = "flowmap.dev", "v1alpha1"
BYTES_C2S, BYTES_S2C = 400, 600  # per delta per interval: every edge carries 1000 bytes/interval/observer
DELTA_BYTES = BYTES_C2S + BYTES_S2C
TICK = os.sysconf("SC_CLK_TCK")
TARGET_P95 = {200: 2.0, 1000: 5.0}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# -- the topology ---------------------------------------------------------------------------------

@dataclass
class Workload:
    namespace: str
    name: str
    group: str
    pods: list[tuple[str, str, int]] = field(default_factory=list)  # (pod name, ip, node index)


@dataclass
class Topo:
    nodes: int
    workloads: list[Workload]
    edges: list[tuple[int, int, int]]  # (client workload, server workload, port)
    initial: int  # edges[:initial] exist from the start, the rest appear during the run
    local: list[dict[int, tuple[str, str]]]  # node -> client workload -> (pod "ns/name", ip) on it
    observers: list[list[int]]  # edge -> nodes that report it

    def key(self, e: int) -> tuple[str, str, int, str]:
        c, s, port = self.edges[e]
        return (self.workloads[c].group, self.workloads[s].group, port, "TCP")


def make_topology(nodes: int, deployments: int, pods: int, edges: int, extra: int, seed: int) -> Topo:
    rnd = random.Random(seed)
    workloads = []
    for d in range(deployments):
        ns, name = f"bench-{d % 10}", f"w{d}"
        w = Workload(ns, name, group_name(ns, name))
        for i in range(pods):
            p = d * pods + i
            w.pods.append((f"w{d}-5d8f7c6b9-{i:03d}", f"10.244.{p // 250}.{p % 250 + 2}", p % nodes))
        workloads.append(w)
    pairs: set[tuple[int, int, int]] = set()
    chosen: list[tuple[int, int, int]] = []
    while len(chosen) < edges + extra:
        c, s = rnd.randrange(deployments), rnd.randrange(deployments)
        if c == s:
            continue
        port = rnd.choice((80, 443, 5432, 6379, 8080, 9090, 3306, 27017))
        if (c, s, port) not in pairs:
            pairs.add((c, s, port))
            chosen.append((c, s, port))
    local: list[dict[int, tuple[str, str]]] = [{} for _ in range(nodes)]
    for d, w in enumerate(workloads):
        for pod_name, ip, n in w.pods:
            local[n].setdefault(d, (f"{w.namespace}/{pod_name}", ip))
    observers = [[n for n in range(nodes) if c in local[n]] for c, _, _ in chosen]
    return Topo(nodes, workloads, chosen, edges, local, observers)


# -- the cluster ----------------------------------------------------------------------------------

def admin_client(plane: ControlPlane) -> k8s.ApiClient:
    cfg = k8s.Configuration()
    k8s_config.load_kube_config(config_file=str(plane.kubeconfig), client_configuration=cfg)
    cfg.connection_pool_maxsize = 32
    return k8s.ApiClient(cfg)


def node_ip(n: int) -> str:
    return f"172.18.{n // 250}.{n % 250 + 2}"


def populate(plane: ControlPlane, api: k8s.ApiClient, topo: Topo, workers: int = 16) -> dict[int, str]:
    """Nodes, workload pods (status set as a kubelet would), agent pods; tokens bound to them."""
    core = k8s.CoreV1Api(api)
    for ns in sorted({w.namespace for w in topo.workloads}):
        core.create_namespace(k8s.V1Namespace.from_dict({"metadata": {"name": ns}}))

    def mk_node(n: int) -> None:
        core.create_node(k8s.V1Node.from_dict({
            "metadata": {"name": f"node-{n}"},
            "status": {"addresses": [{"type": "InternalIP", "address": node_ip(n)}]}}))

    def mk_pod(w: Workload, pod_name: str, ip: str, n: int) -> None:
        rs = pod_name.rsplit("-", 1)[0]
        core.create_namespaced_pod(w.namespace, k8s.V1Pod.from_dict({
            "metadata": {"name": pod_name, "namespace": w.namespace, "labels": {"pod-template-hash": "5d8f7c6b9"},
                         "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": rs,
                                              "controller": True, "uid": "00000000-0000-0000-0000-000000000001"}]},
            "spec": {"nodeName": f"node-{n}", "containers": [{"name": "c", "image": "registry.invalid/c:1"}]}}))
        core.patch_namespaced_pod_status(pod_name, w.namespace, {"status": {
            "phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}]}}, _content_type="application/merge-patch+json")

    def mk_agent(n: int) -> str:
        created = core.create_namespaced_pod(NS, k8s.V1Pod.from_dict({
            "metadata": {"name": f"agent-{n}", "namespace": NS, "labels": {"app.kubernetes.io/name": "flowmap-agent"},
                         "ownerReferences": [{"apiVersion": "apps/v1", "kind": "DaemonSet", "name": "flowmap-agent",
                                              "controller": True, "uid": "00000000-0000-0000-0000-000000000002"}]},
            "spec": {"nodeName": f"node-{n}", "hostNetwork": True, "serviceAccountName": "flowmap-agent",
                     "containers": [{"name": "agent", "image": "registry.invalid/agent:1"}]}}))
        req = core.create_namespaced_service_account_token("flowmap-agent", NS, k8s.AuthenticationV1TokenRequest(
            spec=k8s.V1TokenRequestSpec(audiences=["flowmap"], expiration_seconds=4 * 3600,
                                        bound_object_ref=k8s.V1BoundObjectReference(
                                            api_version="v1", kind="Pod", name=f"agent-{n}",
                                            uid=created.metadata.uid))))
        return str(req.status.token)

    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(mk_node, range(topo.nodes)))
        list(pool.map(lambda a: mk_pod(*a), [(w, *p) for w in topo.workloads for p in w.pods]))
        tokens = list(pool.map(mk_agent, range(topo.nodes)))
    return dict(enumerate(tokens))


# -- watching Connections -------------------------------------------------------------------------

class ConnectionWatch(threading.Thread):
    """Timestamps every Connection's ADDED event and keeps its latest status.bytes.total."""

    def __init__(self, api: k8s.ApiClient) -> None:
        super().__init__(daemon=True, name="connection-watch")
        self.custom = k8s.CustomObjectsApi(api)
        self.added: dict[tuple[str, str, int, str], float] = {}
        self.written: dict[tuple[str, str, int, str], tuple[float, int]] = {}
        self.events: Counter[str] = Counter()
        self.stopping = threading.Event()
        self.errors = 0

    def _record(self, kind: str, obj: dict[str, Any], now: float) -> None:
        spec = obj.get("spec") or {}
        key = (spec.get("client", ""), spec.get("server", ""), int(spec.get("port", 0)), spec.get("protocol", ""))
        self.events[kind] += 1
        if kind in ("ADDED", "MODIFIED"):
            self.added.setdefault(key, now)
            total = int(((obj.get("status") or {}).get("bytes") or {}).get("total", 0))
            self.written[key] = (now, total)

    def run(self) -> None:
        rv = None
        while not self.stopping.is_set():
            try:
                if rv is None:
                    listing = self.custom.list_cluster_custom_object(G, V, "connections")
                    now = time.monotonic()
                    for obj in listing.get("items", []):
                        self._record("LISTED", obj, now)
                    rv = listing["metadata"]["resourceVersion"]
                w = k8s_watch.Watch()
                for ev in w.stream(self.custom.list_cluster_custom_object, G, V, "connections",
                                   resource_version=rv, timeout_seconds=5, allow_watch_bookmarks=True):
                    now = time.monotonic()
                    obj = ev["object"]
                    rv = (obj.get("metadata") or {}).get("resourceVersion", rv)
                    if ev["type"] != "BOOKMARK":
                        self._record(ev["type"], obj, now)
                    if self.stopping.is_set():
                        w.stop()
            except ApiException as exc:
                self.errors += 1
                if exc.status == 410:
                    rv = None
                time.sleep(0.2)
            except Exception:  # noqa: BLE001 - a broken stream: watch again from the last version
                self.errors += 1
                time.sleep(0.2)


# -- processes ------------------------------------------------------------------------------------

def proc_sample(pid: int) -> tuple[float, int, int]:
    """(CPU seconds, RSS kB, peak RSS kB) of a process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        status = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
                      if ":" in line)
        return ((int(stat[11]) + int(stat[12])) / TICK, int(status.get("VmRSS", "0 kB").split()[0]),
                int(status.get("VmHWM", "0 kB").split()[0]))
    except (OSError, IndexError, ValueError):
        return 0.0, 0, 0


def scrape(port: int) -> tuple[dict[str, float], float]:
    """The operator's counters we use, flattened: name{label=value,...} -> value; and the seconds
    from the request to the page's last byte (what the operator's answer took, before this process
    parses it)."""
    start = time.monotonic()
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        body = r.read()
    got = time.monotonic() - start
    text = body.decode()
    # The page is mostly per-edge series; parsing them all would cost this process more than the
    # operator spends writing them. Only the operator's own series are parsed.
    text = "\n".join(line for line in text.splitlines()
                     if line.startswith("flowmap_operator_") and "_bucket{" not in line) + "\n"
    out: dict[str, float] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()) if k != "le")
            if "le" in s.labels:
                continue
            out[f"{s.name}{{{labels}}}"] = s.value
    return out, got


EDGE_BYTES = re.compile(r'^flowmap_edge_bytes_total\{.*client_group="([^"]*)".*port="(\d+)"'
                        r'.*server_group="([^"]*)".*\} (\S+)$', re.MULTILINE)


def exported(port: int) -> dict[tuple[str, str, int], int]:
    """flowmap_edge_bytes_total per edge (both directions), as a Prometheus scrape reads it."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        text = r.read().decode()
    out: dict[tuple[str, str, int], int] = {}
    for client, port_, server, value in EDGE_BYTES.findall(text):
        key = (client, server, int(port_))
        out[key] = out.get(key, 0) + int(float(value))
    return out


def total(metrics: dict[str, float], prefix: str, **match: str) -> float:
    want = [f"{k}={v}" for k, v in match.items()]
    return sum(v for k, v in metrics.items() if k.startswith(prefix + "{") and all(w in k for w in want))


# -- simulated agents -----------------------------------------------------------------------------

@dataclass
class Stats:
    accepted: int = 0  # new batches the operator took
    resent: int = 0
    asked: int = 0  # acknowledgement questions (sequence 0)
    deltas: int = 0  # edge deltas in new batches the operator took
    errors: Counter[str] = field(default_factory=Counter)
    rpc_seconds: list[float] = field(default_factory=list)


class Bench:
    """The shared state of all simulated agents of one run."""

    def __init__(self, topo: Topo, interval: float, refresh: float) -> None:
        self.topo, self.interval, self.refresh = topo, interval, refresh
        self.generated = [0] * len(topo.edges)  # bytes the agents observed so far, per edge
        self.first_report: dict[int, float] = {}  # new edge -> first time a batch carrying it was sent
        self.introduced: dict[int, float] = {}
        self.stats = Stats()
        self.stopping = False


class SimAgent:
    """The protocol of flowmap_agent.outbox, with cached encodings so that 1,000 fit in one process.

    Each interval every local edge gains one interval of traffic, merged per edge, and goes out in
    the next numbered batch, but for an edge with a delta in flight: --refresh seconds after its
    last (none once MAX_IN_FLIGHT deltas are unacknowledged; new edges at once); when nothing is
    ready a
    sequence-0 batch asks for the acknowledgement, paced as the agent paces it (question_wait); batches are dropped as the operator reports them
    written, and after an error everything held is resent in order with ``previous``.
    """

    def __init__(self, bench: Bench, n: int, token: str, channel: grpc.aio.Channel, run_id: str) -> None:
        self.bench, self.n = bench, n
        self.agent_id, self.node = f"bench-{run_id}-{n}", f"node-{n}"
        self.metadata = (("authorization", f"Bearer {token}"),)
        self.call = channel.unary_unary(REPORT, request_serializer=None, response_deserializer=pb.ReportAck.FromString)
        topo = bench.topo
        self.edges: list[int] = [e for e in range(topo.initial) if topo.edges[e][0] in topo.local[n]]
        self.enc: dict[tuple[int, int], bytes] = {}
        self.pending: dict[int, int] = {}  # edge -> intervals observed, not yet in a batch
        self.in_flight: Counter[int] = Counter()  # edge -> unacknowledged batches carrying it
        self.sent_at: dict[int, float] = {}  # edge in flight -> when its last delta went
        self.unreported: set[int] = set()  # new edges not yet in a sent batch
        self.sequence = self.acked = self.delivered = 0
        self.unacked: list[tuple[int, list[int], bytes]] = []  # (sequence, edges, encoded edges)
        self.ask_wait, self.ask_at = bench.interval, 0.0

    def _encoded(self, e: int, k: int) -> bytes:
        found = self.enc.get((e, k))
        if found is None:
            if len(self.enc) > 4096:
                self.enc.clear()
            topo = self.bench.topo
            c, s, port = topo.edges[e]
            pod, ip = topo.local[self.n][c]
            server_ip = topo.workloads[s].pods[e % len(topo.workloads[s].pods)][1]
            delta = pb.EdgeDelta(client=pb.Endpoint(ip=ip, port=40000 + e % 20000, local=True, pod=pod),
                                 server=pb.Endpoint(ip=server_ip, port=port), protocol=pb.TCP, apps=["http"],
                                 bytes_c2s=BYTES_C2S * k, bytes_s2c=BYTES_S2C * k, packets_c2s=2 * k,
                                 packets_s2c=2 * k, sessions_opened=k, sessions_closed=k)
            # field 7 of ReportBatch, length-delimited: encoded edges concatenate into a batch
            found = self.enc[(e, k)] = pb.ReportBatch(edges=[delta]).SerializeToString()
        return found

    def add_edge(self, e: int) -> None:
        self.edges.append(e)
        self.unreported.add(e)

    def observe(self, intervals: int) -> None:
        gen = self.bench.generated
        for e in self.edges:
            self.pending[e] = self.pending.get(e, 0) + intervals
            gen[e] += DELTA_BYTES * intervals

    async def _send(self, seq: int, previous: int, blob: bytes) -> None:
        header = pb.ReportBatch(agent_id=self.agent_id, node=self.node, sequence=seq, acked=self.acked,
                                previous=previous, interval_ms=int(self.bench.interval * 1000),
                                sent_unix_ms=int(time.time() * 1000)).SerializeToString()
        started = time.monotonic()
        ack: pb.ReportAck = await self.call(header + blob, metadata=self.metadata, timeout=10)
        self.bench.stats.rpc_seconds.append(time.monotonic() - started)
        if not ack.leader:
            raise RuntimeError("not the leader")
        self.delivered = max(self.delivered, seq)
        waiting, keep = set(ack.waiting), []
        for b in self.unacked:
            if b[0] <= ack.applied or (b[0] <= ack.received and b[0] not in waiting):
                self.in_flight.subtract(b[1])
                for e in b[1]:
                    if self.in_flight[e] <= 0:
                        del self.in_flight[e]
                        self.sent_at.pop(e, None)
            else:
                keep.append(b)
        progressed = len(keep) < len(self.unacked)
        self.unacked = keep
        self.acked = keep[0][0] - 1 if keep else self.sequence
        self.ask_wait = question_wait(self.ask_wait, progressed, self.bench.interval, self.bench.refresh)
        self.ask_at = time.monotonic() + self.ask_wait

    async def pump(self) -> None:
        """Resend, in order, what the operator may not have; then send what is ready, or ask."""
        stats = self.bench.stats
        try:
            previous = self.acked
            for seq, _, blob in list(self.unacked):
                if seq > self.delivered:
                    await self._send(seq, previous, blob)
                    stats.resent += 1
                previous = seq
            now = time.monotonic()
            if self.in_flight.total() < MAX_IN_FLIGHT:
                due = now - self.bench.refresh
                ready = [e for e in self.pending if e not in self.in_flight or self.sent_at.get(e, 0.0) <= due]
            else:
                ready = [e for e in self.pending if e not in self.in_flight]
            if not ready:
                if self.unacked and now >= self.ask_at:
                    stats.asked += 1
                    await self._send(0, 0, b"")
                return
            seq = self.sequence = self.sequence + 1
            batch = (seq, ready, b"".join(self._encoded(e, self.pending.pop(e)) for e in ready))
            self.unacked.append(batch)
            self.in_flight.update(ready)  # (Counter.update adds one to each)
            self.sent_at.update(dict.fromkeys(ready, now))
            if self.unreported:
                for e in self.unreported.intersection(ready):
                    self.bench.first_report.setdefault(e, now)
                self.unreported.difference_update(ready)
            await self._send(seq, previous, batch[2])
            stats.accepted += 1
            stats.deltas += len(ready)
        except grpc.aio.AioRpcError as err:
            stats.errors[err.code().name] += 1
            self.delivered = self.acked
        except RuntimeError:
            stats.errors["NOT_LEADER"] += 1
            self.delivered = self.acked

    async def run(self) -> None:
        interval = self.bench.interval
        start = time.monotonic() + random.random() * interval  # agents are not in step
        await asyncio.sleep(start - time.monotonic())
        ticks = 0
        while not self.bench.stopping:
            due = int((time.monotonic() - start) / interval) + 1 - ticks
            if due > 0 and self.edges:
                self.observe(due)
                ticks += due
                await self.pump()
            await asyncio.sleep(max(0.0, start + ticks * interval - time.monotonic()))


# -- one scenario ---------------------------------------------------------------------------------

def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))]


class Sampler:
    """Once a second: the operator's counters and CPU, the control plane's CPU."""

    def __init__(self, op: Operator, plane: ControlPlane) -> None:
        self.op, self.plane = op, plane
        st = plane.state()
        self.pids = {"apiserver": st.apiserver_pid, "etcd": st.etcd_pid, "bench": os.getpid()} if st else {}
        self.rows: list[dict[str, Any]] = []

    def sample(self) -> dict[str, Any]:
        row: dict[str, Any] = {"t": time.monotonic()}
        try:
            m, row["scrape_get_s"] = scrape(self.op.metrics_port)
        except OSError:
            m = {}
        row["scraped"] = bool(m)  # a failed scrape's counters read 0: windows leave it out
        row["scrape_s"] = time.monotonic() - row["t"]  # and this process's parse of it
        row["write_s_sum"] = total(m, "flowmap_operator_api_write_seconds_sum")
        row["write_s_count"] = total(m, "flowmap_operator_api_write_seconds_count")
        row["writes"] = total(m, "flowmap_operator_api_writes_total")
        row["writes_ok"] = total(m, "flowmap_operator_api_writes_total", result="ok")
        row["conn_writes"] = total(m, "flowmap_operator_api_writes_total", kind="connection")
        row["counted"] = total(m, "flowmap_operator_report_edges_total", outcome="counted")
        row["duplicates"] = total(m, "flowmap_operator_report_edges_total", outcome="duplicates")
        row["dirty"] = total(m, "flowmap_operator_dirty_objects")
        row["unacked"] = total(m, "flowmap_operator_unacked_batches")
        row["conflicts"] = total(m, "flowmap_operator_api_conflicts_total")
        row["throttled"] = total(m, "flowmap_operator_api_throttled_total")
        row["rate"] = total(m, "flowmap_operator_write_budget")
        row["reports"] = {k.split("outcome=")[1].rstrip("}"): v for k, v in m.items()
                          if k.startswith("flowmap_operator_reports_total{")}
        if self.op.proc:
            row["op"] = proc_sample(self.op.proc.pid)
        for name, pid in self.pids.items():
            row[name] = proc_sample(pid)
        self.rows.append(row)
        return row


def window(rows: list[dict[str, Any]], t0: float, t1: float) -> tuple[dict[str, Any], dict[str, Any]]:
    scraped = [r for r in rows if r["scraped"]]
    inside = [r for r in scraped if t0 <= r["t"] <= t1] or scraped[-1:]
    return inside[0], inside[-1]


def max_rate(rows: list[dict[str, Any]], t0: float, t1: float, key: str, span: float) -> float:
    inside = [r for r in rows if t0 <= r["t"] <= t1 and r["scraped"]]
    best = 0.0
    for i, a in enumerate(inside):
        for b in inside[i + 1:]:
            if b["t"] - a["t"] >= span:
                best = max(best, (b[key] - a[key]) / (b["t"] - a["t"]))
                break
    return best


def cpu_line(a: dict[str, Any], b: dict[str, Any], name: str) -> str:
    dt = b["t"] - a["t"]
    if name not in a or dt <= 0:
        return f"{name}: n/a"
    cpu = (b[name][0] - a[name][0]) / dt * 100
    return f"{name} {cpu:.0f}% CPU, RSS {b[name][1] / 1024:.0f} MiB (peak {b[name][2] / 1024:.0f} MiB)"


async def scenario(args: argparse.Namespace, nodes: int) -> dict[str, Any]:
    result: dict[str, Any] = {"nodes": nodes}
    extra = int(args.new_rate * (args.duration + args.warmup)) + 50
    topo = make_topology(nodes, args.deployments, args.pods, args.edges, extra, args.seed)
    per_node = [sum(1 for e in range(topo.initial) if topo.edges[e][0] in topo.local[n]) for n in range(nodes)]
    obs = [len(o) for o in topo.observers[:topo.initial]]
    log(f"== {nodes} nodes: {len(topo.workloads)} workloads x {args.pods} pods, {topo.initial} edges "
        f"({statistics.mean(obs):.1f} observers per edge, {statistics.mean(per_node):.0f} deltas per node per "
        f"interval, {sum(per_node) / args.interval:.0f} deltas/s in all)")
    folder = Path(tempfile.mkdtemp(prefix="flowmap-bench-"))
    plane = ControlPlane(folder / "state", log=lambda line: None)
    op: Operator | None = None
    watcher: ConnectionWatch | None = None
    bench = Bench(topo, args.interval, args.refresh)
    tasks: list[asyncio.Task[None]] = []
    channels: list[grpc.aio.Channel] = []
    try:
        t = time.monotonic()
        plane.up()
        plane.kubectl("apply", "--server-side", "-k", str(REPO / "manifests"))
        cluster = Cluster(plane, folder)
        api = admin_client(plane)
        log(f"control plane up in {time.monotonic() - t:.0f} s")
        t = time.monotonic()
        tokens = await asyncio.to_thread(populate, plane, api, topo)
        log(f"{nodes} nodes, {sum(len(w.pods) for w in topo.workloads)} pods, {nodes} agent pods and tokens "
            f"in {time.monotonic() - t:.0f} s")
        watcher = ConnectionWatch(api)
        watcher.start()

        # -- cold start ---------------------------------------------------------------------------
        cold_budget = args.cold_budget or args.budget
        # Every edge of the run gets its Connection and its series: above the default caps (10,000)
        # the new edges would be refused, and counted, rather than measured.
        caps = {"max_connections": max(10_000, len(topo.edges)), "metrics_series_cap": max(10_000, len(topo.edges))}
        op = Operator(cluster, write_budget=cold_budget, write_budget_max=max(cold_budget, args.budget_max),
                      **caps).start()
        await asyncio.to_thread(op.wait_leading, 120)
        sampler = Sampler(op, plane)
        creds = grpc.ssl_channel_credentials(root_certificates=cluster.keys.ca_cert.read_bytes())
        run_id = f"{int(time.time()) % 100000}"
        agents = []
        for n in range(nodes):
            if args.channels and n >= args.channels:
                ch = channels[n % args.channels]
            else:
                ch = grpc.aio.secure_channel(f"localhost:{op.grpc_port}", creds)
                channels.append(ch)
            agents.append(SimAgent(bench, n, tokens[n], ch, run_id))
        by_node = {a.n: a for a in agents}
        initial_keys = {topo.key(e) for e in range(topo.initial)}

        async def sample_loop() -> None:
            while True:
                await asyncio.to_thread(sampler.sample)
                await asyncio.sleep(args.scrape_every)

        tasks.append(asyncio.create_task(sample_loop()))
        t_cold = (await asyncio.to_thread(sampler.sample))["t"]
        tasks += [asyncio.create_task(a.run()) for a in agents]
        log(f"cold start at {cold_budget:g} writes/s: agents reporting {topo.initial} edges")
        done_at = None
        last_log = t_cold
        while time.monotonic() - t_cold < args.cold_timeout:
            have = sum(1 for k in initial_keys if k in watcher.added)
            if have == len(initial_keys):
                done_at = max(watcher.added[k] for k in initial_keys)
                break
            if time.monotonic() - last_log >= 15:
                last_log = time.monotonic()
                log(f"  {have}/{len(initial_keys)} Connections after {last_log - t_cold:.0f} s")
            await asyncio.sleep(0.5)
        t_end = (await asyncio.to_thread(sampler.sample))["t"]
        a, b = window(sampler.rows, t_cold, t_end)
        have = sum(1 for k in initial_keys if k in watcher.added)
        cold: dict[str, Any] = {"budget": cold_budget, "connections": have, "of": len(initial_keys),
                                "writes_per_s": (b["writes"] - a["writes"]) / max(1e-9, b["t"] - a["t"])}
        if done_at is not None:
            cold["seconds"] = done_at - t_cold
            log(f"cold start: all {have} Connections in {cold['seconds']:.1f} s at {cold_budget:g} writes/s "
                f"({cold['writes_per_s']:.1f} writes/s measured; minimum at 2 writes per Connection: "
                f"{2 * len(initial_keys) / max(cold_budget, args.budget_max):.0f} s)")
        else:
            rate = have / max(1e-9, t_end - t_cold)
            cold["projected_seconds"] = len(initial_keys) / rate if rate else float("inf")
            log(f"cold start: only {have}/{len(initial_keys)} Connections after {t_end - t_cold:.0f} s "
                f"({rate:.1f}/s; all would take ~{cold['projected_seconds']:.0f} s)")
        n_writes = b["write_s_count"] - a["write_s_count"]
        cold["write_latency_ms"] = (b["write_s_sum"] - a["write_s_sum"]) / n_writes * 1000 if n_writes else float("nan")
        cold["operator_counted_per_s"] = (b["counted"] - a["counted"]) / max(1e-9, b["t"] - a["t"])
        log(f"  one API write takes {cold['write_latency_ms']:.0f} ms as the operator sees it; it counted "
            f"{cold['operator_counted_per_s']:.0f} deltas/s")
        cold["operator"] = cpu_line(a, b, "op")
        cold["apiserver"] = cpu_line(a, b, "apiserver")
        log(f"  {cold['operator']}; {cold['apiserver']}; {cpu_line(a, b, 'etcd')}; {cpu_line(a, b, 'bench')}")
        result["cold"] = cold

        # -- steady state at the budget -----------------------------------------------------------
        if cold_budget != args.budget:
            t = time.monotonic()
            op.stop()
            port = op.grpc_port  # the same address: the agents' channels reconnect, as to a Service
            op = Operator(cluster, write_budget=args.budget, write_budget_max=args.budget_max, grpc_listen=port, **caps)
            op.grpc_port = port
            op.start()
            sampler.op = op
            await asyncio.to_thread(op.wait_leading, 120)
            result["restart_seconds"] = time.monotonic() - t
            log(f"operator restarted at {args.budget:g} writes/s (stop, load {len(watcher.added)} Connections, "
                f"lead) in {result['restart_seconds']:.1f} s; agents resend what was not acknowledged")
        if args.warmup:
            await asyncio.sleep(args.warmup)

        stats0 = (bench.stats.accepted, bench.stats.deltas, sum(bench.stats.errors.values()), bench.stats.resent,
                  bench.stats.asked)
        errors0 = Counter(bench.stats.errors)
        bench.stats.rpc_seconds.clear()
        t0 = (await asyncio.to_thread(sampler.sample))["t"]
        next_edge = topo.initial
        new_edges: list[int] = []
        stale: list[tuple[float, float, float]] = []  # (lag s, lag %, age of last write s) per edge per sample
        behind: list[float] = []  # lag of flowmap_edge_bytes_total behind the traffic, s, per edge per sample
        next_stale = t0 + 5
        log(f"steady: {args.duration:g} s at {args.budget:g} writes/s, {args.new_rate:g} new edges/s")
        while time.monotonic() - t0 < args.duration:
            due = int((time.monotonic() - t0) * args.new_rate) + 1
            while len(new_edges) < due and next_edge < len(topo.edges):
                e = next_edge
                next_edge += 1
                new_edges.append(e)
                bench.introduced[e] = time.monotonic()
                for n in topo.observers[e]:
                    by_node[n].add_edge(e)
            if time.monotonic() >= next_stale:
                next_stale += 5
                now = time.monotonic()
                written = dict(watcher.written)
                generated = list(bench.generated)
                for e in range(topo.initial):
                    gen = generated[e]
                    at, got = written.get(topo.key(e), (t0, 0))
                    per_s = DELTA_BYTES * len(topo.observers[e]) / args.interval
                    stale.append(((gen - got) / per_s, 100.0 * (gen - got) / gen if gen else 0.0, now - at))
                series = await asyncio.to_thread(exported, op.metrics_port)  # what a scrape now reads
                for e in range(topo.initial):
                    per_s = DELTA_BYTES * len(topo.observers[e]) / args.interval
                    behind.append((generated[e] - series.get(topo.key(e)[:3], 0)) / per_s)
            await asyncio.sleep(min(0.05, 1 / max(args.new_rate, 1e-9)))
        t1 = (await asyncio.to_thread(sampler.sample))["t"]
        rpc = list(bench.stats.rpc_seconds)
        a, b = window(sampler.rows, t0, t1)
        dt = b["t"] - a["t"]
        steady: dict[str, Any] = {"seconds": t1 - t0}
        steady["deltas_per_s"] = (bench.stats.deltas - stats0[1]) / (t1 - t0)
        steady["batches_per_s"] = (bench.stats.accepted - stats0[0]) / (t1 - t0)
        steady["operator_counted_per_s"] = (b["counted"] - a["counted"]) / dt if dt else 0.0
        steady["operator_duplicates_per_s"] = (b["duplicates"] - a["duplicates"]) / dt if dt else 0.0
        steady["writes_per_s"] = (b["writes"] - a["writes"]) / dt if dt else 0.0
        steady["writes_max_1s"] = max_rate(sampler.rows, t0, t1, "writes", args.scrape_every)
        steady["writes_max_5s"] = max_rate(sampler.rows, t0, t1, "writes", 2 * args.scrape_every)
        n_writes = b["write_s_count"] - a["write_s_count"]
        steady["write_latency_ms"] = (b["write_s_sum"] - a["write_s_sum"]) / n_writes * 1000 if n_writes else float("nan")
        scrapes = [r["scrape_s"] for r in sampler.rows if t0 <= r["t"] <= t1 and r["scraped"]]
        steady["scrapes_failed"] = sum(1 for r in sampler.rows if t0 <= r["t"] <= t1 and not r["scraped"])
        steady["scrape_ms"] = statistics.mean(scrapes) * 1000 if scrapes else float("nan")
        gets = [r["scrape_get_s"] for r in sampler.rows if t0 <= r["t"] <= t1 and r["scraped"]]
        steady["scrape_get_ms"] = statistics.mean(gets) * 1000 if gets else float("nan")
        steady["scrape_get_max_ms"] = max(gets) * 1000 if gets else float("nan")
        steady["errors"] = dict(bench.stats.errors - errors0)
        steady["resent"] = bench.stats.resent - stats0[3]
        steady["rpc_p50_ms"], steady["rpc_p95_ms"] = pct(rpc, 0.5) * 1000, pct(rpc, 0.95) * 1000
        steady["calls_per_s"] = len(rpc) / (t1 - t0)
        steady["questions_per_s"] = (bench.stats.asked - stats0[4]) / (t1 - t0)
        steady["dirty_end"], steady["unacked_end"] = b["dirty"], b["unacked"]
        steady["conflicts"], steady["throttled"] = b["conflicts"] - a["conflicts"], b["throttled"] - a["throttled"]
        rates = [r.get("rate", 0.0) for r in sampler.rows if t0 <= r["t"] <= t1 and r["scraped"]]
        steady["budget_min"], steady["budget_max"] = min(rates, default=0.0), max(rates, default=0.0)
        steady["operator"] = cpu_line(a, b, "op")
        steady["apiserver"] = cpu_line(a, b, "apiserver")
        steady["etcd"] = cpu_line(a, b, "etcd")
        steady["bench"] = cpu_line(a, b, "bench")

        # new edges: wait a little for the last ones, then measure
        grace_end = time.monotonic() + args.grace
        while time.monotonic() < grace_end:
            if all(topo.key(e) in watcher.added for e in new_edges):
                break
            await asyncio.sleep(0.2)
        latencies, missing, unreported = [], 0, 0
        for e in new_edges:
            first = bench.first_report.get(e)
            added = watcher.added.get(topo.key(e))
            if first is None:
                unreported += 1
            elif added is None:
                missing += 1
            else:
                latencies.append(added - first)
        steady["new_edges"] = len(new_edges)
        steady["new_unreported"], steady["new_missing"] = unreported, missing
        steady["new_p50_s"], steady["new_p95_s"] = pct(latencies, 0.5), pct(latencies, 0.95)
        steady["new_max_s"] = max(latencies) if latencies else float("nan")
        steady["prom_lag_p50_s"], steady["prom_lag_p95_s"] = pct(behind, 0.5), pct(behind, 0.95)
        lags = [s[0] for s in stale]
        steady["stale_lag_p50_s"], steady["stale_lag_p95_s"] = pct(lags, 0.5), pct(lags, 0.95)
        steady["stale_lag_max_s"] = max(lags) if lags else float("nan")
        steady["stale_pct_p50"], steady["stale_pct_p95"] = pct([s[1] for s in stale], 0.5), pct(
            [s[1] for s in stale], 0.95)
        steady["write_age_p50_s"], steady["write_age_p95_s"] = pct([s[2] for s in stale], 0.5), pct(
            [s[2] for s in stale], 0.95)
        final = sampler.sample()
        steady["operator_rss_mib"] = final["op"][1] / 1024
        steady["operator_peak_rss_mib"] = final["op"][2] / 1024
        result["steady"] = steady
        report(nodes, args, result)
        return result
    finally:
        bench.stopping = True
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for ch in channels:
            await ch.close()
        if watcher:
            watcher.stopping.set()
        if op:
            try:
                op.stop()
            except AssertionError as exc:
                log(f"operator stop: {exc}")
        if args.keep_logs:
            dest = Path(args.keep_logs)
            dest.mkdir(parents=True, exist_ok=True)
            for i, found in enumerate(sorted(folder.glob("operator-*.log"), key=lambda f: f.stat().st_mtime)):
                shutil.copy(found, dest / f"operator-{nodes}-{i}.log")
        plane.down(quiet=True)
        shutil.rmtree(folder, ignore_errors=True)


def report(nodes: int, args: argparse.Namespace, result: dict[str, Any]) -> None:
    s, c = result["steady"], result["cold"]
    target = TARGET_P95.get(nodes)
    print(f"\n--- {nodes} nodes, {args.edges} edges, budget {args.budget:g} writes/s, "
          f"{s['seconds']:.0f} s steady ---")
    print(f"deltas ingested          {s['deltas_per_s']:10.0f} /s   ({s['batches_per_s']:.0f} batches/s; operator "
          f"counted {s['operator_counted_per_s']:.0f}/s, duplicates {s['operator_duplicates_per_s']:.0f}/s)")
    print(f"API writes               {s['writes_per_s']:10.1f} /s   (ratio to budget {s['writes_per_s'] / args.budget:.2f};"
          f" max over {args.scrape_every:g} s {s['writes_max_1s']:.1f}, over {2 * args.scrape_every:g} s "
          f"{s['writes_max_5s']:.1f}; one write takes {s['write_latency_ms']:.0f} ms as the operator sees it)")
    ratio = f"; p95/target {s['new_p95_s'] / target:.2f} (target {target:g} s)" if target else ""
    print(f"new edge -> Connection   p50 {s['new_p50_s']:.2f} s, p95 {s['new_p95_s']:.2f} s, max "
          f"{s['new_max_s']:.2f} s over {s['new_edges']} edges (not reported {s['new_unreported']}, "
          f"missing {s['new_missing']}){ratio}")
    if "seconds" in c:
        ceiling = max(c['budget'], args.budget_max)
        print(f"cold start               {c['seconds']:10.1f} s    all {c['of']} Connections at {c['budget']:g} to "
              f"{ceiling:g} writes/s (floor at 2 writes each: {2 * c['of'] / ceiling:.0f} s)")
    else:
        print(f"cold start               {c['connections']}/{c['of']} within {args.cold_timeout:g} s at "
              f"{c['budget']:g} writes/s; projected {c['projected_seconds']:.0f} s")
    if c["budget"] != args.budget:
        print(f"  at the default budget {args.budget:g} writes/s the floor is {2 * c['of'] / args.budget:.0f} s "
              f"(2 writes per Connection) + the Groups")
    if "restart_seconds" in result:
        print(f"operator restart         {result['restart_seconds']:10.1f} s    stop + load + lead")
    print(f"BYTES staleness          lag p50 {s['stale_lag_p50_s']:.0f} s, p95 {s['stale_lag_p95_s']:.0f} s, max "
          f"{s['stale_lag_max_s']:.0f} s of traffic (p50 {s['stale_pct_p50']:.0f}%, p95 {s['stale_pct_p95']:.0f}% "
          f"of the bytes observed not yet in status); last write p50 {s['write_age_p50_s']:.0f} s, p95 "
          f"{s['write_age_p95_s']:.0f} s ago")
    print(f"edge series (/metrics)   lag p50 {s['prom_lag_p50_s']:.0f} s, p95 {s['prom_lag_p95_s']:.0f} s of traffic "
          "behind what the agents observed (checkpointed every FLOWMAP_OPERATOR_METRICS_CHECKPOINT_INTERVAL)")
    print(f"agents                   rpc p50 {s['rpc_p50_ms']:.0f} ms, p95 {s['rpc_p95_ms']:.0f} ms; "
          f"{s['calls_per_s']:.0f} calls/s ({s['questions_per_s']:.0f} acknowledgement questions/s); refusals "
          f"{s['errors'] or 'none'}; resent {s['resent']}")
    print(f"write budget             {s['budget_min']:.0f} to {s['budget_max']:.0f} writes/s as scraped "
          f"(floor {args.budget:g}, ceiling {max(args.budget, args.budget_max):g})")
    print(f"operator backlog at end  {s['dirty_end']:.0f} dirty Connections, {s['unacked_end']:.0f} unacked batches; "
          f"conflicts {s['conflicts']:.0f}, 429s {s['throttled']:.0f}")
    print(f"operator                 {s['operator']} (one /metrics scrape: {s['scrape_ms']:.0f} ms with "
          f"this process's parse, {s['scrape_get_ms']:.0f} ms to its last byte (max {s['scrape_get_max_ms']:.0f}); "
          f"{s['scrapes_failed']} failed within 5 s)")
    print(f"control plane            {s['apiserver']}; {s['etcd']}")
    print(f"benchmark process        {s['bench']}")
    print(flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nodes", default="200,1000", help="comma-separated node counts (one scenario each)")
    p.add_argument("--deployments", type=int, default=300)
    p.add_argument("--pods", type=int, default=4, help="pods per deployment")
    p.add_argument("--edges", type=int, default=5000, help="initial edges")
    p.add_argument("--new-rate", type=float, default=5.0, help="new edges per second during the steady phase")
    p.add_argument("--interval", type=float, default=1.0, help="report interval of every agent (s)")
    p.add_argument("--refresh", type=float, default=10.0,
                   help="s between deltas of an edge in flight (FLOWMAP_AGENT_REFRESH_INTERVAL)")
    p.add_argument("--duration", type=float, default=60.0, help="steady phase (s)")
    p.add_argument("--warmup", type=float, default=10.0, help="before the steady phase (s)")
    p.add_argument("--grace", type=float, default=15.0, help="wait this long after the run for the last new edges")
    p.add_argument("--budget", type=float, default=20.0, help="the operator's write budget, its floor (writes/s)")
    p.add_argument("--budget-max", type=float, default=200.0,
                   help="the write budget's ceiling (writes/s; FLOWMAP_OPERATOR_WRITE_BUDGET_MAX)")
    p.add_argument("--cold-budget", type=float, default=0.0,
                   help="write budget for the cold start (default: --budget); the steady phase restarts at --budget")
    p.add_argument("--cold-timeout", type=float, default=900.0, help="give up waiting for the cold start (s)")
    p.add_argument("--channels", type=int, default=0, help="share this many gRPC channels (0: one per agent)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--scrape-every", type=float, default=15.0,
                   help="seconds between scrapes of the operator's /metrics (each costs it CPU)")
    p.add_argument("--quick", action="store_true",
                   help="~2 min per node count: 20 s steady, 5 s warm-up, cold start at 200 writes/s")
    p.add_argument("--json", help="also write the numbers here")
    p.add_argument("--keep-logs", help="copy the operator logs into this folder")
    args = p.parse_args()
    if args.quick:
        args.duration, args.warmup, args.grace = 20.0, 5.0, 10.0
        args.cold_budget = args.cold_budget or 200.0
        args.cold_timeout = min(args.cold_timeout, 180.0)
    results = []
    for nodes in [int(n) for n in args.nodes.split(",") if n]:
        results.append(asyncio.run(scenario(args, nodes)))
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "results": results}, indent=1, default=str))


if __name__ == "__main__":
    main()
