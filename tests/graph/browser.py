"""Headless Chromium driven over the DevTools protocol on a pipe: open a page, run script, screenshot.

``--remote-debugging-pipe`` takes commands on fd 3 and answers on fd 4 as NUL-separated JSON, so
no port and no WebSocket client are needed. The page stays open between screenshots, which is
what shows that it refreshes itself rather than being reloaded.
"""

from __future__ import annotations

import base64
import fcntl
import io
import json
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from PIL import Image

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--hide-scrollbars", "--remote-debugging-pipe"]


class Browser:
    def __init__(self, width: int = 1400, height: int = 900) -> None:
        self.profile = tempfile.mkdtemp(prefix="flowmap-chromium-")
        to_child, self._out = os.pipe()
        self._in, from_child = os.pipe()

        def fds_3_and_4() -> None:  # in the child: the pipe ends where Chromium expects them
            a, b = fcntl.fcntl(to_child, fcntl.F_DUPFD, 10), fcntl.fcntl(from_child, fcntl.F_DUPFD, 10)
            os.dup2(a, 3)
            os.dup2(b, 4)

        self.log = Path(self.profile) / "chromium.log"
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(
                [shutil.which("chromium") or "chromium", *FLAGS, f"--user-data-dir={self.profile}",
                 f"--window-size={width},{height}", "about:blank"],
                pass_fds=(3, 4), preexec_fn=fds_3_and_4, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                env={**os.environ, "TMPDIR": self.profile})  # its temporary files go with the profile
        os.close(to_child)
        os.close(from_child)
        os.set_blocking(self._in, False)
        self._buffer, self._id, self.session = b"", 0, ""

    def call(self, method: str, params: dict[str, Any] | None = None, timeout: float = 60) -> dict[str, Any]:
        self._id += 1
        message: dict[str, Any] = {"id": self._id, "method": method, "params": params or {}}
        if self.session:
            message["sessionId"] = self.session
        os.write(self._out, json.dumps(message).encode() + b"\0")
        end = time.monotonic() + timeout
        while True:
            while b"\0" not in self._buffer:
                if time.monotonic() > end or self.proc.poll() is not None:
                    log = self.log.read_text(errors="replace")[-2000:]
                    raise AssertionError(f"Chromium did not answer {method}:\n{log}")
                try:
                    chunk = os.read(self._in, 1 << 20)
                except BlockingIOError:
                    time.sleep(0.02)
                    continue
                self._buffer += chunk
            line, self._buffer = self._buffer.split(b"\0", 1)
            answer = json.loads(line)
            if answer.get("id") == self._id:
                if "error" in answer:
                    raise AssertionError(f"{method}: {answer['error']}")
                result: dict[str, Any] = answer["result"]
                return result

    def open(self, url: str) -> None:
        target = self.call("Target.createTarget", {"url": url})["targetId"]
        self.session = self.call("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]

    def evaluate(self, expression: str) -> Any:
        result = self.call("Runtime.evaluate", {"expression": expression, "returnByValue": True})
        if "exceptionDetails" in result:
            raise AssertionError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def wait(self, expression: str, timeout: float = 30.0) -> Any:
        """Until ``expression`` is truthy in the page (a deadline, not a timed assertion)."""
        end = time.monotonic() + timeout
        while True:
            value = self.evaluate(expression)
            if value:
                return value
            if time.monotonic() > end:
                raise AssertionError(f"the page never had {expression}")
            time.sleep(0.2)

    def screenshot(self) -> Image.Image:
        data = base64.b64decode(self.call("Page.captureScreenshot", {"format": "png"})["data"])
        return Image.open(io.BytesIO(data)).convert("RGB")

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        os.close(self._out)
        os.close(self._in)
        shutil.rmtree(self.profile, ignore_errors=True)
