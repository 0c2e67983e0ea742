"""A libvirt domain's identity from its XML (flowmap_agent.domains), pure."""

from __future__ import annotations

from dataclasses import replace

import pytest

from flowmap_agent import domains, plumbing
from flowmap_api import report_pb2 as pb
from flowmap_api import validity
from flowmap_agent.domains import DomainError, Nic, parse

LIVE = """<domain type='kvm' id='3'>
  <name>shop-web</name>
  <uuid>0D5C8E1A-2F0B-4C1B-9A57-7E0F4E3B1C2D</uuid>
  <metadata>
    <flowmap:vm xmlns:flowmap="https://flowmap.dev/libvirt/1"><flowmap:label>web</flowmap:label></flowmap:vm>
    <other:x xmlns:other="https://example.org/x"><other:label>NOT THIS</other:label></other:x>
  </metadata>
  <devices>
    <interface type='bridge'><mac address='52:54:00:AA:BB:01'/><source bridge='br0'/>
      <target dev='vnet3'/><model type='virtio'/></interface>
    <interface type='network'><mac address='52:54:00:aa:bb:02'/><source network='default'/>
      <target dev='vnet4'/></interface>
    <interface type='ethernet'><mac address='52:54:00:aa:bb:03'/><target dev='tap-db'/></interface>
    <interface type='direct'><mac address='52:54:00:aa:bb:04'/><source dev='eth0' mode='bridge'/>
      <target dev='macvtap0'/></interface>
    <interface type='hostdev'><mac address='52:54:00:aa:bb:05'/></interface>
  </devices>
</domain>"""


def test_the_identity_of_a_running_domain() -> None:
    vm = parse(LIVE)
    assert (vm.name, vm.uuid, vm.label, vm.problems) == (
        "shop-web", "0d5c8e1a-2f0b-4c1b-9a57-7e0f4e3b1c2d", "web", ())
    assert vm.nics == (Nic("52:54:00:aa:bb:01", "vnet3", "bridge"), Nic("52:54:00:aa:bb:02", "vnet4", "network"),
                       Nic("52:54:00:aa:bb:03", "tap-db", "ethernet"), Nic("52:54:00:aa:bb:04", "", "direct"),
                       Nic("52:54:00:aa:bb:05", "", "hostdev"))
    # macvtap and hostdev NICs have no host interface that carries their traffic
    assert vm.taps == ("vnet3", "vnet4", "tap-db")
    assert len(vm.macs) == 5
    assert domains.taps({vm.uuid: vm}) == {"vnet3", "vnet4", "tap-db"}


def test_a_defined_domain_has_no_taps_and_no_label_is_fine() -> None:
    vm = parse("<domain><name>idle</name><uuid>0d5c8e1a-2f0b-4c1b-9a57-7e0f4e3b1c2d</uuid><devices>"
               "<interface type='network'><mac address='52:54:00:00:00:01'/></interface></devices></domain>")
    assert (vm.taps, vm.label, vm.macs) == ((), "", ("52:54:00:00:00:01",))


@pytest.mark.parametrize("xml, says", [
    ("<domain><name>a</name>", "does not parse"),
    ("<network><name>a</name></network>", "is not a <domain>"),
    ("<domain><uuid>0d5c8e1a-2f0b-4c1b-9a57-7e0f4e3b1c2d</uuid></domain>", "name"),
    ("<domain><name>a</name><uuid>nope</uuid></domain>", "no valid UUID"),
    ("<domain><name>a</name><uuid>0d5c8e1a-2f0b-4c1b-9a57-7e0f4e3b1c2d</uuid>" + " " * domains.MAX_XML + "</domain>",
     "bound"),
])
def test_bad_xml_is_refused_saying_why(xml: str, says: str) -> None:
    with pytest.raises(DomainError, match=says):
        parse(xml)


def test_what_cannot_be_used_is_ignored_and_said() -> None:
    nics = "".join(f"<interface type='ethernet'><target dev='t{i}'/></interface>" for i in range(domains.MAX_NICS + 1))
    vm = parse("<domain><name>a</name><uuid>0d5c8e1a-2f0b-4c1b-9a57-7e0f4e3b1c2d</uuid>"
               "<metadata><f:vm xmlns:f='https://flowmap.dev/libvirt/1'><f:label>Not A Label</f:label></f:vm>"
               f"</metadata><devices>{nics}<interface type='ethernet'><mac address='zz'/>"
               "<target dev='a/b'/></interface></devices></domain>")
    assert len(vm.taps) == domains.MAX_NICS and vm.label == ""
    assert any("only the first" in p for p in vm.problems) and any("no DNS label" in p for p in vm.problems)


def test_a_vm_tap_that_exists_is_captured_and_one_that_does_not_is_not() -> None:
    node_links = [plumbing.Link(1, "eth0"), plumbing.Link(7, "vnet3", "tun"), plumbing.Link(8, "vnet9", "tun")]
    wanted = plumbing.plan(node_links, [plumbing.Address(1, "192.0.2.10")], {}, (), ("192.0.2.10",),
                           vm_taps={"vnet3", "vnet4"})
    assert wanted.interfaces == ("eth0", "vnet3")
    assert plumbing.plan(node_links, [], {}, (), (), ("eth0",)).interfaces == ("eth0",)


def test_the_vms_followed_on_a_node_are_bounded() -> None:
    from prometheus_client import CollectorRegistry

    from flowmap_agent.libvirting import MAX_VMS, LibvirtVMs

    watch = LibvirtVMs("qemu:///system", CollectorRegistry())
    many = {f"{i:08x}-0000-4000-8000-000000000000": domains.Vm(f"vm{i}", f"{i:08x}-0000-4000-8000-000000000000",
                                                               (Nic("52:54:00:00:00:01", f"t{i}", "ethernet"),))
            for i in range(MAX_VMS + 5)}
    watch._publish(many)
    assert len(watch.vms) == MAX_VMS and len(watch.taps) == MAX_VMS and watch.changes == 1
    watch._publish(many)  # the same again: nothing changed
    assert watch.changes == 1


def test_a_vms_addresses_come_from_its_macs_in_the_neighbour_table_and_from_libvirt() -> None:
    vm = replace(parse(LIVE), reported=("10.9.0.7",))
    neighbours = {"52:54:00:aa:bb:01": ["192.168.122.10", "fe80::5054:ff:feaa:bb01", "2001:db8::10"],
                  "52:54:00:aa:bb:03": ["10.77.1.2"], "02:00:00:00:00:99": ["10.0.0.99"]}  # not the VM's
    assert domains.addresses(vm, neighbours) == ("10.77.1.2", "10.9.0.7", "192.168.122.10", "2001:db8::10")
    # bounded, and the same ones for the same input
    many = {"52:54:00:aa:bb:01": [f"10.1.0.{i}" for i in range(100)]}
    assert domains.addresses(vm, many) == tuple(sorted({f"10.1.0.{i}" for i in range(100)} | {"10.9.0.7"}))[:16]
    # an entry aged out of the table: the VM keeps the address, until the table gives it to another MAC
    before = domains.addresses(vm, neighbours)
    assert domains.addresses(vm, {}, before) == before
    assert domains.addresses(vm, {"02:00:00:00:00:99": ["10.77.1.2"]}, before) == (
        "10.9.0.7", "192.168.122.10", "2001:db8::10")


def test_libvirts_answer_gives_the_addresses_of_the_vms_macs_only() -> None:
    # virDomainInterfaceAddresses as a guest agent answers it: the guest's loopback and a NIC of its own too
    answer = {"lo": {"hwaddr": "00:00:00:00:00:00", "addrs": [{"type": 0, "addr": "127.0.0.1", "prefix": 8}]},
              "eth0": {"hwaddr": "52:54:00:AA:BB:01", "addrs": [
                  {"type": 0, "addr": "192.168.122.10", "prefix": 24},
                  {"type": 1, "addr": "fe80::5054:ff:feaa:bb01", "prefix": 64}, {"type": 0, "addr": "junk"}]},
              "docker0": {"hwaddr": "02:42:00:00:00:01", "addrs": [{"type": 0, "addr": "172.17.0.1", "prefix": 16}]},
              "weird": "not a mapping"}
    assert domains.reported(answer, parse(LIVE).macs) == ("192.168.122.10",)


def test_how_a_report_names_a_vm_passes_the_contract() -> None:
    vm = replace(parse(LIVE), name="web/1\x1b[2J")
    said = domains.local_vm(vm, ("10.77.1.2",))
    assert (said.uuid, said.name, said.label, list(said.addresses)) == (
        "0d5c8e1a-2f0b-4c1b-9a57-7e0f4e3b1c2d", "web\\x2f1\\x1b[2J", "web", ["10.77.1.2"])
    validity.check_batch(pb.ReportBatch(agent_id="a", node="n", vms_followed=True, vms=[said]))
