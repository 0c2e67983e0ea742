"""Every sample in manifests/samples/ applies on an empty cluster: a real API server with the CRDs
and nothing else (no namespace a sample might name, no object another sample made).

The API server is the module's own, so no other test's namespaces hide a missing one; after each
sample its objects are deleted and the cluster is checked empty again, so each file applies alone.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from flowmap_devenv import binaries
from flowmap_devenv.controlplane import ControlPlane
from tests.conftest import REPO, need

SAMPLES = sorted((REPO / "manifests" / "samples").glob("*.yaml"))
BUILT_IN = {"default", "kube-node-lease", "kube-public", "kube-system"}


def contents(plane: ControlPlane) -> tuple[set[str], list[str]]:
    """The namespaces and every flowmap object, of any kind and namespace."""
    namespaces = json.loads(plane.kubectl("get", "namespaces", "-o", "json").stdout)["items"]
    objects = plane.kubectl("get", "groups,connections,networklearningpolicies,packetcaptures", "-A",
                            "-o", "name").stdout
    return {n["metadata"]["name"] for n in namespaces}, objects.split()


@pytest.fixture(scope="module")
def empty() -> Iterator[ControlPlane]:
    need(binaries.find() is not None, "the control plane needs kube-apiserver and etcd ('flowmap controlplane build')")
    folder = Path(tempfile.mkdtemp(prefix="flowmap-samples-"))
    plane = ControlPlane(folder / "state", log=lambda line: None)  # with the CRDs of crds/
    plane.up()
    try:
        yield plane
    finally:
        plane.down(quiet=True)
        shutil.rmtree(folder, ignore_errors=True)


def test_there_are_samples() -> None:
    assert {p.name for p in SAMPLES} >= {"connection.yaml", "group-cidr.yaml", "networklearningpolicy.yaml",
                                          "packetcapture.yaml"}


@pytest.mark.parametrize("sample", SAMPLES, ids=[p.name for p in SAMPLES])
def test_a_sample_applies_on_an_empty_cluster(empty: ControlPlane, sample: Path) -> None:
    namespaces, objects = contents(empty)
    assert namespaces <= BUILT_IN and not objects, (namespaces, objects)
    applied = empty.kubectl("apply", "-f", str(sample), check=False)
    assert applied.returncode == 0, f"{sample.name} does not apply on an empty cluster: {applied.stderr}"
    stored = json.loads(empty.kubectl("get", "-f", str(sample), "-o", "json").stdout)
    assert stored.get("items", [stored]), sample.name
    empty.kubectl("delete", "-f", str(sample), "--wait")
    assert contents(empty) == (namespaces, []), f"{sample.name} left something behind"
