"""A libvirt domain's identity, read from its XML (pure): what the agent captures on and names.

libvirt describes a running domain in its live XML: its name and UUID, and each NIC's MAC and,
for the NICs whose traffic crosses a host interface (``type='ethernet'``, ``'bridge'``,
``'network'``), that interface, the tap (``<target dev='vnet3'/>``). The dp captures on the taps;
a VM is known by its UUID and MACs, not its addresses (VM networks may reuse address ranges).
Not captured: ``type='direct'`` (macvtap: the host's stack never sees the guest's frames),
``hostdev`` (SR-IOV, PCI passthrough), ``vhostuser`` (a user-space switch): the host has no
interface carrying them.

A label for the VM, if its owner gives one, is in the domain's metadata, in flowmap's namespace::

    <metadata><flowmap:vm xmlns:flowmap="https://flowmap.dev/libvirt/1">
      <flowmap:label>shop-web</flowmap:label></flowmap:vm></metadata>

It must be a DNS label (it names the VM's group); one that is not is ignored, and said so.

A VM's addresses are what its MACs give: the node's neighbour table (libvirt's ``arp`` source,
read by the agent itself each interval, after it took the dp's reports: a host that routes for
the VM learns its address from the ARP or neighbour discovery before it forwards to it, or from
the VM's own first packet) and libvirt's ``lease`` source (its networks' DHCP), read at each
listing. (libvirt's ``agent`` source, the QEMU guest agent, needs a read-write connection: the
agent's is read-only.) An address stays the VM's while it runs,
unless the table gives it to another MAC. The blind spots: a report taken between a packet to
an address the node never resolved and the node's ARP answer (the VM's very first contact,
within one round trip); and a bridged VM whose host neither routes for it nor leases it an
address: its traffic is captured, but its end shows as its address's.
"""

from __future__ import annotations

import ipaddress
import re
import uuid as uuidlib
import xml.etree.ElementTree as ET
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from flowmap_api import report_pb2 as pb
from flowmap_api.limits import MAX_VM_ADDRESSES, MAX_VM_NAME
from flowmap_api.text import printable
from flowmap_api.validity import VM_LABEL

NAMESPACE = "https://flowmap.dev/libvirt/1"
MAX_XML = 1 << 20  # bytes of one domain's XML; libvirt's own are some kilobytes
MAX_NICS = 64
MAX_NAME = MAX_VM_NAME
TAPPED = ("ethernet", "bridge", "network")  # NIC types whose frames cross a host interface
_MAC = re.compile(r"[0-9a-f]{2}(:[0-9a-f]{2}){5}")
_IFNAME = re.compile(r"[^\s/:]{1,15}")  # what the kernel accepts as an interface name


class DomainError(ValueError):
    """The XML is no usable domain description (the message says what is wrong)."""


@dataclass(frozen=True)
class Nic:
    mac: str  # lower case
    tap: str  # the host interface; "" when the host has none (macvtap, hostdev, not started)
    kind: str  # the interface's type attribute


@dataclass(frozen=True)
class Vm:
    """One domain as the agent knows it."""

    name: str
    uuid: str  # lower case, canonical
    nics: tuple[Nic, ...]
    label: str = ""
    problems: tuple[str, ...] = ()  # what was ignored, for the log
    reported: tuple[str, ...] = ()  # addresses libvirt's lease source gave (:func:`reported`)

    @property
    def taps(self) -> tuple[str, ...]:
        """The host interfaces that carry this VM's traffic."""
        return tuple(nic.tap for nic in self.nics if nic.tap)

    @property
    def macs(self) -> tuple[str, ...]:
        return tuple(nic.mac for nic in self.nics if nic.mac)


def parse(xml: str) -> Vm:
    """The identity a domain's XML gives; :class:`DomainError` when it gives none."""
    if len(xml.encode()) > MAX_XML:
        raise DomainError(f"a domain's XML of {len(xml.encode())} bytes is over the {MAX_XML}-byte bound")
    try:
        root = ET.fromstring(xml)
    except ET.ParseError as exc:
        raise DomainError(f"the domain's XML does not parse: {exc}") from None
    if root.tag != "domain":
        raise DomainError(f"<{root.tag}> is not a <domain>")
    name = (root.findtext("name") or "").strip()
    if not name or len(name) > MAX_NAME:
        raise DomainError(f"the domain's name {name[:MAX_NAME]!r} is empty or over {MAX_NAME} characters")
    raw_uuid = (root.findtext("uuid") or "").strip()
    try:
        canonical = str(uuidlib.UUID(raw_uuid))
    except ValueError:
        raise DomainError(f"domain {name!r} has no valid UUID ({raw_uuid[:64]!r})") from None
    problems: list[str] = []
    interfaces = root.findall("devices/interface")
    if len(interfaces) > MAX_NICS:
        problems.append(f"{len(interfaces)} NICs: only the first {MAX_NICS} are followed")
    nics = []
    for element in interfaces[:MAX_NICS]:
        kind = element.get("type", "")
        mac_el = element.find("mac")
        mac = (mac_el.get("address", "") if mac_el is not None else "").lower()
        if mac and not _MAC.fullmatch(mac):
            problems.append(f"a NIC's MAC {mac[:32]!r} is not one: ignored")
            mac = ""
        target = element.find("target")
        tap = target.get("dev", "") if target is not None and kind in TAPPED else ""
        if tap and not _IFNAME.fullmatch(tap):
            problems.append(f"a NIC's target {tap[:32]!r} is no interface name: ignored")
            tap = ""
        nics.append(Nic(mac, tap, kind))
    label = ""
    found = root.find(f"metadata/{{{NAMESPACE}}}vm/{{{NAMESPACE}}}label")
    if found is not None:
        text = (found.text or "").strip()
        if VM_LABEL.fullmatch(text):
            label = text
        else:
            problems.append(f"the label {text[:80]!r} is no DNS label (lower case letters, digits, '-', "
                            "at most 63): ignored")
    return Vm(name, canonical, tuple(nics), label, tuple(problems))


def taps(vms: dict[str, Vm]) -> frozenset[str]:
    """Every tap of these VMs."""
    return frozenset(tap for vm in vms.values() for tap in vm.taps)


def usable(raw: str) -> str:
    """The canonical text of an address a VM may be known by, or "" (not one; link-scoped,
    loopback, multicast or unspecified: it names nothing beyond the VM's link)."""
    try:
        ip = ipaddress.ip_address(raw.partition("%")[0])
    except ValueError:
        return ""
    if ip.is_link_local or ip.is_loopback or ip.is_multicast or ip.is_unspecified or str(ip) == "255.255.255.255":
        return ""
    return str(ip)


def reported(answer: Mapping[str, Any], macs: Iterable[str]) -> tuple[str, ...]:
    """The addresses of ``macs`` in an answer of libvirt's ``virDomainInterfaceAddresses``
    ({interface: {"hwaddr": MAC, "addrs": [{"addr": ...}]}}): a lease of another NIC, or (from a
    guest agent) the guest's loopback, is not the VM's NIC's."""
    wanted, found = set(macs), []
    for entry in answer.values():
        if isinstance(entry, Mapping) and str(entry.get("hwaddr") or "").lower() in wanted:
            found += [ip for a in entry.get("addrs") or () if isinstance(a, Mapping) and (ip := usable(str(a.get("addr"))))]
    return tuple(sorted(set(found)))


def addresses(vm: Vm, neighbours: Mapping[str, Iterable[str]], known: Iterable[str] = ()) -> tuple[str, ...]:
    """The VM's addresses: the neighbour table's for its MACs (``neighbours``: MAC -> addresses),
    libvirt's, and those it was known by (``known``) unless the table now gives one to another MAC
    (an entry ages out of the table while the VM keeps its address); at most MAX_VM_ADDRESSES,
    the same ones for the same input."""
    mine = set(vm.macs)
    found = {ip for mac in mine for raw in neighbours.get(mac, ()) if (ip := usable(raw))} | set(vm.reported)
    others = {usable(raw) for mac, held in neighbours.items() if mac not in mine for raw in held}
    return tuple(sorted(found | (set(known) - others)))[:MAX_VM_ADDRESSES]


def local_vm(vm: Vm, held: Iterable[str]) -> pb.LocalVm:
    """How a report names the VM (flowmap_api.validity.check_vms takes it): its name shown safely
    (libvirt refuses '/' in a name, but the report's reader need not trust that)."""
    return pb.LocalVm(uuid=vm.uuid, name=printable(vm.name.replace("/", "\\x2f"), MAX_VM_NAME), label=vm.label,
                      addresses=list(held))
