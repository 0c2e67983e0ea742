"""The dp captures a real VM's traffic on the tap the agent learned from libvirt, and counts
exactly what the kernel counted (an nftables table in the node namespace, at its input and
output hooks: the VM talks to the node's own stack)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from flowmap_agent import links, plumbing
from flowmap_agent.libvirting import LibvirtVMs
from tests.dp.test_live import FLOWMAP, Agent, _ip
from tests.vm.harness import Node
from tests.vm.test_following import until


@pytest.fixture
def agent(tmp_path: Path) -> Iterator[Agent]:
    a = Agent(str(tmp_path / "agent.sock"))
    yield a
    a.reader.close()


def test_a_vms_http_download_counts_exactly_what_the_kernel_counted(node: Node, agent: Agent, tmp_path: Path) -> None:
    assert node.daemon is not None
    watch = LibvirtVMs(node.daemon.uri, CollectorRegistry(), resync=2.0)
    halt = threading.Event()
    thread = threading.Thread(target=watch.follow, args=(halt,), daemon=True)
    thread.start()
    dp: subprocess.Popen[str] | None = None
    server: subprocess.Popen[str] | None = None
    counted = False
    try:
        vm = node.boot(node.domain("downloader")).domain
        until(lambda: vm.uuid in watch.vms, why="the VM is followed")
        view = links.Reader(node.ns).read()
        wanted = plumbing.plan(view.links, view.addresses, view.peers, (), (), ("lo",), watch.taps)
        taps = [name for name in wanted.interfaces if name != "lo"]
        assert taps == [vm.tap]
        # the kernel's count of the one session: the VM's download from the node's port 8080
        node.lab.exec(node.ns, "nft", "-f", "-", input_text=f"""
        table inet fmtest {{
          counter c2s {{ packets 0 bytes 0 }}
          counter s2c {{ packets 0 bytes 0 }}
          chain fminput {{ type filter hook input priority 0; policy accept;
            ip saddr {vm.vm_ip} ip daddr {vm.host_ip} tcp dport 8080 counter name c2s
          }}
          chain fmoutput {{ type filter hook output priority 0; policy accept;
            ip saddr {vm.host_ip} ip daddr {vm.vm_ip} tcp sport 8080 counter name s2c
          }}
        }}""")
        counted = True
        log = open(tmp_path / "dp.log", "w")
        dp = node.lab.popen(node.ns, [FLOWMAP, "dp", "run", "--socket", agent.reader.path, "--interval", "0.2",
                                      "--retire-ms", "10", "--block-size", str(1 << 18), "--local-address",
                                      vm.host_ip, *[arg for tap in taps for arg in ("--iface", tap)]],
                            stdout=log, stderr=subprocess.STDOUT)
        assert agent.wait(lambda: len(agent.reports) > 0 or dp.poll() is not None, 15), "the dp did not report"
        assert dp.poll() is None, (tmp_path / "dp.log").read_text()
        (tmp_path / "www").mkdir()
        (tmp_path / "www" / "blob").write_bytes(os.urandom(200_000))
        server = node.lab.popen(node.ns, [sys.executable, "-m", "http.server", "--bind", vm.host_ip, "8080"],
                                cwd=tmp_path / "www", stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        until(lambda: node.lab.exec(node.ns, "ss", "-Hltn", "sport = :8080").strip() != "", why="the server listens")
        got = node.get(f"http://{vm.vm_ip}/cgi-bin/fetch?http://{vm.host_ip}:8080/blob", timeout=60)
        assert got == (tmp_path / "www" / "blob").read_bytes()  # through the VM, whole
        counters = json.loads(node.lab.exec(node.ns, "nft", "-j", "list", "counters", "table", "inet", "fmtest"))
        kernel = {c["counter"]["name"]: (c["counter"]["packets"], c["counter"]["bytes"])
                  for c in counters["nftables"] if "counter" in c}
        want = (*kernel["c2s"], *kernel["s2c"])
        assert kernel["s2c"][1] > 200_000, kernel

        session = (6, _ip(vm.vm_ip), _ip(vm.host_ip), 8080)

        def totals() -> tuple[int, ...]:
            t = [0, 0, 0, 0]
            for r in agent.reports:
                for s in r.sessions:
                    if (s.ip_proto, s.client_ip, s.server_ip, s.server_port) == session:
                        t = [t[0] + s.packets_c2s, t[1] + s.bytes_c2s, t[2] + s.packets_s2c, t[3] + s.bytes_s2c]
            return tuple(t)

        assert agent.wait(lambda: totals() == want, 15), (want, totals())
        print(f"\nthe VM's download: kernel {want}, dp on {vm.tap} {totals()}")
    finally:
        halt.set()
        thread.join(10)
        for proc in (server, dp):
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        if counted:
            node.lab.exec(node.ns, "nft", "delete", "table", "inet", "fmtest")
