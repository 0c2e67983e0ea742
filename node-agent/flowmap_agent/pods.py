"""The pods of this node, from a watch on the API server (``spec.nodeName`` field selector)."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import aiohttp
from kubernetes_asyncio import client, watch
from kubernetes_asyncio.client.exceptions import ApiException

from flowmap_api.pacing import Backoff, pause

log = logging.getLogger("flowmap.agent.pods")


class LocalPods:
    """IP -> "namespace/name" for this node's pods with their own network (hostNetwork pods are the node)."""

    def __init__(self, core: client.CoreV1Api, node: str) -> None:
        self.core, self.node = core, node
        self.by_ip: dict[str, str] = {}
        self._ips: dict[str, list[str]] = {}  # "namespace/name" -> its IPs
        self.synced = asyncio.Event()

    def _seen(self, pod: Any) -> None:
        key = f"{pod.metadata.namespace}/{pod.metadata.name}"
        self._gone(key)
        status = pod.status
        if pod.spec.host_network or status is None or status.phase in ("Succeeded", "Failed"):
            return
        ips = [p.ip for p in status.pod_ips or [] if p.ip] or ([status.pod_ip] if status.pod_ip else [])
        self._ips[key] = ips
        for ip in ips:
            self.by_ip[ip] = key

    def _gone(self, key: str) -> None:
        for ip in self._ips.pop(key, []):
            if self.by_ip.get(ip) == key:
                del self.by_ip[ip]

    async def run(self, stop: asyncio.Event) -> None:
        """List, then watch from that resourceVersion; on any break, list again (with backoff)."""
        selector = f"spec.nodeName={self.node}"
        backoff = Backoff(0.5, 30.0)
        while not stop.is_set():
            try:
                listed = await self.core.list_pod_for_all_namespaces(field_selector=selector)
                self.by_ip.clear()
                self._ips.clear()
                for pod in listed.items:
                    self._seen(pod)
                self.synced.set()
                backoff.reset()
                async with watch.Watch().stream(self.core.list_pod_for_all_namespaces, field_selector=selector,
                                                resource_version=listed.metadata.resource_version,
                                                timeout_seconds=300) as stream:
                    async for event in stream:
                        pod = event["object"]
                        if event["type"] == "DELETED":
                            self._gone(f"{pod.metadata.namespace}/{pod.metadata.name}")
                        else:
                            self._seen(pod)
                        if stop.is_set():
                            return
            except (ApiException, aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
                log.warning("pod watch broke (%s); listing again in %.1f s", exc, backoff.current)
            except Exception:  # noqa: BLE001 - a bug here must show, and must not end the watch
                log.exception("pod watch failed; listing again in %.1f s", backoff.current)
            await pause(stop, backoff.next())
