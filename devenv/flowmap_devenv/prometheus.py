"""A real Prometheus (Debian's ``prometheus`` package) as a child process, for tests and the demo.

It scrapes the given targets every second on loopback, keeps its storage in a folder of its own
and answers PromQL through its HTTP API, as a Grafana would ask it.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

from flowmap_devenv.kube import free_port

SCRAPE_INTERVAL = 1.0  # seconds: a test waits for data, so as often as Prometheus allows sensibly


class PromQLError(RuntimeError):
    """Prometheus refused a query (it does not parse, or cannot be evaluated)."""


class Prometheus:
    """Start with :meth:`start`, stop with :meth:`stop` (which removes nothing: the folder is the caller's).

    ``jobs`` maps a job name to its targets, each ``(host:port, labels)``; ``relabel`` a job name
    to its ``metric_relabel_configs``.
    """

    def __init__(self, folder: Path, jobs: dict[str, list[tuple[str, dict[str, str]]]],
                 relabel: dict[str, list[dict[str, Any]]] | None = None) -> None:
        self.folder, self.jobs, self.relabel = folder, jobs, relabel or {}
        self.port = free_port()
        self.log = folder / "prometheus.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def config(self) -> dict[str, Any]:
        """The configuration file's content (JSON is YAML)."""
        interval = f"{SCRAPE_INTERVAL:g}s"
        return {"global": {"scrape_interval": interval, "scrape_timeout": interval, "evaluation_interval": interval},
                "scrape_configs": [{"job_name": job, "static_configs": [{"targets": [address], "labels": labels}
                                                                        for address, labels in targets],
                                    "metric_relabel_configs": self.relabel.get(job, [])}
                                   for job, targets in self.jobs.items()]}

    def start(self, timeout: float = 30.0) -> Prometheus:
        binary = shutil.which("prometheus")
        if binary is None:
            raise RuntimeError("prometheus is not installed (Debian package prometheus)")
        self.folder.mkdir(parents=True, exist_ok=True)
        config = self.folder / "prometheus.yml"
        config.write_text(json.dumps(self.config(), indent=1))
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen([binary, f"--config.file={config}", f"--storage.tsdb.path={self.folder / 'data'}",
                                          f"--web.listen-address=127.0.0.1:{self.port}",
                                          "--storage.tsdb.retention.time=1d"],
                                         stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        end = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"prometheus exited with {self.proc.returncode}:\n{self.tail()}")
            try:
                with urllib.request.urlopen(f"{self.url}/-/ready", timeout=2) as r:
                    if r.status == 200:
                        return self
            except OSError:
                pass
            if time.monotonic() > end:
                raise RuntimeError(f"prometheus was not ready within {timeout} s:\n{self.tail()}")
            time.sleep(0.1)

    def query(self, expr: str, at: float | None = None) -> list[dict[str, Any]]:
        """An instant query (``/api/v1/query``): the result's samples, each ``{"metric", "value"}``."""
        params = {"query": expr, **({"time": f"{at:.3f}"} if at is not None else {})}
        try:
            with urllib.request.urlopen(f"{self.url}/api/v1/query?{urllib.parse.urlencode(params)}", timeout=10) as r:
                body = json.loads(r.read())
        except urllib.error.HTTPError as exc:  # 400 and 422 carry Prometheus' own reason
            body = json.loads(exc.read() or b"{}")
        if body.get("status") != "success":
            raise PromQLError(f"{expr}: {body.get('errorType')}: {body.get('error')}")
        data = body["data"]
        if data["resultType"] != "vector":
            return [{"metric": {}, "value": data["result"]}]  # a scalar or a string
        return list(data["result"])

    def metadata(self) -> set[str]:
        """The names of the metrics the targets declare (``# TYPE`` lines), with samples or not yet."""
        with urllib.request.urlopen(f"{self.url}/api/v1/metadata", timeout=10) as r:
            return set(json.loads(r.read())["data"])

    def scraped_since(self, when: float, timeout: float = 30.0) -> None:
        """Until every target has been scraped (successfully) at or after ``when`` (Unix time)."""
        want = sum(len(targets) for targets in self.jobs.values())
        end = time.monotonic() + timeout
        while True:
            # timestamp() of the selector itself: the scrape's own time, not the evaluation's.
            fresh = [s for s in self.query("timestamp(up) and on(job, instance) up == 1")
                     if float(s["value"][1]) >= when]
            if len(fresh) == want:
                return
            if time.monotonic() > end:
                raise AssertionError(f"{want - len(fresh)} targets not scraped since {when}: {self.query('up')}")
            time.sleep(SCRAPE_INTERVAL / 4)

    def tail(self, lines: int = 30) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:]) if self.log.exists() else ""

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
