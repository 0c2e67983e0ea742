"""A real control plane holding the demo's map, and the real ``flowmap graph`` command to draw it.

The graph tests start a control plane of their own (about 4 s) rather than share the session's:
the demo's names (shop.web, shop.api ...) are the ones the operator tests write and count on,
and these tests set actions and bytes those tests do not expect.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from flowmap_devenv import binaries
from flowmap_devenv.controlplane import REPO, ControlPlane
from tests.conftest import need
from tests.graph import demo

GROUP, VERSION, MERGE = "flowmap.dev", "v1alpha1", "application/merge-patch+json"


def start(folder: Path, *, crds: bool = True) -> ControlPlane:
    need(binaries.find() is not None or shutil.which("go") is not None,
         "the control plane needs kube-apiserver and etcd (run 'flowmap controlplane build', which needs Go)")
    plane = ControlPlane(folder / "state", crds=REPO / "crds" if crds else None, log=lambda line: None)
    plane.up()
    return plane


def api(plane: ControlPlane) -> Any:
    from kubernetes import client, config

    return client.CustomObjectsApi(config.new_client_from_config(str(plane.kubeconfig)))


def write(plane: ControlPlane, plural: str, objects: list[dict[str, Any]]) -> None:
    """Create (or keep) each object, then set its status through the status subresource."""
    from kubernetes.client.exceptions import ApiException

    custom = api(plane)
    for obj in objects:
        body = {k: v for k, v in obj.items() if k != "status"}
        try:
            custom.create_cluster_custom_object(GROUP, VERSION, plural, body)
        except ApiException as exc:
            if exc.status != 409:
                raise
        custom.patch_cluster_custom_object_status(GROUP, VERSION, plural, obj["metadata"]["name"],
                                                  {"status": obj["status"]}, _content_type=MERGE)


def set_action(plane: ControlPlane, name: str, action: str) -> None:
    api(plane).patch_cluster_custom_object_status(GROUP, VERSION, "connections", name,
                                                  {"status": {"action": action}}, _content_type=MERGE)


@pytest.fixture(scope="package")
def shop() -> Iterator[ControlPlane]:
    """A control plane of its own with the demo's map; tests that change it put it back."""
    folder = Path(tempfile.mkdtemp(prefix="flowmap-graph-"))
    plane = start(folder)
    try:
        write(plane, "groups", demo.groups())
        write(plane, "connections", demo.connections())
        yield plane
    finally:
        plane.down(quiet=True)
        shutil.rmtree(folder, ignore_errors=True)


def graph(*args: str, plane: ControlPlane | None = None, env: dict[str, str] | None = None,
          timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """``flowmap graph ARGS`` as a user runs it, against ``plane`` when given."""
    argv = [sys.executable, "-m", "flowmap_cli", "graph", *args]
    if plane is not None:
        argv += ["--kubeconfig", str(plane.kubeconfig)]
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, cwd=REPO, env=env)
