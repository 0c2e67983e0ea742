"""``flowmap demo`` shows the map filling up, and Ctrl-C leaves nothing behind."""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from flowmap_devenv import binaries
from flowmap_devenv.simcluster import leftovers
from tests.conftest import REPO, need, need_root


def descendants(pid: int) -> set[int]:
    """Every living process below ``pid``."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.add(child)
            todo.append(child)
    return found


def alive(pid: int) -> bool:
    try:
        return (Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]) != "Z"
    except OSError:
        return False


def test_the_demo_fills_the_map_and_ctrl_c_removes_everything(tmp_path: Path) -> None:
    need_root()
    need(binaries.find() is not None, "the control plane binaries are not built ('flowmap controlplane build')")
    for tool in ("dnsmasq", "redis-server", "openssl", "nft", "psql", "runuser"):
        need(shutil.which(tool) is not None, f"the demo needs {tool}")
    need(any(Path("/usr/lib/postgresql").glob("*/bin/postgres")), "the demo needs PostgreSQL")
    # A crashed earlier run may have left namespaces behind; this test answers for the demo's own.
    before = set(leftovers())
    files = lambda: {*Path("/etc/netns").glob("fm*"), *Path(tempfile.gettempdir()).glob("flowmap-demo-*"),  # noqa: E731
                     *Path(tempfile.gettempdir()).glob("flowmap-pg-*")}
    files_before = files()
    out = tmp_path / "demo.out"
    with open(out, "wb") as sink:
        demo = subprocess.Popen([sys.executable, "-m", "flowmap_cli", "demo", "--every", "1", "--pause", "0.2"],
                                stdout=sink, stderr=subprocess.STDOUT, cwd=REPO)
    try:
        end = time.monotonic() + 180
        wanted = ("shop.web-shop.api-8080-tcp", "shop.api-payments.example.com-443-tcp",
                  "shop.web-kube-system.coredns-53-udp")
        while not all(w in out.read_text(errors="replace") for w in wanted):
            assert demo.poll() is None, f"the demo exited early:\n{out.read_text()[-3000:]}"
            assert time.monotonic() < end, f"the map did not fill up:\n{out.read_text()[-3000:]}"
            time.sleep(0.5)
        made = descendants(demo.pid)
        assert len(made) >= 10, "the demo should run a control plane, an operator, agents, dps and the shop"
        assert set(leftovers()) - before, "the demo made no namespaces"
        demo.send_signal(signal.SIGINT)
        assert demo.wait(90) == 0, out.read_text()[-3000:]
    finally:
        if demo.poll() is None:
            demo.kill()
    assert [pid for pid in made if alive(pid)] == [], "processes the demo started outlived it"
    # The veths and the bridge live in those namespaces, so they are gone with them.
    assert set(leftovers()) <= before, "network namespaces outlived the demo"
    # The pods' resolver files, the demo's folder and PostgreSQL's.
    assert files() <= files_before, f"files outlived the demo: {sorted(map(str, files() - files_before))}"
