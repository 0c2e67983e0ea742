"""The detector registry: every protocol detector, in the order they are asked.

Order matters only when two detectors could both say MATCH on the same bytes: the first wins.
So the detectors anchored on long, exact signatures come first, the ones resting on shorter
length-prefixed binary shapes after them, the UDP request/response formats next, and the
false-positive-prone ones last:

1. ssh, tls — fixed banners / record+handshake headers.
2. couchbase, grpc — before http: a Couchbase REST path and gRPC-over-HTTP/2 are also HTTP.
3. http.
4. postgresql, mysql, tds, tns, mongodb, cassandra — database protocols with several
   cross-checked header fields each.
5. kafka, zookeeper, spark, redis — shorter or partly generic framings.
6. dns, dhcp, ntp, tftp — UDP formats (dns also over TCP).
7. sqlinjection — a threat scanner: it never names a session, it looks inside matched ones.
8. echo — anything echoed would look like echo, so it is asked last.

Port hints (``Detector.ports``) move a detector to the front for a session, never past the
payload checks.
"""

from __future__ import annotations

from flowmap_dp.detectors import (
    cassandra,
    couchbase,
    dhcp,
    dns,
    echo,
    grpc,
    http,
    kafka,
    mongodb,
    mysql,
    ntp,
    postgresql,
    redis,
    spark,
    sqlinjection,
    ssh,
    tds,
    tftp,
    tls,
    tns,
    zookeeper,
)
from flowmap_dp.detectors.base import Detector

REGISTRY: tuple[Detector, ...] = (
    ssh.DETECTOR,
    tls.DETECTOR,
    couchbase.DETECTOR,
    grpc.DETECTOR,
    http.DETECTOR,
    postgresql.DETECTOR,
    mysql.DETECTOR,
    tds.DETECTOR,
    tns.DETECTOR,
    mongodb.DETECTOR,
    cassandra.DETECTOR,
    kafka.DETECTOR,
    zookeeper.DETECTOR,
    spark.DETECTOR,
    redis.DETECTOR,
    dns.DETECTOR,
    dhcp.DETECTOR,
    ntp.DETECTOR,
    tftp.DETECTOR,
    sqlinjection.DETECTOR,
    echo.DETECTOR,
)

BY_NAME: dict[str, Detector] = {d.name: d for d in REGISTRY}
NAMES: tuple[str, ...] = tuple(d.name for d in REGISTRY)
SCANNERS: tuple[Detector, ...] = tuple(d for d in REGISTRY if d.scan is not None)


def candidates(l4: str, client_port: int, server_port: int) -> list[Detector]:
    """The protocol detectors to ask for a new session, in order: those whose port hints name
    either port first (registry order kept within each group), threat scanners left out."""
    usable = [d for d in REGISTRY if d.scan is None and l4 in d.l4]
    hinted = [d for d in usable if server_port in d.ports or client_port in d.ports]
    return hinted + [d for d in usable if d not in hinted]
