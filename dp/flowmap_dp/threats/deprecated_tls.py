"""deprecated-tls: a TLS session that NEGOTIATED SSL 3.0, TLS 1.0 or TLS 1.1 (RFC 8996 deprecates
TLS 1.0 and 1.1, RFC 7568 SSL 3.0).

Rule: the version the server's ServerHello chose — its ``supported_versions`` extension when it
has one (how TLS 1.3 says so), else its legacy version field — is 0x0300, 0x0301 or 0x0302. The
``tls`` detector reads it (``extract``: ``{"tls": {"version": "TLS1.0"}}``, also reported as the
session's ``tls.version``); this scanner judges it. A client that merely *offers* old versions
(its ClientHello's legacy version or list) is no hit: the server decides. One hit per session,
``where`` = ``tls.server_hello``, the snippet the version (and the SNI, if any).

Thresholds: none (``limits`` is empty).

Cannot see: SSL 2.0 (its records have another format, which the ``tls`` detector does not match:
such a session is ``unknown``); a session whose ServerHello was not seen (picked up mid-stream, or
the server's half on another node); DTLS (UDP is not TLS here).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from flowmap_dp.detectors.base import Flow, Threat
from flowmap_dp.threats.base import Limits, Scanner

NAME = "deprecated-tls"
DEPRECATED = frozenset({"SSL3.0", "TLS1.0", "TLS1.1"})  # the tls detector's names of the versions


def scan(flow: Flow, app: str, metadata: Mapping[str, Any], limits: Limits) -> Sequence[Threat]:
    """A hit when the session's negotiated version (the tls detector's metadata) is deprecated."""
    tls = metadata.get("tls")
    if not isinstance(tls, Mapping):
        return []
    version = tls.get("version")
    if version not in DEPRECATED:
        return []
    sni = tls.get("sni")
    snippet = f"{version} negotiated" + (f" (SNI {sni[:64]})" if isinstance(sni, str) and sni else "")
    return [Threat(NAME, snippet, "tls.server_hello")]


SCANNER = Scanner(NAME, frozenset({"tls"}), scan)
