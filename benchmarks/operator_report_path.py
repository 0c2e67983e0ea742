"""The CPU one Report batch costs the operator, phase by phase: prints numbers, asserts nothing.

The operator's event loop does, for every batch an agent sends (flowmap_operator.serving's
ReportServicer._report): parse it, validate it (flowmap_operator.validation, flowmap_api.validity),
admit it into the ledger (``Ledger.admit``), and ingest it (``Topology.ingest``: resolution, the
policy modes, ``Ledger.apply``, per edge delta), then count it in the metrics. Under 1,000 agents
that CPU is what an RPC queues behind. No server, no API: everything in this process, built as
tests/operator build it.

The world is benchmarks/operator_ingest's (its make_topology, the same defaults): --nodes nodes,
--deployments workloads of --pods pods, --edges edges, each reported every round by every node
with a pod of its client workload (several observers per edge), encoded as its SimAgent encodes
them (one batch per node per round, ~20 deltas). The resolver knows every Node, pod and agent pod,
as the operator's watches would tell it; then the garbage collector is set as the operator sets it
once it has read the cluster (flowmap_operator.running.settle_heap, where there is one). Round 1
makes every edge (cold); the rounds after it are the steady state. After each round every dirty
edge is flushed as the writer's ledger part does it (``Ledger.plan`` and ``Ledger.written``, no
API), so that batches are acknowledged and nothing piles up; that flush is timed too, per edge
written.

Two identical worlds get the same batches: one timed phase by phase (parse, validate, admit,
ingest), one timed as the servicer's whole ``_report`` (what the RPC waits for, the metrics
included; its parse timed apart) and as the question for the acknowledgement that each SimAgent
sends every interval while its batch waits (``ack_query``: a sequence-0 batch, parsed and
answered). Times are the thread's CPU time (each reading costs ~0.6 µs, counted in the phase it
closes), so that another process sharing the CPUs does not stretch them; each figure is the
median over --repeat runs of the mean over the steady rounds.

--against REV runs the same benchmark over REV's flowmap_operator and flowmap_api (``git
archive`` into a temporary folder, first on the import path of a child process) before this
tree's, and prints the ratios. --profile prints cProfile's hottest functions of the whole
``_report`` over the steady rounds.

Usage (from the repo root):
    .venv/bin/python benchmarks/operator_report_path.py [--nodes 1000] [--edges 5000] [--rounds 4]
        [--repeat 3] [--against 0296542] [--profile]
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks.operator_ingest import BYTES_C2S, BYTES_S2C, Topo, make_topology, node_ip  # noqa: E402
from flowmap_api import report_pb2 as pb  # noqa: E402
from flowmap_operator import running  # noqa: E402
from flowmap_operator.auth import Authenticator, Identity  # noqa: E402
from flowmap_operator.policy.modes import Modes  # noqa: E402
from flowmap_operator.resolution import Resolver  # noqa: E402
from flowmap_operator.serving import IDENTITY, Refusals, ReportServicer  # noqa: E402
from flowmap_operator.settings import Settings  # noqa: E402
from flowmap_operator.topology import Topology  # noqa: E402
from flowmap_operator.validation import validate  # noqa: E402

PHASES = ("parse", "validate", "admit", "ingest", "_report", "ack_query", "flush")
PER_BATCH = PHASES[:5]  # the others are per query and per edge written
RESULT = "RESULT "  # the line a child run hands its numbers back on


def build(topo: Topo, settings: Settings, now: float) -> tuple[Topology, ReportServicer]:
    """A Topology and its servicer, the resolver fed as the operator's watches would feed it."""
    resolver = Resolver(wait=settings.unknown_address_wait)
    for n in range(topo.nodes):
        resolver.node_seen({"metadata": {"name": f"node-{n}"},
                            "status": {"addresses": [{"type": "InternalIP", "address": node_ip(n)}]}})
        resolver.pod_seen({"metadata": {"namespace": settings.namespace, "name": f"agent-{n}",
                                        "labels": {"app.kubernetes.io/name": "flowmap-agent"}},
                           "spec": {"nodeName": f"node-{n}", "hostNetwork": True},
                           "status": {"phase": "Running", "podIP": node_ip(n)}}, now)
    for w in topo.workloads:
        for pod_name, ip, n in w.pods:
            resolver.pod_seen({"metadata": {"namespace": w.namespace, "name": pod_name,
                                            "labels": {"pod-template-hash": "5d8f7c6b9"},
                                            "ownerReferences": [{"kind": "ReplicaSet", "controller": True,
                                                                 "name": pod_name.rsplit("-", 1)[0]}]},
                               "spec": {"nodeName": f"node-{n}"},
                               "status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}]}}, now)
    modes = Modes(resolver, default_mode=settings.default_mode)
    topology = Topology(resolver, max_connections=settings.max_connections, max_ports=settings.max_ports_per_pair,
                        modes=modes, max_fqdn_groups=settings.max_fqdn_groups)
    # No TokenReview: the gate's part (who the call is) is set per batch; authorize is the servicer's.
    auth = Authenticator(None, namespace=settings.namespace,
                         service_account=settings.agent_service_account, audience=settings.token_audience)
    return topology, ReportServicer(topology, auth, settings, Refusals(), lambda: True)


def encoded_edges(topo: Topo, n: int) -> bytes:
    """Node ``n``'s deltas of one interval, as benchmarks/operator_ingest's SimAgent encodes them."""
    parts = []
    for e in range(topo.initial):
        c, s, port = topo.edges[e]
        if c not in topo.local[n]:
            continue
        pod, ip = topo.local[n][c]
        server_ip = topo.workloads[s].pods[e % len(topo.workloads[s].pods)][1]
        delta = pb.EdgeDelta(client=pb.Endpoint(ip=ip, port=40000 + e % 20000, local=True, pod=pod),
                             server=pb.Endpoint(ip=server_ip, port=port), protocol=pb.TCP, apps=["http"],
                             bytes_c2s=BYTES_C2S, bytes_s2c=BYTES_S2C, packets_c2s=2, packets_s2c=2,
                             sessions_opened=1, sessions_closed=1)
        parts.append(pb.ReportBatch(edges=[delta]).SerializeToString())
    return b"".join(parts)


def batch(n: int, seq: int, edges: bytes, run: str) -> bytes:
    header = pb.ReportBatch(agent_id=f"bench-{run}-{n}", node=f"node-{n}", sequence=seq, acked=seq - 1,
                            previous=seq - 1, interval_ms=1000, sent_unix_ms=int(time.time() * 1000))
    return bytes(header.SerializeToString() + edges)


def flush(topology: Topology) -> int:
    """What the writer does to the ledger for every dirty edge written (no API): how many."""
    dirty = topology.ledger.dirty()
    for edge in dirty:
        topology.ledger.written(topology.ledger.plan(edge.key), "1")
    return len(dirty)


def one_run(topo: Topo, args: argparse.Namespace, run: str, profile: cProfile.Profile | None
            ) -> tuple[dict[str, float], int, int]:
    """Seconds per phase summed over the steady rounds, batches and deltas in them."""
    settings = Settings(namespace="flowmap-system")
    now = time.time()
    phased, _ = build(topo, settings, now)
    whole_topology, servicer = build(topo, settings, now)
    settle = getattr(running, "settle_heap", None)  # as the operator does once it has read the cluster
    if settle is not None:
        settle()
    edges = {n: encoded_edges(topo, n) for n in range(topo.nodes)}
    nodes = [n for n in range(topo.nodes) if edges[n]]
    spent = dict.fromkeys(PHASES, 0.0)
    batches = deltas = 0
    clock = time.thread_time  # CPU time: what another process on the machine takes is not counted
    for rnd in range(1, args.rounds + 2):
        steady = rnd > 1
        blobs = [(n, batch(n, rnd, edges[n], run)) for n in nodes]
        for n, blob in blobs:
            t0 = clock()
            parsed = pb.ReportBatch.FromString(blob)
            t1 = clock()
            validate(parsed, max_edges=settings.max_batch_edges)
            t2 = clock()
            phased.ledger.admit(parsed.agent_id, parsed.sequence, settings.max_waiting_batches)
            t3 = clock()
            phased.ingest(parsed, time.time())
            t4 = clock()
            if steady:
                for phase, took in zip(PHASES, (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
                    spent[phase] += took
                batches += 1
                deltas += len(parsed.edges)
        for n, blob in blobs:
            IDENTITY.set(Identity(servicer.auth.expected, f"node-{n}"))
            request = pb.ReportBatch.FromString(blob)
            if steady and profile is not None:
                profile.enable()
            t0 = clock()
            servicer._report(request)
            took = clock() - t0
            if steady and profile is not None:
                profile.disable()
            if steady:
                spent["_report"] += took
        # While its batch waits to be written, an agent asks every interval for the acknowledgement.
        queries = [(n, pb.ReportBatch(agent_id=f"bench-{run}-{n}", node=f"node-{n}", sequence=0, acked=rnd - 1,
                                      interval_ms=1000, sent_unix_ms=int(time.time() * 1000)).SerializeToString())
                   for n in nodes]
        for n, blob in queries:
            IDENTITY.set(Identity(servicer.auth.expected, f"node-{n}"))
            t0 = clock()
            servicer._report(pb.ReportBatch.FromString(blob))
            if steady:
                spent["ack_query"] += clock() - t0
        t0 = clock()
        written = flush(whole_topology)
        if steady:
            spent["flush"] += clock() - t0
            spent["flush_edges"] = spent.get("flush_edges", 0.0) + written
    return spent, batches, deltas


def measure(args: argparse.Namespace) -> list[dict[str, float]]:
    """Per run: µs per batch of each phase (of ``flush``: per edge written), and the batches and deltas."""
    topo = make_topology(args.nodes, args.deployments, args.pods, args.edges, 0, args.seed)
    profile = cProfile.Profile() if args.profile else None
    runs = []
    for r in range(args.repeat):
        spent, batches, deltas = one_run(topo, args, f"{os.getpid()}-{r}", profile)
        run = {phase: spent[phase] / batches * 1e6 for phase in PHASES}  # (as many queries as batches)
        run["flush"] = spent["flush"] / max(spent["flush_edges"], 1.0) * 1e6
        runs.append({**run, "batches": batches, "deltas": deltas})
    if profile is not None:
        out = io.StringIO()
        pstats.Stats(profile, stream=out).sort_stats("tottime").print_stats(args.profile_lines)
        print(out.getvalue())
    return runs


def show(title: str, runs: list[dict[str, float]], reference: list[dict[str, float]] | None = None) -> None:
    """Medians over the runs, and the ratio to the reference's medians."""
    batches, deltas = runs[0]["batches"], runs[0]["deltas"]
    print(f"\n{title}: {int(batches):,} steady batches, {int(deltas):,} deltas ({deltas / batches:.1f} per batch); "
          f"median of {len(runs)} runs")
    print(f"  {'phase':<10} {'µs/batch':>10} {'(min-max of runs)':>20} {'µs/delta':>10}"
          + (f" {'vs before':>10}" if reference else ""))
    for phase in PHASES:
        values = [run[phase] for run in runs]
        median = statistics.median(values)
        per_delta = f"{median * batches / deltas:10.2f}" if phase in PER_BATCH else f"{'':10}"
        line = f"  {phase:<10} {median:10.1f} {f'({min(values):.1f}-{max(values):.1f})':>20} {per_delta}"
        if reference:
            line += f" {median / statistics.median(run[phase] for run in reference):9.2f}x"
        print(line + {"flush": "  (per edge written)", "ack_query": "  (per query: parse and _report)"}.get(phase, ""))


def child(args: argparse.Namespace, folder: str | None) -> list[dict[str, float]]:
    """One run of the benchmark in a child process, over ``folder``'s operator (None: this tree's)."""
    env = dict(os.environ)
    if folder is not None:
        env["PYTHONPATH"] = os.pathsep.join([f"{folder}/operator", f"{folder}/api"])
    argv = [a for a in sys.argv[1:] if a != "--profile"]
    i = argv.index("--against")
    del argv[i:i + 2]
    proc = subprocess.run([sys.executable, __file__, *argv, "--repeat", "1", "--child"], cwd=REPO, env=env,
                          check=True, capture_output=True, text=True)
    found = [line for line in proc.stdout.splitlines() if line.startswith(RESULT)]
    runs: list[dict[str, float]] = json.loads(found[0][len(RESULT):])
    return runs


def against(args: argparse.Namespace, rev: str) -> tuple[list[dict[str, float]], list[dict[str, float]]]:
    """Runs over ``rev``'s flowmap_operator and flowmap_api and over this tree's, taking turns (so
    that a neighbour's load falls on both alike): (rev's, this tree's)."""
    before: list[dict[str, float]] = []
    after: list[dict[str, float]] = []
    with tempfile.TemporaryDirectory(prefix="flowmap-against-") as folder:
        archive = subprocess.run(["git", "archive", rev, "operator/flowmap_operator", "api/flowmap_api"], cwd=REPO,
                                 check=True, capture_output=True).stdout
        with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
            tar.extractall(folder, filter="data")
        for _ in range(args.repeat):
            before += child(args, folder)
            after += child(args, None)
    return before, after


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nodes", type=int, default=1000)
    p.add_argument("--deployments", type=int, default=300)
    p.add_argument("--pods", type=int, default=4, help="pods per deployment")
    p.add_argument("--edges", type=int, default=5000)
    p.add_argument("--rounds", type=int, default=4, help="steady rounds (every node's batch each) after the first")
    p.add_argument("--repeat", type=int, default=3, help="runs; each figure is the median of them")
    p.add_argument("--against", help="also run over this git revision's operator (e.g. 0296542), first")
    p.add_argument("--profile", action="store_true", help="cProfile the whole _report of the steady rounds")
    p.add_argument("--profile-lines", type=int, default=30)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    where = Path(sys.modules[Topology.__module__].__file__ or "").parent
    if args.child:
        print(RESULT + json.dumps(measure(args)))
        return
    print(f"python {sys.version.split()[0]}; {args.nodes} nodes, {args.edges} edges, {args.rounds} steady rounds, "
          f"median of {args.repeat} runs; flowmap_operator from {where}", flush=True)
    if args.against:
        before, after = against(args, args.against)
        show(args.against, before)
        show("this tree", after, before)
    if not args.against or args.profile:
        show("this tree, in this process", measure(args))

if __name__ == "__main__":
    main()
