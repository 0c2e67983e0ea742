"""Shared plumbing of the dp benchmarks: a generator namespace and a capture namespace joined by
a veth, trafgen configurations, the reference C TPACKET_V3 reader, and per-process CPU and RSS.

Benchmarks print numbers; they never assert timing. They need root, trafgen (netsniff-ng) and
gcc, and clean up their namespaces on any exit.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

from flowmap_agent.listening import ReportReader
from flowmap_devenv.netns import netns  # noqa: F401 - the benchmarks enter namespaces through this module
from flowmap_devenv.netns import run as sh
from flowmap_dp import wire_pb2


def require() -> None:
    """Exit with a clear message when the machine cannot run the benchmark."""
    missing = [t for t in ("ip", "trafgen", "gcc") if shutil.which(t) is None]
    if os.geteuid() != 0 or missing:
        raise SystemExit(f"needs root and {', '.join(missing) or 'nothing else'} (apt-get install netsniff-ng gcc)")


class Link:
    """Namespaces ``gen`` and ``cap`` joined by veth ``g0`` <-> ``c0``."""

    def __init__(self, tag: str) -> None:
        self.gen, self.cap = f"fmbg{tag}{os.getpid()}"[:15], f"fmbc{tag}{os.getpid()}"[:15]
        self.gen_if, self.cap_if = "g0", "c0"
        for ns in (self.gen, self.cap):
            sh("ip", "netns", "add", ns)
        sh("ip", "link", "add", "g0", "netns", self.gen, "type", "veth", "peer", "name", "c0", "netns", self.cap)
        for ns, dev, addr in ((self.gen, "g0", "10.70.0.1/16"), (self.cap, "c0", "10.70.0.2/16")):
            sh("ip", "netns", "exec", ns, "ip", "addr", "add", addr, "dev", dev)
            sh("ip", "netns", "exec", ns, "ip", "link", "set", dev, "up")
            sh("ip", "netns", "exec", ns, "ip", "link", "set", "lo", "up")
        self.cap_mac = Path(f"/sys/class/net/c0/address")  # read inside cap (see mac())

    def mac(self) -> str:
        """The capture side's MAC (frames addressed to it arrive as PACKET_HOST)."""
        return sh("ip", "netns", "exec", self.cap, "cat", "/sys/class/net/c0/address").strip()

    def close(self) -> None:
        """Delete both namespaces (the veth goes with them)."""
        for ns in (self.gen, self.cap):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)

    def trafgen(self, config: str, packets: int, *, rate: str | None = None, cpus: int = 1,
                timeout: float = 300.0) -> subprocess.CompletedProcess[str]:
        """Send ``packets`` frames of ``config`` out of g0 (at ``rate``, else as fast as it can).

        trafgen forks its workers, so on a timeout the whole process group is killed: killing
        only the parent would leave a worker flooding on.
        """
        with tempfile.NamedTemporaryFile("w", suffix=".cfg", delete=False) as f:
            f.write(config)
        args = ["ip", "netns", "exec", self.gen, "trafgen", "-o", self.gen_if, "-i", f.name, "--cpus", str(cpus),
                "--no-sock-mem", "-n", str(packets)]
        if rate:
            args += ["-b", rate]
        proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)
        try:
            out, _ = proc.communicate(timeout=timeout)
            return subprocess.CompletedProcess(args, proc.returncode, out, "")
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, _ = proc.communicate()
            return subprocess.CompletedProcess(args, -9, out, "timed out")
        finally:
            os.unlink(f.name)


MIX_SIZES = (64, 64, 64, 128, 256, 576, 1024, 1500)  # an IMIX-like spread of frame sizes


def mixed_config(dst_mac: str, flows_per_size: int = 500) -> str:
    """trafgen config: UDP and TCP frames of MIX_SIZES bytes, ``flows_per_size`` source ports each.

    trafgen sends the packet definitions round-robin; each has its own counter, so the traffic
    holds len(MIX_SIZES) * flows_per_size distinct 5-tuples.
    """
    out = []
    for i, size in enumerate(MIX_SIZES):
        tcp = i % 2 == 1
        l4 = f"tcp(sp=dinc({20000 + i * 1000}, {20000 + i * 1000 + flows_per_size - 1}), dp=80, ack, psh)" if tcp \
            else f"udp(sp=dinc({20000 + i * 1000}, {20000 + i * 1000 + flows_per_size - 1}), dp=53)"
        payload = size - 14 - 20 - (20 if tcp else 8)
        out.append(f"{{ eth(da={dst_mac}, sa=02:00:00:00:00:01), ipv4(sa=10.70.1.{i + 1}, da=10.70.0.2, ttl=64), "
                   f"{l4}, fill(0x41, {payload}) }}")
    return "\n".join(out) + "\n"


def syn_config(dst_mac: str) -> str:
    """trafgen config: TCP SYNs whose (source address, source port) never repeat within 12.5 M.

    The source port cycles 1024..51023 (50,000) and the address' last byte 1..251 (251), both
    stepping every packet: co-prime periods, so consecutive packets give lcm = 12,550,000
    distinct 5-tuples.
    """
    return (f"{{ eth(da={dst_mac}, sa=02:00:00:00:00:01), ipv4(sa=10.71.0.1, sa[3]=dinc(1, 251), da=10.70.0.2), "
            f"tcp(sp=dinc(1024, 51023), dp=443, syn, seq=drnd()) }}\n")


C_READER = r"""
#include <arpa/inet.h>
#include <linux/filter.h>
#include <linux/if_ether.h>
#include <linux/if_packet.h>
#include <net/if.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <time.h>

/* Reference reader: the same ring setup as the dp, then a drain that touches what a minimal
   flow meter must touch per packet (frame header, ethertype, IPv4 length and 5-tuple). */
static double now(clockid_t c) { struct timespec t; clock_gettime(c, &t); return t.tv_sec + t.tv_nsec / 1e9; }

int main(int argc, char **argv) {
    if (argc < 6) return 2;
    unsigned bs = atoi(argv[2]), bn = atoi(argv[3]), snap = atoi(argv[4]), group = atoi(argv[5]);
    int fd = socket(AF_PACKET, SOCK_RAW, 0), v = TPACKET_V3;
    if (fd < 0 || setsockopt(fd, SOL_PACKET, PACKET_VERSION, &v, sizeof v)) { perror("socket"); return 1; }
    struct sock_filter f[] = {{0x06, 0, 0, snap}};
    struct sock_fprog p = {1, f};
    setsockopt(fd, SOL_SOCKET, SO_ATTACH_FILTER, &p, sizeof p);
    struct tpacket_req3 req = {bs, bn, 2048, bs / 2048 * bn, 64, 0, 0};
    if (setsockopt(fd, SOL_PACKET, PACKET_RX_RING, &req, sizeof req)) { perror("ring"); return 1; }
    uint8_t *ring = mmap(0, (size_t)bs * bn, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    struct sockaddr_ll sll = {.sll_family = AF_PACKET, .sll_protocol = htons(ETH_P_ALL),
                              .sll_ifindex = if_nametoindex(argv[1])};
    if (ring == MAP_FAILED || bind(fd, (struct sockaddr *)&sll, sizeof sll)) { perror("bind"); return 1; }
    if (group) {
        unsigned fo = group | ((PACKET_FANOUT_HASH | PACKET_FANOUT_FLAG_DEFRAG) << 16);
        if (setsockopt(fd, SOL_PACKET, PACKET_FANOUT, &fo, sizeof fo)) { perror("fanout"); return 1; }
    }
    printf("ready\n"); fflush(stdout);
    if (getchar() == EOF) return 0;
    double c0 = now(CLOCK_PROCESS_CPUTIME_ID), w0 = now(CLOCK_MONOTONIC);
    uint64_t pkts = 0, bytes = 0, h = 0;
    for (unsigned b = 0;; b = (b + 1) % bn) {
        struct tpacket_block_desc *bd = (void *)(ring + (size_t)b * bs);
        if (!(bd->hdr.bh1.block_status & TP_STATUS_USER)) break;
        struct tpacket3_hdr *t = (void *)((uint8_t *)bd + bd->hdr.bh1.offset_to_first_pkt);
        for (unsigned i = 0; i < bd->hdr.bh1.num_pkts; i++) {
            const uint8_t *e = (uint8_t *)t + t->tp_mac, *ip = e + 14;
            if (t->tp_snaplen >= 38 && e[12] == 0x08 && e[13] == 0x00) {
                const uint8_t *l4 = ip + (ip[0] & 15) * 4;
                bytes += (ip[2] << 8) | ip[3];
                h = h * 31 + (*(uint32_t *)(ip + 12) ^ *(uint32_t *)(ip + 16) ^ *(uint32_t *)l4 ^ ip[9]);
            }
            pkts++;
            t = (void *)((uint8_t *)t + t->tp_next_offset);
        }
        __atomic_store_n(&bd->hdr.bh1.block_status, TP_STATUS_KERNEL, __ATOMIC_RELEASE);
    }
    printf("%llu %llu %.6f %.6f %llx\n", (unsigned long long)pkts, (unsigned long long)bytes,
           now(CLOCK_PROCESS_CPUTIME_ID) - c0, now(CLOCK_MONOTONIC) - w0, (unsigned long long)h);
    return 0;
}
"""


def build_c_reader(workdir: Path) -> Path:
    """Compile the reference reader into ``workdir``; returns the binary."""
    src, exe = workdir / "tpv3_reader.c", workdir / "tpv3_reader"
    src.write_text(C_READER)
    sh("gcc", "-O2", "-o", str(exe), str(src))
    return exe


def cpu_seconds(pid: int) -> float:
    """User + system CPU of a process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_mb(pid: int) -> tuple[float, float]:
    """(VmRSS, VmHWM) of a process in MB."""
    vals = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(("VmRSS:", "VmHWM:")):
            k, v = line.split(":")
            vals[k] = int(v.split()[0]) / 1024
    return vals.get("VmRSS", 0.0), vals.get("VmHWM", 0.0)


def pump(reader: ReportReader, seconds: float) -> list[wire_pb2.Report]:
    """Whatever arrives within ``seconds`` (a hard deadline: the dp reports continuously)."""
    out: list[wire_pb2.Report] = []
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        out += reader.poll(left)
    return out
