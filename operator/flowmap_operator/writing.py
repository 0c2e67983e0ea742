"""Coalesced, budgeted writes of Groups and Connections, and their collection past their TTL.

Every write, of any kind, takes a token from one bucket (flowmap_operator.kubeapi.Writes) whose
rate follows what the API server accepts (flowmap_operator.budget). New Connections go first (a
new edge should show within seconds), then those furthest behind (flowmap_operator.urgency). A
round writes each edge once, with everything pending for it, and keeps several writes on the wire
at once. A new Connection costs two writes, the fewest the API allows: its create (the status
subresource ignores a status sent with it) and one status update. A Connection's counters and
watermarks travel in one status update guarded by resourceVersion; a conflict re-reads the
object, an update of unknown outcome is settled by re-reading too. What each write carries is
built by flowmap_operator.status; what it did goes back through the ledger's own methods.

A Group the API server refuses (a status its schema does not allow) says so in a condition of its
own, written alone, and is tried again with backoff, not at every round. A Group someone deleted
is created again (the watch says so, or the next write's 404).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from functools import partial

from kubernetes_asyncio.client import CustomObjectsApi

from flowmap_api.pacing import Backoff
from flowmap_operator import metrics, urgency
from flowmap_operator import status as objects
from flowmap_operator.errors import ApiError, Conflict, InDoubt, NotFound, Rejected, Throttled
from flowmap_operator.kubeapi import FIELD_MANAGER, GROUP, MERGE, VERSION, Writes, call
from flowmap_operator.ledger import EdgeKey
from flowmap_operator.naming import object_name
from flowmap_operator.topology import GroupInfo, Topology

log = logging.getLogger("flowmap.operator.writing")
GROUP_REFRESH = 60.0  # seconds between lastSeen refreshes of a Group: it is not worth the budget
RETRY_FIRST, RETRY_MAX = 1.0, 300.0  # seconds before writing a refused object again: doubling, up to this
# Writes on the wire at once. One at a time, a server answering in 10 ms caps the rate at 100/s
# whatever the budget; the bucket still spaces them, and an edge is never in two at once.
IN_FLIGHT = 16


@dataclass
class Refusal:
    """A Group's writes the API server refuses: until when to wait, and what it said."""

    backoff: Backoff = field(default_factory=lambda: Backoff(RETRY_FIRST, RETRY_MAX))
    retry_at: float = 0.0  # monotonic
    said: str = ""  # the message the Group's condition carries


class Writer:
    def __init__(self, api: CustomObjectsApi, topology: Topology, write: Writes) -> None:
        self.api, self.topology, self.write = api, topology, write
        self.refused: dict[str, Refusal] = {}  # Group name -> its refused writes

    # -- a flush round --------------------------------------------------------------------------

    async def flush(self, deadline: float) -> int:
        """Write dirty objects until ``deadline`` (monotonic); return how many were written."""
        # New Connections first (a new edge must show fast), then the Groups they name, then the
        # counter refreshes, furthest behind first.
        dirty = urgency.order(self.topology.ledger.dirty(), time.time(), self.write.most(deadline - time.monotonic()))
        fresh = [e.key for e in dirty if e.resource_version is None]
        written = await self._spread([partial(self._write_edge, key) for key in fresh], deadline)
        groups = [g for g in self.topology.groups.values() if not g.exists and not self._waiting(g)]
        written += await self._spread([partial(self._make_group, g) for g in groups], deadline)
        written += await self._spread([partial(self._write_edge, e.key) for e in dirty[len(fresh):]], deadline)
        groups = [g for g in self.topology.groups.values() if g.exists and not self._waiting(g) and (
            g.last_seen - g.written_last_seen >= GROUP_REFRESH
            or g.overflow != g.written_overflow
            or g.peer.group in self.topology.modes.changed_groups
            or objects.facts(self.topology.said(g)) != g.written_said)]
        written += await self._spread([partial(self._renew_group, g) for g in groups], deadline)
        metrics.DIRTY_OBJECTS.set(len(self.topology.ledger.dirty()))
        return written

    async def _spread(self, steps: Iterable[Callable[[], Awaitable[bool]]], deadline: float) -> int:
        """Run write steps, up to IN_FLIGHT at once, none started after ``deadline``; how many wrote."""
        slots, written = asyncio.Semaphore(IN_FLIGHT), 0
        if time.monotonic() >= deadline:
            return 0

        async def one(step: Callable[[], Awaitable[bool]]) -> None:
            nonlocal written
            try:
                done = await self.guard(step())
                written += done  # not ``written += await``: that reads the sum before the wait
            finally:
                slots.release()

        async with asyncio.TaskGroup() as tasks:
            for step in steps:
                await slots.acquire()
                if time.monotonic() >= deadline:
                    slots.release()
                    break
                tasks.create_task(one(step))
        return written

    async def collect(self, now: float, connection_ttl: float, group_ttl: float) -> int:
        """Delete Connections idle past their TTL, and Groups whose workload is gone past theirs."""
        deleted = 0
        for key, resource_version in self.topology.idle_edges(now, connection_ttl):
            deleted += await self.guard(self._delete("connections", self.topology.edges[key].name, resource_version))
            self.topology.forget(key)
        for name in self.topology.gone_groups(now, group_ttl):
            deleted += await self.guard(self._delete("groups", name, None))
            del self.topology.groups[name]
            self.refused.pop(name, None)
        return deleted

    async def _delete(self, plural: str, name: str, resource_version: str | None) -> bool:
        # The precondition makes sure nothing written since we looked is deleted.
        body = {"preconditions": {"resourceVersion": resource_version}} if resource_version else None
        try:  # the client takes a plain dict (and None, the default) for body; its stub says V1DeleteOptions
            await self.write(plural[:-1], "delete", self.api.delete_cluster_custom_object(
                GROUP, VERSION, plural, name, body=body))  # type: ignore[arg-type]
        except NotFound:
            pass
        return True

    async def guard(self, step: Awaitable[bool]) -> int:
        """Run one write step; a refusal or an unreachable API server is logged, and 0 returned."""
        try:
            return int(await step)
        except ApiError as exc:
            log.warning("API write not done: %s", exc)
            if isinstance(exc, Throttled):
                await asyncio.sleep(1.0)
            elif isinstance(exc, InDoubt):  # a 5xx, or no answer at all
                await asyncio.sleep(0.5)
        return 0

    # -- Groups ---------------------------------------------------------------------------------

    def _waiting(self, group: GroupInfo) -> bool:
        refusal = self.refused.get(group.peer.group)
        return refusal is not None and time.monotonic() < refusal.retry_at

    async def _make_group(self, group: GroupInfo) -> bool:
        return await self._group_write(group, self._create_group(group))

    async def _renew_group(self, group: GroupInfo) -> bool:
        return await self._group_write(group, self._refresh_group(group))

    async def _group_write(self, group: GroupInfo, step: Awaitable[bool]) -> bool:
        """One write of a Group (``step``); a refusal of what was written (the schema, a policy of
        the cluster) is said on the Group and waited out with backoff before the next try."""
        name = group.peer.group
        try:
            done = await step
        except Rejected as exc:
            refusal = self.refused.setdefault(name, Refusal())
            refusal.retry_at = time.monotonic() + refusal.backoff.next()
            await self._say_refused(group, refusal, exc)
            raise
        self.refused.pop(name, None)
        return done

    async def _say_refused(self, group: GroupInfo, refusal: Refusal, exc: Rejected) -> None:
        """The refusal as a condition, alone in a status patch (what was refused is not in it); once
        per distinct answer, not at every retry."""
        said = f"the API server refused this Group's status ({exc.status}): {exc.message}"
        if not group.exists or said == refusal.said:
            return
        refusal.said = said
        written = objects.refused_conditions(group, said, RETRY_MAX, time.time())
        try:
            await self.write("group", "status", self.api.patch_cluster_custom_object_status(
                GROUP, VERSION, "groups", group.peer.group, {"status": {"conditions": written}},
                _content_type=MERGE, field_manager=FIELD_MANAGER))  # type: ignore[call-arg]  # not in the stub
        except ApiError as refused:
            log.warning("Group %s: its refusal could not be said either: %s", group.peer.group, refused)
            return
        group.conditions = {c["type"]: c for c in written}

    async def _create_group(self, group: GroupInfo) -> bool:
        try:
            made = await self.write("group", "create", self.api.create_cluster_custom_object(
                GROUP, VERSION, "groups", objects.group_body(group.peer), field_manager=FIELD_MANAGER))
            group.generation = int(made["metadata"].get("generation") or 0)  # its first status says it observed it
        except Conflict:
            pass  # made by a previous leader, or before a crash: the watch tells its generation
        group.exists = True
        await self._refresh_group(group)
        return True

    async def _refresh_group(self, group: GroupInfo) -> bool:
        name = group.peer.group
        if group.peer.kind == "Workload" and not group.peer.workload_kind:
            # Read back from a Group without status: the pods know better.
            group.peer = self.topology.resolver.workload_peer(name) or group.peer
        status, said = objects.group_status(self.topology, group, time.time())
        self.topology.modes.changed_groups.discard(name)
        try:
            await self.write("group", "status", self.api.patch_cluster_custom_object_status(
                # _content_type: the client takes it, its stub does not list it
                GROUP, VERSION, "groups", name, {"status": status}, _content_type=MERGE,  # type: ignore[call-arg]
                field_manager=FIELD_MANAGER))
        except NotFound:
            group.exists, group.conditions, group.written_said = False, {}, ()  # deleted: created at the next round
            return False
        group.written_last_seen, group.written_overflow = group.last_seen, group.overflow
        group.conditions, group.written_said = {c["type"]: c for c in status["conditions"] or []}, objects.facts(said)
        return True

    # -- Connections ----------------------------------------------------------------------------

    async def _write_edge(self, key: EdgeKey) -> bool:
        ledger, info = self.topology.ledger, self.topology.edges[key]
        edge = ledger.edges[key]
        if edge.in_doubt is not None:
            await self._reread(key)
            if edge.dirty_since is None:
                return False
        if edge.resource_version is None:
            await self._create_connection(key)
        plan = ledger.plan(key)
        body = objects.connection_body(key, info.name, resource_version=edge.resource_version,
                                       status=objects.connection_status(plan, info))
        started = time.monotonic()
        try:
            result = await self.write("connection", "status", self.api.replace_cluster_custom_object_status(
                GROUP, VERSION, "connections", info.name, body, field_manager=FIELD_MANAGER))
        except Conflict:
            metrics.API_CONFLICTS.inc()
            await self._reread(key)
            return False
        except NotFound:
            ledger.vanished(key)
            return False
        except (InDoubt, Throttled):
            ledger.in_doubt(plan)  # a 5xx (or a 429) after the request was sent says nothing about etcd
            raise
        ledger.written(plan, result["metadata"]["resourceVersion"])
        metrics.FLUSH_SECONDS.observe(time.monotonic() - started)
        return True

    async def _create_connection(self, key: EdgeKey) -> None:
        body = objects.connection_body(key, self.topology.edges[key].name, objects.connection_labels(self.topology, key))
        try:
            created = await self.write("connection", "create", self.api.create_cluster_custom_object(
                GROUP, VERSION, "connections", body, field_manager=FIELD_MANAGER))
        except Conflict:
            await self._reread(key)  # created by a previous leader, or before a crash
            return
        self.topology.ledger.created(key, created["metadata"]["resourceVersion"])

    async def _reread(self, key: EdgeKey) -> None:
        info = self.topology.edges[key]
        try:
            obj = await call(self.api.get_cluster_custom_object(GROUP, VERSION, "connections", info.name))
        except NotFound:
            self.topology.ledger.vanished(key)
            return
        read = objects.read_connection(obj)
        if read.key != key:
            # Two edges whose readable names collide: this one takes the hashed form of its name.
            log.warning("Connection %s already names another edge %s", info.name, read.key)
            info.name = object_name(f"{info.name}#{key}")
            self.topology.ledger.unmade(key)
            return
        self.topology.ledger.load(key, read.counters, read.watermarks, read.resource_version)
