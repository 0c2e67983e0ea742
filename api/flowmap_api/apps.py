"""Application names: the detector names of the dp, shared by the proto, the CRDs and metrics.

A test checks that this list, the dp's detector registry and the CRD enums agree.
"""

APPLICATIONS: tuple[str, ...] = (
    "cassandra", "couchbase", "dhcp", "dns", "echo", "grpc", "http", "kafka", "mongodb", "mysql", "ntp",
    "postgresql", "redis", "spark", "sqlinjection", "ssh", "tls", "tds", "tftp", "tns", "zookeeper",
)
UNKNOWN = "unknown"
