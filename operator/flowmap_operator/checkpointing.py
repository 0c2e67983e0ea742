"""The edge counters' marks (flowmap_operator.highwater) in ConfigMaps of the operator's namespace.

While this replica leads: on taking the lead it reads every shard; then every interval it writes
the shards whose marks rose, each guarded by the resourceVersion it read or wrote last (another
replica's write in between is a conflict: the shard is read again, its marks merged, and written
at the next round), and exports what the store took. These writes, at most ``SHARDS`` a round,
are counted with the others but not paced by the write budget: behind a backlog of Connection
writes at its floor, a round would take minutes and the series would be as old as the objects.

A replica that takes the lead exports nothing for ``HANDOVER`` seconds: the replica it replaces
reads the peering object every 2 s and stops exporting when it sees a newer leader, so the two
never serve the same series at once (their values could interleave). Losing the lead, it exports
nothing.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import time
from collections.abc import Callable

from kubernetes_asyncio.client import CoreV1Api, V1ConfigMap, V1ObjectMeta

from flowmap_api.pacing import pause
from flowmap_operator import highwater
from flowmap_operator.errors import ApiError, Conflict, NotFound
from flowmap_operator.highwater import SHARDS, EdgeTotals, Marks
from flowmap_operator.kubeapi import Writes, call
from flowmap_operator.ledger import Ledger

log = logging.getLogger("flowmap.operator.checkpointing")

NAME = "flowmap-edge-counters"  # shards NAME-0 ... NAME-15, named in manifests/operator/counters-rbac.yaml
DATA = "marks.json.gz"
HANDOVER = 5.0  # seconds: two of the peering object's reads, and one to spare
SLICE = 1000  # edges whose counts are read between two turns of the event loop
LABELS = {"app.kubernetes.io/name": "flowmap-operator", "app.kubernetes.io/component": "edge-counters"}


def name(index: int) -> str:
    return f"{NAME}-{index}"


class Checkpoints:
    def __init__(self, core: CoreV1Api, namespace: str, writes: Writes, totals: EdgeTotals, ledger: Ledger) -> None:
        self.core, self.namespace, self.writes, self.totals, self.ledger = core, namespace, writes, totals, ledger
        self.versions: list[str | None] = [None] * SHARDS  # resourceVersion of each shard as last read or written
        self.unsure: set[int] = set(range(SHARDS))  # shards to read before writing them

    async def keep(self, leads: Callable[[], bool], interval: float, stop: asyncio.Event) -> None:
        led_since: float | None = None
        while not stop.is_set():
            if leads():
                if led_since is None:
                    led_since = time.monotonic()
                try:
                    await self.round()
                except ApiError as exc:  # the API server is away: the next round tries again
                    log.warning("reading the edge counters' marks: %s", exc)
                except Exception:  # noqa: BLE001 - nor does a bug stop the checkpoints
                    log.exception("a checkpoint of the edge counters failed")
                if time.monotonic() - led_since >= HANDOVER:
                    self.totals.publish()
            elif led_since is not None:  # a replica that leads again reads the store again
                led_since = None
                self.totals.forget()
                self.versions, self.unsure = [None] * SHARDS, set(range(SHARDS))
            await pause(stop, interval)

    async def round(self) -> None:
        """Read the shards not known for sure; write those whose marks rose."""
        for index in sorted(self.unsure):
            await self._read(index)
        for index, marks in self.totals.take(await self._counted()).items():
            await self._write(index, marks)

    async def _counted(self) -> Marks:
        """highwater.applied, a slice of the edges at a time: the event loop answers calls in
        between (all at once, 10,000 edges held it 15 to 100 ms). Each mark is what its edge had
        counted when it was read, so marks taken a moment apart are as good as any."""
        edges = list(self.ledger.edges.values())
        counted: Marks = {}
        for start in range(0, len(edges), SLICE):
            counted.update(highwater.applied(edges[start:start + SLICE]))
            await asyncio.sleep(0)
        return counted

    async def _read(self, index: int) -> None:
        try:
            found = await call(self.core.read_namespaced_config_map(name(index), self.namespace))
        except NotFound:
            self.versions[index] = None
            self.unsure.discard(index)
            return
        self.versions[index] = found.metadata.resource_version
        self.unsure.discard(index)
        try:
            marks = highwater.decode(base64.b64decode((found.binary_data or {}).get(DATA, "")))
        except ValueError as exc:
            log.error("ConfigMap %s/%s holds no marks the operator wrote (%s): it is written anew, and its series "
                      "may fall once", self.namespace, name(index), exc)
            return
        self.totals.load(index, marks)

    async def _write(self, index: int, marks: Marks) -> None:
        data = await asyncio.to_thread(highwater.encode, marks)  # JSON and zlib, beside the event loop
        body = V1ConfigMap(metadata=V1ObjectMeta(name=name(index), namespace=self.namespace, labels=LABELS,
                                                 resource_version=self.versions[index]),
                           binary_data={DATA: base64.b64encode(data).decode()})
        try:
            if self.versions[index] is None:
                done = await self.writes("configmap", "create", self.core.create_namespaced_config_map(
                    self.namespace, body), paced=False)
            else:
                done = await self.writes("configmap", "replace", self.core.replace_namespaced_config_map(
                    name(index), self.namespace, body), paced=False)
        except Conflict:
            self.unsure.add(index)  # another replica wrote it: read, merged, written next round
            return
        except ApiError as exc:  # it may have landed: read it again before the next write
            log.warning("writing ConfigMap %s/%s: %s", self.namespace, name(index), exc)
            self.unsure.add(index)
            return
        self.versions[index] = done.metadata.resource_version
        self.totals.wrote(index, marks)
