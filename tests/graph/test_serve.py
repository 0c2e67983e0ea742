"""``flowmap graph --serve`` in a subprocess, looked at by headless Chromium while the map changes."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from PIL import Image

from flowmap_cli.drawing import COLOURS
from flowmap_devenv.controlplane import REPO, ControlPlane
from tests.conftest import need
from tests.graph import demo
from tests.graph.conftest import set_action
from tests.graph.dotfile import read_svg

DENIED_EDGE = "edge:" + demo.DENIED


class Served:
    def __init__(self, plane: ControlPlane, log: Path) -> None:
        need(shutil.which("dot") is not None, "flowmap graph needs Graphviz's dot (hack/debian-packages.txt)")
        self.log = log
        with open(log, "wb") as out:
            self.proc = subprocess.Popen([sys.executable, "-m", "flowmap_cli", "graph", "--serve", "--port", "0",
                                          "--every", "1", "--kubeconfig", str(plane.kubeconfig)],
                                         stdout=out, stderr=subprocess.STDOUT, cwd=REPO,
                                         # the API client's copies of the kubeconfig's keys: with the test's files
                                         env={**os.environ, "TMPDIR": str(log.parent)})
        end = time.monotonic() + 60
        while not (found := re.search(r"serving the map on (http://\S+/)", log.read_text())):
            assert self.proc.poll() is None and time.monotonic() < end, log.read_text()
            time.sleep(0.1)
        self.url = found.group(1)

    def get(self, path: str) -> tuple[int, dict[str, str], bytes]:
        try:
            with urllib.request.urlopen(self.url + path.lstrip("/"), timeout=30) as answer:
                return answer.status, dict(answer.headers), answer.read()
        except urllib.error.HTTPError as err:
            return err.code, dict(err.headers), err.read()

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(30)


@pytest.fixture
def served(shop: ControlPlane, tmp_path: Path) -> Iterator[Served]:
    server = Served(shop, tmp_path / "serve.log")
    try:
        yield server
    finally:
        if server.proc.poll() is None:
            server.proc.kill()
            server.proc.wait(10)


def wait_for(check, what: str, timeout: float = 30.0):  # type: ignore[no-untyped-def]
    end = time.monotonic() + timeout
    while not (value := check()):
        assert time.monotonic() < end, f"timed out waiting for {what}"
        time.sleep(0.2)
    return value


def test_the_page_the_picture_and_nothing_else(served: Served) -> None:
    assert served.url.startswith("http://127.0.0.1:")  # loopback unless told otherwise
    status, headers, body = served.get("/map.svg")
    assert status == 200 and headers["Content-Type"] == "image/svg+xml"
    assert "script-src" not in headers["Content-Security-Policy"]  # the picture alone runs nothing
    assert read_svg(body).strokes[DENIED_EDGE][0] == COLOURS["Denied"]
    status, headers, page = served.get("/")
    assert status == 200 and headers["Content-Type"].startswith("text/html")
    assert b"<svg" in page and page.count(b"<script>") == 1 and b"fetch('map.svg'" in page
    assert re.search(r"script-src 'sha256-[A-Za-z0-9+/=]+'", headers["Content-Security-Policy"])
    assert served.get("/../etc/passwd")[0] == 404 and served.get("/map.png")[0] == 404
    assert served.stop() == 0


def reds(image: Image.Image, box: dict[str, float], rgb: tuple[int, int, int]) -> int:
    """Pixels within the element's box that are (close to) ``rgb``."""
    crop = image.crop((int(box["x"]), int(box["y"]), int(box["x"] + box["width"]) + 1,
                       int(box["y"] + box["height"]) + 1))
    return sum(n for n, c in crop.getcolors(1 << 20) or [] if sum(abs(a - b) for a, b in zip(c, rgb)) < 60)


def rgb(hex_colour: str) -> tuple[int, int, int]:
    return int(hex_colour[1:3], 16), int(hex_colour[3:5], 16), int(hex_colour[5:7], 16)


BOX = f"(() => {{ const r = document.getElementById('{DENIED_EDGE}').getBoundingClientRect(); " \
      "return {x: r.x, y: r.y, width: r.width, height: r.height}; })()"
STROKE = f"document.getElementById('{DENIED_EDGE}').querySelector('path').getAttribute('stroke')"


def test_chromium_shows_the_map_and_the_page_follows_the_api(shop: ControlPlane, served: Served,
                                                              tmp_path: Path) -> None:
    need(shutil.which("chromium") is not None, "this test needs chromium (hack/debian-packages.txt)")
    from tests.graph.browser import Browser

    browser = Browser()
    try:
        browser.open(served.url)
        browser.wait("document.readyState === 'complete' && document.querySelector('#map svg') !== null")
        browser.evaluate("window.flowmapMarker = 42")  # gone if the page reloads
        before = browser.screenshot()
        before.save(tmp_path / "before.png")
        colours = before.getcolors(1 << 20) or []
        white = sum(n for n, c in colours if c == (255, 255, 255))
        assert len(colours) > 200 and white < 0.95 * before.width * before.height, "the page looks blank"
        box = browser.evaluate(BOX)
        assert box["width"] > 20 and box["x"] + box["width"] <= before.width, box
        assert reds(before, box, rgb(COLOURS["Denied"])) > 30, "the Denied edge is not red on screen"

        set_action(shop, demo.DENIED, "Allowed")
        # The server reads the API afresh, then the open page swaps the new picture in by itself.
        wait_for(lambda: read_svg(served.get("/map.svg")[2]).strokes[DENIED_EDGE][0] == COLOURS["Allowed"],
                 "the served SVG to change")
        browser.wait(f"{STROKE} === '{COLOURS['Allowed']}'")
        assert browser.evaluate("window.flowmapMarker") == 42, "the page reloaded instead of refreshing"
        assert "updated" in browser.evaluate("document.getElementById('status').textContent")
        after = browser.screenshot()
        after.save(tmp_path / "after.png")
        box = browser.evaluate(BOX)
        assert reds(after, box, rgb(COLOURS["Denied"])) == 0
        assert reds(after, box, rgb(COLOURS["Allowed"])) > 30
    finally:
        browser.close()
        set_action(shop, demo.DENIED, "Denied")
    assert served.stop() == 0


def test_a_failed_read_keeps_the_last_picture_and_says_why(shop: ControlPlane, served: Served) -> None:
    status, _, first = served.get("/map.svg")
    assert status == 200
    shop.stop_apiserver()
    try:
        status, headers, body = wait_for(lambda: (answer := served.get("/map.svg"))[1].get("X-Flowmap-Error")
                                         and answer, "the server to notice the API is gone")
        assert status == 200 and body == first
        assert "cannot reach the API server" in headers["X-Flowmap-Error"]
    finally:
        shop.start_apiserver()
    wait_for(lambda: "X-Flowmap-Error" not in served.get("/map.svg")[1], "the server to read the API again")
