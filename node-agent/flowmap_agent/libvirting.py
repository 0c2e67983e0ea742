"""The node's libvirt VMs, followed live (``FLOWMAP_AGENT_LIBVIRT_URI``): the thin edge of
flowmap_agent.domains, over libvirt-python.

One thread holds the connection and libvirt's default event loop: it subscribes to the domains'
lifecycle events (defined, started, stopped, undefined ...) and to device added/removed (a NIC
hot-plugged or unplugged), then lists the running domains, so nothing between the two is missed.
An event only names its domain: after the loop returns, the domain's live XML is read again (not
inside libvirt's callback) and the VM's identity replaced or dropped, with the addresses libvirt's
lease source gives (read again at every relisting).

The connection is read-only (``virConnectOpenReadOnly``; on a node, the read-only socket
``/run/libvirt/libvirt-sock-ro`` is enough): the agent lists, reads and is told, and can change
nothing of a VM. What the rest of the agent
reads is :attr:`LibvirtVMs.vms`, a mapping replaced whole on each change, never mutated.

When libvirtd goes away (a restart, a crash), its VMs keep running and their taps keep carrying
traffic: the agent keeps the VMs it knew, so the dp keeps capturing on their taps, and connects
again with the one backoff (0.5 s to 30 s); connected, it lists again, which brings it up to
date with whatever changed meanwhile. Not quite at once: a libvirtd that starts reconnects to
its QEMU processes in the background, and one it finds dead is marked shut off without any
event (libvirt 9.0), so the running domains are also listed every ``resync`` seconds.

libvirt-python (the ``flowmap[libvirt]`` extra) is imported when the watch starts, not before:
an agent that follows no libvirt does not need it.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Mapping
from dataclasses import replace
from types import MappingProxyType
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge

from flowmap_agent.domains import DomainError, Vm, parse, reported
from flowmap_api.limits import MAX_NODE_VMS
from flowmap_api.pacing import Backoff

log = logging.getLogger("flowmap.agent.libvirt")
TICK_MS = 500  # the event loop wakes at least this often, to see a stop or a closed connection
MAX_VMS = MAX_NODE_VMS  # running domains followed on one node; past it, the rest are left out and said so
_event_loop_lock = threading.Lock()
_event_loop_registered = False


def _register_event_loop(libvirt: Any) -> None:
    """libvirt's default event loop, registered once per process, before any connection opens."""
    global _event_loop_registered
    with _event_loop_lock:
        if not _event_loop_registered:
            libvirt.virEventRegisterDefaultImpl()
            libvirt.virEventAddTimeout(TICK_MS, lambda timer, opaque: None, None)
            _event_loop_registered = True


class LibvirtVMs:
    """The running domains of the libvirtd at ``uri``, by UUID."""

    def __init__(self, uri: str, registry: CollectorRegistry | None = None, resync: float = 10.0) -> None:
        self.uri, self.resync = uri, resync
        self.vms: Mapping[str, Vm] = MappingProxyType({})
        self.connected = threading.Event()
        self.changes = 0  # how many times :attr:`vms` was replaced
        self._pending: set[str] = set()  # UUIDs an event named, to read again
        self._breaks = Counter("flowmap_agent_libvirt_breaks_total",
                               "Connections to libvirtd that closed or could not open", ["reason"],
                               registry=registry)
        self._gauge = Gauge("flowmap_agent_libvirt_vms", "Running libvirt domains the agent follows",
                            registry=registry)

    @property
    def taps(self) -> frozenset[str]:
        """Every tap of the running VMs (the dp captures on them)."""
        return frozenset(tap for vm in self.vms.values() for tap in vm.taps)

    async def run(self, stop: asyncio.Event) -> None:
        """Follow libvirt until ``stop``."""
        halt = threading.Event()
        thread = asyncio.create_task(asyncio.to_thread(self.follow, halt))
        try:
            await stop.wait()
        finally:
            halt.set()
            await asyncio.shield(thread)

    def follow(self, halt: threading.Event) -> None:
        """Connect, subscribe, list; dispatch events until ``halt``; on a break, connect again."""
        import libvirt

        _register_event_loop(libvirt)
        backoff = Backoff(0.5, 30.0, jitter=0.5)
        while not halt.is_set():
            try:
                conn = libvirt.openReadOnly(self.uri)
            except libvirt.libvirtError as exc:
                self._breaks.labels("connect").inc()
                wait = backoff.next()
                log.warning("cannot connect to libvirt at %s (%s); keeping %d VMs, trying again in %.1f s",
                            self.uri, exc.get_error_message(), len(self.vms), wait)
                halt.wait(wait)
                continue
            closed = threading.Event()
            try:
                self._session(libvirt, conn, closed, halt)
                backoff.reset()
            except libvirt.libvirtError as exc:
                if not closed.is_set():
                    self._breaks.labels("error").inc()
                log.warning("libvirt at %s failed (%s)", self.uri, exc.get_error_message())
            finally:
                self.connected.clear()
                try:
                    conn.close()
                except libvirt.libvirtError:
                    pass
            if closed.is_set():
                self._breaks.labels("closed").inc()
            if not halt.is_set():
                wait = backoff.next()
                log.warning("the connection to libvirt at %s closed; keeping %d VMs' taps, connecting again "
                            "in %.1f s", self.uri, len(self.vms), wait)
                halt.wait(wait)

    def _session(self, libvirt: Any, conn: Any, closed: threading.Event, halt: threading.Event) -> None:
        conn.registerCloseCallback(lambda c, reason, opaque: closed.set(), None)
        named = lambda c, dom, *rest: self._pending.add(dom.UUIDString())  # noqa: E731 - three subscriptions
        callbacks = [conn.domainEventRegisterAny(None, event, named, None) for event in (
            libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE, libvirt.VIR_DOMAIN_EVENT_ID_DEVICE_ADDED,
            libvirt.VIR_DOMAIN_EVENT_ID_DEVICE_REMOVED)]
        self._pending.clear()
        self._list(libvirt, conn)
        listed = time.monotonic()
        self.connected.set()
        log.info("following libvirt at %s: %d running VMs", self.uri, len(self.vms))
        try:
            while not halt.is_set() and not closed.is_set():
                libvirt.virEventRunDefaultImpl()
                if closed.is_set():
                    break
                if time.monotonic() - listed >= self.resync:
                    self._pending.clear()
                    self._list(libvirt, conn)
                    listed = time.monotonic()
                elif self._pending:
                    self._refresh(libvirt, conn)
        finally:
            if not closed.is_set():
                for callback in callbacks:
                    try:
                        conn.domainEventDeregisterAny(callback)
                    except libvirt.libvirtError:
                        pass

    def _list(self, libvirt: Any, conn: Any) -> None:
        found: dict[str, Vm] = {}
        for dom in conn.listAllDomains(libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE):
            vm = self._read(libvirt, dom)
            if vm is not None:
                found[vm.uuid] = vm
        self._publish(found)

    def _refresh(self, libvirt: Any, conn: Any) -> None:
        named, self._pending = self._pending, set()
        current = dict(self.vms)
        for uuid in named:
            try:
                dom = conn.lookupByUUIDString(uuid)
                vm = self._read(libvirt, dom) if dom.isActive() else None
            except libvirt.libvirtError as exc:
                if exc.get_error_code() != libvirt.VIR_ERR_NO_DOMAIN:
                    raise
                vm = None  # undefined meanwhile
            if vm is None:
                current.pop(uuid.lower(), None)
            else:
                current[vm.uuid] = vm
        self._publish(current)

    def _read(self, libvirt: Any, dom: Any) -> Vm | None:
        """The domain's identity from its live XML; None if it stopped meanwhile or says nothing usable."""
        try:
            xml = dom.XMLDesc(0)
        except libvirt.libvirtError as exc:
            if exc.get_error_code() in (libvirt.VIR_ERR_NO_DOMAIN, libvirt.VIR_ERR_OPERATION_INVALID):
                return None
            raise
        try:
            vm = parse(xml)
        except DomainError as exc:
            log.warning("libvirt domain %s ignored: %s", dom.UUIDString(), exc)
            return None
        for problem in vm.problems:
            log.warning("libvirt domain %s (%s): %s", vm.name, vm.uuid, problem)
        return replace(vm, reported=self._addresses(libvirt, dom, vm))

    @staticmethod
    def _addresses(libvirt: Any, dom: Any, vm: Vm) -> tuple[str, ...]:
        """What libvirt's lease source (its networks' DHCP) says of the VM's MACs. Its ARP source is
        the neighbour table, which the agent reads itself each interval (flowmap_agent.domains);
        its guest agent source needs a read-write connection, which the agent does not take."""
        try:
            return reported(dom.interfaceAddresses(libvirt.VIR_DOMAIN_INTERFACE_ADDRESSES_SRC_LEASE) or {}, vm.macs)
        except libvirt.libvirtError as exc:  # not on a libvirt network: the usual case
            log.debug("libvirt domain %s: no addresses from its leases: %s", vm.name, exc.get_error_message())
            return ()

    def _publish(self, vms: dict[str, Vm]) -> None:
        if len(vms) > MAX_VMS:
            log.warning("%d running libvirt domains: only %d are followed (their taps captured)", len(vms), MAX_VMS)
            vms = dict(sorted(vms.items())[:MAX_VMS])
        if vms != self.vms:
            before = set(self.taps)
            self.vms = MappingProxyType(vms)
            self.changes += 1
            after = self.taps
            log.info("libvirt VMs: %d running; taps %s%s", len(vms), sorted(after),
                     "" if after == before else f" (added {sorted(after - before)}, gone {sorted(before - after)})")
        self._gauge.set(len(vms))
