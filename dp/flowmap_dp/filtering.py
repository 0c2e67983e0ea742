"""A packet capture's structured filters compiled to one classic-BPF program.

The program runs on an ``AF_PACKET`` socket bound to the host side of a pod's veth (Ethernet,
no VLAN tag: a veth carries none) and returns the snap length for a packet to keep, 0 for the
others, so the kernel copies nothing it does not keep and at most the snap length of what it
keeps. A packet is kept when *any* filter matches; a filter matches when *all* its parts do:

* ``peers``: the other end's address is in one of these networks (none: any peer). Which end
  that is follows the packet's direction on the veth: a packet the host sends into it
  (``PACKET_OUTGOING``) goes **to** the pod, so the peer is its source; any other goes **from**
  the pod, and the peer is its destination. A filter whose peers are all of the other family
  matches no packet of this family.
* ``protocol``: the IP protocol number (0: any). ICMP (1) means ICMPv6 (58) on IPv6.
* ``port``: either end's port, as tcpdump's ``port`` (0: any); with no protocol, a TCP, UDP or
  SCTP port. A later IPv4 fragment carries no ports and so never matches a port.
* ``direction``: Ingress (to the pod), Egress (from it) or Both.

IPv4 is read with its header length (options included). IPv6 is read as its fixed header:
extension headers before the L4 header (fragment, hop-by-hop, routing …) are not followed, so a
packet with one matches neither a protocol nor a port (it still matches a peer and a direction).

Conditional jumps reach 255 instructions only, so every test jumps within its own few
instructions and every far target is reached by ``ja``: the only bound is the kernel's 4096
instructions, which a filter with very many peers can reach (ValueError, never a bad program).
"""

from __future__ import annotations

import enum
import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass

from flowmap_dp.capture import (
    BPF_ALU_AND_K, BPF_JA, BPF_JEQ_K, BPF_JSET_K, BPF_LD_B_ABS, BPF_LD_H_ABS, BPF_LD_H_IND, BPF_LD_W_ABS,
    BPF_LDX_B_MSH, BPF_RET_K, ETH_P_IP, ETH_P_IPV6, IPPROTO_SCTP, IPPROTO_TCP, IPPROTO_UDP, IPV4_DST, IPV4_FRAG,
    IPV4_PROTO, IPV4_SRC, IPV6_DST, IPV6_NEXT, IPV6_PAYLOAD, IPV6_SRC, PACKET_OUTGOING, SKF_AD_PKTTYPE,
    SKF_AD_PROTOCOL, SKF_NET_OFF, Asm, Insn, assemble,
)

MAX_FILTERS = 16
MAX_INSNS = 4096
MAX_SNAPLEN = 262144
IPPROTO_ICMP, IPPROTO_ICMPV6 = 1, 58
PORT_PROTOCOLS = (IPPROTO_TCP, IPPROTO_UDP, IPPROTO_SCTP)

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class PodDirection(enum.Enum):
    """Which way a packet crosses the pod's veth, seen from the pod."""

    INGRESS = "Ingress"
    EGRESS = "Egress"
    BOTH = "Both"


@dataclass(frozen=True)
class Filter:
    """One filter: every part given must match (see the module docstring)."""

    peers: tuple[Network, ...] = ()
    protocol: int = 0
    port: int = 0
    direction: PodDirection = PodDirection.BOTH

    def __post_init__(self) -> None:
        if not 0 <= self.protocol < 256 or not 0 <= self.port < 65536:
            raise ValueError(f"protocol {self.protocol} or port {self.port} out of range")
        if self.port and self.protocol not in (0, *PORT_PROTOCOLS):
            raise ValueError(f"a port needs TCP, UDP or SCTP, not protocol {self.protocol}")


def compile_filters(filters: Sequence[Filter], snaplen: int) -> tuple[Insn, ...]:
    """The program keeping (with ``snaplen`` bytes) the packets any of ``filters`` matches;
    no filter keeps every packet."""
    if not 0 < snaplen <= MAX_SNAPLEN:
        raise ValueError(f"snap length {snaplen} not in 1..{MAX_SNAPLEN}")
    if len(filters) > MAX_FILTERS:
        raise ValueError(f"at most {MAX_FILTERS} filters")
    if not filters:
        return ((BPF_RET_K, 0, 0, snaplen),)
    items: list[Asm | str] = [(BPF_LD_W_ABS, 0, 0, SKF_AD_PROTOCOL), (BPF_JEQ_K, 1, 0, ETH_P_IP), (BPF_JA, 0, 0, "v6"),
                              *_family(filters, 4), (BPF_JA, 0, 0, "reject"),
                              "v6", (BPF_JEQ_K, 1, 0, ETH_P_IPV6), (BPF_JA, 0, 0, "reject"), *_family(filters, 6),
                              "reject", (BPF_RET_K, 0, 0, 0), "accept", (BPF_RET_K, 0, 0, snaplen)]
    prog = tuple(assemble(items))
    if len(prog) > MAX_INSNS:
        raise ValueError(f"the filters need {len(prog)} instructions, more than the kernel's {MAX_INSNS}")
    return prog


def _family(filters: Sequence[Filter], version: int) -> list[Asm | str]:
    """Each filter in turn for one IP version: a match jumps to "accept", a miss falls to the next."""
    out: list[Asm | str] = []
    for i, f in enumerate(filters):
        peers = [p for p in f.peers if p.version == version]
        if f.peers and not peers:
            continue  # only peers of the other family: no packet of this one matches
        out += _one(f, peers, version, f"{version}.{i}")
    return out


def _one(f: Filter, peers: Sequence[Network], version: int, at: str) -> list[Asm | str]:
    net = SKF_NET_OFF
    fail, nxt = f"{at}.fail", f"{at}.next"
    out: list[Asm | str] = []
    protocols = [f.protocol] if f.protocol else list(PORT_PROTOCOLS) if f.port else []
    if version == 6:
        protocols = [IPPROTO_ICMPV6 if p == IPPROTO_ICMP else p for p in protocols]
    if protocols:
        out.append((BPF_LD_B_ABS, 0, 0, net + (IPV4_PROTO if version == 4 else IPV6_NEXT)))
        out += [(BPF_JEQ_K, f"{at}.proto", 0, p) for p in protocols[:-1]]
        out += [(BPF_JEQ_K, 0, fail, protocols[-1]), f"{at}.proto"]
    if f.port:
        if version == 4:  # a later fragment has no L4 header; X = the header's length
            out += [(BPF_LD_H_ABS, 0, 0, net + IPV4_FRAG), (BPF_JSET_K, fail, 0, 0x1FFF),
                    (BPF_LDX_B_MSH, 0, 0, net), (BPF_LD_H_IND, 0, 0, net), (BPF_JEQ_K, f"{at}.port", 0, f.port),
                    (BPF_LD_H_IND, 0, 0, net + 2), (BPF_JEQ_K, 0, fail, f.port)]
        else:
            out += [(BPF_LD_H_ABS, 0, 0, net + IPV6_PAYLOAD), (BPF_JEQ_K, f"{at}.port", 0, f.port),
                    (BPF_LD_H_ABS, 0, 0, net + IPV6_PAYLOAD + 2), (BPF_JEQ_K, 0, fail, f.port)]
        out.append(f"{at}.port")
    src, dst = (IPV4_SRC, IPV4_DST) if version == 4 else (IPV6_SRC, IPV6_DST)
    if f.direction is PodDirection.BOTH and not peers:
        return [*out, (BPF_JA, 0, 0, "accept"), fail]
    # To the pod (outgoing on the host side): the peer is the source; from it, the destination.
    out.append((BPF_LD_W_ABS, 0, 0, SKF_AD_PKTTYPE))
    if f.direction is PodDirection.INGRESS:
        out += [(BPF_JEQ_K, 0, fail, PACKET_OUTGOING), (BPF_JA, 0, 0, f"{at}.in")]
    elif f.direction is PodDirection.EGRESS:
        out += [(BPF_JEQ_K, fail, 0, PACKET_OUTGOING), (BPF_JA, 0, 0, f"{at}.out")]
    else:
        out += [(BPF_JEQ_K, 1, 0, PACKET_OUTGOING), (BPF_JA, 0, 0, f"{at}.out"), (BPF_JA, 0, 0, f"{at}.in")]
    out += [fail, (BPF_JA, 0, 0, nxt)]
    out += [f"{at}.in", *_peers(peers, src, f"{at}.in", nxt)]
    out += [f"{at}.out", *_peers(peers, dst, f"{at}.out", nxt), nxt]
    return out


def _peers(peers: Sequence[Network], offset: int, at: str, miss: str) -> list[Asm | str]:
    """Jumps to "accept" when the address at ``offset`` is in one of ``peers`` (any: none given),
    else to ``miss``. Each network compares only the 32-bit words its prefix covers."""
    if not peers:
        return [(BPF_JA, 0, 0, "accept")]
    out: list[Asm | str] = []
    for n, peer in enumerate(peers):
        skip = f"{at}.{n}"
        address = int(peer.network_address).to_bytes(peer.max_prefixlen // 8, "big")
        for word in range(-(-peer.prefixlen // 32)):
            bits = min(32, peer.prefixlen - 32 * word)
            mask = (0xFFFFFFFF << (32 - bits)) & 0xFFFFFFFF
            out.append((BPF_LD_W_ABS, 0, 0, SKF_NET_OFF + offset + 4 * word))
            if mask != 0xFFFFFFFF:
                out.append((BPF_ALU_AND_K, 0, 0, mask))
            out.append((BPF_JEQ_K, 0, skip, int.from_bytes(address[4 * word : 4 * word + 4], "big") & mask))
        out += [(BPF_JA, 0, 0, "accept"), skip]
    return [*out, (BPF_JA, 0, 0, miss)]
