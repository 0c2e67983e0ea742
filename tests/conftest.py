"""Shared test plumbing.

Tests that need root, network namespaces or the control plane call ``need(...)``: on a laptop
they skip with the reason; when ``FLOWMAP_REQUIRE_PRIVILEGED=1`` (as ``.ci/run`` sets) they fail,
so CI can never pass by skipping them.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from flowmap_devenv import binaries
from flowmap_devenv.controlplane import ControlPlane

if TYPE_CHECKING:
    from tests.operator.harness import Cluster

REPO = Path(__file__).resolve().parent.parent
NDPI = REPO / "tests" / "data" / "ndpi"  # public nDPI captures, vendored: a clone has them too
REQUIRE_PRIVILEGED = os.environ.get("FLOWMAP_REQUIRE_PRIVILEGED") == "1"


def need(condition: bool, reason: str) -> None:
    """Skip (laptop) or fail (CI) unless ``condition`` holds."""
    if condition:
        return
    if REQUIRE_PRIVILEGED:
        pytest.fail(f"FLOWMAP_REQUIRE_PRIVILEGED=1 and {reason}", pytrace=False)
    pytest.skip(reason)


def need_root() -> None:
    need(os.geteuid() == 0, "this test needs root (network namespaces, AF_PACKET)")
    need(shutil.which("ip") is not None, "this test needs 'ip' from iproute2")


@pytest.fixture
def privileged() -> None:
    """Use as a fixture in tests that need root and network namespaces."""
    need_root()


@pytest.fixture(scope="session")
def controlplane() -> Iterator[ControlPlane]:
    """One real etcd + kube-apiserver for the whole test session (``flowmap controlplane`` code)."""
    need(binaries.find() is not None or shutil.which("go") is not None,
         "the control plane needs kube-apiserver and etcd (run 'flowmap controlplane build', which needs Go)")
    folder = Path(tempfile.mkdtemp(prefix="flowmap-cp-"))
    plane = ControlPlane(folder / "state", log=lambda line: None)
    plane.up()
    try:
        yield plane
    finally:
        plane.down(quiet=True)
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="session")
def cluster(controlplane: ControlPlane) -> Iterator[Cluster]:
    """The flowmap manifests applied, two nodes with agents and a small shop (see the harness)."""
    from tests.operator.harness import Cluster, build_cluster  # the harness needs this module first

    build_cluster(controlplane)
    folder = Path(tempfile.mkdtemp(prefix="flowmap-op-"))
    try:
        yield Cluster(controlplane, folder)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
