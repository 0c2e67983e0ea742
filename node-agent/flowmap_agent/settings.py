"""The agent's settings, read once from ``FLOWMAP_AGENT_*`` environment variables.

As the operator's (flowmap_operator.settings): no name may take the shape of a service-link
variable, so ports we listen on are ``*_listen``, never ``*_port``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, fields


@dataclass(frozen=True)
class Settings:
    node: str = ""  # required: the node this agent runs on (the downward API's spec.nodeName)
    operator: str = "flowmap-operator.flowmap-system.svc:9443"
    ca_file: str = "/etc/flowmap/ca/ca.crt"  # the CA of the operator's gRPC certificate
    token_file: str = "/var/run/secrets/flowmap/token"  # projected, audience "flowmap"; re-read: it rotates
    state_file: str = "/var/lib/flowmap/agent.state"
    socket: str = "/run/flowmap/dp.sock"
    interval: float = 1.0
    window: int = 1024  # unacknowledged batches before deltas only merge (the operator's max_waiting_batches)
    health_listen: int = 9091  # the port of /healthz, /readyz and /metrics
    # "child": the agent runs the dp and restarts it; "external": the dp runs on its own (the
    # DaemonSet flowmap-dp) and outlives the agent's restarts, so the rings keep capturing.
    dp: str = "child"
    dp_workers: int = 1
    dp_args: str = ""  # extra arguments for the dp (`flowmap dp run`'s), space-separated
    uplinks: str = ""  # interfaces to watch besides the pods' (comma-separated); empty: the node IPs' interfaces
    send_timeout: float = 10.0
    # The node's network namespace when it is not the agent's own (the simulated cluster runs
    # one agent per node namespace from the host, where the API server is); empty in a cluster.
    netns: str = ""
    # Protect mode (flowmap_agent.protecting): a policy needing more set elements is refused whole;
    # a streamed policy may be this large; the table is read back this often.
    policy_max_elements: int = 250_000
    policy_max_bytes: int = 64 << 20
    policy_resync: float = 60.0
    # Packet captures (flowmap_agent.capturing): a streamed NodeCaptures may be this large; the
    # dp's --capture-dir (mounted at the same path, read-only), the only folder files are sent from.
    capture_max_bytes: int = 4 << 20
    capture_dir: str = "/var/lib/flowmap/captures"

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> Settings:
        env = os.environ if environ is None else environ
        values: dict[str, object] = {}
        for f in fields(cls):
            raw = env.get(f"FLOWMAP_AGENT_{f.name.upper()}")
            if raw is not None:
                kind: type = type(f.default)  # every field has a default
                try:
                    if kind is bool:  # bool("false") is True: spelled out, as the operator reads them
                        if raw.lower() not in ("1", "0", "true", "false", "yes", "no"):
                            raise ValueError(raw)
                        values[f.name] = raw.lower() in ("1", "true", "yes")
                    else:
                        values[f.name] = kind(raw)
                except ValueError:
                    raise ValueError(f"FLOWMAP_AGENT_{f.name.upper()}={raw!r} is not a valid {kind.__name__}") from None
        settings = cls(**values)  # type: ignore[arg-type]
        if not settings.node:
            raise ValueError("FLOWMAP_AGENT_NODE is required (set it from spec.nodeName)")
        if settings.dp not in ("child", "external"):
            raise ValueError(f"FLOWMAP_AGENT_DP={settings.dp!r}: child or external")
        return settings
