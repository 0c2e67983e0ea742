"""Network namespaces and veth pairs for live tests, benchmarks and simulated nodes, always torn down.

Names carry the test process id and a counter so parallel or crashed runs never collide, and
:func:`cleanup` removes everything a :class:`Lab` made even when the test failed half-way.
"""

from __future__ import annotations

import ctypes
import itertools
import os
import subprocess
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

_COUNTER = itertools.count()
CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


def run(*args: str, input_text: str | None = None) -> str:
    """Run a command, raising with its stderr on failure."""
    done = subprocess.run(list(args), capture_output=True, text=True, input=input_text)
    if done.returncode:
        raise RuntimeError(f"{' '.join(args)}: {done.stderr.strip()}")
    return done.stdout


def unique(prefix: str) -> str:
    """A short name (interface names are at most 15 bytes) unique to this process and call."""
    return f"{prefix}{os.getpid() % 100000}{next(_COUNTER)}"[:15]


@contextmanager
def netns(name: str) -> Iterator[None]:
    """Run the body with this thread in namespace ``name`` (sockets made there stay there)."""
    with open("/proc/thread-self/ns/net", "rb") as home, open(f"/run/netns/{name}", "rb") as there:
        if _libc.setns(there.fileno(), CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), f"setns {name}")
        try:
            yield
        finally:
            if _libc.setns(home.fileno(), CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), "setns back")


class Lab:
    """Namespaces and links made by one test; ``close()`` removes them all."""

    def __init__(self) -> None:
        self.namespaces: list[str] = []

    def ns(self, prefix: str = "fmt") -> str:
        """Create a namespace with loopback up."""
        name = unique(prefix)
        while os.path.exists(f"/run/netns/{name}"):  # left by a crashed run whose process id was ours
            name = unique(prefix)
        run("ip", "netns", "add", name)
        self.namespaces.append(name)
        self.exec(name, "ip", "link", "set", "lo", "up")
        return name

    def exec(self, ns: str, *args: str, input_text: str | None = None) -> str:
        """Run a command inside a namespace."""
        return run("ip", "netns", "exec", ns, *args, input_text=input_text)

    def popen(self, ns: str, args: Sequence[str], **kw: Any) -> subprocess.Popen[str]:
        """Start a process inside a namespace (``kw``: Popen's, ``text`` aside)."""
        return subprocess.Popen(["ip", "netns", "exec", ns, *args], text=True, **kw)

    def veth(self, ns_a: str, addr_a: Sequence[str], ns_b: str, addr_b: Sequence[str]) -> tuple[str, str]:
        """A veth pair between two namespaces with addresses (``nodad`` so IPv6 is usable at once)."""
        a, b = unique("va"), unique("vb")
        run("ip", "link", "add", a, "netns", ns_a, "type", "veth", "peer", "name", b, "netns", ns_b)
        for ns, dev, addrs in ((ns_a, a, addr_a), (ns_b, b, addr_b)):
            for addr in addrs:
                extra = ["nodad"] if ":" in addr else []
                self.exec(ns, "ip", "addr", "add", addr, "dev", dev, *extra)
            self.exec(ns, "ip", "link", "set", dev, "up")
        return a, b

    def pod(self, node_ns: str, ips: Sequence[str]) -> tuple[str, str]:
        """A pod namespace wired to its node as Calico and kindnet do: a veth, a /32 (/128) host
        route per address on the node, proxy ARP (and the node's fe80::1) as the pod's gateway.
        Returns (the pod's namespace, the node-side interface)."""
        pod_ns = self.ns("fmpod")
        six = [ip for ip in ips if ":" in ip]
        host_side, pod_side = self.veth(node_ns, ["fe80::1/64"] if six else [], pod_ns,
                                        [f"{ip}/{128 if ':' in ip else 32}" for ip in ips])
        self.exec(node_ns, "sysctl", "-qw", f"net.ipv4.conf.{host_side}.proxy_arp=1")
        for ip in ips:
            self.exec(node_ns, "ip", *(["-6"] if ":" in ip else []), "route", "add",
                      f"{ip}/{128 if ':' in ip else 32}", "dev", host_side)
        self.exec(pod_ns, "ip", "route", "add", "169.254.1.1", "dev", pod_side, "scope", "link")
        self.exec(pod_ns, "ip", "route", "add", "default", "via", "169.254.1.1", "dev", pod_side)
        if six:
            self.exec(pod_ns, "ip", "-6", "route", "add", "default", "via", "fe80::1", "dev", pod_side)
        return pod_ns, host_side

    def close(self) -> None:
        """Delete every namespace (their veths go with them)."""
        for name in reversed(self.namespaces):
            subprocess.run(["ip", "netns", "del", name], capture_output=True)
        self.namespaces.clear()
