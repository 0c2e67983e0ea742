"""The agent's settings, read once from ``FLOWMAP_AGENT_*`` environment variables.

As the operator's (flowmap_operator.settings): no name may take the shape of a service-link
variable, so ports we listen on are ``*_listen``, never ``*_port``. Read, typed and bounded by
``flowmap_api.settings``: each field's type and bounds say what its variable may be.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal, Self

from flowmap_api.settings import port, read, setting


@dataclass(frozen=True)
class Settings:
    node: str = setting("", required=True, why="set it from spec.nodeName")  # the node this agent runs on
    operator: str = "flowmap-operator.flowmap-system.svc:9443"
    ca_file: str = "/etc/flowmap/ca/ca.crt"  # the CA of the operator's gRPC certificate
    token_file: str = "/var/run/secrets/flowmap/token"  # projected, audience "flowmap"; re-read: it rotates
    state_file: str = "/var/lib/flowmap/agent.state"
    socket: str = "/run/flowmap/dp.sock"
    interval: float = setting(1.0, above=0)
    # Seconds between deltas of an edge whose last one the operator has not written yet: how fresh
    # the operator's counts (and its /metrics) stay while its writes lag, against its CPU.
    refresh_interval: float = setting(10.0, above=0)
    # Unacknowledged batches before deltas only merge (the operator's max_waiting_batches).
    window: int = setting(1024, at_least=1)
    health_listen: int = port(9091)  # the port of /healthz, /readyz and /metrics
    # "child": the agent runs the dp and restarts it; "external": the dp runs on its own (the
    # DaemonSet flowmap-dp) and outlives the agent's restarts, so the rings keep capturing.
    dp: Literal["child", "external"] = "child"
    dp_workers: int = setting(1, at_least=1)
    dp_args: str = ""  # extra arguments for the dp (`flowmap dp run`'s), space-separated
    uplinks: tuple[str, ...] = ()  # interfaces to watch besides the pods' (comma-separated); none: the node IPs'
    send_timeout: float = setting(10.0, above=0)
    # The node's network namespace when it is not the agent's own (the simulated cluster runs
    # one agent per node namespace from the host, where the API server is); empty in a cluster.
    netns: str = ""
    # Protect mode (flowmap_agent.policy): a policy needing more set elements is refused whole;
    # a streamed policy may be this large; the table is read back this often.
    policy_max_elements: int = 250_000
    policy_max_bytes: int = 64 << 20
    policy_resync: float = setting(60.0, above=0)
    # A session blocked for its threat (a policy's threats: Block) stays blocked this long; each
    # threat set (IPv4, IPv6; by ports, by addresses) holds at most this many (each session is two).
    threat_block_seconds: int = setting(600, at_least=1, at_most=86400)
    threat_block_max: int = setting(65536, at_least=2, at_most=1 << 20)
    # Packet captures (flowmap_agent.capturing): a streamed NodeCaptures may be this large; the
    # dp's --capture-dir (mounted at the same path, read-only), the only folder files are sent from.
    capture_max_bytes: int = 4 << 20
    capture_dir: str = "/var/lib/flowmap/captures"
    # libvirt VMs on the node (flowmap_agent.libvirting): the libvirtd to follow, e.g.
    # qemu:///system (empty: none); its running domains are listed again this often.
    libvirt_uri: str = ""
    libvirt_resync: float = setting(10.0, above=0)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Self:
        """Read ``FLOWMAP_AGENT_<FIELD>`` for each field; a bad value or an unknown name fails loudly."""
        return read(cls, "FLOWMAP_AGENT_", "the agent", environ)
