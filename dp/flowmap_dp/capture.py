"""AF_PACKET TPACKET_V3 capture rings: the dp's only contact with live packets.

One :class:`Ring` is one ``AF_PACKET`` socket bound to one interface with a memory-mapped
TPACKET_V3 receive ring. The kernel fills whole *blocks* of packets and hands a block over by
setting ``TP_STATUS_USER`` in the block descriptor; we parse the whole block and hand it back
with ``TP_STATUS_KERNEL``. Nothing is copied out of the ring: the block parser gets a
``memoryview`` over the mapped block.

Decisions worth knowing:

* **Snap length** is enforced by the socket's classic-BPF program returning ``#snaplen``: in
  ``tpacket_rcv`` the filter's return value caps how many bytes are copied into the ring, for
  every packet, before the copy happens. ``PACKET_COPY_THRESH`` does not bound anything: for
  packets that overflow a frame it makes the kernel queue an *extra* full copy on the socket's
  ordinary receive queue, so it costs more, not less. ``tp_len`` still carries the real length.
* **Direction.** With ``ETH_P_ALL`` a veth shows both the frames it received and the frames the
  host sent out of it (``PACKET_OUTGOING``). In ``Direction.RECEIVED`` mode (the default) each
  packet is counted where it *enters the network* at this node, once:

  - a received frame is kept: on a pod's host-side veth that is what the pod sent, on the
    uplink what came from outside the node. A pod-to-pod packet on one node enters once (from
    the sender's veth) and leaves once (out of the receiver's veth), so it is counted once;
  - an outgoing frame is kept only when its IP source is one of the node's own addresses
    (``local_addresses``): the node's own stack sent it (kubelet probes, hostNetwork pods), so
    it entered nowhere else. A forwarded frame leaving a pod's veth or the uplink carries a
    pod's or a remote source and is dropped in the kernel: it was counted where it entered.
    The test is on the source address, which is all classic BPF can see: a forwarded frame
    whose source the node rewrote to one of its own addresses (masquerade, a NodePort's SNAT)
    is kept too, and counted a second time under the rewritten 5-tuple.

  The source test reads the IP header where the kernel says the network header is
  (``SKF_NET_OFF``) and the family from the packet's protocol (``SKF_AD_PROTOCOL``), so it is
  the same program on Ethernet devices and on tunnels without a link header (IPIP, WireGuard).
  An outgoing frame with a VLAN tag inside it is not kept (its protocol is the tag's); a tag the
  kernel keeps in the packet's metadata (VLAN offload) is not in the frame and changes nothing.
  ``Direction.BOTH`` keeps every frame: right for a single interface where nothing else is
  watched (a bridge port, a test).
* **Overlay encapsulation** (``overlay``, set on the underlay: the node's uplinks). Between
  nodes, an overlay (VXLAN, Geneve, WireGuard, IPIP, GRE …) carries every cross-node pod packet
  a second time, encapsulated. The packet inside is captured where it enters the node
  decapsulated (the tunnel device, received) or leaves a pod, so the encapsulated copy is
  dropped in the kernel, before the direction check: neither a received nor an outgoing one is
  copied into the ring, and no ``node -> node :8472/udp`` session exists. A UDP encapsulation
  matches the tunnel's port at either end of the datagram (the IPv4 header's length read from
  the packet, options included); the others match the outer IP protocol. Not recognised, and
  so kept: UDP behind IPv6 extension headers, and the non-first fragments of an encapsulated
  datagram (they carry no UDP header; with their first fragment dropped here, the decoder leaves
  them unattributed, counted as ``fragment``).
* **Fanout.** ``PACKET_FANOUT_HASH | PACKET_FANOUT_FLAG_DEFRAG`` spreads one interface over N
  sockets (one per worker process) by the kernel's flow hash, which is symmetric in source and
  destination, so both directions of a session land in the same worker; DEFRAG reassembles IP
  fragments before hashing so a fragmented datagram does not split across workers. The kernel
  only groups sockets bound to the same device, so the group id is derived per interface.
* **Statistics.** ``PACKET_STATISTICS`` returns ``tpacket_stats_v3`` and resets it; we add each
  read to running totals so callers see monotonic counters.
"""

from __future__ import annotations

import ctypes
import enum
import errno
import ipaddress
import mmap
import select
import socket
import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

# <linux/if_packet.h>, <linux/if_ether.h>, <asm-generic/socket.h>, <linux/filter.h>
SOL_PACKET = 263
PACKET_RX_RING = 5
PACKET_STATISTICS = 6
PACKET_VERSION = 10
PACKET_FANOUT = 18
TPACKET_V3 = 2
PACKET_FANOUT_HASH = 0
PACKET_FANOUT_FLAG_DEFRAG = 0x8000
SO_ATTACH_FILTER = 26
ETH_P_ALL = 0x0003
ETH_P_IP = 0x0800
ETH_P_IPV6 = 0x86DD
TP_STATUS_KERNEL = 0
TP_STATUS_USER = 1
TP_FT_REQ_FILL_RXHASH = 1
PACKET_OUTGOING = 4
SKF_AD_PKTTYPE = 0xFFFFF000 + 4  # SKF_AD_OFF (-0x1000) + SKF_AD_PKTTYPE, as u32

SKF_AD_PROTOCOL = 0xFFFFF000  # SKF_AD_OFF + SKF_AD_PROTOCOL: the packet's ethertype, host order
SKF_NET_OFF = 0xFFF00000  # -0x100000 as u32: loads from here on are relative to the network header

BPF_LD_W_ABS = 0x20
BPF_LD_H_ABS = 0x28
BPF_LD_B_ABS = 0x30
BPF_LD_H_IND = 0x48  # A = the 16 bits at X + k
BPF_LDX_B_MSH = 0xB1  # X = 4 * (the byte at k & 0xf): an IPv4 header's length
BPF_JA = 0x05
BPF_JEQ_K = 0x15
BPF_JSET_K = 0x45
BPF_RET_K = 0x06
BPF_ALU_AND_K = 0x54  # A &= k
PACKET_HOST = 0
IPPROTO_TCP, IPPROTO_UDP, IPPROTO_SCTP = 6, 17, 132
# Offsets in the IP header, from the network header (SKF_NET_OFF + ...).
IPV4_PROTO, IPV4_FRAG, IPV4_SRC, IPV4_DST = 9, 6, 12, 16
IPV6_NEXT, IPV6_SRC, IPV6_DST, IPV6_PAYLOAD = 6, 8, 24, 40
MAX_OVERLAY = 16  # encapsulations per ring: conditional jumps reach 255 instructions

_REQ3 = struct.Struct("=7I")  # struct tpacket_req3
_STATS3 = struct.Struct("=3I")  # struct tpacket_stats_v3
_U32 = struct.Struct("=I")
_INSN = struct.Struct("=HBBI")  # struct sock_filter
_FPROG = struct.Struct("@HP")  # struct sock_fprog (pointer-aligned)
# tpacket_block_desc: version, offset_to_priv, then tpacket_hdr_v1.
BLOCK_STATUS = 8
BLOCK_NUM_PKTS = 12
BLOCK_FIRST_PKT = 16
# tpacket3_hdr: next_offset, sec, nsec, snaplen, len, status, mac, net, ...; sockaddr_ll at 48.
FRAME = struct.Struct("=6IHH")
SLL_PKTTYPE = 48 + 10

Insn = tuple[int, int, int, int]  # (code, jt, jf, k) as tcpdump -ddd prints it
Asm = tuple[int, int | str, int | str, int | str]  # an instruction whose jump targets may be labels


class Encapsulation(NamedTuple):
    """What an overlay's tunnel puts on the wire between nodes."""

    ip_proto: int  # the outer IP protocol: 17 UDP, 4 IPv4 in IP, 41 IPv6 in IP, 47 GRE
    port: int = 0  # UDP: the tunnel's port (either end of the datagram); 0 for the others

    def check(self) -> None:
        """ValueError unless this is an IP protocol, with a port for UDP only."""
        if not 0 < self.ip_proto < 256 or not 0 <= self.port < 65536 or (
                (self.ip_proto == IPPROTO_UDP) != (self.port > 0)):
            raise ValueError(f"{self}: an IP protocol, and a port for UDP only")


class Direction(enum.Enum):
    """Which frames of an interface the ring keeps (see the module docstring)."""

    RECEIVED = "received"
    BOTH = "both"


@dataclass(frozen=True)
class RingConfig:
    """Shape of one ring; block_size must be a multiple of the page size."""

    block_size: int = 1 << 20
    block_count: int = 16
    frame_size: int = 2048
    retire_timeout_ms: int = 64
    snaplen: int = 1024  # enough for the headers detectors read (an HTTP/2 HEADERS frame of gRPC)
    direction: Direction = Direction.RECEIVED
    fill_rxhash: bool = True
    filter: tuple[Insn, ...] | None = None  # a classic-BPF program, e.g. from compile_filter()
    # The node's own addresses: in RECEIVED mode, outgoing frames from them are kept too.
    local_addresses: tuple[str, ...] = ()
    # Overlay encapsulation dropped before anything else (the underlay's rings: the uplinks).
    overlay: tuple[Encapsulation, ...] = ()

    def __post_init__(self) -> None:
        for address in self.local_addresses:
            ipaddress.ip_address(address)  # ValueError names the bad one
        for encap in self.overlay:
            encap.check()
        if len(self.overlay) > MAX_OVERLAY:
            raise ValueError(f"at most {MAX_OVERLAY} overlay encapsulations")
        if self.block_size % mmap.PAGESIZE or self.block_size <= 0:
            raise ValueError(f"block_size must be a positive multiple of {mmap.PAGESIZE}")
        if self.frame_size % 16 or self.frame_size < 64 or self.block_size % self.frame_size:
            raise ValueError("frame_size must be a multiple of 16, >= 64, and divide block_size")
        if self.block_count < 2 or not 0 < self.snaplen <= 262144:
            raise ValueError("block_count must be >= 2 and snaplen in 1..262144")

    def shape(self) -> tuple[int, int, int, int, bool]:
        """What a ring keeps for its life; the rest (the filter) can change on an open ring."""
        return self.block_size, self.block_count, self.frame_size, self.retire_timeout_ms, self.fill_rxhash


@dataclass
class RingStats:
    """Monotonic totals of what the kernel reported for one ring."""

    packets: int = 0
    drops: int = 0
    freezes: int = 0
    blocks: int = 0


def build_filter(config: RingConfig) -> list[Insn]:
    """The socket's BPF program: overlay drop, direction check, the user's filter, snaplen on every accept."""
    prog: list[Insn] = _drop_overlay(config.overlay)
    if config.direction is Direction.RECEIVED:
        outgoing = _from_own_address(config.local_addresses)
        # A = pkttype; outgoing -> the source check, else jump past it. Conditional jumps reach
        # only 255 instructions, ja any distance.
        prog += [(BPF_LD_W_ABS, 0, 0, SKF_AD_PKTTYPE), (BPF_JEQ_K, 1, 0, PACKET_OUTGOING),
                 (BPF_JA, 0, 0, len(outgoing)), *outgoing]
    if config.filter:
        for code, jt, jf, k in config.filter:
            if code == BPF_RET_K and k:
                k = min(k, config.snaplen)  # the user's "accept" still honours our snaplen
            prog.append((code, jt, jf, k))
    else:
        prog.append((BPF_RET_K, 0, 0, config.snaplen))
    if len(prog) > 4096:
        raise ValueError("classic BPF programs are limited to 4096 instructions")
    return prog


def _from_own_address(addresses: Sequence[str]) -> list[Insn]:
    """Rejects the frame unless its IP source is one of ``addresses``; a match falls out at the end."""
    ips = [ipaddress.ip_address(a) for a in addresses]
    v4 = [ip.packed for ip in ips if ip.version == 4]
    v6 = [ip.packed for ip in ips if ip.version == 6]
    if not ips:
        return [(BPF_RET_K, 0, 0, 0)]
    match = -1  # placeholder target of a "ja" to the end of the block, resolved below
    four: list[Insn] = [(BPF_LD_W_ABS, 0, 0, SKF_NET_OFF + IPV4_SRC)]
    for a in v4:
        four += [(BPF_JEQ_K, 0, 1, int.from_bytes(a, "big")), (BPF_JA, 0, 0, match)]
    four.append((BPF_RET_K, 0, 0, 0))
    six: list[Insn] = []
    for a in v6:
        for i in range(4):  # a mismatch skips the rest of this address, its "ja" included
            word = int.from_bytes(a[4 * i : 4 * i + 4], "big")
            six += [(BPF_LD_W_ABS, 0, 0, SKF_NET_OFF + IPV6_SRC + 4 * i), (BPF_JEQ_K, 0, 7 - 2 * i, word)]
        six.append((BPF_JA, 0, 0, match))
    six.append((BPF_RET_K, 0, 0, 0))
    # A = the packet's protocol; IPv4 -> four, IPv6 -> six, else (ARP, a tag in the frame) reject.
    block: list[Insn] = [(BPF_LD_W_ABS, 0, 0, SKF_AD_PROTOCOL), (BPF_JEQ_K, 0, 1, ETH_P_IP), (BPF_JA, 0, 0, 3),
                         (BPF_JEQ_K, 0, 1, ETH_P_IPV6), (BPF_JA, 0, 0, 1 + len(four)), (BPF_RET_K, 0, 0, 0),
                         *four, *six]
    return [(code, jt, jf, len(block) - i - 1 if code == BPF_JA and k == match else k)
            for i, (code, jt, jf, k) in enumerate(block)]


def _drop_overlay(overlay: Sequence[Encapsulation]) -> list[Insn]:
    """Rejects the overlay's encapsulated packets; everything else falls out at the end."""
    if not overlay:
        return []
    protos = sorted({e.ip_proto for e in overlay if e.ip_proto != IPPROTO_UDP})
    ports = sorted({e.port for e in overlay if e.ip_proto == IPPROTO_UDP})
    net = SKF_NET_OFF

    def by_port(load: Asm) -> list[Asm | str]:
        return [load, *((BPF_JEQ_K, "drop", 0, p) for p in ports)]

    four: list[Asm | str] = [(BPF_LD_B_ABS, 0, 0, net + IPV4_PROTO), *((BPF_JEQ_K, "drop", 0, p) for p in protos)]
    six: list[Asm | str] = [(BPF_LD_B_ABS, 0, 0, net + IPV6_NEXT), *((BPF_JEQ_K, "drop", 0, p) for p in protos)]
    if ports:
        # IPv4: a later fragment has no UDP header; X = the header's length, options included.
        four += [(BPF_JEQ_K, 0, "keep", IPPROTO_UDP), (BPF_LD_H_ABS, 0, 0, net + IPV4_FRAG),
                 (BPF_JSET_K, "keep", 0, 0x1FFF), (BPF_LDX_B_MSH, 0, 0, net),
                 *by_port((BPF_LD_H_IND, 0, 0, net)), *by_port((BPF_LD_H_IND, 0, 0, net + 2))]
        # IPv6: UDP right after the fixed header (behind extension headers it is not looked for).
        six += [(BPF_JEQ_K, 0, "keep", IPPROTO_UDP), *by_port((BPF_LD_H_ABS, 0, 0, net + IPV6_PAYLOAD)),
                *by_port((BPF_LD_H_ABS, 0, 0, net + IPV6_PAYLOAD + 2))]
    return assemble([(BPF_LD_W_ABS, 0, 0, SKF_AD_PROTOCOL), (BPF_JEQ_K, 0, "six", ETH_P_IP),
                      *four, (BPF_JA, 0, 0, "keep"),
                      "six", (BPF_JEQ_K, 0, "keep", ETH_P_IPV6), *six, (BPF_JA, 0, 0, "keep"),
                      "drop", (BPF_RET_K, 0, 0, 0), "keep"])


def assemble(items: Sequence[Asm | str]) -> list[Insn]:
    """Instructions with labels: a string item marks a place, a string jump target names one
    (``ja``'s target is its ``k``). A label after the last instruction is the code that follows."""
    where: dict[str, int] = {}
    count = 0
    for item in items:
        if isinstance(item, str):
            where[item] = count
        else:
            count += 1
    out: list[Insn] = []
    for item in (i for i in items if not isinstance(i, str)):
        code, jt, jf, k = item
        after = len(out) + 1  # a jump counts from the next instruction

        def to(t: int | str) -> int:
            return where[t] - after if isinstance(t, str) else t

        out.append((code, to(jt), to(jf), to(k) if code == BPF_JA else int(k) & 0xFFFFFFFF))
    if any(c != BPF_JA and not (jt <= 255 and jf <= 255) for c, jt, jf, _ in out):
        raise ValueError("a conditional jump beyond 255 instructions")
    return out


def compile_filter(expression: str, snaplen: int = 262144) -> tuple[Insn, ...]:
    """Compile a pcap filter expression with ``tcpdump -ddd`` (optional helper; needs tcpdump)."""
    import shutil
    import subprocess

    tcpdump = shutil.which("tcpdump")
    if tcpdump is None:
        raise RuntimeError("compiling a filter expression needs tcpdump; pass raw BPF instead")
    done = subprocess.run([tcpdump, "-ddd", "-s", str(snaplen), "-y", "EN10MB", expression],
                          capture_output=True, text=True)
    if done.returncode:
        raise ValueError(f"bad filter {expression!r}: {done.stderr.strip()}")
    out = done.stdout.split("\n")
    count = int(out[0])
    return tuple(tuple(int(x) for x in line.split()) for line in out[1 : 1 + count])  # type: ignore[misc]


def fanout_group(base: int, ifindex: int) -> int:
    """A 16-bit fanout group id for one interface, shared by all workers of one dp run."""
    return (base * 131 + ifindex) & 0xFFFF


def open_socket(ifname: str, config: RingConfig, fanout: int | None = None) -> socket.socket:
    """A bound AF_PACKET socket with its TPACKET_V3 ring configured (not yet mapped).

    The order matters: version, filter and ring before ``bind`` (protocol 0 until then, so no
    packet is queued unfiltered), and the fanout join last, once bound, because changing the
    ring of a fanout member re-links it at the end of the group and reorders the members.
    """
    cfg = config
    sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)
    try:
        sock.setsockopt(SOL_PACKET, PACKET_VERSION, TPACKET_V3)
        _attach_filter(sock, build_filter(cfg))
        frames = cfg.block_size // cfg.frame_size * cfg.block_count
        req = _REQ3.pack(cfg.block_size, cfg.block_count, cfg.frame_size, frames, cfg.retire_timeout_ms, 0,
                         TP_FT_REQ_FILL_RXHASH if cfg.fill_rxhash else 0)
        sock.setsockopt(SOL_PACKET, PACKET_RX_RING, req)
        sock.bind((ifname, ETH_P_ALL))
        if fanout is not None:
            mode = PACKET_FANOUT_HASH | PACKET_FANOUT_FLAG_DEFRAG
            sock.setsockopt(SOL_PACKET, PACKET_FANOUT, _U32.pack(fanout | (mode << 16)))
    except BaseException:
        sock.close()
        raise
    return sock


def _attach_filter(sock: socket.socket, prog: Sequence[Insn]) -> None:
    code = b"".join(_INSN.pack(*insn) for insn in prog)
    buf = ctypes.create_string_buffer(code, len(code))
    # The kernel copies the program during setsockopt, so buf only has to outlive the call.
    sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, _FPROG.pack(len(prog), ctypes.addressof(buf)))


@dataclass
class Ring:
    """One interface, one socket, one mapped TPACKET_V3 ring.

    Normally the ring opens its own socket; ``sock`` takes one opened elsewhere by
    :func:`open_socket` with the same config (a supervisor that opens all fanout members of an
    interface in worker order and passes each worker its descriptor).
    """

    ifname: str
    config: RingConfig = field(default_factory=RingConfig)
    fanout: int | None = None  # group id; None = no fanout
    stats: RingStats = field(default_factory=RingStats)
    sock: socket.socket | None = None

    def __post_init__(self) -> None:
        cfg = self.config
        if self.sock is None:
            self.sock = open_socket(self.ifname, cfg, self.fanout)
        self.socket: socket.socket = self.sock
        try:
            self.map = mmap.mmap(self.socket.fileno(), cfg.block_size * cfg.block_count,
                                 mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except BaseException:
            self.socket.close()
            raise
        self.view = memoryview(self.map)
        self.next_block = 0
        self.gone = False  # the interface disappeared under us (pod deleted)

    def refilter(self, config: RingConfig) -> None:
        """Put ``config``'s filter (local addresses, overlay, snap length …) on the open ring.

        ``SO_ATTACH_FILTER`` on a socket that has a program swaps it for the new one in one step:
        no packet meets no program. Frames already in the ring stay, as the old one took them.
        """
        if config.shape() != self.config.shape():
            raise ValueError("only the filter of an open ring can change, not its shape")
        _attach_filter(self.socket, build_filter(config))
        self.config = config

    def fileno(self) -> int:
        """The socket's descriptor, for poll/epoll."""
        return self.socket.fileno()

    def ready_block(self) -> memoryview | None:
        """The next block if the kernel has handed it to us, else None. Release it when done."""
        off = self.next_block * self.config.block_size
        # The kernel fills the block, then sets the status behind a write barrier; x86 keeps
        # our two loads (status, then data) in order. Python has no acquire fence to offer for
        # weakly-ordered CPUs: there we rely on the interpreter's own atomics between the reads.
        if not _U32.unpack_from(self.map, off + BLOCK_STATUS)[0] & TP_STATUS_USER:
            return None
        return self.view[off : off + self.config.block_size]

    def release_block(self) -> None:
        """Hand the current block back to the kernel and move to the next one."""
        off = self.next_block * self.config.block_size
        _U32.pack_into(self.map, off + BLOCK_STATUS, TP_STATUS_KERNEL)
        self.next_block = (self.next_block + 1) % self.config.block_count
        self.stats.blocks += 1

    def blocks(self) -> Iterator[memoryview]:
        """Yield every ready block in ring order, releasing each after the consumer is done."""
        while (block := self.ready_block()) is not None:
            try:
                yield block
            finally:
                block.release()
                self.release_block()

    def wait(self, timeout: float) -> bool:
        """Block up to ``timeout`` seconds for a ready block; True if one is ready."""
        if self.ready_block() is not None:
            return True
        poller = select.poll()
        poller.register(self.socket.fileno(), select.POLLIN | select.POLLERR)
        for _fd, ev in poller.poll(int(timeout * 1000)):
            if ev & select.POLLERR:
                self.check_error()
        return self.ready_block() is not None

    def check_error(self) -> None:
        """Consume a pending socket error; an interface that went away marks the ring gone."""
        err = self.socket.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err in (errno.ENETDOWN, errno.ENODEV, errno.ENXIO):
            self.gone = True

    def read_stats(self) -> RingStats:
        """Fold the kernel's (self-resetting) PACKET_STATISTICS into the running totals."""
        packets, drops, freezes = _STATS3.unpack(self.socket.getsockopt(SOL_PACKET, PACKET_STATISTICS, _STATS3.size))
        self.stats.packets += packets
        self.stats.drops += drops
        self.stats.freezes += freezes
        return self.stats

    def close(self) -> None:
        """Unmap and close; safe to call twice."""
        if self.socket.fileno() < 0:
            return
        self.view.release()
        self.map.close()
        self.socket.close()


def iter_frames(block: memoryview) -> Iterator[tuple[int, int, int, int]]:
    """Walk one block: (frame offset, snaplen, wire length, sll_pkttype) per packet.

    The data starts at ``offset + tp_mac``. This is the plain reference walk used by tests and
    the benchmark; the dp's hot path is the block parser.
    """
    num = _U32.unpack_from(block, BLOCK_NUM_PKTS)[0]
    off = _U32.unpack_from(block, BLOCK_FIRST_PKT)[0]
    for _ in range(num):
        nxt, _sec, _nsec, snap, length, _status, _mac, _net = FRAME.unpack_from(block, off)
        yield off, snap, length, block[off + SLL_PKTTYPE]
        off += nxt
