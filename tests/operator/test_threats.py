"""What the operator keeps of threats (flowmap_operator.threats): tallies per edge and name, the
status list most severe first, read back as written, and Events bounded per Group and name."""

from __future__ import annotations

from flowmap_api import report_pb2 as pb
from flowmap_operator.policy.modes import Modes
from flowmap_operator.resolution import Resolver
from flowmap_operator.threats import MAX_SUMMARY, Alerts, Tally, from_status, ordered, tally, to_status
from flowmap_operator.topology import Topology
from tests.operator.harness import edge
from tests.operator.test_modes import NOW, WEB, cluster

EDGE = ("shop.web", "shop.db", 5432, "TCP")


def hit(name: str, snippet: str = "", at: float = 0.0) -> pb.ThreatHit:
    return pb.ThreatHit(name=name, snippet=snippet, time_unix_ms=int(at * 1000))


def test_hits_are_tallied_by_name_with_first_last_and_latest_example() -> None:
    tallies: dict[str, Tally] = {}
    assert tally(tallies, [hit("sqlinjection", "' or 1=1", 10), hit("sqlinjection", "", 5)], 100.0) == ["sqlinjection"]
    assert tally(tallies, [hit("heartbleed", "len 16384 > 3"), hit("nonsense", "x", 20)], 100.0) == \
        ["heartbleed", "unknown"]
    assert tallies["sqlinjection"] == Tally(2, 5.0, 10.0, "' or 1=1")  # an empty example keeps the last one
    assert tallies["heartbleed"] == Tally(1, 100.0, 100.0, "len 16384 > 3")  # no time on the hit: the batch's
    assert tallies["unknown"].count == 1


def test_status_lists_the_most_severe_first_and_reads_back_as_written() -> None:
    tallies = {"syn-with-data": Tally(9, 1.0, 2.0, ""), "sqlinjection": Tally(2, 1.0, 2.0, "x"),
               "heartbleed": Tally(1, 1.0, 2.0, ""), "port-scan": Tally(5, 1.0, 2.0, ""),
               "deprecated-tls": Tally(7, 1.0, 2.0, "TLSv1.0")}
    assert ordered(tallies) == ["heartbleed", "sqlinjection", "deprecated-tls", "port-scan", "syn-with-data"]
    items, summary = to_status(tallies)
    assert summary == "heartbleed,sqlinjection,deprecated-tls,port-scan,syn-with-data"
    assert items[0] == {"name": "heartbleed", "severity": "Critical", "count": 1,
                        "firstSeen": "1970-01-01T00:00:01Z", "lastSeen": "1970-01-01T00:00:02Z"}
    assert items[2]["example"] == "TLSv1.0" and items[2]["severity"] == "Medium"
    assert from_status(items) == tallies
    assert from_status("nonsense") == {} and from_status([{"name": 3}, {"name": "a", "count": "1"}]) == {}


def test_the_summary_is_bounded() -> None:
    many = {f"{n}-{i}": Tally(1, 0.0, 0.0, "") for i in range(12) for n in ("heartbleed",)}
    _, summary = to_status(many)
    assert len(summary) == MAX_SUMMARY and summary.endswith("...")


def test_events_once_per_group_and_name_per_cooldown() -> None:
    alerts = Alerts(cooldown=600.0)
    tallies = {"auth-brute-force": Tally(40, 0.0, 0.0, "28P01 x40"), "sqlinjection": Tally(1, 0.0, 0.0, "")}
    alerts.saw(["shop.web", "shop.db"], EDGE, ["auth-brute-force"], tallies, 1000.0)
    alerts.saw(["shop.web", "shop.db"], EDGE, ["auth-brute-force", "sqlinjection"], tallies, 1300.0)
    assert [(a.group, a.name) for a in alerts.queue] == [
        ("shop.web", "auth-brute-force"), ("shop.db", "auth-brute-force"),
        ("shop.web", "sqlinjection"), ("shop.db", "sqlinjection")]
    assert alerts.queue[0].message == ("auth-brute-force (High): shop.web -> shop.db 5432/TCP, 40 hits; "
                                       "e.g. 28P01 x40")
    alerts.saw(["shop.web"], EDGE, ["auth-brute-force"], tallies, 1601.0)  # the cooldown ran out
    assert len(alerts.queue) == 5


def test_the_event_queue_is_bounded_and_counts_what_it_drops() -> None:
    alerts = Alerts(cooldown=600.0, max_queued=3)
    tallies = {"syn-flood": Tally(1, 0.0, 0.0, "")}
    for i in range(5):
        alerts.saw([f"g{i}"], EDGE, ["syn-flood"], tallies, 10.0)
    assert len(alerts.queue) == 3 and alerts.dropped == 2
    alerts.queue.clear()
    alerts.saw(["g4"], EDGE, ["syn-flood"], tallies, 20.0)  # dropped, so not in cooldown: raised when there is room
    assert [a.group for a in alerts.queue] == ["g4"]


def test_an_edge_to_a_service_external_ip_that_no_node_holds_is_external_ip_mitm() -> None:
    r = cluster()
    r.agent_nodes.update({"node-a", "node-b"})
    r.service_seen({"metadata": {"namespace": "shop", "name": "evil-dns"},
                    "spec": {"clusterIP": "10.96.0.99", "externalIPs": ["8.8.8.8", "172.18.0.3"],
                             "ports": [{"name": "dns", "port": 53, "protocol": "UDP"}]}})
    r.slice_seen({"metadata": {"namespace": "shop", "name": "evil-dns-x", "labels": {"kubernetes.io/service-name":
                                                                                  "evil-dns"}},
                  "endpoints": [{"targetRef": {"kind": "Pod", "name": "db-0"}}],
                  "ports": [{"name": "dns", "port": 5353, "protocol": "UDP"}]})
    topo = Topology(r, max_connections=100, max_ports=20, modes=Modes(r))
    hijacked = edge(WEB, 40000, "8.8.8.8", 53, proto=pb.UDP, apps=("dns",))
    to_a_node = edge(WEB, 40001, "172.18.0.3", 53, proto=pb.UDP, apps=("dns",))  # a node's own: the usual use
    topo.ingest(pb.ReportBatch(agent_id="a/1", node="node-a", sequence=1, edges=[hijacked, to_a_node]), NOW)
    # The traffic lands on the Service's pods: the edge is theirs, and says why.
    hit = topo.edges[("shop.web", "shop.db", 5353, "UDP")].threats
    assert list(hit) == ["external-ip-mitm"] and hit["external-ip-mitm"].count == 1
    assert hit["external-ip-mitm"].example == "8.8.8.8:53 is an externalIP of Service shop/evil-dns"
    allowed = Resolver(external_ip_cidrs=["8.8.8.0/24"])
    allowed.service_seen({"metadata": {"namespace": "shop", "name": "evil-dns"}, "spec": {"externalIPs": ["8.8.8.8"]}})
    assert allowed.intercepting("8.8.8.8") == "" and r.intercepting("8.8.8.8") == "shop/evil-dns"
    r.service_gone("shop", "evil-dns")
    assert r.intercepting("8.8.8.8") == "" and r.resolve_service("8.8.8.8", 53, "UDP", NOW) is None
