"""The pods of this node, from a watch on the API server (``spec.nodeName`` field selector), with
the secondary (Multus) addresses their annotations claim; the ones the kernel confirms
(flowmap_agent.plumbing.secondary_interfaces) are named after the pod too (:meth:`LocalPods.confirm`)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from typing import Any

import aiohttp
from kubernetes_asyncio import client, watch
from kubernetes_asyncio.client.exceptions import ApiException

from flowmap_api import networks
from flowmap_api.pacing import Backoff, pause

log = logging.getLogger("flowmap.agent.pods")


class LocalPods:
    """IP -> "namespace/name" for this node's pods with their own network (hostNetwork pods are the
    node): their status.podIPs, and the secondary addresses confirmed last."""

    def __init__(self, core: client.CoreV1Api, node: str) -> None:
        self.core, self.node = core, node
        self.by_ip: dict[str, str] = {}
        self._ips: dict[str, list[str]] = {}  # "namespace/name" -> its IPs
        self._claims: dict[str, tuple[str, ...]] = {}  # "namespace/name" -> the secondary addresses it claims
        self.secondary: dict[str, str] = {}  # confirmed secondary address -> "namespace/name"
        self.synced = asyncio.Event()

    def _seen(self, pod: Any) -> None:
        key = f"{pod.metadata.namespace}/{pod.metadata.name}"
        status = pod.status
        if pod.spec.host_network or status is None or status.phase in ("Succeeded", "Failed"):
            self._gone(key)
            return
        for ip in self._ips.pop(key, []):
            if self.by_ip.get(ip) == key:
                del self.by_ip[ip]
        ips = [p.ip for p in status.pod_ips or [] if p.ip] or ([status.pod_ip] if status.pod_ip else [])
        self._ips[key] = ips
        for ip in ips:
            self.by_ip[ip] = key
            self.secondary.pop(ip, None)  # a podIP is its pod's, whoever claimed it
        try:
            claims = networks.claimed(pod.metadata.annotations)
        except networks.BadAnnotation as exc:
            log.warning("pod %s: %s unread: %s", key, networks.NETWORK_STATUS, exc)
            claims = ()
        if claims:
            self._claims[key] = claims
        else:
            self._claims.pop(key, None)
        # Its confirmed addresses stay while it claims them (a pod's updates are frequent: they are
        # not dropped until the next plan); one it no longer claims goes now.
        self._unconfirm(key, keep=claims)

    def _gone(self, key: str) -> None:
        for ip in self._ips.pop(key, []):
            if self.by_ip.get(ip) == key:
                del self.by_ip[ip]
        self._claims.pop(key, None)
        self._unconfirm(key)

    def _unconfirm(self, key: str, keep: tuple[str, ...] = ()) -> None:
        for ip in [ip for ip, pod in self.secondary.items() if pod == key and ip not in keep]:
            del self.secondary[ip]
            if self.by_ip.get(ip) == key:
                del self.by_ip[ip]

    def primary_ips(self) -> list[str]:
        """The status.podIPs of the node's pods."""
        return [ip for ips in self._ips.values() for ip in ips]

    def claims(self) -> dict[str, tuple[list[str], tuple[str, ...]]]:
        """Pod -> (its status.podIPs, the secondary addresses its annotation claims), for the pods
        that claim any (the plan confirms them: flowmap_agent.plumbing.secondary_interfaces)."""
        return {key: (self._ips.get(key, []), claims) for key, claims in self._claims.items()}

    def confirm(self, secondary: Mapping[str, tuple[str, str]]) -> None:
        """The secondary addresses the kernel confirms now (address -> (interface, pod)) are the
        pods' from now on; those it no longer does are not."""
        for ip, pod in list(self.secondary.items()):
            if secondary.get(ip, ("", ""))[1] != pod:
                del self.secondary[ip]
                if self.by_ip.get(ip) == pod:
                    del self.by_ip[ip]
        for ip, (_, pod) in secondary.items():
            if pod in self._claims and ip not in self.by_ip:  # a podIP is never taken over
                self.secondary[ip] = self.by_ip[ip] = pod

    async def run(self, stop: asyncio.Event) -> None:
        """List, then watch from that resourceVersion; on any break, list again (with backoff)."""
        selector = f"spec.nodeName={self.node}"
        backoff = Backoff(0.5, 30.0)
        while not stop.is_set():
            try:
                listed = await self.core.list_pod_for_all_namespaces(field_selector=selector)
                self.by_ip.clear()
                self._ips.clear()
                self._claims.clear()
                self.secondary.clear()
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
