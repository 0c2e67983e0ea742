"""The operator's malloc bounds (flowmap_operator.running.bound_malloc), in processes of their own:
a thread that makes and frees pages of /metrics' size leaves nothing behind with them, and keeps
one page's worth without them (glibc's default, which the bounds exist for)."""

from __future__ import annotations

import subprocess
import sys

from tests.conftest import REPO

# Pages of a few MB made and freed on a thread, as a scrape or the checkpoint's encoder does.
PAGES = """
import sys, threading
from flowmap_operator import running
if sys.argv[1] == "bounded":
    running.bound_malloc()

def rss():
    return int(next(line for line in open("/proc/self/status") if line.startswith("VmRSS")).split()[1])

def pages():
    for mib in (16, 12, 11, 12, 10):
        page = b"x" * (mib << 20)
        del page

base = rss()
thread = threading.Thread(target=pages)
thread.start()
thread.join()
print((rss() - base) // 1024)
"""


def kept_mib(mode: str) -> int:
    proc = subprocess.run([sys.executable, "-c", PAGES, mode], cwd=REPO, capture_output=True, text=True, timeout=60,
                          check=True)
    return int(proc.stdout)


def test_freed_pages_go_back_to_the_system_with_the_bounds_and_stay_without() -> None:
    assert kept_mib("bounded") < 2
    assert kept_mib("default") >= 10  # glibc's own choice keeps a page: what the bounds are for
