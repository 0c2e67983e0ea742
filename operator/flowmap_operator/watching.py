"""A watch on a resource the cluster may not serve: KubeVirt's VirtualMachineInstances.

flowmap runs on clusters with KubeVirt and without, and KubeVirt may be installed after flowmap.
kopf reads which resources exist once, at its start (its scanning is off: that would need the
right to read every CRD), so this watch is the operator's own, with nothing but get/list/watch on
the resource itself:

* it lists the objects, a page at a time, and feeds the whole list (what is no longer listed is
  gone), then watches from that list's resourceVersion, feeding each event, and watches again
  from the last one it saw when the server ends the watch (``timeout`` seconds);
* while the resource is not served (404: no CRD) it asks again every ``poll`` seconds, one
  request that answers 404, and says so once in the log, not at every ask;
* when it stops being served (KubeVirt uninstalled), what it fed is forgotten;
* a watch that expired (410 Gone), broke or sent a line it cannot read starts over with a list;
  the API server away or refusing (403: the grant missing): a warning, once for the same error,
  then the same with backoff (at most ``most`` s); a refusal never stops the operator's start.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable
from typing import Any

from kubernetes_asyncio.client import CustomObjectsApi

from flowmap_api.pacing import Backoff, pause
from flowmap_operator.errors import ApiError, Expired, NotFound, Rejected
from flowmap_operator.kubeapi import PAGE, by_status, call

log = logging.getLogger("flowmap.operator")
Obj = dict[str, Any]


class OptionalWatch:
    def __init__(self, api: CustomObjectsApi, group: str, version: str, plural: str, *,
                 listed: Callable[[list[Obj]], None], seen: Callable[[Obj], None], gone: Callable[[Obj], None],
                 forgotten: Callable[[], None], poll: float = 30.0, timeout: int = 300, most: float = 60.0) -> None:
        self.api, self.group, self.version, self.plural = api, group, version, plural
        self.listed, self.seen, self.gone, self.forgotten = listed, seen, gone, forgotten
        self.poll, self.timeout, self.most = poll, timeout, most
        self.served: bool | None = None  # None: not asked yet
        self.error = ""  # the last failure warned of, until a list works
        self.resource_version = ""  # where the watch goes on from; "": list first

    @property
    def what(self) -> str:
        return f"{self.plural}.{self.group}/{self.version}"

    async def prime(self) -> None:
        """One list, before the operator serves: the objects fed, or the resource known not served.
        A refusal (403: the ClusterRole lacks the grant) does not stop the start: ``keep`` asks again."""
        try:
            await self._list()
        except NotFound:
            self._absent()
        except Rejected as exc:
            self._failed(exc)

    async def keep(self, stop: asyncio.Event) -> None:
        """List and watch until ``stop``; across the resource coming and going."""
        backoff = Backoff(min(1.0, self.most), self.most)
        while not stop.is_set():
            try:
                if not self.resource_version:
                    await self._list()
                await self._watch()
                backoff.reset()
            except NotFound:
                self._absent()
                await pause(stop, self.poll)
            except Expired:
                self.resource_version = ""  # etcd compacted past it: a fresh list
            except (ApiError, ValueError) as exc:  # ValueError: a line aiohttp or JSON cannot read
                self._failed(exc)
                await pause(stop, backoff.next())

    def _failed(self, exc: Exception) -> None:
        """A warning, the same one once until another comes or the watch works; then a fresh list."""
        if str(exc) != self.error:
            log.warning("watching %s: %s; listing again after waits doubling up to %g s", self.what, exc,
                        self.most)
        self.error, self.resource_version = str(exc), ""

    def _absent(self) -> None:
        if self.served is not False:
            log.info("%s is not served (its CRD is not installed): asking again every %.0f s", self.what, self.poll)
            if self.served:
                self.forgotten()
        self.served, self.resource_version = False, ""

    async def _list(self) -> None:
        items: list[Obj] = []
        token = ""
        while True:
            found = await call(self.api.list_cluster_custom_object(self.group, self.version, self.plural, limit=PAGE,
                                                                   _continue=token))
            items += found.get("items") or []
            meta = found.get("metadata") or {}
            token = meta.get("continue") or ""
            if not token:
                break
        if not self.served:
            log.info("%s is served: %d listed, watching", self.what, len(items))
        self.served, self.error = True, ""
        self.listed(items)
        self.resource_version = meta.get("resourceVersion") or ""

    async def _watch(self) -> None:
        response = await call(self.api.list_cluster_custom_object(
            self.group, self.version, self.plural, watch=True, allow_watch_bookmarks=True,
            resource_version=self.resource_version, timeout_seconds=self.timeout, _preload_content=False))
        try:
            while True:
                line = await call(response.content.readline())
                if not line:
                    return  # the server ended it: watch again from the last resourceVersion
                event = json.loads(line)
                kind, obj = event.get("type"), event.get("object") or {}
                if kind == "ERROR":
                    code = obj.get("code")
                    raise by_status(code if isinstance(code, int) else None, str(obj.get("message", "")))
                if kind in ("ADDED", "MODIFIED"):
                    self.seen(obj)
                elif kind == "DELETED":
                    self.gone(obj)
                self.resource_version = (obj.get("metadata") or {}).get("resourceVersion") or self.resource_version
        finally:
            response.release()
