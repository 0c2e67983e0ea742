"""The detector registry: complete, named after its modules, ordered as documented."""

from __future__ import annotations

import importlib
import pkgutil
from dataclasses import FrozenInstanceError

import pytest

import flowmap_dp.detectors as detectors
from flowmap_dp.detectors import BY_NAME, NAMES, REGISTRY, SCANNERS, candidates
from flowmap_dp.detectors.base import Detector

# The 21 protocols of issue 3: the names are the contract (metrics labels, CRD enums, proto,
# test fixture folders).
PROTOCOLS = {
    "cassandra", "couchbase", "dhcp", "dns", "echo", "grpc", "http", "kafka", "mongodb", "mysql", "ntp",
    "postgresql", "redis", "spark", "sqlinjection", "ssh", "tls", "tds", "tftp", "tns", "zookeeper",
}


def _detector_modules() -> list[str]:
    """Every public module of the detectors package except the contract itself."""
    return sorted(m.name for m in pkgutil.iter_modules(detectors.__path__)
                  if m.name != "base" and not m.name.startswith("_"))


def test_every_detector_module_is_registered() -> None:
    for name in _detector_modules():
        module = importlib.import_module(f"flowmap_dp.detectors.{name}")
        det = getattr(module, "DETECTOR", None)
        assert isinstance(det, Detector), f"detectors/{name}.py exports no DETECTOR"
        assert det.name == name, f"detectors/{name}.py names itself {det.name!r}"
        assert det in REGISTRY, f"detectors/{name}.py is not in REGISTRY"


def test_registry_is_exactly_the_21_protocols() -> None:
    assert len(REGISTRY) == 21
    assert set(NAMES) == PROTOCOLS
    assert len(set(NAMES)) == len(NAMES)
    assert set(_detector_modules()) == PROTOCOLS
    assert BY_NAME["dns"] is REGISTRY[NAMES.index("dns")]


def test_order_puts_specific_before_generic() -> None:
    order = list(NAMES)
    assert order[-1] == "echo"  # anything echoed looks like echo: asked last
    assert order.index("couchbase") < order.index("http")  # Couchbase REST is HTTP too
    assert order.index("grpc") < order.index("http")  # gRPC is HTTP/2
    assert order.index("tls") < order.index("http")


def test_sqlinjection_is_the_only_scanner_and_never_a_protocol() -> None:
    assert [d.name for d in SCANNERS] == ["sqlinjection"]
    for det in REGISTRY:
        assert (det.scan is None) == (det.name != "sqlinjection")


@pytest.mark.parametrize("det", REGISTRY, ids=NAMES)
def test_detector_shape(det: Detector) -> None:
    assert det.l4 and det.l4 <= {"tcp", "udp"}
    assert all(0 < p < 65536 for p in det.ports)
    if det.scan is None:
        assert 1 <= det.max_packets <= 16
        assert det.extract is not None, "every protocol detector extracts some metadata"
    assert det.linger >= 0
    with pytest.raises(FrozenInstanceError):
        det.max_packets = 99


def test_candidates_filter_by_l4_and_leave_scanners_out() -> None:
    udp = [d.name for d in candidates("udp", 40000, 40001)]
    assert set(udp) == {"dns", "dhcp", "ntp", "tftp", "echo"}
    tcp = [d.name for d in candidates("tcp", 40000, 40001)]
    assert "sqlinjection" not in tcp and "dhcp" not in tcp
    # Without hints: registry order.
    assert tcp == [n for n in NAMES if n in tcp]


def test_port_hints_only_reorder() -> None:
    plain = candidates("tcp", 40000, 40001)
    hinted = candidates("tcp", 40000, 6379)
    assert hinted[0].name == "redis"
    assert sorted(d.name for d in hinted) == sorted(d.name for d in plain)
    # A hint on the client's port counts too (sessions picked up mid-stream may be reversed).
    assert candidates("tcp", 5432, 40001)[0].name == "postgresql"
    # Several hinted detectors keep their registry order.
    names = [d.name for d in candidates("tcp", 40000, 8080)]
    assert names.index("grpc") < names.index("http") < names.index("ssh")
