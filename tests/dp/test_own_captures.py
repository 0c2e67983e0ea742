"""Classify our own captures (tests/data/captures/MANIFEST.json) and check every flow's label.

The captures are real clients talking to real servers in network namespaces, made by
``tests/data/make_captures.py`` (see tests/data/captures/README.md). Where no real server can
run here (MongoDB, Kafka, Cassandra, SQL Server/TDS, Oracle/TNS) a real client library talks to
a listener that answers the protocol's handshake: those entries carry the tag
``answering-listener`` and say so in ``made_by.server``. These are client-first protocols, so the
client's bytes — what a detector mostly keys on — are the real library's.

A flow labeled ``sqlinjection`` agrees when its threats contain a sqlinjection hit and its app
is the carrying protocol (the flow's ``carrier``). Every flow raises exactly the threats its entry
lists (``threats``; absent: none), and a flow an entry does not list (a flood's many, counted in
``unlisted_flows``) raises none. Also checked: each of the 21 protocols has at
least two captures of real traffic across the nDPI captures (tests/data/ndpi) and ours (files, not flows).
"""

from __future__ import annotations

import hashlib
import json
from functools import cache
from pathlib import Path
from typing import Any

import pytest

from flowmap_dp.classify import classify_file

OWN = Path(__file__).resolve().parents[1] / "data" / "captures"
OWN_MANIFEST = OWN / "MANIFEST.json"
NDPI_MANIFEST = Path(__file__).resolve().parents[1] / "data" / "ndpi" / "MANIFEST.json"

MAX_BYTES = 200_000
PROTOCOLS = ("cassandra", "couchbase", "dhcp", "dns", "echo", "grpc", "http", "kafka", "mongodb", "mysql", "ntp",
             "postgresql", "redis", "spark", "sqlinjection", "ssh", "tls", "tds", "tftp", "tns", "zookeeper")


def _entries() -> list[dict[str, Any]]:
    return json.loads(OWN_MANIFEST.read_text()) if OWN_MANIFEST.exists() else []


@cache
def _classified(name: str) -> tuple[dict[str, Any], ...]:
    return tuple(classify_file(OWN / name))


def _find(flows: tuple[dict[str, Any], ...], label: dict[str, Any]) -> dict[str, Any] | None:
    want = (label["client"].lower(), label["server"].lower())
    for f in flows:
        if f["l4"] == label["proto"] and (f["client"].lower(), f["server"].lower()) == want:
            return f
    # Our captures show every flow's start, so the table should orient it the same way; if it
    # does not, the 5-tuple still identifies the flow and the label is still checked.
    for f in flows:
        if f["l4"] == label["proto"] and (f["server"].lower(), f["client"].lower()) == want:
            return f
    return None


def _verdict(flow: dict[str, Any] | None, label: dict[str, Any]) -> str | None:
    """None when ``flow`` agrees with ``label``, else what was seen."""
    if flow is None:
        return "<missing>"
    threats = [t.get("name") for t in flow.get("threats") or []]
    if label["label"] == "sqlinjection":
        if "sqlinjection" in threats and flow["app"] == label["carrier"]:
            return None
        return f"app={flow['app']} threats={threats} (want app={label['carrier']} + sqlinjection)"
    if flow["app"] == label["label"]:
        return None
    return f"app={flow['app']} threats={threats}"


@pytest.mark.parametrize("entry", _entries(), ids=lambda e: e["file"])
def test_own_capture_flows(entry: dict[str, Any]) -> None:
    path = OWN / entry["file"]
    assert path.exists(), f"{path} is listed in the manifest but missing"
    flows = _classified(entry["file"])
    wrong = []
    for label in entry["flows"]:
        seen = _verdict(_find(flows, label), label)
        if seen is not None:
            wrong.append(f"{label['proto']} {label['client']} -> {label['server']} label={label['label']}: {seen}")
    assert not wrong, f"{entry['file']} ({entry['made_by'].get('server')}):\n  " + "\n  ".join(wrong)


def expected_threats(label: dict[str, Any] | None) -> set[str]:
    """The threats a manifest flow entry says its flow raises: its ``threats``, and sqlinjection
    when that is its label (none for a flow the manifest does not list)."""
    if label is None:
        return set()
    return set(label.get("threats", ())) | ({"sqlinjection"} if label["label"] == "sqlinjection" else set())


def threat_mismatches(flows: tuple[dict[str, Any], ...], labels: list[dict[str, Any]]) -> list[str]:
    """Every flow of a capture whose threats are not exactly those its entry lists."""
    by_tuple = {}
    for label in labels:
        ends = (label["client"], label["server"]) if "client" in label else (label["a"], label["b"])
        for c, s in (ends, ends[::-1]):
            by_tuple[(label["proto"], label.get("vlan", 0), c.lower(), s.lower())] = label
    wrong = []
    for f in flows:
        label = by_tuple.get((f["l4"], f.get("vlan", 0), f["client"].lower(), f["server"].lower()))
        got = {t["name"] for t in f["threats"]}
        if got != expected_threats(label):
            wrong.append(f"{f['l4']} {f['client']} -> {f['server']}: raised {sorted(got)}, "
                         f"listed {sorted(expected_threats(label))}")
    return wrong


@pytest.mark.parametrize("entry", _entries(), ids=lambda e: e["file"])
def test_own_capture_threats(entry: dict[str, Any]) -> None:
    """Every flow raises exactly the threats its entry lists: none for a benign flow, and a flow
    the entry leaves out (a flood's, counted in ``unlisted_flows``) raises none."""
    flows = _classified(entry["file"])
    wrong = threat_mismatches(flows, entry["flows"])
    assert not wrong, f"{entry['file']}:\n  " + "\n  ".join(wrong)
    if "unlisted_flows" in entry:  # the flows it leaves out are all there, and what they say they are
        unlisted = entry["unlisted_flows"]["count"]
        assert len(flows) == len(entry["flows"]) + unlisted, (len(flows), len(entry["flows"]), unlisted)
        listed = {(f["client"].lower(), f["server"].lower()) for f in entry["flows"]}
        apps = {f["app"] for f in flows if (f["client"].lower(), f["server"].lower()) not in listed}
        assert apps == {entry["unlisted_flows"]["label"]}, apps


def test_manifest_is_complete() -> None:
    entries = _entries()
    assert entries, f"{OWN_MANIFEST} lists no captures"
    listed = {e["file"] for e in entries}
    on_disk = {str(p.relative_to(OWN)) for p in OWN.rglob("*.pcap")}
    assert listed == on_disk, f"not listed: {on_disk - listed}; listed but absent: {listed - on_disk}"
    for e in entries:
        data = (OWN / e["file"]).read_bytes()
        assert hashlib.sha256(data).hexdigest() == e["sha256"], f"{e['file']} changed without its manifest entry"
        assert len(data) <= MAX_BYTES, f"{e['file']} is {len(data)} bytes: keep captures small"
        assert e["flows"], f"{e['file']} has no flows"
        assert {"server", "client", "commands"} <= set(e["made_by"]), e["file"]


def _labels_of(entry: dict[str, Any]) -> set[str]:
    return {f["label"] for f in entry["flows"] if not f.get("uncertain")}


def test_every_protocol_has_two_captures() -> None:
    files: dict[str, set[str]] = {p: set() for p in PROTOCOLS}
    for name, manifest in (("ndpi", NDPI_MANIFEST), ("own", OWN_MANIFEST)):
        for entry in json.loads(manifest.read_text()):
            for label in _labels_of(entry) & set(PROTOCOLS):
                files[label].add(f"{name}/{entry['file']}")
    short = {p: sorted(f) for p, f in files.items() if len(f) < 2}
    assert not short, f"protocols with fewer than two captures of real traffic: {short}"


# What the clients sent is known (make_captures.py fixes names and addresses): the metadata the
# detectors extract must say the same.
def _meta(file: str, key: str) -> list[dict[str, Any]]:
    return [f["metadata"][key] for f in _classified(file) if key in (f.get("metadata") or {})]


def _answers(file: str) -> set[tuple[str, str, int, str]]:
    return {(a["name"], a["type"], a["ttl"], a["data"]) for m in _meta(file, "dns") for a in m.get("answers", [])}


@pytest.mark.parametrize("file,sni", [("tls/openssl-s_client.pcap", "api.flowmap.test"),
                                      ("tls/python-ssl-ipv6.pcap", "www.flowmap.test")])
def test_tls_sni_and_alpn(file: str, sni: str) -> None:
    tls = _meta(file, "tls")
    assert len(tls) == 2 and all(m.get("sni") == sni for m in tls), tls
    assert any("http/1.1" in (m.get("alpn") or []) for m in tls), tls


@pytest.mark.parametrize("file", ["dns/dig.pcap", "dns/dnspython-ipv6.pcap"])
def test_dns_answers(file: str) -> None:
    want = {("api.flowmap.test", "A", 300, "10.199.0.81"), ("api.flowmap.test", "AAAA", 300, "fd00:199::81"),
            ("www.flowmap.test", "CNAME", 300, "api.flowmap.test")}
    assert want <= _answers(file), _answers(file)


def test_http_request_and_status() -> None:
    http = _meta("http/curl.pcap", "http")
    assert {(m.get("method"), m.get("host"), m.get("path"), m.get("status")) for m in http} >= {
        ("GET", "web.flowmap.test", "/index.html", 200), ("GET", "10.199.0.1", "/missing", 404)}, http


@pytest.mark.parametrize("file", ["grpc/grpcio.pcap", "grpc/grpcio-ipv6.pcap"])
def test_grpc_service_and_method(file: str) -> None:
    grpc = _meta(file, "grpc")
    assert grpc and all(m.get("service") == "flowmap.demo.Greeter" and m.get("method") == "SayHello"
                        for m in grpc), grpc
