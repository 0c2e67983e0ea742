"""A flush round against a stand-in API: each edge written once with everything pending for it,
a new Connection in two writes (create, one status update), new objects before updates, and
several writes on the wire at once, never two of one object."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from typing import Any

from flowmap_api import report_pb2 as pb
from flowmap_operator import topology
from flowmap_operator.budget import Budget
from flowmap_operator.kubeapi import Writes
from flowmap_operator.resolution import Resolver
from flowmap_operator.writing import IN_FLIGHT, Writer
from tests.operator.harness import edge


class Api:
    """Answers every write after ``delay`` seconds, the way the API server would, and keeps the log."""

    def __init__(self, delay: float = 0.005) -> None:
        self.delay, self.version = delay, 0
        self.calls: list[tuple[str, str, str]] = []  # (verb, plural, name)
        self.statuses: dict[str, dict[str, Any]] = {}
        self.on_wire: Counter[str] = Counter()
        self.most_on_wire = 0

    async def _answer(self, verb: str, plural: str, name: str, body: dict[str, Any]) -> dict[str, Any]:
        assert not self.on_wire[name], f"two writes of {name} at once"
        self.calls.append((verb, plural, name))
        self.on_wire[name] += 1
        self.most_on_wire = max(self.most_on_wire, sum(self.on_wire.values()))
        await asyncio.sleep(self.delay)
        self.on_wire[name] -= 1
        self.version += 1
        if verb == "status" and plural == "connections":
            self.statuses[name] = body["status"]
        return {**body, "metadata": {**body.get("metadata", {}), "resourceVersion": str(self.version)}}

    def create_cluster_custom_object(self, group: str, version: str, plural: str, body: dict[str, Any],
                                     **_: Any) -> Any:
        return self._answer("create", plural, body["metadata"]["name"], body)

    def replace_cluster_custom_object_status(self, group: str, version: str, plural: str, name: str,
                                             body: dict[str, Any], **_: Any) -> Any:
        return self._answer("status", plural, name, body)

    def patch_cluster_custom_object_status(self, group: str, version: str, plural: str, name: str,
                                           body: dict[str, Any], **_: Any) -> Any:
        return self._answer("patch", plural, name, body)


def report(topo: topology.Topology, sequence: int, servers: range, bytes_c2s: int) -> None:
    batch = pb.ReportBatch(agent_id="agent-1", node="node-a", sequence=sequence, previous=sequence - 1,
                           edges=[edge("10.0.0.1", 40000, "192.0.2.1", 1000 + s, bytes_c2s=bytes_c2s) for s in servers])
    topo.ledger.begin_batch("agent-1", "node-a", sequence, acked=0, previous=sequence - 1)
    topo.ingest(batch, time.time())


def test_a_round_writes_each_edge_once_with_all_its_deltas_new_ones_first_several_at_once() -> None:
    topo = topology.Topology(Resolver(), max_connections=1000, max_ports=100)
    report(topo, 1, range(1, 41), bytes_c2s=100)
    report(topo, 2, range(1, 41), bytes_c2s=50)  # merged with batch 1's: one write carries both
    api = Api()
    writer = Writer(api, topo, Writes(Budget(10_000, 10_000, time.monotonic())))  # type: ignore[arg-type]

    written = asyncio.run(writer.flush(time.monotonic() + 30))

    names = {info.name for info in topo.edges.values()}
    conns = [(verb, name) for verb, plural, name in api.calls if plural == "connections"]
    assert Counter(verb for verb, _ in conns) == {"create": 40, "status": 40}  # two writes a new edge
    assert all(api.statuses[n]["bytes"]["clientToServer"] == 150 for n in names)
    assert written == 40 + len(topo.groups)
    first_group = next(i for i, (_, plural, _) in enumerate(api.calls) if plural == "groups")
    assert first_group == len(conns)  # the new Connections before the Groups they name
    assert not topo.ledger.dirty() and topo.ledger.acked("agent-1") == 2
    assert 1 < api.most_on_wire <= IN_FLIGHT

    # Later: one edge's new delta is one status update, and nothing else is written.
    report(topo, 3, range(7, 8), bytes_c2s=5)
    api.calls.clear()
    asyncio.run(writer.flush(time.monotonic() + 30))
    assert [(v, p) for v, p, _ in api.calls] == [("status", "connections")]
