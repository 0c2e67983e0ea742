"""The simulated cluster with the demo shop, for a test module (built once, torn down after)."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from flowmap_devenv import binaries
from flowmap_devenv.controlplane import ControlPlane
from flowmap_devenv.simcluster import SimCluster
from tests.conftest import need, need_root


@contextmanager
def shop_cluster() -> Iterator[SimCluster]:
    """A control plane of its own and the simulated cluster on it, up; everything removed after."""
    need_root()
    need(binaries.find() is not None, "the control plane binaries are not built ('flowmap controlplane build')")
    for tool in ("dnsmasq", "redis-server", "openssl", "nft", "psql", "runuser"):
        need(shutil.which(tool) is not None, f"the simulated cluster needs {tool}")
    need(any(Path("/usr/lib/postgresql").glob("*/bin/postgres")), "the simulated cluster needs PostgreSQL")
    folder = Path(tempfile.mkdtemp(prefix="flowmap-sim-"))
    plane = ControlPlane(folder / "state", log=lambda line: None)
    plane.up()
    cluster = SimCluster(plane, folder)
    try:
        cluster.up()
        yield cluster
    finally:
        try:
            cluster.down()
        finally:
            plane.down(quiet=True)
            shutil.rmtree(folder, ignore_errors=True)
