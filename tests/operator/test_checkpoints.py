"""The edge counters' marks in the real API server, with the operator ServiceAccount's RBAC: two
replicas writing at once merge instead of losing a mark, a new leader reads what the last one
stored, a shard someone else wrote is set right, and nothing else in the namespace is readable."""

from __future__ import annotations

import base64
import json
import logging
from collections.abc import Iterator

import pytest
from kubernetes_asyncio import client

from flowmap_operator import checkpointing, highwater
from flowmap_operator.budget import Budget
from flowmap_operator.checkpointing import Checkpoints
from flowmap_operator.errors import Rejected
from flowmap_operator.highwater import SHARDS, EdgeTotals, shard
from flowmap_operator.kubeapi import Writes, call
from flowmap_operator.ledger import Counters, EdgeKey, Ledger
from tests.operator.harness import NS, Cluster, as_operator

WEB_API: EdgeKey = ("shop.web", "shop.api", 8080, "TCP")
API_PG: EdgeKey = ("shop.api", "shop.postgres", 5432, "TCP")


@pytest.fixture
def clean(cluster: Cluster) -> Iterator[None]:
    def remove() -> None:
        names = [checkpointing.name(i) for i in range(SHARDS)]
        cluster.plane.kubectl("delete", "configmap", "-n", NS, "--ignore-not-found", *names)
    remove()
    yield
    remove()


def replica(core: client.CoreV1Api, counts: dict[EdgeKey, int]) -> tuple[Checkpoints, Ledger]:
    ledger = Ledger()
    for key, count in counts.items():
        ledger.load(key, Counters(count, count, 1, 1, 1), [], "1")
    return Checkpoints(core, NS, Writes(Budget(100, 100, 0.0)), EdgeTotals(cap=10), ledger), ledger


def stored(cluster: Cluster, key: EdgeKey) -> int:
    found = json.loads(cluster.plane.kubectl("get", "configmap", checkpointing.name(shard(key)), "-n", NS,
                                             "-o", "json").stdout)
    return highwater.decode(base64.b64decode(found["binaryData"][checkpointing.DATA]))[key].bytes_c2s


def test_two_replicas_writing_at_once_keep_the_higher_mark_of_each(cluster: Cluster, clean: None) -> None:
    async def work(core: client.CoreV1Api) -> tuple[int, int]:
        one, _ = replica(core, {WEB_API: 500, API_PG: 10})
        two, _ = replica(core, {WEB_API: 300, API_PG: 70})
        await one.round()  # one creates both shards
        await two.round()  # two knew no shard: it reads them first, then writes its higher API_PG
        assert two.totals.stored[shard(WEB_API)][WEB_API].bytes_c2s == 500  # one's, read
        one.ledger.edges[WEB_API].persisted = Counters(600, 600, 1, 1, 1)
        await one.round()  # a conflict if they share a shard: read again, merged, written next round
        await one.round()
        await two.round()
        one.totals.publish()
        two.totals.publish()
        return one.totals.published[WEB_API].bytes_c2s, two.totals.published[API_PG].bytes_c2s

    assert as_operator(cluster, work) == (600, 70)
    assert stored(cluster, WEB_API) == 600 and stored(cluster, API_PG) == 70


def test_a_new_leader_starts_from_the_stored_marks(cluster: Cluster, clean: None) -> None:
    async def work(core: client.CoreV1Api) -> int:
        old, _ = replica(core, {WEB_API: 900})
        await old.round()
        new, _ = replica(core, {WEB_API: 100})  # the agents have not resent yet
        await new.round()
        new.totals.publish()
        return new.totals.published[WEB_API].bytes_c2s

    assert as_operator(cluster, work) == 900


def test_a_shard_someone_else_wrote_is_said_and_written_anew(cluster: Cluster, clean: None,
                                                             caplog: pytest.LogCaptureFixture) -> None:
    cluster.plane.kubectl("create", "configmap", checkpointing.name(shard(WEB_API)), "-n", NS,
                          "--from-literal=marks.json.gz=not ours")

    async def work(core: client.CoreV1Api) -> None:
        ckpt, _ = replica(core, {WEB_API: 42})
        with caplog.at_level(logging.ERROR, "flowmap.operator.checkpointing"):
            await ckpt.round()

    as_operator(cluster, work)
    assert "holds no marks the operator wrote" in caplog.text
    assert stored(cluster, WEB_API) == 42


def test_the_operator_may_read_and_write_its_marks_and_no_other_configmap(cluster: Cluster, clean: None) -> None:
    cluster.plane.kubectl("create", "configmap", "someone-elses", "-n", NS, "--from-literal=k=v", check=False)

    async def work(core: client.CoreV1Api) -> list[str]:
        ckpt, _ = replica(core, {WEB_API: 1})
        await ckpt.round()
        refused = []
        for attempt in (core.read_namespaced_config_map("someone-elses", NS), core.list_namespaced_config_map(NS),
                        core.read_namespaced_config_map(checkpointing.name(0), "default")):
            try:
                await call(attempt)
            except Rejected as exc:
                refused.append(str(exc.status))
        return refused

    try:
        assert as_operator(cluster, work) == ["403", "403", "403"]
    finally:
        cluster.plane.kubectl("delete", "configmap", "someone-elses", "-n", NS, "--ignore-not-found")

