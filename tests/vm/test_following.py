"""The agent follows the node's libvirt VMs live (flowmap_agent.libvirting) against a real
libvirtd and a real VM: define, start, destroy, re-define; libvirtd killed and brought back."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable, Iterator

import libvirt
import pytest
from prometheus_client import CollectorRegistry

from flowmap_agent import links, plumbing
from flowmap_agent.libvirting import LibvirtVMs
from flowmap_devenv import netns
from tests.vm.harness import Node, qemu_pids

RESYNC = 2.0  # the watch's listing period (10 s by default): what no event says shows within it


def until(what: Callable[[], object], timeout: float = 20.0, why: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not what():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout:.0f} s: {why}")
        time.sleep(0.05)


@pytest.fixture
def watch(node: Node) -> Iterator[LibvirtVMs]:
    assert node.daemon is not None
    followed = LibvirtVMs(node.daemon.uri, CollectorRegistry(), resync=RESYNC)
    halt = threading.Event()
    thread = threading.Thread(target=followed.follow, args=(halt,), daemon=True)
    thread.start()
    try:
        until(followed.connected.is_set, why="the watch connects")
        yield followed
    finally:
        halt.set()
        thread.join(10)
    assert not thread.is_alive()


def test_define_start_destroy_and_redefine_are_followed_live(node: Node, watch: LibvirtVMs) -> None:
    assert dict(watch.vms) == {}
    domain = node.domain("shop-web", label="shop-web")
    started = time.monotonic()
    vm = node.boot(domain)
    until(lambda: domain.uuid in watch.vms, why="the started VM is seen")
    seen = watch.vms[domain.uuid]
    print(f"\nseen {time.monotonic() - started:.1f} s after create (booted in {vm.booted_s:.1f} s)")
    assert (seen.name, seen.label, seen.macs, seen.taps) == ("shop-web", "shop-web", (domain.mac,), (domain.tap,))
    assert watch.taps == {domain.tap}
    conn = node.connect()
    try:
        dom = conn.lookupByUUIDString(domain.uuid)
        at = time.monotonic()
        dom.destroy()
        until(lambda: domain.uuid not in watch.vms, why="the destroyed VM is gone")
        print(f"destroy followed in {time.monotonic() - at:.2f} s")
        dom.undefine()
        # defined again, with another tap and no label: the same UUID, a new identity
        again = node.domain("shop-web")
        again = type(again)(**{**again.__dict__, "uuid": domain.uuid})
        conn.defineXML(again.xml(node.image, node.accel))  # type: ignore[arg-type]
        time.sleep(1.0)
        assert domain.uuid not in watch.vms  # defined, not running: no tap to capture
        conn.lookupByUUIDString(domain.uuid).create()
        until(lambda: domain.uuid in watch.vms and watch.vms[domain.uuid].taps == (again.tap,),
              why="the re-defined VM is seen with its new tap")
        assert watch.vms[domain.uuid].label == ""
    finally:
        conn.close()


def test_a_killed_libvirtd_loses_nothing(node: Node, watch: LibvirtVMs) -> None:
    assert node.daemon is not None
    kept, lost = node.domain("kept"), node.domain("crashed")
    node.boot(kept)
    node.boot(lost)
    until(lambda: {kept.uuid, lost.uuid} <= set(watch.vms), why="both VMs are seen")
    node.daemon.kill()
    until(lambda: not watch.connected.is_set(), why="the watch sees libvirtd gone")
    # The VMs run on without libvirtd, and the agent keeps capturing on their taps.
    assert watch.taps == {kept.tap, lost.tap}
    assert node.http(f"http://{kept.vm_ip}/") == "flowmap-vm kept\n"
    # Meanwhile one VM's QEMU dies: libvirtd, back, finds it gone, and so does the agent.
    (pid,) = qemu_pids({lost.uuid})
    os.kill(pid, signal.SIGKILL)
    time.sleep(2.0)
    assert watch.taps == {kept.tap, lost.tap}
    node.daemon.start()
    until(watch.connected.is_set, timeout=40, why="the watch connects again")
    until(lambda: set(watch.vms) == {kept.uuid}, why="the listing after the reconnect drops the dead VM")
    assert watch.taps == {kept.tap}
    # and it follows on: events from the new libvirtd arrive
    conn = node.connect()
    try:
        conn.lookupByUUIDString(kept.uuid).destroy()
    finally:
        conn.close()
    until(lambda: not watch.vms, why="the destroy after the reconnect is followed")
    assert watch._breaks.labels("closed")._value.get() == 1  # type: ignore[attr-defined]


def test_a_vm_is_not_lost_when_libvirt_is_unreachable_at_first(node: Node) -> None:
    assert node.daemon is not None
    domain = node.domain("early")
    node.boot(domain)
    node.daemon.kill()
    followed = LibvirtVMs(node.daemon.uri, CollectorRegistry())
    halt = threading.Event()
    thread = threading.Thread(target=followed.follow, args=(halt,), daemon=True)
    thread.start()
    try:
        time.sleep(1.5)
        assert not followed.connected.is_set() and not followed.vms
        node.daemon.start()
        until(lambda: domain.uuid in followed.vms, timeout=40, why="found once libvirtd answers")
    finally:
        halt.set()
        thread.join(10)
    conn = node.connect()
    try:
        assert [d.UUIDString() for d in conn.listAllDomains(libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE)] == [domain.uuid]
    finally:
        conn.close()


def test_the_dp_is_told_to_capture_on_each_vm_tap_while_it_runs(node: Node, watch: LibvirtVMs) -> None:
    """The agent's decision on the node as it is: its links read over netlink, the taps libvirt
    names, the plan the dp is given (flowmap_agent.plumbing)."""
    reader = links.Reader(node.ns)

    def captured() -> set[str]:
        view = reader.read()
        wanted = plumbing.plan(view.links, view.addresses, view.peers, (), (), ("lo",), watch.taps)
        return set(wanted.interfaces) - {"lo"}

    assert captured() == set()
    one, two = node.domain("one"), node.domain("two")
    node.boot(one)
    until(lambda: captured() == {one.tap}, why="the first VM's tap is captured")
    node.boot(two)
    until(lambda: captured() == {one.tap, two.tap}, why="both taps are captured")
    # the tap's address is the node's own (as a ptp CNI's host side is); the VM's is not
    view = reader.read()
    own = plumbing.plan(view.links, view.addresses, view.peers, (), (), ("lo",), watch.taps).own
    assert one.host_ip in own and one.vm_ip not in own
    conn = node.connect()
    try:
        conn.lookupByUUIDString(one.uuid).destroy()
    finally:
        conn.close()
    until(lambda: captured() == {two.tap}, why="the destroyed VM's tap is no longer captured")


def test_a_nic_hot_plugged_and_unplugged_is_followed_by_its_events(node: Node) -> None:
    assert node.daemon is not None
    followed = LibvirtVMs(node.daemon.uri, CollectorRegistry(), resync=600)  # events alone, no listing
    halt = threading.Event()
    thread = threading.Thread(target=followed.follow, args=(halt,), daemon=True)
    thread.start()
    try:
        domain = node.domain("plugged")
        node.boot(domain)
        until(lambda: followed.taps == {domain.tap}, why="the VM's first tap")
        second = netns.unique("fmtap")
        nic = (f"<interface type='ethernet'><mac address='52:54:00:99:00:01'/><target dev='{second}'/>"
               "<model type='virtio'/></interface>")
        conn = node.connect()
        try:
            dom = conn.lookupByUUIDString(domain.uuid)
            dom.attachDeviceFlags(nic, libvirt.VIR_DOMAIN_AFFECT_LIVE)
            until(lambda: followed.taps == {domain.tap, second}, why="the hot-plugged NIC's tap")
            assert followed.vms[domain.uuid].macs == (domain.mac, "52:54:00:99:00:01")
            dom.detachDeviceFlags(nic, libvirt.VIR_DOMAIN_AFFECT_LIVE)  # the guest's ACPI ejects it
            until(lambda: followed.taps == {domain.tap}, why="the unplugged NIC's tap is gone")
        finally:
            conn.close()
        assert second not in node.links()
    finally:
        halt.set()
        thread.join(10)
