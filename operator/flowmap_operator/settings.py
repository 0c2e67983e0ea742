"""The operator's settings, read once from ``FLOWMAP_OPERATOR_*`` environment variables.

No name may take a shape the kubelet gives its service-link variables (``<SERVICE>_SERVICE_HOST``,
``<SERVICE>_PORT``, ``<SERVICE>_PORT_9090_TCP_ADDR`` …): the Service ``flowmap-operator-metrics``
would otherwise set ``FLOWMAP_OPERATOR_METRICS_PORT=tcp://…``. Hence ``*_listen`` for the ports we
listen on; ``tests/test_settings.py`` checks every field. Read, typed and bounded by
``flowmap_api.settings``: each field's type and bounds say what its variable may be.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal, Self

from flowmap_api.limits import MAX_BATCH_EDGES
from flowmap_api.settings import port, read, setting
from flowmap_api.validity import VM_LABEL as DNS_LABEL


@dataclass(frozen=True)
class Settings:
    namespace: str = setting("flowmap-system", required=True)  # where the operator and the agents run
    agent_service_account: str = "flowmap-agent"
    token_audience: str = "flowmap"
    grpc_listen: int = port(9443)  # the port of the gRPC server
    grpc_tls_cert: str = "/etc/flowmap/tls/tls.crt"  # the gRPC port always serves TLS
    grpc_tls_key: str = "/etc/flowmap/tls/tls.key"
    # A Secret of the namespace to serve from instead of the two files: made, renewed and its CA
    # published in the ConfigMap below when missing (flowmap_operator.certs); empty: the files.
    grpc_tls_secret: str = ""
    ca_configmap: str = "flowmap-ca"
    grpc_service: str = "flowmap-operator"  # the Service agents dial: its DNS names go in the certificate
    metrics_listen: int = port(9090)  # the port of /metrics
    # results.flowmap.dev, behind the API server (flowmap_operator.results; 0: not served), and the
    # APIService whose caBundle the operator keeps when it made its certificate ("": none).
    results_listen: int = port(9444)
    results_apiservice: str = "v1alpha1.results.flowmap.dev"
    # API writes per second, all kinds together: never fewer than write_budget, and up to
    # write_budget_max while the API server answers quickly (flowmap_operator.budget). A ceiling
    # below the floor is raised to it: a fixed rate.
    write_budget: float = setting(20.0, above=0)
    write_budget_max: float = setting(200.0, above=0)
    flush_interval: float = setting(0.5, above=0)  # seconds between flush rounds
    max_connections: int = 10_000
    max_ports_per_pair: int = 20  # more ports between two groups collapse into one "any" edge
    group_ttl: float = 24 * 3600.0  # a group whose workload is gone is deleted after this
    connection_ttl: float = 7 * 24 * 3600.0  # a connection idle this long is deleted
    gc_interval: float = setting(60.0, above=0)
    # Edges per batch, at most the contract's (agents split to flowmap_api.limits.MAX_BATCH_EDGES:
    # below it their full batches would be refused).
    max_batch_edges: int = setting(MAX_BATCH_EDGES, at_least=1, at_most=MAX_BATCH_EDGES,
                                   why="the contract's limit, flowmap_api.limits")
    # Calls at once, all kinds (each agent holds a policy stream): beyond, RESOURCE_EXHAUSTED; and
    # reports read, parsed and applied at once, each up to MAX_MESSAGE_BYTES.
    max_rpcs: int = setting(10_000, at_least=1)
    max_reports_at_once: int = setting(4, at_least=1)
    max_waiting_batches: int = 1024  # per agent: beyond this the agent is asked to back off
    # Seconds a batch naming an address inside a node's pod range that no known pod or node holds
    # (a pod the watch has not delivered yet) is refused, retryable, before the address is taken for
    # that node's own (flowmap_operator.resolution, "Not known yet").
    unknown_address_wait: float = 15.0
    metrics_series_cap: int = 10_000  # edges with series of their own; the rest are summed into "other"
    # Seconds between checkpoints of the edge series (flowmap_operator.highwater): how far behind
    # the operator's counts /metrics may be.
    metrics_checkpoint_interval: float = setting(5.0, above=0)
    peering_name: str = "flowmap"
    default_mode: Literal["Learn", "Monitor", "Protect"] = "Learn"  # of groups no NetworkLearningPolicy selects
    enforcement_disabled: bool = False  # the emergency switch: no node blocks anything
    # Seconds between status writes of a policy that only learned more.
    policy_status_interval: float = setting(10.0, above=0)
    events_per_second: float = 1.0  # Events for connections no rule allows (each is also an API write)
    dns_namespace: str = "kube-system"  # the cluster DNS: always allowed on port 53
    dns_labels: tuple[str, ...] = ("k8s-app=kube-dns",)  # its pods' labels, key=value,...
    # Bounds on what addresses resolve to (flowmap_operator.resolution): CIDR Groups used (the oldest;
    # each holds up to 64 CIDRs), Groups made for names learned from DNS (beyond: "external"), and
    # addresses whose DNS name is kept (each until its TTL and the grace pass; beyond: the soonest to expire go).
    max_cidr_groups: int = 1000
    max_fqdn_groups: int = 1000
    # Where a Service's spec.externalIPs may legitimately be, besides the nodes' own addresses: an
    # edge to any other externalIP carries the threat external-ip-mitm (CVE-2020-8554).
    external_ip_cidrs: tuple[str, ...] = ()
    max_dns_names: int = 100_000
    # PacketCaptures of one namespace that run at once (armed ones included); the others wait,
    # Pending with reason NamespaceCaptureLimit (flowmap_operator.capturing).
    max_captures_per_namespace: int = setting(4, at_least=1)
    # Seconds between asks whether KubeVirt's API (virtualmachineinstances.kubevirt.io) is served,
    # while it is not: KubeVirt installed after the operator is noticed within this
    # (flowmap_operator.watching).
    kubevirt_poll: float = setting(30.0, above=0)
    # The namespace of the libvirt VMs' Groups (the VMs agents report, ReportBatch.vms): the
    # NetworkLearningPolicies of this namespace govern them, by Group name.
    vm_namespace: str = "libvirt"

    def __post_init__(self) -> None:
        if not DNS_LABEL.fullmatch(self.vm_namespace):
            raise ValueError(f"FLOWMAP_OPERATOR_VM_NAMESPACE: {self.vm_namespace!r} is not a namespace name (a DNS label)")
        for cidr in self.external_ip_cidrs:
            try:
                ipaddress.ip_network(cidr, strict=False)
            except ValueError:
                raise ValueError(f"FLOWMAP_OPERATOR_EXTERNAL_IP_CIDRS: {cidr!r} is not a CIDR") from None

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Self:
        """Read ``FLOWMAP_OPERATOR_<FIELD>`` for each field; a bad value or an unknown name fails loudly."""
        return read(cls, "FLOWMAP_OPERATOR_", "the operator", environ)
