"""Who is behind an IP address at a given time (pure: fed with API objects and reports, no I/O).

In order: a pod (its workload's group; hostNetwork pods are the node), a Service ClusterIP (the
workload behind it, via EndpointSlices, with the Service recorded), a node address (``nodes``:
the Node object's, and those its agent reports), a user CIDR group (longest prefix: one bisect in
a table of every group's networks, flowmap_operator.prefixes), a name the agents learned from DNS
answers (an FQDN group; the table of names is bounded, flowmap_operator.dns), else ``external``.
At most ``max_cidr_groups`` CIDR groups are used, the oldest: thousands of Groups importing a
cloud's address ranges cost a rebuild of the table, never a slower lookup. Pod addresses are kept with
the time span they were held, and for a grace period after the pod is gone, so a delta is
resolved as of its own time even if the IP was reused since.

A node sends from more addresses than its Node object lists: a CNI bridge's gateway (the
kubelet's probes leave from ``cni0``'s 10.244.N.1), a ptp host-side veth's, an overlay tunnel's
(flannel's ``flannel.1`` holds 10.244.N.0, the source of a hostNetwork client reaching a pod on
another node). Its agent knows them all exactly: an end it marks local without naming a pod is
that node itself (:meth:`Resolver.resolve_endpoint`), and every batch carries the node's current
addresses (``ReportBatch.node_addresses``), which resolve to that node wherever they are seen.

**Not known yet.** An address inside a Node's ``spec.podCIDRs`` that neither a known pod nor an
address of a node holds is, almost always, a pod whose Pod object the operator's watch has not
delivered yet (a new pod's first DNS lookups), or a node address whose agent has not reported to
this operator yet (just after a restart). Resolving it now would name it wrongly for good, so
``resolve`` raises :class:`NotKnownYet` and the batch is refused whole, retryable, until the
address is known. The wait is bounded (``wait`` seconds from the delta's time or from the first
time the address was asked about, whichever is earlier): an address still unknown after it is
taken for that node's own (an agentless node's gateway or tunnel, which no agent reports). The
blind spot: CNIs with their own IPAM (Calico's blocks, Cilium's cluster pool, the AWS VPC CNI)
put pods outside ``spec.podCIDRs``, so a new pod there is not waited for, and an agentless
node's addresses there resolve as ``external`` (or a user's CIDR group that covers them).
"""

from __future__ import annotations

import ipaddress
import math
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from flowmap_api import networks
from flowmap_operator.dns import NameTable
from flowmap_operator.errors import NotKnownYet, SecondaryNotKnownYet
from flowmap_operator.naming import object_name
from flowmap_operator.prefixes import Network, PrefixTable, Span, span
from flowmap_operator.times import parse_iso

Body = Mapping[str, Any]
NODES, EXTERNAL = "nodes", "external"
MAX_UNKNOWN = 4096  # addresses whose wait is timed at once; beyond, the stale ones are forgotten
# Labels a controller puts on each pod of a workload to tell revisions or pods apart: they say
# nothing about what the workload is, so selectors and exported NetworkPolicies never use them.
RUNTIME_LABELS = frozenset(("pod-template-hash", "controller-revision-hash", "pod-template-generation",
                            "statefulset.kubernetes.io/pod-name", "apps.kubernetes.io/pod-index", "controller-uid",
                            "job-name", "batch.kubernetes.io/controller-uid", "batch.kubernetes.io/job-name",
                            "batch.kubernetes.io/job-completion-index",
                            # KubeVirt's, on a virt-launcher pod: its VMI's uid, the nodes and the
                            # migration it is part of (a migration's target pod carries other values).
                            "kubevirt.io/created-by", "kubevirt.io/nodeName", "kubevirt.io/migrationTargetNodeName",
                            "kubevirt.io/migrationJobUID", "kubevirt.io/migrationName",
                            "kubevirt.io/outdatedLauncherImage"))
# KubeVirt: a virt-launcher pod's controller is its VirtualMachineInstance, whose controller (if
# any) is its VirtualMachine. Their Groups are workload Groups (pods, policy, Protect: the launcher
# pod's network is the VM's) that `kubectl get fg` shows as kind VM.
VMI, VM = "VirtualMachineInstance", "VirtualMachine"
# A libvirt VM on a node (ReportBatch.vms, :meth:`Resolver.vms_seen`): the member of a workload
# Group of the operator's VM namespace, shown as kind VM too.
LIBVIRT = "LibvirtDomain"
VM_WORKLOADS = frozenset((VM, VMI, LIBVIRT))
VM_KIND = "VM"


@dataclass(frozen=True)
class Peer:
    group: str  # the Group object's name
    kind: str  # Workload | Nodes | External | FQDN | CIDR
    namespace: str = ""
    workload_kind: str = ""
    workload: str = ""
    member: str = ""  # pod or node name, FQDN, or address
    node: str = ""  # the node a pod runs on


@dataclass
class _Span:
    start: float
    end: float
    peer: Peer


@dataclass
class _Service:
    namespace: str
    name: str
    ips: tuple[str, ...]
    ports: dict[tuple[int, str], str]  # (port, protocol) -> port name
    slices: dict[str, dict[str, Any]] = field(default_factory=dict)  # slice name -> {pods, ports}
    external: tuple[str, ...] = ()  # spec.externalIPs: every node's kube-proxy sends them to the Service


def workload_of(pod: Body, jobs: Mapping[tuple[str, str], str],
                vms: Mapping[tuple[str, str], str] | None = None) -> tuple[str, str]:
    """The pod's top owner as (kind, name): Deployment, StatefulSet, DaemonSet, Job, CronJob,
    VirtualMachine, VirtualMachineInstance or Pod. ``jobs``: (namespace, job) -> its CronJob;
    ``vms``: (namespace, VMI) -> its VirtualMachine."""
    meta = pod.get("metadata", {})
    owner = next((o for o in meta.get("ownerReferences") or [] if o.get("controller")), None)
    if owner is None:
        return "Pod", meta.get("name", "")
    kind, name = owner.get("kind", ""), owner.get("name", "")
    if kind == "ReplicaSet":
        # The Deployment controller names its ReplicaSets <deployment>-<pod-template-hash> and puts
        # the hash on the pods: no need to watch every ReplicaSet revision.
        suffix = "-" + (meta.get("labels") or {}).get("pod-template-hash", "\0")
        return ("Deployment", name.removesuffix(suffix)) if name.endswith(suffix) else ("ReplicaSet", name)
    if kind == "Job":
        cronjob = jobs.get((meta.get("namespace", ""), name))
        return ("CronJob", cronjob) if cronjob else ("Job", name)
    if kind == VMI:
        return vm_of(meta.get("namespace", ""), name, vms or {})
    return kind, name


def vm_of(namespace: str, vmi: str, vms: Mapping[tuple[str, str], str]) -> tuple[str, str]:
    """A VirtualMachineInstance's workload: its VirtualMachine, else itself. KubeVirt names a VM's
    VMI after the VM, so the Group's name is the same either way (and stays through live
    migrations, restarts and a VMI seen before its owner): only the kind it shows waits for it."""
    vm = vms.get((namespace, vmi))
    return (VM, vm) if vm else (VMI, vmi)


def shown_kind(peer: Peer) -> str:
    """The kind a Group's status says: ``VM`` for a KubeVirt VM's, else its peer's."""
    return VM_KIND if peer.kind == "Workload" and peer.workload_kind in VM_WORKLOADS else peer.kind


def peer_kind(kind: str, workload_kind: str) -> str:
    """A Group's status kind read back as the core's (``shown_kind`` undone)."""
    return "Workload" if kind == VM_KIND and workload_kind in VM_WORKLOADS else kind


def group_name(namespace: str, workload: str) -> str:
    return object_name(f"{namespace}.{workload}")


class Resolver:
    def __init__(self, grace: float = 300.0, wait: float = 15.0, *, max_names: int = 100_000,
                 max_cidr_groups: int = 1000, external_ip_cidrs: Iterable[str] = (), vm_namespace: str = "libvirt") -> None:
        self.grace = grace
        self.vm_namespace = vm_namespace  # the namespace of libvirt VMs' Groups (NetworkLearningPolicies there govern them)
        # Where a Service's externalIPs may legitimately be (besides the nodes' own addresses).
        self.external_ip_cidrs = [ipaddress.ip_network(c, strict=False) for c in external_ip_cidrs]
        self.wait = wait  # how long an unknown address inside a node's pod range is waited for
        self.max_cidr_groups = max_cidr_groups  # beyond, the groups created last are not used
        self._pods: dict[str, list[_Span]] = {}  # ip -> spans, oldest first
        self._pod_ips: dict[tuple[str, str], tuple[list[str], Peer]] = {}  # (ns, name) -> ips, peer
        self._pod_labels: dict[tuple[str, str], dict[str, str]] = {}
        self._jobs: dict[tuple[str, str], str] = {}  # (ns, job) -> cronjob
        self._vms: dict[tuple[str, str], str] = {}  # (ns, VMI) -> its VirtualMachine, for VMIs a VM owns
        self._launchers: dict[tuple[str, str], set[str]] = {}  # (ns, VMI) -> its virt-launcher pods
        self._launcher_of: dict[tuple[str, str], str] = {}  # (ns, pod) -> the VMI whose launcher it is
        self._nodes: dict[str, str] = {}  # ip -> node name
        self._node_ips: dict[str, list[str]] = {}
        self._pod_cidrs: dict[str, list[Network]] = {}  # node -> spec.podCIDRs
        self._pod_ranges: PrefixTable | None = None  # of _pod_cidrs; None: to build at the next lookup
        self._reported: dict[str, tuple[float, frozenset[str]]] = {}  # node -> (sent, the addresses its agent reported)
        self._reported_ips: dict[str, set[str]] = {}  # ip -> the nodes reporting it
        self._unknown: dict[str, tuple[float, float]] = {}  # ip -> (first, last) asked about while not known
        self._node_vms: dict[str, tuple[float, frozenset[str]]] = {}  # node -> (sent, its libvirt VMs' members)
        self._services: dict[tuple[str, str], _Service] = {}
        self._cluster_ips: dict[str, tuple[str, str]] = {}
        self._external_ips: dict[str, tuple[str, str]] = {}  # a Service's spec.externalIPs -> the Service
        self._cidrs: dict[str, list[Network]] = {}  # CIDR group -> its spec.cidrs
        self._spans: dict[str, list[Span]] = {}  # the same, as integers for the table
        self._cidr_created: dict[str, float] = {}  # CIDR group -> its creationTimestamp: the oldest are used
        self._prefixes: PrefixTable | None = None  # of the groups used; None: to build at the next lookup
        self._ignored: frozenset[str] = frozenset()  # CIDR groups beyond max_cidr_groups, as of the last build
        self.names = NameTable(max_names)
        # Bumped on every change of who holds which address: what is compiled from it is stale.
        self.version = 0
        self.agent_nodes: set[str] = set()  # nodes whose pods and own traffic are captured by an agent
        self.agent_selector: tuple[str, dict[str, str]] = ("flowmap-system", {"app.kubernetes.io/name": "flowmap-agent"})
        # Secondary (Multus) addresses: what pods' annotations claim, what agents confirm, who held what when.
        self._claims: dict[tuple[str, str], frozenset[str]] = {}  # (ns, pod) -> what its network-status lists
        self._secondary: dict[str, list[_Span]] = {}  # ip -> spans, oldest first
        # node -> (sent, ip -> (ns, pod)): the addresses its agent confirmed last
        self._secondary_reported: dict[str, tuple[float, dict[str, tuple[str, str]]]] = {}
        self._secondary_pending: dict[str, tuple[str, str, str]] = {}  # ip -> (node, ns, pod) not known with it yet

    # -- feeding ---------------------------------------------------------------------------------

    def job_seen(self, job: Body) -> None:
        meta = job.get("metadata", {})
        owner = next((o for o in meta.get("ownerReferences") or [] if o.get("kind") == "CronJob"), None)
        if owner:
            self._jobs[(meta.get("namespace", ""), meta.get("name", ""))] = owner["name"]

    def pod_seen(self, pod: Body, now: float) -> None:
        meta, spec, status = pod.get("metadata", {}), pod.get("spec", {}), pod.get("status", {})
        ns, name = meta.get("namespace", ""), meta.get("name", "")
        node = spec.get("nodeName", "")
        ns_sel, labels = self.agent_selector
        if ns == ns_sel and labels.items() <= (meta.get("labels") or {}).items() and node:
            self.agent_nodes.add(node)
        if spec.get("hostNetwork"):
            return  # its addresses are the node's
        self._claims_seen(ns, name, meta)
        ips = [p["ip"] for p in status.get("podIPs") or [] if p.get("ip")] or (
            [status["podIP"]] if status.get("podIP") else [])
        if meta.get("deletionTimestamp") or status.get("phase") in ("Succeeded", "Failed"):
            self.pod_gone(ns, name, now)
            return
        wk, wn = workload_of(pod, self._jobs, self._vms)
        peer = Peer(group_name(ns, wn), "Workload", ns, wk, wn, name, node)
        owner: Body = next((o for o in meta.get("ownerReferences") or [] if o.get("controller")), {})
        if owner.get("kind") == VMI and (ns, name) not in self._launcher_of:
            self._launcher_of[(ns, name)] = owner.get("name", "")
            self._launchers.setdefault((ns, owner.get("name", "")), set()).add(name)
        pod_labels = {k: v for k, v in (meta.get("labels") or {}).items() if k not in RUNTIME_LABELS}
        old = self._pod_ips.get((ns, name))
        if old and old == (ips, peer) and self._pod_labels.get((ns, name)) == pod_labels:
            return
        self.version += 1
        self._pod_labels[(ns, name)] = pod_labels
        if old and old == (ips, peer):
            return  # only its labels changed
        self._hold(ns, name, ips, peer, parse_iso(meta.get("creationTimestamp"), now), now)

    def _hold(self, namespace: str, name: str, ips: list[str], peer: Peer, start: float, now: float) -> None:
        """A member (a pod, a libvirt VM) holds ``ips`` as ``peer`` from ``start``: its former addresses end ``now``."""
        old = self._pod_ips.get((namespace, name))
        if old:
            self._end(namespace, name, old[0], now)
        for ip in ips:
            self._pods.setdefault(ip, []).append(_Span(start, math.inf, peer))
            self._unknown.pop(ip, None)
        self._pod_ips[(namespace, name)] = (ips, peer)

    def pod_gone(self, namespace: str, name: str, now: float) -> None:
        old = self._pod_ips.pop((namespace, name), None)
        self._pod_labels.pop((namespace, name), None)
        self._secondary_pod_gone(namespace, name, now)
        vmi = self._launcher_of.pop((namespace, name), None)
        if vmi is not None:
            pods = self._launchers.get((namespace, vmi), set())
            pods.discard(name)
            if not pods:
                self._launchers.pop((namespace, vmi), None)
        if old:
            self.version += 1
            self._end(namespace, name, old[0], now)

    def _end(self, namespace: str, name: str, ips: Iterable[str], now: float) -> None:
        for ip in ips:
            spans = self._pods.get(ip, [])
            for span in spans:
                if span.end == math.inf and span.peer.member == name and span.peer.namespace == namespace:
                    span.end = now
            # Forget spans long past: nothing reports that late.
            spans[:] = [s for s in spans if s.end + self.grace >= now]

    def node_seen(self, node: Body) -> None:
        name = node.get("metadata", {}).get("name", "")
        self._node_object_gone(name)
        ips = [a["address"] for a in node.get("status", {}).get("addresses") or []
               if a.get("type") in ("InternalIP", "ExternalIP")]
        self._node_ips[name] = ips
        self.version += 1
        for ip in ips:
            self._nodes[ip] = name
        spec = node.get("spec") or {}
        cidrs = []
        for cidr in spec.get("podCIDRs") or ([spec["podCIDR"]] if spec.get("podCIDR") else []):
            try:
                cidrs.append(ipaddress.ip_network(cidr, strict=False))
            except ValueError:
                continue  # the API server validates these; never trust, never crash
        if cidrs:
            self._pod_cidrs[name] = cidrs
        self._pod_ranges = None

    def node_gone(self, name: str, now: float) -> None:
        self._node_object_gone(name)
        self._secondary_node_gone(name)
        _, reported = self._reported.pop(name, (0.0, frozenset()))
        self._unreport(name, reported)
        _, vms = self._node_vms.pop(name, (0.0, frozenset()))
        for member in vms:
            self.pod_gone(self.vm_namespace, member, now)
        self.version += 1

    def _node_object_gone(self, name: str) -> None:
        for ip in self._node_ips.pop(name, []):
            self._nodes.pop(ip, None)
        if self._pod_cidrs.pop(name, None):
            self._pod_ranges = None

    def _unreport(self, node: str, ips: Iterable[str]) -> None:
        for ip in ips:
            holders = self._reported_ips.get(ip, set())
            holders.discard(node)
            if not holders:
                self._reported_ips.pop(ip, None)

    def node_addresses_seen(self, node: str, addresses: Iterable[str], sent: float) -> None:
        """The addresses ``node``'s agent says the node has (every global address on an interface
        that is up, and the Node object's), as of ``sent``: they resolve to that node. An older
        report than the one kept (a batch resent by an agent since replaced) changes nothing;
        none at all says nothing (an agent that does not send them)."""
        ips = frozenset(addresses)
        kept = self._reported.get(node)
        if not ips or (kept is not None and sent < kept[0]):
            return
        self._reported[node] = (sent, ips)
        if kept is not None and kept[1] == ips:
            return
        self.version += 1
        self._unreport(node, kept[1] - ips if kept else ())
        for ip in ips:
            self._reported_ips.setdefault(ip, set()).add(node)
            self._unknown.pop(ip, None)

    def vms_seen(self, node: str, vms: Iterable[tuple[str, str, Sequence[str]]], sent: float, now: float) -> None:
        """The libvirt VMs ``node``'s agent says run there, each (domain name, label, addresses), as
        of ``sent``: the whole list (empty: none run). Each is a member ``<node>/<domain>`` of a
        workload Group of ``vm_namespace`` (of kind VM), named after its label (VMs sharing a label
        are one Group, as a workload's pods are) or else after its node and domain; its addresses
        resolve to it as a pod's do, for the grace period after it is gone too. An older report
        than the one kept (a batch resent by an agent since replaced) changes nothing."""
        kept = self._node_vms.get(node)
        if kept is not None and sent < kept[0]:
            return
        ns, members = self.vm_namespace, {}
        for name, label, ips in vms:
            workload = label or f"{node}.{name}"
            member = f"{node}/{name}"
            members[member] = (list(ips), Peer(group_name(ns, workload), "Workload", ns, LIBVIRT, workload, member, node))
        self._node_vms[node] = (sent, frozenset(members))
        for member in (kept[1] if kept else frozenset()) - members.keys():
            self.pod_gone(ns, member, now)
        for member, (ips, peer) in members.items():
            if self._pod_ips.get((ns, member)) != (ips, peer):
                self.version += 1
                self._pod_labels[(ns, member)] = {}
                self._hold(ns, member, ips, peer, sent, now)

    def group_members_seen(self, group: Body, now: float) -> None:
        """A workload Group as the last operator wrote it, read on start: the pods its status lists
        that no pod of the cluster now holds were deleted before this operator listed the pods (the
        previous operator's own pod, after a restart). Each keeps its addresses as a pod gone
        ``now``, for the grace period, so that the batches agents resend resolve as they would
        have before the restart."""
        status = group.get("status") or {}
        namespace, workload = status.get("namespace", ""), status.get("workload") or {}
        if peer_kind(status.get("kind", "Workload"), workload.get("kind", "")) != "Workload":
            return
        for member in status.get("members") or []:
            name = member.get("name", "")
            if not name or (namespace, name) in self._pod_ips:
                continue  # alive: listed with its own span
            peer = Peer(group.get("metadata", {}).get("name", ""), "Workload", namespace, workload.get("kind", ""),
                        workload.get("name", ""), name, member.get("node", ""))
            for ip in member.get("ips") or []:
                try:
                    ipaddress.ip_address(ip)
                except ValueError:
                    continue  # the schema refuses these; never trust, never crash
                spans = self._pods.setdefault(ip, [])
                if not any(span.peer == peer for span in spans):
                    # Since before anything known: any pod listed with this address started later and wins.
                    spans.insert(0, _Span(-math.inf, now, peer))

    def vmi_seen(self, vmi: Body) -> None:
        """A KubeVirt VirtualMachineInstance: its controller, if a VirtualMachine, names its pods'
        workload. Pods seen before it are renamed now (the kind their Group shows)."""
        meta = vmi.get("metadata", {})
        key = (meta.get("namespace", ""), meta.get("name", ""))
        owner: Body = next((o for o in meta.get("ownerReferences") or [] if o.get("controller")), {})
        vm = owner.get("name", "") if owner.get("kind") == VM else ""
        if self._vms.get(key, "") == vm:
            return
        if vm:
            self._vms[key] = vm
        else:
            self._vms.pop(key, None)
        self._relaunch(key)

    def vmi_gone(self, namespace: str, name: str) -> None:
        """Its launcher pods go with it, and keep their workload while they do."""
        self._vms.pop((namespace, name), None)

    def vmis_listed(self, vmis: Iterable[Body]) -> None:
        """Every VMI there is (a fresh list, after a watch was lost): the ones not listed are gone."""
        listed = set()
        for vmi in vmis:
            meta = vmi.get("metadata", {})
            listed.add((meta.get("namespace", ""), meta.get("name", "")))
            self.vmi_seen(vmi)
        for key in set(self._vms) - listed:
            self.vmi_gone(*key)

    def vmis_forgotten(self) -> None:
        """KubeVirt's API is no longer served (uninstalled): no VMI names a VM."""
        for key in list(self._vms):
            self.vmi_gone(*key)

    def _relaunch(self, vmi: tuple[str, str]) -> None:
        """The launcher pods of ``vmi`` take its workload as now known, from the start of their spans."""
        wk, wn = vm_of(*vmi, self._vms)
        ns = vmi[0]
        # A copy: kopf feeds the pods from its threads, this comes from the event loop.
        for name in list(self._launchers.get(vmi, ())):
            found = self._pod_ips.get((ns, name))
            if found is None or (found[1].workload_kind, found[1].workload) == (wk, wn):
                continue
            ips, old = found
            peer = Peer(group_name(ns, wn), old.kind, ns, wk, wn, name, old.node)
            self._pod_ips[(ns, name)] = (ips, peer)
            for ip in ips:
                for held in self._pods.get(ip, ()):
                    if held.peer == old:
                        held.peer = peer
            self._secondary_repeer(old, peer)
            self.version += 1

    # -- secondary (Multus) addresses ---------------------------------------------------------------
    # A pod's address beyond its status.podIPs is named after it only while its node's agent confirms
    # it in the pod's network namespace (ReportBatch.pod_addresses), the pod runs on that node, and
    # its network-status annotation lists it: neither the annotation (anyone who edits the pod writes
    # it) nor an agent (for a pod of another node) alone. A podIP or a node's address is never one:
    # ``resolve`` asks for secondary addresses only after both. An address two pods are confirmed to
    # hold at once (isolated networks reusing a range) is neither's.

    def _claims_seen(self, namespace: str, name: str, meta: Body) -> None:
        try:
            claims = frozenset(networks.claimed(meta.get("annotations")))
        except networks.BadAnnotation:
            claims = frozenset()  # the agent says why, in its log
        if claims:
            self._claims[(namespace, name)] = claims
        else:
            self._claims.pop((namespace, name), None)

    def pod_addresses_seen(self, node: str, entries: Iterable[tuple[str, Iterable[str]]], sent: float,
                           now: float) -> None:
        """The secondary addresses ``node``'s agent confirms for its pods (``entries``: "namespace/name"
        and addresses, the whole set), as of ``sent``; those it said before and no longer does end
        ``now``. An older report than the one kept changes nothing."""
        kept = self._secondary_reported.get(node)
        if kept is not None and sent < kept[0]:
            return
        said: dict[str, tuple[str, str]] = {}
        twice = set()
        for pod, ips in entries:
            namespace, _, name = pod.partition("/")
            for ip in ips:
                if said.setdefault(ip, (namespace, name)) != (namespace, name):
                    twice.add(ip)
        for ip in twice:
            del said[ip]
        self._secondary_reported[node] = (sent, said)
        for ip, who in (kept[1] if kept else {}).items():
            if said.get(ip) != who:
                self._secondary_end(ip, who, now)
            if self._secondary_pending.get(ip, ("",))[0] == node:
                del self._secondary_pending[ip]
        for ip, who in said.items():
            self._secondary_open(node, ip, who, now)

    def _secondary_open(self, node: str, ip: str, who: tuple[str, str], now: float) -> None:
        found = self._pod_ips.get(who)
        if found is None or ip not in self._claims.get(who, ()):
            if found is None or found[1].node == node:
                self._secondary_pending[ip] = (node, *who)  # the watch has not delivered it (so) yet
            return
        ips, peer = found
        if peer.node != node:
            return  # an agent speaks for its own node's pods only
        spans = self._secondary.setdefault(ip, [])
        if any(s.end == math.inf and s.peer == peer for s in spans):
            return
        for s in spans:
            if s.end == math.inf and (s.peer.namespace, s.peer.member) == who:
                s.end = now  # its workload is known better now
        start = min((s.start for i in ips for s in self._pods.get(i, ()) if s.peer == peer), default=now)
        spans.append(_Span(start, math.inf, peer))
        self._unknown.pop(ip, None)
        self.version += 1

    def _secondary_end(self, ip: str, who: tuple[str, str], now: float) -> None:
        spans = self._secondary.get(ip, [])
        for s in spans:
            if s.end == math.inf and (s.peer.namespace, s.peer.member) == who:
                s.end = now
                self.version += 1
        spans[:] = [s for s in spans if s.end + self.grace >= now]
        if not spans:
            self._secondary.pop(ip, None)

    def _secondary_node_gone(self, node: str) -> None:
        """Its pods' spans end as the pods go; what its agent said is forgotten."""
        self._secondary_reported.pop(node, None)
        for ip in [ip for ip, pending in self._secondary_pending.items() if pending[0] == node]:
            del self._secondary_pending[ip]

    def _secondary_pod_gone(self, namespace: str, name: str, now: float) -> None:
        self._claims.pop((namespace, name), None)
        for ip in [ip for ip, spans in self._secondary.items()
                   if any((s.peer.namespace, s.peer.member) == (namespace, name) for s in spans)]:
            self._secondary_end(ip, (namespace, name), now)

    def _secondary_repeer(self, old: Peer, peer: Peer) -> None:
        for spans in self._secondary.values():
            for held in spans:
                if held.peer == old:
                    held.peer = peer

    def secondary_at(self, ip: str, when: float) -> Peer | None:
        """The pod whose secondary address ``ip`` was at ``when`` (else within the grace period: the
        latest started); None if none, or if two pods were confirmed to hold it then."""
        spans = self._secondary.get(ip, ())
        held = {s.peer for s in spans if s.start <= when <= s.end}
        if len(held) > 1:
            return None
        if held:
            return held.pop()
        near = [s for s in spans if s.start - self.grace <= when <= s.end + self.grace]
        return max(near, key=lambda s: s.start).peer if near else None

    def _secondary_resolved(self, ip: str, when: float, now: float) -> Peer | None:
        """``secondary_at``; else, for an address an agent confirms for a pod not known with it yet,
        raises SecondaryNotKnownYet while it is worth waiting for (``waiting``)."""
        peer = self.secondary_at(ip, when)
        if peer is None and ip in self._secondary_pending:
            node, namespace, name = self._secondary_pending[ip]
            if self.waiting(ip, when, now):
                raise SecondaryNotKnownYet(ip, node, f"{namespace}/{name}")
        return peer

    def service_seen(self, svc: Body) -> None:
        meta, spec = svc.get("metadata", {}), svc.get("spec", {})
        key = (meta.get("namespace", ""), meta.get("name", ""))
        self.service_gone(*key)
        ips = tuple(ip for ip in spec.get("clusterIPs") or [spec.get("clusterIP")] if ip and ip != "None")
        ports = {(int(p.get("port", 0)), p.get("protocol", "TCP")): p.get("name", "") for p in spec.get("ports") or []}
        external = tuple(ip for ip in spec.get("externalIPs") or [] if isinstance(ip, str))
        old = self._services.get(key)
        self._services[key] = _Service(key[0], key[1], ips, ports, old.slices if old else {}, external)
        for ip in ips:
            self._cluster_ips[ip] = key
        for ip in external:
            self._external_ips[ip] = key

    def service_gone(self, namespace: str, name: str) -> None:
        svc = self._services.get((namespace, name))
        if svc:
            for ip in svc.ips:
                self._cluster_ips.pop(ip, None)
            for ip in svc.external:
                if self._external_ips.get(ip) == (namespace, name):
                    del self._external_ips[ip]

    def intercepting(self, ip: str) -> str:
        """The Service ("namespace/name") whose externalIPs take ``ip`` into the cluster when ``ip`` is
        no node's address and outside ``external_ip_cidrs`` (CVE-2020-8554: anyone who may create a
        Service can claim any address, and every pod's traffic to it goes to the Service's pods); else ""."""
        key = self._external_ips.get(ip)
        if key is None or self.node_at(ip):
            return ""
        try:
            address = ipaddress.ip_address(ip)
        except ValueError:
            return ""
        if any(address in net for net in self.external_ip_cidrs):
            return ""
        return f"{key[0]}/{key[1]}"

    def slice_seen(self, eps: Body) -> None:
        meta = eps.get("metadata", {})
        svc_name = (meta.get("labels") or {}).get("kubernetes.io/service-name")
        if not svc_name:
            return
        key = (meta.get("namespace", ""), svc_name)
        svc = self._services.setdefault(key, _Service(key[0], svc_name, (), {}))
        pods = [ep["targetRef"]["name"] for ep in eps.get("endpoints") or []
                if (ep.get("targetRef") or {}).get("kind") == "Pod"]
        ports = {(p.get("name") or "", p.get("protocol", "TCP")): int(p.get("port", 0)) for p in eps.get("ports") or []}
        svc.slices[meta.get("name", "")] = {"pods": pods, "ports": ports}

    def slice_gone(self, namespace: str, name: str, service: str) -> None:
        svc = self._services.get((namespace, service))
        if svc:
            svc.slices.pop(name, None)

    def cidr_group_seen(self, group: Body) -> None:
        meta = group.get("metadata", {})
        name = meta.get("name", "")
        nets = []
        for cidr in (group.get("spec") or {}).get("cidrs") or []:
            try:
                nets.append(ipaddress.ip_network(cidr, strict=False))
            except ValueError:
                continue  # the schema refuses these; never trust, never crash
        if nets == self._cidrs.get(name, []):
            return  # most events are the operator's own status writes
        self.version += 1
        self._prefixes = None
        if nets:
            self._cidrs[name], self._spans[name] = nets, [span(net) for net in nets]
            self._cidr_created[name] = parse_iso(meta.get("creationTimestamp"))
        else:
            self.cidr_group_gone(name)

    def cidr_group_gone(self, name: str) -> None:
        self._cidr_created.pop(name, None)
        self._spans.pop(name, None)
        if self._cidrs.pop(name, None):
            self.version += 1
            self._prefixes = None

    def _cidr_table(self) -> PrefixTable:
        """The CIDR groups' table, built after a change. Beyond ``max_cidr_groups`` the groups created
        last are left out (and listed in ``cidr_groups_ignored``): a new group never displaces one
        in use, and a restart picks the same ones."""
        if self._prefixes is None:
            order = sorted(self._cidrs, key=lambda g: (self._cidr_created.get(g, 0.0), g))
            used, self._ignored = order[:self.max_cidr_groups], frozenset(order[self.max_cidr_groups:])
            self._prefixes = PrefixTable({g: self._spans[g] for g in used})
        return self._prefixes

    def cidr_groups_ignored(self) -> list[str]:
        """CIDR groups beyond ``max_cidr_groups``: their addresses resolve as if they did not exist."""
        self._cidr_table()
        return sorted(self._ignored)

    @property
    def cidr_groups_ignored_count(self) -> int:
        """How many CIDR groups the last build left out (read from another thread: builds nothing)."""
        return len(self._ignored)

    def catch_all(self, group: str) -> list[str]:
        """The networks of the group's ``spec.cidrs`` that hold every address (``0.0.0.0/0``, ``::/0``)."""
        return [str(net) for net in self._cidrs.get(group, ()) if net.prefixlen == 0]

    def learn_name(self, ip: str, name: str, ttl: float, seen: float, now: float | None = None) -> None:
        """An agent saw ``name`` resolve to ``ip``; the name holds while its TTL (plus grace) does.
        ``now``: the operator's clock, by which answers expire (default ``seen``)."""
        if self.names.learn(ip, name.lower().rstrip("."), seen + ttl + self.grace, seen if now is None else now):
            self.version += 1

    # -- resolving -------------------------------------------------------------------------------

    def pod_at(self, ip: str, when: float) -> Peer | None:
        """The pod that held ``ip`` at ``when``: the one whose span holds ``when``, else one whose
        span does within the grace period; the latest started of those."""
        best: tuple[bool, float] | None = None
        peer = None
        for span in self._pods.get(ip, ()):
            if span.start - self.grace <= when <= span.end + self.grace:
                rank = (span.start <= when <= span.end, span.start)
                if best is None or rank > best:
                    best, peer = rank, span.peer
        return peer

    def service_at(self, ip: str) -> tuple[str, str] | None:
        return self._cluster_ips.get(ip)

    def resolve_endpoint(self, ip: str, when: float, observer: str, local: bool, pod: str, now: float) -> Peer:
        """The group behind one end of a node's delta. An end the observing node marked local
        without naming a pod is that node itself, from any of its own addresses (unless a pod
        holds the address: a report that marks a pod's end local without naming it); else
        ``resolve``."""
        if local and not pod and observer:
            return self.pod_at(ip, when) or Peer(NODES, "Nodes", member=observer, node=observer)
        return self.resolve(ip, when, now)

    def node_at(self, ip: str) -> str:
        """The node an address is one of (its Node object's, or reported by its agent), or ""."""
        node = self._nodes.get(ip)
        if node:
            return node
        holders = self._reported_ips.get(ip)
        return min(holders) if holders else ""  # an address several nodes report: any one, but always the same

    def pod_range_of(self, ip: str) -> str:
        """The node whose ``spec.podCIDRs`` hold the address, or ""."""
        if self._pod_ranges is None:
            self._pod_ranges = PrefixTable({node: map(span, nets) for node, nets in self._pod_cidrs.items()})
        return self._pod_ranges.lookup(ipaddress.ip_address(ip)) or ""

    def waiting(self, ip: str, when: float, now: float) -> bool:
        """Is an address that is not known yet still worth waiting for? For ``wait`` seconds from
        the delta's time or from the first time it was asked about, whichever is earlier: a batch
        can never be held longer, however often it is resent. Only this clock is kept for a
        refused batch; an address not asked about for the grace period is waited for afresh."""
        first, last = self._unknown.get(ip, (math.inf, now))
        if now - last > self.grace:
            first = math.inf
        first = min(first, when, now)
        if ip not in self._unknown and len(self._unknown) >= MAX_UNKNOWN:
            self._unknown = {k: v for k, v in self._unknown.items() if now - v[1] <= self.grace}
            if len(self._unknown) >= MAX_UNKNOWN:
                self._unknown.clear()  # at worst, some addresses are waited for once more
        self._unknown[ip] = (first, now)
        return now - first < self.wait

    def resolve(self, ip: str, when: float, now: float) -> Peer:
        """The group behind an address (not a ClusterIP: see ``resolve_service``) at ``when``;
        ``now`` is the operator's clock. Raises NotKnownYet for an address inside a node's pod
        range that no known pod or node holds, while it is worth waiting for (``waiting``)."""
        pod = self.pod_at(ip, when)
        if pod:
            return pod
        node = self.node_at(ip)
        if not node and (pod := self._secondary_resolved(ip, when, now)):
            return pod
        if not node:
            node = self.pod_range_of(ip)
            if node and self.waiting(ip, when, now):
                raise NotKnownYet(ip, node)
            # Still unknown after the wait: the node's own (an agentless node's gateway or tunnel).
        if node:
            return Peer(NODES, "Nodes", member=node, node=node)
        group = self._cidr_table().lookup(ipaddress.ip_address(ip)) if self._cidrs else None
        if group:
            return Peer(group, "CIDR", member=ip)
        name = self.names.name_at(ip, when)
        if name:
            return Peer(object_name(name), "FQDN", member=name)
        return Peer(EXTERNAL, "External", member=ip)

    def resolve_service(self, ip: str, port: int, protocol: str, when: float) -> tuple[Peer, int, str] | None:
        """For a ClusterIP or an externalIP: the workload behind the Service, its target port, and
        "namespace/name"."""
        key = self._cluster_ips.get(ip) or self._external_ips.get(ip)
        if key is None:
            return None
        svc = self._services[key]
        port_name = svc.ports.get((port, protocol))
        target = port
        workloads: Counter[Peer] = Counter()
        for sl in svc.slices.values():
            if port_name is not None and (port_name, protocol) in sl["ports"]:
                target = sl["ports"][(port_name, protocol)]
            for pod in sl["pods"]:
                entry = self._pod_ips.get((svc.namespace, pod))
                if entry:
                    p = entry[1]
                    workloads[Peer(p.group, p.kind, p.namespace, p.workload_kind, p.workload)] += 1
        label = f"{svc.namespace}/{svc.name}"
        if workloads:
            # Several workloads behind one Service: the client's side cannot tell which got the
            # packet (the node DNATs after the pod's interface), so the largest one is named.
            peer = max(workloads.items(), key=lambda kv: (kv[1], kv[0].group))[0]
        else:
            peer = Peer(group_name(svc.namespace, svc.name), "Workload", svc.namespace, "Service", svc.name)
        return peer, target, label

    def captured(self, peer: Peer) -> bool:
        """Is this a pod, or a node, whose node runs an agent (so that node reports its traffic)?

        A node's agent sees what the node itself sends (its dp keeps outgoing frames from the
        node's addresses) and marks the node's end local, as it does its pods'.
        """
        return peer.kind in ("Workload", "Nodes") and bool(peer.node) and peer.node in self.agent_nodes

    def members(self, group: str, limit: int) -> tuple[list[dict[str, Any]], int]:
        """Up to ``limit`` live members of a workload group, and how many there are."""
        found = [(name, ips, peer.node) for (ns, name), (ips, peer) in self._pod_ips.items() if peer.group == group]
        found.sort()
        return [{"name": n, "ips": ips[:4], "node": node} for n, ips, node in found[:limit]], len(found)

    # -- what policy needs: groups, their labels and their addresses ------------------------------

    def workloads(self, namespace: str) -> dict[str, dict[str, str]]:
        """The live workload groups of a namespace, each with the labels all its pods carry."""
        found: dict[str, dict[str, str]] = {}
        for (ns, name), (_, peer) in self._pod_ips.items():
            if ns != namespace:
                continue
            labels = self._pod_labels.get((ns, name), {})
            common = found.get(peer.group)
            found[peer.group] = dict(labels) if common is None else {
                k: v for k, v in common.items() if labels.get(k) == v}
        return found

    def workload_peer(self, group: str) -> Peer | None:
        """The workload group of that name, if a live pod is of it."""
        peer = next((peer for _, peer in self._pod_ips.values() if peer.group == group), None)
        return Peer(peer.group, peer.kind, peer.namespace, peer.workload_kind, peer.workload) if peer else None

    def group_pods(self, group: str) -> list[tuple[str, str, list[str], str]]:
        """The live pods of a workload group: (namespace, name, addresses, node), sorted."""
        return sorted((ns, name, ips, peer.node) for (ns, name), (ips, peer) in self._pod_ips.items()
                      if peer.group == group)

    def service_ips(self, group: str) -> list[str]:
        """The ClusterIPs of the Services whose endpoints are pods of ``group``: a pod calls the
        workload by them, and its own interface carries them (its node DNATs past it)."""
        return sorted({ip for svc in self._services.values()
                       if any((found := self._pod_ips.get((svc.namespace, pod))) is not None and found[1].group == group
                              for sl in svc.slices.values() for pod in sl["pods"])
                       for ip in svc.ips})

    def namespace_pods(self, namespace: str) -> list[tuple[Peer, list[str], dict[str, str]]]:
        """The live pods of a namespace (hostNetwork ones are their node's, not here): each its
        workload group's Peer (``member`` the pod, ``node`` where it runs), addresses and labels."""
        return sorted(((peer, list(ips), dict(self._pod_labels.get((ns, name), {})))
                       for (ns, name), (ips, peer) in self._pod_ips.items() if ns == namespace),
                      key=lambda found: found[0].member)

    def pods_labelled(self, namespace: str, labels: Mapping[str, str]) -> set[str]:
        """The workload groups of a namespace with a pod carrying all of ``labels``."""
        return {peer.group for (ns, name), (_, peer) in self._pod_ips.items()
                if ns == namespace and labels.items() <= self._pod_labels.get((ns, name), {}).items()}

    def node_addresses(self) -> list[str]:
        """Every address of a node: the Node objects', and those the agents reported."""
        return sorted(self._nodes.keys() | self._reported_ips.keys())

    def cidr_networks(self, group: str) -> list[str]:
        """A CIDR group's networks; none for a group beyond the cap (resolution does not use it either)."""
        self._cidr_table()
        if group in self._ignored:
            return []
        return [str(net) for net in self._cidrs.get(group, [])]

    def fqdn_addresses(self, group: str, now: float) -> list[str]:
        """Addresses agents saw a name resolve to, while that answer (TTL plus grace) holds."""
        return self.names.addresses(group, now)
