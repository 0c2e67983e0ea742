"""Plumbing for make_captures.py: a two-namespace lab that owns its processes, and versions."""

from __future__ import annotations

import contextlib
import itertools
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
PY = sys.executable
HELPERS = HERE / "capture_helpers.py"
OUT = HERE / "captures"

S4, C4 = "10.199.0.1", "10.199.0.2"
S6, C6 = "fd00:199::1", "fd00:199::2"

_counter = itertools.count()


def run(cmd: list[str], *, timeout: float = 60, check: bool = True, **kw: Any) -> subprocess.CompletedProcess[str]:
    """Run a setup command in the root namespace; on failure say what it printed."""
    p = subprocess.run(cmd, timeout=timeout, text=True, capture_output=True, **kw)
    if check and p.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {p.returncode}: {(p.stdout + p.stderr)[-2000:]}")
    return p


def version_of(cmd: list[str]) -> str:
    """The first line a program prints about its version (stdout or stderr)."""
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return "?"
    text = (p.stdout + p.stderr).strip().splitlines()
    return text[0].strip() if text else "?"


def pip_version(dist: str) -> str:
    """``dist VERSION`` of an installed Python distribution."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return f"{dist} {version(dist)}"
    except PackageNotFoundError:
        return f"{dist} (not installed)"


def deb_version(pkg: str) -> str:
    """``pkg VERSION (Debian)`` of an installed Debian package."""
    p = subprocess.run(["dpkg-query", "-W", "-f=${Version}", pkg], capture_output=True, text=True)
    return f"{pkg} {p.stdout.strip() or '?'} (Debian)"


class Lab:
    """Two namespaces (server ``s``, client ``c``) joined by one veth pair; owns every process
    it starts and removes everything on exit."""

    def __init__(self, tmp: Path) -> None:
        uid = f"{os.getpid() % 100000}{next(_counter)}"
        self.ns_s, self.ns_c = f"fmc{uid}s", f"fmc{uid}c"
        self.if_s, self.if_c = self.ns_s, self.ns_c
        self.tmp = tmp
        self.procs: list[subprocess.Popen[bytes]] = []  # everything started, for cleanup
        self.servers: list[subprocess.Popen[bytes]] = []  # long-running servers, must stay up
        self.logs: list[Any] = []

    def __enter__(self) -> Lab:
        try:
            run(["ip", "netns", "add", self.ns_s])
            run(["ip", "netns", "add", self.ns_c])
            run(["ip", "link", "add", self.if_s, "netns", self.ns_s, "type", "veth",
                 "peer", "name", self.if_c, "netns", self.ns_c])
            for ns, ifn, a4, a6 in ((self.ns_s, self.if_s, S4, S6), (self.ns_c, self.if_c, C4, C6)):
                self.sh(ns, ["sysctl", "-qw", f"net.ipv6.conf.{ifn}.accept_ra=0"], check=False)
                self.sh(ns, ["ip", "addr", "add", f"{a4}/24", "dev", ifn])
                self.sh(ns, ["ip", "-6", "addr", "add", f"{a6}/64", "dev", ifn, "nodad"])
                self.sh(ns, ["ip", "link", "set", "lo", "up"])
                self.sh(ns, ["ip", "link", "set", ifn, "up"])
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def sh(self, ns: str, cmd: list[str], **kw: Any) -> subprocess.CompletedProcess[str]:
        return run(["ip", "netns", "exec", ns, *cmd], **kw)

    def server(self, cmd: list[str], *, log: str, env: dict[str, str] | None = None,
               cwd: Path | None = None) -> subprocess.Popen[bytes]:
        """Start a long-running process in the server namespace."""
        out = open(self.tmp / log, "ab")
        self.logs.append(out)
        p = subprocess.Popen(["ip", "netns", "exec", self.ns_s, *cmd], stdout=out, stderr=out,
                             stdin=subprocess.DEVNULL, start_new_session=True,
                             env={**os.environ, **(env or {})}, cwd=cwd)
        self.procs.append(p)
        self.servers.append(p)
        return p

    def background_client(self, cmd: list[str], *, log: str, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        out = open(self.tmp / log, "ab")
        self.logs.append(out)
        p = subprocess.Popen(["ip", "netns", "exec", self.ns_c, *cmd], stdout=out, stderr=out,
                             stdin=subprocess.DEVNULL, start_new_session=True,
                             env={**os.environ, **(env or {})})
        self.procs.append(p)
        return p

    def client(self, cmd: list[str], *, timeout: float = 60, check: bool = True, input: str | None = None,
               env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        """Run one client command in the client namespace and wait for it."""
        p = subprocess.run(["ip", "netns", "exec", self.ns_c, *cmd], timeout=timeout, text=True,
                           capture_output=True, input=input, env={**os.environ, **(env or {})})
        with open(self.tmp / "clients.log", "a") as f:
            f.write(f"$ {' '.join(cmd)}\n{p.stdout}{p.stderr}\n")
        if check and p.returncode != 0:
            raise RuntimeError(f"client {cmd} exited {p.returncode}: {p.stderr[-2000:]}")
        return p

    def wait_listen(self, port: int, *, udp: bool = False, timeout: float = 90) -> None:
        """Wait until something in the server namespace listens on ``port``."""
        flag = "-Hlun" if udp else "-Hltn"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            out = self.sh(self.ns_s, ["ss", flag, f"sport = :{port}"], check=False).stdout
            if out.strip():
                return
            for p in self.servers:
                if p.poll() is not None:
                    raise RuntimeError(f"server {p.args} exited {p.returncode}; see logs in {self.tmp}")
            time.sleep(0.2)
        raise TimeoutError(f"nothing listens on port {port} in {self.ns_s}")

    # Neither neighbour discovery nor MLD reports (hop-by-hop header): only the traffic.
    QUIET = "not icmp6 and not (ip6 and ip6[6] == 0)"
    # The same, but ICMPv6 echoes kept (and IPv6 fragments, whose next header is 44).
    ECHOES = "not (icmp6 and ip6[40] != 128 and ip6[40] != 129) and not (ip6 and ip6[6] == 0)"

    @contextlib.contextmanager
    def capture(self, path: Path, bpf: str = QUIET) -> Iterator[None]:
        """Record the client's veth into ``path`` while the body runs (``bpf``: what is kept)."""
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp_pcap = self.tmp / (path.name + ".part")
        log = self.tmp / f"tcpdump-{path.stem}.log"
        err = open(log, "wb")
        self.logs.append(err)
        p = subprocess.Popen(["ip", "netns", "exec", self.ns_c, "tcpdump", "-i", self.if_c, "-w", str(tmp_pcap),
                              "-s", "0", "-U", "--immediate-mode", "-n", "-Z", "root", "-B", "32768", bpf],
                             stdout=subprocess.DEVNULL, stderr=err, start_new_session=True)
        self.procs.append(p)
        deadline = time.monotonic() + 20
        while b"listening on" not in log.read_bytes():
            if p.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("tcpdump did not start: " + log.read_text())
            time.sleep(0.05)
        try:
            yield
            time.sleep(1.0)  # let the last FIN/ACKs reach the veth
        finally:
            p.send_signal(signal.SIGINT)
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
        # A busy machine can leave tcpdump behind a burst (a flood, a scan): such a capture lies.
        dropped = re.search(r"(\d+) packets? dropped by kernel", log.read_text())
        if dropped and int(dropped.group(1)):
            raise RuntimeError(f"tcpdump dropped {dropped.group(1)} packets of {path.name}")
        shutil.move(tmp_pcap, path)

    def close(self) -> None:
        for p in reversed(self.procs):
            if p.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGTERM)
        for p in reversed(self.procs):
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGKILL)
                p.wait(5)
        # Daemons that left their process group are still inside our namespaces: end them by pid.
        for ns in (self.ns_s, self.ns_c):
            pids = run(["ip", "netns", "pids", ns], check=False).stdout.split()
            for pid in pids:
                with contextlib.suppress(ProcessLookupError, ValueError):
                    os.kill(int(pid), signal.SIGKILL)
            run(["ip", "netns", "del", ns], check=False)
        for f in self.logs:
            f.close()



@dataclass
class Made:
    """One capture file produced by a protocol recipe."""

    name: str
    made_by: dict[str, Any]
    notes: str
    label: str | Callable[[dict[str, Any]], str]
    tags: list[str] = field(default_factory=list)
    carrier: str | None = None  # for sqlinjection: the protocol the injection travels in
    # The threats each flow must raise, by its index in the capture and its flow entry (none if absent);
    # or, for a capture whose tipping session cannot be known beforehand (a flood, a scan), the names
    # the capture must raise in all, each listed on the flows the dp raises it on.
    threats: Callable[[int, dict[str, Any]], list[str]] | tuple[str, ...] | None = None
    threat_limits: list[str] = field(default_factory=list)  # NAME.KEY=VALUE the capture is judged with
    list_flows: bool = True  # False: list only the flows with a threat, count the others (a flood)




STAGING: list[Path] = []  # set by make_captures.py: captures land here until their recipe succeeds


def out(proto: str, name: str) -> Path:
    """Where capture ``name`` of ``proto`` is written."""
    return (STAGING[-1] if STAGING else OUT) / proto / f"{name}.pcap"
