"""Coalesced, budgeted writes of Groups and Connections, and the rebuild from them on start.

Every write, of any kind, takes a token from one bucket filled at ``write_budget`` per second.
New Connections go first (a new edge should show within seconds), then the longest-dirty ones.
A Connection's counters and watermarks travel in one status update guarded by resourceVersion;
a conflict re-reads the object, an update of unknown outcome is settled by re-reading too.

A Group the API server refuses (a status its schema does not allow) says so in a condition of its
own, written alone, and is tried again with backoff, not at every round. A Group someone deleted
is created again (the watch says so, or the next write's 404).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
from kubernetes_asyncio.client import CustomObjectsApi
from kubernetes_asyncio.client.exceptions import ApiException

from flowmap_operator import metrics
from flowmap_operator.conditions import Said, conditions
from flowmap_operator.ledger import Counters, EdgeKey, FlushPlan, watermarks_from_status, watermarks_to_status
from flowmap_operator.resolution import Peer
from flowmap_operator.naming import object_name
from flowmap_operator.policy import iso, parse_iso
from flowmap_operator.topology import EdgeInfo, GroupInfo, Topology

log = logging.getLogger("flowmap.operator.writing")
GROUP, VERSION = "flowmap.dev", "v1alpha1"
MERGE = "application/merge-patch+json"
FIELD_MANAGER = "flowmap-operator"  # one stable manager for everything the operator writes
GROUP_REFRESH = 60.0  # seconds between lastSeen refreshes of a Group: it is not worth the budget
RETRY_FIRST, RETRY_MAX = 1.0, 300.0  # seconds before writing a refused object again: doubling, up to this


def backoff(refusals: int) -> float:
    """Seconds to wait after the ``refusals``-th refusal in a row of the same write."""
    return min(RETRY_MAX, RETRY_FIRST * 2.0 ** max(0, refusals - 1))


@dataclass
class Refusal:
    """A Group's writes the API server refuses: how often in a row, until when to wait, and what it said."""

    count: int = 0
    retry_at: float = 0.0  # monotonic
    said: str = ""  # the message the Group's condition carries


def connection_status(plan: FlushPlan, info: EdgeInfo) -> dict[str, Any]:
    c = plan.counters
    apps = sorted(info.apps)
    status: dict[str, Any] = {
        "app": info.app,
        "applications": apps,
        "bytes": {"clientToServer": c.bytes_c2s, "serverToClient": c.bytes_s2c, "total": c.bytes_c2s + c.bytes_s2c},
        "packets": {"clientToServer": c.packets_c2s, "serverToClient": c.packets_s2c},
        "sessions": {"total": c.sessions, "active": sum(info.active.values())},
        "action": info.action,
        "observers": watermarks_to_status(plan.watermarks),
    }
    if info.first_seen:
        status["firstSeen"] = iso(info.first_seen)
    if info.last_seen:
        status["lastSeen"] = iso(info.last_seen)
    if info.service:
        status["service"] = info.service
    if info.policy:
        status["policy"] = f"{info.policy[0]}/{info.policy[1]}"
    if info.threats:
        status["threats"] = {"count": info.threats, "examples": list(info.threat_examples)}
    return status


def _facts(said: list[Said]) -> tuple[tuple[str, bool, str], ...]:
    """What a change of is worth a write: the conditions but their messages (counts in them change often)."""
    return tuple((kind, holds, reason) for kind, holds, reason, _ in said)


def _api_message(exc: ApiException) -> str:
    """The API server's own words (its Status message), else the HTTP reason."""
    try:
        return str(json.loads(exc.body or "{}").get("message") or exc.reason)
    except (ValueError, AttributeError):
        return str(exc.reason)


class Bucket:
    """A token bucket without bursts: writes spaced ``1/rate`` apart, so that no window of the API
    server's sees more than ``rate`` per second (plus the one write an idle bucket holds)."""

    def __init__(self, rate: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.rate, self.clock = rate, clock
        self.tokens, self.stamp = min(rate, 1.0), clock()

    async def take(self) -> None:
        while True:
            now = self.clock()
            self.tokens = min(1.0, self.tokens + (now - self.stamp) * self.rate)
            self.stamp = now
            if self.tokens >= 1.0:
                self.tokens -= 1.0
                return
            await asyncio.sleep((1.0 - self.tokens) / self.rate)


class Writer:
    def __init__(self, api: CustomObjectsApi, topology: Topology, bucket: Bucket) -> None:
        self.api, self.topology, self.bucket = api, topology, bucket
        self.refused: dict[str, Refusal] = {}  # Group name -> its refused writes

    async def call(self, kind: str, verb: str, coro: Any) -> Any:
        """One API write, once the budget allows it, counted by outcome."""
        await self.bucket.take()
        started = time.monotonic()
        try:
            result = await coro
        except ApiException as exc:
            metrics.API_WRITES.labels(kind, verb, str(exc.status)).inc()
            if exc.status == 429:
                metrics.API_THROTTLED.inc()
            raise
        except (aiohttp.ClientError, asyncio.TimeoutError):
            metrics.API_WRITES.labels(kind, verb, "error").inc()
            raise
        metrics.API_WRITES.labels(kind, verb, "ok").inc()
        metrics.API_WRITE_SECONDS.observe(time.monotonic() - started)
        return result

    # -- start: rebuild from the API --------------------------------------------------------------

    async def load(self) -> None:
        """Rebuild counters, watermarks and groups from the objects (the only store)."""
        conns = await self.api.list_cluster_custom_object(GROUP, VERSION, "connections")
        for obj in conns.get("items", []):
            spec, status = obj.get("spec", {}), obj.get("status") or {}
            key: EdgeKey = (spec["client"], spec["server"], int(spec["port"]), spec["protocol"])
            self._load_edge(key, obj)
            info = self.topology.edge(key)
            info.name = obj["metadata"]["name"]
            info.apps.update(status.get("applications") or [])
            info.service = status.get("service", "")
            info.first_seen = parse_iso(status.get("firstSeen"))
            info.last_seen = parse_iso(status.get("lastSeen"))
            info.threats = int((status.get("threats") or {}).get("count", 0))
            info.action = status.get("action") or info.action
            if "/" in status.get("policy", ""):
                namespace, name = status["policy"].split("/", 1)
                info.policy = (namespace, name)
            self.topology.ports.setdefault((key[0], key[1], key[3]), set()).add(key[2])
        groups = await self.api.list_cluster_custom_object(GROUP, VERSION, "groups")
        started = time.time()
        for obj in groups.get("items", []):
            # Pods deleted before the cluster was read (the previous operator's own) are known only
            # here: batches resent after the restart still name them.
            self.topology.resolver.group_members_seen(obj, started)
            status = obj.get("status") or {}
            name = obj["metadata"]["name"]
            wl = status.get("workload") or {}
            members = status.get("members") or []
            kind = status.get("kind") or ("CIDR" if (obj.get("spec") or {}).get("cidrs") else "Workload")
            fqdn = members[0].get("name", "") if kind == "FQDN" and members else ""
            peer = Peer(name, kind, status.get("namespace", ""), wl.get("kind", ""), wl.get("name", ""), fqdn)
            group = self.topology.groups.setdefault(name, GroupInfo(peer))
            if status.get("mode"):
                self.topology.modes.prior[name] = status["mode"]
            for member in members if fqdn else ():
                # What agents saw this name resolve to holds a grace period after we start: Protect
                # keeps allowing it until agents see the name again.
                for ip in member.get("ips") or []:
                    self.topology.resolver.learn_name(ip, member.get("name", ""), 0, parse_iso(status.get("lastSeen")))
            group.exists = True
            group.user_defined = bool((obj.get("spec") or {}).get("cidrs"))
            group.generation = int(obj["metadata"].get("generation") or 0)
            group.conditions = {c["type"]: c for c in status.get("conditions") or [] if isinstance(c, dict) and "type" in c}
            group.written_said = tuple((c["type"], c.get("status") == "True", c.get("reason", ""))
                                       for c in group.conditions.values())
            group.written_last_seen = group.last_seen = max(group.last_seen, parse_iso(status.get("lastSeen")))
        log.info("loaded %d connections and %d groups", len(self.topology.edges), len(self.topology.groups))

    def _load_edge(self, key: EdgeKey, obj: dict[str, Any]) -> None:
        status = obj.get("status") or {}
        b, p, s = status.get("bytes") or {}, status.get("packets") or {}, status.get("sessions") or {}
        counters = Counters(int(b.get("clientToServer", 0)), int(b.get("serverToClient", 0)),
                            int(p.get("clientToServer", 0)), int(p.get("serverToClient", 0)), int(s.get("total", 0)))
        self.topology.ledger.load(key, counters, watermarks_from_status(status), obj["metadata"]["resourceVersion"])

    # -- a flush round --------------------------------------------------------------------------

    async def flush(self, deadline: float) -> int:
        """Write dirty objects until ``deadline`` (monotonic); return how many were written."""
        written = 0
        dirty = self.topology.ledger.dirty()
        # New Connections first (a new edge must show fast), then the Groups they name, then the
        # counter refreshes, longest-dirty first.
        fresh = [e for e in dirty if e.resource_version is None]
        for edge in fresh:
            if time.monotonic() >= deadline:
                return written
            written += await self.guard(self._write_edge(edge.key))
        for group in [g for g in self.topology.groups.values() if not g.exists and not self._waiting(g)]:
            if time.monotonic() >= deadline:
                return written
            written += await self.guard(self._group_write(group, self._create_group(group)))
        for edge in dirty[len(fresh):]:
            if time.monotonic() >= deadline:
                break
            written += await self.guard(self._write_edge(edge.key))
        for group in list(self.topology.groups.values()):
            if time.monotonic() >= deadline:
                break
            if group.exists and not self._waiting(group) and (
                    group.last_seen - group.written_last_seen >= GROUP_REFRESH
                    or group.overflow != group.written_overflow
                    or group.peer.group in self.topology.modes.changed_groups
                    or _facts(self.topology.said(group)) != group.written_said):
                written += await self.guard(self._group_write(group, self._refresh_group(group)))
        metrics.DIRTY_OBJECTS.set(len(self.topology.ledger.dirty()))
        return written

    async def collect(self, now: float, connection_ttl: float, group_ttl: float) -> int:
        """Delete Connections idle past their TTL, and Groups whose workload is gone past theirs."""
        deleted = 0
        for key, info in list(self.topology.edges.items()):
            edge = self.topology.ledger.edges.get(key)
            if edge is None or edge.dirty_since is not None or edge.resource_version is None:
                continue
            if info.last_seen and now - info.last_seen > connection_ttl:
                deleted += await self.guard(self._delete("connections", info.name, edge.resource_version))
                self.topology.forget(key)
        referenced = {name for key in self.topology.edges for name in (key[0], key[1])}
        for name, group in list(self.topology.groups.items()):
            if group.user_defined or not group.exists:
                continue
            if group.peer.kind == "Workload":
                if self.topology.resolver.members(name, 0)[1]:
                    group.empty_since = None
                    continue
                group.empty_since = group.empty_since or now
                gone = now - group.empty_since > group_ttl
            else:
                gone = name not in referenced and now - group.last_seen > group_ttl
            if gone:
                deleted += await self.guard(self._delete("groups", name, None))
                del self.topology.groups[name]
                self.refused.pop(name, None)
        return deleted

    async def _delete(self, plural: str, name: str, resource_version: str | None) -> bool:
        # The precondition makes sure nothing written since we looked is deleted.
        body = {"preconditions": {"resourceVersion": resource_version}} if resource_version else None
        try:  # the client takes a plain dict (and None, the default) for body; its stub says V1DeleteOptions
            await self.call(plural[:-1], "delete", self.api.delete_cluster_custom_object(
                GROUP, VERSION, plural, name, body=body))  # type: ignore[arg-type]
        except ApiException as exc:
            if exc.status != 404:
                raise
        return True

    async def guard(self, coro: Any) -> int:
        """Run one write step; a refusal or an unreachable API server is logged, and 0 returned."""
        try:
            return int(await coro)
        except ApiException as exc:
            log.warning("API write refused: %s %s", exc.status, exc.reason)
            if exc.status == 429:
                await asyncio.sleep(1.0)
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
            log.warning("API unreachable: %s", exc)
            await asyncio.sleep(0.5)
        return 0

    def _waiting(self, group: GroupInfo) -> bool:
        refusal = self.refused.get(group.peer.group)
        return refusal is not None and time.monotonic() < refusal.retry_at

    async def _group_write(self, group: GroupInfo, step: Any) -> bool:
        """One write of a Group (``step``); a refusal of what was written (4xx: the schema, a policy
        of the cluster) is said on the Group and waited out with backoff before the next try."""
        name = group.peer.group
        try:
            done = bool(await step)
        except ApiException as exc:
            if exc.status is None or not 400 <= exc.status < 500 or exc.status in (404, 409, 429):
                raise
            refusal = self.refused.setdefault(name, Refusal())
            refusal.count += 1
            refusal.retry_at = time.monotonic() + backoff(refusal.count)
            await self._say_refused(group, refusal, exc)
            raise
        self.refused.pop(name, None)
        return done

    async def _say_refused(self, group: GroupInfo, refusal: Refusal, exc: ApiException) -> None:
        """The refusal as a condition, alone in a status patch (what was refused is not in it); once
        per distinct answer, not at every retry."""
        said = f"the API server refused this Group's status ({exc.status}): {_api_message(exc)}"
        if not group.exists or said == refusal.said:
            return
        refusal.said = said
        written = conditions([*((c["type"], c.get("status") == "True", c.get("reason", ""), c.get("message", ""))
                                for c in group.conditions.values() if c["type"] != "StatusWritten"),
                              ("StatusWritten", False, "RefusedByAPIServer",
                               f"{said}; it is written again with backoff, at most every {RETRY_MAX:.0f} s")],
                             group.conditions, time.time(), group.generation or None)
        try:
            await self.call("group", "status", self.api.patch_cluster_custom_object_status(
                GROUP, VERSION, "groups", group.peer.group, {"status": {"conditions": written}},
                _content_type=MERGE, field_manager=FIELD_MANAGER))  # type: ignore[call-arg]  # not in the stub
        except ApiException as refused:
            log.warning("Group %s: its refusal could not be said either: %s %s", group.peer.group, refused.status,
                        refused.reason)
            return
        group.conditions = {c["type"]: c for c in written}

    async def _create_group(self, group: GroupInfo) -> bool:
        peer = group.peer
        body: dict[str, Any] = {"apiVersion": f"{GROUP}/{VERSION}", "kind": "Group",
                                "metadata": {"name": peer.group, "labels": {"flowmap.dev/kind": peer.kind.lower()}}}
        if peer.namespace:
            body["metadata"]["labels"]["flowmap.dev/namespace"] = peer.namespace
        try:
            await self.call("group", "create", self.api.create_cluster_custom_object(GROUP, VERSION, "groups", body,
                                                                            field_manager=FIELD_MANAGER))
        except ApiException as exc:
            if exc.status != 409:
                raise
        group.exists = True
        await self._refresh_group(group)
        return True

    async def _refresh_group(self, group: GroupInfo) -> bool:
        peer, modes = group.peer, self.topology.modes
        status: dict[str, Any] = {"kind": peer.kind, "lastSeen": iso(group.last_seen or time.time())}
        if peer.namespace:
            status["namespace"] = peer.namespace
        if peer.kind == "Workload":
            if not peer.workload_kind:  # read back from a Group without status: the pods know better
                peer = group.peer = self.topology.resolver.workload_peer(peer.group) or peer
            if peer.workload_kind:  # else not said yet (a merge patch keeps what is there)
                status["workload"] = {"kind": peer.workload_kind, "name": peer.workload}
            members, count = self.topology.resolver.members(peer.group, 32)
            status["members"], status["memberCount"] = members, count
            status["mode"], by = modes.mode(peer.group)
            status["policy"] = f"{by[0]}/{by[1]}" if by else None
        elif peer.kind == "FQDN":
            ips = self.topology.resolver.fqdn_addresses(peer.group, time.time())
            status["members"] = [{"name": peer.member or peer.group, "ips": ips[i:i + 4]}
                                 for i in range(0, min(len(ips), 128), 4)]
            status["memberCount"] = len(ips)
        said = self.topology.said(group)
        written = conditions(said, group.conditions, time.time(), group.generation or None)
        status["conditions"] = written or None
        modes.changed_groups.discard(peer.group)
        try:
            await self.call("group", "status", self.api.patch_cluster_custom_object_status(
                # _content_type: the client takes it, its stub does not list it
                GROUP, VERSION, "groups", peer.group, {"status": status}, _content_type=MERGE,  # type: ignore[call-arg]
                field_manager=FIELD_MANAGER))
        except ApiException as exc:
            if exc.status != 404:
                raise
            group.exists, group.conditions, group.written_said = False, {}, ()  # deleted: created at the next round
            return False
        group.written_last_seen, group.written_overflow = group.last_seen, group.overflow
        group.conditions, group.written_said = {c["type"]: c for c in written}, _facts(said)
        return True

    async def _write_edge(self, key: EdgeKey) -> bool:
        ledger, info = self.topology.ledger, self.topology.edges[key]
        edge = ledger.edges[key]
        if edge.in_doubt is not None:
            await self._reread(key, info)
            if edge.dirty_since is None:
                return False
        if edge.resource_version is None:
            await self._create_connection(key, info)
        plan = ledger.plan(key)
        body = {"apiVersion": f"{GROUP}/{VERSION}", "kind": "Connection",
                "metadata": {"name": info.name, "resourceVersion": edge.resource_version},
                "spec": {"client": key[0], "server": key[1], "port": key[2], "protocol": key[3]},
                "status": connection_status(plan, info)}
        started = time.monotonic()
        try:
            result = await self.call("connection", "status", self.api.replace_cluster_custom_object_status(
                GROUP, VERSION, "connections", info.name, body, field_manager=FIELD_MANAGER))
        except ApiException as exc:
            if exc.status == 409:
                metrics.API_CONFLICTS.inc()
                await self._reread(key, info)
                return False
            if exc.status == 404:
                ledger.load(key, Counters(), [], "")
                edge.resource_version = None
                return False
            if exc.status >= 500 or exc.status == 429:
                ledger.in_doubt(plan)  # a 5xx after the request was sent says nothing about etcd
            raise
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError):
            ledger.in_doubt(plan)
            raise
        ledger.written(plan, result["metadata"]["resourceVersion"])
        metrics.FLUSH_SECONDS.observe(time.monotonic() - started)
        return True

    async def _create_connection(self, key: EdgeKey, info: EdgeInfo) -> None:
        client_ns = self.topology.groups[key[0]].peer.namespace if key[0] in self.topology.groups else ""
        server_ns = self.topology.groups[key[1]].peer.namespace if key[1] in self.topology.groups else ""
        labels = {k: v for k, v in (("flowmap.dev/client-namespace", client_ns),
                                    ("flowmap.dev/server-namespace", server_ns)) if v}
        body = {"apiVersion": f"{GROUP}/{VERSION}", "kind": "Connection",
                "metadata": {"name": info.name, "labels": labels},
                "spec": {"client": key[0], "server": key[1], "port": key[2], "protocol": key[3]}}
        try:
            created = await self.call("connection", "create", self.api.create_cluster_custom_object(
                GROUP, VERSION, "connections", body, field_manager=FIELD_MANAGER))
        except ApiException as exc:
            if exc.status != 409:
                raise
            await self._reread(key, info)  # created by a previous leader, or before a crash
            return
        self.topology.ledger.edges[key].resource_version = created["metadata"]["resourceVersion"]

    async def _reread(self, key: EdgeKey, info: EdgeInfo) -> None:
        try:
            obj = await self.api.get_cluster_custom_object(GROUP, VERSION, "connections", info.name)
        except ApiException as exc:
            if exc.status != 404:
                raise
            self.topology.ledger.load(key, Counters(), [], "")
            self.topology.ledger.edges[key].resource_version = None
            return
        spec = obj.get("spec", {})
        if (spec.get("client"), spec.get("server"), spec.get("port"), spec.get("protocol")) != key:
            # Two edges whose readable names collide: this one takes the hashed form of its name.
            log.warning("Connection %s already names another edge %s", info.name, spec)
            info.name = object_name(f"{info.name}#{key}")
            self.topology.ledger.edges[key].resource_version = None
            return
        self._load_edge(key, obj)

