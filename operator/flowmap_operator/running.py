"""``flowmap operator run``: kopf watches, the gRPC server and the writer in one event loop.

Start: read the cluster (pods, nodes, services, slices, jobs, KubeVirt's VMIs, groups) and every Connection, so
that the first report after a restart resolves and counts exactly as before it; only then serve.
The Groups' members also name the pods deleted before the cluster was read (the previous
operator's own pod): the batches agents resend after the restart still resolve to their groups.
Leadership: kopf peering with the start time (ms) as priority, so the newest replica leads and a
restarted operator takes over at once; each replica reads the peering object to know whether it
leads (followers answer ``leader=false``). Even two leaders for a moment cannot double a count:
every status update is guarded by resourceVersion and carries its watermarks.
Stop (SIGTERM/SIGINT, the one owner of signals): stop taking reports, flush within a deadline,
stop kopf.
"""

from __future__ import annotations

import asyncio
import ctypes
import gc
import logging
import os
import signal
import socket
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
import kopf
from kubernetes_asyncio import client, config

from flowmap_api import report_pb2_grpc as pb_grpc
from flowmap_api.pacing import Backoff, pause
from flowmap_operator import certs, exposition, loading, metrics
from flowmap_operator.auth import Authenticator
from flowmap_operator.errors import ApiError, InDoubt, NotFound, Throttled
from flowmap_operator.budget import Budget
from flowmap_operator.checkpointing import Checkpoints
from flowmap_operator.highwater import EdgeTotals
from flowmap_operator.kubeapi import Writes, call
from flowmap_operator.policy.modes import Modes
from flowmap_operator.policy.publishing import PolicyHub, PolicyWriter
from flowmap_operator.recording import CaptureHub, StatusWriter
from flowmap_operator.results import ResultServer
from flowmap_operator.resolution import Resolver
from flowmap_operator.serving import OPTIONS, CaptureServicer, Gate, PolicyServicer, Refusals, ReportServicer
from flowmap_operator.settings import Settings
from flowmap_operator.times import parse_iso
from flowmap_operator.topology import Topology
from flowmap_operator.uploading import Uploads
from flowmap_operator.watching import OptionalWatch
from flowmap_operator.writing import Writer

log = logging.getLogger("flowmap.operator")
STOP_DEADLINE = 15.0


class Leadership:
    """Reads the kopf peering object: this replica leads when no live peer outranks it."""

    def __init__(self, api: client.CustomObjectsApi, name: str, identity: str, priority: int) -> None:
        self.api, self.name, self.identity, self.priority = api, name, identity, priority
        self.leader = False

    def __call__(self) -> bool:
        return self.leader

    async def watch(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                peering = await call(self.api.get_cluster_custom_object("kopf.dev", "v1", "clusterkopfpeerings",
                                                                        self.name))
                self.leader = self._leads(peering.get("status") or {})
            except NotFound:
                # No peering object: peering is off and this replica is alone (kopf runs standalone).
                self.leader = True
            except Exception as exc:  # noqa: BLE001 - keep the last answer while the API is away
                log.warning("cannot read the peering object: %s", exc)
            metrics.LEADER.set(1 if self.leader else 0)
            await pause(stop, 2.0)

    def _leads(self, peers: dict[str, Any]) -> bool:
        now = time.time()
        for ident, info in peers.items():
            if ident == self.identity or not isinstance(info, dict):
                continue
            alive = parse_iso(info.get("lastseen")) + float(info.get("lifetime", 60)) > now
            if alive and int(info.get("priority", 0)) >= self.priority:
                return False
        return True


def _register_watches(registry: kopf.OperatorRegistry, topology: Topology, captures: CaptureHub,
                      leads: Callable[[], bool]) -> None:
    def feed(seen: Callable[[Any], None], gone: Callable[[Any], None]) -> Callable[..., None]:
        def handler(type: str | None, body: kopf.Body, **_: Any) -> None:  # noqa: A002 - kopf's name
            (gone if type == "DELETED" else seen)(body)
        return handler

    now, resolver, modes = time.time, topology.resolver, topology.modes
    watches: list[tuple[tuple[str, str, str], Callable[..., None]]] = [
        (("", "v1", "pods"), feed(lambda b: resolver.pod_seen(b, now()),
                                  lambda b: resolver.pod_gone(b.metadata.namespace or "", b.metadata.name or "", now()))),
        (("", "v1", "nodes"), feed(resolver.node_seen, lambda b: resolver.node_gone(b.metadata.name or "", now()))),
        (("", "v1", "services"), feed(resolver.service_seen,
                                      lambda b: resolver.service_gone(b.metadata.namespace or "", b.metadata.name or ""))),
        (("discovery.k8s.io", "v1", "endpointslices"), feed(resolver.slice_seen, lambda b: resolver.slice_gone(
            b.metadata.namespace or "", b.metadata.name or "", b.metadata.labels.get("kubernetes.io/service-name", "")))),
        (("batch", "v1", "jobs"), feed(resolver.job_seen, lambda b: None)),
        # A user's CIDRs; a Group someone deleted (the operator's own are written anew).
        (("flowmap.dev", "v1alpha1", "groups"), feed(topology.group_seen,
                                                    lambda b: topology.group_deleted(b.metadata.name or ""))),
        # What users edit: a policy's spec (and, on a follower, the leader's status) is taken as it
        # comes; nothing is written back through kopf (no finalizers, no progress annotations).
        (("flowmap.dev", "v1alpha1", "networklearningpolicies"), feed(
            lambda b: modes.seen(b, leads()), lambda b: modes.gone(b.metadata.namespace or "", b.metadata.name or ""))),
        # Also what users make; its status is the leader's, written by recording.StatusWriter.
        (("flowmap.dev", "v1alpha1", "packetcaptures"), feed(
            captures.seen, lambda b: captures.gone(b.metadata.namespace or "", b.metadata.name or ""))),
    ]
    for (group, version, plural), handler in watches:
        kopf.on.event(group, version, plural, registry=registry)(handler)


async def _prime(resolver: Resolver, modes: Modes, captures: CaptureHub, vmis: OptionalWatch,
                 core: client.CoreV1Api, custom: client.CustomObjectsApi, api_client: client.ApiClient) -> None:
    """Read the cluster once before serving, so that no report is resolved against half a picture."""
    now = time.time()
    sanitize = api_client.sanitize_for_serialization
    for node in (await core.list_node()).items:
        resolver.node_seen(sanitize(node))
    for job in (await client.BatchV1Api(api_client).list_job_for_all_namespaces()).items:
        resolver.job_seen(sanitize(job))
    await vmis.prime()  # KubeVirt's VMIs name their VMs, if KubeVirt is installed
    for pod in (await core.list_pod_for_all_namespaces()).items:
        resolver.pod_seen(sanitize(pod), now)
    for svc in (await core.list_service_for_all_namespaces()).items:
        resolver.service_seen(sanitize(svc))
    for eps in (await client.DiscoveryV1Api(api_client).list_endpoint_slice_for_all_namespaces()).items:
        resolver.slice_seen(sanitize(eps))
    for group in (await custom.list_cluster_custom_object("flowmap.dev", "v1alpha1", "groups")).get("items", []):
        resolver.cidr_group_seen(group)
    policies = await custom.list_cluster_custom_object("flowmap.dev", "v1alpha1", "networklearningpolicies")
    for policy in policies.get("items", []):
        modes.seen(policy, leading=False)  # learned rules come from their status
    for capture in (await custom.list_cluster_custom_object("flowmap.dev", "v1alpha1", "packetcaptures")).get("items", []):
        captures.seen(capture)  # admission keeps the running ones running


async def _tls(settings: Settings, core: client.CoreV1Api) -> certs.Keeper | None:
    """The Secret-kept serving certificate (flowmap_operator.certs), or None to serve the files."""
    if not settings.grpc_tls_secret:
        return None
    keeper = certs.Keeper(core, settings.namespace, settings.grpc_tls_secret, settings.ca_configmap,
                          certs.service_names(settings.grpc_service, settings.namespace))
    await keeper.ensure()
    return keeper


async def _until_done(what: str, step: Callable[[], Awaitable[None]], stop: asyncio.Event) -> bool:
    """Retry ``step`` with backoff while the API server is away or busy; False if stopped first."""
    backoff = Backoff(0.5, 10.0)
    while not stop.is_set():
        try:
            await call(step())
            return True
        except (Throttled, InDoubt) as exc:
            log.warning("%s: %s, retrying in %.1f s", what, exc, backoff.current)
        await pause(stop, backoff.next())
    return False


async def _flush_loop(writer: Writer, policing: PolicyWriter, hub: PolicyHub, captures: CaptureHub,
                      capture_status: StatusWriter, leads: Callable[[], bool], settings: Settings,
                      stop: asyncio.Event) -> None:
    collected = refreshed = time.monotonic()
    while not stop.is_set():
        if leads():
            try:
                # Who selects what, and what each node enforces, follow pods and policies within a
                # flush interval; not at every round (a busy writer loops every 10 ms).
                if time.monotonic() - refreshed >= settings.flush_interval:
                    refreshed = time.monotonic()
                    policing.refresh()
                    await hub.update(time.time())
                    await captures.update(time.time())
                    await capture_status.flush(time.time())
                deadline = time.monotonic() + settings.flush_interval
                await writer.flush(deadline)
                await policing.flush(deadline)
                if time.monotonic() - collected >= settings.gc_interval:
                    collected = time.monotonic()
                    await writer.collect(time.time(), settings.connection_ttl, settings.group_ttl)
            except Exception:  # noqa: BLE001 - one bad round must not stop the writer
                log.exception("flush round failed")
            ledger = writer.topology.ledger
            metrics.UNACKED_BATCHES.set(sum(ledger.waiting_batches(a) for a in ledger.agents))
        busy = writer.topology.ledger.dirty() or writer.topology.modes.urgent or writer.topology.modes.events
        await pause(stop, 0.01 if busy else settings.flush_interval)


# Collections of the young generation every this many allocations (Python's default: 700). Each
# report batch allocates a few hundred objects, nearly all freed by their counts at once; the
# default ran a young collection every few batches and, through them, full collections.
YOUNG_COLLECTION = 10_000


# glibc malloc's options (mallopt(3)): at most two arenas (the event loop's and one for every other
# thread); blocks from 1 MiB up mapped on their own and unmapped when freed; the free top of a heap
# given back from 2 MiB (twice the mapping size, as glibc's own adjustment keeps it, so that a block
# just under 1 MiB freed and taken again does not go back and forth to the system each time).
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_ARENA_MAX = -1, -3, -8
MALLOC_ARENAS = 2
MALLOC_MAP_FROM = 1 << 20


def bound_malloc() -> None:
    """Keep glibc's malloc from holding what the operator freed. By default it gives each thread
    that allocates an arena of its own (up to eight per CPU: the scrapes', the checkpoint's encoder,
    gRPC's), and after a big block is freed it raises the size from which it maps blocks on their
    own up to 32 MiB, so that the next pages of /metrics (megabytes each) come from the arenas, which
    keep them once freed: at 10,000 edges the arenas of the threads held about 140 MiB of the
    operator's 420 MiB. Not glibc (no ``mallopt``): nothing to do."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    mallopt(M_ARENA_MAX, MALLOC_ARENAS)
    mallopt(M_MMAP_THRESHOLD, MALLOC_MAP_FROM)  # fixed sizes: glibc no longer raises them
    mallopt(M_TRIM_THRESHOLD, 2 * MALLOC_MAP_FROM)


def settle_heap() -> None:
    """Once the cluster and the map are read: what was read stays for the process's life, so the
    garbage collector's full passes leave it out (``gc.freeze``), and it collects less often. A full
    pass over a map of 10,000 edges took ~100 ms of the event loop, each RPC waiting behind it
    (benchmarks/operator_report_path). Cycles among what was read are never collected: there are
    none to speak of (what is freed is freed by its count)."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(YOUNG_COLLECTION, *gc.get_threshold()[1:])


async def run(settings: Settings) -> None:
    bound_malloc()  # before the threads allocate
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    if os.environ.get("KUBECONFIG") or Path("~/.kube/config").expanduser().exists():
        await config.load_kube_config()
    else:
        config.load_incluster_config()
    api_client = client.ApiClient()
    custom, core = client.CustomObjectsApi(api_client), client.CoreV1Api(api_client)

    resolver = Resolver(wait=settings.unknown_address_wait, max_names=settings.max_dns_names,
                        max_cidr_groups=settings.max_cidr_groups, external_ip_cidrs=settings.external_ip_cidrs,
                        vm_namespace=settings.vm_namespace)
    modes = Modes(resolver, default_mode=settings.default_mode, enforcement_disabled=settings.enforcement_disabled,
                  system_namespaces=("kube-system", settings.dns_namespace, settings.namespace),
                  dns=(settings.dns_namespace, dict(kv.split("=", 1) for kv in settings.dns_labels)))
    topology = Topology(resolver, max_connections=settings.max_connections, max_ports=settings.max_ports_per_pair,
                        modes=modes, max_fqdn_groups=settings.max_fqdn_groups)
    budget = Budget(settings.write_budget, max(settings.write_budget, settings.write_budget_max), time.monotonic())
    writes = Writes(budget)
    writer = Writer(custom, topology, writes)
    metrics.REGISTRY.register(metrics.BoundsCollector(topology))
    captures = CaptureHub(resolver, settings.max_captures_per_namespace)
    # Not through kopf: KubeVirt may be installed after the operator starts, or never.
    vmis = OptionalWatch(custom, "kubevirt.io", "v1", "virtualmachineinstances", listed=resolver.vmis_listed,
                         seen=resolver.vmi_seen, forgotten=resolver.vmis_forgotten, poll=settings.kubevirt_poll,
                         gone=lambda b: resolver.vmi_gone(b["metadata"].get("namespace", ""), b["metadata"]["name"]))
    if not (await _until_done("reading the cluster",
                              lambda: _prime(resolver, modes, captures, vmis, core, custom, api_client), stop)
            and await _until_done("reading the map", lambda: loading.load(custom, topology), stop)):
        await api_client.close()
        return
    settle_heap()

    identity = f"{os.environ.get('POD_NAME') or socket.gethostname()}/{os.getpid()}"
    priority = time.time_ns() // 1_000_000
    leadership = Leadership(custom, settings.peering_name, identity, priority)
    auth = Authenticator(client.AuthenticationV1Api(api_client), namespace=settings.namespace,
                         service_account=settings.agent_service_account, audience=settings.token_audience)

    refusals = Refusals()
    server = grpc.aio.server(interceptors=[Gate(auth, refusals, settings.max_reports_at_once)], options=OPTIONS,
                             maximum_concurrent_rpcs=settings.max_rpcs)
    pb_grpc.add_ReportServiceServicer_to_server(ReportServicer(topology, auth, settings, refusals, leadership,
                                                               captures.saw), server)
    hub = PolicyHub(modes)
    policing = PolicyWriter(writer, modes, hub, core, identity, status_interval=settings.policy_status_interval,
                            events_per_second=settings.events_per_second)
    policing.refresh()  # modes in force before any agent asks: an empty first policy would lift Protect
    pb_grpc.add_PolicyServiceServicer_to_server(PolicyServicer(auth, hub, refusals, leadership), server)
    # The nodes' finished capture files, fetched on request: what the HTTPS API streams to users.
    uploads = Uploads(captures, leadership)
    pb_grpc.add_CaptureServiceServicer_to_server(CaptureServicer(auth, captures, refusals, leadership, uploads),
                                                 server)
    keeper = await _tls(settings, core)
    creds = keeper.credentials() if keeper else grpc.ssl_server_credentials([(
        Path(settings.grpc_tls_key).read_bytes(), Path(settings.grpc_tls_cert).read_bytes())])
    server.add_secure_port(f"[::]:{settings.grpc_listen}", creds)

    def material() -> tuple[bytes, bytes, bytes | None]:
        """What results.flowmap.dev serves: the gRPC port's certificate (and its CA, when a Secret keeps it)."""
        if keeper is not None and keeper.material is not None:
            return keeper.material.cert, keeper.material.key, keeper.material.ca
        return Path(settings.grpc_tls_cert).read_bytes(), Path(settings.grpc_tls_key).read_bytes(), None

    results = ResultServer(captures, uploads, api_client, leadership, material, settings.results_apiservice)
    results_task = (asyncio.create_task(results.keep(stop))
                    if settings.results_listen and await results.start(settings.results_listen) else None)
    # The edge series are the marks checkpointed from the ledger every interval: the report path
    # does no metrics work.
    totals = EdgeTotals(settings.metrics_series_cap)
    checkpoints = Checkpoints(core, settings.namespace, writes, totals, topology.ledger)
    metrics.REGISTRY.register(metrics.ThreatCollector(topology, totals, leadership))
    exposition.serve(settings.metrics_listen, metrics.REGISTRY, metrics.EdgeCollector(topology, totals, leadership))

    registry = kopf.OperatorRegistry()
    _register_watches(registry, topology, captures, leadership)

    @kopf.on.login(registry=registry)
    def login(**kwargs: Any) -> kopf.ConnectionInfo | None:
        # A registry of our own starts without kopf's default login handlers.
        if os.environ.get("KUBECONFIG"):
            return kopf.login_with_kubeconfig(**kwargs)
        return kopf.login_with_service_account(**kwargs)

    kopf_stop, kopf_ready = asyncio.Event(), asyncio.Event()
    kopf_settings = kopf.OperatorSettings()
    kopf_settings.scanning.disabled = True  # the resources are known: no need to read every CRD
    kopf_task = asyncio.create_task(kopf.operator(
        registry=registry, settings=kopf_settings, clusterwide=True, identity=identity,  # type: ignore[arg-type]
        priority=priority, peering_name=settings.peering_name, stop_flag=kopf_stop, ready_flag=kopf_ready,
        standalone=None))
    await asyncio.wait([kopf_task, asyncio.ensure_future(kopf_ready.wait())], return_when=asyncio.FIRST_COMPLETED)
    # kopf installs its own SIGTERM/SIGINT handlers, and when it stops it cancels every task of the
    # loop: take the signals back so that the ordered stop below runs first and kopf stops last.
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    leader_task = asyncio.create_task(leadership.watch(stop))
    vmi_task = asyncio.create_task(vmis.keep(stop))
    tls_task = asyncio.create_task(keeper.keep(stop)) if keeper else None
    await server.start()
    flush_task = asyncio.create_task(_flush_loop(writer, policing, hub, captures, StatusWriter(writer, captures),
                                                 leadership, settings, stop))
    checkpoint_task = asyncio.create_task(checkpoints.keep(leadership, settings.metrics_checkpoint_interval, stop))
    log.info("serving reports on :%d (metrics on :%d)", settings.grpc_listen, settings.metrics_listen)

    await asyncio.wait([kopf_task, asyncio.ensure_future(stop.wait())], return_when=asyncio.FIRST_COMPLETED)
    stop.set()
    log.info("stopping: no new reports, flushing for at most %.0f s", STOP_DEADLINE)
    await server.stop(grace=2.0)
    await results.close()
    await asyncio.gather(flush_task, checkpoint_task)
    if leadership():
        deadline = time.monotonic() + STOP_DEADLINE
        while topology.ledger.dirty() and time.monotonic() < deadline:
            await writer.flush(deadline)
        try:  # the next leader starts from the marks of what was written
            await asyncio.wait_for(checkpoints.round(), 5.0)
        except (ApiError, asyncio.TimeoutError) as exc:
            log.warning("the last marks of the edge counters were not written: %s", str(exc) or "timed out")
    kopf_stop.set()
    vmi_task.cancel()  # its watch may be waiting for the next event
    await asyncio.gather(kopf_task, leader_task, vmi_task, *(t for t in (tls_task, results_task) if t),
                         return_exceptions=True)
    await api_client.close()
