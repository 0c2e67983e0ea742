"""One real etcd + kube-apiserver for the whole test session (``flowmap controlplane`` code)."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from flowmap_devenv import binaries
from flowmap_devenv.controlplane import ControlPlane
from tests.conftest import need


@pytest.fixture(scope="session")
def controlplane() -> Iterator[ControlPlane]:
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
