"""Threat names and their severities: what the dp (and the operator) report, shared by the proto,
the CRDs, the metrics and policies.

A threat's name is the contract between the dp's scanners (``flowmap_dp.threats``), the agent's
and the operator's checks, the Connection's status, ``flowmap_threats_total`` and a policy's
``threats: Block``. Its severity is decided here, once, never by the wire. A test checks that this
table, the dp's registry and the CRD enums agree.
"""

from __future__ import annotations

from dataclasses import dataclass

SEVERITIES: tuple[str, ...] = ("Critical", "High", "Medium", "Low", "Info")  # most severe first


@dataclass(frozen=True)
class Kind:
    """One kind of threat."""

    name: str
    severity: str  # one of SEVERITIES
    found_by: str  # "dp" (a node's datapath) or "operator" (from what the API says)
    summary: str


KINDS: tuple[Kind, ...] = (
    Kind("sqlinjection", "High", "dp", "SQL (or MongoDB operator) injection in web input or database queries"),
    Kind("deprecated-tls", "Medium", "dp", "SSLv2, SSLv3, TLS 1.0 or TLS 1.1 negotiated"),
    Kind("heartbleed", "Critical", "dp", "a TLS heartbeat claiming more than its record holds (CVE-2014-0160)"),
    Kind("dns-tunnel", "High", "dp", "data carried in DNS names or answers: long or random labels, TXT/NULL volume"),
    Kind("dns-zone-transfer", "Medium", "dp", "a zone transfer (AXFR or IXFR) asked for"),
    Kind("http-smuggling", "High", "dp", "an HTTP request whose length two servers may read differently"),
    Kind("slowloris", "Medium", "dp", "HTTP request headers still incomplete after a timeout"),
    Kind("syn-flood", "High", "dp", "a source opening many half-open TCP sessions"),
    Kind("port-scan", "Medium", "dp", "a source trying many ports of one peer"),
    Kind("peer-scan", "Medium", "dp", "a source trying many peers"),
    Kind("tcp-split-handshake", "Medium", "dp", "a SYN answered by a SYN"),
    Kind("syn-with-data", "Info", "dp", "a SYN carrying payload"),
    Kind("auth-brute-force", "High", "dp", "failed database logins (MySQL, PostgreSQL, Redis) at a high rate"),
    Kind("icmp-tunnel", "Medium", "dp", "data carried in ICMP echoes: large payloads, replies unlike their requests"),
    Kind("ping-of-death", "High", "dp", "an ICMP packet larger than an IP packet may be"),
    Kind("external-ip-mitm", "High", "operator", "a Service externalIP that points inside the cluster (CVE-2020-8554)"),
)
BY_NAME: dict[str, Kind] = {k.name: k for k in KINDS}
NAMES: tuple[str, ...] = tuple(k.name for k in KINDS)
UNKNOWN = "unknown"  # a hit whose name this version does not know (a newer dp): counted, never dropped
