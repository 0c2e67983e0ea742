"""A hypervisor node for the VM tests: a network namespace with its own real libvirtd (private
state under the test's folder, flowmap_devenv.vms) and the busybox test VM (flowmap_devenv.vmimage).

``Node.boot`` defines and starts a domain and waits for the VM's ready line on its serial
console; ``Node.close`` destroys every domain, stops libvirtd, deletes the namespace, and checks
that nothing stayed behind (a QEMU process, libvirt's paths on the machine, nftables tables).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import time
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from flowmap_devenv import netns, vmimage, vms

HOST_PATHS = ("/etc/libvirt", "/run/libvirt", "/var/lib/libvirt", "/var/log/libvirt", "/var/cache/libvirt",
              "/run/libvirtd.pid")


def libvirt_ready() -> str:
    """Why the VM tests cannot run here, or "" when they can."""
    for tool, package in ((vms.LIBVIRTD, "libvirt-daemon"), ("qemu-system-x86_64", "qemu-system-x86"),
                          (str(vmimage.BUSYBOX), "busybox-static"), ("unshare", "util-linux")):
        if shutil.which(tool) is None and not os.path.exists(tool):
            return f"the VM tests need {tool} (apt-get install {package}; make setup installs it)"
    if importlib.util.find_spec("libvirt") is None:
        return "the VM tests need libvirt-python (pip install -e '.[test]')"
    return ""


def qemu_pids(uuids: set[str]) -> set[int]:
    """The QEMU processes running one of these domains (by the ``-uuid`` libvirt gives QEMU)."""
    found = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                args = (entry / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if args and b"qemu-system" in args[0] and any(u.encode() in args for u in uuids):
                found.add(int(entry.name))
    return found


def nft_tables(ns: str = "") -> str:
    prefix = ["ip", "netns", "exec", ns] if ns else []
    return subprocess.run([*prefix, "nft", "list", "tables"], capture_output=True, text=True, check=True).stdout


@dataclass
class VM:
    domain: vms.Domain
    booted_s: float  # from create() to the ready line on the console


@dataclass
class Node:
    """A node namespace with a private libvirtd; every VM gets its own tap and /30."""

    folder: Path
    lab: netns.Lab = field(default_factory=netns.Lab)
    ns: str = ""
    daemon: vms.Libvirtd | None = None
    image: vmimage.Image | None = None
    accel: str = ""
    count: int = 0
    uuids: set[str] = field(default_factory=set)
    host_tables: str = ""
    host_paths: list[str] = field(default_factory=list)

    def open(self, ns: str = "") -> Node:
        """Start libvirtd in a namespace of its own, or in ``ns`` (another's node, which it keeps)."""
        self.image = vmimage.ensure()
        self.accel = vmimage.accelerator(self.image)
        self.host_paths = [p for p in HOST_PATHS if os.path.lexists(p)]
        self.host_tables = nft_tables()
        self.ns = ns or self.lab.ns("fmvmn")
        self.daemon = vms.Libvirtd(self.folder / "libvirt", self.ns)
        self.daemon.start()
        return self

    def connect(self):  # type: ignore[no-untyped-def]
        import libvirt

        assert self.daemon is not None
        return libvirt.open(self.daemon.uri)

    def domain(self, name: str, label: str = "", dns: str = "") -> vms.Domain:
        """A new domain's description: a fresh UUID, MAC, tap and /30 (10.77.<n>.0/30)."""
        n = self.count = self.count + 1
        self.uuids.add(made := str(uuid.uuid4()))
        return vms.Domain(name=name, uuid=made, mac=f"52:54:00:77:{n // 256:02x}:{n % 256:02x}",
                          tap=netns.unique("fmtap"), host_ip=f"10.77.{n}.1", vm_ip=f"10.77.{n}.2", prefix=30,
                          console=self.folder / f"{name}-{n}.console", label=label, dns=dns)

    def boot(self, domain: vms.Domain, timeout: float = 120.0) -> VM:
        """Define and start ``domain``; wait for the VM's ready line."""
        assert self.image is not None
        conn = self.connect()
        try:
            dom = conn.defineXML(domain.xml(self.image, self.accel))
            start = time.monotonic()
            dom.create()
        finally:
            conn.close()
        return VM(domain, self.wait_ready(domain, start, timeout))

    def wait_ready(self, domain: vms.Domain, start: float, timeout: float = 120.0) -> float:
        while True:
            text = domain.console.read_text(errors="replace") if domain.console.exists() else ""
            if f"{vmimage.READY} {domain.name} " in text:
                return time.monotonic() - start
            if time.monotonic() - start > timeout:
                raise TimeoutError(f"{domain.name} not ready in {timeout:.0f} s; console:\n{text[-3000:]}")
            time.sleep(0.05)

    def http(self, url: str, timeout: float = 15.0) -> str:
        """GET ``url`` from the node's namespace, as text."""
        return self.get(url, timeout).decode()

    def get(self, url: str, timeout: float = 15.0) -> bytes:
        """GET ``url`` from the node's namespace."""
        with netns.netns(self.ns), urllib.request.urlopen(url, timeout=timeout) as answer:
            return bytes(answer.read())

    def links(self) -> dict[str, str]:
        """The node's links: name -> MAC."""
        out = self.lab.exec(self.ns, "ip", "-o", "link", "show")
        found = {}
        for line in out.splitlines():
            parts = line.split()
            name = parts[1].rstrip(":").split("@")[0]
            found[name] = parts[parts.index("link/ether") + 1] if "link/ether" in parts else ""
        return found

    def close(self) -> list[str]:
        """Stop everything; returns what stayed behind (empty when clean)."""
        left: list[str] = []
        if self.daemon is not None:
            node_tables = nft_tables(self.ns) if self.ns in self.lab.namespaces else ""
            if node_tables.strip():
                left.append(f"nftables tables in the node: {node_tables.strip()}")
            self.daemon.stop()
        self.lab.close()  # only the namespace it made
        deadline = time.monotonic() + 10
        while (extra := qemu_pids(self.uuids)) and time.monotonic() < deadline:
            time.sleep(0.1)
        if extra:
            left.append(f"QEMU processes {sorted(extra)}")
        left += [f"{p} was made" for p in HOST_PATHS if os.path.lexists(p) and p not in self.host_paths]
        if nft_tables() != self.host_tables:
            left.append(f"the machine's nftables tables changed: {nft_tables()}")
        return left
